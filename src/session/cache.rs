//! The session cache on moka (DESIGN §3).
//!
//! Client side keyed by peer service, server side by session id. moka provides the
//! bounded storage, `time_to_idle` sliding expiry, per-entry `max_lifetime` expiry,
//! coalesced initialisation and the eviction listener. Because moka's clock cannot be
//! driven from outside, every lookup also checks the session's own limits against
//! tokio's clock: that check is authoritative (and testable with a paused clock),
//! moka's timers reclaim memory for entries nobody looks up again.

use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use serde::Serialize;
use tokio::time::Instant;

use super::{EndReason, Session, SessionError, SessionLimits};

/// Counters shared by a cache and whoever reports on it.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub created: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
    pub revoked: AtomicU64,
    pub replaced: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// Payload bytes of sessions that have ended; live ones are summed on demand.
    ended_bytes_in: AtomicU64,
    ended_bytes_out: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SessionStatsSnapshot {
    pub created: u64,
    pub expired: u64,
    pub evicted: u64,
    pub revoked: u64,
    pub replaced: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
}

/// Sessions keyed by `K`: a peer service name (client side) or a session id (server).
#[derive(Clone)]
pub struct SessionCache<K> {
    cache: Cache<K, Arc<Session>>,
    stats: Arc<SessionStats>,
    max_sessions: u64,
}

/// Gives each entry its session's hard lifetime, from creation or replacement.
struct LifetimeExpiry(Duration);

impl SessionStats {
    fn record_end(&self, reason: EndReason) {
        let counter = match reason {
            EndReason::Expired => &self.expired,
            EndReason::Evicted => &self.evicted,
            EndReason::Revoked => &self.revoked,
            EndReason::Replaced => &self.replaced,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SessionStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SessionStatsSnapshot {
            created: r(&self.created),
            expired: r(&self.expired),
            evicted: r(&self.evicted),
            revoked: r(&self.revoked),
            replaced: r(&self.replaced),
            handshakes_ok: r(&self.handshakes_ok),
            handshakes_failed: r(&self.handshakes_failed),
        }
    }
}

impl<K> Expiry<K, Arc<Session>> for LifetimeExpiry {
    fn expire_after_create(
        &self,
        _key: &K,
        _value: &Arc<Session>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.0)
    }

    fn expire_after_update(
        &self,
        _key: &K,
        _value: &Arc<Session>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.0)
    }
}

