//! Server connections per (node, database, user), lent and taken back: at most
//! `max_connections`, a waiting client gives up after `checkout_timeout`
//! with SQLSTATE 53300, and a connection a client kept goes back only after
//! the connection reset itself (`ServerConn::reset`), so nothing one client
//! set is seen by the next. What a connection does is `server.rs`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::{DbMetrics, PoolMetrics};
use super::server::{Login, ServerConn, ServerError};
use super::statements::Standing;
use crate::config::db::{DbConfig, DbUser, Node};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection free in pool {pool} within {waited:?}")]
    Exhausted { pool: String, waited: Duration },
    #[error(transparent)]
    Server(#[from] ServerError),
}

struct Pool {
    /// `database/user`, as errors and metrics name it; `database/user@node`
    /// for a node other than the configured primary.
    name: String,
    database: String,
    node: Arc<Node>,
    /// As last configured: its server credentials open new connections.
    user: Mutex<DbUser>,
    /// Boxed, as in `Checkout`: a connection is lent and returned once per
    /// transaction, and moving a box copies a pointer, not the connection.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// Server connections open for this pool, lent or idle: each counts
    /// itself in while it lives (`ServerConn::count_in`). Permits cannot say this: a permit handed to a waiter
    /// that has not run yet is counted as lent while its connection is
    /// still idle.
    open: Arc<AtomicUsize>,
    permits: Arc<Semaphore>,
    size: Mutex<Size>,
    waiting: AtomicUsize,
    /// After a failed attempt to warm the pool, when to try again.
    warm_retry: Mutex<Option<std::time::Instant>>,
    /// The server said the database does not exist: the pool is not warmed
    /// until a client gets a connection to it.
    missing: std::sync::atomic::AtomicBool,
    metrics: PoolMetrics,
}

/// A pool's size. A reload that shrinks it cannot take permits back from
/// clients that hold them: the excess is forgotten as they come back.
#[derive(Debug, Clone, Copy)]
struct Size {
    max: usize,
    /// Permits still to forget.
    excess: usize,
}

impl Pool {
    fn size(&self) -> Size {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Server connections open for this pool, lent or idle.
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Permits held by clients now.
    fn lent(&self) -> usize {
        let size = self.size();
        (size.max + size.excess).saturating_sub(self.permits.available_permits())
    }

    fn resize(&self, max: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if max > size.max {
            let grow = max - size.max;
            let repaid = grow.min(size.excess);
            size.excess -= repaid;
            self.permits.add_permits(grow - repaid);
        } else {
            size.excess += size.max - max;
        }
        size.max = max;
        let forgotten = self.permits.forget_permits(size.excess);
        size.excess -= forgotten;
    }
}

/// One pool's numbers, for `/metrics` and `.database.connection_pool`.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub name: String,
    /// Lent to clients now.
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
    pub max: usize,
}

/// Every pool, per (node, database, user), created on first use.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<(Node, String, String), Arc<Pool>>>,
}

