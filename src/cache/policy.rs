//! RFC 9111 for a shared cache: the `Cache-Control` directives of requests
//! and responses, whether a response may be stored, how long it stays
//! fresh, its age, and whether a conditional request is answered by it.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

/// Delta-seconds beyond this are this (RFC 9111 §1.2.2).
const MAX_DELTA: u64 = 1 << 31;

/// One directive's argument: absent, a number, or something invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seconds {
    #[default]
    Absent,
    Valid(u64),
    /// Present without a valid number: the response counts as stale.
    Invalid,
}

impl Seconds {
    fn set(&mut self, value: Option<&str>) {
        // The first occurrence counts (RFC 9111 §4.2.1).
        if *self != Seconds::Absent {
            return;
        }
        *self = match value.map(parse_delta) {
            Some(Some(n)) => Seconds::Valid(n),
            _ => Seconds::Invalid,
        };
    }

    pub fn get(self) -> Option<u64> {
        match self {
            Seconds::Valid(n) => Some(n),
            Seconds::Invalid => Some(0),
            Seconds::Absent => None,
        }
    }
}

fn parse_delta(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits only: too many of them is only "very large".
    Some(text.parse::<u64>().unwrap_or(MAX_DELTA).min(MAX_DELTA))
}

/// The `Cache-Control` directives of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    pub max_age: Seconds,
    pub s_maxage: Seconds,
    pub stale_while_revalidate: Seconds,
    pub stale_if_error: Seconds,
}

impl ResponseDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = ResponseDirectives::default();
        for (name, value) in directives(headers) {
            match name.as_str() {
                "no-store" => d.no_store = true,
                // `no-cache="field"` and `private="field"` are allowed to
                // be treated as their unqualified forms; they are.
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "must-understand" => d.must_understand = true,
                "max-age" => d.max_age.set(value.as_deref()),
                "s-maxage" => d.s_maxage.set(value.as_deref()),
                "stale-while-revalidate" => d.stale_while_revalidate.set(value.as_deref()),
                "stale-if-error" => d.stale_if_error.set(value.as_deref()),
                _ => {}
            }
        }
        d
    }

    /// A stale copy may not be served without a successful revalidation
    /// (RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage != Seconds::Absent
    }
}

/// The `Cache-Control` directives of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    /// `Some(None)`: any staleness (`max-stale` without a value).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        let mut any = false;
        for (name, value) in directives(headers) {
            any = true;
            let number = value.as_deref().and_then(parse_delta);
            match name.as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                // An invalid value is the strictest one.
                "max-age" => d.max_age = d.max_age.or(Some(number.unwrap_or(0))),
                "max-stale" if d.max_stale.is_none() => {
                    d.max_stale = Some(value.map(|_| number.unwrap_or(0)));
                }
                "min-fresh" => d.min_fresh = d.min_fresh.or(Some(number.unwrap_or(MAX_DELTA))),
                _ => {}
            }
        }
        // `Pragma: no-cache` counts only without `Cache-Control` (RFC 9111 §5.4).
        if !any
            && headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    v.split(',')
                        .any(|p| p.trim().eq_ignore_ascii_case("no-cache"))
                })
        {
            d.no_cache = true;
        }
        d
    }
}

/// `(name, argument)` of every directive in every `Cache-Control` line;
/// names lower-cased, quoted arguments unquoted.
fn directives(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for line in headers.get_all(header::CACHE_CONTROL) {
        let text = String::from_utf8_lossy(line.as_bytes());
        for item in split_list(&text) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => {
                    let v = v.trim();
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .map_or_else(|| v.to_string(), |q| q.replace('\\', ""));
                    (n, Some(v))
                }
                None => (item, None),
            };
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                out.push((name, value));
            }
        }
    }
    out
}

/// Split a comma-separated list, keeping commas inside quoted strings.
fn split_list(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(text[start..].trim());
    items.retain(|s| !s.is_empty());
    items
}

/// Statuses cacheable by default, which heuristic freshness (here: the
/// route's TTL) may apply to (RFC 9110 §15.1). 206 is left out: the gateway
/// does not combine partial responses.
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses whose meaning the gateway knows well enough to store a
/// response with them (`must-understand`, RFC 9111 §5.2.2.3).
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 303 | 307 | 410)
}

/// Why a response is not stored; the `Cache-Status` `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    SetCookie,
    VaryStar,
    Credentials,
    NoFreshness,
    TooLarge,
}

impl NotStored {
    pub const ALL: [NotStored; 9] = [
        NotStored::Method,
        NotStored::Status,
        NotStored::NoStore,
        NotStored::Private,
        NotStored::SetCookie,
        NotStored::VaryStar,
        NotStored::Credentials,
        NotStored::NoFreshness,
        NotStored::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::SetCookie => "set-cookie",
            NotStored::VaryStar => "vary-star",
            NotStored::Credentials => "credentials",
            NotStored::NoFreshness => "no-freshness",
            NotStored::TooLarge => "too-large",
        }
    }
}

/// What the request contributes to the decision to store.
pub struct StoreRequest<'a> {
    pub method: &'a Method,
    pub directives: &'a RequestDirectives,
    /// The request carried `Authorization`, a session cookie or an API key.
    pub credentialed: bool,
    /// The route caches per verified user.
    pub per_user: bool,
}

/// How long a stored response stays fresh and what it allows after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub forbids_stale: bool,
}

