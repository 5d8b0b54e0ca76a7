//! The `db` side's pieces against a real PostgreSQL: what the server sends
//! during SSL negotiation, SCRAM authentication, queries and errors is framed
//! and read correctly, the codec's own errors look like the server's, and our
//! SCRAM server accepts the verifiers PostgreSQL itself stores.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[path = "support/postgres.rs"]
mod postgres;
#[path = "support/db.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use gatehouse::config::db::Node;
use gatehouse::db::auth::{ScramExchange, ScramVerifier};
use gatehouse::db::codec::{Frame, FrameCodec, error_response};
use gatehouse::db::server::{Login, ServerConn, ServerError};
use postgres::{APP_DB, APP_PASSWORD, APP_USER, TestPostgres};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use support::{
    GatehouseDb, MD5_PASSWORD, MD5_USER, Wire, first_value, free_port, http_get, metric,
    output_text, peak_rss_bytes, sqlstate_of, wait_for,
};
use tokio_util::codec::Decoder;

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
    assert_eq!(
        gatehouse::db::error::DbError::from(error).sqlstate(),
        "54000"
    );
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
    assert!(conn.params().iter().any(|(k, _)| k == "server_version"));
    assert_ne!(conn.backend_key(), (0, 0));
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

/// A second role, for md5 clients.
fn md5_role(pg: &TestPostgres) {
    pg.superuser_sql(&format!(
        "DO $$ BEGIN CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    ));
    pg.superuser_sql(&format!("GRANT ALL ON DATABASE {APP_DB} TO {MD5_USER}"));
}

#[test]
fn psql_through_the_socket_with_scram_and_md5() {
    let pg = TestPostgres::shared();
    md5_role(pg);
    let db = GatehouseDb::start(pg, "max_connections = 4", "transaction");
    assert_eq!(
        db.psql(APP_USER, APP_PASSWORD, "SELECT 1 + 1, current_user")
            .unwrap(),
        "2|app"
    );
    assert_eq!(
        db.psql(MD5_USER, MD5_PASSWORD, "SELECT current_user")
            .unwrap(),
        MD5_USER
    );

    let wrong = db.psql(APP_USER, "guess", "SELECT 1").unwrap_err();
    assert!(
        wrong.contains("password authentication failed for user \"app\""),
        "{wrong}"
    );
    let unknown = db.psql("nobody", "guess", "SELECT 1").unwrap_err();
    assert!(
        unknown.contains("password authentication failed for user \"nobody\""),
        "{unknown}"
    );

    // The statement timeout from the config, and one from the client's options.
    assert_eq!(
        db.psql(APP_USER, APP_PASSWORD, "SHOW statement_timeout")
            .unwrap(),
        "30s"
    );
    let out = std::process::Command::new("psql")
        .arg("-h")
        .arg(db.socket_dir.path())
        .args([
            "-p",
            &db.port.to_string(),
            "-U",
            APP_USER,
            "-d",
            APP_DB,
            "-X",
            "-A",
            "-t",
        ])
        .args([
            "-c",
            "SELECT current_setting('statement_timeout'), current_setting('application_name')",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGOPTIONS", "-c statement_timeout=5000")
        .env("PGAPPNAME", "reports")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5s|reports");
}

#[test]
fn copy_in_and_out_and_a_large_result() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    db.psql(
        APP_USER,
        APP_PASSWORD,
        "DROP TABLE IF EXISTS copied; CREATE TABLE copied (n int, s text)",
    )
    .unwrap();
    let data = tempfile::NamedTempFile::new().unwrap();
    let rows: String = (0..1000).map(|i| format!("{i}\trow {i}\n")).collect();
    std::fs::write(data.path(), rows).unwrap();
    db.psql(
        APP_USER,
        APP_PASSWORD,
        &format!("\\copy copied FROM '{}'", data.path().display()),
    )
    .unwrap();
    assert_eq!(
        db.psql(
            APP_USER,
            APP_PASSWORD,
            "SELECT count(*), sum(n) FROM copied"
        )
        .unwrap(),
        "1000|499500"
    );
    let out = tempfile::NamedTempFile::new().unwrap();
    db.psql(
        APP_USER,
        APP_PASSWORD,
        &format!(
            "\\copy (SELECT * FROM copied ORDER BY n) TO '{}'",
            out.path().display()
        ),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(out.path()).unwrap().lines().count(),
        1000
    );
}

/// A 50 MB result read by a client slower than the server streams through
/// with the router's memory bounded: it reads from the server only as fast
/// as the client takes the rows.
#[test]
fn a_50_mb_result_streams_in_bounded_memory() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    let mut wire = db.wire();
    assert_eq!(wire.value("SELECT 1"), "1");
    let before = peak_rss_bytes(db.child.id());
    let mut buf = BytesMut::new();
    frontend::query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 50000)",
        &mut buf,
    )
    .unwrap();
    wire.send(&buf);
    // Before this client reads a row, PostgreSQL fills what the router lets
    // through and then waits to write.
    assert!(wait_for(Duration::from_secs(10), || {
        pg.superuser_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite' \
             AND query LIKE 'SELECT repeat(''x'', 1000)%'",
        ) == "1"
    }));
    let (mut rows, mut bytes) = (0u64, 0u64);
    loop {
        let frame = wire.frame();
        if frame.tag == b'D' {
            rows += 1;
            bytes += frame.bytes.len() as u64;
        }
        if frame.ready_status().is_some() {
            break;
        }
    }
    assert_eq!(rows, 50_000);
    assert!(bytes > 50_000_000, "{bytes} bytes");
    let grown = peak_rss_bytes(db.child.id()).saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "the router's peak memory grew by {} MiB for a 50 MB result",
        grown >> 20
    );
    // psql reads the same result through the socket.
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-c"])
        .arg("SELECT repeat('x', 1000) FROM generate_series(1, 50000)")
        .env("PGHOST", db.socket_dir.path())
        .env("PGPORT", db.port.to_string())
        .env("PGUSER", APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGDATABASE", APP_DB)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 50_000 * 1001);
}

#[test]
fn nothing_a_client_set_reaches_the_next_client() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 1", "transaction");
    let first = db
        .psql(
            APP_USER,
            APP_PASSWORD,
            "SET search_path TO leaked; LISTEN leaked; SELECT pg_advisory_lock(42); \
             CREATE TEMP TABLE leaked_temp (x int); SELECT pg_backend_pid()",
        )
        .unwrap();
    let first_pid = first.lines().last().unwrap().to_string();
    let second = db
        .psql(
            APP_USER,
            APP_PASSWORD,
            "SELECT pg_backend_pid(), current_setting('search_path'), \
             (SELECT count(*) FROM pg_listening_channels()), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), \
             to_regclass('pg_temp.leaked_temp') IS NULL",
        )
        .unwrap();
    assert_eq!(
        second,
        format!("{first_pid}|\"$user\", public|0|0|t"),
        "same server, clean session"
    );
}

#[test]
fn a_client_vanishing_mid_transaction_is_rolled_back() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 1", "transaction");
    let mut wire = db.wire();
    let pid = wire.value("SELECT pg_backend_pid()");
    assert_eq!(
        wire.query("BEGIN").last().unwrap().ready_status(),
        Some(b'T')
    );
    wire.query("CREATE TABLE vanished (x int)");
    drop(wire); // no Terminate, no COMMIT
    let after = db
        .psql(
            APP_USER,
            APP_PASSWORD,
            "SELECT pg_backend_pid(), to_regclass('public.vanished') IS NULL",
        )
        .unwrap();
    assert_eq!(
        after,
        format!("{pid}|t"),
        "the same server, rolled back and reused"
    );
}

#[test]
fn a_full_pool_makes_clients_wait_then_fail_with_53300() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(
        pg,
        "max_connections = 1\ncheckout_timeout = \"1s\"",
        "session",
    );
    let holder = db.wire();
    let started = std::time::Instant::now();
    let refused = db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap_err();
    assert!(
        refused.contains("no server connection free in pool app/app"),
        "{refused}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(holder);
    assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap(), "1");
}

