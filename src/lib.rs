//! seam: an encrypted service-mesh sidecar proxy.
//!
//! The crate is laid out one module per concern (see DESIGN §7): `config` reads and
//! validates the YAML, `identity` owns certificates and the rustls configs, `handshake`
//! derives per-peer session keys, `session` seals messages and caches sessions, `proxy`
//! carries traffic and `admin` reports on it. [`Sidecar`] ties them together.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod config;
pub mod demo;
pub mod handshake;
pub mod identity;
pub mod logging;
pub mod proxy;
pub mod ratelimit;
pub mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use admin::Admin;
use admin::stats::Stats;
use admission::{Activity, Admission, Breach, InFlight, Tracked};
use bytes::Bytes;
use config::Config;
use http_body::Body as _;
use identity::{Identity, IdentityError, SpiffeId, peer_identity};
use proxy::Failure;
use proxy::coalesce::Coalesced;
use proxy::framing::FramingIo;
use proxy::inbound::Inbound;
use proxy::mesh::{MeshBody, Pump, SendBudget};
use proxy::outbound::Outbound;
use proxy::peer::PeerPool;
use proxy::upstream::Upstream;
use ratelimit::CallerLimiter;
use session::{SessionCache, SessionLimits};

/// How long a peer may take to finish its TLS handshake on the inbound port.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(
        "cannot listen on {addr} for the {listener} listener: {source}; is another seam running? change listen.{listener} in the config"
    )]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A running sidecar: its listeners, its state, and the switch that stops it.
pub struct Sidecar {
    outbound_addr: SocketAddr,
    pinned_addrs: Vec<SocketAddr>,
    inbound_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin: Arc<Admin>,
    admission: Arc<Admission>,
    callers: Arc<CallerLimiter>,
    drain: Duration,
    data_plane: CancellationToken,
    admin_plane: CancellationToken,
    data_tasks: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
}

