//! The response cache's store, apart from HTTP handling: entries and their
//! variants in L1 (moka, in this process; a large body also in a memory
//! file, `net::FileCopy`, sent without a copy), tag versions for invalidation,
//! and the per-key locks that make concurrent misses one upstream request.
//! The gateway's `cache` phase (`proxy::cache`) decides what to look up,
//! store and invalidate; [`policy`] holds RFC 9111, [`key`] the keys.

pub mod key;
pub mod l2;
pub mod policy;
pub mod tags;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::net::FileCopy;
use policy::Freshness;
use tags::{Stamp, TagVersions, Validity};

/// Variants kept per key (per `Vary` combination); past this the oldest goes.
const MAX_VARIANTS: usize = 16;
/// An L1 body this large is also kept in a memory file, sent from there
/// without a copy (nginx's `sendfile`): it saves more than the second copy
/// of the bytes costs. Smaller ones are cheaper to copy than to send apart
/// from their head.
const FILE_COPY_MIN: usize = 48 * 1024;

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// As sent to clients, without hop-by-hop or internal fields and without
    /// `Age`, which is computed per answer.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the response arrived (monotonic).
    pub stored: Instant,
    /// Its age then (RFC 9111 §4.2.3 `corrected_initial_age`).
    pub initial_age: Duration,
    pub freshness: Freshness,
    /// The request headers `Vary` names, as they were when stored.
    pub vary: Vec<(String, Option<String>)>,
    pub stamp: Stamp,
    /// How long L1 keeps it.
    pub keep: Duration,
    /// The body in a memory file, for an L1 entry of `FILE_COPY_MIN` or more.
    pub copy: Option<Arc<FileCopy>>,
    size: usize,
}

impl Entry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        freshness: Freshness,
        vary: Vec<(String, Option<String>)>,
        stamp: Stamp,
        request_time: SystemTime,
        response_time: SystemTime,
        l1_ttl: Duration,
    ) -> Entry {
        let initial_age = policy::initial_age(&headers, request_time, response_time);
        headers.remove(header::AGE);
        // RFC 9110 §6.6.1: a cache stores a response without `Date` with
        // the time it arrived, so the age it reports stays consistent.
        if !headers.contains_key(header::DATE) {
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(response_time)) {
                headers.insert(header::DATE, date);
            }
        }
        Self::build(
            status,
            headers,
            body,
            freshness,
            vary,
            stamp,
            initial_age,
            l1_ttl,
        )
    }

    /// An entry read from L2, `age` old now, stamped with this process's
    /// tag versions.
    pub fn restore(decoded: l2::Decoded, stamp: Stamp, l1_ttl: Duration) -> Entry {
        Self::build(
            decoded.status,
            decoded.headers,
            decoded.body,
            decoded.freshness,
            decoded.vary,
            stamp,
            decoded.age,
            l1_ttl,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        freshness: Freshness,
        vary: Vec<(String, Option<String>)>,
        stamp: Stamp,
        initial_age: Duration,
        l1_ttl: Duration,
    ) -> Entry {
        let keep = l1_ttl.min(Self::worth_keeping(
            &headers,
            &freshness,
            initial_age,
            l1_ttl,
        ));
        let size = body.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + stamp
                .versions
                .iter()
                .map(|(t, _, _)| t.len() + 24)
                .sum::<usize>()
            + 256;
        Entry {
            status,
            headers,
            body,
            stored: Instant::now(),
            initial_age,
            freshness,
            vary,
            stamp,
            keep,
            copy: None,
            size,
        }
    }

    /// How long from now a response of this age stays worth keeping: while
    /// fresh, then while it may be served stale, or (with validators) for
    /// `grace` more to be revalidated.
    fn worth_keeping(
        headers: &HeaderMap,
        freshness: &Freshness,
        age: Duration,
        grace: Duration,
    ) -> Duration {
        let stale = if policy::has_validators(headers) {
            grace.max(
                freshness
                    .stale_while_revalidate
                    .max(freshness.stale_if_error),
            )
        } else {
            freshness
                .stale_while_revalidate
                .max(freshness.stale_if_error)
        };
        freshness.lifetime.saturating_sub(age).saturating_add(stale)
    }

    /// How long L2 keeps it (Redis caps it at `l2_max_ttl`).
    pub fn l2_ttl(&self, grace: Duration) -> Duration {
        Self::worth_keeping(&self.headers, &self.freshness, self.age(), grace)
    }

    /// RFC 9111 §4.2.3 `current_age`.
    pub fn age(&self) -> Duration {
        self.initial_age + self.stored.elapsed()
    }

    fn expired(&self) -> bool {
        self.stored.elapsed() >= self.keep
    }

    /// Whether this variant was stored for a request with these headers.
    pub fn selected_by(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| key::vary_value(request, name) == *value)
    }
}

