//! Networking shared by both services: whether a peer address is trusted,
//! the client address that trusted proxies vouch for in `X-Forwarded-For`
//! or RFC 7239 `Forwarded`, the TCP-or-Unix stream each service uses
//! to reach its backends ([`Stream`]), listening sockets systemd hands
//! over ([`Inherited`]), and large stored bodies sent from memory files
//! without a copy ([`ZeroCopy`]).

mod activation;
mod sendfile;
mod stream;

pub use activation::Inherited;
pub use sendfile::{FileCopy, ZeroCopy, files as memory_files, offer, sent as sent_from_files};
pub use stream::Stream;

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// Which request header carries the chain of forwarded addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealIpHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`
    XForwardedFor,
    /// RFC 7239: `Forwarded: for=client;proto=https, for="[2001:db8::1]:443"`
    Forwarded,
}

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// The rate-limit and cache subject of a caller known only by its address:
/// `ip:` and the address.
pub fn ip_subject(ip: IpAddr) -> String {
    let mut subject = String::with_capacity(18);
    subject.push_str("ip:");
    write_ip(&mut subject, ip);
    subject
}

/// `ip` appended as `Display` writes it. IPv4, the common case, is written
/// without the formatting machinery: this runs more than once per request.
pub fn write_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        use std::fmt::Write as _;
        let _ = write!(out, "{ip}");
        return;
    };
    let (text, len) = ipv4_text(v4);
    if let Ok(text) = std::str::from_utf8(&text[..len]) {
        out.push_str(text);
    }
}

/// `write_ip` for a head being written as bytes.
pub fn write_ip_bytes(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        use std::io::Write as _;
        let _ = write!(out, "{ip}");
        return;
    };
    let (text, len) = ipv4_text(v4);
    out.extend_from_slice(&text[..len]);
}

/// Dotted decimal, digit by digit on the stack: formatting each octet cost
/// a copy call per piece, and pushing each character onto a `String` a
/// check of its encoding and of the room left.
fn ipv4_text(v4: std::net::Ipv4Addr) -> ([u8; 15], usize) {
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    (text, len)
}

/// `::ffff:10.0.0.1` is 10.0.0.1 for trust decisions.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client address: walking the chain right to left from `peer`, as
/// long as the current hop is trusted, step to the address it vouches for.
/// An entry that does not parse (`unknown`, `_hidden`, garbage) ends the walk
/// at the hop that wrote it, as nginx's `real_ip_recursive` does: skipping it
/// would walk into the part the client wrote itself.
pub fn client_address(
    headers: &HeaderMap,
    header: RealIpHeader,
    peer: IpAddr,
    trusted: &[IpNet],
) -> IpAddr {
    let mut client = canonical(peer);
    if !is_trusted(trusted, client) {
        return client;
    }
    let chain = match header {
        RealIpHeader::XForwardedFor => x_forwarded_for(headers),
        RealIpHeader::Forwarded => forwarded(headers),
    };
    for entry in chain.into_iter().rev() {
        if !is_trusted(trusted, client) {
            break;
        }
        match entry {
            Some(ip) => client = canonical(ip),
            None => break,
        }
    }
    client
}

/// Every `X-Forwarded-For` entry in order; `None` where one does not parse.
pub fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(text) => text.split(',').map(|part| node(part.trim())).collect(),
            Err(_) => vec![None],
        })
        .collect()
}

/// The `for=` of every RFC 7239 `Forwarded` element in order; `None` where
/// an element has none or it does not parse.
pub fn forwarded(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("forwarded")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(text) => split_unquoted(text, ',')
                .into_iter()
                .map(|element| {
                    split_unquoted(element, ';').into_iter().find_map(|pair| {
                        let (name, value) = pair.trim().split_once('=')?;
                        name.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| node(unquote(value.trim())))
                    })?
                })
                .collect(),
            Err(_) => vec![None],
        })
        .collect()
}

