//! seam's own pool of HTTP/1.1 connections to the app: connections are reused once a
//! response has been read, and an app that closes its connections still gets every
//! request. The app here is raw TCP, so the test sees each connection it accepts.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 app that numbers the connections that bring it requests and answers
/// every request (all of them GETs without a body) with its connection's number. With
/// `close`, it says `Connection: close` and hangs up after each answer. (seam's upstream
/// health probe connects too, without a request; it gets no number.)
async fn numbering_app(close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(answer_with_number(tcp, counter.clone(), close));
        }
    });
    (addr, accepted)
}

async fn answer_with_number(mut tcp: TcpStream, counter: Arc<AtomicUsize>, close: bool) {
    let mut number = None;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let body = number
                .get_or_insert_with(|| counter.fetch_add(1, Ordering::SeqCst) + 1)
                .to_string();
            let connection = if close { "close" } else { "keep-alive" };
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
                body.len()
            );
            if tcp.write_all(reply.as_bytes()).await.is_err() || close {
                return;
            }
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn mesh_in_front_of(app: SocketAddr) -> Mesh {
    Mesh::start_with(
        |_| {},
        |billing| billing.upstream.url = format!("http://{app}").parse().unwrap(),
    )
    .await
}

/// Which app connection answered one request through the mesh.
async fn answered_by(mesh: &Mesh) -> String {
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/which", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, body) = read_all(resp).await;
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn sequential_requests_share_one_app_connection() {
    let (app, accepted) = numbering_app(false).await;
    let mesh = mesh_in_front_of(app).await;
    for _ in 0..50 {
        assert_eq!(answered_by(&mesh).await, "1");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_requests_open_at_most_one_connection_each_then_reuse_them() {
    let (app, accepted) = numbering_app(false).await;
    let mesh = Arc::new(mesh_in_front_of(app).await);
    for _round in 0..5 {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let mesh = mesh.clone();
                tokio::spawn(async move { answered_by(&mesh).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!(
        (1..=8).contains(&opened),
        "40 requests, 8 at a time, opened {opened} app connections"
    );
}

#[tokio::test]
async fn an_app_that_closes_every_connection_still_gets_every_request() {
    let (app, accepted) = numbering_app(true).await;
    let mesh = mesh_in_front_of(app).await;
    for expected in 1..=20 {
        assert_eq!(answered_by(&mesh).await, expected.to_string());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
}

/// An app that answers a request as soon as its head is in, and only then reads its
/// body, reporting which connection it came on and how many bytes arrived: once the
/// answer has been read, seam must still send the rest of the body to the app, and
/// then reuse the connection.
#[tokio::test]
async fn a_request_body_the_app_reads_after_answering_still_reaches_it_whole() {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::sync::mpsc;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (report, mut reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for connection in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let report = report.clone();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let report = report.clone();
                async move {
                    tokio::spawn(async move {
                        let got = req.into_body().collect().await.map(|b| b.to_bytes().len());
                        let _ = report.send((connection, got.ok()));
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        bytes::Bytes::from_static(b"early"),
                    )))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    let mesh = mesh_in_front_of(app).await;

    let (tx, rx) = mpsc::channel(4);
    tx.send(bytes::Bytes::from(vec![1u8; 1000])).await.unwrap();
    let resp = mesh
        .h1()
        .request(mesh.to_billing("POST", "/upload", ChannelBody(rx).boxed()))
        .await
        .unwrap();
    let (_, answer) = read_all(resp).await;
    assert_eq!(&answer[..], b"early");

    // The answer is in; the rest of the body follows, and reaches the app.
    tx.send(bytes::Bytes::from(vec![2u8; 3000])).await.unwrap();
    drop(tx);
    // A bound, so that a body left undriven fails the test instead of hanging it.
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), reports.recv()).await;
    let Ok(Some((first, Some(4000)))) = got else {
        panic!("the app did not get the whole body: {got:?}");
    };
    // And the connection serves the next request.
    assert_eq!(
        mesh.h1()
            .request(mesh.to_billing("GET", "/again", empty()))
            .await
            .unwrap()
            .status(),
        200
    );
    let second = tokio::time::timeout(std::time::Duration::from_secs(20), reports.recv()).await;
    assert_eq!(
        second,
        Ok(Some((first, Some(0)))),
        "not the same connection"
    );
}
