use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

const TTL: Duration = Duration::from_secs(300);
const NO_STALE: (Duration, Duration) = (Duration::ZERO, Duration::ZERO);

fn decide(
    status: u16,
    response: &[(&str, &str)],
    credentialed: bool,
    per_user: bool,
) -> Result<Freshness, NotStored> {
    let directives = RequestDirectives::default();
    let request = StoreRequest {
        method: &Method::GET,
        directives: &directives,
        credentialed,
        per_user,
    };
    storable(
        &request,
        StatusCode::from_u16(status).unwrap(),
        &headers(response),
        TTL,
        NO_STALE,
    )
}

#[test]
fn explicit_freshness_wins_in_rfc_order() {
    let f = |h: &[(&str, &str)]| decide(200, h, false, false).unwrap().lifetime.as_secs();
    assert_eq!(f(&[("cache-control", "max-age=60, s-maxage=30")]), 30);
    assert_eq!(f(&[("cache-control", "max-age=60")]), 60);
    assert_eq!(
        f(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
        ]),
        60
    );
    // Nothing said: the route's TTL.
    assert_eq!(f(&[]), 300);
    // The first of repeated directives counts; more digits than fit is "very large".
    assert_eq!(
        f(&[
            ("cache-control", "max-age=5"),
            ("cache-control", "max-age=9")
        ]),
        5
    );
    assert_eq!(
        f(&[("cache-control", "max-age=99999999999999999999")]),
        1 << 31
    );
}

#[test]
fn invalid_freshness_is_stale_and_needs_validators() {
    // Stale at once without validators: not worth storing.
    assert_eq!(
        decide(200, &[("cache-control", "max-age=abc")], false, false),
        Err(NotStored::NoFreshness)
    );
    assert_eq!(
        decide(200, &[("expires", "0")], false, false),
        Err(NotStored::NoFreshness)
    );
    let f = decide(200, &[("expires", "0"), ("etag", "\"a\"")], false, false).unwrap();
    assert_eq!(f.lifetime, Duration::ZERO);
}

#[test]
fn responses_for_one_client_are_never_stored() {
    assert_eq!(
        decide(200, &[("cache-control", "no-store")], false, false),
        Err(NotStored::NoStore)
    );
    assert_eq!(
        decide(200, &[("cache-control", "private")], false, false),
        Err(NotStored::Private)
    );
    assert_eq!(
        decide(
            200,
            &[("cache-control", "private=\"x-a, x-b\", max-age=60")],
            false,
            false
        ),
        Err(NotStored::Private)
    );
    assert_eq!(
        decide(200, &[("set-cookie", "sessionid=x")], false, false),
        Err(NotStored::SetCookie)
    );
    // Even on a per-user route, and even when public.
    assert_eq!(
        decide(
            200,
            &[
                ("set-cookie", "a=b"),
                ("cache-control", "public, max-age=60")
            ],
            true,
            true
        ),
        Err(NotStored::SetCookie)
    );
    assert_eq!(
        decide(200, &[("vary", "Accept, *")], false, false),
        Err(NotStored::VaryStar)
    );
}

#[test]
fn credentialed_requests_are_stored_only_when_allowed() {
    assert_eq!(decide(200, &[], true, false), Err(NotStored::Credentials));
    assert_eq!(
        decide(200, &[("cache-control", "max-age=60")], true, false),
        Err(NotStored::Credentials)
    );
    for allowed in ["public", "s-maxage=60", "must-revalidate, max-age=60"] {
        assert!(
            decide(200, &[("cache-control", allowed)], true, false).is_ok(),
            "{allowed}"
        );
    }
    assert!(decide(200, &[], true, true).is_ok());
}

#[test]
fn statuses_need_explicit_freshness_unless_cacheable_by_default() {
    assert!(decide(404, &[], false, false).is_ok());
    assert_eq!(decide(500, &[], false, false), Err(NotStored::NoFreshness));
    assert_eq!(decide(302, &[], false, false), Err(NotStored::NoFreshness));
    assert!(decide(302, &[("cache-control", "max-age=10")], false, false).is_ok());
    assert_eq!(
        decide(206, &[("cache-control", "max-age=10")], false, false),
        Err(NotStored::Status)
    );
    assert_eq!(
        decide(304, &[("cache-control", "max-age=10")], false, false),
        Err(NotStored::Status)
    );
    // must-understand overrides no-store for a status the cache knows.
    assert!(
        decide(
            200,
            &[("cache-control", "must-understand, no-store, max-age=5")],
            false,
            false
        )
        .is_ok()
    );
}

#[test]
fn only_get_is_stored() {
    let directives = RequestDirectives::default();
    for method in [Method::HEAD, Method::POST] {
        let request = StoreRequest {
            method: &method,
            directives: &directives,
            credentialed: false,
            per_user: false,
        };
        assert_eq!(
            storable(&request, StatusCode::OK, &HeaderMap::new(), TTL, NO_STALE),
            Err(NotStored::Method)
        );
    }
    let no_store = RequestDirectives::parse(&headers(&[("cache-control", "no-store")]));
    let request = StoreRequest {
        method: &Method::GET,
        directives: &no_store,
        credentialed: false,
        per_user: false,
    };
    assert_eq!(
        storable(&request, StatusCode::OK, &HeaderMap::new(), TTL, NO_STALE),
        Err(NotStored::NoStore)
    );
}

