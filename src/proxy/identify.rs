//! The `identify` phase: who is calling. In configured order a verified JWT
//! (`sub`, tier and admin claims), an API key (stored as SHA-256), a session
//! cookie (hashed; verified where Django lets us), else the client address,
//! which comes from `X-Forwarded-For` or `Forwarded` only through
//! `trusted_proxies`. Nothing a client sends makes it admin except a verified
//! token or a configured key, and an identity the gateway could not verify
//! never gets more than its client address's allowance. Also the request id.

pub mod django;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ipnet::IpNet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::IdentityConfig;
use crate::config::identity::{IdentityMethod, JwtConfig, SessionVerify};
use crate::net::{self, RealIpHeader};

// Names, not text: a `&str` key is parsed again on every use.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
    /// For an identity the gateway could not verify, `ip:<address>`: its
    /// limits count there too.
    pub within: Option<String>,
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
    /// For `verify = "redis"`: where Django's sessions are.
    sessions: Option<RedisSessions>,
}

/// Where the client address comes from.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub addr: IpAddr,
    pub trusted: &'a [IpNet],
    pub real_ip_header: RealIpHeader,
}

impl Identifier {
    /// `redis_url`: the gateway's own Redis, used for sessions when the
    /// session settings name none; `timeout` bounds each lookup.
    pub fn new(config: &IdentityConfig, redis_url: Option<&str>, timeout: Duration) -> Self {
        // The key was already parsed once during validation.
        let jwt = config.jwt.as_ref().and_then(|j| {
            let key = j.key.decoding_key().ok()?;
            Some((key, validation(j)))
        });
        let sessions = match config.session.as_ref().map(|s| &s.verify) {
            Some(SessionVerify::Redis {
                key,
                url,
                cache_ttl,
            }) => url
                .as_deref()
                .or(redis_url)
                .and_then(|url| RedisSessions::new(url, key, *cache_ttl, timeout)),
            _ => None,
        };
        Identifier {
            config: config.clone(),
            jwt,
            sessions,
        }
    }

    /// The caller, always; with an error when a bad token must be refused
    /// (the caller then stays anonymous, so the refusal still has a request id).
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        peer: Peer<'_>,
    ) -> (Caller, Option<InvalidToken>) {
        let trusted_peer = net::is_trusted(peer.trusted, peer.addr);
        let client = net::client_address(headers, peer.real_ip_header, peer.addr, peer.trusted);
        let peer = net::canonical(peer.addr);
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
            subject: net::ip_subject(client),
            within: None,
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
                IdentityMethod::Session => self.by_session(headers).await,
            };
            if let Some(identity) = found {
                if !identity.verified {
                    caller.within = Some(caller.subject.clone());
                }
                caller.subject = identity.subject;
                caller.tier = identity.tier;
                caller.admin = identity.admin;
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
        Ok(Some(Identity::verified(
            format!("user:{user}"),
            tier,
            admin,
        )))
    }

    fn by_api_key(&self, headers: &HeaderMap) -> Option<Identity> {
        let key = headers.get(&self.config.api_key_header)?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let entry = self.config.api_keys.get(&hash)?;
        Some(Identity::verified(
            format!("user:{}", entry.user),
            entry.tier.clone(),
            entry.admin,
        ))
    }

    /// The session cookie Django will read. Verified where the config says
    /// how: a forged or expired one is no identity at all; one the gateway
    /// cannot check (no verification configured, Redis not answering) is an
    /// unverified identity, counted inside its client address's budget.
    async fn by_session(&self, headers: &HeaderMap) -> Option<Identity> {
        let config = self.config.session.as_ref()?;
        let value = django::cookie(headers, &config.cookie)?;
        match &config.verify {
            SessionVerify::None => Some(Identity::unverified(session_subject(&value))),
            SessionVerify::SignedCookies {
                secret_keys,
                max_age,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let payload = django::verify_signed(&value, secret_keys, max_age.as_secs(), now)?;
                // The payload, not the whole cookie: Django signs it again with
                // a new timestamp whenever it saves the session.
                Some(Identity::verified(session_subject(payload), None, false))
            }
            SessionVerify::Redis { .. } => match &self.sessions {
                Some(sessions) => match Box::pin(sessions.exists(&value)).await {
                    Some(true) => Some(Identity::verified(session_subject(&value), None, false)),
                    Some(false) => None,
                    None => Some(Identity::unverified(session_subject(&value))),
                },
                None => Some(Identity::unverified(session_subject(&value))),
            },
        }
    }
}

