//! The admin port (DESIGN §5): liveness, readiness, health, stats, metrics, sessions,
//! effective config and the runtime log level.
//!
//! Every answer is built from state the data path keeps anyway (atomics, the session
//! caches, the last background probe), so a probe never waits on traffic or on I/O.
//! The port has no authentication; it binds loopback unless `admin.allow_remote`.

pub mod client;
pub mod health;
pub mod metrics;
pub mod stats;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::config::Config;
use crate::logging::LogControl;
use crate::ratelimit::CallerLimiter;
use crate::session::{Role, SessionCache, SessionInfo, SessionState};
use health::{Status, UpstreamProbe};
use stats::{Direction, Stats};

/// Page size of `/sessions` when `limit` is not given, and the most one page holds.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Longest body accepted by `PUT /log-level`.
const MAX_LOG_FILTER: usize = 1024;

/// What the admin port reads from.
pub struct Admin {
    pub service: String,
    pub stats: Arc<Stats>,
    pub client_sessions: SessionCache<String>,
    pub server_sessions: SessionCache<Uuid>,
    /// Set once every listener is bound and the certificates are loaded.
    pub ready: AtomicBool,
    /// Set when shutdown starts: readiness drops so load balancers move away first.
    pub draining: AtomicBool,
    /// The effective configuration, for `/config` and the health thresholds.
    pub config: Arc<Config>,
    /// The upstream app's URL as configured, for messages.
    pub upstream: String,
    pub upstream_probe: UpstreamProbe,
    pub cert_not_after: SystemTime,
    /// Set by the binary after it installed logging; embedded seams may have none.
    pub log: OnceLock<LogControl>,
    /// The inbound per-caller limiter, for its refusal counts.
    pub callers: Arc<CallerLimiter>,
}

