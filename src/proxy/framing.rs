//! Request smuggling guard for the outbound (app-facing) HTTP/1.1 listener (DESIGN §4).
//!
//! hyper already refuses differing `Content-Length` values and obs-fold, but a request
//! with both `Content-Length` and `Transfer-Encoding` is accepted (RFC 9112 §6.3 allows
//! that): hyper drops the length and the handler cannot tell. Such a request only ever
//! comes from a client trying to desynchronise two parsers, so seam refuses it.
//!
//! [`FramingIo`] watches the raw bytes as hyper reads them, follows HTTP/1.1 framing
//! (heads, fixed-length and chunked bodies) and queues one verdict per request head in
//! order. The handler takes the verdict for its request; HTTP/1.1 serves requests on a
//! connection in order, so the nth verdict is the nth request's. Anything the tracker
//! cannot follow (HTTP/2, upgrades, malformed framing hyper will reject itself) turns
//! it off for the rest of the connection.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smuggling {
    ContentLengthWithTransferEncoding,
    DifferingContentLengths,
    ObsFold,
}

impl Smuggling {
    pub fn describe(self) -> &'static str {
        match self {
            Smuggling::ContentLengthWithTransferEncoding => {
                "has both Content-Length and Transfer-Encoding"
            }
            Smuggling::DifferingContentLengths => "has differing Content-Length values",
            Smuggling::ObsFold => "folds a header over several lines (obs-fold)",
        }
    }
}

/// Verdicts for the heads seen so far, taken by the handler one per request.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Result<(), Smuggling>>>>);

impl Verdicts {
    /// The verdict on the next request head; `Ok` when the tracker was not following.
    pub fn next(&self) -> Result<(), Smuggling> {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.pop_front().unwrap_or(Ok(()))
    }

    fn push(&self, v: Result<(), Smuggling>) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(v);
    }
}

enum State {
    /// Collecting a request head (bounded by `max_head`).
    Head(Vec<u8>),
    /// `n` body bytes left.
    Fixed(u64),
    /// Collecting a chunk-size line.
    ChunkSize(Vec<u8>),
    /// `n` bytes of chunk data, then CRLF.
    ChunkData(u64),
    /// Trailer section after the last chunk: collecting until an empty line.
    Trailers(Vec<u8>),
    /// Not following any more.
    Off,
}

/// Wraps the app's connection; see the module docs.
pub struct FramingIo<T> {
    inner: T,
    state: State,
    max_head: usize,
    verdicts: Verdicts,
}

