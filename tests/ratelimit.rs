//! Rate limits through the real gateway binary, counted in a real Redis (or in
//! the gateway when Redis is absent or killed).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[path = "support/redis.rs"]
mod redis;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::{Gatehouse, Gunicorn, TestUpstream, eventually, get, json};
use http::StatusCode;
use jsonwebtoken::{EncodingKey, Header, encode};
use redis::TestRedis;
use serde_json::json;

const SECRET: &str = "integration-test-secret-of-enough-length";

/// A unique key prefix per test, so tests sharing one Redis never share counts.
fn prefix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A gateway config with rate limits. `limits` goes under `[ratelimit]`,
/// `rest` after everything (endpoint rules, identity). The tests count
/// upstream hits, so the response cache is off.
fn config(upstream: &str, redis: Option<&str>, limits: &str, rest: &str) -> String {
    let redis = redis
        .map(|url| format!("[redis]\nurl = \"{url}\"\n"))
        .unwrap_or_default();
    // Without routes of its own, a test does without the seed's routes and
    // their limits.
    let routes = if rest.contains("[[routes]]") {
        ""
    } else {
        "routes = []\n"
    };
    format!(
        "{routes}[server]\nworkers = 2\nwatch_config = true\nconfig_watch_interval = \"1s\"\n\n[upstream.health_check]\nenabled = false\n\n\
         [[upstream.servers]]\nurl = \"{upstream}\"\n\n{redis}\n\
         [cache]\nenabled = false\n\n\
         [identity.jwt]\nenabled = true\nsecret = \"{SECRET}\"\n\n\
         [ratelimit]\nkey_prefix = \"{}\"\n{limits}\n\n{rest}\n",
        prefix()
    )
}

