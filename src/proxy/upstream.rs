//! The pooled client to the local app (HTTP/1.1 or h2c, per `upstream_protocol`).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::OpenedBody;
use super::head::RequestHead;
use super::headers::{SEAM_CALLER, header_value, strip_hop_by_hop, strip_seam_headers};
use super::mesh::MeshBody;
use crate::config::{UpstreamConfig, UpstreamProtocol};

/// hyper's read buffer limit for an HTTP/1.1 app connection, which also caps the app's
/// response head at 32 KiB (HAProxy's default buffer holds 16 KiB, nginx's 4-8 KiB).
/// hyper's adaptive buffer grows 8 -> 24 -> 56 KiB under this limit (each step keeps the
/// bytes already read in front), so a large body arrives in chunks of at most 56 KiB,
/// each sealed whole into one frame. With 64 KiB the buffer ends at 120 KiB per
/// connection: a seam with a few hundred large responses in flight spent most of its
/// memory there, for no fewer CPU cycles per request (benches/RESULTS.md).
const APP_READ_BUFFER: usize = 32 * 1024;

/// An opened sealed body, or a plain one from a non-seam caller (`interop.plain_mtls`).
pub type UpstreamBody = Either<OpenedBody<MeshBody>, MeshBody>;

pub struct Upstream {
    client: Client<HttpConnector, UpstreamBody>,
    url: Uri,
    protocol: UpstreamProtocol,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the request for the app is not valid HTTP: {0}")]
    Build(#[from] http::Error),
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size(APP_READ_BUFFER);
        if config.protocol == UpstreamProtocol::H2c {
            builder.http2_only(true);
            super::h2_tuning::legacy_client(&mut builder);
        }
        Self {
            client: builder.build(connector),
            url: config.url.clone(),
            protocol: config.protocol,
        }
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// Hands a request from `caller` to the app.
    pub async fn send(
        &self,
        head: RequestHead,
        body: UpstreamBody,
        caller: &str,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri = self.url.clone().into_parts();
        uri.path_and_query = Some(head.path_and_query.parse().map_err(http::Error::from)?);
        let mut req = Request::builder()
            .method(head.method)
            .uri(Uri::from_parts(uri).map_err(http::Error::from)?)
            .body(body)?;
        let headers = req.headers_mut();
        *headers = head.headers;
        // The sending seam already cleaned the head; doing it again here means a
        // compromised or buggy peer still cannot smuggle identity or framing headers.
        strip_hop_by_hop(headers);
        strip_seam_headers(headers);
        headers.insert(SEAM_CALLER, header_value(caller));
        match self.protocol {
            UpstreamProtocol::Http1 if !head.authority.is_empty() => {
                if let Ok(v) = HeaderValue::from_str(&head.authority) {
                    headers.insert(header::HOST, v);
                }
            }
            // HTTP/2 carries the authority in the URI; a Host header would conflict.
            _ => {
                headers.remove(header::HOST);
            }
        }
        Ok(self.client.request(req).await?)
    }
}
