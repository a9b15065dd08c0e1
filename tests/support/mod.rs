//! Shared test fixtures: a real app server, real seams with certificates from a dev
//! CA, and plain HTTP/1.1 and h2c clients. Everything listens on 127.0.0.1 port 0.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use seam::Sidecar;
use seam::config::{
    AdminConfig, Config, InteropConfig, LimitsConfig, ListenConfig, RateLimitConfig, RuntimeConfig,
    SessionConfig, TimeoutConfig, TlsConfig, UpstreamConfig, UpstreamProtocol,
};
use seam::identity::{DevCa, Identity};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

pub type TestBody = BoxBody<Bytes, Infallible>;

pub const TRUST_DOMAIN: &str = "mesh.local";

/// The billing app: answers a handful of routes that tests use to see what arrived.
pub struct App {
    pub addr: SocketAddr,
    /// Senders for `/stream` responses, handed over as requests arrive.
    streams: Arc<Mutex<mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>>>,
    /// Releases every request waiting on `/hold`.
    pub release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// A body fed from a channel, so a test decides when each chunk is sent.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

/// Two seams (orders calling billing) and billing's app, all in-process.
pub struct Mesh {
    pub ca: DevCa,
    pub app: App,
    pub orders: Sidecar,
    pub billing: Sidecar,
    pub billing_config: Config,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// The byte at offset `i` of every generated body: cheap and position-dependent, so
/// a reordered or shifted chunk changes the checksum.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern_byte).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed()
}

/// A generated body of `len` bytes, sent in 64 KiB chunks as they are polled.
struct PatternBody {
    sent: u64,
    len: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.sent).min(64 * 1024);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len - self.sent)
    }
}

/// Body then trailers, for the gRPC-style trailer tests.
struct WithTrailers(Option<Bytes>, Option<HeaderMap>);

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.1.take().map(|t| Ok(Frame::trailers(t))))
    }
}

impl App {
    /// Starts the app on 127.0.0.1:0 speaking HTTP/1.1 and h2c.
    pub async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream_tx, stream_rx) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let release_for_app = release.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let stream_tx = stream_tx.clone();
                let release = release_for_app.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| route(req, stream_tx.clone(), release.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        App {
            addr,
            streams: Arc::new(Mutex::new(stream_rx)),
            release,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for the next `/stream` request and returns the sender that feeds its body.
    pub async fn next_stream(&self) -> mpsc::Sender<Bytes> {
        let rx = self.streams.clone();
        tokio::task::spawn_blocking(move || rx.lock().unwrap().blocking_recv())
            .await
            .unwrap()
            .expect("app stopped")
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn route(
    req: Request<Incoming>,
    streams: mpsc::UnboundedSender<mpsc::Sender<Bytes>>,
    release: Arc<Notify>,
) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (first, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let resp = match first {
        // What arrived: method, path, headers, as JSON.
        "headers" => {
            let mut map = BTreeMap::new();
            for (k, v) in req.headers() {
                map.entry(k.as_str().to_owned())
                    .or_insert_with(Vec::new)
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                "headers": map,
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("x-app", "billing")
                .body(full(body.to_string()))
                .unwrap()
        }
        // Streams the request body through SHA-256: "<len> <hex>".
        "sha256" => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(Response::builder()
                        .status(400)
                        .body(full("body error"))
                        .unwrap());
                };
                if let Ok(d) = frame.into_data() {
                    len += d.len() as u64;
                    h.update(&d);
                }
            }
            Response::new(full(format!("{len} {}", hex(&h.finalize()))))
        }
        // Echoes the request body back as it arrives.
        "echo" => {
            let ct = req.headers().get("content-type").cloned();
            let mut resp =
                Response::new(req.into_body().map_err(|_| unreachable!()).boxed_unsync());
            if let Some(ct) = ct {
                resp.headers_mut().insert("content-type", ct);
            }
            let (p, b) = resp.into_parts();
            return Ok(Response::from_parts(p, echo_body(b)));
        }
        "bytes" => {
            let len: u64 = rest.parse().unwrap_or(0);
            Response::builder()
                .header("content-length", len.to_string())
                .body(PatternBody { sent: 0, len }.boxed())
                .unwrap()
        }
        "status" => {
            let code = rest
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            Response::builder()
                .status(code)
                .header("x-custom", "kept")
                .body(full(format!("status {}", code.as_u16())))
                .unwrap()
        }
        "trailers" => {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", "abc123".parse().unwrap());
            t.insert("grpc-status", "0".parse().unwrap());
            // Declared up front, as HTTP/1.1 requires for trailer fields to be sent.
            Response::builder()
                .header("trailer", "x-checksum, grpc-status")
                .body(WithTrailers(Some(Bytes::from_static(b"with trailers")), Some(t)).boxed())
                .unwrap()
        }
        // A response whose body the test feeds chunk by chunk.
        "stream" => {
            let (tx, rx) = mpsc::channel(4);
            let _ = streams.send(tx);
            Response::new(ChannelBody(rx).boxed())
        }
        // Answers only when the test releases it.
        "hold" => {
            release.notified().await;
            Response::new(full("released"))
        }
        _ => Response::builder()
            .status(404)
            .body(full("no such route"))
            .unwrap(),
    };
    Ok(resp)
}

fn echo_body(b: http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>) -> TestBody {
    // UnsyncBoxBody -> BoxBody needs Sync; collect-free re-boxing through a channel
    // would add noise, so echo through a forwarding task instead.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut b = b;
        while let Some(Ok(frame)) = b.frame().await {
            if let Ok(d) = frame.into_data()
                && tx.send(d).await.is_err()
            {
                break;
            }
        }
    });
    ChannelBody(rx).boxed()
}

