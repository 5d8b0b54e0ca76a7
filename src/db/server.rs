//! Connections to PostgreSQL and everything one does: open (TCP or Unix
//! socket), log in as a configured user (SCRAM-SHA-256 through
//! postgres-protocol's client, md5, cleartext or trust), keep what the server
//! announced (its parameters, its cancel key), apply a client's settings,
//! relay messages both ways, and reset the session for the next client.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::codec::Decoder;

use super::codec::tag::back;
use super::codec::{
    CodecError, Frame, FrameCodec, TransactionStatus, announced_len, complete_frame,
    read_parameter_status,
};
use super::settings::{Settings, lookup, tracked};
use super::statements::{ClientStatements, Exchange, Naming, Sides, Standing, StatementEvents};
use crate::config::db::Node;
use crate::net::Stream;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connecting to {node}: {source}")]
    Connect { node: String, source: io::Error },
    #[error("connecting to {0}: timed out")]
    Timeout(String),
    #[error("i/o with the server: {0}")]
    Io(#[from] io::Error),
    #[error("server protocol: {0}")]
    Codec(#[from] CodecError),
    /// The server refused us; its SQLSTATE and message are passed on.
    #[error("server: {message} ({sqlstate})")]
    Refused { sqlstate: String, message: String },
    #[error("the server wants a password for `{0}` and none is configured")]
    NoPassword(String),
    #[error("the server asked for an unsupported authentication ({0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM with the server: {0}")]
    Scram(String),
}

/// Open a stream to a node (no login).
pub async fn reach(node: &Node) -> io::Result<Stream> {
    Ok(match node {
        Node::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            let _ = stream.set_nodelay(true);
            Stream::Tcp(stream)
        }
        Node::Socket { dir, port } => {
            Stream::Unix(UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?)
        }
    })
}

/// Who to log in as, and to which database.
pub struct Login<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub password: Option<&'a str>,
    /// Extra startup parameters (application_name, options, ...).
    pub params: &'a [(String, String)],
}

/// One open connection in its pool's count, taken off when dropped.
struct Tally(Arc<AtomicUsize>);

impl Drop for Tally {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A logged-in server connection, ready for a query. What it does between
/// a client and PostgreSQL (relaying, applying a client's settings,
/// resetting) is here; the pool only lends it out and takes it back.
pub struct ServerConn {
    stream: Stream,
    /// Bytes read from the server but not yet consumed.
    buf: BytesMut,
    codec: FrameCodec,
    /// ParameterStatus values as the server last reported them.
    params: Vec<(String, String)>,
    /// The values reported at login, to go back to for a client that sets none.
    defaults: Vec<(String, String)>,
    /// Settings the server reported while relaying, for the client to
    /// track; taken by `take_reports`.
    reports: Vec<(String, String)>,
    /// Settings applied with SET for the current client, cleared by a reset.
    applied: Vec<(String, String)>,
    /// The server's BackendKeyData (process id, secret key), for cancels.
    backend_key: (i32, i32),
    /// For `pool.max_lifetime`.
    opened: std::time::Instant,
    /// For `pool.idle_timeout`: when it last went back to its pool.
    idle_since: std::time::Instant,
    /// Statements prepared for transaction-pooled clients.
    statements: super::statements::ServerStatements,
    /// The node it is connected to.
    node: Arc<Node>,
    /// What the messages sent still wait for, and the transaction status.
    exchange: Exchange,
    /// The client settings this session was last set up for, with the
    /// statement timeout then configured; cleared by a reset.
    settled: Option<(Arc<Settings>, Duration)>,
    /// Reused for the bytes sent to the server.
    out: BytesMut,
    /// The process id its client was told: the client's own notifications
    /// carry it instead of the server's.
    client_pid: i32,
    /// Counts it in its pool's open connections while it lives.
    tally: Option<Tally>,
    /// The server refused a statement as read-only (SQLSTATE 25006) since
    /// the last `take_read_only_refusal`.
    read_only_refusal: bool,
}

impl ServerConn {
    /// Count this connection in `open` (its pool's open connections)
    /// until it is dropped, whichever way it goes.
    pub fn count_in(&mut self, open: &Arc<AtomicUsize>) {
        open.fetch_add(1, Ordering::Relaxed);
        self.tally = Some(Tally(Arc::clone(open)));
    }

