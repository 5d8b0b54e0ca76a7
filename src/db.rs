//! `gatehouse db`: the PostgreSQL side. Django reaches it on a Unix socket
//! exactly as it reaches PostgreSQL. This module owns binding (the socket,
//! optional TCP), start-up, the `Control` messages the binary sends (reload,
//! shut down) and the state sessions share: the
//! configuration, the pools, client settings and the cancel keys handed to
//! clients.
//!
//! - `codec`: protocol 3.0 framing; decodes only what pooling and routing read.
//! - `auth`: client authentication, server side (SCRAM-SHA-256, md5).
//! - `error`: what gatehouse tells a client it refuses, with SQLSTATE and
//!   severity decided in one place.
//! - `classify`: what a statement means for pooling (settings it changes,
//!   session state that pins) and, in `classify::access`, whether a replica
//!   may run it; on PostgreSQL's grammar.
//! - `server`: connections to PostgreSQL and logging in.
//! - `pool`: server connections per (node, database, user), lent and taken
//!   back.
//! - `topology`: the nodes as observed (roles, WAL positions, lag, circuit
//!   breakers), polled every `router.topology_interval`.
//! - `router`: where a transaction goes (`choose`, once per transaction).
//! - `session`: one client from startup to goodbye.
//! - `statements`: the messages between a client and the server it holds,
//!   with named prepared statements kept per client across transaction
//!   pooling.
//! - `settings`: what a client asks its server session to be.
//! - `metrics`: the registry and the per-pool handles.
//! - `admin`: `/health`, `/ready`, `/metrics`, `/metrics/json`.
//!
//! In transaction pooling (the default) a session holds a server connection
//! for one transaction; in session pooling, from login to disconnect. With
//! replicas, each transaction's node is chosen when it takes its server
//! connection (`docs/router.md`).

pub mod admin;
pub mod auth;
pub mod classify;
pub mod codec;
pub mod error;
pub mod metrics;
pub mod pool;
pub mod router;
pub mod server;
pub mod session;
pub mod settings;
pub mod statements;
pub mod topology;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::BufMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};

use crate::config::db::{CpuScheduling, DbConfig, DbOverrides, Node};
use crate::net::Stream;

/// Where a client's cancel key leads: the server it holds.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub node: Arc<Node>,
    pub backend_key: (i32, i32),
}

/// State every session shares.
pub struct DbShared {
    pub config: ArcSwap<DbConfig>,
    pub pools: pool::Pools,
    pub metrics: metrics::DbMetrics,
    /// Statements' effects on the session, by text.
    pub classifier: classify::Classifier,
    /// Statements' needs (a replica, or the primary), by shape.
    pub shapes: classify::access::Shapes,
    /// The nodes as the monitor last saw them.
    pub topology: topology::Topology,
    /// Per database: the WAL position of its last write and when it was
    /// made (`read_your_writes = "database"`).
    pub written: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// True once SIGTERM asked for a drain: sessions end at their next
    /// transaction boundary. Read on every message, written once; setting
    /// it wakes every session through its slot (`start_drain`).
    pub draining: std::sync::atomic::AtomicBool,
    /// Clients connected now, for `server.max_client_connections`.
    pub connected: std::sync::atomic::AtomicUsize,
    /// Router-issued (process id, secret) → the server that client holds
    /// now, if any. Each session keeps its own slot to update; the drain
    /// wakes each session through it.
    cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    /// Client settings in use, one copy of each: a server connection set up
    /// for one client is recognised as set up for the next with the same
    /// settings by pointer.
    settings: Mutex<Vec<std::sync::Weak<settings::Settings>>>,
}

/// One logged-in client's slot: where its cancel key leads now, and the
/// waker of its session, woken when the drain starts.
#[derive(Default)]
pub struct Slot {
    pub target: Mutex<Option<CancelTarget>>,
    /// A session waiting for its client registers here on every poll: an
    /// atomic swap, where a `Notify` shared by all sessions would take its
    /// lock on every poll of every session.
    pub drain: atomic_waker::AtomicWaker,
}

pub type CancelSlot = Arc<Slot>;

