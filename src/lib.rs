//! Gatehouse: the edge of a Django deployment in one binary.
//!
//! ```text
//!  clients ──► gatehouse proxy ──► Gunicorn (Django) ──► gatehouse db ──► PostgreSQL
//! ```
//!
//! # Modules
//!
//! - [`config`]: raw TOML structs, units, environment and flag overrides, and
//!   the validated [`config::Config`] (gateway, `config::gateway`) and
//!   [`config::db::DbConfig`] (`gatehouse db`); every problem names file,
//!   line and key.
//! - [`proxy`]: `gatehouse proxy`, the HTTP gateway: binding, start-up,
//!   reload, its admin endpoints, and the request path in named phases:
//!   - [`proxy::accept`]: listeners, one connection cap, deadlines (protocol
//!     sniff, head, HTTP/2 header blocks and idleness, send), size limits,
//!     request-smuggling shapes, HTTP/1.1 and h2c, graceful drain;
//!   - [`proxy::identify`]: who is calling (JWT, API key, a session cookie
//!     verified where Django lets us, else the client address through
//!     trusted proxies; request id);
//!   - [`proxy::route`]: the one route table, matched once per request on
//!     the path as Gunicorn decodes it; the route carries its limits;
//!   - limit: [`ratelimit`] decides, in [`proxy::request`];
//!   - [`proxy::cache`]: GET/HEAD answered from the store, misses of one key
//!     made one fetch, revalidation, storing, and invalidation on writes;
//!   - [`proxy::upstream`]: buffered forwarding to Gunicorn, keep-alive
//!     pools, retries, passive ejection and active health checks; large
//!     responses spooled to a file ([`proxy::spool`]);
//!   - response: hop-by-hop stripping, in [`proxy::request`] with
//!     [`proxy::headers`];
//!   - log: request metrics, and the access-log line written once the body
//!     is out ([`proxy::log`]).
//! - [`cache`]: the response cache's store: RFC 9111 rules
//!   ([`cache::policy`]), keys ([`cache::key`]), L1 in memory, tag versions
//!   for invalidation ([`cache::tags`]) and per-key fetch locks.
//! - [`ratelimit`]: global, per-user and endpoint sliding-window limits,
//!   one atomic Lua call to Redis per request, a local fallback behind a
//!   circuit breaker, and the `RateLimit` response fields.
//! - [`db`]: `gatehouse db`, the PostgreSQL pool on a Unix socket: protocol
//!   codec, client and server authentication, pools, and the session path
//!   (startup → authenticate → per transaction: pick a server connection →
//!   forward → release at an idle `ReadyForQuery`).
//! - [`admin`]: the admin HTTP server both services share; each adds its
//!   endpoints (`/health`, `/ready`, `/metrics`, `/metrics/json`, …).
//! - [`net`]: trusted proxies and the client address they vouch for
//!   (`X-Forwarded-For`, RFC 7239 `Forwarded`).
//! - [`telemetry`]: tracing setup and the Prometheus registry.

pub mod admin;
pub mod cache;
pub mod config;
pub mod db;
pub mod net;
pub mod proxy;
pub mod ratelimit;
pub mod telemetry;

/// What the binary asks a running service to do; it turns signals into
/// these (SIGHUP, SIGUSR1, SIGTERM). The library reads no signal itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Load the configuration file again; an invalid one changes nothing.
    Reload,
    /// Reopen log files (logrotate moved them).
    ReopenLogs,
    /// Stop accepting, finish what is in flight within the drain timeout,
    /// return. A closed channel means the same.
    Shutdown,
}

/// Where a service receives its `Control` messages.
pub type ControlReceiver = tokio::sync::mpsc::UnboundedReceiver<Control>;
