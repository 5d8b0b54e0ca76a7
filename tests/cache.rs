//! The response cache against real servers: the `gatehouse` binary in front
//! of Gunicorn serving the example Django app, and of a scriptable upstream
//! where a test needs to count requests or reflect headers exactly.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use harness::{
    Gatehouse, Gunicorn, TestUpstream, curl, eventually, get, header_line, pattern, send,
};
use redis::TestRedis;

const SECRET: &str = "integration-test-secret-of-enough-length";

/// A gateway with the cache on (and rate limits off), in front of
/// `upstream`; `cache` goes under `[cache]`, `extra` after everything.
fn config(upstream: &str, cache: &str, extra: &str) -> String {
    let routes = if extra.contains("[[routes]]") {
        ""
    } else {
        "routes = []\n"
    };
    format!(
        "{routes}[server]\nworkers = 2\n\n[upstream.health_check]\nenabled = false\n\n\
         [[upstream.servers]]\nurl = \"{upstream}\"\n\n\
         [ratelimit]\nenabled = false\n\n\
         [identity.jwt]\nenabled = true\nsecret = \"{SECRET}\"\n\n\
         [cache]\nenabled = true\n{cache}\n\n{extra}\n"
    )
}

fn bearer(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {token}")
}

fn cache_status(headers: &http::HeaderMap) -> String {
    headers
        .get_all("cache-status")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_of(body: &[u8]) -> serde_json::Value {
    harness::json(body)
}

/// A POST of a new story by member 1; `host` as `Host` when given.
fn new_story(title: &str, host: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = Request::post("/v1/stories/").header("content-type", "application/json");
    if let Some(host) = host {
        request = request.header("host", host);
    }
    request
        .body(Full::new(Bytes::from(
            json!({"title": title, "author_id": 1}).to_string(),
        )))
        .unwrap()
}

/// `(story id, stories its writer then read in the list)` per writer: each
/// reader started after its own writer's 201, so with ids given in commit
/// order the writer of the story ranked `r` among them read more than
/// `base + r` stories, never a list from before its write.
fn assert_reads_follow_writes(seen: &[(i64, i64)], base: i64) {
    let mut ids: Vec<i64> = seen.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    for (id, total) in seen {
        let rank = ids.iter().position(|i| i == id).unwrap() as i64;
        assert!(
            *total > base + rank,
            "story {id}: a list of {total} stories"
        );
    }
}

/// `n` GETs at once of one slow page (`/delay/400`), spread over `gateways`;
/// every one gets the page.
async fn slow_burst(
    gateways: &[std::net::SocketAddr],
    n: usize,
    headers: &'static [(&'static str, &'static str)],
) {
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let addr = gateways[i % gateways.len()];
            tokio::spawn(async move { get(addr, "/delay/400", headers).await.unwrap() })
        })
        .collect();
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"slow");
    }
}

/// Whether entries under `prefix` reach Redis within five seconds (they are
/// written behind the answer).
async fn l2_holds_entries(redis: &TestRedis, prefix: &str) -> bool {
    eventually(Duration::from_secs(5), async || {
        !redis
            .cli(&["KEYS", &format!("{prefix}:c:e:*")])
            .trim()
            .is_empty()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_then_hits_with_age_and_cache_status_and_one_upstream_request() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "", ""));
    let (status, headers, first) = get(gateway.addr, "/things/?b=2&a=1", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        cache_status(&headers).contains("fwd=miss") && cache_status(&headers).contains("stored"),
        "{headers:?}"
    );
    // The same URI with its parameters in another order, twice.
    for _ in 0..2 {
        let (status, headers, body) = get(gateway.addr, "/things/?a=1&b=2", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, first, "served the stored body");
        assert!(
            cache_status(&headers).starts_with("gatehouse; hit"),
            "{headers:?}"
        );
        let age: u64 = headers["age"].to_str().unwrap().parse().unwrap();
        assert!(age < 5);
        // Each answer has its own request id, never the stored one.
        assert_ne!(headers["x-request-id"], "");
    }
    assert_eq!(upstream.hits(), 1);
    assert!(
        gateway
            .metric_reaches(
                "gatehouse_cache_lookups_total{layer=\"l1\",result=\"hit\",route=\"default\"}",
                2.0
            )
            .await
    );
    // HEAD is answered from the stored GET: its headers, no body.
    let (status, headers, _) = curl(&["-sI", &gateway.url("/things/?a=1&b=2")]);
    assert_eq!(status, 200);
    assert_eq!(
        header_line(&headers, "content-length"),
        Some(first.len().to_string().as_str())
    );
    assert!(
        header_line(&headers, "cache-status")
            .unwrap()
            .contains("hit")
    );
    assert_eq!(upstream.hits(), 1);
}

