//! The `accept` phase: one listener per worker (`SO_REUSEPORT`), the
//! connection limit, the header deadline (slowloris, pingora #447) and size
//! limits, HTTP/1.1 (`http1`, with the framing rules against request
//! smuggling) and h2c (hyper), and the bounded drain on shutdown.

pub mod deadline;
pub mod http1;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;
use super::log::LoggedBody;
use super::request;
use crate::config::ServerConfig;
use crate::net::ZeroCopy;
use deadline::{Activity, Protocol, Watched};

/// Bind `count` listeners on one address with `SO_REUSEPORT`, so that each
/// worker accepts on its own socket. Port 0 is resolved by the first bind.
///
/// `SO_REUSEPORT` would also let a second gatehouse (same user) bind the
/// same address and silently take half the traffic. A plain bind first
/// fails with "address in use" while anything listens there, as nginx does.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // Sockets in TIME_WAIT from an earlier run do not count.
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn http2_builder(server: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_size).unwrap_or(u32::MAX))
        // No keep-alive pings: the answers would keep an idle connection
        // busy for ever; `http2_idle_timeout` closes dead and idle peers alike.
        .max_concurrent_streams(server.http2_max_concurrent_streams);
    builder
}

/// The open-file limit, raised to its hard limit (nginx's
/// `worker_rlimit_nofile`), and how many client connections it leaves room
/// for: a quarter stays for Gunicorn, Redis and files.
pub fn connection_cap(max_connections: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum) {
        if current < hard {
            limit.current = Some(hard);
            if setrlimit(Resource::Nofile, limit).is_err() {
                limit.current = Some(current);
            }
        }
    }
    let files = limit
        .current
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(usize::MAX);
    let room = files / 4 * 3;
    if max_connections > room {
        tracing::warn!(
            max_connections,
            open_file_limit = files,
            cap = room,
            "server.max_connections is more than the open-file limit allows; capping"
        );
    }
    max_connections.min(room).max(1)
}

/// Accept and serve connections until `shutdown` flips, then drain.
pub async fn serve(
    worker: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let graceful = GracefulShutdown::new();
    let permits = Arc::clone(&shared.connection_permits);
    let mut backoff = AcceptBackoff::default();
    // This worker's access-log lines go to the writer at least this often.
    let flusher = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(super::log::FLUSH_EVERY);
            loop {
                tick.tick().await;
                shared.access_log.flush();
            }
        })
    };
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        backoff.succeeded();
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let watcher = graceful.watcher();
        let draining = shutdown.clone();
        shared.metrics.connections.inc();
        shared.metrics.active_connections.inc();
        tokio::spawn(async move {
            serve_connection(stream, peer, worker, &shared, watcher, draining).await;
            shared.metrics.active_connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    let drain = shared.live.load().config.server.drain_timeout;
    let in_flight = graceful.count();
    let started = std::time::Instant::now();
    // Pingora's default grace is 300 s; ours is bounded by `drain_timeout`.
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::debug!(worker, in_flight, "worker drained"),
        Err(_) => tracing::warn!(
            worker,
            ?drain,
            "drain timed out; closing remaining connections"
        ),
    }
    shared
        .metrics
        .drain_seconds
        .observe(started.elapsed().as_secs_f64());
    flusher.abort();
    shared.access_log.flush();
    Ok(())
}

/// How long a drain waits for the first request of a connection that was
/// accepted but has not sent one yet. Closing it at once would leave its
/// client an empty reply it cannot safely retry, the one loss a restart on
/// a socket held by systemd would otherwise still have.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// One client connection: sniff the protocol within the header deadline,
/// then serve it; an HTTP/2 connection has a watchdog for its header blocks
/// and idleness. `draining` turns true when the worker drains.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    worker: usize,
    shared: &Arc<Shared>,
    watcher: hyper_util::server::graceful::Watcher,
    draining: watch::Receiver<bool>,
) {
    let live = shared.live.load_full();
    let server = &live.config.server;
    let Some(protocol) = deadline::sniff(&stream, server.header_read_timeout, server.http2).await
    else {
        shared
            .metrics
            .connections_closed
            .with_label_values(&["sniff_timeout"])
            .inc();
        return;
    };
    let activity = Activity::new();
    let io = Watched::new(
        ZeroCopy::new(stream, protocol == Protocol::Http1),
        Arc::clone(&activity),
        protocol,
        server.send_timeout,
    );
    let send_timed_out = || {
        if activity
            .send_timed_out
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            shared
                .metrics
                .connections_closed
                .with_label_values(&["send_timeout"])
                .inc();
        }
    };
    if protocol == Protocol::Http1 {
        let limits = http1::Limits {
            max_head: server.max_header_size,
            max_headers: server.max_headers,
            header_timeout: server.header_read_timeout,
            first_request_grace: FIRST_REQUEST_GRACE.min(server.header_read_timeout),
        };
        drop(live);
        let client = http1::Client {
            shared: Arc::clone(shared),
            worker,
            peer,
        };
        if let Err(e) = http1::serve(io, client, limits, draining).await {
            tracing::debug!(error = %e, %peer, "client connection ended with an error");
        }
        send_timed_out();
        drop(watcher);
        return;
    }
    let service = ConnectionService {
        shared: Arc::clone(shared),
        worker,
        peer,
        activity: Arc::clone(&activity),
    };
    let io = TokioIo::new(io);
    let connection = watcher.watch(http2_builder(server).serve_connection(io, service));
    let (header_timeout, idle_timeout) = (server.header_read_timeout, server.http2_idle_timeout);
    drop(live);
    tokio::pin!(connection);
    let period = (header_timeout.min(idle_timeout) / 4).max(std::time::Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "client connection ended with an error");
                }
                send_timed_out();
                return;
            }
            _ = tick.tick() => {
                if let Some(reason) = activity.overstayed(header_timeout, idle_timeout) {
                    tracing::debug!(%peer, reason, "closing an HTTP/2 connection");
                    shared.metrics.connections_closed.with_label_values(&[reason]).inc();
                    return;
                }
            }
        }
    }
}

/// Accept errors (EMFILE, ENFILE, ENOBUFS) back off, doubling to a second,
/// and are logged once per second with a count rather than once each.
#[derive(Default)]
struct AcceptBackoff {
    delay: std::time::Duration,
    failures: u64,
    logged: Option<std::time::Instant>,
}

impl AcceptBackoff {
    async fn failed(&mut self, error: &io::Error) {
        self.failures += 1;
        let due = self
            .logged
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1));
        if due {
            tracing::warn!(error = %error, failures = self.failures, "accept failed; backing off");
            self.logged = Some(std::time::Instant::now());
            self.failures = 0;
        }
        self.delay = (self.delay * 2)
            .max(std::time::Duration::from_millis(10))
            .min(std::time::Duration::from_secs(1));
        tokio::time::sleep(self.delay).await;
    }

    fn succeeded(&mut self) {
        self.delay = std::time::Duration::ZERO;
    }
}

/// The per-connection service of an HTTP/2 connection: hands each request
/// to the request path.
#[derive(Clone)]
struct ConnectionService {
    shared: Arc<Shared>,
    worker: usize,
    peer: SocketAddr,
    /// Requests in flight keep the connection from idling out.
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<LoggedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<LoggedBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let exchange =
            request::Exchange::new(Arc::clone(&self.shared), self.worker, self.peer, false);
        let in_flight = self.activity.request();
        Box::pin(async move {
            let response = exchange.handle(req).await;
            drop(in_flight);
            response
        })
    }
}