impl<K> SessionCache<K>
where
    K: Hash + Eq + Clone + Send + Sync + std::fmt::Display + 'static,
{
    pub fn new(limits: SessionLimits, max_sessions: u64) -> Self {
        let stats = Arc::new(SessionStats::default());
        let listener_stats = stats.clone();
        let cache = Cache::builder()
            .max_capacity(max_sessions)
            .time_to_idle(limits.idle_ttl)
            .expire_after(LifetimeExpiry(limits.max_lifetime))
            .eviction_listener(move |key: Arc<K>, session: Arc<Session>, cause| {
                // A reason set by us (revoke, rekey, expiry seen first by tokio's
                // clock) wins over moka's view of why the entry went.
                let reason = session.mark_ended(match cause {
                    RemovalCause::Expired => EndReason::Expired,
                    RemovalCause::Size => EndReason::Evicted,
                    RemovalCause::Explicit => EndReason::Revoked,
                    RemovalCause::Replaced => EndReason::Replaced,
                });
                listener_stats.record_end(reason);
                let c = session.counters();
                listener_stats
                    .ended_bytes_in
                    .fetch_add(c.bytes_in.load(Ordering::Relaxed), Ordering::Relaxed);
                listener_stats
                    .ended_bytes_out
                    .fetch_add(c.bytes_out.load(Ordering::Relaxed), Ordering::Relaxed);
                tracing::info!(
                    event = "session_ended",
                    key = %key,
                    session_id = %session.id(),
                    peer = session.peer(),
                    role = session.role().as_str(),
                    reason = reason.as_str(),
                    "session ended"
                );
            })
            .build();
        Self {
            cache,
            stats,
            max_sessions,
        }
    }

    pub fn stats(&self) -> &Arc<SessionStats> {
        &self.stats
    }

    pub fn max_sessions(&self) -> u64 {
        self.max_sessions
    }

    /// Sessions currently held (approximate until pending maintenance has run).
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a session made elsewhere (the server side after answering a handshake).
    pub async fn insert(&self, key: K, session: Arc<Session>) {
        self.record_created(&session);
        self.cache.insert(key, session).await;
    }

    /// The live session under `key`, if any. A session found expired by tokio's clock
    /// is ended and removed here rather than handed out.
    pub async fn get(&self, key: &K) -> Option<Arc<Session>> {
        let session = self.cache.get(key).await?;
        if session.end_reason().is_some() {
            return None;
        }
        if session.is_expired(Instant::now()) {
            session.mark_ended(EndReason::Expired);
            self.cache.invalidate(key).await;
            return None;
        }
        session.touch();
        Some(session)
    }

    /// Client side: the usable session for `key`, making one with `handshake` when
    /// there is none or the current one is due for a rekey. Concurrent callers for
    /// the same key wait for one handshake instead of each running their own; a
    /// replaced session stays valid for the messages already using it.
    pub async fn get_or_handshake<Q, F, Fut, E>(
        &self,
        key: &Q,
        handshake: F,
    ) -> Result<Arc<Session>, E>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Session, E>>,
        E: From<SessionError> + Send + Sync + 'static,
    {
        if let Some(session) = self.cache.get(key).await
            && session.is_usable(Instant::now())
        {
            session.touch();
            return Ok(session);
        }
        // Boxed: the handshake's state is kilobytes, and keeping it out of this future
        // keeps every request's future that small (one copy of it per request). The key
        // is only copied here, on the slow path.
        Box::pin(self.handshake_into_cache(key.to_owned(), handshake)).await
    }

    /// The slow path of [`Self::get_or_handshake`]: one handshake per key at a time.
    async fn handshake_into_cache<F, Fut, E>(&self, key: K, handshake: F) -> Result<Arc<Session>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Session, E>>,
        E: From<SessionError> + Send + Sync + 'static,
    {
        let stats = self.stats.clone();
        let outcome = self
            .cache
            .entry(key)
            .and_try_compute_with(|current| async move {
                let now = Instant::now();
                let mut rekeyed = None;
                if let Some(entry) = current {
                    let session = entry.into_value();
                    if session.is_usable(now) {
                        return Ok(Op::Nop);
                    }
                    let reason = session.mark_ended(if session.is_expired(now) {
                        EndReason::Expired
                    } else {
                        EndReason::Replaced
                    });
                    if reason == EndReason::Replaced {
                        rekeyed = Some(session.id());
                    }
                }
                match handshake().await {
                    Ok(session) => {
                        stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
                        if let Some(old) = rekeyed {
                            tracing::info!(
                                event = "session_rekeyed",
                                session_id = %session.id(),
                                old_session_id = %old,
                                peer = session.peer(),
                                reason = "lifetime or message budget nearly used",
                                "session rekeyed"
                            );
                        }
                        Ok(Op::Put(Arc::new(session)))
                    }
                    Err(e) => {
                        stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            })
            .await?;
        let session = match outcome {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => {
                let session = entry.into_value();
                self.record_created(&session);
                session
            }
            CompResult::Unchanged(entry) => entry.into_value(),
            // The closure only answers Nop on an existing entry or Put, so moka cannot
            // report these; if it ever did, the caller gets an error, not a panic.
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                return Err(SessionError::Unavailable.into());
            }
        };
        session.touch();
        Ok(session)
    }

    /// Ends the session under `key` (operator revocation, or the peer lost it).
    pub async fn revoke(&self, key: &K, reason: EndReason) -> bool {
        match self.cache.get(key).await {
            Some(session) => {
                session.mark_ended(reason);
                self.cache.invalidate(key).await;
                true
            }
            None => false,
        }
    }

    /// Drops `session` if it is still the one cached under `key`: the peer said it
    /// does not know it (restart), so the next request must handshake again.
    pub async fn forget(&self, key: &K, session: &Arc<Session>) {
        if let Some(current) = self.cache.get(key).await
            && Arc::ptr_eq(&current, session)
        {
            self.revoke(key, EndReason::Revoked).await;
        }
    }

    /// Operator revocation by session id: ends it with [`EndReason::Revoked`] and logs
    /// `reason`. Returns the session as it was, or `None` when no such session is held.
    pub async fn revoke_id(&self, id: uuid::Uuid, reason: &str) -> Option<Arc<Session>> {
        let (key, session) = self.cache.iter().find(|(_, s)| s.id() == id)?;
        session.mark_ended(EndReason::Revoked);
        self.cache.invalidate(&*key).await;
        tracing::info!(
            event = "session_revoked",
            session_id = %id,
            peer = session.peer(),
            role = session.role().as_str(),
            reason,
            "session revoked by an operator"
        );
        Some(session)
    }

    /// The session with id `id`, if held (a linear scan: admin use only).
    pub fn find(&self, id: uuid::Uuid) -> Option<Arc<Session>> {
        self.cache
            .iter()
            .find(|(_, s)| s.id() == id)
            .map(|(_, s)| s)
    }

    /// Payload bytes (received, sent) over every session this cache has held.
    pub fn bytes(&self) -> (u64, u64) {
        let (mut rx, mut tx) = (
            self.stats.ended_bytes_in.load(Ordering::Relaxed),
            self.stats.ended_bytes_out.load(Ordering::Relaxed),
        );
        for (_, s) in self.cache.iter() {
            rx += s.counters().bytes_in.load(Ordering::Relaxed);
            tx += s.counters().bytes_out.load(Ordering::Relaxed);
        }
        (rx, tx)
    }

    /// A snapshot of all sessions, for the admin API.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.cache.iter().map(|(_, s)| s).collect()
    }

    /// Runs moka's pending maintenance (evictions, listener calls) now.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    fn record_created(&self, session: &Arc<Session>) {
        self.stats.created.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            event = "session_created",
            session_id = %session.id(),
            peer = session.peer(),
            role = session.role().as_str(),
            "session created"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::{LIMITS, complete, exchange, session_pair};
    use crate::session::{Role, SessionState};
    use std::sync::atomic::AtomicUsize;
    use uuid::Uuid;

    /// What a handshake closure fails with in these tests.
    #[derive(Debug, PartialEq)]
    enum TestError {
        Refused,
        Session(SessionError),
    }

    impl From<SessionError> for TestError {
        fn from(e: SessionError) -> Self {
            TestError::Session(e)
        }
    }

    fn client_session(limits: SessionLimits) -> Session {
        // Unwrap the Arc from the real pair: the cache stores what the closure returns.
        let (c, _) = session_pair(limits);
        Arc::try_unwrap(c).expect("fresh session has one owner")
    }

    #[tokio::test]
    async fn hundred_concurrent_first_uses_make_one_handshake() {
        let cache: SessionCache<String> = SessionCache::new(LIMITS, 100);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let cache = cache.clone();
            let handshakes = handshakes.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_handshake(&"billing".to_string(), || async move {
                        handshakes.fetch_add(1, Ordering::SeqCst);
                        // Give every other task the chance to pile up behind us.
                        tokio::task::yield_now().await;
                        Ok::<_, TestError>(client_session(LIMITS))
                    })
                    .await
                    .unwrap()
                    .id()
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        assert_eq!(handshakes.load(Ordering::SeqCst), 1);
        assert!(ids.iter().all(|id| *id == ids[0]));
        assert_eq!(cache.stats().snapshot().handshakes_ok, 1);
        assert_eq!(cache.stats().snapshot().created, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_ttl_kept_alive_by_use_and_expired_without() {
        let cache: SessionCache<Uuid> = SessionCache::new(LIMITS, 100);
        let (_, server) = session_pair(LIMITS);
        let id = server.id();
        cache.insert(id, server).await;
        // Used every 50 s for ten minutes: the 60 s idle limit never hits.
        for _ in 0..12 {
            tokio::time::advance(Duration::from_secs(50)).await;
            assert!(cache.get(&id).await.is_some());
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(cache.get(&id).await.is_none());
        cache.run_pending_tasks().await;
        assert_eq!(cache.stats().snapshot().expired, 1);
        assert!(cache.get(&id).await.is_none());
        assert_eq!(cache.stats().snapshot().expired, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_lifetime_ends_even_a_busy_session() {
        let limits = SessionLimits {
            max_lifetime: Duration::from_secs(120),
            ..LIMITS
        };
        let cache: SessionCache<Uuid> = SessionCache::new(limits, 100);
        let (_, server) = session_pair(limits);
        let id = server.id();
        cache.insert(id, server).await;
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(30)).await;
            assert!(cache.get(&id).await.is_some());
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(cache.get(&id).await.is_none());
    }

    #[tokio::test]
    async fn capacity_evicts_and_counts_each_eviction_once() {
        let cache: SessionCache<Uuid> = SessionCache::new(LIMITS, 10);
        for _ in 0..25 {
            let (_, s) = session_pair(LIMITS);
            cache.insert(s.id(), s).await;
            cache.run_pending_tasks().await;
        }
        cache.run_pending_tasks().await;
        assert!(cache.len() <= 10, "{} sessions held", cache.len());
        let stats = cache.stats().snapshot();
        assert_eq!(stats.created, 25);
        assert_eq!(stats.evicted, 25 - cache.len());
        assert_eq!(stats.expired + stats.revoked + stats.replaced, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn each_end_reason_counted_once() {
        let cache: SessionCache<String> = SessionCache::new(LIMITS, 100);
        let ok = |s: Session| async move { Ok::<_, TestError>(s) };
        // Revoked.
        cache
            .get_or_handshake("a", || ok(client_session(LIMITS)))
            .await
            .unwrap();
        assert!(cache.revoke(&"a".into(), EndReason::Revoked).await);
        assert!(!cache.revoke(&"a".into(), EndReason::Revoked).await);
        // Expired (seen by tokio's clock at the next use, then replaced by a new one).
        let first = cache
            .get_or_handshake("b", || ok(client_session(LIMITS)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3000)).await;
        let second = cache
            .get_or_handshake("b", || ok(client_session(LIMITS)))
            .await
            .unwrap();
        assert_ne!(first.id(), second.id());
        assert_eq!(first.end_reason(), Some(EndReason::Expired));
        // Replaced by rekey: the lifetime's 90% mark passes while the session is in use.
        for _ in 0..66 {
            tokio::time::advance(Duration::from_secs(50)).await;
            cache
                .get_or_handshake("b", || ok(client_session(LIMITS)))
                .await
                .unwrap();
        }
        cache.run_pending_tasks().await;
        let s = cache.stats().snapshot();
        assert_eq!(
            (s.revoked, s.expired, s.replaced, s.evicted),
            (1, 1, 1, 0),
            "{s:?}"
        );
        assert_eq!(s.created, 4);
    }

    #[tokio::test]
    async fn rekey_does_not_fail_messages_in_flight_on_the_old_session() {
        let limits = SessionLimits {
            max_messages: 10,
            ..LIMITS
        };
        let cache: SessionCache<String> = SessionCache::new(limits, 100);
        let server_side: SessionCache<Uuid> = SessionCache::new(limits, 100);
        let peer = "billing".to_string();
        let handshake = || async {
            let (c, s) = session_pair(limits);
            server_side.insert(s.id(), s).await;
            Ok::<_, TestError>(Arc::try_unwrap(c).unwrap())
        };
        let old = cache.get_or_handshake(&peer, handshake).await.unwrap();
        // Use 9 of 10 messages; the 9th leaves one in flight across the rekey.
        for _ in 0..8 {
            let server = server_side.get(&old.id()).await.unwrap();
            exchange(&old, &server, b"x");
        }
        let (sealer, in_flight) = old.begin_request().unwrap();
        let new = cache.get_or_handshake(&peer, handshake).await.unwrap();
        assert_ne!(new.id(), old.id());
        assert_eq!(old.state(), SessionState::Closing);
        // The message already started on the old session still completes...
        let server_old = server_side.get(&old.id()).await.unwrap();
        assert_eq!(complete(&old, &server_old, sealer, b"late"), b"late");
        drop(in_flight);
        assert_eq!(old.state(), SessionState::Closed);
        // ...and the new one carries new traffic.
        let server_new = server_side.get(&new.id()).await.unwrap();
        assert_eq!(exchange(&new, &server_new, b"fresh"), b"fresh");
        assert_eq!(new.role(), Role::Client);
        cache.run_pending_tasks().await;
        assert_eq!(cache.stats().snapshot().replaced, 1);
    }

    #[tokio::test]
    async fn failed_handshakes_are_counted_and_not_cached() {
        let cache: SessionCache<String> = SessionCache::new(LIMITS, 100);
        let err = cache
            .get_or_handshake("x", || async { Err::<Session, _>(TestError::Refused) })
            .await
            .unwrap_err();
        assert_eq!(err, TestError::Refused);
        assert_eq!(cache.stats().snapshot().handshakes_failed, 1);
        assert!(cache.get(&"x".into()).await.is_none());
    }
}
