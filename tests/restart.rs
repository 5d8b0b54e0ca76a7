//! Restarts that refuse nothing: both services take a listening socket from
//! systemd (socket activation), which holds it while the old process drains
//! and the new one starts. `tests/clients/socket_activate.py` holds the
//! socket and restarts the process as `systemctl restart` does (SIGTERM,
//! wait for the exit, start again); clients connect the whole time, and
//! every one of them is answered, while a request that was in flight at the
//! SIGTERM still finishes.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[path = "support/postgres.rs"]
mod postgres;
#[path = "support/db.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::{APP_DB, APP_PASSWORD, APP_USER, TestPostgres};

/// The helper holding the socket, and the generations it started.
struct Activator {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    address: String,
    logs: tempfile::TempDir,
}

impl Activator {
    fn start(kind: &str, at: &str, command: &[&str]) -> Activator {
        let logs = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .arg(harness::repo_root().join("tests/clients/socket_activate.py"))
            .args([kind, at])
            .arg(logs.path())
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_gatehouse"))
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut activator = Activator {
            child,
            stdin,
            stdout,
            address: String::new(),
            logs,
        };
        activator.address = activator.expect("listening");
        activator.expect("started");
        activator
    }

    /// The rest of the next line, which must start with `word`.
    fn expect(&mut self, word: &str) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let rest = line.trim().strip_prefix(word);
        rest.unwrap_or_else(|| panic!("wanted {word}, got {line:?}"))
            .trim()
            .to_string()
    }

    /// What systemd does on `systemctl restart`; returns the old process's
    /// exit status.
    fn restart(&mut self) -> String {
        writeln!(self.stdin, "restart").unwrap();
        let status = self.expect("exited");
        self.expect("started");
        status
    }

    fn log(&self, generation: usize) -> String {
        std::fs::read_to_string(self.logs.path().join(format!("{generation}.log")))
            .unwrap_or_default()
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "stop");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

/// What clients saw: when each attempt began and ended, and how.
type Attempts = Vec<(Instant, Instant, Result<(), String>)>;

/// Run `attempt` over and over on a thread until `stop`.
fn hammer(
    stop: Arc<AtomicBool>,
    attempt: impl Fn() -> Result<(), String> + Send + 'static,
) -> std::thread::JoinHandle<Attempts> {
    std::thread::spawn(move || {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            let result = attempt();
            attempts.push((began, Instant::now(), result));
        }
        attempts
    })
}