impl Pools {
    fn pool(
        &self,
        config: &DbConfig,
        node: &Arc<Node>,
        database: &str,
        user: &DbUser,
        metrics: &DbMetrics,
    ) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        // A few pools at most: found without building a key.
        if let Some(pool) = pools
            .iter()
            .find(|((n, d, u), _)| d == database && *u == user.name && *n == **node)
            .map(|(_, pool)| pool)
        {
            return Arc::clone(pool);
        }
        let max = config.pool.max_connections;
        Arc::clone(
            pools
                .entry(((**node).clone(), database.to_string(), user.name.clone()))
                .or_insert_with(|| {
                    let name = if *config.nodes[0].node == **node {
                        format!("{database}/{}", user.name)
                    } else {
                        format!("{database}/{}@{node}", user.name)
                    };
                    Arc::new(Pool {
                        metrics: metrics.for_pool(&name),
                        name,
                        database: database.to_string(),
                        node: Arc::clone(node),
                        user: Mutex::new(user.clone()),
                        idle: Mutex::new(Vec::new()),
                        open: Arc::new(AtomicUsize::new(0)),
                        permits: Arc::new(Semaphore::new(max as usize)),
                        size: Mutex::new(Size {
                            max: max as usize,
                            excess: 0,
                        }),
                        waiting: AtomicUsize::new(0),
                        warm_retry: Mutex::new(None),
                        missing: std::sync::atomic::AtomicBool::new(false),
                    })
                }),
        )
    }

    /// Bring the pools in line with `config` (at start and after a reload):
    /// a pool for every configured database and user, so that
    /// `min_connections` are warm before the first client; sizes and
    /// server credentials as configured. Clients keep what they hold.
    pub fn configure(&self, config: &DbConfig, metrics: &DbMetrics) {
        for database in config.databases.iter().filter(|d| config.lists(&d.name)) {
            for user in &config.users {
                for node in &config.nodes {
                    let pool = self.pool(config, &node.node, &database.name, user, metrics);
                    *pool.user.lock().unwrap_or_else(|e| e.into_inner()) = user.clone();
                    pool.resize(config.pool.max_connections as usize);
                }
            }
        }
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats: Vec<PoolStats> = pools
            .values()
            .map(|pool| PoolStats {
                name: pool.name.clone(),
                active: pool.lent(),
                idle: pool.idle.lock().map_or(0, |idle| idle.len()),
                waiting: pool.waiting.load(Ordering::Relaxed),
                max: pool.size().max,
            })
            .collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    /// A server connection to `node` for `user` on `database`: an idle
    /// one, or a new one while the pool is below its size; else wait for one.
    pub async fn checkout(
        &self,
        config: &DbConfig,
        node: &Arc<Node>,
        database: &str,
        user: &DbUser,
        metrics: &DbMetrics,
    ) -> Result<Checkout, PoolError> {
        let pool = self.pool(config, node, database, user, metrics);
        let waited = config.pool.checkout_timeout;
        let permit = match Arc::clone(&pool.permits).try_acquire_owned() {
            Ok(permit) => {
                pool.metrics.checkout_wait.observe(0.0);
                permit
            }
            Err(_) => {
                let started = Instant::now();
                pool.waiting.fetch_add(1, Ordering::Relaxed);
                let permit =
                    tokio::time::timeout(waited, Arc::clone(&pool.permits).acquire_owned()).await;
                pool.waiting.fetch_sub(1, Ordering::Relaxed);
                pool.metrics
                    .checkout_wait
                    .observe(started.elapsed().as_secs_f64());
                permit
                    .ok()
                    .and_then(Result::ok)
                    .ok_or_else(|| PoolError::Exhausted {
                        pool: pool.name.clone(),
                        waited,
                    })?
            }
        };
        // Connections that died while idle (a restarted primary), lived
        // too long, or lead to another node are dropped.
        let now = Instant::now();
        let idle = loop {
            let next = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(conn) if !keep(&conn, config, node, now) => continue,
                other => break other,
            }
        };
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let login = Login {
                    user: &user.name,
                    database,
                    password: user.server_password.as_deref(),
                    params: &[],
                };
                {
                    // Boxed: opening is rare, and its large future would
                    // otherwise be part of every checkout's.
                    let opened =
                        Box::pin(ServerConn::open(node, &login, config.pool.connect_timeout)).await;
                    let label = [pool.name.as_str()];
                    match opened {
                        Ok(mut conn) => {
                            conn.count_in(&pool.open);
                            metrics.server_connects.with_label_values(&label).inc();
                            pool.missing.store(false, Ordering::Relaxed);
                            Box::new(conn)
                        }
                        Err(e) => {
                            metrics.server_errors.with_label_values(&label).inc();
                            return Err(e.into());
                        }
                    }
                }
            }
        };
        Ok(Checkout {
            conn: Some(conn),
            pool,
            _permit: permit,
            statement_timeout: config.pool.statement_timeout,
            max_lifetime: config.pool.max_lifetime,
        })
    }

    /// Once a second: close idle connections past `idle_timeout` (down to
    /// `min_connections`) or past `max_lifetime`, and open connections up to
    /// `min_connections` in pools that have been used.
    pub async fn maintain(
        &self,
        config: &DbConfig,
        snapshot: &super::topology::Snapshot,
        metrics: &DbMetrics,
    ) {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let min = config.pool.min_connections as usize;
        for pool in pools {
            // Permits a smaller size left with clients, as they come back.
            pool.resize(pool.size().max);
            // A database without an entry of its own (`"*"`, or one a reload
            // removed): no warm connections, and the pool goes once unused.
            let listed =
                config.lists(&pool.database) && config.nodes.iter().any(|n| *n.node == *pool.node);
            // A node the monitor found down is not warmed (nor complained
            // about every second); one it has not asked yet is.
            let reachable = snapshot
                .index_of(&pool.node)
                .is_none_or(|i| snapshot.nodes[i].up);
            let min = if listed { min } else { 0 };
            let max = pool.size().max;
            {
                let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                let lent = pool.open().saturating_sub(idle.len());
                // Newest first: the oldest go when trimming to the minimum.
                idle.sort_by_key(|c| std::cmp::Reverse(c.idle_since()));
                let mut kept = 0;
                let now = Instant::now();
                idle.retain(|conn| {
                    let too_idle = now.saturating_duration_since(conn.idle_since())
                        >= config.pool.idle_timeout
                        && lent + kept >= min;
                    let keep = keep(conn, config, &pool.node, now) && !too_idle;
                    if keep {
                        kept += 1;
                    }
                    keep
                });
                // A pool made smaller by a reload: the oldest idle
                // connections above its size go.
                let surplus = pool.open().saturating_sub(max);
                let remaining = idle.len().saturating_sub(surplus);
                idle.truncate(remaining);
            }
            if !listed {
                self.drop_if_unused(&pool, metrics);
                continue;
            }
            let retry = *pool.warm_retry.lock().unwrap_or_else(|e| e.into_inner());
            if retry.is_some_and(|at| Instant::now() < at)
                || pool.missing.load(Ordering::Relaxed)
                || !reachable
            {
                continue;
            }
            let have = pool.open();
            let user = pool.user.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for _ in have..min.min(max) {
                let login = Login {
                    user: &user.name,
                    database: &pool.database,
                    password: user.server_password.as_deref(),
                    params: &[],
                };
                match Box::pin(ServerConn::open(
                    &pool.node,
                    &login,
                    config.pool.connect_timeout,
                ))
                .await
                {
                    Ok(mut conn) => {
                        conn.count_in(&pool.open);
                        *pool.warm_retry.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        metrics
                            .server_connects
                            .with_label_values(&[pool.name.as_str()])
                            .inc();
                        pool.idle
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Box::new(conn));
                    }
                    Err(e) => {
                        metrics
                            .server_errors
                            .with_label_values(&[pool.name.as_str()])
                            .inc();
                        if matches!(&e, ServerError::Refused { sqlstate, .. } if sqlstate == super::error::sqlstate::INVALID_CATALOG_NAME)
                        {
                            tracing::warn!(pool = %pool.name, "the database does not exist: the pool is warmed once a client connects to it");
                            pool.missing.store(true, Ordering::Relaxed);
                            break;
                        }
                        // A refusal (no such role, no access) is not retried
                        // every second.
                        let wait = if matches!(e, ServerError::Refused { .. }) {
                            Duration::from_secs(30)
                        } else {
                            Duration::from_secs(1)
                        };
                        tracing::warn!(pool = %pool.name, error = %e, retry_in = ?wait, "warming the pool");
                        *pool.warm_retry.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Instant::now() + wait);
                        break;
                    }
                }
            }
        }
    }
}

