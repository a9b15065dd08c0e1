//! The data path: outbound (app -> mesh) and inbound (mesh -> app) proxies
//! (DESIGN §1, §3).

pub mod body;
pub mod coalesce;
pub mod framing;
pub mod head;
pub mod headers;
pub mod inbound;
pub mod mesh;
pub mod outbound;
pub mod peer;
pub mod upstream;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use headers::SEAM_ERROR;

/// Every seam-to-seam endpoint lives under this path; plain mTLS callers never reach it.
pub const SEAM_PATH_PREFIX: &str = "/_seam/";
/// The handshake endpoint on the inbound port (seam to seam only).
pub const HANDSHAKE_PATH: &str = "/_seam/v1/handshake";
/// Sealed messages travel as POSTs to this path.
pub const MESSAGE_PATH: &str = "/_seam/v1/message";
/// Request bodies at most this large are read before sending, so that a request can
/// be sent again on a new session when the peer seam lost the first one.
pub const KEEP_LIMIT: u64 = 64 * 1024;

/// Why seam itself answered a request instead of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    BadRequest,
    NoTarget,
    UnknownService,
    PeerUnreachable,
    HandshakeFailed,
    SessionLost,
    PeerProtocol,
    UpstreamUnavailable,
    Timeout,
    UnknownSession,
    Forbidden,
    HeadersTooLarge,
    RateLimited,
    BodyTooLarge,
}

impl Failure {
    pub const ALL: [Failure; 14] = [
        Failure::BadRequest,
        Failure::NoTarget,
        Failure::UnknownService,
        Failure::PeerUnreachable,
        Failure::HandshakeFailed,
        Failure::SessionLost,
        Failure::PeerProtocol,
        Failure::UpstreamUnavailable,
        Failure::Timeout,
        Failure::UnknownSession,
        Failure::Forbidden,
        Failure::HeadersTooLarge,
        Failure::RateLimited,
        Failure::BodyTooLarge,
    ];