/// Why an admin request was refused; rendered as the plain-text body.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "unknown admin path {0}; try /live /ready /health /stats /metrics /sessions /config /log-level"
    )]
    NotFound(String),
    #[error("{method} is not served on {path}; allowed: {allow}")]
    Method {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("no session {0} is held (it may have ended already); list them with GET /sessions")]
    NoSession(Uuid),
    #[error("bad query: {0}")]
    Query(String),
    #[error("{0}")]
    Log(#[from] crate::logging::LoggingError),
    #[error("runtime log levels are unavailable: this seam did not install its own logging")]
    NoLogControl,
    #[error("the request body could not be read: {0}; send a short text body like `debug`")]
    Body(String),
    #[error("encoding the metrics failed; this is a bug in seam, please report it")]
    Metrics,
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::NotFound(_) | AdminError::NoSession(_) => StatusCode::NOT_FOUND,
            AdminError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Query(_) | AdminError::Log(_) | AdminError::Body(_) => {
                StatusCode::BAD_REQUEST
            }
            AdminError::NoLogControl => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Metrics => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One page of `GET /sessions`.
#[derive(Debug, Serialize)]
pub struct SessionPage {
    pub sessions: Vec<SessionInfo>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<Uuid>,
}

/// Filters and position of `GET /sessions`.
#[derive(Debug, Default)]
pub struct SessionQuery {
    pub peer: Option<String>,
    pub state: Option<SessionState>,
    pub role: Option<Role>,
    pub limit: Option<usize>,
    pub cursor: Option<Uuid>,
}

impl Admin {
    pub fn new(
        config: &Config,
        stats: Arc<Stats>,
        client_sessions: SessionCache<String>,
        server_sessions: SessionCache<Uuid>,
        cert_not_after: SystemTime,
        callers: Arc<CallerLimiter>,
    ) -> Admin {
        Admin {
            service: config.service.clone(),
            stats,
            client_sessions,
            server_sessions,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            config: Arc::new(config.clone()),
            upstream: config.upstream.url.to_string(),
            upstream_probe: UpstreamProbe::default(),
            cert_not_after,
            log: OnceLock::new(),
            callers,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => {
                let mut resp = text(e.status(), format!("{e}\n"));
                if let AdminError::Method { allow, .. } = e {
                    resp.headers_mut()
                        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                }
                resp
            }
        })
    }

    async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, AdminError> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        let wrong_method = |allow: &'static str| AdminError::Method {
            method: method.clone(),
            path: path.clone(),
            allow,
        };
        if let Some(id) = path.strip_prefix("/sessions/") {
            let id = Uuid::parse_str(id)
                .map_err(|_| AdminError::Query(format!("'{id}' is not a session id (a UUID)")))?;
            return match method {
                Method::GET => {
                    let info = self.session(id).ok_or(AdminError::NoSession(id))?;
                    Ok(json_response(StatusCode::OK, &info))
                }
                Method::DELETE => {
                    let params = parse_query(&query);
                    let reason = params
                        .iter()
                        .find(|(k, _)| k == "reason")
                        .map_or("revoked by an operator", |(_, v)| v.as_str());
                    let info = self.revoke(id, reason).await?;
                    Ok(json_response(StatusCode::OK, &info))
                }
                _ => Err(wrong_method("GET, DELETE")),
            };
        }
        match (method.clone(), path.as_str()) {
            (Method::GET, "/live") => Ok(text(StatusCode::OK, "live\n")),
            (Method::GET, "/ready") if self.is_ready() => Ok(text(StatusCode::OK, "ready\n")),
            (Method::GET, "/ready") if self.draining.load(Ordering::Acquire) => {
                Ok(text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"))
            }
            (Method::GET, "/ready") => Ok(text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")),
            (Method::GET, "/health") => {
                let report = self.health();
                let status = match report.status {
                    Status::Healthy | Status::Degraded => StatusCode::OK,
                    Status::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
                };
                Ok(json_response(status, &report))
            }
            (Method::GET, "/stats") => Ok(json_response(StatusCode::OK, &self.stats_json())),
            (Method::GET, "/metrics") => {
                let body = metrics::render(self.clone()).map_err(|_| AdminError::Metrics)?;
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                Ok(resp)
            }
            (Method::GET, "/sessions") => {
                let q = parse_session_query(&query)?;
                Ok(json_response(StatusCode::OK, &self.sessions(&q)))
            }
            (Method::GET, "/config") => Ok(json_response(StatusCode::OK, &self.config_json())),
            (Method::GET, "/log-level") => {
                let log = self.log.get().ok_or(AdminError::NoLogControl)?;
                Ok(text(StatusCode::OK, format!("{}\n", log.current())))
            }
            (Method::PUT, "/log-level") => {
                let log = self.log.get().ok_or(AdminError::NoLogControl)?;
                let body = Limited::new(req.into_body(), MAX_LOG_FILTER)
                    .collect()
                    .await
                    .map_err(|e| AdminError::Body(e.to_string()))?
                    .to_bytes();
                let directive = String::from_utf8_lossy(&body);
                log.set(&directive)?;
                Ok(text(StatusCode::OK, format!("{}\n", log.current())))
            }
            (
                _,
                "/live" | "/ready" | "/health" | "/stats" | "/metrics" | "/sessions" | "/config",
            ) => Err(wrong_method("GET")),
            (_, "/log-level") => Err(wrong_method("GET, PUT")),
            _ => Err(AdminError::NotFound(path)),
        }
    }

    /// Both caches' sessions, sorted by id (UUIDv7: creation order).
    fn all_sessions(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self
            .client_sessions
            .sessions()
            .iter()
            .chain(self.server_sessions.sessions().iter())
            .map(|s| s.info())
            .collect();
        all.sort_by_key(|s| (s.id, s.role == Role::Server));
        all
    }

    /// A page of sessions after `cursor`. Keyed on the id rather than an offset, so a
    /// session created or removed while someone pages never shifts the others.
    pub fn sessions(&self, q: &SessionQuery) -> SessionPage {
        let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let mut page: Vec<SessionInfo> = self
            .all_sessions()
            .into_iter()
            .filter(|s| q.cursor.is_none_or(|c| s.id > c))
            .filter(|s| q.peer.as_deref().is_none_or(|p| s.peer == p))
            .filter(|s| q.state.is_none_or(|st| s.state == st))
            .filter(|s| q.role.is_none_or(|r| s.role == r))
            .take(limit + 1)
            .collect();
        let next_cursor = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|s| s.id)
        } else {
            None
        };
        SessionPage {
            sessions: page,
            next_cursor,
        }
    }

    pub fn session(&self, id: Uuid) -> Option<SessionInfo> {
        self.client_sessions
            .find(id)
            .or_else(|| self.server_sessions.find(id))
            .map(|s| s.info())
    }

    /// Revokes session `id` wherever it is held. A client-side session makes the next
    /// request to that peer handshake again; a server-side one makes the peer's next
    /// message fail with `unknown-session`, which its seam answers with a new session.
    pub async fn revoke(&self, id: Uuid, reason: &str) -> Result<SessionInfo, AdminError> {
        let session = match self.client_sessions.revoke_id(id, reason).await {
            Some(s) => s,
            None => self
                .server_sessions
                .revoke_id(id, reason)
                .await
                .ok_or(AdminError::NoSession(id))?,
        };
        Ok(session.info())
    }

    fn stats_json(&self) -> serde_json::Value {
        let client = self.client_sessions.stats().snapshot();
        let server = self.server_sessions.stats().snapshot();
        let infos = self.all_sessions();
        let count = |st: SessionState| infos.iter().filter(|s| s.state == st).count();
        let (c_rx, c_tx) = self.client_sessions.bytes();
        let (s_rx, s_tx) = self.server_sessions.bytes();
        let hs_failed = self.stats.handshake_failures();
        json!({
            "service": self.service,
            "uptime_seconds": self.stats.uptime_seconds(),
            "sessions": {
                "held": infos.len(),
                "active": count(SessionState::Active),
                "idle": count(SessionState::Idle),
                "created": client.created + server.created,
                "ended": {
                    "expired": client.expired + server.expired,
                    "evicted": client.evicted + server.evicted,
                    "revoked": client.revoked + server.revoked,
                    "replaced": client.replaced + server.replaced,
                },
                "client": { "held": self.client_sessions.len(), "lifetime": client },
                "server": { "held": self.server_sessions.len(), "lifetime": server },
            },
            "handshakes": {
                "ok": client.handshakes_ok + server.handshakes_ok,
                "failed": client.handshakes_failed + server.handshakes_failed,
                "failed_by_reason": hs_failed,
            },
            "requests": {
                "outbound": self.stats.requests(Direction::Outbound),
                "inbound": self.stats.requests(Direction::Inbound),
                "retries": self.stats.retries(),
            },
            "bytes": {
                "client_sessions": { "received": c_rx, "sent": c_tx },
                "server_sessions": { "received": s_rx, "sent": s_tx },
            },
            // Rows are bounded by the limiter (configured services plus a capped set
            // of callers, the rest folded into one row).
            "rate_limited": self.callers.refused().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "limit_breaches": self.stats.breach_map(),
            "failures": self.stats.failure_map(),
            "open_failures": self.stats.open_failures(),
            "peers": self.stats.peers(),
        })
    }

    /// The effective configuration. Nothing in `Config` is secret (the TLS entries are
    /// paths, not keys), but the key path is still masked: where keys live is nobody's
    /// business on an unauthenticated port.
    fn config_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&*self.config)
            .unwrap_or_else(|e| json!({ "error": format!("the config could not be shown: {e}") }));
        if let Some(key) = value.pointer_mut("/tls/key") {
            *key = json!("<redacted>");
        }
        value
    }
}

