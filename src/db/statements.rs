//! The messages between a client and the server connection it holds, with
//! named protocol-level prepared statements kept across transaction pooling,
//! and where the connection stands (`Standing`: idle, in a transaction, or
//! busy), which decides when it may serve another client.
//!
//! A transaction-pooled client may get a different server connection for
//! each transaction, yet psycopg 3 (past `prepare_threshold`) and
//! `pgbench -M prepared` prepare a statement once and bind it by name for the
//! rest of the session. So a client's named statements are the client's, not
//! the server's: each `Parse` is remembered under the client's name and sent
//! under a name derived from its text and parameter types
//! (`gatehouse_<hash>`), which every client with the same statement shares.
//! Before a `Bind` or `Describe` reaches a server connection that has not
//! seen the statement, a `Parse` for it goes first. A `Parse` of a statement
//! the connection already has, a `Close` of one, and `DEALLOCATE name` are
//! answered here. Each connection keeps at most `max_prepared_statements`,
//! closing the least recently used one.
//!
//! The answers have to reach the client in the order it sent the messages,
//! with the replies to added messages taken out, and the error rule kept: an
//! error makes the server skip everything up to the next Sync. [`Exchange`]
//! therefore queues what each message sent is waiting for and matches the
//! server's messages against that queue.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::codec::tag::{self, back, front};
use super::codec::{
    CLOSE_COMPLETE, Frame, Frontend, PARSE_COMPLETE, TransactionStatus, command_complete,
    put_frame, ready_for_query,
};
use super::error::DbError;

/// A statement's identity on server connections: a hash of what follows the
/// name in its `Parse` (query text, parameter types).
pub type StatementId = [u8; 16];

/// Hashes a [`StatementId`] by its first eight bytes: an id is a SHA-256
/// prefix, a hash already, and a connection holds a bounded number of them.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // An id hashes as its length, then its bytes: the length adds nothing.
        if let Some(head) = bytes.first_chunk::<8>() {
            self.0 = u64::from_le_bytes(*head);
        }
    }

    fn write_usize(&mut self, _length: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A client's named statement.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    pub id: StatementId,
    /// Its name on server connections.
    name: Vec<u8>,
    /// The `Parse` body after the name: query, parameter count and types.
    content: Bytes,
}

impl Statement {
    fn new(content: &[u8]) -> Statement {
        let digest = Sha256::digest(content);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Statement {
            id,
            name: server_name(&id),
            content: Bytes::copy_from_slice(content),
        }
    }

    fn parse(&self, out: &mut BytesMut) {
        put_frame(out, front::PARSE, &[&self.name, &[0], &self.content]);
    }
}

/// The name a statement has on server connections.
pub fn server_name(id: &StatementId) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = b"gatehouse_".to_vec();
    for byte in id {
        name.push(HEX[usize::from(byte >> 4)]);
        name.push(HEX[usize::from(byte & 0xf)]);
    }
    name
}