fn fresh(lifetime: u64, swr: u64, sie: u64, forbids: bool) -> Freshness {
    Freshness {
        lifetime: Duration::from_secs(lifetime),
        stale_while_revalidate: Duration::from_secs(swr),
        stale_if_error: Duration::from_secs(sie),
        forbids_stale: forbids,
    }
}

fn req(cc: &str) -> RequestDirectives {
    RequestDirectives::parse(&headers(&[("cache-control", cc)]))
}

#[test]
fn request_directives_narrow_what_is_served() {
    let f = fresh(100, 0, 0, false);
    let s = Duration::from_secs;
    assert_eq!(
        usable(s(50), &f, &RequestDirectives::default()),
        Usable::Fresh
    );
    assert_eq!(usable(s(50), &f, &req("no-cache")), Usable::Stale);
    assert_eq!(usable(s(50), &f, &req("max-age=10")), Usable::Stale);
    assert_eq!(usable(s(50), &f, &req("max-age=60")), Usable::Fresh);
    assert_eq!(usable(s(50), &f, &req("min-fresh=60")), Usable::Stale);
    assert_eq!(usable(s(50), &f, &req("min-fresh=40")), Usable::Fresh);
    assert_eq!(
        usable(s(120), &f, &req("max-stale=30")),
        Usable::StaleAccepted
    );
    assert_eq!(usable(s(140), &f, &req("max-stale=30")), Usable::Stale);
    assert_eq!(
        usable(s(9999), &f, &req("max-stale")),
        Usable::StaleAccepted
    );
    // must-revalidate and friends forbid any stale use.
    let strict = fresh(100, 60, 60, true);
    assert_eq!(usable(s(120), &strict, &req("max-stale")), Usable::Stale);
    assert_eq!(
        usable(s(120), &strict, &RequestDirectives::default()),
        Usable::Stale
    );
    assert!(!usable_on_error(s(120), &strict));
    // Pragma counts only without Cache-Control.
    assert!(RequestDirectives::parse(&headers(&[("pragma", "no-cache")])).no_cache);
    assert!(
        !RequestDirectives::parse(&headers(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=5")
        ]))
        .no_cache
    );
}

#[test]
fn stale_allowances_are_bounded() {
    let f = fresh(100, 30, 60, false);
    let s = Duration::from_secs;
    assert_eq!(
        usable(s(110), &f, &RequestDirectives::default()),
        Usable::StaleWhileRevalidate
    );
    assert_eq!(
        usable(s(131), &f, &RequestDirectives::default()),
        Usable::Stale
    );
    assert!(usable_on_error(s(150), &f));
    assert!(!usable_on_error(s(161), &f));
    // s-maxage forbids stale use for a shared cache.
    let d = ResponseDirectives::parse(&headers(&[(
        "cache-control",
        "s-maxage=10, stale-if-error=60",
    )]));
    assert!(d.forbids_stale());
}

#[test]
fn age_is_corrected_for_the_trip() {
    let now = SystemTime::now();
    let sent = now - Duration::from_secs(2);
    let date = httpdate::fmt_http_date(now - Duration::from_secs(10));
    let h = headers(&[("date", &date), ("age", "3")]);
    // Apparent age 10 beats Age 3 + 2 s of delay.
    let age = initial_age(&h, sent, now);
    assert!((10..=11).contains(&age.as_secs()), "{age:?}");
    let h = headers(&[("age", "30")]);
    assert_eq!(initial_age(&h, sent, now).as_secs(), 32);
}

#[test]
fn conditionals_use_weak_comparison_and_dates() {
    let stored = headers(&[
        ("etag", "W/\"v1\""),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ]);
    assert!(not_modified(
        &headers(&[("if-none-match", "\"v1\"")]),
        &stored
    ));
    assert!(not_modified(
        &headers(&[("if-none-match", "\"x\", W/\"v1\"")]),
        &stored
    ));
    assert!(not_modified(&headers(&[("if-none-match", "*")]), &stored));
    assert!(!not_modified(
        &headers(&[("if-none-match", "\"v2\"")]),
        &stored
    ));
    // If-None-Match decides alone when present.
    assert!(!not_modified(
        &headers(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
        ]),
        &stored
    ));
    assert!(not_modified(
        &headers(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]),
        &stored
    ));
    assert!(!not_modified(
        &headers(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:36 GMT")]),
        &stored
    ));
    assert!(!not_modified(
        &headers(&[("if-modified-since", "garbage")]),
        &stored
    ));
}

#[test]
fn quoted_commas_do_not_split_directives() {
    let d = ResponseDirectives::parse(&headers(&[(
        "cache-control",
        "no-cache=\"a, b\", max-age=5, PUBLIC",
    )]));
    assert!(d.no_cache && d.public);
    assert_eq!(d.max_age, Seconds::Valid(5));
    assert_eq!(
        vary_names(&headers(&[
            ("vary", "Accept-Encoding, cookie"),
            ("vary", "accept-encoding")
        ])),
        Some(vec!["accept-encoding".to_string(), "cookie".to_string()])
    );
    let _ = header::VARY;
}