/// Large stored bodies go out from memory files (`sendfile`): every client
/// still gets every byte at its place, one answer after another on a
/// kept-alive connection, many at once, to a reader that reads slowly, and
/// over HTTP/2, which sends them by copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_hits_sent_from_memory_files_arrive_byte_for_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "", ""));
    let (large, slow) = (pattern(300_000), pattern(1_000_000));
    for (path, expected) in [("/pattern/300000", &large), ("/pattern/1000000", &slow)] {
        let (status, headers, body) = get(gateway.addr, path, &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(cache_status(&headers).contains("stored"), "{headers:?}");
        assert!(body == expected, "the miss's body differs");
    }
    let l1_files = "gatehouse_cache_l1_files";
    assert!(gateway.metric(l1_files).await >= Some(2.0));
    let sent = "gatehouse_cache_l1_file_sent_bytes_total";
    let sent_before = gateway.metric(sent).await.unwrap();

    // Three answers on one kept-alive connection.
    let dir = tempfile::tempdir().unwrap();
    let url = gateway.url("/pattern/300000");
    let outs: Vec<_> = (0..3).map(|i| dir.path().join(format!("out{i}"))).collect();
    let mut args = vec!["-s", "--http1.1"];
    for out in &outs {
        args.extend(["-o", out.to_str().unwrap(), &url]);
    }
    let (status, headers, _) = curl(&args);
    assert_eq!(status, 200);
    assert_eq!(
        headers.matches("cache-status: gatehouse; hit").count(),
        3,
        "{headers}"
    );
    for out in &outs {
        assert!(
            std::fs::read(out).unwrap() == large,
            "a kept-alive answer differs"
        );
    }

    // Sixteen at once.
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let addr = gateway.addr;
        answers.spawn(async move { get(addr, "/pattern/300000", &[]).await });
    }
    while let Some(answer) = answers.join_next().await {
        let (status, headers, body) = answer.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(cache_status(&headers).starts_with("gatehouse; hit"));
        assert!(body == large, "a concurrent answer differs");
    }

    // A reader with a small window that reads 8 KiB at a time: the body
    // goes out in many partial sends.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gateway.addr).await.unwrap();
    let request = format!(
        "GET /pattern/1000000 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gateway.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0; 8192];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    assert!(head.contains("cache-status: gatehouse; hit"), "{head}");
    assert!(got[end..] == slow[..], "the slow reader's body differs");

    // HTTP/2.
    let out = dir.path().join("h2");
    let (status, headers, _) =
        curl(&["--http2-prior-knowledge", "-o", out.to_str().unwrap(), &url]);
    assert_eq!(status, 200);
    assert!(headers.starts_with("http/2"), "{headers}");
    assert!(
        std::fs::read(&out).unwrap() == large,
        "the HTTP/2 answer differs"
    );

    // The HTTP/1.1 hits went out from the files.
    let sent_after = gateway.metric(sent).await.unwrap();
    assert!(
        sent_after - sent_before >= (19 * 300_000 + 1_000_000) as f64,
        "sent from files: {sent_before} then {sent_after}"
    );
    assert_eq!(upstream.hits(), 2);
}

/// A client that never reads a large hit fills its socket: the sends from
/// the memory file stop, and the connection is closed at `send_timeout`
/// while other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_a_large_hit_are_closed_at_send_timeout() {
    use std::io::Write;

    let upstream = TestUpstream::start("a").await;
    let toml = config(&upstream.url(), "max_entry_size = \"16MiB\"", "")
        .replace("[server]\n", "[server]\nsend_timeout = \"2s\"\n")
        .replace(
            "[upstream.health_check]",
            "[upstream]\nresponse_buffer_size = \"32MiB\"\n\n[upstream.health_check]",
        );
    let gateway = Gatehouse::start(&toml);
    // More than the socket buffers on both sides hold.
    let size = 16_000_000;
    let path = format!("/pattern/{size}");
    let expected = pattern(size);
    let (status, headers, body) = get(gateway.addr, &path, &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&headers).contains("stored"), "{headers:?}");
    assert!(body == expected);
    assert!(gateway.metric("gatehouse_cache_l1_files").await >= Some(1.0));

    let stuck: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(gateway.addr).unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", gateway.addr);
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    let (status, headers, body) = get(gateway.addr, &path, &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&headers).starts_with("gatehouse; hit"));
    assert!(body == expected, "a reading client's body differs");
    let closed = "gatehouse_http_connections_closed_total{reason=\"send_timeout\"}";
    assert!(gateway.metric_reaches(closed, 2.0).await);
    drop(stuck);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "", ""));
    slow_burst(&[gateway.addr], 100, &[]).await;
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_for_one_client_are_never_served_to_another() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        "",
        "[identity.session]\nenabled = true\ncookie = \"sessionid\"\n",
    ));
    let anonymous = async |path: &str| {
        let (_, headers, body) = get(gateway.addr, path, &[]).await.unwrap();
        (cache_status(&headers), json_of(&body))
    };
    // Authorization: the response is not stored, and no stored response
    // answers it.
    let (_, headers, _) = get(gateway.addr, "/auth/", &[("authorization", &bearer("7"))])
        .await
        .unwrap();
    assert!(cache_status(&headers).contains("fwd=bypass"), "{headers:?}");
    let (status, body) = anonymous("/auth/").await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert!(body["headers"].get("authorization").is_none(), "{body}");
    let (_, headers, body) = get(gateway.addr, "/auth/", &[("authorization", &bearer("7"))])
        .await
        .unwrap();
    assert!(cache_status(&headers).contains("fwd=bypass"));
    assert!(json_of(&body)["headers"]["authorization"].is_array());
    // A session cookie: the same.
    let (_, headers, _) = get(gateway.addr, "/session/", &[("cookie", "sessionid=abc")])
        .await
        .unwrap();
    assert!(cache_status(&headers).contains("fwd=bypass"));
    let (status, body) = anonymous("/session/").await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert!(body["headers"].get("cookie").is_none());
    // Gunicorn answering with Set-Cookie, private or no-store: never stored.
    for path in ["/set-cookie/", "/private/", "/no-store/"] {
        for _ in 0..2 {
            let (status, _) = anonymous(path).await;
            assert!(status.contains("fwd=miss"), "{path}: {status}");
        }
    }
    // Three with credentials, two anonymous, six uncacheable.
    assert_eq!(upstream.hits(), 3 + 2 + 6);
}

