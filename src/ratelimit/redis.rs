//! The shared store: one Lua script checks and counts every rule of a request
//! atomically on Redis's clock (Kong #5311: read-then-increment lets bursts
//! through), behind a short timeout and a circuit breaker (envoyproxy/ratelimit
//! #462: a slow Redis must not slow every request). On Redis Cluster a script
//! may only touch one slot, so the rules go in one call per hash tag: the
//! caller's own slots first, `{global}` last, stopping at the first refusal,
//! so a refused caller never spends the shared budget.

use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use super::Check;
use super::window::Observed;
use crate::config::ratelimit::Algorithm;
use crate::telemetry::Metrics;

/// KEYS: one per rule. ARGV: commit flag, then per rule: algorithm (0 counter,
/// 1 log), limit, window ms, cost. Counter keys are hashes {w: window index,
/// c: count, p: previous count}; log keys are sorted sets of timestamps. Reads
/// every rule first and writes only if all fit, so a refused request counts
/// nowhere. Returns, per rule, two integers (see `decode`).
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local commit = ARGV[1] == '1'
local fits = true
local out = {}
local seen = {}
for i, key in ipairs(KEYS) do
  local b = 1 + (i - 1) * 4
  local algo = tonumber(ARGV[b + 1])
  local limit = tonumber(ARGV[b + 2])
  local window = tonumber(ARGV[b + 3])
  local cost = tonumber(ARGV[b + 4])
  if algo == 0 then
    local idx = math.floor(now / window)
    local h = redis.call('HMGET', key, 'w', 'c', 'p')
    local w = tonumber(h[1])
    local c = tonumber(h[2]) or 0
    local p = tonumber(h[3]) or 0
    local fresh = w ~= idx
    if fresh then
      if w == idx - 1 then p = c else p = 0 end
      c = 0
    end
    local elapsed = now - idx * window
    if p * (1 - elapsed / window) + c + cost > limit then fits = false end
    seen[i] = {idx, c, p, fresh}
    out[#out + 1] = p * 4294967296 + c
    out[#out + 1] = elapsed
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    local count = redis.call('ZCARD', key)
    if count + cost > limit then fits = false end
    local leave = count + cost - limit
    if leave < 1 then leave = 1 end
    local wait = window
    local entry = redis.call('ZRANGE', key, leave - 1, leave - 1, 'WITHSCORES')
    if entry[2] then wait = tonumber(entry[2]) + window - now end
    seen[i] = {count}
    out[#out + 1] = count
    out[#out + 1] = wait
  end
end
if commit and fits then
  for i, key in ipairs(KEYS) do
    local b = 1 + (i - 1) * 4
    local window = tonumber(ARGV[b + 3])
    local cost = tonumber(ARGV[b + 4])
    if tonumber(ARGV[b + 1]) == 0 then
      local s = seen[i]
      if s[4] then
        -- A new window (or a new key): roll the counts, renew the expiry.
        redis.call('HSET', key, 'w', s[1], 'c', s[2] + cost, 'p', s[3])
        redis.call('PEXPIRE', key, 2 * window)
      else
        redis.call('HINCRBY', key, 'c', cost)
      end
    else
      for k = 1, cost do
        redis.call('ZADD', key, now, t[1] .. t[2] .. ':' .. (seen[i][1] + k))
      end
      redis.call('PEXPIRE', key, window)
    end
  end
end
return out
";

/// Whether the breaker lets a call through.
enum Gate {
    Closed,
    /// Open until the instant; then one trial call.
    Open(Instant),
}

/// How to reach Redis: one server, or a cluster.
enum Backend {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
    },
    Cluster(ClusterClient),
}

/// One thread's connection to the backend.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisStore {
    /// Tells this store's connections apart from an older store's.
    id: u64,
    backend: Backend,
    script: redis::Script,
    timeout: Duration,
    failures: AtomicU32,
    breaker_failures: u32,
    cooldown: Duration,
    gate: Mutex<Gate>,
    /// Bumped whenever the breaker opens. A worker whose connection is from
    /// an older generation opens a fresh one, so the trial call after the
    /// cooldown never lands on a connection still backing off from the
    /// outage: one trial on a stale connection per cooldown let shared
    /// limits stay off for many cooldowns after Redis was back.
    generation: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis circuit breaker open")]
    BreakerOpen,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered {0} values for {1} rules")]
    Shape(usize, usize),
}

impl StoreError {
    /// The `kind` label of `gatehouse_ratelimit_redis_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::BreakerOpen => "breaker_open",
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "error",
            StoreError::Shape(..) => "protocol",
        }
    }
}

