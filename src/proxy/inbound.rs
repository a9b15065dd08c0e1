//! The inbound side: requests from peer seams, over mutual TLS, to the local app.
//!
//! The caller's identity is the SPIFFE id of its verified client certificate, fixed
//! per connection. A message must name a session that this caller made; a session
//! this seam does not know is refused before any of the body is read, so the caller
//! can make a new session and send again.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full, Limited};
use tokio::time::timeout;
use uuid::Uuid;

use super::body::{OpenedBody, SealedBody};
use super::head::{RequestHead, ResponseHead};
use super::headers::{SEAM_ERROR, SEAM_SESSION, header_value, request_authority, strip_hop_by_hop};
use super::mesh::MeshBody;
use super::upstream::{AppReply, Upstream, UpstreamBody};
use super::{Failure, HANDSHAKE_PATH, MESSAGE_PATH, SEAM_PATH_PREFIX, failure_response};
use crate::admin::stats::{Direction, HandshakeFailure, Stats};
use crate::admission::{Admission, Breach};
use crate::handshake::{CLIENT_HELLO_LEN, ClientHello, HandshakeError, respond};
use crate::identity::SpiffeId;
use crate::ratelimit::CallerLimiter;
use crate::session::seal::MAX_PAYLOAD;
use crate::session::{Role, Session, SessionCache, SessionLimits};

pub type UpstreamReply = Either<AppReply, Full<Bytes>>;
/// A sealed reply to a seam, or a plain one: the app's own answer to a plain mTLS caller,
/// or seam's refusal.
pub type InboundBody = Either<SealedBody<UpstreamReply>, UpstreamReply>;

/// Whether seam refused this reply because of something the calling seam sent (an
/// unreadable or forged message, a session that is not its own), as opposed to a
/// problem on this side. Sealed replies are the app's answers and never count.
pub fn is_peer_failure<B>(resp: &Response<B>) -> bool {
    let Some(code) = resp.headers().get(SEAM_ERROR) else {
        return false;
    };
    [
        Failure::BadRequest,
        Failure::UnknownSession,
        Failure::Forbidden,
        Failure::HandshakeFailed,
    ]
    .iter()
    .any(|f| code.as_bytes() == f.code().as_bytes())
}

/// What admits a request on the inbound side before any of it is opened.
pub struct Gate {
    /// The rate limit keyed by the authenticated caller.
    pub callers: Arc<CallerLimiter>,
    /// Where breaches are counted and logged.
    pub admission: Arc<Admission>,
}

pub struct Inbound {
    local: SpiffeId,
    service: String,
    sessions: SessionCache<Uuid>,
    limits: SessionLimits,
    upstream: Upstream,
    request_timeout: Duration,
    stats: Arc<Stats>,
    callers: Arc<CallerLimiter>,
    admission: Arc<Admission>,
    plain_mtls: bool,
}

impl Inbound {
    pub fn new(
        local: SpiffeId,
        sessions: SessionCache<Uuid>,
        limits: SessionLimits,
        upstream: Upstream,
        request_timeout: Duration,
        stats: Arc<Stats>,
        gate: Gate,
    ) -> Self {
        Self {
            service: local.service().to_owned(),
            local,
            sessions,
            limits,
            upstream,
            request_timeout,
            stats,
            callers: gate.callers,
            admission: gate.admission,
            plain_mtls: false,
        }
    }

    /// Serves plain requests from authenticated non-seam callers (`interop.plain_mtls`).
    pub fn with_plain_mtls(mut self, on: bool) -> Self {
        self.plain_mtls = on;
        self
    }

    pub fn sessions(&self) -> &SessionCache<Uuid> {
        &self.sessions
    }