    /// The `seam-error` header value.
    pub fn code(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad-request",
            Failure::NoTarget => "no-target",
            Failure::UnknownService => "unknown-service",
            Failure::PeerUnreachable => "peer-unreachable",
            Failure::HandshakeFailed => "handshake-failed",
            Failure::SessionLost => "session-lost",
            Failure::PeerProtocol => "peer-protocol",
            Failure::UpstreamUnavailable => "upstream-unavailable",
            Failure::Timeout => "timeout",
            Failure::UnknownSession => "unknown-session",
            Failure::Forbidden => "forbidden",
            Failure::HeadersTooLarge => "headers-too-large",
            Failure::RateLimited => "rate-limited",
            Failure::BodyTooLarge => "body-too-large",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest | Failure::NoTarget => StatusCode::BAD_REQUEST,
            Failure::UnknownService => StatusCode::NOT_FOUND,
            Failure::PeerUnreachable
            | Failure::HandshakeFailed
            | Failure::SessionLost
            | Failure::PeerProtocol
            | Failure::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // Distinct from anything an app would answer, and never retried blindly
            // by HTTP clients: only seams act on it.
            Failure::UnknownSession => StatusCode::GONE,
            Failure::Forbidden => StatusCode::FORBIDDEN,
            Failure::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Failure::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Failure::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn index(self) -> usize {
        Failure::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A reply made by seam: the status, `seam-error`, and a one-line text body that says
/// what failed and where.
pub fn failure_response(failure: Failure, message: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *resp.status_mut() = failure.status();
    let headers = resp.headers_mut();
    headers.insert(SEAM_ERROR, http::HeaderValue::from_static(failure.code()));
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// HTTP/2 settings shared by both ends of the mesh hop (and the h2c app client). The
/// windows are well above the 64 KiB default, on which 1 MiB bodies stalled, and small
/// enough that what the peer sends is taken off the socket soon.
pub mod h2_tuning {

    use crate::session::seal::{HEADER_LEN, MAX_PAYLOAD, TAG_LEN};

    /// Four sealed frames, all but the last few hundred bytes of the fourth (a full frame
    /// is 64 KiB and 56 bytes). The receiver gives window back as it passes data on, and
    /// h2 sends the update once half of it is free again, so a busy stream keeps about
    /// two frames' room. Across hosts this caps a stream at a window per round trip
    /// (256 MiB/s at 1 ms).
    pub const STREAM_WINDOW: u32 = 256 * 1024;
    /// What a peer may send on one connection before this seam has passed it on: four
    /// streams' windows, so downloads whose clients stop reading stall only themselves
    /// until four of them hold the whole window.
    ///
    /// Data the receiver has not taken yet waits in the kernel's socket buffer and in
    /// HTTP/2's queue, so this bounds a connection's backlog. At 4 MiB the calling seam's
    /// mesh socket held about 4 MB unread under 1 MiB replies, its receive buffer
    /// filled (the kernel advertised a zero window 2-4 times per reply) and the answering
    /// seam's sends ran inside the caller's reads. At 1 MiB (with 256 KiB per stream)
    /// the pair used 4-8 % less CPU per request at h1-1m and 2-8 % less at h2-1m in every
    /// one of six alternating runs. 128 KiB / 512 KiB was slower on both, 512 KiB / 2 MiB
    /// on h2-1m (benches/RESULTS.md).
    pub const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;

    /// One sealed frame with a full 64 KiB payload (64 KiB and 56 bytes): any chunk the
    /// app's side delivers (at most 56 KiB from an HTTP/1.1 app, see `upstream.rs`)
    /// seals whole into one frame that travels as one DATA frame. No remainder of a
    /// chunk waits for the next frame (which would keep the app connection's read buffer
    /// alive and make it allocate another), and the receiver opens each DATA frame as it
    /// comes instead of joining frames split across two.
    pub const MAX_FRAME: u32 = (MAX_PAYLOAD + HEADER_LEN + TAG_LEN) as u32;

    /// Below this many queued bytes HTTP/2 takes more from a stream's body (h2's
    /// default is 400 KiB). [`super::mesh::Pump`], like hyper, polls the body for its
    /// next frame once there is any room, so a stream holds one frame queued and one
    /// in hand; below one frame's size this stops a third. Memory per stream stays at
    /// two frames however many streams share the connection, and a slow reader holds
    /// back only its own stream.
    pub const SEND_BUFFER: usize = 16 * 1024;

    /// Sealed frames one inbound connection lets wait in HTTP/2's queue at once (the
    /// first frame of each reply aside), 512 KiB: enough to keep the connection's
    /// writes going, few enough that a frame is written soon after it is sealed. With
    /// 160 streams of 1 MiB replies, B's peak fell from 43-44 to 34-37 MiB and its CPU
    /// per request by 5-14 % (benches/RESULTS.md); fewer (2, 4) measured no better.
    pub const SEND_BUDGET_FRAMES: usize = 8;

    /// Reset streams remembered so that frames still in flight for them are dropped
    /// quietly (h2 keeps 50). When apps hang up on many large downloads at once, the
    /// peer seam's DATA already in flight (up to a stream window each) keeps arriving.
    pub const RESET_STREAMS_REMEMBERED: usize = 1024;

    /// The client side talks only to authenticated peer seams. h2 closes a connection
    /// after 1024 streams it had to reset because of frames on streams it had already
    /// closed, counted over the connection's life; under load-generator churn (clients
    /// hanging up mid-download, again and again) that ended the shared mesh connection
    /// and failed every request on it. seam's own `limits.peer_failures` judges peers.
    pub fn client(b: &mut h2::client::Builder) {
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
            .max_local_error_reset_streams(None);
    }

    /// The server's send buffer holds one whole frame: a sealed reply's next frame is
    /// taken from the app only once the last one has left (`Pump::budgeted`).
    pub fn server(b: &mut h2::server::Builder) {
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(MAX_FRAME as usize);
    }

    pub fn legacy_client(b: &mut hyper_util::client::legacy::Builder) {
        b.http2_initial_stream_window_size(STREAM_WINDOW)
            .http2_initial_connection_window_size(CONNECTION_WINDOW)
            .http2_max_frame_size(MAX_FRAME)
            .http2_max_send_buf_size(SEND_BUFFER)
            .http2_adaptive_window(false);
    }
}