impl RedisStore {
    /// `cluster_nodes` empty: the single server at `url`.
    pub fn new(
        url: &str,
        cluster_nodes: &[String],
        timeout: Duration,
        breaker_failures: u32,
        cooldown: Duration,
    ) -> Result<Self, redis::RedisError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let response_timeout = timeout.max(Duration::from_millis(250));
        let backend = if cluster_nodes.is_empty() {
            Backend::Single {
                client: redis::Client::open(url)?,
                config: ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1)),
            }
        } else {
            Backend::Cluster(
                redis::cluster::ClusterClientBuilder::new(cluster_nodes.to_vec())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(response_timeout)
                    .retries(1)
                    .build()?,
            )
        };
        Ok(RedisStore {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            backend,
            script: redis::Script::new(SCRIPT),
            timeout,
            failures: AtomicU32::new(0),
            breaker_failures,
            cooldown,
            gate: Mutex::new(Gate::Closed),
            generation: AtomicU64::new(0),
        })
    }

    pub fn is_open(&self) -> bool {
        self.gate
            .lock()
            .map(|g| matches!(*g, Gate::Open(_)))
            .unwrap_or(false)
    }

    /// Check (and with `commit`, count) `checks` in one script call.
    pub async fn check(
        &self,
        checks: &[Check],
        commit: bool,
        metrics: &Metrics,
    ) -> Result<Vec<Observed>, StoreError> {
        if let Ok(mut gate) = self.gate.lock() {
            if let Gate::Open(until) = *gate {
                let now = Instant::now();
                if now < until {
                    return Err(StoreError::BreakerOpen);
                }
                // This call is the one trial; the others keep falling back
                // until it has answered.
                *gate = Gate::Open(now + self.cooldown);
            }
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.run(checks, commit)).await;
        metrics
            .ratelimit_redis_duration
            .observe(started.elapsed().as_secs_f64());
        let result = result.unwrap_or(Err(StoreError::Timeout(self.timeout)));
        match &result {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }

    /// One script call for a single server; one per hash tag on a cluster.
    async fn run(&self, checks: &[Check], commit: bool) -> Result<Vec<Observed>, StoreError> {
        let mut connection = self.connection().await?;
        if matches!(self.backend, Backend::Single { .. }) {
            let values = self.call(&mut connection, checks, commit).await?;
            return decode(checks, &values);
        }
        let mut observed: Vec<Option<Observed>> = vec![None; checks.len()];
        for group in slot_groups(checks) {
            let subset: Vec<Check> = group.iter().map(|i| checks[*i].clone()).collect();
            let values = self.call(&mut connection, &subset, commit).await?;
            let seen = decode(&subset, &values)?;
            let refused = subset
                .iter()
                .zip(&seen)
                .any(|(c, o)| !c.budget.judge(*o).allowed);
            for (index, o) in group.iter().zip(seen) {
                observed[*index] = Some(o);
            }
            if refused && commit {
                break;
            }
        }
        // Rules after a refusal were not looked at; they did not refuse.
        Ok(checks
            .iter()
            .zip(observed)
            .map(|(c, o)| o.unwrap_or_else(|| unseen(c)))
            .collect())
    }

    async fn call(
        &self,
        connection: &mut Connection,
        checks: &[Check],
        commit: bool,
    ) -> Result<Vec<i64>, redis::RedisError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(if commit { "1" } else { "0" });
        for check in checks {
            let b = &check.budget;
            invocation
                .key(&check.key)
                .arg(match b.algorithm {
                    Algorithm::SlidingWindow => 0,
                    Algorithm::SlidingLog => 1,
                })
                .arg(b.limit)
                .arg(b.window_ms)
                .arg(b.cost);
        }
        // EVALSHA, and EVAL again on NOSCRIPT (after a restart or SCRIPT FLUSH).
        match connection {
            Connection::Single(c) => invocation.invoke_async(c).await,
            Connection::Cluster(c) => invocation.invoke_async(c).await,
        }
    }

    /// This thread's connection. Each worker runtime drives its own, so a
    /// decision never hops to another thread and back.
    async fn connection(&self) -> Result<Connection, redis::RedisError> {
        thread_local! {
            /// (store id, generation, connection)
            static CONNECTIONS: RefCell<Vec<(u64, u64, Connection)>> = const { RefCell::new(Vec::new()) };
        }
        let generation = self.generation.load(Ordering::Acquire);
        let cached = CONNECTIONS.with(|c| {
            c.borrow()
                .iter()
                .find(|(id, g, _)| *id == self.id && *g == generation)
                .map(|(_, _, connection)| connection.clone())
        });
        if let Some(connection) = cached {
            return Ok(connection);
        }
        let connection = match &self.backend {
            Backend::Single { client, config } => Connection::Single(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            ),
            Backend::Cluster(client) => Connection::Cluster(client.get_async_connection().await?),
        };
        CONNECTIONS.with(|c| {
            let mut connections = c.borrow_mut();
            // A store replaced by a reload, or a connection from before the
            // breaker last opened, is given up here.
            connections.retain(|(id, g, _)| *id > self.id || (*id == self.id && *g > generation));
            if !connections.iter().any(|(id, _, _)| *id == self.id) {
                connections.push((self.id, generation, connection.clone()));
            }
        });
        Ok(connection)
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if let Ok(mut gate) = self.gate.lock() {
            if matches!(*gate, Gate::Open(_)) {
                tracing::info!("redis answers again; shared rate limits resume");
                *gate = Gate::Closed;
            }
        }
    }

    fn failed(&self, error: &StoreError) {
        if matches!(error, StoreError::BreakerOpen) {
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.breaker_failures {
            return;
        }
        if let Ok(mut gate) = self.gate.lock() {
            if matches!(*gate, Gate::Closed) {
                tracing::warn!(%error, cooldown = ?self.cooldown, "redis unavailable; rate limits fall back");
            }
            *gate = Gate::Open(Instant::now() + self.cooldown);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }
}

/// The hash tag of a key: `{user:42}` in `p:rl:{user:42}:per_user`.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|start| {
            let end = key[start..].find('}')?;
            Some(&key[start..=start + end])
        })
        .unwrap_or(key)
}