impl Sidecar {
    /// Binds every listener, then serves until [`Sidecar::shutdown`]. Returns once the
    /// sidecar is ready: listeners bound and certificates loaded.
    pub async fn start(config: Config, identity: Identity) -> Result<Sidecar, SidecarError> {
        let limits = SessionLimits {
            idle_ttl: config.session.idle_ttl,
            max_lifetime: config.session.max_lifetime,
            max_messages: config.session.max_messages,
        };
        let stats = Arc::new(Stats::new(
            config.peers.keys().cloned(),
            config.admin.access_log,
        ));
        let client_sessions = SessionCache::new(limits, config.session.max_sessions);
        let server_sessions = SessionCache::new(limits, config.session.max_sessions);
        let peers = PeerPool::new(&identity, &config.peers, config.timeouts.connect)?;
        let acceptor = TlsAcceptor::from(identity.server_config()?);
        let admission = Arc::new(Admission::new(config.limits.clone(), stats.clone()));
        let callers = Arc::new(CallerLimiter::new(&config.rate_limit));

        let outbound = Arc::new(
            Outbound::new(
                config.service.clone(),
                peers,
                client_sessions.clone(),
                limits,
                config.timeouts.request,
                stats.clone(),
            )
            .with_max_body(config.limits.max_body_bytes),
        );
        let inbound = Arc::new(
            Inbound::new(
                identity.spiffe_id().clone(),
                server_sessions.clone(),
                limits,
                Upstream::new(&config.upstream, config.timeouts.connect),
                config.timeouts.request,
                stats.clone(),
                proxy::inbound::Gate {
                    callers: callers.clone(),
                    admission: admission.clone(),
                },
            )
            .with_plain_mtls(config.interop.plain_mtls),
        );
        let admin = Arc::new(Admin::new(
            &config,
            stats,
            client_sessions,
            server_sessions,
            identity.not_after(),
            callers.clone(),
        ));

        let outbound_listener = bind("outbound", config.listen.outbound).await?;
        // The plain outbound port routes by Host; each pinned one to its service.
        let mut outbound_ports: Vec<(TcpListener, Option<Arc<str>>)> = Vec::new();
        let mut pinned_addrs = Vec::new();
        for route in &config.listen.pinned {
            let listener = bind("pinned", route.listen).await?;
            pinned_addrs.push(local_addr("pinned", &listener)?);
            outbound_ports.push((listener, Some(route.service.as_str().into())));
        }
        let inbound_listener = bind("inbound", config.listen.inbound).await?;
        let admin_listener = bind("admin", config.listen.admin).await?;
        let outbound_addr = local_addr("outbound", &outbound_listener)?;
        let inbound_addr = local_addr("inbound", &inbound_listener)?;
        let admin_addr = local_addr("admin", &admin_listener)?;

        let data_plane = CancellationToken::new();
        let admin_plane = CancellationToken::new();
        let trust_domain: Arc<str> = config.trust_domain.clone().into();
        let outbound_admission = admission.clone();
        let inbound_admission = admission.clone();
        outbound_ports.push((outbound_listener, None));
        let mut data_tasks = Vec::new();
        for (listener, pinned) in outbound_ports {
            if let Some(service) = &pinned {
                tracing::info!(listen = ?listener.local_addr().ok(), service = &**service, "pinned outbound port");
            }
            let outbound = outbound.clone();
            let admission = outbound_admission.clone();
            data_tasks.push(tokio::spawn(accept_loop(
                listener,
                data_plane.clone(),
                Some(admission.clone()),
                move |tcp, _, watcher| {
                    serve_outbound(
                        tcp,
                        watcher,
                        outbound.clone(),
                        admission.clone(),
                        pinned.clone(),
                    )
                },
            )));
        }
        let inbound_stop = data_plane.clone();
        data_tasks.extend([tokio::spawn(accept_loop(
            inbound_listener,
            data_plane.clone(),
            Some(admission.clone()),
            move |tcp, remote, watcher| {
                serve_inbound(
                    tcp,
                    remote,
                    Shutdown {
                        stop: inbound_stop.clone(),
                        _drain: watcher,
                    },
                    acceptor.clone(),
                    trust_domain.clone(),
                    inbound.clone(),
                    inbound_admission.clone(),
                )
            },
        ))]);
        let admin_for_loop = admin.clone();
        let admin_task = tokio::spawn(accept_loop(
            admin_listener,
            admin_plane.clone(),
            None,
            move |tcp, _, watcher| serve_admin(tcp, watcher, admin_for_loop.clone()),
        ));
        // The upstream check runs on its own schedule so /health answers from memory.
        tokio::spawn(admin::health::probe_upstream(
            admin.clone(),
            proxy::upstream::app_target(&config.upstream.url),
            config.admin.upstream_probe_interval,
            config.timeouts.connect,
            admin_plane.clone(),
        ));
        if !admin_addr.ip().is_loopback() {
            tracing::warn!(
                event = "admin_exposed",
                admin = %admin_addr,
                "the admin port listens beyond loopback (admin.allow_remote); it has no authentication, so restrict who can reach it"
            );
        }
        admin.ready.store(true, Ordering::Release);
        tracing::info!(
            event = "ready",
            service = config.service,
            outbound = %outbound_addr,
            inbound = %inbound_addr,
            admin = %admin_addr,
            "seam ready"
        );
        Ok(Sidecar {
            outbound_addr,
            pinned_addrs,
            inbound_addr,
            admin_addr,
            admin,
            admission,
            callers,
            drain: config.timeouts.drain,
            data_plane,
            admin_plane,
            data_tasks,
            admin_task,
        })
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// The bound `listen.pinned` ports, in config order.
    pub fn pinned_addrs(&self) -> &[SocketAddr] {
        &self.pinned_addrs
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Hands the runtime log filter to the admin port (`PUT /log-level`).
    pub fn set_log_control(&self, control: logging::LogControl) {
        let _ = self.admin.log.set(control);
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.admin.stats
    }

    /// Connection-level limits and their counters.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The inbound rate limiter keyed by caller, with its per-caller refusal counts.
    pub fn callers(&self) -> &Arc<CallerLimiter> {
        &self.callers
    }

    pub fn client_sessions(&self) -> &SessionCache<String> {
        &self.admin.client_sessions
    }

    pub fn server_sessions(&self) -> &SessionCache<uuid::Uuid> {
        &self.admin.server_sessions
    }

    /// Stops accepting, lets requests in flight finish for up to `timeouts.drain`,
    /// then stops. Returns whether everything in flight finished in time.
    pub async fn shutdown(self) -> bool {
        tracing::info!(event = "draining", deadline = ?self.drain, "draining in-flight requests");
        self.admin.draining.store(true, Ordering::Release);
        self.data_plane.cancel();
        let drained = tokio::time::timeout(self.drain, async {
            for task in self.data_tasks {
                let _ = task.await;
            }
        })
        .await
        .is_ok();
        self.admin_plane.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin_task).await;
        if drained {
            tracing::info!(event = "stopped", "all requests finished; stopped");
        } else {
            tracing::warn!(
                event = "stopped",
                "drain deadline passed with requests still in flight; stopped"
            );
        }
        drained
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind {
            listener,
            addr,
            source,
        })
}

fn local_addr(listener: &'static str, l: &TcpListener) -> Result<SocketAddr, SidecarError> {
    l.local_addr().map_err(|source| SidecarError::Bind {
        listener,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// Accepts until `stop`, handing each connection to `serve` with a watcher; then waits
/// for the watched connections to finish their in-flight requests. With `admission`,
/// at most `limits.max_connections` connections are served at once; one more is
/// closed as soon as it is accepted, so the backlog cannot hold the listener hostage.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    admission: Option<Arc<Admission>>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let permits = admission
        .as_ref()
        .map(|a| Arc::new(Semaphore::new(a.limits.max_connections)));
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let permit = match (&permits, &admission) {
                        (Some(p), Some(a)) => match p.clone().try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                a.breach(Breach::Connections, &format!(
                                    "{} connections open on {}; closing new ones (raise \
                                     limits.max_connections if this load is expected)",
                                    a.limits.max_connections,
                                    listener.local_addr().map_or("a listener".into(), |l| l.to_string()),
                                ));
                                drop(tcp);
                                continue;
                            }
                        },
                        _ => None,
                    };
                    let served = serve(tcp, remote, graceful.watcher());
                    tokio::spawn(async move {
                        served.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn serve_outbound(
    tcp: TcpStream,
    watcher: Watcher,
    outbound: Arc<Outbound>,
    admission: Arc<Admission>,
    pinned: Option<Arc<str>>,
) {
    let _ = tcp.set_nodelay(true);
    let limits = &admission.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself when a head outgrows the buffer, and closes a
    // connection whose head is not complete within the timeout (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .max_send_buf_size(proxy::h2_tuning::SEND_BUFFER)
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let activity = Arc::new(Activity::default());
    let tracker = activity.clone();
    let (io, verdicts) = FramingIo::new(Coalesced::new(tcp), limits.max_header_bytes);
    let svc = service_fn(move |req| {
        let outbound = outbound.clone();
        let pinned = pinned.clone();
        let guard = tracker.begin();
        let verdict = verdicts.next();
        // Boxed: the handler's state is kilobytes, and hyper moves an unboxed
        // one several times while spawning the stream's task.
        Box::pin(async move {
            let resp = match verdict {
                // hyper closes the connection after such a request, so nothing that
                // follows it on the wire is read as a request either.
                Err(shape) => outbound.refuse(
                    Failure::BadRequest,
                    format!(
                        "seam: refused a request that {}; such a request can be read two \
                         ways by two HTTP parsers (request smuggling); fix the client",
                        shape.describe()
                    ),
                ),
                Ok(()) => outbound.handle(req, pinned.as_deref()).await?,
            };
            Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, guard)))
        })
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    let result = tokio::select! {
        r = watcher.watch(conn) => r,
        _ = activity.idle(limits.idle_timeout) => {
            admission.breach(Breach::Idle, "closed an idle outbound connection");
            return;
        }
    };
    if let Err(e) = result {
        match e.downcast_ref::<hyper::Error>() {
            Some(h) if h.is_timeout() => admission.breach(
                Breach::HeaderTimeout,
                &format!(
                    "an app connection did not send a request head within {:?}; closed it \
                     (limits.header_read_timeout)",
                    limits.header_read_timeout
                ),
            ),
            Some(h) if h.is_parse_too_large() => admission.breach(
                Breach::HeaderSize,
                &format!(
                    "an app sent a request head over {} bytes; answered 431 \
                     (limits.max_header_bytes)",
                    limits.max_header_bytes
                ),
            ),
            _ => tracing::debug!(error = %e, "outbound connection ended with an error"),
        }
    }
}

/// How an inbound connection learns of shutdown (`stop`: send GOAWAY and finish the open
/// streams) and holds it back until they are done (`_drain`, kept alive until then).
struct Shutdown {
    stop: CancellationToken,
    _drain: Watcher,
}

async fn serve_inbound(
    tcp: TcpStream,
    remote: SocketAddr,
    shutdown: Shutdown,
    acceptor: TlsAcceptor,
    trust_domain: Arc<str>,
    inbound: Arc<Inbound>,
    admission: Arc<Admission>,
) {
    // Before any TLS work: a handshake costs this seam far more than it costs the peer.
    if !admission.admit_handshake(remote.ip()) {
        return;
    }
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(event = "tls_rejected", %remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(event = "tls_rejected", %remote, "TLS handshake timed out");
            return;
        }
    };
    let caller = match peer_identity(tls.get_ref().1, &trust_domain) {
        Ok(id) => Arc::new(id),
        Err(e) => {
            tracing::warn!(event = "tls_rejected", %remote, error = %e, "peer identity rejected");
            return;
        }
    };
    let limits = &admission.limits;
    let mut builder = h2::server::Builder::new();
    proxy::h2_tuning::server(&mut builder);
    builder
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let activity = Arc::new(Activity::default());
    // Failed messages on this connection; past the threshold the peer is cut off, so
    // a broken or hostile peer cannot keep the seam decrypting garbage.
    let stream_ctx = Arc::new(InboundStreams {
        inbound,
        caller,
        failures: std::sync::atomic::AtomicU32::new(0),
        cut_off: CancellationToken::new(),
        threshold: limits.peer_failures,
        send_budget: SendBudget::new(proxy::h2_tuning::SEND_BUDGET_FRAMES),
    });
    let serve = async {
        // Replies finishing in the same turn share a TLS record and a write.
        let mut conn = match builder.handshake::<_, Bytes>(Coalesced::new(tls)).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "HTTP/2 handshake with a peer seam failed");
                return;
            }
        };
        // On shutdown: GOAWAY, then serve the streams already open until they finish.
        let mut draining = false;
        loop {
            let accepted = tokio::select! {
                accepted = conn.accept() => accepted,
                _ = shutdown.stop.cancelled(), if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
            };
            match accepted {
                Some(Ok((req, respond))) => {
                    let in_flight = activity.begin();
                    // Boxed once here: tokio moves a task's future through several frames
                    // into its cell, and this one is kilobytes.
                    tokio::spawn(Box::pin(stream_ctx.clone().serve(req, respond, in_flight)));
                }
                Some(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "inbound connection ended with an error");
                    break;
                }
                None => break,
            }
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = activity.idle(limits.idle_timeout) => {
            admission.breach(Breach::Idle, "closed an idle inbound connection");
        }
        _ = stream_ctx.cut_off.cancelled() => {
            admission.breach(
                Breach::PeerFailures,
                &format!(
                    "{remote} sent {} failed messages on one connection; closed it \
                     (limits.peer_failures)",
                    stream_ctx.failures.load(Ordering::Relaxed)
                ),
            );
        }
    }
    // Held until here so that shutdown waits for this connection's streams.
    drop(shutdown);
}

