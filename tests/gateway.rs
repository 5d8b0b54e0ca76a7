//! The gateway against real servers: the `gatehouse` binary in front of a
//! scriptable Rust upstream and of Gunicorn serving the example Django app.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[path = "support/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use harness::{
    Gatehouse, Gunicorn, TestUpstream, curl, eventually, get, header_line, json, raw_exchange,
    send, status_of,
};

/// A gateway config: `servers` as upstream URLs, extra lines for `[server]`
/// and `[upstream]`, and `health` lines for `[upstream.health_check]` (empty:
/// active checks off). These tests are about forwarding, so every request
/// must reach an upstream: the response cache is off (tests/cache.rs has it on).
fn config(servers: &[String], server: &str, upstream: &str, health: &str) -> String {
    let health = if health.is_empty() {
        "enabled = false".to_string()
    } else {
        format!("enabled = true\n{health}")
    };
    let servers: String = servers
        .iter()
        .map(|url| format!("[[upstream.servers]]\nurl = \"{url}\"\n"))
        .collect();
    format!(
        "[server]\nworkers = 2\n{server}\n\n[upstream]\n{upstream}\n\n\
         [upstream.health_check]\n{health}\n\n{servers}\n[log]\naccess_log = true\n\n\
         [cache]\nenabled = false\n"
    )
}

fn simple(servers: &[String]) -> String {
    config(servers, "", "", "")
}

