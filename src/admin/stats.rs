//! Counters the data path bumps and the admin port reports. Lock-free atomics on the
//! success path, so the hot path never waits on an admin request; the rare failure
//! kinds sit behind a mutex that only failures and scrapes take.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

use crate::admission::Breach;
use crate::proxy::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local app into the mesh.
    Outbound,
    /// From the mesh to the local app.
    Inbound,
}

#[derive(Debug, Default)]
struct DirectionCounters {
    /// By status class: 1xx..5xx.
    by_class: [AtomicU64; 5],
}

pub struct Stats {
    started: Instant,
    outbound: DirectionCounters,
    inbound: DirectionCounters,
    failures: [AtomicU64; Failure::ALL.len()],
    retries: AtomicU64,
    /// One entry per configured peer, fixed at start: a peer cannot add entries, so the
    /// map (and the metric labels made from it) stay bounded.
    peers: BTreeMap<String, PeerStats>,
    /// Handshake and open failures by kind. The kinds are `&'static str` from fixed
    /// sets (see [`HandshakeFailure`] and `SealError::kind`), so the maps stay small.
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    open_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Time from request head to response head, per direction.
    durations: [Histogram; 2],
    access_log: bool,
    breaches: [AtomicU64; Breach::ALL.len()],
}

/// What the outbound side saw of one configured peer.
#[derive(Debug, Default)]
pub struct PeerStats {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Round-trip time EWMA in microseconds; 0 until the first response.
    rtt_ewma_us: AtomicU64,
    last_activity_unix_ms: AtomicU64,
    /// 0 not tried yet, 1 the last connect/request reached it, 2 it did not.
    reachable: AtomicU8,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub rtt_ewma_seconds: Option<f64>,
    pub last_activity_unix_ms: Option<u64>,
    /// `None` until the data path has tried the peer.
    pub reachable: Option<bool>,
}

/// Why a session handshake failed, from either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Client side: no endpoint of the peer answered.
    PeerUnreachable,
    /// Client side: the peer seam refused the handshake.
    RefusedByPeer,
    /// Either side: the key agreement or a handshake message did not check out.
    KeyAgreement,
    /// Server side: the caller's hello was malformed or of another version.
    BadHello,
}

impl HandshakeFailure {
    pub fn code(self) -> &'static str {
        match self {
            HandshakeFailure::PeerUnreachable => "peer-unreachable",
            HandshakeFailure::RefusedByPeer => "refused-by-peer",
            HandshakeFailure::KeyAgreement => "key-agreement",
            HandshakeFailure::BadHello => "bad-hello",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DirectionSnapshot {
    pub total: u64,
    #[serde(rename = "1xx")]
    pub c1xx: u64,
    #[serde(rename = "2xx")]
    pub c2xx: u64,
    #[serde(rename = "3xx")]
    pub c3xx: u64,
    #[serde(rename = "4xx")]
    pub c4xx: u64,
    #[serde(rename = "5xx")]
    pub c5xx: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new(std::iter::empty::<String>(), false)
    }
}

/// 0.5 ms to ~16 s in powers of two: loopback hops sit at the low end, slow apps and
/// long uploads at the high end.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Weight of the newest sample in the round-trip EWMA.
const RTT_ALPHA: f64 = 0.2;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Stats {
    /// Counters for a seam whose configured peers are `peers`.
    pub fn new(peers: impl IntoIterator<Item = String>, access_log: bool) -> Self {
        Self {
            started: Instant::now(),
            outbound: DirectionCounters::default(),
            inbound: DirectionCounters::default(),
            failures: Default::default(),
            retries: AtomicU64::new(0),
            peers: peers
                .into_iter()
                .map(|p| (p, PeerStats::default()))
                .collect(),
            handshake_failures: Mutex::default(),
            open_failures: Mutex::default(),
            durations: [duration_histogram(), duration_histogram()],
            access_log,
            breaches: Default::default(),
        }
    }

    /// Whether one log line per request is wanted (`admin.access_log`).
    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// The counters of configured peer `name`; `None` for anything else.
    pub fn peer(&self, name: &str) -> Option<&PeerStats> {
        self.peers.get(name)
    }

    pub fn peers(&self) -> BTreeMap<String, PeerSnapshot> {
        self.peers
            .iter()
            .map(|(name, p)| (name.clone(), p.snapshot()))
            .collect()
    }

    pub fn observe_duration(&self, direction: Direction, took: Duration) {
        self.durations[direction as usize].observe(took.as_secs_f64());
    }

    pub fn duration_histogram(&self, direction: Direction) -> &Histogram {
        &self.durations[direction as usize]
    }

    pub fn record_handshake_failure(&self, why: HandshakeFailure) {
        bump(&self.handshake_failures, why.code());
    }

    /// A sealed message that could not be opened, by kind (tampered, replay, ...).
    pub fn record_open_failure(&self, kind: &'static str) {
        bump(&self.open_failures, kind);
    }

    pub fn handshake_failures(&self) -> BTreeMap<&'static str, u64> {
        read(&self.handshake_failures)
    }

