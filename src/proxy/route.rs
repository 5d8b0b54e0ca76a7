//! The `route` phase: match a request to one route of the table, once. The
//! match is made on the path as the WSGI server will hand it to Django
//! (percent-decoded, `%2F` included), so an encoded path reaches no view that
//! its route does not cover (Envoy CVE-2019-9901). The matched route carries
//! everything later phases need: its name, its limits, its cache TTL.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use http::Method;

use crate::config::Route;
use crate::telemetry::Metrics;

/// The name of requests no route matches.
pub const DEFAULT_ROUTE: &str = "default";

/// The routes of one configuration generation, most specific first.
pub struct RouteTable {
    /// Patterns first in file order, then prefixes longest first; at equal
    /// paths a route naming methods before one for all.
    routes: Vec<Route>,
    /// Per route, in the same order, then one for `default`: the name (shared
    /// with the access-log records) and the request metrics, looked up once.
    metrics: Vec<RouteMetrics>,
}

/// One route's request metrics: its duration histogram, and its request
/// counters by method and status class, each made on first use so that
/// only combinations that happened appear in `/metrics`.
pub struct RouteMetrics {
    name: Arc<str>,
    pub duration: prometheus::Histogram,
    requests: prometheus::IntCounterVec,
    counters: [[OnceLock<prometheus::IntCounter>; 5]; 8],
    /// `gatehouse_cache_lookups_total`, and its `{layer="l1", result="hit"}`
    /// counter for this route, the one every L1 hit counts.
    cache_lookups: prometheus::IntCounterVec,
    l1_hits: OnceLock<prometheus::IntCounter>,
}

impl RouteMetrics {
    fn new(name: &str, metrics: &Metrics, cache_lookups: &prometheus::IntCounterVec) -> Self {
        RouteMetrics {
            name: Arc::from(name),
            duration: metrics.request_duration.with_label_values(&[name]),
            requests: metrics.requests.clone(),
            counters: Default::default(),
            cache_lookups: cache_lookups.clone(),
            l1_hits: OnceLock::new(),
        }
    }

    /// Count one `gatehouse_cache_lookups_total{route, layer, result}`.
    pub fn count_cache_lookup(&self, layer: &str, result: &str) {
        let by_label = || {
            self.cache_lookups
                .with_label_values(&[&*self.name, layer, result])
        };
        if (layer, result) == ("l1", "hit") {
            self.l1_hits.get_or_init(by_label).inc();
        } else {
            by_label().inc();
        }
    }

    /// `gatehouse_http_requests_total{route, method, status}`.
    pub fn requests(&self, method: &Method, status: http::StatusCode) -> &prometheus::IntCounter {
        const METHODS: [&str; 8] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
        ];
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let m = match *method {
            Method::GET => 0,
            Method::HEAD => 1,
            Method::POST => 2,
            Method::PUT => 3,
            Method::PATCH => 4,
            Method::DELETE => 5,
            Method::OPTIONS => 6,
            _ => 7,
        };
        let c = usize::from((status.as_u16() / 100).clamp(1, 5) - 1);
        self.counters[m][c].get_or_init(|| {
            self.requests
                .with_label_values(&[&*self.name, METHODS[m], CLASSES[c]])
        })
    }
}

/// A request path that the gateway refuses to guess about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-escape in the path")]
    MalformedEscape,
    #[error("NUL byte in the path")]
    Nul,
}

impl RouteTable {
    pub fn new(
        routes: &[Route],
        metrics: &Metrics,
        cache_lookups: &prometheus::IntCounterVec,
    ) -> Self {
        let mut routes = routes.to_vec();
        // Stable: patterns keep their file order.
        routes.sort_by(|a, b| {
            b.path
                .specificity()
                .cmp(&a.path.specificity())
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        let metrics = routes
            .iter()
            .map(|r| r.name.as_str())
            .chain(std::iter::once(DEFAULT_ROUTE))
            .map(|name| RouteMetrics::new(name, metrics, cache_lookups))
            .collect();
        RouteTable { routes, metrics }
    }

    /// The request metrics of a match (`None`: the default route).
    pub fn metrics(&self, index: Option<usize>) -> &RouteMetrics {
        let last = self.metrics.len() - 1;
        &self.metrics[index.filter(|i| *i < last).unwrap_or(last)]
    }

    /// The name of a match (`None`: `default`), shared.
    pub fn name(&self, index: Option<usize>) -> Arc<str> {
        Arc::clone(&self.metrics(index).name)
    }

    /// The index of the route for `method` on the decoded `path`, if any.
    pub fn find(&self, method: &Method, path: &[u8]) -> Option<usize> {
        let method = canonical_method(method);
        self.routes.iter().position(|r| {
            r.path.matches(path) && (r.methods.is_empty() || r.methods.contains(&method))
        })
    }

    /// The route `find` returned.
    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }
}

/// Methods compare case-insensitively: a `post` must meet the `POST` rules.
/// (A method that is not a token is refused with 400 as the head is parsed.)
pub fn canonical_method(method: &Method) -> Cow<'_, Method> {
    let text = method.as_str();
    if !text.bytes().any(|b| b.is_ascii_lowercase()) {
        return Cow::Borrowed(method);
    }
    // Upper-casing a token yields a token.
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_or(Cow::Borrowed(method), Cow::Owned)
}

