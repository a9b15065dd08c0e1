//! The admin port against running seams with real traffic: endpoint shapes and status
//! codes, health transitions, Prometheus output checked by promtool, session paging and
//! revocation, and the structured log events of the session lifecycle.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seam::Sidecar;
use seam::handshake::{ClientHandshake, respond};
use seam::logging::{LogControl, LogFormat};
use seam::session::{Role, Session, SessionLimits};
use serde_json::Value;
use support::*;
use uuid::Uuid;

/// Upper bound for any wait on a background event; generous for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(20);

async fn admin(addr: SocketAddr, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    admin(addr, Method::GET, path, "").await
}

async fn get_json(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    let (status, body) = get(addr, path).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, value)
}

/// Polls `/health` until its status is `want`, failing after [`DEADLINE`].
async fn wait_health(addr: SocketAddr, want: &str) -> (StatusCode, Value) {
    let start = Instant::now();
    loop {
        let (code, v) = get_json(addr, "/health").await;
        if v["status"] == want {
            return (code, v);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "health never became {want}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn request_billing(mesh: &Mesh) {
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/status/200", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_all(resp).await;
}

fn client_session_id(stats_page: &Value) -> Uuid {
    let sessions = stats_page["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{stats_page}");
    sessions[0]["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_endpoint_answers_with_its_shape() {
    let mesh = Mesh::start().await;
    for _ in 0..3 {
        let resp = mesh
            .h1()
            .request(mesh.to_billing("POST", "/sha256", body("some payload")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        read_all(resp).await;
    }
    let (o, b) = (mesh.orders.admin_addr(), mesh.billing.admin_addr());

    assert_eq!(get(o, "/live").await, (StatusCode::OK, "live\n".into()));
    assert_eq!(get(o, "/ready").await, (StatusCode::OK, "ready\n".into()));

    // billing's app is up: healthy once the first background probe has run.
    let (code, health) = wait_health(b, "healthy").await;
    assert_eq!(code, StatusCode::OK);
    for check in [
        "ready",
        "upstream",
        "certificate",
        "session_capacity",
        "peers",
    ] {
        assert_eq!(health["checks"][check]["status"], "healthy", "{health}");
    }
    // orders' upstream (port 9) is down: it cannot serve inbound traffic.
    let (code, health) = wait_health(o, "unhealthy").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["checks"]["upstream"]["status"], "unhealthy");

    let (code, stats) = get_json(o, "/stats").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(stats["service"], "orders");
    assert_eq!(stats["requests"]["outbound"]["2xx"], 3);
    assert_eq!(stats["handshakes"]["ok"], 1);
    assert_eq!(stats["sessions"]["held"], 1);
    assert_eq!(stats["sessions"]["created"], 1);
    assert!(stats["sessions"]["ended"]["revoked"].is_u64());
    assert!(stats["rate_limited"].is_object());
    assert!(stats["open_failures"].is_object());
    assert!(stats["bytes"]["client_sessions"]["sent"].as_u64().unwrap() > 0);
    let peer = &stats["peers"]["billing"];
    assert_eq!(peer["requests"], 3, "{stats}");
    assert_eq!(peer["errors"], 0);
    assert_eq!(peer["reachable"], true);
    assert!(peer["rtt_ewma_seconds"].as_f64().unwrap() > 0.0);
    assert!(peer["last_activity_unix_ms"].as_u64().unwrap() > 0);
    let (_, stats) = get_json(b, "/stats").await;
    assert_eq!(stats["requests"]["inbound"]["2xx"], 3);
    assert!(
        stats["bytes"]["server_sessions"]["received"]
            .as_u64()
            .unwrap()
            > 0
    );

    let (code, metrics) = get(o, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        metrics.contains("seam_requests_total{direction=\"outbound\",class=\"2xx\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("seam_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("seam_peer_requests_total{peer=\"billing\"} 3"),
        "{metrics}"
    );

    let (code, page) = get_json(o, "/sessions").await;
    assert_eq!(code, StatusCode::OK);
    let id = client_session_id(&page);
    assert_eq!(page["next_cursor"], Value::Null);
    let s = &page["sessions"][0];
    assert_eq!(
        (s["peer"].as_str(), s["role"].as_str()),
        (Some("billing"), Some("client"))
    );
    assert_eq!(s["requests"], 3);
    let text = page.to_string();
    assert!(
        !text.contains("key"),
        "no key material in the listing: {text}"
    );
    let (code, one) = get_json(o, &format!("/sessions/{id}")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(one["id"], id.to_string());
    // The same session on the other side, filtered.
    let (_, page) = get_json(b, "/sessions?peer=orders&role=server&state=idle").await;
    assert_eq!(client_session_id(&page), id);
    let (_, page) = get_json(b, "/sessions?peer=nobody").await;
    assert_eq!(page["sessions"].as_array().unwrap().len(), 0);

    let (code, config) = get_json(b, "/config").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(config["service"], "billing");
    assert_eq!(config["tls"]["key"], "<redacted>");
    assert_eq!(config["admin"]["cert_warning"], "1m");
    assert_eq!(config["admin"]["access_log"], false);

    // Errors say what to do, with the right codes.
    assert_eq!(get(o, "/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(o, "/sessions/not-a-uuid").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(o, "/sessions?state=open").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(o, &format!("/sessions/{}", Uuid::now_v7())).await.0,
        StatusCode::NOT_FOUND
    );
    let (code, msg) = admin(o, Method::DELETE, "/stats", "").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{msg}");
    assert_eq!(
        admin(o, Method::POST, "/sessions", "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // An embedded seam without its own logging cannot change levels, and says so.
    assert_eq!(
        admin(o, Method::PUT, "/log-level", "debug").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn stopping_the_upstream_app_makes_health_unhealthy() {
    let mesh = Mesh::start_with(
        |_| {},
        |b| b.admin.upstream_probe_interval = Duration::from_millis(20),
    )
    .await;
    let b = mesh.billing.admin_addr();
    wait_health(b, "healthy").await;
    mesh.app.stop();
    let (code, health) = wait_health(b, "unhealthy").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["checks"]["upstream"]["status"], "unhealthy");
    assert!(
        health["checks"]["upstream"]["detail"]
            .as_str()
            .unwrap()
            .contains("start the app")
    );
}

#[tokio::test]
async fn certificate_near_expiry_is_degraded() {
    let mesh = Mesh::start().await;
    let now = SystemTime::now();
    let cert = mesh
        .ca
        .issue(
            "billing",
            now - Duration::from_secs(60),
            now + Duration::from_secs(2 * 3600),
        )
        .unwrap();
    let identity = seam::identity::Identity::from_pem(
        &mesh.ca.ca_pem(),
        &cert.cert_pem,
        &cert.key_pem,
        TRUST_DOMAIN,
        "billing",
    )
    .unwrap();
    let mut cfg = config("billing", &mesh.app.url(), Default::default());
    cfg.admin.cert_warning = Duration::from_secs(30 * 24 * 3600);
    let seam = Sidecar::start(cfg, identity).await.unwrap();
    let (code, health) = wait_health(seam.admin_addr(), "degraded").await;
    assert_eq!(code, StatusCode::OK, "degraded still serves");
    assert_eq!(
        health["checks"]["certificate"]["status"], "degraded",
        "{health}"
    );
    assert_eq!(
        health["checks"]["upstream"]["status"], "healthy",
        "{health}"
    );
    seam.shutdown().await;
}

#[tokio::test]
async fn an_expired_certificate_is_unhealthy() {
    let mesh = Mesh::start().await;
    let now = SystemTime::now();
    // Valid for an hour that ended a minute ago: a seam left running past its
    // certificate's end, as seen from the identity loaded while it was still valid.
    let cert = mesh
        .ca
        .issue(
            "billing",
            now - Duration::from_secs(3660),
            now - Duration::from_secs(60),
        )
        .unwrap();
    let identity = seam::identity::Identity::from_pem_at(
        &mesh.ca.ca_pem(),
        &cert.cert_pem,
        &cert.key_pem,
        TRUST_DOMAIN,
        "billing",
        now - Duration::from_secs(1800),
    )
    .unwrap();
    let cfg = config("billing", &mesh.app.url(), Default::default());
    let seam = Sidecar::start(cfg, identity).await.unwrap();
    let (code, health) = wait_health(seam.admin_addr(), "unhealthy").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        health["checks"]["certificate"]["status"], "unhealthy",
        "{health}"
    );
    seam.shutdown().await;
}

/// Revokes orders' client session through its admin port and returns the session id.
async fn revoke_client_session(mesh: &Mesh, reason: &str) -> Uuid {
    let o = mesh.orders.admin_addr();
    let (_, page) = get_json(o, "/sessions?role=client").await;
    let id = client_session_id(&page);
    let (code, body) = admin(
        o,
        Method::DELETE,
        &format!("/sessions/{id}?reason={reason}"),
        "",
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    id
}

#[tokio::test]
async fn filling_sessions_to_ninety_percent_is_degraded() {
    let mesh = Mesh::start_with(|_| {}, |b| b.session.max_sessions = 10).await;
    let b = mesh.billing.admin_addr();
    wait_health(b, "healthy").await;
    // Each revoked client session makes the next request handshake again, leaving one
    // more server-side session on billing.
    for _ in 0..9 {
        request_billing(&mesh).await;
        revoke_client_session(&mesh, "fill").await;
    }
    mesh.billing.server_sessions().run_pending_tasks().await;
    let (code, health) = wait_health(b, "degraded").await;
    assert_eq!(code, StatusCode::OK);
    let cap = &health["checks"]["session_capacity"];
    assert_eq!(cap["status"], "degraded", "{health}");
    assert!(
        cap["detail"].as_str().unwrap().starts_with("9 of 10"),
        "{cap}"
    );
}

#[tokio::test]
async fn revocation_forces_a_new_handshake() {
    let mesh = Mesh::start().await;
    let o = mesh.orders.admin_addr();
    request_billing(&mesh).await;
    let (_, stats) = get_json(o, "/stats").await;
    assert_eq!(stats["handshakes"]["ok"], 1);

    // Client side: orders drops its session, the next request makes a new one.
    let old = revoke_client_session(&mesh, "rotated+by+test").await;
    assert_eq!(
        get(o, &format!("/sessions/{old}")).await.0,
        StatusCode::NOT_FOUND
    );
    request_billing(&mesh).await;
    let (_, stats) = get_json(o, "/stats").await;
    assert_eq!(stats["handshakes"]["ok"], 2, "{stats}");
    assert_eq!(stats["sessions"]["ended"]["revoked"], 1, "{stats}");
    let (_, page) = get_json(o, "/sessions").await;
    let fresh = client_session_id(&page);
    assert_ne!(fresh, old);

    // Server side: billing forgets it; orders learns on the next request and retries.
    let (code, _) = admin(
        mesh.billing.admin_addr(),
        Method::DELETE,
        &format!("/sessions/{fresh}"),
        "",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    request_billing(&mesh).await;
    let (_, stats) = get_json(o, "/stats").await;
    assert_eq!(stats["handshakes"]["ok"], 3, "{stats}");
    assert_eq!(stats["requests"]["retries"], 1, "{stats}");
    let (_, bstats) = get_json(mesh.billing.admin_addr(), "/stats").await;
    assert_eq!(bstats["sessions"]["ended"]["revoked"], 1, "{bstats}");
}

/// A server-side session made by a real handshake, as billing would hold it.
fn server_session() -> Arc<Session> {
    let limits = SessionLimits {
        idle_ttl: Duration::from_secs(300),
        max_lifetime: Duration::from_secs(3600),
        max_messages: 1000,
    };
    let (c, hello) =
        ClientHandshake::start("spiffe://mesh.local/orders", "spiffe://mesh.local/billing")
            .unwrap();
    let (reply, keys) = respond(
        &hello,
        "spiffe://mesh.local/orders",
        "spiffe://mesh.local/billing",
    )
    .unwrap();
    c.finish(&reply).unwrap();
    Arc::new(Session::new(keys, Role::Server, "orders", limits).unwrap())
}

#[tokio::test]
async fn paging_visits_every_session_once_while_sessions_come_and_go() {
    let mesh = Mesh::start().await;
    let b = mesh.billing.admin_addr();
    let cache = mesh.billing.server_sessions();
    let mut initial = Vec::new();
    for _ in 0..40 {
        let s = server_session();
        initial.push(s.id());
        cache.insert(s.id(), s).await;
    }
    let mut removed = HashSet::new();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut page_no = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/sessions?limit=7&cursor={c}"),
            None => "/sessions?limit=7".to_owned(),
        };
        let (code, page) = get_json(b, &path).await;
        assert_eq!(code, StatusCode::OK);
        for s in page["sessions"].as_array().unwrap() {
            seen.push(s["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        }
        // Churn between pages: new sessions arrive, and one already seen and one not yet
        // seen are revoked.
        for _ in 0..3 {
            let s = server_session();
            cache.insert(s.id(), s).await;
        }
        let behind = initial[page_no * 7 / 2];
        let ahead = initial[(page_no * 7 + 20).min(initial.len() - 1)];
        for id in [behind, ahead] {
            if removed.insert(id) {
                let (code, _) = admin(
                    b,
                    Method::DELETE,
                    &format!("/sessions/{id}?reason=churn"),
                    "",
                )
                .await;
                assert_eq!(code, StatusCode::OK);
            }
        }
        page_no += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: BTreeSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a session was listed twice");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "pages follow id order");
    for id in &initial {
        if !removed.contains(id) {
            assert!(
                unique.contains(id),
                "session {id}, held throughout, was skipped"
            );
        }
    }
}

#[tokio::test]
async fn promtool_accepts_the_metrics_of_a_busy_pair() {
    let promtool = Command::new("promtool").arg("--version").output();
    assert!(
        promtool.is_ok_and(|o| o.status.success()),
        "promtool is not installed; install it (Debian: apt-get install -y --no-install-recommends prometheus) to run this test"
    );
    let mesh = Mesh::start().await;
    for _ in 0..5 {
        request_billing(&mesh).await;
    }
    let unknown = mesh
        .h1()
        .request(mesh.to_billing("GET", "/status/503", empty()))
        .await
        .unwrap();
    read_all(unknown).await;
    revoke_client_session(&mesh, "metrics").await;
    request_billing(&mesh).await;
    for addr in [mesh.orders.admin_addr(), mesh.billing.admin_addr()] {
        let (code, text) = get(addr, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------
// Structured logs: the test binary installs seam's JSON logging once and reads lines.

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Logs {
    buffer: Buffer,
    control: Mutex<Option<LogControl>>,
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let control =
            seam::logging::init_with_writer(LogFormat::Json, "info", move || writer.clone())
                .expect("the first subscriber of this test binary");
        Logs {
            buffer,
            control: Mutex::new(Some(control)),
        }
    })
}

/// Every JSON line logged so far.
fn lines() -> Vec<Value> {
    let bytes = logs().buffer.0.lock().unwrap().clone();
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect()
}

/// Waits until a line with `event` matching `pred` was logged, and returns it.
async fn wait_event(event: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(l) = lines().into_iter().find(|l| l["event"] == event && pred(l)) {
            return l;
        }
        assert!(start.elapsed() < DEADLINE, "no {event} event logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_session_lifecycle_step_logs_one_json_event() {
    logs();
    let mesh = Mesh::start_with(
        |o| {
            // Rekey after a few messages; a peer nobody listens on for handshake failures.
            o.session.max_messages = 4;
            o.peers
                .insert("ghost".into(), vec!["127.0.0.1:1".parse().unwrap()]);
            o.admin.access_log = true;
        },
        |b| b.session.max_sessions = 2,
    )
    .await;
    if let Some(control) = logs().control.lock().unwrap().take() {
        mesh.orders.set_log_control(control);
    }

    request_billing(&mesh).await;
    let (_, page) = get_json(mesh.orders.admin_addr(), "/sessions").await;
    let first = client_session_id(&page).to_string();
    let created = wait_event("session_created", |l| {
        l["session_id"] == first && l["role"] == "client"
    })
    .await;
    assert_eq!(created["peer"], "billing");

    let access = wait_event("access", |l| l["direction"] == "outbound").await;
    assert_eq!(
        (access["method"].as_str(), access["path"].as_str()),
        (Some("GET"), Some("/status/200"))
    );
    assert_eq!(access["status"], 200);
    assert_eq!(access["caller"], "orders");
    assert!(access["duration_ms"].is_f64());

    // max_messages 4: the fourth request finds the budget nearly used and rekeys.
    for _ in 0..4 {
        request_billing(&mesh).await;
    }
    let rekeyed = wait_event("session_rekeyed", |l| l["old_session_id"] == first).await;
    assert_eq!(rekeyed["peer"], "billing");
    wait_event("session_ended", |l| {
        l["session_id"] == first && l["reason"] == "replaced"
    })
    .await;

    let revoked = revoke_client_session(&mesh, "key+rotation")
        .await
        .to_string();
    let line = wait_event("session_revoked", |l| l["session_id"] == revoked).await;
    assert_eq!(line["reason"], "key rotation");
    assert_eq!(line["peer"], "billing");
    wait_event("session_ended", |l| {
        l["session_id"] == revoked && l["reason"] == "revoked"
    })
    .await;

    // billing holds at most 2 sessions: the third handshake pushes one out.
    request_billing(&mesh).await;
    revoke_client_session(&mesh, "again").await;
    request_billing(&mesh).await;
    mesh.billing.server_sessions().run_pending_tasks().await;
    let evicted = wait_event("session_ended", |l| {
        l["reason"] == "evicted" && l["role"] == "server"
    })
    .await;
    assert_eq!(evicted["peer"], "orders");

    let ghost = mesh
        .h1()
        .request(Request::get("http://ghost/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ghost.status(), StatusCode::BAD_GATEWAY);
    let failed = wait_event("handshake_failed", |l| l["peer"] == "ghost").await;
    assert_eq!(failed["reason"], "peer-unreachable");

    // Runtime level changes through the admin port.
    let o = mesh.orders.admin_addr();
    let (code, body) = admin(o, Method::PUT, "/log-level", "info,seam=debug").await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "info,seam=debug\n"));
    wait_event("log_level_changed", |l| l["filter"] == "info,seam=debug").await;
    let (code, body) = admin(o, Method::PUT, "/log-level", "seam=loud").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(get(o, "/log-level").await.1, "info,seam=debug\n");
    assert_eq!(
        admin(o, Method::PUT, "/log-level", "info").await.0,
        StatusCode::OK
    );

    // Nothing logged carries key material.
    for l in lines() {
        let text = l.to_string();
        assert!(
            !text.contains("client_to_server") && !text.contains("secret"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn an_idle_session_expires_with_an_event() {
    logs();
    let mesh = Mesh::start_with(
        |_| {},
        |b| {
            b.session.idle_ttl = Duration::from_millis(200);
        },
    )
    .await;
    request_billing(&mesh).await;
    // Read from orders, whose side stays alive: billing's may be gone already.
    let (_, page) = get_json(mesh.orders.admin_addr(), "/sessions").await;
    let id = client_session_id(&page).to_string();
    let start = Instant::now();
    // moka reclaims idle entries during maintenance; drive it until the event shows.
    loop {
        mesh.billing.server_sessions().run_pending_tasks().await;
        if lines().iter().any(|l| {
            l["event"] == "session_ended" && l["session_id"] == id && l["reason"] == "expired"
        }) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "session {id} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the built `seam` binary with `args` and returns (success, stdout, stderr).
async fn seam_cli(args: Vec<String>) -> (bool, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_seam"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_and_sessions_commands_read_the_admin_api() {
    let mesh = Mesh::start().await;
    request_billing(&mesh).await;
    let (b, o) = (mesh.billing.admin_addr(), mesh.orders.admin_addr());
    wait_health(b, "healthy").await;
    wait_health(o, "unhealthy").await;

    let (ok, out, err) = seam_cli(vec!["status".into(), "--admin".into(), b.to_string()]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("seam billing at") && out.contains("HEALTHY"),
        "{out}"
    );
    assert!(out.contains("sessions: 1 held"), "{out}");

    // orders' app (port 9) is down: unhealthy, so a non-zero exit for scripts.
    let (ok, out, _) = seam_cli(vec!["status".into(), "--admin".into(), o.to_string()]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("UNHEALTHY") && out.contains("billing"),
        "{out}"
    );

    let (ok, out, err) = seam_cli(vec!["sessions".into(), "--admin".into(), o.to_string()]).await;
    assert!(ok, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("ID") && rows[1].contains("billing") && rows[1].contains("client"),
        "{out}"
    );

    // Nothing listens on the port of a closed listener.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (ok, _, err) = seam_cli(vec!["status".into(), "--admin".into(), closed.to_string()]).await;
    assert!(!ok);
    assert!(
        err.contains("cannot reach the admin port") && err.contains("--admin"),
        "{err}"
    );
    let (ok, _, _) = seam_cli(vec![
        "sessions".into(),
        "--admin".into(),
        closed.to_string(),
    ])
    .await;
    assert!(!ok);
}
