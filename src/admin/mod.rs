//! The admin port (DESIGN §5): liveness, readiness and stats.
//!
//! Every answer is built from state the data path keeps anyway (atomics, the session
//! caches), so a probe never waits on traffic.

pub mod stats;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use uuid::Uuid;

use crate::session::SessionCache;
use stats::{Direction, Stats};

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
}

impl Admin {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served here\n",
            ));
        }
        Ok(match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.is_ready() => text(StatusCode::OK, "ready\n"),
            "/ready" if self.draining.load(Ordering::Acquire) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            "/stats" => self.stats_json(),
            _ => text(
                StatusCode::NOT_FOUND,
                "unknown admin path; try /live /ready /stats\n",
            ),
        })
    }

    fn stats_json(&self) -> Response<Full<Bytes>> {
        let client = self.client_sessions.stats().snapshot();
        let server = self.server_sessions.stats().snapshot();
        let body = json!({
            "service": self.service,
            "uptime_seconds": self.stats.uptime_seconds(),
            "requests": {
                "outbound": self.stats.requests(Direction::Outbound),
                "inbound": self.stats.requests(Direction::Inbound),
                "retries": self.stats.retries(),
            },
            "failures": self.stats.failure_map(),
            "sessions": {
                "client": { "active": self.client_sessions.len(), "lifetime": client },
                "server": { "active": self.server_sessions.len(), "lifetime": server },
            },
            "handshakes": {
                "ok": client.handshakes_ok + server.handshakes_ok,
                "failed": client.handshakes_failed + server.handshakes_failed,
            },
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
