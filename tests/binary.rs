//! The built binary with YAML files and signals: `seam run` exits 0 on SIGTERM only
//! after the download in flight has completed; bad config files exit 2.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

const SEAM: &str = env!("CARGO_BIN_EXE_seam");

/// A `seam run` child whose JSON log lines are read on a thread.
struct SeamProcess {
    pid: u32,
    /// Taken by `wait_exit`; still here means the test failed before exit.
    child: Option<Child>,
    lines: std_mpsc::Receiver<serde_json::Value>,
}

impl SeamProcess {
    fn start(config: &Path) -> SeamProcess {
        let mut child = Command::new(SEAM)
            .args(["run", "--log-format", "json", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                } else {
                    eprintln!("non-JSON log line: {line}");
                }
            }
        });
        SeamProcess {
            pid: child.id(),
            child: Some(child),
            lines,
        }
    }

    /// Waits for the log event named `event` (bounded), returning its line.
    fn wait_event(&self, event: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == event => return v,
                Ok(_) => continue,
                Err(e) => panic!("no {event} event from seam: {e}"),
            }
        }
    }

    fn addr(ready: &serde_json::Value, field: &str) -> SocketAddr {
        ready[field].as_str().unwrap().parse().unwrap()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit and returns its code.
    fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("waited once");
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait().map(|s| s.code()));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(status) => status.unwrap(),
            Err(_) => {
                self.signal("KILL");
                panic!("seam did not exit within 30 s");
            }
        }
    }
}

impl Drop for SeamProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn certs(dir: &Path) {
    let status = Command::new(SEAM)
        .args([
            "certs",
            "init",
            "--trust-domain",
            "mesh.local",
            "--service",
            "orders",
            "--service",
            "billing",
            "--dir",
        ])
        .arg(dir.join("certs"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn write_config(dir: &Path, service: &str, upstream: &str, peers: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{service}.yaml"));
    std::fs::write(
        &path,
        format!(
            "service: {service}
trust_domain: mesh.local
listen: {{ outbound: 127.0.0.1:0, inbound: 127.0.0.1:0, admin: 127.0.0.1:0 }}
upstream: {upstream}
tls: {{ ca: certs/ca.crt, cert: certs/{service}/tls.crt, key: certs/{service}/tls.key }}
peers: {peers}
timeouts: {{ connect: 1s, request: 30s, drain: 20s }}
runtime: {{ worker_threads: 1 }}
"
        ),
    )
    .unwrap();
    path
}

async fn admin_ready(admin: SocketAddr) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<TestBody>();
    let resp = client
        .request(
            http::Request::get(format!("http://{admin}/ready"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_long_download_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let app = App::start().await;
    let billing = SeamProcess::start(&write_config(dir.path(), "billing", &app.url(), "{}"));
    let billing_ready = billing.wait_event("ready");
    let billing_inbound = SeamProcess::addr(&billing_ready, "inbound");
    let mut orders = SeamProcess::start(&write_config(
        dir.path(),
        "orders",
        "http://127.0.0.1:9",
        &format!("{{ billing: [{billing_inbound}] }}"),
    ));
    let ready = orders.wait_event("ready");
    let outbound = SeamProcess::addr(&ready, "outbound");
    let admin = SeamProcess::addr(&ready, "admin");
    assert_eq!(admin_ready(admin).await, 200);

    // Start a download whose body the test feeds; get the first chunk through.
    let client = client_via(outbound, false);
    let pending = tokio::spawn(async move {
        client
            .request(
                http::Request::get("http://billing/stream")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap()
    });
    let feed = app.next_stream().await;
    let chunk = Bytes::from(pattern(64 * 1024));
    feed.send(chunk.clone()).await.unwrap();
    let mut resp = pending.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut received = resp
        .body_mut()
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .len();

    // SIGTERM while the download is open: seam stops being ready but keeps serving it.
    orders.signal("TERM");
    orders.wait_event("draining");
    assert_eq!(admin_ready(admin).await, 503);
    const MORE: usize = 256; // 16 MiB more
    let feeder = tokio::spawn(async move {
        for _ in 0..MORE {
            feed.send(chunk.clone()).await.unwrap();
        }
    });
    while let Some(frame) = resp.body_mut().frame().await {
        received += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    feeder.await.unwrap();
    assert_eq!(received, (MORE + 1) * 64 * 1024);
    let stopped = orders.wait_event("stopped");
    assert_eq!(stopped["message"], "all requests finished; stopped");
    assert_eq!(orders.wait_exit(), Some(0));
}

#[test]
fn run_with_a_bad_config_exits_2_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "service: orders\ntrust_domain: mesh.local\nupstream: http://127.0.0.1:8080\ntls: no\n",
    )
    .unwrap();
    let out = Command::new(SEAM)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:4:"), "{err}");
    assert!(err.contains("cannot be turned off"), "{err}");
}

#[test]
fn run_with_missing_certificates_fails_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "orders", "http://127.0.0.1:8080", "{}");
    let out = Command::new(SEAM)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seam certs init"), "{err}");
}
