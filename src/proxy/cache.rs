//! The `cache` phase: GET and HEAD answered from the store when RFC 9111
//! allows it, concurrent misses of one key made one fetch, stale entries
//! revalidated with conditional requests, responses stored on the way back,
//! and writes invalidating what they change. The store and the RFC rules
//! live in `crate::cache`; this module speaks HTTP around them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};

use super::body::ProxyBody;
use super::error::ProxyError;
use super::identify::Caller;
use super::route::{RouteMetrics, wsgi_path};
use crate::cache::l2::{self, L2};
use crate::cache::policy::{self, NotStored, RequestDirectives, StoreRequest, Usable};
use crate::cache::{self as store, Cache, Entry, Lead, Turn};
use crate::config::{CacheConfig, Config, Route};

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// A cacheable request on its way to Gunicorn.
pub struct Plan {
    keyed: Keyed,
    route_ttl: Duration,
    route_stale: (Duration, Duration),
    /// Route tags and the URI's own tag.
    tags: Vec<String>,
    /// The client's request headers: `Vary` values and conditionals.
    request_headers: HeaderMap,
    generation: u64,
    request_time: SystemTime,
    /// A stored response being revalidated (or kept for `stale-if-error`).
    stale: Option<Arc<Entry>>,
    /// The gateway added validators of `stale` to the request.
    revalidating: bool,
    /// `fwd=request`: a usable entry existed but the request refused it.
    refused_by_request: bool,
    _lead: Option<Lead>,
    l2: Option<Arc<L2>>,
    /// L2's generation when the fetch began; `None`: not stored in L2.
    redis_generation: Option<u64>,
    /// The fetch lock across gateways, held until the entry is in L2.
    redis_lock: std::sync::Mutex<Option<RedisLock>>,
}

/// The fetch lock of a key in Redis; given back when dropped.
struct RedisLock {
    l2: Arc<L2>,
    key: String,
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (l2, key) = (Arc::clone(&self.l2), std::mem::take(&mut self.key));
            handle.spawn(async move { l2.unlock(&key).await });
        }
    }
}

/// With `cache.l2_lock`: take the key's lock in Redis, or, when another
/// gateway holds it, wait (within `limit`) until its entry is in L2 or the
/// lock is gone. `true`: waited, look again.
async fn wait_for_other_gateway(plan: &mut Plan, limit: Duration) -> bool {
    let Some(l2) = plan.l2.clone().filter(|l2| l2.available()) else {
        return false;
    };
    match l2.try_lock(&plan.keyed.key, limit).await {
        Ok(true) => {
            let lock = RedisLock {
                l2,
                key: plan.keyed.key.clone(),
            };
            *plan.redis_lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
            false
        }
        Ok(false) => {
            let deadline = tokio::time::Instant::now() + limit;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !l2.locked(&plan.keyed.key).await.unwrap_or(false) {
                    break;
                }
            }
            true
        }
        Err(_) => false,
    }
}

// Returned once per request and matched at once: boxing the answer would
// cost a hit an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Lookup {
    /// Not for the cache: forwarded as is. With a reason, say so in
    /// `Cache-Status`.
    Bypass(Option<&'static str>),
    /// Answered from the store; with `Some`, refresh it behind the answer.
    Answer(Response<ProxyBody>, Option<Box<Plan>>),
    Fetch(Box<Plan>),
}

/// What of the request the lookup reads.
pub struct Ask<'a> {
    pub config: &'a Config,
    pub route: Option<&'a Route>,
    /// The route's metrics (`default` when none matched).
    pub route_metrics: &'a RouteMetrics,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub path: &'a [u8],
    pub caller: &'a Caller,
}

/// Whether the request carries a credential: then a shared entry may not
/// answer it, nor may its response become one.
fn credentialed(config: &Config, headers: &HeaderMap) -> bool {
    if headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key(&config.identity.api_key_header)
    {
        return true;
    }
    // Django's session cookie, also when the gateway does not identify by it.
    let session = config
        .identity
        .session
        .as_ref()
        .map_or("sessionid", |s| s.cookie.as_str());
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|c| c.trim().split('=').next() == Some(session))
}

/// What a lookup reads off the request before it looks: the keys and the
/// client's directives.
pub struct Keyed {
    uri: String,
    key: String,
    head: bool,
    directives: RequestDirectives,
    credentialed: bool,
    per_user: bool,
}