/// One test upstream named `name` behind a gateway with extra `[server]` and
/// `[upstream]` lines.
async fn gateway_with(name: &str, server: &str, upstream: &str) -> (TestUpstream, Gatehouse) {
    let test_upstream = TestUpstream::start(name).await;
    let gateway = Gatehouse::start(&config(&[test_upstream.url()], server, upstream, ""));
    (test_upstream, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_method_path_query_body_and_headers() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let request = Request::post("/v1/things/7/?x=1&y=two")
        .header("host", "shop.example")
        .header("x-custom", "kept")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    let (status, headers, body) = send(gateway.addr, request).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/v1/things/7/");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["body"], "{\"n\":1}");
    assert_eq!(echo["version"], "HTTP/1.1");
    let h = &echo["headers"];
    assert_eq!(h["x-custom"][0], "kept");
    assert_eq!(h["host"][0], "shop.example");
    assert_eq!(h["content-length"], serde_json::json!(["7"]), "{h}");
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "shop.example");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(h["x-request-id"][0], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let upstream = TestUpstream::start("a").await;
    let untrusted = Gatehouse::start(&simple(&[upstream.url()]));
    let trusted = Gatehouse::start(&config(
        &[upstream.url()],
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "",
        "",
    ));
    let spoof = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-request-id", "chosen-by-client"),
        ("x-original-url", "/admin/"),
    ];

    // Each field reaches Gunicorn once: the gateway's value, or with a
    // trusted proxy, the one it vouches for.
    let one = |value: &str| serde_json::json!([value]);
    let (_, headers, body) = get(untrusted.addr, "/", &spoof).await.unwrap();
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], one("127.0.0.1"), "{h}");
    assert_eq!(h["x-forwarded-proto"], one("http"), "{h}");
    assert_eq!(
        h["x-forwarded-host"].as_array().map(Vec::len),
        Some(1),
        "{h}"
    );
    assert_ne!(h["x-forwarded-host"][0], "evil.example");
    assert_eq!(h["x-request-id"].as_array().map(Vec::len), Some(1), "{h}");
    assert_ne!(h["x-request-id"][0], "chosen-by-client");
    assert_ne!(headers["x-request-id"], "chosen-by-client");
    assert!(h.get("x-original-url").is_none());

    let (_, headers, body) = get(trusted.addr, "/", &spoof).await.unwrap();
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], one("6.6.6.6, 127.0.0.1"), "{h}");
    assert_eq!(h["x-forwarded-proto"], one("https"), "{h}");
    assert_eq!(h["x-forwarded-host"], one("evil.example"), "{h}");
    assert_eq!(h["x-request-id"], one("chosen-by-client"), "{h}");
    assert_eq!(headers["x-request-id"], "chosen-by-client");

    // Several forwarded-for fields from a trusted proxy become one list.
    let chain = [
        ("x-forwarded-for", "1.1.1.1"),
        ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
    ];
    let (_, _, body) = get(trusted.addr, "/", &chain).await.unwrap();
    let h = &json(&body)["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        one("1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"),
        "{h}"
    );
    let (_, _, body) = get(untrusted.addr, "/", &chain).await.unwrap();
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], one("127.0.0.1"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let (_, _, body) = get(
        gateway.addr,
        "/echo",
        &[
            ("connection", "keep-alive, x-client-private"),
            ("x-client-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-client-public", "fine"),
        ],
    )
    .await
    .unwrap();
    let h = &json(&body)["headers"];
    for name in [
        "x-client-private",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(h.get(name).is_none(), "{name} reached the upstream: {h}");
    }
    assert_eq!(h["x-client-public"][0], "fine");

    // `Connection` may name `Host`; Gunicorn still gets the one Host.
    let request = Request::get("/echo")
        .header("host", "shop.example")
        .header("connection", "host")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(gateway.addr, request).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let h = &json(&body)["headers"];
    assert_eq!(h["host"], serde_json::json!(["shop.example"]), "{h}");

    let (_, headers, _) = get(gateway.addr, "/hop", &[]).await.unwrap();
    for name in ["x-upstream-private", "keep-alive", "proxy-authenticate"] {
        assert!(
            !headers.contains_key(name),
            "{name} reached the client: {headers:?}"
        );
    }
    assert_eq!(headers["x-upstream-public"], "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_413_and_431() {
    let (upstream, gateway) =
        gateway_with("a", "max_body_size = 1024\nmax_header_size = \"8KiB\"", "").await;
    let big = vec![b'a'; 2048];
    let request = Request::post("/upload")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let (status, headers, body) = send(gateway.addr, request).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(json(&body)["status"], 413);

    // Chunked: no length up front, the limit is found while reading.
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'b'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(&raw_exchange(gateway.addr, &chunked)), 413);

    // Within the limit still passes.
    let request = Request::post("/upload")
        .body(Full::new(Bytes::from(vec![b'c'; 1000])))
        .unwrap();
    assert_eq!(send(gateway.addr, request).await.unwrap().0, StatusCode::OK);

    let long = "v".repeat(10 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {long}\r\n\r\n");
    assert_eq!(status_of(&raw_exchange(gateway.addr, head.as_bytes())), 431);
    assert_eq!(
        upstream.hits(),
        1,
        "only the request within limits reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_and_host_confusion_get_400() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let shapes: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    ];
    let hosts: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n",
    ];
    for shape in shapes.into_iter().chain(hosts) {
        let answer = raw_exchange(gateway.addr, shape);
        assert_eq!(
            status_of(&answer),
            400,
            "{}",
            String::from_utf8_lossy(shape)
        );
    }
    assert_eq!(upstream.hits(), 0);

    // A smuggled request behind an ambiguous one on the same connection is
    // never served: the connection closes after the 400.
    let answer = raw_exchange(
        gateway.addr,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
          POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    assert_eq!(upstream.hits(), 1, "only /first was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_gets_a_fast_502() {
    let dead = TestUpstream::start("dead").await.stop().await;
    let gateway = Gatehouse::start(&config(
        &[format!("http://{dead}")],
        "",
        "connect_timeout = \"5s\"\nmax_fails = 100",
        "",
    ));
    let started = Instant::now();
    let (status, headers, body) = get(gateway.addr, "/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        json(&body)["request_id"],
        headers["x-request-id"].to_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504_at_the_response_timeout() {
    let (upstream, gateway) =
        gateway_with("slow", "", "response_timeout = \"400ms\"\nmax_fails = 100").await;
    let started = Instant::now();
    let (status, _, body) = get(gateway.addr, "/delay/5000", &[]).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&body)["status"], 504);
    assert!(
        elapsed >= Duration::from_millis(400),
        "answered before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "waited for the upstream: {elapsed:?}"
    );
    // A timeout is never retried: the request may have been acted on.
    assert_eq!(upstream.hits(), 1);

    // A kept-alive connection carries its response timer to its next
    // request: the timer still fires on time there, whether it was moved
    // while set or fired while the connection sat idle, and never early.
    let timed_out_once = |status: StatusCode, elapsed: Duration| {
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(elapsed >= Duration::from_millis(400), "early: {elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "late: {elapsed:?}");
    };
    for _ in 0..3 {
        let (status, _, _) = get(gateway.addr, "/delay/0", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let hits = upstream.hits();
    let started = Instant::now();
    let (status, _, _) = get(gateway.addr, "/delay/5000", &[]).await.unwrap();
    timed_out_once(status, started.elapsed());
    assert_eq!(upstream.hits(), hits + 1);
    let (status, _, _) = get(gateway.addr, "/delay/0", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // Idle past the timeout: the kept timer fires with nobody waiting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _, body) = get(gateway.addr, "/delay/250", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let hits = upstream.hits();
    let started = Instant::now();
    let (status, _, _) = get(gateway.addr, "/delay/5000", &[]).await.unwrap();
    timed_out_once(status, started.elapsed());
    assert_eq!(upstream.hits(), hits + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_cut_at_the_header_deadline() {
    let (upstream, gateway) = gateway_with("a", "header_read_timeout = \"1s\"", "").await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Keep trickling header bytes, one line every 300 ms (the attack's pace),
    // until the gateway closes: the deadline covers the whole head.
    let dripping = Instant::now();
    while dripping.elapsed() < Duration::from_secs(8) && stream.write_all(b"X-Drip: 1\r\n").is_ok()
    {
        let mut probe = [0u8; 1];
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match stream.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {}
        }
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "closed early: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "not cut: {elapsed:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(upstream.hits(), 0);
    // Other clients are served meanwhile and after.
    assert_eq!(get(gateway.addr, "/", &[]).await.unwrap().0, StatusCode::OK);
}

/// Between requests on a kept-alive HTTP/1.1 connection the head deadline
/// runs again: a client that goes quiet after its answer, or drips its next
/// head, is closed at the deadline, and that head never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_held_to_the_head_deadline_again() {
    let (upstream, gateway) = gateway_with("a", "header_read_timeout = \"1s\"", "").await;
    for drip in [false, true] {
        let mut stream = TcpStream::connect(gateway.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The first answer, whole: its head, then Content-Length bytes.
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let whole = |answer: &[u8]| {
            let text = String::from_utf8_lossy(answer);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            length.is_some_and(|n| body.len() >= n)
        };
        while !whole(&answer) {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the first answer");
            answer.extend_from_slice(&buf[..n]);
        }
        assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
        let answered = Instant::now();
        let dripper = drip.then(|| {
            let mut writer = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = writer.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n");
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(8)
                    && writer.write_all(b"X-Drip: 1\r\n").is_ok()
                {
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        });
        let closed = closed_within(&mut stream, Duration::from_secs(6));
        let took = answered.elapsed();
        assert!(
            closed.is_some(),
            "drip {drip}: still open {took:?} after the answer"
        );
        assert!(
            took >= Duration::from_millis(900),
            "drip {drip}: closed after {took:?}, before the deadline"
        );
        drop(stream);
        if let Some(dripper) = dripper {
            dripper.join().unwrap();
        }
    }
    // The two first requests; neither quiet nor dripped head went further.
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    for _ in 0..20 {
        assert_eq!(get(gateway.addr, "/", &[]).await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(upstream.hits(), 20);
    // At most one connection per worker thread for sequential requests.
    assert!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_is_ejected_and_readmitted() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let a_url = a.url();
    let gateway = Gatehouse::start(&config(
        &[a.url(), b.url()],
        "",
        "max_fails = 2\nfail_timeout = \"60s\"",
        "path = \"/health\"\ninterval = \"200ms\"\ntimeout = \"500ms\"",
    ));
    let healthy = format!("gatehouse_upstream_healthy{{upstream=\"{a_url}\"}}");
    assert_eq!(gateway.metric(&healthy).await, Some(1.0));

    let a_addr = a.stop().await;
    // Idempotent requests are retried on the other server: no client sees the failure.
    for _ in 0..10 {
        let (status, _, body) = get(gateway.addr, "/", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["upstream"], "b");
    }
    assert!(
        eventually(Duration::from_secs(5), async || gateway
            .metric(&healthy)
            .await
            == Some(0.0))
        .await
    );
    let (status, _, _) = get(gateway.admin, "/ready", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK, "b still serves");

    let a = TestUpstream::start_on("a", a_addr).await;
    assert!(
        eventually(Duration::from_secs(5), async || gateway
            .metric(&healthy)
            .await
            == Some(1.0))
        .await,
        "the health check readmits a"
    );
    let before = a.hits();
    for _ in 0..6 {
        assert_eq!(get(gateway.addr, "/", &[]).await.unwrap().0, StatusCode::OK);
    }
    assert!(a.hits() > before, "traffic returns to a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_upstream_gives_503_and_not_ready() {
    let dead = TestUpstream::start("dead").await.stop().await;
    let gateway = Gatehouse::start(&config(
        &[format!("http://{dead}")],
        "",
        "max_fails = 1\nfail_timeout = \"60s\"",
        "",
    ));
    assert_eq!(
        get(gateway.addr, "/", &[]).await.unwrap().0,
        StatusCode::BAD_GATEWAY
    );
    let (status, headers, body) = get(gateway.addr, "/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(json(&body)["detail"], "no healthy upstream");
    let (status, _, body) = get(gateway.admin, "/ready", &[]).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["reason"], "no healthy upstream");
    // Liveness does not depend on Gunicorn.
    assert_eq!(
        get(gateway.addr, "/health", &[]).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(
        get(gateway.admin, "/health", &[]).await.unwrap().0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_retried() {
    let dead = TestUpstream::start("dead").await.stop().await;
    let live = TestUpstream::start("live").await;
    let gateway = Gatehouse::start(&config(
        &[format!("http://{dead}"), live.url()],
        "",
        "max_fails = 1000",
        "",
    ));
    let mut post_statuses = Vec::new();
    for _ in 0..6 {
        let request = Request::post("/")
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        post_statuses.push(send(gateway.addr, request).await.unwrap().0);
    }
    let failed = post_statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_GATEWAY)
        .count();
    assert!(
        failed > 0,
        "a POST that met the dead server was not resent: {post_statuses:?}"
    );
    assert_eq!(live.hits(), 6 - failed);
    for _ in 0..6 {
        assert_eq!(get(gateway.addr, "/", &[]).await.unwrap().0, StatusCode::OK);
    }
    let retries = gateway
        .metric("gatehouse_upstream_retries_total")
        .await
        .unwrap();
    assert!(retries >= 1.0, "GETs were retried: {retries}");
}

/// An upstream that answers each path with fixed bytes, to reach framings
/// (RFC 9112 §6.3) and faults that a well-behaved server never sends. It
/// counts the connections it accepts and those it closed after answering
/// `/idle-close` (a server's keep-alive timeout, made short).
async fn scripted_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let idle_closed = Arc::new(AtomicUsize::new(0));
    let (counter, closer) = (Arc::clone(&accepted), Arc::clone(&idle_closed));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let closer = Arc::clone(&closer);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let head_end = loop {
                        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
                    pending.drain(..head_end);
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    while pending.len() < length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    }
                    pending.drain(..length);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                              5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
                            false,
                        ),
                        "/until-close" => (b"HTTP/1.0 200 OK\r\n\r\nread until close", true),
                        "/early-hints" => (
                            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                            false,
                        ),
                        "/not-modified" => (
                            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: \"v1\"\r\n\r\n",
                            false,
                        ),
                        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false),
                        "/conflicting-length" => (
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                            true,
                        ),
                        "/cut" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
                        "/bad-chunk" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
                            true,
                        ),
                        "/idle-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nidle", true),
                        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", false),
                    };
                    if path == "/idle-close" {
                        // Keep-alive as far as the gateway knows; closed
                        // a moment later, while the connection sits idle.
                        let _ = stream.write_all(answer).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        drop(stream);
                        closer.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if stream.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, idle_closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_client_whole() {
    let (addr, accepted, _) = scripted_upstream().await;
    // Faults below would otherwise eject the only server (`max_fails`).
    // One worker: each worker keeps its own upstream connections, and the
    // kernel picks the worker of each client connection, so with two a
    // request could open a connection only because it landed on the other.
    let gateway = Gatehouse::start(
        &config(&[format!("http://{addr}")], "", "max_fails = 100", "")
            .replace("workers = 2", "workers = 1"),
    );
    let connections = || accepted.load(Ordering::SeqCst);

    // Chunked, with extensions and trailers: de-chunked, and the connection
    // is kept for the next request.
    for _ in 0..5 {
        let (status, _, body) = get(gateway.addr, "/chunked", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello world");
    }
    assert_eq!(connections(), 1, "chunked responses kept their connection");

    // An interim 103 is skipped; the final answer arrives.
    let (status, _, body) = get(gateway.addr, "/early-hints", &[]).await.unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (StatusCode::OK, "ok")
    );

    // 304 and HEAD answers have no body whatever their Content-Length says,
    // and the connection stays usable.
    let before = connections();
    let (status, headers, body) = get(gateway.addr, "/not-modified", &[]).await.unwrap();
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers.get("etag").unwrap(), "\"v1\"");
    assert!(body.is_empty());
    let raw = raw_exchange(
        gateway.addr,
        b"HEAD /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("content-length: 10"),
        "{raw}"
    );
    assert!(
        raw.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {raw:?}"
    );
    let (status, _, body) = get(gateway.addr, "/", &[]).await.unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (StatusCode::OK, "hi")
    );
    assert_eq!(
        connections(),
        before,
        "no new connection after 304 and HEAD"
    );

    // Close-delimited (HTTP/1.0, no length): read to the end; never reused.
    // Each closes its connection; two workers hold at most two pooled
    // connections to start with, so five answers take at least three new.
    let before = connections();
    for _ in 0..5 {
        let (status, _, body) = get(gateway.addr, "/until-close", &[]).await.unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (StatusCode::OK, "read until close")
        );
    }
    assert!(
        connections() >= before + 3,
        "close-delimited connections are never reused"
    );

    // Faults: conflicting lengths, a cut body, a bad chunk size are 502s,
    // and the gateway keeps serving.
    for path in ["/conflicting-length", "/cut", "/bad-chunk"] {
        let (status, _, _) = get(gateway.addr, path, &[]).await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}");
    }
    let (status, _, body) = get(gateway.addr, "/chunked", &[]).await.unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (StatusCode::OK, "hello world")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_not_used() {
    let (addr, _, idle_closed) = scripted_upstream().await;
    let gateway = Gatehouse::start(&config(&[format!("http://{addr}")], "", "retries = 0", ""));
    for round in 1..=6 {
        let (status, _, body) = get(gateway.addr, "/idle-close", &[]).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"idle"[..]));
        assert!(
            eventually(Duration::from_secs(5), async || {
                idle_closed.load(Ordering::SeqCst) >= round
            })
            .await
        );
        // A POST is never resent, so it must not be sent on the dead
        // connection in the first place.
        let request = Request::post("/")
            .header("host", "x")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (status, _, body) = send(gateway.addr, request).await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"hi"[..]),
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_stream_past_the_buffer() {
    let (_upstream, gateway) = gateway_with("a", "", "response_buffer_size = \"64KiB\"").await;
    for size in [10, 64 * 1024 + 1, 3_000_000] {
        let (status, _, body) = get(gateway.addr, &format!("/bytes/{size}"), &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), size);
    }
}

/// An HTTP/2 (prior knowledge) client connection to `addr`.
async fn h2_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_are_served() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let mut sender = h2_client(gateway.addr).await;
    let request = Request::get(format!("http://{}/h2?q=1", gateway.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo = json(&body);
    assert_eq!(echo["path"], "/h2");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["host"][0], gateway.addr.to_string());
}

/// A gateway with `drain_timeout`, and a request to `/delay/<delay_ms>` that
/// has reached its upstream and waits for the answer.
async fn request_in_flight(
    drain_timeout: &str,
    delay_ms: u64,
) -> (
    Gatehouse,
    TestUpstream,
    tokio::task::JoinHandle<Result<harness::Reply, String>>,
) {
    let (upstream, gateway) =
        gateway_with("a", &format!("drain_timeout = \"{drain_timeout}\""), "").await;
    let addr = gateway.addr;
    let in_flight =
        tokio::spawn(async move { get(addr, &format!("/delay/{delay_ms}"), &[]).await });
    assert!(eventually(Duration::from_secs(5), async || upstream.hits() == 1).await);
    (gateway, upstream, in_flight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let (mut gateway, _upstream, in_flight) = request_in_flight("10s", 1500).await;
    let addr = gateway.addr;
    gateway.signal("TERM");
    let (status, _, body) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"slow");
    let exit = gateway
        .wait_exit(Duration::from_secs(5))
        .expect("exited after the drain");
    assert!(exit.success(), "{exit}");
    assert!(TcpStream::connect(addr).is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_drain_timeout() {
    let (mut gateway, _upstream, stuck) = request_in_flight("500ms", 30000).await;
    let started = Instant::now();
    gateway.signal("TERM");
    let exit = gateway.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(exit.success());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request was cut, not answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_a_valid_config_and_keeps_the_old_one_on_error() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let gateway = Gatehouse::start(&simple(&[a.url()]));
    assert_eq!(
        json(&get(gateway.addr, "/", &[]).await.unwrap().2)["upstream"],
        "a"
    );

    gateway.rewrite_config(&format!(
        "{}\n[upstream]\nconect_timeout = \"1s\"\n",
        "# broken"
    ));
    gateway.signal("HUP");
    let errors = "gatehouse_config_reloads_total{result=\"error\"}";
    assert!(gateway.metric_reaches(errors, 1.0).await);
    let log = gateway.log();
    assert!(
        log.contains("upstream.conect_timeout")
            && log.contains(&gateway.config_path.display().to_string()),
        "the log names the file and the key:\n{log}"
    );
    assert_eq!(
        json(&get(gateway.addr, "/", &[]).await.unwrap().2)["upstream"],
        "a"
    );

    gateway.rewrite_config(&simple(&[b.url()]));
    gateway.signal("HUP");
    let ok = "gatehouse_config_reloads_total{result=\"ok\"}";
    assert!(gateway.metric_reaches(ok, 1.0).await);
    assert_eq!(
        json(&get(gateway.addr, "/", &[]).await.unwrap().2)["upstream"],
        "b"
    );
}

/// An edited file is reloaded on SIGHUP, as with nginx; watching the file
/// is opt-in (`watch_config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_watch_config_reloads_an_edited_file_without_a_signal() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let watch = "watch_config = true\nconfig_watch_interval = \"200ms\"";
    let quiet = Gatehouse::start(&simple(&[a.url()]));
    let watching = Gatehouse::start(&config(&[a.url()], watch, "", ""));
    quiet.rewrite_config(&simple(&[b.url()]));
    watching.rewrite_config(&config(&[b.url()], watch, "", ""));
    let ok = "gatehouse_config_reloads_total{result=\"ok\"}";
    assert!(watching.metric_reaches(ok, 1.0).await);
    let started = Instant::now();
    // Several watch intervals later, the gateway without watch_config still
    // runs its old configuration.
    while started.elapsed() < Duration::from_secs(1) {
        assert_eq!(
            json(&get(quiet.addr, "/", &[]).await.unwrap().2)["upstream"],
            "a"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(quiet.metric(ok).await, Some(0.0));
    quiet.signal("HUP");
    assert!(quiet.metric_reaches(ok, 1.0).await);
    assert_eq!(
        json(&get(quiet.addr, "/", &[]).await.unwrap().2)["upstream"],
        "b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let (_, headers, _) = get(gateway.addr, "/v1/stories/?page=3", &[]).await.unwrap();
    let id = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(3), async || gateway.log().contains(&id)).await);
    let log = gateway.log();
    let line = log.lines().find(|l| l.contains(&id)).unwrap();
    for field in [
        "access",
        "client=127.0.0.1",
        "method=GET",
        "path=\"/v1/stories/?page=3\"",
        "status=200",
        "route=\"stories\"",
        "duration_ms=",
        "upstream_ms=",
        &format!("upstream=\"{}\"", upstream.url()),
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[test]
fn check_config_accepts_shipped_files_and_names_bad_keys() {
    let shipped = harness::repo_root().join("config/gateway.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("check-config")
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[upstream]\nretrys = 2\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}:5: `upstream.retrys`", bad.display())),
        "{text}"
    );

    // A `gatehouse db` file is recognised and checked by its own rules.
    let db = harness::repo_root().join("config/db.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("check-config")
        .arg(&db)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (db)"));
    let bad_db = dir.path().join("db.toml");
    std::fs::write(
        &bad_db,
        "[primary]\nhost = \"db1\"\n\n[pool]\nmax_conections = 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("check-config")
        .arg(&bad_db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}:5: `pool.max_conections`", bad_db.display())),
        "{text}"
    );
}

/// The Django app under real Gunicorn, reached with curl through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_crud_through_gunicorn() {
    let gunicorn = Gunicorn::start(2);
    let gateway = Gatehouse::start(&simple(&[gunicorn.upstream_url()]));
    let url = |p: &str| gateway.url(p);

    let (status, headers, body) = curl(&["-H", "x-app-echo: 1", &url("/v1/stories/")]);
    assert_eq!(status, 200, "{body}");
    let list = json(body.as_bytes());
    assert_eq!(list["count"], 30);
    // Django saw the gateway's request id and forwarding headers.
    assert_eq!(
        header_line(&headers, "x-app-request-id"),
        header_line(&headers, "x-request-id")
    );
    assert_eq!(
        header_line(&headers, "x-app-forwarded-for"),
        Some("127.0.0.1")
    );

    let (status, headers, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        "{\"title\": \"Through the gate\", \"body\": \"hello\", \"author_id\": 1}",
        &url("/v1/stories/"),
    ]);
    assert_eq!(status, 201, "{body}");
    let created = json(body.as_bytes());
    let id = created["id"].as_i64().unwrap();
    assert_eq!(
        header_line(&headers, "location"),
        Some(format!("/v1/stories/{id}/").as_str())
    );
    let detail = url(&format!("/v1/stories/{id}/"));

    let (status, _, body) = curl(&[&detail]);
    assert_eq!(status, 200);
    assert_eq!(json(body.as_bytes())["title"], "Through the gate");

    let (status, _, _) = curl(&["-X", "PUT", "--data", "{\"title\": \"Renamed\"}", &detail]);
    assert_eq!(status, 200);
    let (status, _, body) = curl(&["-X", "PATCH", "--data", "{\"body\": \"patched\"}", &detail]);
    assert_eq!(status, 200);
    let story = json(body.as_bytes());
    assert_eq!(
        (story["title"].as_str(), story["body"].as_str()),
        (Some("Renamed"), Some("patched"))
    );

    let (status, _, body) = curl(&[&url("/v1/search/?q=renamed")]);
    assert_eq!(status, 200);
    assert_eq!(json(body.as_bytes())["results"][0]["id"], id);

    let (status, _, body) = curl(&[&url("/v1/users/1/")]);
    assert_eq!(status, 200);
    assert_eq!(json(body.as_bytes())["username"], "reader1");

    let (status, _, _) = curl(&["-X", "DELETE", &detail]);
    assert_eq!(status, 204);
    let (status, _, _) = curl(&[&detail]);
    assert_eq!(status, 404);

    let (status, _, body) = curl(&[&url("/health")]);
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}"));

    let stories_ok =
        "gatehouse_http_requests_total{method=\"GET\",route=\"stories\",status=\"2xx\"}";
    assert_eq!(gateway.metric(stories_ok).await, Some(2.0));
    let stories_404 =
        "gatehouse_http_requests_total{method=\"GET\",route=\"stories\",status=\"4xx\"}";
    assert_eq!(gateway.metric(stories_404).await, Some(1.0));
    let writes = "gatehouse_http_requests_total{method=\"PATCH\",route=\"stories\",status=\"2xx\"}";
    assert_eq!(gateway.metric(writes).await, Some(1.0));
    let (_, _, body) = get(gateway.admin, "/metrics/json", &[]).await.unwrap();
    let metrics = json(&body);
    assert_eq!(
        metrics["upstream"]["servers"][0]["address"],
        gunicorn.upstream_url()
    );
    assert_eq!(metrics["upstream"]["servers"][0]["healthy"], true);
    assert!(
        metrics["requests"]["http_requests_total"]
            .as_array()
            .unwrap()
            .len()
            >= 5
    );
}

/// Gunicorn's sync worker handles one request at a time. The gateway reads a
/// slow upload whole before contacting it, so a fast request is not stuck
/// behind the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_does_not_hold_a_gunicorn_sync_worker() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&simple(&[gunicorn.upstream_url()]));
    let addr = gateway.addr;

    let body = b"{\"title\": \"slow upload\", \"author_id\": 1, \"body\": \"0123456789\"}";
    let (uploading, upload_started) = std::sync::mpsc::channel();
    let uploader = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /v1/stories/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        // About three seconds for the whole body, at the slow client's pace.
        for (i, chunk) in body.chunks(5).enumerate() {
            std::thread::sleep(Duration::from_millis(220));
            stream.write_all(chunk).unwrap();
            if i == 0 {
                uploading.send(()).unwrap();
            }
        }
        let finished_sending = Instant::now();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        (finished_sending, answer)
    });

    upload_started.recv().unwrap();
    let (status, _, _) = get(gateway.addr, "/v1/stories/", &[]).await.unwrap();
    let fast_done = Instant::now();
    assert_eq!(status, StatusCode::OK);

    let (finished_sending, answer) = uploader.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        fast_done < finished_sending,
        "the fast request waited for the slow upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_body_gets_408_and_never_reaches_the_upstream() {
    let (upstream, gateway) = gateway_with("a", "body_read_timeout = \"500ms\"", "").await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_lines_parse() {
    let upstream = TestUpstream::start("a").await;
    let mut toml = simple(&[upstream.url()]);
    toml = toml.replace("[log]\n", "[log]\nformat = \"json\"\n");
    let gateway = Gatehouse::start(&toml);
    let (_, headers, _) = get(gateway.addr, "/v1/users/4/", &[]).await.unwrap();
    let id = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(3), async || gateway.log().contains(&id)).await);
    let log = gateway.log();
    let line: serde_json::Value =
        serde_json::from_str(log.lines().find(|l| l.contains(&id)).unwrap()).unwrap();
    assert_eq!(line["target"], "access");
    assert_eq!(line["request_id"], id.as_str());
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "users");
    assert_eq!(line["method"], "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once() {
    let (mut gateway, _upstream, in_flight) = request_in_flight("30s", 20000).await;
    let started = Instant::now();
    gateway.signal("INT");
    let exit = gateway.wait_exit(Duration::from_secs(3)).expect("exited");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(exit.code(), Some(130));
    assert!(in_flight.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_off_sends_the_upstream_address() {
    let (upstream, gateway) = gateway_with("a", "", "preserve_host = false").await;
    let (_, _, body) = get(gateway.addr, "/", &[("host", "shop.example")])
        .await
        .unwrap();
    let h = &json(&body)["headers"];
    assert_eq!(h["host"][0], upstream.addr.to_string());
    assert_eq!(h["x-forwarded-host"][0], "shop.example");
}

/// Headers only a proxy should set are removed from an untrusted client's
/// request: Gunicorn answered 400 "Contradictory scheme headers" to some,
/// and others would let a client name its own address or URL prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_only_headers_from_clients_are_removed() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&simple(&[gunicorn.upstream_url()]));
    for (name, value) in [
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-protocol", "ssl"),
        ("x-forwarded-proto", "https"),
    ] {
        let (status, _, body) = get(gateway.addr, "/v1/auth/whoami/", &[(name, value)])
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "{name}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(json(&body)["scheme"], "http", "{name}");
    }

    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start(&simple(&[upstream.url()]));
    let sent = [
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-protocol", "ssl"),
    ];
    let (_, _, body) = get(gateway.addr, "/", &sent).await.unwrap();
    let seen = &json(&body)["headers"];
    for (name, _) in sent {
        assert!(seen.get(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(seen["x-forwarded-proto"][0], "http");
}

/// An absolute-form target names the host Django must see; the client's
/// `Host` is replaced with it (RFC 9112 §3.2.2), as nginx's `$host` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_names_the_host_django_sees() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&simple(&[gunicorn.upstream_url()]));
    let answer = |request: &[u8]| {
        let mut stream = TcpStream::connect(gateway.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let ask = |request: &'static [u8]| {
        let answer = answer(request);
        assert_eq!(status_of(&answer), 200, "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(body).unwrap()
    };
    let seen = ask(b"GET http://other.example/v1/auth/whoami/ HTTP/1.1\r\n\
        Host: client.example\r\nConnection: close\r\n\r\n");
    assert_eq!(seen["host"], "other.example");
    assert_eq!(seen["path"], "/v1/auth/whoami/");
    // In origin form, the client's `Host` is the one.
    let seen = ask(b"GET /v1/auth/whoami/ HTTP/1.1\r\n\
        Host: client.example\r\nConnection: close\r\n\r\n");
    assert_eq!(seen["host"], "client.example");
    // Credentials in the target are refused, not forwarded as a host.
    let refused = answer(
        b"GET http://user:secret@other.example/v1/auth/whoami/ HTTP/1.1\r\n\
        Host: client.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&refused), 400, "{refused}");
    // By the gateway (its problem+json), before Django could see it.
    assert!(
        refused.contains("application/problem+json") && refused.contains("userinfo"),
        "{refused}"
    );
    assert!(!refused.contains("secret"), "{refused}");
}

/// HTTP/2 clients send one `cookie` field per cookie (RFC 9113 §8.2.3);
/// HTTP/1.1 clients may repeat the field. Django must see every cookie,
/// in the order the gateway identified the caller by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_cookie_fields_reach_django_as_one() {
    let gunicorn = Gunicorn::start(1);
    let gateway = Gatehouse::start(&simple(&[gunicorn.upstream_url()]));
    let login = Request::post("/v1/auth/login/")
        .body(Full::new(Bytes::from_static(b"{\"member_id\": 4}")))
        .unwrap();
    let (status, headers, _) = send(gateway.addr, login).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let session = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    let mut sender = h2_client(gateway.addr).await;
    let request = Request::get(format!("http://{}/v1/auth/whoami/", gateway.addr))
        .header("cookie", "theme=dark")
        .header("cookie", session.as_str())
        .header("cookie", "lang=en")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = json(&body);
    assert_eq!(seen["member_id"], 4, "Django read the session over HTTP/2");
    assert_eq!(
        seen["cookies"],
        serde_json::json!(["lang", "sessionid", "theme"])
    );

    let (_, _, body) = get(
        gateway.addr,
        "/v1/auth/whoami/",
        &[("cookie", "theme=dark"), ("cookie", session.as_str())],
    )
    .await
    .unwrap();
    assert_eq!(json(&body)["member_id"], 4, "and over HTTP/1.1");
}

/// `SO_REUSEPORT` let a second gateway bind the same address and take half
/// the traffic; it must refuse to start, as nginx does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_used_address_refuses_to_start() {
    let upstream = TestUpstream::start("a").await;
    let first = Gatehouse::start(&simple(&[upstream.url()]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["proxy", "--config"])
        .arg(&first.config_path)
        .args(["--listen", &first.addr.to_string()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("address in use"), "{stderr}");
    // The first keeps all the traffic.
    for _ in 0..20 {
        assert_eq!(get(first.addr, "/", &[]).await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(upstream.hits(), 20);
}

/// Read until the server closes; how long that took, or `None` within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed());
            }
            Err(_) => return None,
        }
    }
}

/// An HTTP/2 frame: 9-byte header and payload, on stream `stream`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut out = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Every read phase has a deadline: the protocol sniff, an HTTP/2 header
/// block, and an idle HTTP/2 connection. A request in flight is not idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_and_idle_connections_are_closed() {
    let (_upstream, gateway) = gateway_with(
        "a",
        "header_read_timeout = \"1s\"\nhttp2_idle_timeout = \"1s\"",
        "",
    )
    .await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let settings = h2_frame(0x4, 0, 0, &[]);
    let mut idle = preface.clone();
    idle.extend_from_slice(&settings);
    let mut open_headers = idle.clone();
    // HEADERS without END_HEADERS (flags: END_STREAM only); `:method GET`
    // is the static-table index 2.
    open_headers.extend_from_slice(&h2_frame(0x1, 0x1, 1, &[0x82]));
    let cases: [(&str, Vec<u8>); 4] = [
        ("silent", Vec::new()),
        ("partial preface", b"PRI * HT".to_vec()),
        ("idle HTTP/2", idle),
        ("HEADERS without END_HEADERS", open_headers),
    ];
    let opened = Instant::now();
    let mut streams: Vec<(&str, TcpStream)> = cases
        .into_iter()
        .map(|(name, bytes)| {
            let mut stream = TcpStream::connect(gateway.addr).unwrap();
            stream.write_all(&bytes).unwrap();
            (name, stream)
        })
        .collect();
    for (name, stream) in &mut streams {
        closed_within(stream, Duration::from_secs(6))
            .unwrap_or_else(|| panic!("{name}: still open 6 s later"));
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(900),
            "{name}: closed after {took:?}, before its deadline"
        );
    }
    let closed =
        |reason: &str| format!("gatehouse_http_connections_closed_total{{reason=\"{reason}\"}}");
    assert_eq!(gateway.metric(&closed("sniff_timeout")).await, Some(2.0));
    assert_eq!(gateway.metric(&closed("idle_timeout")).await, Some(1.0));
    assert_eq!(gateway.metric(&closed("header_timeout")).await, Some(1.0));

    // A request that takes longer than the idle timeout is not idle.
    let mut sender = h2_client(gateway.addr).await;
    let request = Request::get(format!("http://{}/delay/2500", gateway.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// With an open-file limit of 256, 300 sockets that never send anything
/// used to lock every real client out. The connection cap stays inside the
/// limit, the silent sockets are closed at the sniff deadline, and a real
/// client waiting behind them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cannot_lock_real_clients_out() {
    let upstream = TestUpstream::start("a").await;
    let gateway = Gatehouse::start_with_open_files(
        &config(&[upstream.url()], "header_read_timeout = \"1s\"", "", ""),
        Some(256),
    );
    let silent: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(gateway.addr).unwrap())
        .collect();
    let started = Instant::now();
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(15), get(gateway.addr, "/", &[]))
        .await
        .expect("a real client is served within 15 s")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(15));
    let log = gateway.log();
    assert!(log.contains("capping"), "the cap is logged:\n{log}");
    assert!(
        log.matches("accept failed").count() < 10,
        "accept errors back off:\n{log}"
    );
    drop(silent);
}

/// The access log in a file: logrotate moves it, SIGUSR1 reopens it, as with
/// nginx. Each line carries the bytes really sent, streamed ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_file_is_reopened_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let upstream = TestUpstream::start("a").await;
    let toml = config(
        &[upstream.url()],
        "",
        "response_buffer_size = \"64KiB\"",
        "",
    )
    .replace(
        "[log]\n",
        &format!("[log]\naccess_log_path = \"{}\"\n", path.display()),
    );
    let gateway = Gatehouse::start(&toml);
    let (_, headers, body) = get(gateway.addr, "/bytes/3000000", &[]).await.unwrap();
    assert_eq!(body.len(), 3_000_000);
    let first = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(3), async || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .contains(&first)
        })
        .await
    );
    let line = std::fs::read_to_string(&path).unwrap();
    assert!(line.contains("bytes=3000000"), "{line}");
    assert!(
        !gateway.log().contains(&first),
        "the line went to the file only"
    );

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    gateway.signal("USR1");
    assert!(eventually(Duration::from_secs(3), async || path.exists()).await);
    let (_, headers, _) = get(gateway.addr, "/after", &[]).await.unwrap();
    let second = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(3), async || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .contains(&second)
        })
        .await
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains(&first) && !old.contains(&second));
}

