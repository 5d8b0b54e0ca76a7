//! L2: entries in Redis, shared by every gateway, and the tag versions and
//! invalidation messages that make a write seen by all of them.
//!
//! Keys (`P` is `cache.key_prefix`):
//!
//! - `P:c:e:<hash of the key>`: one entry (the latest variant), with a TTL of
//!   its freshness plus its stale allowance, at most `l2_max_ttl`;
//! - `{P:c}:gen`: the generation, incremented by every invalidation;
//! - `{P:c}:t:<hash of the tag>` / `{P:c}:s:<…>`: the generation at a tag's
//!   last invalidation / soft purge, with a TTL longer than any entry's;
//! - `{P:c}:floor`: entries fetched before it are gone (set after an outage
//!   during which an invalidation could not be written).
//!
//! The versions share one hash tag, so a script may touch them together on
//! a Redis Cluster (souin #417). Invalidations are also published on
//! `P:c:inv`; each gateway applies them to its L1. A gateway answering from
//! L1 first reads the generation (one read for all requests waiting at
//! that moment): if it has moved past the messages the gateway has seen, L1
//! is not trusted and the entry is checked against Redis. So a write
//! acknowledged by one gateway is seen by the next read through any other,
//! even before the message arrives.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, oneshot};

use super::policy::Freshness;
use super::tags::Stamp;
use super::{Cache, Entry};
use crate::config::{CacheConfig, RedisConfig};

/// Tag versions outlive the longest-lived entry by this much.
const VERSION_GRACE: Duration = Duration::from_secs(3600);
/// After a failed call, Redis is left alone this long.
const COOLDOWN: Duration = Duration::from_secs(2);

/// Invalidate tags: seed the generation from the clock when it is missing
/// (so it never goes back), increment it, set each tag's version, publish.
const BUMP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]))
end
local gen = redis.call('INCR', KEYS[1])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], gen, 'PX', ARGV[1])
end
redis.call('PUBLISH', ARGV[2], gen .. ' ' .. ARGV[3])
return gen
";

enum Link {
    Single(
        redis::Client,
        ConnectionManagerConfig,
        OnceCell<ConnectionManager>,
    ),
    Cluster(redis::cluster::ClusterClient, OnceCell<ClusterConnection>),
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        call: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => call.invoke_async(c).await,
            Conn::Cluster(c) => call.invoke_async(c).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("redis is being left alone after a failure")]
    Down,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What Redis says of an entry's tags now.
pub struct Versions {
    pub floor: u64,
    pub tags: Vec<(u64, u64)>,
}

pub struct L2 {
    link: Link,
    /// Where the subscriber connects (the first node of a cluster).
    pubsub_url: String,
    prefix: String,
    timeout: Duration,
    max_ttl: Duration,
    bump: redis::Script,
    down_until: Mutex<Option<Instant>>,
    /// An invalidation could not be written: on recovery, everything older
    /// is dropped.
    lost_bump: AtomicBool,
    /// Tells this gateway's own messages apart.
    instance: u64,
    /// The newest generation whose message this gateway has applied to L1.
    seen: AtomicU64,
    subscribed: AtomicBool,
    following: prometheus::IntGauge,
    reader: GenerationReader,
    errors: prometheus::IntCounterVec,
    up: prometheus::IntGauge,
    duration: prometheus::Histogram,
}