fn key_prefix(toml: &str) -> &str {
    toml.lines()
        .find_map(|l| l.strip_prefix("key_prefix = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap()
}

fn token(sub: &str, admin: bool) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::default(),
        &json!({"sub": sub, "admin": admin, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn bearer(sub: &str) -> String {
    format!("Bearer {}", token(sub, false))
}

async fn status(gateway: &Gatehouse, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    get(gateway.addr, path, headers).await.unwrap().0
}

/// The requests a sliding-window key in Redis has counted: the current
/// window's and the previous one's. A test's requests may straddle a window
/// boundary; the script then carries the old window's count over as `p`.
fn counted(redis: &TestRedis, key: &str) -> u64 {
    let fields = redis.cli(&["HMGET", key, "c", "p"]);
    fields
        .lines()
        .map(|n| n.trim().parse::<u64>().unwrap_or(0))
        .sum()
}

/// How many of `n` sequential requests pass.
async fn passes(gateway: &Gatehouse, n: usize, path: &str, headers: &[(&str, &str)]) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if status(gateway, path, headers).await == StatusCode::OK {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_allows_exactly_n_then_429_with_fields() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let toml = config(&upstream.url(), Some(&redis.url()), "per_user = 5", "");
    let gateway = Gatehouse::start(&toml);
    for left in (0..5).rev() {
        let (status, headers, _) = get(gateway.addr, "/", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["ratelimit-policy"], "\"per_user\";q=5;w=60");
        let state = headers["ratelimit"].to_str().unwrap();
        assert!(
            state.starts_with(&format!("\"per_user\";r={left};t=")),
            "{state}"
        );
    }
    let (status, headers, body) = get(gateway.addr, "/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // At most two windows: the requests of a full window still weigh in the next.
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(
        headers["ratelimit"],
        format!("\"per_user\";r=0;t={retry}").as_str()
    );
    assert_eq!(json(&body)["status"], 429);
    assert_eq!(
        upstream.hits(),
        5,
        "the refused request never reached the upstream"
    );
    // The count lives in Redis under a key an operator can read.
    // Other tests share this Redis under their own prefixes.
    let key = format!("{}:rl:{{ip:127.0.0.1}}:per_user", key_prefix(&toml));
    let key = key.as_str();
    let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().unwrap();
    assert!((1..=120_000).contains(&ttl), "every key expires: {ttl}");
    assert_eq!(counted(redis, key), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_scopes_count_per_user_per_ip_and_globally() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let rules = "[[routes]]\nname = \"mine\"\npath_prefix = \"/user/\"\n[[routes.limits]]\nlimit = 2\n\n\
                 [[routes]]\nname = \"by-ip\"\npath_prefix = \"/ip/\"\n[[routes.limits]]\nlimit = 2\nscope = \"ip\"\n\n\
                 [[routes]]\nname = \"shared\"\npath_prefix = \"/all/\"\n[[routes.limits]]\nlimit = 3\nscope = \"global\"\n";
    let gateway = Gatehouse::start(&config(&upstream.url(), Some(&redis.url()), "", rules));
    let (alice, bob) = (bearer("alice"), bearer("bob"));
    let alice = [("authorization", alice.as_str())];
    let bob = [("authorization", bob.as_str())];

    assert_eq!(passes(&gateway, 3, "/user/x", &alice).await, 2);
    assert_eq!(
        passes(&gateway, 3, "/user/x", &bob).await,
        2,
        "bob has his own budget"
    );

    // Per IP: both users come from 127.0.0.1 and share it.
    assert_eq!(passes(&gateway, 2, "/ip/x", &alice).await, 2);
    assert_eq!(
        status(&gateway, "/ip/x", &bob).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    assert_eq!(passes(&gateway, 2, "/all/x", &alice).await, 2);
    assert_eq!(
        passes(&gateway, 2, "/all/x", &bob).await,
        1,
        "one budget for everybody"
    );
    let (_, headers, _) = get(gateway.addr, "/all/x", &bob).await.unwrap();
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"shared\";r=0;")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_per_user_and_global_limits() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let shared = config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 6\nglobal = 10",
        "",
    );
    let a = Gatehouse::start(&shared);
    let b = Gatehouse::start(&shared);
    let carol = bearer("carol");
    let carol = [("authorization", carol.as_str())];
    let mut ok = 0;
    for i in 0..10 {
        let gateway = if i % 2 == 0 { &a } else { &b };
        if status(gateway, "/", &carol).await == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 6, "one per-user budget across both gateways");
    // Global: 6 used by carol; 4 more for anybody, then none on either gateway.
    let mut others = 0;
    for i in 0..8 {
        let user = bearer(&format!("user-{i}"));
        let gateway = if i % 2 == 0 { &a } else { &b };
        if status(gateway, "/", &[("authorization", user.as_str())]).await == StatusCode::OK {
            others += 1;
        }
    }
    assert_eq!(others, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bypass_and_allowlist_skip_limits() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 2",
        "",
    ));
    let admin = format!("Bearer {}", token("root", true));
    assert_eq!(
        passes(&gateway, 6, "/", &[("authorization", admin.as_str())]).await,
        6
    );

    let allowlisted = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 2\nallowlist = [\"127.0.0.0/8\"]",
        "",
    ));
    assert_eq!(passes(&allowlisted, 6, "/", &[]).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_and_spoofed_addresses_change_nothing() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 3",
        "",
    ));
    let forged = encode(
        &Header::default(),
        &json!({"sub": "dave", "admin": true, "exp": 9_999_999_999u64}),
        &EncodingKey::from_secret(b"not-the-gateway-secret-but-long-enough"),
    )
    .unwrap();
    let forged = format!("Bearer {forged}");
    // A forged admin token is anonymous: it counts as 127.0.0.1.
    assert_eq!(
        passes(&gateway, 4, "/", &[("authorization", forged.as_str())]).await,
        3
    );
    // So does a client naming another address: the peer is not trusted.
    assert_eq!(
        status(&gateway, "/", &[("x-forwarded-for", "198.51.100.7")]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // And dave's real budget is untouched by the forgery.
    let dave = bearer("dave");
    assert_eq!(
        passes(&gateway, 3, "/", &[("authorization", dave.as_str())]).await,
        3
    );

    let strict = Gatehouse::start(
        &config(&upstream.url(), Some(&redis.url()), "", "").replace(
            "[identity.jwt]\nenabled = true",
            "[identity.jwt]\nenabled = true\nreject_invalid = true",
        ),
    );
    let (status, headers, _) = get(strict.addr, "/", &[("authorization", forged.as_str())])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_never_passes_more_than_the_limit() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 20",
        "",
    ));
    let addr = gateway.addr;
    let burst: Vec<_> = (0..120)
        .map(|_| tokio::spawn(async move { get(addr, "/", &[]).await.unwrap().0 }))
        .collect();
    let mut ok = 0;
    for request in burst {
        match request.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 20);
    assert_eq!(upstream.hits(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_log_rule_is_exact() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let rules = "[[routes]]\nname = \"login\"\nmethods = [\"GET\"]\n\
                 path_pattern = \"/auth/*/login\"\n[[routes.limits]]\nlimit = 2\nwindow = \"5m\"\nscope = \"ip\"\n\
                 algorithm = \"sliding_log\"\n";
    let gateway = Gatehouse::start(&config(&upstream.url(), Some(&redis.url()), "", rules));
    assert_eq!(passes(&gateway, 4, "/auth/web/login", &[]).await, 2);
    let (_, headers, _) = get(gateway.addr, "/auth/app/login", &[]).await.unwrap();
    assert_eq!(headers["ratelimit-policy"], "\"login\";q=2;w=300");
    // Other paths are not under the rule.
    assert_eq!(
        status(&gateway, "/auth/web/logout", &[]).await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_falls_back_locally_then_shared_counting_resumes() {
    let upstream = TestUpstream::start("a").await;
    let mut redis = TestRedis::start();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 100000\nglobal = 100000\nredis_timeout = \"50ms\"\nbreaker_cooldown = \"500ms\"",
        "",
    ));
    assert_eq!(passes(&gateway, 5, "/", &[]).await, 5);
    assert_eq!(
        gateway.metric("gatehouse_ratelimit_shared").await,
        Some(1.0)
    );

    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let started = Instant::now();
        let status = status(&gateway, "/", &[]).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            status,
            StatusCode::OK,
            "no request fails because Redis is gone"
        );
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited {slowest:?}"
    );
    let fallbacks = "gatehouse_ratelimit_fallbacks_total{policy=\"local\"}";
    assert!(gateway.metric(fallbacks).await.unwrap_or(0.0) >= 40.0);
    assert_eq!(
        gateway.metric("gatehouse_ratelimit_shared").await,
        Some(0.0)
    );
    assert!(gateway.log().contains("redis unavailable"));

    redis.restart();
    // Each worker thread has its own connection, which reconnects on its
    // next use; then decisions stop falling back.
    assert!(
        eventually(Duration::from_secs(10), async || {
            let before = gateway.metric(fallbacks).await.unwrap();
            passes(&gateway, 8, "/", &[]).await == 8
                && gateway.metric(fallbacks).await.unwrap() == before
                && gateway.metric("gatehouse_ratelimit_shared").await == Some(1.0)
        })
        .await,
        "shared counting resumes by itself"
    );
    assert!(!redis.cli(&["KEYS", "*:per_user"]).trim().is_empty());
}

/// Limits follow the file: an edit takes effect without a signal or a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_limit_applies_and_a_bad_edit_keeps_it() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let search = |limit: u32| {
        format!(
            "[[routes]]\nname = \"search\"\npath_prefix = \"/v1/search/\"\n[[routes.limits]]\nlimit = {limit}\n"
        )
    };
    let base = config(&upstream.url(), Some(&redis.url()), "", &search(20));
    let gateway = Gatehouse::start(&base);
    let (_, headers, _) = get(gateway.addr, "/v1/search/?q=a", &[]).await.unwrap();
    assert_eq!(headers["ratelimit-policy"], "\"search\";q=20;w=60");

    gateway.rewrite_config(&base.replace(&search(20), &search(5)));
    let ok = "gatehouse_config_reloads_total{result=\"ok\"}";
    assert!(gateway.metric_reaches(ok, 1.0).await);
    // One request was already counted under the same rule: four remain.
    assert_eq!(passes(&gateway, 6, "/v1/search/?q=a", &[]).await, 4);

    gateway.rewrite_config(&base.replace(&search(20), &search(0)));
    let errors = "gatehouse_config_reloads_total{result=\"error\"}";
    assert!(gateway.metric_reaches(errors, 1.0).await);
    let (status, headers, _) = get(gateway.addr, "/v1/search/?q=a", &[]).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["ratelimit-policy"], "\"search\";q=5;w=60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_a_subjects_counts() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 10",
        "",
    ));
    let erin = bearer("erin");
    assert_eq!(
        passes(&gateway, 3, "/", &[("authorization", erin.as_str())]).await,
        3
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args([
            "ratelimit",
            "inspect",
            "--subject",
            "user:erin",
            "--json",
            "--admin",
        ])
        .arg(gateway.admin.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["source"], "redis");
    let per_user = answer["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "per_user")
        .unwrap();
    assert_eq!(per_user["used"], 3);
    assert_eq!(per_user["remaining"], 7);
    // Inspecting counted nothing.
    let again = harness::get(gateway.admin, "/ratelimit/user:erin", &[])
        .await
        .unwrap()
        .2;
    assert_eq!(json(&again)["rules"][1]["used"], 3);
}

/// The shipped `config/gateway.toml` (no Redis: local limits) in front of the
/// example app under Gunicorn: the seed's `/v1/search/` limit of 20/min holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_limits_hold_against_django() {
    let gunicorn = Gunicorn::start(2);
    let shipped =
        std::fs::read_to_string(harness::repo_root().join("config/gateway.toml")).unwrap();
    let toml = shipped.replace(
        "url = \"http://127.0.0.1:8000\"",
        &format!("url = \"{}\"", gunicorn.upstream_url()),
    );
    assert_ne!(toml, shipped);
    let gateway = Gatehouse::start(&toml);
    assert_eq!(passes(&gateway, 25, "/v1/search/?q=lantern", &[]).await, 20);
    let (status, headers, _) = get(gateway.addr, "/v1/search/?q=lantern", &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["ratelimit-policy"], "\"search\";q=20;w=60");
    // Stories have their own budget of 50 for this caller.
    let (status, headers, _) = get(gateway.addr, "/v1/stories/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["ratelimit-policy"], "\"stories\";q=50;w=60");
}