/// Unkeyed headers that Django may reflect cannot plant a response for
/// requests without them: they are part of the key (and from untrusted
/// peers they never reach Django at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflected_headers_cannot_poison_the_cache() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "", "").replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    ));
    for (name, value) in [
        ("x-forwarded-host", "evil.example"),
        ("x-original-url", "/admin/"),
        ("x-rewrite-url", "/admin/"),
        ("x-forwarded-proto", "https"),
    ] {
        let path = format!("/page/{name}/");
        let (_, _, poisoned) = get(gateway.addr, &path, &[(name, value)]).await.unwrap();
        assert_eq!(json_of(&poisoned)["headers"][name][0], value);
        let (_, headers, clean) = get(gateway.addr, &path, &[]).await.unwrap();
        assert!(cache_status(&headers).contains("fwd=miss"), "{name}");
        let body = json_of(&clean);
        assert!(
            body["headers"].get(name).is_none_or(|v| v[0] != value),
            "{name}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_routes_keep_each_users_copy_apart_and_ignore_forged_tokens() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        "",
        "[[routes]]\nname = \"me\"\npath_prefix = \"/me/\"\nper_user = true\n",
    ));
    let ask = async |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> =
            auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        let (_, headers, body) = get(gateway.addr, "/me/", &headers).await.unwrap();
        let seen = json_of(&body)["headers"]["authorization"][0]
            .as_str()
            .unwrap_or("")
            .to_string();
        (cache_status(&headers), seen)
    };
    let (alice, bob) = (bearer("alice"), bearer("bob"));
    assert!(ask(Some(&alice)).await.0.contains("stored"));
    let (status, seen) = ask(Some(&alice)).await;
    assert!(status.contains("hit"), "{status}");
    assert_eq!(seen, alice);
    let (status, seen) = ask(Some(&bob)).await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert_eq!(seen, bob);
    let (status, seen) = ask(None).await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert_eq!(seen, "");
    // A token the gateway cannot verify reads nothing and stores nothing.
    let forged = format!("{}x", &alice);
    for _ in 0..2 {
        let (status, seen) = ask(Some(&forged)).await;
        assert!(status.contains("detail=unverified"), "{status}");
        assert_eq!(seen, forged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_directives_are_honoured() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "", ""));
    // only-if-cached with nothing stored: 504, and nothing reaches Django.
    let (status, _, _) = get(gateway.addr, "/d/", &[("cache-control", "only-if-cached")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(upstream.hits(), 0);
    get(gateway.addr, "/d/", &[]).await.unwrap();
    let (status, headers, _) = get(gateway.addr, "/d/", &[("cache-control", "only-if-cached")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&headers).contains("hit"));
    // no-cache goes to the upstream, and what comes back is stored.
    let (_, headers, _) = get(gateway.addr, "/d/", &[("cache-control", "no-cache")])
        .await
        .unwrap();
    assert!(
        cache_status(&headers).contains("fwd=request"),
        "{headers:?}"
    );
    assert_eq!(upstream.hits(), 2);
    let (_, headers, _) = get(gateway.addr, "/d/", &[("pragma", "no-cache")])
        .await
        .unwrap();
    assert!(cache_status(&headers).contains("fwd=request"));
    // max-age=0: too old for this client.
    let (_, headers, _) = get(gateway.addr, "/d/", &[("cache-control", "max-age=0")])
        .await
        .unwrap();
    assert!(!cache_status(&headers).contains("hit"), "{headers:?}");
    assert_eq!(upstream.hits(), 4);
}

/// Django under Gunicorn: an ETag from `ConditionalGetMiddleware`, a 304
/// from the cache for the client's `If-None-Match`, and a stale entry
/// revalidated with a conditional request that Django answers with 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_and_revalidation_with_django() {
    let gunicorn = Gunicorn::start(2);
    let gateway = Gatehouse::start(&config(
        &gunicorn.upstream_url(),
        "",
        "[[routes]]\nname = \"users\"\npath_prefix = \"/v1/users/\"\ncache_ttl = \"2s\"\n",
    ));
    let (status, headers, body) = get(gateway.addr, "/v1/users/1/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let etag = headers["etag"].to_str().unwrap().to_string();
    let (status, headers, empty) = get(gateway.addr, "/v1/users/1/", &[("if-none-match", &etag)])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(empty.is_empty());
    assert_eq!(headers["etag"], etag.as_str());
    assert!(cache_status(&headers).contains("hit"));
    // Stale after two seconds: revalidated, Django says 304, the stored body
    // is served with a fresh age.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, headers, again) = get(gateway.addr, "/v1/users/1/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, body);
    let value = cache_status(&headers);
    assert!(
        value.contains("fwd=stale; fwd-status=304; stored"),
        "{value}"
    );
    let (_, headers, _) = get(gateway.addr, "/v1/users/1/", &[]).await.unwrap();
    assert!(cache_status(&headers).contains("hit"));
}

/// A write through the gateway makes what it changed stale before its
/// client hears back: the story list read right after a POST always holds
/// the new story, with many writers and readers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_invalidates_its_uri_location_and_route_tags() {
    let gunicorn = Gunicorn::start(2);
    let gateway = Gatehouse::start(&config(
        &gunicorn.upstream_url(),
        "",
        "[[routes]]\nname = \"story\"\npath_pattern = \"/v1/stories/{id}/\"\n\
         tags = [\"story:{id}\"]\ninvalidates = [\"story:{id}\", \"stories\"]\n\n\
         [[routes]]\nname = \"stories\"\npath_prefix = \"/v1/stories/\"\ntags = [\"stories\"]\n",
    ));
    let addr = gateway.addr;
    let count = async || {
        let (_, headers, body) = get(addr, "/v1/stories/", &[]).await.unwrap();
        (
            json_of(&body)["count"].as_i64().unwrap(),
            cache_status(&headers),
        )
    };
    let (before, _) = count().await;
    assert!(count().await.1.contains("hit"));
    let (status, headers, body) = send(addr, new_story("one", None)).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let id = json_of(&body)["id"].as_i64().unwrap();
    assert_eq!(headers["location"], format!("/v1/stories/{id}/").as_str());
    let (after, status) = count().await;
    assert_eq!(after, before + 1, "{status}");

    // A story's page: cached, then stale after its PATCH (route tag), and
    // the list with it (the route's `invalidates`).
    let detail = format!("/v1/stories/{id}/");
    get(addr, &detail, &[]).await.unwrap();
    assert!(cache_status(&get(addr, &detail, &[]).await.unwrap().1).contains("hit"));
    assert!(count().await.1.contains("hit"));
    let patch = Request::patch(detail.as_str())
        .body(Full::new(Bytes::from("{\"title\": \"renamed\"}")))
        .unwrap();
    assert_eq!(send(addr, patch).await.unwrap().0, StatusCode::OK);
    let (_, _, body) = get(addr, &detail, &[]).await.unwrap();
    assert_eq!(json_of(&body)["title"], "renamed");
    assert!(count().await.1.contains("fwd=miss"));
    // A refused write (400) changed nothing: the list stays cached.
    let bad = Request::post("/v1/stories/")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(send(addr, bad).await.unwrap().0, StatusCode::BAD_REQUEST);
    assert!(count().await.1.contains("hit"));

    // Writers and readers at once: a reader that starts after its writer's
    // 201 always sees that story.
    let rounds: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(async move {
                let (status, _, body) = send(addr, new_story(&format!("race {i}"), None))
                    .await
                    .unwrap();
                assert_eq!(status, StatusCode::CREATED);
                let id = json_of(&body)["id"].as_i64().unwrap();
                let (_, _, list) = get(addr, "/v1/stories/", &[]).await.unwrap();
                (id, json_of(&list)["count"].as_i64().unwrap())
            })
        })
        .collect();
    let mut seen = Vec::new();
    for round in rounds {
        seen.push(round.await.unwrap());
    }
    assert_reads_follow_writes(&seen, after);
}

