//! Rate limiting: which rules apply to a request (`global`, `per_user`, the
//! endpoint rules), deciding them in Redis or in this process (`window` holds
//! the arithmetic both share), falling back when Redis fails, and the
//! response fields that report the outcome (`headers`).

pub mod headers;
pub mod local;
pub mod redis;
pub mod window;

use std::net::IpAddr;
use std::sync::Arc;

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::RatelimitConfig;
use crate::config::ratelimit::{Algorithm, RedisErrorPolicy, Scope};
use crate::telemetry::Metrics;
use local::LocalStore;
use redis::RedisStore;
use window::{Budget, Observed, Outcome};

/// One rule applied to one request: where it counts and how much it allows.
#[derive(Debug, Clone)]
pub struct Check {
    pub rule: Arc<str>,
    /// Index of the rule in the limiter's table (its metric counters).
    pub index: usize,
    /// `<prefix>:rl:{<subject>}:<rule>`; the braces keep one subject's keys
    /// in one Redis Cluster slot.
    pub key: String,
    pub budget: Budget,
    pub on_redis_error: RedisErrorPolicy,
}

/// Who a request counts against.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// `user:42`, `key:partner-7`, `session:3f9a…`, or `ip:203.0.113.9`.
    pub id: &'a str,
    pub client: IpAddr,
    pub tier: Option<&'a str>,
    pub admin: bool,
    /// For an identity the gateway could not verify (a session cookie it
    /// cannot check), the client address's subject: every per-caller rule
    /// counts there too, so rotating cookies never buys more than the
    /// address's own allowance.
    pub within: Option<&'a str>,
}

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Shared counts in Redis.
    Redis,
    /// This process, because no Redis is configured.
    Local,
    /// This process (or a fixed answer), because Redis failed.
    Fallback,
    /// No rule applied: admin, allowlisted, unlimited tier or limits off.
    Exempt,
}

/// The rule reported to the client: the one that refused, or the tightest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    pub rule: Arc<str>,
    pub limit: u64,
    pub window_secs: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub source: Source,
    pub report: Option<RuleReport>,
}

impl Decision {
    fn exempt() -> Self {
        Decision {
            allowed: true,
            source: Source::Exempt,
            report: None,
        }
    }
}

/// Decision counters per rule, resolved once so the hot path only increments.
struct RuleCounters {
    allowed: IntCounter,
    limited: IntCounter,
}

pub struct Limiter {
    config: RatelimitConfig,
    redis: Option<Arc<RedisStore>>,
    /// Kept across reloads so unchanged rules keep their counts.
    local: Arc<LocalStore>,
    /// `global`, `per_user`, then the endpoint rules in config order.
    rules: Vec<(Arc<str>, RuleCounters)>,
}

const GLOBAL: usize = 0;
const PER_USER: usize = 1;

impl Limiter {
    pub fn new(
        config: &RatelimitConfig,
        redis: Option<Arc<RedisStore>>,
        local: Arc<LocalStore>,
        metrics: &Metrics,
    ) -> Self {
        let names = ["global", "per_user"]
            .into_iter()
            .map(str::to_string)
            .chain(config.endpoints.iter().map(|e| e.name.clone()));
        let rules = names
            .map(|rule| {
                let counters = RuleCounters {
                    allowed: metrics
                        .ratelimit_decisions
                        .with_label_values(&[rule.as_str(), "allowed"]),
                    limited: metrics
                        .ratelimit_decisions
                        .with_label_values(&[rule.as_str(), "limited"]),
                };
                (Arc::from(rule), counters)
            })
            .collect();
        Limiter {
            config: config.clone(),
            redis,
            local,
            rules,
        }
    }

    pub fn config(&self) -> &RatelimitConfig {
        &self.config
    }

    /// Whether limits are shared through Redis right now.
    pub fn shared(&self) -> bool {
        self.redis.as_ref().is_some_and(|r| !r.is_open())
    }

    fn key(&self, scope: &str, rule: &str) -> String {
        format!("{}:rl:{{{scope}}}:{rule}", self.config.key_prefix)
    }

    fn budget(
        &self,
        algorithm: Algorithm,
        limit: u64,
        window: std::time::Duration,
        cost: u64,
    ) -> Budget {
        Budget {
            algorithm,
            limit,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            cost,
        }
    }

