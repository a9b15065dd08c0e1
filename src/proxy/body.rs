//! Streaming bodies that seal or open one frame at a time.
//!
//! Nothing here buffers a whole body: [`SealedBody`] seals each chunk of the inner
//! body as it arrives; [`OpenedBody`] holds at most one sealed frame plus the chunk
//! that completed it. gRPC streams and gigabyte downloads flow with bounded memory.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio_util::codec::Decoder;

use super::head::{self, HeadError};
use crate::admin::stats::Stats;
use crate::session::seal::{
    FrameKind, FrameSplitter, HEADER_LEN, MAX_PAYLOAD, MessageOpener, MessageSealer, SealError,
    TAG_LEN,
};
use crate::session::{InFlight, Session};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("the sealed stream's first frame is a {0:?}, not the head")]
    NoHead(FrameKind),
    #[error("the sealed stream ended before its head")]
    Empty,
    #[error("reading the body failed: {0}")]
    Transport(BoxError),
}

impl BodyError {
    /// A short fixed name per failure, for counters and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            BodyError::Seal(e) => e.kind(),
            BodyError::Head(_) => "bad-head",
            BodyError::NoHead(_) => "no-head",
            BodyError::Empty => "empty",
            BodyError::Transport(_) => "transport",
        }
    }
}

/// One poll of a [`SealedBody`] gathers the frames that are ready up to this many sealed
/// bytes, the mesh hop's HTTP/2 frame size: a small message (head, body, end) leaves as
/// one DATA frame with END_STREAM instead of three, and what waits in HTTP/2's send
/// queue per stream stays bounded however large the chunks the app's side delivers.
const GATHER: usize = super::h2_tuning::MAX_FRAME as usize;

/// Plaintext per sealed data frame, so that one sealed frame fills one HTTP/2 DATA frame
/// exactly: the receiver then opens each DATA frame as it comes, instead of joining a
/// frame from two pieces (a reallocation and two copies per frame). It holds a whole
/// chunk from an HTTP/1.1 app connection (at most 56 KiB), which is therefore sealed
/// and let go in the poll that received it.
const DATA_PIECE: usize = GATHER - HEADER_LEN - TAG_LEN;
const _: () = assert!(DATA_PIECE == MAX_PAYLOAD);

/// Where a data frame's first byte sits past a 64-byte boundary, so that rustls copies
/// it into TLS records fast. rustls copies each record's plaintext into a fresh buffer
/// 5 bytes in (the record header), and HTTP/2 writes a 9-byte frame header before our
/// frame, so our bytes land 14 bytes past the start of a 64-byte aligned buffer. On
/// this machine's AMD EPYC, glibc's `rep movsb` copy runs 15 times slower (2.4 GB/s
/// against 40-50) when the destination lies 1 to 15 bytes past the source modulo
/// 4096; with the frame at 0 mod 64 every record's copy landed there, and the copy
/// took 24 % of the answering seam's CPU on 1 MiB replies (benches/RESULTS.md). At
/// 14 mod 64 source and destination share their alignment.
const FRAME_START_PAST_64: usize = 5 + 9;

/// An empty buffer for `capacity` bytes of frames starting at [`FRAME_START_PAST_64`].
fn frame_buffer(capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(capacity + 63);
    let pad = (FRAME_START_PAST_64 + 64 - buf.as_ptr() as usize % 64) % 64;
    buf.put_bytes(0, pad);
    buf.advance(pad);
    buf
}

/// Wraps a plain body and yields it sealed: the head frame first, then a sealed
/// frame per chunk, trailers if any, and the final frame. Frames that are ready at
/// once are yielded together.
pub struct SealedBody<B> {
    inner: B,
    sealer: MessageSealer,
    /// Sealed bytes not yielded yet: the head at first.
    out: BytesMut,
    /// The rest of the inner body's last chunk, sealed on later polls.
    pending: Bytes,
    done: bool,
    guard: Option<InFlight>,
    /// The session whose byte counters this body feeds.
    counted: Option<Arc<Session>>,
}