impl DbShared {
    pub fn new(config: DbConfig) -> Result<Self, prometheus::Error> {
        Ok(DbShared {
            config: ArcSwap::from_pointee(config),
            pools: pool::Pools::default(),
            metrics: metrics::DbMetrics::new()?,
            classifier: classify::Classifier::default(),
            shapes: classify::access::Shapes::default(),
            topology: topology::Topology::default(),
            written: Mutex::new(HashMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            connected: std::sync::atomic::AtomicUsize::new(0),
            cancels: Mutex::new(HashMap::new()),
            settings: Mutex::new(Vec::new()),
        })
    }

    /// The shared copy of a client's settings.
    fn intern_settings(&self, settings: settings::Settings) -> Arc<settings::Settings> {
        let mut known = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|weak| weak.strong_count() > 0);
        if let Some(same) = known
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|s| **s == settings)
        {
            return same;
        }
        let settings = Arc::new(settings);
        known.push(Arc::downgrade(&settings));
        settings
    }

    /// A fresh cancel key for a client, and the slot where the session
    /// points it at the server it holds, or at nothing while it holds none:
    /// a cancel reaches a server only while that client holds it
    /// (pgbouncer #245, #684: stale keys cancelled other clients' queries).
    fn register_cancel(&self) -> ((i32, i32), CancelSlot) {
        let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(entry) = cancels.entry(key) {
                let slot = CancelSlot::default();
                entry.insert(Arc::clone(&slot));
                return (key, slot);
            }
        }
    }

    fn unregister_cancel(&self, key: (i32, i32)) {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Set `draining` and wake every session, so that one waiting for
    /// its client sees it.
    fn start_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        for slot in cancels.values() {
            slot.drain.wake();
        }
    }

    async fn cancel(&self, process_id: i32, secret_key: i32) {
        let slot = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(process_id, secret_key))
            .cloned();
        let target = slot.and_then(|slot| {
            slot.target
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        });
        let Some(target) = target else {
            tracing::debug!("cancel request with an unknown key ignored");
            return;
        };
        let stream = match target.node.as_ref() {
            Node::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map(Stream::Tcp),
            Node::Socket { dir, port } => {
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .map(Stream::Unix)
            }
        };
        let Ok(mut stream) = stream else { return };
        let mut packet = Vec::with_capacity(16);
        packet.put_i32(16);
        packet.put_i32(codec::CANCEL_REQUEST);
        packet.put_i32(target.backend_key.0);
        packet.put_i32(target.backend_key.1);
        let _ = stream.write_all(&packet).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbStartError {
    #[error(
        "socket directory {dir}: {source} (choose another with --socket-dir or server.socket_dir)"
    )]
    SocketDir { dir: String, source: io::Error },
    #[error("server.socket_group `{group}`: {reason}")]
    SocketGroup { group: String, reason: String },
    #[error("cannot listen on {at}: {source}")]
    Listen { at: String, source: io::Error },
    #[error("starting a runtime: {0}")]
    Runtime(io::Error),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Where the configuration came from, to load it again on SIGHUP.
#[derive(Debug, Clone, Default)]
pub struct DbSource {
    pub path: Option<PathBuf>,
    pub overrides: DbOverrides,
}

/// `gatehouse db`'s sockets, bound before the service runs.
pub struct DbListeners {
    pub unix: std::os::unix::net::UnixListener,
    /// The Unix socket came from systemd, which keeps its file: it is not
    /// removed on the way out.
    pub inherited: bool,
    pub tcp: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
}

/// Bind the Unix socket (`bind_socket`), the TCP listener and the admin
/// listener. A Unix socket from systemd (`inherited`) is used as it is, in
/// place of `server.socket_dir`: its file, mode and group are the socket
/// unit's.
pub fn bind(
    config: &DbConfig,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<DbListeners, DbStartError> {
    let listen_error = |at: String| move |source| DbStartError::Listen { at, source };
    let (unix, inherited) = match inherited {
        Some(unix) => {
            let at = unix
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "the socket from systemd".into());
            unix.set_nonblocking(true)
                .map_err(listen_error(at.clone()))?;
            tracing::info!(service = "db", socket = %at, inherited = true, "listening");
            (unix, true)
        }
        None => (bind_socket(config)?, false),
    };
    let tcp = match config.listen {
        Some(addr) => {
            let listener =
                std::net::TcpListener::bind(addr).map_err(listen_error(addr.to_string()))?;
            listener
                .set_nonblocking(true)
                .map_err(listen_error(addr.to_string()))?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(service = "db", %addr, "listening");
            }
            Some(listener)
        }
        None => None,
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(crate::admin::bind(addr).map_err(listen_error(addr.to_string()))?),
        None => None,
    };
    Ok(DbListeners {
        unix,
        inherited,
        tcp,
        admin,
    })
}

