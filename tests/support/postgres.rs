//! A real PostgreSQL cluster: `initdb` into a temporary directory (SCRAM
//! authentication), `postgres` on an ephemeral port with its socket in that
//! directory, one per test binary. As root it runs as the `postgres` user,
//! since PostgreSQL refuses to run as root.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const SUPERUSER_PASSWORD: &str = "postgres-test-password";
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-test-password";
pub const APP_DB: &str = "app";

pub struct TestPostgres {
    pub port: u16,
    pub socket_dir: PathBuf,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// `postgres` options, to start it again the same way.
    options: String,
    /// Outlives the test process on purpose; never waited for.
    _watcher: Child,
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb: apt-get install postgresql")
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command run as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A temporary directory the cluster's owner may write.
fn owned_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    if is_root() {
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the cluster directory failed");
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl TestPostgres {
    /// The binary's shared cluster, stopped by a watcher when the test
    /// process is gone (statics are never dropped).
    pub fn shared() -> &'static TestPostgres {
        static SHARED: OnceLock<TestPostgres> = OnceLock::new();
        SHARED.get_or_init(TestPostgres::start)
    }

    /// A cluster of the test's own, to stop and start again.
    pub fn start() -> TestPostgres {
        let bin = bin_dir();
        let dir = owned_dir();
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("password file");
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let postgres = TestPostgres::launch(bin, dir, "");
        postgres.superuser_sql(&format!(
            "CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"
        ));
        postgres.superuser_sql(&format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"));
        postgres
    }

    /// A streaming replica of this cluster (`pg_basebackup -R`), with
    /// `extra` server options (e.g. `-c recovery_min_apply_delay=3s`).
    pub fn replica(&self, extra: &str) -> TestPostgres {
        let dir = owned_dir();
        let conninfo = format!(
            "host={} port={} user=postgres password={SUPERUSER_PASSWORD}",
            self.socket_dir.display(),
            self.port
        );
        let out = as_owner(&self.bin.join("pg_basebackup"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "-c", "fast", "-d", &conninfo])
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestPostgres::launch(self.bin.clone(), dir, extra)
    }

    /// Stop at once and start again as a standby that follows nobody: a
    /// demoted primary, in recovery, answering reads and refusing writes.
    pub fn restart_as_standby(&self) {
        self.stop();
        std::fs::write(self.dir.path().join("data/standby.signal"), "").expect("standby.signal");
        self.restart();
    }

    /// Make a replica the primary (`pg_ctl promote`).
    pub fn promote(&self) {
        let out = as_owner(&self.bin.join("pg_ctl"))
            .args(["promote", "-w", "-D"])
            .arg(self.dir.path().join("data"))
            .output()
            .expect("pg_ctl promote");
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start `postgres` on the cluster in `dir`/data, on a free port, with
    /// its socket in `dir`, stopped by a watcher once the test process is
    /// gone.
    fn launch(bin: PathBuf, dir: tempfile::TempDir, extra: &str) -> TestPostgres {
        let data = dir.path().join("data");
        let port = free_port();
        let log = dir.path().join("postgres.log");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200 -c wal_receiver_status_interval=1s {extra}",
            dir.path().display()
        );
        let pg_ctl = bin.join("pg_ctl");
        let out = as_owner(&pg_ctl)
            .args(["start", "-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &options])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}; see {}",
            String::from_utf8_lossy(&out.stderr),
            log.display()
        );
        // A watcher stops the cluster once the test process is gone.
        let owner = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let watcher = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {owner}{pg_ctl} stop -D {data} -m immediate >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
            data = data.display(),
            dir = dir.path().display(),
        );
        let watcher = Command::new("sh")
            .args(["-c", &watcher])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the cluster watcher");
        let postgres = TestPostgres {
            port,
            socket_dir: dir.path().to_path_buf(),
            bin,
            dir,
            options: options.clone(),
            _watcher: watcher,
        };
        postgres.wait_ready();
        postgres
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop at once, as a crash would.
    pub fn stop(&self) {
        let out = as_owner(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .output()
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start again on the same port and socket.
    pub fn restart(&self) {
        let out = as_owner(&self.bin.join("pg_ctl"))
            .args(["start", "-w", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-o", &self.options])
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_ready();
    }

    /// Run SQL as the superuser over the server's own socket.
    pub fn superuser_sql(&self, sql: &str) -> String {
        psql(
            &self.socket_dir,
            self.port,
            "postgres",
            SUPERUSER_PASSWORD,
            "postgres",
            sql,
        )
    }
}

/// Only reached when setting the cluster up failed half-way (the shared one
/// lives in a static): stop it before its directory goes.
impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .output();
    }
}

/// `psql` (a real client) with `-c sql`; panics with its stderr on failure.
pub fn psql(host: &Path, port: u16, user: &str, password: &str, db: &str, sql: &str) -> String {
    try_psql(host, port, user, password, db, sql)
        .unwrap_or_else(|stderr| panic!("psql -c {sql:?}: {stderr}"))
}

/// `psql -c sql` at `host` (a socket directory or an address): its output,
/// or its error text.
pub fn try_psql(
    host: &Path,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    sql: &str,
) -> Result<String, String> {
    let out = Command::new("psql")
        .arg("-h")
        .arg(host)
        .args(["-p", &port.to_string(), "-U", user, "-d", db])
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed (apt-get install postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}