/// The first half of the lookup, which never waits: the request bypasses
/// the cache, or is answered by a fresh L1 entry when there is no L2 whose
/// invalidations L1 would have to be checked against; else the keys for
/// [`lookup`]. A hit thus costs no boxed future.
pub fn lookup_local(cache: &Cache, ask: &Ask<'_>) -> Result<Lookup, Keyed> {
    let keyed = match keyed(ask) {
        Ok(keyed) => keyed,
        Err(reason) => return Ok(Lookup::Bypass(reason)),
    };
    if cache.has_l2() {
        return Err(keyed);
    }
    let Some((entry, false)) = cache.get(&keyed.key, ask.headers) else {
        return Err(keyed);
    };
    let age = entry.age();
    match policy::usable(age, &entry.freshness, &keyed.directives) {
        Usable::Fresh | Usable::StaleAccepted => {
            ask.route_metrics.count_cache_lookup("l1", "hit");
            Ok(Lookup::Answer(
                answer(
                    &entry,
                    age,
                    ask.headers,
                    keyed.head,
                    &hit_status(&entry, age, None),
                ),
                None,
            ))
        }
        Usable::StaleWhileRevalidate | Usable::Stale => Err(keyed),
    }
}

/// The keys of a request the cache may answer; `Err`: the request bypasses
/// it, silently (`None`) for a method or route it does not cover, else with
/// the reason.
fn keyed(ask: &Ask<'_>) -> Result<Keyed, Option<&'static str>> {
    let config = &ask.config.cache;
    let route_cache = ask.route.map(|r| &r.cache);
    if !config.enabled || route_cache.is_some_and(|c| !c.enabled) {
        return Err(None);
    }
    let head = match *ask.method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(None),
    };
    let bypass = |reason: &'static str| {
        ask.route_metrics.count_cache_lookup("none", "bypass");
        Err(Some(reason))
    };
    // Partial content is not combined from stored responses.
    if ask.headers.contains_key(header::RANGE) {
        return bypass("range");
    }
    let Some(host) = store::key::host(
        ask.headers,
        ask.uri.authority().map(|a| a.as_str()),
        &config.hosts,
    ) else {
        return bypass("host");
    };
    let per_user = route_cache.is_some_and(|c| c.per_user);
    let credentialed = credentialed(ask.config, ask.headers);
    let subject = match (credentialed, per_user) {
        (false, _) => None,
        // A shared entry must not answer for a user, nor a user's
        // response become one unless it says it may (checked on store).
        (true, false) => return bypass("credentials"),
        // A credential the gateway could not verify (a forged token is no
        // identity at all, the caller stays its address) gets nothing cached.
        (true, true) if ask.caller.within.is_some() || ask.caller.subject.starts_with("ip:") => {
            return bypass("unverified");
        }
        (true, true) => Some(ask.caller.subject.as_str()),
    };
    let uri = store::key::uri_key(
        &host,
        ask.path,
        ask.uri.query(),
        &config.ignore_query_params,
    );
    let key = store::key::primary_key(&uri, ask.headers, subject);
    Ok(Keyed {
        uri,
        key,
        head,
        directives: RequestDirectives::parse(ask.headers),
        credentialed,
        per_user,
    })
}