/// The Unix socket in `server.socket_dir`: the directory made, a stale
/// socket file of an earlier run removed.
fn bind_socket(config: &DbConfig) -> Result<std::os::unix::net::UnixListener, DbStartError> {
    let dir = config.socket_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| DbStartError::SocketDir {
        dir: dir.display().to_string(),
        source,
    })?;
    let path = config.socket_path();
    let listen_error = |at: String| move |source| DbStartError::Listen { at, source };
    // A socket file left by a previous run that is not listening any more.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(DbStartError::Listen {
                at: path.display().to_string(),
                source: io::ErrorKind::AddrInUse.into(),
            });
        }
        let _ = std::fs::remove_file(&path);
    }
    // Made under another name and renamed once its mode and group are
    // set: a client never finds the socket half set up.
    let staging = dir.join(format!(
        ".s.PGSQL.{}.{}.new",
        config.port,
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let unix = std::os::unix::net::UnixListener::bind(&staging)
        .map_err(listen_error(path.display().to_string()))?;
    let prepared = prepare_socket(&staging, config).and_then(|()| {
        std::fs::rename(&staging, &path).map_err(listen_error(path.display().to_string()))
    });
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    unix.set_nonblocking(true)
        .map_err(listen_error(path.display().to_string()))?;
    tracing::info!(service = "db", socket = %path.display(), "listening");
    Ok(unix)
}

/// Failed accepts (EMFILE, ENFILE, ENOBUFS) wait before the next attempt,
/// longer each time up to a second, instead of spinning.
#[derive(Default)]
struct AcceptBackoff {
    delay: std::time::Duration,
}

impl AcceptBackoff {
    fn reset(&mut self) {
        self.delay = std::time::Duration::ZERO;
    }

    async fn wait(&mut self, error: &io::Error) {
        self.delay = (self.delay * 2).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(1),
        );
        tracing::warn!(%error, retry_in = ?self.delay, "accepting a client failed");
        tokio::time::sleep(self.delay).await;
    }
}

/// The socket file's mode and group, as configured.
fn prepare_socket(socket: &std::path::Path, config: &DbConfig) -> Result<(), DbStartError> {
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(config.socket_mode)).map_err(
        |source| DbStartError::Listen {
            at: socket.display().to_string(),
            source,
        },
    )?;
    if let Some(group) = &config.socket_group {
        let refused = |reason: String| DbStartError::SocketGroup {
            group: group.clone(),
            reason,
        };
        let gid = group_id(group).ok_or_else(|| refused("no such group".into()))?;
        std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| {
            refused(format!(
                "cannot give the socket to it: {e} (run as root or as a member of the group, \
                 or set socket_group = \"\")"
            ))
        })?;
    }
    Ok(())
}

/// A group's id: a number, or a name in `/etc/group`.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == group)
                .then(|| fields.nth(1)?.parse().ok())
                .flatten()
        })
}

/// Serve on `listeners` until `control` says `Shutdown` (or closes);
/// `Reload` loads the configuration again.
pub fn run(
    listeners: DbListeners,
    config: DbConfig,
    source: DbSource,
    control: crate::ControlReceiver,
) -> Result<(), DbStartError> {
    if config.cpu_scheduling == CpuScheduling::Batch {
        // Threads made from here on inherit the policy.
        match scheduler::set_self_policy(scheduler::Policy::Batch, 0) {
            Ok(()) => tracing::info!("serving threads run with SCHED_BATCH"),
            Err(()) => tracing::warn!("cpu_scheduling = \"batch\": the kernel refused SCHED_BATCH"),
        }
    }
    // One event loop by default: it uses the least CPU per transaction
    // (docs/decisions.md).
    let runtime = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .map_err(DbStartError::Runtime)?;
    runtime.block_on(serve(listeners, config, source, control))
}

