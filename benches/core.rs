//! Micro-benchmarks of the security core (issue 2): frame sealing and opening, the
//! handshake and the session cache. Run with `cargo bench --bench core`; the figures
//! and how to read them are in `benches/RESULTS.md`.
//!
//! What each group measures:
//! - `seal/<size>`: `MessageSealer::seal(FrameKind::Data, payload, &mut buf)` of one
//!   Data frame into a reused, cleared `BytesMut` (header encode, one payload copy,
//!   AES-256-GCM in place, tag append). The sealer is replaced every
//!   `FRAMES_PER_SEALER` frames (a new message: Head sealed into a scratch buffer),
//!   so frame indexes stay small; that renewal is timed but is 1/1024 of the frames.
//! - `seal_rustcrypto/<size>`: the same copy and in-place AES-256-GCM over header-sized
//!   AAD with RustCrypto's `aes-gcm`, the crate the session frames used before issue 6
//!   moved them to aws-lc; kept as the reference the choice was made against.
//! - `open/<size>`: splitting and opening one sealed Data frame
//!   (`FrameHeader::decode` + `MessageOpener::open`, decrypt in place). Each opener
//!   has already opened its message's Head in the untimed setup; the frame bytes are
//!   copied from one pre-sealed message, also in the setup.
//! - `seal_open/<size>`: one whole request: seal Head + one Data frame + End, then
//!   open all three on the server side (`for_request`, replay window checked).
//! - `handshake`: `ClientHandshake::start` + `respond` + `finish`, in process.
//! - `session_cache/get_hit`: 1000 `SessionCache<Uuid>::get` of random ids of a cache
//!   holding 10 000 server sessions, per iteration (throughput in lookups).
//! - `session_cache/client_fast_path`: 1000 `SessionCache<String>::get_or_handshake`
//!   for a peer that already has a usable session, per iteration.
//! - `session_cache/block_on_overhead`: an empty async iteration on the same
//!   current-thread runtime, to show what the runtime adds to one batch of 1000.
//! - `limiter/one_caller`: 1000 `CallerLimiter::check` for one caller whose quota is
//!   never reached (the inbound hot path: one lookup plus governor's GCRA update).
//! - `limiter/many_callers`: the same for 1000 of 5 000 distinct callers in turn.
//! - `limiter/refused`: 1000 checks of a caller that is over its quota (the path a
//!   flooding caller costs: the lookup, the GCRA verdict and the refusal count).

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;
use zeroize::Zeroizing;

use seam::config::{Quota, RateLimitConfig};
use seam::handshake::{ClientHandshake, SessionKeys, respond};
use seam::ratelimit::CallerLimiter;
use seam::session::replay::ReplayWindow;
use seam::session::seal::{
    Direction, FrameHeader, FrameKey, FrameKind, HEADER_LEN, MessageOpener, MessageSealer,
};
use seam::session::{Role, Session, SessionCache, SessionError, SessionLimits};

const SIZES: [(usize, &str); 3] = [(1024, "1KiB"), (16 * 1024, "16KiB"), (64 * 1024, "64KiB")];
const FRAMES_PER_SEALER: u32 = 1024;
const HEAD: &[u8] = b"POST /orders HTTP/1.1";
const LOOKUPS: usize = 1000;
const CACHED_SESSIONS: usize = 10_000;

const ORDERS: &str = "spiffe://mesh.local/orders";
const BILLING: &str = "spiffe://mesh.local/billing";

/// Limits no benchmark run can reach, so nothing expires or asks for a rekey.
const LIMITS: SessionLimits = SessionLimits {
    idle_ttl: Duration::from_secs(3600),
    max_lifetime: Duration::from_secs(24 * 3600),
    max_messages: 1 << 40,
};

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("OS random number generator");
    k
}

fn frame_key() -> Arc<FrameKey> {
    Arc::new(FrameKey::new(&random_key()).expect("a 32-byte key"))
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + 7) as u8).collect()
}

/// Small, fast, deterministic index generator for the cache lookups (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A sealer for message `seq` whose Head is already sealed, ready for Data frames.
fn sealer_after_head(
    key: &Arc<FrameKey>,
    id: Uuid,
    seq: u64,
    scratch: &mut BytesMut,
) -> MessageSealer {
    let mut s = MessageSealer::new(key.clone(), id, Direction::ClientToServer, seq);
    scratch.clear();
    s.seal(FrameKind::Head, HEAD, scratch).expect("seal Head");
    s
}

