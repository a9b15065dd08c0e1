//! The embedded demo: the `seam demo` binary end to end, and the library function that
//! backs it, in process.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use seam::demo::{self, DemoOptions};

/// Far above what the demo needs (well under a second on a loaded laptop); a bound so a
/// hung mesh fails the test instead of hanging CI.
const BINARY_DEADLINE: Duration = Duration::from_secs(60);

/// Waits for `child` until `deadline`, polling; kills it when the deadline passes.
fn wait_bounded(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Reads a child's pipe on its own thread, so a full pipe can never block the child.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

#[test]
fn seam_demo_with_requests_reports_and_exits_zero() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_seam"))
        .args(["demo", "--requests", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn seam demo");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_bounded(&mut child, BINARY_DEADLINE);
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    let status = status.unwrap_or_else(|| {
        panic!("seam demo did not exit within {BINARY_DEADLINE:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    assert!(
        status.success(),
        "seam demo exited with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "20 sent, 20 ok, 0 failed",
        "p50 ",
        "p99 ",
        " ms",
        "seam-caller: orders",
        "1 handshakes ok",
        "billing app served 20 requests",
    ] {
        assert!(
            stdout.contains(expected),
            "report lacks {expected:?}:\n{stdout}"
        );
    }
    let admin_stats = stdout
        .split_whitespace()
        .filter(|w| w.starts_with("http://127.0.0.1:") && w.ends_with("/stats"))
        .count();
    assert_eq!(admin_stats, 2, "one admin /stats URL per seam:\n{stdout}");
    // With --requests the demo exits instead of serving, so no curl hints.
    assert!(!stdout.contains("until Ctrl-C"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_run_measures_what_happened() {
    let n = 25;
    let report = demo::run(&DemoOptions { requests: n })
        .await
        .expect("demo mesh starts");
    assert_eq!(report.sent, n);
    assert_eq!(report.ok, n, "first failure: {:?}", report.first_failure);
    assert_eq!(report.failed, 0);
    assert_eq!(report.first_failure, None);
    assert_eq!(report.caller_seen(), Some("orders"));
    assert_eq!(report.callers_seen.get("orders"), Some(&n));
    assert_eq!(report.billing_app_served, n as u64);
    // One session for all requests: one handshake on each side, nothing failed.
    assert_eq!(report.orders_sessions.handshakes_ok, 1);
    assert_eq!(report.orders_sessions.handshakes_failed, 0);
    assert_eq!(report.orders_sessions.created, 1);
    assert_eq!(report.orders_sessions_active, 1);
    assert_eq!(report.billing_sessions.handshakes_ok, 1);
    assert_eq!(report.billing_sessions.created, 1);
    let (p50, p99, max) = (
        report.p50.expect("p50"),
        report.p99.expect("p99"),
        report.max.expect("max"),
    );
    assert!(p50 <= p99 && p99 <= max, "{p50:?} {p99:?} {max:?}");
    assert!(max <= report.elapsed);
    // Every listener is loopback with an OS-chosen port.
    let a = report.addrs;
    for addr in [
        a.orders_outbound,
        a.orders_admin,
        a.orders_app,
        a.billing_inbound,
        a.billing_admin,
        a.billing_app,
    ] {
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    }
    let text = report.to_string();
    assert!(text.contains("seam-caller: orders"), "{text}");
    assert!(
        text.contains(&format!("http://{}/stats", a.billing_admin)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mesh_serves_between_batches_and_admin_agrees() {
    let mesh = demo::DemoMesh::start().await.expect("demo mesh starts");
    let first = mesh.exercise(5).await;
    let second = mesh.exercise(5).await;
    assert_eq!((first.ok, second.ok), (5, 5), "{second}");
    // The session outlives the first batch's connections: still one handshake.
    assert_eq!(second.orders_sessions.handshakes_ok, 1);
    assert_eq!(second.billing_app_served, 10);
    let admin = second.addrs.orders_admin;
    let stats = http_get(admin, "/stats").await;
    let json: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert_eq!(json["service"], "orders");
    assert_eq!(json["requests"]["outbound"]["2xx"], 10);
    assert_eq!(json["handshakes"]["ok"], 1);
    assert!(mesh.shutdown().await, "demo mesh drained in time");
}

/// A minimal HTTP/1.0-style GET, enough for the admin port.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