/// The path as Gunicorn puts it in `PATH_INFO`: every `%XX` decoded, `%2F`
/// included, nothing else changed (no `+`, no dot segments). An escape that
/// is not two hex digits, or a NUL, is refused: Python would pass `%zz`
/// through as text, and the gateway does not guess what a route should make
/// of it.
pub fn wsgi_path(path: &str) -> Result<Cow<'_, [u8]>, PathError> {
    let bytes = path.as_bytes();
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                return Err(PathError::MalformedEscape);
            };
            // Two hex digits make at most 255.
            let byte = u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX);
            if byte == 0 {
                return Err(PathError::Nul);
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::PathMatch;
    use proptest::prelude::*;

    fn lookups() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(
            prometheus::Opts::new("lookups", "test"),
            &["route", "layer", "result"],
        )
        .unwrap()
    }

    fn route(name: &str, prefix: &str, methods: &[Method]) -> Route {
        Route {
            name: name.into(),
            path: PathMatch::Prefix(prefix.into()),
            methods: methods.to_vec(),
            cache_ttl: None,
            cache: Default::default(),
            limits: Vec::new(),
        }
    }

    fn name_of(table: &RouteTable, method: &Method, path: &str) -> Arc<str> {
        let path = wsgi_path(path).unwrap();
        table.name(table.find(method, &path))
    }

    #[test]
    fn longest_prefix_then_method_wins() {
        let table = RouteTable::new(
            &[
                route("v1", "/v1/", &[]),
                route("stories", "/v1/stories/", &[]),
                route("stories-write", "/v1/stories/", &[Method::POST]),
            ],
            &Metrics::new().unwrap(),
            &lookups(),
        );
        assert_eq!(&*name_of(&table, &Method::GET, "/v1/stories/3/"), "stories");
        assert_eq!(
            &*name_of(&table, &Method::POST, "/v1/stories/"),
            "stories-write"
        );
        assert_eq!(&*name_of(&table, &Method::GET, "/v1/users/1/"), "v1");
        assert_eq!(&*name_of(&table, &Method::GET, "/admin/"), DEFAULT_ROUTE);
    }

    #[test]
    fn encoded_paths_and_lower_case_methods_meet_their_route() {
        let table = RouteTable::new(
            &[
                route("search", "/v1/search/", &[]),
                route("login", "/v1/auth/login/", &[Method::POST]),
            ],
            &Metrics::new().unwrap(),
            &lookups(),
        );
        for path in [
            "/v1/%73earch/",
            "/v1/search%2F",
            "/v1%2Fsearch/",
            "/%761/search/",
            "/v1/%53earch/".replace("%53", "%73").as_str(),
        ] {
            assert_eq!(&*name_of(&table, &Method::GET, path), "search", "{path}");
        }
        let post = Method::from_bytes(b"post").unwrap();
        assert_eq!(&*name_of(&table, &post, "/v1/auth/%6cogin/"), "login");
    }

    #[test]
    fn undecodable_paths_are_refused() {
        assert_eq!(wsgi_path("/a%zz"), Err(PathError::MalformedEscape));
        assert_eq!(wsgi_path("/a%4"), Err(PathError::MalformedEscape));
        assert_eq!(wsgi_path("/a%"), Err(PathError::MalformedEscape));
        assert_eq!(wsgi_path("/a%00b"), Err(PathError::Nul));
        assert_eq!(wsgi_path("/a%2fb").unwrap().as_ref(), b"/a/b");
        assert_eq!(wsgi_path("/a+b").unwrap().as_ref(), b"/a+b");
    }

    proptest! {
        /// Decoding a path escaped byte by byte gives the bytes back.
        #[test]
        fn escaping_round_trips(bytes in proptest::collection::vec(1u8..=255, 0..64)) {
            let escaped: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            let decoded = wsgi_path(&escaped).unwrap();
            prop_assert_eq!(decoded.as_ref(), bytes.as_slice());
        }

        #[test]
        fn never_panics(text in "[ -~]{0,40}") {
            let _ = wsgi_path(&text);
        }
    }
}