/// A client that leaves before its response still reached the upstream and
/// counted against the limits: it gets a line with 499 and a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_early_is_logged_as_499() {
    let (upstream, gateway) = gateway_with("a", "", "").await;
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .write_all(b"GET /delay/1000?leaving=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(eventually(Duration::from_secs(5), async || upstream.hits() == 1).await);
    drop(stream);
    let aborts = "gatehouse_http_client_aborts_total{stage=\"before_response\"}";
    assert!(gateway.metric_reaches(aborts, 1.0).await);
    assert!(
        eventually(Duration::from_secs(3), async || gateway
            .log()
            .lines()
            .any(|l| l.contains("leaving=1") && l.contains("status=499")))
        .await,
        "{}",
        gateway.log()
    );
}

/// Two clients that never read a large response used to hold both Gunicorn
/// sync workers until Gunicorn killed them. The response now goes to a
/// temporary file and the worker is free at once; the clients are closed at
/// `send_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_hold_no_gunicorn_worker() {
    let gunicorn = Gunicorn::start(2);
    let gateway = Gatehouse::start(&config(
        &[gunicorn.upstream_url()],
        "send_timeout = \"2s\"",
        "response_buffer_size = \"64KiB\"",
        "",
    ));
    // More than the socket buffers on both sides can hold.
    let size = 32 * 1024 * 1024;
    let stuck: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(gateway.addr).unwrap();
            stream
                .write_all(
                    format!("GET /v1/blob/?size={size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                )
                .unwrap();
            stream
        })
        .collect();
    assert!(
        gateway
            .metric_reaches("gatehouse_upstream_spooled_responses_total", 2.0)
            .await
    );
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(5),
        get(gateway.addr, "/v1/stories/", &[]),
    )
    .await
    .expect("both Gunicorn workers are free again")
    .unwrap();
    assert_eq!(status, StatusCode::OK);

    let closed = "gatehouse_http_connections_closed_total{reason=\"send_timeout\"}";
    assert!(gateway.metric_reaches(closed, 2.0).await);
    assert!(
        eventually(Duration::from_secs(3), async || {
            gateway
                .log()
                .lines()
                .filter(|l| l.contains("/v1/blob/") && l.contains("completed=false"))
                .count()
                == 2
        })
        .await,
        "{}",
        gateway.log()
    );
    drop(stuck);

    // A client that does read gets every byte from the file.
    let (status, _, body) = get(gateway.addr, &format!("/v1/blob/?size={size}"), &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), size);
}

