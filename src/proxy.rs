//! `gatehouse proxy`: the HTTP gateway in front of Gunicorn. This module owns
//! binding, start-up (worker threads, the admin listener, health checks), the
//! `Control` messages the binary sends (reload, reopen logs, shut down) and
//! the state the request path reads; the phases live in the submodules.

pub mod accept;
pub mod admin;
pub mod body;
pub mod cache;
pub mod error;
pub mod headers;
pub mod identify;
pub mod log;
pub mod request;
pub mod route;
pub mod spool;
pub mod upstream;
pub mod warm;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, Overrides};
use crate::ratelimit::Limiter;
use crate::ratelimit::local::{LocalStore, SystemClock};
use crate::ratelimit::redis::RedisStore;
use crate::telemetry::Metrics;
use identify::Identifier;
use route::RouteTable;
use upstream::UpstreamSet;

/// Everything one configuration implies, swapped whole on reload.
pub struct Live {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: Arc<UpstreamSet>,
    pub identifier: Identifier,
    pub limiter: Limiter,
}

/// The rate-limit stores, which outlive any one configuration: counts of
/// unchanged rules survive a reload.
pub struct LimitStores {
    pub local: Arc<LocalStore>,
    /// The Redis store and the settings it was built with.
    redis: Mutex<Option<(String, Arc<RedisStore>)>>,
}

impl LimitStores {
    fn new() -> Self {
        LimitStores {
            local: Arc::new(LocalStore::new(Box::new(SystemClock))),
            redis: Mutex::new(None),
        }
    }

    /// The Redis store for `config`, reusing the current one when its
    /// settings did not change. Connections open lazily, one per thread.
    fn redis_for(&self, config: &Config) -> Option<Arc<RedisStore>> {
        let rl = &config.ratelimit;
        let redis = config.redis.as_ref().filter(|_| rl.enabled)?;
        let settings = format!(
            "{} {:?} {:?} {} {:?}",
            redis.url,
            redis.cluster_nodes,
            rl.redis_timeout,
            rl.breaker_failures,
            rl.breaker_cooldown
        );
        let mut slot = self.redis.lock().ok()?;
        if let Some((current, store)) = slot.as_ref() {
            if *current == settings {
                return Some(Arc::clone(store));
            }
        }
        match RedisStore::new(
            &redis.url,
            &redis.cluster_nodes,
            rl.redis_timeout,
            rl.breaker_failures,
            rl.breaker_cooldown,
        ) {
            Ok(store) => {
                let store = Arc::new(store);
                *slot = Some((settings, Arc::clone(&store)));
                Some(store)
            }
            Err(e) => {
                tracing::error!(error = %e, "redis client; rate limits count in this process");
                None
            }
        }
    }
}

impl Live {
    fn new(
        config: Config,
        upstreams: Arc<UpstreamSet>,
        stores: &LimitStores,
        metrics: &Metrics,
        cache_lookups: &prometheus::IntCounterVec,
    ) -> Self {
        let limiter = Limiter::new(
            &config.ratelimit,
            stores.redis_for(&config),
            Arc::clone(&stores.local),
            metrics,
        );
        Live {
            routes: RouteTable::new(&config.routes, metrics, cache_lookups),
            identifier: Identifier::new(
                &config.identity,
                config.redis.as_ref().map(|r| r.url.as_str()),
                config.ratelimit.redis_timeout,
            ),
            upstreams,
            limiter,
            config,
        }
    }
}

/// State shared by the workers, the admin listener and the control loop.
pub struct Shared {
    pub live: ArcSwap<Live>,
    pub metrics: Metrics,
    pub workers: usize,
    pub limit_stores: LimitStores,
    /// The response cache's store, kept across reloads.
    pub cache: Arc<crate::cache::Cache>,
    pub access_log: log::AccessLog,
    /// Client connections, all workers together (`server.max_connections`,
    /// within the open-file limit). Fixed at start.
    pub connection_permits: Arc<tokio::sync::Semaphore>,
}

/// Where the running configuration came from, to load it again on SIGHUP.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
    /// The file as it was before the first load. `watch_config` compares
    /// with it, so a change made while the service starts is not missed.
    first_seen: Option<FileStamp>,
}

impl ConfigSource {
    /// Make it before loading the file the first time.
    pub fn new(path: Option<PathBuf>, overrides: Overrides) -> ConfigSource {
        let first_seen = path.as_deref().and_then(file_stamp);
        ConfigSource {
            path,
            overrides,
            first_seen,
        }
    }
}

