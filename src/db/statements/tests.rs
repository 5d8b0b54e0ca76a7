use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::{ClientStatements, Exchange, Naming, ServerStatements, Sides, Standing, server_name};
use crate::db::codec::{Frame, FrameCodec, frame};

fn cstring(parts: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(part);
        body.push(0);
    }
    body
}

fn parse(name: &str, sql: &str) -> Frame {
    let mut body = cstring(&[name.as_bytes(), sql.as_bytes()]);
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &body)
}

fn bind(statement: &str) -> Frame {
    let mut body = cstring(&[b"", statement.as_bytes()]);
    // No parameter formats, no parameters, no result formats.
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    frame(b'B', &body)
}

fn close(name: &str) -> Frame {
    let mut body = vec![b'S'];
    body.extend(cstring(&[name.as_bytes()]));
    frame(b'C', &body)
}

fn execute() -> Frame {
    let mut body = cstring(&[b""]);
    body.extend_from_slice(&0i32.to_be_bytes());
    frame(b'E', &body)
}

fn sync() -> Frame {
    frame(b'S', b"")
}

fn query(sql: &str) -> Frame {
    frame(b'Q', &cstring(&[sql.as_bytes()]))
}

/// A server message with an empty body (ParseComplete, BindComplete, ...).
fn reply(tag: u8) -> Frame {
    frame(tag, b"")
}

fn ready(status: u8) -> Frame {
    frame(b'Z', &[status])
}

fn command_complete(tag: &str) -> Frame {
    frame(b'C', &cstring(&[tag.as_bytes()]))
}

fn error() -> Frame {
    crate::db::codec::error_response("ERROR", "42P01", "relation does not exist")
}

/// Messages as (tag, the statement name they carry, if any).
fn messages(bytes: &BytesMut) -> Vec<(char, String)> {
    let mut bytes = bytes.clone();
    let mut codec = FrameCodec::new(1 << 20);
    let mut out = Vec::new();
    while let Some(frame) = codec.decode(&mut bytes).unwrap() {
        let name = match frame.frontend() {
            Ok(crate::db::codec::Frontend::Parse { statement, .. }) => statement.to_vec(),
            Ok(crate::db::codec::Frontend::Bind { statement, .. }) => statement.to_vec(),
            Ok(crate::db::codec::Frontend::Close { name, .. }) if frame.tag == b'C' => {
                name.to_vec()
            }
            _ => Vec::new(),
        };
        out.push((frame.tag as char, String::from_utf8(name).unwrap()));
    }
    out
}

fn tags(bytes: &BytesMut) -> String {
    messages(bytes).into_iter().map(|(tag, _)| tag).collect()
}

/// One client on one server connection.
struct Setup {
    exchange: Exchange,
    client: ClientStatements,
    server: ServerStatements,
    max: usize,
}

impl Setup {
    fn new(max: usize) -> Self {
        Setup {
            exchange: Exchange::default(),
            client: ClientStatements::default(),
            server: ServerStatements::default(),
            max,
        }
    }

    /// Client messages in: (to the server, to the client).
    fn send(&mut self, frames: &[Frame]) -> (BytesMut, BytesMut) {
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        let mut sides = Sides {
            client: &mut self.client,
            server: &mut self.server,
            naming: Naming::Client(self.max),
            pinned: false,
        };
        for frame in frames {
            self.exchange
                .client_message(frame, &mut sides, &mut to_server, &mut to_client);
        }
        (to_server, to_client)
    }

    /// Server messages in: what reaches the client.
    fn receive(&mut self, frames: &[Frame]) -> BytesMut {
        let mut to_client = BytesMut::new();
        let mut sides = Sides {
            client: &mut self.client,
            server: &mut self.server,
            naming: Naming::Client(self.max),
            pinned: false,
        };
        for frame in frames {
            self.exchange
                .server_message(&frame.bytes, &mut sides, &mut to_client);
        }
        to_client
    }
}

fn gatehouse_name(sql: &str) -> String {
    let parsed = parse("x", sql);
    let content = &parsed.body()[2..];
    String::from_utf8(server_name(&super::Statement::new(content).id)).unwrap()
}

