//! The validated `[identity]` section: how the `identify` phase recognises a
//! caller (JWT, API key, session cookie, else the client address).

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderName;

use super::Problems;
use super::raw::RawIdentity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMethod {
    Jwt,
    ApiKey,
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub order: Vec<IdentityMethod>,
    pub jwt: Option<JwtConfig>,
    pub api_key_header: HeaderName,
    /// By SHA-256 of the key.
    pub api_keys: HashMap<[u8; 32], ApiKeyEntry>,
    pub session: Option<SessionConfig>,
}

/// Django's session cookie, and how the gateway may verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub cookie: String,
    pub verify: SessionVerify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionVerify {
    /// Not verifiable: the cookie only narrows the client address's bucket.
    None,
    /// Django's `signed_cookies` backend: the signature is checked with
    /// SECRET_KEY (raw bytes; the gateway derives the HMAC key).
    SignedCookies {
        secret_keys: Vec<Vec<u8>>,
        max_age: Duration,
    },
    /// Django's `cache` / `cached_db` backends over Redis: the key must exist.
    Redis {
        /// `{session_key}` stands for the cookie's value.
        key: String,
        /// `None`: the gateway's own `[redis]`.
        url: Option<String>,
        cache_ttl: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEntry {
    pub user: String,
    pub tier: Option<String>,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: JwtKey,
    pub user_claim: String,
    pub tier_claim: String,
    pub admin_claim: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub reject_invalid: bool,
}

/// Key material, read at load time so a missing file is a config error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    Secret(Vec<u8>),
    RsaPem(Vec<u8>),
    EcPem(Vec<u8>),
}

impl JwtKey {
    pub fn decoding_key(&self) -> Result<jsonwebtoken::DecodingKey, jsonwebtoken::errors::Error> {
        match self {
            JwtKey::Secret(secret) => Ok(jsonwebtoken::DecodingKey::from_secret(secret)),
            JwtKey::RsaPem(pem) => jsonwebtoken::DecodingKey::from_rsa_pem(pem),
            JwtKey::EcPem(pem) => jsonwebtoken::DecodingKey::from_ec_pem(pem),
        }
    }
}

pub fn validate(raw: &RawIdentity, problems: &mut Problems) -> IdentityConfig {
    let order_text: Vec<&str> = if raw.order.is_empty() {
        vec!["jwt", "api_key", "session"]
    } else {
        raw.order.iter().map(String::as_str).collect()
    };
    let mut order = Vec::new();
    for (i, method) in order_text.iter().enumerate() {
        let method = match *method {
            "jwt" => IdentityMethod::Jwt,
            "api_key" => IdentityMethod::ApiKey,
            "session" => IdentityMethod::Session,
            other => {
                problems.push((
                    format!("identity.order[{i}]"),
                    format!("`{other}`: use \"jwt\", \"api_key\" or \"session\" (the client address is always last)"),
                ));
                continue;
            }
        };
        if order.contains(&method) {
            problems.push((format!("identity.order[{i}]"), "listed twice".into()));
        }
        order.push(method);
    }

    let j = &raw.jwt;
    let jwt = if j.enabled {
        let algorithm = match j.algorithm.as_str() {
            "HS256" => Some(jsonwebtoken::Algorithm::HS256),
            "RS256" => Some(jsonwebtoken::Algorithm::RS256),
            "ES256" => Some(jsonwebtoken::Algorithm::ES256),
            other => {
                problems.push((
                    "identity.jwt.algorithm".into(),
                    format!("`{other}`: use HS256, RS256 or ES256"),
                ));
                None
            }
        };
        let key = match (algorithm, &j.secret, &j.public_key_file) {
            (Some(jsonwebtoken::Algorithm::HS256), Some(secret), _) if secret.len() >= 32 => {
                Some(JwtKey::Secret(secret.as_bytes().to_vec()))
            }
            (Some(jsonwebtoken::Algorithm::HS256), _, _) => {
                problems.push((
                    "identity.jwt.secret".into(),
                    "HS256 needs a secret of at least 32 bytes".into(),
                ));
                None
            }
            (Some(alg), _, Some(file)) => match std::fs::read(file) {
                Ok(pem) => {
                    let key = if alg == jsonwebtoken::Algorithm::RS256 {
                        JwtKey::RsaPem(pem)
                    } else {
                        JwtKey::EcPem(pem)
                    };
                    if let Err(e) = key.decoding_key() {
                        problems.push((
                            "identity.jwt.public_key_file".into(),
                            format!("{}: {e}", file.display()),
                        ));
                    }
                    Some(key)
                }
                Err(e) => {
                    problems.push((
                        "identity.jwt.public_key_file".into(),
                        format!("{}: {e}", file.display()),
                    ));
                    None
                }
            },
            (Some(_), _, None) => {
                problems.push((
                    "identity.jwt.public_key_file".into(),
                    "RS256 and ES256 need a public key file".into(),
                ));
                None
            }
            (None, _, _) => None,
        };
        match (algorithm, key) {
            (Some(algorithm), Some(key)) => Some(JwtConfig {
                algorithm,
                key,
                user_claim: j.user_claim.clone(),
                tier_claim: j.tier_claim.clone(),
                admin_claim: j.admin_claim.clone(),
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
                leeway: j.leeway,
                reject_invalid: j.reject_invalid,
            }),
            _ => None,
        }
    } else {
        None
    };

    let api_key_header =
        HeaderName::from_bytes(raw.api_keys.header.as_bytes()).unwrap_or_else(|_| {
            problems.push((
                "identity.api_keys.header".into(),
                "not a header name".into(),
            ));
            HeaderName::from_static("x-api-key")
        });
    let mut api_keys = HashMap::new();
    for (i, key) in raw.api_keys.keys.iter().enumerate() {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(key.sha256.trim(), &mut hash).is_err() {
            problems.push((
                format!("identity.api_keys.keys[{i}].sha256"),
                "expected 64 hex digits (sha256sum of the key)".into(),
            ));
            continue;
        }
        let entry = ApiKeyEntry {
            user: key.user.clone(),
            tier: key.tier.clone(),
            admin: key.admin,
        };
        if api_keys.insert(hash, entry).is_some() {
            problems.push((
                format!("identity.api_keys.keys[{i}].sha256"),
                "listed twice".into(),
            ));
        }
    }
    let session = session(&raw.session, problems);
    IdentityConfig {
        order,
        jwt,
        api_key_header,
        api_keys,
        session,
    }
}

fn session(raw: &super::raw::RawSession, problems: &mut Problems) -> Option<SessionConfig> {
    if !raw.enabled || raw.cookie.is_empty() {
        return None;
    }
    let verify = match raw.verify.as_str() {
        "none" => SessionVerify::None,
        "signed_cookies" => {
            let key = match (&raw.secret_key, &raw.secret_key_file) {
                (Some(key), None) => Some(key.as_bytes().to_vec()),
                (None, Some(file)) => match std::fs::read_to_string(file) {
                    // A file written with `echo` ends in a newline that is not
                    // part of the key.
                    Ok(text) => Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()),
                    Err(e) => {
                        problems.push((
                            "identity.session.secret_key_file".into(),
                            format!("{}: {e}", file.display()),
                        ));
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    problems.push((
                        "identity.session.secret_key_file".into(),
                        "give secret_key or secret_key_file, not both".into(),
                    ));
                    None
                }
                (None, None) => {
                    problems.push((
                        "identity.session.secret_key".into(),
                        "verify = \"signed_cookies\" needs Django's SECRET_KEY (secret_key or secret_key_file)".into(),
                    ));
                    None
                }
            };
            let mut secret_keys: Vec<Vec<u8>> = key.into_iter().collect();
            secret_keys.extend(
                raw.secret_key_fallbacks
                    .iter()
                    .map(|k| k.as_bytes().to_vec()),
            );
            if raw.max_age.is_zero() {
                problems.push((
                    "identity.session.max_age".into(),
                    "must be greater than zero".into(),
                ));
            }
            SessionVerify::SignedCookies {
                secret_keys,
                max_age: raw.max_age,
            }
        }
        "redis" => {
            if !raw.redis_key.contains("{session_key}") {
                problems.push((
                    "identity.session.redis_key".into(),
                    "must contain `{session_key}`".into(),
                ));
            }
            if let Some(url) = &raw.redis_url {
                if let Err(e) = ::redis::Client::open(url.as_str()) {
                    problems.push((
                        "identity.session.redis_url".into(),
                        format!("not a usable Redis address: {e}"),
                    ));
                }
            }
            SessionVerify::Redis {
                key: raw.redis_key.clone(),
                url: raw.redis_url.clone(),
                cache_ttl: raw.verify_cache_ttl,
            }
        }
        other => {
            problems.push((
                "identity.session.verify".into(),
                format!("`{other}`: use \"none\", \"signed_cookies\" or \"redis\""),
            ));
            SessionVerify::None
        }
    };
    Some(SessionConfig {
        cookie: raw.cookie.clone(),
        verify,
    })
}