/// Reads sealed frames from `inner` and yields the opened body: data and trailers.
pub struct OpenedBody<B> {
    inner: B,
    /// Frames received in a chunk shared with the transport's read buffer, opened from
    /// there into new buffers. Empty whenever `buf` is not.
    shared: Bytes,
    /// Frames received in chunks of our own (opened in place), and frames that arrived
    /// split across chunks, joined.
    buf: BytesMut,
    opener: MessageOpener,
    /// A frame opened ahead of time to learn whether the message ends after the
    /// frame just yielded (so `is_end_stream` can say so), kept for the next poll.
    ahead: Option<Result<(FrameKind, Bytes), BodyError>>,
    inner_done: bool,
    finished: bool,
    guard: Option<InFlight>,
    /// The session whose byte and error counters this body feeds.
    counted: Option<Arc<Session>>,
    /// Where failures to open a frame mid-body are counted by kind.
    stats: Option<Arc<Stats>>,
}

/// A streamed request body capped at `limits.max_body_bytes`. Past the cap it fails,
/// so the sealed message is cut and never completes at the other end, and it raises
/// `exceeded` so the handler can answer 413 rather than a transport error.
pub struct CappedBody<B> {
    inner: B,
    left: u64,
    exceeded: Arc<AtomicBool>,
}

/// A request body read completely up front because it is small, so it can be sent
/// again on a new session if the peer lost the first one.
#[derive(Clone, Debug, Default)]
pub struct KeptBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl<B> SealedBody<B> {
    /// Seals `head` now (as the first frame) and the body as it streams.
    pub fn new(
        mut sealer: MessageSealer,
        head: &[u8],
        inner: B,
        guard: Option<InFlight>,
    ) -> Result<Self, SealError>
    where
        B: Body,
    {
        const FRAME: usize = HEADER_LEN + TAG_LEN;
        // A body known to fit in the head's HTTP/2 frame (an empty one, a small reply)
        // is sealed into this buffer on the next poll, followed by the end frame: room
        // for all three now spares growing the buffer, which copied it (callgrind: the
        // largest single reallocation of a 1 KiB reply). The length is the app's or the
        // caller's word (Content-Length), so it is capped before any sum.
        let head_frame = FRAME + head.len();
        let rest = match inner
            .size_hint()
            .upper()
            .map(|n| n.min(GATHER as u64) as usize)
        {
            Some(0) => FRAME,
            Some(n) if head_frame + 2 * FRAME + n <= GATHER => 2 * FRAME + n,
            _ => 0,
        };
        let mut out = BytesMut::with_capacity(head_frame + rest);
        sealer.seal(FrameKind::Head, head, &mut out)?;
        Ok(Self {
            inner,
            sealer,
            out,
            pending: Bytes::new(),
            done: false,
            counted: guard.as_ref().map(|g| g.session().clone()),
            guard,
        })
    }

    /// Counts the bytes on `session` (a response sealed for a request whose in-flight
    /// guard lives elsewhere).
    pub fn counted_on(mut self, session: Arc<Session>) -> Self {
        self.counted = Some(session);
        self
    }

    fn count_out(&self, n: usize) {
        if let Some(s) = &self.counted {
            s.counters().add_bytes_out(n);
        }
    }

    /// Seals the next piece of `pending` as one frame if it fits in this poll's chunk.
    /// Returns false when the chunk is full.
    fn seal_pending(&mut self) -> Result<bool, SealError> {
        let piece = self.pending.len().min(DATA_PIECE);
        let sealed = HEADER_LEN + piece + TAG_LEN;
        if !self.out.is_empty() && self.out.len() + sealed > GATHER {
            return Ok(false);
        }
        let data = self.pending.split_to(piece);
        self.count_out(data.len());
        // Room for the end frame too, which usually follows the last piece at once.
        let room = sealed + HEADER_LEN + TAG_LEN;
        if self.out.is_empty() {
            self.out = frame_buffer(room);
        } else {
            self.out.reserve(room);
        }
        self.sealer.seal(FrameKind::Data, &data, &mut self.out)?;
        Ok(true)
    }

