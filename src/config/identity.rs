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
    pub session_cookie: Option<String>,
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
    let session_cookie =
        (raw.session.enabled && !raw.session.cookie.is_empty()).then(|| raw.session.cookie.clone());
    IdentityConfig {
        order,
        jwt,
        api_key_header,
        api_keys,
        session_cookie,
    }
}