/// A pool at its size, with clients waiting for it, keeps its server
/// connections through the pool's once-a-second upkeep: a connection handed
/// to a waiting client that has not run yet is still the pool's, not one too
/// many to be closed and opened again.
#[test]
fn a_busy_pool_keeps_its_connections() {
    let pg = TestPostgres::shared();
    let (db, admin) = GatehouseDb::start_with_admin(pg, "max_connections = 2", "");
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "SELECT 1;\n").unwrap();
    let script = script.path().to_str().unwrap();
    // Eight clients on two connections for four upkeeps.
    let text = db.pgbench(
        APP_USER,
        APP_PASSWORD,
        &[],
        &["-n", "-c", "8", "-j", "2", "-T", "4", "-f", script],
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    let opened = metric(
        &admin,
        &format!("gatehouse_db_server_connects_total{{pool=\"{APP_DB}/{APP_USER}\"}}"),
    );
    assert_eq!(opened, Some(2.0), "server connections opened: {text}");
}

#[test]
fn a_cancel_reaches_only_its_own_query() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    let mut sleeper = db.wire();
    let (pid, key) = sleeper.backend_key;
    let mut bystander = db.wire();
    let mut buf = BytesMut::new();
    frontend::query("SELECT pg_sleep(20) /* cancel test */", &mut buf).unwrap();
    sleeper.send(&buf);
    bystander.send(&buf);
    assert!(wait_for(Duration::from_secs(10), || {
        pg.superuser_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND query = 'SELECT pg_sleep(20) /* cancel test */'",
        ) == "2"
    }));
    let socket = db.socket_dir.path().join(format!(".s.PGSQL.{}", db.port));
    let mut cancel = UnixStream::connect(socket).unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    cancel.write_all(&packet).unwrap();
    let started = std::time::Instant::now();
    let frames = sleeper.until_ready();
    let error = frames
        .iter()
        .find(|f| f.tag == b'E')
        .expect("the query was cancelled");
    assert!(error.error_fields().contains(&(b'C', "57014")));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The other client's query was not touched: cancel it ourselves to end the test.
    bystander
        .stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        bystander.stream.read(&mut probe).is_err(),
        "the bystander got an answer early"
    );
    let (pid, key) = bystander.backend_key;
    let mut cancel =
        UnixStream::connect(db.socket_dir.path().join(format!(".s.PGSQL.{}", db.port))).unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    cancel.write_all(&packet).unwrap();
}

/// Session pooling passes named statements through under the client's
/// own names.
#[test]
fn pgbench_prepared_in_session_mode() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 4", "session");
    let pgbench = |args: &[&str]| db.pgbench(APP_USER, APP_PASSWORD, &[], args);
    pgbench(&["-i", "-s", "1", "-q"]);
    let text = pgbench(&["-c", "4", "-j", "2", "-t", "50", "-M", "prepared"]);
    assert!(text.contains("number of failed transactions: 0"), "{text}");
}

/// The example Django app on PostgreSQL through `gatehouse db`, with only the
/// socket directory as HOST: `migrate`, the seed command, and the CRUD
/// endpoints under Gunicorn behind the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_through_the_socket() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 4", "transaction");
    let host = db.socket_dir.path().display().to_string();
    let port = db.port.to_string();
    let gunicorn = harness::Gunicorn::start_with_env(
        2,
        &[
            ("DB_NAME", APP_DB),
            ("DB_USER", APP_USER),
            ("DB_PASSWORD", APP_PASSWORD),
            ("DB_HOST", &host),
            ("DB_PORT", &port),
        ],
    );
    let gateway = harness::Gatehouse::start(&format!(
        "[upstream.health_check]\nenabled = false\n\n[[upstream.servers]]\nurl = \"{}\"\n",
        gunicorn.upstream_url()
    ));
    let url = |p: &str| gateway.url(p);
    let (status, _, body) = harness::curl(&[&url("/v1/stories/")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(harness::json(body.as_bytes())["count"], 30);
    let (status, _, body) = harness::curl(&[
        "-X",
        "POST",
        "--data",
        "{\"title\": \"Pooled\", \"author_id\": 2}",
        &url("/v1/stories/"),
    ]);
    assert_eq!(status, 201, "{body}");
    let id = harness::json(body.as_bytes())["id"].as_i64().unwrap();
    let detail = url(&format!("/v1/stories/{id}/"));
    let (status, _, _) = harness::curl(&[
        "-X",
        "PATCH",
        "--data",
        "{\"body\": \"via the pool\"}",
        &detail,
    ]);
    assert_eq!(status, 200);
    // The row is really in PostgreSQL.
    let stored = postgres::psql(
        &pg.socket_dir,
        pg.port,
        "postgres",
        postgres::SUPERUSER_PASSWORD,
        APP_DB,
        &format!("SELECT title || ' ' || body FROM stories_story WHERE id = {id}"),
    );
    assert_eq!(stored, "Pooled via the pool");
    let (status, _, _) = harness::curl(&["-X", "DELETE", &detail]);
    assert_eq!(status, 204);
    let (status, _, body) = harness::curl(&[&url("/v1/users/2/")]);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn transaction_pooling_shares_a_server_between_transactions() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(
        pg,
        "max_connections = 1\ncheckout_timeout = \"5s\"",
        "transaction",
    );
    let mut a = db.wire();
    let mut b = db.wire();
    // Both logged in on a pool of one: an idle client holds nothing.
    let a_pid = a.value("SELECT pg_backend_pid()");
    let b_pid = b.value("SELECT pg_backend_pid()");
    assert_eq!(a_pid, b_pid, "one server serves both");
    // Inside a transaction the server is a's until it ends...
    assert_eq!(a.query("BEGIN").last().unwrap().ready_status(), Some(b'T'));
    let mut buf = BytesMut::new();
    frontend::query("SELECT 'b ran'", &mut buf).unwrap();
    b.send(&buf);
    b.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        b.stream.read(&mut probe).is_err(),
        "b waits while a is in a transaction"
    );
    b.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(a.query("COMMIT").last().unwrap().ready_status(), Some(b'I'));
    // ...then b's query runs.
    let frames = b.until_ready();
    assert!(frames.iter().any(|f| f.tag == b'D'));
}

#[test]
fn session_state_pins_the_client_and_leaks_to_nobody() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    let mut a = db.wire();
    a.query("SET search_path TO pinned_path");
    let mut b = db.wire();
    for _ in 0..3 {
        assert_eq!(b.value("SHOW search_path"), "\"$user\", public");
        assert_eq!(a.value("SHOW search_path"), "pinned_path");
    }
    // set_config with is_local = false is session state too (pgbouncer #396).
    let mut c = db.wire();
    drop(a);
    c.query("SELECT set_config('search_path', 'via_set_config', false)");
    for _ in 0..3 {
        assert_eq!(b.value("SHOW search_path"), "\"$user\", public");
    }
    assert_eq!(c.value("SHOW search_path"), "via_set_config");
}

/// `session_state = "refuse"`: a statement that would set session state
/// fails with 0A000 as a server error would, inside a transaction too, and
/// the client keeps pooling.
#[test]
fn session_state_can_be_refused() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(
        pg,
        "max_connections = 1\ncheckout_timeout = \"3s\"\nsession_state = \"refuse\"",
        "transaction",
    );
    let sqlstate = sqlstate_of;
    let mut a = db.wire();
    let frames = a.query("SET search_path TO refused_path");
    assert_eq!(sqlstate(&frames).as_deref(), Some("0A000"));
    assert_eq!(frames.last().unwrap().ready_status(), Some(b'I'));
    assert_eq!(a.value("SHOW search_path"), "\"$user\", public");
    // Not pinned: another client shares the only server connection.
    let mut b = db.wire();
    assert_eq!(b.value("SELECT 'b'"), "b");
    // Inside a transaction the transaction fails, as for any error.
    a.query("BEGIN");
    let frames = a.query("SELECT pg_advisory_lock(7)");
    assert_eq!(sqlstate(&frames).as_deref(), Some("0A000"));
    assert_eq!(frames.last().unwrap().ready_status(), Some(b'E'));
    assert_eq!(
        a.query("ROLLBACK").last().unwrap().ready_status(),
        Some(b'I')
    );
    assert_eq!(b.value("SELECT 'b again'"), "b again");
    // SET LOCAL ends with its transaction, so it is allowed.
    a.query("BEGIN");
    a.query("SET LOCAL statement_timeout = 1234");
    assert_eq!(a.value("SHOW statement_timeout"), "1234ms");
    a.query("COMMIT");
}