/// The lookup, after [`lookup_local`]: a fresh (or acceptable) stored
/// answer from L1 or L2, or the plan to fetch.
pub async fn lookup(cache: &Cache, ask: Ask<'_>, keyed: Keyed) -> Result<Lookup, ProxyError> {
    let config = &ask.config.cache;
    let route_cache = ask.route.map(|r| &r.cache);
    let head = keyed.head;
    let mut plan = Plan {
        keyed,
        route_ttl: ask
            .route
            .and_then(|r| r.cache_ttl)
            .unwrap_or(config.default_ttl),
        route_stale: (
            route_cache
                .and_then(|c| c.stale_while_revalidate)
                .unwrap_or(config.stale_while_revalidate),
            route_cache
                .and_then(|c| c.stale_if_error)
                .unwrap_or(config.stale_if_error),
        ),
        tags: Vec::new(),
        request_headers: HeaderMap::new(),
        generation: 0,
        // Set when a fetch or a refresh is planned, below; a hit never
        // reads it.
        request_time: SystemTime::UNIX_EPOCH,
        stale: None,
        revalidating: false,
        refused_by_request: false,
        _lead: None,
        l2: cache.l2(),
        redis_generation: None,
        redis_lock: std::sync::Mutex::new(None),
    };
    let mut waited = false;
    loop {
        if let Some((entry, purged, layer)) = find(
            cache,
            plan.l2.as_ref(),
            &plan.keyed.key,
            ask.headers,
            config.l1_ttl,
        )
        .await
        {
            let age = entry.age();
            let usable = if purged {
                Usable::Stale
            } else {
                policy::usable(age, &entry.freshness, &plan.keyed.directives)
            };
            match usable {
                Usable::Fresh | Usable::StaleAccepted => {
                    let detail = waited.then_some("coalesced");
                    ask.route_metrics.count_cache_lookup(layer, "hit");
                    return Ok(Lookup::Answer(
                        answer(
                            &entry,
                            age,
                            ask.headers,
                            head,
                            &hit_status(&entry, age, detail),
                        ),
                        None,
                    ));
                }
                Usable::StaleWhileRevalidate => {
                    ask.route_metrics.count_cache_lookup(layer, "stale");
                    let response = answer(
                        &entry,
                        age,
                        ask.headers,
                        head,
                        &hit_status(&entry, age, Some("stale-while-revalidate")),
                    );
                    // One refresh per key at a time; others just answer. A
                    // HEAD's request could not refresh a GET's entry.
                    let turn = (!head).then(|| cache.turn(&plan.keyed.key));
                    let refresh = match turn {
                        Some(Turn::Lead(lead)) => {
                            plan._lead = Some(lead);
                            plan.stale = Some(entry);
                            plan.request_headers = ask.headers.clone();
                            plan.tags = entry_tags(route_cache, ask.path, &plan.keyed.uri);
                            plan.generation = cache.tags.generation();
                            plan.redis_generation = redis_generation(&plan).await;
                            plan.request_time = SystemTime::now();
                            Some(Box::new(plan))
                        }
                        _ => None,
                    };
                    return Ok(Lookup::Answer(response, refresh));
                }
                Usable::Stale => {
                    plan.refused_by_request = plan.keyed.directives.no_cache
                        && !purged
                        && policy::usable(age, &entry.freshness, &RequestDirectives::default())
                            == Usable::Fresh;
                    plan.stale = Some(entry);
                }
            }
        }
        if plan.keyed.directives.only_if_cached {
            ask.route_metrics.count_cache_lookup("none", "miss");
            return Err(ProxyError::NotCached);
        }
        // A client that asks for a fresh copy gets its own fetch.
        if waited || plan.keyed.directives.no_cache {
            break;
        }
        match cache.turn(&plan.keyed.key) {
            Turn::Lead(lead) => {
                plan._lead = Some(lead);
                // Across gateways too, when configured: another one fetching
                // this key means waiting for its entry in L2, then one more look.
                if config.l2_lock && wait_for_other_gateway(&mut plan, config.lock_timeout).await {
                    waited = true;
                    continue;
                }
                break;
            }
            Turn::Wait(mut rx) => {
                // The fetching request ends (stored or not) or the wait
                // does; then look again, once.
                let _ = tokio::time::timeout(config.lock_timeout, rx.changed()).await;
                waited = true;
            }
        }
    }
    ask.route_metrics.count_cache_lookup(
        "none",
        if plan.stale.is_some() {
            "revalidate"
        } else {
            "miss"
        },
    );
    plan.request_headers = ask.headers.clone();
    plan.tags = entry_tags(route_cache, ask.path, &plan.keyed.uri);
    plan.generation = cache.tags.generation();
    plan.redis_generation = redis_generation(&plan).await;
    plan.request_time = SystemTime::now();
    Ok(Lookup::Fetch(Box::new(plan)))
}

/// The tags an entry fetched for this request carries: the route's, and
/// its URI's own.
fn entry_tags(
    route: Option<&crate::config::route::RouteCache>,
    path: &[u8],
    uri: &str,
) -> Vec<String> {
    let mut tags: Vec<String> = route
        .map(|c| {
            c.tags
                .iter()
                .map(|t| store::named_tag(&t.render(path)))
                .collect()
        })
        .unwrap_or_default();
    tags.push(store::uri_tag(uri));
    tags
}