impl L2 {
    pub fn new(
        redis: &RedisConfig,
        config: &CacheConfig,
        metrics: &super::CacheMetrics,
    ) -> Result<L2, redis::RedisError> {
        let response_timeout = config.redis_timeout.max(Duration::from_millis(250));
        let link = if redis.cluster_nodes.is_empty() {
            Link::Single(
                redis::Client::open(redis.url.as_str())?,
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1)),
                OnceCell::new(),
            )
        } else {
            Link::Cluster(
                redis::cluster::ClusterClientBuilder::new(redis.cluster_nodes.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(response_timeout)
                    .retries(1)
                    .build()?,
                OnceCell::new(),
            )
        };
        let pubsub_url = redis.cluster_nodes.first().unwrap_or(&redis.url).clone();
        Ok(L2 {
            link,
            pubsub_url,
            prefix: config.key_prefix.clone(),
            timeout: config.redis_timeout,
            max_ttl: config.l2_max_ttl,
            bump: redis::Script::new(BUMP),
            down_until: Mutex::new(None),
            lost_bump: AtomicBool::new(false),
            instance: rand::random(),
            seen: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            following: metrics.l2_following.clone(),
            reader: GenerationReader::default(),
            errors: metrics.l2_errors.clone(),
            up: metrics.l2_up.clone(),
            duration: metrics.l2_duration.clone(),
        })
    }

    async fn conn(&self) -> Result<Conn, L2Error> {
        match &self.link {
            Link::Single(client, config, cell) => {
                let manager = cell
                    .get_or_try_init(|| async {
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    })
                    .await?;
                Ok(Conn::Single(manager.clone()))
            }
            Link::Cluster(client, cell) => {
                let connection = cell
                    .get_or_try_init(|| async { client.get_async_connection().await })
                    .await?;
                Ok(Conn::Cluster(connection.clone()))
            }
        }
    }

    /// Whether Redis is worth asking now.
    pub fn available(&self) -> bool {
        let guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        guard.is_none_or(|until| Instant::now() >= until)
    }

    /// Run one Redis exchange within the timeout, keeping the up/down state.
    async fn call<T, F>(&self, op: &str, run: F) -> Result<T, L2Error>
    where
        F: std::future::Future<Output = Result<T, L2Error>>,
    {
        if !self.available() {
            return Err(L2Error::Down);
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(L2Error::Timeout(self.timeout)),
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.succeeded().await,
            Err(e) => self.failed(op, e),
        }
        result
    }

    async fn succeeded(&self) {
        let was_down = {
            let mut guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
            guard.take().is_some()
        };
        if was_down {
            tracing::info!("cache: redis answers again; L2 back in use");
            self.up.set(1);
            if self.lost_bump.swap(false, Ordering::AcqRel) {
                // Writes during the outage could not mark L2 entries stale:
                // every entry fetched before now is dropped.
                if let Err(e) = self.raise_floor().await {
                    self.lost_bump.store(true, Ordering::Release);
                    tracing::warn!(error = %e, "cache: could not drop L2 entries older than the outage");
                }
            }
        }
    }

    fn failed(&self, op: &str, error: &L2Error) {
        self.errors.with_label_values(&[op]).inc();
        let mut guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            tracing::warn!(%error, op, "cache: redis unavailable; answering from L1 and Gunicorn");
        }
        *guard = Some(Instant::now() + COOLDOWN);
        self.up.set(0);
    }

    fn entry_key(&self, key: &str) -> String {
        format!("{}:c:e:{}", self.prefix, short_hash(key))
    }

    fn version_key(&self, kind: &str, tag: &str) -> String {
        format!("{{{}:c}}:{kind}:{}", self.prefix, short_hash(tag))
    }

    fn generation_key(&self) -> String {
        format!("{{{}:c}}:gen", self.prefix)
    }

    fn floor_key(&self) -> String {
        format!("{{{}:c}}:floor", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:c:inv", self.prefix)
    }

    /// The generation now, read after this call began (shared with every
    /// caller waiting at the same moment).
    pub async fn generation(self: &Arc<Self>) -> Result<u64, L2Error> {
        if !self.available() {
            return Err(L2Error::Down);
        }
        GenerationReader::read(self).await
    }

    async fn read_generation(&self) -> Result<u64, L2Error> {
        let key = self.generation_key();
        self.call("generation", async {
            let mut conn = self.conn().await?;
            let value: Option<u64> = conn.query(redis::cmd("GET").arg(&key)).await?;
            Ok(value.unwrap_or(0))
        })
        .await
    }

    /// Whether L1 has applied every invalidation up to `generation`.
    pub fn caught_up(&self, generation: u64) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.seen.load(Ordering::Acquire) >= generation
    }

    /// The stored bytes for `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error> {
        let key = self.entry_key(key);
        self.call("get", async {
            let mut conn = self.conn().await?;
            Ok(conn.query(redis::cmd("GET").arg(&key)).await?)
        })
        .await
    }

    /// The floor and each tag's (version, soft version).
    pub async fn versions(&self, tags: &[String]) -> Result<Versions, L2Error> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.floor_key());
        for tag in tags {
            cmd.arg(self.version_key("t", tag))
                .arg(self.version_key("s", tag));
        }
        self.call("versions", async {
            let mut conn = self.conn().await?;
            let values: Vec<Option<u64>> = conn.query(&cmd).await?;
            let mut values = values.into_iter().map(Option::unwrap_or_default);
            let floor = values.next().unwrap_or_default();
            let mut out = Vec::with_capacity(tags.len());
            while let (Some(hard), Some(soft)) = (values.next(), values.next()) {
                out.push((hard, soft));
            }
            Ok(Versions { floor, tags: out })
        })
        .await
    }

    fn lock_key(&self, key: &str) -> String {
        format!("{}:c:lock:{}", self.prefix, short_hash(key))
    }

    /// Take the fetch lock of `key` across gateways for at most `ttl`;
    /// `false`: another gateway holds it.
    pub async fn try_lock(&self, key: &str, ttl: Duration) -> Result<bool, L2Error> {
        let key = self.lock_key(key);
        self.call("lock", async {
            let mut conn = self.conn().await?;
            let taken: Option<String> = conn
                .query(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(self.instance)
                        .arg("NX")
                        .arg("PX")
                        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)),
                )
                .await?;
            Ok(taken.is_some())
        })
        .await
    }

    /// Whether another gateway still holds the fetch lock of `key`.
    pub async fn locked(&self, key: &str) -> Result<bool, L2Error> {
        let key = self.lock_key(key);
        self.call("lock", async {
            let mut conn = self.conn().await?;
            let n: u64 = conn.query(redis::cmd("EXISTS").arg(&key)).await?;
            Ok(n > 0)
        })
        .await
    }

    /// Give the fetch lock of `key` back (it expires anyway).
    pub async fn unlock(&self, key: &str) {
        let key = self.lock_key(key);
        let _ = self
            .call("lock", async {
                let mut conn = self.conn().await?;
                let _: u64 = conn.query(redis::cmd("DEL").arg(&key)).await?;
                Ok(())
            })
            .await;
    }

    /// Store `bytes` under `key` for `ttl` (at most `l2_max_ttl`).
    pub async fn put(&self, key: &str, bytes: Vec<u8>, ttl: Duration) -> Result<(), L2Error> {
        let ttl = ttl.min(self.max_ttl).max(Duration::from_millis(1));
        let key = self.entry_key(key);
        self.call("put", async {
            let mut conn = self.conn().await?;
            let _: () = conn
                .query(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(bytes)
                        .arg("PX")
                        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// Invalidate `tags` in Redis and tell every gateway.
    pub async fn bump(&self, tags: &[String], soft: bool) -> Result<u64, L2Error> {
        let kind = if soft { "s" } else { "t" };
        let mut call = self.bump.prepare_invoke();
        call.key(self.generation_key());
        for tag in tags {
            call.key(self.version_key(kind, tag));
        }
        let message = serde_json::json!({
            "from": self.instance,
            "soft": soft,
            "tags": tags,
        });
        call.arg(u64::try_from((self.max_ttl + VERSION_GRACE).as_millis()).unwrap_or(u64::MAX))
            .arg(self.channel())
            .arg(message.to_string());
        let result = self
            .call("bump", async {
                let mut conn = self.conn().await?;
                Ok(conn.invoke::<u64>(&call).await?)
            })
            .await;
        if result.is_err() {
            self.lost_bump.store(true, Ordering::Release);
        }
        result
    }

    /// Send `payload` on the invalidation channel.
    async fn publish(&self, payload: &str) -> Result<(), L2Error> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel()).arg(payload);
        let mut conn = self.conn().await?;
        let _: i64 = tokio::time::timeout(self.timeout, conn.query(&cmd))
            .await
            .map_err(|_| L2Error::Timeout(self.timeout))??;
        Ok(())
    }

    /// Drop every L2 entry fetched before now, and every gateway's L1.
    pub async fn raise_floor(&self) -> Result<(), L2Error> {
        let mut call = self.bump.prepare_invoke();
        call.key(self.generation_key()).key(self.floor_key());
        let message = serde_json::json!({"from": self.instance, "all": true});
        call.arg(u64::try_from((self.max_ttl + VERSION_GRACE).as_millis()).unwrap_or(u64::MAX))
            .arg(self.channel())
            .arg(message.to_string());
        let mut conn = self.conn().await?;
        let _: u64 = tokio::time::timeout(self.timeout, conn.invoke(&call))
            .await
            .map_err(|_| L2Error::Timeout(self.timeout))??;
        Ok(())
    }
}

/// One generation read for every request waiting when it starts.
#[derive(Default)]
struct GenerationReader {
    state: Mutex<ReaderState>,
}

#[derive(Default)]
struct ReaderState {
    reading: bool,
    waiting: Vec<oneshot::Sender<Result<u64, String>>>,
}

impl GenerationReader {
    async fn read(l2: &Arc<L2>) -> Result<u64, L2Error> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = l2.reader.state.lock().unwrap_or_else(|e| e.into_inner());
            state.waiting.push(tx);
            !std::mem::replace(&mut state.reading, true)
        };
        if start {
            let l2 = Arc::clone(l2);
            tokio::spawn(async move {
                loop {
                    // Taken before the read is sent: every waiter in this
                    // batch arrived before the read began.
                    let batch = {
                        let mut state = l2.reader.state.lock().unwrap_or_else(|e| e.into_inner());
                        let batch = std::mem::take(&mut state.waiting);
                        if batch.is_empty() {
                            state.reading = false;
                            return;
                        }
                        batch
                    };
                    let result = l2.read_generation().await.map_err(|e| e.to_string());
                    for waiter in batch {
                        let _ = waiter.send(result.clone());
                    }
                }
            });
        }
        match rx.await {
            Ok(Ok(generation)) => Ok(generation),
            _ => Err(L2Error::Down),
        }
    }
}