/// On Redis Cluster the rules of one request live in different slots. The
/// caller's own rules are decided first, so a refused caller never spends the
/// global budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_on_a_redis_cluster() {
    let upstream = TestUpstream::start("a").await;
    let cluster = redis::TestRedisCluster::start();
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let toml = config(&upstream.url(), None, "per_user = 3\nglobal = 5", "").replace(
        "[identity.jwt]",
        &format!(
            "[redis]\ncluster_nodes = [{}]\n\n[identity.jwt]",
            nodes.join(", ")
        ),
    );
    let a = Gatehouse::start(&toml);
    let b = Gatehouse::start(&toml);
    let (frank, grace) = (bearer("frank"), bearer("grace"));
    assert_eq!(
        passes(&a, 5, "/", &[("authorization", frank.as_str())]).await,
        3
    );
    // Frank's refused requests did not count globally: 2 of 5 remain.
    assert_eq!(
        passes(&b, 4, "/", &[("authorization", grace.as_str())]).await,
        2
    );
    assert_eq!(a.metric("gatehouse_ratelimit_shared").await, Some(1.0));
    let keys: usize = cluster
        .ports
        .iter()
        .map(|p| {
            cluster
                .cli(*p, &["DBSIZE"])
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum();
    // frank, grace and the global key, each on a master and its replica.
    assert!(keys >= 3, "keys on the cluster: {keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_follows_its_redis_error_policy() {
    let upstream = TestUpstream::start("a").await;
    let mut redis = TestRedis::start();
    let rules = "[[routes]]\nname = \"strict\"\npath_prefix = \"/strict/\"\n[[routes.limits]]\nlimit = 100\n\
                 on_redis_error = \"deny\"\n\n\
                 [[routes]]\nname = \"open\"\npath_prefix = \"/open/\"\n[[routes.limits]]\nlimit = 1\n";
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "on_redis_error = \"allow\"",
        rules,
    ));
    assert_eq!(status(&gateway, "/open/", &[]).await, StatusCode::OK);
    assert_eq!(
        status(&gateway, "/open/", &[]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    redis.kill();
    // "allow": Redis is gone, so the exhausted rule lets requests through...
    assert_eq!(passes(&gateway, 5, "/open/", &[]).await, 5);
    // ..."deny": refuses while it cannot count.
    let (status, headers, _) = get(gateway.addr, "/strict/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    for policy in ["allow", "deny"] {
        let sample = format!("gatehouse_ratelimit_fallbacks_total{{policy=\"{policy}\"}}");
        assert!(
            gateway.metric(&sample).await.unwrap_or(0.0) >= 1.0,
            "{policy}"
        );
    }
    let (_, _, body) = get(gateway.admin, "/metrics/json", &[]).await.unwrap();
    let ratelimit = &json(&body)["ratelimit"];
    assert!(
        ratelimit["ratelimit_fallbacks_total"].is_array(),
        "{ratelimit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_is_loaded_again() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::start();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 10",
        "",
    ));
    assert_eq!(passes(&gateway, 2, "/", &[]).await, 2);
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(passes(&gateway, 2, "/", &[]).await, 2);
    assert_eq!(
        gateway
            .metric("gatehouse_ratelimit_fallbacks_total{policy=\"local\"}")
            .await,
        None
    );
    let key = redis.cli(&["KEYS", "*:per_user"]);
    assert_eq!(counted(&redis, key.trim()), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::start();
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "requirepass", "s3cret"])
            .trim(),
        "OK"
    );
    let with = |pass: &str| {
        config(
            &upstream.url(),
            Some(&format!("{}?pass={pass}", redis.url())),
            "per_user = 10",
            "",
        )
    };
    let right = Gatehouse::start(&with("s3cret"));
    assert_eq!(passes(&right, 3, "/", &[]).await, 3);
    assert_eq!(right.metric("gatehouse_ratelimit_shared").await, Some(1.0));
    let keys = redis.cli(&["-a", "s3cret", "--no-auth-warning", "DBSIZE"]);
    assert_eq!(keys.trim(), "2", "global and per-user keys");

    let wrong = Gatehouse::start(&with("guess"));
    assert_eq!(
        passes(&wrong, 3, "/", &[]).await,
        3,
        "counted locally instead"
    );
    assert_eq!(wrong.metric("gatehouse_ratelimit_shared").await, Some(0.0));
}

