//! The `db` side's pieces against a real PostgreSQL: what the server sends
//! during SSL negotiation, SCRAM authentication, queries and errors is framed
//! and read correctly, the codec's own errors look like the server's, and our
//! SCRAM server accepts the verifiers PostgreSQL itself stores.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[path = "support/postgres.rs"]
mod postgres;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use gatehouse::config::db::Node;
use gatehouse::db::auth::{ScramExchange, ScramVerifier};
use gatehouse::db::codec::{Frame, FrameCodec, error_response};
use gatehouse::db::server::{Login, ServerConn, ServerError};
use postgres::{APP_DB, APP_PASSWORD, APP_USER, TestPostgres};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio_util::codec::Decoder;

/// A raw connection to the test server's Unix socket, read through the codec.
struct Wire {
    stream: UnixStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Wire {
    fn connect(pg: &TestPostgres) -> Wire {
        let path = pg.socket_dir.join(format!(".s.PGSQL.{}", pg.port));
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Wire {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::new(1 << 20),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames up to and including the next ReadyForQuery.
    fn until_ready(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.frame();
            let done = frame.ready_status().is_some();
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    fn startup(&mut self, user: &str) {
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", user), ("database", APP_DB)], &mut buf).unwrap();
        self.send(&buf);
    }

    /// Startup and SCRAM-SHA-256 as `app`, up to the first ReadyForQuery.
    fn login(pg: &TestPostgres) -> Wire {
        let mut wire = Wire::connect(pg);
        wire.startup(APP_USER);
        let sasl = wire.frame();
        assert_eq!(sasl.tag, b'R');
        let mut scram = ScramSha256::new(APP_PASSWORD.as_bytes(), ChannelBinding::unsupported());
        let mut buf = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut buf).unwrap();
        wire.send(&buf);
        let continue_ = wire.frame();
        scram.update(&continue_.body()[4..]).unwrap();
        let mut buf = BytesMut::new();
        frontend::sasl_response(scram.message(), &mut buf).unwrap();
        wire.send(&buf);
        let final_ = wire.frame();
        scram.finish(&final_.body()[4..]).unwrap();
        let frames = wire.until_ready();
        assert_eq!(frames.last().unwrap().ready_status(), Some(b'I'));
        wire
    }

    fn query(&mut self, sql: &str) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        self.send(&buf);
        self.until_ready()
    }
}

#[test]
fn ssl_request_and_scram_request_are_read() {
    let pg = TestPostgres::shared();
    let mut wire = Wire::connect(pg);
    // SSLRequest: a server without TLS answers one byte, 'N'.
    wire.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    let mut answer = [0u8; 1];
    wire.stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    wire.startup(APP_USER);
    let request = wire.frame();
    assert_eq!(request.tag, b'R');
    // AuthenticationSASL (10) listing SCRAM-SHA-256.
    assert_eq!(&request.body()[..4], &10i32.to_be_bytes());
    assert!(request.body()[4..].starts_with(b"SCRAM-SHA-256\0"));
}

#[test]
fn query_results_and_transaction_status_are_read() {
    let pg = TestPostgres::shared();
    let mut wire = Wire::login(pg);
    let frames = wire.query("SELECT 1 AS one, 'two' AS two");
    let tags: Vec<u8> = frames.iter().map(|f| f.tag).collect();
    assert_eq!(tags, b"TDCZ");
    assert_eq!(
        wire.query("BEGIN").last().unwrap().ready_status(),
        Some(b'T')
    );
    let failed = wire.query("SELECT * FROM no_such_table");
    let error = failed.iter().find(|f| f.tag == b'E').unwrap();
    assert!(error.error_fields().contains(&(b'C', "42P01")));
    assert_eq!(failed.last().unwrap().ready_status(), Some(b'E'));
    assert_eq!(
        wire.query("ROLLBACK").last().unwrap().ready_status(),
        Some(b'I')
    );

    // A large result arrives as many frames, each whole.
    let rows = wire.query("SELECT repeat('x', 1000) FROM generate_series(1, 500)");
    assert_eq!(rows.iter().filter(|f| f.tag == b'D').count(), 500);
}

#[test]
fn the_codecs_errors_look_like_the_servers() {
    let pg = TestPostgres::shared();
    let mut wire = Wire::login(pg);
    let failed = wire.query("SELEC 1");
    let server = failed.iter().find(|f| f.tag == b'E').unwrap();
    let fields = server.error_fields();
    let state = fields.iter().find(|(c, _)| *c == b'C').unwrap().1;
    assert_eq!(state, "42601");
    let ours = error_response("ERROR", state, "syntax error at or near \"SELEC\"");
    let our_fields = ours.error_fields();
    for code in [b'S', b'V', b'C', b'M'] {
        let server_value = fields.iter().find(|(c, _)| *c == code).map(|(_, v)| *v);
        let our_value = our_fields.iter().find(|(c, _)| *c == code).map(|(_, v)| *v);
        assert_eq!(our_value, server_value, "field {}", code as char);
    }
}

#[test]
fn a_reply_in_the_old_protocol_is_refused_not_waited_on() {
    let pg = TestPostgres::shared();
    let mut wire = Wire::connect(pg);
    // Protocol 2.0: the server answers in the 2.0 format, `E` and a bare
    // string with no length. Read as 3.0, the "length" is text, and the codec
    // refuses it at once instead of waiting for a gigabyte.
    wire.send(&[0, 0, 0, 8, 0, 2, 0, 0]);
    let mut reply = Vec::new();
    let _ = wire.stream.read_to_end(&mut reply);
    let mut buf = BytesMut::from(&reply[..]);
    let error = FrameCodec::new(1 << 20).decode(&mut buf).unwrap_err();
    assert_eq!(error.sqlstate(), "54000");
    assert!(String::from_utf8_lossy(&reply).contains("unsupported frontend protocol"));
}

/// A verifier copied from `pg_authid` works as the secret of our SCRAM server,
/// as a PgBouncer `auth_file` entry does.
#[test]
fn scram_verifiers_stored_by_postgres_authenticate_clients() {
    let pg = TestPostgres::shared();
    let stored = pg.superuser_sql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'"
    ));
    let verifier = ScramVerifier::parse(&stored).expect("a SCRAM-SHA-256 verifier");
    for (password, accepted) in [(APP_PASSWORD, true), ("not-the-password", false)] {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (server, server_first) = ScramExchange::start(&verifier, client.message()).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let outcome = server.finish(client.message());
        assert_eq!(outcome.is_ok(), accepted, "{password}");
        if let Ok(server_final) = outcome {
            client.finish(server_final.as_bytes()).unwrap();
        }
    }
}