/// Check indexes grouped by hash tag, the caller's own slots first and
/// `{global}` last.
fn slot_groups(checks: &[Check]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, check) in checks.iter().enumerate() {
        let tag = hash_tag(&check.key);
        match groups.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, members)) => members.push(index),
            None => groups.push((tag, vec![index])),
        }
    }
    groups.sort_by_key(|(tag, _)| *tag == "{global}");
    groups.into_iter().map(|(_, members)| members).collect()
}

/// The observation of a rule nobody looked at: nothing counted.
fn unseen(check: &Check) -> Observed {
    match check.budget.algorithm {
        Algorithm::SlidingWindow => Observed::Counter {
            prev: 0,
            curr: 0,
            elapsed_ms: 0,
        },
        Algorithm::SlidingLog => Observed::Log {
            count: 0,
            wait_ms: check.budget.window_ms,
        },
    }
}

/// Two integers per rule: counter → (prev << 32 | curr, elapsed ms);
/// log → (count, wait ms).
fn decode(checks: &[Check], values: &[i64]) -> Result<Vec<Observed>, StoreError> {
    if values.len() != 2 * checks.len() {
        return Err(StoreError::Shape(values.len(), checks.len()));
    }
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(checks
        .iter()
        .zip(values.chunks_exact(2))
        .map(|(check, pair)| match check.budget.algorithm {
            Algorithm::SlidingWindow => {
                let packed = unsigned(pair[0]);
                Observed::Counter {
                    prev: packed >> 32,
                    curr: packed & 0xffff_ffff,
                    elapsed_ms: unsigned(pair[1]),
                }
            }
            Algorithm::SlidingLog => Observed::Log {
                count: unsigned(pair[0]),
                wait_ms: unsigned(pair[1]),
            },
        })
        .collect())
}
