//! The embedded demo mesh behind `seam demo` (DESIGN §7).
//!
//! One process holds everything a two-service mesh needs: an in-memory development CA,
//! two seams ("orders" and "billing") with certificates from it, and two small apps. The
//! billing app answers with JSON that includes the `seam-caller` header it received;
//! the orders app calls billing through its own seam and measures each request. Every
//! listener binds 127.0.0.1 port 0, so the demo never clashes with a running seam or
//! anything else on the machine, and nothing leaves loopback.
//!
//! ```text
//! orders app --HTTP/1.1--> seam(orders) ==mTLS + sealed session==> seam(billing) --> billing app
//! ```
//!
//! Every number in [`DemoReport`] is measured during the run: latencies by the orders
//! app's clock, sessions and handshakes from the seams' own session caches.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{
    AdminConfig, Config, InteropConfig, LimitsConfig, ListenConfig, RateLimitConfig, RuntimeConfig,
    SessionConfig, TimeoutConfig, TlsConfig, UpstreamConfig, UpstreamProtocol,
};
use crate::identity::{DevCa, Identity, IdentityError};
use crate::proxy::headers::SEAM_CALLER;
use crate::session::cache::SessionStatsSnapshot;
use crate::{Sidecar, SidecarError};

/// The trust domain of the demo CA; the SPIFFE ids are spiffe://mesh.local/<service>.
pub const TRUST_DOMAIN: &str = "mesh.local";
/// The service that calls.
pub const ORDERS: &str = "orders";
/// The service that is called.
pub const BILLING: &str = "billing";
/// Requests `seam demo` sends when `--requests` is not given.
pub const DEFAULT_REQUESTS: usize = 100;

/// Bounds one demo request end to end, so a broken mesh shows up as a counted failure
/// instead of a demo that hangs. Well above the seams' own connect timeout (1 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Leaf certificates are backdated a little so a clock step during the demo cannot
/// make them "not yet valid".
const CERT_BACKDATE: Duration = Duration::from_secs(60);
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// The demo apps read at most this much of a request body; demo bodies are tiny.
const APP_BODY_LIMIT: usize = 64 * 1024;
/// How long an app waits for its open connections when the demo stops.
const APP_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOptions {
    /// How many requests the orders app sends to billing.
    pub requests: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            requests: DEFAULT_REQUESTS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create the demo certificates: {0}")]
    Identity(#[from] IdentityError),
    #[error("cannot start the {service} seam: {source}")]
    Sidecar {
        service: &'static str,
        source: SidecarError,
    },
    #[error("cannot start the {service} demo app on 127.0.0.1: {source}")]
    App {
        service: &'static str,
        source: std::io::Error,
    },
    #[error("cannot build the address of the {service} demo app: {source}")]
    Uri {
        service: &'static str,
        source: http::Error,
    },
}

/// What one batch of demo requests measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    /// Wall time of the whole batch.
    pub elapsed: Duration,
    /// The first request pays for the TCP + TLS connection and the session handshake.
    pub first: Option<Duration>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
    /// `seam-caller` values the billing app received (from its JSON answers), with how
    /// many requests carried each; `(none)` when the header was missing.
    pub callers_seen: BTreeMap<String, usize>,
    /// Requests the billing app itself counted (all time, not only this batch).
    pub billing_app_served: u64,
    /// The first failure, for the operator to read.
    pub first_failure: Option<String>,
    /// orders' client-side session cache.
    pub orders_sessions: SessionStatsSnapshot,
    pub orders_sessions_active: u64,
    /// billing's server-side session cache.
    pub billing_sessions: SessionStatsSnapshot,
    pub billing_sessions_active: u64,
    pub addrs: DemoAddrs,
}

/// Where the demo's pieces listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoAddrs {
    pub orders_outbound: SocketAddr,
    pub orders_admin: SocketAddr,
    pub orders_app: SocketAddr,
    pub billing_inbound: SocketAddr,
    pub billing_admin: SocketAddr,
    pub billing_app: SocketAddr,
}