/// How many of the requests pass, each sent once in order.
async fn each_status(gateway: &Gatehouse, requests: &[(http::Method, String)]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for (method, path) in requests {
        let request = http::Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        statuses.push(
            harness::send(gateway.addr, request)
                .await
                .unwrap()
                .0
                .as_u16(),
        );
    }
    statuses
}

/// Gunicorn decodes `PATH_INFO`, so every spelling below reaches Django's
/// search view; each must count against the search route as the canonical
/// path does, and be refused once the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_paths_and_methods_are_limited_as_the_canonical_ones() {
    let gunicorn = Gunicorn::start(2);
    let routes = "[[routes]]\nname = \"search\"\npath_prefix = \"/v1/search/\"\n\
                  [[routes.limits]]\nlimit = 7\nscope = \"ip\"\n\n\
                  [[routes]]\nname = \"login\"\nmethods = [\"POST\"]\npath_prefix = \"/v1/auth/login/\"\n\
                  [[routes.limits]]\nlimit = 3\nscope = \"ip\"\nalgorithm = \"sliding_log\"\n";
    let gateway = Gatehouse::start(&config(&gunicorn.upstream_url(), None, "", routes));
    let spellings = [
        "/v1/search/?q=lantern",
        "/v1/%73earch/?q=lantern",
        "/v1/search%2F?q=lantern",
        "/v1%2Fsearch/?q=lantern",
        "/%761/search/?q=lantern",
        "/v1/%73%65%61%72%63%68/?q=lantern",
        "/v1/search%2f?q=lantern",
    ]
    .map(str::to_string);
    for path in &spellings {
        let (status, headers, body) = get(gateway.addr, path, &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            json(&body)["q"],
            "lantern",
            "{path} reached Django's search view"
        );
        assert_eq!(
            headers["ratelimit-policy"], "\"search\";q=7;w=60",
            "{path} counted under the search route"
        );
    }
    for path in &spellings {
        assert_eq!(
            status(&gateway, path, &[]).await,
            StatusCode::TOO_MANY_REQUESTS,
            "{path} is refused with the canonical path"
        );
    }

    // `post` must not slip past a `POST` route, whatever Gunicorn then makes of it.
    let post = http::Method::POST;
    let lower = http::Method::from_bytes(b"post").unwrap();
    let statuses = each_status(
        &gateway,
        &[
            (post.clone(), "/v1/auth/login/".into()),
            (lower.clone(), "/v1/auth/%6cogin/".into()),
            (post.clone(), "/v1/auth%2Flogin/".into()),
            (lower, "/v1/auth/login/".into()),
            (post, "/v1/auth/%6Cogin/".into()),
        ],
    )
    .await;
    assert!(statuses[..3].iter().all(|s| *s != 429), "{statuses:?}");
    assert_eq!(statuses[3..], [429, 429], "{statuses:?}");
}

