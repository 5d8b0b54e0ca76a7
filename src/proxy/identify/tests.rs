use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use super::*;
use crate::config::identity::validate;
use crate::config::raw::{RawApiKey, RawIdentity};

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn identifier(reject_invalid: bool) -> Identifier {
    let mut raw = RawIdentity::default();
    raw.jwt.enabled = true;
    raw.jwt.secret = Some(SECRET.into());
    raw.jwt.reject_invalid = reject_invalid;
    raw.api_keys.keys.push(RawApiKey {
        sha256: hex::encode(Sha256::digest(b"k-123")),
        user: "partner-7".into(),
        tier: Some("premium".into()),
        admin: false,
    });
    let mut problems = Vec::new();
    let config = validate(&raw, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    Identifier::new(&config, None, Duration::from_millis(50))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: serde_json::Value, secret: &str) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(*name, value.parse().unwrap());
    }
    h
}

/// The identify phase, run to completion.
fn identify(
    id: &Identifier,
    headers: &HeaderMap,
    addr: IpAddr,
    trusted: &[IpNet],
) -> (Caller, Option<InvalidToken>) {
    let peer = Peer {
        addr,
        trusted,
        real_ip_header: RealIpHeader::XForwardedFor,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(id.identify(headers, peer))
}

fn who(id: &Identifier, pairs: &[(&'static str, &str)]) -> Caller {
    let (caller, invalid) = identify(id, &headers(pairs), "203.0.113.9".parse().unwrap(), &[]);
    assert!(invalid.is_none());
    caller
}

#[test]
fn untrusted_peer_cannot_choose_its_address_or_request_id() {
    let id = identifier(false);
    let (caller, _) = identify(
        &id,
        &headers(&[("x-forwarded-for", "1.2.3.4"), ("x-request-id", "mine")]),
        "203.0.113.9".parse().unwrap(),
        &nets(&["10.0.0.0/8"]),
    );
    assert_eq!(caller.client, "203.0.113.9".parse::<IpAddr>().unwrap());
    assert_eq!(caller.subject, "ip:203.0.113.9");
    assert!(!caller.trusted_peer);
    assert_ne!(caller.request_id, "mine");
    assert_eq!(caller.request_id.len(), 32);
}

#[test]
fn trusted_chain_is_walked_right_to_left() {
    let id = identifier(false);
    let (caller, _) = identify(
        &id,
        &headers(&[
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7"),
            ("x-request-id", "abc-123"),
        ]),
        "10.0.0.1".parse().unwrap(),
        &nets(&["10.0.0.0/8"]),
    );
    assert_eq!(caller.client, "1.2.3.4".parse::<IpAddr>().unwrap());
    assert_eq!(caller.subject, "ip:1.2.3.4");
    assert_eq!(caller.request_id, "abc-123");
}

#[test]
fn valid_jwt_names_user_tier_and_admin() {
    let id = identifier(false);
    let t = token(
        json!({"sub": "42", "tier": "premium", "admin": true, "exp": now() + 600}),
        SECRET,
    );
    let caller = who(&id, &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(caller.subject, "user:42");
    assert_eq!(caller.tier.as_deref(), Some("premium"));
    assert!(caller.admin);
}

#[test]
fn forged_expired_and_unsigned_tokens_are_anonymous() {
    let id = identifier(false);
    let forged = token(
        json!({"sub": "42", "admin": true, "exp": now() + 600}),
        "another-secret-that-is-long-enough-too",
    );
    let expired = token(
        json!({"sub": "42", "admin": true, "exp": now() - 3600}),
        SECRET,
    );
    let no_exp = token(json!({"sub": "42", "admin": true}), SECRET);
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"sub":"42","admin":true,"exp":{}}}"#,
            now() + 600
        ))
    );
    for bad in [forged, expired, no_exp, unsigned] {
        let caller = who(&id, &[("authorization", &format!("Bearer {bad}"))]);
        assert_eq!(caller.subject, "ip:203.0.113.9", "{bad}");
        assert!(!caller.admin);
    }
    let strict = identifier(true);
    let expired = token(json!({"sub": "42", "exp": now() - 3600}), SECRET);
    let (caller, invalid) = identify(
        &strict,
        &headers(&[("authorization", &format!("Bearer {expired}"))]),
        "203.0.113.9".parse().unwrap(),
        &[],
    );
    assert!(invalid.is_some());
    assert_eq!(caller.subject, "ip:203.0.113.9");
    assert_eq!(
        caller.request_id.len(),
        32,
        "a refusal still has a request id"
    );
}

#[test]
fn admin_header_from_a_client_means_nothing() {
    let id = identifier(false);
    let caller = who(&id, &[("x-admin", "true"), ("x-user-id", "1")]);
    assert!(!caller.admin);
    assert_eq!(caller.subject, "ip:203.0.113.9");
}

#[test]
fn api_key_and_session_cookie_identify() {
    let id = identifier(false);
    let caller = who(&id, &[("x-api-key", "k-123")]);
    assert_eq!(caller.subject, "user:partner-7");
    assert_eq!(caller.tier.as_deref(), Some("premium"));
    assert_eq!(
        who(&id, &[("x-api-key", "wrong")]).subject,
        "ip:203.0.113.9"
    );

    let a = who(&id, &[("cookie", "csrftoken=x; sessionid=abc")]);
    let b = who(&id, &[("cookie", "sessionid=abd")]);
    assert!(a.subject.starts_with("session:"));
    assert!(
        !a.subject.contains("abc"),
        "the cookie value never becomes a key"
    );
    assert_ne!(a.subject, b.subject);
}

#[test]
fn rs256_and_es256_tokens_verify_with_public_keys() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (algorithm, name) in [("RS256", "jwt-test-rsa"), ("ES256", "jwt-test-ec")] {
        let mut raw = RawIdentity::default();
        raw.jwt.enabled = true;
        raw.jwt.algorithm = algorithm.into();
        raw.jwt.public_key_file = Some(fixtures.join(format!("{name}.pub")));
        let mut problems = Vec::new();
        let id = Identifier::new(
            &validate(&raw, &mut problems),
            None,
            Duration::from_millis(50),
        );
        assert!(problems.is_empty(), "{problems:?}");

        let private = std::fs::read(fixtures.join(format!("{name}.key"))).unwrap();
        let (header, key) = if algorithm == "RS256" {
            (
                Header::new(jsonwebtoken::Algorithm::RS256),
                EncodingKey::from_rsa_pem(&private).unwrap(),
            )
        } else {
            (
                Header::new(jsonwebtoken::Algorithm::ES256),
                EncodingKey::from_ec_pem(&private).unwrap(),
            )
        };
        let signed = encode(&header, &json!({"sub": 7, "exp": now() + 60}), &key).unwrap();
        assert_eq!(
            who(&id, &[("authorization", &format!("Bearer {signed}"))]).subject,
            "user:7"
        );
        // An HS256 token signed with the public key as a secret (the classic
        // algorithm confusion) is refused.
        let public = std::fs::read(fixtures.join(format!("{name}.pub"))).unwrap();
        let confused = encode(
            &Header::default(),
            &json!({"sub": 7, "admin": true, "exp": now() + 60}),
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        let caller = who(&id, &[("authorization", &format!("Bearer {confused}"))]);
        assert_eq!(caller.subject, "ip:203.0.113.9");
        assert!(!caller.admin);
    }
}
