//! Sealed messages: length-prefixed AES-256-GCM frames (DESIGN §3).
//!
//! A message (one request or one response) is a stream of frames:
//! `Head`, any number of `Data`, at most one `Trailers`, then `End`. Each frame is
//!
//! ```text
//! +---------+------+-------+------------+---------+---------+----------------------+
//! | len u32 | kind | flags | session id |  seq    |  index  | ciphertext  |  tag   |
//! |   BE    |  u8  |  u8   |  16 bytes  | u64 BE  | u32 BE  |  len - 16   |  16    |
//! +---------+------+-------+------------+---------+---------+----------------------+
//!  \_______________________ header: 34 bytes, all of it AAD ____/
//! ```
//!
//! `flags` bit 0 marks the final frame, bit 1 the server->client direction. The nonce
//! is `seq (8 bytes) || index | final << 31 (4 bytes)`: unique per direction key
//! because the sender never reuses a (seq, index) pair, and never random. Because the
//! whole header is associated data, a receiver that checks the clear header against
//! what it expects can tell *why* a frame is wrong (another session, a dropped or
//! reordered frame, a cut stream) before the tag check says *that* it is wrong.
//!
//! Frames carry at most [`MAX_PAYLOAD`] bytes, so a decoder's memory is bounded by
//! one frame whatever the body size.

use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

use super::replay::{ReplayError, ReplayWindow};

pub const HEADER_LEN: usize = 4 + 1 + 1 + 16 + 8 + 4;
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one frame. 64 KiB keeps per-frame overhead (50 bytes) under
/// 0.1% for bulk data while bounding what a receiver must buffer.
pub const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_INDEX: u32 = (1 << 31) - 1;

const FLAG_FINAL: u8 = 0b01;
const FLAG_SERVER_TO_CLIENT: u8 = 0b10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Head = 1,
    Data = 2,
    Trailers = 3,
    End = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "frame {index} of message {seq} failed authentication: its bytes were altered in transit"
    )]
    Tampered { seq: u64, index: u32 },
    #[error("frame belongs to session {got}, not to this message's session {expected}")]
    CrossSession { expected: Uuid, got: Uuid },
    #[error("frame was sealed for the opposite direction (a reflected frame)")]
    WrongDirection,
    #[error("frame belongs to message {got}, but message {expected} is being read")]
    MixedMessages { expected: u64, got: u64 },
    #[error(
        "frame {got} arrived where frame {expected} was due: frames were reordered or repeated"
    )]
    Reordered { expected: u32, got: u32 },
    #[error("frame {got} arrived where frame {expected} was due: frames were dropped")]
    Dropped { expected: u32, got: u32 },
    #[error("the message stream ended before its final frame: it was truncated")]
    Truncated,
    #[error("a frame followed the final frame of the message")]
    AfterEnd,
    #[error("a {got:?} frame cannot follow a {after:?} frame")]
    UnexpectedKind {
        got: FrameKind,
        after: Option<FrameKind>,
    },
    #[error("frame of {len} sealed bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed frame header: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("message is too long: more than 2^31 frames")]
    TooManyFrames,
    #[error("the sealing key refused the frame (payload too long for AES-GCM)")]
    Seal,
    #[error(
        "aws-lc could not set up the session's AES-256-GCM key (out of memory?); the session \
         was not made: give the process more memory or restart it"
    )]
    KeySetup,
    #[error("the sealed stream could not be read or written: {0}")]
    Io(String),
}

impl SealError {
    /// A short fixed name per variant, for counters and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SealError::Tampered { .. } => "tampered",
            SealError::CrossSession { .. } => "cross-session",
            SealError::WrongDirection => "wrong-direction",
            SealError::MixedMessages { .. } => "mixed-messages",
            SealError::Reordered { .. } => "reordered",
            SealError::Dropped { .. } => "dropped",
            SealError::Truncated => "truncated",
            SealError::AfterEnd => "after-end",
            SealError::UnexpectedKind { .. } => "unexpected-kind",
            SealError::FrameTooLarge { .. } => "frame-too-large",
            SealError::Malformed(_) => "malformed",
            SealError::Replay(_) => "replay",
            SealError::TooManyFrames => "too-many-frames",
            SealError::Seal => "seal",
            SealError::KeySetup => "key-setup",
            SealError::Io(_) => "io",
        }
    }
}