/// Gunicorn killed: an entry within `stale-if-error` is served, the rest
/// gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_while_gunicorn_is_down() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&config(
        &gunicorn.upstream_url(),
        "",
        "[[routes]]\nname = \"users\"\npath_prefix = \"/v1/users/\"\ncache_ttl = \"1s\"\n\
         stale_if_error = \"60s\"\n",
    ));
    let (status, _, body) = get(gateway.addr, "/v1/users/1/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(gunicorn);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, headers, stale) = get(gateway.addr, "/v1/users/1/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stale, body);
    assert!(
        cache_status(&headers).contains("detail=stale-if-error"),
        "{headers:?}"
    );
    let (status, _, _) = get(gateway.addr, "/v1/users/2/", &[]).await.unwrap();
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_need_the_token_and_drop_or_stale_what_they_name() {
    const TOKEN: &str = "purge-token-of-enough-length";
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        &format!("purge_token = \"{TOKEN}\""),
        "[[routes]]\nname = \"things\"\npath_prefix = \"/t/\"\ntags = [\"things\"]\n\n\
         [[routes]]\nname = \"pages\"\npath_prefix = \"/p/\"\n",
    ));
    let status_of = async |path: &str| cache_status(&get(gateway.addr, path, &[]).await.unwrap().1);
    let purge = async |query: &str, token: Option<&str>| {
        let mut request = Request::post(format!("/cache/purge?{query}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        send(
            gateway.admin,
            request.body(Full::new(Bytes::new())).unwrap(),
        )
        .await
        .unwrap()
    };
    status_of("/p/1?x=1").await;
    assert!(status_of("/p/1?x=1").await.contains("hit"));
    let url = format!("url=http%3A%2F%2F{}%2Fp%2F1%3Fx%3D1", gateway.addr);
    // Without the token, or with another: refused, nothing purged.
    assert_eq!(purge(&url, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        purge(&url, Some("purge-token-of-enough-lengtH")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(status_of("/p/1?x=1").await.contains("hit"));
    let (status, _, body) = purge(&url, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(status_of("/p/1?x=1").await.contains("fwd=miss"));
    // By tag, soft: the entry stays but is stale, so it is fetched again.
    status_of("/t/a").await;
    assert!(status_of("/t/a").await.contains("hit"));
    assert_eq!(
        purge("tag=things&soft=1", Some(TOKEN)).await.0,
        StatusCode::OK
    );
    let after = status_of("/t/a").await;
    assert!(
        after.contains("fwd=stale") && after.contains("stored"),
        "{after}"
    );
    assert!(status_of("/t/a").await.contains("hit"));
    // Malformed purges say what is wrong.
    assert_eq!(
        purge("tag=things&bogus=1", Some(TOKEN)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        purge("url=/relative", Some(TOKEN)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(purge("", Some(TOKEN)).await.0, StatusCode::BAD_REQUEST);
    // The token never shows in the log or the metrics.
    let (_, _, metrics) = get(gateway.admin, "/metrics", &[]).await.unwrap();
    assert!(!String::from_utf8_lossy(&metrics).contains(TOKEN));
    assert!(!gateway.log().contains(TOKEN));
    // `.cache` in /metrics/json: hit ratios by route.
    let (_, _, body) = get(gateway.admin, "/metrics/json", &[]).await.unwrap();
    let cache = &json_of(&body)["cache"];
    assert!(cache["hits"].as_u64().unwrap() >= 3, "{cache}");
    assert!(
        cache["by_route"]["things"]["hit_ratio"].as_f64().unwrap() > 0.0,
        "{cache}"
    );
    assert!(cache["l1"]["entries"].as_u64().unwrap() >= 1, "{cache}");
}

/// A unique key prefix per test: tests share one Redis.
fn prefix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "c{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A gateway with L2 in `redis` under `prefix`. Redis calls may take up to
/// two seconds: these tests are about a Redis that answers, also on a
/// machine whose CPU is saturated (a call past `redis_timeout` counts as
/// Redis being down, when L1 answers alone).
fn with_redis(upstream: &str, redis: &str, prefix: &str, cache: &str, extra: &str) -> String {
    config(
        upstream,
        &format!("key_prefix = \"{prefix}\"\nredis_timeout = \"2s\"\n{cache}"),
        &format!("[redis]\nurl = \"{redis}\"\n\n{extra}"),
    )
}

const STORIES: &str =
    "[[routes]]\nname = \"stories\"\npath_prefix = \"/v1/stories/\"\ntags = [\"stories\"]\n";

/// The site's name, the same through every gateway (the test's gateways
/// listen on different ports, which a client's `Host` would otherwise name).
const SITE: &[(&str, &str)] = &[("host", "stories.example")];

/// Two gateways on one Redis: the second answers from the first one's L2
/// entry; when L1 lets an entry go, L2 still has it; and a story POSTed
/// through one gateway is in the list read through the other right after,
/// also with writers and readers running at once on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_l2_and_see_each_others_writes() {
    let redis = TestRedis::shared();
    let gunicorn = Gunicorn::start(2);
    let prefix = prefix();
    let toml = with_redis(
        &gunicorn.upstream_url(),
        &redis.url(),
        &prefix,
        "l1_ttl = \"1s\"",
        STORIES,
    );
    let (a, b) = (Gatehouse::start(&toml), Gatehouse::start(&toml));
    let l2_hits = "gatehouse_cache_lookups_total{layer=\"l2\",result=\"hit\",route=\"stories\"}";
    let (status, headers, first) = get(a.addr, "/v1/stories/?page=2", SITE).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&headers).contains("stored"));
    // The write to Redis happens behind the answer.
    assert!(l2_holds_entries(redis, &prefix).await);
    let (_, headers, body) = get(b.addr, "/v1/stories/?page=2", SITE).await.unwrap();
    assert!(cache_status(&headers).contains("hit"), "{headers:?}");
    assert_eq!(body, first);
    assert_eq!(b.metric(l2_hits).await, Some(1.0));
    // Out of A's L1 after l1_ttl, still in L2.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, headers, _) = get(a.addr, "/v1/stories/?page=2", SITE).await.unwrap();
    assert!(cache_status(&headers).contains("hit"));
    assert_eq!(a.metric(l2_hits).await, Some(1.0));

    let count = async |gateway: &Gatehouse| {
        let (_, _, body) = get(gateway.addr, "/v1/stories/", SITE).await.unwrap();
        json_of(&body)["count"].as_i64().unwrap()
    };
    // Both gateways hold the list in L1.
    let before = count(&a).await;
    assert_eq!(count(&b).await, before);
    for round in 0..10 {
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let post = new_story(&format!("round {round}"), Some(SITE[0].1));
        assert_eq!(
            send(writer.addr, post).await.unwrap().0,
            StatusCode::CREATED
        );
        assert_eq!(count(reader).await, before + round + 1, "round {round}");
    }
    // At once: each reader, started after its own writer's answer, sees at
    // least every story written before.
    let (a_addr, b_addr) = (a.addr, b.addr);
    let rounds: Vec<_> = (0..12)
        .map(|i| {
            tokio::spawn(async move {
                let (writer, reader) = if i % 2 == 0 {
                    (a_addr, b_addr)
                } else {
                    (b_addr, a_addr)
                };
                let post = new_story(&format!("race {i}"), Some(SITE[0].1));
                let (status, _, body) = send(writer, post).await.unwrap();
                assert_eq!(status, StatusCode::CREATED);
                let id = json_of(&body)["id"].as_i64().unwrap();
                let (_, _, list) = get(reader, "/v1/stories/", SITE).await.unwrap();
                (id, json_of(&list)["count"].as_i64().unwrap())
            })
        })
        .collect();
    let mut seen = Vec::new();
    for round in rounds {
        seen.push(round.await.unwrap());
    }
    assert_reads_follow_writes(&seen, before + 10);
}

/// Redis killed and started again while clients keep reading: no 5xx at
/// any point; L1 and Gunicorn carry on, and L2 is used again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_costs_no_errors() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::start("a").await;
    let prefix = prefix();
    let gateway = Gatehouse::start(&with_redis(&upstream.url(), &redis.url(), &prefix, "", ""));
    let addr = gateway.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let mut answers = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let path = format!("/load/{}/", answers % 7 + i);
                    let (status, _, _) = get(addr, &path, &[]).await.unwrap();
                    assert!(status.is_success(), "{path}: {status}");
                    answers += 1;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gateway.metric("gatehouse_cache_l2_up").await, Some(0.0));
    redis.restart();
    assert!(gateway.metric_reaches("gatehouse_cache_l2_up", 1.0).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        assert!(task.await.unwrap() > 0);
    }
    // Entries go to the restarted Redis again.
    get(addr, "/after/", &[]).await.unwrap();
    assert!(l2_holds_entries(&redis, &prefix).await);
    assert!(gateway.log().contains("redis unavailable"));
}

/// The seed's 3+3 Redis Cluster: entries spread over the slots, tag
/// versions and the generation in one slot, invalidations through the
/// cluster's pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_and_invalidation_work_on_a_redis_cluster() {
    let upstream = TestUpstream::start("a").await;
    let cluster = redis::TestRedisCluster::start();
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let toml = config(
        &upstream.url(),
        "key_prefix = \"cluster\"\nredis_timeout = \"2s\"",
        &format!(
            "[redis]\ncluster_nodes = [{}]\n\n[[routes]]\nname = \"things\"\npath_prefix = \"/things/\"\ntags = [\"things\"]\n",
            nodes.join(", ")
        ),
    );
    let (a, b) = (Gatehouse::start(&toml), Gatehouse::start(&toml));
    let l2_hits = "gatehouse_cache_lookups_total{layer=\"l2\",result=\"hit\",route=\"things\"}";
    // Several keys, so that entries land on more than one master.
    for i in 0..6 {
        let path = format!("/things/{i}/");
        assert!(cache_status(&get(a.addr, &path, SITE).await.unwrap().1).contains("stored"));
    }
    assert!(
        eventually(Duration::from_secs(5), async || {
            let mut found = 0;
            for i in 0..6 {
                let (_, headers, _) = get(b.addr, &format!("/things/{i}/"), SITE).await.unwrap();
                found += usize::from(cache_status(&headers).contains("hit"));
            }
            found == 6
        })
        .await
    );
    assert!(b.metric(l2_hits).await.unwrap_or(0.0) >= 6.0);
    // A write through A: B's copies of the route's entries are gone.
    let post = Request::post("/things/0/")
        .header("host", SITE[0].1)
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(send(a.addr, post).await.unwrap().0, StatusCode::OK);
    for i in 0..6 {
        let (_, headers, _) = get(b.addr, &format!("/things/{i}/"), SITE).await.unwrap();
        assert!(
            cache_status(&headers).contains("fwd=miss"),
            "{i}: {headers:?}"
        );
    }
}

/// Django names its tags with the helper package (`gatehouse_cache`): a
/// PATCH's response makes the story's page and the lists stale, a member's
/// page stays; `manage.py cache_invalidate` does the same from outside HTTP.
/// The tag header never reaches a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_tags_its_pages_and_invalidates_from_the_shell() {
    let redis = TestRedis::shared();
    let prefix = prefix();
    // redis-py spells a Unix socket `unix://`.
    let django_redis = redis.url().replace("redis+unix://", "unix://");
    let env = [
        ("GATEHOUSE_REDIS_URL", django_redis.as_str()),
        ("GATEHOUSE_CACHE_PREFIX", prefix.as_str()),
    ];
    let gunicorn = Gunicorn::start_with_env(2, &env);
    let gateway = Gatehouse::start(&with_redis(
        &gunicorn.upstream_url(),
        &redis.url(),
        &prefix,
        "",
        "",
    ));
    let status_of = async |path: &str| {
        let (status, headers, body) = get(gateway.addr, path, SITE).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            !headers.contains_key("surrogate-key"),
            "{path}: {headers:?}"
        );
        (cache_status(&headers), json_of(&body))
    };
    let (_, story) = status_of("/v1/stories/1/").await;
    let author = story["author_id"].as_i64().unwrap();
    let member = format!("/v1/users/{author}/");
    status_of("/v1/stories/").await;
    status_of(&member).await;
    // Stored behind the answers (in L2 too); a gateway still subscribing to
    // invalidations reads L2 rather than trust its L1.
    for path in ["/v1/stories/1/", "/v1/stories/", member.as_str()] {
        assert!(
            eventually(Duration::from_secs(5), async || status_of(path)
                .await
                .0
                .contains("hit"))
            .await,
            "{path}"
        );
    }
    let patch = Request::patch("/v1/stories/1/")
        .header("host", SITE[0].1)
        .body(Full::new(Bytes::from("{\"title\": \"tagged\"}")))
        .unwrap();
    let (status, headers, _) = send(gateway.addr, patch).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("surrogate-key"));
    let (status, story) = status_of("/v1/stories/1/").await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert_eq!(story["title"], "tagged");
    assert!(status_of("/v1/stories/").await.0.contains("fwd=miss"));
    assert!(status_of(&member).await.0.contains("hit"));

    let venv = std::env::var_os("GATEHOUSE_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| harness::repo_root().join(".venv"));
    let out = std::process::Command::new(venv.join("bin/python"))
        .current_dir(harness::repo_root().join("examples/django"))
        .args(["manage.py", "cache_invalidate", &format!("member:{author}")])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status_of(&member).await.0.contains("fwd=miss"));
    assert!(status_of("/v1/stories/1/").await.0.contains("hit"));
}