/// The variants stored under one key.
struct Slot {
    variants: Vec<Arc<Entry>>,
}

impl Slot {
    fn size(&self) -> usize {
        self.variants.iter().map(|e| e.size).sum()
    }

    fn keep(&self) -> Duration {
        self.variants
            .iter()
            .map(|e| e.keep.saturating_sub(e.stored.elapsed()))
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// L1's expiry: each key lives as long as its longest-lived variant.
struct SlotExpiry;

impl moka::Expiry<Arc<str>, Arc<Slot>> for SlotExpiry {
    fn expire_after_create(&self, _: &Arc<str>, slot: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(slot.keep())
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        slot: &Arc<Slot>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.keep())
    }
}

/// L1 with the limits it was built with.
struct L1 {
    cache: moka::sync::Cache<Arc<str>, Arc<Slot>>,
    limits: (u64, u64),
}

impl L1 {
    /// Bounded by entries and by bytes at once: each entry weighs one unit
    /// per `max_bytes / max_entries` bytes (at least one), and the capacity
    /// is `max_entries` units.
    fn new(max_entries: u64, max_bytes: u64, metrics: &CacheMetrics) -> L1 {
        let unit = (max_bytes / max_entries.max(1)).max(1);
        let evictions = metrics.evictions.clone();
        let bytes = metrics.l1_bytes.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            .weigher(move |_: &Arc<str>, slot: &Arc<Slot>| {
                let size = u64::try_from(slot.size()).unwrap_or(u64::MAX);
                u32::try_from(size.div_ceil(unit).max(1)).unwrap_or(u32::MAX)
            })
            .expire_after(SlotExpiry)
            .eviction_listener(move |_, slot: Arc<Slot>, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
                bytes.sub(i64::try_from(slot.size()).unwrap_or(0));
            })
            .build();
        L1 {
            cache,
            limits: (max_entries, max_bytes),
        }
    }
}