/// No attempt failed, and one that began before the old process exited
/// was answered after: it waited in the socket's backlog through the drain,
/// and the new process answered it.
fn check_attempts(attempts: &Attempts, exited: Instant) {
    let failures: Vec<&String> = attempts
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} attempts, failed: {failures:?}",
        attempts.len()
    );
    assert!(
        attempts
            .iter()
            .any(|(began, ended, _)| *began < exited && *ended > exited),
        "no client waited through the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_restarts_on_a_socket_from_systemd_and_refuses_nothing() {
    let upstream = harness::TestUpstream::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    // server.listen names a port nothing listens on: only the handed-over
    // socket can answer.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 2\ndrain_timeout = \"10s\"\n\n\
             [admin]\nenabled = false\n\n[upstream.health_check]\nenabled = false\n\n\
             [[upstream.servers]]\nurl = \"{}\"\n\n[ratelimit]\nenabled = false\n",
            upstream.url()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut activator = tokio::task::spawn_blocking(move || {
        Activator::start("tcp", "127.0.0.1:0", &["proxy", "--config", &config])
    })
    .await
    .unwrap();
    let base = format!("http://{}", activator.address);
    let get = {
        let base = base.clone();
        move |path: &str| -> Result<(), String> {
            // curl itself: a refused or reset connection is a failure too.
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "15",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!("{base}{path}"))
                .output()
                .unwrap();
            let said = support::output_text(&out);
            if out.status.success() && said.trim() == "200" {
                Ok(())
            } else {
                Err(format!("{path}: {said}"))
            }
        }
    };
    assert!(support::wait_for(Duration::from_secs(10), || get(
        "/health"
    )
    .is_ok()));

    // A request Gunicorn takes 3 s over, in flight at the SIGTERM.
    let slow = {
        let get = get.clone();
        std::thread::spawn(move || get("/delay/3000"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let get = get.clone();
        hammer(Arc::clone(&stop), move || get("/anything"))
    };
    std::thread::sleep(Duration::from_millis(200));
    let sigterm = Instant::now();
    let (activator, exited, gone) = tokio::task::spawn_blocking(move || {
        let exited = activator.restart();
        (activator, exited, Instant::now())
    })
    .await
    .unwrap();
    let drained = gone - sigterm;
    // The old process drained: it waited for the slow request, then exited 0.
    assert_eq!(exited, "0", "{}", activator.log(1));
    assert!(drained >= Duration::from_secs(1), "{drained:?}");
    assert_eq!(slow.join().unwrap(), Ok(()));
    // The new one answers, on the same socket.
    let after = Instant::now();
    while after.elapsed() < Duration::from_millis(500) {
        get("/after").unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    check_attempts(&clients.join().unwrap(), gone);
    assert!(
        activator.log(2).contains("systemd handed over a socket"),
        "{}",
        activator.log(2)
    );
}

/// `SELECT 1` through a new connection of psql's; an error is a failure
/// unless the drain closed a session that had logged in to the old process
/// (57P01, what PgBouncer's and PostgreSQL's own shutdowns send too).
fn psql_select(socket_dir: &Path, port: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-h"])
        .arg(socket_dir)
        .args(["-p", port, "-U", APP_USER, "-d", APP_DB, "-c", "SELECT 1"])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "15")
        .output()
        .unwrap();
    let said = support::output_text(&out);
    if out.status.success() && said.trim() == "1" {
        return Ok(());
    }
    if said.contains("terminating connection due to administrator command") {
        return Ok(());
    }
    Err(said)
}

#[test]
fn the_pool_restarts_on_a_socket_from_systemd_and_refuses_nothing() {
    let pg = TestPostgres::shared();
    let port = support::free_port().to_string();
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join(format!(".s.PGSQL.{port}"));
    let (config, _) =
        support::GatehouseDb::config(pg, "", "transaction", "drain_timeout = \"10s\"");
    // socket_dir names a directory that does not exist: only the
    // handed-over socket can answer.
    let config = config.replace(
        "socket_dir = \"/set/at/start\"",
        "socket_dir = \"/nonexistent/gatehouse\"",
    );
    let file = sockets.path().join("db.toml");
    std::fs::write(&file, config).unwrap();
    let file = file.display().to_string();
    let mut activator = Activator::start(
        "unix",
        &path.display().to_string(),
        &["db", "--config", &file],
    );
    let dir = sockets.path().to_path_buf();
    let select = {
        let (dir, port) = (dir.clone(), port.clone());
        move || psql_select(&dir, &port)
    };
    assert!(support::wait_for(Duration::from_secs(10), || select().is_ok()));

    // A transaction in flight at the SIGTERM.
    let slow = {
        let (dir, port) = (dir.clone(), port.clone());
        std::thread::spawn(move || {
            postgres::try_psql(
                &dir,
                port.parse().unwrap(),
                APP_USER,
                APP_PASSWORD,
                APP_DB,
                "SELECT pg_sleep(3)",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(Arc::clone(&stop), select.clone());
    std::thread::sleep(Duration::from_millis(200));
    let sigterm = Instant::now();
    let exited = activator.restart();
    let gone = Instant::now();
    let drained = gone - sigterm;
    assert_eq!(exited, "0", "{}", activator.log(1));
    assert!(drained >= Duration::from_secs(1), "{drained:?}");
    assert!(slow.join().unwrap().is_ok(), "{}", activator.log(1));
    let after = Instant::now();
    while after.elapsed() < Duration::from_millis(500) {
        select().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    check_attempts(&clients.join().unwrap(), gone);
    // systemd's socket file stays for the next process.
    assert!(path.exists());
    assert!(
        activator.log(2).contains("inherited=true"),
        "{}",
        activator.log(2)
    );
}
