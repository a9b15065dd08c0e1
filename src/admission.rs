//! Connection-level admission (DESIGN §4): handshakes per source IP, connection
//! counts, idle connections and misbehaving peers. Request-level limiting by caller
//! lives in [`crate::ratelimit`].
//!
//! Every breach is counted in [`Stats`] and logged at most once per second per kind,
//! so a flood shows up as a few log lines with counts rather than one line per refusal.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::admin::stats::Stats;
use crate::config::LimitsConfig;
use crate::ratelimit::{BurstLog, DEFAULT_MAX_KEYS, KeyedLimiter};

/// A limit that was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Breach {
    /// One source IP started more TLS handshakes per second than allowed.
    HandshakeRate,
    /// A listener was at `limits.max_connections`.
    Connections,
    /// An HTTP/1.1 request head did not arrive within `limits.header_read_timeout`.
    HeaderTimeout,
    /// A request head was larger than `limits.max_header_bytes`.
    HeaderSize,
    /// A request body was larger than `limits.max_body_bytes`.
    BodySize,
    /// A connection sat idle for `limits.idle_timeout`.
    Idle,
    /// An inbound connection caused `limits.peer_failures` failed messages.
    PeerFailures,
    /// A request was refused by the caller's rate limit.
    RateLimited,
}

impl Breach {
    pub const ALL: [Breach; 8] = [
        Breach::HandshakeRate,
        Breach::Connections,
        Breach::HeaderTimeout,
        Breach::HeaderSize,
        Breach::BodySize,
        Breach::Idle,
        Breach::PeerFailures,
        Breach::RateLimited,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Breach::HandshakeRate => "handshake-rate",
            Breach::Connections => "connections",
            Breach::HeaderTimeout => "header-timeout",
            Breach::HeaderSize => "header-size",
            Breach::BodySize => "body-size",
            Breach::Idle => "idle",
            Breach::PeerFailures => "peer-failures",
            Breach::RateLimited => "rate-limited",
        }
    }

    pub fn index(self) -> usize {
        Breach::ALL.iter().position(|b| *b == self).unwrap_or(0)
    }
}

/// Shared by every listener of one sidecar.
pub struct Admission {
    pub limits: LimitsConfig,
    handshakes: KeyedLimiter<IpAddr>,
    logs: [BurstLog; Breach::ALL.len()],
    stats: Arc<Stats>,
}

impl Admission {
    pub fn new(limits: LimitsConfig, stats: Arc<Stats>) -> Self {
        let per_ip = limits.handshakes_per_ip;
        Self {
            handshakes: KeyedLimiter::new(
                per_ip,
                per_ip,
                DEFAULT_MAX_KEYS,
                governor::clock::DefaultClock::default(),
            ),
            limits,
            logs: Default::default(),
            stats,
        }
    }

    /// Whether `ip` may start one more TLS handshake now.
    pub fn admit_handshake(&self, ip: IpAddr) -> bool {
        if self.handshakes.check(&ip).is_ok() {
            return true;
        }
        self.breach(
            Breach::HandshakeRate,
            &format!(
                "{ip} starts more than {} TLS handshakes per second; closing its new \
                 connections (raise limits.handshakes_per_ip if this peer is legitimate)",
                self.limits.handshakes_per_ip
            ),
        );
        false
    }

    /// Source IPs the handshake limiter holds now (bounded).
    pub fn handshake_keys(&self) -> usize {
        self.handshakes.len()
    }

    /// Counts a breach and logs it, at most once per second per kind.
    pub fn breach(&self, kind: Breach, message: &str) {
        self.stats.record_breach(kind);
        if let Some(n) = self.logs[kind.index()].hit() {
            tracing::warn!(event = "limit", limit = kind.code(), count = n, "{message}");
        }
    }
}

/// What one connection is doing, for the idle timeout: requests in flight (until
/// their response body ends) and when anything last happened.
pub struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request as started; the guard ends it when dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once the connection has had nothing in flight for `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if self.in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle {
                return;
            }
            // Busy or recently busy: look again when the quiet period could end.
            let wait = idle.saturating_sub(quiet).max(Duration::from_millis(10));
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until the body ends,
/// so a long download is not mistaken for an idle connection.
pub struct Tracked<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: InFlight) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                self.guard = None;
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(g) = &self.guard {
                    g.0.touch();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_in_flight() {
        let activity = Arc::new(Activity::default());
        let guard = activity.begin();
        let idle = Duration::from_secs(5);
        let waiting = tokio::spawn({
            let a = activity.clone();
            async move { a.idle(idle).await }
        });
        // Virtual time (paused clock): deterministic, not a wall-clock measurement.
        tokio::time::advance(Duration::from_secs(60)).await;
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "a request in flight is not idleness"
        );
        drop(guard);
        waiting.await.expect("idle resolves once the request ended");
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn breach_codes_are_distinct() {
        let mut codes: Vec<&str> = Breach::ALL.iter().map(|b| b.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Breach::ALL.len());
        for b in Breach::ALL {
            assert_eq!(Breach::ALL[b.index()], b);
        }
    }
}