/// A path that cannot be decoded one way only is refused before Django.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_paths_get_400_and_never_reach_django() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&config(&gunicorn.upstream_url(), None, "", ""));
    for path in [
        "/v1/search/%zz?q=a",
        "/v1/search/%4",
        "/v1/sea%rch/",
        "/v1/search/%00/",
        "/v1%00/search/",
    ] {
        let (status, headers, _) = get(gateway.addr, path, &[("x-app-echo", "1")])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{path}"
        );
        assert!(
            !headers.contains_key("x-app-request-id"),
            "{path} reached Django"
        );
    }
    let (status, headers, _) = get(gateway.addr, "/v1/search/?q=a", &[("x-app-echo", "1")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("x-app-request-id"));
}

/// A random `sessionid` per request used to get its own per-user bucket.
/// Unverified, a cookie only narrows the client address's bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_session_cookies_never_buy_more_than_the_address() {
    let upstream = TestUpstream::start("a").await;
    let redis = TestRedis::shared();
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 5",
        "",
    ));
    let mut ok = 0;
    for i in 0..12 {
        let cookie = format!("sessionid=forged{i:04}x{}", std::process::id());
        if status(&gateway, "/", &[("cookie", &cookie)]).await == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(upstream.hits(), 5);
    // One cookie, reused, still has at most its own share inside the address.
    assert_eq!(
        status(&gateway, "/", &[("cookie", "sessionid=other")]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

const DJANGO_SECRET: &str = "gatehouse-test-django-secret-key-0123456789";

/// Log in through the gateway as member `id`; the `sessionid` Django set.
async fn log_in(gateway: &Gatehouse, id: u32) -> String {
    let request = http::Request::post("/v1/auth/login/")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            "{{\"member_id\": {id}}}"
        ))))
        .unwrap();
    let (status, headers, body) = harness::send(gateway.addr, request).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    headers
        .get_all("set-cookie")
        .iter()
        .find_map(|v| {
            let v = v.to_str().ok()?;
            let rest = v.strip_prefix("sessionid=")?;
            Some(rest.split(';').next()?.to_string())
        })
        .expect("Django set a sessionid")
}

