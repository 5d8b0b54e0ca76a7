//! `gatehouse db` for the tests: the binary started in front of the test
//! cluster on a socket in a temporary directory, a raw protocol client
//! (`Wire`), and helpers to read frames, metrics and the admin listener.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use gatehouse::db::codec::{Frame, FrameCodec};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio_util::codec::Decoder;

use crate::postgres::{APP_DB, APP_PASSWORD, APP_USER, TestPostgres};

/// A second role, logging in with md5.
pub const MD5_USER: &str = "app_md5";
pub const MD5_PASSWORD: &str = "md5-test-password";

/// A raw connection to the test server's Unix socket, read through the codec.
pub struct Wire {
    pub stream: UnixStream,
    pub buf: BytesMut,
    pub codec: FrameCodec,
    /// BackendKeyData from login.
    pub backend_key: (i32, i32),
    /// ParameterStatus from login: (name, value).
    pub reported: Vec<(String, String)>,
}

impl Wire {
    pub fn connect(pg: &TestPostgres) -> Wire {
        Wire::at(&pg.socket_dir.join(format!(".s.PGSQL.{}", pg.port)))
    }

    /// Connected to the socket at `path`, not logged in; reads give up
    /// after 20 seconds.
    pub fn at(path: &std::path::Path) -> Wire {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Wire {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::new(1 << 20),
            backend_key: (0, 0),
            reported: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                return frame;
            }
            let mut chunk = [0u8; 4096];
            // A read with a timeout is not restarted after a signal (the
            // test process reaps children on SIGCHLD): EINTR means again.
            let n = loop {
                match self.stream.read(&mut chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other.unwrap(),
                }
            };
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self) -> Vec<Frame> {
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

    pub fn startup(&mut self, user: &str) {
        self.startup_to(user, APP_DB);
    }

    pub fn startup_to(&mut self, user: &str, database: &str) {
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", user), ("database", database)], &mut buf).unwrap();
        self.send(&buf);
    }

    /// Startup and SCRAM-SHA-256 as `app`, up to the first ReadyForQuery.
    pub fn login(pg: &TestPostgres) -> Wire {
        Wire::scram_login(Wire::connect(pg))
    }

    pub fn scram_login(wire: Wire) -> Wire {
        Wire::scram_login_to(wire, APP_DB)
    }

    pub fn scram_login_to(mut wire: Wire, database: &str) -> Wire {
        wire.startup_to(APP_USER, database);
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
        for status in frames.iter().filter(|f| f.tag == b'S') {
            let mut parts = status.body().split(|b| *b == 0);
            if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
                wire.reported.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
        }
        if let Some(key) = frames.iter().find(|f| f.tag == b'K') {
            let body = key.body();
            wire.backend_key = (
                i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
            );
        }
        wire
    }

    /// Every column of the first row of `sql`, as text (NULL as "").
    pub fn row(&mut self, sql: &str) -> Vec<String> {
        let frames = self.query(sql);
        let row = frames.iter().find(|f| f.tag == b'D').expect("a row");
        let body = row.body();
        let columns = u16::from_be_bytes([body[0], body[1]]);
        let mut at = 2;
        (0..columns)
            .map(|_| {
                let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                at += 4;
                let Ok(len) = usize::try_from(len) else {
                    return String::new();
                };
                at += len;
                String::from_utf8_lossy(&body[at - len..at]).into_owned()
            })
            .collect()
    }

    /// The first column of the first row of `sql`.
    pub fn value(&mut self, sql: &str) -> String {
        let frames = self.query(sql);
        let row = frames.iter().find(|f| f.tag == b'D').expect("a row");
        String::from_utf8_lossy(&row.body()[6..]).to_string()
    }

    pub fn query(&mut self, sql: &str) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        self.send(&buf);
        self.until_ready()
    }

    /// `PQprepare`: Parse with a name, then Sync.
    pub fn prepare(&mut self, name: &str, sql: &str) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
        frontend::sync(&mut buf);
        self.send(&buf);
        self.until_ready()
    }

    /// `PQexecPrepared` without parameters: Bind, Execute, Sync.
    pub fn execute_prepared(&mut self, name: &str) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        frontend::bind(
            "",
            name,
            std::iter::empty::<i16>(),
            std::iter::empty::<()>(),
            |_, _| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut buf,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::execute("", 0, &mut buf).unwrap();
        frontend::sync(&mut buf);
        self.send(&buf);
        self.until_ready()
    }
}