/// L2's generation before a fetch, to tell whether a write overtook it.
async fn redis_generation(plan: &Plan) -> Option<u64> {
    plan.l2.as_ref()?.generation().await.ok()
}

/// The stored response for a request, with `true` when a soft purge made it
/// stale, and the layer it came from. L1 first, when it is known to have
/// every invalidation up to now (or Redis is down: L1 then stands alone);
/// else L2, whose entry is checked against the tag versions in Redis and
/// then kept in L1.
async fn find(
    cache: &Cache,
    l2: Option<&Arc<L2>>,
    key: &str,
    headers: &HeaderMap,
    l1_ttl: Duration,
) -> Option<(Arc<Entry>, bool, &'static str)> {
    if let Some((entry, purged)) = cache.get(key, headers) {
        let trusted = match l2 {
            None => true,
            // Also before this gateway follows the invalidation channel:
            // an entry fetched at Redis's generation now has missed nothing.
            Some(l2) => match l2.generation().await {
                Ok(generation) => l2.caught_up(generation) || entry.stamp.redis == Some(generation),
                Err(_) => true,
            },
        };
        if trusted {
            return Some((entry, purged, "l1"));
        }
    }
    let l2 = l2.filter(|l2| l2.available())?;
    let local = cache.tags.generation();
    let bytes = l2.get(key).await.ok()??;
    let Some(decoded) = l2::decode(&bytes) else {
        tracing::warn!("cache: an L2 entry could not be read; fetching again");
        return None;
    };
    if !decoded
        .vary
        .iter()
        .all(|(name, value)| store::key::vary_value(headers, name) == *value)
    {
        return None;
    }
    let tags: Vec<String> = decoded
        .stamp
        .versions
        .iter()
        .map(|(tag, _, _)| tag.clone())
        .collect();
    let now = l2.versions(&tags).await.ok()?;
    if now.floor > decoded.stamp.generation || now.tags.len() != tags.len() {
        return None;
    }
    let mut purged = false;
    for ((_, hard, soft), (now_hard, now_soft)) in decoded.stamp.versions.iter().zip(&now.tags) {
        if now_hard != hard {
            return None;
        }
        purged |= now_soft != soft;
    }
    let stamp = cache
        .tags
        .stamp(local, Some(decoded.stamp.generation), tags)?;
    let entry = Entry::restore(decoded, stamp, l1_ttl);
    let entry = if purged {
        Arc::new(entry)
    } else {
        cache.insert(key, entry)
    };
    Some((entry, purged, "l2"))
}

/// Keep a stored entry in L2 too, unless a write overtook its fetch.
fn store_l2(plan: &Plan, entry: Arc<Entry>, grace: Duration) {
    let (Some(l2), Some(since)) = (plan.l2.clone(), plan.redis_generation) else {
        return;
    };
    let key = plan.keyed.key.clone();
    // Given back once the entry is in L2 (or not to be), when dropped.
    let lock = plan
        .redis_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    tokio::spawn(async move {
        let _lock = lock;
        let tags: Vec<String> = entry
            .stamp
            .versions
            .iter()
            .map(|(tag, _, _)| tag.clone())
            .collect();
        let Ok(now) = l2.versions(&tags).await else {
            return;
        };
        if now.floor > since
            || now
                .tags
                .iter()
                .any(|(hard, soft)| *hard > since || *soft > since)
        {
            return;
        }
        let stamp = crate::cache::tags::Stamp {
            generation: since,
            versions: tags
                .into_iter()
                .zip(now.tags)
                .map(|(tag, (hard, soft))| (tag, hard, soft))
                .collect(),
            redis: None,
        };
        let bytes = l2::encode(&entry, &stamp);
        let _ = l2.put(&key, bytes, entry.l2_ttl(grace)).await;
    });
}

/// Add the stored response's validators to a revalidation, unless the
/// client made the request conditional itself.
pub fn add_validators(plan: &mut Plan, headers: &mut HeaderMap) {
    let Some(stale) = &plan.stale else {
        return;
    };
    if policy::is_conditional(headers) {
        return;
    }
    if let Some(etag) = stale.headers.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
        plan.revalidating = true;
    }
    if let Some(modified) = stale.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
        plan.revalidating = true;
    }
}

