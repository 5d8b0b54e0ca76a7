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

/// A real Redis Cluster of three masters with a replica each (the seed's 3+3
/// layout), on loopback ports whose cluster-bus ports (+10000) are free too.
pub struct TestRedisCluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

fn free_cluster_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl TestRedisCluster {
    pub fn start() -> TestRedisCluster {
        redis_server();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 6 {
            let port = free_cluster_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let nodes = ports
            .iter()
            .map(|port| {
                let node_dir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&node_dir).expect("node dir");
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server")
            })
            .collect();
        let cluster = TestRedisCluster {
            nodes,
            ports,
            _dir: dir,
        };
        for port in &cluster.ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cluster.cli(*port, &["PING"]).trim() != "PONG" {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster
            .cli(cluster.ports[0], &["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// One command in cluster mode (`-c` follows redirections).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-c", "-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }
}

impl Drop for TestRedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}
