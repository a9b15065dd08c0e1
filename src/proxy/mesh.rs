//! The mesh hop's HTTP/2, driven through the h2 crate directly (DESIGN §1).
//!
//! Both ends of this hop are seams, so seam needs none of what hyper adds on top of h2
//! for arbitrary peers, and hyper's per-request machinery was a measurable share of a
//! small request's cost (benches/RESULTS.md): its client passes every request through a
//! channel to the connection task and spawns a task per request to send the body. Here
//! the handler itself sends the head and, when the body is ready at once (every kept
//! request, every handshake), the whole body; only a body still streaming from the app
//! goes on in a task of its own.
//!
//! [`MeshBody`] is a received stream as an HTTP body; [`Pump`] sends a body on a stream,
//! taking each frame from the body only when HTTP/2 has room for it, so a slow reader
//! holds back its own stream and nothing is buffered ahead of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

use super::body::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the peer seam reset the stream ({0}); the request was abandoned on its side")]
    Reset(h2::Reason),
    #[error("the mesh connection failed while sending: {0}")]
    Send(#[from] h2::Error),
    #[error("the mesh connection closed before the body was sent")]
    Closed,
    #[error("reading the body to send failed: {0}")]
    Body(BoxError),
}

/// A stream received on the mesh connection, read as an HTTP body. Each chunk handed
/// on is given back to the sender's flow-control window at once: the sealed frames are
/// opened and passed along as they come, so holding window back would only stall them.
pub struct MeshBody {
    recv: RecvStream,
    data_done: bool,
    finished: bool,
}

impl MeshBody {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            finished: recv.is_end_stream(),
            recv,
            data_done: false,
        }
    }
}

impl Body for MeshBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only once the stream is gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        this.finished = true;
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Sends a body on an HTTP/2 stream, then ends the stream. After the first, a frame is
/// taken from the body only once the stream has any room, and the stream is reset when
/// the body fails, so the peer sees a cut message, never a short one. It stops when the
/// peer resets the stream (the requester behind it hung up), dropping the body and what
/// it holds.
pub struct Pump<B> {
    stream: SendStream<Bytes>,
    body: B,
    budget: Option<Budget>,
    /// Whether a frame has been sent. The first goes without waiting for room or for a
    /// place in the budget: a new stream has no room until the connection's task has
    /// written its HEADERS, so waiting cost every small message (one frame) a spawned
    /// task on the calling side and a second poll on the answering side. HTTP/2 queues
    /// the frame until the window takes it; it is at most one mesh frame per stream.
    sent: bool,
}

/// Sealed bytes one connection lets wait in HTTP/2's queue, shared by its streams.
///
/// Each stream's frame waits in the queue behind one frame of every other busy stream,
/// so without a bound sealed frames pile up there and memory grows with the number of
/// streams. With it, a frame is sealed only when a place in the budget is free, and
/// gives its place back when HTTP/2 has written it. (It was also thought to keep
/// frames in cache until written; budgets of 1, 2 and 8 places later measured the
/// same CPU, and the slow copy behind that idea was an alignment matter, see
/// `proxy::body::FRAME_START_PAST_64`.)
#[derive(Clone)]
pub struct SendBudget(Arc<Semaphore>);

/// A stream's use of its connection's [`SendBudget`]: the place held for the frame it
/// is about to take from its body.
struct Budget {
    places: PollSemaphore,
    held: Option<OwnedSemaphorePermit>,
}

/// A sealed frame together with its place in the budget, released when HTTP/2 drops it.
struct BudgetedFrame {
    frame: Bytes,
    _place: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl SendBudget {
    /// Room for `frames` frames.
    pub fn new(frames: usize) -> Self {
        Self(Arc::new(Semaphore::new(frames)))
    }
}

impl<B> Pump<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(stream: SendStream<Bytes>, body: B) -> Self {
        Self {
            stream,
            body,
            budget: None,
            sent: false,
        }
    }