/// Two clients give the same name to different statements on one server
/// connection: each runs its own, and a third that prepared nothing finds
/// neither.
#[test]
fn prepared_statement_names_belong_to_their_client() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 1", "transaction");
    let mut a = db.wire();
    let mut b = db.wire();
    let mut c = db.wire();
    assert_eq!(
        a.value("SELECT pg_backend_pid()"),
        b.value("SELECT pg_backend_pid()")
    );
    assert_eq!(a.prepare("q", "SELECT 'a'").last().unwrap().tag, b'Z');
    assert_eq!(b.prepare("q", "SELECT 'b'").last().unwrap().tag, b'Z');
    for _ in 0..3 {
        assert_eq!(first_value(&a.execute_prepared("q")).as_deref(), Some("a"));
        assert_eq!(first_value(&b.execute_prepared("q")).as_deref(), Some("b"));
    }
    // 26000: invalid_sql_statement_name, as PostgreSQL says it.
    let frames = c.execute_prepared("q");
    assert_eq!(sqlstate_of(&frames).as_deref(), Some("26000"));
    assert_eq!(frames.last().unwrap().ready_status(), Some(b'I'));
    // Closed for a, still there for b.
    let mut buf = BytesMut::new();
    frontend::close(b'S', "q", &mut buf).unwrap();
    frontend::sync(&mut buf);
    a.send(&buf);
    let frames = a.until_ready();
    assert!(frames.iter().any(|f| f.tag == b'3'), "CloseComplete");
    assert_eq!(
        sqlstate_of(&a.execute_prepared("q")).as_deref(),
        Some("26000")
    );
    assert_eq!(first_value(&b.execute_prepared("q")).as_deref(), Some("b"));
    // A name used twice is an error, as on PostgreSQL.
    let frames = b.prepare("q", "SELECT 'again'");
    assert_eq!(sqlstate_of(&frames).as_deref(), Some("42P05"));
    assert_eq!(first_value(&b.execute_prepared("q")).as_deref(), Some("b"));
}

/// More clients than server connections: they take turns per transaction.
#[test]
fn more_clients_than_connections_in_transaction_mode() {
    let pg = TestPostgres::shared();
    md5_role(pg);
    let superuser = |sql: &str| {
        postgres::psql(
            &pg.socket_dir,
            pg.port,
            "postgres",
            postgres::SUPERUSER_PASSWORD,
            APP_DB,
            sql,
        )
    };
    superuser(&format!(
        "CREATE SCHEMA IF NOT EXISTS md5bench AUTHORIZATION {MD5_USER}"
    ));
    let (db, admin) =
        GatehouseDb::start_with_admin(pg, "max_connections = 2\ncheckout_timeout = \"20s\"", "");
    let options = [("PGOPTIONS", "-c search_path=md5bench")];
    let pgbench = |args: &[&str]| db.pgbench(MD5_USER, MD5_PASSWORD, &options, args);
    pgbench(&["-i", "-s", "1", "-q"]);
    // -M prepared names its statements: each client's are prepared again on
    // whichever server connection it gets, instead of pinning it.
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(&["-c", "8", "-j", "2", "-t", "40", "-M", mode]);
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    // Other tests log in as this role too, with psql; pgbench's are ours.
    let connections = superuser(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{MD5_USER}' \
         AND application_name = 'pgbench'"
    ));
    let connections: u32 = connections.parse().unwrap();
    assert!(
        (1..=2).contains(&connections),
        "{connections} server connections for 8 clients"
    );
    let pool = format!("pool=\"{APP_DB}/{MD5_USER}\"");
    assert_eq!(
        metric(
            &admin,
            &format!("gatehouse_db_pinned_clients_total{{{pool}}}")
        ),
        Some(0.0),
        "no client was pinned"
    );
    // pgbench -M prepared names 7 statements per client: 8 clients on 2
    // connections prepare each statement once per connection, not per client.
    let prepared = metric(
        &admin,
        &format!("gatehouse_db_prepared_statements_total{{event=\"prepared\",{pool}}}"),
    );
    assert!(
        prepared.is_some_and(|n| (7.0..=14.0).contains(&n)),
        "{prepared:?}"
    );
}

/// Bytes that are not the protocol get an ErrorResponse with a SQLSTATE and
/// a closed connection, never a hang or a crash; the service goes on.
#[test]
fn bad_input_gets_an_error_and_a_closed_connection() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    let socket = db.socket_dir.path().join(format!(".s.PGSQL.{}", db.port));
    let exchange = |bytes: &[u8]| {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .expect("closed, not left hanging");
        let mut buf = BytesMut::from(&reply[..]);
        FrameCodec::new(1 << 20).decode(&mut buf).ok().flatten()
    };
    let sqlstate = |reply: Option<Frame>| {
        let frame = reply.expect("an ErrorResponse");
        assert_eq!(frame.tag, b'E');
        frame
            .error_fields()
            .iter()
            .find(|(c, _)| *c == b'C')
            .map(|(_, v)| v.to_string())
            .unwrap()
    };
    // An unknown startup code.
    assert_eq!(
        sqlstate(exchange(&[0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78])),
        "08P01"
    );
    // A startup packet claiming to be enormous.
    assert_eq!(sqlstate(exchange(&[0x7f, 0, 0, 0, 0, 3, 0, 0])), "54000");
    // A startup packet shorter than its own header.
    assert_eq!(sqlstate(exchange(&[0, 0, 0, 2, 0, 0, 0, 0])), "08P01");
    // A truncated startup packet: the client stops sending, we stop waiting.
    assert!(exchange(&[0, 0, 0, 40, 0, 3, 0, 0, b'u']).is_none());

    // After login: a message with an impossible length.
    let mut wire = db.wire();
    wire.send(b"Q\x00\x00\x00\x02");
    let error = wire.frame();
    assert_eq!(error.tag, b'E');
    assert!(error.error_fields().contains(&(b'C', "08P01")));
    // The service is unharmed.
    assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap(), "1");
}

/// `trust` limited to peer uids: the socket's SO_PEERCRED decides.
#[test]
fn trust_by_peer_uid() {
    let pg = TestPostgres::shared();
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    for (uids, allowed) in [(uid.clone(), true), ("4242424".to_string(), false)] {
        let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
        let config = db.socket_dir.path().join("db.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            &format!("name = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\""),
            &format!(
                "name = \"{APP_USER}\"\nauth = \"trust\"\ntrusted_uids = [{uids}]\n\
                 server_password = \"{APP_PASSWORD}\""
            ),
        );
        drop(db);
        let db = GatehouseDb::start_with_text(&text);
        let result = db.psql(APP_USER, "not-asked-for", "SELECT current_user");
        assert_eq!(result.is_ok(), allowed, "uids [{uids}]: {result:?}");
    }
}

