//! One client, start to end: startup (SSLRequest and GSSENCRequest answered
//! `N`, CancelRequest forwarded only to the server that client holds),
//! authentication (SCRAM-SHA-256, md5, or trust limited to peer uids), a
//! server connection from the pool with the client's startup parameters
//! applied, then messages relayed frame by frame until the client leaves.
//! With replicas, each transaction's first messages choose its node, a write
//! leaves its WAL position for read-your-writes, and a replica read that
//! fails before answering goes to another node. The server goes back to the
//! pool only after a clean reset.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::auth::{AuthError, ScramExchange, ScramVerifier, md5_response_ok, md5_secret};
use super::classify::Found;
use super::classify::access::Access;
use super::codec::tag::front;
use super::codec::{
    CodecError, Frame, FrameCodec, Frontend, Startup, StartupCodec, TransactionStatus,
    authentication, backend_key_data, parameter_status, ready_for_query,
};
use super::error::{DbError, sqlstate};
use super::pool::{Checkout, PoolError};
use super::router::{Reason, Want};
use super::server::ServerError;
use super::settings::{SESSION_PARAMS, Settings, lookup, settings_of, tracked, upsert};
use super::statements::{ClientStatements, Naming};
use super::{CancelSlot, CancelTarget, DbShared};
use crate::config::db::{
    AuthMethod, DbConfig, DbUser, PoolMode, ReadYourWrites, Routing, Secret, SessionState,
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client protocol: {0}")]
    Codec(#[from] CodecError),
    #[error("client left")]
    Gone,
    #[error("login not finished within the login timeout")]
    LoginTimeout,
}

/// The client side of a session: its stream and what it sent but we have not
/// read yet.
struct Client<S> {
    stream: S,
    buf: BytesMut,
    codec: FrameCodec,
    /// Until login completes, reads give up at this instant.
    login_deadline: Option<tokio::time::Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn fill(&mut self) -> Result<(), SessionError> {
        let read = match self.login_deadline {
            Some(deadline) => {
                tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                    .await
                    .map_err(|_| SessionError::LoginTimeout)?
            }
            None => self.stream.read_buf(&mut self.buf).await,
        };
        if read? == 0 {
            return Err(SessionError::Gone);
        }
        Ok(())
    }

    async fn startup(&mut self) -> Result<Startup, SessionError> {
        loop {
            if let Some(startup) = StartupCodec.decode(&mut self.buf)? {
                return Ok(startup);
            }
            self.fill().await?;
        }
    }

    async fn frame(&mut self) -> Result<Frame, SessionError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Report an error (a fatal one ends the session).
    async fn fail(&mut self, error: &DbError) -> Result<(), SessionError> {
        self.send(&error.frame().bytes).await
    }
}

/// Serve one client connection. `peer_uid` is the client's uid on the Unix
/// socket (SO_PEERCRED), `None` over TCP.
pub async fn serve<S>(stream: S, peer_uid: Option<u32>, shared: Arc<DbShared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = shared.config.load_full();
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(8192),
        codec: FrameCodec::new(config.max_message_size),
        login_deadline: Some(tokio::time::Instant::now() + config.login_timeout),
    };
    shared.metrics.clients.inc();
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let outcome = run(&mut client, peer_uid, &shared).await;
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.clients.dec();
    match outcome {
        Ok(()) | Err(SessionError::Gone) => {}
        Err(SessionError::Codec(e)) => {
            tracing::debug!(error = %e, "client protocol error");
            let _ = client.fail(&DbError::Protocol(e)).await;
        }
        Err(SessionError::Io(e)) => tracing::debug!(error = %e, "client connection error"),
        Err(SessionError::LoginTimeout) => {
            let _ = client.fail(&DbError::LoginTimeout).await;
        }
    }
}