fn primary(pg: &TestPostgres) -> Node {
    Node::Socket {
        dir: pg.socket_dir.clone(),
        port: pg.port,
    }
}

#[tokio::test]
async fn server_login_with_scram_and_a_query() {
    let pg = TestPostgres::shared();
    let params = [("application_name".to_string(), "gatehouse-test".to_string())];
    let login = Login {
        user: APP_USER,
        database: APP_DB,
        password: Some(APP_PASSWORD),
        params: &params,
    };
    let mut conn = ServerConn::open(&primary(pg), &login, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(conn.params.iter().any(|(k, _)| k == "server_version"));
    assert_ne!(conn.backend_key, (0, 0));
    let mut buf = BytesMut::new();
    frontend::query("SELECT current_setting('application_name')", &mut buf).unwrap();
    conn.send(&buf).await.unwrap();
    let mut value = None;
    loop {
        let frame = conn.read_frame().await.unwrap();
        if frame.tag == b'D' {
            value = Some(String::from_utf8_lossy(&frame.body()[6..]).to_string());
        }
        if frame.ready_status().is_some() {
            break;
        }
    }
    assert_eq!(value.as_deref(), Some("gatehouse-test"));
}

#[tokio::test]
async fn server_login_failures_carry_the_servers_sqlstate() {
    let pg = TestPostgres::shared();
    let wrong = Login {
        user: APP_USER,
        database: APP_DB,
        password: Some("wrong"),
        params: &[],
    };
    match ServerConn::open(&primary(pg), &wrong, Duration::from_secs(5)).await {
        Err(ServerError::Refused { sqlstate, .. }) => assert_eq!(sqlstate, "28P01"),
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => panic!("logged in with a wrong password"),
    }
    let none = Login {
        password: None,
        ..wrong
    };
    assert!(matches!(
        ServerConn::open(&primary(pg), &none, Duration::from_secs(5)).await,
        Err(ServerError::NoPassword(_))
    ));
    let nowhere = Node::Tcp {
        host: "127.0.0.1".into(),
        port: 1,
    };
    assert!(matches!(
        ServerConn::open(&nowhere, &none, Duration::from_secs(5)).await,
        Err(ServerError::Connect { .. })
    ));
}