/// The cache's own metrics (`/metrics/json .cache`).
#[derive(Clone)]
pub struct CacheMetrics {
    /// `{route, layer, result}`: result hit, stale (served stale), revalidate
    /// (fetched with validators), miss, bypass (credentials, range, host).
    pub lookups: IntCounterVec,
    pub stores: IntCounter,
    /// `{reason}`: why a response was not stored.
    pub not_stored: IntCounterVec,
    pub evictions: IntCounter,
    /// `{kind}`: uri, tag, purge, all.
    pub invalidations: IntCounterVec,
    pub coalesced_waits: IntCounter,
    pub background_refreshes: IntCounter,
    pub l1_entries: IntGauge,
    pub l1_bytes: IntGauge,
    /// L1 bodies also held in a memory file, sent without a copy.
    pub l1_files: IntGauge,
    /// Bytes of those bodies sent from their files.
    pub l1_file_sent: IntCounter,
    /// `{op}`: Redis calls of L2 that failed or timed out.
    pub l2_errors: IntCounterVec,
    /// 1 while L2's Redis answers.
    pub l2_up: IntGauge,
    /// 1 while this gateway follows the invalidation channel.
    pub l2_following: IntGauge,
    /// Each L2 call to Redis, answered or not.
    pub l2_duration: prometheus::Histogram,
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("gatehouse");
        let m = CacheMetrics {
            lookups: IntCounterVec::new(
                opts(
                    "cache_lookups_total",
                    "Cacheable requests by route, layer and result",
                ),
                &["route", "layer", "result"],
            )?,
            stores: IntCounter::with_opts(opts("cache_stores_total", "Responses stored"))?,
            not_stored: IntCounterVec::new(
                opts(
                    "cache_not_stored_total",
                    "Responses to cacheable requests not stored, by reason",
                ),
                &["reason"],
            )?,
            evictions: IntCounter::with_opts(opts(
                "cache_evictions_total",
                "L1 entries evicted for room",
            ))?,
            invalidations: IntCounterVec::new(
                opts(
                    "cache_invalidations_total",
                    "Invalidations by kind (uri, tag, purge, all)",
                ),
                &["kind"],
            )?,
            coalesced_waits: IntCounter::with_opts(opts(
                "cache_coalesced_waits_total",
                "Requests that waited for another request's fetch of the same key",
            ))?,
            background_refreshes: IntCounter::with_opts(opts(
                "cache_background_refreshes_total",
                "Refreshes made behind a stale-while-revalidate answer",
            ))?,
            l1_entries: IntGauge::with_opts(opts("cache_l1_entries", "Keys held in L1"))?,
            l1_bytes: IntGauge::with_opts(opts("cache_l1_bytes", "Bytes held in L1"))?,
            l1_files: IntGauge::with_opts(opts(
                "cache_l1_files",
                "L1 bodies also held in a memory file and sent from it without a copy",
            ))?,
            l1_file_sent: IntCounter::with_opts(opts(
                "cache_l1_file_sent_bytes_total",
                "Bytes of L1 bodies sent from their memory files",
            ))?,
            l2_errors: IntCounterVec::new(
                opts(
                    "cache_l2_errors_total",
                    "L2 Redis calls that failed or timed out, by operation",
                ),
                &["op"],
            )?,
            l2_up: IntGauge::with_opts(opts("cache_l2_up", "1 while L2's Redis answers"))?,
            l2_following: IntGauge::with_opts(opts(
                "cache_l2_following",
                "1 while this gateway follows the other gateways' invalidations; \
                 while 0, L1 answers only what was fetched since the last one",
            ))?,
            l2_duration: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "cache_l2_duration_seconds",
                    "Each L2 call to Redis",
                )
                .namespace("gatehouse")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ]),
            )?,
        };
        registry.register(Box::new(m.lookups.clone()))?;
        registry.register(Box::new(m.stores.clone()))?;
        registry.register(Box::new(m.not_stored.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.invalidations.clone()))?;
        registry.register(Box::new(m.coalesced_waits.clone()))?;
        registry.register(Box::new(m.background_refreshes.clone()))?;
        registry.register(Box::new(m.l1_entries.clone()))?;
        registry.register(Box::new(m.l1_bytes.clone()))?;
        registry.register(Box::new(m.l1_files.clone()))?;
        registry.register(Box::new(m.l1_file_sent.clone()))?;
        registry.register(Box::new(m.l2_errors.clone()))?;
        registry.register(Box::new(m.l2_up.clone()))?;
        registry.register(Box::new(m.l2_following.clone()))?;
        registry.register(Box::new(m.l2_duration.clone()))?;
        // Every reason reads 0 until it first happens, so a rate over it exists.
        for reason in policy::NotStored::ALL {
            m.not_stored.with_label_values(&[reason.as_str()]);
        }
        Ok(m)
    }
}

/// Whether a request fetches a key itself or waits for the one that does.
pub enum Turn {
    Lead(Lead),
    Wait(watch::Receiver<()>),
}

/// Held while fetching a key; dropping it (stored, not stored, failed or
/// cancelled) lets the waiters look again.
pub struct Lead {
    locks: Arc<Mutex<HashMap<Arc<str>, watch::Sender<()>>>>,
    key: Arc<str>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Dropping the sender wakes every waiter.
        locks.remove(&self.key);
    }
}

