//! Binary encoding of HTTP heads and trailers inside sealed Head/Trailers frames.
//!
//! ```text
//! request head:  version u8 | method (u8 len) | path-and-query (u16 len) | authority (u16 len) | headers
//! response head: version u8 | status u16 | headers
//! headers:       count u16 | { name (u16 len) | value (u16 len) }*
//! ```
//! Everything is length-prefixed big-endian; the decoder checks every length against
//! what is left and never panics. A head must fit one frame (64 KiB), which is larger
//! than any sane header block (hyper's default limit is far lower).

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

const HEAD_VERSION: u8 = 1;
/// Headers the receiving seam adds to a request before handing it to its app
/// (`seam-caller` and `Host`, `upstream.rs`): a decoded request head has room for them,
/// so adding them does not grow and rehash the map.
const ADDED_TO_REQUESTS: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("sealed head is cut short")]
    Truncated,
    #[error("sealed head has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("sealed head version {0} is not supported; upgrade the older seam")]
    Version(u8),
    #[error("sealed head carries an invalid {0}")]
    Invalid(&'static str),
    #[error("the request or response head is larger than {max} bytes")]
    TooLarge { max: usize },
}

/// A request head as carried between seams. The path and the authority are kept in the
/// types the app's request is built from, so that a decoded head hands them on as views
/// into the opened frame instead of copying them twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    /// As it goes into `Host`; empty when the request named none.
    pub authority: HeaderValue,
    pub headers: HeaderMap,
}

/// A response head as carried between seams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// Reads a head from `rest`; header values are views into `whole`, not copies.
struct Reader<'a> {
    whole: &'a Bytes,
    rest: &'a [u8],
}

impl RequestHead {
    /// The head of a request as it arrived, with hop-by-hop headers removed; the
    /// authority is passed in because callers read it before taking the request apart.
    pub fn from_parts(parts: http::request::Parts, authority: HeaderValue) -> Self {
        let mut headers = parts.headers;
        super::headers::strip_hop_by_hop(&mut headers);
        RequestHead {
            method: parts.method,
            path_and_query: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            authority,
            headers,
        }
    }

    pub fn encode(&self, max: usize) -> Result<Bytes, HeadError> {
        let path = self.path_and_query.as_str();
        let mut out = BytesMut::with_capacity(64 + path.len() + 32 * self.headers.len());
        out.put_u8(HEAD_VERSION);
        put_bytes8(&mut out, self.method.as_str().as_bytes())?;
        put_bytes16(&mut out, path.as_bytes())?;
        put_bytes16(&mut out, self.authority.as_bytes())?;
        put_headers(&mut out, &self.headers)?;
        check_size(out, max)
    }

    /// Decodes a head; its header values share `bytes` (the opened frame) rather than
    /// copying it, which only holds that frame until the head has been forwarded.
    pub fn decode(bytes: &Bytes) -> Result<Self, HeadError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != HEAD_VERSION {
            return Err(HeadError::Version(version));
        }
        let method = Method::from_bytes(r.bytes8()?).map_err(|_| HeadError::Invalid("method"))?;
        let path = r.text16("path")?;
        if !path.starts_with(b"/") && path != b"*" {
            return Err(HeadError::Invalid("path"));
        }
        let path_and_query = PathAndQuery::from_maybe_shared(bytes.slice_ref(path))
            .map_err(|_| HeadError::Invalid("path"))?;
        let authority = HeaderValue::from_maybe_shared(bytes.slice_ref(r.text16("authority")?))
            .map_err(|_| HeadError::Invalid("authority"))?;
        let headers = r.headers(ADDED_TO_REQUESTS)?;
        r.finish()?;
        Ok(Self {
            method,
            path_and_query,
            authority,
            headers,
        })
    }
}

impl ResponseHead {
    pub fn encode(&self, max: usize) -> Result<Bytes, HeadError> {
        let mut out = BytesMut::with_capacity(16 + 32 * self.headers.len());
        out.put_u8(HEAD_VERSION);
        out.put_u16(self.status.as_u16());
        put_headers(&mut out, &self.headers)?;
        check_size(out, max)
    }

    /// Decodes a head; header values share `bytes`, as for requests.
    pub fn decode(bytes: &Bytes) -> Result<Self, HeadError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != HEAD_VERSION {
            return Err(HeadError::Version(version));
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| HeadError::Invalid("status"))?;
        let headers = r.headers(0)?;
        r.finish()?;
        Ok(Self { status, headers })
    }
}

pub fn encode_trailers(trailers: &HeaderMap, max: usize) -> Result<Bytes, HeadError> {
    let mut out = BytesMut::with_capacity(32 * trailers.len());
    put_headers(&mut out, trailers)?;
    check_size(out, max)
}

pub fn decode_trailers(bytes: &Bytes) -> Result<HeaderMap, HeadError> {
    let mut r = Reader::new(bytes);
    let headers = r.headers(0)?;
    r.finish()?;
    Ok(headers)
}

fn check_size(out: BytesMut, max: usize) -> Result<Bytes, HeadError> {
    if out.len() > max {
        return Err(HeadError::TooLarge { max });
    }
    Ok(out.freeze())
}

fn put_bytes8(out: &mut BytesMut, b: &[u8]) -> Result<(), HeadError> {
    let len = u8::try_from(b.len()).map_err(|_| HeadError::Invalid("method"))?;
    out.put_u8(len);
    out.put_slice(b);
    Ok(())
}

