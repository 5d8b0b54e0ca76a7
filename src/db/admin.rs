//! `gatehouse db`'s admin listener and metrics: `/health`, `/ready` (503
//! while the primary cannot be reached), `/metrics` and `/metrics/json` with
//! `.database.connection_pool` and `.database.nodes`, as the runbook reads
//! them (`curl /metrics/json | jq '.database.connection_pool'`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use serde_json::{Value, json};

use super::DbShared;
use crate::admin::{json_response, text_metrics};
use crate::proxy::body::ProxyBody;

/// Every metric `gatehouse db` exports; pool labels are `database/user`.
pub struct DbMetrics {
    pub registry: Registry,
    pub clients: IntGauge,
    pub logins: IntCounterVec,
    pub checkout_wait: HistogramVec,
    pub server_connects: IntCounterVec,
    pub server_errors: IntCounterVec,
    pub pinned: IntCounterVec,
    pub transactions: IntCounterVec,
    pub queries: IntCounterVec,
    pub bytes: IntCounterVec,
    pub statements: IntCounterVec,
    pub refused: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pool_connections: IntGaugeVec,
    pool_waiting: IntGaugeVec,
    pool_max: IntGaugeVec,
    primary_up: IntGauge,
    /// Whether the last probe reached the primary.
    pub primary_reachable: AtomicBool,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("gatehouse_db")
}

impl DbMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = DbMetrics {
            registry: Registry::new(),
            clients: IntGauge::with_opts(opts("clients", "Client sessions open now."))?,
            logins: IntCounterVec::new(
                opts("logins_total", "Client logins, by result."),
                &["result"],
            )?,
            checkout_wait: HistogramVec::new(
                HistogramOpts::new(
                    "checkout_wait_seconds",
                    "Time a client waited for a server connection.",
                )
                .namespace("gatehouse_db")
                .buckets(vec![
                    0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
                ]),
                &["pool"],
            )?,
            server_connects: IntCounterVec::new(
                opts("server_connects_total", "Server connections opened."),
                &["pool"],
            )?,
            server_errors: IntCounterVec::new(
                opts("server_errors_total", "Failed server connections."),
                &["pool"],
            )?,
            pinned: IntCounterVec::new(
                opts(
                    "pinned_clients_total",
                    "Clients pinned to their server by session state.",
                ),
                &["pool"],
            )?,
            transactions: IntCounterVec::new(
                opts(
                    "transactions_total",
                    "Transactions that ended with the server idle.",
                ),
                &["pool"],
            )?,
            queries: IntCounterVec::new(
                opts("queries_total", "Query and Sync messages forwarded."),
                &["pool"],
            )?,
            bytes: IntCounterVec::new(
                opts(
                    "bytes_total",
                    "Bytes relayed: to_server (from clients) and to_client (from servers).",
                ),
                &["pool", "direction"],
            )?,
            statements: IntCounterVec::new(
                opts(
                    "prepared_statements_total",
                    "Named statements of transaction-pooled clients: prepared on a \
                     server connection, reused from one, or evicted from one.",
                ),
                &["pool", "event"],
            )?,
            refused: IntCounterVec::new(
                opts(
                    "refused_statements_total",
                    "Statements refused for setting session state (session_state = refuse).",
                ),
                &["pool"],
            )?,
            config_reloads: IntCounterVec::new(
                opts(
                    "config_reloads_total",
                    "Configuration reloads (SIGHUP), by result.",
                ),
                &["result"],
            )?,
            pool_connections: IntGaugeVec::new(
                opts(
                    "pool_connections",
                    "Server connections by state (active = lent to a client).",
                ),
                &["pool", "state"],
            )?,
            pool_waiting: IntGaugeVec::new(
                opts("pool_waiting", "Clients waiting for a connection."),
                &["pool"],
            )?,
            pool_max: IntGaugeVec::new(opts("pool_max", "Pool size."), &["pool"])?,
            primary_up: IntGauge::with_opts(opts(
                "primary_up",
                "1 while the primary accepts connections.",
            ))?,
            primary_reachable: AtomicBool::new(true),
        };
        m.registry.register(Box::new(m.clients.clone()))?;
        m.registry.register(Box::new(m.logins.clone()))?;
        m.registry.register(Box::new(m.checkout_wait.clone()))?;
        m.registry.register(Box::new(m.server_connects.clone()))?;
        m.registry.register(Box::new(m.server_errors.clone()))?;
        m.registry.register(Box::new(m.pinned.clone()))?;
        m.registry.register(Box::new(m.transactions.clone()))?;
        m.registry.register(Box::new(m.queries.clone()))?;
        m.registry.register(Box::new(m.bytes.clone()))?;
        m.registry.register(Box::new(m.statements.clone()))?;
        m.registry.register(Box::new(m.refused.clone()))?;
        m.registry.register(Box::new(m.config_reloads.clone()))?;
        m.registry.register(Box::new(m.pool_connections.clone()))?;
        m.registry.register(Box::new(m.pool_waiting.clone()))?;
        m.registry.register(Box::new(m.pool_max.clone()))?;
        m.registry.register(Box::new(m.primary_up.clone()))?;
        Ok(m)
    }
}

/// One pool's busiest metrics, looked up once.
#[derive(Clone)]
pub struct PoolMetrics {
    pub checkout_wait: prometheus::Histogram,
    pub queries: prometheus::IntCounter,
    pub transactions: prometheus::IntCounter,
    pub bytes_to_server: prometheus::IntCounter,
    pub bytes_to_client: prometheus::IntCounter,
}

impl DbMetrics {
    pub fn for_pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            checkout_wait: self.checkout_wait.with_label_values(&[pool]),
            queries: self.queries.with_label_values(&[pool]),
            transactions: self.transactions.with_label_values(&[pool]),
            bytes_to_server: self.bytes.with_label_values(&[pool, "to_server"]),
            bytes_to_client: self.bytes.with_label_values(&[pool, "to_client"]),
        }
    }

    /// Count what happened to named statements in one exchange.
    pub fn count_statements(&self, pool: &str, events: super::statements::StatementEvents) {
        for (event, n) in [
            ("prepared", events.prepared),
            ("reused", events.reused),
            ("evicted", events.evicted),
        ] {
            if n > 0 {
                self.statements.with_label_values(&[pool, event]).inc_by(n);
            }
        }
    }
}

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
    let config = shared.config.load();
    let mut root =
        crate::telemetry::json::render(&shared.metrics.registry.gather(), serde_json::Map::new());
    root["database"] = json!({
        "connection_pool": pools,
        "nodes": [{
            "role": "primary",
            "address": config.primary.to_string(),
            "healthy": shared.metrics.primary_reachable.load(Ordering::Relaxed),
        }],
    });
    root
}

async fn answer(shared: Arc<DbShared>, req: Request<Incoming>) -> Response<ProxyBody> {
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

/// Probe the primary every second: can a connection be opened?
pub async fn probe_primary(shared: Arc<DbShared>) {
    loop {
        let node = shared.config.load().primary.clone();
        let reachable = tokio::time::timeout(Duration::from_secs(1), super::server::reach(&node))
            .await
            .is_ok_and(|r| r.is_ok());
        let was = shared
            .metrics
            .primary_reachable
            .swap(reachable, Ordering::Relaxed);
        if was != reachable {
            if reachable {
                tracing::info!(primary = %node, "primary reachable again");
            } else {
                tracing::warn!(primary = %node, "primary unreachable");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