/// Follow the invalidation channel for ever: apply other gateways' tags to
/// L1. Messages sent while not subscribed are lost, so on every
/// (re)subscription L1 drops what may have missed one.
pub async fn subscribe(cache: Arc<Cache>, l2: Arc<L2>) {
    let channel = l2.channel();
    // This L2's subscriber speaks for the gauge from now (also after a reload).
    l2.following.set(0);
    let mut warned = false;
    // Until a reload replaces this L2.
    while cache.uses(&l2) {
        let applied = l2.seen.load(Ordering::Acquire);
        let pubsub = async {
            let client = redis::Client::open(l2.pubsub_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = match tokio::time::timeout(Duration::from_secs(2), pubsub).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        let mut pubsub = match subscribed {
            Ok(pubsub) => pubsub,
            Err(error) => {
                warn_not_following(&mut warned, &error);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = pubsub.on_message();
        if let Err(error) = confirm(&cache, &l2, &mut stream).await {
            warn_not_following(&mut warned, &error);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let Ok(generation) = l2.read_generation().await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        // Messages sent while not subscribed were lost. None were when
        // Redis's generation is the last one applied before; else L1 keeps
        // only what was fetched after every invalidation up to now.
        match generation.cmp(&applied) {
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Greater => cache.resync_local(generation),
            // Redis lost its data: nothing it said before counts.
            std::cmp::Ordering::Less => cache.clear_local(),
        }
        l2.seen.fetch_max(generation, Ordering::AcqRel);
        l2.subscribed.store(true, Ordering::Release);
        l2.following.set(1);
        warned = false;
        tracing::info!("cache: following invalidations from other gateways");
        loop {
            let next = next_message(&mut stream);
            let message = tokio::select! {
                message = next => message,
                // A reload that replaced this L2 ends its subscriber, also
                // when no message comes.
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if cache.uses(&l2) {
                        continue;
                    }
                    return;
                }
            };
            let Some(message) = message else {
                break;
            };
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            apply(&cache, &l2, &payload);
        }
        drop(stream);
        l2.subscribed.store(false, Ordering::Release);
        l2.following.set(0);
        cache.clear_local();
        tracing::warn!("cache: invalidation channel lost; L1 emptied, resubscribing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The channel's next message; `None` once it is closed.
async fn next_message<S>(stream: &mut S) -> Option<redis::Msg>
where
    S: futures_core::Stream<Item = redis::Msg> + Unpin,
{
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *stream), cx)).await
}

/// Say once per outage that the channel is not followed.
fn warn_not_following(warned: &mut bool, error: &str) {
    if !std::mem::replace(warned, true) {
        tracing::warn!(
            error,
            "cache: cannot follow the invalidation channel; L1 answers only what was fetched since the last invalidation"
        );
    }
}

/// Whether the subscription holds: the client reads Redis's refusal of a
/// SUBSCRIBE (an ACL without the channel) as success, so a message of this
/// gateway's own must come back on it. Invalidations that come first are
/// applied.
async fn confirm<S>(cache: &Cache, l2: &L2, stream: &mut S) -> Result<(), String>
where
    S: futures_core::Stream<Item = redis::Msg> + Unpin,
{
    // Not `<generation> <json>`: every gateway's `apply` passes over it.
    let probe = format!("probe {:016x}", rand::random::<u64>());
    l2.publish(&probe).await.map_err(|e| e.to_string())?;
    let back = async {
        while let Some(message) = next_message(stream).await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            if payload == probe {
                return Ok(());
            }
            apply(cache, l2, &payload);
        }
        Err("the channel closed".to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), back)
        .await
        .unwrap_or_else(|_| Err("the subscription received nothing".to_string()))
}

/// `<generation> <json>`: one invalidation.
fn apply(cache: &Cache, l2: &L2, payload: &str) {
    let Some((generation, body)) = payload.split_once(' ') else {
        return;
    };
    let Ok(generation) = generation.parse::<u64>() else {
        return;
    };
    let Ok(message) = serde_json::from_str::<serde_json::Value>(body) else {
        return;
    };
    if message["from"].as_u64() != Some(l2.instance) {
        if message["all"].as_bool() == Some(true) {
            cache.clear_local();
        } else if let Some(tags) = message["tags"].as_array() {
            let tags: Vec<&str> = tags.iter().filter_map(|t| t.as_str()).collect();
            cache.tags_bump(&tags, message["soft"].as_bool() == Some(true));
        }
    }
    l2.seen.fetch_max(generation, Ordering::AcqRel);
}

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

/// An entry as L2 stores it, with the versions of its tags in Redis.
pub fn encode(entry: &Entry, stamp: &Stamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.body.len() + 512);
    out.extend_from_slice(b"GH1");
    out.extend_from_slice(&entry.status.as_u16().to_be_bytes());
    let stored_at = SystemTime::now()
        .checked_sub(entry.stored.elapsed())
        .unwrap_or(UNIX_EPOCH);
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    for value in [
        millis(stored_at.duration_since(UNIX_EPOCH).unwrap_or_default()),
        millis(entry.initial_age),
        millis(entry.freshness.lifetime),
        millis(entry.freshness.stale_while_revalidate),
        millis(entry.freshness.stale_if_error),
        stamp.generation,
    ] {
        out.extend_from_slice(&value.to_be_bytes());
    }
    out.push(u8::from(entry.freshness.forbids_stale));
    put_len(&mut out, entry.headers.len());
    for (name, value) in &entry.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    put_len(&mut out, entry.vary.len());
    for (name, value) in &entry.vary {
        put_bytes(&mut out, name.as_bytes());
        out.push(u8::from(value.is_some()));
        put_bytes(&mut out, value.as_deref().unwrap_or("").as_bytes());
    }
    put_len(&mut out, stamp.versions.len());
    for (tag, hard, soft) in &stamp.versions {
        put_bytes(&mut out, tag.as_bytes());
        out.extend_from_slice(&hard.to_be_bytes());
        out.extend_from_slice(&soft.to_be_bytes());
    }
    put_bytes(&mut out, &entry.body);
    out
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// What `encode` wrote: the entry's parts and its Redis stamp. `None` for
/// anything malformed (another version, a truncated value).
pub struct Decoded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub age: Duration,
    pub initial_age: Duration,
    pub freshness: Freshness,
    pub vary: Vec<(String, Option<String>)>,
    pub stamp: Stamp,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

pub fn decode(bytes: &[u8]) -> Option<Decoded> {
    let mut r = Reader(bytes);
    if r.take(3)? != b"GH1" {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
    let stored_at = UNIX_EPOCH + Duration::from_millis(r.u64()?);
    let initial_age = Duration::from_millis(r.u64()?);
    let lifetime = Duration::from_millis(r.u64()?);
    let swr = Duration::from_millis(r.u64()?);
    let sie = Duration::from_millis(r.u64()?);
    let generation = r.u64()?;
    let forbids_stale = r.take(1)?[0] != 0;
    let mut headers = HeaderMap::new();
    for _ in 0..r.len()? {
        let name = HeaderName::from_bytes(r.bytes()?).ok()?;
        let value = HeaderValue::from_bytes(r.bytes()?).ok()?;
        headers.append(name, value);
    }
    let mut vary = Vec::new();
    for _ in 0..r.len()? {
        let name = r.text()?;
        let present = r.take(1)?[0] != 0;
        let value = r.text()?;
        vary.push((name, present.then_some(value)));
    }
    let mut versions = Vec::new();
    for _ in 0..r.len()? {
        let tag = r.text()?;
        versions.push((tag, r.u64()?, r.u64()?));
    }
    let body = Bytes::copy_from_slice(r.bytes()?);
    if !r.0.is_empty() {
        return None;
    }
    let resident = SystemTime::now()
        .duration_since(stored_at)
        .unwrap_or_default();
    Some(Decoded {
        status,
        headers,
        body,
        age: initial_age + resident,
        initial_age,
        freshness: Freshness {
            lifetime,
            stale_while_revalidate: swr,
            stale_if_error: sie,
            forbids_stale,
        },
        vary,
        stamp: Stamp {
            generation,
            versions,
            redis: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_round_trip_and_garbage_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let freshness = Freshness {
            lifetime: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(7),
            forbids_stale: true,
        };
        let stamp = Stamp {
            generation: 42,
            versions: vec![("tag:stories".into(), 3, 0), ("uri:h\0/\0".into(), 0, 9)],
            redis: None,
        };
        let entry = Entry::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"{\"a\":1}"),
            freshness,
            vec![
                ("accept-encoding".into(), Some("gzip".into())),
                ("cookie".into(), None),
            ],
            Stamp::default(),
            SystemTime::now(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        let bytes = encode(&entry, &stamp);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(back.body, entry.body);
        assert_eq!(back.headers, entry.headers);
        assert_eq!(back.vary, entry.vary);
        assert_eq!(back.freshness, freshness);
        assert_eq!(back.stamp.generation, 42);
        assert_eq!(back.stamp.versions, stamp.versions);
        assert!(back.age < Duration::from_secs(2));
        // Truncated, extended, another version: refused, never a panic.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_none());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_none());
        assert!(decode(b"GH2").is_none());
    }
}