impl DemoReport {
    /// The one caller billing saw, when it saw exactly one.
    pub fn caller_seen(&self) -> Option<&str> {
        match self.callers_seen.len() {
            1 => self.callers_seen.keys().next().map(String::as_str),
            _ => None,
        }
    }
}

/// The running demo mesh. Dropping it without [`DemoMesh::shutdown`] aborts nothing
/// gracefully; call `shutdown` to drain.
pub struct DemoMesh {
    orders: Sidecar,
    billing: Sidecar,
    orders_app: App,
    billing_app: App,
}

impl DemoMesh {
    /// Creates the CA and certificates, starts both apps and both seams, and returns
    /// once every listener is bound.
    pub async fn start() -> Result<DemoMesh, DemoError> {
        let ca = DevCa::new(TRUST_DOMAIN)?;
        let billing_app = App::start(BILLING).await?;
        // orders is a client in this demo, but its seam still needs an app to hand
        // inbound requests to; a real one keeps `curl` through billing's side honest.
        let orders_app = App::start(ORDERS).await?;

        let billing_config = seam_config(BILLING, billing_app.addr, BTreeMap::new())?;
        let billing = Sidecar::start(billing_config, identity(&ca, BILLING)?)
            .await
            .map_err(|source| DemoError::Sidecar {
                service: BILLING,
                source,
            })?;
        // Ports are only known once billing is bound, so orders starts second: billing
        // has no peers (it never calls orders), which keeps the order one-way.
        let peers = BTreeMap::from([(BILLING.to_owned(), vec![billing.inbound_addr()])]);
        let orders_config = seam_config(ORDERS, orders_app.addr, peers)?;
        let orders = match Sidecar::start(orders_config, identity(&ca, ORDERS)?).await {
            Ok(s) => s,
            Err(source) => {
                billing.shutdown().await;
                return Err(DemoError::Sidecar {
                    service: ORDERS,
                    source,
                });
            }
        };
        Ok(DemoMesh {
            orders,
            billing,
            orders_app,
            billing_app,
        })
    }

    pub fn addrs(&self) -> DemoAddrs {
        DemoAddrs {
            orders_outbound: self.orders.outbound_addr(),
            orders_admin: self.orders.admin_addr(),
            orders_app: self.orders_app.addr,
            billing_inbound: self.billing.inbound_addr(),
            billing_admin: self.billing.admin_addr(),
            billing_app: self.billing_app.addr,
        }
    }

