//! The validated `[ratelimit]` section: global, per-user and endpoint rules.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;

use super::Problems;
use super::raw::{RawLimit, RawRatelimit};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatelimitConfig {
    pub enabled: bool,
    pub global: u64,
    pub per_user: u64,
    pub window: Duration,
    pub instances: u32,
    pub on_redis_error: RedisErrorPolicy,
    pub redis_timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub headers: bool,
    pub legacy_headers: bool,
    pub admin_bypass: bool,
    pub allowlist: Vec<IpNet>,
    pub key_prefix: String,
    pub tiers: BTreeMap<String, Tier>,
    pub endpoints: Vec<EndpointRule>,
}

/// What a rule does while Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisErrorPolicy {
    /// Count in this process, at the limit divided by `instances`.
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Two counters per key, the previous window weighted (Cloudflare's).
    SlidingWindow,
    /// Every request's timestamp: exact, for low-rate endpoints such as login.
    SlidingLog,
}

/// Whose budget an endpoint rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Per caller (user, API key, session, or client address).
    User,
    /// Per client address, whoever the caller says it is.
    Ip,
    /// One budget for everybody.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub per_user: Option<u64>,
    pub unlimited: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRule {
    pub name: String,
    /// The route whose requests this rule counts.
    pub route: String,
    pub limit: u64,
    pub window: Duration,
    pub scope: Scope,
    pub cost: u32,
    pub algorithm: Algorithm,
    pub on_redis_error: RedisErrorPolicy,
}

fn policy(key: &str, text: &str, problems: &mut Problems) -> RedisErrorPolicy {
    match text {
        "local" => RedisErrorPolicy::Local,
        "allow" => RedisErrorPolicy::Allow,
        "deny" => RedisErrorPolicy::Deny,
        other => {
            problems.push((
                key.into(),
                format!("`{other}`: use \"local\", \"allow\" or \"deny\""),
            ));
            RedisErrorPolicy::Local
        }
    }
}

/// One `[[routes.limits]]` entry at `key`, of the route named `route`.
pub fn endpoint(
    key: &str,
    route: &str,
    raw: &RawLimit,
    defaults: &RatelimitConfig,
    problems: &mut Problems,
) -> EndpointRule {
    let name = raw.name.clone().unwrap_or_else(|| route.to_string());
    if raw.name.is_some() {
        super::check_name(&format!("{key}.name"), &name, problems);
    }
    if raw.limit == 0 {
        problems.push((format!("{key}.limit"), "must be greater than zero".into()));
    }
    if raw.cost == 0 || u64::from(raw.cost) > raw.limit {
        problems.push((
            format!("{key}.cost"),
            "must be between 1 and the limit".into(),
        ));
    }
    let window = raw.window.unwrap_or(defaults.window);
    if window < Duration::from_secs(1) {
        problems.push((format!("{key}.window"), "must be at least 1s".into()));
    }
    let scope = match raw.scope.as_str() {
        "user" => Scope::User,
        "ip" => Scope::Ip,
        "global" => Scope::Global,
        other => {
            problems.push((
                format!("{key}.scope"),
                format!("`{other}`: use \"user\", \"ip\" or \"global\""),
            ));
            Scope::User
        }
    };
    let algorithm = match raw.algorithm.as_str() {
        "sliding_window" => Algorithm::SlidingWindow,
        "sliding_log" => Algorithm::SlidingLog,
        other => {
            problems.push((
                format!("{key}.algorithm"),
                format!("`{other}`: use \"sliding_window\" or \"sliding_log\""),
            ));
            Algorithm::SlidingWindow
        }
    };
    let on_redis_error = match &raw.on_redis_error {
        Some(text) => policy(&format!("{key}.on_redis_error"), text, problems),
        None => defaults.on_redis_error,
    };
    EndpointRule {
        name,
        route: route.to_string(),
        limit: raw.limit,
        window,
        scope,
        cost: raw.cost,
        algorithm,
        on_redis_error,
    }
}

/// Names the limiter uses for its own rules; endpoint rules may not reuse them.
pub const RESERVED_RULES: [&str; 2] = ["global", "per_user"];

pub fn validate(raw: &RawRatelimit, problems: &mut Problems) -> RatelimitConfig {
    if raw.global == 0 {
        problems.push((
            "ratelimit.global".into(),
            "must be greater than zero".into(),
        ));
    }
    if raw.per_user == 0 {
        problems.push((
            "ratelimit.per_user".into(),
            "must be greater than zero".into(),
        ));
    }
    if raw.window < Duration::from_secs(1) {
        problems.push(("ratelimit.window".into(), "must be at least 1s".into()));
    }
    if raw.instances == 0 {
        problems.push(("ratelimit.instances".into(), "must be at least 1".into()));
    }
    if raw.redis_timeout.is_zero() {
        problems.push((
            "ratelimit.redis_timeout".into(),
            "must be greater than zero".into(),
        ));
    }
    if raw.breaker_failures == 0 {
        problems.push((
            "ratelimit.breaker_failures".into(),
            "must be at least 1".into(),
        ));
    }
    if raw.key_prefix.is_empty() || raw.key_prefix.contains(['{', '}', ' ']) {
        problems.push((
            "ratelimit.key_prefix".into(),
            "must be non-empty, without braces or spaces".into(),
        ));
    }
    let on_redis_error = policy("ratelimit.on_redis_error", &raw.on_redis_error, problems);
    let mut allowlist = Vec::new();
    for (i, cidr) in raw.allowlist.iter().enumerate() {
        match super::parse_net(cidr) {
            Some(net) => allowlist.push(net),
            None => problems.push((
                format!("ratelimit.allowlist[{i}]"),
                format!("`{cidr}` is not an address or CIDR"),
            )),
        }
    }
    let tiers = raw
        .tiers
        .iter()
        .map(|(name, t)| {
            if t.per_user == Some(0) {
                problems.push((
                    format!("ratelimit.tiers.{name}.per_user"),
                    "must be greater than zero".into(),
                ));
            }
            (
                name.clone(),
                Tier {
                    per_user: t.per_user,
                    unlimited: t.unlimited,
                },
            )
        })
        .collect();
    if raw.endpoints.is_some() {
        problems.push((
            "ratelimit.endpoints".into(),
            "endpoint limits now live with their route. Write, for example:\n  \
             [[routes]]\n  name = \"search\"\n  path_prefix = \"/v1/search/\"\n  \
             [[routes.limits]]\n  limit = 20\n  \
             (window, scope, cost, algorithm and on_redis_error move into [[routes.limits]] \
             unchanged; methods and path_prefix/path_pattern belong to the route)"
                .into(),
        ));
    }
    RatelimitConfig {
        enabled: raw.enabled,
        global: raw.global,
        per_user: raw.per_user,
        window: raw.window,
        instances: raw.instances.max(1),
        on_redis_error,
        redis_timeout: raw.redis_timeout,
        breaker_failures: raw.breaker_failures.max(1),
        breaker_cooldown: raw.breaker_cooldown,
        headers: raw.headers,
        legacy_headers: raw.legacy_headers,
        admin_bypass: raw.admin_bypass,
        allowlist,
        key_prefix: raw.key_prefix.clone(),
        tiers,
        endpoints: Vec::new(),
    }
}