/// The store: L1, tag versions and fetch locks, shared by every worker and
/// kept across reloads.
pub struct Cache {
    l1: ArcSwap<L1>,
    /// L2 and the settings it was built with; `None` without Redis.
    l2: ArcSwapOption<(String, Arc<l2::L2>)>,
    pub tags: TagVersions,
    locks: Arc<Mutex<HashMap<Arc<str>, watch::Sender<()>>>>,
    pub metrics: CacheMetrics,
}

impl Cache {
    pub fn new(config: &CacheConfig, registry: &Registry) -> Result<Cache, prometheus::Error> {
        let metrics = CacheMetrics::new(registry)?;
        Ok(Cache {
            l1: ArcSwap::from_pointee(L1::new(
                config.l1_max_entries,
                config.l1_max_bytes,
                &metrics,
            )),
            tags: TagVersions::default(),
            locks: Arc::default(),
            metrics,
            l2: ArcSwapOption::empty(),
        })
    }

    /// Whether an L2 is in use, without taking a reference to it.
    pub fn has_l2(&self) -> bool {
        self.l2.load().is_some()
    }

    /// L2, when Redis is configured.
    pub fn l2(&self) -> Option<Arc<l2::L2>> {
        self.l2.load().as_ref().map(|pair| Arc::clone(&pair.1))
    }

    /// Use L2 in `redis` (or none); kept when the settings did not change.
    /// Returns a new L2 whose invalidation channel must be followed.
    pub fn set_l2(
        &self,
        redis: Option<&crate::config::RedisConfig>,
        config: &CacheConfig,
    ) -> Option<Arc<l2::L2>> {
        let Some(redis) = redis.filter(|_| config.enabled && config.l2) else {
            self.l2.store(None);
            return None;
        };
        let settings = format!(
            "{} {:?} {} {:?} {:?}",
            redis.url,
            redis.cluster_nodes,
            config.key_prefix,
            config.redis_timeout,
            config.l2_max_ttl
        );
        if let Some(current) = self.l2.load().as_ref() {
            if current.0 == settings {
                return None;
            }
        }
        match l2::L2::new(redis, config, &self.metrics) {
            Ok(l2) => {
                let l2 = Arc::new(l2);
                self.l2.store(Some(Arc::new((settings, Arc::clone(&l2)))));
                self.metrics.l2_up.set(1);
                Some(l2)
            }
            Err(e) => {
                tracing::error!(error = %e, "cache: redis client; L1 only");
                self.l2.store(None);
                None
            }
        }
    }

    /// Whether `l2` is still the one in use (its subscriber stops otherwise).
    pub fn uses(&self, l2: &Arc<l2::L2>) -> bool {
        self.l2().is_some_and(|current| Arc::ptr_eq(&current, l2))
    }

    /// Empty L1: what it holds may have missed invalidations.
    pub fn clear_local(&self) {
        self.tags.bump_all();
        self.l1.load().cache.invalidate_all();
    }

    /// Drop from L1 what was fetched before Redis's generation `redis`
    /// (see [`tags::TagVersions::resync`]); what it drops is refused on
    /// lookup and ages out.
    pub fn resync_local(&self, redis: u64) {
        self.tags.resync(redis);
    }

    /// Apply tags another gateway invalidated.
    pub fn tags_bump(&self, tags: &[&str], soft: bool) {
        self.tags.bump_in(tags.iter().copied(), soft);
    }

    /// Follow a reload: new L1 limits start an empty L1.
    pub fn reconfigure(&self, config: &CacheConfig) {
        let limits = (config.l1_max_entries, config.l1_max_bytes);
        if self.l1.load().limits != limits {
            tracing::info!(
                entries = limits.0,
                bytes = limits.1,
                "cache: new L1 limits; starting it empty"
            );
            let old = self
                .l1
                .swap(Arc::new(L1::new(limits.0, limits.1, &self.metrics)));
            old.cache.invalidate_all();
        }
    }

