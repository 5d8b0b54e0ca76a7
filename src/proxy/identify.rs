//! The `identify` phase: who is calling. For now the client address (from
//! `X-Forwarded-For` only through `trusted_proxies`) and the request id; the
//! rate limiter adds JWT, API-key and session identities here.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_REQUEST_ID: &str = "x-request-id";

/// The caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The TCP peer.
    pub peer: IpAddr,
    /// The client as far as trusted proxies vouch for it; the peer otherwise.
    pub client: IpAddr,
    /// Whether the peer is a trusted proxy whose forwarding headers we keep.
    pub trusted_peer: bool,
    pub request_id: HeaderValue,
}

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// `::ffff:10.0.0.1` is 10.0.0.1 for trust decisions.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The addresses in every `X-Forwarded-For` field, in order.
fn forwarded_chain(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| part.trim().parse::<IpAddr>().ok())
        .collect()
}

pub fn identify(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> Caller {
    let peer = canonical(peer);
    let trusted_peer = is_trusted(trusted, peer);
    // Like nginx's real_ip_recursive: walk right to left past trusted hops;
    // the first untrusted address is the client.
    let client = if trusted_peer {
        forwarded_chain(headers)
            .into_iter()
            .rev()
            .map(canonical)
            .find(|ip| !is_trusted(trusted, *ip))
            .unwrap_or(peer)
    } else {
        peer
    };
    let request_id = headers
        .get(X_REQUEST_ID)
        .filter(|_| trusted_peer)
        .filter(|v| valid_request_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    Caller {
        peer,
        client,
        trusted_peer,
        request_id,
    }
}

fn valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 128 random bits as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    let id: u128 = rand::random();
    let text = format!("{id:032x}");
    // 32 hex digits are always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(xff: &str, id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, xff.parse().unwrap());
        h.insert(X_REQUEST_ID, id.parse().unwrap());
        h
    }

    #[test]
    fn untrusted_peer_cannot_choose_its_address_or_request_id() {
        let caller = identify(
            &headers("1.2.3.4", "mine"),
            "203.0.113.9".parse().unwrap(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(caller.client, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert!(!caller.trusted_peer);
        assert_ne!(caller.request_id, "mine");
        assert_eq!(caller.request_id.len(), 32);
    }

    #[test]
    fn trusted_chain_is_walked_right_to_left() {
        let caller = identify(
            &headers("6.6.6.6, 1.2.3.4, 10.0.0.7", "abc-123"),
            "10.0.0.1".parse().unwrap(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(caller.client, "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(caller.request_id, "abc-123");
    }

    #[test]
    fn mapped_ipv6_peer_matches_ipv4_cidr() {
        assert!(is_trusted(
            &nets(&["127.0.0.0/8"]),
            "::ffff:127.0.0.1".parse().unwrap()
        ));
    }
}
