//! The outbound side: plain HTTP from the local app, sealed to the peer's seam.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, timeout};

use super::body::{CappedBody, KeptBody, OpenedBody, SealedBody};
use super::head::{HeadError, RequestHead, ResponseHead};
use super::headers::{
    SEAM_ERROR, SEAM_SESSION, request_authority, strip_hop_by_hop, strip_seam_headers,
    target_service,
};
use super::mesh::MeshBody;
use super::peer::{AppBody, PeerError, PeerPool};
use super::{Failure, KEEP_LIMIT, MESSAGE_PATH, failure_response};
use crate::admin::stats::{Direction, HandshakeFailure, Stats};
use crate::session::seal::MAX_PAYLOAD;
use crate::session::{Session, SessionCache, SessionLimits};

pub type OutboundBody = Either<OpenedBody<MeshBody>, Full<Bytes>>;

pub struct Outbound {
    service: String,
    peers: PeerPool,
    sessions: SessionCache<String>,
    limits: SessionLimits,
    request_timeout: Duration,
    stats: Arc<Stats>,
    max_body: Option<u64>,
}

/// The app's request body: read whole when small (so it can be sent again), else
/// streamed once.
enum RequestBody {
    Kept(KeptBody),
    Streaming(Option<Incoming>),
}

impl Outbound {
    pub fn new(
        service: String,
        peers: PeerPool,
        sessions: SessionCache<String>,
        limits: SessionLimits,
        request_timeout: Duration,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            service,
            peers,
            sessions,
            limits,
            request_timeout,
            stats,
            max_body: None,
        }
    }

    /// Refuses request bodies declared larger than `max` bytes with 413
    /// (`limits.max_body_bytes`).
    pub fn with_max_body(mut self, max: Option<u64>) -> Self {
        self.max_body = max;
        self
    }

    pub fn sessions(&self) -> &SessionCache<String> {
        &self.sessions
    }

    /// Serves one request from the local app, to `pinned` when it came in on a
    /// `listen.pinned` port, else to the service its URI or Host names.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        pinned: Option<&str>,
    ) -> Result<Response<OutboundBody>, Infallible> {
        let started = Instant::now();
        // Only copied when the access log is on, so the default path allocates nothing.
        let access = self.stats.access_log().then(|| {
            (
                req.method().clone(),
                request_authority(&req)
                    .to_str()
                    .unwrap_or_default()
                    .to_owned(),
                req.uri().path().to_owned(),
            )
        });
        let target = match pinned {
            Some(service) => Some(service.to_owned()),
            None => target_service(&req),
        };
        let resp = match timeout(self.request_timeout, self.forward(req, target.as_deref())).await {
            Ok(resp) => resp,
            Err(_) => self.fail(
                Failure::Timeout,
                format!(
                    "seam({}): no response from {} within {:?}",
                    self.service,
                    target.as_deref().unwrap_or("?"),
                    self.request_timeout
                ),
            ),
        };
        self.stats.record_status(Direction::Outbound, resp.status());
        self.stats
            .observe_duration(Direction::Outbound, started.elapsed());
        if let Some((method, authority, path)) = access {
            tracing::info!(
                event = "access",
                direction = "outbound",
                %method,
                authority,
                path,
                status = resp.status().as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                caller = self.service,
                "request"
            );
        }
        Ok(resp)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        target: Option<&str>,
    ) -> Response<OutboundBody> {
        let Some(service) = target else {
            return self.fail(
                Failure::NoTarget,
                format!("seam({}): the request names no service; send it with `Host: <service>` or as an absolute URI", self.service),
            );
        };
        if !self.peers.knows(service) {
            return self.fail(
                Failure::UnknownService,
                format!(
                    "seam({}): unknown service '{service}'; add it under `peers:` in the config",
                    self.service
                ),
            );
        }
        if let Some(max) = self.max_body
            && let Some(len) = declared_length(&req)
            && len > max
        {
            return self.fail(
                Failure::BodyTooLarge,
                format!(
                    "seam({}): the request body is {len} bytes, over the limit of {max} \
                     (limits.max_body_bytes); send less or raise the limit",
                    self.service
                ),
            );
        }
        let authority = request_authority(&req);
        let (parts, body) = req.into_parts();
        let mut head = RequestHead::from_parts(parts, authority);
        strip_seam_headers(&mut head.headers);
        head.headers.remove(header::HOST);
        let head = match head.encode(MAX_PAYLOAD) {
            Ok(h) => h,
            Err(HeadError::TooLarge { max }) => {
                return self.fail(
                    Failure::HeadersTooLarge,
                    format!("seam({}): request head exceeds {max} bytes", self.service),
                );
            }
            Err(e) => {
                return self.fail(Failure::BadRequest, format!("seam({}): {e}", self.service));
            }
        };
        let mut body = match keep_if_small(body).await {
            Ok(b) => b,
            Err(e) => {
                return self.fail(
                    Failure::BadRequest,
                    format!(
                        "seam({}): reading the request body failed: {e}",
                        self.service
                    ),
                );
            }
        };
        // At most two attempts: the second only after the peer said it lost our
        // session, and only with a body we still hold.
        let exceeded = Arc::new(AtomicBool::new(false));
        for attempt in 0..2 {
            let session = match self
                .sessions
                .get_or_handshake(service, || self.peers.handshake(service, self.limits))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.handshake_failure(service, &e);
                    return self.peer_failure(service, e);
                }
            };
            let (sealer, guard) = match session.begin_request() {
                Ok(x) => x,
                // Raced with the last message of the session's budget: the next
                // lookup rekeys.
                Err(_) if attempt == 0 => continue,
                Err(e) => {
                    return self.fail(Failure::SessionLost, format!("seam({}): {e}", self.service));
                }
            };
            let seq = sealer.seq();
            let app_body: AppBody = match &mut body {
                RequestBody::Kept(k) => Either::Right(k.clone()),
                RequestBody::Streaming(s) => match s.take() {
                    Some(b) => Either::Left(CappedBody::new(b, self.max_body, exceeded.clone())),
                    None => {
                        return self.fail(
                            Failure::SessionLost,
                            format!("seam({}): {service} lost the session while the request body was streaming; it cannot be sent again, retry the request", self.service),
                        );
                    }
                },
            };
            let sealed = match SealedBody::new(sealer, &head, app_body, Some(guard)) {
                Ok(b) => b,
                Err(e) => {
                    return self.fail(Failure::BadRequest, format!("seam({}): {e}", self.service));
                }
            };
            // Formatted on the stack: `to_string` made a String only to copy it.
            let mut id = uuid::Uuid::encode_buffer();
            let id = session.id().hyphenated().encode_lower(&mut id);
            // A static URI: parsing the path from text would copy it for every request.
            let outer = Request::builder()
                .method(Method::POST)
                .uri(Uri::from_static(MESSAGE_PATH))
                .header(SEAM_SESSION, &*id)
                .body(Either::Left(sealed));
            let outer = match outer {
                Ok(r) => r,
                Err(e) => {
                    return self.fail(Failure::BadRequest, format!("seam({}): {e}", self.service));
                }
            };
            let sent = Instant::now();
            let peer_stats = self.stats.peer(service);
            let result = self.peers.send(service, outer).await;
            // A streamed body that ran past the cap was cut mid-message; whatever the
            // peer made of it, the app gets the reason.
            if exceeded.load(Ordering::Acquire) {
                return self.fail(
                    Failure::BodyTooLarge,
                    format!(
                        "seam({}): the request body ran past the limit of {} bytes \
                         (limits.max_body_bytes); send less or raise the limit",
                        self.service,
                        self.max_body.unwrap_or(u64::MAX)
                    ),
                );
            }
            let resp = match result {
                Ok(r) => {
                    if let Some(p) = peer_stats {
                        p.record_request(Some(sent.elapsed()));
                    }
                    r
                }
                Err(e) => {
                    session.counters().add_error();
                    if let Some(p) = peer_stats {
                        p.record_request(None);
                        p.record_reachable(false);
                    }
                    return self.peer_failure(service, e);
                }
            };
            let seam_error = resp.headers().get(SEAM_ERROR).cloned();
            match resp.status() {
                StatusCode::OK => {
                    return self.open_response(service, resp, &session, seq).await;
                }
                StatusCode::GONE
                    if seam_error
                        .as_ref()
                        .is_some_and(|v| v == Failure::UnknownSession.code()) =>
                {
                    tracing::info!(peer = service, session_id = %session.id(), "peer lost the session; making a new one");
                    self.sessions.forget(&service.to_owned(), &session).await;
                    if matches!(body, RequestBody::Kept(_)) && attempt == 0 {
                        self.stats.record_retry();
                        continue;
                    }
                }
                StatusCode::TOO_MANY_REQUESTS => return passthrough(resp).await,
                status => {
                    session.counters().add_error();
                    let text = read_text(resp).await;
                    return self.fail(
                        Failure::PeerProtocol,
                        format!("seam({}): peer seam {service} refused the request ({status} {}): {text}", self.service, seam_error.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("")),
                    );
                }
            }
        }
        self.fail(
            Failure::SessionLost,
            format!(
                "seam({}): {service} lost the session again after a retry",
                self.service
            ),
        )
    }

    async fn open_response(
        &self,
        service: &str,
        resp: Response<MeshBody>,
        session: &Arc<Session>,
        seq: u64,
    ) -> Response<OutboundBody> {
        let opener = session.response_opener(seq);
        let mut opened = OpenedBody::new(resp.into_body(), opener, None)
            .counted_on(session.clone())
            .reporting_to(self.stats.clone());
        let head = match opened
            .read_head()
            .await
            .map_err(|e| (e.kind(), e.to_string()))
            .and_then(|h| ResponseHead::decode(&h).map_err(|e| ("bad-head", e.to_string())))
        {
            Ok(h) => h,
            Err(e) => {
                self.stats.record_open_failure(e.0);
                let e = e.1;
                return self.fail(
                    Failure::PeerProtocol,
                    format!(
                        "seam({}): the sealed response from {service} was rejected: {e}",
                        self.service
                    ),
                );
            }
        };
        let mut resp = Response::new(Either::Left(opened));
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        strip_hop_by_hop(resp.headers_mut());
        resp
    }

    /// Counts and logs a failed client-side handshake; the request fails right after.
    fn handshake_failure(&self, service: &str, e: &PeerError) {
        let why = match e {
            PeerError::Unreachable { .. } | PeerError::Request { .. } => {
                HandshakeFailure::PeerUnreachable
            }
            PeerError::Handshake { .. } => HandshakeFailure::RefusedByPeer,
            PeerError::Crypto(_) | PeerError::Session(_) => HandshakeFailure::KeyAgreement,
        };
        self.stats.record_handshake_failure(why);
        if let Some(p) = self.stats.peer(service) {
            p.record_reachable(why != HandshakeFailure::PeerUnreachable);
        }
        tracing::warn!(event = "handshake_failed", peer = service, reason = why.code(), error = %e, "session handshake failed");
    }

    fn peer_failure(&self, service: &str, e: PeerError) -> Response<OutboundBody> {
        let failure = match e {
            PeerError::Handshake { .. } | PeerError::Crypto(_) => Failure::HandshakeFailed,
            _ => Failure::PeerUnreachable,
        };
        self.fail(failure, format!("seam({}): {service}: {e}", self.service))
    }

    /// A refusal decided before the request reached [`Outbound::handle`], counted like
    /// the others.
    pub fn refuse(&self, failure: Failure, message: String) -> Response<OutboundBody> {
        let resp = self.fail(failure, message);
        self.stats.record_status(Direction::Outbound, resp.status());
        resp
    }

    fn fail(&self, failure: Failure, message: String) -> Response<OutboundBody> {
        self.stats.record_failure(failure);
        tracing::warn!(failure = failure.code(), "{message}");
        failure_response(failure, &message).map(Either::Right)
    }
}

/// Reads a body of known small size (or an already finished one) so it can be sent
/// twice; anything else streams.
async fn keep_if_small(body: Incoming) -> Result<RequestBody, hyper::Error> {
    let small = body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= KEEP_LIMIT);
    if !small {
        return Ok(RequestBody::Streaming(Some(body)));
    }
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(RequestBody::Kept(KeptBody::new(
        collected.to_bytes(),
        trailers,
    )))
}

/// The body length the request announces: Content-Length for HTTP/1.1 (hyper has
/// already rejected conflicting values), the exact size hint otherwise.
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| req.body().size_hint().exact())
}

/// A peer seam's own refusal (429) goes to the app as it came.
async fn passthrough(resp: Response<MeshBody>) -> Response<OutboundBody> {
    let (parts, body) = resp.into_parts();
    let bytes = Limited::new(body, 4096)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Response::from_parts(parts, Either::Right(Full::new(bytes)))
}

async fn read_text(resp: Response<MeshBody>) -> String {
    let bytes = Limited::new(resp.into_body(), 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim().to_owned()
}