async fn run<S>(
    client: &mut Client<S>,
    peer_uid: Option<u32>,
    shared: &DbShared,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let startup = loop {
        match client.startup().await? {
            // No TLS and no GSSAPI encryption: the client goes on in clear.
            Startup::SslRequest | Startup::GssEncRequest => client.send(b"N").await?,
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                shared.cancel(process_id, secret_key).await;
                return Ok(());
            }
            startup => break startup,
        }
    };
    let Startup::Startup { params, .. } = &startup else {
        return Ok(());
    };
    let config = shared.config.load_full();
    if shared.connected.load(Ordering::Relaxed) > config.max_client_connections {
        tracing::warn!(
            max = config.max_client_connections,
            "client refused: max_client_connections"
        );
        return client.fail(&DbError::TooManyClients).await;
    }
    let Some(user_name) = startup.param("user") else {
        return client.fail(&DbError::NoUser).await;
    };
    let asked = startup.param("database").unwrap_or(user_name);
    // `<db>_replica` / `<db>_primary` are `<db>` on the server.
    let (database, routing) = config.resolve(asked);
    // An unknown user fails like a wrong password: no user enumeration.
    let failed = DbError::AuthenticationFailed {
        user: user_name.to_string(),
    };
    let Some(user) = config.users.iter().find(|u| u.name == user_name) else {
        tracing::info!(user = user_name, "login refused: no such user");
        return client.fail(&failed).await;
    };
    let Some(mode) = config.database(database).map(|d| d.pool_mode) else {
        tracing::info!(
            user = user_name,
            database,
            "login refused: database not listed"
        );
        return client
            .fail(&DbError::DatabaseNotListed(database.to_string()))
            .await;
    };
    let authenticated = authenticate(client, user, peer_uid).await?;
    let result = if authenticated.is_ok() {
        "ok"
    } else {
        "failed"
    };
    shared.metrics.logins.with_label_values(&[result]).inc();
    match authenticated {
        Ok(()) => {}
        Err(AuthError::Failed(reason)) => {
            tracing::info!(user = user_name, database, reason, "login refused");
            return client.fail(&failed).await;
        }
        Err(e) => {
            tracing::info!(user = user_name, database, error = %e, "login refused");
            return client.fail(&DbError::Authentication(e)).await;
        }
    }

    let mut session = Session {
        shared,
        database: database.to_string(),
        user: user.clone(),
        settings: shared.intern_settings(Settings {
            params: params
                .iter()
                .filter(|(k, _)| SESSION_PARAMS.contains(&k.as_str()))
                .cloned()
                .collect(),
            options: startup
                .param("options")
                .map(settings_of)
                .unwrap_or_default(),
        }),
        pinned: mode == PoolMode::Session,
        mode,
        routing,
        written: 0,
        transaction: None,
        answered: false,
        avoid: None,
        record_before_reply: false,
        naming: match config.pool.max_prepared_statements {
            max if mode == PoolMode::Transaction && max > 0 => Naming::Client(max),
            _ => Naming::Server,
        },
        statements: ClientStatements::default(),
        cancel: shared.register_cancel(),
        server: None,
        told: Vec::new(),
        pending: std::collections::VecDeque::new(),
        plain: Vec::new(),
    };
    // The greeting needs a server's parameters: take one now.
    if let Err(refusal) = session.acquire(&[]).await {
        session.end(false).await;
        return client.fail(&refusal).await;
    }
    client.login_deadline = None;
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&authentication(0, &[]).bytes);
    if let Some(server) = &session.server {
        session.told = server.conn().params().to_vec();
        for (name, value) in &session.told {
            hello.extend_from_slice(&parameter_status(name, value).bytes);
        }
    }
    let (process_id, secret_key) = session.cancel.0;
    hello.extend_from_slice(&backend_key_data(process_id, secret_key).bytes);
    hello.extend_from_slice(&ready_for_query(TransactionStatus::Idle));
    session.transaction = None;
    session.between_transactions();
    if let Err(e) = client.send(&hello).await {
        session.end(false).await;
        return Err(e);
    }
    let outcome = session.relay(client).await;
    // A client that left, even inside a transaction, leaves a server that
    // can be rolled back and reset.
    let clean = matches!(outcome, Ok(()) | Err(SessionError::Gone));
    session.end(clean).await;
    match outcome {
        Err(SessionError::Gone) => Ok(()),
        other => other,
    }
}

/// Server connections a client's first messages may try when each one
/// turns out broken as its settings are applied.
const SETUP_TRIES: u32 = 3;

/// One logged-in client and the server connection it holds, if any.
struct Session<'a> {
    shared: &'a DbShared,
    database: String,
    user: DbUser,
    settings: Arc<Settings>,
    /// Holds its server until it leaves: session pooling, or session state
    /// set in transaction pooling.
    pinned: bool,
    mode: PoolMode,
    /// What the database name the client asked for says of routing.
    routing: Routing,
    /// The WAL position of this client's last write (read-your-writes).
    written: u64,
    /// Where the transaction in progress went, when there are replicas.
    transaction: Option<super::router::Choice>,
    /// Whether anything reached the client since the transaction's server
    /// was taken: a read that failed before can go to another node.
    answered: bool,
    /// A node that just failed this client's read, left out of the next
    /// choice.
    avoid: Option<Arc<crate::config::db::Node>>,
    /// Writes are recorded before their reply (`read_your_writes =
    /// "database"` with replicas), as configured when the server was taken.
    record_before_reply: bool,
    /// Whose names a client's named statements go by on the server.
    naming: Naming,
    /// This client's named statements, when they are kept here.
    statements: ClientStatements,
    /// This client's cancel key, and where it leads now.
    cancel: ((i32, i32), CancelSlot),
    server: Option<Checkout>,
    /// The settings the server has reported to this client, as it was told.
    told: Vec<(String, String)>,
    /// Query and Sync messages sent and not answered yet: when, and the
    /// statement (kept only for the slow-query log).
    pending: std::collections::VecDeque<(std::time::Instant, Option<bytes::Bytes>)>,
    /// The SQL of this client's last Query or Parse when it was plain
    /// (`classify::scan` found none of its words): clients repeat their
    /// statements, and the same text again is known plain by a comparison
    /// instead of a scan.
    plain: Vec<u8>,
}

