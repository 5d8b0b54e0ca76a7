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

pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
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
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&shared, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "use GET"}));
    }
    match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" => ready(shared),
        "/metrics" => {
            let mut response = Response::new(ProxyBody::full(shared.metrics.render_text()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
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

fn metrics_json(shared: &Shared) -> Value {
    let mut extra = Map::new();
    let mut upstream = Map::new();
    upstream.insert("servers".into(), upstream_states(shared));
    extra.insert("upstream".into(), Value::Object(upstream));
    crate::telemetry::json::render(&shared.metrics.registry.gather(), extra)
}