impl<T> FramingIo<T> {
    pub fn new(inner: T, max_head: usize) -> (Self, Verdicts) {
        let verdicts = Verdicts::default();
        let io = Self {
            inner,
            state: State::Head(Vec::new()),
            max_head,
            verdicts: verdicts.clone(),
        };
        (io, verdicts)
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    // A CRLF before a request line is allowed (RFC 9112 §2.2).
                    if buf.is_empty() && (data[0] == b'\r' || data[0] == b'\n') {
                        data = &data[1..];
                        continue;
                    }
                    // The usual case: the whole head arrived in this read. Judge it
                    // where it lies instead of collecting it first.
                    if buf.is_empty()
                        && let Some(end) = find(data, b"\r\n\r\n").map(|i| i + 4)
                    {
                        self.state = self.after_head(&data[..end]);
                        data = &data[end..];
                        continue;
                    }
                    let start = buf.len().saturating_sub(3);
                    buf.extend_from_slice(data);
                    let Some(end) = find(&buf[start..], b"\r\n\r\n").map(|i| start + i + 4) else {
                        if buf.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let rest = buf.split_off(end);
                    let head = std::mem::take(buf);
                    self.state = self.after_head(&head);
                    // `rest` is what followed the head in this read.
                    self.feed(&rest);
                    return;
                }
                State::Fixed(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > 1024 {
                            self.state = State::Off;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..=i]);
                    data = &data[i + 1..];
                    self.state = match parse_chunk_size(line) {
                        Some(0) => State::Trailers(Vec::new()),
                        // Data, then its CRLF.
                        Some(n) => State::ChunkData(n + 2),
                        None => State::Off,
                    };
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(buf) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        buf.extend_from_slice(data);
                        if buf.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    };
                    buf.extend_from_slice(&data[..=i]);
                    data = &data[i + 1..];
                    if buf.as_slice() == b"\r\n" || buf.as_slice() == b"\n" {
                        self.state = State::Head(Vec::new());
                    } else {
                        buf.clear();
                    }
                }
            }
        }
    }

    /// Judges one complete head and says how its body is framed.
    fn after_head(&self, head: &[u8]) -> State {
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Off;
        }
        // Uninitialised: httparse fills only as many as the head has.
        let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; 128];
        let mut req = httparse::Request::new(&mut []);
        let obs_fold = head
            .windows(3)
            .any(|w| w[0] == b'\n' && (w[1] == b' ' || w[1] == b'\t'));
        if obs_fold {
            self.verdicts.push(Err(Smuggling::ObsFold));
            return State::Off;
        }
        if !matches!(
            req.parse_with_uninit_headers(head, &mut headers),
            Ok(httparse::Status::Complete(_))
        ) {
            // hyper answers 400 itself and closes.
            return State::Off;
        }
        let mut lengths = Vec::new();
        let mut te = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(
                    std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok()),
                );
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value.to_ascii_lowercase());
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te.is_some() && !lengths.is_empty() {
            self.verdicts
                .push(Err(Smuggling::ContentLengthWithTransferEncoding));
            return State::Off;
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            self.verdicts.push(Err(Smuggling::DifferingContentLengths));
            return State::Off;
        }
        self.verdicts.push(Ok(()));
        // hyper may switch protocols (an upgrade it serves) or tunnel: stop following.
        if upgrade || req.method == Some("CONNECT") {
            return State::Off;
        }
        match (te, lengths.first()) {
            (Some(te), _) if te.ends_with(b"chunked") => State::ChunkSize(Vec::new()),
            (Some(_), _) => State::Off,
            (None, Some(Some(n))) if *n > 0 => State::Fixed(*n),
            (None, Some(None)) => State::Off,
            _ => State::Head(Vec::new()),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let size = text
        .trim_end_matches(['\r', '\n'])
        .split(';')
        .next()?
        .trim();
    u64::from_str_radix(size, 16).ok()
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(chunks: &[&[u8]]) -> Vec<Result<(), Smuggling>> {
        let (mut io, v) = FramingIo::new((), 64 * 1024);
        for c in chunks {
            io.feed(c);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().unwrap().pop_front() {
            out.push(x);
        }
        out
    }

    #[test]
    fn follows_keep_alive_requests_with_bodies() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
GET /c HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            verdicts(&[stream]),
            [
                Ok(()),
                Ok(()),
                Err(Smuggling::ContentLengthWithTransferEncoding)
            ]
        );
        // The same bytes one at a time give the same verdicts.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(
            verdicts(&bytes),
            [
                Ok(()),
                Ok(()),
                Err(Smuggling::ContentLengthWithTransferEncoding)
            ]
        );
    }

    #[test]
    fn any_split_into_two_reads_gives_the_same_verdicts() {
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
GET /c HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        let expected = [Ok(()), Ok(()), Err(Smuggling::DifferingContentLengths)];
        for split in 0..=stream.len() {
            let (first, second) = stream.split_at(split);
            assert_eq!(verdicts(&[first, second]), expected, "split at {split}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_judged() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 60\r\n\r\n\
GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        assert_eq!(
            stream.len() - stream.iter().position(|b| *b == b'G').unwrap(),
            60
        );
        assert_eq!(verdicts(&[stream]), [Ok(())]);
    }

    #[test]
    fn differing_lengths_and_obs_fold() {
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"]),
            [Err(Smuggling::DifferingContentLengths)]
        );
        assert_eq!(
            verdicts(&[b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"]),
            [Err(Smuggling::ObsFold)]
        );
    }

    #[test]
    fn http2_is_not_followed() {
        assert_eq!(verdicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), []);
    }
}