/// A client's named statements, by the names it gave them.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Bytes, Arc<Statement>>,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The query text of the statement the client named `name`.
    pub fn sql_of(&self, name: &[u8]) -> Option<&[u8]> {
        let content = &self.by_name.get(name)?.content;
        super::codec::cbytes(content).map(|(sql, _)| sql)
    }

    /// Answer a client that holds no server connection and only names
    /// statements (`Parse` with a name, then Sync or Flush), as `PQprepare`
    /// does: the statements are kept here and prepared on the server
    /// connection the client gets when it first uses them. Waiting for a
    /// connection here could deadlock a client program that prepares
    /// synchronously while its other connections hold the pool (pgbench
    /// `-M prepared` with more clients than connections). A mistake in a
    /// statement's text is therefore reported when it is first used.
    /// `None` when the messages need a server.
    pub fn answer_alone(&mut self, frames: &[Frame]) -> Option<BytesMut> {
        if frames.first()?.tag != front::PARSE {
            return None;
        }
        let mut names = Vec::new();
        for frame in frames {
            match frame.frontend() {
                Ok(Frontend::Parse { statement, .. })
                    if !statement.is_empty()
                        && !self.by_name.contains_key(statement)
                        && !names.contains(&statement) =>
                {
                    names.push(statement);
                }
                Ok(Frontend::Sync | Frontend::Flush) => {}
                _ => return None,
            }
        }
        if names.is_empty() {
            return None;
        }
        let mut to_client = BytesMut::new();
        for frame in frames {
            if let Ok(Frontend::Parse { statement, .. }) = frame.frontend() {
                let content = &frame.body()[statement.len() + 1..];
                self.by_name.insert(
                    Bytes::copy_from_slice(statement),
                    Arc::new(Statement::new(content)),
                );
                to_client.extend_from_slice(PARSE_COMPLETE);
            } else if frame.tag == front::SYNC {
                to_client.extend_from_slice(&ready_for_query(TransactionStatus::Idle));
            }
        }
        Some(to_client)
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::Forget(name) => {
                self.by_name.remove(&name);
            }
            Undo::Restore(name, statement) => {
                self.by_name.insert(name, statement);
            }
        }
    }
}

/// The statements a server connection has prepared, shared by every client
/// that gets it, with when each was last used.
#[derive(Debug, Default)]
pub struct ServerStatements {
    last_used: HashMap<StatementId, u64, IdHash>,
    clock: u64,
    /// Used since the connection was last idle: not evicted, since closing
    /// a statement also closes the portals bound from it.
    in_use: Vec<StatementId>,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    /// Everything deallocated (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.last_used.clear();
        self.in_use.clear();
    }

    fn has(&self, id: &StatementId) -> bool {
        self.last_used.contains_key(id)
    }

    fn touch(&mut self, id: StatementId) {
        self.clock += 1;
        self.last_used.insert(id, self.clock);
        if !self.in_use.contains(&id) {
            self.in_use.push(id);
        }
    }

    /// The least recently used statement not in use, once `max` are kept.
    fn victim(&self, max: usize) -> Option<StatementId> {
        if self.last_used.len() < max {
            return None;
        }
        self.last_used
            .iter()
            .filter(|(id, _)| !self.in_use.contains(id))
            .min_by_key(|(_, used)| **used)
            .map(|(id, _)| *id)
    }
}

/// What undoing a skipped or failed message means for the client's names.
#[derive(Debug)]
enum Undo {
    Nothing,
    Forget(Bytes),
    Restore(Bytes, Arc<Statement>),
}

/// What one message sent to the server (or answered here) waits for.
#[derive(Debug)]
enum Expect {
    /// A client message passed on; its reply ends at a tag `ends_reply` knows.
    Reply(u8),
    /// A client's `Parse` of a statement new to this server connection.
    Parse { id: StatementId, name: Bytes },
    /// A `Parse` added before a `Bind` or `Describe`: its ParseComplete is
    /// dropped, an error goes to the client.
    Prepare { id: StatementId },
    /// A `Close` added to make room: its CloseComplete is dropped.
    Evict { id: StatementId },
    /// An answer given here, sent once everything before it is answered.
    /// `ready` makes it a ReadyForQuery with the current status.
    Answer {
        frame: Bytes,
        ready: bool,
        undo: Undo,
    },
}

/// Whether a server message of type `tag` ends the reply to client message
/// `sent`. Errors are handled apart.
fn ends_reply(sent: u8, tag: u8) -> bool {
    match sent {
        front::PARSE => tag == back::PARSE_COMPLETE,
        front::BIND => tag == back::BIND_COMPLETE,
        front::CLOSE => tag == back::CLOSE_COMPLETE,
        front::DESCRIBE => tag == back::ROW_DESCRIPTION || tag == back::NO_DATA,
        front::EXECUTE => matches!(
            tag,
            back::COMMAND_COMPLETE | back::EMPTY_QUERY_RESPONSE | back::PORTAL_SUSPENDED
        ),
        front::QUERY | front::SYNC | front::FUNCTION_CALL => tag == back::READY_FOR_QUERY,
        _ => false,
    }
}