/// Which member Django sees for these cookie fields.
async fn django_member(gateway: &Gatehouse, cookies: &[&str]) -> serde_json::Value {
    let headers: Vec<(&str, &str)> = cookies.iter().map(|c| ("cookie", *c)).collect();
    let (status, _, body) = get(gateway.addr, "/v1/auth/whoami/", &headers)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    json(&body)["member_id"].clone()
}

fn session_config(gunicorn: &Gunicorn, redis: Option<&str>, session: &str) -> String {
    config(
        &gunicorn.upstream_url(),
        redis,
        "per_user = 3\nglobal = 100000",
        &format!("[identity.session]\n{session}\n"),
    )
}

/// Django on the `signed_cookies` session backend behind a gateway that
/// verifies them with the same SECRET_KEY; per_user 3.
fn signed_cookie_sessions() -> (Gunicorn, Gatehouse) {
    let gunicorn = Gunicorn::start_with_env(
        2,
        &[
            ("DJANGO_SESSION_ENGINE", "signed_cookies"),
            ("DJANGO_SECRET_KEY", DJANGO_SECRET),
        ],
    );
    let gateway = Gatehouse::start(&session_config(
        &gunicorn,
        None,
        &format!("verify = \"signed_cookies\"\nsecret_key = \"{DJANGO_SECRET}\""),
    ));
    (gunicorn, gateway)
}