    /// Every rule that applies to this request: `global`, `per_user` and the
    /// matched route's `rules` (indexes into the endpoint rules), or none for
    /// an exempt caller.
    pub fn checks(&self, subject: &Subject<'_>, rules: &[usize]) -> Vec<Check> {
        let c = &self.config;
        let tier = subject.tier.and_then(|t| c.tiers.get(t));
        let exempt = !c.enabled
            || (c.admin_bypass && subject.admin)
            || tier.is_some_and(|t| t.unlimited)
            || crate::net::is_trusted(&c.allowlist, subject.client);
        if exempt {
            return Vec::new();
        }
        let per_user = tier.and_then(|t| t.per_user).unwrap_or(c.per_user);
        let mut checks = vec![
            Check {
                rule: Arc::clone(&self.rules[GLOBAL].0),
                index: GLOBAL,
                key: self.key("global", "global"),
                budget: self.budget(Algorithm::SlidingWindow, c.global, c.window, 1),
                on_redis_error: c.on_redis_error,
            },
            Check {
                rule: Arc::clone(&self.rules[PER_USER].0),
                index: PER_USER,
                key: self.key(subject.id, "per_user"),
                budget: self.budget(Algorithm::SlidingWindow, per_user, c.window, 1),
                on_redis_error: c.on_redis_error,
            },
        ];
        if let Some(within) = subject.within {
            checks.push(Check {
                key: self.key(within, "per_user"),
                budget: self.budget(Algorithm::SlidingWindow, c.per_user, c.window, 1),
                ..checks[PER_USER].clone()
            });
        }
        for &i in rules {
            if i < c.endpoints.len() {
                checks.push(self.endpoint_check(i, subject, subject.id));
                if let (Some(within), Scope::User) = (subject.within, c.endpoints[i].scope) {
                    checks.push(self.endpoint_check(i, subject, within));
                }
            }
        }
        checks
    }

    /// The check of endpoint rule `i` for `subject`, keyed by the rule's scope.
    fn endpoint_check(&self, i: usize, subject: &Subject<'_>, id: &str) -> Check {
        let rule = &self.config.endpoints[i];
        let ip_scope;
        let scope = match rule.scope {
            Scope::User => id,
            Scope::Ip => {
                ip_scope = crate::net::ip_subject(subject.client);
                ip_scope.as_str()
            }
            Scope::Global => "global",
        };
        Check {
            rule: Arc::clone(&self.rules[PER_USER + 1 + i].0),
            index: PER_USER + 1 + i,
            key: self.key(scope, &rule.name),
            budget: self.budget(
                rule.algorithm,
                rule.limit,
                rule.window,
                u64::from(rule.cost),
            ),
            on_redis_error: rule.on_redis_error,
        }
    }

    /// Check and count `checks`: in Redis when configured and answering,
    /// else in this process at `limit / instances`.
    pub async fn decide(&self, checks: &[Check], metrics: &Metrics) -> Decision {
        if checks.is_empty() {
            return Decision::exempt();
        }
        let decision = match &self.redis {
            None => self.locally(checks, Source::Local),
            Some(store) => match store.check(checks, true, metrics).await {
                Ok(observed) => self.counted_here(checks, judge(checks, &observed, Source::Redis)),
                Err(error) => {
                    metrics
                        .ratelimit_redis_errors
                        .with_label_values(&[error.kind()])
                        .inc();
                    self.fallback(checks, metrics)
                }
            },
        };
        metrics
            .ratelimit_shared
            .set(i64::from(decision.source == Source::Redis));
        for check in checks {
            if let Some((_, counters)) = self.rules.get(check.index) {
                if decision.allowed {
                    counters.allowed.inc();
                } else if decision
                    .report
                    .as_ref()
                    .is_some_and(|r| r.rule == check.rule)
                {
                    counters.limited.inc();
                }
            }
        }
        decision
    }

    /// Redis allowed a request: count it in this process as well, and refuse
    /// it if this instance alone has already let the limit through in the
    /// window. The fallback then starts from what this instance really passed,
    /// not from zero: a Redis call that timed out after Redis had counted, or
    /// an outage in the middle of a window, can never let a second allowance
    /// through on top of the first.
    fn counted_here(&self, checks: &[Check], shared: Decision) -> Decision {
        if !shared.allowed {
            return shared;
        }
        let observed = self.local.check(checks, true);
        let here = judge(checks, &observed, Source::Redis);
        if here.allowed { shared } else { here }
    }