/// After the fetch: store what may be stored, answer a 304 to a
/// revalidation from the store, and stand in for an error with a stale
/// entry that allows it.
pub fn complete(
    cache: &Cache,
    config: &CacheConfig,
    mut plan: Plan,
    result: Result<Response<ProxyBody>, ProxyError>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            let Some(response) = stale_for_error(cache, &plan, None) else {
                return Err(error);
            };
            tracing::warn!(error = %error, "answering from the cache (stale-if-error)");
            return Ok(response);
        }
    };
    let status = response.status();
    if status.is_server_error() {
        if let Some(stale) = stale_for_error(cache, &plan, Some(status)) {
            return Ok(stale);
        }
    }
    let response_time = SystemTime::now();
    if status == StatusCode::NOT_MODIFIED && plan.revalidating {
        if let Some(stale) = plan.stale.take() {
            return Ok(revalidated(
                cache,
                config,
                &plan,
                &stale,
                response.headers(),
                response_time,
            ));
        }
    }
    let outcome = store(cache, config, &plan, &mut response, response_time);
    let fwd = match (&plan.stale, plan.refused_by_request) {
        (_, true) => "request",
        (Some(_), false) => "stale",
        (None, false) => "miss",
    };
    let value = match outcome {
        Ok(()) => format!(
            "gatehouse; fwd={fwd}; fwd-status={}; stored",
            status.as_u16()
        ),
        Err(reason) => format!(
            "gatehouse; fwd={fwd}; fwd-status={}; detail={}",
            status.as_u16(),
            reason.as_str()
        ),
    };
    set_status(response.headers_mut(), &value);
    Ok(response)
}

/// Store the response of `plan`'s fetch, if RFC 9111 and the route allow.
fn store(
    cache: &Cache,
    config: &CacheConfig,
    plan: &Plan,
    response: &mut Response<ProxyBody>,
    response_time: SystemTime,
) -> Result<(), NotStored> {
    let status = response.status();
    let header_tags = Cache::tag_names(response.headers(), &config.tag_header);
    response.headers_mut().remove(&config.tag_header);
    let method = if plan.keyed.head {
        Method::HEAD
    } else {
        Method::GET
    };
    let request = StoreRequest {
        method: &method,
        directives: &plan.keyed.directives,
        credentialed: plan.keyed.credentialed,
        per_user: plan.keyed.per_user,
    };
    let decided = policy::storable(
        &request,
        status,
        response.headers(),
        plan.route_ttl,
        plan.route_stale,
    )
    .and_then(|freshness| {
        let ProxyBody::Full(body) = response.body() else {
            return Err(NotStored::TooLarge);
        };
        let body = body.as_deref().unwrap_or_default();
        if body.len() > config.max_entry_size {
            return Err(NotStored::TooLarge);
        }
        // A copy of its own: the response's bytes may be a slice of a much
        // larger read buffer, which the entry would keep alive.
        Ok((freshness, Bytes::copy_from_slice(body)))
    });
    let (freshness, body) = match decided {
        Ok(decided) => decided,
        Err(reason) => {
            cache
                .metrics
                .not_stored
                .with_label_values(&[reason.as_str()])
                .inc();
            return Err(reason);
        }
    };
    let mut tags = plan.tags.clone();
    tags.extend(header_tags);
    // A write invalidated one of the tags since the fetch began: this
    // response may predate it. Not stored; the client still gets it.
    let Some(stamp) = cache
        .tags
        .stamp(plan.generation, plan.redis_generation, tags)
    else {
        cache
            .metrics
            .not_stored
            .with_label_values(&["raced-write"])
            .inc();
        return Ok(());
    };
    let mut headers = owned(response.headers());
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let vary = vary_values(&headers, &plan.request_headers);
    let entry = Entry::new(
        status,
        headers,
        body,
        freshness,
        vary,
        stamp,
        plan.request_time,
        response_time,
        config.l1_ttl,
    );
    let entry = cache.insert(&plan.keyed.key, entry);
    store_l2(plan, entry, config.l1_ttl);
    Ok(())
}

/// The header fields with values of their own: those parsed from
/// Gunicorn's answer are slices of the connection's read buffer, which an
/// entry would otherwise keep alive.
fn owned(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            out.append(name.clone(), value);
        }
    }
    // What described Gunicorn's connection is not part of the entry.
    super::headers::strip_hop_by_hop(&mut out);
    out
}