/// Load the configuration again and apply it when it is valid: users,
/// databases, pool sizes and settings, the primary. Clients stay connected
/// and keep the server connections they hold. An invalid file changes
/// nothing.
pub fn reload(shared: &DbShared, source: &DbSource) {
    let Some((config, file)) = crate::config::reloaded(
        source.path.as_deref(),
        &shared.metrics.config_reloads,
        || {
            DbConfig::load(
                source.path.as_deref(),
                &source.overrides,
                &crate::config::ProcessEnv,
            )
        },
    ) else {
        return;
    };
    let old = shared.config.load_full();
    if config.socket_path() != old.socket_path()
        || config.threads != old.threads
        || config.cpu_scheduling != old.cpu_scheduling
        || config.socket_mode != old.socket_mode
        || config.listen != old.listen
        || config.admin_listen != old.admin_listen
    {
        tracing::warn!(
            "the socket, listen addresses, admin listener, threads and cpu_scheduling change only on restart"
        );
    }
    if config.nodes != old.nodes {
        let nodes: Vec<String> = config.nodes.iter().map(|n| n.node.to_string()).collect();
        tracing::info!(?nodes, "new list of nodes; their roles are asked again");
        shared.topology.recheck();
    }
    shared.pools.configure(&config, &shared.metrics);
    shared.config.store(Arc::new(config));
    crate::config::reload_applied(&shared.metrics.config_reloads, &file);
}

async fn serve(
    listeners: DbListeners,
    config: DbConfig,
    source: DbSource,
    mut control: crate::ControlReceiver,
) -> Result<(), DbStartError> {
    // Ours to remove on the way out; systemd's stays for the next process.
    let own_socket = (!listeners.inherited).then(|| config.socket_path());
    let unix = UnixListener::from_std(listeners.unix).map_err(DbStartError::Runtime)?;
    let tcp = listeners
        .tcp
        .map(TcpListener::from_std)
        .transpose()
        .map_err(DbStartError::Runtime)?;
    let admin = listeners.admin;
    let shared = Arc::new(DbShared::new(config)?);
    shared
        .pools
        .configure(&shared.config.load(), &shared.metrics);
    if let Some(listener) = admin {
        tokio::spawn(admin::serve(listener, Arc::clone(&shared)));
    }
    tokio::spawn(topology::monitor(Arc::clone(&shared)));
    {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            // Warm the pools once the nodes were asked, then keep them
            // every second.
            shared
                .topology
                .next_round(std::time::Duration::from_secs(2))
                .await;
            loop {
                let config = shared.config.load_full();
                let snapshot = shared.topology.snapshot();
                shared
                    .pools
                    .maintain(&config, &snapshot, &shared.metrics)
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    let tcp_task = tcp.map(|tcp| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut backoff = AcceptBackoff::default();
            loop {
                match tcp.accept().await {
                    Ok((stream, _)) => {
                        backoff.reset();
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(session::serve(stream, None, Arc::clone(&shared)));
                    }
                    Err(e) => backoff.wait(&e).await,
                }
            }
        })
    });
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            message = control.recv() => match message {
                Some(crate::Control::Reload) => reload(&shared, &source),
                Some(crate::Control::ReopenLogs) => {}
                Some(crate::Control::Shutdown) | None => break,
            },
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    let uid = stream.peer_cred().ok().map(|c| c.uid());
                    tokio::spawn(session::serve(stream, uid, Arc::clone(&shared)));
                }
                Err(e) => backoff.wait(&e).await,
            }
        }
    }
    // Drain: no new clients; idle clients are told at once, the others at
    // the end of their transaction; whoever is left at `drain_timeout` is
    // cut off with the runtime.
    drop(unix);
    if let Some(task) = tcp_task {
        task.abort();
    }
    if let Some(path) = &own_socket {
        let _ = std::fs::remove_file(path);
    }
    shared.start_drain();
    let timeout = shared.config.load().drain_timeout;
    let clients = shared.connected.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(clients, ?timeout, "draining");
    let deadline = tokio::time::Instant::now() + timeout;
    while shared.connected.load(std::sync::atomic::Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let left = shared.connected.load(std::sync::atomic::Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(
            clients = left,
            "drain timeout: closing the clients still in a transaction"
        );
    }
    if let Some(path) = &own_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}
