//! Sessions: keys, counters, sealed frames and the session cache (DESIGN §3).
//!
//! A [`Session`] is the pair of AES-256-GCM keys two seams share after a handshake,
//! independent of any TCP/TLS connection. The client side numbers its messages; the
//! server side keeps a replay window. Time is read from `tokio::time::Instant` so that
//! expiry can be tested deterministically with tokio's paused clock.

pub mod cache;
pub mod replay;
pub mod seal;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

use crate::handshake::SessionKeys;
use replay::ReplayWindow;
use seal::{Direction, FrameKey, MessageOpener, MessageSealer};

pub use cache::{SessionCache, SessionStats};

/// Which end of the handshake this seam was.
// Deserialize: the admin API reads these back from query parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
}

/// Why a session ended. Recorded exactly once per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Idle for `idle_ttl`, or older than `max_lifetime`.
    Expired,
    /// Pushed out by `max_sessions`.
    Evicted,
    /// Removed by an operator or by the peer signalling it lost the session.
    Revoked,
    /// Superseded by a fresh session (rekey).
    Replaced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

impl EndReason {
    /// The same word the admin API and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Evicted => "evicted",
            EndReason::Revoked => "revoked",
            EndReason::Replaced => "replaced",
        }
    }
}

/// Lifecycle state shown by the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// At least one message in flight.
    Active,
    /// Usable, nothing in flight.
    Idle,
    /// Ended, but in-flight messages still hold it.
    Closing,
    /// Ended and no longer used.
    Closed,
}

/// The time limits and message limit a session lives under (from `session:` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub idle_ttl: Duration,
    pub max_lifetime: Duration,
    pub max_messages: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("session {0} has used its {1} messages; a new session is needed")]
    MessagesExhausted(Uuid, u64),
    #[error("session {0} has ended ({1:?}); a new session is needed")]
    Ended(Uuid, EndReason),
    #[error("the session cache returned no session; retry the request")]
    Unavailable,
    #[error(transparent)]
    Keys(#[from] seal::SealError),
}

/// Per-session counters, readable without locks.
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    in_flight: AtomicU64,
}

/// Decrements the in-flight count when a message exchange is over, however it ends.
pub struct InFlight(Arc<Session>);

pub struct Session {
    id: Uuid,
    peer: String,
    role: Role,
    limits: SessionLimits,
    /// Key for what this side sends (client: client->server).
    seal_key: Arc<FrameKey>,
    /// Key for what this side receives.
    open_key: Arc<FrameKey>,
    /// Client side: the next message sequence number.
    next_seq: AtomicU64,
    /// Server side: which sequence numbers were already received.
    replay: Arc<Mutex<ReplayWindow>>,
    created: Instant,
    created_at: SystemTime,
    /// Milliseconds from `created` to the last use; atomic so the hot path never locks.
    last_used_ms: AtomicU64,
    counters: SessionCounters,
    ended: OnceLock<EndReason>,
}

/// What the admin API shows of a session: never any key material.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: Uuid,
    pub peer: String,
    pub role: Role,
    pub state: SessionState,
    pub end_reason: Option<EndReason>,
    pub created_unix_ms: u64,
    pub last_activity_unix_ms: u64,
    pub age_seconds: f64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub in_flight: u64,
}

impl Session {
    /// Wraps freshly derived keys; `peer` is the other side's service name.
    pub fn new(
        keys: SessionKeys,
        role: Role,
        peer: &str,
        limits: SessionLimits,
    ) -> Result<Self, SessionError> {
        let c2s = Arc::new(FrameKey::new(&keys.client_to_server)?);
        let s2c = Arc::new(FrameKey::new(&keys.server_to_client)?);
        let (seal_key, open_key) = match role {
            Role::Client => (c2s, s2c),
            Role::Server => (s2c, c2s),
        };
        Ok(Self {
            id: keys.session_id,
            peer: peer.to_owned(),
            role,
            limits,
            seal_key,
            open_key,
            next_seq: AtomicU64::new(0),
            replay: Arc::new(Mutex::new(ReplayWindow::new())),
            created: Instant::now(),
            created_at: SystemTime::now(),
            last_used_ms: AtomicU64::new(0),
            counters: SessionCounters::default(),
            ended: OnceLock::new(),
        })
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        self.ended.get().copied()
    }

    /// Records why the session ended; the first reason wins.
    pub fn mark_ended(&self, reason: EndReason) -> EndReason {
        *self.ended.get_or_init(|| reason)
    }