pub fn config(service: &str, upstream: &str, peers: BTreeMap<String, Vec<SocketAddr>>) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Config {
        service: service.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
        listen: ListenConfig {
            outbound: any,
            inbound: any,
            admin: any,
            pinned: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: upstream.parse().unwrap(),
            protocol: UpstreamProtocol::Http1,
        },
        // Identities are handed to Sidecar::start directly; these paths are not read.
        tls: TlsConfig {
            ca: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
        },
        session: SessionConfig::default(),
        rate_limit: RateLimitConfig::default(),
        peers,
        timeouts: TimeoutConfig {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        },
        runtime: RuntimeConfig::default(),
        // Test certificates live an hour (see `identity`): warn only in the last minute.
        admin: AdminConfig {
            cert_warning: Duration::from_secs(60),
            ..AdminConfig::default()
        },
        limits: LimitsConfig::default(),
        interop: InteropConfig::default(),
    }
}

pub fn identity(ca: &DevCa, service: &str) -> Identity {
    let now = SystemTime::now();
    let cert = ca
        .issue(
            service,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    Identity::from_pem(
        &ca.ca_pem(),
        &cert.cert_pem,
        &cert.key_pem,
        TRUST_DOMAIN,
        service,
    )
    .unwrap()
}

pub fn peers(name: &str, addrs: &[SocketAddr]) -> BTreeMap<String, Vec<SocketAddr>> {
    BTreeMap::from([(name.to_owned(), addrs.to_vec())])
}

/// An HTTP/2 connection over mutual TLS to billing's inbound port, presenting a mesh
/// certificate for `caller`: what a peer seam (or another mesh's proxy) opens. The
/// connection task runs in the returned handle.
pub async fn mtls_h2_to_billing<B>(
    mesh: &Mesh,
    caller: &str,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let id = identity(&mesh.ca, caller);
    let connector = tokio_rustls::TlsConnector::from(id.client_config("billing").unwrap());
    let tcp = tokio::net::TcpStream::connect(mesh.billing.inbound_addr())
        .await
        .unwrap();
    let name = seam::identity::SpiffeId::new(TRUST_DOMAIN, "billing")
        .unwrap()
        .server_name()
        .unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, B>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(|_| {}, |_| {}).await
    }

    /// Starts the mesh, letting the test adjust each seam's config first.
    pub async fn start_with(
        orders_cfg: impl FnOnce(&mut Config),
        billing_cfg: impl FnOnce(&mut Config),
    ) -> Mesh {
        let ca = DevCa::new(TRUST_DOMAIN).unwrap();
        let app = App::start().await;
        let mut bc = config("billing", &app.url(), BTreeMap::new());
        billing_cfg(&mut bc);
        let billing = Sidecar::start(bc.clone(), identity(&ca, "billing"))
            .await
            .unwrap();
        let mut oc = config(
            "orders",
            "http://127.0.0.1:9",
            peers("billing", &[billing.inbound_addr()]),
        );
        orders_cfg(&mut oc);
        let orders = Sidecar::start(oc, identity(&ca, "orders")).await.unwrap();
        // Later restarts of billing reuse its port, so orders keeps pointing at it.
        bc.listen.inbound = billing.inbound_addr();
        Mesh {
            ca,
            app,
            orders,
            billing,
            billing_config: bc,
        }
    }

    /// Stops billing's seam (losing its sessions) and starts a fresh one on the same port.
    pub async fn restart_billing(&mut self) {
        let fresh_config = self.billing_config.clone();
        let old = std::mem::replace(
            &mut self.billing,
            // Placeholder swapped out right below; Sidecar has no Default, so start
            // the new one only after the old one released the port.
            Sidecar::start(
                config("placeholder", "http://127.0.0.1:9", BTreeMap::new()),
                identity(&self.ca, "placeholder"),
            )
            .await
            .unwrap(),
        );
        assert!(old.shutdown().await, "billing drained");
        let placeholder = std::mem::replace(
            &mut self.billing,
            Sidecar::start(fresh_config, identity(&self.ca, "billing"))
                .await
                .unwrap(),
        );
        placeholder.shutdown().await;
    }

    /// An HTTP/1.1 client whose every connection goes to orders' outbound port.
    pub fn h1(&self) -> Client<PinnedConnector, TestBody> {
        client_via(self.orders.outbound_addr(), false)
    }

    /// An h2c (prior knowledge) client whose every connection goes to orders' seam.
    pub fn h2c(&self) -> Client<PinnedConnector, TestBody> {
        client_via(self.orders.outbound_addr(), true)
    }

    /// A request for billing, sent through orders' seam by the clients above:
    /// HTTP/1.1 sends it origin-form with `Host: billing`, h2c with `:authority: billing`,
    /// as curl and other stock clients do.
    pub fn to_billing(&self, method: &str, path: &str, body: TestBody) -> Request<TestBody> {
        Request::builder()
            .method(method)
            .uri(format!("http://billing{path}"))
            .body(body)
            .unwrap()
    }
}

/// Connects to one fixed address whatever the request's host, the way a client
/// configured with a proxy or a local sidecar port does.
#[derive(Clone)]
pub struct PinnedConnector {
    inner: HttpConnector,
    target: http::Uri,
}

impl tower_service::Service<http::Uri> for PinnedConnector {
    type Response = <HttpConnector as tower_service::Service<http::Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<http::Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        self.inner.call(self.target.clone())
    }
}

pub fn pinned_connector(addr: SocketAddr) -> PinnedConnector {
    PinnedConnector {
        inner: HttpConnector::new(),
        target: format!("http://{addr}").parse().unwrap(),
    }
}

pub fn client_via(addr: SocketAddr, h2: bool) -> Client<PinnedConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(pinned_connector(addr))
}

pub fn body(data: impl Into<Bytes>) -> TestBody {
    full(data)
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

pub async fn read_all(resp: Response<Incoming>) -> (http::response::Parts, Bytes) {
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

/// Sends raw bytes on a fresh connection and reads until the server closes it.
pub async fn raw_exchange_to_close(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}
