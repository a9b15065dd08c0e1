//! Fewer, larger writes on HTTP/2 connections: the app-facing ones, and the mesh
//! connections a seam accepts (under TLS, so held bytes also share TLS records).
//!
//! The h2 crate writes every DATA frame with its own `writev` and flushes after each one,
//! and a client's frames are at most as large as its SETTINGS_MAX_FRAME_SIZE, 16 KiB unless
//! it asks for more. A 1 MiB response to such a client took 64 socket writes; on loopback
//! each write runs the receiver's TCP path and wakes it, and those writes were the largest
//! difference between seam's cost at h2-1m and at h1-1m (benches/RESULTS.md).
//!
//! On an accepted mesh connection every reply went out on its own: at h1-1k, B wrote one
//! TLS record and made one `writev` per 1 KiB response while the caller's side, whose
//! requests h2 already batches, made 0.46.
//!
//! [`Coalesced`] holds small writes of an HTTP/2 connection (it recognises the client
//! preface) for one turn of the runtime: a flush right after new bytes is answered at once
//! without writing, and the connection's task is woken so that it comes back once the
//! other ready tasks (the streams adding their frames) have run. On that next poll the
//! first read or flush (h2 reads first and flushes last on every poll of a connection)
//! ends the wait and everything held goes in one write. Bytes that would overfill the
//! hold go out at once together with what is held, in one `writev`, and large writes
//! onto an empty hold are not copied at all. HTTP/1.1 connections pass straight through:
//! hyper already writes a response's head and body together, and one connection carries
//! one response at a time.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much is held at most: one loopback GSO segment's worth, four 16 KiB frames.
const HOLD: usize = 64 * 1024;
/// A write at least this large onto an empty hold goes to the socket without a copy.
const DIRECT: usize = 32 * 1024;
/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// This many bytes of the preface seen so far.
    Sniffing(usize),
    /// Not HTTP/2: every call goes straight to the socket.
    PassThrough,
    Coalescing,
}

