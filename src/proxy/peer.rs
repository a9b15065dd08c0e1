//! Connections to peer seams: HTTP/2 over mutual TLS, pooled per endpoint.
//!
//! Each endpoint of a peer service keeps one multiplexed HTTP/2 connection, made on
//! first use and remade when it closes. Requests rotate over the endpoints; an
//! endpoint that failed to connect is skipped for a short back-off so one dead
//! replica does not cost every request a connect timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;

use super::body::{CappedBody, KeptBody, SealedBody};
use super::headers::SEAM_ERROR;
use super::mesh::{MeshBody, Pump};
use super::{HANDSHAKE_PATH, h2_tuning};
use crate::handshake::{ClientHandshake, HandshakeError, ServerHello};
use crate::identity::{Identity, IdentityError, SpiffeId};
use crate::session::{Role, Session, SessionError, SessionLimits};

/// What the outbound side sends: a sealed app body (streamed or kept), or a
/// handshake message.
pub type AppBody = Either<CappedBody<Incoming>, KeptBody>;
pub type PeerBody = Either<SealedBody<AppBody>, Full<Bytes>>;

/// How long a failed endpoint is skipped before it is tried again.
const ENDPOINT_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no endpoint of {peer} could be reached: {attempts}")]
    Unreachable { peer: String, attempts: String },
    #[error("request to {peer} at {addr} failed: {source}")]
    Request {
        peer: String,
        addr: SocketAddr,
        source: h2::Error,
    },
    #[error("session handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error(transparent)]
    Crypto(#[from] HandshakeError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

pub struct PeerPool {
    local: SpiffeId,
    peers: HashMap<String, Peer>,
    connect_timeout: Duration,
}

struct Peer {
    id: SpiffeId,
    /// `<service>.<trust domain>`, the authority of every request to this peer.
    authority: Authority,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

struct Endpoint {
    addr: SocketAddr,
    conn: tokio::sync::Mutex<Option<MeshConn>>,
    down_until: Mutex<Option<Instant>>,
}

/// One endpoint's HTTP/2 connection: the handle requests are opened on, and whether the
/// task driving the connection has ended.
#[derive(Clone)]
struct MeshConn {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl PeerPool {
    pub fn new(
        identity: &Identity,
        peers: &BTreeMap<String, Vec<SocketAddr>>,
        connect_timeout: Duration,
    ) -> Result<Self, IdentityError> {
        let local = identity.spiffe_id().clone();
        let mut map = HashMap::new();
        for (name, addrs) in peers {
            let id = SpiffeId::new(local.trust_domain(), name)?;
            let authority = format!("{}.{}", id.service(), id.trust_domain())
                .parse()
                .map_err(|_| IdentityError::InvalidSpiffeId {
                    uri: id.to_string(),
                    reason: "its service and trust domain do not make a valid URI authority",
                })?;
            let peer = Peer {
                authority,
                connector: TlsConnector::from(identity.client_config(name)?),
                server_name: id.server_name()?,
                id,
                endpoints: addrs
                    .iter()
                    .map(|&addr| Endpoint {
                        addr,
                        conn: tokio::sync::Mutex::new(None),
                        down_until: Mutex::new(None),
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            };
            map.insert(name.clone(), peer);
        }
        Ok(Self {
            local,
            peers: map,
            connect_timeout,
        })
    }

    pub fn knows(&self, service: &str) -> bool {
        self.peers.contains_key(service)
    }

    /// Sends `req` to one endpoint of `service`. A request that never left (the
    /// pooled connection had closed or was closing) is sent again on a fresh connection.
    pub async fn send(
        &self,
        service: &str,
        req: Request<PeerBody>,
    ) -> Result<Response<MeshBody>, PeerError> {
        let peer = self
            .peers
            .get(service)
            .ok_or_else(|| PeerError::Unreachable {
                peer: service.to_owned(),
                attempts: "not a configured peer".into(),
            })?;
        let (parts, body) = req.into_parts();
        let mut uri = Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(peer.authority.clone());
        if let Some(path) = parts.uri.path_and_query() {
            uri = uri.path_and_query(path.clone());
        }
        let uri = uri.build().map_err(|e| PeerError::Handshake {
            peer: service.to_owned(),
            reason: e.to_string(),
        })?;
        let mut last_error = None;
        for _ in 0..=peer.endpoints.len() {
            let start = peer.next.fetch_add(1, Ordering::Relaxed);
            let (endpoint, conn) = match live_connection(peer, start) {
                Some(live) => live,
                // Boxed: waiting for or making a connection is rare, and its state would
                // otherwise be carried by every request's future.
                None => Box::pin(self.connection(service, peer, start)).await?,
            };
            let mut head = Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = uri.clone();
            *head.headers_mut() = parts.headers.clone();
            // Both fail only before a stream exists: nothing of the request has left.
            let opened = match conn.send.ready().await {
                Ok(mut ready) => ready.send_request(head, false),
                Err(e) => Err(e),
            };
            let (response, stream) = match opened {
                Ok(opened) => opened,
                Err(source) => {
                    endpoint.conn.lock().await.take();
                    last_error = Some((endpoint.addr, source));
                    continue;
                }
            };
            Pump::new(stream, body).run_or_spawn().await;
            return match response.await {
                Ok(resp) => Ok(resp.map(MeshBody::new)),
                Err(source) => Err(PeerError::Request {
                    peer: service.to_owned(),
                    addr: endpoint.addr,
                    source,
                }),
            };
        }
        Err(match last_error {
            Some((addr, source)) => PeerError::Request {
                peer: service.to_owned(),
                addr,
                source,
            },
            None => PeerError::Unreachable {
                peer: service.to_owned(),
                attempts: "no endpoint accepted the request".into(),
            },
        })
    }

    /// Runs the session handshake with `service` over its pooled connection.
    pub async fn handshake(
        &self,
        service: &str,
        limits: SessionLimits,
    ) -> Result<Session, PeerError> {
        let fail = |reason: String| PeerError::Handshake {
            peer: service.to_owned(),
            reason,
        };
        let peer = self
            .peers
            .get(service)
            .ok_or_else(|| fail("not a configured peer".into()))?;
        let (state, hello) = ClientHandshake::start(&self.local.to_string(), &peer.id.to_string())?;
        let req = Request::post(HANDSHAKE_PATH)
            .body(Either::Right(Full::new(Bytes::copy_from_slice(
                &hello.encode(),
            ))))
            .map_err(|e| fail(e.to_string()))?;
        let resp = self.send(service, req).await?;
        let status = resp.status();
        let seam_error = resp
            .headers()
            .get(SEAM_ERROR)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| fail(format!("reading the reply failed: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(fail(format!(
                "peer answered {status} {seam_error}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        let reply = ServerHello::decode(&body)?;
        let keys = state.finish(&reply)?;
        Ok(Session::new(keys, Role::Client, service, limits)?)
    }

    /// The live connection of the endpoint at `start` in the rotation or, failing that,
    /// of the next usable one, connecting if needed.
    async fn connection<'p>(
        &self,
        service: &str,
        peer: &'p Peer,
        start: usize,
    ) -> Result<(&'p Endpoint, MeshConn), PeerError> {
        let n = peer.endpoints.len();
        let now = Instant::now();
        let is_down = |e: &Endpoint| {
            e.down_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|until| until > now)
        };
        // Endpoints in rotation order, the ones in back-off last: if all are down
        // we still try them rather than fail without trying.
        let mut order: Vec<&Endpoint> = (0..n).map(|i| &peer.endpoints[(start + i) % n]).collect();
        order.sort_by_key(|e| is_down(e));
        let mut attempts = Vec::new();
        for endpoint in order {
            let mut slot = endpoint.conn.lock().await;
            if let Some(conn) = slot.as_ref()
                && !conn.closed.load(Ordering::Acquire)
            {
                return Ok((endpoint, conn.clone()));
            }
            match self.connect(peer, endpoint.addr).await {
                Ok(conn) => {
                    *endpoint
                        .down_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                    *slot = Some(conn.clone());
                    return Ok((endpoint, conn));
                }
                Err(reason) => {
                    tracing::warn!(peer = service, addr = %endpoint.addr, %reason, "peer endpoint unreachable");
                    *endpoint
                        .down_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + ENDPOINT_BACKOFF);
                    *slot = None;
                    attempts.push(format!("{}: {reason}", endpoint.addr));
                }
            }
        }
        Err(PeerError::Unreachable {
            peer: service.to_owned(),
            attempts: attempts.join("; "),
        })
    }

    async fn connect(&self, peer: &Peer, addr: SocketAddr) -> Result<MeshConn, String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            // Small sealed frames must not wait for Nagle.
            tcp.set_nodelay(true).map_err(|e| format!("connect: {e}"))?;
            let tls = peer
                .connector
                .connect(peer.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let mut builder = h2::client::Builder::new();
            h2_tuning::client(&mut builder);
            let (send, conn) = builder
                .handshake(tls)
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            let closed = Arc::new(AtomicBool::new(false));
            let closed_by_driver = closed.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "peer connection closed");
                }
                closed_by_driver.store(true, Ordering::Release);
            });
            Ok(MeshConn { send, closed })
        };
        match timeout(self.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {:?}", self.connect_timeout)),
        }
    }
}

/// The endpoint at `start` in the rotation, when it has a live connection nobody is
/// replacing: what nearly every request finds, without waiting or allocating. (A live
/// connection means the endpoint is not in back-off: that is set only when connecting
/// failed, and cleared when it succeeds.)
fn live_connection(peer: &Peer, start: usize) -> Option<(&Endpoint, MeshConn)> {
    let endpoint = peer
        .endpoints
        .get(start.checked_rem(peer.endpoints.len())?)?;
    let slot = endpoint.conn.try_lock().ok()?;
    let conn = slot
        .as_ref()
        .filter(|c| !c.closed.load(Ordering::Acquire))?;
    Some((endpoint, conn.clone()))
}