    /// The orders app: sends `n` requests, one after another, to billing through
    /// orders' seam, and reports what it measured. Failures are counted, not returned.
    pub async fn exercise(&self, n: usize) -> DemoReport {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        let outbound = self.orders.outbound_addr();
        let mut latencies = Vec::with_capacity(n);
        let mut callers_seen = BTreeMap::new();
        let mut first_failure = None;
        let started = Instant::now();
        for order in 0..n {
            let begun = Instant::now();
            let result = tokio::time::timeout(REQUEST_TIMEOUT, charge(&client, outbound, order))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
            let took = begun.elapsed();
            match result {
                Ok(caller) => {
                    latencies.push(took);
                    *callers_seen.entry(caller).or_insert(0) += 1;
                }
                Err(why) => {
                    if first_failure.is_none() {
                        first_failure = Some(format!("request {order}: {why}"));
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        // Idle pooled connections close with the client, before the seams drain.
        drop(client);
        let first = latencies.first().copied();
        latencies.sort_unstable();
        // moka counts entries lazily; settle it so "active" is exact.
        self.orders.client_sessions().run_pending_tasks().await;
        self.billing.server_sessions().run_pending_tasks().await;
        DemoReport {
            sent: n,
            ok: latencies.len(),
            failed: n - latencies.len(),
            elapsed,
            first,
            p50: percentile(&latencies, 50),
            p99: percentile(&latencies, 99),
            max: latencies.last().copied(),
            callers_seen,
            billing_app_served: self.billing_app.served.load(Ordering::Relaxed),
            first_failure,
            orders_sessions: self.orders.client_sessions().stats().snapshot(),
            orders_sessions_active: self.orders.client_sessions().len(),
            billing_sessions: self.billing.server_sessions().stats().snapshot(),
            billing_sessions_active: self.billing.server_sessions().len(),
            addrs: self.addrs(),
        }
    }

    /// How to reach the running mesh by hand.
    pub fn usage(&self) -> String {
        let a = self.addrs();
        format!(
            "The mesh stays up until Ctrl-C. Try:\n\
             \x20 curl -X POST -H 'Host: billing' http://{out}/charge\n\
             \x20 curl -x http://{out} http://billing/charge\n\
             \x20 curl --http2-prior-knowledge -H 'Host: billing' http://{out}/charge\n\
             \x20 curl http://{oadm}/stats\n\
             \x20 curl http://{badm}/stats\n",
            out = a.orders_outbound,
            oadm = a.orders_admin,
            badm = a.billing_admin,
        )
    }

    /// Stops orders' seam, then billing's, then the apps, each draining what is in
    /// flight. Returns whether everything finished within its drain deadline.
    pub async fn shutdown(self) -> bool {
        // Callers first: nothing new enters the mesh while billing drains.
        let orders = self.orders.shutdown().await;
        let billing = self.billing.shutdown().await;
        let orders_app = self.orders_app.shutdown().await;
        let billing_app = self.billing_app.shutdown().await;
        orders && billing && orders_app && billing_app
    }
}

/// Starts the mesh, sends `opts.requests` requests, shuts the mesh down and reports.
pub async fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let mesh = DemoMesh::start().await?;
    let report = mesh.exercise(opts.requests).await;
    mesh.shutdown().await;
    Ok(report)
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.addrs;
        writeln!(
            f,
            "seam demo: orders app -> seam(orders) {} ==mTLS 1.3 + AES-256-GCM session==> seam(billing) {} -> billing app {}",
            a.orders_outbound, a.billing_inbound, a.billing_app
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "  requests    {} sent, {} ok, {} failed in {}",
            self.sent,
            self.ok,
            self.failed,
            ms(Some(self.elapsed))
        )?;
        writeln!(
            f,
            "  latency     p50 {}  p99 {}  max {}  (first request, with TLS + session handshake: {})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            ms(self.first)
        )?;
        writeln!(
            f,
            "  sessions    orders  (client): {} created, {} active, {} handshakes ok, {} failed",
            self.orders_sessions.created,
            self.orders_sessions_active,
            self.orders_sessions.handshakes_ok,
            self.orders_sessions.handshakes_failed
        )?;
        writeln!(
            f,
            "              billing (server): {} created, {} active, {} handshakes ok, {} failed",
            self.billing_sessions.created,
            self.billing_sessions_active,
            self.billing_sessions.handshakes_ok,
            self.billing_sessions.handshakes_failed
        )?;
        if self.callers_seen.is_empty() {
            writeln!(f, "  identity    billing saw no request")?;
        }
        for (caller, count) in &self.callers_seen {
            writeln!(
                f,
                "  identity    billing saw seam-caller: {caller}  ({count} requests)"
            )?;
        }
        writeln!(
            f,
            "  billing app served {} requests",
            self.billing_app_served
        )?;
        if let Some(why) = &self.first_failure {
            writeln!(f, "  first failure  {why}")?;
        }
        writeln!(
            f,
            "  admin       orders  http://{0}/stats  http://{0}/live  http://{0}/ready",
            a.orders_admin
        )?;
        writeln!(
            f,
            "              billing http://{0}/stats  http://{0}/live  http://{0}/ready",
            a.billing_admin
        )
    }
}

/// Milliseconds with enough digits for loopback latencies.
fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1000.0),
        None => "n/a".to_owned(),
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// One `POST /charge` through orders' seam; the caller billing saw, or why it failed.
async fn charge(
    client: &Client<HttpConnector, Full<Bytes>>,
    outbound: SocketAddr,
    order: usize,
) -> Result<String, String> {
    let body = json!({ "order": order, "amount_cents": 1250 }).to_string();
    // The app speaks plain HTTP to its local seam and names the service in Host,
    // exactly as an unmodified app would.
    let req = Request::post(format!("http://{outbound}/charge"))
        .header(header::HOST, BILLING)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let seam_error = resp
        .headers()
        .get("seam-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = Limited::new(resp.into_body(), APP_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "{status} seam-error={} {}",
            seam_error.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&bytes).trim()
        ));
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("answer is not JSON: {e}"))?;
    if answer["service"] != BILLING || answer["order"] != order {
        return Err(format!("unexpected answer: {answer}"));
    }
    Ok(answer["seam_caller"]
        .as_str()
        .unwrap_or("(none)")
        .to_owned())
}