    pub async fn open(
        node: &Node,
        login: &Login<'_>,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        let stream = tokio::time::timeout(timeout, reach(node))
            .await
            .map_err(|_| ServerError::Timeout(node.to_string()))?
            .map_err(|source| ServerError::Connect {
                node: node.to_string(),
                source,
            })?;
        let mut conn = ServerConn {
            stream,
            buf: BytesMut::with_capacity(8192),
            codec: FrameCodec::new(1 << 30),
            params: Vec::new(),
            defaults: Vec::new(),
            reports: Vec::new(),
            applied: Vec::new(),
            backend_key: (0, 0),
            opened: std::time::Instant::now(),
            idle_since: std::time::Instant::now(),
            statements: Default::default(),
            node: Arc::new(node.clone()),
            exchange: Default::default(),
            settled: None,
            out: BytesMut::new(),
            client_pid: 0,
            tally: None,
            read_only_refusal: false,
        };
        tokio::time::timeout(timeout, conn.login(login))
            .await
            .map_err(|_| ServerError::Timeout(node.to_string()))??;
        Ok(conn)
    }

    /// Whether an idle connection is still usable: nothing to read (an idle
    /// server sends nothing) and not closed. A server that shut down sends a
    /// FATAL and closes; either shows up here.
    pub fn is_usable(&self) -> bool {
        self.buf.is_empty() && self.stream.is_quiet()
    }