impl Pools {
    /// Forget a pool nobody uses: no connection lent, idle or waited for.
    /// Its metrics go too: clients choose these databases' names, and the
    /// series must not grow without bound.
    fn drop_if_unused(&self, pool: &Arc<Pool>, metrics: &DbMetrics) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let unused = pool.lent() == 0
            && pool.waiting.load(Ordering::Relaxed) == 0
            && pool.idle.lock().map_or(true, |idle| idle.is_empty());
        if unused {
            pools.retain(|_, kept| !Arc::ptr_eq(kept, pool));
            metrics.forget_pool(&pool.name);
        }
    }

    /// Close every idle connection to `database`, in the pools of all
    /// users, and hold off warming them for a while: the statement that
    /// follows needs nobody connected to it. Connections lent to clients
    /// stay; the server then refuses as it would without gatehouse.
    pub fn close_idle(&self, database: &str) -> usize {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|pool| pool.database == database)
            .cloned()
            .collect();
        let mut closed = 0;
        for pool in pools {
            *pool.warm_retry.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + Duration::from_secs(10));
            let idle = std::mem::take(&mut *pool.idle.lock().unwrap_or_else(|e| e.into_inner()));
            closed += idle.len();
        }
        closed
    }
}

/// Whether an idle connection may be lent again under `config` for a
/// transaction on `node`: alive, younger than `max_lifetime`, to that node.
fn keep(conn: &ServerConn, config: &DbConfig, node: &Node, now: Instant) -> bool {
    conn.is_usable()
        && now.saturating_duration_since(conn.opened()) < config.pool.max_lifetime
        && (std::ptr::eq(&**conn.node(), node) || **conn.node() == *node)
}