/// The cookie is a credential: only its hash becomes a key.
fn session_subject(value: &[u8]) -> String {
    let hash = Sha256::digest(value);
    format!("session:{}", hex::encode(&hash[..16]))
}

/// Who a method recognised.
struct Identity {
    subject: String,
    tier: Option<String>,
    admin: bool,
    verified: bool,
}

impl Identity {
    fn verified(subject: String, tier: Option<String>, admin: bool) -> Self {
        Identity {
            subject,
            tier,
            admin,
            verified: true,
        }
    }

    fn unverified(subject: String) -> Self {
        Identity {
            subject,
            tier: None,
            admin: false,
            verified: false,
        }
    }
}

/// Django sessions kept in Redis (the `cache` and `cached_db` backends over
/// django-redis): a session is real when its key exists. Answers are
/// remembered for `cache_ttl`, so a flood of one cookie costs one lookup.
struct RedisSessions {
    client: redis::Client,
    /// Made on first use, inside a worker's runtime (it spawns its driver
    /// there); reconnects by itself.
    connection: std::sync::OnceLock<redis::aio::ConnectionManager>,
    key: String,
    cache_ttl: Duration,
    timeout: Duration,
    answers: Mutex<HashMap<[u8; 16], (bool, Instant)>>,
}

/// Remembered answers at most; the map is emptied when it is full.
const SESSION_CACHE_ENTRIES: usize = 65_536;

impl RedisSessions {
    fn new(url: &str, key: &str, cache_ttl: Duration, timeout: Duration) -> Option<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| {
                tracing::error!(error = %e, "session redis client; sessions stay unverified");
            })
            .ok()?;
        Some(RedisSessions {
            client,
            connection: std::sync::OnceLock::new(),
            key: key.to_string(),
            cache_ttl,
            timeout,
            answers: Mutex::new(HashMap::new()),
        })
    }

    fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        if let Some(connection) = self.connection.get() {
            return Some(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let made = redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| tracing::warn!(error = %e, "session redis connection"))
            .ok()?;
        Some(self.connection.get_or_init(|| made).clone())
    }

    /// Whether the session exists; `None` when Redis did not answer in time.
    async fn exists(&self, session_key: &[u8]) -> Option<bool> {
        let digest: [u8; 32] = Sha256::digest(session_key).into();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        if let Ok(answers) = self.answers.lock() {
            if let Some((exists, at)) = answers.get(&id) {
                if at.elapsed() < self.cache_ttl {
                    return Some(*exists);
                }
            }
        }
        // A session key is Django's own alphabet; anything else cannot name
        // a session and must not shape a Redis key.
        let text = std::str::from_utf8(session_key)
            .ok()
            .filter(|t| t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric()))?;
        let key = self.key.replace("{session_key}", text);
        let mut connection = self.connection()?;
        let mut command = redis::cmd("EXISTS");
        command.arg(&key);
        let lookup = command.query_async::<i64>(&mut connection);
        let exists = match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(n)) => n > 0,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "session lookup failed; the session stays unverified");
                return None;
            }
            Err(_) => return None,
        };
        if let Ok(mut answers) = self.answers.lock() {
            if answers.len() >= SESSION_CACHE_ENTRIES {
                answers.clear();
            }
            answers.insert(id, (exists, Instant::now()));
        }
        Some(exists)
    }
}

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

fn valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 128 random bits as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    // 16 bytes always fill 32 hex digits, a valid header value.
    let _ = hex::encode_to_slice(id.to_be_bytes(), &mut text);
    // Owned, not copied: the id is cloned into the response and the log
    // line, and a copied `Bytes` allocates again on its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests;