    /// Count in this process, each instance allowing its share of the limit.
    fn locally(&self, checks: &[Check], source: Source) -> Decision {
        let instances = u64::from(self.config.instances);
        if instances == 1 {
            let observed = self.local.check(checks, true);
            return judge(checks, &observed, source);
        }
        let scaled: Vec<Check> = checks
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.budget.limit = (c.budget.limit / instances).max(1);
                c
            })
            .collect();
        let observed = self.local.check(&scaled, true);
        judge(&scaled, &observed, source)
    }

    /// Redis failed: each rule follows its `on_redis_error`.
    fn fallback(&self, checks: &[Check], metrics: &Metrics) -> Decision {
        if let Some(denying) = checks
            .iter()
            .find(|c| c.on_redis_error == RedisErrorPolicy::Deny)
        {
            metrics
                .ratelimit_fallbacks
                .with_label_values(&["deny"])
                .inc();
            let window_secs = denying.budget.window_ms / 1000;
            return Decision {
                allowed: false,
                source: Source::Fallback,
                report: Some(RuleReport {
                    rule: Arc::clone(&denying.rule),
                    limit: denying.budget.limit,
                    window_secs,
                    remaining: 0,
                    reset_secs: self.config.breaker_cooldown.as_secs().max(1),
                }),
            };
        }
        let local: Vec<Check> = checks
            .iter()
            .filter(|c| c.on_redis_error == RedisErrorPolicy::Local)
            .cloned()
            .collect();
        let policy = if local.is_empty() { "allow" } else { "local" };
        metrics
            .ratelimit_fallbacks
            .with_label_values(&[policy])
            .inc();
        if local.is_empty() {
            return Decision {
                allowed: true,
                source: Source::Fallback,
                report: None,
            };
        }
        self.locally(&local, Source::Fallback)
    }

    /// Every rule that would apply to `subject` on any endpoint, with its
    /// current count, without counting anything.
    pub async fn inspect(&self, subject: &Subject<'_>, metrics: &Metrics) -> Inspection {
        let every: Vec<usize> = (0..self.config.endpoints.len()).collect();
        let checks = self.checks(subject, &every);
        let exempt = checks.is_empty();
        let (observed, source) = match &self.redis {
            Some(store) => match store.check(&checks, false, metrics).await {
                Ok(observed) => (observed, Source::Redis),
                Err(_) => (self.local.check(&checks, false), Source::Fallback),
            },
            None => (self.local.check(&checks, false), Source::Local),
        };
        let rules = checks
            .iter()
            .zip(observed)
            .map(|(check, observed)| {
                let used = match observed {
                    Observed::Counter {
                        prev,
                        curr,
                        elapsed_ms,
                    } => {
                        let weight = 1.0 - elapsed_ms as f64 / check.budget.window_ms as f64;
                        (prev as f64 * weight + curr as f64).round() as u64
                    }
                    Observed::Log { count, .. } => count,
                };
                let outcome = Budget {
                    cost: 0,
                    ..check.budget
                }
                .judge(observed);
                RuleState {
                    rule: check.rule.to_string(),
                    key: check.key.clone(),
                    limit: check.budget.limit,
                    window_secs: check.budget.window_ms / 1000,
                    used,
                    remaining: outcome.remaining,
                    reset_secs: outcome.reset_secs,
                }
            })
            .collect();
        Inspection {
            subject: subject.id.to_string(),
            source,
            exempt,
            rules,
        }
    }
}

/// What `/ratelimit/<subject>` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub subject: String,
    pub source: Source,
    pub exempt: bool,
    pub rules: Vec<RuleState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleState {
    pub rule: String,
    pub key: String,
    pub limit: u64,
    pub window_secs: u64,
    /// Requests counted in the sliding window now.
    pub used: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

/// Judge every rule; report the refusing rule with the longest wait, or the
/// allowed rule with the least left.
fn judge(checks: &[Check], observed: &[Observed], source: Source) -> Decision {
    let outcomes: Vec<(&Check, Outcome)> = checks
        .iter()
        .zip(observed)
        .map(|(c, o)| (c, c.budget.judge(*o)))
        .collect();
    let allowed = outcomes.iter().all(|(_, o)| o.allowed);
    let reported = if allowed {
        outcomes.iter().min_by_key(|(_, o)| o.remaining)
    } else {
        outcomes
            .iter()
            .filter(|(_, o)| !o.allowed)
            .max_by_key(|(_, o)| o.reset_secs)
    };
    Decision {
        allowed,
        source,
        report: reported.map(|(c, o)| RuleReport {
            rule: Arc::clone(&c.rule),
            limit: c.budget.limit,
            window_secs: c.budget.window_ms / 1000,
            remaining: o.remaining,
            reset_secs: o.reset_secs,
        }),
    }
}