/// One direction's AES-256-GCM key, in aws-lc: the implementation rustls already runs
/// for the TLS records, chosen over RustCrypto's `aes-gcm` for speed (README, Design
/// decisions); the frames are plain AES-256-GCM either way, which a unit test checks
/// against `aes-gcm`. aws-lc keeps the
/// key schedule in its own allocation and wipes it when the key is dropped
/// (`OPENSSL_free` cleanses); the key is never printed.
pub struct FrameKey(LessSafeKey);

/// The clear part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub sealed_len: u32,
    pub kind: FrameKind,
    pub last: bool,
    pub direction: Direction,
    pub session_id: Uuid,
    pub seq: u64,
    pub index: u32,
}

/// An opened frame: its kind and plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFrame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

/// Seals the frames of one message, in order.
pub struct MessageSealer {
    key: Arc<FrameKey>,
    session_id: Uuid,
    direction: Direction,
    seq: u64,
    next_index: u32,
    last_kind: Option<FrameKind>,
}

/// Opens and checks the frames of one message, in order.
pub struct MessageOpener {
    key: Arc<FrameKey>,
    session_id: Uuid,
    direction: Direction,
    /// Known up front by a client reading a response; learnt from the first
    /// (authenticated) frame by a server reading a request.
    seq: Option<u64>,
    /// Set on the server side: the first frame's seq must be new to the session.
    replay: Option<Arc<Mutex<ReplayWindow>>>,
    next_index: u32,
    last_kind: Option<FrameKind>,
}

/// Splits a byte stream into sealed frames (clear header + sealed bytes), bounded by
/// [`MAX_PAYLOAD`].
#[derive(Debug, Default)]
pub struct FrameSplitter;

/// A tokio-util codec that seals `(kind, payload)` frames of one message.
pub struct SealCodec(pub MessageSealer);

/// A tokio-util codec that reads frames of one message and opens them.
pub struct OpenCodec(pub MessageOpener);

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Head),
            2 => Some(Self::Data),
            3 => Some(Self::Trailers),
            4 => Some(Self::End),
            _ => None,
        }
    }

    /// The message grammar: Head Data* Trailers? End.
    fn may_follow(self, previous: Option<FrameKind>) -> bool {
        use FrameKind::*;
        matches!(
            (previous, self),
            (None, Head)
                | (Some(Head | Data), Data)
                | (Some(Head | Data), Trailers)
                | (Some(Head | Data | Trailers), End)
        )
    }
}

impl FrameKey {
    pub fn new(key: &[u8; 32]) -> Result<Self, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::KeySetup)?;
        Ok(Self(LessSafeKey::new(key)))
    }
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

impl FrameHeader {
    fn encode(&self, out: &mut [u8]) {
        let mut flags = 0;
        if self.last {
            flags |= FLAG_FINAL;
        }
        if self.direction == Direction::ServerToClient {
            flags |= FLAG_SERVER_TO_CLIENT;
        }
        out[0..4].copy_from_slice(&self.sealed_len.to_be_bytes());
        out[4] = self.kind as u8;
        out[5] = flags;
        out[6..22].copy_from_slice(self.session_id.as_bytes());
        out[22..30].copy_from_slice(&self.seq.to_be_bytes());
        out[30..34].copy_from_slice(&self.index.to_be_bytes());
    }

    /// Parses a clear header. Never panics; `bytes` must hold at least HEADER_LEN.
    pub fn decode(bytes: &[u8]) -> Result<Self, SealError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(SealError::Malformed("header shorter than 34 bytes"));
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(&h[0..4]);
        let kind = FrameKind::from_u8(h[4]).ok_or(SealError::Malformed("unknown frame kind"))?;
        let flags = h[5];
        if flags & !(FLAG_FINAL | FLAG_SERVER_TO_CLIENT) != 0 {
            return Err(SealError::Malformed("reserved flag bits set"));
        }
        let last = flags & FLAG_FINAL != 0;
        if last != (kind == FrameKind::End) {
            return Err(SealError::Malformed("only the End frame is final"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[6..22]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[22..30]);
        let mut index = [0u8; 4];
        index.copy_from_slice(&h[30..34]);
        let sealed_len = u32::from_be_bytes(len);
        if (sealed_len as usize) < TAG_LEN {
            return Err(SealError::Malformed("sealed length shorter than the tag"));
        }
        Ok(Self {
            sealed_len,
            kind,
            last,
            direction: if flags & FLAG_SERVER_TO_CLIENT != 0 {
                Direction::ServerToClient
            } else {
                Direction::ClientToServer
            },
            session_id: Uuid::from_bytes(id),
            seq: u64::from_be_bytes(seq),
            index: u32::from_be_bytes(index),
        })
    }

    fn nonce_bytes(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&self.seq.to_be_bytes());
        let tail = self.index | if self.last { 1 << 31 } else { 0 };
        n[8..].copy_from_slice(&tail.to_be_bytes());
        n
    }