#[test]
fn admin_reports_pools_and_the_primary() {
    let pg = TestPostgres::shared();
    let (db, admin) = GatehouseDb::start_with_admin(pg, "max_connections = 3", "");
    for _ in 0..3 {
        assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap(), "1");
    }
    assert_eq!(http_get(&admin, "/health").0, 200);
    assert_eq!(http_get(&admin, "/ready").0, 200);
    let (status, body) = http_get(&admin, "/metrics/json");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pool = &json["database"]["connection_pool"][0];
    assert_eq!(pool["pool"], "app/app");
    assert_eq!(pool["max"], 3);
    assert_eq!(pool["active"], 0);
    assert!(pool["idle"].as_u64().unwrap() >= 1, "{pool}");
    assert_eq!(json["database"]["nodes"][0]["role"], "primary");
    assert_eq!(json["database"]["nodes"][0]["healthy"], true);
    let (_, metrics) = http_get(&admin, "/metrics");
    let queries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse_db_queries_total{pool=\"app/app\"} "))
        .unwrap();
    assert!(queries.parse::<f64>().unwrap() >= 3.0, "{metrics}");
    for direction in ["to_server", "to_client"] {
        let bytes = metric(
            &admin,
            &format!("gatehouse_db_bytes_total{{direction=\"{direction}\",pool=\"app/app\"}}"),
        );
        assert!(bytes.is_some_and(|b| b > 0.0), "{direction}: {bytes:?}");
    }
    assert!(db.psql(APP_USER, "wrong", "SELECT 1").is_err());
    let sample = |name: &str| metric(&admin, name);
    assert_eq!(
        sample("gatehouse_db_logins_total{result=\"ok\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample("gatehouse_db_logins_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(sample("gatehouse_db_clients"), Some(0.0));
}

/// The primary crashes: `/ready` says so, clients get 08006 instead of a
/// hang, and both recover by themselves when it is back.
#[test]
fn primary_down_and_back() {
    let pg = TestPostgres::start();
    let (db, admin) =
        GatehouseDb::start_with_admin(&pg, "max_connections = 2\nconnect_timeout = \"2s\"", "");
    assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap(), "1");

    pg.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(&admin, "/ready").0 != 503 {
        assert!(std::time::Instant::now() < deadline, "/ready never noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = std::time::Instant::now();
    let refused = db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the client waited {:?}",
        started.elapsed()
    );
    assert!(!refused.is_empty());

    pg.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while http_get(&admin, "/ready").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "/ready did not recover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The pooled connections died with the server; new ones are opened.
    for _ in 0..3 {
        assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 2").unwrap(), "2");
    }
}

/// The pool size from `/metrics/json`: (active, idle) of the only pool.
fn pool_counts(admin: &str) -> (u64, u64) {
    let (_, body) = http_get(admin, "/metrics/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pool = &json["database"]["connection_pool"][0];
    (
        pool["active"].as_u64().unwrap_or(0),
        pool["idle"].as_u64().unwrap_or(0),
    )
}

#[test]
fn pools_keep_min_connections_and_close_idle_ones() {
    let pg = TestPostgres::shared();
    let (warm, admin) = GatehouseDb::start_with_admin(
        pg,
        "max_connections = 4\nmin_connections = 2\nidle_timeout = \"1s\"",
        "",
    );
    warm.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap();
    assert!(
        wait_for(Duration::from_secs(6), || pool_counts(&admin) == (0, 2)),
        "warmed to 2"
    );
    drop(warm);

    let (cold, admin) = GatehouseDb::start_with_admin(
        pg,
        "max_connections = 4\nmin_connections = 0\nidle_timeout = \"1s\"",
        "",
    );
    cold.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap();
    assert_eq!(pool_counts(&admin), (0, 1));
    assert!(
        wait_for(Duration::from_secs(6), || pool_counts(&admin) == (0, 0)),
        "idle closed"
    );
}

/// Pools are warm before the first client arrives.
#[test]
fn pools_are_warmed_before_the_first_client() {
    let pg = TestPostgres::shared();
    let (_db, admin) =
        GatehouseDb::start_with_admin(pg, "max_connections = 4\nmin_connections = 3", "");
    assert!(
        wait_for(Duration::from_secs(5), || pool_counts(&admin) == (0, 3)),
        "{:?}",
        pool_counts(&admin)
    );
}

/// SIGHUP applies a new pool size, a removed user and a new statement
/// timeout without dropping a client in the middle of a transaction; an
/// invalid file keeps the running configuration.
#[test]
fn sighup_reloads_pools_and_users_without_dropping_clients() {
    let pg = TestPostgres::shared();
    md5_role(pg);
    let (db, admin) =
        GatehouseDb::start_with_admin(pg, "max_connections = 1\ncheckout_timeout = \"1s\"", "");
    let path = db.socket_dir.path().join("db.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let pool_max = || {
        let (_, body) = http_get(&admin, "/metrics/json");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["database"]["connection_pool"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pool"] == format!("{APP_DB}/{APP_USER}"))
            .map(|p| p["max"].as_u64().unwrap())
    };
    assert_eq!(pool_max(), Some(1));
    let hangup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &db.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };

    // A client connected before the reload, idle; another inside a
    // transaction holds the only connection.
    let mut idle = db.wire();
    let mut a = db.wire();
    assert_eq!(a.query("BEGIN").last().unwrap().ready_status(), Some(b'T'));
    a.query("CREATE TEMP TABLE during_reload (n int) ON COMMIT DROP");
    assert!(
        db.psql(APP_USER, APP_PASSWORD, "SELECT 1").is_err(),
        "pool full"
    );

    // Bigger pool, and the md5 user removed.
    let without_md5 = original.replace(
        &format!(
            "[[users]]\nname = \"{MD5_USER}\"\nauth = \"md5\"\npassword = \"{MD5_PASSWORD}\"\n"
        ),
        "",
    );
    assert_ne!(without_md5, original);
    std::fs::write(
        &path,
        without_md5.replace(
            "max_connections = 1",
            "max_connections = 3\nstatement_timeout = \"7s\"",
        ),
    )
    .unwrap();
    hangup();
    assert!(wait_for(Duration::from_secs(5), || pool_max() == Some(3)));
    assert_eq!(
        metric(&admin, "gatehouse_db_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    // Room for another client now, while a's transaction goes on.
    assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 2").unwrap(), "2");
    assert!(
        db.psql(MD5_USER, MD5_PASSWORD, "SELECT 1").is_err(),
        "a removed user cannot log in"
    );
    a.query("INSERT INTO during_reload VALUES (1)");
    assert_eq!(a.value("SELECT count(*) FROM during_reload"), "1");
    assert_eq!(a.query("COMMIT").last().unwrap().ready_status(), Some(b'I'));
    // The next transaction of a client connected before the reload gets the
    // new statement timeout (a, pinned by its temporary table, keeps its
    // session as it was).
    assert_eq!(idle.value("SHOW statement_timeout"), "7s");
    assert_eq!(a.value("SHOW statement_timeout"), "30s");

    // A broken file changes nothing.
    std::fs::write(
        &path,
        original.replace("max_connections = 1", "max_connections = -4"),
    )
    .unwrap();
    hangup();
    assert!(wait_for(Duration::from_secs(5), || {
        metric(
            &admin,
            "gatehouse_db_config_reloads_total{result=\"error\"}",
        ) == Some(1.0)
    }));
    assert_eq!(pool_max(), Some(3));
    assert_eq!(db.psql(APP_USER, APP_PASSWORD, "SELECT 3").unwrap(), "3");
}

#[test]
fn connections_are_replaced_after_max_lifetime() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(
        pg,
        "max_connections = 1\nmax_lifetime = \"1s\"",
        "transaction",
    );
    let first = db
        .psql(APP_USER, APP_PASSWORD, "SELECT pg_backend_pid()")
        .unwrap();
    // The pool's upkeep closes the connection once it is a second old.
    assert!(wait_for(Duration::from_secs(10), || {
        pg.superuser_sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {first}"
        )) == "0"
    }));
    let second = db
        .psql(APP_USER, APP_PASSWORD, "SELECT pg_backend_pid()")
        .unwrap();
    assert_ne!(first, second, "an expired connection is not lent again");
}

#[test]
fn a_client_that_never_logs_in_is_cut_at_the_login_timeout() {
    let pg = TestPostgres::shared();
    let (db, _) =
        GatehouseDb::start_with_admin(pg, "max_connections = 1", "login_timeout = \"1s\"");
    let socket = db.socket_dir.path().join(format!(".s.PGSQL.{}", db.port));
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut buf = BytesMut::from(&reply[..]);
    let error = FrameCodec::new(1 << 20).decode(&mut buf).unwrap().unwrap();
    assert!(error.error_fields().contains(&(b'C', "08P01")));
}

/// psycopg 3 (client- and server-side binding, executemany, COPY, a cancel
/// that stops only its own query) and psycopg2, from
/// `tests/clients/psycopg_clients.py`.
#[test]
fn psycopg_clients() {
    let pg = TestPostgres::shared();
    let (db, admin) = GatehouseDb::start_with_admin(pg, "max_connections = 4", "");
    let out = std::process::Command::new(venv_python())
        .arg(harness::repo_root().join("tests/clients/psycopg_clients.py"))
        .env("PGHOST", db.socket_dir.path())
        .env("PGPORT", db.port.to_string())
        .env("PGUSER", APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGDATABASE", APP_DB)
        .output()
        .expect("the test virtualenv's python (scripts/test.sh creates it)");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("\nok ").count() + usize::from(text.starts_with("ok ")),
        5,
        "{text}"
    );
    // Server-side binding pooled: nobody pinned, statements prepared.
    let pool = format!("pool=\"{APP_DB}/{APP_USER}\"");
    assert_eq!(
        metric(
            &admin,
            &format!("gatehouse_db_pinned_clients_total{{{pool}}}")
        ),
        Some(0.0)
    );
    let prepared = metric(
        &admin,
        &format!("gatehouse_db_prepared_statements_total{{event=\"prepared\",{pool}}}"),
    );
    // Six statements, each prepared on at least one server connection.
    assert!(prepared.is_some_and(|n| n >= 6.0), "{prepared:?}");
}

/// The test virtualenv's python (`scripts/test.sh` makes it).
fn venv_python() -> std::path::PathBuf {
    std::env::var_os("GATEHOUSE_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| harness::repo_root().join(".venv"))
        .join("bin/python")
}

/// One Gunicorn of the example app on `database` through `db`, keeping its
/// Django connections across requests, with `env` for its time zone.
fn django_on(db: &GatehouseDb, database: &str, env: &[(&str, &str)]) -> harness::Gunicorn {
    let host = db.socket_dir.path().display().to_string();
    let port = db.port.to_string();
    let mut all = vec![
        ("DB_NAME", database),
        ("DB_USER", APP_USER),
        ("DB_PASSWORD", APP_PASSWORD),
        ("DB_HOST", host.as_str()),
        ("DB_PORT", port.as_str()),
        ("DB_CONN_MAX_AGE", "600"),
    ];
    all.extend_from_slice(env);
    harness::Gunicorn::start_with_env(2, &all)
}

/// The database session as one request of the example app saw it:
/// (TimeZone, server backend pid).
fn django_session(gunicorn: &harness::Gunicorn) -> (String, i64) {
    let socket = gunicorn.upstream_url();
    let socket = socket.strip_prefix("unix:").unwrap();
    let (status, _, body) =
        harness::curl(&["--unix-socket", socket, "http://localhost/v1/db/session/"]);
    assert_eq!(status, 200, "{body}");
    let session = harness::json(body.as_bytes());
    (
        session["timezone"].as_str().unwrap().to_string(),
        session["backend_pid"].as_i64().unwrap(),
    )
}

/// Django sets TimeZone with `set_config` when the server's differs from
/// its own (`UTC` with `USE_TZ`, `TIME_ZONE` without), and not when they
/// match. Through one server connection shared in transaction pooling,
/// every client still sees its own zone, the server's default included,
/// and no client is pinned: the server reports TimeZone and gatehouse
/// carries it with the client.
#[test]
fn django_time_zones_follow_each_client_without_pinning() {
    let pg = TestPostgres::shared();
    // Databases of its own: the app's seed data goes there, not into `app`.
    pg.superuser_sql(&format!("CREATE DATABASE app_plain OWNER {APP_USER}"));
    pg.superuser_sql(&format!("CREATE DATABASE app_zoned OWNER {APP_USER}"));
    pg.superuser_sql("ALTER DATABASE app_zoned SET TimeZone = 'America/Sao_Paulo'");
    let (db, admin) = GatehouseDb::start_with_databases(
        pg,
        "max_connections = 1\ncheckout_timeout = \"20s\"",
        &["app_plain", "app_zoned"],
    );
    let server_zone = pg.superuser_sql("SHOW TimeZone");
    assert_ne!(
        server_zone, "UTC",
        "the cluster's zone differs from Django's 'UTC'"
    );
    // (database, the zone of a Django without USE_TZ): on `app_zoned` it is
    // the zone sessions start in, so that Django sets nothing.
    for (database, local_zone) in [
        ("app_plain", "Asia/Tokyo"),
        ("app_zoned", "America/Sao_Paulo"),
    ] {
        let utc = django_on(&db, database, &[("DJANGO_USE_TZ", "1")]);
        let local = django_on(
            &db,
            database,
            &[("DJANGO_USE_TZ", "0"), ("DJANGO_TIME_ZONE", local_zone)],
        );
        let mut pids = std::collections::HashSet::new();
        for _ in 0..6 {
            let (zone, pid) = django_session(&utc);
            assert_eq!(zone, "UTC", "{database}: USE_TZ = True");
            pids.insert(pid);
            let (zone, pid) = django_session(&local);
            assert_eq!(zone, local_zone, "{database}: USE_TZ = False");
            pids.insert(pid);
        }
        assert_eq!(
            pids.len(),
            1,
            "{database}: one server connection served both"
        );
    }
    // A client that sets nothing gets the server's zone on that connection.
    assert_eq!(db.wire_to("app_plain").value("SHOW TimeZone"), server_zone);
    let pinned = |pool: &str| {
        metric(
            &admin,
            &format!("gatehouse_db_pinned_clients_total{{pool=\"{pool}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(pinned("app_plain/app"), 0.0);
    assert_eq!(pinned("app_zoned/app"), 0.0);
    // The counter is the right one: LISTEN does pin.
    let mut listener = db.wire();
    listener.query("LISTEN zones");
    assert_eq!(pinned("app/app"), 1.0);
}

/// What a server session holds beyond a transaction, read on the session
/// itself: settings set in it to another value than they start with (`SET
/// TRANSACTION` outside a transaction marks `transaction_isolation` as set
/// in the session without changing it), its advisory locks, prepared statements,
/// cursors, channels it listens on, and its temporary relations.
const SESSION_STATE: &str = "SELECT \
    coalesce((SELECT string_agg(name || '=' || setting, ',' ORDER BY name) \
              FROM pg_settings WHERE source = 'session' AND setting IS DISTINCT FROM reset_val), ''), \
    (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')::text, \
    coalesce((SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements), ''), \
    coalesce((SELECT string_agg(name, ',' ORDER BY name) FROM pg_cursors), ''), \
    coalesce((SELECT string_agg(c, ',' ORDER BY c) FROM pg_listening_channels() AS c), ''), \
    coalesce((SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
              WHERE relnamespace = pg_my_temp_schema()), '')";

/// The objects the corpus uses.
const CORPUS_SETUP: &str = "DROP SCHEMA IF EXISTS corpus CASCADE; CREATE SCHEMA corpus; \
    CREATE TABLE corpus.t (id int PRIMARY KEY, v text); \
    INSERT INTO corpus.t VALUES (1, 'one'), (2, 'two'); \
    CREATE SEQUENCE corpus.s; \
    CREATE FUNCTION corpus.sets_path() RETURNS void LANGUAGE plpgsql AS \
      $$BEGIN PERFORM set_config('search_path', 'leaked', false); END$$; \
    CREATE FUNCTION corpus.takes_lock() RETURNS void LANGUAGE plpgsql AS \
      $$BEGIN PERFORM pg_advisory_lock(77); END$$; \
    CREATE FUNCTION corpus.listens() RETURNS void LANGUAGE plpgsql AS \
      $$BEGIN LISTEN from_function; END$$; \
    CREATE FUNCTION corpus.makes_temp() RETURNS void LANGUAGE plpgsql AS \
      $$BEGIN CREATE TEMP TABLE from_function (x int); END$$; \
    CREATE FUNCTION corpus.sql_sets_path() RETURNS text LANGUAGE sql AS \
      $$SELECT set_config('search_path', 'leaked', false)$$; \
    CREATE FUNCTION corpus.pure(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1'; \
    CREATE FUNCTION corpus.with_set_clause() RETURNS text LANGUAGE sql \
      SET search_path = corpus AS $$SELECT current_setting('search_path')$$; \
    CREATE PROCEDURE corpus.proc_sets_path() LANGUAGE plpgsql AS \
      $$BEGIN SET search_path TO leaked; END$$; \
    CREATE PROCEDURE corpus.proc_pure() LANGUAGE sql AS 'SELECT 1'";

/// The differential test of the classifier: each corpus statement runs on
/// a direct connection to PostgreSQL, and what it left on the session is
/// read from the server. Whatever changed must make the classifier pin the
/// client, unless all that changed are settings the server reports, which
/// follow the client to its next connection.
#[test]
fn the_classifier_catches_every_session_state_change() {
    use gatehouse::db::classify::effect;
    use gatehouse::db::settings::tracked;
    let pg = TestPostgres::shared();
    let corpus = include_str!("fixtures/session_state_corpus.sql");
    let statements: Vec<&str> = corpus
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        .collect();
    assert!(statements.len() >= 200, "{} statements", statements.len());
    let mut direct = Wire::login(pg);
    let setup = direct.query(CORPUS_SETUP);
    assert_eq!(sqlstate_of(&setup), None, "corpus setup");
    let reported: Vec<String> = direct
        .reported
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    let follows = |name: &str| tracked(name) && reported.iter().any(|r| r == name);
    let (mut changed, mut pinned, mut carried, mut cautious) = (0, 0, 0, 0);
    for sql in &statements {
        let before = direct.row(SESSION_STATE);
        let frames = direct.query(sql);
        if frames.last().unwrap().ready_status() != Some(b'I') {
            direct.query("COMMIT");
        }
        let after = direct.row(SESSION_STATE);
        let found = effect(sql.as_bytes(), true);
        let pins = found.pins(follows);
        if before != after {
            changed += 1;
            if pins {
                pinned += 1;
            } else {
                // Only settings changed, each one the server reports.
                assert_eq!(
                    before[1..],
                    after[1..],
                    "not pinned, yet it left state: {sql}"
                );
                let settings = |row: &[String]| -> Vec<(String, String)> {
                    row[0]
                        .split(',')
                        .filter_map(|s| s.split_once('='))
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                        .collect()
                };
                let (old, new) = (settings(&before), settings(&after));
                for (name, _) in new.iter().filter(|s| !old.contains(s)) {
                    assert!(follows(name), "{name} changed and is not carried: {sql}");
                }
                carried += 1;
            }
        } else if pins {
            cautious += 1;
        }
        let reset = direct.query("DISCARD ALL");
        assert_eq!(sqlstate_of(&reset), None, "reset after {sql}");
        assert_eq!(
            direct.row(SESSION_STATE),
            ["", "0", "", "", "", ""],
            "after {sql}"
        );
    }
    direct.query("DROP SCHEMA corpus CASCADE");
    eprintln!(
        "{} statements: {changed} changed session state ({pinned} pinned, {carried} carried as \
         reported settings); {cautious} pinned that changed nothing",
        statements.len()
    );
    assert!(
        changed >= 100,
        "the corpus changes state in {changed} statements only"
    );
    assert!(
        carried >= 10,
        "reported settings carried in {carried} statements only"
    );
}

/// Django's test runner through gatehouse: it connects to the `postgres`
/// database to create `test_app`, migrates and tests it through pooled
/// connections, and drops it at the end. The drop needs nobody connected to
/// `test_app`, so the pool's idle connections to it are closed first.
/// Databases other than `app` are allowed by the `"*"` entry.
#[test]
fn djangos_test_runner_creates_and_drops_its_database() {
    let pg = TestPostgres::shared();
    pg.superuser_sql(&format!("ALTER ROLE {APP_USER} CREATEDB"));
    let (db, admin) =
        GatehouseDb::start_with_databases(pg, "max_connections = 4\nmin_connections = 2", &["*"]);
    let run = || {
        std::process::Command::new(venv_python())
            .current_dir(harness::repo_root().join("examples/django"))
            .args(["manage.py", "test", "stories", "--noinput", "-v", "2"])
            .env("DB_NAME", APP_DB)
            .env("DB_USER", APP_USER)
            .env("DB_PASSWORD", APP_PASSWORD)
            .env("DB_HOST", db.socket_dir.path())
            .env("DB_PORT", db.port.to_string())
            .output()
            .expect("the test virtualenv's python (scripts/test.sh creates it)")
    };
    // Twice: the first run's database is gone, so the second creates it anew.
    for round in 0..2 {
        let out = run();
        let text = output_text(&out);
        assert!(out.status.success(), "round {round}: {text}");
        assert!(text.contains("Ran 3 tests"), "round {round}: {text}");
        assert!(text.contains("Destroying test database"), "{text}");
    }
    let exists = pg.superuser_sql("SELECT count(*) FROM pg_database WHERE datname = 'test_app'");
    assert_eq!(exists, "0");
    // Pools of databases without an entry of their own go once unused.
    let pools = || -> Vec<String> {
        let json: serde_json::Value =
            serde_json::from_str(&http_get(&admin, "/metrics/json").1).unwrap();
        json["database"]["connection_pool"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pool"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(5), || !pools()
            .contains(&"test_app/app".to_string())),
        "{:?}",
        pools()
    );
    assert!(pools().contains(&"app/app".to_string()), "{:?}", pools());
}

/// A primary given as a URI with a password, that cannot be reached: the
/// pool fails to warm every second and a client fails to log in, and the
/// password appears in no log line and no metric.
#[test]
fn a_primary_password_reaches_no_log_and_no_metric() {
    const SECRET: &str = "Sup3r-Secret-Pw";
    let socket_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "[server]\nsocket_dir = \"{}\"\nport = {port}\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [pool]\nmin_connections = 2\nconnect_timeout = \"1s\"\n\n[log]\nlevel = \"debug\"\n",
        socket_dir.path().display()
    );
    let config_path = socket_dir.path().join("db.toml");
    std::fs::write(&config_path, config).unwrap();
    let db = GatehouseDb::launch_with_args(
        socket_dir,
        port,
        &[
            "--config".into(),
            config_path.display().to_string(),
            "--primary".into(),
            format!("postgresql://{APP_USER}:{SECRET}@127.0.0.1:1/{APP_DB}"),
        ],
    );
    // A client logging in with that password fails: nothing listens there.
    let out = db.psql(APP_USER, SECRET, "SELECT 1").unwrap_err();
    assert!(out.contains("could not be reached"), "{out}");
    assert!(
        wait_for(Duration::from_secs(10), || db.log().contains("node down")),
        "{}",
        db.log()
    );
    let log = db.log();
    assert!(
        log.contains("127.0.0.1:1"),
        "the failure names the node: {log}"
    );
    assert!(!log.contains(SECRET), "{log}");
    for path in ["/metrics", "/metrics/json"] {
        let (status, body) = http_get(&admin, path);
        assert_eq!(status, 200);
        assert!(!body.contains(SECRET), "{path}: {body}");
    }
}

/// `gatehouse db` with no `--config` runs on the shipped defaults: user
/// `muejam` trusted for uid 33 (Gunicorn's www-data) on a socket given to
/// group www-data. A client of another uid is refused with 28P01 only, and
/// the log says why. A socket directory that cannot be made is an error
/// that names `--socket-dir`.
#[test]
fn embedded_defaults_serve_www_data_on_the_socket() {
    let pg = TestPostgres::shared();
    let gatehouse = env!("CARGO_BIN_EXE_gatehouse");
    let out = std::process::Command::new(gatehouse)
        .args(["db", "--socket-dir", "/proc/no-such-dir/gatehouse"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("--socket-dir"),
        "{}",
        output_text(&out)
    );

    pg.superuser_sql("CREATE ROLE muejam LOGIN PASSWORD 'muejam-pw'");
    pg.superuser_sql("CREATE DATABASE muejam OWNER muejam");
    let socket_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        socket_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let port = free_port();
    let primary = format!(
        "postgresql://muejam:muejam-pw@/muejam?host={}&port={}",
        pg.socket_dir.display(),
        pg.port
    );
    let mut args: Vec<String> = [
        "--socket-dir",
        &socket_dir.path().display().to_string(),
        "--port",
        &port.to_string(),
        "--admin-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--primary",
        &primary,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !postgres::is_root() {
        // Only root can give the socket to www-data.
        let out = std::process::Command::new(gatehouse)
            .arg("db")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            output_text(&out).contains("socket_group"),
            "{}",
            output_text(&out)
        );
        args.extend(["--socket-group".to_string(), String::new()]);
    }
    let db = GatehouseDb::launch_with_args(socket_dir, port, &args);
    let socket = db.socket_dir.path().join(format!(".s.PGSQL.{port}"));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660
    );
    if !postgres::is_root() {
        return;
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        33,
        "group www-data"
    );
    let psql_as = |user: Option<&str>| {
        let mut command = match user {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--", "psql"]);
                c
            }
            None => std::process::Command::new("psql"),
        };
        command
            .arg("-h")
            .arg(db.socket_dir.path())
            .args(["-p", &port.to_string(), "-U", "muejam", "-d", "muejam"])
            .args(["-X", "-w", "-A", "-t", "-c", "SELECT current_user"])
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = psql_as(Some("www-data"));
    assert_eq!(output_text(&out).trim(), "muejam", "{}", output_text(&out));
    let out = psql_as(None);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("password authentication failed for user \"muejam\""),
        "{}",
        output_text(&out)
    );
    assert!(
        wait_for(Duration::from_secs(5), || db
            .log()
            .contains("peer uid not in trusted_uids")),
        "{}",
        db.log()
    );
}

/// `server.max_client_connections`: one client too many is refused with
/// 53300, as PostgreSQL refuses past `max_connections`; a place freed is
/// taken again.
#[test]
fn clients_beyond_max_client_connections_are_refused() {
    let pg = TestPostgres::shared();
    let (db, _) =
        GatehouseDb::start_with_admin(pg, "max_connections = 2", "max_client_connections = 2");
    let first = db.wire();
    let _second = db.wire();
    let out = db.psql(APP_USER, APP_PASSWORD, "SELECT 1").unwrap_err();
    assert!(out.contains("sorry, too many clients already"), "{out}");
    drop(first);
    assert!(
        wait_for(Duration::from_secs(5), || db
            .psql(APP_USER, APP_PASSWORD, "SELECT 1")
            .is_ok()),
        "a freed place is taken"
    );
}

/// SIGTERM drains: the socket goes at once, an idle client is told 57P01,
/// a client inside a transaction finishes it and is told at its end, and
/// the process exits. A transaction that outlasts `drain_timeout` is cut.
#[test]
fn sigterm_lets_transactions_finish_then_closes() {
    let pg = TestPostgres::shared();
    let (text, _) = GatehouseDb::config(
        pg,
        "max_connections = 4",
        "transaction",
        "drain_timeout = \"20s\"",
    );
    for cut in [false, true] {
        let text = if cut {
            text.replace("drain_timeout = \"20s\"", "drain_timeout = \"1s\"")
        } else {
            text.clone()
        };
        let mut db = GatehouseDb::start_with_text(&text);
        let mut idle = db.wire();
        let mut busy = db.wire();
        assert_eq!(
            busy.query("BEGIN").last().unwrap().ready_status(),
            Some(b'T')
        );
        assert_eq!(busy.value("SELECT 'inside'"), "inside");
        let terminated = std::process::Command::new("kill")
            .args(["-TERM", &db.child.id().to_string()])
            .status()
            .unwrap();
        assert!(terminated.success());
        // The idle client is told, unasked.
        let told = idle.frame();
        assert_eq!(sqlstate_of(&[told]).as_deref(), Some("57P01"));
        let socket = db.socket_dir.path().join(format!(".s.PGSQL.{}", db.port));
        assert!(
            wait_for(Duration::from_secs(5), || UnixStream::connect(&socket)
                .is_err()),
            "no new clients"
        );
        let started = std::time::Instant::now();
        if cut {
            // The transaction is cut at the drain timeout.
            let mut rest = [0u8; 64];
            busy.stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            assert!(matches!(busy.stream.read(&mut rest), Ok(0) | Err(_)));
            assert!(started.elapsed() < Duration::from_secs(8));
        } else {
            assert_eq!(busy.value("SELECT 'still inside'"), "still inside");
            assert_eq!(
                busy.query("COMMIT").last().unwrap().ready_status(),
                Some(b'I')
            );
            let told = busy.frame();
            assert_eq!(sqlstate_of(&[told]).as_deref(), Some("57P01"));
        }
        let exited = wait_for(Duration::from_secs(10), || {
            db.child.try_wait().unwrap().is_some()
        });
        assert!(exited, "gatehouse db exits after the drain: {}", db.log());
        assert!(db.child.try_wait().unwrap().unwrap().success());
    }
}

/// `transactions_total` counts every transaction, explicit or not, in
/// both pool modes; `query_duration_seconds` times each Query; a slow
/// statement is logged with its literals replaced.
#[test]
fn transactions_and_query_durations_are_counted_in_every_mode() {
    let pg = TestPostgres::shared();
    for mode in ["transaction", "session"] {
        let (text, admin) = GatehouseDb::config(
            pg,
            "max_connections = 2\nslow_query_threshold = \"400ms\"",
            mode,
            "",
        );
        let db = GatehouseDb::start_with_text(&text);
        let mut client = db.wire();
        for sql in ["SELECT 1", "SELECT 2", "BEGIN", "SELECT 3", "COMMIT"] {
            client.query(sql);
        }
        client.query("SELECT pg_sleep(0.6), 'a-secret-literal'");
        let pool = "pool=\"app/app\"";
        let sample = |name: &str| metric(&admin, &format!("{name}{{{pool}}}"));
        assert_eq!(
            sample("gatehouse_db_transactions_total"),
            Some(4.0),
            "{mode}: two alone, one explicit, the sleep"
        );
        assert_eq!(
            sample("gatehouse_db_query_duration_seconds_count"),
            Some(6.0),
            "{mode}"
        );
        let over = metric(
            &admin,
            &format!("gatehouse_db_query_duration_seconds_bucket{{{pool},le=\"0.5\"}}"),
        );
        assert_eq!(over, Some(5.0), "{mode}: five fast, one slow");
        assert!(
            wait_for(Duration::from_secs(5), || db.log().contains("slow query")),
            "{}",
            db.log()
        );
        let log = db.log();
        let line = log.lines().find(|l| l.contains("slow query")).unwrap();
        assert!(line.contains("pg_sleep($1), $2"), "{line}");
        assert!(line.contains("app/app"), "{line}");
        assert!(!log.contains("a-secret-literal"), "{log}");
        assert_eq!(log.matches("slow query").count(), 1, "{log}");
    }
}

/// A client's own NOTIFY reaches it with the process id it was told at
/// login, so psycopg's `n.pid == conn.info.backend_pid` works; another
/// client's keeps the sender's.
#[test]
fn a_clients_own_notifications_carry_its_process_id() {
    let pg = TestPostgres::shared();
    let (db, _) = GatehouseDb::start_with_admin(pg, "max_connections = 4", "");
    let script = r#"
import psycopg
with psycopg.connect("", autocommit=True) as listener, psycopg.connect("", autocommit=True) as other:
    listener.execute("LISTEN jobs")
    listener.execute("NOTIFY jobs, 'mine'")
    other.execute("NOTIFY jobs, 'theirs'")
    listener.execute("SELECT 1")
    seen = {}
    for n in listener.notifies(timeout=5, stop_after=2):
        seen[n.payload] = n.pid
    assert seen["mine"] == listener.info.backend_pid, (seen, listener.info.backend_pid)
    assert seen["theirs"] != listener.info.backend_pid, seen
    print("ok", seen)
"#;
    let out = std::process::Command::new(venv_python())
        .args(["-c", script])
        .env("PGHOST", db.socket_dir.path())
        .env("PGPORT", db.port.to_string())
        .env("PGUSER", APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGDATABASE", APP_DB)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).starts_with("ok "),
        "{}",
        output_text(&out)
    );
}

/// CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: utime and stime are fields
    // 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Out of file descriptors, accepting fails (EMFILE): gatehouse waits
/// between attempts instead of spinning, says so, and serves again once
/// clients leave.
#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let pg = TestPostgres::shared();
    let (text, _) = GatehouseDb::config(pg, "max_connections = 2", "transaction", "");
    let db = GatehouseDb::start_limited(&text, Some(40));
    let port = db.port;
    let socket = db.socket_dir.path().join(format!(".s.PGSQL.{port}"));
    // More connections than descriptors; none of them logs in.
    let held: Vec<UnixStream> = (0..60)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    assert!(
        wait_for(Duration::from_secs(5), || db
            .log()
            .contains("accepting a client failed")),
        "{}",
        db.log()
    );
    let before = cpu_seconds(db.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(db.child.id()) - before;
    assert!(used < 0.5, "{used} CPU seconds in 2 s: spinning on accept");
    drop(held);
    assert!(
        wait_for(Duration::from_secs(10), || db
            .psql(APP_USER, APP_PASSWORD, "SELECT 'back'")
            .is_ok_and(|out| out == "back")),
        "serves again: {}",
        db.log()
    );
}

/// A listed database that does not exist is tried once when the pool is
/// warmed, not every 30 seconds; a client asking for it gets the server's
/// 3D000.
#[test]
fn a_missing_database_is_not_warmed_again_and_again() {
    let pg = TestPostgres::shared();
    let (db, admin) = GatehouseDb::start_with_databases(pg, "min_connections = 2", &["not_there"]);
    let errors = || {
        metric(
            &admin,
            "gatehouse_db_server_errors_total{pool=\"not_there/app\"}",
        )
    };
    assert!(
        wait_for(Duration::from_secs(5), || errors() == Some(1.0)),
        "{:?}",
        errors()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(errors(), Some(1.0), "{}", db.log());
    let warned = db
        .log()
        .lines()
        .filter(|l| l.contains("the database does not exist") && l.ends_with("pool=not_there/app"))
        .count();
    assert_eq!(warned, 1, "{}", db.log());
    let refused = db
        .psql_to("not_there", APP_USER, APP_PASSWORD, "SELECT 1")
        .unwrap_err();
    assert!(
        refused.contains("database \"not_there\" does not exist"),
        "{refused}"
    );
}

/// The serving threads as configured: `threads = 1` is one event loop (no
/// worker threads), `threads = 2` two workers; `cpu_scheduling = "batch"`
/// puts them under SCHED_BATCH. Clients are served either way.
#[test]
fn threads_and_cpu_scheduling_are_applied() {
    let pg = TestPostgres::shared();
    let threads_named = |pid: u32, name: &str| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).unwrap().trim() == name
            })
            .count()
    };
    // SCHED_BATCH is policy 3 in /proc/<pid>/task/<tid>/sched.
    let batch_threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter(|t| {
                let sched = t.as_ref().unwrap().path().join("sched");
                std::fs::read_to_string(sched).unwrap().lines().any(|l| {
                    l.starts_with("policy") && l.split(':').nth(1).map(str::trim) == Some("3")
                })
            })
            .count()
    };
    for (lines, workers, batch) in [
        ("threads = 1", 0, false),
        ("threads = 2\ncpu_scheduling = \"batch\"", 2, true),
    ] {
        let (db, _) = GatehouseDb::start_with_admin(pg, "max_connections = 2", lines);
        assert_eq!(db.wire().value("SELECT 'served'"), "served", "{lines}");
        let pid = db.child.id();
        assert_eq!(threads_named(pid, "tokio-rt-worker"), workers, "{lines}");
        if batch {
            assert!(batch_threads(pid) >= workers, "{lines}");
        } else {
            assert_eq!(batch_threads(pid), 0, "{lines}");
        }
    }
}