fn bench_seal_rustcrypto(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    let cipher = aes_gcm::Aes256Gcm::new(&random_key().into());
    let mut group = c.benchmark_group("seal_rustcrypto");
    for (size, name) in SIZES {
        let body = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        // A counter nonce, as in the frames: never reused within the benchmark.
        let mut counter = 0u64;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut buf = BytesMut::with_capacity(HEADER_LEN + size + 16);
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&counter.to_be_bytes());
                buf.clear();
                buf.resize(HEADER_LEN, 0);
                buf.extend_from_slice(black_box(&body));
                let (aad, plain) = buf.split_at_mut(HEADER_LEN);
                let tag = cipher
                    .encrypt_inout_detached(&nonce.into(), aad, plain.into())
                    .expect("seal");
                buf.extend_from_slice(&tag);
                black_box(&buf);
            });
        });
    }
    group.finish();
}

fn bench_seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    for (size, name) in SIZES {
        let body = payload(size);
        let key = frame_key();
        let id = Uuid::now_v7();
        group.throughput(Throughput::Bytes(size as u64));
        // Criterion calls the closure once for warm-up and again to measure: the
        // sequence number lives outside it so no (seq, index) nonce is ever reused.
        let mut seq = 0;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut scratch = BytesMut::new();
            let mut buf = BytesMut::with_capacity(HEADER_LEN + size + 16);
            seq += 1;
            let mut sealer = sealer_after_head(&key, id, seq, &mut scratch);
            let mut sealed_in_this = 0;
            b.iter(|| {
                if sealed_in_this == FRAMES_PER_SEALER {
                    seq += 1;
                    sealer = sealer_after_head(&key, id, seq, &mut scratch);
                    sealed_in_this = 0;
                }
                buf.clear();
                sealer
                    .seal(FrameKind::Data, black_box(&body), &mut buf)
                    .expect("seal Data");
                sealed_in_this += 1;
                black_box(&buf);
            });
        });
    }
    group.finish();
}

fn bench_open(c: &mut Criterion) {
    let mut group = c.benchmark_group("open");
    for (size, name) in SIZES {
        let body = payload(size);
        let key = frame_key();
        let id = Uuid::now_v7();
        let seq = 7;
        // One message sealed once; every opener reads a fresh copy of its frames.
        let mut head = BytesMut::new();
        let mut sealer = MessageSealer::new(key.clone(), id, Direction::ServerToClient, seq);
        sealer.seal(FrameKind::Head, HEAD, &mut head).unwrap();
        let mut data = BytesMut::new();
        sealer.seal(FrameKind::Data, &body, &mut data).unwrap();
        let (head, data) = (head.freeze(), data.freeze());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_batched(
                || {
                    let mut opener = MessageOpener::for_response(key.clone(), id, seq);
                    let mut h = BytesMut::from(&head[..]);
                    let header = FrameHeader::decode(&h).unwrap();
                    h.advance(HEADER_LEN);
                    opener.open(&header, h).unwrap();
                    (opener, BytesMut::from(&data[..]))
                },
                |(mut opener, mut wire)| {
                    let header = FrameHeader::decode(&wire).expect("header");
                    wire.advance(HEADER_LEN);
                    let frame = opener.open(&header, wire).expect("open Data");
                    debug_assert_eq!(frame.payload.len(), size);
                    frame
                },
                BatchSize::NumIterations(32),
            );
        });
    }
    group.finish();
}

fn open_all(opener: &mut MessageOpener, mut wire: BytesMut) -> usize {
    let mut data = 0;
    while !wire.is_empty() {
        let header = FrameHeader::decode(&wire).expect("header");
        wire.advance(HEADER_LEN);
        let sealed = wire.split_to(header.sealed_len as usize);
        let frame = opener.open(&header, sealed).expect("open");
        if frame.kind == FrameKind::Data {
            data += frame.payload.len();
        }
    }
    assert!(opener.is_finished());
    data
}

fn bench_seal_open(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal_open");
    for (size, name) in SIZES {
        let body = payload(size);
        let key = frame_key();
        let id = Uuid::now_v7();
        let window = Arc::new(Mutex::new(ReplayWindow::new()));
        group.throughput(Throughput::Bytes(size as u64));
        // Outside the closure, which criterion calls more than once: every message
        // gets a new sequence number, as the replay window demands.
        let mut seq = 0u64;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                seq += 1;
                let mut wire = BytesMut::with_capacity(3 * HEADER_LEN + HEAD.len() + size + 48);
                let mut sealer =
                    MessageSealer::new(key.clone(), id, Direction::ClientToServer, seq);
                sealer.seal(FrameKind::Head, HEAD, &mut wire).unwrap();
                sealer
                    .seal(FrameKind::Data, black_box(&body), &mut wire)
                    .unwrap();
                sealer.finish(&mut wire).unwrap();
                let mut opener = MessageOpener::for_request(key.clone(), id, window.clone());
                let got = open_all(&mut opener, wire);
                debug_assert_eq!(got, size);
                got
            });
        });
    }
    group.finish();
}