/// The gateway as a library: bound by the caller, run on a thread, told to
/// stop through its control channel; `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_in_process_and_stops_when_told() {
    let upstream = TestUpstream::start("a").await;
    let toml = simple(&[upstream.url()]);
    let config = gatehouse::config::Config::from_text(
        "in-process.toml",
        &toml,
        &gatehouse::config::Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            upstreams: Vec::new(),
        },
        &gatehouse::config::ProcessEnv,
    )
    .unwrap();
    let listeners = gatehouse::proxy::bind(&config, None).unwrap();
    let addr = listeners.clients[0].local_addr().unwrap();
    let (control, receiver) = tokio::sync::mpsc::unbounded_channel();
    let source = gatehouse::proxy::ConfigSource::new(None, gatehouse::config::Overrides::default());
    let service =
        std::thread::spawn(move || gatehouse::proxy::run(listeners, config, source, receiver));
    let (status, _, body) = get(addr, "/in-process", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/in-process");
    control.send(gatehouse::Control::Shutdown).unwrap();
    let stopped = tokio::task::spawn_blocking(move || service.join())
        .await
        .unwrap()
        .expect("the service thread did not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    assert!(
        get(addr, "/", &[]).await.is_err(),
        "nothing listens any more"
    );
}

/// A client connection read answer by answer: each head, and as many body
/// bytes as its `Content-Length` says.
struct Answers {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Answers {
    fn connect(addr: std::net::SocketAddr) -> Answers {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Answers {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next head, lower-cased, without its blank line.
    fn head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                self.buf.drain(..end + 4);
                return head;
            }
            self.fill();
        }
    }