/// A second `gatehouse db` on a socket that is being served fails with
/// "address in use" and leaves the first one serving.
#[test]
fn a_socket_in_use_is_not_taken_over() {
    let pg = TestPostgres::shared();
    let db = GatehouseDb::start(pg, "max_connections = 2", "transaction");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["db", "--config"])
        .arg(db.socket_dir.path().join("db.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("in use"),
        "{}",
        output_text(&out)
    );
    assert_eq!(db.wire().value("SELECT 'still mine'"), "still mine");
}

/// With `"*"`, clients choose database names: a pool made for a name that
/// does not exist goes once unused, and its metrics with it, so that such
/// names cannot grow the metrics without bound.
#[test]
fn pools_of_unlisted_databases_leave_no_metrics_behind() {
    let pg = TestPostgres::shared();
    pg.superuser_sql(&format!("CREATE DATABASE app_passing OWNER {APP_USER}"));
    let (db, admin) =
        GatehouseDb::start_with_databases(pg, "max_connections = 2\nidle_timeout = \"1s\"", &["*"]);
    let series = |name: &str| http_get(&admin, "/metrics").1.contains(name);
    // A pool in use keeps its series.
    let mut client = db.wire_to("app_passing");
    assert_eq!(client.value("SELECT current_database()"), "app_passing");
    assert!(series("app_passing/app"));
    for i in 0..5 {
        let name = format!("made_up_{i}");
        let refused = db
            .psql_to(&name, APP_USER, APP_PASSWORD, "SELECT 1")
            .unwrap_err();
        assert!(refused.contains("does not exist"), "{refused}");
    }
    drop(client);
    // Its idle connection closes after idle_timeout, then the pool goes.
    assert!(
        wait_for(Duration::from_secs(10), || !series("app_passing/app")
            && !series("made_up_")),
        "{}",
        http_get(&admin, "/metrics").1
    );
    assert_eq!(db.wire().value("SELECT 'listed'"), "listed");
    assert!(series("pool=\"app/app\""), "listed pools stay");
}