/// A server connection lent to one client.
pub struct Checkout {
    /// `None` once discarded. Boxed: a checkout moves between the pool,
    /// the session and back once per transaction, and a connection is large.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    statement_timeout: Duration,
    max_lifetime: Duration,
}

impl Checkout {
    /// `database/user`, as metrics name the pool.
    pub fn pool_name(&self) -> &str {
        &self.pool.name
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.pool.metrics
    }

    /// The statement timeout configured when it was lent.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    pub fn conn(&self) -> &ServerConn {
        // Present until `discard` or `release`, which consume the session.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// The connection, unless it was discarded.
    pub fn conn_mut(&mut self) -> Result<&mut ServerConn, ServerError> {
        self.conn
            .as_deref_mut()
            .ok_or_else(|| ServerError::Io(std::io::ErrorKind::NotConnected.into()))
    }

    /// Every reply in, no transaction open: it could serve anyone.
    pub fn is_idle(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.standing() == Standing::Idle)
    }

    /// Return an idle connection as it is, between transactions of clients
    /// that changed no session state (transaction pooling).
    pub fn give_back(mut self) {
        if self.is_idle() {
            self.return_to_pool();
        }
    }

    fn return_to_pool(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let now = Instant::now();
            if now.saturating_duration_since(conn.opened()) >= self.max_lifetime {
                return;
            }
            conn.mark_idle(now);
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }

    /// Close the connection instead of returning it.
    pub fn discard(&mut self) {
        self.conn = None;
    }

    /// Reset the session and return the connection to its pool; a
    /// connection that cannot be reset cleanly is closed instead.
    pub async fn release(mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.reset().await {
            self.return_to_pool();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pools;
    use crate::config::db::{AuthMethod, DbUser};

    struct NoEnv;

    impl crate::config::EnvSource for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    #[tokio::test]
    async fn a_smaller_pool_takes_permits_back_as_clients_return_them() {
        let user = DbUser {
            name: "u".into(),
            auth: AuthMethod::Trust,
            secret: None,
            trusted_uids: Vec::new(),
            trust_over_tcp: false,
            server_password: None,
        };
        let metrics = crate::db::metrics::DbMetrics::new().unwrap();
        let mut config =
            crate::config::db::DbConfig::load(None, &Default::default(), &NoEnv).unwrap();
        config.pool.max_connections = 4;
        let node = std::sync::Arc::clone(&config.nodes[0].node);
        let pool = Pools::default().pool(&config, &node, "d", &user, &metrics);
        let held: Vec<_> = (0..3)
            .map(|_| {
                std::sync::Arc::clone(&pool.permits)
                    .try_acquire_owned()
                    .unwrap()
            })
            .collect();
        pool.resize(2);
        assert_eq!(pool.size().max, 2);
        assert_eq!(pool.lent(), 3, "clients keep what they hold");
        assert_eq!(pool.permits.available_permits(), 0);
        drop(held);
        pool.resize(2);
        assert_eq!(pool.lent(), 0);
        assert_eq!(pool.permits.available_permits(), 2);
        pool.resize(5);
        assert_eq!(pool.permits.available_permits(), 5);
    }
}
