//! The `upstream` phase's machinery: the Gunicorn servers and their health
//! (passive ejection, active checks in `health`), per-worker keep-alive pools,
//! and sending one buffered request with at most the configured retries.

pub mod h1;
pub mod health;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response};
use prometheus::IntGauge;
use tokio::net::{TcpStream, UnixStream};

use self::h1::{Conn, H1Error, ReadTimer, UpstreamBody};
use super::body::ProxyBody;
use super::error::ProxyError;
use super::spool::Spool;
use crate::config::{UpstreamConfig, UpstreamTarget};
use crate::net::Stream;
use crate::telemetry::Metrics;

/// What a request takes to Gunicorn besides its head's own fields: the
/// lines the gateway wrote itself (`headers::forwarded_fields`), and the
/// buffered body.
pub struct Outgoing {
    pub set: Vec<u8>,
    pub body: Bytes,
}

/// One keep-alive connection waiting in a pool.
struct Idle {
    conn: Conn,
    since: Instant,
}

/// One Gunicorn address with its health and its idle connections.
pub struct Server {
    pub target: UpstreamTarget,
    /// `target` as text: the metric label and the log field.
    pub label: std::sync::Arc<str>,
    pub weight: u32,
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    ejected_at: Mutex<Option<Instant>>,
    /// One pool per worker thread; a connection belongs to the runtime that
    /// opened it, so it is reused only there.
    idle: Box<[Mutex<Vec<Idle>>]>,
    healthy_gauge: IntGauge,
    /// This server's busiest metrics, looked up once.
    duration: prometheus::Histogram,
    succeeded: prometheus::IntCounter,
}

impl Server {
    fn new(target: UpstreamTarget, weight: u32, workers: usize, metrics: &Metrics) -> Self {
        let label: std::sync::Arc<str> = target.to_string().into();
        let healthy_gauge = metrics.upstream_healthy.with_label_values(&[&*label]);
        let duration = metrics.upstream_duration.with_label_values(&[&*label]);
        let succeeded = metrics
            .upstream_requests
            .with_label_values(&[&*label, "ok"]);
        healthy_gauge.set(1);
        Server {
            target,
            label,
            weight,
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_at: Mutex::new(None),
            idle: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            healthy_gauge,
            duration,
            succeeded,
        }
    }

