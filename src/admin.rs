//! The admin listener: `/health` (liveness), `/ready` (503 with a JSON reason
//! while no upstream is healthy), `/metrics` (Prometheus text) and
//! `/metrics/json` (the same samples grouped by subsystem).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::proxy::Shared;
use crate::proxy::body::ProxyBody;

pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(service = "admin", %addr, "listening");
    }
    Ok(listener)
}

/// The gateway's admin endpoints.
pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
    serve_with(listener, move |req| {
        let shared = Arc::clone(&shared);
        async move { answer(&shared, &req).await }
    })
    .await;
}

/// Serve HTTP/1.1 on an admin listener, each request answered by `answer`.
/// Shared by the gateway's and `gatehouse db`'s admin endpoints.
pub async fn serve_with<F, Fut>(listener: std::net::TcpListener, answer: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "admin listener");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answered = answer(req);
                async move { Ok::<_, Infallible>(answered.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A Prometheus text response.
pub fn text_metrics(body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<ProxyBody> {
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

fn ready(shared: &Shared) -> Response<ProxyBody> {
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
async fn inspect(shared: &Shared, subject: &str, query: Option<&str>) -> Response<ProxyBody> {
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