/// RFC 9111 §3: may this response be stored, and if so, how fresh is it.
/// `route_ttl` is the freshness of a response that states none; the route's
/// stale allowances apply when the response gives none.
pub fn storable(
    request: &StoreRequest<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    route_ttl: Duration,
    route_stale: (Duration, Duration),
) -> Result<Freshness, NotStored> {
    if *request.method != Method::GET {
        return Err(NotStored::Method);
    }
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStored::Status);
    }
    let d = ResponseDirectives::parse(headers);
    if d.must_understand {
        if !understood(status) {
            return Err(NotStored::Status);
        }
    } else if d.no_store {
        return Err(NotStored::NoStore);
    }
    if request.directives.no_store {
        return Err(NotStored::NoStore);
    }
    if d.private {
        return Err(NotStored::Private);
    }
    // Another client would be sent this cookie (nginx stopped storing these).
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if vary_names(headers).is_none() {
        return Err(NotStored::VaryStar);
    }
    // RFC 9111 §3.5, and the same for a session cookie or API key.
    if request.credentialed
        && !request.per_user
        && !(d.public || d.must_revalidate || d.s_maxage != Seconds::Absent)
    {
        return Err(NotStored::Credentials);
    }
    let explicit = d
        .s_maxage
        .get()
        .or(d.max_age.get())
        .map(Duration::from_secs)
        .or_else(|| expires_lifetime(headers));
    let lifetime = match explicit {
        Some(lifetime) => lifetime,
        None if heuristically_cacheable(status) || d.public => route_ttl,
        None => return Err(NotStored::NoFreshness),
    };
    let lifetime = if d.no_cache { Duration::ZERO } else { lifetime };
    let stale = |s: Seconds, route: Duration| s.get().map_or(route, Duration::from_secs);
    let freshness = Freshness {
        lifetime,
        stale_while_revalidate: stale(d.stale_while_revalidate, route_stale.0),
        stale_if_error: stale(d.stale_if_error, route_stale.1),
        forbids_stale: d.forbids_stale() || d.no_cache,
    };
    // A response stale at once is worth keeping only to revalidate it.
    if lifetime.is_zero() && !has_validators(headers) {
        return Err(NotStored::NoFreshness);
    }
    Ok(freshness)
}

/// `Expires` minus `Date`; an `Expires` that is not a date means "already
/// expired" (RFC 9111 §5.3).
fn expires_lifetime(headers: &HeaderMap) -> Option<Duration> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

pub fn has_validators(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// The lower-cased field names a response varies on; `None` for `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for line in headers.get_all(header::VARY) {
        for name in String::from_utf8_lossy(line.as_bytes()).split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return None;
            }
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort();
    Some(names)
}

/// The age a response had when it arrived (RFC 9111 §4.2.3):
/// `corrected_initial_age`.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let date = headers.get(header::DATE).and_then(http_date);
    let apparent = date
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_delta(v.trim()))
        .map_or(Duration::ZERO, Duration::from_secs);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent.max(age_value + delay)
}

/// Whether a stored response with this `age` and freshness satisfies the
/// request's directives without going to Gunicorn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    Fresh,
    /// Stale, but the client accepts it (`max-stale`).
    StaleAccepted,
    /// Stale within `stale-while-revalidate`: serve, refresh behind.
    StaleWhileRevalidate,
    /// Must be revalidated (or fetched) first.
    Stale,
}

pub fn usable(age: Duration, f: &Freshness, request: &RequestDirectives) -> Usable {
    if request.no_cache {
        return Usable::Stale;
    }
    if request
        .max_age
        .is_some_and(|max| age > Duration::from_secs(max))
    {
        return Usable::Stale;
    }
    let remaining = f.lifetime.saturating_sub(age);
    if age < f.lifetime {
        if request
            .min_fresh
            .is_some_and(|min| remaining < Duration::from_secs(min))
        {
            return Usable::Stale;
        }
        return Usable::Fresh;
    }
    if f.forbids_stale {
        return Usable::Stale;
    }
    let staleness = age - f.lifetime;
    match request.max_stale {
        Some(None) => return Usable::StaleAccepted,
        Some(Some(max)) if staleness <= Duration::from_secs(max) => {
            return Usable::StaleAccepted;
        }
        _ => {}
    }
    if request.min_fresh.is_none() && staleness < f.stale_while_revalidate {
        return Usable::StaleWhileRevalidate;
    }
    Usable::Stale
}

/// Whether a stale response may stand in for an error from Gunicorn.
pub fn usable_on_error(age: Duration, f: &Freshness) -> bool {
    !f.forbids_stale && age.saturating_sub(f.lifetime) < f.stale_if_error
}

/// RFC 9110 §13.1: whether the client's conditional request is satisfied
/// by the stored response's validators, so it gets a 304.
pub fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(tags) = joined(request, header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let tags = tags.trim();
        if tags == "*" {
            return true;
        }
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let etag = weak(etag);
        return tags.split(',').any(|t| weak(t) == etag);
    }
    let Some(since) = request.get(header::IF_MODIFIED_SINCE).and_then(http_date) else {
        return false;
    };
    let modified = stored
        .get(header::LAST_MODIFIED)
        .or_else(|| stored.get(header::DATE))
        .and_then(http_date);
    modified.is_some_and(|m| m <= since)
}

fn joined(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let text = String::from_utf8_lossy(v.as_bytes());
        match &mut out {
            Some(s) => {
                s.push(',');
                s.push_str(&text);
            }
            None => out = Some(text.into_owned()),
        }
    }
    out
}

/// Whether the request is conditional on validators (a 304 may answer it).
pub fn is_conditional(request: &HeaderMap) -> bool {
    request.contains_key(header::IF_NONE_MATCH) || request.contains_key(header::IF_MODIFIED_SINCE)
}

#[cfg(test)]
mod tests;