    /// ParameterStatus values as the server last reported them.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The server's process id and secret key, for cancels.
    pub fn backend_key(&self) -> (i32, i32) {
        self.backend_key
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn opened(&self) -> std::time::Instant {
        self.opened
    }

    pub fn idle_since(&self) -> std::time::Instant {
        self.idle_since
    }

    /// Back in its pool from `now`.
    pub fn mark_idle(&mut self, now: std::time::Instant) {
        self.idle_since = now;
    }

    /// Where it stands between messages (the transaction-state machine
    /// that decides whether it may serve another client).
    pub fn standing(&self) -> Standing {
        if self.buf.is_empty() {
            self.exchange.standing()
        } else {
            Standing::Busy
        }
    }

    /// Lent to the client that was told `pid` as its backend's process id.
    pub fn lend_to(&mut self, pid: i32) {
        self.client_pid = pid;
    }

    /// Run one simple query, keeping ParameterStatus updates; an error
    /// from the server is returned.
    async fn run(&mut self, sql: &str) -> Result<(), ServerError> {
        self.query_row(sql).await.map(|_| ())
    }

    /// Run one simple query and return its first row, each column as text
    /// (`None` for NULL); `None` when it returned no row. For gatehouse's
    /// own queries (the topology monitor, a write's WAL position).
    pub async fn query_row(
        &mut self,
        sql: &str,
    ) -> Result<Option<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut failure = None;
        let mut row = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                back::ERROR_RESPONSE => failure = Some(refused(&frame)),
                back::PARAMETER_STATUS => {
                    note_parameter(&mut self.params, &frame.bytes);
                }
                back::DATA_ROW if row.is_none() => row = Some(data_row(frame.body())?),
                back::READY_FOR_QUERY => {
                    if let Some(status) =
                        frame.ready_status().and_then(TransactionStatus::from_byte)
                    {
                        self.exchange.status = status;
                    }
                    return failure.map_or(Ok(row), Err);
                }
                _ => {}
            }
        }
    }

    /// Whether it is set up for this client already, or for one that asked
    /// for the same (settings are interned: one copy of each): `apply`
    /// would send nothing.
    pub fn settled_for(&self, wanted: &Arc<Settings>, statement_timeout: Duration) -> bool {
        self.settled.as_ref().is_some_and(|(settled, timeout)| {
            Arc::ptr_eq(settled, wanted) && *timeout == statement_timeout
        })
    }

    /// Give the session what this client asked for: its reported settings
    /// (or the server's defaults for those it did not set), its `options`
    /// settings, and `statement_timeout` unless it set its own. Only what
    /// differs from the connection's current state is sent.
    pub async fn apply(
        &mut self,
        wanted: &Arc<Settings>,
        statement_timeout: Duration,
    ) -> Result<(), ServerError> {
        if self.settled_for(wanted, statement_timeout) {
            return Ok(());
        }
        // Every reported setting a client may change: its own value, else
        // the server's default, whatever an earlier client left.
        let mut changes: Vec<(String, String)> = Vec::new();
        for (name, current) in self.params.iter().filter(|(name, _)| tracked(name)) {
            let value = lookup(&wanted.params, name).or_else(|| lookup(&self.defaults, name));
            if let Some(value) = value {
                if current != value {
                    changes.push((name.clone(), value.to_string()));
                }
            }
        }
        let mut options = wanted.options.clone();
        if !statement_timeout.is_zero() && !options.iter().any(|(k, _)| k == "statement_timeout") {
            options.push((
                "statement_timeout".into(),
                statement_timeout.as_millis().to_string(),
            ));
        }
        for (name, value) in &options {
            if !self.applied.iter().any(|(k, v)| k == name && v == value) {
                changes.push((name.clone(), value.clone()));
            }
        }
        if !changes.is_empty() {
            let sql: Vec<String> = changes
                .iter()
                .map(|(name, value)| {
                    format!("SET {} TO {}", quote_ident(name), quote_literal(value))
                })
                .collect();
            self.run(&sql.join("; ")).await?;
        }
        for (name, value) in options {
            match self.applied.iter_mut().find(|(k, _)| *k == name) {
                Some(slot) => slot.1 = value,
                None => self.applied.push((name, value)),
            }
        }
        self.settled = Some((Arc::clone(wanted), statement_timeout));
        Ok(())
    }

    /// The connection now stands as `settings` ask (the client's reported
    /// settings changed on it), or, with `None`, as no known settings ask.
    pub fn settle(&mut self, settings: Option<&Arc<Settings>>, statement_timeout: Duration) {
        self.settled = settings.map(|s| (Arc::clone(s), statement_timeout));
    }

    /// Settings the server reported since the last call, with their values.
    pub fn take_reports(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.reports)
    }

    /// Whether the server refused a statement as read-only since the last
    /// call: a node taken for the primary that is not (any more).
    pub fn take_read_only_refusal(&mut self) -> bool {
        std::mem::take(&mut self.read_only_refusal)
    }

    /// What happened to statements since the last call, for metrics.
    pub fn take_events(&mut self) -> StatementEvents {
        std::mem::take(&mut self.exchange.events)
    }

    /// Forward a client's messages, with its named statements as `naming`
    /// says. Answers given here that are due now go into `to_client`.
    /// Returns the bytes sent.
    pub async fn forward(
        &mut self,
        frames: &[Frame],
        client: &mut ClientStatements,
        naming: Naming,
        pinned: bool,
        to_client: &mut BytesMut,
    ) -> Result<usize, ServerError> {
        let mut to_server = std::mem::take(&mut self.out);
        to_server.clear();
        let mut sides = Sides {
            client,
            server: &mut self.statements,
            naming,
            pinned,
        };
        for frame in frames {
            self.exchange
                .client_message(frame, &mut sides, &mut to_server, to_client);
        }
        let sent = self.send(&to_server).await;
        let len = to_server.len();
        self.out = to_server;
        sent.map(|()| len)
    }

    /// The next whole frames the server sent, appended to `to_client`;
    /// returns how many bytes were appended.
    pub async fn read_some(
        &mut self,
        client: &mut ClientStatements,
        naming: Naming,
        to_client: &mut BytesMut,
    ) -> Result<usize, ServerError> {
        loop {
            let mut sides = Sides {
                client: &mut *client,
                server: &mut self.statements,
                naming,
                pinned: false,
            };
            let before = to_client.len();
            // Frames are read in place: nothing is split off the buffer.
            let mut consumed = 0;
            while let Some(len) = complete_frame(&self.buf[consumed..], MAX_SERVER_MESSAGE)? {
                let frame = &self.buf[consumed..consumed + len];
                match frame[0] {
                    back::ERROR_RESPONSE if memchr::memmem::find(frame, b"C25006\0").is_some() => {
                        self.read_only_refusal = true;
                    }
                    back::PARAMETER_STATUS => {
                        if let Some((name, value)) = note_parameter(&mut self.params, frame) {
                            self.reports.push((name.to_string(), value.to_string()));
                        }
                    }
                    // A notification this session sent itself names the
                    // process id the client knows, so that a client can
                    // tell its own (`n.pid == conn.info.backend_pid`).
                    back::NOTIFICATION_RESPONSE if notifier(frame) == Some(self.backend_key.0) => {
                        let mut own = frame.to_vec();
                        own[5..9].copy_from_slice(&self.client_pid.to_be_bytes());
                        self.exchange.server_message(&own, &mut sides, to_client);
                        consumed += len;
                        continue;
                    }
                    _ => {}
                }
                self.exchange.server_message(frame, &mut sides, to_client);
                consumed += len;
            }
            self.buf.advance(consumed);
            if to_client.len() > before {
                return Ok(to_client.len() - before);
            }
            // Room for the rest of a partial frame, or the whole buffer back.
            let wanted = announced_len(&self.buf).unwrap_or(8192);
            self.buf.reserve(wanted.saturating_sub(self.buf.len()));
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ServerError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Make the session as a new one, for the next client: `ROLLBACK` when
    /// a transaction is open, then `DISCARD ALL`. False when that is not
    /// possible (a reply or COPY in progress, extended-protocol messages
    /// without their Sync, or the reset failed): the connection must close.
    pub async fn reset(&mut self) -> bool {
        match self.standing() {
            Standing::Busy => return false,
            Standing::InTransaction => {
                if self.run("ROLLBACK").await.is_err() {
                    return false;
                }
            }
            Standing::Idle => {}
        }
        let reset = tokio::time::timeout(Duration::from_secs(5), self.run("DISCARD ALL")).await;
        if !matches!(reset, Ok(Ok(()))) || self.standing() != Standing::Idle {
            return false;
        }
        self.applied.clear();
        self.settled = None;
        self.statements.clear();
        self.reports.clear();
        true
    }

    /// The next whole frame from the server.
    pub async fn read_frame(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ServerError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    async fn login(&mut self, login: &Login<'_>) -> Result<(), ServerError> {
        let mut params: Vec<(&str, &str)> =
            vec![("user", login.user), ("database", login.database)];
        params.extend(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut out = BytesMut::new();
        frontend::startup_message(params, &mut out)?;
        self.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                back::AUTHENTICATION => self.authenticate(&frame, login, &mut scram).await?,
                back::PARAMETER_STATUS => {
                    note_parameter(&mut self.params, &frame.bytes);
                }
                back::BACKEND_KEY_DATA => {
                    let mut body = frame.body();
                    if body.len() == 8 {
                        self.backend_key = (body.get_i32(), body.get_i32());
                    }
                }
                back::READY_FOR_QUERY => {
                    self.defaults = self.params.clone();
                    return Ok(());
                }
                back::ERROR_RESPONSE => return Err(refused(&frame)),
                // NoticeResponse and anything else announced at login.
                _ => {}
            }
        }
    }

    async fn authenticate(
        &mut self,
        frame: &Frame,
        login: &Login<'_>,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), ServerError> {
        let mut body = frame.body();
        if body.len() < 4 {
            return Err(CodecError::Malformed {
                what: "Authentication",
            }
            .into());
        }
        let code = body.get_i32();
        let password = || {
            login
                .password
                .ok_or_else(|| ServerError::NoPassword(login.user.to_string()))
        };
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(password()?.as_bytes(), &mut out)?,
            5 if body.len() == 4 => {
                let salt = [body[0], body[1], body[2], body[3]];
                let hash = postgres_protocol::authentication::md5_hash(
                    login.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let offers_scram = body
                    .split(|b| *b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(ServerError::UnsupportedAuth(code));
                }
                let client =
                    ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out)?;
                *scram = Some(client);
            }
            11 => {
                let client = scram.as_mut().ok_or(ServerError::UnsupportedAuth(code))?;
                client
                    .update(body)
                    .map_err(|e| ServerError::Scram(e.to_string()))?;
                frontend::sasl_response(client.message(), &mut out)?;
            }
            12 => {
                let client = scram.as_mut().ok_or(ServerError::UnsupportedAuth(code))?;
                // Verifies the server's signature: it really knows the password.
                client
                    .finish(body)
                    .map_err(|e| ServerError::Scram(e.to_string()))?;
                return Ok(());
            }
            other => return Err(ServerError::UnsupportedAuth(other)),
        }
        self.send(&out).await
    }
}

