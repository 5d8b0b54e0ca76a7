//! The `identify` phase: who is calling. In configured order a verified JWT
//! (`sub`, tier and admin claims), an API key (stored as SHA-256), a session
//! cookie (hashed), else the client address, which comes from
//! `X-Forwarded-For` only through `trusted_proxies`. Nothing a client sends
//! makes it admin except a verified token or a configured key. Also the
//! request id.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, header};
use ipnet::IpNet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::IdentityConfig;
use crate::config::identity::{IdentityMethod, JwtConfig};

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
    /// `user:<id>`, `session:<hash>` or `ip:<address>`: what per-user limits count.
    pub subject: String,
    pub tier: Option<String>,
    pub admin: bool,
}

/// A token was present but not acceptable, and the config says to refuse it.
#[derive(Debug, thiserror::Error)]
#[error("invalid bearer token: {0}")]
pub struct InvalidToken(pub String);

/// The configured ways to recognise a caller, prepared once per config.
pub struct Identifier {
    config: IdentityConfig,
    jwt: Option<(DecodingKey, Validation)>,
}

impl Identifier {
    pub fn new(config: &IdentityConfig) -> Self {
        // The key was already parsed once during validation.
        let jwt = config.jwt.as_ref().and_then(|j| {
            let key = j.key.decoding_key().ok()?;
            Some((key, validation(j)))
        });
        Identifier {
            config: config.clone(),
            jwt,
        }
    }

    /// The caller, always; with an error when a bad token must be refused
    /// (the caller then stays anonymous, so the refusal still has a request id).
    pub fn identify(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        trusted: &[IpNet],
    ) -> (Caller, Option<InvalidToken>) {
        let peer = canonical(peer);
        let trusted_peer = is_trusted(trusted, peer);
        // Like nginx's real_ip_recursive: walk right to left past trusted
        // hops; the first untrusted address is the client.
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
        let mut caller = Caller {
            peer,
            client,
            trusted_peer,
            request_id,
            subject: format!("ip:{client}"),
            tier: None,
            admin: false,
        };
        for method in &self.config.order {
            let found = match method {
                IdentityMethod::Jwt => match self.by_jwt(headers) {
                    Ok(found) => found,
                    Err(invalid) => return (caller, Some(invalid)),
                },
                IdentityMethod::ApiKey => self.by_api_key(headers),
                IdentityMethod::Session => self.by_session(headers),
            };
            if let Some((subject, tier, admin)) = found {
                caller.subject = subject;
                caller.tier = tier;
                caller.admin = admin;
                break;
            }
        }
        (caller, None)
    }

    fn by_jwt(&self, headers: &HeaderMap) -> Result<Option<Identity>, InvalidToken> {
        let (Some((key, validation)), Some(config)) = (&self.jwt, &self.config.jwt) else {
            return Ok(None);
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return Ok(None);
        };
        let claims = match jsonwebtoken::decode::<Value>(token.trim(), key, validation) {
            Ok(data) => data.claims,
            // Forged, expired, `alg: none`, wrong algorithm: never an identity.
            Err(e) if config.reject_invalid => return Err(InvalidToken(e.to_string())),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring an invalid bearer token");
                return Ok(None);
            }
        };
        let Some(user) = claim_text(&claims[config.user_claim.as_str()]) else {
            return if config.reject_invalid {
                Err(InvalidToken(format!("no `{}` claim", config.user_claim)))
            } else {
                Ok(None)
            };
        };
        let tier = claim_text(&claims[config.tier_claim.as_str()]);
        let admin = match &claims[config.admin_claim.as_str()] {
            Value::Bool(b) => *b,
            Value::String(s) => s == "true",
            Value::Number(n) => n.as_u64() == Some(1),
            _ => false,
        };
        Ok(Some((format!("user:{user}"), tier, admin)))
    }

    fn by_api_key(&self, headers: &HeaderMap) -> Option<Identity> {
        let key = headers.get(&self.config.api_key_header)?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let entry = self.config.api_keys.get(&hash)?;
        Some((
            format!("user:{}", entry.user),
            entry.tier.clone(),
            entry.admin,
        ))
    }

    fn by_session(&self, headers: &HeaderMap) -> Option<Identity> {
        let name = self.config.session_cookie.as_deref()?;
        let value = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name && !v.is_empty()).then_some(v)
            })?;
        // The cookie itself is a credential: only its hash becomes a key.
        let hash = Sha256::digest(value.as_bytes());
        Some((format!("session:{}", hex::encode(&hash[..16])), None, false))
    }
}

/// (subject, tier, admin)
type Identity = (String, Option<String>, bool);

fn validation(config: &JwtConfig) -> Validation {
    let mut validation = Validation::new(config.algorithm);
    validation.leeway = config.leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp"]);
    match &config.audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &config.issuer {
        validation.set_issuer(&[iss]);
    }
    validation
}

fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
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
mod tests;
