//! `gatehouse db`'s admin listener: `/health`, `/ready` (503
//! while the primary cannot be reached), `/metrics` and `/metrics/json` with
//! `.database.connection_pool` and `.database.nodes`, as the runbook reads
//! them (`curl /metrics/json | jq '.database.connection_pool'`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::DbShared;
use crate::admin::AdminBody;
use crate::admin::{json_response, text_metrics};

/// Bring the pool gauges up to date, then render.
fn refresh(shared: &DbShared) {
    let m = &shared.metrics;
    for stats in shared.pools.stats() {
        let pool = stats.name.as_str();
        m.pool_connections
            .with_label_values(&[pool, "active"])
            .set(stats.active as i64);
        m.pool_connections
            .with_label_values(&[pool, "idle"])
            .set(stats.idle as i64);
        m.pool_waiting
            .with_label_values(&[pool])
            .set(stats.waiting as i64);
        m.pool_max.with_label_values(&[pool]).set(stats.max as i64);
    }
    m.primary_up
        .set(i64::from(m.primary_reachable.load(Ordering::Relaxed)));
}

fn metrics_json(shared: &DbShared) -> Value {
    refresh(shared);
    let pools: Vec<Value> = shared
        .pools
        .stats()
        .into_iter()
        .map(|s| {
            json!({"pool": s.name, "active": s.active, "idle": s.idle, "waiting": s.waiting, "max": s.max})
        })
        .collect();
    let snapshot = shared.topology.snapshot();
    let nodes: Vec<Value> = snapshot
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "address": n.node.to_string(),
                "role": if snapshot.primary == Some(i) { "primary" } else { n.role.name() },
                "up": n.up,
                "healthy": n.up && shared.topology.circuit(&n.health) == super::topology::Circuit::Closed,
                "circuit": shared.topology.circuit(&n.health).name(),
                "weight": n.weight,
                "lsn": n.lsn,
                "lag_bytes": n.lag_bytes,
                "lag_seconds": n.lag_seconds.filter(|s| s.is_finite()),
                "timeline": n.timeline,
                "streaming": n.streaming,
            })
        })
        .collect();
    let mut root =
        crate::telemetry::json::render(&shared.metrics.registry.gather(), serde_json::Map::new());
    root["database"] = json!({
        "connection_pool": pools,
        "nodes": nodes,
        "primary": snapshot.primary.map(|p| snapshot.nodes[p].node.to_string()),
    });
    root
}

async fn answer(shared: Arc<DbShared>, req: Request<Incoming>) -> Response<AdminBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "use GET"}));
    }
    match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" if shared.metrics.primary_reachable.load(Ordering::Relaxed) => {
            json_response(StatusCode::OK, &json!({"status": "ready"}))
        }
        "/ready" => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not ready", "reason": "the primary cannot be reached"}),
        ),
        "/metrics" => {
            refresh(&shared);
            let mut out = String::new();
            let _ = prometheus::TextEncoder::new()
                .encode_utf8(&shared.metrics.registry.gather(), &mut out);
            text_metrics(out)
        }
        "/metrics/json" => json_response(StatusCode::OK, &metrics_json(&shared)),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

pub async fn serve(listener: std::net::TcpListener, shared: Arc<DbShared>) {
    crate::admin::serve_with(listener, move |req| answer(Arc::clone(&shared), req)).await;
}