/// What tells a changed config file: modification time and length.
type FileStamp = (std::time::SystemTime, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot listen on {addr}: {source}; ports below 1024 need root or \
         CAP_NET_BIND_SERVICE; pass --listen 127.0.0.1:8080 to use another port"
    )]
    PrivilegedPort { addr: SocketAddr, source: io::Error },
    #[error(
        "cannot listen on {addr}: address in use; another process (another gatehouse?) listens there"
    )]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot open the access log {}: {source}", path.display())]
    AccessLog { path: PathBuf, source: io::Error },
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting a runtime: {0}")]
    Runtime(io::Error),
}

fn listen_error(addr: SocketAddr, source: io::Error) -> StartError {
    if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        StartError::PrivilegedPort { addr, source }
    } else if source.kind() == io::ErrorKind::AddrInUse {
        StartError::AddressInUse { addr }
    } else {
        StartError::Listen { addr, source }
    }
}

/// The gateway's sockets, bound before the service runs.
pub struct Listeners {
    /// One per worker: on the same address (`SO_REUSEPORT`), or copies of
    /// the one socket systemd handed over.
    pub clients: Vec<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
}

/// Bind the client listeners (one per worker) and the admin listener. With
/// a socket from systemd (`inherited`), the workers accept on it instead of
/// binding `server.listen`.
pub fn bind(
    config: &Config,
    inherited: Option<std::net::TcpListener>,
) -> Result<Listeners, StartError> {
    let clients = match inherited {
        Some(socket) => {
            let addr = socket.local_addr().unwrap_or(config.server.listen);
            if addr != config.server.listen {
                tracing::info!(
                    %addr,
                    configured = %config.server.listen,
                    "server.listen is not bound: systemd handed over a socket"
                );
            }
            let copies = (1..config.server.workers.max(1))
                .map(|_| socket.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .and_then(|mut copies| {
                    socket.set_nonblocking(true)?;
                    copies.insert(0, socket);
                    Ok(copies)
                });
            copies.map_err(|e| listen_error(addr, e))?
        }
        None => accept::bind(config.server.listen, config.server.workers)
            .map_err(|e| listen_error(config.server.listen, e))?,
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(crate::admin::bind(addr).map_err(|e| listen_error(addr, e))?),
        None => None,
    };
    Ok(Listeners { clients, admin })
}

/// Run the gateway on `listeners` until `control` says `Shutdown` (or
/// closes): then stop accepting, drain within `drain_timeout`, and return.
pub fn run(
    listeners: Listeners,
    config: Config,
    source: ConfigSource,
    control: crate::ControlReceiver,
) -> Result<(), StartError> {
    let metrics = Metrics::new()?;
    let workers = listeners.clients.len();
    let Listeners {
        clients: listeners,
        admin,
    } = listeners;
    let upstreams = Arc::new(UpstreamSet::new(&config.upstream, workers, &metrics));
    let limit_stores = LimitStores::new();
    let cap = accept::connection_cap(config.server.max_connections);
    let access_log = log::AccessLog::start(
        config.log.access_log_path.clone(),
        metrics.access_log_dropped.clone(),
    )
    .map_err(|source| StartError::AccessLog {
        path: config.log.access_log_path.clone().unwrap_or_default(),
        source,
    })?;
    let cache = Arc::new(crate::cache::Cache::new(&config.cache, &metrics.registry)?);
    let l2 = cache.set_l2(config.redis.as_ref(), &config.cache);
    let live = Live::new(
        config,
        upstreams,
        &limit_stores,
        &metrics,
        &cache.metrics.lookups,
    );
    let shared = Arc::new(Shared {
        live: ArcSwap::from_pointee(live),
        metrics,
        workers,
        limit_stores,
        cache,
        access_log,
        connection_permits: Arc::new(tokio::sync::Semaphore::new(cap)),
    });
    let first_addr = listeners.first().and_then(|l| l.local_addr().ok());
    if let Some(addr) = first_addr {
        tracing::info!(service = "proxy", %addr, workers, "listening");
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut threads = Vec::with_capacity(listeners.len());
    for (worker, listener) in listeners.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let shutdown = shutdown_rx.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let thread = std::thread::Builder::new()
            .name(format!("gatehouse-worker-{worker}"))
            .spawn(move || {
                if let Err(e) = runtime.block_on(accept::serve(worker, listener, shared, shutdown))
                {
                    tracing::error!(worker, error = %e, "worker stopped");
                }
            })
            .map_err(StartError::Runtime)?;
        threads.push(thread);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    runtime.block_on(async {
        if let Some(listener) = admin {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { admin::serve(listener, shared).await });
        }
        tokio::spawn(health_checks(Arc::clone(&shared)));
        if let Some(l2) = l2 {
            tokio::spawn(crate::cache::l2::subscribe(Arc::clone(&shared.cache), l2));
        }
        if let Some(addr) = first_addr {
            tokio::spawn(warm_at_start(Arc::clone(&shared), addr));
        }
        controlled(&shared, &source, shutdown_tx, control).await;
    });
    for thread in threads {
        let _ = thread.join();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Follow `control` (reload, reopen logs, shut down) and, with
/// `watch_config`, the file's changes.
async fn controlled(
    shared: &Shared,
    source: &ConfigSource,
    shutdown: watch::Sender<bool>,
    mut control: crate::ControlReceiver,
) {
    let mut seen = source.first_seen;
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut last_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = control.recv() => match message {
                Some(crate::Control::Reload) => {
                    seen = fingerprint(source);
                    reload(shared, source);
                }
                Some(crate::Control::ReopenLogs) => {
                    tracing::info!("reopening the access log");
                    shared.access_log.reopen(None);
                }
                Some(crate::Control::Shutdown) | None => {
                    let drain = shared.live.load().config.server.drain_timeout;
                    tracing::info!(?drain, "shutting down: no new connections; finishing in-flight requests");
                    let _ = shutdown.send(true);
                    return;
                }
            },
            _ = watch.tick() => {
                let Some(every) = shared.live.load().config.server.config_watch_interval else {
                    continue;
                };
                if last_check.elapsed() < every {
                    continue;
                }
                last_check = tokio::time::Instant::now();
                let now = fingerprint(source);
                if now != seen {
                    seen = now;
                    tracing::info!("configuration file changed");
                    reload(shared, source);
                }
            }
        }
    }
}

fn fingerprint(source: &ConfigSource) -> Option<FileStamp> {
    file_stamp(source.path.as_deref()?)
}

/// Load the configuration again; swap it in only when it is valid.
pub fn reload(shared: &Shared, source: &ConfigSource) {
    let Some((config, file)) = crate::config::reloaded(
        source.path.as_deref(),
        &shared.metrics.config_reloads,
        || Config::load(source.path.as_deref(), &source.overrides),
    ) else {
        return;
    };
    let old = shared.live.load_full();
    if config.log.access_log_path != old.config.log.access_log_path {
        shared.access_log.reopen(config.log.access_log_path.clone());
    }
    if config.server.listen != old.config.server.listen
        || config.server.workers != old.config.server.workers
        || config.admin_listen != old.config.admin_listen
    {
        tracing::warn!("listen addresses and worker count change only on restart");
    }
    let upstreams = if config.upstream == old.config.upstream {
        Arc::clone(&old.upstreams)
    } else {
        for server in &old.upstreams.servers {
            let _ = shared
                .metrics
                .upstream_healthy
                .remove_label_values(&[&*server.label]);
        }
        Arc::new(UpstreamSet::new(
            &config.upstream,
            shared.workers,
            &shared.metrics,
        ))
    };
    shared.cache.reconfigure(&config.cache);
    if let Some(l2) = shared.cache.set_l2(config.redis.as_ref(), &config.cache) {
        tokio::spawn(crate::cache::l2::subscribe(Arc::clone(&shared.cache), l2));
    }
    shared.live.store(Arc::new(Live::new(
        config,
        upstreams,
        &shared.limit_stores,
        &shared.metrics,
        &shared.cache.metrics.lookups,
    )));
    crate::config::reload_applied(&shared.metrics.config_reloads, &file);
}

/// `cache.warm` and `cache.warm_file`: once a Gunicorn answers, fetch each
/// URL through this gateway's own listener, so the cache holds them.
async fn warm_at_start(shared: Arc<Shared>, listen: SocketAddr) {
    let config = shared.live.load().config.cache.clone();
    if !config.enabled || (config.warm.is_empty() && config.warm_file.is_none()) {
        return;
    }
    let mut urls = config.warm.clone();
    if let Some(file) = &config.warm_file {
        match tokio::fs::read_to_string(file).await {
            Ok(text) => urls.extend(warm::parse_list(&text)),
            Err(e) => tracing::warn!(file = %file.display(), error = %e, "cache warm-up list"),
        }
    }
    for _ in 0..300 {
        if shared.live.load().upstreams.any_healthy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ip = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    let addr = SocketAddr::new(ip, listen.port());
    let host = config
        .hosts
        .first()
        .cloned()
        .unwrap_or_else(|| addr.to_string());
    let report = warm::warm(addr, &host, &urls, 4).await;
    tracing::info!(
        stored = report.stored,
        hits = report.hits,
        not_stored = report.not_stored,
        failed = report.failed.len(),
        "cache warmed at start"
    );
    for (url, why) in report.failed.iter().take(10) {
        tracing::warn!(url, why, "cache warm-up");
    }
}

/// Probe the upstreams of whatever configuration is live, forever.
async fn health_checks(shared: Arc<Shared>) {
    loop {
        let live = shared.live.load_full();
        match &live.config.upstream.health_check {
            Some(check) => {
                upstream::health::check_all(&live.upstreams, check).await;
                tokio::time::sleep(check.interval).await;
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}