    pub fn open_failures(&self) -> BTreeMap<&'static str, u64> {
        read(&self.open_failures)
    }

    pub fn record_status(&self, direction: Direction, status: StatusCode) {
        let counters = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        counters.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_failure(&self, failure: Failure) {
        self.failures[failure.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_breach(&self, breach: Breach) {
        self.breaches[breach.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Times a limit of `limits:` (or the caller rate limit) was hit.
    pub fn breaches(&self, breach: Breach) -> u64 {
        self.breaches[breach.index()].load(Ordering::Relaxed)
    }

    /// `{ "handshake-rate": 0, ... }` for every limit.
    pub fn breach_map(&self) -> serde_json::Map<String, serde_json::Value> {
        Breach::ALL
            .iter()
            .map(|b| (b.code().to_owned(), self.breaches(*b).into()))
            .collect()
    }

    pub fn failures(&self, failure: Failure) -> u64 {
        self.failures[failure.index()].load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn requests(&self, direction: Direction) -> DirectionSnapshot {
        let c = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let v: Vec<u64> = c
            .by_class
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        DirectionSnapshot {
            total: v.iter().sum(),
            c1xx: v[0],
            c2xx: v[1],
            c3xx: v[2],
            c4xx: v[3],
            c5xx: v[4],
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// `{ "unknown-service": 2, ... }` for every failure kind.
    pub fn failure_map(&self) -> serde_json::Map<String, serde_json::Value> {
        Failure::ALL
            .iter()
            .map(|f| (f.code().to_owned(), self.failures(*f).into()))
            .collect()
    }
}

// A poisoned lock only means a panic elsewhere while counting; the counts are still
// usable, so keep going rather than take the admin port down with it.
fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, kind: &'static str) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    *map.entry(kind).or_default() += 1;
}

fn read(map: &Mutex<BTreeMap<&'static str, u64>>) -> BTreeMap<&'static str, u64> {
    map.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl PeerStats {
    /// A request was sent; `rtt` is the time to the response head when one came.
    pub fn record_request(&self, rtt: Option<Duration>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_activity_unix_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        match rtt {
            Some(rtt) => {
                self.reachable.store(1, Ordering::Relaxed);
                let sample = rtt.as_micros().max(1) as f64;
                // A lost race only drops one sample from the average; no retry loop needed.
                let old = self.rtt_ewma_us.load(Ordering::Relaxed);
                let new = if old == 0 {
                    sample
                } else {
                    RTT_ALPHA * sample + (1.0 - RTT_ALPHA) * old as f64
                };
                self.rtt_ewma_us
                    .store(new.round().max(1.0) as u64, Ordering::Relaxed);
            }
            None => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether the last attempt to reach the peer (connect, handshake) got through.
    pub fn record_reachable(&self, ok: bool) {
        self.reachable
            .store(if ok { 1 } else { 2 }, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.last_activity_unix_ms
                .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> PeerSnapshot {
        let rtt = self.rtt_ewma_us.load(Ordering::Relaxed);
        let last = self.last_activity_unix_ms.load(Ordering::Relaxed);
        PeerSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            rtt_ewma_seconds: (rtt > 0).then(|| rtt as f64 / 1e6),
            last_activity_unix_ms: (last > 0).then_some(last),
            reachable: match self.reachable.load(Ordering::Relaxed) {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_ewma_moves_toward_new_samples() {
        let p = PeerStats::default();
        p.record_request(Some(Duration::from_millis(10)));
        assert_eq!(p.snapshot().rtt_ewma_seconds, Some(0.01));
        p.record_request(Some(Duration::from_millis(20)));
        assert_eq!(p.snapshot().rtt_ewma_seconds, Some(0.012));
        p.record_request(None);
        let s = p.snapshot();
        assert_eq!((s.requests, s.errors, s.reachable), (3, 1, Some(true)));
    }

    #[test]
    fn only_configured_peers_are_tracked() {
        let stats = Stats::new(["billing".to_owned()], false);
        assert!(stats.peer("billing").is_some());
        assert!(stats.peer("anything-else").is_none());
    }
}
