//! `seam status` and `seam sessions`: read a running seam's admin API and print it for
//! people. Uses hyper's pooled client, already a dependency of the data path.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long the CLI waits for the admin port before calling it unreachable.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the admin port at {addr}: {reason}; is seam running? pass its listen.admin \
         address with --admin"
    )]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the admin port at {addr} answered {path} with {status}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("the admin port at {addr} sent {path} as something other than JSON: {reason}")]
    NotJson {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
}

/// `GET path` on the admin port: the status and the parsed JSON body.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<(StatusCode, Value), ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))?
        .map_err(|e| unreachable(error_chain(&e)))?;
    let status = resp.status();
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .map_err(|_| unreachable(format!("no complete answer within {TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    match serde_json::from_slice(&body) {
        Ok(v) => Ok((status, v)),
        Err(_) if !status.is_success() => Err(ClientError::Status {
            addr,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        }),
        Err(e) => Err(ClientError::NotJson {
            addr,
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// hyper-util's errors say "client error (Connect)"; the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// The report of `seam status` and whether the seam is healthy enough (not unhealthy).
pub async fn status(addr: SocketAddr) -> Result<(String, bool), ClientError> {
    let (code, health) = get_json(addr, "/health").await?;
    let (_, stats) = get_json(addr, "/stats").await?;
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "seam {} at {addr}: {} (up {:.0}s)",
        s(&stats["service"]),
        s(&health["status"]).to_uppercase(),
        stats["uptime_seconds"].as_f64().unwrap_or(0.0)
    );
    if let Some(checks) = health["checks"].as_object() {
        for (name, c) in checks {
            let _ = writeln!(
                out,
                "  {name:<17} {:<9} {}",
                s(&c["status"]),
                s(&c["detail"])
            );
        }
    }
    let sess = &stats["sessions"];
    let _ = writeln!(
        out,
        "sessions: {} held ({} active, {} idle), {} created, ended: {} expired, {} evicted, {} revoked, {} replaced",
        n(&sess["held"]),
        n(&sess["active"]),
        n(&sess["idle"]),
        n(&sess["created"]),
        n(&sess["ended"]["expired"]),
        n(&sess["ended"]["evicted"]),
        n(&sess["ended"]["revoked"]),
        n(&sess["ended"]["replaced"]),
    );
    let uptime = stats["uptime_seconds"].as_f64().unwrap_or(0.0).max(1.0);
    for dir in ["outbound", "inbound"] {
        let r = &stats["requests"][dir];
        let _ = writeln!(
            out,
            "{dir:<8} requests: {} ({:.2}/s average), 2xx {} 4xx {} 5xx {}",
            n(&r["total"]),
            n(&r["total"]) as f64 / uptime,
            n(&r["2xx"]),
            n(&r["4xx"]),
            n(&r["5xx"]),
        );
    }
    let _ = writeln!(
        out,
        "handshakes: {} ok, {} failed",
        n(&stats["handshakes"]["ok"]),
        n(&stats["handshakes"]["failed"])
    );
    if let Some(peers) = stats["peers"].as_object().filter(|p| !p.is_empty()) {
        let mut peers: Vec<_> = peers.iter().collect();
        // Busiest first: the peers an operator most likely came to look at.
        peers.sort_by_key(|(_, p)| std::cmp::Reverse(n(&p["requests"])));
        let _ = writeln!(out, "top peers:");
        for (name, p) in peers.into_iter().take(5) {
            let rtt = p["rtt_ewma_seconds"]
                .as_f64()
                .map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1000.0));
            let reach = match p["reachable"].as_bool() {
                Some(true) => "reachable",
                Some(false) => "UNREACHABLE",
                None => "not tried",
            };
            let _ = writeln!(
                out,
                "  {name:<20} {:>8} req {:>6} err  rtt {rtt:>8}  {reach}",
                n(&p["requests"]),
                n(&p["errors"])
            );
        }
    }
    Ok((out, code != StatusCode::SERVICE_UNAVAILABLE))
}

/// The table of `seam sessions`, following every page.
pub async fn sessions_table(addr: SocketAddr) -> Result<String, ClientError> {
    let mut out = format!(
        "{:<36}  {:<6}  {:<16}  {:<7}  {:>8}  {:>10}  {:>10}  {:>8}\n",
        "ID", "ROLE", "PEER", "STATE", "REQUESTS", "BYTES IN", "BYTES OUT", "AGE"
    );
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/sessions?limit=500&cursor={c}"),
            None => "/sessions?limit=500".to_owned(),
        };
        let (_, page) = get_json(addr, &path).await?;
        for s in page["sessions"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{:<36}  {:<6}  {:<16}  {:<7}  {:>8}  {:>10}  {:>10}  {:>7.0}s",
                s["id"].as_str().unwrap_or("?"),
                s["role"].as_str().unwrap_or("?"),
                s["peer"].as_str().unwrap_or("?"),
                s["state"].as_str().unwrap_or("?"),
                s["requests"].as_u64().unwrap_or(0),
                s["bytes_in"].as_u64().unwrap_or(0),
                s["bytes_out"].as_u64().unwrap_or(0),
                s["age_seconds"].as_f64().unwrap_or(0.0),
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(out),
        }
    }
}
