//! Caller isolation (issue 4): the in-quota caller's latency with and without another
//! caller flooding the same seam at well over its quota. Prints a table; run with
//! `cargo bench --bench isolation`. Not a timed test: the machine is shared, so read
//! the ratio of the two phases measured in the same run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use seam::Sidecar;
use seam::config::Quota;
use support::*;

const QUOTA: u32 = 200;
/// The in-quota caller sends at half its quota.
const PACE: Duration = Duration::from_millis(10);
const SAMPLES: usize = 400;
const FLOODERS: usize = 8;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Paced requests from orders; returns latencies and how many were refused.
async fn measure(mesh: &Mesh) -> (Vec<Duration>, u64) {
    let client = mesh.h1();
    let mut ticks = tokio::time::interval(PACE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut latencies = Vec::with_capacity(SAMPLES);
    let mut refused = 0;
    for _ in 0..SAMPLES {
        ticks.tick().await;
        let started = Instant::now();
        let resp = client
            .request(mesh.to_billing("GET", "/status/200", empty()))
            .await
            .expect("orders request");
        let status = resp.status();
        read_all(resp).await;
        latencies.push(started.elapsed());
        if status == 429 {
            refused += 1;
        }
    }
    latencies.sort();
    (latencies, refused)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let quota = Quota::Limited {
            per_second: NonZeroU32::new(QUOTA).expect("non-zero"),
            burst: NonZeroU32::new(QUOTA).expect("non-zero"),
        };
        let mesh = Mesh::start_with(|_| {}, |b| b.rate_limit.default = quota).await;
        let reports = Sidecar::start(
            config("reports", "http://127.0.0.1:9", peers("billing", &[mesh.billing.inbound_addr()])),
            identity(&mesh.ca, "reports"),
        )
        .await
        .expect("reports seam");
        // Warm both sessions.
        let _ = measure_once(&mesh, &reports).await;

        let (quiet, quiet_refused) = measure(&mesh).await;

        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let mut flood = Vec::new();
        for _ in 0..FLOODERS {
            let client = client_via(reports.outbound_addr(), false);
            let (stop, sent, refused) = (stop.clone(), sent.clone(), refused.clone());
            flood.push(tokio::spawn(async move {
                // Bounded: stops when the measurement ends, or after 200k requests.
                while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 200_000 {
                    let req = http::Request::get("http://billing/status/200").body(empty()).expect("request");
                    if let Ok(resp) = client.request(req).await {
                        if resp.status() == 429 {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        read_all(resp).await;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let flood_started = Instant::now();
        let (loaded, loaded_refused) = measure(&mesh).await;
        stop.store(true, Ordering::Relaxed);
        for f in flood {
            let _ = f.await;
        }
        let flood_secs = flood_started.elapsed().as_secs_f64();
        let offered = sent.load(Ordering::Relaxed) as f64 / flood_secs;

        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("caller isolation: quota {QUOTA}/s per caller (burst {QUOTA}); orders paced at {}/s, {SAMPLES} requests per phase", 1000 / PACE.as_millis());
        println!("| phase | orders p50 ms | orders p99 ms | orders 429s |");
        println!("| --- | --- | --- | --- |");
        println!("| unloaded | {:.3} | {:.3} | {quiet_refused} |", ms(percentile(&quiet, 0.5)), ms(percentile(&quiet, 0.99)));
        println!("| reports flooding | {:.3} | {:.3} | {loaded_refused} |", ms(percentile(&loaded, 0.5)), ms(percentile(&loaded, 0.99)));
        println!(
            "ratio flooded/unloaded: p50 {:.2}x, p99 {:.2}x",
            ms(percentile(&loaded, 0.5)) / ms(percentile(&quiet, 0.5)),
            ms(percentile(&loaded, 0.99)) / ms(percentile(&quiet, 0.99))
        );
        println!(
            "reports offered {:.0} req/s ({:.1}x its quota) with {FLOODERS} connections; {} of {} refused with 429",
            offered,
            offered / f64::from(QUOTA),
            refused.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed)
        );
        assert_eq!(quiet_refused + loaded_refused, 0, "the in-quota caller was refused");
        reports.shutdown().await;
    });
}

async fn measure_once(mesh: &Mesh, reports: &Sidecar) -> (u16, u16) {
    let a = mesh
        .h1()
        .request(mesh.to_billing("GET", "/status/200", empty()))
        .await
        .expect("orders");
    let b = client_via(reports.outbound_addr(), false)
        .request(
            http::Request::get("http://billing/status/200")
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("reports");
    (a.status().as_u16(), b.status().as_u16())
}