/// `gatehouse cache warm` with a list and a sitemap, and `cache.warm` at
/// start: afterwards those pages are answered from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_fills_the_cache_from_lists_sitemaps_and_at_start() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(&upstream.url(), "warm = [\"/at-start/\"]", ""));
    assert!(
        eventually(Duration::from_secs(10), async || upstream.hits() == 1).await,
        "the start-up warm-up fetched its page"
    );
    let (_, headers, _) = get(gateway.addr, "/at-start/", &[]).await.unwrap();
    assert!(cache_status(&headers).contains("hit"), "{headers:?}");

    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("hot.txt");
    std::fs::write(&list, "# hot pages\n/list/1/\n/list/2/?b=2&a=1\n").unwrap();
    let sitemap = dir.path().join("sitemap.xml");
    let host = gateway.addr.to_string();
    std::fs::write(
        &sitemap,
        format!("<urlset><url><loc>http://{host}/map/1/</loc></url><url><loc>http://{host}/status/500</loc></url></urlset>"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["cache", "warm", "--gateway", &host])
        .arg(&list)
        .arg(&sitemap)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The 500 is reported and makes the command fail; the rest is stored.
    assert!(!out.status.success());
    assert!(stdout.contains("4 URLs: 3 stored"), "{stdout}");
    assert!(stderr.contains("/status/500: status 500"), "{stderr}");
    for path in ["/list/1/", "/list/2/?a=1&b=2", "/map/1/"] {
        let (_, headers, _) = get(gateway.addr, path, &[]).await.unwrap();
        assert!(
            cache_status(&headers).contains("hit"),
            "{path}: {headers:?}"
        );
    }
    // A missing list is a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["cache", "warm", "--gateway", &host, "/nonexistent/list.txt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/list.txt"));
}

