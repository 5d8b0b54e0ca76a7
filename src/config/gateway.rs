//! The validated gateway configuration (`gatehouse proxy`): its types, how
//! the file, the environment (`GATEHOUSE_*` and the seed's names) and the
//! flags combine into it, and its validation.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;

use super::identity::{self, IdentityConfig};
use super::ratelimit::{self, RatelimitConfig};
use super::raw::{self, RawGateway};
use super::route::{self, Route};
use super::{
    ConfigError, EnvSource, LogConfig, Problems, ProcessEnv, SourceFile, all_problems,
    env_duration, env_number, extract_all, locate, log_config, parse_net, positive, socket_addr,
};

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstreams: Vec<String>,
}

/// The validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    /// `None` when the admin listener is disabled (`ENABLE_METRICS=false`).
    pub admin_listen: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub routes: Vec<Route>,
    pub redis: Option<RedisConfig>,
    pub ratelimit: RatelimitConfig,
    pub cache: CacheConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Worker threads, each with its own runtime, listener and upstream pool.
    pub workers: usize,
    pub health_path: String,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_body_size: u64,
    pub http2: bool,
    pub send_timeout: Duration,
    pub http2_idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub real_ip_header: crate::net::RealIpHeader,
    pub drain_timeout: Duration,
    /// `Some(interval)`: also reload when the file changes (`watch_config`);
    /// `None`: reload on SIGHUP only.
    pub config_watch_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub servers: Vec<UpstreamServer>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub response_buffer_size: usize,
    /// 0: larger responses stream from Gunicorn instead of a file.
    pub max_temp_file_size: u64,
    pub temp_path: PathBuf,
    pub max_idle_per_server: usize,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub preserve_host: bool,
    /// `None` when active health checks are disabled.
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamServer {
    pub target: UpstreamTarget,
    pub weight: u32,
}

