//! Admin probe latency (DESIGN §5: "probes answer in well under a millisecond"). Run
//! with `cargo bench --bench admin`.
//!
//! Each iteration is one whole HTTP/1.1 request over a kept-alive loopback connection
//! to a running seam's admin port (client, kernel and server included), with 20
//! sessions in the server cache and a finished background upstream probe, so `/health`
//! evaluates every check. `/stats` and `/metrics` are listed for comparison; they are
//! scrapes, not probes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use seam::Sidecar;
use seam::config::{
    AdminConfig, Config, InteropConfig, LimitsConfig, ListenConfig, RateLimitConfig, RuntimeConfig,
    SessionConfig, TimeoutConfig, TlsConfig, UpstreamConfig, UpstreamProtocol,
};
use seam::handshake::{ClientHandshake, respond};
use seam::identity::{DevCa, Identity};
use seam::session::{Role, Session, SessionLimits};

fn config(upstream: SocketAddr) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    Config {
        service: "billing".into(),
        trust_domain: "mesh.local".into(),
        listen: ListenConfig {
            outbound: any,
            inbound: any,
            admin: any,
            pinned: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: format!("http://{upstream}").parse().expect("url"),
            protocol: UpstreamProtocol::Http1,
        },
        tls: TlsConfig {
            ca: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
        },
        session: SessionConfig::default(),
        rate_limit: RateLimitConfig::default(),
        peers: BTreeMap::from([("orders".to_owned(), vec![any])]),
        timeouts: TimeoutConfig::default(),
        runtime: RuntimeConfig::default(),
        admin: AdminConfig::default(),
        limits: LimitsConfig::default(),
        interop: InteropConfig::default(),
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (seam, _upstream) = rt.block_on(async {
        // Something to accept the probe's connections, so /health is all green.
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ca = DevCa::new("mesh.local").expect("ca");
        let now = SystemTime::now();
        let cert = ca
            .issue("billing", now, now + Duration::from_secs(365 * 86400))
            .expect("cert");
        let identity = Identity::from_pem(
            &ca.ca_pem(),
            &cert.cert_pem,
            &cert.key_pem,
            "mesh.local",
            "billing",
        )
        .expect("identity");
        let seam = Sidecar::start(config(upstream.local_addr().expect("addr")), identity)
            .await
            .expect("start");
        let limits = SessionLimits {
            idle_ttl: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
            max_messages: 1000,
        };
        for _ in 0..20 {
            let (c, hello) =
                ClientHandshake::start("spiffe://mesh.local/orders", "spiffe://mesh.local/billing")
                    .expect("start");
            let (reply, keys) = respond(
                &hello,
                "spiffe://mesh.local/orders",
                "spiffe://mesh.local/billing",
            )
            .expect("respond");
            c.finish(&reply).expect("finish");
            let s = std::sync::Arc::new(
                Session::new(keys, Role::Server, "orders", limits).expect("session"),
            );
            seam.server_sessions().insert(s.id(), s).await;
        }
        (seam, upstream)
    });
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let admin = seam.admin_addr();
    let mut group = c.benchmark_group("admin");
    for path in ["/live", "/ready", "/health", "/stats", "/metrics"] {
        let uri: http::Uri = format!("http://{admin}{path}").parse().expect("uri");
        group.bench_function(path.trim_start_matches('/'), |b| {
            b.to_async(&rt).iter(|| async {
                let resp = client.get(uri.clone()).await.expect("admin answers");
                assert!(resp.status().is_success(), "{path}: {}", resp.status());
                resp.into_body().collect().await.expect("body").to_bytes()
            });
        });
    }
    group.finish();
    rt.block_on(seam.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
