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
    pub routes: Vec<RawRoute>,
    pub redis: RawRedis,
    pub ratelimit: RawRatelimit,
    pub cache: RawCache,
}

/// The embedded defaults carry the seed's endpoint rules, so a gateway started
/// with no file behaves like one started with `config/gateway.toml`.
impl Default for RawGateway {
    fn default() -> Self {
        let route = |name: &str, prefix: &str, limit: u64, ttl: Option<u64>| RawRoute {
            name: name.into(),
            path_prefix: prefix.into(),
            methods: Vec::new(),
            limit: Some(limit),
            cache_ttl: ttl.map(Duration::from_secs),
        };
        Self {
            server: RawServer::default(),
            admin: RawAdmin::default(),
            upstream: RawUpstream::default(),
            log: RawLog::default(),
            routes: vec![
                route("stories", "/v1/stories/", 50, Some(600)),
                route("search", "/v1/search/", 20, None),
                route("users", "/v1/users/", 100, Some(1800)),
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
    pub trusted_proxies: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
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
            trusted_proxies: Vec::new(),
            drain_timeout: Duration::from_secs(30),
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
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path_prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Requests per window for this endpoint (enforced by the rate limiter).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Cache TTL for GET responses on this route (used by the cache).
    #[serde(default, with = "humantime_serde")]
    pub cache_ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: Option<String>,
    pub host: Option<String>,
    pub port: u16,
    pub password: Option<String>,
    pub db: u32,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: None,
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
    pub per_user: u64,
    pub global: u64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RawRatelimit {
    fn default() -> Self {
        Self {
            enabled: false,
            per_user: 100,
            global: 10_000,
            window: Duration::from_secs(60),
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
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: false,
            default_ttl: Duration::from_secs(300),
            l1_max_entries: 1000,
            l1_ttl: Duration::from_secs(60),
        }
    }
}