/// A node as proxies write it: `192.0.2.1`, `192.0.2.1:5555`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443`. RFC 7239's
/// `unknown` and obfuscated `_names` are not addresses.
pub fn node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let inner = text.strip_prefix('[')?;
    let (ip, rest) = inner.split_once(']')?;
    // After the bracket only a port may follow (RFC 7239 allows an
    // obfuscated one, `:_abc`).
    if !(rest.is_empty() || rest.starts_with(':')) {
        return None;
    }
    ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

fn unquote(text: &str) -> &str {
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text)
}

/// Split on `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn nodes_in_the_forms_proxies_send() {
        assert_eq!(node("192.0.2.1"), Some(ip("192.0.2.1")));
        assert_eq!(node("192.0.2.1:5555"), Some(ip("192.0.2.1")));
        assert_eq!(node("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(node("[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(node("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(node("[2001:db8::1]:_port"), Some(ip("2001:db8::1")));
        assert_eq!(node("unknown"), None);
        assert_eq!(node("_obfuscated"), None);
        assert_eq!(node("[192.0.2.1]"), None);
        assert_eq!(node("[2001:db8::1]x"), None);
        assert_eq!(node(""), None);
    }

    #[test]
    fn the_walk_stops_at_the_first_entry_that_does_not_parse() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.2");
        let walk = |values: &[&str]| {
            client_address(
                &headers("x-forwarded-for", values),
                RealIpHeader::XForwardedFor,
                peer,
                &trusted,
            )
        };
        assert_eq!(walk(&["203.0.113.9, 10.0.0.5:4444"]), ip("203.0.113.9"));
        assert_eq!(walk(&["203.0.113.9:1234"]), ip("203.0.113.9"));
        // The trusted proxy could not tell; the client's own entry is never reached.
        assert_eq!(walk(&["6.6.6.6, unknown"]), peer);
        assert_eq!(walk(&["6.6.6.6, _hidden"]), peer);
        assert_eq!(walk(&["6.6.6.6, unknown", "10.0.0.7"]), ip("10.0.0.7"));
        assert_eq!(walk(&["[2001:db8::7]:443"]), ip("2001:db8::7"));
        // An untrusted hop ends the walk.
        assert_eq!(walk(&["1.1.1.1, 203.0.113.9"]), ip("203.0.113.9"));
        // An untrusted peer is the client, whatever it says.
        let said = headers("x-forwarded-for", &["10.0.0.9"]);
        assert_eq!(
            client_address(
                &said,
                RealIpHeader::XForwardedFor,
                ip("198.51.100.1"),
                &trusted
            ),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn rfc_7239_forwarded_is_parsed() {
        let trusted = nets(&["10.0.0.0/8"]);
        let walk = |values: &[&str]| {
            client_address(
                &headers("forwarded", values),
                RealIpHeader::Forwarded,
                ip("10.0.0.2"),
                &trusted,
            )
        };
        assert_eq!(
            walk(&["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            ip("192.0.2.60")
        );
        assert_eq!(
            walk(&["for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\""]),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(walk(&["For=\"10.0.0.3\", for=unknown"]), ip("10.0.0.2"));
        assert_eq!(walk(&["proto=https"]), ip("10.0.0.2"));
        assert_eq!(walk(&["for=\"a,b\", for=10.0.0.4"]), ip("10.0.0.4"));
    }

    #[test]
    fn mapped_addresses_are_trusted_as_v4() {
        assert!(is_trusted(&nets(&["10.0.0.0/8"]), ip("::ffff:10.1.2.3")));
    }

    proptest! {
        #[test]
        fn ip_subjects_are_written_as_display_writes_them(octets in any::<[u8; 4]>(), v6 in any::<u128>()) {
            let v4 = IpAddr::from(octets);
            prop_assert_eq!(ip_subject(v4), format!("ip:{v4}"));
            let v6 = IpAddr::from(v6.to_be_bytes());
            prop_assert_eq!(ip_subject(v6), format!("ip:{v6}"));
        }

        #[test]
        fn parsing_never_panics(text in "[ -~]{0,60}") {
            let _ = node(&text);
            if let Ok(value) = text.parse() {
                let mut h = HeaderMap::new();
                h.insert("forwarded", value);
                let _ = forwarded(&h);
            }
        }
    }
}