impl Session<'_> {
    /// A server connection for the next messages (`frames`, the first of a
    /// transaction), with this client's settings, on the node the router
    /// picks for them.
    async fn acquire(&mut self, frames: &[Frame]) -> Result<(), DbError> {
        // A connection that broke while it sat in the pool (its node just
        // went down) is found when the client's settings are applied;
        // nothing has reached the client yet, so another one is taken.
        let mut tries = SETUP_TRIES;
        while self.server.is_none() {
            tries -= 1;
            // The configuration as it is now: a reload reaches clients that
            // are already connected (timeouts, the nodes).
            let config = self.shared.config.load_full();
            let mut server = self.checkout(&config, frames).await?;
            let timeout = server.statement_timeout();
            let applied = match server.conn_mut() {
                Ok(conn) if conn.settled_for(&self.settings, timeout) => Ok(()),
                // Boxed: its future would otherwise be part of every
                // transaction's.
                Ok(conn) => Box::pin(conn.apply(&self.settings, timeout)).await,
                Err(e) => Err(e),
            };
            if let Err(e) = applied {
                server.discard();
                if !matches!(e, super::server::ServerError::Io(_)) || tries == 0 {
                    return Err(DbError::StartupParameters(e.to_string()));
                }
                if let Some(broken) = self.transaction.take().filter(|c| c.replica) {
                    tracing::warn!(node = %broken.node, error = %e, "a replica's connection broke before use; trying another node");
                    if let Some(health) = &broken.health {
                        self.shared.topology.failed(health, &broken.node, &config);
                    }
                    self.avoid = Some(broken.node);
                } else {
                    tracing::warn!(error = %e, "a server connection broke before use; taking another");
                }
                continue;
            }
            self.point_cancel(Some(CancelTarget {
                node: Arc::clone(server.conn().node()),
                backend_key: server.conn().backend_key(),
            }));
            if let Ok(conn) = server.conn_mut() {
                conn.lend_to(self.cancel.0.0);
            }
            self.server = Some(server);
        }
        Ok(())
    }

    /// Pick a node (once per transaction, here) and take a connection to
    /// it. A replica that cannot be reached is left out and another node
    /// asked; with no primary, a transaction that needs one waits up to
    /// `failover_timeout` for a promotion.
    async fn checkout(
        &mut self,
        config: &DbConfig,
        frames: &[Frame],
    ) -> Result<super::pool::Checkout, DbError> {
        let shared = self.shared;
        self.record_before_reply =
            config.nodes.len() > 1 && config.router.read_your_writes == ReadYourWrites::Database;
        if config.nodes.len() == 1 {
            self.transaction = None;
            let checkout = shared
                .pools
                .checkout(
                    config,
                    &config.nodes[0].node,
                    &self.database,
                    &self.user,
                    &shared.metrics,
                )
                .await;
            return checkout.map_err(|e| self.refusal(e));
        }
        let want = self.want(config, frames);
        let greeting = want == Want::Greeting;
        let mut excluded: Vec<Arc<crate::config::db::Node>> =
            self.avoid.take().into_iter().collect();
        let deadline = tokio::time::Instant::now() + config.router.failover_timeout;
        let mut waited = false;
        loop {
            let snapshot = shared.topology.snapshot();
            let choice =
                super::router::choose(&snapshot, &shared.topology, config, want, &excluded);
            let Some(choice) = choice else {
                // No primary: wait for one (a promotion), then choose again.
                if !waited {
                    tracing::warn!("no primary: waiting for a failover");
                }
                waited = true;
                if Box::pin(shared.topology.primary_by(deadline))
                    .await
                    .is_none()
                {
                    shared
                        .metrics
                        .primary_waits
                        .with_label_values(&["timed_out"])
                        .inc();
                    return Err(DbError::ServerUnreachable);
                }
                continue;
            };
            let checkout = shared
                .pools
                .checkout(
                    config,
                    &choice.node,
                    &self.database,
                    &self.user,
                    &shared.metrics,
                )
                .await;
            match checkout {
                Ok(server) => {
                    if waited {
                        shared
                            .metrics
                            .primary_waits
                            .with_label_values(&["served"])
                            .inc();
                    }
                    if !greeting {
                        let target = if choice.replica { "replica" } else { "primary" };
                        shared
                            .metrics
                            .routed
                            .with_label_values(&[target, choice.reason.name()])
                            .inc();
                    }
                    self.transaction = Some(choice);
                    self.answered = false;
                    return Ok(server);
                }
                // Not reached, or shutting down / starting up (57P0x).
                Err(PoolError::Server(e))
                    if node_failure(&e) && tokio::time::Instant::now() < deadline =>
                {
                    if let Some(health) = &choice.health {
                        shared.topology.failed(health, &choice.node, config);
                    }
                    tracing::warn!(node = %choice.node, error = %e, "node not reached; trying another");
                    if choice.replica {
                        shared.metrics.read_retries.inc();
                        excluded.push(Arc::clone(&choice.node));
                    } else {
                        // The primary went away: ask every node now, and
                        // wait for the next round before trying again.
                        shared.topology.recheck();
                        waited = true;
                        Box::pin(
                            shared
                                .topology
                                .next_round(config.router.topology_interval * 2),
                        )
                        .await;
                    }
                }
                // A replica that refuses (the database is not there yet,
                // too many connections): the read goes elsewhere.
                Err(PoolError::Server(e)) if choice.replica => {
                    tracing::warn!(node = %choice.node, error = %e, "a replica refused; trying another node");
                    shared.metrics.read_retries.inc();
                    excluded.push(Arc::clone(&choice.node));
                }
                Err(e) => return Err(self.refusal(e)),
            }
        }
    }

    /// What a pool's refusal tells the client.
    fn refusal(&self, error: PoolError) -> DbError {
        match error {
            PoolError::Exhausted { pool, waited } => DbError::PoolExhausted { pool, waited },
            // The server's own refusal of the database (3D000 and the
            // like) is the client's answer; its refusal of gatehouse's
            // credentials (class 28) is not the client's business.
            PoolError::Server(ServerError::Refused { sqlstate, message })
                if !sqlstate.starts_with(sqlstate::CLASS_INVALID_AUTHORIZATION) =>
            {
                DbError::Server { sqlstate, message }
            }
            PoolError::Server(e) => {
                tracing::warn!(error = %e, "cannot reach the database server");
                DbError::ServerUnreachable
            }
        }
    }

    /// What a transaction that starts with `frames` needs of a node.
    fn want(&self, config: &DbConfig, frames: &[Frame]) -> Want {
        let read = |forced| Want::Read {
            after: self.must_have_seen(config),
            forced,
        };
        match self.routing {
            Routing::Primary => return Want::Primary(Reason::Forced),
            Routing::Replica => return read(true),
            Routing::Auto => {}
        }
        if frames.is_empty() {
            return Want::Greeting;
        }
        if self.pinned {
            return Want::Primary(Reason::Session);
        }
        match self.access(config, frames) {
            Access::Read | Access::BeginReadOnly => read(false),
            Access::Begin => Want::Primary(Reason::InTransaction),
            Access::ForcedPrimary => Want::Primary(Reason::Forced),
            Access::Write => Want::Primary(Reason::Write),
        }
    }

    /// What the statement `frames` carry needs: one simple Query, or one
    /// Parse/Bind/Describe/Execute ending with Sync; anything else counts
    /// as a write.
    fn access(&self, config: &DbConfig, frames: &[Frame]) -> Access {
        let standard_strings = lookup(&self.told, "standard_conforming_strings") != Some("off");
        let functions = &config.router.replica_functions;
        let classify = |sql: &[u8]| self.shared.shapes.access(sql, standard_strings, functions);
        if let [only] = frames {
            return match only.frontend() {
                Ok(Frontend::Query { sql }) => classify(sql),
                _ => Access::Write,
            };
        }
        if frames.last().is_none_or(|f| f.tag != front::SYNC) {
            return Access::Write;
        }
        let mut parsed: Option<(&[u8], &[u8])> = None;
        let mut executed: Option<&[u8]> = None;
        for frame in &frames[..frames.len() - 1] {
            match frame.frontend() {
                Ok(Frontend::Parse { statement, sql }) if parsed.is_none() => {
                    parsed = Some((statement, sql));
                }
                Ok(Frontend::Bind { statement, .. }) if executed.is_none() => {
                    executed = Some(statement);
                }
                Ok(Frontend::Describe { .. } | Frontend::Execute { .. }) => {}
                _ => return Access::Write,
            }
        }
        let Some(statement) = executed else {
            return Access::Write;
        };
        let sql = match parsed {
            Some((name, sql)) if name == statement => Some(sql),
            Some(_) => None,
            None if !statement.is_empty() => self.statements.sql_of(statement),
            None => None,
        };
        sql.map_or(Access::Write, classify)
    }

    /// The WAL position a replica must have replayed for this client's
    /// reads: its own last write, and with `read_your_writes = "database"`
    /// the database's last write within the window.
    fn must_have_seen(&self, config: &DbConfig) -> u64 {
        if config.router.read_your_writes == ReadYourWrites::Connection {
            return self.written;
        }
        let written = self
            .shared
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match written.get(&self.database) {
            Some((lsn, at)) if at.elapsed() < config.router.read_your_writes_window => {
                (*lsn).max(self.written)
            }
            _ => self.written,
        }
    }

    /// A transaction ended: after one on the primary that may have written,
    /// learn how far the primary's WAL goes, for this client's (or the
    /// database's) later reads.
    async fn transaction_ended(&mut self) {
        let wrote = match &self.transaction {
            Some(choice) => {
                !choice.replica
                    && !matches!(choice.reason, Reason::ReadYourWrites | Reason::LagFallback)
            }
            // A pinned client keeps the server it was given at login (the
            // primary, unless it asked for replicas): any of its
            // transactions may have written.
            None => {
                self.pinned
                    && self.routing != Routing::Replica
                    && self.shared.config.load().nodes.len() > 1
            }
        };
        if !wrote {
            if !self.pinned {
                self.transaction = None;
            }
            return;
        }
        let Some(server) = self.server.as_mut().filter(|s| s.is_idle()) else {
            return;
        };
        let Ok(conn) = server.conn_mut() else {
            return;
        };
        // Boxed, as the rare paths below: their futures would otherwise be
        // part of every transaction's.
        let asked = Box::pin(conn.query_row("SELECT pg_current_wal_insert_lsn()")).await;
        let lsn = match asked {
            Ok(Some(row)) => row
                .first()
                .and_then(Option::as_deref)
                .and_then(super::topology::parse_lsn)
                .map(super::topology::replayable),
            // A node that is no longer the primary ("recovery is in
            // progress"): the connection is fine, and the next write finds
            // out (25006).
            Ok(None) | Err(ServerError::Refused { .. }) => None,
            // Gone: closed, not lent again. A pinned client's session
            // state went with it, and its next statement ends the session.
            Err(_) => {
                server.discard();
                if !self.pinned {
                    self.server = None;
                    self.point_cancel(None);
                }
                None
            }
        };
        let Some(lsn) = lsn else {
            if !self.pinned {
                self.transaction = None;
            }
            return;
        };
        self.written = self.written.max(lsn);
        let mut written = self
            .shared
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = written
            .entry(self.database.clone())
            .or_insert((0, std::time::Instant::now()));
        *entry = (entry.0.max(lsn), std::time::Instant::now());
        drop(written);
        if !self.pinned {
            self.transaction = None;
        }
    }

    fn point_cancel(&self, target: Option<CancelTarget>) {
        *self
            .cancel
            .1
            .target
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = target;
    }

    /// In transaction pooling, hand an idle, unpinned server back.
    fn between_transactions(&mut self) {
        if self.pinned || !self.server.as_ref().is_some_and(Checkout::is_idle) {
            return;
        }
        if let Some(server) = self.server.take() {
            self.point_cancel(None);
            server.give_back();
        }
    }

    /// `DROP DATABASE x` and the like need nobody connected to `x`: the
    /// pools' idle connections to it are closed before `sql` goes. Also
    /// remembers a plain text, which neither this nor `pins` need read
    /// again. The words found in a text that is not plain, for `pins`.
    fn before_database_change(&mut self, sql: &[u8]) -> Option<Found> {
        if sql == self.plain.as_slice() {
            return None;
        }
        let found = super::classify::scan(sql);
        if found.nothing() {
            self.plain.clear();
            self.plain.extend_from_slice(sql);
            return None;
        }
        if !found.database() {
            return Some(found);
        }
        for database in super::classify::databases_needing_no_sessions(sql) {
            let closed = self.shared.pools.close_idle(&database);
            tracing::info!(
                database,
                closed,
                "idle connections closed for a statement that needs none"
            );
        }
        Some(found)
    }

    /// Whether a Query or Parse (`text`: its statement name, empty for a
    /// Query, and its SQL) has an effect that outlives the transaction in a
    /// way that cannot follow the client to another connection: SQL that
    /// sets session state other than reported settings, and named prepared
    /// statements when they are not kept per client.
    /// `found`: the words `before_database_change`, which saw this text
    /// first, found in it; `None` for a plain text.
    fn pins(&self, (statement, sql): (&[u8], &[u8]), found: Option<Found>) -> bool {
        if self.naming == Naming::Server && !statement.is_empty() {
            return true;
        }
        let Some(found) = found else {
            return false;
        };
        let standard_strings = || lookup(&self.told, "standard_conforming_strings") != Some("off");
        let classifier = &self.shared.classifier;
        let Some(effect) = classifier.effect_of(sql, found, standard_strings) else {
            return false;
        };
        let pins = effect.pins(|name| self.tracks(name));
        if pins {
            tracing::debug!(
                why = effect
                    .session
                    .unwrap_or("a setting the server does not report"),
                "session state"
            );
        }
        pins
    }

    /// Whether a setting follows this client from connection to connection:
    /// the server reports it, and a client may change it.
    fn tracks(&self, name: &str) -> bool {
        tracked(name) && lookup(&self.told, name).is_some()
    }

    /// After messages went to the server or came from it: count what
    /// happened, time the answered queries, track reported settings.
    fn after_exchange(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let Ok(conn) = server.conn_mut() else {
            return;
        };
        let events = conn.take_events();
        let pool = server.metrics();
        pool.count_statements(events);
        pool.transactions.inc_by(events.transactions);
        let threshold = self.shared.config.load().pool.slow_query_threshold;
        for _ in 0..events.ready {
            let Some((sent, sql)) = self.pending.pop_front() else {
                break;
            };
            let took = sent.elapsed();
            pool.query_duration.observe(took.as_secs_f64());
            if !threshold.is_zero() && took >= threshold {
                tracing::warn!(
                    pool = server.pool_name(),
                    duration_ms = took.as_millis() as u64,
                    statement = %sql.as_deref().map(loggable).unwrap_or_default(),
                    "slow query"
                );
            }
        }
        self.track_reports();
    }

    /// Settings the server reported while relaying are the client's now:
    /// they go with it to the next server connection it gets.
    fn track_reports(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let timeout = server.statement_timeout();
        let Ok(conn) = server.conn_mut() else {
            return;
        };
        let reports = conn.take_reports();
        if reports.is_empty() {
            return;
        }
        let mut settings = (*self.settings).clone();
        let mut known = true;
        for (name, value) in &reports {
            upsert(&mut self.told, name, value);
            if tracked(name) {
                upsert(&mut settings.params, name, value);
            } else {
                known = false;
            }
        }
        self.settings = self.shared.intern_settings(settings);
        conn.settle(known.then_some(&self.settings), timeout);
    }

    /// The client is gone: return (or close) the server it held.
    async fn end(&mut self, clean: bool) {
        self.shared.unregister_cancel(self.cancel.0);
        let Some(mut server) = self.server.take() else {
            return;
        };
        if !clean {
            server.discard();
        } else if self.pinned || !server.is_idle() {
            server.release().await;
        } else {
            server.give_back();
        }
    }

    /// Relay messages until the client terminates (`Ok`) or fails (`Err`).
    async fn relay<S>(&mut self, client: &mut Client<S>) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut frames = Vec::new();
        let mut to_client = BytesMut::new();
        // Ready once the drain has started; the slot's waker makes sure a
        // session waiting for its client hears of it.
        let slot = Arc::clone(&self.cancel.1);
        let shared = self.shared;
        let mut drain_started = std::future::poll_fn(move |cx| {
            slot.drain.register(cx.waker());
            if shared.draining.load(Ordering::SeqCst) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        });
        let mut drain_seen = false;
        loop {
            // Draining: a client between transactions goes now.
            if self.shared.draining.load(Ordering::Relaxed)
                && self.server.as_ref().is_none_or(Checkout::is_idle)
            {
                client.fail(&DbError::AdminShutdown).await?;
                return Err(SessionError::Gone);
            }
            to_client.clear();
            let from_server = async {
                match self.server.as_mut() {
                    Some(server) => {
                        let read = server
                            .conn_mut()?
                            .read_some(&mut self.statements, self.naming, &mut to_client)
                            .await?;
                        server.metrics().bytes_to_client.inc_by(read as u64);
                        Ok(())
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = client.stream.read_buf(&mut client.buf) => {
                    if read? == 0 {
                        return Err(SessionError::Gone);
                    }
                    frames.clear();
                    let mut sync_points = 0;
                    let mut terminate = false;
                    while let Some(frame) = client.codec.decode(&mut client.buf)? {
                        if frame.tag == front::TERMINATE {
                            terminate = true;
                            break;
                        }
                        // A Query or a Sync gets exactly one ReadyForQuery back.
                        if frame.tag == front::QUERY || frame.tag == front::SYNC {
                            sync_points += 1;
                        }
                        frames.push(self.screen(frame));
                    }
                    let keeps_names = self.naming != Naming::Server;
                    let alone = (keeps_names && self.server.is_none() && !self.pinned)
                        .then(|| self.statements.answer_alone(&frames))
                        .flatten();
                    if let Some(answers) = alone {
                        client.send(&answers).await?;
                    } else if !frames.is_empty() {
                        if let Err(refusal) = self.acquire(&frames).await {
                            client.fail(&refusal).await?;
                            return Err(SessionError::Gone);
                        }
                        let Some(server) = self.server.as_mut() else {
                            return Err(SessionError::Gone);
                        };
                        if sync_points > 0 {
                            server.metrics().queries.inc_by(sync_points as u64);
                            let slow_log = !self.shared.config.load().pool.slow_query_threshold.is_zero();
                            let sql = slow_log.then(|| statement_of(&frames)).flatten();
                            let now = std::time::Instant::now();
                            for _ in 0..sync_points {
                                self.pending.push_back((now, sql.clone()));
                            }
                        }
                        if let Err(e) = self.forward(&frames, &mut to_client).await {
                            Box::pin(self.resend(&frames, &mut to_client, client, e)).await?;
                        }
                        self.after_exchange();
                        if !to_client.is_empty() {
                            let early = self.before_reply().await;
                            client.send(&to_client).await?;
                            self.answered = true;
                            self.transaction_boundary(!early).await;
                        }
                    }
                    if terminate {
                        return Ok(());
                    }
                }
                read = from_server => {
                    let read = read.and_then(|()| self.shut_down_unanswered(&to_client));
                    if let Err(e) = read {
                        Box::pin(self.resend(&frames, &mut to_client, client, e)).await?;
                    }
                    self.after_exchange();
                    let early = self.before_reply().await;
                    if !to_client.is_empty() {
                        client.send(&to_client).await?;
                        self.answered = true;
                    }
                    self.transaction_boundary(!early).await;
                }
                () = &mut drain_started, if !drain_seen => drain_seen = true,
            }
        }
    }

    /// A replica that is shutting down answers a read it has not begun
    /// with 57P0x (FATAL, or a WARNING notice) and closes: before anything reached the client,
    /// that is a failure of the node, not an answer for the client.
    fn shut_down_unanswered(&self, to_client: &[u8]) -> Result<(), ServerError> {
        if self.answered || !self.transaction.as_ref().is_some_and(|t| t.replica) {
            return Ok(());
        }
        let mut rest = to_client;
        while rest.len() >= 5 {
            let len = super::codec::announced_len(rest)
                .unwrap_or(rest.len())
                .min(rest.len());
            let frame = &rest[..len];
            // FATAL, or WARNING as a notice (an immediate shutdown).
            let report = [
                super::codec::tag::back::ERROR_RESPONSE,
                super::codec::tag::back::NOTICE_RESPONSE,
            ];
            if report.contains(&frame[0]) && memchr::memmem::find(frame, b"C57P0").is_some() {
                return Err(ServerError::Io(
                    std::io::ErrorKind::ConnectionAborted.into(),
                ));
            }
            rest = &rest[len..];
        }
        Ok(())
    }

    /// Send `frames` to the server this client holds.
    async fn forward(
        &mut self,
        frames: &[Frame],
        to_client: &mut BytesMut,
    ) -> Result<(), super::server::ServerError> {
        let (naming, pinned) = (self.naming, self.pinned);
        let Some(server) = self.server.as_mut() else {
            return Err(ServerError::Io(std::io::ErrorKind::NotConnected.into()));
        };
        let sent = server
            .conn_mut()?
            .forward(frames, &mut self.statements, naming, pinned, to_client)
            .await?;
        server.metrics().bytes_to_server.inc_by(sent as u64);
        Ok(())
    }

    /// The server failed (`error`) while it held `frames`, the client's
    /// last messages. A read on a replica that has not answered anything
    /// yet goes again to another node; anything else ends the session.
    async fn resend<S>(
        &mut self,
        frames: &[Frame],
        to_client: &mut BytesMut,
        client: &mut Client<S>,
        error: super::server::ServerError,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let named_parse = frames.iter().any(|f| {
            matches!(f.frontend(), Ok(Frontend::Parse { statement, .. }) if !statement.is_empty())
        });
        let on_replica = self.transaction.as_ref().is_some_and(|t| t.replica);
        if self.answered || !on_replica || frames.is_empty() || named_parse {
            return Err(server_gone(error));
        }
        let config = self.shared.config.load_full();
        if let Some(failed) = self.transaction.take() {
            tracing::warn!(node = %failed.node, error = %error, "a read failed on a replica before answering; sent to another node");
            if let Some(health) = &failed.health {
                self.shared.topology.failed(health, &failed.node, &config);
            }
            self.avoid = Some(failed.node);
        }
        self.shared.metrics.read_retries.inc();
        if let Some(mut server) = self.server.take() {
            server.discard();
        }
        self.point_cancel(None);
        to_client.clear();
        if let Err(refusal) = self.acquire(frames).await {
            client.fail(&refusal).await?;
            return Err(SessionError::Gone);
        }
        self.forward(frames, to_client).await.map_err(server_gone)
    }

    /// After an answer reached the client: if the transaction ended, learn
    /// what it wrote and (in transaction pooling) give the server back. A
    /// server that refused a write as read-only is not the primary: every
    /// node is asked again at once.
    async fn transaction_boundary(&mut self, record: bool) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.conn_mut().is_ok_and(|c| c.take_read_only_refusal())
            && self.transaction.as_ref().is_some_and(|t| !t.replica)
        {
            tracing::warn!("the primary refused a write as read-only: asking every node its role");
            self.shared.topology.recheck();
        }
        if record && server.is_idle() {
            self.transaction_ended().await;
        }
        self.between_transactions();
    }

    /// With `read_your_writes = "database"`, a write is recorded before
    /// its client hears that it committed: another client may read at once
    /// after that. True when it was (or nothing was to be).
    async fn before_reply(&mut self) -> bool {
        if !self.record_before_reply {
            return false;
        }
        if self
            .server
            .as_ref()
            .is_some_and(super::pool::Checkout::is_idle)
        {
            self.transaction_ended().await;
        }
        true
    }

    /// A client message as it goes on: one that would set session state in
    /// transaction pooling pins the client, or is replaced by a statement
    /// that fails with SQLSTATE 0A000 (`pool.session_state = "refuse"`).
    /// The frame is read once, for this and `before_database_change`.
    fn screen(&mut self, frame: Frame) -> Frame {
        let text = match frame.tag {
            front::QUERY | front::PARSE => match frame.frontend() {
                Ok(Frontend::Query { sql }) => Some((&b""[..], sql)),
                Ok(Frontend::Parse { statement, sql }) => Some((statement, sql)),
                _ => None,
            },
            _ => None,
        };
        let Some(text) = text else {
            return frame;
        };
        let found = self.before_database_change(text.1);
        // A pinned client keeps its connection whatever it sets.
        if self.mode != PoolMode::Transaction || self.pinned || !self.pins(text, found) {
            return frame;
        }
        let pool = format!("{}/{}", self.database, self.user.name);
        if self.shared.config.load().pool.session_state == SessionState::Refuse {
            self.shared
                .metrics
                .refused
                .with_label_values(&[pool.as_str()])
                .inc();
            return refusal(&frame);
        }
        tracing::debug!("session state set; client pinned to its server");
        self.pinned = true;
        self.shared
            .metrics
            .pinned
            .with_label_values(&[pool.as_str()])
            .inc();
        frame
    }
}