/// Client messages answered by a ReadyForQuery.
fn is_sync_point(sent: u8) -> bool {
    matches!(sent, front::QUERY | front::SYNC | front::FUNCTION_CALL)
}

/// Extended-protocol messages: after an error the server skips them until Sync.
fn extended(sent: u8) -> bool {
    matches!(
        sent,
        front::PARSE | front::BIND | front::CLOSE | front::DESCRIBE | front::EXECUTE
    )
}

/// What `Exchange::translate` did with a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Nothing: it goes to the server as it is.
    No,
    /// Rewritten and sent.
    Sent,
    /// Answered here; the server sees nothing of it.
    Answered,
}

/// How the statements a client names are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Passed through as they are (session pooling, or tracking off).
    Server,
    /// Kept per client and prepared on each server connection as needed,
    /// each keeping at most this many.
    Client(usize),
}

/// What happened to statements in one exchange, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatementEvents {
    /// Parse sent to a server (the client's or one added).
    pub prepared: u64,
    /// A client's Parse answered from the server connection's statements.
    pub reused: u64,
    /// Closed to make room.
    pub evicted: u64,
    /// ReadyForQuery messages that reached the client: answers to its
    /// Query and Sync messages, in order.
    pub ready: u64,
    /// ReadyForQuery from the server with status `I`: a transaction
    /// (explicit or implicit) ended.
    pub transactions: u64,
}

/// The exchange between a client and the server connection it holds.
#[derive(Debug)]
pub struct Exchange {
    expect: VecDeque<Expect>,
    /// Extended-protocol messages sent since the last Sync: the server may
    /// be inside an implicit transaction.
    unsynced: bool,
    /// After an error given here: client messages are dropped until Sync.
    skipping: bool,
    /// The last ReadyForQuery status.
    pub status: TransactionStatus,
    pub events: StatementEvents,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            expect: VecDeque::new(),
            unsynced: false,
            skipping: false,
            status: TransactionStatus::Idle,
            events: StatementEvents::default(),
        }
    }
}

/// The statements on both sides, borrowed for one step.
pub struct Sides<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub naming: Naming,
    /// The client keeps this server connection (it may hold SQL-level
    /// prepared statements there too).
    pub pinned: bool,
}

/// Where a server connection stands between messages: the state machine,
/// driven by the messages sent and the ReadyForQuery status received, that
/// decides what may be done with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Every reply in, no transaction open (status `I`): it may serve any
    /// client, or go back to the pool.
    Idle,
    /// Every reply in, inside a transaction block (`T`) or a failed one
    /// (`E`): its client keeps it; another gets it only after `ROLLBACK`.
    InTransaction,
    /// Replies still due, COPY in progress, or extended-protocol messages
    /// sent without their Sync (an implicit transaction may be open): the
    /// state is unknown until the server answers.
    Busy,
}

impl Exchange {
    pub fn standing(&self) -> Standing {
        // Answers given here are sent as soon as nothing before them is
        // awaited: with nothing awaited, nothing is queued.
        let awaiting = !self.expect.is_empty();
        if awaiting || self.unsynced || self.skipping {
            return Standing::Busy;
        }
        match self.status {
            TransactionStatus::Idle => Standing::Idle,
            TransactionStatus::InBlock | TransactionStatus::Failed => Standing::InTransaction,
        }
    }