    /// The next answer: its head and its body.
    fn answer(&mut self) -> (String, Vec<u8>) {
        let head = self.head();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        while self.buf.len() < length {
            self.fill();
        }
        let body = self.buf.drain(..length).collect();
        (head, body)
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed; unread: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Whether the server closed the connection (after what was read).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && closed_within(&mut self.stream, Duration::from_secs(3)).is_some()
    }
}

/// The gateway serves HTTP/1.x itself: pipelined requests, HTTP/1.0
/// persistence, `Expect: 100-continue`, versions it does not speak and
/// request lines it cannot read, each as RFC 9112 says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_are_served_as_rfc_9112_says() {
    let (upstream, gateway) = gateway_with("a", "max_body_size = 1024", "").await;

    // Pipelined: both in one write, answered in order on one connection.
    let mut client = Answers::connect(gateway.addr);
    client.send(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /third HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    for (path, body) in [("/first", ""), ("/second", "hello"), ("/third", "")] {
        let (head, answer) = client.answer();
        assert!(head.starts_with("http/1.1 200 ok"), "{head}");
        let echo = json(&answer);
        assert_eq!(echo["path"], path);
        assert_eq!(echo["body"], body);
    }

    // HTTP/1.0: closed after the answer unless the client asks to keep it.
    let mut client = Answers::connect(gateway.addr);
    client.send(b"GET /old HTTP/1.0\r\n\r\n");
    let (head, _) = client.answer();
    assert!(head.contains("connection: close"), "{head}");
    assert!(client.closed());
    let mut client = Answers::connect(gateway.addr);
    for _ in 0..2 {
        client.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let (head, answer) = client.answer();
        assert!(head.contains("connection: keep-alive"), "{head}");
        assert_eq!(json(&answer)["path"], "/old");
    }

    // Expect: 100-continue: the go-ahead first, then the answer.
    let mut client = Answers::connect(gateway.addr);
    client.send(
        b"POST /expecting HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    );
    assert_eq!(client.head(), "http/1.1 100 continue");
    client.send(b"data");
    let (head, answer) = client.answer();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(json(&answer)["body"], "data");
    assert!(
        !json(&answer)["headers"]
            .as_object()
            .unwrap()
            .contains_key("expect")
    );
    // A body over the limit is refused without a go-ahead, and the body
    // the client may send anyway is never taken for a request.
    let hits = upstream.hits();
    client.send(
        b"POST /too-big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4000\r\n\r\n",
    );
    let (head, _) = client.answer();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    client.send(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(client.closed());
    assert_eq!(upstream.hits(), hits, "nothing reached the upstream");

    // A body refused unread, while the client keeps sending it: the client
    // reads the whole answer, and the rest of its body is never a request.
    let mut client = Answers::connect(gateway.addr);
    client.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n");
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..16 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (head, body) = client.answer();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert_eq!(json(&body)["status"], 413);
    sender.join().unwrap();

    // A version it does not speak, and a request line it cannot read.
    let answer = raw_exchange(gateway.addr, b"GET / HTTP/1.2\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&answer), 505, "{answer}");
    let answer = raw_exchange(gateway.addr, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert_eq!(upstream.hits(), hits);
}
