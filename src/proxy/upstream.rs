//! The client to the local app (HTTP/1.1 or h2c, per `upstream_protocol`).
//!
//! HTTP/1.1 apps get seam's own small connection pool: idle connections wait in a stack
//! and each goes back when its response body has been read to the end. hyper-util's
//! general pool cost a hashed key lookup, two pool operations and a spawned task for
//! every request (benches/RESULTS.md); seam has one app at one address and needs none
//! of that. h2c apps share one multiplexed connection through hyper-util's client.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::body::OpenedBody;
use super::head::RequestHead;
use super::headers::{SEAM_CALLER, header_value, strip_hop_by_hop, strip_seam_headers};
use super::mesh::MeshBody;
use crate::config::{UpstreamConfig, UpstreamProtocol};

/// hyper's read buffer limit for an HTTP/1.1 app connection, which also caps the app's
/// response head at 32 KiB (HAProxy's default buffer holds 16 KiB, nginx's 4-8 KiB).
/// hyper's adaptive buffer grows 8 -> 24 -> 56 KiB under this limit (each step keeps the
/// bytes already read in front), so a large body arrives in chunks of at most 56 KiB,
/// each sealed whole into one frame. With 64 KiB the buffer ends at 120 KiB per
/// connection: a seam with a few hundred large responses in flight spent most of its
/// memory there, for no fewer CPU cycles per request (benches/RESULTS.md).
const APP_READ_BUFFER: usize = 32 * 1024;

/// Idle HTTP/1.1 connections kept for reuse; more than this many at once are closed
/// when their response ends. The app's own keep-alive timeout closes idle ones sooner.
const MAX_IDLE: usize = 256;

/// An opened sealed body, or a plain one from a non-seam caller (`interop.plain_mtls`).
pub type UpstreamBody = Either<OpenedBody<MeshBody>, MeshBody>;

pub struct Upstream {
    client: AppClient,
    url: Uri,
    protocol: UpstreamProtocol,
}

enum AppClient {
    Http1(Arc<Http1Pool>),
    H2c(Box<Client<HttpConnector, UpstreamBody>>),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the request for the app is not valid HTTP: {0}")]
    Build(#[from] http::Error),
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("connecting to the app failed: {0}; is it running and listening there?")]
    Connect(std::io::Error),
    #[error("connecting to the app timed out after {0:?}; is it running and listening there?")]
    ConnectTimeout(Duration),
    #[error("the app's connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// The HTTP/1.1 connections to the app: idle ones on a stack, the most recently used on
/// top (its buffers are the likeliest to be warm).
struct Http1Pool {
    /// Host and port of the app ([`app_target`]).
    target: (String, u16),
    connect_timeout: Duration,
    idle: Mutex<Vec<http1::SendRequest<UpstreamBody>>>,
}

/// The app's response body. An HTTP/1.1 connection goes back to the pool when this body
/// has been read to its end; dropped before that, the connection closes with it.
pub struct AppReply {
    inner: Incoming,
    /// The connection to give back, and where.
    pooled: Option<(http1::SendRequest<UpstreamBody>, Arc<Http1Pool>)>,
}

/// Host and port of the upstream URL (validated as `http://HOST:PORT` by the config),
/// for connecting to the app and probing it.
pub fn app_target(url: &Uri) -> (String, u16) {
    let host = url.host().unwrap_or("127.0.0.1");
    // `[::1]` in a URI is `::1` to the resolver.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    (host, url.port_u16().unwrap_or(80))
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, connect_timeout: Duration) -> Self {
        let client = match config.protocol {
            UpstreamProtocol::Http1 => AppClient::Http1(Arc::new(Http1Pool {
                target: app_target(&config.url),
                connect_timeout,
                idle: Mutex::new(Vec::new()),
            })),
            UpstreamProtocol::H2c => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect_timeout));
                connector.set_nodelay(true);
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .http2_only(true);
                super::h2_tuning::legacy_client(&mut builder);
                AppClient::H2c(Box::new(builder.build(connector)))
            }
        };
        Self {
            client,
            url: config.url.clone(),
            protocol: config.protocol,
        }
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// Hands a request from `caller` to the app.
    pub async fn send(
        &self,
        head: RequestHead,
        body: UpstreamBody,
        caller: &str,
    ) -> Result<Response<AppReply>, UpstreamError> {
        let path = head.path_and_query;
        let uri = match self.protocol {
            // HTTP/1.1 sends the origin form; the authority goes in Host.
            UpstreamProtocol::Http1 => Uri::from(path),
            UpstreamProtocol::H2c => {
                let mut uri = self.url.clone().into_parts();
                uri.path_and_query = Some(path);
                Uri::from_parts(uri).map_err(http::Error::from)?
            }
        };
        let mut req = Request::builder().method(head.method).uri(uri).body(body)?;
        let headers = req.headers_mut();
        *headers = head.headers;
        // The sending seam already cleaned the head; doing it again here means a
        // compromised or buggy peer still cannot smuggle identity or framing headers.
        strip_hop_by_hop(headers);
        strip_seam_headers(headers);
        headers.insert(SEAM_CALLER, header_value(caller));
        match &self.client {
            AppClient::Http1(pool) => {
                let host = Some(head.authority).filter(|a| !a.is_empty()).or_else(|| {
                    self.url
                        .authority()
                        .map(Authority::as_str)
                        .and_then(|a| HeaderValue::from_str(a).ok())
                });
                if let Some(host) = host {
                    headers.insert(header::HOST, host);
                }
                pool.send(req).await
            }
            // HTTP/2 carries the authority in the URI; a Host header would conflict.
            AppClient::H2c(client) => {
                headers.remove(header::HOST);
                let resp = client.request(req).await?;
                Ok(resp.map(|inner| AppReply {
                    inner,
                    pooled: None,
                }))
            }
        }
    }
}

impl Http1Pool {
    /// Sends on an idle connection, or a new one. A request that an idle connection
    /// could not take (the app had just closed it) goes on the next, or a new one.
    async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<AppReply>, UpstreamError> {
        let mut req = req;
        while let Some(mut sender) = self.idle_connection() {
            // Ready at once unless the app is closing it.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.reply(resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // Boxed: connecting is rare, and its state would otherwise be carried by every
        // request's future.
        let mut sender = Box::pin(self.connect()).await?;
        let resp = sender.send_request(req).await?;
        Ok(self.reply(resp, sender))
    }

    /// The most recently returned connection that is still open.
    fn idle_connection(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let tcp = timeout(
            self.connect_timeout,
            TcpStream::connect((self.target.0.as_str(), self.target.1)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))?
        .map_err(UpstreamError::Connect)?;
        tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(APP_READ_BUFFER)
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection closed with an error");
            }
        });
        Ok(sender)
    }

    fn reply(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: http1::SendRequest<UpstreamBody>,
    ) -> Response<AppReply> {
        resp.map(|inner| {
            let mut reply = AppReply {
                inner,
                pooled: Some((sender, self.clone())),
            };
            reply.give_back_if_done();
            reply
        })
    }

    fn put_back(&self, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

impl AppReply {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.pooled.take() {
            pool.put_back(sender);
        }
    }

    fn give_back_if_done(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for AppReply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) => self.give_back_if_done(),
            // The connection is broken: dropping its sender closes it.
            Some(Err(_)) => self.pooled = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
