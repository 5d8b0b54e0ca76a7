//! The gateway's admin endpoints: `/health` (liveness), `/ready` (503 with a
//! JSON reason while no upstream is healthy), `/metrics` (Prometheus text),
//! `/metrics/json` (the same samples grouped by subsystem),
//! `/ratelimit/<subject>` and `POST /cache/purge`; and the client
//! `gatehouse ratelimit inspect` uses.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::Shared;
use crate::admin::{AdminBody, json_response, serve_with, text_metrics};

/// The gateway's admin endpoints.
pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
    serve_with(listener, move |req| {
        let shared = Arc::clone(&shared);
        async move { answer(&shared, &req).await }
    })
    .await;
}

async fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    if req.uri().path() == "/cache/purge" {
        return purge(shared, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "use GET"}));
    }
    if let Some(subject) = req.uri().path().strip_prefix("/ratelimit/") {
        return inspect(shared, subject, req.uri().query()).await;
    }
    match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" => ready(shared),
        "/metrics" => {
            shared.cache.observe();
            text_metrics(shared.metrics.render_text())
        }
        "/metrics/json" => json_response(StatusCode::OK, &metrics_json(shared)),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn upstream_states(shared: &Shared) -> Value {
    let live = shared.live.load();
    Value::Array(
        live.upstreams
            .servers
            .iter()
            .map(|s| {
                json!({
                    "address": s.label,
                    "weight": s.weight,
                    "healthy": s.is_healthy(),
                    "consecutive_failures": s.consecutive_failures(),
                })
            })
            .collect(),
    )
}

fn ready(shared: &Shared) -> Response<AdminBody> {
    if shared.live.load().upstreams.any_healthy() {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({
                "status": "not ready",
                "reason": "no healthy upstream",
                "upstreams": upstream_states(shared),
            }),
        )
    }
}

/// `GET /ratelimit/<subject>[?tier=NAME]`: each rule's count, remaining and
/// reset for one subject (`user:42`, `ip:203.0.113.9`, `session:…`).
async fn inspect(shared: &Shared, subject: &str, query: Option<&str>) -> Response<AdminBody> {
    let subject = subject.trim_end_matches('/');
    let Some((kind, value)) = subject.split_once(':') else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "subject is kind:value, e.g. user:42 or ip:203.0.113.9"}),
        );
    };
    let client = match kind {
        "ip" => match value.parse() {
            Ok(ip) => ip,
            Err(_) => {
                return json_response(StatusCode::BAD_REQUEST, &json!({"error": "not an address"}));
            }
        },
        _ => std::net::IpAddr::from([0, 0, 0, 0]),
    };
    let tier = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("tier="));
    let live = shared.live.load_full();
    let inspection = live
        .limiter
        .inspect(
            &crate::ratelimit::Subject {
                id: subject,
                client,
                tier,
                admin: false,
                within: None,
            },
            &shared.metrics,
        )
        .await;
    json_response(StatusCode::OK, &json!(inspection))
}

/// `POST /cache/purge?url=URL&tag=TAG&all=1[&soft=1]` with the purge token:
/// entries of each absolute URL (every variant, every user), of each tag,
/// or all, dropped, or with `soft=1` made stale (revalidated before their
/// next use, still good for `stale-if-error`). In this process; other
/// gateways purge their own.
async fn purge(shared: &Shared, req: &Request<Incoming>) -> Response<AdminBody> {
    let live = shared.live.load();
    let config = &live.config.cache;
    let Some(expected) = config.purge_token else {
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({"error": "purging is off: set cache.purge_token"}),
        );
    };
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared as digests: the time taken says nothing of the token.
    let valid = presented.is_some_and(|token| {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.trim().as_bytes()).into();
        digest == expected
    });
    if !valid {
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "a purge needs Authorization: Bearer <cache.purge_token>"}),
        );
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    if req.method() != Method::POST {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "use POST"}),
        );
    }
    let (mut urls, mut tags, mut all, mut soft) = (Vec::new(), Vec::new(), false, false);
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = String::from_utf8_lossy(&crate::cache::key::form_decode(value)).into_owned();
        match name {
            "url" => urls.push(value),
            "tag" => tags.push(value),
            "all" => all = value == "1" || value == "true",
            "soft" => soft = value == "1" || value == "true",
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("unknown parameter `{name}`: use url, tag, all, soft")}),
                );
            }
        }
    }
    let mut keys = Vec::with_capacity(urls.len());
    for url in &urls {
        match purge_key(url, config) {
            Some(key) => keys.push(key),
            None => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("`{url}` is not an absolute http URL with a decodable path")}),
                );
            }
        }
    }
    if !all && keys.is_empty() && tags.is_empty() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "name what to purge: url=, tag= or all=1"}),
        );
    }
    let cache = &shared.cache;
    if all {
        cache.clear().await;
    }
    if !soft {
        for key in &keys {
            cache.remove(key);
        }
    }
    let mut purged: Vec<String> = keys.iter().map(|k| crate::cache::uri_tag(k)).collect();
    purged.extend(tags.iter().map(|t| crate::cache::named_tag(t)));
    cache.invalidate_shared(&[("purge", purged)], soft).await;
    tracing::info!(
        urls = urls.len(),
        tags = tags.len(),
        all,
        soft,
        "cache purge"
    );
    json_response(
        StatusCode::OK,
        &json!({"purged": {"urls": urls, "tags": tags, "all": all}, "soft": soft}),
    )
}

/// The URI key of an absolute URL, as the cache keys a request for it.
fn purge_key(url: &str, config: &crate::config::CacheConfig) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = crate::config::normalise_host(uri.authority()?.as_str());
    let path = super::route::wsgi_path(uri.path()).ok()?;
    Some(crate::cache::key::uri_key(
        &host,
        &path,
        uri.query(),
        &config.ignore_query_params,
    ))
}

fn metrics_json(shared: &Shared) -> Value {
    let mut extra = Map::new();
    let mut upstream = Map::new();
    upstream.insert("servers".into(), upstream_states(shared));
    extra.insert("upstream".into(), Value::Object(upstream));
    let live = shared.live.load();
    if let Value::Object(cache) = shared.cache.summary(&live.config.cache) {
        extra.insert("cache".into(), Value::Object(cache));
    }
    crate::telemetry::json::render(&shared.metrics.registry.gather(), extra)
}

/// Ask a running gateway's admin listener about one subject (for
/// `gatehouse ratelimit inspect`). Plain HTTP/1.0 over a blocking socket: the
/// command runs once and exits.
pub fn fetch_inspection(
    addr: SocketAddr,
    subject: &str,
    tier: Option<&str>,
) -> Result<Value, String> {
    use std::io::{Read, Write};
    let query = tier.map(|t| format!("?tier={t}")).unwrap_or_default();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    write!(
        stream,
        "GET /ratelimit/{subject}{query} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("admin listener {addr}: malformed answer"))?;
    let value: Value =
        serde_json::from_str(body).map_err(|e| format!("admin listener {addr}: {e}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(value["error"].as_str().unwrap_or(head).to_string());
    }
    Ok(value)
}