    /// One client message: what goes to the server into `to_server`, answers
    /// that are due now into `to_client`.
    pub fn client_message(
        &mut self,
        frame: &Frame,
        sides: &mut Sides<'_>,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) {
        let tag = frame.tag;
        if self.skipping {
            if tag != front::SYNC {
                return;
            }
            self.skipping = false;
        }
        let handled = match sides.naming {
            Naming::Client(max) => self.translate(frame, sides, max, to_server),
            Naming::Server => Handled::No,
        };
        if handled == Handled::No {
            to_server.extend_from_slice(&frame.bytes);
            if extended(tag) || is_sync_point(tag) {
                self.expect.push_back(Expect::Reply(tag));
            }
            if tag == front::QUERY {
                if let Ok(Frontend::Query { sql }) = frame.frontend() {
                    if super::classify::deallocates_all(sql) || super::classify::discards_all(sql) {
                        sides.client.by_name.clear();
                        sides.server.clear();
                    }
                }
            }
        }
        if handled != Handled::Answered {
            if extended(tag) {
                self.unsynced = true;
            } else if matches!(tag, front::SYNC | front::QUERY) {
                self.unsynced = false;
            }
        }
        self.answer_due(to_client);
    }

    /// Named statements in a client message.
    fn translate(
        &mut self,
        frame: &Frame,
        sides: &mut Sides<'_>,
        max: usize,
        to_server: &mut BytesMut,
    ) -> Handled {
        // Only these can name a statement; most messages stop here.
        let names = match frame.tag {
            front::PARSE | front::BIND | front::QUERY => true,
            front::DESCRIBE | front::CLOSE => frame.body().first() == Some(&tag::STATEMENT),
            _ => false,
        };
        // An unnamed Parse (the body starts with the empty name), or a Bind
        // of the unnamed statement to the unnamed portal.
        let unnamed = match frame.tag {
            front::PARSE => frame.body().first() == Some(&0),
            front::BIND => frame.body().starts_with(&[0, 0]),
            _ => false,
        };
        if !names || unnamed {
            return Handled::No;
        }
        let Ok(message) = frame.frontend() else {
            return Handled::No;
        };
        match message {
            Frontend::Parse { statement, .. } if !statement.is_empty() => {
                let name = Bytes::copy_from_slice(statement);
                // What follows the name: query, then parameter types.
                let content = &frame.body()[statement.len() + 1..];
                if sides.client.by_name.contains_key(&name) {
                    self.fail(&DbError::DuplicatePreparedStatement(
                        String::from_utf8_lossy(statement).into_owned(),
                    ));
                    return Handled::Answered;
                }
                let statement = Arc::new(Statement::new(content));
                let id = statement.id;
                sides
                    .client
                    .by_name
                    .insert(name.clone(), Arc::clone(&statement));
                if sides.server.has(&id) {
                    sides.server.touch(id);
                    self.events.reused += 1;
                    self.expect.push_back(Expect::Answer {
                        frame: Bytes::from_static(PARSE_COMPLETE),
                        ready: false,
                        undo: Undo::Forget(name),
                    });
                    return Handled::Answered;
                } else {
                    self.make_room(sides.server, max, to_server);
                    statement.parse(to_server);
                    sides.server.touch(id);
                    self.events.prepared += 1;
                    self.expect.push_back(Expect::Parse { id, name });
                }
                Handled::Sent
            }
            Frontend::Bind { portal, statement } if !statement.is_empty() => {
                let Some(known) = sides.client.by_name.get(statement).cloned() else {
                    return Handled::No;
                };
                self.ensure(&known, sides.server, max, to_server);
                let rest = &frame.body()[portal.len() + 1 + statement.len() + 1..];
                put_frame(
                    to_server,
                    front::BIND,
                    &[portal, &[0], &known.name, &[0], rest],
                );
                self.expect.push_back(Expect::Reply(front::BIND));
                Handled::Sent
            }
            Frontend::Describe {
                kind: tag::STATEMENT,
                name,
            } if !name.is_empty() => {
                let Some(known) = sides.client.by_name.get(name).cloned() else {
                    return Handled::No;
                };
                self.ensure(&known, sides.server, max, to_server);
                put_frame(
                    to_server,
                    front::DESCRIBE,
                    &[&[tag::STATEMENT], &known.name, &[0]],
                );
                self.expect.push_back(Expect::Reply(front::DESCRIBE));
                Handled::Sent
            }
            Frontend::Close {
                kind: tag::STATEMENT,
                name,
            } if !name.is_empty() => {
                let name = Bytes::copy_from_slice(name);
                let Some(known) = sides.client.by_name.remove(&name) else {
                    return Handled::No;
                };
                self.expect.push_back(Expect::Answer {
                    frame: Bytes::from_static(CLOSE_COMPLETE),
                    ready: false,
                    undo: Undo::Restore(name, known),
                });
                Handled::Answered
            }
            Frontend::Query { sql } if !sides.pinned && super::classify::deallocates_all(sql) => {
                // The server's statements serve other clients too.
                sides.client.by_name.clear();
                self.answer_command("DEALLOCATE ALL", Undo::Nothing);
                Handled::Answered
            }
            Frontend::Query { sql } => {
                let Some(name) = super::classify::deallocates(sql) else {
                    return Handled::No;
                };
                let Some(known) = sides.client.by_name.remove(name.as_slice()) else {
                    return Handled::No;
                };
                self.answer_command("DEALLOCATE", Undo::Restore(Bytes::from(name), known));
                Handled::Answered
            }
            _ => Handled::No,
        }
    }

