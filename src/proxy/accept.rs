//! The `accept` phase: one listener per worker (`SO_REUSEPORT`), the
//! connection limit, the header deadline (slowloris, pingora #447) and size
//! limits, HTTP/1.1 and h2c, the framing guard against request smuggling,
//! and the bounded drain on shutdown.

pub mod framing;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::Shared;
use super::body::ProxyBody;
use super::request;
use crate::config::ServerConfig;
use framing::{FramingGuard, FramingVerdicts};

/// Bind `count` listeners on one address with `SO_REUSEPORT`, so that each
/// worker accepts on its own socket. Port 0 is resolved by the first bind.
///
/// `SO_REUSEPORT` would also let a second gatehouse (same user) bind the
/// same address and silently take half the traffic. A plain bind first
/// fails with "address in use" while anything listens there, as nginx does.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // Sockets in TIME_WAIT from an earlier run do not count.
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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

fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if !server.http2 {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        // Headers that do not fit get 431 from hyper.
        .max_buf_size(server.max_header_size)
        .max_headers(server.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_size).unwrap_or(u32::MAX));
    builder
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
    let limit = shared.live.load().config.server.max_connections;
    let permits = Arc::new(Semaphore::new(limit));
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
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let live = shared.live.load();
        let verdicts = FramingVerdicts::new();
        let io = TokioIo::new(FramingGuard::new(
            stream,
            live.config.server.max_header_size,
            Arc::clone(&verdicts),
        ));
        let service = ConnectionService {
            shared: Arc::clone(&shared),
            worker,
            peer,
            verdicts,
        };
        let connection = connection_builder(&live.config.server)
            .serve_connection(io, service)
            .into_owned();
        let connection = graceful.watch(connection);
        let metrics = Arc::clone(&shared);
        metrics.metrics.connections.inc();
        metrics.metrics.active_connections.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "client connection ended with an error");
            }
            metrics.metrics.active_connections.dec();
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
    Ok(())
}

/// The per-connection service: hands each request to the request path.
#[derive(Clone)]
struct ConnectionService {
    shared: Arc<Shared>,
    worker: usize,
    peer: SocketAddr,
    verdicts: Arc<FramingVerdicts>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let ambiguous_framing = self.verdicts.next_request_is_ambiguous();
        let exchange = request::Exchange::new(
            Arc::clone(&self.shared),
            self.worker,
            self.peer,
            ambiguous_framing,
        );
        Box::pin(async move { Ok(exchange.handle(req).await) })
    }
}