fn vary_values(response: &HeaderMap, request: &HeaderMap) -> Vec<(String, Option<String>)> {
    policy::vary_names(response)
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let value = store::key::vary_value(request, &name);
            (name, value)
        })
        .collect()
}

/// A 304 to the gateway's revalidation: the stored response, its header
/// fields updated from the 304 (RFC 9111 §4.3.4), stored again and served.
fn revalidated(
    cache: &Cache,
    config: &CacheConfig,
    plan: &Plan,
    stale: &Entry,
    fresh: &HeaderMap,
    response_time: SystemTime,
) -> Response<ProxyBody> {
    let mut headers = stale.headers.clone();
    let fresh = &owned(fresh);
    for name in fresh.keys() {
        if *name == header::CONTENT_LENGTH || *name == config.tag_header {
            continue;
        }
        headers.remove(name);
        for value in fresh.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let request = StoreRequest {
        method: &Method::GET,
        directives: &plan.keyed.directives,
        credentialed: plan.keyed.credentialed,
        per_user: plan.keyed.per_user,
    };
    let mut tags = plan.tags.clone();
    tags.extend(Cache::tag_names(fresh, &config.tag_header));
    let freshness = policy::storable(
        &request,
        stale.status,
        &headers,
        plan.route_ttl,
        plan.route_stale,
    );
    let status = "gatehouse; fwd=stale; fwd-status=304";
    match (
        freshness,
        cache
            .tags
            .stamp(plan.generation, plan.redis_generation, tags),
    ) {
        (Ok(freshness), Some(stamp)) => {
            let entry = Entry::new(
                stale.status,
                headers,
                stale.body.clone(),
                freshness,
                stale.vary.clone(),
                stamp,
                plan.request_time,
                response_time,
                config.l1_ttl,
            );
            let response = answer(
                &entry,
                entry.age(),
                &plan.request_headers,
                plan.keyed.head,
                &format!("{status}; stored"),
            );
            let entry = cache.insert(&plan.keyed.key, entry);
            store_l2(plan, entry, config.l1_ttl);
            response
        }
        _ => {
            // No longer storable, or a write raced: serve what was
            // revalidated without keeping it.
            let mut response = Response::new(if plan.keyed.head {
                ProxyBody::empty()
            } else {
                ProxyBody::full(stale.body.clone())
            });
            *response.status_mut() = stale.status;
            *response.headers_mut() = headers;
            set_status(response.headers_mut(), status);
            response
        }
    }
}

/// The stale entry standing in for an error, when `stale-if-error` allows.
fn stale_for_error(
    cache: &Cache,
    plan: &Plan,
    status: Option<StatusCode>,
) -> Option<Response<ProxyBody>> {
    let stale = plan.stale.as_ref()?;
    let age = stale.age();
    if !policy::usable_on_error(age, &stale.freshness)
        || cache.tags.validity(&stale.stamp) == crate::cache::tags::Validity::Gone
    {
        return None;
    }
    let mut value = String::from("gatehouse; fwd=stale");
    if let Some(status) = status {
        value.push_str(&format!("; fwd-status={}", status.as_u16()));
    }
    value.push_str("; detail=stale-if-error");
    Some(answer(
        stale,
        age,
        &plan.request_headers,
        plan.keyed.head,
        &value,
    ))
}

/// `Cache-Status` of an answer from the store, with its remaining freshness.
/// Written without the formatting machinery: this runs on every hit.
fn hit_status(entry: &Entry, age: Duration, detail: Option<&str>) -> String {
    let lifetime = i64::try_from(entry.freshness.lifetime.as_secs()).unwrap_or(i64::MAX);
    let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
    let mut value = String::with_capacity(64);
    value.push_str("gatehouse; hit; ttl=");
    value.push_str(itoa::Buffer::new().format(lifetime.saturating_sub(age)));
    if let Some(detail) = detail {
        value.push_str("; detail=");
        value.push_str(detail);
    }
    value
}

fn set_status(headers: &mut HeaderMap, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.append(CACHE_STATUS, value);
    }
}

