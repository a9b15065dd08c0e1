//! Admission control (DESIGN §4): keyed rate limiters with bounded memory, and a
//! helper that logs a burst of refusals once instead of once per refusal.
//!
//! Every map here is keyed by something a peer influences (its service name, its
//! source address), so each one has a hard bound on the number of keys it holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota as GovernorQuota, RateLimiter};

use crate::config::{Quota, RateLimitConfig};

/// The default bound on keys a [`KeyedLimiter`] holds.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// Callers beyond this many share one "other" row in the refusal counts.
pub const MAX_COUNTED_CALLERS: usize = 1_000;

/// The row that callers beyond [`MAX_COUNTED_CALLERS`] are counted under.
pub const OTHER_CALLERS: &str = "(other)";

/// How long the refused caller should wait, as sent in `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, at least 1: `Retry-After: 0` would invite an
    /// immediate retry that is certain to be refused again.
    pub fn seconds(self) -> u64 {
        let d = self.0;
        let up = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        up.max(1)
    }
}

fn governor_quota(per_second: NonZeroU32, burst: NonZeroU32) -> GovernorQuota {
    GovernorQuota::per_second(per_second).allow_burst(burst)
}

fn retry_after<C: Clock>(clock: &C, not_until: &NotUntil<C::Instant>) -> RetryAfter {
    RetryAfter(not_until.wait_time_from(clock.now()))
}

type Keyed<K, C> =
    RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One governor keyed limiter whose key set never exceeds `max_keys`.