    fn seal_end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), BoxError> {
        if let Some(t) = trailers {
            let encoded = head::encode_trailers(t, MAX_PAYLOAD)?;
            self.sealer
                .seal(FrameKind::Trailers, &encoded, &mut self.out)?;
        }
        self.sealer.finish(&mut self.out)?;
        self.done = true;
        Ok(())
    }
}

impl<B> Body for SealedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        while !this.done && this.out.len() < GATHER {
            if !this.pending.is_empty() {
                if !this.seal_pending()? {
                    break;
                }
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending if this.out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.seal_end(Some(&trailers))?;
                        }
                    }
                },
                // The inner body failed: stop without the final frame, so the other
                // side sees a truncated message, never a silently short one.
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.out.clear();
                    this.pending.clear();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => this.seal_end(None)?,
            }
        }
        if this.out.is_empty() {
            this.guard = None;
            return Poll::Ready(None);
        }
        // The whole buffer, not `split()`: a split would leave `out` holding the spare
        // tail of the same allocation, keeping the frame's memory alive after HTTP/2
        // has written it and until the next frame is sealed.
        Poll::Ready(Some(Ok(Frame::data(
            std::mem::take(&mut this.out).freeze(),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Sealing changes the length; say nothing rather than something wrong.
        SizeHint::default()
    }
}

impl<B> OpenedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B, opener: MessageOpener, guard: Option<InFlight>) -> Self {
        Self {
            inner,
            shared: Bytes::new(),
            buf: BytesMut::new(),
            opener,
            ahead: None,
            inner_done: false,
            finished: false,
            counted: guard.as_ref().map(|g| g.session().clone()),
            guard,
            stats: None,
        }
    }

    /// Counts frames that fail to open after the head in `stats`, by kind.
    pub fn reporting_to(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Counts the bytes and errors on `session` (a response opened for a request whose
    /// in-flight guard lives elsewhere).
    pub fn counted_on(mut self, session: Arc<Session>) -> Self {
        self.counted = Some(session);
        self
    }

    /// The sequence number of the message, known once the head was opened.
    pub fn seq(&self) -> Option<u64> {
        self.opener.seq()
    }

    /// Reads and opens the first frame, which must be the head.
    pub async fn read_head(&mut self) -> Result<Bytes, BodyError> {
        match std::future::poll_fn(|cx| self.poll_opened(cx)).await? {
            Some((FrameKind::Head, payload)) => {
                self.look_ahead();
                Ok(payload)
            }
            Some((kind, _)) => Err(BodyError::NoHead(kind)),
            None => Err(BodyError::Empty),
        }
    }

    /// Opens the next frame if it is already buffered. When it is the end, the body is
    /// finished now: a GET then reaches the app with no body at all, and the last data
    /// frame goes out with END_STREAM instead of an empty frame after it.
    fn look_ahead(&mut self) {
        if self.ahead.is_some() || self.finished {
            return;
        }
        match self.open_buffered() {
            Ok(Some((FrameKind::End, _))) => {
                self.finished = true;
                self.guard = None;
            }
            Ok(Some(frame)) => self.ahead = Some(Ok(frame)),
            Ok(None) => {}
            Err(e) => self.ahead = Some(Err(e)),
        }
    }

    /// Opens one complete frame from the buffer, if there is one.
    fn open_buffered(&mut self) -> Result<Option<(FrameKind, Bytes)>, BodyError> {
        let opened = if !self.shared.is_empty() {
            let Some((header, total)) = FrameSplitter::complete(&self.shared)? else {
                // The frame continues in the next chunk: gather it in `buf`.
                self.buf.extend_from_slice(&self.shared);
                self.shared.clear();
                return Ok(None);
            };
            let opened = self
                .opener
                .open_shared(&header, &self.shared[HEADER_LEN..total])?;
            self.shared.advance(total);
            opened
        } else {
            let Some((header, sealed)) = FrameSplitter.decode(&mut self.buf)? else {
                return Ok(None);
            };
            self.opener.open(&header, sealed)?
        };
        if let Some(s) = &self.counted {
            s.counters().add_bytes_in(opened.payload.len());
        }
        Ok(Some((opened.kind, opened.payload)))
    }

    fn poll_opened(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<(FrameKind, Bytes)>, BodyError>> {
        if let Some(ahead) = self.ahead.take() {
            return Poll::Ready(ahead.map(Some));
        }
        loop {
            if let Some(frame) = self.open_buffered()? {
                return Poll::Ready(Ok(Some(frame)));
            }
            if self.inner_done {
                if self.buf.is_empty() && self.shared.is_empty() && self.opener.is_finished() {
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(SealError::Truncated.into()));
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.is_empty() {
                            // A uniquely owned chunk becomes our buffer without a copy; a
                            // shared one is opened from where it lies.
                            match data.try_into_mut() {
                                Ok(owned) => self.buf = owned,
                                Err(shared) => self.shared = shared,
                            }
                        } else {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(BodyError::Transport(e.into()))),
                None => self.inner_done = true,
            }
        }
    }
}

impl<B> Body for OpenedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let opened = ready!(this.poll_opened(cx));
            let frame = match opened {
                Ok(Some((FrameKind::Data, payload))) if payload.is_empty() => continue,
                Ok(Some((FrameKind::Data, payload))) => {
                    this.look_ahead();
                    Frame::data(payload)
                }
                Ok(Some((FrameKind::Trailers, payload))) => match head::decode_trailers(&payload) {
                    Ok(t) => {
                        this.look_ahead();
                        Frame::trailers(t)
                    }
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                Ok(Some((FrameKind::End, _))) | Ok(None) => {
                    this.finished = true;
                    this.guard = None;
                    return Poll::Ready(None);
                }
                // The opener's grammar check rejects a second head before we get here.
                Ok(Some((FrameKind::Head, _))) => {
                    return Poll::Ready(Some(Err(BodyError::NoHead(FrameKind::Head).into())));
                }
                Err(e) => {
                    if let Some(s) = &this.counted {
                        s.counters().add_error();
                    }
                    if let Some(stats) = &this.stats {
                        stats.record_open_failure(e.kind());
                    }
                    this.finished = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            };
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

impl<B> CappedBody<B> {
    pub fn new(inner: B, max: Option<u64>, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            left: max.unwrap_or(u64::MAX),
            exceeded,
        }
    }
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(
                            "the request body exceeds limits.max_body_bytes".into(),
                        )));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl KeptBody {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }
}

impl Body for KeptBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::{LIMITS, session_pair};
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_frame_that_fails_to_open_mid_body_is_counted_by_kind() {
        let (client, server) = session_pair(LIMITS);
        let (mut sealer, _g) = client.begin_request().unwrap();
        let mut wire = BytesMut::new();
        sealer.seal(FrameKind::Head, b"head", &mut wire).unwrap();
        let head_len = wire.len();
        sealer
            .seal(FrameKind::Data, b"body bytes", &mut wire)
            .unwrap();
        sealer.finish(&mut wire).unwrap();
        // A peer seam that corrupts its own second frame (TLS would catch a network
        // attacker first).
        wire[head_len + HEADER_LEN] ^= 1;
        let stats = Arc::new(Stats::new(Vec::<String>::new(), false));
        let (opener, guard) = server.request_opener();
        let mut body = OpenedBody::new(Full::new(wire.freeze()), opener, Some(guard))
            .reporting_to(stats.clone());
        assert_eq!(&body.read_head().await.unwrap()[..], b"head");
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(stats.open_failures().get("tampered"), Some(&1));
        assert_eq!(
            server
                .counters()
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn a_small_body_of_known_length_is_sealed_into_the_buffer_made_for_the_head() {
        let (client, server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        let body = Bytes::from(vec![7u8; 1024]);
        let mut sealed = SealedBody::new(
            sealer,
            b"head",
            KeptBody::new(body.clone(), None),
            Some(guard),
        )
        .unwrap();
        let room = sealed.out.capacity();
        let wire = sealed.frame().await.unwrap().unwrap().into_data().unwrap();
        // Head, data and end frames in one chunk, which the first buffer had room for.
        assert_eq!(wire.len(), 3 * (HEADER_LEN + TAG_LEN) + 4 + 1024);
        assert!(room >= wire.len(), "{room} < {}", wire.len());

        let (opener, guard) = server.request_opener();
        let mut opened = OpenedBody::new(Full::new(wire), opener, Some(guard));
        assert_eq!(&opened.read_head().await.unwrap()[..], b"head");
        let data = opened.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, body);
        assert!(opened.frame().await.is_none());
    }

    /// A body that claims the largest length there is (an app's Content-Length) is
    /// sealed as it streams, as any large body, with no overflow on the way.
    #[tokio::test]
    async fn a_body_claiming_an_enormous_length_seals_as_a_streaming_one() {
        struct Claims(Option<Bytes>);
        impl Body for Claims {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(u64::MAX)
            }
        }
        let (client, _server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        let mut sealed = SealedBody::new(
            sealer,
            b"head",
            Claims(Some(Bytes::from_static(b"x"))),
            Some(guard),
        )
        .unwrap();
        assert!(sealed.out.capacity() < GATHER);
        let wire = sealed.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(wire.len(), 3 * (HEADER_LEN + TAG_LEN) + 4 + 1);
    }

    #[tokio::test]
    async fn a_ready_message_is_sealed_into_one_chunk_and_opens_as_finished() {
        let (client, server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        let mut sealed = SealedBody::new(
            sealer,
            b"GET / HTTP/1.1",
            Full::new(Bytes::new()),
            Some(guard),
        )
        .unwrap();
        // Head and end in one chunk, and the body says it is over, so HTTP/2 can send
        // it as one DATA frame with END_STREAM.
        let wire = sealed.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(sealed.is_end_stream());
        assert!(sealed.frame().await.is_none());

        let (opener, guard) = server.request_opener();
        let mut opened = OpenedBody::new(Full::new(wire), opener, Some(guard));
        assert_eq!(&opened.read_head().await.unwrap()[..], b"GET / HTTP/1.1");
        // Known to be empty before anyone polls it: a GET reaches the app without a body.
        assert!(opened.is_end_stream());
        assert!(opened.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_last_data_frame_already_reports_the_end() {
        let (client, server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        let sealed = SealedBody::new(
            sealer,
            b"head",
            Full::new(Bytes::from_static(b"body")),
            Some(guard),
        )
        .unwrap();
        let wire = sealed.collect().await.unwrap().to_bytes();
        let (opener, guard) = server.request_opener();
        let mut opened = OpenedBody::new(Full::new(wire), opener, Some(guard));
        opened.read_head().await.unwrap();
        assert!(!opened.is_end_stream());
        let data = opened.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"body");
        assert!(opened.is_end_stream());
    }

    #[tokio::test]
    async fn a_large_chunk_leaves_in_whole_frames_of_at_most_one_http2_frame() {
        let (client, server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        // One 300 KiB chunk, as an app connection's read can deliver.
        let body: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sealed = SealedBody::new(
            sealer,
            b"head",
            Full::new(Bytes::from(body.clone())),
            Some(guard),
        )
        .unwrap();
        let (opener, guard) = server.request_opener();
        let mut chunks = Vec::new();
        while let Some(frame) = sealed.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= GATHER, "a chunk of {} bytes", chunk.len());
            // Every chunk holds whole sealed frames: it opens without its neighbours.
            let mut buf = BytesMut::from(&chunk[..]);
            while !buf.is_empty() {
                assert!(FrameSplitter.decode(&mut buf).unwrap().is_some());
            }
            chunks.push(chunk);
        }
        assert!(chunks.len() >= 5);
        let wire: Vec<u8> = chunks.concat();
        let mut opened = OpenedBody::new(Full::new(Bytes::from(wire)), opener, Some(guard));
        assert_eq!(&opened.read_head().await.unwrap()[..], b"head");
        let data = opened.collect().await.unwrap().to_bytes();
        assert_eq!(data.len(), body.len());
        assert!(data[..] == body[..]);
    }

    #[tokio::test]
    async fn frames_in_chunks_shared_with_a_read_buffer_open_however_they_are_cut() {
        let (client, server) = session_pair(LIMITS);
        let body: Vec<u8> = (0..150 * 1024).map(|i| (i % 251) as u8).collect();
        for cut in [1000, 65_536 + HEADER_LEN + TAG_LEN, 100_000, 1 << 20] {
            let (sealer, _g) = client.begin_request().unwrap();
            let sealed =
                SealedBody::new(sealer, b"head", Full::new(Bytes::from(body.clone())), None)
                    .unwrap();
            let wire = sealed.collect().await.unwrap().to_bytes();
            // Slices of one buffer that stays alive, as HTTP/2 hands out DATA frames:
            // none is ours to open in place.
            let chunks: Vec<Bytes> = (0..wire.len())
                .step_by(cut)
                .map(|at| wire.slice(at..wire.len().min(at + cut)))
                .collect();
            let stream = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
            );
            let (opener, guard) = server.request_opener();
            let mut opened =
                OpenedBody::new(http_body_util::StreamBody::new(stream), opener, Some(guard));
            assert_eq!(&opened.read_head().await.unwrap()[..], b"head");
            let data = opened.collect().await.unwrap().to_bytes();
            assert!(data[..] == body[..], "cut every {cut} bytes");
        }
    }

    #[tokio::test]
    async fn data_frames_start_where_tls_records_copy_them_fast() {
        let (client, _server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        let body = Bytes::from(vec![3u8; 300 * 1024]);
        let mut sealed = SealedBody::new(sealer, b"head", Full::new(body), Some(guard)).unwrap();
        let head = sealed.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(head.len(), HEADER_LEN + 4 + TAG_LEN);
        let mut data_chunks = 0;
        while let Some(frame) = sealed.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert_eq!(chunk.as_ptr() as usize % 64, FRAME_START_PAST_64);
            data_chunks += 1;
        }
        assert_eq!(data_chunks, 5);
    }

    #[tokio::test]
    async fn sealing_lets_go_of_the_app_chunk_and_of_the_frame_it_yields() {
        let (client, _server) = session_pair(LIMITS);
        let (sealer, guard) = client.begin_request().unwrap();
        // A chunk as large as an app connection's read delivers, still referenced here
        // the way hyper's read buffer is.
        let chunk = Bytes::from(vec![7u8; 56 * 1024]);
        let mut sealed =
            SealedBody::new(sealer, b"head", Full::new(chunk.clone()), Some(guard)).unwrap();
        let frame = sealed.frame().await.unwrap().unwrap().into_data().unwrap();
        // Sealed whole in this poll: the body keeps no slice of the chunk, so hyper can
        // read the next one into the same buffer.
        assert!(
            chunk.is_unique(),
            "the sealed body still holds the app's chunk"
        );
        // Nor a tail of the frame's allocation, which HTTP/2 frees once it is written.
        assert!(
            frame.is_unique(),
            "the sealed body still holds the yielded frame"
        );
    }
}
