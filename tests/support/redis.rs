//! A real `redis-server` on a Unix socket in a temporary directory: one shared
//! by a test binary, or one a test owns so it can kill and restart it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct TestRedis {
    child: Option<Child>,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
}

fn redis_server() -> &'static str {
    let found = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "redis-server not found: apt-get install redis-server"
    );
    "redis-server"
}

impl TestRedis {
    /// An instance this test owns; it is stopped when dropped.
    pub fn start() -> TestRedis {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let mut redis = TestRedis {
            child: None,
            socket,
            dir,
        };
        redis.restart();
        redis
    }

    /// One instance for the whole test binary. A watcher shell stops it when
    /// the test process is gone, since statics are never dropped.
    pub fn shared() -> &'static TestRedis {
        static SHARED: OnceLock<TestRedis> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let socket = dir.path().join("redis.sock");
            let args: Vec<String> = server_args(&socket, dir.path())
                .into_iter()
                .map(|a| format!("'{a}'"))
                .collect();
            let args = args.join(" ");
            let script = format!(
                "{} {args} & r=$!; while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill $r",
                redis_server(),
                std::process::id()
            );
            let child = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let redis = TestRedis {
                child: Some(child),
                socket,
                dir,
            };
            redis.wait_ready();
            redis
        })
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Start (again) on the same socket.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(redis_server())
            .args(server_args(&self.socket, self.dir.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on {}", self.socket.display());
    }

    /// Run one command with redis-cli and return its output.
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }
}

fn server_args(socket: &std::path::Path, dir: &std::path::Path) -> Vec<String> {
    [
        "--port",
        "0",
        "--unixsocket",
        &socket.display().to_string(),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