    /// `Host` for requests that do not carry the client's: the server's
    /// address, or `localhost` for a Unix socket.
    pub fn host_header(&self) -> HeaderValue {
        match &self.target {
            UpstreamTarget::Tcp { authority } => HeaderValue::from_str(authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            UpstreamTarget::Unix { .. } => HeaderValue::from_static("localhost"),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Takes traffic: healthy, or ejected long enough ago for one trial
    /// request (nginx's `fail_timeout`).
    fn is_available(&self, fail_timeout: Duration) -> bool {
        if self.is_healthy() {
            return true;
        }
        let ejected_at = self.ejected_at.lock().map(|g| *g).unwrap_or(None);
        ejected_at.is_some_and(|at| at.elapsed() >= fail_timeout)
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(upstream = %self.label, "upstream readmitted");
            self.healthy_gauge.set(1);
        }
    }

    pub fn record_failure(&self, max_fails: u32) {
        let fails = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max_fails {
            if let Ok(mut at) = self.ejected_at.lock() {
                *at = Some(Instant::now());
            }
            if self.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(upstream = %self.label, failures = fails, "upstream ejected");
                self.healthy_gauge.set(0);
            }
        }
    }

    /// A pooled connection not idle too long, on which nothing arrived
    /// while it waited (the server did not close it), if any.
    fn checkout(&self, worker: usize, idle_timeout: Duration) -> Option<Conn> {
        let mut pool = self.idle.get(worker)?.lock().ok()?;
        while let Some(idle) = pool.pop() {
            if idle.since.elapsed() < idle_timeout && idle.conn.is_clean() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Pool a connection idle `since` its last read.
    fn checkin(&self, worker: usize, conn: Conn, max_idle: usize, since: Instant) {
        if let Some(Ok(mut pool)) = self.idle.get(worker).map(|p| p.lock()) {
            if pool.len() < max_idle {
                pool.push(Idle { conn, since });
            }
        }
    }

    /// Open a new connection, registered with this worker's event loop.
    async fn connect(&self, timeout: Duration) -> Result<Conn, ProxyError> {
        let unreachable = |e: std::io::Error| ProxyError::UpstreamUnreachable {
            addr: self.label.to_string(),
            reason: e.to_string(),
        };
        let connect = async {
            match &self.target {
                UpstreamTarget::Tcp { authority } => {
                    let stream = TcpStream::connect(authority.as_str())
                        .await
                        .map_err(unreachable)?;
                    let _ = stream.set_nodelay(true);
                    Ok(Conn::new(Stream::Tcp(stream)))
                }
                UpstreamTarget::Unix { path } => {
                    let stream = UnixStream::connect(path).await.map_err(unreachable)?;
                    Ok(Conn::new(Stream::Unix(stream)))
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ProxyError::UpstreamTimeout {
                addr: self.label.to_string(),
                after: timeout,
            })?
    }
}

/// The servers of one configuration and how requests are spread over them.
pub struct UpstreamSet {
    pub servers: Vec<Arc<Server>>,
    /// Server indexes repeated by weight; a rotating cursor walks it.
    rotation: Vec<usize>,
    cursor: AtomicUsize,
    pub config: UpstreamConfig,
    metrics_spooled: prometheus::IntCounter,
}

impl UpstreamSet {
    pub fn new(config: &UpstreamConfig, workers: usize, metrics: &Metrics) -> Self {
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|s| Arc::new(Server::new(s.target.clone(), s.weight, workers, metrics)))
            .collect();
        let rotation = interleave(&servers);
        UpstreamSet {
            servers,
            rotation,
            cursor: AtomicUsize::new(0),
            config: config.clone(),
            metrics_spooled: metrics.upstream_spooled.clone(),
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.servers.iter().any(|s| s.is_healthy())
    }

    /// The next available server not yet tried for this request.
    fn pick(&self, tried: &[usize]) -> Option<(usize, &Arc<Server>)> {
        let len = self.rotation.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|i| self.rotation[(start + i) % len])
            .filter(|index| !tried.contains(index))
            .map(|index| (index, &self.servers[index]))
            .find(|(_, s)| s.is_available(self.config.fail_timeout))
    }

    /// Send a buffered request, retrying once on another server when that is
    /// safe, and buffer the response up to `response_buffer_size`.
    pub async fn forward(
        &self,
        worker: usize,
        request: Request<Outgoing>,
        metrics: &Metrics,
    ) -> Result<Forwarded, ProxyError> {
        let retry_safe = is_idempotent(request.method());
        let mut tried: Vec<usize> = Vec::with_capacity(2);
        let mut last_error = None;
        for attempt in 0..=self.config.retries {
            let Some((index, server)) = self.pick(&tried) else {
                break;
            };
            tried.push(index);
            if attempt > 0 {
                metrics.upstream_retries.inc();
            }
            let started = Instant::now();
            match self.attempt(worker, server, &request, started).await {
                Ok((response, done)) => {
                    server.record_success();
                    let elapsed = done.saturating_duration_since(started);
                    server.duration.observe(elapsed.as_secs_f64());
                    server.succeeded.inc();
                    return Ok(Forwarded {
                        response,
                        upstream: Arc::clone(server),
                        upstream_time: elapsed,
                    });
                }
                Err(failure) => {
                    server.record_failure(self.config.max_fails);
                    metrics
                        .upstream_requests
                        .with_label_values(&[&*server.label, failure.error.kind()])
                        .inc();
                    tracing::warn!(upstream = %server.label, error = %failure.error, "upstream attempt failed");
                    last_error = Some(failure.error);
                    // Pingora #979: never resend what a server may have acted
                    // on; only a request no byte of which left may go again.
                    if !(failure.unsent && retry_safe) {
                        break;
                    }
                }
            }
        }
        Err(last_error.unwrap_or(ProxyError::NoHealthyUpstream))
    }

    /// One server: a pooled connection (a stale one is replaced without
    /// counting as a failure), the request, the buffered response, and when
    /// its last byte was read (the clock is read once per read, not again
    /// here).
    async fn attempt(
        &self,
        worker: usize,
        server: &Server,
        request: &Request<Outgoing>,
        started: Instant,
    ) -> Result<(Response<ProxyBody>, Instant), Failure> {
        let cfg = &self.config;
        let host = (!cfg.preserve_host || !request.headers().contains_key(http::header::HOST))
            .then(|| server.host_header());
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let method = request.method();
        let timeout = cfg.response_timeout;
        let timed_out = || ProxyError::UpstreamTimeout {
            addr: server.label.to_string(),
            after: timeout,
        };
        let deadline = tokio::time::Instant::from_std(started) + timeout;
        // Set once, with the first connection's timer when it has one.
        let mut timer = None;
        let (conn, head) = loop {
            let (mut conn, pooled) = match server.checkout(worker, cfg.idle_timeout) {
                Some(conn) => (conn, true),
                // Boxed, as is `spool` below: both are rare, and their
                // futures would make every request's larger (it is copied
                // into its box once per request).
                None => match Box::pin(server.connect(cfg.connect_timeout)).await {
                    Ok(conn) => (conn, false),
                    Err(error) => return Err(Failure::unsent(error)),
                },
            };
            let timer =
                timer.get_or_insert_with(|| ReadTimer::new(conn.take_timer(), deadline, timeout));
            let outgoing = request.body();
            let head = h1::encode_head(
                method,
                target,
                request.headers(),
                host.as_ref(),
                &outgoing.set,
            );
            let sent = tokio::select! {
                biased;
                sent = conn.send(head, &outgoing.body) => sent,
                () = timer.sleep() => return Err(Failure::sent(timed_out())),
            };
            if let Err(e) = sent {
                // A kept-alive connection the server had closed: it took no
                // request, so any request may go on a fresh one.
                if pooled {
                    continue;
                }
                // Refused while being written: no whole request reached the
                // server, so an idempotent one may go to another.
                return Err(Failure::unsent(broken(server, &H1Error::Io(e))));
            }
            match conn.read_head(method, timer).await {
                Ok(head) => break (conn, head),
                // Closed as the request arrived, before any byte of an
                // answer: the server's keep-alive timeout raced this
                // request. Only an idempotent request is safe to send again.
                Err(H1Error::ClosedEarly) if pooled && is_idempotent(method) => continue,
                Err(H1Error::TimedOut) => return Err(Failure::sent(timed_out())),
                Err(e) => return Err(Failure::sent(broken(server, &e))),
            }
        };
        // Set by every turn of the loop that reaches here; the fallback only
        // keeps this free of a panic.
        let mut timer = timer.unwrap_or_else(|| ReadTimer::new(None, deadline, timeout));
        let mut rest = UpstreamBody::new(conn, &head);
        let parts = head.parts;
        let mut chunks = Gathered::default();
        loop {
            if chunks.len > cfg.response_buffer_size {
                let head = chunks.into_bytes();
                if cfg.max_temp_file_size > 0 {
                    let response =
                        Box::pin(self.spool(worker, server, parts, head, rest, &mut timer)).await?;
                    return Ok((response, timer.last_read().into_std()));
                }
                // Spooling off: send what we have, stream the rest. The
                // connection is not pooled; it closes when the body ends.
                return Ok((
                    Response::from_parts(parts, ProxyBody::streaming(head, rest)),
                    timer.last_read().into_std(),
                ));
            }
            match rest.next_chunk(&mut timer).await {
                Err(H1Error::TimedOut) => return Err(Failure::sent(timed_out())),
                Err(e) => return Err(Failure::sent(broken(server, &e))),
                Ok(None) => break,
                Ok(Some(data)) => chunks.push(data),
            }
        }
        let done = timer.last_read().into_std();
        if let Some(mut conn) = rest.into_reusable() {
            conn.keep_timer(timer);
            server.checkin(worker, conn, cfg.max_idle_per_server, done);
        }
        Ok((
            Response::from_parts(parts, ProxyBody::full(chunks.into_bytes())),
            done,
        ))
    }
}

impl UpstreamSet {
    /// Read the rest of a large response into a temporary file, then give
    /// the connection back: Gunicorn's worker is free however slowly the
    /// client reads. Past `max_temp_file_size` the rest streams; if no file
    /// can be made, all of it streams.
    async fn spool(
        &self,
        worker: usize,
        server: &Server,
        parts: http::response::Parts,
        head: Bytes,
        mut rest: UpstreamBody,
        timer: &mut ReadTimer,
    ) -> Result<Response<ProxyBody>, Failure> {
        let cfg = &self.config;
        let mut spool = match Spool::create(&cfg.temp_path).await {
            Ok(spool) => spool,
            Err(e) => {
                tracing::warn!(error = %e, dir = %cfg.temp_path.display(), "cannot spool a large response; streaming it");
                return Ok(Response::from_parts(
                    parts,
                    ProxyBody::streaming(head, rest),
                ));
            }
        };
        let failed = |e: std::io::Error| {
            tracing::error!(error = %e, "writing a spooled response");
            Failure::sent(ProxyError::UpstreamBroken {
                addr: server.label.to_string(),
                reason: format!("spooling the response: {e}"),
            })
        };
        spool.write(&head).await.map_err(failed)?;
        let complete = loop {
            if spool.written() >= cfg.max_temp_file_size {
                break false;
            }
            match rest.next_chunk(timer).await {
                Err(H1Error::TimedOut) => {
                    return Err(Failure::sent(ProxyError::UpstreamTimeout {
                        addr: server.label.to_string(),
                        after: cfg.response_timeout,
                    }));
                }
                Err(e) => return Err(Failure::sent(broken(server, &e))),
                Ok(None) => break true,
                Ok(Some(data)) => spool.write(&data).await.map_err(failed)?,
            }
        };
        self.metrics_spooled.inc();
        let file = spool.into_reader().await.map_err(failed)?;
        let rest = if complete {
            if let Some(conn) = rest.into_reusable() {
                server.checkin(
                    worker,
                    conn,
                    cfg.max_idle_per_server,
                    timer.last_read().into_std(),
                );
            }
            None
        } else {
            Some(rest)
        };
        Ok(Response::from_parts(
            parts,
            ProxyBody::Spooled {
                file: Box::new(file),
                rest: rest.map(Box::new),
            },
        ))
    }
}

/// A response from a server, and which server gave it.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    pub upstream: Arc<Server>,
    pub upstream_time: Duration,
}

/// Why one attempt failed, and whether the request may go to another
/// server: only when no byte of it reached this one.
struct Failure {
    error: ProxyError,
    unsent: bool,
}

impl Failure {
    fn unsent(error: ProxyError) -> Self {
        Failure {
            error,
            unsent: true,
        }
    }

    fn sent(error: ProxyError) -> Self {
        Failure {
            error,
            unsent: false,
        }
    }
}

fn broken(server: &Server, error: &H1Error) -> ProxyError {
    ProxyError::UpstreamBroken {
        addr: server.label.to_string(),
        reason: error.to_string(),
    }
}

/// A body read into memory. Most arrive in one piece, which is kept as it
/// is: no list to allocate, nothing copied.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    len: usize,
}

impl Gathered {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push(data);
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.first {
            None => Bytes::new(),
            Some(first) if self.more.is_empty() => first,
            Some(first) => {
                let mut all = BytesMut::with_capacity(self.len);
                all.extend_from_slice(&first);
                for chunk in self.more {
                    all.extend_from_slice(&chunk);
                }
                all.freeze()
            }
        }
    }
}

/// RFC 9110 §9.2.2; POST and PATCH are never resent.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Spread servers by weight so that a heavy one does not take long runs:
/// weights 3 and 1 give `[0, 0, 1, 0]`-like order rather than `[0, 0, 0, 1]`
/// (nginx's smooth weighted round-robin, precomputed).
fn interleave(servers: &[Arc<Server>]) -> Vec<usize> {
    let total: i64 = servers.iter().map(|s| i64::from(s.weight)).sum();
    let mut current: Vec<i64> = vec![0; servers.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, s) in current.iter_mut().zip(servers) {
            *c += i64::from(s.weight);
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        current[best] -= total;
        order.push(best);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(weights: &[u32]) -> UpstreamSet {
        let metrics = Metrics::new().unwrap();
        let config = UpstreamConfig {
            servers: weights
                .iter()
                .enumerate()
                .map(|(i, w)| crate::config::UpstreamServer {
                    target: UpstreamTarget::Tcp {
                        authority: format!("127.0.0.1:{}", 1000 + i),
                    },
                    weight: *w,
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            response_buffer_size: 1024,
            max_temp_file_size: 0,
            temp_path: std::env::temp_dir(),
            max_idle_per_server: 1,
            idle_timeout: Duration::from_secs(1),
            retries: 1,
            max_fails: 2,
            fail_timeout: Duration::from_secs(3600),
            preserve_host: true,
            health_check: None,
        };
        UpstreamSet::new(&config, 1, &metrics)
    }

    #[test]
    fn weights_share_traffic_smoothly() {
        let set = set(&[3, 1]);
        assert_eq!(set.rotation.len(), 4);
        assert_eq!(set.rotation.iter().filter(|i| **i == 0).count(), 3);
        assert_ne!(set.rotation[..3], [0, 0, 0]);
    }

    #[test]
    fn ejected_after_max_fails_and_skipped() {
        let set = set(&[1, 1]);
        set.servers[0].record_failure(2);
        assert!(set.servers[0].is_healthy());
        set.servers[0].record_failure(2);
        assert!(!set.servers[0].is_healthy());
        for _ in 0..4 {
            assert_eq!(set.pick(&[]).map(|(i, _)| i), Some(1));
        }
        assert!(set.pick(&[1]).is_none());
        set.servers[0].record_success();
        assert!(set.pick(&[1]).is_some());
    }

    #[test]
    fn a_gathered_body_is_its_one_piece_or_its_pieces_in_order() {
        assert!(Gathered::default().into_bytes().is_empty());

        let piece = Bytes::from_static(b"one piece");
        let mut one = Gathered::default();
        one.push(piece.clone());
        assert_eq!(one.len, 9);
        let body = one.into_bytes();
        // The piece itself, not a copy of it.
        assert_eq!(body.as_ptr(), piece.as_ptr());

        let mut three = Gathered::default();
        for part in ["ab", "", "cde"] {
            three.push(Bytes::from_static(part.as_bytes()));
        }
        assert_eq!(three.len, 5);
        assert_eq!(three.into_bytes(), "abcde");
    }
}
