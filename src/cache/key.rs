//! Cache keys. A request's URI key is its normalised host, the path as the
//! WSGI server decodes it (so `/v1/%73tories/` and `/v1/stories/` are one
//! entry, and one invalidation), the query with its parameters sorted by
//! name and decoded, and the request headers Django may reflect without
//! naming them in `Vary` (`X-Forwarded-Host`, `X-Original-URL`, …). Each
//! stored response then chooses among variants by the request headers its
//! `Vary` names.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Request headers that change what Django builds (absolute URLs, the
/// scheme, the path) without a `Vary`: part of every key, so that nobody
/// can plant a response made with them for requests without (web cache
/// poisoning). The gateway removes most of them from untrusted peers.
const REFLECTED: [HeaderName; 7] = [
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("forwarded"),
];

/// Separates the parts of a key; no part can hold it (paths with NUL are refused).
const SEP: char = '\u{0}';

/// The URI key: what a write to this URI invalidates, every variant and
/// every user together.
pub fn uri_key(host: &str, decoded_path: &[u8], query: Option<&str>, ignored: &[String]) -> String {
    let mut key = String::with_capacity(host.len() + decoded_path.len() + 32);
    key.push_str(host);
    key.push(SEP);
    key.push_str(&String::from_utf8_lossy(decoded_path));
    key.push(SEP);
    if let Some(query) = query {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (form_decode(name), form_decode(value))
            })
            .filter(|(name, _)| !ignored.iter().any(|i| i.as_bytes() == name.as_slice()))
            .collect();
        // Stable: repeated names keep their order, as `getlist` sees it.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, value)) in pairs.iter().enumerate() {
            if i > 0 {
                key.push('&');
            }
            escape_into(&mut key, name);
            key.push('=');
            escape_into(&mut key, value);
        }
    }
    key
}

/// The key of the entries a request may be served from: the URI key, the
/// reflected headers, and on per-user routes the verified subject.
pub fn primary_key(uri_key: &str, headers: &HeaderMap, subject: Option<&str>) -> String {
    let mut key = uri_key.to_string();
    // Most requests carry none: one pass of name comparisons first.
    let reflected = headers.keys().any(|name| REFLECTED.contains(name));
    for name in REFLECTED.iter().filter(|_| reflected) {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        key.push(SEP);
        key.push_str(name.as_str());
        key.push(':');
        for v in values {
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
            key.push('\n');
        }
    }
    if let Some(subject) = subject {
        key.push(SEP);
        key.push_str("user:");
        key.push_str(subject);
    }
    key
}

/// `application/x-www-form-urlencoded` decoding, as Django reads a query.
pub fn form_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Bytes of a decoded query part, with the key's own separators escaped.
fn escape_into(key: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/:,;".contains(&b) {
            key.push(char::from(b));
        } else {
            key.push('%');
            key.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            key.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
}

/// The host as keyed: the URI's authority (an absolute-form target, or
/// HTTP/2's `:authority`), else `Host`, as the request is forwarded
/// (RFC 9112 §3.2.2); `None` when the allowlist does not hold it.
pub fn host(headers: &HeaderMap, authority: Option<&str>, allowed: &[String]) -> Option<String> {
    let raw = authority
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let host = crate::config::normalise_host(raw);
    (allowed.is_empty() || allowed.contains(&host)).then_some(host)
}

/// A request header's value as `Vary` compares it: every field line joined,
/// spaces around commas dropped; `None` when absent.
pub fn vary_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let mut values = headers.get_all(&name).iter().peekable();
    values.peek()?;
    let mut out = String::new();
    for v in values {
        for part in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(part);
        }
    }
    // Content coding names are case-insensitive (RFC 9110 §8.4.1).
    if name == header::ACCEPT_ENCODING {
        out.make_ascii_lowercase();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, query: Option<&str>) -> String {
        uri_key("h", path.as_bytes(), query, &[])
    }

    #[test]
    fn query_order_and_encoding_do_not_split_entries() {
        assert_eq!(key("/s/", Some("b=2&a=1")), key("/s/", Some("a=1&b=2")));
        assert_eq!(key("/s/", Some("q=a+b")), key("/s/", Some("q=a%20b")));
        assert_eq!(key("/s/", Some("q=%41")), key("/s/", Some("q=A")));
        // Repeated names keep their order: Django's getlist sees it.
        assert_ne!(key("/s/", Some("a=1&a=2")), key("/s/", Some("a=2&a=1")));
        assert_ne!(key("/s/", Some("a=1")), key("/s/", Some("a=2")));
    }

    #[test]
    fn a_decoded_separator_cannot_forge_another_key() {
        // `?` decoded into the path is not a query, and `&`/`=` in a value
        // are not parameters.
        assert_ne!(key("/a?b", None), key("/a", Some("b")));
        assert_ne!(key("/s/", Some("a=1%262=3")), key("/s/", Some("a=1&2=3")));
        assert_ne!(key("/s/", Some("a=%3D")), key("/s/", Some("a%3D=")));
        // A malformed escape is kept as text.
        assert_eq!(form_decode("%4"), b"%4");
        assert_eq!(form_decode("%zz%"), b"%zz%");
    }

    #[test]
    fn ignored_parameters_leave_the_key() {
        let ignored = vec!["utm_source".to_string()];
        let with = uri_key("h", b"/", Some("utm_source=x&a=1"), &ignored);
        let without = uri_key("h", b"/", Some("a=1"), &ignored);
        assert_eq!(with, without);
    }

    #[test]
    fn reflected_headers_are_keyed() {
        let mut headers = HeaderMap::new();
        let plain = primary_key("h", &headers, None);
        headers.insert("x-forwarded-host", "evil.example".parse().unwrap());
        assert_ne!(primary_key("h", &headers, None), plain);
        headers.clear();
        headers.insert("x-original-url", "/admin/".parse().unwrap());
        assert_ne!(primary_key("h", &headers, None), plain);
        // Users never share a key with each other or with anonymous callers.
        headers.clear();
        assert_ne!(primary_key("h", &headers, Some("user:1")), plain);
        assert_ne!(
            primary_key("h", &headers, Some("user:1")),
            primary_key("h", &headers, Some("user:2"))
        );
    }

    #[test]
    fn hosts_are_normalised_and_allowlisted() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "Example.COM:80".parse().unwrap());
        assert_eq!(host(&headers, None, &[]).as_deref(), Some("example.com"));
        let allowed = vec!["example.com".to_string()];
        assert_eq!(
            host(&headers, None, &allowed).as_deref(),
            Some("example.com")
        );
        headers.insert(header::HOST, "other.example".parse().unwrap());
        assert_eq!(host(&headers, None, &allowed), None);
        // An absolute-form target's host is the one forwarded, so it is the
        // one keyed, whatever `Host` says.
        assert_eq!(
            host(&headers, Some("EXAMPLE.com"), &allowed).as_deref(),
            Some("example.com")
        );
    }

    #[test]
    fn vary_values_ignore_spacing_and_line_splits() {
        let mut a = HeaderMap::new();
        a.append(header::ACCEPT_ENCODING, "gzip, BR".parse().unwrap());
        let mut b = HeaderMap::new();
        b.append(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        b.append(header::ACCEPT_ENCODING, "br".parse().unwrap());
        assert_eq!(
            vary_value(&a, "accept-encoding"),
            vary_value(&b, "accept-encoding")
        );
        assert_eq!(vary_value(&a, "cookie"), None);
    }
}