fn bench_handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("full", |b| {
        b.iter(|| {
            let (client, hello) = ClientHandshake::start(ORDERS, BILLING).unwrap();
            let (reply, server_keys) = respond(black_box(&hello), ORDERS, BILLING).unwrap();
            let client_keys = client.finish(black_box(&reply)).unwrap();
            (client_keys, server_keys)
        });
    });
    group.finish();
}

/// Session keys made without the handshake (10 000 handshakes would only slow the setup).
fn keys() -> SessionKeys {
    SessionKeys {
        session_id: Uuid::now_v7(),
        client_to_server: Zeroizing::new(random_key()),
        server_to_client: Zeroizing::new(random_key()),
    }
}

fn bench_session_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("session_cache");

    let server: SessionCache<Uuid> = SessionCache::new(LIMITS, 2 * CACHED_SESSIONS as u64);
    let ids: Vec<Uuid> = rt.block_on(async {
        let mut ids = Vec::with_capacity(CACHED_SESSIONS);
        for _ in 0..CACHED_SESSIONS {
            let s =
                Arc::new(Session::new(keys(), Role::Server, "orders", LIMITS).expect("session"));
            ids.push(s.id());
            server.insert(s.id(), s).await;
        }
        server.run_pending_tasks().await;
        ids
    });
    assert_eq!(server.len(), CACHED_SESSIONS as u64);

    group.throughput(Throughput::Elements(LOOKUPS as u64));
    group.bench_function("get_hit", |b| {
        let mut rng = SplitMix(0x5eed);
        b.to_async(&rt).iter(|| {
            let picks: [usize; LOOKUPS] =
                std::array::from_fn(|_| (rng.next() % CACHED_SESSIONS as u64) as usize);
            let (server, ids) = (&server, &ids);
            async move {
                for i in picks {
                    let s = server.get(&ids[i]).await.expect("cached session");
                    black_box(s);
                }
            }
        });
    });

    let client: SessionCache<String> = SessionCache::new(LIMITS, 100);
    let peer = "billing".to_string();
    rt.block_on(async {
        client
            .get_or_handshake(&peer, || async {
                Session::new(keys(), Role::Client, "billing", LIMITS)
            })
            .await
            .unwrap();
    });
    group.bench_function("client_fast_path", |b| {
        b.to_async(&rt).iter(|| async {
            for _ in 0..LOOKUPS {
                let s = client
                    .get_or_handshake(&peer, || async {
                        // The fast path must not handshake: any error here fails the bench.
                        Err::<Session, SessionError>(SessionError::Unavailable)
                    })
                    .await
                    .expect("existing session");
                black_box(s);
            }
        });
    });
    assert_eq!(client.stats().snapshot().handshakes_ok, 1);
    assert_eq!(client.stats().snapshot().handshakes_failed, 0);

    group.throughput(Throughput::Elements(1));
    group.bench_function("block_on_overhead", |b| {
        b.to_async(&rt).iter(|| async { black_box(0u8) });
    });
    group.finish();
}

fn limiter_config(per_second: u32, burst: u32) -> RateLimitConfig {
    let limited = |n| std::num::NonZeroU32::new(n).expect("non-zero");
    RateLimitConfig {
        default: Quota::Limited {
            per_second: limited(per_second),
            burst: limited(burst),
        },
        services: Default::default(),
    }
}

fn bench_limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter");
    group.throughput(Throughput::Elements(LOOKUPS as u64));

    let open = CallerLimiter::new(&limiter_config(1_000_000_000, 1_000_000_000));
    group.bench_function("one_caller", |b| {
        b.iter(|| {
            for _ in 0..LOOKUPS {
                black_box(open.check(black_box("orders")).is_ok());
            }
        });
    });

    let callers: Vec<String> = (0..5_000).map(|i| format!("svc-{i}")).collect();
    let mut next = 0;
    group.bench_function("many_callers", |b| {
        b.iter(|| {
            for _ in 0..LOOKUPS {
                next = (next + 1) % callers.len();
                black_box(open.check(&callers[next]).is_ok());
            }
        });
    });

    let tight = CallerLimiter::new(&limiter_config(1, 1));
    let _ = tight.check("flood");
    group.bench_function("refused", |b| {
        b.iter(|| {
            for _ in 0..LOOKUPS {
                black_box(tight.check(black_box("flood")).is_err());
            }
        });
    });
    assert!(tight.refused_by("flood") > 0);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_seal, bench_seal_rustcrypto, bench_open, bench_seal_open, bench_handshake,
        bench_session_cache, bench_limiter
}
criterion_main!(benches);
