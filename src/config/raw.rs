//! Raw configuration: the TOML shape as operators write it, with documented
//! defaults. Nothing here is trusted; `super::Config::try_from` validates it.

use std::time::Duration;

use serde::Deserialize;

use super::units::ByteSize;

/// The whole gateway file (`config/gateway.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    pub server: RawServer,
    pub admin: RawAdmin,
    pub upstream: RawUpstream,
    pub log: RawLog,
    pub identity: RawIdentity,
    pub routes: Vec<RawRoute>,
    pub redis: RawRedis,
    pub ratelimit: RawRatelimit,
    pub cache: RawCache,
}

/// The embedded defaults carry the seed's endpoint rules, so a gateway started
/// with no file behaves like one started with `config/gateway.toml`.
impl Default for RawGateway {
    fn default() -> Self {
        // The seed's endpoints: `/v1/stories/` 50/min and cached 600 s,
        // `/v1/search/` 20/min, `/v1/users/` 100/min and cached 1800 s.
        let route = |name: &str, prefix: &str, ttl: Option<u64>, limit: u64| RawRoute {
            name: name.into(),
            path_prefix: Some(prefix.into()),
            path_pattern: None,
            methods: Vec::new(),
            cache_ttl: ttl.map(Duration::from_secs),
            cache: true,
            per_user: false,
            tags: Vec::new(),
            invalidates: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            limits: vec![RawLimit {
                name: None,
                limit,
                window: None,
                scope: scope_user(),
                cost: 1,
                algorithm: sliding_window(),
                on_redis_error: None,
            }],
        };
        Self {
            server: RawServer::default(),
            admin: RawAdmin::default(),
            upstream: RawUpstream::default(),
            log: RawLog::default(),
            identity: RawIdentity::default(),
            routes: vec![
                route("stories", "/v1/stories/", Some(600), 50),
                route("search", "/v1/search/", None, 20),
                route("users", "/v1/users/", Some(1800), 100),
            ],
            redis: RawRedis::default(),
            ratelimit: RawRatelimit::default(),
            cache: RawCache::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub workers: usize,
    pub health_path: String,
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    pub max_header_size: ByteSize,
    pub max_headers: usize,
    pub max_body_size: ByteSize,
    pub http2: bool,
    /// A client that accepts no response bytes for this long is closed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// An HTTP/2 connection with no request in flight and no bytes moving
    /// is closed after this long.
    #[serde(with = "humantime_serde")]
    pub http2_idle_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    pub trusted_proxies: Vec<String>,
    /// Where trusted proxies put the client chain: "x-forwarded-for" or
    /// "forwarded" (RFC 7239).
    pub real_ip_header: String,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Reload when the config file changes on disk (opt-in; SIGHUP always works).
    pub watch_config: bool,
    /// How often `watch_config` looks at the file.
    #[serde(with = "humantime_serde")]
    pub config_watch_interval: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:80".into(),
            workers: 0,
            health_path: "/health".into(),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_header_size: ByteSize(16 * 1024),
            max_headers: 100,
            max_body_size: ByteSize(10 * 1024 * 1024),
            http2: true,
            send_timeout: Duration::from_secs(60),
            http2_idle_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 128,
            trusted_proxies: Vec::new(),
            real_ip_header: "x-forwarded-for".into(),
            drain_timeout: Duration::from_secs(30),
            watch_config: false,
            config_watch_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub enabled: bool,
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9091".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub servers: Vec<RawServerEntry>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    pub response_buffer_size: ByteSize,
    /// A larger response goes to a temporary file up to this size (0: never;
    /// it streams from Gunicorn instead).
    pub max_temp_file_size: ByteSize,
    /// Where those files go; unset: the system's temporary directory.
    pub temp_path: Option<std::path::PathBuf>,
    pub max_idle_per_server: usize,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub retries: u32,
    pub max_fails: u32,
    #[serde(with = "humantime_serde")]
    pub fail_timeout: Duration,
    pub preserve_host: bool,
    pub health_check: RawHealthCheck,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            servers: vec![RawServerEntry {
                url: "http://127.0.0.1:8000".into(),
                weight: 1,
            }],
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            response_buffer_size: ByteSize(1024 * 1024),
            max_temp_file_size: ByteSize(1024 * 1024 * 1024),
            temp_path: None,
            max_idle_per_server: 64,
            idle_timeout: Duration::from_secs(60),
            retries: 1,
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            preserve_host: true,
            health_check: RawHealthCheck::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerEntry {
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealthCheck {
    pub enabled: bool,
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/".into(),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: String,
    pub format: String,
    pub access_log: bool,
    /// The access log's file (appended to; SIGUSR1 reopens it); unset:
    /// standard error.
    pub access_log_path: Option<std::path::PathBuf>,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            access_log: true,
            access_log_path: None,
        }
    }
}

/// One entry of the route table: which requests it matches and everything
/// that applies to them (limits now, cache policy with the cache).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path_prefix: Option<String>,
    /// Segments separated by `/`; `*` matches one segment, a trailing `**` the rest.
    pub path_pattern: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Freshness of responses on this route that state none themselves;
    /// unset: `cache.default_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub cache_ttl: Option<Duration>,
    /// Whether GET/HEAD responses on this route are cached at all.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Responses depend on who asks: requests with credentials are cached,
    /// keyed on the verified subject.
    #[serde(default)]
    pub per_user: bool,
    /// Tags stored entries of this route carry; `{name}` takes the path
    /// segment `{name}` of `path_pattern`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tags a successful write through this route invalidates; unset: `tags`.
    #[serde(default)]
    pub invalidates: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// The route's rate limits (`[[routes.limits]]`).
    #[serde(default)]
    pub limits: Vec<RawLimit>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:port`); set instead of `url`.
    pub cluster_nodes: Vec<String>,
    pub host: Option<String>,
    pub port: u16,
    pub password: Option<String>,
    pub db: u32,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            host: None,
            port: 6379,
            password: None,
            db: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRatelimit {
    pub enabled: bool,
    pub global: u64,
    pub per_user: u64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Gateway instances sharing the limits; the local fallback allows
    /// `limit / instances` per instance.
    pub instances: u32,
    pub on_redis_error: String,
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    pub headers: bool,
    pub legacy_headers: bool,
    pub admin_bypass: bool,
    pub allowlist: Vec<String>,
    pub key_prefix: String,
    pub tiers: std::collections::BTreeMap<String, RawTier>,
    /// The old place of endpoint rules, kept only to say where they went.
    pub endpoints: Option<serde::de::IgnoredAny>,
}

impl Default for RawRatelimit {
    fn default() -> Self {
        Self {
            enabled: true,
            global: 10_000,
            per_user: 100,
            window: Duration::from_secs(60),
            instances: 1,
            on_redis_error: "local".into(),
            redis_timeout: Duration::from_millis(50),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            headers: true,
            legacy_headers: false,
            admin_bypass: true,
            allowlist: Vec::new(),
            key_prefix: "gatehouse".into(),
            tiers: std::collections::BTreeMap::new(),
            endpoints: None,
        }
    }
}

/// Overrides for callers of one tier (from a JWT claim or an API key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub per_user: Option<u64>,
    /// Tiers exempt from every limit.
    #[serde(default)]
    pub unlimited: bool,
}

/// One rate limit of a route (`[[routes.limits]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    /// The rule's name (metric label, Redis key part); defaults to the route's.
    pub name: Option<String>,
    pub limit: u64,
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    #[serde(default = "scope_user")]
    pub scope: String,
    #[serde(default = "cost_one")]
    pub cost: u32,
    #[serde(default = "sliding_window")]
    pub algorithm: String,
    pub on_redis_error: Option<String>,
}

fn scope_user() -> String {
    "user".into()
}

fn cost_one() -> u32 {
    1
}

fn sliding_window() -> String {
    "sliding_window".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    /// Methods tried in order; the first that identifies the caller wins.
    /// The client address is always the last resort.
    pub order: Vec<String>,
    pub jwt: RawJwt,
    pub api_keys: RawApiKeys,
    pub session: RawSession,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwt {
    pub enabled: bool,
    pub algorithm: String,
    pub secret: Option<String>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub user_claim: String,
    pub tier_claim: String,
    pub admin_claim: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Answer a present but invalid token with 401 instead of treating the
    /// caller as anonymous.
    pub reject_invalid: bool,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: "HS256".into(),
            secret: None,
            public_key_file: None,
            user_claim: "sub".into(),
            tier_claim: "tier".into(),
            admin_claim: "admin".into(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            reject_invalid: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApiKeys {
    pub header: String,
    pub keys: Vec<RawApiKey>,
}

impl Default for RawApiKeys {
    fn default() -> Self {
        Self {
            header: "x-api-key".into(),
            keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// Hex SHA-256 of the key; the key itself is never stored.
    pub sha256: String,
    pub user: String,
    pub tier: Option<String>,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSession {
    pub enabled: bool,
    pub cookie: String,
    /// How a session cookie is verified: "none", "signed_cookies" or "redis".
    pub verify: String,
    /// Django's SECRET_KEY, for `signed_cookies` (or `secret_key_file`).
    pub secret_key: Option<String>,
    pub secret_key_file: Option<std::path::PathBuf>,
    /// Django's SECRET_KEY_FALLBACKS: older keys still accepted.
    pub secret_key_fallbacks: Vec<String>,
    /// Django's SESSION_COOKIE_AGE.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The Redis key of a session; `{session_key}` stands for the cookie.
    pub redis_key: String,
    /// Where Django keeps its sessions; unset: the gateway's `[redis]`.
    pub redis_url: Option<String>,
    /// How long an answer from Redis is remembered.
    #[serde(with = "humantime_serde")]
    pub verify_cache_ttl: Duration,
}

impl Default for RawSession {
    fn default() -> Self {
        Self {
            enabled: true,
            cookie: "sessionid".into(),
            verify: "none".into(),
            secret_key: None,
            secret_key_file: None,
            secret_key_fallbacks: Vec::new(),
            max_age: Duration::from_secs(1_209_600),
            // django-redis and Django's own Redis cache: KEY_PREFIX "",
            // VERSION 1, the cache session backend's prefix.
            redis_key: ":1:django.contrib.sessions.cache{session_key}".into(),
            redis_url: None,
            verify_cache_ttl: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    pub l1_max_entries: u64,
    pub l1_max_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    pub max_entry_size: ByteSize,
    pub hosts: Vec<String>,
    pub ignore_query_params: Vec<String>,
    pub tag_header: String,
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Bearer token for purges on the admin listener; unset: no purges.
    pub purge_token: Option<String>,
    /// L2 in the `[redis]` server, when one is configured.
    pub l2: bool,
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub l2_max_ttl: Duration,
    /// Concurrent misses of one key across gateways make one fetch too.
    pub l2_lock: bool,
    /// Paths or URLs fetched through the gateway once it starts.
    pub warm: Vec<String>,
    /// A list (one per line) or sitemap of more of them.
    pub warm_file: Option<std::path::PathBuf>,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            default_ttl: Duration::from_secs(300),
            l1_max_entries: 1000,
            l1_max_bytes: ByteSize(64 * 1024 * 1024),
            l1_ttl: Duration::from_secs(60),
            max_entry_size: ByteSize(1024 * 1024),
            hosts: Vec::new(),
            ignore_query_params: Vec::new(),
            tag_header: "Surrogate-Key".into(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            lock_timeout: Duration::from_secs(5),
            purge_token: None,
            l2: true,
            key_prefix: "muejam".into(),
            redis_timeout: Duration::from_millis(100),
            l2_max_ttl: Duration::from_secs(24 * 3600),
            l2_lock: false,
            warm: Vec::new(),
            warm_file: None,
        }
    }
}

fn yes() -> bool {
    true
}