/// A demo app: an HTTP/1.1 server that answers every request with JSON naming itself,
/// the request, and the `seam-caller` its seam set.
struct App {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl App {
    async fn start(service: &'static str) -> Result<App, DemoError> {
        let fail = |source| DemoError::App { service, source };
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_app(service, listener, served.clone(), stop.clone()));
        Ok(App {
            addr,
            served,
            stop,
            task,
        })
    }

    async fn shutdown(self) -> bool {
        self.stop.cancel();
        tokio::time::timeout(APP_DRAIN, self.task).await.is_ok()
    }
}

async fn serve_app(
    service: &'static str,
    listener: TcpListener,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let served = served.clone();
                    let svc = service_fn(move |req| app_answer(service, served.clone(), req));
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(TokioTimer::new());
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::spawn(graceful.watch(conn));
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(app = service, error = %e, "demo app accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn app_answer(
    service: &'static str,
    served: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let caller = parts
        .headers
        .get(SEAM_CALLER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(body, APP_BODY_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let answer = json!({ "service": service, "error": format!("unreadable body: {e}") });
            return Ok(json_response(StatusCode::BAD_REQUEST, &answer));
        }
    };
    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
    // Echo the order number back so the orders app can tell its answer from any other.
    let order = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("order").cloned())
        .unwrap_or(serde_json::Value::Null);
    let mut answer = json!({
        "service": service,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "seam_caller": caller,
        "bytes_received": body.len(),
        "order": order,
    });
    if parts.method == Method::POST && parts.uri.path() == "/charge" {
        answer["charge_id"] = json!(n);
        answer["charged"] = json!(true);
    }
    Ok(json_response(StatusCode::OK, &answer))
}

fn json_response(status: StatusCode, answer: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = answer.to_string();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn identity(ca: &DevCa, service: &str) -> Result<Identity, IdentityError> {
    let now = SystemTime::now();
    let issued = ca.issue(service, now - CERT_BACKDATE, now + CERT_VALIDITY)?;
    Identity::from_pem(
        &ca.ca_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        TRUST_DOMAIN,
        service,
    )
}

/// A seam config built in code: every listener on 127.0.0.1 port 0, defaults elsewhere.
fn seam_config(
    service: &'static str,
    app: SocketAddr,
    peers: BTreeMap<String, Vec<SocketAddr>>,
) -> Result<Config, DemoError> {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let url = Uri::builder()
        .scheme("http")
        .authority(app.to_string())
        .path_and_query("/")
        .build()
        .map_err(|source| DemoError::Uri { service, source })?;
    // The identity is handed to Sidecar::start from memory; these paths are never
    // opened and only say so if the config is ever printed.
    let in_memory = PathBuf::from("(in memory: seam demo CA)");
    Ok(Config {
        service: service.to_owned(),
        trust_domain: TRUST_DOMAIN.to_owned(),
        listen: ListenConfig {
            outbound: any_port,
            inbound: any_port,
            admin: any_port,
            pinned: Vec::new(),
        },
        upstream: UpstreamConfig {
            url,
            protocol: UpstreamProtocol::Http1,
        },
        tls: TlsConfig {
            ca: in_memory.clone(),
            cert: in_memory.clone(),
            key: in_memory,
        },
        session: SessionConfig::default(),
        rate_limit: RateLimitConfig::default(),
        peers,
        timeouts: TimeoutConfig::default(),
        runtime: RuntimeConfig::default(),
        admin: AdminConfig::default(),
        limits: LimitsConfig::default(),
        interop: InteropConfig::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 99), Some(Duration::from_millis(99)));
        let one = [Duration::from_millis(7)];
        assert_eq!(percentile(&one, 50), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&one, 99), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50), None);
    }
}