    /// Serves one request from the authenticated `caller`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<MeshBody>,
        caller: Arc<SpiffeId>,
    ) -> Result<Response<InboundBody>, Infallible> {
        let resp = match (req.method(), req.uri().path()) {
            (&Method::POST, MESSAGE_PATH) => self.message(req, &caller).await,
            // The rarer paths are boxed so that every message's future (copied into its
            // task) does not carry their state.
            (&Method::POST, HANDSHAKE_PATH) => Box::pin(self.handshake(req, &caller)).await,
            _ if self.plain_mtls && !req.uri().path().starts_with(SEAM_PATH_PREFIX) => {
                Box::pin(self.plain(req, &caller)).await
            }
            _ => self.refuse(
                Failure::BadRequest,
                &format!(
                    "seam({}): {} {} is not a seam endpoint; only seams talk to this port \
                     (set interop.plain_mtls to serve plain requests from mesh certificates)",
                    self.service,
                    req.method(),
                    req.uri().path()
                ),
            ),
        };
        Ok(resp)
    }

    async fn handshake(&self, req: Request<MeshBody>, caller: &SpiffeId) -> Response<InboundBody> {
        let body = match Limited::new(req.into_body(), CLIENT_HELLO_LEN * 2)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return self.refuse(
                    Failure::BadRequest,
                    &format!(
                        "seam({}): handshake from {caller} unreadable: {e}",
                        self.service
                    ),
                );
            }
        };
        // A hello that does not check out and keys aws-lc will not take are both a
        // failed handshake: counted, logged and refused the same way.
        let made = ClientHello::decode(&body)
            .and_then(|hello| respond(&hello, &caller.to_string(), &self.local.to_string()))
            .map_err(|e| {
                let why = match e {
                    HandshakeError::WrongLength { .. } | HandshakeError::UnsupportedVersion(_) => {
                        HandshakeFailure::BadHello
                    }
                    _ => HandshakeFailure::KeyAgreement,
                };
                (why, e.to_string())
            })
            .and_then(|(reply, keys)| {
                Session::new(keys, Role::Server, caller.service(), self.limits)
                    .map(|session| (reply, Arc::new(session)))
                    .map_err(|e| (HandshakeFailure::KeyAgreement, e.to_string()))
            });
        let (reply, session) = match made {
            Ok(made) => made,
            Err((why, e)) => {
                self.sessions
                    .stats()
                    .handshakes_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.stats.record_handshake_failure(why);
                tracing::warn!(event = "handshake_failed", peer = %caller, reason = why.code(), error = %e, "handshake failed");
                return self.refuse(
                    Failure::HandshakeFailed,
                    &format!(
                        "seam({}): handshake from {caller} rejected: {e}",
                        self.service
                    ),
                );
            }
        };
        self.sessions
            .stats()
            .handshakes_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sessions.insert(session.id(), session).await;
        Response::new(Either::Right(Either::Right(Full::new(
            Bytes::copy_from_slice(&reply.encode()),
        ))))
    }

    async fn message(&self, req: Request<MeshBody>, caller: &SpiffeId) -> Response<InboundBody> {
        let started = tokio::time::Instant::now();
        let resp = self.open_and_forward(req, caller).await;
        self.stats
            .observe_duration(Direction::Inbound, started.elapsed());
        resp
    }

    async fn open_and_forward(
        &self,
        req: Request<MeshBody>,
        caller: &SpiffeId,
    ) -> Response<InboundBody> {
        let started = tokio::time::Instant::now();
        // Before the session lookup and before any frame is opened: a caller over its
        // quota costs one map lookup, no cache traffic and no decryption.
        if let Some(refusal) = self.over_quota(caller) {
            return refusal;
        }
        let id = req
            .headers()
            .get(SEAM_SESSION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::parse_str(v).ok());
        let Some(id) = id else {
            return self.refuse(
                Failure::BadRequest,
                &format!(
                    "seam({}): message from {caller} names no valid session",
                    self.service
                ),
            );
        };
        let Some(session) = self.sessions.get(&id).await else {
            return self.refuse(
                Failure::UnknownSession,
                &format!("seam({}): session {id} unknown (expired, revoked or lost in a restart); make a new one", self.service),
            );
        };
        if session.peer() != caller.service() {
            tracing::warn!(event = "session_misuse", session_id = %id, owner = session.peer(), caller = %caller, "session used by another identity");
            return self.refuse(
                Failure::Forbidden,
                &format!(
                    "seam({}): session {id} does not belong to {caller}",
                    self.service
                ),
            );
        }
        let (opener, guard) = session.request_opener();
        let mut body =
            OpenedBody::new(req.into_body(), opener, Some(guard)).reporting_to(self.stats.clone());
        let head = match timeout(self.request_timeout, body.read_head()).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                session.counters().add_error();
                self.stats.record_open_failure(e.kind());
                tracing::warn!(event = "open_failed", kind = e.kind(), session_id = %id, peer = %caller, error = %e, "sealed request rejected");
                return self.refuse(
                    Failure::BadRequest,
                    &format!(
                        "seam({}): sealed request from {caller} rejected: {e}",
                        self.service
                    ),
                );
            }
            Err(_) => {
                return self.refuse(
                    Failure::Timeout,
                    &format!(
                        "seam({}): request head from {caller} not received within {:?}",
                        self.service, self.request_timeout
                    ),
                );
            }
        };
        let (Some(seq), Ok(head)) = (body.seq(), RequestHead::decode(&head)) else {
            session.counters().add_error();
            return self.refuse(
                Failure::BadRequest,
                &format!(
                    "seam({}): sealed request head from {caller} is malformed",
                    self.service
                ),
            );
        };
        let sealer = match session.response_sealer(seq) {
            Ok(s) => s,
            Err(e) => {
                return self.refuse(Failure::BadRequest, &format!("seam({}): {e}", self.service));
            }
        };
        // The path without its query: queries often carry tokens, which logs must not.
        let access = self.stats.access_log().then(|| {
            let path = head.path_and_query.path().to_owned();
            let authority = head.authority.to_str().unwrap_or_default().to_owned();
            (head.method.clone(), authority, path)
        });
        let (resp_head, resp_body) = match self.to_app(head, Either::Left(body), caller).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let head = ResponseHead {
                    status: parts.status,
                    headers: parts.headers,
                };
                (head, Either::Left(body))
            }
            Err((failure, message)) => self.sealed_failure(failure, message),
        };
        self.stats
            .record_status(Direction::Inbound, resp_head.status);
        if let Some((method, authority, path)) = access {
            tracing::info!(
                event = "access",
                direction = "inbound",
                %method,
                authority,
                path,
                status = resp_head.status.as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                caller = caller.service(),
                "request"
            );
        }
        let sealed = resp_head
            .encode(MAX_PAYLOAD)
            .map_err(|e| e.to_string())
            .and_then(|h| {
                SealedBody::new(sealer, &h, resp_body, None)
                    .map(|b| b.counted_on(session.clone()))
                    .map_err(|e| e.to_string())
            });
        match sealed {
            Ok(body) => Response::new(Either::Left(body)),
            Err(e) => {
                session.counters().add_error();
                self.refuse(
                    Failure::UpstreamUnavailable,
                    &format!(
                        "seam({}): the app's response head cannot be sealed: {e}",
                        self.service
                    ),
                )
            }
        }
    }

    /// A plain request from a caller that verified with a mesh certificate but speaks no
    /// seam sessions: rate limited like any caller, then handed to the app as it came.
    async fn plain(&self, req: Request<MeshBody>, caller: &SpiffeId) -> Response<InboundBody> {
        let started = tokio::time::Instant::now();
        if let Some(refusal) = self.over_quota(caller) {
            return refusal;
        }
        let authority = request_authority(&req);
        let (parts, body) = req.into_parts();
        let head = RequestHead::from_parts(parts, authority);
        let resp = match self.to_app(head, Either::Right(body), caller).await {
            Ok(resp) => {
                let resp = resp.map(|b| Either::Right(Either::Left(b)));
                self.stats.record_status(Direction::Inbound, resp.status());
                resp
            }
            // `refuse` counts the status itself.
            Err((failure, message)) => self.refuse(failure, &message),
        };
        self.stats
            .observe_duration(Direction::Inbound, started.elapsed());
        resp
    }

    /// Hands a request to the app within the request timeout; the response comes back
    /// with hop-by-hop headers removed, a failure as what to answer and why.
    async fn to_app(
        &self,
        head: RequestHead,
        body: UpstreamBody,
        caller: &SpiffeId,
    ) -> Result<Response<AppReply>, (Failure, String)> {
        match timeout(
            self.request_timeout,
            self.upstream.send(head, body, caller.service()),
        )
        .await
        {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Ok(Err(e)) => Err((
                Failure::UpstreamUnavailable,
                format!(
                    "seam({}): upstream {} unavailable: {e}",
                    self.service,
                    self.upstream.url()
                ),
            )),
            Err(_) => Err((
                Failure::Timeout,
                format!(
                    "seam({}): upstream {} did not answer within {:?}",
                    self.service,
                    self.upstream.url(),
                    self.request_timeout
                ),
            )),
        }
    }

    /// The 429 for a caller over its quota (`rate_limit`), or `None` to go on.
    fn over_quota(&self, caller: &SpiffeId) -> Option<Response<InboundBody>> {
        let wait = self.callers.check(caller.service()).err()?;
        let seconds = wait.seconds();
        self.admission.breach(
            Breach::RateLimited,
            &format!(
                "seam({}): {caller} is over its rate limit; refusing with 429 (adjust \
                 rate_limit.services.{} if its load is expected)",
                self.service,
                caller.service()
            ),
        );
        let mut resp = self.refuse(
            Failure::RateLimited,
            &format!(
                "seam({}): {} is over its rate limit; retry after {seconds}s",
                self.service,
                caller.service()
            ),
        );
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        Some(resp)
    }

    /// A failure reported to the calling app through the sealed channel, so it reads
    /// like any response but says it came from seam.
    fn sealed_failure(&self, failure: Failure, message: String) -> (ResponseHead, UpstreamReply) {
        self.stats.record_failure(failure);
        tracing::warn!(failure = failure.code(), "{message}");
        let mut headers = http::HeaderMap::new();
        headers.insert(SEAM_ERROR, header_value(failure.code()));
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let head = ResponseHead {
            status: failure.status(),
            headers,
        };
        (head, Either::Right(Full::new(Bytes::from(message + "\n"))))
    }

    /// A plain (unsealed) refusal to the calling seam: there is no usable session to
    /// seal it with, or the caller must act on it (unknown session).
    fn refuse(&self, failure: Failure, message: &str) -> Response<InboundBody> {
        self.stats.record_failure(failure);
        self.stats
            .record_status(Direction::Inbound, failure.status());
        tracing::debug!(failure = failure.code(), "{message}");
        failure_response(failure, message).map(|b| Either::Right(Either::Right(b)))
    }
}
