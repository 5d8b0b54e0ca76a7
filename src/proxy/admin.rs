//! The gateway's admin endpoints: `/health` (liveness), `/ready` (503 with a
//! JSON reason while no upstream is healthy), `/metrics` (Prometheus text),
//! `/metrics/json` (the same samples grouped by subsystem) and
//! `/ratelimit/<subject>`; and the client `gatehouse ratelimit inspect` uses.

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
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "use GET"}));
    }
    if let Some(subject) = req.uri().path().strip_prefix("/ratelimit/") {
        return inspect(shared, subject, req.uri().query()).await;
    }
    match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" => ready(shared),
        "/metrics" => text_metrics(shared.metrics.render_text()),
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

fn metrics_json(shared: &Shared) -> Value {
    let mut extra = Map::new();
    let mut upstream = Map::new();
    upstream.insert("servers".into(), upstream_states(shared));
    extra.insert("upstream".into(), Value::Object(upstream));
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