/// The largest message taken from a server.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// The process id that sent a NotificationResponse (a whole frame).
fn notifier(frame: &[u8]) -> Option<i32> {
    let pid = frame.get(5..9)?;
    Some(i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A ParameterStatus frame from the server, kept in `params`: the name and
/// value when the value is new.
pub fn note_parameter<'f>(
    params: &mut Vec<(String, String)>,
    frame: &'f [u8],
) -> Option<(&'f str, &'f str)> {
    let (name, value) = read_parameter_status(frame)?;
    if super::settings::lookup(params, name) == Some(value) {
        return None;
    }
    super::settings::upsert(params, name, value);
    Some((name, value))
}

/// The SQLSTATE and message of an ErrorResponse from the server.
pub fn refused(frame: &Frame) -> ServerError {
    let fields = frame.error_fields();
    let field = |code: u8| {
        fields
            .iter()
            .find(|(c, _)| *c == code)
            .map_or_else(String::new, |(_, v)| (*v).to_string())
    };
    ServerError::Refused {
        sqlstate: field(super::codec::tag::field::SQLSTATE),
        message: field(super::codec::tag::field::MESSAGE),
    }
}

/// A DataRow's columns as text.
fn data_row(mut body: &[u8]) -> Result<Vec<Option<String>>, ServerError> {
    let malformed = || ServerError::Codec(CodecError::Malformed { what: "DataRow" });
    if body.len() < 2 {
        return Err(malformed());
    }
    let columns = body.get_u16();
    let mut row = Vec::with_capacity(usize::from(columns));
    for _ in 0..columns {
        if body.len() < 4 {
            return Err(malformed());
        }
        let len = body.get_i32();
        let Ok(len) = usize::try_from(len) else {
            row.push(None);
            continue;
        };
        if body.len() < len {
            return Err(malformed());
        }
        row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    Ok(row)
}
