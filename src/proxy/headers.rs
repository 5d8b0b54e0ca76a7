//! Header rewriting between client and Gunicorn: hop-by-hop fields removed in
//! both directions (RFC 9110 §7.6.1, pingora #706), and the fields the gateway
//! sets itself (`X-Forwarded-*` from what the `identify` phase decided,
//! `X-Request-ID`), written as lines of Gunicorn's request head.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::identify::{Caller, X_FORWARDED_FOR, X_REQUEST_ID};

/// Fields that describe one connection, never the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a field describes one connection (`Upgrade` included: the
/// gateway does not tunnel protocol upgrades).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::UPGRADE || HOP_BY_HOP.contains(name)
}

/// Remove hop-by-hop fields, including every field `Connection` names.
/// `Upgrade` goes too: the gateway does not tunnel protocol upgrades.
/// Returns whether there were any.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // Most messages carry none: one pass of cheap name comparisons instead
    // of a hashed removal per name (measured on the small-response path).
    let any = headers.keys().any(is_hop_by_hop);
    if !any {
        return false;
    }
    let named: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Only the names present are removed: a response's usual
    // `Connection: keep-alive` costs one removal, not ten.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            is_hop_by_hop(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_str()))
        })
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
    true
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers only a proxy should set, removed when the peer is not a trusted
/// proxy. Some rewrite what Django thinks the URL or the scheme is (an
/// unkeyed input for cache poisoning); some name a client address; and
/// Gunicorn refuses a request whose `X-Forwarded-Ssl` or
/// `X-Forwarded-Protocol` contradicts the `X-Forwarded-Proto` set here
/// ("Contradictory scheme headers").
const PROXY_ONLY: [HeaderName; 10] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-protocol"),
    HeaderName::from_static("x-forwarded-scheme"),
];

/// Write the fields the gateway sets on a request to Gunicorn into `out`,
/// as the head's lines (`name: value\r\n`): `X-Forwarded-For`,
/// `X-Forwarded-Proto` and `X-Forwarded-Host` from what the `identify`
/// phase decided, and `X-Request-ID`. Values a client sent are kept only
/// when its peer is a trusted proxy; what else it sent of these, and of the
/// fields only a proxy should set, is removed from `headers`. They are
/// written, not put in the map: nothing reads them before they go out, and
/// each insert into the map was a hashed lookup (`docs/benchmarks.md`).
pub fn forwarded_fields(
    headers: &mut HeaderMap,
    caller: &Caller,
    host: Option<&HeaderValue>,
    out: &mut Vec<u8>,
) {
    let trusted = caller.trusted_peer;
    // Most requests carry none of these: one pass of name comparisons,
    // and a removal only for what is there.
    let (mut forwarded_for, mut proto, mut forwarded_host, mut id, mut proxy_only) =
        (false, false, false, false, false);
    for name in headers.keys() {
        if *name == X_FORWARDED_FOR {
            forwarded_for = true;
        } else if *name == X_FORWARDED_PROTO {
            proto = true;
        } else if *name == X_FORWARDED_HOST {
            forwarded_host = true;
        } else if *name == X_REQUEST_ID {
            id = true;
        } else if PROXY_ONLY.contains(name) {
            proxy_only = true;
        }
    }

    out.extend_from_slice(b"x-forwarded-for: ");
    if trusted && forwarded_for {
        for earlier in headers.get_all(X_FORWARDED_FOR) {
            if let Ok(earlier) = earlier.to_str() {
                out.extend_from_slice(earlier.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
    }
    crate::net::write_ip_bytes(out, caller.peer);
    out.extend_from_slice(b"\r\n");
    if forwarded_for {
        headers.remove(X_FORWARDED_FOR);
    }

    if !trusted || !proto {
        line(out, X_FORWARDED_PROTO.as_str(), b"http");
        if proto {
            headers.remove(X_FORWARDED_PROTO);
        }
    }
    if !trusted || !forwarded_host {
        if let Some(host) = host {
            line(out, X_FORWARDED_HOST.as_str(), host.as_bytes());
        }
        if forwarded_host {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    if !trusted && proxy_only {
        for name in &PROXY_ONLY {
            headers.remove(name);
        }
    }
    if id {
        headers.remove(X_REQUEST_ID);
    }
    line(out, X_REQUEST_ID.as_str(), caller.request_id.as_bytes());
}

/// One field of a head: `name: value\r\n`.
pub fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One `Cookie` field, the values joined with `; ` (RFC 9113 §8.2.3 for
/// HTTP/2, which sends a field per cookie; RFC 6265 §5.4 for HTTP/1.1). WSGI
/// servers join repeated fields with `,`, which Django's cookie parser reads
/// as one value, so without this Django would lose cookies that the gateway
/// identified the caller by.
pub fn combine_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Joining valid field values with `; ` yields a valid field value.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn connection_listed_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        // Repeated fields go whole; a standard field that `Connection`
        // names goes too; what is neither stays.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive".parse().unwrap());
        h.append(header::CONNECTION, "Cache-Control".parse().unwrap());
        h.append(header::TRANSFER_ENCODING, "gzip".parse().unwrap());
        h.append(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CACHE_CONTROL, "no-store".parse().unwrap());
        h.append(header::SET_COOKIE, "a=1".parse().unwrap());
        h.append(header::SET_COOKIE, "b=2".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h.get_all(header::SET_COOKIE).iter().count(), 2);
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "255.255.255.255",
            "192.168.1.10",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut text = String::new();
            crate::net::write_ip(&mut text, ip);
            assert_eq!(text, ip.to_string());
            let mut bytes = Vec::new();
            crate::net::write_ip_bytes(&mut bytes, ip);
            assert_eq!(bytes, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn cookie_fields_become_one() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "sessionid=x; b=2".parse().unwrap());
        combine_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; sessionid=x; b=2"]);
    }
}