    /// The header as sent, which each frame's AEAD authenticates.
    fn aad(&self) -> [u8; HEADER_LEN] {
        let mut aad = [0u8; HEADER_LEN];
        self.encode(&mut aad);
        aad
    }

    /// Unique per key by construction (see the module docs), never random.
    fn nonce(&self) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes())
    }
}

impl MessageSealer {
    pub fn new(key: Arc<FrameKey>, session_id: Uuid, direction: Direction, seq: u64) -> Self {
        Self {
            key,
            session_id,
            direction,
            seq,
            next_index: 0,
            last_kind: None,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn is_finished(&self) -> bool {
        self.last_kind == Some(FrameKind::End)
    }

    /// Seals `payload` as frames of `kind` onto `dst`. Data longer than MAX_PAYLOAD is
    /// split into several frames; Head and Trailers must fit in one.
    pub fn seal(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), SealError> {
        if kind == FrameKind::Data && payload.len() > MAX_PAYLOAD {
            for chunk in payload.chunks(MAX_PAYLOAD) {
                self.seal_one(kind, chunk, dst)?;
            }
            return Ok(());
        }
        self.seal_one(kind, payload, dst)
    }

    /// Seals the final frame.
    pub fn finish(&mut self, dst: &mut BytesMut) -> Result<(), SealError> {
        self.seal_one(FrameKind::End, &[], dst)
    }

    fn seal_one(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), SealError> {
        if self.is_finished() {
            return Err(SealError::AfterEnd);
        }
        if !kind.may_follow(self.last_kind) {
            return Err(SealError::UnexpectedKind {
                got: kind,
                after: self.last_kind,
            });
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(SealError::FrameTooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        if self.next_index > MAX_INDEX {
            return Err(SealError::TooManyFrames);
        }
        let header = FrameHeader {
            sealed_len: (payload.len() + TAG_LEN) as u32,
            kind,
            last: kind == FrameKind::End,
            direction: self.direction,
            session_id: self.session_id,
            seq: self.seq,
            index: self.next_index,
        };
        // Encrypt from the caller's bytes straight into the frame: one pass over the
        // payload. Copying it in first and sealing in place cost a second pass, the
        // largest one for big bodies (the copy alone ran at AES speed, benches/RESULTS.md).
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN + payload.len() + TAG_LEN);
        let (aad, sealed) = dst[start..].split_at_mut(HEADER_LEN);
        header.encode(aad);
        self.key
            .0
            .seal_in_place_scatter(header.nonce(), Aad::from(&*aad), &mut [], payload, sealed)
            .map_err(|_| SealError::Seal)?;
        self.next_index += 1;
        self.last_kind = Some(kind);
        Ok(())
    }
}

impl MessageOpener {
    /// For a client reading the response to its message `seq`.
    pub fn for_response(key: Arc<FrameKey>, session_id: Uuid, seq: u64) -> Self {
        Self {
            key,
            session_id,
            direction: Direction::ServerToClient,
            seq: Some(seq),
            replay: None,
            next_index: 0,
            last_kind: None,
        }
    }

    /// For a server reading a request; the sequence number is checked against the
    /// session's replay window once the first frame is authenticated.
    pub fn for_request(
        key: Arc<FrameKey>,
        session_id: Uuid,
        replay: Arc<Mutex<ReplayWindow>>,
    ) -> Self {
        Self {
            key,
            session_id,
            direction: Direction::ClientToServer,
            seq: None,
            replay: Some(replay),
            next_index: 0,
            last_kind: None,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.last_kind == Some(FrameKind::End)
    }

    /// The message's sequence number, once known.
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// Checks one frame's clear header against what this message expects, then opens
    /// it in place. `sealed` holds exactly the ciphertext and tag.
    pub fn open(
        &mut self,
        header: &FrameHeader,
        mut sealed: BytesMut,
    ) -> Result<OpenedFrame, SealError> {
        self.check(header, sealed.len())?;
        let tag_at = sealed.len() - TAG_LEN;
        let (ciphertext, tag) = sealed.split_at_mut(tag_at);
        let opened = self.key.0.open_in_place_separate_tag(
            header.nonce(),
            Aad::from(header.aad()),
            tag,
            ciphertext,
        );
        self.accept(header, opened.map(|_| ()))?;
        sealed.truncate(tag_at);
        Ok(OpenedFrame {
            kind: header.kind,
            payload: sealed.freeze(),
        })
    }

    /// Like [`Self::open`] for a frame that lies in a buffer shared with other data (a
    /// slice of the transport's read buffer): decrypts into a new buffer in one pass,
    /// where opening in place would first copy the frame out.
    pub fn open_shared(
        &mut self,
        header: &FrameHeader,
        sealed: &[u8],
    ) -> Result<OpenedFrame, SealError> {
        self.check(header, sealed.len())?;
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut plain = BytesMut::zeroed(ciphertext.len());
        let opened = self.key.0.open_separate_gather(
            header.nonce(),
            Aad::from(header.aad()),
            ciphertext,
            tag,
            &mut plain,
        );
        self.accept(header, opened)?;
        Ok(OpenedFrame {
            kind: header.kind,
            payload: plain.freeze(),
        })
    }

    /// What can be judged before decrypting: the frame belongs to this message, comes
    /// next, and is as long as it says.
    fn check(&self, header: &FrameHeader, sealed_len: usize) -> Result<(), SealError> {
        if self.is_finished() {
            return Err(SealError::AfterEnd);
        }
        if header.session_id != self.session_id {
            return Err(SealError::CrossSession {
                expected: self.session_id,
                got: header.session_id,
            });
        }
        if header.direction != self.direction {
            return Err(SealError::WrongDirection);
        }
        if let Some(seq) = self.seq
            && header.seq != seq
        {
            return Err(SealError::MixedMessages {
                expected: seq,
                got: header.seq,
            });
        }
        if header.index < self.next_index {
            return Err(SealError::Reordered {
                expected: self.next_index,
                got: header.index,
            });
        }
        if header.index > self.next_index {
            // Index 0 is the Head: a message whose first frame is missing was cut at
            // the front, which is the same fault as losing a frame in the middle.
            return Err(SealError::Dropped {
                expected: self.next_index,
                got: header.index,
            });
        }
        if sealed_len != header.sealed_len as usize {
            return Err(SealError::Malformed("sealed length does not match header"));
        }
        Ok(())
    }

    /// Takes the decryption's verdict, then what only an authenticated frame may do:
    /// consume its sequence number and advance the message's grammar.
    fn accept(
        &mut self,
        header: &FrameHeader,
        opened: Result<(), aws_lc_rs::error::Unspecified>,
    ) -> Result<(), SealError> {
        opened.map_err(|_| SealError::Tampered {
            seq: header.seq,
            index: header.index,
        })?;
        // Only an authenticated frame may consume a sequence number, or a forger could
        // burn the window with junk.
        if self.seq.is_none() {
            if let Some(replay) = &self.replay {
                replay
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .accept(header.seq)?;
            }
            self.seq = Some(header.seq);
        }
        // Grammar is checked after authentication: a valid tag on a bad order is a
        // sender bug or a splice, not line noise.
        if !header.kind.may_follow(self.last_kind) {
            return Err(SealError::UnexpectedKind {
                got: header.kind,
                after: self.last_kind,
            });
        }
        self.next_index += 1;
        self.last_kind = Some(header.kind);
        Ok(())
    }
}

impl From<std::io::Error> for SealError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

impl FrameSplitter {
    /// The header of the frame at the start of `src` and its whole length, once `src`
    /// holds all of it.
    pub fn complete(src: &[u8]) -> Result<Option<(FrameHeader, usize)>, SealError> {
        let Some(head) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head)?;
        let sealed_len = header.sealed_len as usize;
        if sealed_len > MAX_PAYLOAD + TAG_LEN {
            return Err(SealError::FrameTooLarge {
                len: sealed_len,
                max: MAX_PAYLOAD + TAG_LEN,
            });
        }
        let total = HEADER_LEN + sealed_len;
        Ok((src.len() >= total).then_some((header, total)))
    }
}

impl Decoder for FrameSplitter {
    type Item = (FrameHeader, BytesMut);
    type Error = SealError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, SealError> {
        match Self::complete(src)? {
            Some((header, total)) => {
                src.advance(HEADER_LEN);
                Ok(Some((header, src.split_to(total - HEADER_LEN))))
            }
            None => {
                // Room for the rest of the frame: its header says how long it is.
                let wanted = match FrameHeader::decode(src) {
                    Ok(h) => HEADER_LEN + h.sealed_len as usize,
                    Err(_) => HEADER_LEN,
                };
                src.reserve(wanted.saturating_sub(src.len()));
                Ok(None)
            }
        }
    }
}

impl Encoder<(FrameKind, Bytes)> for SealCodec {
    type Error = SealError;

    fn encode(
        &mut self,
        (kind, payload): (FrameKind, Bytes),
        dst: &mut BytesMut,
    ) -> Result<(), SealError> {
        self.0.seal(kind, &payload, dst)
    }
}

impl Decoder for OpenCodec {
    type Item = OpenedFrame;
    type Error = SealError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<OpenedFrame>, SealError> {
        match FrameSplitter.decode(src)? {
            Some((header, sealed)) => self.0.open(&header, sealed).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<OpenedFrame>, SealError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && self.0.is_finished() => Ok(None),
            None => Err(SealError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};
    use tokio_util::codec::{FramedRead, FramedWrite};

    struct Pair {
        id: Uuid,
        key: Arc<FrameKey>,
        raw_key: [u8; 32],
    }

    fn pair() -> Pair {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).unwrap();
        Pair {
            id: Uuid::now_v7(),
            key: Arc::new(FrameKey::new(&k).expect("a 32-byte key")),
            raw_key: k,
        }
    }

    /// The same key in RustCrypto's independent AES-256-GCM.
    fn reference_cipher(p: &Pair) -> aes_gcm::Aes256Gcm {
        use aes_gcm::aead::KeyInit;
        aes_gcm::Aes256Gcm::new(&p.raw_key.into())
    }

    fn sealer(p: &Pair, seq: u64) -> MessageSealer {
        MessageSealer::new(p.key.clone(), p.id, Direction::ClientToServer, seq)
    }

    fn opener(p: &Pair) -> MessageOpener {
        MessageOpener::for_request(
            p.key.clone(),
            p.id,
            Arc::new(Mutex::new(ReplayWindow::new())),
        )
    }

    /// Seals a whole message: head, the body in chunks, trailers, end.
    fn seal_message(p: &Pair, seq: u64, body: &[u8], chunk: usize) -> BytesMut {
        let mut s = sealer(p, seq);
        let mut out = BytesMut::new();
        s.seal(FrameKind::Head, b"GET / HTTP/1.1", &mut out)
            .unwrap();
        for c in body.chunks(chunk.max(1)) {
            s.seal(FrameKind::Data, c, &mut out).unwrap();
        }
        s.seal(FrameKind::Trailers, b"grpc-status: 0", &mut out)
            .unwrap();
        s.finish(&mut out).unwrap();
        out
    }

    /// Splits a sealed message into its frames' raw bytes.
    fn frames(mut wire: BytesMut) -> Vec<BytesMut> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            let h = FrameHeader::decode(&wire).unwrap();
            out.push(wire.split_to(HEADER_LEN + h.sealed_len as usize));
        }
        out
    }

    fn open_all(
        o: &mut MessageOpener,
        frames: Vec<BytesMut>,
    ) -> Result<Vec<OpenedFrame>, SealError> {
        let mut codec = OpenCodec(std::mem::replace(o, opener(&pair())));
        let mut buf = BytesMut::new();
        for f in frames {
            buf.extend_from_slice(&f);
        }
        let mut out = Vec::new();
        while let Some(f) = codec.decode_eof(&mut buf)? {
            out.push(f);
        }
        *o = codec.0;
        Ok(out)
    }

    fn body_of(frames: &[OpenedFrame]) -> Vec<u8> {
        frames
            .iter()
            .filter(|f| f.kind == FrameKind::Data)
            .flat_map(|f| f.payload.iter().copied())
            .collect()
    }

    /// The frames are standard AES-256-GCM with the documented nonce and AAD: an
    /// independent implementation opens what seam seals, and seam opens what it seals.
    #[test]
    fn frames_are_plain_aes_256_gcm_in_both_directions() {
        use aes_gcm::aead::AeadInOut;
        let p = pair();
        let reference = reference_cipher(&p);
        let body: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut opened = Vec::new();
        for frame in frames(seal_message(&p, 3, &body, 65_536)) {
            let header = FrameHeader::decode(&frame).unwrap();
            let (aad, sealed) = frame.split_at(HEADER_LEN);
            let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            let mut plain = ciphertext.to_vec();
            reference
                .decrypt_inout_detached(
                    &header.nonce_bytes().into(),
                    aad,
                    plain.as_mut_slice().into(),
                    &aes_gcm::Tag::try_from(tag).unwrap(),
                )
                .expect("RustCrypto opens seam's frame");
            if header.kind == FrameKind::Data {
                opened.extend_from_slice(&plain);
            }
        }
        assert_eq!(opened, body);

        // And back: a Head frame sealed by the reference opens in seam, and one flipped
        // tag bit makes seam refuse it.
        let header = FrameHeader {
            sealed_len: (5 + TAG_LEN) as u32,
            kind: FrameKind::Head,
            last: false,
            direction: Direction::ClientToServer,
            session_id: p.id,
            seq: 9,
            index: 0,
        };
        let mut frame = vec![0u8; HEADER_LEN];
        header.encode(&mut frame);
        let mut payload = *b"hello";
        let tag = reference
            .encrypt_inout_detached(
                &header.nonce_bytes().into(),
                &frame,
                payload.as_mut_slice().into(),
            )
            .unwrap();
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(&tag);
        let mut tampered = frame.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let got = opener(&p)
            .open(&header, BytesMut::from(&frame[HEADER_LEN..]))
            .unwrap();
        assert_eq!(&got.payload[..], b"hello");
        assert!(matches!(
            opener(&p).open(&header, BytesMut::from(&tampered[HEADER_LEN..])),
            Err(SealError::Tampered { .. })
        ));
    }

    #[test]
    fn round_trip_small_bodies() {
        for size in [0usize, 1, 16 * 1024] {
            let p = pair();
            let body: Vec<u8> = (0..size).map(|i| (i * 31) as u8).collect();
            let wire = seal_message(&p, 1, &body, 16 * 1024);
            let opened = open_all(&mut opener(&p), frames(wire)).unwrap();
            assert_eq!(opened.first().unwrap().kind, FrameKind::Head);
            assert_eq!(opened.last().unwrap().kind, FrameKind::End);
            assert_eq!(body_of(&opened), body, "size {size}");
        }
    }

    #[test]
    fn large_data_is_split_into_bounded_frames() {
        let p = pair();
        let body = vec![7u8; MAX_PAYLOAD * 3 + 5];
        let mut s = sealer(&p, 9);
        let mut out = BytesMut::new();
        s.seal(FrameKind::Head, b"h", &mut out).unwrap();
        s.seal(FrameKind::Data, &body, &mut out).unwrap();
        s.finish(&mut out).unwrap();
        let fs = frames(out);
        assert_eq!(fs.len(), 1 + 4 + 1);
        assert!(
            fs.iter()
                .all(|f| f.len() <= HEADER_LEN + MAX_PAYLOAD + TAG_LEN)
        );
        assert_eq!(body_of(&open_all(&mut opener(&p), fs).unwrap()), body);
    }

    #[test]
    fn flipped_bits_anywhere_in_the_sealed_part_are_tampering() {
        let p = pair();
        let wire = seal_message(&p, 1, b"hello world", 4);
        let fs = frames(wire);
        for victim in 0..fs.len() {
            for pos in [HEADER_LEN, fs[victim].len() - 1] {
                let mut copy = fs.clone();
                copy[victim][pos] ^= 0x01;
                let err = open_all(&mut opener(&p), copy).unwrap_err();
                assert_eq!(
                    err,
                    SealError::Tampered {
                        seq: 1,
                        index: victim as u32
                    }
                );
            }
        }
    }

    #[test]
    fn a_frame_in_a_shared_buffer_opens_as_in_place_and_tampering_shows_there_too() {
        let p = pair();
        let body: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let fs = frames(seal_message(&p, 5, &body, 30_000));
        let in_place = open_all(&mut opener(&p), fs.clone()).unwrap();
        let mut shared = opener(&p);
        for (i, frame) in fs.iter().enumerate() {
            let header = FrameHeader::decode(frame).unwrap();
            let mut tampered = frame.to_vec();
            *tampered.last_mut().unwrap() ^= 1;
            assert_eq!(
                shared
                    .open_shared(&header, &tampered[HEADER_LEN..])
                    .unwrap_err(),
                SealError::Tampered {
                    seq: 5,
                    index: i as u32
                }
            );
            // Refused without consuming anything: the true frame still opens.
            let opened = shared.open_shared(&header, &frame[HEADER_LEN..]).unwrap();
            assert_eq!(opened.kind, in_place[i].kind);
            assert_eq!(opened.payload, in_place[i].payload);
        }
        assert!(shared.is_finished());
    }

    #[test]
    fn a_lying_clear_header_fails_authentication() {
        // The clear header is AAD: changing the kind of a Data frame to Trailers (both
        // legal at that point) must not go unnoticed.
        let p = pair();
        let mut fs = frames(seal_message(&p, 1, b"abc", 3));
        fs[1][4] = FrameKind::Trailers as u8;
        assert!(matches!(
            open_all(&mut opener(&p), fs),
            Err(SealError::Tampered { index: 1, .. })
        ));
    }

    #[test]
    fn reordered_frames_detected() {
        let p = pair();
        let mut fs = frames(seal_message(&p, 1, b"abcdef", 2));
        fs.swap(1, 2);
        assert_eq!(
            open_all(&mut opener(&p), fs).unwrap_err(),
            SealError::Dropped {
                expected: 1,
                got: 2
            }
        );
        let mut fs = frames(seal_message(&p, 2, b"abcdef", 2));
        let dup = fs[1].clone();
        fs.insert(2, dup);
        assert_eq!(
            open_all(&mut opener(&p), fs).unwrap_err(),
            SealError::Reordered {
                expected: 2,
                got: 1
            }
        );
    }

    #[test]
    fn dropped_frame_detected() {
        let p = pair();
        let mut fs = frames(seal_message(&p, 1, b"abcdef", 2));
        fs.remove(2);
        assert_eq!(
            open_all(&mut opener(&p), fs).unwrap_err(),
            SealError::Dropped {
                expected: 2,
                got: 3
            }
        );
    }

    #[test]
    fn truncated_stream_detected() {
        let p = pair();
        let fs = frames(seal_message(&p, 1, b"abcdef", 2));
        // Cut before the End frame, and cut in the middle of a frame.
        let n = fs.len();
        assert_eq!(
            open_all(&mut opener(&p), fs[..n - 1].to_vec()).unwrap_err(),
            SealError::Truncated
        );
        let mut partial = fs[..2].to_vec();
        partial[1].truncate(HEADER_LEN + 3);
        assert_eq!(
            open_all(&mut opener(&p), partial).unwrap_err(),
            SealError::Truncated
        );
    }

    #[test]
    fn cross_session_and_reflected_frames_detected() {
        let a = pair();
        let b = pair();
        let fs = frames(seal_message(&a, 1, b"x", 1));
        assert_eq!(
            open_all(&mut opener(&b), fs).unwrap_err(),
            SealError::CrossSession {
                expected: b.id,
                got: a.id
            }
        );
        // A server->client frame fed back to the server.
        let mut s = MessageSealer::new(a.key.clone(), a.id, Direction::ServerToClient, 1);
        let mut out = BytesMut::new();
        s.seal(FrameKind::Head, b"200", &mut out).unwrap();
        assert_eq!(
            open_all(&mut opener(&a), frames(out)).unwrap_err(),
            SealError::WrongDirection
        );
    }

    #[test]
    fn frames_spliced_from_another_message_detected() {
        let p = pair();
        let m1 = frames(seal_message(&p, 1, b"aa", 1));
        let m2 = frames(seal_message(&p, 2, b"bb", 1));
        let spliced = vec![m1[0].clone(), m2[1].clone()];
        assert_eq!(
            open_all(&mut opener(&p), spliced).unwrap_err(),
            SealError::MixedMessages {
                expected: 1,
                got: 2
            }
        );
    }

    #[test]
    fn replayed_message_rejected_and_out_of_order_accepted_once() {
        let p = pair();
        let window = Arc::new(Mutex::new(ReplayWindow::new()));
        let open = |wire: BytesMut| {
            let mut o = MessageOpener::for_request(p.key.clone(), p.id, window.clone());
            open_all(&mut o, frames(wire))
        };
        let m5 = seal_message(&p, 5, b"five", 4);
        let m3 = seal_message(&p, 3, b"three", 4);
        open(m5.clone()).unwrap();
        open(m3.clone()).unwrap(); // earlier message, later arrival: accepted once
        assert_eq!(
            open(m5).unwrap_err(),
            SealError::Replay(ReplayError::Replayed(5))
        );
        assert_eq!(
            open(m3).unwrap_err(),
            SealError::Replay(ReplayError::Replayed(3))
        );
    }

    #[test]
    fn forged_frames_do_not_consume_sequence_numbers() {
        let p = pair();
        let window = Arc::new(Mutex::new(ReplayWindow::new()));
        let mut forged = frames(seal_message(&p, 7, b"x", 1));
        forged[0][HEADER_LEN] ^= 0xff;
        let mut o = MessageOpener::for_request(p.key.clone(), p.id, window.clone());
        assert!(matches!(
            open_all(&mut o, forged),
            Err(SealError::Tampered { .. })
        ));
        let mut o = MessageOpener::for_request(p.key.clone(), p.id, window);
        open_all(&mut o, frames(seal_message(&p, 7, b"x", 1))).unwrap();
    }

    #[test]
    fn grammar_is_enforced_on_both_sides() {
        let p = pair();
        let mut s = sealer(&p, 1);
        let mut out = BytesMut::new();
        assert!(matches!(
            s.seal(FrameKind::Data, b"x", &mut out),
            Err(SealError::UnexpectedKind {
                got: FrameKind::Data,
                after: None
            })
        ));
        s.seal(FrameKind::Head, b"h", &mut out).unwrap();
        s.finish(&mut out).unwrap();
        assert_eq!(
            s.seal(FrameKind::Data, b"x", &mut out),
            Err(SealError::AfterEnd)
        );
    }

    #[test]
    fn oversized_frames_rejected_before_buffering() {
        let p = pair();
        let h = FrameHeader {
            sealed_len: (MAX_PAYLOAD + TAG_LEN + 1) as u32,
            kind: FrameKind::Data,
            last: false,
            direction: Direction::ClientToServer,
            session_id: p.id,
            seq: 1,
            index: 1,
        };
        let mut buf = BytesMut::zeroed(HEADER_LEN);
        h.encode(&mut buf);
        assert!(matches!(
            FrameSplitter.decode(&mut buf),
            Err(SealError::FrameTooLarge { .. })
        ));
    }

    /// A 10 MiB body streamed through a real async pipe in 16 KiB frames: sealed on
    /// one task, opened on another, with the reader's buffer never holding more than
    /// a frame or so.
    #[tokio::test]
    async fn ten_mib_streams_through_codecs_with_bounded_buffer() {
        let p = pair();
        let (tx, rx) = tokio::io::duplex(64 * 1024);
        let key = p.key.clone();
        let id = p.id;
        const SIZE: usize = 10 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let mut w = FramedWrite::new(
                tx,
                SealCodec(MessageSealer::new(key, id, Direction::ClientToServer, 42)),
            );
            let mut sent = Sha256::new();
            w.send((FrameKind::Head, Bytes::from_static(b"POST /upload")))
                .await
                .unwrap();
            let mut chunk = vec![0u8; 16 * 1024];
            for i in 0..SIZE / chunk.len() {
                chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (i + j) as u8);
                sent.update(&chunk);
                w.send((FrameKind::Data, Bytes::copy_from_slice(&chunk)))
                    .await
                    .unwrap();
            }
            w.send((FrameKind::End, Bytes::new())).await.unwrap();
            sent.finalize()
        });
        let mut r = FramedRead::new(rx, OpenCodec(opener(&p)));
        let mut got = Sha256::new();
        let mut total = 0;
        let mut max_buffer = 0;
        while let Some(frame) = r.next().await {
            let frame = frame.unwrap();
            max_buffer = max_buffer.max(r.read_buffer().capacity());
            if frame.kind == FrameKind::Data {
                total += frame.payload.len();
                got.update(&frame.payload);
            }
        }
        assert_eq!(total, SIZE);
        assert_eq!(got.finalize(), writer.await.unwrap());
        assert!(
            max_buffer <= 4 * (HEADER_LEN + MAX_PAYLOAD + TAG_LEN),
            "buffer grew to {max_buffer}"
        );
    }

    proptest! {
        #[test]
        fn splitter_and_opener_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = pair();
            let mut codec = OpenCodec(opener(&p));
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = codec.decode_eof(&mut buf);
            let _ = FrameHeader::decode(&bytes);
        }

        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..5000), chunk in 1usize..700) {
            let p = pair();
            let opened = open_all(&mut opener(&p), frames(seal_message(&p, 1, &body, chunk))).unwrap();
            prop_assert_eq!(body_of(&opened), body);
        }
    }
}