/// What transaction pooling answers a statement that sets session state
/// when `pool.session_state = "refuse"`. The server raises it, so the
/// transaction fails exactly as for any other error.
const REFUSAL: &str = "DO $gatehouse$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
    MESSAGE = 'gatehouse: this statement sets session state, which transaction pooling does not keep', \
    HINT = 'Use SET LOCAL inside a transaction, or pool_mode = \"session\" for this database.'; \
    END $gatehouse$";

/// `frame` (a Query or Parse) with its SQL replaced by [`REFUSAL`].
fn refusal(frame: &Frame) -> Frame {
    let mut body = Vec::new();
    if let Ok(Frontend::Parse { statement, sql }) = frame.frontend() {
        // Name, query, then the parameter types as the client sent them.
        let types = &frame.body()[statement.len() + 1 + sql.len() + 1..];
        body.extend_from_slice(statement);
        body.push(0);
        body.extend_from_slice(REFUSAL.as_bytes());
        body.push(0);
        body.extend_from_slice(types);
    } else {
        body.extend_from_slice(REFUSAL.as_bytes());
        body.push(0);
    }
    super::codec::frame(frame.tag, &body)
}

/// Check the client's credentials for `user`.
async fn authenticate<S>(
    client: &mut Client<S>,
    user: &DbUser,
    peer_uid: Option<u32>,
) -> Result<Result<(), AuthError>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match user.auth {
        AuthMethod::Trust => Ok(match peer_uid {
            _ if user.trusted_uids.is_empty() && (peer_uid.is_some() || user.trust_over_tcp) => {
                Ok(())
            }
            None if user.trusted_uids.is_empty() => {
                Err(AuthError::Failed("trust over TCP without trust_over_tcp"))
            }
            None => Err(AuthError::Failed("trusted_uids: a TCP client has no uid")),
            Some(uid) if user.trusted_uids.contains(&uid) => Ok(()),
            Some(uid) => {
                tracing::info!(user = %user.name, uid, "peer uid not in trusted_uids");
                Err(AuthError::Failed("peer uid not in trusted_uids"))
            }
        }),
        AuthMethod::Md5 => {
            let stored = match &user.secret {
                Some(Secret::Md5(stored)) => stored.clone(),
                Some(Secret::Clear(password)) => md5_secret(password, &user.name),
                _ => return Ok(Err(AuthError::Failed("no md5 secret for the user"))),
            };
            let salt: [u8; 4] = rand::random();
            client.send(&authentication(5, &salt).bytes).await?;
            let answer = client.frame().await?;
            if answer.tag != front::PASSWORD {
                return Ok(Err(AuthError::Malformed("expected a password message")));
            }
            Ok(if md5_response_ok(&stored, salt, answer.body()) {
                Ok(())
            } else {
                Err(AuthError::Failed("wrong password (md5)"))
            })
        }
        AuthMethod::ScramSha256 => {
            let verifier = match &user.secret {
                Some(Secret::Scram(stored)) => match ScramVerifier::parse(stored) {
                    Some(verifier) => verifier,
                    // check-config refuses a malformed verifier; never here.
                    None => return Ok(Err(AuthError::Failed("malformed stored verifier"))),
                },
                Some(Secret::Clear(password)) => {
                    let salt: [u8; 16] = rand::random();
                    ScramVerifier::from_password(password, &salt, super::auth::SCRAM_ITERATIONS)
                }
                _ => return Ok(Err(AuthError::Failed("no SCRAM secret for the user"))),
            };
            client
                .send(&authentication(10, b"SCRAM-SHA-256\0\0").bytes)
                .await?;
            let initial = client.frame().await?;
            let mut body = initial.body();
            // SASLInitialResponse: mechanism, length, data.
            let Some((mechanism, rest)) = super::codec::cstr(body) else {
                return Ok(Err(AuthError::Malformed("SASLInitialResponse")));
            };
            body = rest;
            if initial.tag != front::PASSWORD || mechanism != "SCRAM-SHA-256" || body.len() < 4 {
                return Ok(Err(AuthError::Malformed("SASLInitialResponse")));
            }
            let len = body.get_i32();
            if usize::try_from(len).ok() != Some(body.len()) {
                return Ok(Err(AuthError::Malformed("SASLInitialResponse length")));
            }
            let (exchange, server_first) = match ScramExchange::start(&verifier, body) {
                Ok(started) => started,
                Err(e) => return Ok(Err(e)),
            };
            client
                .send(&authentication(11, server_first.as_bytes()).bytes)
                .await?;
            let response = client.frame().await?;
            if response.tag != front::PASSWORD {
                return Ok(Err(AuthError::Malformed("expected SASLResponse")));
            }
            match exchange.finish(response.body()) {
                Ok(server_final) => {
                    client
                        .send(&authentication(12, server_final.as_bytes()).bytes)
                        .await?;
                    Ok(Ok(()))
                }
                Err(e) => Ok(Err(e)),
            }
        }
    }
}

