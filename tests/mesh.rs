//! app -> seam -> seam -> app over real sockets and real mutual TLS, in-process seams
//! on port 0.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use seam::config::UpstreamProtocol;
use seam::proxy::Failure;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

async fn sha_through(mesh: &Mesh, h2: bool, data: Vec<u8>) -> String {
    let client = if h2 { mesh.h2c() } else { mesh.h1() };
    let resp = client
        .request(mesh.to_billing("POST", "/sha256", body(data)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, b) = read_all(resp).await;
    String::from_utf8(b.to_vec()).unwrap()
}

#[tokio::test]
async fn bodies_cross_byte_exact_over_http1_and_h2c() {
    let mesh = Mesh::start().await;
    for h2 in [false, true] {
        for size in [0usize, 1024, 10 * 1024 * 1024] {
            let data = pattern(size);
            let expected = format!("{size} {}", sha256_hex(&data));
            assert_eq!(
                sha_through(&mesh, h2, data).await,
                expected,
                "h2={h2} size={size}"
            );
        }
    }
}

#[tokio::test]
async fn downloads_cross_byte_exact_over_http1_and_h2c() {
    let mesh = Mesh::start().await;
    for h2 in [false, true] {
        for size in [0usize, 1024, 10 * 1024 * 1024] {
            let client = if h2 { mesh.h2c() } else { mesh.h1() };
            let resp = client
                .request(mesh.to_billing("GET", &format!("/bytes/{size}"), empty()))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-length"], size.to_string());
            let (_, b) = read_all(resp).await;
            assert_eq!(
                sha256_hex(&b),
                sha256_hex(&pattern(size)),
                "h2={h2} size={size}"
            );
        }
    }
}

/// More large replies at once over the one mesh connection than its window holds a
/// frame each of. When every reply's next frame waited for room for the whole frame,
/// this stalled the connection for good.
#[tokio::test]
async fn more_large_replies_at_once_than_the_mesh_window_holds_frames_for() {
    const REPLIES: usize = 320;
    const SIZE: usize = 1024 * 1024;
    let mesh = Mesh::start_with(
        |o| o.limits.max_streams = 1024,
        |b| {
            b.limits.max_streams = 1024;
            // Hundreds of app connections opening at once in a debug build.
            b.timeouts.connect = Duration::from_secs(30);
        },
    )
    .await;
    let client = mesh.h2c();
    let mut replies = tokio::task::JoinSet::new();
    for _ in 0..REPLIES {
        let request = client.request(mesh.to_billing("GET", &format!("/bytes/{SIZE}"), empty()));
        replies.spawn(async move {
            let resp = request.await.unwrap();
            let (parts, body) = read_all(resp).await;
            assert_eq!(parts.status, 200, "{parts:?} {body:?}");
            body.len()
        });
    }
    // A stall never ends by itself; bound the wait so it fails instead of hanging CI.
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut done = 0;
        while let Some(len) = replies.join_next().await {
            assert_eq!(len.unwrap(), SIZE);
            done += 1;
        }
        done
    })
    .await
    .expect("the mesh connection stalled");
    assert_eq!(all, REPLIES);
}

/// Downloads whose clients stop reading hold only their own streams' windows of the
/// mesh connection (`h2_tuning`: the connection's window is four streams' windows), so
/// a download beside three of them on the same mesh connection still completes.
#[tokio::test]
async fn downloads_whose_clients_stop_reading_stall_only_themselves() {
    const STALLED: usize = 3;
    const STALLED_SIZE: usize = 8 * 1024 * 1024;
    const SIZE: usize = 2 * 1024 * 1024;
    let mesh = Mesh::start().await;
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        // A client of its own with a small window, so it takes little before it stops,
        // and so that its own connection's window does not hold up the others.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .http2_initial_stream_window_size(64 * 1024)
                .http2_initial_connection_window_size(64 * 1024)
                .build(pinned_connector(mesh.orders.outbound_addr()));
        let req = mesh.to_billing("GET", &format!("/bytes/{STALLED_SIZE}"), empty());
        let mut resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // One chunk read, then never again: the reply is under way and stays so.
        let first = resp.body_mut().frame().await.unwrap().unwrap();
        assert!(first.is_data());
        stalled.push((client, resp));
    }
    let download = async {
        let resp = mesh
            .h2c()
            .request(mesh.to_billing("GET", &format!("/bytes/{SIZE}"), empty()))
            .await
            .unwrap();
        let (parts, body) = read_all(resp).await;
        assert_eq!(parts.status, 200);
        body
    };
    // A stall never ends by itself; bound the wait so it fails instead of hanging CI.
    let body = tokio::time::timeout(Duration::from_secs(60), download)
        .await
        .expect("a download stalled behind replies whose clients stopped reading");
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SIZE)));
    drop(stalled);
}