    /// Records a use now: the sliding idle expiry starts over.
    pub fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.created)
            .as_millis() as u64;
        self.last_used_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last_used(&self) -> Instant {
        self.created + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }

    /// Expired by the idle or the lifetime limit at `now`. The client treats the
    /// limits as a little shorter than the server does, so it never sends on a
    /// session the server is about to drop.
    pub fn is_expired(&self, now: Instant) -> bool {
        let (idle, lifetime) = match self.role {
            Role::Server => (self.limits.idle_ttl, self.limits.max_lifetime),
            Role::Client => (self.limits.idle_ttl.mul_f64(0.9), self.limits.max_lifetime),
        };
        now.saturating_duration_since(self.last_used()) >= idle
            || now.saturating_duration_since(self.created) >= lifetime
    }

    /// Client side: time to make a fresh session (90% of the lifetime or of the
    /// message budget used). The old one keeps serving its in-flight messages.
    pub fn needs_rekey(&self, now: Instant) -> bool {
        let budget = self.limits.max_messages - self.limits.max_messages / 10;
        now.saturating_duration_since(self.created) >= self.limits.max_lifetime.mul_f64(0.9)
            || self.next_seq.load(Ordering::Relaxed) >= budget
    }

    /// Whether a client may start a new message on this session at `now`.
    pub fn is_usable(&self, now: Instant) -> bool {
        self.end_reason().is_none() && !self.is_expired(now) && !self.needs_rekey(now)
    }

    /// Client side: starts a request, returning the sealer for it and its guard.
    pub fn begin_request(self: &Arc<Self>) -> Result<(MessageSealer, InFlight), SessionError> {
        if let Some(reason) = self.end_reason() {
            return Err(SessionError::Ended(self.id, reason));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if seq >= self.limits.max_messages {
            return Err(SessionError::MessagesExhausted(
                self.id,
                self.limits.max_messages,
            ));
        }
        let sealer = MessageSealer::new(
            self.seal_key.clone(),
            self.id,
            Direction::ClientToServer,
            seq,
        );
        Ok((sealer, self.enter()))
    }

    /// Client side: opens the response to request `seq`.
    pub fn response_opener(&self, seq: u64) -> MessageOpener {
        MessageOpener::for_response(self.open_key.clone(), self.id, seq)
    }

    /// Server side: opens an incoming request (replay-checked).
    pub fn request_opener(self: &Arc<Self>) -> (MessageOpener, InFlight) {
        let opener =
            MessageOpener::for_request(self.open_key.clone(), self.id, self.replay.clone());
        (opener, self.enter())
    }

    /// Server side: seals the response to request `seq`.
    pub fn response_sealer(&self, seq: u64) -> Result<MessageSealer, SessionError> {
        if seq >= self.limits.max_messages {
            return Err(SessionError::MessagesExhausted(
                self.id,
                self.limits.max_messages,
            ));
        }
        Ok(MessageSealer::new(
            self.seal_key.clone(),
            self.id,
            Direction::ServerToClient,
            seq,
        ))
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        self.touch();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn state(self: &Arc<Self>) -> SessionState {
        match (
            self.end_reason(),
            self.counters.in_flight.load(Ordering::Relaxed),
        ) {
            (Some(_), 0) => SessionState::Closed,
            (Some(_), _) => SessionState::Closing,
            (None, 0) => SessionState::Idle,
            (None, _) => SessionState::Active,
        }
    }

    pub fn info(self: &Arc<Self>) -> SessionInfo {
        let unix_ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let last_used = Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        let c = &self.counters;
        SessionInfo {
            id: self.id,
            peer: self.peer.clone(),
            role: self.role,
            state: self.state(),
            end_reason: self.end_reason(),
            created_unix_ms: unix_ms(self.created_at),
            last_activity_unix_ms: unix_ms(self.created_at + last_used),
            age_seconds: self.created.elapsed().as_secs_f64(),
            requests: c.requests.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("role", &self.role)
            .field("ended", &self.end_reason())
            .finish_non_exhaustive()
    }
}

impl SessionCounters {
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::handshake::{ClientHandshake, respond};

    pub(crate) const LIMITS: SessionLimits = SessionLimits {
        idle_ttl: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        max_messages: 1000,
    };

    /// A real handshake between orders (client) and billing (server).
    pub(crate) fn session_pair(limits: SessionLimits) -> (Arc<Session>, Arc<Session>) {
        let (c, hello) =
            ClientHandshake::start("spiffe://mesh.local/orders", "spiffe://mesh.local/billing")
                .unwrap();
        let (reply, server_keys) = respond(
            &hello,
            "spiffe://mesh.local/orders",
            "spiffe://mesh.local/billing",
        )
        .unwrap();
        let client_keys = c.finish(&reply).unwrap();
        (
            Arc::new(Session::new(client_keys, Role::Client, "billing", limits).unwrap()),
            Arc::new(Session::new(server_keys, Role::Server, "orders", limits).unwrap()),
        )
    }

    /// One request and its response, sealed and opened by the two real sessions.
    pub(crate) fn exchange(client: &Arc<Session>, server: &Arc<Session>, body: &[u8]) -> Vec<u8> {
        let (sealer, _guard) = client.begin_request().unwrap();
        complete(client, server, sealer, body)
    }

    /// Finishes a request begun with `sealer` and returns the echoed response body.
    pub(crate) fn complete(
        client: &Arc<Session>,
        server: &Arc<Session>,
        mut sealer: MessageSealer,
        body: &[u8],
    ) -> Vec<u8> {
        use bytes::{Buf, BytesMut};
        use seal::{FrameHeader, FrameKind, HEADER_LEN};
        let open_all = |o: &mut MessageOpener, mut wire: BytesMut| {
            let mut out = Vec::new();
            while !wire.is_empty() {
                let h = FrameHeader::decode(&wire).unwrap();
                wire.advance(HEADER_LEN);
                let f = o.open(&h, wire.split_to(h.sealed_len as usize)).unwrap();
                if f.kind == FrameKind::Data {
                    out.extend_from_slice(&f.payload);
                }
            }
            out
        };
        let seq = sealer.seq();
        let mut wire = BytesMut::new();
        sealer.seal(FrameKind::Head, b"POST /", &mut wire).unwrap();
        sealer.seal(FrameKind::Data, body, &mut wire).unwrap();
        sealer.finish(&mut wire).unwrap();
        let (mut opener, _g) = server.request_opener();
        let got = open_all(&mut opener, wire);
        let mut reply = server.response_sealer(opener.seq().unwrap()).unwrap();
        let mut wire = BytesMut::new();
        reply.seal(FrameKind::Head, b"200", &mut wire).unwrap();
        reply.seal(FrameKind::Data, &got, &mut wire).unwrap();
        reply.finish(&mut wire).unwrap();
        open_all(&mut client.response_opener(seq), wire)
    }

    #[tokio::test]
    async fn sessions_from_one_handshake_talk_both_ways() {
        let (c, s) = session_pair(LIMITS);
        assert_eq!(c.id(), s.id());
        assert_eq!(exchange(&c, &s, b"ping"), b"ping");
        assert_eq!(exchange(&c, &s, b"pong"), b"pong");
        assert_eq!(c.counters().requests.load(Ordering::Relaxed), 2);
        assert_eq!(s.counters().requests.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn in_flight_guard_drives_active_and_idle() {
        let (c, _) = session_pair(LIMITS);
        assert_eq!(c.state(), SessionState::Idle);
        let (_sealer, guard) = c.begin_request().unwrap();
        assert_eq!(c.state(), SessionState::Active);
        c.mark_ended(EndReason::Replaced);
        assert_eq!(c.state(), SessionState::Closing);
        drop(guard);
        assert_eq!(c.state(), SessionState::Closed);
        assert_eq!(c.mark_ended(EndReason::Expired), EndReason::Replaced);
    }

    #[tokio::test]
    async fn message_budget_is_enforced_and_triggers_rekey_first() {
        let limits = SessionLimits {
            max_messages: 10,
            ..LIMITS
        };
        let (c, _) = session_pair(limits);
        let now = Instant::now();
        for _ in 0..9 {
            assert!(!c.needs_rekey(now));
            c.begin_request().unwrap();
        }
        assert!(c.needs_rekey(now));
        c.begin_request().unwrap();
        assert!(matches!(
            c.begin_request(),
            Err(SessionError::MessagesExhausted(_, 10))
        ));
    }

    #[test]
    fn info_and_debug_carry_no_key_material() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, _) = session_pair(LIMITS);
            let json = serde_json::to_string(&c.info()).unwrap();
            assert!(json.contains(&c.id().to_string()));
            assert!(!json.contains("key"));
            assert!(!format!("{c:?}").contains("key"));
        });
    }
}