/// The SQL of the last Query or Parse among `frames`.
fn statement_of(frames: &[Frame]) -> Option<bytes::Bytes> {
    frames
        .iter()
        .rev()
        .find_map(|frame| match frame.frontend() {
            Ok(Frontend::Query { sql } | Frontend::Parse { sql, .. }) => {
                Some(bytes::Bytes::copy_from_slice(sql))
            }
            _ => None,
        })
}

/// A statement as the slow-query log shows it: every literal replaced by
/// `$n` (passwords too), at most 200 bytes. Text that does not parse is not
/// shown at all.
fn loggable(sql: &[u8]) -> String {
    let normalized = std::str::from_utf8(sql)
        .ok()
        .and_then(|text| pg_query::normalize(text).ok());
    let Some(mut text) = normalized else {
        return "(not shown: not parsed)".into();
    };
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn server_gone(e: super::server::ServerError) -> SessionError {
    SessionError::Io(std::io::Error::other(e.to_string()))
}

/// Whether a server error says the node cannot serve (not reached, or
/// shutting down or starting up: 57P0x) rather than refusing the client.
fn node_failure(error: &ServerError) -> bool {
    match error {
        ServerError::Connect { .. } | ServerError::Timeout(_) | ServerError::Io(_) => true,
        ServerError::Refused { sqlstate, .. } => sqlstate.starts_with("57P0"),
        _ => false,
    }
}