#[test]
fn a_named_parse_goes_out_under_the_shared_name() {
    let mut s = Setup::new(10);
    let (to_server, to_client) = s.send(&[parse("q1", "SELECT 1"), sync()]);
    let shared = gatehouse_name("SELECT 1");
    assert_eq!(
        messages(&to_server),
        [('P', shared.clone()), ('S', String::new())]
    );
    assert!(to_client.is_empty());
    assert_ne!(s.exchange.standing(), Standing::Idle);
    let to_client = s.receive(&[reply(b'1'), ready(b'I')]);
    assert_eq!(tags(&to_client), "1Z");
    assert_eq!(s.exchange.standing(), Standing::Idle);
    assert_eq!(s.client.len(), 1);
    assert_eq!(s.server.len(), 1);

    // Bound by the client's name, executed under the shared one.
    let (to_server, _) = s.send(&[bind("q1"), execute(), sync()]);
    assert_eq!(
        messages(&to_server),
        [('B', shared), ('E', String::new()), ('S', String::new())]
    );
}

#[test]
fn a_second_client_reuses_what_the_server_has() {
    let mut first = Setup::new(10);
    first.send(&[parse("a", "SELECT 1"), sync()]);
    first.receive(&[reply(b'1'), ready(b'I')]);
    // Another client gets the same server connection.
    let mut second = Setup::new(10);
    second.server = std::mem::take(&mut first.server);
    let (to_server, to_client) = second.send(&[parse("b", "SELECT 1"), sync()]);
    assert_eq!(tags(&to_server), "S", "no second Parse");
    assert_eq!(tags(&to_client), "1", "answered here");
    assert_eq!(second.exchange.events.reused, 1);
    let to_client = second.receive(&[ready(b'I')]);
    assert_eq!(tags(&to_client), "Z");
}