/// What every stream of one inbound connection shares: who the caller is, and how its
/// failures and activity are counted.
struct InboundStreams {
    inbound: Arc<Inbound>,
    caller: Arc<SpiffeId>,
    failures: std::sync::atomic::AtomicU32,
    cut_off: CancellationToken,
    threshold: u32,
    /// Sealed frames waiting in this connection's HTTP/2 queue (`SendBudget`).
    send_budget: SendBudget,
}

impl InboundStreams {
    /// Serves one stream: the handler's response, then its body, taken from the app as
    /// HTTP/2 has room for it.
    async fn serve(
        self: Arc<Self>,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        in_flight: InFlight,
    ) {
        // Pinned where it is made: the handler's future is large, and `select!` moving
        // it in cost two copies of it per request (callgrind).
        let handled = std::pin::pin!(
            self.inbound
                .clone()
                .handle(req.map(MeshBody::new), self.caller.clone())
        );
        // The calling seam resets the stream when its app gives up: stop working for it,
        // which also drops the request to the app.
        let resp = tokio::select! {
            resp = handled => match resp {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
        };
        if proxy::inbound::is_peer_failure(&resp)
            && self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.threshold
        {
            self.cut_off.cancel();
        }
        let (parts, body) = resp.into_parts();
        let end = body.is_end_stream();
        let stream = match respond.send_response(http::Response::from_parts(parts, ()), end) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "the response to a peer seam could not be sent");
                return;
            }
        };
        // A sealed reply goes to a seam in frames of at most one mesh DATA frame, and
        // waits for its place in the connection's send budget.
        let pump = match &body {
            http_body_util::Either::Left(_) => Pump::new(stream, body).budgeted(&self.send_budget),
            http_body_util::Either::Right(_) => Pump::new(stream, body),
        };
        if !end && let Err(e) = pump.await {
            tracing::debug!(error = %e, "sending a response body to a peer seam stopped");
        }
        drop(in_flight);
    }
}

async fn serve_admin(tcp: TcpStream, watcher: Watcher, admin: Arc<Admin>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    let svc = service_fn(move |req| admin.clone().handle(req));
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    let _ = watcher.watch(conn).await;
}