/// Django's `signed_cookies` backend: the gateway checks the signature with
/// the same SECRET_KEY. A real session gets its own bucket; a forged or
/// re-signed one is no identity and counts as its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_session_cookies_are_verified_with_the_secret_key() {
    let (_gunicorn, gateway) = signed_cookie_sessions();
    let real = log_in(&gateway, 1).await; // the address's first request
    let cookie = format!("sessionid={real}");
    // Django and the gateway agree the cookie is real: it has its own budget.
    assert_eq!(django_member(&gateway, &[&cookie]).await, 1);
    assert_eq!(
        passes(&gateway, 4, "/v1/auth/whoami/", &[("cookie", &cookie)]).await,
        2
    );

    // Tampered: one byte of the payload changed. Django refuses it too.
    let mut tampered = real.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = format!("sessionid={}", String::from_utf8(tampered).unwrap());
    assert!(django_member(&gateway, &[&tampered]).await.is_null());
    // The address has spent 2 of 3 (the login and that look); one more passes.
    assert_eq!(
        passes(&gateway, 3, "/v1/stories/", &[("cookie", &tampered)]).await,
        1
    );
    assert_eq!(
        status(&gateway, "/v1/stories/", &[("cookie", &cookie)]).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the real session's own budget is spent too"
    );
}

/// `Cookie: sessionid=<random>; sessionid=REAL`: Django reads the last value,
/// and so must the gateway, or a logged-in user escapes their own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_session_cookies_are_read_as_django_reads_them() {
    let (_gunicorn, gateway) = signed_cookie_sessions();
    let real = log_in(&gateway, 2).await;
    let alone = format!("sessionid={real}");
    let doubled = format!("sessionid=random123; sessionid={real}");
    let first = "sessionid=random456".to_string();
    // What Django itself reads, one field and two.
    assert_eq!(django_member(&gateway, &[&doubled]).await, 2);
    assert_eq!(django_member(&gateway, &[&first, &alone]).await, 2);
    assert_eq!(django_member(&gateway, &[&alone]).await, 2);
    // Those three spent the session's budget of 3; every shape is refused.
    for cookies in [vec![doubled.as_str()], vec![first.as_str(), alone.as_str()]] {
        let headers: Vec<(&str, &str)> = cookies.iter().map(|c| ("cookie", *c)).collect();
        assert_eq!(
            status(&gateway, "/v1/auth/whoami/", &headers).await,
            StatusCode::TOO_MANY_REQUESTS,
            "{cookies:?}"
        );
    }
    // The address itself (the login) still has budget left.
    assert_eq!(status(&gateway, "/v1/stories/", &[]).await, StatusCode::OK);
}

/// Sessions in Redis (SESSION_ENGINE cache over django-redis): a session is
/// real when its key exists; a made-up one counts as its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_are_verified_by_their_key() {
    let redis = TestRedis::shared();
    // Django's cache in database 3 of the same server, as a deployment keeps
    // sessions apart from the gateway's counters.
    let socket = redis.url().replace("redis+unix://", "");
    let django_redis = format!("unix://{socket}?db=3");
    let gunicorn = Gunicorn::start_with_env(
        2,
        &[
            ("DJANGO_SESSION_ENGINE", "cache"),
            ("DJANGO_REDIS_URL", &django_redis),
        ],
    );
    let gateway = Gatehouse::start(&session_config(
        &gunicorn,
        Some(&redis.url()),
        &format!(
            "verify = \"redis\"\nredis_url = \"redis+unix://{socket}?db=3\"\nverify_cache_ttl = \"1s\""
        ),
    ));
    let real = log_in(&gateway, 3).await;
    let cookie = format!("sessionid={real}");
    assert_eq!(django_member(&gateway, &[&cookie]).await, 3);
    assert_eq!(
        passes(&gateway, 4, "/v1/auth/whoami/", &[("cookie", &cookie)]).await,
        2
    );
    // Made-up keys: the address has spent 1 of 3 (the login).
    let mut ok = 0;
    for i in 0..4 {
        let made_up = format!("sessionid={:032x}", 0xfeed_0000_u64 + i);
        if status(&gateway, "/v1/stories/", &[("cookie", &made_up)]).await == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 2);
}

