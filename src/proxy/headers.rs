//! Header hygiene and routing (DESIGN §1, §4).
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never
//! forwarded, nor is anything the `Connection` header names. `Upgrade` goes with them,
//! so an `Upgrade: h2c` request is served as plain HTTP/1.1 and never upgraded
//! through the mesh. `TE: trailers` survives because gRPC needs it end to end.
//! Headers starting `seam-` are seam's own: an app cannot set them.

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

/// Set on the request handed to the local app: the authenticated caller's service.
pub const SEAM_CALLER: HeaderName = HeaderName::from_static("seam-caller");
/// Names the session a sealed message belongs to (seam to seam).
pub const SEAM_SESSION: HeaderName = HeaderName::from_static("seam-session");
/// On a reply made by seam itself: a short machine-readable cause.
pub const SEAM_ERROR: HeaderName = HeaderName::from_static("seam-error");

// `Trailer` is not here: RFC 9110 made it end-to-end (RFC 2616 listed it), and an
// HTTP/1.1 hop only sends the trailer fields it declares, so dropping it would drop
// gRPC's grpc-status over HTTP/1.1 legs.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, the ones `Connection` lists, and `TE` unless it is
/// exactly `trailers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads carry none of these: one pass over the names present costs less than
    // hashing each hop-by-hop name to look it up.
    if !headers
        .keys()
        .any(|name| name == header::TE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_is_trailers = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(header::TE);
    }
}

/// Removes every `seam-*` header: identity and control headers come from seam only.
pub fn strip_seam_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("seam-"))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The service a request from the local app is meant for: the host of an
/// absolute-form URI (`HTTP_PROXY` style) or of `:authority`, else the `Host` header.
/// The port is ignored and the name lowercased.
pub fn target_service<B>(req: &Request<B>) -> Option<String> {
    let from_header;
    let host = match req.uri().host() {
        Some(host) => host,
        None => {
            let value = req.headers().get(header::HOST)?;
            from_header = Authority::try_from(value.as_bytes()).ok()?;
            from_header.host()
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The authority to carry to the peer: what the app addressed, from the URI or else
/// `Host` (empty if neither), for the app behind the peer seam to see as its Host. A
/// `Host` header is shared, not copied.
pub fn request_authority<B>(req: &Request<B>) -> HeaderValue {
    let from_uri = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    from_uri
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .filter(|h| h.to_str().is_ok())
                .cloned()
        })
        .unwrap_or_else(|| HeaderValue::from_static(""))
}

pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAAQAAP__".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        // http2-settings is only hop-by-hop when Connection names it, as h2c upgrade
        // requests do; here it was not named, so it stays.
        assert_eq!(left, vec!["http2-settings", "x-kept"]);
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn seam_headers_from_apps_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("seam-caller", "admin".parse().unwrap());
        h.insert("Seam-Session", "x".parse().unwrap());
        h.insert("seamless", "kept".parse().unwrap());
        strip_seam_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("seamless"));
    }

    #[test]
    fn routing_uses_absolute_uri_then_host() {
        let abs = Request::get("http://Billing:8080/charge").body(()).unwrap();
        assert_eq!(target_service(&abs).as_deref(), Some("billing"));
        let origin = Request::get("/charge")
            .header(header::HOST, "billing:9")
            .body(())
            .unwrap();
        assert_eq!(target_service(&origin).as_deref(), Some("billing"));
        assert_eq!(request_authority(&origin), "billing:9");
        let none = Request::get("/charge").body(()).unwrap();
        assert_eq!(target_service(&none), None);
        let bad = Request::get("/")
            .header(header::HOST, "a b")
            .body(())
            .unwrap();
        assert_eq!(target_service(&bad), None);
        let host = |value: &str| {
            let req = Request::get("/").header(header::HOST, value).body(());
            target_service(&req.unwrap())
        };
        assert_eq!(host("Billing.:80").as_deref(), Some("billing"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
        // A path in Host is not an authority.
        assert_eq!(host("billing/x"), None);
        assert_eq!(host(""), None);
        let h2 = Request::get("http://billing:7/").body(()).unwrap();
        assert_eq!(request_authority(&h2), "billing:7");
        assert_eq!(request_authority(&none), "");
    }
}