/// With `l2_lock`, concurrent misses of one key through two gateways make
/// one request to the upstream: the second gateway waits for the first
/// one's entry in L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_across_gateways_make_one_request_with_the_redis_lock() {
    let redis = TestRedis::shared();
    let upstream = TestUpstream::start("a").await;
    let toml = with_redis(
        &upstream.url(),
        &redis.url(),
        &prefix(),
        "l2_lock = true",
        "",
    );
    let (a, b) = (Gatehouse::start(&toml), Gatehouse::start(&toml));
    slow_burst(&[a.addr, b.addr], 40, SITE).await;
    assert_eq!(upstream.hits(), 1);
}

/// A gateway that cannot follow the invalidation channel (Redis refuses its
/// user every channel) says so in its log and metrics, and still coalesces
/// concurrent misses into one request: an L1 entry fetched at Redis's
/// generation of now has missed no invalidation. Once another gateway's
/// write moves that generation, the entry is not trusted any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_follow_invalidations_still_coalesces_and_sees_writes() {
    let redis = TestRedis::shared();
    let set = redis.cli(&[
        "ACL",
        "SETUSER",
        "no-channels",
        "on",
        ">no-channels-secret",
        "~*",
        "resetchannels",
        "+@all",
    ]);
    assert_eq!(set.trim(), "OK");
    let upstream = TestUpstream::start("a").await;
    let prefix = prefix();
    let refused = format!("{}?user=no-channels&pass=no-channels-secret", redis.url());
    let gateway = Gatehouse::start(&with_redis(&upstream.url(), &refused, &prefix, "", ""));
    assert!(
        eventually(Duration::from_secs(10), async || {
            gateway
                .log()
                .contains("cannot follow the invalidation channel")
        })
        .await,
        "{}",
        gateway.log()
    );
    assert!(!gateway.log().contains("no-channels-secret"));
    assert_eq!(
        gateway.metric("gatehouse_cache_l2_following").await,
        Some(0.0)
    );
    assert_eq!(gateway.metric("gatehouse_cache_l2_up").await, Some(1.0));
    slow_burst(&[gateway.addr], 20, SITE).await;
    assert_eq!(upstream.hits(), 1);
    // From L1: the entry was fetched at the generation Redis still holds.
    let l1_hits = "gatehouse_cache_lookups_total{layer=\"l1\",result=\"hit\",route=\"default\"}";
    let before = gateway.metric(l1_hits).await.unwrap_or(0.0);
    let (_, headers, _) = get(gateway.addr, "/delay/400", SITE).await.unwrap();
    assert!(cache_status(&headers).contains("hit"), "{headers:?}");
    assert_eq!(gateway.metric(l1_hits).await, Some(before + 1.0));

    let other = Gatehouse::start(&with_redis(&upstream.url(), &redis.url(), &prefix, "", ""));
    let post = Request::post("/delay/400")
        .header("host", SITE[0].1)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(other.addr, post).await.unwrap().0, StatusCode::OK);
    let (_, headers, _) = get(gateway.addr, "/delay/400", SITE).await.unwrap();
    assert!(cache_status(&headers).contains("fwd=miss"), "{headers:?}");
    assert_eq!(upstream.hits(), 3);
}