/// A command's standard output, then its standard error.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The SQLSTATE of the first ErrorResponse among `frames`.
pub fn sqlstate_of(frames: &[Frame]) -> Option<String> {
    frames.iter().find(|f| f.tag == b'E').map(|e| {
        e.error_fields()
            .iter()
            .find(|(code, _)| *code == b'C')
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    })
}

/// The first column of the first DataRow among `frames`.
pub fn first_value(frames: &[Frame]) -> Option<String> {
    let row = frames.iter().find(|f| f.tag == b'D')?;
    Some(String::from_utf8_lossy(&row.body()[6..]).to_string())
}

/// A running `gatehouse db` in front of the test cluster.
pub struct GatehouseDb {
    pub child: std::process::Child,
    pub socket_dir: tempfile::TempDir,
    pub port: u16,
}

/// A free TCP port on the loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl GatehouseDb {
    /// A configuration in front of the test cluster: `pool` lines under
    /// `[pool]`, `server` lines under `[server]`, the `app` database in
    /// `mode`, the admin listener on. Returns it with the admin address.
    /// The socket directory is set when it starts (`start_with_text`).
    pub fn config(pg: &TestPostgres, pool: &str, mode: &str, server: &str) -> (String, String) {
        // No warm connections unless a test asks for them.
        let pool = if pool.contains("min_connections") {
            pool.to_string()
        } else {
            format!("min_connections = 0\n{pool}")
        };
        let admin = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "[server]\nsocket_dir = \"/set/at/start\"\nport = {port}\n{server}\n\n\
             [admin]\nenabled = true\nlisten = \"{admin}\"\n\n\
             [primary]\nhost = \"{}\"\nport = {}\n\n[pool]\n{pool}\n\n\
             [[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\n\n\
             [[users]]\nname = \"{MD5_USER}\"\nauth = \"md5\"\npassword = \"{MD5_PASSWORD}\"\n\n\
             [[databases]]\nname = \"{APP_DB}\"\npool_mode = \"{mode}\"\n",
            pg.socket_dir.display(),
            pg.port,
            port = free_port(),
        );
        (config, admin)
    }

    /// With `pool` lines under `[pool]` and the database in `mode`.
    pub fn start(pg: &TestPostgres, pool: &str, mode: &str) -> GatehouseDb {
        Self::start_with_text(&Self::config(pg, pool, mode, "").0)
    }

    /// With `server` lines too; returns the admin address as well.
    pub fn start_with_admin(pg: &TestPostgres, pool: &str, server: &str) -> (GatehouseDb, String) {
        let (text, admin) = Self::config(pg, pool, "transaction", server);
        (Self::start_with_text(&text), admin)
    }

    /// As `start_with_admin`, with more `[[databases]]` entries (transaction
    /// pooling) after `app`.
    pub fn start_with_databases(
        pg: &TestPostgres,
        pool: &str,
        databases: &[&str],
    ) -> (GatehouseDb, String) {
        let (mut text, admin) = Self::config(pg, pool, "transaction", "");
        for name in databases {
            text.push_str(&format!(
                "\n[[databases]]\nname = \"{name}\"\npool_mode = \"transaction\"\n"
            ));
        }
        (Self::start_with_text(&text), admin)
    }

    /// With a whole config file, in a socket directory of its own (the
    /// file's port is kept).
    pub fn start_with_text(config: &str) -> GatehouseDb {
        Self::start_limited(config, None)
    }

    /// As `start_with_text`, with the open-file limit set to `open_files`.
    pub fn start_limited(config: &str, open_files: Option<u32>) -> GatehouseDb {
        let socket_dir = tempfile::tempdir().unwrap();
        let dir_line = config
            .lines()
            .find(|l| l.starts_with("socket_dir = "))
            .unwrap()
            .to_string();
        let port: u16 = config
            .lines()
            .find_map(|l| l.strip_prefix("port = "))
            .unwrap()
            .parse()
            .unwrap();
        let config = config.replace(
            &dir_line,
            &format!("socket_dir = \"{}\"", socket_dir.path().display()),
        );
        let config_path = socket_dir.path().join("db.toml");
        std::fs::write(&config_path, config).unwrap();
        let args = ["--config".to_string(), config_path.display().to_string()];
        Self::launch_limited(socket_dir, port, &args, open_files)
    }

    /// `gatehouse db` with these arguments, its log in `gatehouse.log`
    /// beside the socket; waits for the socket.
    pub fn launch_with_args(
        socket_dir: tempfile::TempDir,
        port: u16,
        args: &[String],
    ) -> GatehouseDb {
        Self::launch_limited(socket_dir, port, args, None)
    }

    /// As `launch_with_args`, with the open-file limit set to `open_files`.
    pub fn launch_limited(
        socket_dir: tempfile::TempDir,
        port: u16,
        args: &[String],
        open_files: Option<u32>,
    ) -> GatehouseDb {
        let log = std::fs::File::create(socket_dir.path().join("gatehouse.log")).unwrap();
        let mut command = match open_files {
            Some(n) => {
                let mut sh = std::process::Command::new("sh");
                sh.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n.to_string()])
                    .arg(env!("CARGO_BIN_EXE_gatehouse"));
                sh
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse")),
        };
        let child = command
            .arg("db")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut db = GatehouseDb {
            child,
            socket_dir,
            port,
        };
        let socket = db.socket_dir.path().join(format!(".s.PGSQL.{port}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = db.child.try_wait() {
                panic!("gatehouse db exited ({status}): {}", db.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gatehouse db did not start: {}",
                db.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        db
    }

    /// The admin listener's address, read from the `listening` log line:
    /// configured as port 0, the kernel picks it, so that no other test's
    /// server can take it between a check and the bind.
    pub fn admin_address(&self) -> String {
        let mut admin = None;
        wait_for(Duration::from_secs(10), || {
            admin = self.log().lines().find_map(|line| {
                let rest = line.split_once("service=\"admin\" addr=")?.1;
                Some(rest.split_whitespace().next()?.to_string())
            });
            admin.is_some()
        });
        admin.unwrap_or_else(|| panic!("no admin address in the log: {}", self.log()))
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.socket_dir.path().join("gatehouse.log")).unwrap_or_default()
    }

    pub fn psql(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        self.psql_to(APP_DB, user, password, sql)
    }

    /// `psql -c sql` on `database`: its output, or its error text.
    pub fn psql_to(
        &self,
        database: &str,
        user: &str,
        password: &str,
        sql: &str,
    ) -> Result<String, String> {
        crate::postgres::try_psql(
            self.socket_dir.path(),
            self.port,
            user,
            password,
            database,
            sql,
        )
    }

    /// `pgbench` (a real client) through gatehouse; its output, which must
    /// report success.
    pub fn pgbench(
        &self,
        user: &str,
        password: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> String {
        let out = std::process::Command::new("pgbench")
            .arg("-h")
            .arg(self.socket_dir.path())
            .args(["-p", &self.port.to_string(), "-U", user])
            .args(args)
            .arg(APP_DB)
            .env("PGPASSWORD", password)
            .envs(env.iter().copied())
            .output()
            .expect("pgbench is installed (apt-get install postgresql)");
        let text = output_text(&out);
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    }

    /// A raw client logged in through gatehouse with SCRAM.
    pub fn wire(&self) -> Wire {
        self.wire_to(APP_DB)
    }

    /// A client of `database`, logged in as `app`.
    pub fn wire_to(&self, database: &str) -> Wire {
        let socket = self
            .socket_dir
            .path()
            .join(format!(".s.PGSQL.{}", self.port));
        Wire::scram_login_to(Wire::at(&socket), database)
    }
}

impl Drop for GatehouseDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// One sample from the admin listener's `/metrics`, by its name and labels.
pub fn metric(admin: &str, sample: &str) -> Option<f64> {
    let (_, metrics) = http_get(admin, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// One GET over HTTP/1.0; (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

/// One GET over HTTP/1.0; (status, body), or what went wrong.
pub fn try_http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_string()))
}

pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}