    /// For sealed bodies to a seam: after the first frame, each waits for a place in
    /// the connection's `budget` before it is taken from the body (and so sealed).
    ///
    /// It does not wait for room for a whole frame first. Doing so stalled the
    /// connection for good once more replies were under way than the connection's
    /// window holds frames for (320 of 1 MiB with `limits.max_streams: 1024`;
    /// tests/mesh.rs), apparently because HTTP/2 hands the window out in pieces and
    /// streams each holding a piece smaller than a frame all waited (capping how many
    /// streams wait at once did not cure it). A frame may therefore wait in the queue
    /// for its stream's window while it holds a place; a peer seam hands window back as
    /// soon as it passes data on, so places are held long only behind clients that stop
    /// reading.
    pub fn budgeted(mut self, budget: &SendBudget) -> Self {
        self.budget = Some(Budget {
            places: PollSemaphore::new(budget.0.clone()),
            held: None,
        });
        self
    }

    /// Sends what the body has ready now; a body that finishes at once is sent whole
    /// without a task of its own. What is left goes on in a spawned task, and failures
    /// there are the receiver's to see (a reset or cut stream).
    pub async fn run_or_spawn(mut self)
    where
        B: Send + 'static,
    {
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut self).poll(cx))).await;
        match first {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "sending a body to the peer seam stopped")
            }
            Poll::Pending => {
                tokio::spawn(async move {
                    if let Err(e) = self.await {
                        tracing::debug!(error = %e, "sending a body to the peer seam stopped");
                    }
                });
            }
        }
    }

    fn finish(&mut self) -> Result<(), MeshError> {
        self.stream.send_data(Bytes::new(), true)?;
        Ok(())
    }
}

impl<B> Future for Pump<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), MeshError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(reset) = this.stream.poll_reset(cx) {
                return Poll::Ready(Err(match reset {
                    Ok(reason) => MeshError::Reset(reason),
                    Err(e) => MeshError::Send(e),
                }));
            }
            if this.body.is_end_stream() {
                return Poll::Ready(this.finish());
            }
            if this.sent && this.stream.capacity() == 0 {
                this.stream.reserve_capacity(1);
                match ready!(this.stream.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(e.into())),
                    None => return Poll::Ready(Err(MeshError::Closed)),
                }
            }
            if let Some(budget) = &mut this.budget
                && this.sent
                && budget.held.is_none()
            {
                // The semaphore is never closed; if it were, go on without a place.
                budget.held = ready!(budget.places.poll_acquire(cx));
            }
            let polled = Pin::new(&mut this.body).poll_frame(cx);
            if polled.is_pending()
                && let Some(budget) = &mut this.budget
            {
                // Waiting on the app: let other streams use the place and the window
                // meanwhile, so streams idle on their app (gRPC streams, long polls)
                // cannot hold the connection's window between them.
                budget.held = None;
                this.stream.reserve_capacity(0);
            }
            match ready!(polled) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let data = match this.budget.as_mut().and_then(|b| b.held.take()) {
                            Some(place) => Bytes::from_owner(BudgetedFrame {
                                frame: data,
                                _place: place,
                            }),
                            None => data,
                        };
                        let end = this.body.is_end_stream();
                        this.sent = true;
                        this.stream.send_data(data, end)?;
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    this.stream.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(MeshError::Body(e.into())));
                }
                None => return Poll::Ready(this.finish()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use http_body_util::Full;

    use super::*;

    /// A message that fits one frame leaves in the pump's first poll, before the
    /// connection's task has written the stream's HEADERS and so before the stream has
    /// any room: a small request or reply needs no spawned task and no second poll.
    #[tokio::test]
    async fn a_one_frame_body_is_sent_in_the_first_poll() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            let (req, respond) = conn.accept().await.expect("a stream").expect("stream ok");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut got = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("the body's data");
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            drop(respond);
            got.freeze()
        });

        let (send, conn) = h2::client::handshake(client_io)
            .await
            .expect("client handshake");
        let mut send = send.ready().await.expect("room for a stream");
        let (_response, stream) = send
            .send_request(http::Request::new(()), false)
            .expect("a stream");
        assert_eq!(
            stream.capacity(),
            0,
            "the stream has no room before HEADERS leave"
        );
        let mut pump = Pump::new(stream, Full::new(Bytes::from_static(b"one frame")));
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pump).poll(cx))).await;
        assert!(
            matches!(first, Poll::Ready(Ok(()))),
            "the whole body is sent in the first poll"
        );

        tokio::spawn(conn);
        let got = tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("the server got the body in time")
            .expect("the server task");
        assert_eq!(&got[..], b"one frame");
    }
}