#[test]
fn a_statement_is_prepared_again_on_a_new_server_connection() {
    let mut s = Setup::new(10);
    s.send(&[parse("q1", "SELECT 1"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    // Next transaction, another server connection.
    s.server = ServerStatements::default();
    let (to_server, _) = s.send(&[bind("q1"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES");
    let to_client = s.receive(&[
        reply(b'1'),
        reply(b'2'),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(
        tags(&to_client),
        "2CZ",
        "the added ParseComplete is dropped"
    );
    assert_eq!(s.exchange.standing(), Standing::Idle);
}

#[test]
fn answers_given_here_keep_their_place() {
    let mut s = Setup::new(10);
    s.send(&[parse("q1", "SELECT 1"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    // Bind and Execute go to the server; the Close is answered here, but
    // only after the server's replies to what came before it.
    let (to_server, to_client) = s.send(&[bind("q1"), execute(), close("q1"), sync()]);
    assert_eq!(tags(&to_server), "BES");
    assert!(to_client.is_empty());
    let to_client = s.receive(&[reply(b'2'), command_complete("SELECT 1")]);
    assert_eq!(tags(&to_client), "2C3");
    let to_client = s.receive(&[ready(b'I')]);
    assert_eq!(tags(&to_client), "Z");
    assert!(s.client.is_empty());
    assert_eq!(s.server.len(), 1, "the server keeps it for other clients");
}

#[test]
fn an_error_skips_to_sync_and_undoes_what_was_skipped() {
    let mut s = Setup::new(10);
    // The first Execute fails: the server skips the Parse and the Close.
    s.send(&[parse("keep", "SELECT 1"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    let (to_server, _) = s.send(&[
        parse("", "SELECT * FROM missing"),
        bind(""),
        execute(),
        parse("q2", "SELECT 2"),
        close("keep"),
        sync(),
    ]);
    assert_eq!(tags(&to_server), "PBEPS");
    let to_client = s.receive(&[reply(b'1'), reply(b'2'), error(), ready(b'I')]);
    assert_eq!(tags(&to_client), "12EZ", "no answer for skipped messages");
    assert_eq!(s.exchange.standing(), Standing::Idle);
    // q2 was never prepared; keep was never closed.
    assert_eq!(s.client.len(), 1);
    assert_eq!(s.server.len(), 1);
    let (to_server, _) = s.send(&[bind("q2"), sync()]);
    assert_eq!(
        messages(&to_server)[0],
        ('B', "q2".to_string()),
        "an unknown name goes through for the server to refuse"
    );
}

#[test]
fn a_failed_prepare_reaches_the_client() {
    let mut s = Setup::new(10);
    s.send(&[parse("q1", "SELECT * FROM t"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    // On another server connection the table is gone.
    s.server = ServerStatements::default();
    let (to_server, _) = s.send(&[bind("q1"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES");
    let to_client = s.receive(&[error(), ready(b'I')]);
    assert_eq!(tags(&to_client), "EZ");
    assert!(s.server.is_empty(), "not prepared there");
    assert_eq!(s.exchange.standing(), Standing::Idle);
}

#[test]
fn the_least_recently_used_statement_is_evicted() {
    let mut s = Setup::new(2);
    for (name, sql) in [("a", "SELECT 1"), ("b", "SELECT 2")] {
        s.send(&[parse(name, sql), sync()]);
        s.receive(&[reply(b'1'), ready(b'I')]);
    }
    // Use a, so b is the least recently used.
    s.send(&[bind("a"), execute(), sync()]);
    s.receive(&[reply(b'2'), command_complete("SELECT 1"), ready(b'I')]);
    let (to_server, _) = s.send(&[parse("c", "SELECT 3"), sync()]);
    assert_eq!(
        messages(&to_server),
        [
            ('C', gatehouse_name("SELECT 2")),
            ('P', gatehouse_name("SELECT 3")),
            ('S', String::new())
        ]
    );
    assert_eq!(s.exchange.events.evicted, 1);
    let to_client = s.receive(&[reply(b'3'), reply(b'1'), ready(b'I')]);
    assert_eq!(tags(&to_client), "1Z", "the CloseComplete is dropped");
    assert_eq!(s.server.len(), 2);
    // The client can still use b: it is prepared again.
    let (to_server, _) = s.send(&[bind("b"), execute(), sync()]);
    assert_eq!(tags(&to_server), "CPBES");
}

#[test]
fn statements_in_use_in_a_transaction_are_not_evicted() {
    let mut s = Setup::new(1);
    s.send(&[parse("a", "SELECT 1"), bind("a")]);
    // In the same batch, before a Sync: a's portal must survive.
    let (to_server, _) = s.send(&[parse("b", "SELECT 2"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PES", "nothing closed");
    assert_eq!(s.server.len(), 2);
}

#[test]
fn deallocate_by_name_is_answered_here() {
    let mut s = Setup::new(10);
    s.send(&[parse("_pg3_0", "SELECT 1"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    let (to_server, to_client) = s.send(&[query("DEALLOCATE _pg3_0")]);
    assert!(to_server.is_empty());
    assert_eq!(tags(&to_client), "CZ");
    assert!(s.client.is_empty());
    assert_eq!(s.exchange.standing(), Standing::Idle);
    // DEALLOCATE ALL forgets the client's names; the server connection
    // keeps its statements for other clients.
    s.send(&[parse("q", "SELECT 2"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    let (to_server, to_client) = s.send(&[query("DEALLOCATE ALL")]);
    assert!(to_server.is_empty());
    assert_eq!(tags(&to_client), "CZ");
    assert!(s.client.is_empty());
    assert_eq!(s.server.len(), 2);
    // DISCARD ALL resets the server session: its statements are gone.
    let (to_server, _) = s.send(&[query("DISCARD ALL")]);
    assert_eq!(tags(&to_server), "Q");
    assert!(s.server.is_empty());
}

#[test]
fn a_duplicate_name_fails_like_postgres() {
    let mut s = Setup::new(10);
    s.send(&[parse("q1", "SELECT 1"), sync()]);
    s.receive(&[reply(b'1'), ready(b'I')]);
    let (to_server, to_client) = s.send(&[parse("q1", "SELECT 2"), bind("q1"), execute(), sync()]);
    assert_eq!(tags(&to_server), "S", "skipped up to the Sync");
    let errors = messages(&to_client);
    assert_eq!(errors.len(), 1);
    let to_client = s.receive(&[ready(b'I')]);
    assert_eq!(tags(&to_client), "Z");
    assert_eq!(s.exchange.standing(), Standing::Idle);
}

#[test]
fn notices_pass_at_any_time() {
    let mut s = Setup::new(10);
    s.send(&[parse("q1", "SELECT 1"), sync()]);
    let notice = frame(b'N', b"SNOTICE\0\0");
    let to_client = s.receive(&[notice, reply(b'1'), ready(b'I')]);
    assert_eq!(tags(&to_client), "N1Z");
}

#[test]
fn server_naming_passes_everything_through() {
    let mut exchange = Exchange::default();
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut sides = Sides {
        client: &mut client,
        server: &mut server,
        naming: Naming::Server,
        pinned: false,
    };
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    for frame in [parse("q1", "SELECT 1"), bind("q1"), execute(), sync()] {
        exchange.client_message(&frame, &mut sides, &mut to_server, &mut to_client);
    }
    assert_eq!(
        messages(&to_server),
        [
            ('P', "q1".to_string()),
            ('B', "q1".to_string()),
            ('E', String::new()),
            ('S', String::new())
        ]
    );
    assert!(client.is_empty());
}

#[test]
fn an_unsynced_batch_is_not_idle() {
    let mut s = Setup::new(10);
    // Parse, Bind, Execute and Flush, with the Sync still to come.
    s.send(&[parse("", "SELECT 1"), bind(""), execute(), frame(b'H', b"")]);
    s.receive(&[reply(b'1'), reply(b'2'), command_complete("SELECT 1")]);
    assert_eq!(
        s.exchange.standing(),
        Standing::Busy,
        "inside an implicit transaction"
    );
    s.send(&[sync()]);
    s.receive(&[ready(b'I')]);
    assert_eq!(s.exchange.standing(), Standing::Idle);
}

#[test]
fn a_client_without_a_server_prepares_alone() {
    let mut client = ClientStatements::default();
    let answers = client
        .answer_alone(&[parse("P0_4", "BEGIN;"), sync()])
        .unwrap();
    assert_eq!(tags(&answers), "1Z");
    assert_eq!(client.len(), 1);
    // Anything else needs a server; so does a name already taken.
    assert!(
        client
            .answer_alone(&[parse("P0_4", "BEGIN;"), sync()])
            .is_none()
    );
    assert!(client.answer_alone(&[bind("P0_4"), sync()]).is_none());
    assert!(
        client
            .answer_alone(&[parse("", "SELECT 1"), sync()])
            .is_none()
    );
    // First use on a server connection prepares it there.
    let mut s = Setup::new(10);
    s.client = client;
    let (to_server, _) = s.send(&[bind("P0_4"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES");
}

mod random {
    use proptest::prelude::*;

    use super::*;

    /// A client message built from a kind and a statement name.
    fn client_frame(kind: u8, name: u8) -> Frame {
        let name = ["", "a", "b", "c"][usize::from(name % 4)];
        match kind % 8 {
            0 => parse(name, "SELECT 1"),
            1 => parse(name, "SELECT 2"),
            2 => bind(name),
            3 => close(name),
            4 => execute(),
            5 => sync(),
            6 => query(&format!("DEALLOCATE {name}")),
            _ => frame(b'H', b""),
        }
    }

    proptest! {
        /// Any mix of client messages and server replies, sane or not,
        /// never panics, and ReadyForQuery for every sync point brings the
        /// exchange back to idle.
        #[test]
        fn never_panics_and_settles(
            batches in proptest::collection::vec(
                (
                    proptest::collection::vec((any::<u8>(), any::<u8>()), 0..8),
                    proptest::collection::vec(
                        prop::sample::select(vec![b'1', b'2', b'3', b'C', b'n', b'T', b'E', b'N']),
                        0..8,
                    ),
                ),
                0..6,
            ),
            max in 1usize..4,
        ) {
            let mut s = Setup::new(max);
            let mut sync_points = 0;
            for (sent, replies) in batches {
                let frames: Vec<Frame> = sent.iter().map(|(k, n)| client_frame(*k, *n)).collect();
                sync_points += frames.iter().filter(|f| f.tag == b'S' || f.tag == b'Q').count();
                s.send(&frames);
                let replies: Vec<Frame> = replies
                    .iter()
                    .map(|tag| if *tag == b'E' { error() } else { reply(*tag) })
                    .collect();
                s.receive(&replies);
            }
            // Close any open batch, then answer every sync point.
            s.send(&[sync()]);
            sync_points += 1;
            let readies: Vec<Frame> = (0..sync_points).map(|_| ready(b'I')).collect();
            s.receive(&readies);
            prop_assert_eq!(s.exchange.standing(), Standing::Idle, "{:?}", s.exchange);
        }
    }
}