#[tokio::test]
async fn streamed_upload_and_download_with_unknown_length() {
    let mesh = Mesh::start().await;
    // Upload: chunks fed one at a time, no content-length, never all in memory here.
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    const CHUNKS: u64 = 256;
    const CHUNK: u64 = 64 * 1024;
    let feeder = tokio::spawn(async move {
        let mut h = sha2::Sha256::default();
        for c in 0..CHUNKS {
            let chunk: Vec<u8> = (c * CHUNK..(c + 1) * CHUNK).map(pattern_byte).collect();
            sha2::Digest::update(&mut h, &chunk);
            tx.send(Bytes::from(chunk)).await.unwrap();
        }
        hex(&sha2::Digest::finalize(h))
    });
    let resp = mesh
        .h2c()
        .request(mesh.to_billing("POST", "/sha256", ChannelBody(rx).boxed()))
        .await
        .unwrap();
    let (_, b) = read_all(resp).await;
    let expected = format!("{} {}", CHUNKS * CHUNK, feeder.await.unwrap());
    assert_eq!(String::from_utf8_lossy(&b), expected);

    // Download: the app sends chunks only as the test feeds them; each arrives at the
    // caller before the next is produced, so the stream really streams.
    let client = mesh.h1();
    let req = mesh.to_billing("GET", "/stream", empty());
    let pending = tokio::spawn(async move { client.request(req).await.unwrap() });
    let feed = mesh.app.next_stream().await;
    feed.send(Bytes::from_static(b"first")).await.unwrap();
    let mut resp = pending.await.unwrap();
    let first = resp
        .body_mut()
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first");
    feed.send(Bytes::from_static(b"second")).await.unwrap();
    let second = resp
        .body_mut()
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&second[..], b"second");
    drop(feed);
    assert!(resp.body_mut().frame().await.is_none());
}

#[tokio::test]
async fn status_headers_and_caller_identity_are_preserved() {
    let mesh = Mesh::start().await;
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/status/418", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.headers()["x-custom"], "kept");
    assert!(resp.headers().get("seam-error").is_none());

    let mut req = mesh.to_billing("GET", "/headers?q=1", empty());
    let h = req.headers_mut();
    h.insert("x-trace", "abc".parse().unwrap());
    // An app must not be able to claim an identity, nor pass hop-by-hop headers.
    h.insert("seam-caller", "admin".parse().unwrap());
    h.insert("connection", "x-secret".parse().unwrap());
    h.insert("x-secret", "hop".parse().unwrap());
    h.insert("upgrade", "h2c".parse().unwrap());
    let resp = mesh.h1().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app"], "billing");
    let (_, b) = read_all(resp).await;
    let seen: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(seen["path"], "/headers?q=1");
    assert_eq!(
        seen["headers"]["seam-caller"],
        serde_json::json!(["orders"])
    );
    assert_eq!(seen["headers"]["x-trace"], serde_json::json!(["abc"]));
    assert_eq!(seen["headers"]["host"], serde_json::json!(["billing"]));
    for gone in ["x-secret", "upgrade", "connection", "seam-session"] {
        assert!(seen["headers"].get(gone).is_none(), "{gone} leaked: {seen}");
    }
}

#[tokio::test]
async fn absolute_form_requests_route_like_http_proxy_clients() {
    let mesh = Mesh::start().await;
    // What curl sends with HTTP_PROXY set: absolute-form URI to the proxy.
    let text = raw_exchange_to_close(
        mesh.orders.outbound_addr(),
        b"GET http://billing/headers HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"seam-caller\":[\"orders\"]"), "{text}");
}

#[tokio::test]
async fn trailers_pass_through_for_http1_and_h2c_upstreams() {
    for upstream in [UpstreamProtocol::Http1, UpstreamProtocol::H2c] {
        let mesh = Mesh::start_with(|_| {}, |b| b.upstream.protocol = upstream).await;
        let mut req = mesh.to_billing("GET", "/trailers", empty());
        // gRPC clients announce that they accept trailers; HTTP/1.1 apps only send
        // trailers to callers that did.
        req.headers_mut().insert("te", "trailers".parse().unwrap());
        let mut resp = mesh.h2c().request(req).await.unwrap();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert_eq!(data, b"with trailers", "{upstream:?}");
        let trailers = trailers.unwrap_or_else(|| panic!("no trailers via {upstream:?}"));
        assert_eq!(trailers["x-checksum"], "abc123");
        assert_eq!(trailers["grpc-status"], "0");
    }
}