    /// The variant of `key` stored for a request with `request`'s headers,
    /// if it is still held and no write invalidated it; `true` with it when
    /// a soft purge made it stale.
    pub fn get(&self, key: &str, request: &HeaderMap) -> Option<(Arc<Entry>, bool)> {
        let l1 = self.l1.load();
        if l1.limits.0 == 0 {
            return None;
        }
        let slot = l1.cache.get(key)?;
        let entry = slot
            .variants
            .iter()
            .find(|e| !e.expired() && e.selected_by(request))?;
        match self.tags.validity(&entry.stamp) {
            Validity::Current => Some((Arc::clone(entry), false)),
            Validity::Stale => Some((Arc::clone(entry), true)),
            Validity::Gone => None,
        }
    }

    /// Store `entry` under `key`, replacing the variant it matches.
    pub fn insert(&self, key: &str, mut entry: Entry) -> Arc<Entry> {
        let l1 = self.l1.load();
        if entry.keep.is_zero() || l1.limits.0 == 0 {
            return Arc::new(entry);
        }
        if entry.body.len() >= FILE_COPY_MIN {
            entry.copy = FileCopy::new(&entry.body);
            if entry.copy.is_some() {
                entry.size += entry.body.len();
            }
        }
        let entry = Arc::new(entry);
        let key: Arc<str> = Arc::from(key);
        let mut variants: Vec<Arc<Entry>> = l1
            .cache
            .get(&key)
            .map(|slot| {
                slot.variants
                    .iter()
                    .filter(|v| !v.expired() && v.vary != entry.vary)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if variants.len() >= MAX_VARIANTS {
            variants.remove(0);
        }
        variants.push(Arc::clone(&entry));
        let slot = Slot { variants };
        self.metrics
            .l1_bytes
            .add(i64::try_from(slot.size()).unwrap_or(0));
        l1.cache.insert(key, Arc::new(slot));
        self.metrics.stores.inc();
        entry
    }

    /// Drop what `key` holds (memory only: versions decide what is served).
    pub fn remove(&self, key: &str) {
        self.l1.load().cache.invalidate(key);
    }

    /// Invalidate `tags` everywhere in this process; `soft`: entries stay,
    /// stale (revalidated before use, still good for `stale-if-error`).
    pub fn invalidate<'a>(&self, kind: &str, tags: impl IntoIterator<Item = &'a str>, soft: bool) {
        let mut n = 0;
        self.tags
            .bump_in(tags.into_iter().inspect(|_| n += 1), soft);
        self.metrics
            .invalidations
            .with_label_values(&[kind])
            .inc_by(n);
    }

    /// Invalidate in this process and, through L2, in every gateway: each
    /// `(kind, tags)` group counted under its kind. Returns once Redis has
    /// the new versions (or has failed: then only this process knows, and
    /// L2 drops everything older once Redis answers again).
    pub async fn invalidate_shared(&self, groups: &[(&str, Vec<String>)], soft: bool) {
        let mut all = Vec::new();
        for (kind, tags) in groups {
            self.invalidate(kind, tags.iter().map(String::as_str), soft);
            all.extend(tags.iter().cloned());
        }
        if all.is_empty() {
            return;
        }
        if let Some(l2) = self.l2() {
            if let Err(e) = l2.bump(&all, soft).await {
                // The outage itself is logged once, where it is noticed.
                tracing::debug!(error = %e, "cache: invalidation not written to redis; other gateways learn of it when it answers again");
            }
        }
    }

    /// Forget everything stored, here and (through L2) in every gateway.
    pub async fn clear(&self) {
        self.clear_local();
        self.metrics.invalidations.with_label_values(&["all"]).inc();
        if let Some(l2) = self.l2() {
            if let Err(e) = l2.raise_floor().await {
                tracing::warn!(error = %e, "cache: could not drop the L2 entries");
            }
        }
    }

    /// Become the one request that fetches `key`, or wait for it.
    pub fn turn(&self, key: &str) -> Turn {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = locks.get(key) {
            self.metrics.coalesced_waits.inc();
            return Turn::Wait(sender.subscribe());
        }
        let key: Arc<str> = Arc::from(key);
        locks.insert(Arc::clone(&key), watch::channel(()).0);
        Turn::Lead(Lead {
            locks: Arc::clone(&self.locks),
            key,
        })
    }

    /// Refresh the gauges before a scrape.
    pub fn observe(&self) {
        let l1 = self.l1.load();
        l1.cache.run_pending_tasks();
        self.metrics
            .l1_entries
            .set(i64::try_from(l1.cache.entry_count()).unwrap_or(i64::MAX));
        self.metrics
            .l1_files
            .set(i64::try_from(crate::net::memory_files()).unwrap_or(i64::MAX));
        let sent = crate::net::sent_from_files();
        self.metrics
            .l1_file_sent
            .inc_by(sent.saturating_sub(self.metrics.l1_file_sent.get()));
    }

    /// `/metrics/json .cache`: totals and hit ratios, overall, by route
    /// and by layer, beside the raw counters.
    pub fn summary(&self, config: &CacheConfig) -> serde_json::Value {
        use prometheus::core::Collector;
        self.observe();
        #[derive(Default)]
        struct Tally {
            hits: u64,
            stale: u64,
            misses: u64,
            bypass: u64,
        }
        let ratio = |t: &Tally| {
            let looked = t.hits + t.stale + t.misses;
            if looked == 0 {
                0.0
            } else {
                (t.hits + t.stale) as f64 / looked as f64
            }
        };
        let mut total = Tally::default();
        let mut routes: std::collections::BTreeMap<String, Tally> = Default::default();
        let mut layers: std::collections::BTreeMap<String, u64> = Default::default();
        for family in self.metrics.lookups.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                // Counters hold whole numbers.
                let n = metric.get_counter().get_value() as u64;
                let route = routes.entry(label("route")).or_default();
                for tally in [&mut total, route] {
                    match label("result").as_str() {
                        "hit" => tally.hits += n,
                        "stale" => tally.stale += n,
                        // A revalidation went to Gunicorn too.
                        "miss" | "revalidate" => tally.misses += n,
                        _ => tally.bypass += n,
                    }
                }
                if label("result") == "hit" {
                    *layers.entry(label("layer")).or_default() += n;
                }
            }
        }
        let tally_json = |t: &Tally| {
            serde_json::json!({
                "hits": t.hits,
                "stale": t.stale,
                "misses": t.misses,
                "bypassed": t.bypass,
                "hit_ratio": ratio(t),
            })
        };
        let mut out = tally_json(&total);
        let l1 = self.l1.load();
        out["enabled"] = config.enabled.into();
        out["by_route"] = routes
            .iter()
            .map(|(name, t)| (name.clone(), tally_json(t)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        out["hits_by_layer"] = serde_json::json!(layers);
        out["l1"] = serde_json::json!({
            "entries": l1.cache.entry_count(),
            "bytes": self.metrics.l1_bytes.get(),
            "files": crate::net::memory_files(),
            "max_entries": l1.limits.0,
            "max_bytes": l1.limits.1,
            "evictions": self.metrics.evictions.get(),
        });
        out["coalesced_waits"] = self.metrics.coalesced_waits.get().into();
        out
    }

    /// The header that carries Django's tags (removed before clients see it).
    pub fn tag_names(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([' ', ',']))
            .filter(|t| !t.is_empty())
            .map(|t| format!("tag:{t}"))
            .collect()
    }
}

/// The tag every entry of a URI carries: invalidating it reaches every
/// variant and every user's copy.
pub fn uri_tag(uri_key: &str) -> String {
    format!("uri:{uri_key}")
}

/// A route or header tag as stored.
pub fn named_tag(tag: &str) -> String {
    format!("tag:{tag}")
}
