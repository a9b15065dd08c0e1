//! gRPC through the mesh with a real gRPC client and server (tonic): unary and
//! server-streaming calls, with grpc-status and messages preserved end to end.

mod support;

use std::future::Future;
use std::pin::Pin;

use http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seam::config::UpstreamProtocol;
use support::*;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct ChargeRequest {
    #[prost(string, tag = "1")]
    account: String,
    #[prost(uint64, tag = "2")]
    cents: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChargeReply {
    #[prost(string, tag = "1")]
    receipt: String,
    /// The `seam-caller` metadata the server saw.
    #[prost(string, tag = "2")]
    caller: String,
}

const CHARGE: &str = "/seam.test.Ledger/Charge";
const HISTORY: &str = "/seam.test.Ledger/History";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Charge;
struct History;

impl tonic::server::UnaryService<ChargeRequest> for Charge {
    type Response = ChargeReply;
    type Future = BoxFuture<Result<Response<ChargeReply>, Status>>;

    fn call(&mut self, req: Request<ChargeRequest>) -> Self::Future {
        Box::pin(async move {
            let caller = req
                .metadata()
                .get("seam-caller")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let msg = req.into_inner();
            if msg.account == "missing" {
                return Err(Status::not_found("no account 'missing'"));
            }
            Ok(Response::new(ChargeReply {
                receipt: format!("{}:{}", msg.account, msg.cents),
                caller,
            }))
        })
    }
}

impl tonic::server::ServerStreamingService<ChargeRequest> for History {
    type Response = ChargeReply;
    type ResponseStream =
        futures_util::stream::Iter<std::vec::IntoIter<Result<ChargeReply, Status>>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<ChargeRequest>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            let items: Vec<_> = (0..msg.cents)
                .map(|i| {
                    Ok(ChargeReply {
                        receipt: format!("{}#{i}", msg.account),
                        caller: String::new(),
                    })
                })
                .collect();
            Ok(Response::new(futures_util::stream::iter(items)))
        })
    }
}

/// Serves the Ledger service over h2c on 127.0.0.1:0.
async fn grpc_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<ChargeReply, ChargeRequest>::default());
                let resp = match req.uri().path() {
                    CHARGE => grpc.unary(Charge, req).await,
                    HISTORY => grpc.server_streaming(History, req).await,
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok::<_, std::convert::Infallible>(resp)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_through_the_mesh() {
    let server = grpc_server().await;
    let mesh = Mesh::start_with(
        |_| {},
        |b| {
            b.upstream.url = format!("http://{server}").parse().unwrap();
            b.upstream.protocol = UpstreamProtocol::H2c;
        },
    )
    .await;
    // An h2c client pinned to orders' seam, with tonic's body type.
    let transport = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, tonic::body::Body>(pinned_connector(mesh.orders.outbound_addr()));
    let mut client = tonic::client::Grpc::with_origin(transport, "http://billing".parse().unwrap());

    client.ready().await.unwrap();
    let reply: Response<ChargeReply> = client
        .unary(
            Request::new(ChargeRequest {
                account: "acme".into(),
                cents: 1250,
            }),
            PathAndQuery::from_static(CHARGE),
            ProstCodec::<ChargeRequest, ChargeReply>::default(),
        )
        .await
        .unwrap();
    let reply = reply.into_inner();
    assert_eq!(reply.receipt, "acme:1250");
    assert_eq!(reply.caller, "orders");

    // A gRPC error travels in trailers (grpc-status, grpc-message): it must arrive intact.
    client.ready().await.unwrap();
    let err = client
        .unary::<_, ChargeReply, _>(
            Request::new(ChargeRequest {
                account: "missing".into(),
                cents: 1,
            }),
            PathAndQuery::from_static(CHARGE),
            ProstCodec::<ChargeRequest, ChargeReply>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no account 'missing'");

    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            Request::new(ChargeRequest {
                account: "acme".into(),
                cents: 200,
            }),
            PathAndQuery::from_static(HISTORY),
            ProstCodec::<ChargeRequest, ChargeReply>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        seen.push(item.receipt);
    }
    assert_eq!(seen.len(), 200);
    assert_eq!(seen[0], "acme#0");
    assert_eq!(seen[199], "acme#199");
    // The stream ended with grpc-status 0 in its trailers.
    let trailers = stream.trailers().await.unwrap();
    assert!(
        trailers.is_none()
            || trailers
                .unwrap()
                .get("grpc-status")
                .is_none_or(|v| v == "0")
    );
}
