//! Streaming bodies that seal or open one frame at a time.
//!
//! Nothing here buffers a whole body: [`SealedBody`] seals each chunk of the inner
//! body as it arrives; [`OpenedBody`] holds at most one sealed frame plus the chunk
//! that completed it. gRPC streams and gigabyte downloads flow with bounded memory.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
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

/// Wraps a plain body and yields it sealed: the head frame first, then a sealed
/// frame per chunk, trailers if any, and the final frame.
pub struct SealedBody<B> {
    inner: B,
    sealer: MessageSealer,
    head: Option<Bytes>,
    done: bool,
    guard: Option<InFlight>,
    /// The session whose byte counters this body feeds.
    counted: Option<Arc<Session>>,
}

/// Reads sealed frames from `inner` and yields the opened body: data and trailers.
pub struct OpenedBody<B> {
    inner: B,
    buf: BytesMut,
    opener: MessageOpener,
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
    ) -> Result<Self, SealError> {
        let mut first = BytesMut::with_capacity(HEADER_LEN + head.len() + TAG_LEN);
        sealer.seal(FrameKind::Head, head, &mut first)?;
        Ok(Self {
            inner,
            sealer,
            head: Some(first.freeze()),
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

    fn seal_end(&mut self, trailers: Option<&HeaderMap>) -> Result<Bytes, BoxError> {
        let mut out = BytesMut::with_capacity(2 * (HEADER_LEN + TAG_LEN) + 256);
        if let Some(t) = trailers {
            let encoded = head::encode_trailers(t, MAX_PAYLOAD)?;
            self.sealer.seal(FrameKind::Trailers, &encoded, &mut out)?;
        }
        self.sealer.finish(&mut out)?;
        self.done = true;
        Ok(out.freeze())
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
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        loop {
            if this.done {
                this.guard = None;
                return Poll::Ready(None);
            }
            let sealed = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => {
                        this.count_out(data.len());
                        let frames = data.len().div_ceil(MAX_PAYLOAD);
                        let mut out =
                            BytesMut::with_capacity(data.len() + frames * (HEADER_LEN + TAG_LEN));
                        this.sealer.seal(FrameKind::Data, &data, &mut out)?;
                        out.freeze()
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => this.seal_end(Some(&trailers))?,
                        Err(_) => continue,
                    },
                },
                // The inner body failed: stop without the final frame, so the other
                // side sees a truncated message, never a silently short one.
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => this.seal_end(None)?,
            };
            return Poll::Ready(Some(Ok(Frame::data(sealed))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.head.is_none()
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
            buf: BytesMut::new(),
            opener,
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
            Some((FrameKind::Head, payload)) => Ok(payload),
            Some((kind, _)) => Err(BodyError::NoHead(kind)),
            None => Err(BodyError::Empty),
        }
    }

    fn poll_opened(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<(FrameKind, Bytes)>, BodyError>> {
        loop {
            if let Some((header, sealed)) = FrameSplitter.decode(&mut self.buf)? {
                let opened = self.opener.open(&header, sealed)?;
                if let Some(s) = &self.counted {
                    s.counters().add_bytes_in(opened.payload.len());
                }
                return Poll::Ready(Ok(Some((opened.kind, opened.payload))));
            }
            if self.inner_done {
                if self.buf.is_empty() && self.opener.is_finished() {
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(SealError::Truncated.into()));
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.is_empty() {
                            // A uniquely owned chunk becomes our buffer without a copy.
                            self.buf = data
                                .try_into_mut()
                                .unwrap_or_else(|d| BytesMut::from(&d[..]));
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
                Ok(Some((FrameKind::Data, payload))) => Frame::data(payload),
                Ok(Some((FrameKind::Trailers, payload))) => match head::decode_trailers(&payload) {
                    Ok(t) => Frame::trailers(t),
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
}
