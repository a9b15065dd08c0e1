//! Working with what is not a seam: Kubernetes-style SPIFFE identities, plain mTLS
//! callers on the inbound port (`interop.plain_mtls`), and outbound ports pinned to one
//! service for clients that cannot set Host (`listen.pinned`). Real sockets, real TLS.

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use seam::Sidecar;
use seam::config::PinnedRoute;
use support::*;

/// One plain HTTP/2 GET over mutual TLS to `seam`'s inbound port, presenting a mesh
/// certificate for `caller`, as another mesh's proxy would: status, seam-error, body.
async fn plain_mtls_get(
    mesh: &Mesh,
    caller: &str,
    path: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let (mut sender, _conn) = mtls_h2_to_billing::<Empty<Bytes>>(mesh, caller).await;
    let req = Request::get(format!("https://billing{path}"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let error = resp
        .headers()
        .get("seam-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, error, json)
}

#[tokio::test]
async fn plain_mtls_callers_are_refused_unless_interop_allows_them() {
    let mesh = Mesh::start().await;
    let (status, error, _) = plain_mtls_get(&mesh, "reports", "/headers").await;
    assert_eq!(status, 400);
    assert_eq!(error.as_deref(), Some("bad-request"));
}

#[tokio::test]
async fn plain_mtls_caller_reaches_the_app_with_its_identity() {
    let mesh = Mesh::start_with(|_| {}, |b| b.interop.plain_mtls = true).await;
    // A Kubernetes-style identity, spiffe://mesh.local/ns/batch/sa/reports.
    let (status, error, json) = plain_mtls_get(&mesh, "reports.batch", "/headers?x=1").await;
    assert_eq!((status, error), (200, None));
    assert_eq!(json["path"], "/headers?x=1");
    assert_eq!(json["headers"]["seam-caller"][0], "reports.batch");
    // seam's own endpoints are never handed to the app, whatever the setting.
    let (status, error, _) = plain_mtls_get(&mesh, "reports", "/_seam/v1/other").await;
    assert_eq!((status, error.as_deref()), (400, Some("bad-request")));
}

#[tokio::test]
async fn plain_mtls_callers_are_rate_limited_like_seams() {
    let mesh = Mesh::start_with(
        |_| {},
        |b| {
            b.interop.plain_mtls = true;
            b.rate_limit.services.insert(
                "reports".into(),
                seam::config::Quota::Limited {
                    per_second: std::num::NonZeroU32::MIN,
                    burst: std::num::NonZeroU32::MIN,
                },
            );
        },
    )
    .await;
    assert_eq!(plain_mtls_get(&mesh, "reports", "/headers").await.0, 200);
    let (status, error, _) = plain_mtls_get(&mesh, "reports", "/headers").await;
    assert_eq!((status, error.as_deref()), (429, Some("rate-limited")));
}

#[tokio::test]
async fn a_pinned_port_sends_everything_to_its_service_whatever_the_host() {
    let mesh = Mesh::start_with(
        |o| {
            o.listen.pinned.push(PinnedRoute {
                listen: "127.0.0.1:0".parse().unwrap(),
                service: "billing".into(),
            })
        },
        |_| {},
    )
    .await;
    let pinned = mesh.orders.pinned_addrs()[0];
    for h2 in [false, true] {
        let req = Request::get(format!("http://{pinned}/headers"))
            .body(empty())
            .unwrap();
        let (parts, body) = read_all(client_via(pinned, h2).request(req).await.unwrap()).await;
        assert_eq!(parts.status, 200, "h2={h2}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["headers"]["seam-caller"][0], "orders");
    }
    // The ordinary outbound port still routes by Host.
    let resp = mesh
        .h1()
        .request(
            Request::get(format!("http://{pinned}/headers"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn two_seams_with_kubernetes_style_identities_carry_traffic() {
    let ca = seam::identity::DevCa::new(TRUST_DOMAIN).unwrap();
    let app = App::start().await;
    let b = Sidecar::start(
        config("b.bench", &app.url(), BTreeMap::new()),
        identity(&ca, "b.bench"),
    )
    .await
    .unwrap();
    let a = Sidecar::start(
        config(
            "a.bench",
            "http://127.0.0.1:9",
            peers("b.bench", &[b.inbound_addr()]),
        ),
        identity(&ca, "a.bench"),
    )
    .await
    .unwrap();
    let req = Request::get("http://b.bench/headers")
        .body(empty())
        .unwrap();
    let (parts, body) = read_all(
        client_via(a.outbound_addr(), false)
            .request(req)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["headers"]["seam-caller"][0], "a.bench");
    // A GET arrives without a body: no chunked framing was invented on the way.
    assert!(json["headers"].get("transfer-encoding").is_none(), "{json}");
    assert!(json["headers"].get("content-length").is_none(), "{json}");
}

#[tokio::test]
async fn a_plain_request_the_app_cannot_answer_is_a_502_counted_once() {
    let mesh = Mesh::start_with(|_| {}, |b| b.interop.plain_mtls = true).await;
    mesh.app.stop();
    let (status, error, _) = plain_mtls_get(&mesh, "reports", "/headers").await;
    assert_eq!(
        (status, error.as_deref()),
        (502, Some("upstream-unavailable"))
    );
    let inbound = mesh
        .billing
        .stats()
        .requests(seam::admin::stats::Direction::Inbound);
    assert_eq!((inbound.total, inbound.c5xx), (1, 1));
}