    /// Answer a simple query here: CommandComplete with `command`, then
    /// ReadyForQuery.
    fn answer_command(&mut self, command: &str, undo: Undo) {
        self.expect.push_back(Expect::Answer {
            frame: command_complete(command).bytes,
            ready: false,
            undo,
        });
        self.expect.push_back(Expect::Answer {
            frame: Bytes::new(),
            ready: true,
            undo: Undo::Nothing,
        });
    }

    /// Make sure the server connection has `statement` before a message
    /// that names it.
    fn ensure(
        &mut self,
        statement: &Statement,
        server: &mut ServerStatements,
        max: usize,
        to_server: &mut BytesMut,
    ) {
        if !server.has(&statement.id) {
            self.make_room(server, max, to_server);
            statement.parse(to_server);
            self.events.prepared += 1;
            self.expect.push_back(Expect::Prepare { id: statement.id });
        }
        server.touch(statement.id);
    }

    fn make_room(&mut self, server: &mut ServerStatements, max: usize, to_server: &mut BytesMut) {
        while let Some(id) = server.victim(max) {
            server.last_used.remove(&id);
            put_frame(
                to_server,
                front::CLOSE,
                &[&[tag::STATEMENT], &server_name(&id), &[0]],
            );
            self.events.evicted += 1;
            self.expect.push_back(Expect::Evict { id });
        }
    }

    /// Refuse the current client message with an error, as the server would:
    /// the client's messages up to its next Sync are skipped.
    pub fn fail(&mut self, error: &DbError) {
        self.expect.push_back(Expect::Answer {
            frame: error.frame().bytes,
            ready: false,
            undo: Undo::Nothing,
        });
        self.skipping = true;
    }

    /// Answers given here whose turn has come. Called after every message
    /// both ways, and mostly with none due: the look at the queue's front is
    /// inlined, the sending is not.
    #[inline]
    fn answer_due(&mut self, to_client: &mut BytesMut) {
        if matches!(self.expect.front(), Some(Expect::Answer { .. })) {
            self.give_answers(to_client);
        }
    }

    #[inline(never)]
    fn give_answers(&mut self, to_client: &mut BytesMut) {
        while let Some(Expect::Answer { .. }) = self.expect.front() {
            if let Some(Expect::Answer { frame, ready, .. }) = self.expect.pop_front() {
                if ready {
                    self.events.ready += 1;
                    to_client.extend_from_slice(&ready_for_query(self.status));
                } else {
                    to_client.extend_from_slice(&frame);
                }
            }
        }
    }