/// Fields a 304 carries from the response it stands for (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// The answer from a stored response: a 304 when the client's conditional
/// request is satisfied, the headers only for HEAD, with `Age` and
/// `Cache-Status`.
/// `age` is the entry's, read once by the caller.
pub fn answer(
    entry: &Entry,
    age: Duration,
    request: &HeaderMap,
    head: bool,
    status: &str,
) -> Response<ProxyBody> {
    let mut response;
    if entry.status == StatusCode::OK && policy::not_modified(request, &entry.headers) {
        response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in NOT_MODIFIED_FIELDS {
            for value in entry.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
    } else {
        response = Response::new(if head {
            ProxyBody::empty()
        } else {
            ProxyBody::stored(&entry.body, entry.copy.as_ref())
        });
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
    }
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    set_status(headers, status);
    response
}

/// `Cache-Status` for a request the cache let through.
pub fn bypass_status(headers: &mut HeaderMap, reason: &str) {
    set_status(headers, &format!("gatehouse; fwd=bypass; detail={reason}"));
}

/// The request a write was made to: what it invalidates.
pub struct WriteTarget {
    host: String,
    uri: String,
    tags: Vec<String>,
}

impl WriteTarget {
    /// For an unsafe method, what it may invalidate; `None` otherwise.
    pub fn new(
        config: &Config,
        route: Option<&Route>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        path: &[u8],
    ) -> Option<WriteTarget> {
        if method.is_safe() {
            return None;
        }
        let cache = &config.cache;
        let host = store::key::host(headers, uri.authority().map(|a| a.as_str()), &cache.hosts)?;
        let tags = route
            .map(|r| {
                r.cache
                    .invalidates
                    .iter()
                    .map(|t| store::named_tag(&t.render(path)))
                    .collect()
            })
            .unwrap_or_default();
        Some(WriteTarget {
            uri: store::key::uri_key(&host, path, uri.query(), &cache.ignore_query_params),
            host,
            tags,
        })
    }

    /// RFC 9111 §4.4: after a write that may have changed something (any
    /// answer but a 4xx, which says nothing was done), the target URI, the
    /// same-host `Location` and `Content-Location`, the route's tags and
    /// the tags the application names are stale. Done before the client
    /// hears of the write.
    pub async fn invalidate(
        self,
        cache: &Cache,
        config: &CacheConfig,
        status: StatusCode,
        response: &mut HeaderMap,
    ) {
        let named = Cache::tag_names(response, &config.tag_header);
        response.remove(&config.tag_header);
        if status.is_client_error() {
            return;
        }
        let mut uris = Vec::with_capacity(3);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(uri) = response.get(&name).and_then(|v| self.same_host(v, config)) {
                uris.push(uri);
            }
        }
        uris.push(self.uri);
        for uri in &uris {
            cache.remove(uri);
        }
        let uri_tags: Vec<String> = uris.iter().map(|u| store::uri_tag(u)).collect();
        let mut tags = self.tags;
        tags.extend(named);
        cache
            .invalidate_shared(&[("uri", uri_tags), ("tag", tags)], false)
            .await;
    }

    /// The URI key of a `Location` on the same host; relative references
    /// other than absolute paths are left alone.
    fn same_host(&self, value: &HeaderValue, config: &CacheConfig) -> Option<String> {
        let text = value.to_str().ok()?;
        let uri: Uri = text.parse().ok()?;
        if let Some(authority) = uri.authority() {
            if crate::config::normalise_host(authority.as_str()) != self.host {
                return None;
            }
        } else if !text.starts_with('/') || text.starts_with("//") {
            return None;
        }
        let path = wsgi_path(uri.path()).ok()?;
        Some(store::key::uri_key(
            &self.host,
            &path,
            uri.query(),
            &config.ignore_query_params,
        ))
    }
}

/// Refresh a stale entry behind a `stale-while-revalidate` answer.
pub async fn refresh(
    shared: Arc<super::Shared>,
    live: Arc<super::Live>,
    worker: usize,
    mut request: Request<super::upstream::Outgoing>,
    mut plan: Box<Plan>,
) {
    add_validators(&mut plan, request.headers_mut());
    shared.cache.metrics.background_refreshes.inc();
    let upstreams = Arc::clone(&live.upstreams);
    let result = upstreams
        .forward(worker, request, &shared.metrics)
        .await
        .map(|f| f.response);
    if let Err(e) = complete(&shared.cache, &live.config.cache, *plan, result) {
        tracing::warn!(error = %e, "background refresh of a cached response failed");
    }
}