/// A TCP relay that records every byte crossing between the two seams.
async fn tap(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(target).await.unwrap();
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(pipe(ir, ow, record.clone()));
            tokio::spawn(pipe(or, iw, record.clone()));
        }
    });
    (addr, seen)
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16384];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn the_link_between_seams_never_carries_plaintext() {
    let ca = seam::identity::DevCa::new(TRUST_DOMAIN).unwrap();
    let app = App::start().await;
    let billing = seam::Sidecar::start(
        config("billing", &app.url(), Default::default()),
        identity(&ca, "billing"),
    )
    .await
    .unwrap();
    let (tap_addr, seen) = tap(billing.inbound_addr()).await;
    let orders = seam::Sidecar::start(
        config(
            "orders",
            "http://127.0.0.1:9",
            peers("billing", &[tap_addr]),
        ),
        identity(&ca, "orders"),
    )
    .await
    .unwrap();
    let marker = "PLAINTEXT-MARKER-7f3a9c";
    let client = client_via(orders.outbound_addr(), false);
    for path in ["/sha256", "/echo"] {
        let req = http::Request::post(format!("http://billing{path}?{marker}"))
            .header("x-marker", marker)
            .body(body(format!("{marker} in the body {marker}")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (_, b) = read_all(resp).await;
        if path == "/echo" {
            assert!(
                String::from_utf8_lossy(&b).contains(marker),
                "echo came back"
            );
        }
    }
    let captured = seen.lock().unwrap().clone();
    assert!(
        captured.len() > 1000,
        "the tap saw the traffic ({} bytes)",
        captured.len()
    );
    assert!(
        !captured
            .windows(marker.len())
            .any(|w| w == marker.as_bytes()),
        "plaintext marker visible on the inter-seam link"
    );
}

/// Sends 100 h2c requests for `path` at once and expects `status` from each.
async fn assert_all_concurrent(mesh: &Mesh, path: &str, status: u16) {
    let h2 = mesh.h2c();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let req = mesh.to_billing("GET", path, empty());
        let h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            h2.request(req).await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), status);
    }
}