    /// One server message (its whole frame): what reaches the client goes
    /// into `to_client`.
    /// Returns whether it was a ReadyForQuery.
    pub fn server_message(
        &mut self,
        frame: &[u8],
        sides: &mut Sides<'_>,
        to_client: &mut BytesMut,
    ) -> bool {
        let tag = frame[0];
        match tag {
            // NoticeResponse, ParameterStatus, NotificationResponse: any time.
            back::NOTICE_RESPONSE | back::PARAMETER_STATUS | back::NOTIFICATION_RESPONSE => {
                to_client.extend_from_slice(frame)
            }
            back::ERROR_RESPONSE => {
                to_client.extend_from_slice(frame);
                let extended_head = match self.expect.front() {
                    Some(Expect::Reply(sent)) => extended(*sent),
                    Some(Expect::Parse { .. } | Expect::Prepare { .. } | Expect::Evict { .. }) => {
                        true
                    }
                    _ => false,
                };
                if extended_head {
                    let mut undone = Vec::new();
                    if let Some(failed) = self.expect.pop_front() {
                        undone.push(failed);
                    }
                    while self
                        .expect
                        .front()
                        .is_some_and(|e| !matches!(e, Expect::Reply(front::SYNC)))
                    {
                        if let Some(skipped) = self.expect.pop_front() {
                            undone.push(skipped);
                        }
                    }
                    // Latest first, so names come back as they were.
                    for entry in undone.into_iter().rev() {
                        undo(entry, sides);
                    }
                }
            }
            _ => {
                let (ends, dropped) = match self.expect.front() {
                    Some(Expect::Reply(sent)) => (ends_reply(*sent, tag), false),
                    Some(Expect::Parse { .. }) => (tag == back::PARSE_COMPLETE, false),
                    Some(Expect::Prepare { .. }) => {
                        let parsed = tag == back::PARSE_COMPLETE;
                        (parsed, parsed)
                    }
                    Some(Expect::Evict { .. }) => {
                        let closed = tag == back::CLOSE_COMPLETE;
                        (closed, closed)
                    }
                    _ => (false, false),
                };
                if !dropped {
                    to_client.extend_from_slice(frame);
                }
                let status = (tag == back::READY_FOR_QUERY)
                    .then(|| frame.last().copied().and_then(TransactionStatus::from_byte))
                    .flatten();
                if let Some(status) = status {
                    self.status = status;
                    self.events.ready += 1;
                    if status == TransactionStatus::Idle {
                        self.events.transactions += 1;
                    }
                    // Whatever is still queued before the sync point it
                    // answers got no reply.
                    let mut undone = Vec::new();
                    while let Some(entry) = self.expect.pop_front() {
                        if matches!(entry, Expect::Reply(sent) if is_sync_point(sent)) {
                            break;
                        }
                        undone.push(entry);
                    }
                    for entry in undone.into_iter().rev() {
                        undo(entry, sides);
                    }
                    if status == TransactionStatus::Idle && self.expect.is_empty() {
                        sides.server.in_use.clear();
                    }
                } else if ends {
                    self.expect.pop_front();
                }
            }
        }
        self.answer_due(to_client);
        tag == back::READY_FOR_QUERY
    }
}

/// Put things back as they were for a message the server skipped or failed.
fn undo(entry: Expect, sides: &mut Sides<'_>) {
    match entry {
        Expect::Parse { id, name } => {
            sides.server.last_used.remove(&id);
            sides.client.undo(Undo::Forget(name));
        }
        Expect::Prepare { id } => {
            sides.server.last_used.remove(&id);
        }
        // Not closed: the server still has it.
        Expect::Evict { id } => sides.server.touch(id),
        Expect::Answer { undo, .. } => sides.client.undo(undo),
        Expect::Reply(_) => {}
    }
}

#[cfg(test)]
mod tests;
