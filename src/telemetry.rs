//! Telemetry: tracing setup (text or JSON) and the Prometheus metric registry
//! that `/metrics` and `/metrics/json` read.

pub mod json;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Install the global tracing subscriber. Called once, from `main`.
pub fn init_tracing(log: &LogConfig) {
    // `log.level` was validated with the same parser.
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Buckets from 0.5 ms to 60 s: a cached answer and a slow Django view both
/// land in a useful bucket.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Every metric the gateway exports. Labels are low-cardinality: route names,
/// upstream addresses from the config, status classes, error kinds.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_retries: IntCounter,
    pub upstream_spooled: IntCounter,
    pub active_connections: IntGauge,
    pub connections: IntCounter,
    pub connections_closed: IntCounterVec,
    pub client_aborts: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub drain_seconds: Histogram,
    pub ratelimit_decisions: IntCounterVec,
    pub ratelimit_fallbacks: IntCounterVec,
    pub ratelimit_redis_errors: IntCounterVec,
    pub ratelimit_redis_duration: Histogram,
    pub ratelimit_shared: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("gatehouse")
}

fn histogram(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("gatehouse")
        .buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = Metrics {
            requests: IntCounterVec::new(
                opts(
                    "http_requests_total",
                    "Requests answered, by route, method and status class.",
                ),
                &["route", "method", "status"],
            )?,
            request_duration: HistogramVec::new(
                histogram(
                    "http_request_duration_seconds",
                    "Time from request head to response head, by route.",
                ),
                &["route"],
            )?,
            upstream_duration: HistogramVec::new(
                histogram(
                    "upstream_response_duration_seconds",
                    "Time Gunicorn took to answer, by upstream.",
                ),
                &["upstream"],
            )?,
            upstream_requests: IntCounterVec::new(
                opts(
                    "upstream_requests_total",
                    "Attempts sent to each upstream, by outcome.",
                ),
                &["upstream", "outcome"],
            )?,
            upstream_healthy: IntGaugeVec::new(
                opts(
                    "upstream_healthy",
                    "1 when the upstream takes traffic, 0 when ejected.",
                ),
                &["upstream"],
            )?,
            upstream_retries: IntCounter::with_opts(opts(
                "upstream_retries_total",
                "Idempotent requests sent again to another upstream.",
            ))?,
            upstream_spooled: IntCounter::with_opts(opts(
                "upstream_spooled_responses_total",
                "Responses larger than response_buffer_size read into a temporary file.",
            ))?,
            active_connections: IntGauge::with_opts(opts(
                "http_active_connections",
                "Client connections open now.",
            ))?,
            connections: IntCounter::with_opts(opts(
                "http_connections_total",
                "Client connections accepted.",
            ))?,
            connections_closed: IntCounterVec::new(
                opts(
                    "http_connections_closed_total",
                    "Client connections the gateway closed on a deadline, by reason.",
                ),
                &["reason"],
            )?,
            client_aborts: IntCounterVec::new(
                opts(
                    "http_client_aborts_total",
                    "Clients that went away before their response (logged as 499) or during it.",
                ),
                &["stage"],
            )?,
            access_log_dropped: IntCounter::with_opts(opts(
                "access_log_dropped_lines_total",
                "Access-log lines dropped because the writer could not keep up.",
            ))?,
            bytes_received: IntCounter::with_opts(opts(
                "http_request_body_bytes_total",
                "Request body bytes received from clients.",
            ))?,
            bytes_sent: IntCounter::with_opts(opts(
                "http_response_body_bytes_total",
                "Response body bytes sent to clients, as far as they were sent.",
            ))?,
            errors: IntCounterVec::new(
                opts(
                    "http_errors_total",
                    "Requests that ended in an error the gateway produced, by kind.",
                ),
                &["kind"],
            )?,
            config_reloads: IntCounterVec::new(
                opts("config_reloads_total", "Configuration reloads, by result."),
                &["result"],
            )?,
            drain_seconds: Histogram::with_opts(histogram(
                "shutdown_drain_seconds",
                "Time a graceful shutdown spent finishing in-flight requests.",
            ))?,
            ratelimit_decisions: IntCounterVec::new(
                opts(
                    "ratelimit_decisions_total",
                    "Rate-limit decisions, by rule and result.",
                ),
                &["rule", "result"],
            )?,
            ratelimit_fallbacks: IntCounterVec::new(
                opts(
                    "ratelimit_fallbacks_total",
                    "Decisions made without Redis while Redis is configured, by the policy applied.",
                ),
                &["policy"],
            )?,
            ratelimit_redis_errors: IntCounterVec::new(
                opts(
                    "ratelimit_redis_errors_total",
                    "Failed rate-limit calls to Redis, by kind.",
                ),
                &["kind"],
            )?,
            ratelimit_redis_duration: Histogram::with_opts(histogram(
                "ratelimit_redis_duration_seconds",
                "Time of one rate-limit script call to Redis.",
            ))?,
            ratelimit_shared: IntGauge::with_opts(opts(
                "ratelimit_shared",
                "1 while limits are counted in Redis, 0 while counted in this process.",
            ))?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.upstream_duration.clone()))?;
        m.registry.register(Box::new(m.upstream_requests.clone()))?;
        m.registry.register(Box::new(m.upstream_healthy.clone()))?;
        m.registry.register(Box::new(m.upstream_retries.clone()))?;
        m.registry.register(Box::new(m.upstream_spooled.clone()))?;
        m.registry
            .register(Box::new(m.active_connections.clone()))?;
        m.registry.register(Box::new(m.connections.clone()))?;
        m.registry
            .register(Box::new(m.connections_closed.clone()))?;
        m.registry.register(Box::new(m.client_aborts.clone()))?;
        m.registry
            .register(Box::new(m.access_log_dropped.clone()))?;
        m.registry.register(Box::new(m.bytes_received.clone()))?;
        m.registry.register(Box::new(m.bytes_sent.clone()))?;
        m.registry.register(Box::new(m.errors.clone()))?;
        m.registry.register(Box::new(m.config_reloads.clone()))?;
        m.registry.register(Box::new(m.drain_seconds.clone()))?;
        m.registry
            .register(Box::new(m.ratelimit_decisions.clone()))?;
        m.registry
            .register(Box::new(m.ratelimit_fallbacks.clone()))?;
        m.registry
            .register(Box::new(m.ratelimit_redis_errors.clone()))?;
        m.registry
            .register(Box::new(m.ratelimit_redis_duration.clone()))?;
        m.registry.register(Box::new(m.ratelimit_shared.clone()))?;
        // Both results exist from the start, so a dashboard sees 0, not "no data".
        m.config_reloads.with_label_values(&["ok"]);
        m.config_reloads.with_label_values(&["error"]);
        for reason in [
            "sniff_timeout",
            "send_timeout",
            "header_timeout",
            "idle_timeout",
        ] {
            m.connections_closed.with_label_values(&[reason]);
        }
        for stage in ["before_response", "during_response"] {
            m.client_aborts.with_label_values(&[stage]);
        }
        Ok(m)
    }

    /// Prometheus text exposition format.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}