/// Wraps an app connection, or an accepted mesh connection above its TLS; see the
/// module docs.
pub struct Coalesced<T> {
    inner: T,
    mode: Mode,
    /// The held bytes are `buf[start..]`; `start` moves on past partial writes.
    buf: Vec<u8>,
    start: usize,
    /// Counts `poll_read` calls, which mark a new poll of the connection's task.
    reads: u64,
    /// The `reads` count when the held bytes were first kept back from a flush.
    held_since: Option<u64>,
    /// Bytes were added since the last flush.
    fresh: bool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            mode: Mode::Sniffing(0),
            buf: Vec::new(),
            start: 0,
            reads: 0,
            held_since: None,
            fresh: false,
        }
    }

    fn sniff(&mut self, data: &[u8]) {
        let Mode::Sniffing(seen) = self.mode else {
            return;
        };
        let want = &PREFACE[seen..];
        let n = want.len().min(data.len());
        self.mode = if data.is_empty() || data[..n] != want[..n] {
            Mode::PassThrough
        } else if seen + n == PREFACE.len() {
            Mode::Coalescing
        } else {
            Mode::Sniffing(seen + n)
        };
    }

    fn held(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn holding(&self) -> bool {
        self.start < self.buf.len()
    }

    /// `n` held bytes have reached the socket.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.held_since = None;
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out everything held, and gives the hold's memory back: the connection
    /// may now stay quiet for long.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.holding() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        self.buf = Vec::new();
        Poll::Ready(Ok(()))
    }

    fn poll_write_coalesced(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let incoming: usize = bufs.iter().map(|b| b.len()).sum();
        if incoming == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            if !self.holding() && incoming >= DIRECT {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
            if self.held().len() + incoming <= HOLD {
                if self.buf.capacity() == 0 {
                    self.buf.reserve_exact(HOLD);
                } else if self.buf.len() + incoming > self.buf.capacity() {
                    // Partial writes moved `start` on: close the gap instead of growing.
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                for b in bufs {
                    self.buf.extend_from_slice(b);
                }
                self.fresh = true;
                return Poll::Ready(Ok(incoming));
            }
            // Too much to hold: what is held and the new bytes go out in one write.
            let mut slices = [IoSlice::new(&[]); 8];
            slices[0] = IoSlice::new(&self.buf[self.start..]);
            let count = 1 + bufs.len().min(slices.len() - 1);
            slices[1..count].copy_from_slice(&bufs[..count - 1]);
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = self.held().len();
            self.consume(n.min(held));
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.reads = this.reads.wrapping_add(1);
        // A new poll of the task that held bytes back: they have waited their turn.
        if this.holding()
            && this.held_since.is_some_and(|since| since != this.reads)
            && let Poll::Ready(Err(e)) = this.poll_write_held(cx)
        {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.sniff(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.mode != Mode::Coalescing {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.poll_write_coalesced(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.holding() {
            let same_poll = this.held_since.is_none_or(|since| since == this.reads);
            if this.fresh && same_poll {
                // Come back after the other ready tasks; their frames join this write.
                this.fresh = false;
                this.held_since = Some(this.reads);
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_write_held(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A real socket that counts the writes that reached it.
    struct Counted {
        tcp: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let polled = Pin::new(&mut self.tcp).poll_write(cx, data);
            if let Poll::Ready(Ok(_)) = polled {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            polled
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
            if let Poll::Ready(Ok(_)) = polled {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            polled
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    /// A connected pair: the client's end, and the server's end wrapped, after the client
    /// sent `first` and the server read it.
    async fn pair(first: &[u8]) -> (TcpStream, Coalesced<Counted>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let writes = Arc::new(AtomicUsize::new(0));
        let mut server = Coalesced::new(Counted {
            tcp,
            writes: writes.clone(),
        });
        client.write_all(first).await.expect("send first bytes");
        let mut seen = vec![0; first.len()];
        server
            .read_exact(&mut seen)
            .await
            .expect("read first bytes");
        assert_eq!(seen, first);
        (client, server, writes)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn receive(client: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut got))
            .await
            .expect("the held bytes never arrived")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn http2_frames_flushed_in_one_poll_go_out_in_one_write() {
        let (mut client, mut server, writes) = pair(PREFACE).await;
        let frames: Vec<Vec<u8>> = (0..4).map(|i| pattern(9 + 1024, i)).collect();
        // Four frames, each flushed, as h2 does, all within this one poll.
        for f in &frames {
            server.write_all(f).await.expect("write");
            server.flush().await.expect("flush");
        }
        assert_eq!(writes.load(Ordering::SeqCst), 0, "held for one turn");
        // The next poll of the connection (h2 reads first) sends them, together.
        let mut spare = [0u8; 1];
        let mut read = ReadBuf::new(&mut spare);
        let pending = poll_fn(|cx| Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut read)))
            .await
            .is_pending();
        assert!(pending, "the client sent nothing more");
        server.flush().await.expect("flush");
        assert_eq!(writes.load(Ordering::SeqCst), 1);
        assert_eq!(receive(&mut client, 4 * (9 + 1024)).await, frames.concat());
    }

    #[tokio::test]
    async fn a_flush_with_nothing_new_sends_what_is_held() {
        let (mut client, mut server, writes) = pair(PREFACE).await;
        let frame = pattern(500, 7);
        server.write_all(&frame).await.expect("write");
        server.flush().await.expect("flush");
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        server.flush().await.expect("flush");
        assert_eq!(writes.load(Ordering::SeqCst), 1);
        assert_eq!(receive(&mut client, 500).await, frame);
    }

    #[tokio::test]
    async fn a_held_flush_wakes_the_task_so_the_bytes_go_out_unasked() {
        let (mut client, server, _writes) = pair(PREFACE).await;
        // A task that writes, flushes and then only waits to read, like an h2
        // connection whose streams have nothing more to send.
        let task = tokio::spawn(async move {
            let mut server = server;
            server.write_all(b"reply").await.expect("write");
            server.flush().await.expect("flush");
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.expect("read");
        });
        assert_eq!(receive(&mut client, 5).await, b"reply");
        drop(client);
        task.await.expect("task");
    }

    #[tokio::test]
    async fn bytes_past_the_hold_go_out_with_it_in_one_write_and_large_ones_uncopied() {
        let (mut client, mut server, writes) = pair(PREFACE).await;
        let small: Vec<Vec<u8>> = (0..3).map(|i| pattern(20 * 1024, i)).collect();
        for s in &small {
            server.write_all(s).await.expect("write");
        }
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        let fourth = pattern(20 * 1024, 9);
        server.write_all(&fourth).await.expect("write");
        assert_eq!(
            writes.load(Ordering::SeqCst),
            1,
            "held and new in one writev"
        );
        let large = pattern(DIRECT, 11);
        server.write_all(&large).await.expect("write");
        assert_eq!(
            writes.load(Ordering::SeqCst),
            2,
            "a large write onto an empty hold"
        );
        let want = [small.concat(), fourth, large].concat();
        assert_eq!(receive(&mut client, want.len()).await, want);
    }

    #[tokio::test]
    async fn http1_writes_pass_straight_through() {
        let (mut client, mut server, writes) = pair(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .expect("write");
        assert_eq!(writes.load(Ordering::SeqCst), 1);
        assert_eq!(receive(&mut client, 17).await, b"HTTP/1.1 200 OK\r\n");
    }

    #[tokio::test]
    async fn a_preface_split_over_reads_is_recognised() {
        let (_client, mut server, _) = pair(&PREFACE[..10]).await;
        assert_eq!(server.mode, Mode::Sniffing(10));
        server.sniff(&PREFACE[10..]);
        assert_eq!(server.mode, Mode::Coalescing);
        let (_client, mut server, _) = pair(&PREFACE[..10]).await;
        server.sniff(b"X");
        assert_eq!(server.mode, Mode::PassThrough);
    }

    #[tokio::test]
    async fn every_byte_arrives_in_order_when_the_socket_fills() {
        let (mut client, mut server, _) = pair(PREFACE).await;
        let total = 8 * 1024 * 1024;
        let want = pattern(total, 3);
        let expected = want.clone();
        // The reader falls behind, so writes end partial or pending.
        let reader = tokio::spawn(async move { receive(&mut client, total).await });
        let mut at = 0;
        let mut step = 1usize;
        while at < total {
            // Pieces from 1 byte to 70 KiB: held, overflowing and direct writes.
            step = (step * 7919 + 13) % (70 * 1024) + 1;
            let end = (at + step).min(total);
            server.write_all(&want[at..end]).await.expect("write");
            if step.is_multiple_of(3) {
                server.flush().await.expect("flush");
            }
            at = end;
        }
        server
            .shutdown()
            .await
            .expect("shutdown sends what is held");
        assert!(reader.await.expect("reader") == expected);
    }
}