/// Where a Gunicorn listens: TCP (`http://host:port`) or a Unix socket
/// (`unix:/run/gunicorn.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamTarget {
    Tcp { authority: String },
    Unix { path: PathBuf },
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamTarget::Tcp { authority } => write!(f, "http://{authority}"),
            UpstreamTarget::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl UpstreamTarget {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(format!("`{text}`: a unix socket path must be absolute"));
            }
            return Ok(UpstreamTarget::Unix { path: path.into() });
        }
        let Some(rest) = text.strip_prefix("http://") else {
            return Err(format!(
                "`{text}`: expected http://host:port or unix:/path/to/socket"
            ));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("`{text}`: an upstream URL has no path"));
        }
        let authority: http::uri::Authority =
            authority.parse().map_err(|e| format!("`{text}`: {e}"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(UpstreamTarget::Tcp {
            authority: format!("{}:{port}", authority.host()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port/db`; the first seed node for a cluster.
    pub url: String,
    /// Seed nodes of a Redis Cluster; empty for a single server.
    pub cluster_nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub enabled: bool,
    pub default_ttl: Duration,
    pub l1_max_entries: u64,
    pub l1_max_bytes: u64,
    pub l1_ttl: Duration,
    pub max_entry_size: usize,
    /// Lower case, without a default port; empty: any host.
    pub hosts: Vec<String>,
    pub ignore_query_params: Vec<String>,
    pub tag_header: http::HeaderName,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub lock_timeout: Duration,
    /// SHA-256 of the purge token: the token itself is kept nowhere.
    pub purge_token: Option<[u8; 32]>,
    /// L2 in Redis: `[redis]` is configured and `cache.l2` is on.
    pub l2: bool,
    pub key_prefix: String,
    pub redis_timeout: Duration,
    pub l2_max_ttl: Duration,
    pub l2_lock: bool,
    pub warm: Vec<String>,
    pub warm_file: Option<std::path::PathBuf>,
}

impl Config {
    /// Load `path` (or the embedded defaults when `None`), apply environment
    /// and flags, and validate.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(path, overrides, &ProcessEnv)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let source = path.map(SourceFile::read).transpose()?;
        Self::build(source.as_ref(), overrides, env)
    }

    /// A configuration from text, as if read from a file called `name`.
    pub fn from_text(
        name: &str,
        text: &str,
        overrides: &Overrides,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let source = SourceFile {
            name: name.to_string(),
            text: text.to_string(),
        };
        Self::build(Some(&source), overrides, env)
    }

    fn build(
        source: Option<&SourceFile>,
        overrides: &Overrides,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = source {
            figment = figment.merge(Toml::string(&file.text));
        }
        // Only SECTION__KEY names: every top-level key is a table, and other
        // GATEHOUSE_* variables (tooling, tests) are not configuration.
        // `GATEHOUSE_DB_*` belongs to `gatehouse db`.
        figment = figment.merge(
            Env::prefixed("GATEHOUSE_")
                .filter(|key| {
                    key.as_str().contains("__")
                        && !key.as_str().to_ascii_lowercase().starts_with("db_")
                })
                .split("__"),
        );
        figment = merge_seed_scalars(figment, env)?;
        let (raw, extracted) = extract_all::<RawGateway>(&figment, source);
        let Some(mut raw) = raw else {
            return Err(ConfigError {
                problems: extracted,
            });
        };
        apply_seed_structured(&mut raw, env)?;
        apply_overrides(&mut raw, overrides);
        let validated = Config::try_from(&raw).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| locate(source, key, message))
                .collect()
        });
        all_problems(extracted, validated)
    }
}

/// Seed names that map to one key each.
fn merge_seed_scalars(mut figment: Figment, env: &dyn EnvSource) -> Result<Figment, ConfigError> {
    for (name, key) in [
        ("RATE_LIMIT_PER_USER", "ratelimit.per_user"),
        ("RATE_LIMIT_GLOBAL", "ratelimit.global"),
        ("CACHE_L1_SIZE", "cache.l1_max_entries"),
        ("REDIS_PORT", "redis.port"),
        ("REDIS_DB", "redis.db"),
    ] {
        if let Some(n) = env_number(env, name)? {
            figment = figment.merge(Serialized::default(key, n));
        }
    }
    for (name, key) in [
        ("RATE_LIMIT_WINDOW", "ratelimit.window"),
        ("CACHE_TTL_DEFAULT", "cache.default_ttl"),
        ("CACHE_L1_TTL", "cache.l1_ttl"),
    ] {
        if let Some(d) = env_duration(env, name)? {
            figment = figment.merge(Serialized::default(key, d));
        }
    }
    for (name, key) in [
        ("REDIS_HOST", "redis.host"),
        ("REDIS_PASSWORD", "redis.password"),
    ] {
        if let Some(v) = env.var(name) {
            figment = figment.merge(Serialized::default(key, v));
        }
    }
    if let Some(v) = env.var("ENABLE_METRICS") {
        let enabled = match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => {
                return Err(ConfigError::one(
                    "environment variable ENABLE_METRICS",
                    "",
                    format!("`{v}` is not true or false"),
                ));
            }
        };
        figment = figment.merge(Serialized::default("admin.enabled", enabled));
    }
    Ok(figment)
}

/// Seed names that touch part of a value (a port) or a route by name.
fn apply_seed_structured(raw: &mut RawGateway, env: &dyn EnvSource) -> Result<(), ConfigError> {
    if let Some(port) = env_number(env, "METRICS_PORT")? {
        let host = raw
            .admin
            .listen
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| "127.0.0.1".into());
        raw.admin.listen = SocketAddr::new(
            host.parse().unwrap_or([127, 0, 0, 1].into()),
            u16::try_from(port).map_err(|_| {
                ConfigError::one(
                    "environment variable METRICS_PORT",
                    "",
                    "a port is at most 65535",
                )
            })?,
        )
        .to_string();
    }
    for (name, route) in [
        ("CACHE_TTL_STORIES", "stories"),
        ("CACHE_TTL_USERS", "users"),
    ] {
        if let Some(ttl) = env_duration(env, name)? {
            let origin = format!("environment variable {name}");
            let ttl = humantime::parse_duration(&ttl)
                .map_err(|e| ConfigError::one(&origin, "", format!("`{ttl}`: {e}")))?;
            let entry = raw
                .routes
                .iter_mut()
                .find(|r| r.name == route)
                .ok_or_else(|| {
                    ConfigError::one(
                        &origin,
                        "",
                        format!("no route named `{route}` to apply it to"),
                    )
                })?;
            entry.cache_ttl = Some(ttl);
        }
    }
    Ok(())
}

fn apply_overrides(raw: &mut RawGateway, overrides: &Overrides) {
    if let Some(listen) = &overrides.listen {
        raw.server.listen = listen.clone();
    }
    if let Some(admin) = &overrides.admin_listen {
        raw.admin.listen = admin.clone();
        raw.admin.enabled = true;
    }
    if !overrides.upstreams.is_empty() {
        raw.upstream.servers = overrides
            .upstreams
            .iter()
            .map(|url| raw::RawServerEntry {
                url: url.clone(),
                weight: 1,
            })
            .collect();
    }
}

impl TryFrom<&RawGateway> for Config {
    type Error = Problems;

    fn try_from(raw: &RawGateway) -> Result<Self, Problems> {
        let mut problems = Problems::new();
        let listen = socket_addr("server.listen", &raw.server.listen, &mut problems);
        let admin_listen = if raw.admin.enabled {
            socket_addr("admin.listen", &raw.admin.listen, &mut problems)
        } else {
            None
        };
        let s = &raw.server;
        if !s.health_path.starts_with('/') {
            problems.push(("server.health_path".into(), "must start with `/`".into()));
        }
        positive(
            "server.header_read_timeout",
            s.header_read_timeout,
            &mut problems,
        );
        positive(
            "server.body_read_timeout",
            s.body_read_timeout,
            &mut problems,
        );
        positive("server.drain_timeout", s.drain_timeout, &mut problems);
        positive("server.send_timeout", s.send_timeout, &mut problems);
        positive(
            "server.http2_idle_timeout",
            s.http2_idle_timeout,
            &mut problems,
        );
        if s.http2_max_concurrent_streams == 0 {
            problems.push((
                "server.http2_max_concurrent_streams".into(),
                "must be at least 1".into(),
            ));
        }
        if s.watch_config {
            positive(
                "server.config_watch_interval",
                s.config_watch_interval,
                &mut problems,
            );
        }
        if s.max_connections == 0 {
            problems.push((
                "server.max_connections".into(),
                "must be greater than zero".into(),
            ));
        }
        // hyper cannot read a request line into less than 8 KiB.
        if s.max_header_size.0 < 8192 {
            problems.push((
                "server.max_header_size".into(),
                "must be at least 8KiB".into(),
            ));
        }
        if s.max_headers == 0 {
            problems.push((
                "server.max_headers".into(),
                "must be greater than zero".into(),
            ));
        }
        let mut trusted_proxies = Vec::new();
        for (i, cidr) in s.trusted_proxies.iter().enumerate() {
            match parse_net(cidr) {
                Some(net) => trusted_proxies.push(net),
                None => problems.push((
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{cidr}` is not an address or CIDR such as 10.0.0.0/8"),
                )),
            }
        }
        let real_ip_header = match s.real_ip_header.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => crate::net::RealIpHeader::XForwardedFor,
            "forwarded" => crate::net::RealIpHeader::Forwarded,
            other => {
                problems.push((
                    "server.real_ip_header".into(),
                    format!("`{other}`: use \"x-forwarded-for\" or \"forwarded\""),
                ));
                crate::net::RealIpHeader::XForwardedFor
            }
        };

        let u = &raw.upstream;
        if u.servers.is_empty() {
            problems.push((
                "upstream.servers".into(),
                "at least one server is needed".into(),
            ));
        }
        let mut servers = Vec::new();
        for (i, entry) in u.servers.iter().enumerate() {
            if entry.weight == 0 {
                problems.push((
                    format!("upstream.servers[{i}].weight"),
                    "must be at least 1".into(),
                ));
            }
            match UpstreamTarget::parse(&entry.url) {
                Ok(target) if servers.iter().any(|s: &UpstreamServer| s.target == target) => {
                    problems.push((format!("upstream.servers[{i}].url"), "listed twice".into()));
                }
                Ok(target) => servers.push(UpstreamServer {
                    target,
                    weight: entry.weight,
                }),
                Err(message) => problems.push((format!("upstream.servers[{i}].url"), message)),
            }
        }
        positive("upstream.connect_timeout", u.connect_timeout, &mut problems);
        positive(
            "upstream.response_timeout",
            u.response_timeout,
            &mut problems,
        );
        if u.max_fails == 0 {
            problems.push(("upstream.max_fails".into(), "must be at least 1".into()));
        }
        let hc = &u.health_check;
        let health_check = if hc.enabled {
            if !hc.path.starts_with('/') {
                problems.push((
                    "upstream.health_check.path".into(),
                    "must start with `/`".into(),
                ));
            }
            positive("upstream.health_check.interval", hc.interval, &mut problems);
            positive("upstream.health_check.timeout", hc.timeout, &mut problems);
            Some(HealthCheck {
                path: hc.path.clone(),
                interval: hc.interval,
                timeout: hc.timeout,
            })
        } else {
            None
        };

        let log = log_config(&raw.log, &mut problems);

        let redis = redis(&raw.redis, &mut problems);
        let has_redis = redis.is_some();
        let mut ratelimit = ratelimit::validate(&raw.ratelimit, &mut problems);
        let routes = route::validate(&raw.routes, &mut ratelimit, &mut problems);
        let identity = identity::validate(&raw.identity, &mut problems);
        let session_redis = matches!(
            identity.session.as_ref().map(|s| &s.verify),
            Some(identity::SessionVerify::Redis { url: None, .. })
        );
        if session_redis && redis.is_none() {
            problems.push((
                "identity.session.verify".into(),
                "\"redis\" needs [redis] or identity.session.redis_url".into(),
            ));
        }
        for (i, key) in raw.identity.api_keys.keys.iter().enumerate() {
            if let Some(tier) = &key.tier {
                if !ratelimit.tiers.contains_key(tier) {
                    problems.push((
                        format!("identity.api_keys.keys[{i}].tier"),
                        format!("`{tier}` is not defined under ratelimit.tiers"),
                    ));
                }
            }
        }
        let c = &raw.cache;
        positive("cache.default_ttl", c.default_ttl, &mut problems);
        positive("cache.l1_ttl", c.l1_ttl, &mut problems);
        positive("cache.lock_timeout", c.lock_timeout, &mut problems);
        positive("cache.redis_timeout", c.redis_timeout, &mut problems);
        positive("cache.l2_max_ttl", c.l2_max_ttl, &mut problems);
        super::check_name("cache.key_prefix", &c.key_prefix, &mut problems);
        if c.purge_token.as_ref().is_some_and(|t| t.len() < 16) {
            problems.push((
                "cache.purge_token".into(),
                "use at least 16 characters".into(),
            ));
        }
        if c.l1_max_entries == 0 && !(c.l2 && redis.is_some()) {
            problems.push((
                "cache.l1_max_entries".into(),
                "0 (no L1) needs L2: configure [redis], or set `enabled = false` to not cache"
                    .into(),
            ));
        }
        if c.l1_max_bytes.0 < c.max_entry_size.0 {
            problems.push((
                "cache.l1_max_bytes".into(),
                "must be at least max_entry_size".into(),
            ));
        }
        let tag_header = http::HeaderName::from_bytes(c.tag_header.as_bytes())
            .map_err(|_| {
                problems.push((
                    "cache.tag_header".into(),
                    format!("`{}` is not a header name", c.tag_header),
                ));
            })
            .ok();
        let hosts: Vec<String> = c
            .hosts
            .iter()
            .map(|h| crate::config::normalise_host(h))
            .collect();

        // Every `None` above pushed a problem.
        let (Some(listen), Some(tag_header)) = (listen.filter(|_| problems.is_empty()), tag_header)
        else {
            return Err(problems);
        };
        Ok(Config {
            server: ServerConfig {
                listen,
                // One per core, as nginx's `auto`: measured against two per
                // core in docs/benchmarks.md (2026-12-06).
                workers: if s.workers == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                } else {
                    s.workers
                },
                health_path: s.health_path.clone(),
                max_connections: s.max_connections,
                header_read_timeout: s.header_read_timeout,
                body_read_timeout: s.body_read_timeout,
                max_header_size: usize::try_from(s.max_header_size.0).unwrap_or(usize::MAX),
                max_headers: s.max_headers,
                max_body_size: s.max_body_size.0,
                http2: s.http2,
                send_timeout: s.send_timeout,
                http2_idle_timeout: s.http2_idle_timeout,
                http2_max_concurrent_streams: s.http2_max_concurrent_streams,
                trusted_proxies,
                real_ip_header,
                drain_timeout: s.drain_timeout,
                config_watch_interval: s.watch_config.then_some(s.config_watch_interval),
            },
            admin_listen,
            upstream: UpstreamConfig {
                servers,
                connect_timeout: u.connect_timeout,
                response_timeout: u.response_timeout,
                response_buffer_size: usize::try_from(u.response_buffer_size.0)
                    .unwrap_or(usize::MAX),
                max_temp_file_size: u.max_temp_file_size.0,
                temp_path: u.temp_path.clone().unwrap_or_else(std::env::temp_dir),
                max_idle_per_server: u.max_idle_per_server,
                idle_timeout: u.idle_timeout,
                retries: u.retries,
                max_fails: u.max_fails,
                fail_timeout: u.fail_timeout,
                preserve_host: u.preserve_host,
                health_check,
            },
            log,
            identity,
            routes,
            redis,
            ratelimit,
            cache: CacheConfig {
                enabled: c.enabled,
                default_ttl: c.default_ttl,
                l1_max_entries: c.l1_max_entries,
                l1_max_bytes: c.l1_max_bytes.0,
                l1_ttl: c.l1_ttl,
                max_entry_size: usize::try_from(c.max_entry_size.0).unwrap_or(usize::MAX),
                hosts,
                ignore_query_params: c.ignore_query_params.clone(),
                tag_header,
                stale_while_revalidate: c.stale_while_revalidate,
                stale_if_error: c.stale_if_error,
                lock_timeout: c.lock_timeout,
                l2: c.l2 && has_redis,
                key_prefix: c.key_prefix.clone(),
                redis_timeout: c.redis_timeout,
                l2_max_ttl: c.l2_max_ttl,
                l2_lock: c.l2_lock,
                warm: c.warm.clone(),
                warm_file: c.warm_file.clone(),
                purge_token: c.purge_token.as_ref().map(|t| {
                    use sha2::Digest;
                    sha2::Sha256::digest(t.as_bytes()).into()
                }),
            },
        })
    }
}