/// A TCP relay to the test server whose connections can be cut without a
/// sign: once `poison` is called, each connection open at that moment is
/// closed the next time gatehouse sends on it, and only then.
struct Relay {
    port: u16,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    poisoned_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    fn start(server_port: u16) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let opened = Arc::new(AtomicU64::new(0));
        let poisoned_below = Arc::new(AtomicU64::new(0));
        let (count, poison) = (Arc::clone(&opened), Arc::clone(&poisoned_below));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let id = count.fetch_add(1, Ordering::SeqCst);
                let mut server = std::net::TcpStream::connect(("127.0.0.1", server_port)).unwrap();
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                });
                let poison = Arc::clone(&poison);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if id < poison.load(Ordering::SeqCst)
                            || server.write_all(&buf[..n]).is_err()
                        {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay {
            port,
            opened,
            poisoned_below,
        }
    }

    /// Cut every connection open now, at its next message from gatehouse.
    fn poison(&self) {
        let open = self.opened.load(std::sync::atomic::Ordering::SeqCst);
        self.poisoned_below
            .store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A pooled server connection can break without a sign while it sits idle
/// (its server went away between two transactions). The next client's
/// settings are applied on it before anything reaches that client: the
/// failure is found there, and the client is served on another connection
/// instead of getting a FATAL.
#[test]
fn a_pooled_connection_found_broken_at_setup_is_replaced() {
    let pg = TestPostgres::shared();
    let relay = Relay::start(pg.port);
    let (config, _) = GatehouseDb::config(pg, "", "transaction", "");
    let direct = format!("host = \"{}\"\nport = {}", pg.socket_dir.display(), pg.port);
    assert!(config.contains(&direct));
    let config = config.replace(
        &direct,
        &format!("host = \"127.0.0.1\"\nport = {}", relay.port),
    );
    let db = GatehouseDb::start_with_text(&config);
    let ask = |app: &str| {
        let out = std::process::Command::new("psql")
            .arg("-h")
            .arg(db.socket_dir.path())
            .args(["-p", &db.port.to_string(), "-U", APP_USER, "-d", APP_DB])
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT current_setting('application_name')",
            ])
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGAPPNAME", app)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(ask("first").0, "first");
    let before = relay.opened.load(std::sync::atomic::Ordering::SeqCst);
    relay.poison();
    // The idle connection has a different application_name to set.
    let (answer, error) = ask("second");
    assert_eq!(answer, "second", "{error}\n{}", db.log());
    assert!(
        relay.opened.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the answer did not come on a new connection"
    );
}
