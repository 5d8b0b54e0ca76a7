//! Real servers for the gateway tests, each on an ephemeral port or a socket
//! in a temporary directory: the `gatehouse` binary itself, a scriptable Rust
//! upstream, and Gunicorn serving the example Django app.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Poll `check` every 50 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check().await
}

/// A running `gatehouse proxy` process.
pub struct Gatehouse {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Gatehouse {
    /// Start with `config` (TOML) on ephemeral ports for both listeners.
    pub fn start(config: &str) -> Gatehouse {
        Self::start_with_open_files(config, None)
    }

    /// Start with the open-file limit (soft and hard) set to `open_files`.
    pub fn start_with_open_files(config: &str, open_files: Option<u32>) -> Gatehouse {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut command = match open_files {
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n.to_string()])
                    .arg(env!("CARGO_BIN_EXE_gatehouse"));
                sh
            }
            None => Command::new(env!("CARGO_BIN_EXE_gatehouse")),
        };
        let mut child = command
            .args(["proxy", "--config"])
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("GATEHOUSE_LOG__LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gatehouse");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("GATEHOUSE_TEST_VERBOSE").is_some() {
                    eprintln!("gatehouse: {line}");
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (addr, admin) = loop {
            let text = log.lock().unwrap().clone();
            if let (Some(addr), Some(admin)) =
                (listening(&text, "proxy"), listening(&text, "admin"))
            {
                break (addr, admin);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("gatehouse exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "gatehouse did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Gatehouse {
            child,
            addr,
            admin,
            config_path,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).expect("rewrite config");
    }

    /// Wait for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `sample` reaches `value` within five seconds.
    pub async fn metric_reaches(&self, sample: &str, value: f64) -> bool {
        eventually(Duration::from_secs(5), async || {
            self.metric(sample).await == Some(value)
        })
        .await
    }

    /// The value of one Prometheus sample, e.g.
    /// `gatehouse_upstream_healthy{upstream="http://127.0.0.1:1"}`; labels in
    /// the order the text format prints them (alphabetical).
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, _, body) = get(self.admin, "/metrics", &[]).await.ok()?;
        let text = String::from_utf8_lossy(&body).to_string();
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of the `listening` log line for `service`, text or JSON.
fn listening(log: &str, service: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("listening"))
        .find_map(|l| {
            if let Ok(line) = serde_json::from_str::<serde_json::Value>(l) {
                return (line["service"] == service)
                    .then(|| line["addr"].as_str()?.parse().ok())
                    .flatten();
            }
            if !l.contains(&format!("service=\"{service}\"")) {
                return None;
            }
            let rest = &l[l.find("addr=")? + 5..];
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// A scriptable upstream standing in for Gunicorn where a test needs exact
/// control (delays, failures, hop-by-hop headers). Paths:
/// `/delay/<ms>`, `/status/<code>`, `/bytes/<n>` (`x`s), `/pattern/<n>`
/// ([`pattern`]), `/hop`, anything else echoes
/// the request as JSON (under `/set-cookie/`, `/private/` and `/no-store/`
/// with what makes it uncacheable).
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl TestUpstream {
    pub async fn start(name: &str) -> TestUpstream {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Bind a specific address (to come back on the same port after `stop`).
    pub async fn start_on(name: &str, addr: SocketAddr) -> TestUpstream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).expect("bind test upstream");
        let listener: TcpListener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (h, c, n) = (
            Arc::clone(&hits),
            Arc::clone(&connections),
            name.to_string(),
        );
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, n) = (Arc::clone(&h), n.clone());
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        respond(n.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestUpstream {
            addr,
            hits,
            connections,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Close the listener and every open connection, like a killed process.
    pub async fn stop(mut self) -> SocketAddr {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.addr
    }
}

async fn respond(
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').split('/');
    let response = match (parts.next(), parts.next()) {
        (Some("delay"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Response::new(Full::new(Bytes::from("slow")))
        }
        (Some("status"), Some(code)) => {
            let mut r = Response::new(Full::new(Bytes::from("status")));
            *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            r
        }
        (Some("bytes"), Some(n)) => {
            let n: usize = n.parse().unwrap_or(0);
            Response::new(Full::new(Bytes::from(vec![b'x'; n])))
        }
        (Some("pattern"), Some(n)) => Response::new(Full::new(pattern(n.parse().unwrap_or(0)))),
        (Some("hop"), _) => Response::builder()
            .header("connection", "x-upstream-private")
            .header("x-upstream-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-upstream-public", "fine")
            .body(Full::new(Bytes::from("hop")))
            .unwrap(),
        _ => {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in &parts.headers {
                headers
                    .entry(name.as_str().to_string())
                    .or_default()
                    .push(value.to_str().unwrap_or("").to_string());
            }
            let echo = serde_json::json!({
                "upstream": name,
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            let mut response = Response::builder().header("content-type", "application/json");
            // What a cache must never hand to another client.
            response = match path.split('/').nth(1) {
                Some("set-cookie") => response.header("set-cookie", "sessionid=new; HttpOnly"),
                Some("private") => response.header("cache-control", "private, max-age=60"),
                Some("no-store") => response.header("cache-control", "no-store"),
                _ => response,
            };
            response
                .body(Full::new(Bytes::from(echo.to_string())))
                .unwrap()
        }
    };
    let mut response = response;
    response
        .headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    Ok(response)
}

pub type Reply = (StatusCode, http::HeaderMap, Bytes);

/// One request on a fresh HTTP/1.1 connection; like every real client, it
/// sends `Host` (the gateway's address) unless the request names one.
pub async fn send(addr: SocketAddr, mut request: Request<Full<Bytes>>) -> Result<Reply, String> {
    if !request.headers().contains_key("host") {
        request
            .headers_mut()
            .insert("host", addr.to_string().parse().unwrap());
    }
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// `n` bytes whose value changes with their place (period 251, not a power
/// of two), so that a range sent from the wrong offset shows.
pub fn pattern(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut builder = Request::get(path);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        builder = builder.header("host", format!("{addr}"));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(addr, builder.body(Full::new(Bytes::new())).unwrap()).await
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Write raw bytes and read until the server closes or 5 s pass.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// The status code of the first response in a raw exchange.
pub fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"))
}

/// Gunicorn serving `examples/django` from the test virtualenv, bound to a
/// Unix socket in a temporary directory, on a freshly migrated and seeded
/// SQLite database.
pub struct Gunicorn {
    child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn venv() -> PathBuf {
    let venv = std::env::var_os("GATEHOUSE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    assert!(
        venv.join("bin/gunicorn").exists(),
        "no Gunicorn in {}: run `scripts/test.sh`, which creates it (python3 -m venv .venv && \
         .venv/bin/pip install -r examples/django/requirements.txt)",
        venv.display()
    );
    venv
}

impl Gunicorn {
    /// On a fresh SQLite database.
    pub fn start(workers: usize) -> Gunicorn {
        Self::start_with_env(workers, &[])
    }

    /// With `env` for Django (e.g. `DB_NAME`, `DB_HOST` for PostgreSQL),
    /// after `migrate` and the seed-data command.
    pub fn start_with_env(workers: usize, env: &[(&str, &str)]) -> Gunicorn {
        let venv = venv();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("db.sqlite3");
        let app = repo_root().join("examples/django");
        let command = |program: PathBuf| {
            let mut command = Command::new(program);
            command
                .current_dir(&app)
                .env("DJANGO_SQLITE_PATH", &db)
                .env_remove("DB_NAME");
            for (name, value) in env {
                command.env(name, value);
            }
            command
        };
        let manage = |args: &[&str]| {
            let out = command(venv.join("bin/python"))
                .arg("manage.py")
                .args(args)
                .output()
                .expect("run manage.py");
            assert!(
                out.status.success(),
                "manage.py {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        manage(&["migrate", "-v0"]);
        manage(&["seed_data", "--users", "5", "--stories", "30"]);
        let socket = dir.path().join("gunicorn.sock");
        let child = command(venv.join("bin/gunicorn"))
            .args(["--workers", &workers.to_string(), "--worker-class", "sync"])
            .arg("--bind")
            .arg(format!("unix:{}", socket.display()))
            .args(["--timeout", "30", "muejam_library.wsgi"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gunicorn");
        let gunicorn = Gunicorn {
            child,
            socket,
            _dir: dir,
        };
        gunicorn.wait_ready();
        gunicorn
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) {
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.") && out.contains(" 200 ") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("gunicorn did not become ready on {}", self.socket.display());
    }

    pub fn upstream_url(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `curl` (a real client) and return (status, headers text, body).
pub fn curl(args: &[&str]) -> (u16, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(&headers)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let headers = std::fs::read_to_string(&headers).unwrap_or_default();
    (
        code.trim().parse().unwrap_or(0),
        headers.to_ascii_lowercase(),
        body.to_string(),
    )
}

pub fn header_line<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
}