fn redis(raw: &raw::RawRedis, problems: &mut Problems) -> Option<RedisConfig> {
    if !raw.cluster_nodes.is_empty() {
        if raw.url.is_some() || raw.host.is_some() {
            problems.push((
                "redis.cluster_nodes".into(),
                "set cluster_nodes or url/host, not both".into(),
            ));
        }
        for (i, node) in raw.cluster_nodes.iter().enumerate() {
            if let Err(e) = ::redis::Client::open(node.as_str()) {
                problems.push((
                    format!("redis.cluster_nodes[{i}]"),
                    format!("`{node}`: {e}"),
                ));
            }
        }
        return Some(RedisConfig {
            url: raw.cluster_nodes[0].clone(),
            cluster_nodes: raw.cluster_nodes.clone(),
        });
    }
    let config = redis_url(raw, problems)?;
    if let Err(e) = ::redis::Client::open(config.url.as_str()) {
        problems.push(("redis".into(), format!("not a usable Redis address: {e}")));
    }
    Some(config)
}

fn redis_url(raw: &raw::RawRedis, problems: &mut Problems) -> Option<RedisConfig> {
    if let Some(url) = &raw.url {
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix:"))
        {
            problems.push((
                "redis.url".into(),
                format!("`{url}`: expected redis://host:port/db"),
            ));
        }
        return Some(RedisConfig {
            url: url.clone(),
            cluster_nodes: Vec::new(),
        });
    }
    let host = raw.host.as_ref()?;
    let auth = raw
        .password
        .as_ref()
        .map(|p| format!(":{p}@"))
        .unwrap_or_default();
    Some(RedisConfig {
        url: format!("redis://{auth}{host}:{}/{}", raw.port, raw.db),
        cluster_nodes: Vec::new(),
    })
}