///
/// When a new key would pass the bound, keys whose state is indistinguishable from a
/// fresh one are dropped (`retain_recent`). If every key is still active, the limiter
/// starts afresh: that briefly forgives the callers it held, but memory stays bounded
/// even against a peer that controls unboundedly many keys.
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    quota: GovernorQuota,
    clock: C,
    max_keys: usize,
    limiter: RwLock<Arc<Keyed<K, C>>>,
    resets: AtomicU64,
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> KeyedLimiter<K, C> {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32, max_keys: usize, clock: C) -> Self {
        let quota = governor_quota(per_second, burst);
        let limiter = Arc::new(RateLimiter::new(
            quota,
            DefaultKeyedStateStore::default(),
            clock.clone(),
        ));
        Self {
            quota,
            clock,
            max_keys: max_keys.max(1),
            limiter: RwLock::new(limiter),
            resets: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Arc<Keyed<K, C>> {
        // A poisoned lock only means another thread panicked mid-swap; the Arc inside
        // is always whole, so keep using it.
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        let limiter = self.current();
        let result = limiter
            .check_key(key)
            .map_err(|nu| retry_after(&self.clock, &nu));
        if limiter.len() > self.max_keys {
            self.prune(&limiter);
        }
        result
    }

    fn prune(&self, seen: &Arc<Keyed<K, C>>) {
        seen.retain_recent();
        if seen.len() <= self.max_keys {
            return;
        }
        let mut slot = self.limiter.write().unwrap_or_else(|p| p.into_inner());
        // Another thread may have swapped already.
        if Arc::ptr_eq(&slot, seen) {
            *slot = Arc::new(RateLimiter::new(
                self.quota,
                DefaultKeyedStateStore::default(),
                self.clock.clone(),
            ));
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keys held now; never more than `max_keys` + the few inserted concurrently.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// How often the key set was full of active keys and started afresh.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}

/// The inbound limiter keyed by the authenticated caller service (DESIGN §4).
///
/// Callers with their own entry in `rate_limit.services` get a limiter of their own;
/// every other caller shares the default quota through one bounded keyed limiter, each
/// with its own bucket.
pub struct CallerLimiter<C: Clock = DefaultClock> {
    overrides: HashMap<String, Option<Direct<C>>>,
    default: Option<KeyedLimiter<String, C>>,
    clock: C,
    refused: Mutex<HashMap<String, u64>>,
}

impl CallerLimiter<DefaultClock> {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_clock(config, DEFAULT_MAX_KEYS, DefaultClock::default())
    }
}

impl<C: Clock + Clone> CallerLimiter<C> {
    pub fn with_clock(config: &RateLimitConfig, max_keys: usize, clock: C) -> Self {
        let overrides = config
            .services
            .iter()
            .map(|(name, quota)| {
                let limiter = match *quota {
                    Quota::Unlimited => None,
                    Quota::Limited { per_second, burst } => Some(RateLimiter::direct_with_clock(
                        governor_quota(per_second, burst),
                        clock.clone(),
                    )),
                };
                (name.clone(), limiter)
            })
            .collect();
        let default = match config.default {
            Quota::Unlimited => None,
            Quota::Limited { per_second, burst } => Some(KeyedLimiter::new(
                per_second,
                burst,
                max_keys,
                clock.clone(),
            )),
        };
        Self {
            overrides,
            default,
            clock,
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request from `caller`, or says how long it must wait. A refusal is
    /// counted against the caller.
    pub fn check(&self, caller: &str) -> Result<(), RetryAfter> {
        let result = match self.overrides.get(caller) {
            Some(None) => Ok(()),
            Some(Some(direct)) => direct.check().map_err(|nu| retry_after(&self.clock, &nu)),
            None => match &self.default {
                None => Ok(()),
                Some(keyed) => keyed.check(&caller.to_owned()),
            },
        };
        if result.is_err() {
            self.count_refusal(caller);
        }
        result
    }

    fn count_refusal(&self, caller: &str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = refused.get_mut(caller) {
            *n += 1;
            return;
        }
        // Configured callers always get a row of their own; others until the cap.
        let key = if self.overrides.contains_key(caller) || refused.len() < MAX_COUNTED_CALLERS {
            caller
        } else {
            OTHER_CALLERS
        };
        *refused.entry(key.to_owned()).or_insert(0) += 1;
    }

    /// Refused requests by caller, sorted by name.
    pub fn refused(&self) -> Vec<(String, u64)> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(String, u64)> = refused.iter().map(|(k, v)| (k.clone(), *v)).collect();
        rows.sort();
        rows
    }

    pub fn refused_by(&self, caller: &str) -> u64 {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get(caller).copied().unwrap_or(0)
    }

    /// Keys held by the default (shared-quota) limiter.
    pub fn default_keys(&self) -> usize {
        self.default.as_ref().map_or(0, KeyedLimiter::len)
    }
}

/// Logs the first event of a kind, then at most once per `every`, with how many
/// happened in between, so a flood of refusals does not become a flood of log lines.
pub struct BurstLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl BurstLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Returns `Some(n)` when this event should be logged, `n` being the events
    /// suppressed since the last line (this one included).
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += 1;
        let due = state
            .0
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if !due {
            return None;
        }
        let n = state.1;
        *state = (Some(now), 0);
        Some(n)
    }
}

impl Default for BurstLog {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    fn limited(per_second: u32, burst: u32) -> Quota {
        Quota::Limited {
            per_second: nz(per_second),
            burst: nz(burst),
        }
    }

    fn config(default: Quota, services: &[(&str, Quota)]) -> RateLimitConfig {
        RateLimitConfig {
            default,
            services: services
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn outcomes<C: Clock + Clone>(l: &CallerLimiter<C>, caller: &str, n: usize) -> Vec<bool> {
        (0..n).map(|_| l.check(caller).is_ok()).collect()
    }

    #[test]
    fn burst_then_deny_then_one_per_interval() {
        let clock = FakeRelativeClock::default();
        let l = CallerLimiter::with_clock(&config(limited(2, 3), &[]), 100, clock.clone());
        assert_eq!(outcomes(&l, "orders", 4), [true, true, true, false]);
        // One token every 500 ms at 2 per second.
        let denied = l.check("orders").expect_err("still empty");
        assert_eq!(denied.0, Duration::from_millis(500));
        assert_eq!(denied.seconds(), 1);
        clock.advance(Duration::from_millis(499));
        assert!(l.check("orders").is_err());
        clock.advance(Duration::from_millis(1));
        assert_eq!(outcomes(&l, "orders", 2), [true, false]);
        assert_eq!(l.refused_by("orders"), 4);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let clock = FakeRelativeClock::default();
        // One request every 10 s: a refusal right after means waiting 10 s.
        let slow = config(
            limited(1, 1),
            &[(
                "reports",
                Quota::Limited {
                    per_second: nz(1),
                    burst: nz(1),
                },
            )],
        );
        let l = CallerLimiter::with_clock(&slow, 100, clock.clone());
        assert!(l.check("reports").is_ok());
        clock.advance(Duration::from_millis(250));
        let r = l.check("reports").expect_err("over quota");
        assert_eq!(r.0, Duration::from_millis(750));
        assert_eq!(r.seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(1500)).seconds(), 2);
        assert_eq!(RetryAfter(Duration::from_secs(3)).seconds(), 3);
        assert_eq!(RetryAfter(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_nanos(1)).seconds(), 1);
    }

    #[test]
    fn callers_have_separate_buckets_and_overrides_apply() {
        let clock = FakeRelativeClock::default();
        let cfg = config(
            limited(1, 2),
            &[("reports", limited(1, 1)), ("batch", limited(1, 5))],
        );
        let l = CallerLimiter::with_clock(&cfg, 100, clock.clone());
        assert_eq!(outcomes(&l, "reports", 2), [true, false]);
        assert_eq!(
            outcomes(&l, "batch", 6),
            [true, true, true, true, true, false]
        );
        // Two default callers, each with a bucket of 2, unaffected by the others.
        assert_eq!(outcomes(&l, "orders", 3), [true, true, false]);
        assert_eq!(outcomes(&l, "billing", 3), [true, true, false]);
        assert_eq!(
            l.refused(),
            vec![
                ("batch".to_owned(), 1),
                ("billing".to_owned(), 1),
                ("orders".to_owned(), 1),
                ("reports".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn unlimited_default_and_unlimited_override() {
        let clock = FakeRelativeClock::default();
        let l = CallerLimiter::with_clock(
            &config(Quota::Unlimited, &[("reports", limited(1, 1))]),
            100,
            clock.clone(),
        );
        assert!(outcomes(&l, "orders", 10_000).iter().all(|ok| *ok));
        assert_eq!(outcomes(&l, "reports", 2), [true, false]);
        assert_eq!(l.default_keys(), 0);

        let l = CallerLimiter::with_clock(
            &config(limited(1, 1), &[("ops", Quota::Unlimited)]),
            100,
            clock,
        );
        assert!(outcomes(&l, "ops", 10_000).iter().all(|ok| *ok));
        assert_eq!(outcomes(&l, "orders", 2), [true, false]);
    }

    #[test]
    fn keyed_limiter_stays_bounded_over_100k_keys() {
        let clock = FakeRelativeClock::default();
        let max = 1_000;
        let l = KeyedLimiter::new(nz(10), nz(1), max, clock.clone());
        for i in 0..100_000u32 {
            assert!(l.check(&i).is_ok(), "key {i} is fresh");
            assert!(l.len() <= max, "len {} after {i} keys", l.len());
            if i % 5_000 == 0 {
                clock.advance(Duration::from_millis(10));
            }
        }
        // Every key was idle again after 100 ms, so pruning kept up mostly without
        // starting afresh; either way the bound held.
        assert!(l.len() <= max);

        // All keys active at once: the bound holds by starting afresh.
        let l = KeyedLimiter::new(nz(1), nz(1), max, FakeRelativeClock::default());
        for i in 0..100_000u32 {
            let _ = l.check(&i);
            assert!(l.len() <= max);
        }
        assert!(l.resets() >= 99, "resets {}", l.resets());
    }

    #[test]
    fn refusal_counts_are_bounded() {
        let clock = FakeRelativeClock::default();
        let l = CallerLimiter::with_clock(
            &config(limited(1, 1), &[("reports", limited(1, 1))]),
            100_000,
            clock,
        );
        for i in 0..(MAX_COUNTED_CALLERS + 500) {
            let caller = format!("svc-{i}");
            let _ = l.check(&caller);
            assert!(l.check(&caller).is_err());
        }
        let _ = l.check("reports");
        assert!(l.check("reports").is_err());
        let rows = l.refused();
        assert!(rows.len() <= MAX_COUNTED_CALLERS + 2, "{}", rows.len());
        assert_eq!(l.refused_by(OTHER_CALLERS), 500);
        assert_eq!(l.refused_by("reports"), 1);
    }

    #[test]
    fn burst_log_logs_once_per_interval() {
        let log = BurstLog::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.hit_at(t0), Some(1));
        for _ in 0..99 {
            assert_eq!(log.hit_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(log.hit_at(t0 + Duration::from_secs(1)), Some(100));
    }
}