fn put_bytes16(out: &mut BytesMut, b: &[u8]) -> Result<(), HeadError> {
    let len = u16::try_from(b.len()).map_err(|_| HeadError::TooLarge {
        max: u16::MAX as usize,
    })?;
    out.put_u16(len);
    out.put_slice(b);
    Ok(())
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) -> Result<(), HeadError> {
    let count = u16::try_from(headers.len()).map_err(|_| HeadError::TooLarge {
        max: u16::MAX as usize,
    })?;
    out.put_u16(count);
    for (name, value) in headers {
        put_bytes16(out, name.as_str().as_bytes())?;
        put_bytes16(out, value.as_bytes())?;
    }
    Ok(())
}

impl<'a> Reader<'a> {
    fn new(whole: &'a Bytes) -> Self {
        Self { whole, rest: whole }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HeadError> {
        if self.rest.len() < n {
            return Err(HeadError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HeadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HeadError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes8(&mut self) -> Result<&'a [u8], HeadError> {
        let n = self.u8()? as usize;
        self.take(n)
    }

    fn bytes16(&mut self) -> Result<&'a [u8], HeadError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// Like `bytes16`, for a field that must be UTF-8 (the path, the authority).
    fn text16(&mut self, what: &'static str) -> Result<&'a [u8], HeadError> {
        let b = self.bytes16()?;
        std::str::from_utf8(b).map_err(|_| HeadError::Invalid(what))?;
        Ok(b)
    }

    /// The headers, in a map with room for `room` more.
    fn headers(&mut self, room: usize) -> Result<HeaderMap, HeadError> {
        let count = self.u16()? as usize;
        // Each header takes at least 4 bytes: a lying count cannot make us reserve
        // more than the input could hold.
        let mut map = HeaderMap::with_capacity(count.min(self.rest.len() / 4) + room);
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.bytes16()?)
                .map_err(|_| HeadError::Invalid("header name"))?;
            let value = self.bytes16()?;
            let value = HeaderValue::from_maybe_shared(self.whole.slice_ref(value))
                .map_err(|_| HeadError::Invalid("header value"))?;
            map.append(name, value);
        }
        Ok(map)
    }

    fn finish(&self) -> Result<(), HeadError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(HeadError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_request() -> RequestHead {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        RequestHead {
            method: Method::POST,
            path_and_query: PathAndQuery::from_static("/charge?id=7"),
            authority: HeaderValue::from_static("billing"),
            headers,
        }
    }

    #[test]
    fn a_decoded_request_head_has_room_for_the_headers_the_receiver_adds() {
        let decoded = RequestHead::decode(&sample_request().encode(65536).unwrap()).unwrap();
        assert_eq!(decoded.headers.len(), 3);
        assert!(decoded.headers.capacity() >= 3 + ADDED_TO_REQUESTS);
    }

    #[test]
    fn request_and_response_heads_round_trip() {
        let req = sample_request();
        assert_eq!(
            RequestHead::decode(&req.encode(65536).unwrap()).unwrap(),
            req
        );
        let resp = ResponseHead {
            status: StatusCode::IM_A_TEAPOT,
            headers: req.headers.clone(),
        };
        assert_eq!(
            ResponseHead::decode(&resp.encode(65536).unwrap()).unwrap(),
            resp
        );
        assert_eq!(
            decode_trailers(&encode_trailers(&req.headers, 65536).unwrap()).unwrap(),
            req.headers
        );
    }

    #[test]
    fn bad_heads_give_typed_errors() {
        let wire = sample_request().encode(65536).unwrap();
        assert_eq!(
            RequestHead::decode(&wire.slice(..wire.len() - 1)),
            Err(HeadError::Truncated)
        );
        let mut longer = wire.to_vec();
        longer.push(0);
        assert_eq!(
            RequestHead::decode(&longer.into()),
            Err(HeadError::TrailingBytes(1))
        );
        let mut v = wire.to_vec();
        v[0] = 9;
        assert_eq!(RequestHead::decode(&v.into()), Err(HeadError::Version(9)));
        assert_eq!(
            sample_request().encode(10),
            Err(HeadError::TooLarge { max: 10 })
        );
    }

    #[test]
    fn a_request_head_needs_a_path_and_a_clean_authority() {
        let with = |path: &'static str, authority: &'static [u8]| {
            let mut head = sample_request();
            head.path_and_query = PathAndQuery::from_static(path);
            let mut wire = BytesMut::from(&head.encode(65536).unwrap()[..]);
            // Swap the encoded authority, which HeaderValue would not take.
            let at = 1 + 1 + head.method.as_str().len() + 2 + path.len();
            let rest = wire.split_off(at + 2 + "billing".len());
            wire.truncate(at);
            wire.put_u16(authority.len() as u16);
            wire.put_slice(authority);
            wire.unsplit(rest);
            RequestHead::decode(&wire.freeze())
        };
        let ok = with("/a?b=c", b"billing:8080").unwrap();
        assert_eq!(ok.path_and_query, "/a?b=c");
        assert_eq!(ok.authority, "billing:8080");
        assert_eq!(with("*", b"").unwrap().path_and_query, "*");
        assert_eq!(
            with("/", b"bill\ning"),
            Err(HeadError::Invalid("authority"))
        );
        assert_eq!(with("/", b"\xff"), Err(HeadError::Invalid("authority")));
        let mut no_path = sample_request().encode(65536).unwrap().to_vec();
        let at = 1 + 1 + "POST".len();
        no_path.splice(at..at + 2 + "/charge?id=7".len(), [0, 0]);
        assert_eq!(
            RequestHead::decode(&no_path.into()),
            Err(HeadError::Invalid("path"))
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = Bytes::from(bytes);
            let _ = RequestHead::decode(&bytes);
            let _ = ResponseHead::decode(&bytes);
            let _ = decode_trailers(&bytes);
        }
    }
}
