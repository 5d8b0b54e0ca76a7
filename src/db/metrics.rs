//! `gatehouse db`'s metrics: the registry and every metric in it, and the
//! per-pool handles the session path increments.

use std::sync::atomic::AtomicBool;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

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
    pub query_duration: HistogramVec,
    pub bytes: IntCounterVec,
    pub statements: IntCounterVec,
    pub refused: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub(super) pool_connections: IntGaugeVec,
    pub(super) pool_waiting: IntGaugeVec,
    pub(super) pool_max: IntGaugeVec,
    pub(super) primary_up: IntGauge,
    /// Transactions by where they went and why.
    pub routed: IntCounterVec,
    /// Times the primary changed to another node.
    pub failovers: prometheus::IntCounter,
    /// Reads retried on another node after theirs failed before answering.
    pub read_retries: prometheus::IntCounter,
    /// Transactions that waited for a primary, by outcome.
    pub primary_waits: IntCounterVec,
    pub(super) node_up: IntGaugeVec,
    pub(super) node_primary: IntGaugeVec,
    pub(super) node_circuit_open: IntGaugeVec,
    pub(super) node_lag_bytes: IntGaugeVec,
    pub(super) node_lag_seconds: prometheus::GaugeVec,
    /// Whether a primary was known and reachable at the last poll.
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
                    "Transactions ended (ReadyForQuery with status idle), in every pool mode.",
                ),
                &["pool"],
            )?,
            query_duration: HistogramVec::new(
                HistogramOpts::new(
                    "query_duration_seconds",
                    "From a client's Query or Sync to the ReadyForQuery that answers it.",
                )
                .namespace("gatehouse_db")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0,
                ]),
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
            routed: IntCounterVec::new(
                opts(
                    "routed_transactions_total",
                    "Transactions by target (primary, replica) and reason (read, write, \
                     in_transaction, read_your_writes, lag_fallback, forced, session).",
                ),
                &["target", "reason"],
            )?,
            failovers: prometheus::IntCounter::with_opts(opts(
                "failovers_total",
                "Times another node became the primary.",
            ))?,
            read_retries: prometheus::IntCounter::with_opts(opts(
                "read_retries_total",
                "Reads sent again to another node after theirs failed before answering.",
            ))?,
            primary_waits: IntCounterVec::new(
                opts(
                    "primary_waits_total",
                    "Transactions that waited for a primary (failover), by outcome.",
                ),
                &["outcome"],
            )?,
            node_up: IntGaugeVec::new(
                opts("node_up", "1 while the node answers the topology monitor."),
                &["node"],
            )?,
            node_primary: IntGaugeVec::new(
                opts("node_primary", "1 for the node that is the primary now."),
                &["node"],
            )?,
            node_circuit_open: IntGaugeVec::new(
                opts(
                    "node_circuit_open",
                    "1 while the node's circuit breaker keeps it out (open or half open).",
                ),
                &["node"],
            )?,
            node_lag_bytes: IntGaugeVec::new(
                opts(
                    "node_lag_bytes",
                    "Bytes of WAL a replica is behind the primary.",
                ),
                &["node"],
            )?,
            node_lag_seconds: prometheus::GaugeVec::new(
                opts(
                    "node_lag_seconds",
                    "How old a replica's last replayed commit is, while it is behind.",
                ),
                &["node"],
            )?,
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
        m.registry.register(Box::new(m.query_duration.clone()))?;
        m.registry.register(Box::new(m.bytes.clone()))?;
        m.registry.register(Box::new(m.statements.clone()))?;
        m.registry.register(Box::new(m.refused.clone()))?;
        m.registry.register(Box::new(m.config_reloads.clone()))?;
        m.registry.register(Box::new(m.pool_connections.clone()))?;
        m.registry.register(Box::new(m.pool_waiting.clone()))?;
        m.registry.register(Box::new(m.pool_max.clone()))?;
        m.registry.register(Box::new(m.primary_up.clone()))?;
        m.registry.register(Box::new(m.routed.clone()))?;
        m.registry.register(Box::new(m.failovers.clone()))?;
        m.registry.register(Box::new(m.read_retries.clone()))?;
        m.registry.register(Box::new(m.primary_waits.clone()))?;
        m.registry.register(Box::new(m.node_up.clone()))?;
        m.registry.register(Box::new(m.node_primary.clone()))?;
        m.registry.register(Box::new(m.node_circuit_open.clone()))?;
        m.registry.register(Box::new(m.node_lag_bytes.clone()))?;
        m.registry.register(Box::new(m.node_lag_seconds.clone()))?;
        // Zero from the start, so that a rate over them exists before the
        // first failover and alerts and dashboards can read it.
        for outcome in ["served", "timed_out"] {
            m.primary_waits.with_label_values(&[outcome]);
        }
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        Ok(m)
    }
}

/// One pool's busiest metrics, looked up once.
#[derive(Clone)]
pub struct PoolMetrics {
    pub checkout_wait: prometheus::Histogram,
    pub queries: prometheus::IntCounter,
    pub query_duration: prometheus::Histogram,
    pub transactions: prometheus::IntCounter,
    pub bytes_to_server: prometheus::IntCounter,
    pub bytes_to_client: prometheus::IntCounter,
    /// Named statements prepared, reused and evicted on this pool's servers.
    statements: [prometheus::IntCounter; 3],
}

impl PoolMetrics {
    /// Count what happened to named statements in one exchange.
    pub fn count_statements(&self, events: super::statements::StatementEvents) {
        let [prepared, reused, evicted] = &self.statements;
        for (counter, n) in [
            (prepared, events.prepared),
            (reused, events.reused),
            (evicted, events.evicted),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}

impl DbMetrics {
    pub fn for_pool(&self, pool: &str) -> PoolMetrics {
        // Counted where they happen; made here so that they read 0, not
        // nothing, until then.
        for vec in [
            &self.server_connects,
            &self.server_errors,
            &self.pinned,
            &self.refused,
        ] {
            vec.with_label_values(&[pool]);
        }
        PoolMetrics {
            checkout_wait: self.checkout_wait.with_label_values(&[pool]),
            queries: self.queries.with_label_values(&[pool]),
            query_duration: self.query_duration.with_label_values(&[pool]),
            transactions: self.transactions.with_label_values(&[pool]),
            bytes_to_server: self.bytes.with_label_values(&[pool, "to_server"]),
            bytes_to_client: self.bytes.with_label_values(&[pool, "to_client"]),
            statements: ["prepared", "reused", "evicted"]
                .map(|event| self.statements.with_label_values(&[pool, event])),
        }
    }

    /// Remove every series of a pool that no longer exists.
    pub fn forget_pool(&self, pool: &str) {
        for vec in [
            &self.server_connects,
            &self.server_errors,
            &self.pinned,
            &self.transactions,
            &self.queries,
            &self.refused,
        ] {
            let _ = vec.remove_label_values(&[pool]);
        }
        for vec in [&self.checkout_wait, &self.query_duration] {
            let _ = vec.remove_label_values(&[pool]);
        }
        for direction in ["to_server", "to_client"] {
            let _ = self.bytes.remove_label_values(&[pool, direction]);
        }
        for event in ["prepared", "reused", "evicted"] {
            let _ = self.statements.remove_label_values(&[pool, event]);
        }
        for state in ["active", "idle"] {
            let _ = self.pool_connections.remove_label_values(&[pool, state]);
        }
        let _ = self.pool_waiting.remove_label_values(&[pool]);
        let _ = self.pool_max.remove_label_values(&[pool]);
    }
}