/// `stale-while-revalidate`: a stale entry answers at once and one refresh
/// runs behind it; a HEAD answered in that window refreshes nothing (it
/// could not refill a GET's entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_behind() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&config(
        &upstream.url(),
        "",
        "[[routes]]\nname = \"swr\"\npath_prefix = \"/swr/\"\ncache_ttl = \"3s\"\n\
         stale_while_revalidate = \"30s\"\n",
    ));
    let (_, _, first) = get(gateway.addr, "/swr/a/", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let head = Request::head("/swr/a/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(gateway.addr, head).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert!(cache_status(&headers).contains("detail=stale-while-revalidate"));
    let (_, headers, stale) = get(gateway.addr, "/swr/a/", &[]).await.unwrap();
    assert_eq!(stale, first, "the stale entry answered");
    assert!(cache_status(&headers).contains("detail=stale-while-revalidate"));
    // The refresh stored a new response (the echo differs per request),
    // fresh for three seconds.
    assert!(
        eventually(Duration::from_secs(3), async || {
            let (_, headers, body) = get(gateway.addr, "/swr/a/", &[]).await.unwrap();
            let status = cache_status(&headers);
            body != first && status.contains("; hit; ttl=") && !status.contains("detail=")
        })
        .await
    );
    assert_eq!(upstream.hits(), 2);
    assert_eq!(
        gateway
            .metric("gatehouse_cache_background_refreshes_total")
            .await,
        Some(1.0)
    );
}

/// A reload onto another key prefix starts following that prefix's
/// invalidations: L1 answers again once it is caught up with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_prefix_follows_its_invalidations() {
    let redis = TestRedis::shared();
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&with_redis(
        &upstream.url(),
        &redis.url(),
        &prefix(),
        "",
        "",
    ));
    let l1_hits = "gatehouse_cache_lookups_total{layer=\"l1\",result=\"hit\",route=\"default\"}";
    let second = prefix();
    gateway.rewrite_config(&with_redis(&upstream.url(), &redis.url(), &second, "", ""));
    gateway.signal("HUP");
    assert!(
        gateway
            .metric_reaches("gatehouse_config_reloads_total{result=\"ok\"}", 1.0)
            .await
    );
    // The new prefix's subscriber empties L1 when it connects, so a fetch
    // that began before that is not stored: it may have missed a write.
    // The next one is.
    assert!(
        eventually(Duration::from_secs(5), async || {
            get(gateway.addr, "/r/", &[]).await.unwrap();
            !redis
                .cli(&["KEYS", &format!("{second}:c:e:*")])
                .trim()
                .is_empty()
        })
        .await,
        "L2 holds entries under the new prefix"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            get(gateway.addr, "/r/", &[]).await.unwrap();
            gateway.metric(l1_hits).await.unwrap_or(0.0) >= 1.0
        })
        .await,
        "L1 answers under the new prefix"
    );
    // A write under the new prefix, published by another gateway, reaches it.
    let other = Gatehouse::start(&with_redis(&upstream.url(), &redis.url(), &second, "", ""));
    // The site's name as the first gateway was asked it, so the key is one.
    let post = Request::post("/r/")
        .header("host", gateway.addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(other.addr, post).await.unwrap().0, StatusCode::OK);
    let (_, headers, _) = get(gateway.addr, "/r/", &[]).await.unwrap();
    assert!(cache_status(&headers).contains("fwd=miss"), "{headers:?}");
}