#[tokio::test]
async fn one_handshake_for_many_sequential_and_concurrent_requests() {
    let mesh = Mesh::start().await;
    let client = mesh.h1();
    for _ in 0..1000 {
        let resp = client
            .request(mesh.to_billing("GET", "/status/200", empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        read_all(resp).await;
    }
    assert_all_concurrent(&mesh, "/status/204", 204).await;
    assert_eq!(
        mesh.orders
            .client_sessions()
            .stats()
            .snapshot()
            .handshakes_ok,
        1
    );
    assert_eq!(
        mesh.billing
            .server_sessions()
            .stats()
            .snapshot()
            .handshakes_ok,
        1
    );
}

#[tokio::test]
async fn concurrent_first_requests_coalesce_into_one_handshake() {
    let mesh = Mesh::start().await;
    assert_all_concurrent(&mesh, "/status/200", 200).await;
    assert_eq!(
        mesh.orders
            .client_sessions()
            .stats()
            .snapshot()
            .handshakes_ok,
        1
    );
}

#[tokio::test]
async fn restart_of_the_receiving_seam_is_invisible_to_the_app() {
    let mut mesh = Mesh::start().await;
    let client = mesh.h1();
    for round in 0..3 {
        for _ in 0..20 {
            let resp = client
                .request(mesh.to_billing("POST", "/sha256", body("small request")))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "round {round}");
            read_all(resp).await;
        }
        mesh.restart_billing().await;
    }
    let resp = client
        .request(mesh.to_billing("GET", "/status/200", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mesh.orders.stats().retries(), 3, "one resend per restart");
    assert_eq!(
        mesh.orders
            .client_sessions()
            .stats()
            .snapshot()
            .handshakes_ok,
        4
    );
}

async fn expect_failure(
    resp: http::Response<hyper::body::Incoming>,
    failure: Failure,
    words: &str,
) {
    assert_eq!(resp.status(), failure.status());
    assert_eq!(resp.headers()["seam-error"], failure.code());
    let (_, b) = read_all(resp).await;
    let text = String::from_utf8_lossy(&b);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(text.contains(words), "{text:?} should mention {words:?}");
}

#[tokio::test]
async fn unknown_service_is_404_from_seam() {
    let mesh = Mesh::start().await;
    let req = http::Request::get("http://inventory:8080/")
        .body(empty())
        .unwrap();
    let resp = mesh.h1().request(req).await.unwrap();
    expect_failure(resp, Failure::UnknownService, "inventory").await;
    assert_eq!(mesh.orders.stats().failures(Failure::UnknownService), 1);
}

#[tokio::test]
async fn unreachable_peer_is_502_within_the_connect_timeout() {
    let ca = seam::identity::DevCa::new(TRUST_DOMAIN).unwrap();
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let orders = seam::Sidecar::start(
        config("orders", "http://127.0.0.1:9", peers("billing", &[closed])),
        identity(&ca, "orders"),
    )
    .await
    .unwrap();
    let client = client_via(orders.outbound_addr(), false);
    let req = http::Request::get("http://billing/").body(empty()).unwrap();
    let resp = client.request(req).await.unwrap();
    expect_failure(resp, Failure::PeerUnreachable, "billing").await;
    assert_eq!(orders.stats().failures(Failure::PeerUnreachable), 1);
}

#[tokio::test]
async fn failed_endpoint_is_skipped_for_a_live_one() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = Mesh::start().await;
    let ca = &mesh.ca;
    let orders = seam::Sidecar::start(
        config(
            "orders",
            "http://127.0.0.1:9",
            peers("billing", &[closed, mesh.billing.inbound_addr()]),
        ),
        identity(ca, "orders"),
    )
    .await
    .unwrap();
    let client = client_via(orders.outbound_addr(), false);
    for _ in 0..10 {
        let req = http::Request::get("http://billing/status/200")
            .body(empty())
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn app_down_is_502_and_slow_app_is_504() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mesh = Mesh::start_with(
        |_| {},
        |b| {
            b.timeouts.request = Duration::from_millis(500);
        },
    )
    .await;
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/hold", empty()))
        .await
        .unwrap();
    expect_failure(resp, Failure::Timeout, "did not answer").await;
    mesh.app.release.notify_waiters();

    let down = Mesh::start_with(
        |_| {},
        |b| b.upstream.url = format!("http://{closed}").parse().unwrap(),
    )
    .await;
    let resp = down
        .h1()
        .request(down.to_billing("GET", "/", empty()))
        .await
        .unwrap();
    expect_failure(resp, Failure::UpstreamUnavailable, "upstream").await;
    assert_eq!(
        down.billing.stats().failures(Failure::UpstreamUnavailable),
        1
    );
}

#[tokio::test]
async fn request_timeout_on_the_calling_side_is_504() {
    let mesh = Mesh::start_with(|o| o.timeouts.request = Duration::from_millis(300), |_| {}).await;
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/hold", empty()))
        .await
        .unwrap();
    expect_failure(resp, Failure::Timeout, "no response").await;
    assert_eq!(mesh.orders.stats().failures(Failure::Timeout), 1);
    mesh.app.release.notify_waiters();
}

#[tokio::test]
async fn request_without_a_target_is_400() {
    let mesh = Mesh::start().await;
    let text = raw_exchange_to_close(mesh.orders.outbound_addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 400"), "{text}");
    assert!(text.contains("seam-error: no-target"), "{text}");
}

#[tokio::test]
async fn inbound_port_refuses_plain_requests_and_garbage() {
    let mesh = Mesh::start().await;
    // Not TLS at all: the connection is closed without an HTTP answer.
    let text = raw_exchange_to_close(
        mesh.billing.inbound_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(!text.contains("HTTP/1.1 200"), "{text}");
    // The mesh still works afterwards.
    let resp = mesh
        .h1()
        .request(mesh.to_billing("GET", "/status/200", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_streamed_body_that_cannot_be_resent_fails_with_a_clear_502() {
    let mut mesh = Mesh::start().await;
    let client = mesh.h1();
    let resp = client
        .request(mesh.to_billing("GET", "/status/200", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    mesh.restart_billing().await;
    // No length and not finished: seam streams it and cannot send it a second time.
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tx.send(Bytes::from_static(b"part one")).await.unwrap();
    let pending = tokio::spawn({
        let req = mesh.to_billing("POST", "/sha256", ChannelBody(rx).boxed());
        let client = client.clone();
        async move { client.request(req).await.unwrap() }
    });
    let resp = pending.await.unwrap();
    drop(tx);
    expect_failure(resp, Failure::SessionLost, "cannot be sent again").await;
    // The next request makes a new session and succeeds.
    let resp = client
        .request(mesh.to_billing("POST", "/sha256", body("again")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn session_byte_counters_move_on_both_sides_in_both_directions() {
    let mesh = Mesh::start().await;
    let upload = pattern(100_000);
    let resp = mesh
        .h1()
        .request(mesh.to_billing("POST", "/echo", body(upload.clone())))
        .await
        .unwrap();
    let (_, echoed) = read_all(resp).await;
    assert_eq!(echoed.len(), upload.len());
    let client = mesh.orders.client_sessions().sessions()[0].info();
    let server = mesh.billing.server_sessions().sessions()[0].info();
    // Payload bytes: the body each way (heads and trailers add a little on top).
    assert!(
        client.bytes_out >= 100_000 && client.bytes_in >= 100_000,
        "{client:?}"
    );
    assert!(
        server.bytes_in >= 100_000 && server.bytes_out >= 100_000,
        "{server:?}"
    );
    assert_eq!(client.requests, 1);
    assert_eq!(server.requests, 1);
}