fn parse_session_query(query: &str) -> Result<SessionQuery, AdminError> {
    let mut q = SessionQuery::default();
    for (k, v) in parse_query(query) {
        match k.as_str() {
            "peer" => q.peer = Some(v),
            "state" => {
                q.state = Some(serde_json::from_value(json!(v)).map_err(|_| {
                    AdminError::Query(format!(
                        "state '{v}' is not one of active, idle, closing, closed"
                    ))
                })?);
            }
            "role" => {
                q.role = Some(serde_json::from_value(json!(v)).map_err(|_| {
                    AdminError::Query(format!("role '{v}' is not client or server"))
                })?);
            }
            "limit" => {
                q.limit = Some(v.parse().map_err(|_| {
                    AdminError::Query(format!("limit '{v}' is not a number; give 1 to {MAX_PAGE}"))
                })?);
            }
            "cursor" => {
                q.cursor = Some(Uuid::parse_str(&v).map_err(|_| {
                    AdminError::Query(format!("cursor '{v}' is not a session id; pass the next_cursor of the previous page"))
                })?);
            }
            other => {
                return Err(AdminError::Query(format!(
                    "unknown parameter '{other}'; use peer, state, role, limit, cursor"
                )));
            }
        }
    }
    Ok(q)
}

/// `a=1&b=x%20y` -> [("a","1"), ("b","x y")], form-decoded.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"error\":\"the answer could not be encoded: {e}\"}}").into_bytes()
    });
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("reason=key+leak%21&x"),
            vec![
                ("reason".to_owned(), "key leak!".to_owned()),
                ("x".to_owned(), String::new())
            ]
        );
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%e2%9c%93"), "✓");
    }

    #[test]
    fn session_query_errors_name_the_fix() {
        let e = parse_session_query("state=open").unwrap_err().to_string();
        assert!(e.contains("active, idle"), "{e}");
        let e = parse_session_query("limit=x").unwrap_err().to_string();
        assert!(e.contains("1 to 1000"), "{e}");
        let q = parse_session_query("peer=billing&state=idle&role=client&limit=5").unwrap();
        assert_eq!(q.peer.as_deref(), Some("billing"));
        assert_eq!(q.limit, Some(5));
    }
}