/// A trusted proxy that appends an entry that is not a bare address: the
/// walk parses `ip:port` and `[v6]:port`, and stops at `unknown` rather than
/// walking into what the client wrote (here, an allowlisted address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_chains_cannot_choose_the_client_address() {
    let upstream = TestUpstream::start("a").await;
    let toml = config(
        &upstream.url(),
        None,
        "per_user = 2\nallowlist = [\"6.6.6.6\"]",
        "",
    )
    .replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    let gateway = Gatehouse::start(&toml);
    for chain in ["6.6.6.6, unknown", "6.6.6.6, _obfuscated", "6.6.6.6,"] {
        assert_eq!(
            passes(&gateway, 2, "/", &[("x-forwarded-for", chain)]).await,
            if chain == "6.6.6.6, unknown" { 2 } else { 0 },
            "{chain}: counted as the proxy itself, not the allowlisted address"
        );
    }
    // `ip:port` and `[v6]:port` are parsed: each its own client.
    assert_eq!(
        passes(&gateway, 3, "/", &[("x-forwarded-for", "203.0.113.5:5555")]).await,
        2
    );
    assert_eq!(
        passes(
            &gateway,
            3,
            "/",
            &[("x-forwarded-for", "[2001:db8::5]:443")]
        )
        .await,
        2
    );
    let inspect = |subject: &'static str| {
        let admin = gateway.admin;
        async move {
            let (_, _, body) = get(admin, &format!("/ratelimit/{subject}"), &[])
                .await
                .unwrap();
            json(&body)["rules"][1]["used"].clone()
        }
    };
    assert_eq!(inspect("ip:203.0.113.5").await, 2);
    assert_eq!(inspect("ip:2001:db8::5").await, 2);

    // RFC 7239 Forwarded, when the operator says proxies write it.
    let forwarded =
        Gatehouse::start(&toml.replace("[server]\n", "[server]\nreal_ip_header = \"forwarded\"\n"));
    assert_eq!(
        passes(
            &forwarded,
            3,
            "/",
            &[("forwarded", "for=6.6.6.6, for=unknown")]
        )
        .await,
        2,
        "not the allowlisted address"
    );
    assert_eq!(
        passes(
            &forwarded,
            3,
            "/",
            &[("forwarded", "for=\"[2001:db8::9]:80\";proto=https")]
        )
        .await,
        2
    );
}

/// Redis killed under load from many clients on four workers, then back:
/// shared limits resume within `breaker_cooldown` plus a second, on every
/// worker, not one worker per cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_resume_within_the_cooldown_under_load() {
    let upstream = TestUpstream::start("a").await;
    let mut redis = TestRedis::start();
    let toml = config(
        &upstream.url(),
        Some(&redis.url()),
        "per_user = 10000000\nglobal = 10000000\nredis_timeout = \"50ms\"\nbreaker_cooldown = \"2s\"",
        "",
    )
    .replace("workers = 2", "workers = 4");
    let gateway = Gatehouse::start(&toml);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = gateway.addr;
    let load: Vec<_> = (0..8)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                // Bounded: the test ends it, and it never runs past a minute.
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    let _ = get(addr, "/", &[]).await;
                }
            })
        })
        .collect();
    let fallbacks = "gatehouse_ratelimit_fallbacks_total{policy=\"local\"}";
    assert!(
        eventually(Duration::from_secs(5), async || {
            gateway.metric("gatehouse_ratelimit_shared").await == Some(1.0)
        })
        .await
    );

    redis.kill();
    assert!(
        eventually(Duration::from_secs(5), async || {
            gateway.metric(fallbacks).await.unwrap_or(0.0) > 100.0
        })
        .await,
        "decisions fall back while Redis is gone"
    );
    // The outage itself: long enough for several breaker cycles.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.restart();
    let back = Instant::now();

    // Resumed: no decision falls back for half a second while the load goes on.
    let mut resumed = None;
    while back.elapsed() < Duration::from_secs(15) {
        let before = gateway.metric(fallbacks).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if gateway.metric(fallbacks).await.unwrap() == before {
            resumed = Some(back.elapsed() - Duration::from_millis(500));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let resumed = resumed.expect("shared limits resumed within 15 s");
    eprintln!("shared limits resumed {resumed:?} after Redis answered");
    assert!(
        resumed <= Duration::from_secs(3),
        "shared limits resumed {resumed:?} after Redis answered; the cooldown is 2 s"
    );
    let key = format!("{}:rl:{{global}}:global", key_prefix(&toml));
    let counted = counted(&redis, &key);
    assert!(counted > 100, "Redis counts again: {counted}");
}
