//! The dashboards and alerts in `docker/`, read by a real Prometheus
//! scraping a running stack: PostgreSQL with a streaming replica, Redis,
//! `gatehouse db` routing between them, Gunicorn serving the example Django
//! app through it, and `gatehouse proxy` in front, driven by locust through
//! `loadtest/run.sh` (CI's smoke run). Every panel's query and every alert's
//! signal must evaluate and return series; an expression naming a metric
//! the binaries do not export fails. Redis and the replica are then killed,
//! and the alerts for them must see it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis;
#[path = "support/db.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use postgres::{APP_PASSWORD, APP_USER, TestPostgres};
use redis::TestRedis;
use support::{GatehouseDb, free_port, metric, wait_for};

const DJANGO_DB: &str = "app_django";

/// Members the example app is seeded with (`Gunicorn::start_with_env`).
const MEMBERS: &str = "5";

/// What the dashboards' variables become: every instance, and a window long
/// enough to hold the whole test.
const RATE_WINDOW: &str = "5m";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Prometheus of the test's own, scraping every second.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(proxy_admin: &str, db_admin: &str) -> Prometheus {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("prometheus is not installed: apt-get install prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n\
                 \x20 - job_name: gatehouse-proxy\n    static_configs:\n      - targets: [\"{proxy_admin}\"]\n\
                 \x20 - job_name: gatehouse-db\n    static_configs:\n      - targets: [\"{db_admin}\"]\n",
                repo().join("docker/prometheus/alerts.yml").display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        assert!(
            wait_for(Duration::from_secs(30), || {
                support::try_http_get(&prometheus.addr, "/-/ready").is_ok_and(|(s, _)| s == 200)
            }),
            "prometheus did not become ready: {}",
            prometheus.log()
        );
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/…` with its parameters URL-encoded by curl.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("http://{}/api/v1/{path}", self.addr);
        let mut args = vec!["-G".to_string(), url];
        for (name, value) in params {
            args.push("--data-urlencode".into());
            args.push(format!("{name}={value}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, _, body) = harness::curl(&args);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The series `expr` returns now, or why it failed.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let answer = self.api("query", &[("query", expr)]);
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The alerting rules it loaded from docker/prometheus/alerts.yml:
    /// name, expression as Prometheus parsed it, and any evaluation error.
    fn alert_rules(&self) -> Vec<(String, String, Option<String>)> {
        let answer = self.api("rules", &[("type", "alert")]);
        let mut rules = Vec::new();
        for group in answer["data"]["groups"].as_array().unwrap() {
            for rule in group["rules"].as_array().unwrap() {
                let error = (rule["health"] != "ok")
                    .then(|| format!("{} {}", rule["health"], rule["lastError"]));
                rules.push((
                    rule["name"].as_str().unwrap().to_string(),
                    rule["query"].as_str().unwrap().to_string(),
                    error,
                ));
            }
        }
        rules
    }

    /// One alert's expression.
    fn alert(&self, name: &str) -> String {
        let rules = self.alert_rules();
        let rule = rules.iter().find(|r| r.0 == name);
        rule.unwrap_or_else(|| panic!("no alert {name}: {rules:?}"))
            .1
            .clone()
    }

    /// Whether `expr` returns a series within `limit`.
    fn returns_series(&self, expr: &str, limit: Duration) -> bool {
        wait_for(limit, || self.query(expr).is_ok_and(|r| !r.is_empty()))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every panel query of a Grafana dashboard, with its title.
fn panel_queries(file: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", RATE_WINDOW)
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(!out.is_empty(), "{}: no queries", file.display());
    out
}

/// An alert's signal: its expression without the last comparison made
/// outside any brackets (`A / B > 0.05` → `A / B`).
fn signal(expr: &str) -> &str {
    let bytes = expr.as_bytes();
    let (mut depth, mut quoted, mut cut) = (0i32, false, None);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            _ if quoted => {}
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            b'>' | b'<' if depth == 0 => cut = Some(i),
            b'=' if depth == 0 && i > 0 && bytes[i - 1] == b'=' => cut = Some(i - 1),
            _ => {}
        }
    }
    match cut {
        Some(i) => expr[..i].trim_end_matches(['>', '<', '=', '!', ' ']),
        None => expr,
    }
}

/// `gatehouse_…` names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("gatehouse_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// One request with curl: its status.
fn status(args: &[&str]) -> u16 {
    harness::curl(args).0
}

#[test]
fn dashboards_and_alerts_read_a_running_stack_under_locust() {
    // PostgreSQL: a primary with the Django database, and a streaming replica.
    let primary = TestPostgres::start();
    primary.superuser_sql(&format!("GRANT pg_monitor TO {APP_USER}"));
    primary.superuser_sql(&format!("CREATE DATABASE {DJANGO_DB} OWNER {APP_USER}"));
    let replica = primary.replica("");
    assert!(wait_for(Duration::from_secs(30), || postgres::try_psql(
        &replica.socket_dir,
        replica.port,
        APP_USER,
        APP_PASSWORD,
        DJANGO_DB,
        "SELECT 1"
    )
    .is_ok()));
    let mut redis = TestRedis::start();
    let socket = redis.url().replace("redis+unix://", "");

    // gatehouse db routing between them, as Django needs it: a request's
    // next request comes on another connection.
    let db = GatehouseDb::start_with_text(&format!(
        "[server]\nsocket_dir = \"/set/at/start\"\nport = {}\n\n\
         [admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\n\
         [primary]\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [[nodes]]\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [router]\ntopology_interval = \"200ms\"\nread_your_writes = \"database\"\n\n\
         [pool]\nmin_connections = 0\nconnect_timeout = \"2s\"\n\n\
         [[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\n\n\
         [[databases]]\nname = \"{DJANGO_DB}\"\n",
        free_port(),
        primary.port,
        replica.port,
    ));
    let db_admin = db.admin_address();

    // Django through it, with its sessions in Redis as the compose file has them.
    let host = db.socket_dir.path().display().to_string();
    let port = db.port.to_string();
    let sessions = format!("unix://{socket}?db=1");
    let gunicorn = harness::Gunicorn::start_with_env(
        2,
        &[
            ("DB_NAME", DJANGO_DB),
            ("DB_USER", APP_USER),
            ("DB_PASSWORD", APP_PASSWORD),
            ("DB_HOST", &host),
            ("DB_PORT", &port),
            ("DJANGO_SESSION_ENGINE", "cache"),
            ("DJANGO_REDIS_URL", &sessions),
        ],
    );
    // The gateway as docker/config/gateway.toml sets it up, with the seed's
    // limits and routes.
    let gateway = harness::Gatehouse::start(&format!(
        "[server]\nworkers = 2\n\n\
         [upstream.health_check]\npath = \"/healthz\"\ninterval = \"1s\"\n\n\
         [[upstream.servers]]\nurl = \"{}\"\n\n\
         [identity.session]\nverify = \"redis\"\nredis_url = \"redis+unix://{socket}?db=1\"\n\n\
         [redis]\nurl = \"{}\"\n",
        gunicorn.upstream_url(),
        redis.url(),
    ));
    let proxy_admin = gateway.admin.to_string();
    let prometheus = Prometheus::start(&proxy_admin, &db_admin);
    for job in ["gatehouse-proxy", "gatehouse-db"] {
        assert!(
            prometheus.returns_series(
                &format!("up{{job=\"{job}\"}} == 1"),
                Duration::from_secs(20)
            ),
            "prometheus does not scrape {job}: {}",
            prometheus.log()
        );
    }

    // CI's locust smoke run: ten seconds through loadtest/run.sh.
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo().join("loadtest/run.sh"))
        .args(["--host", &format!("http://{}", gateway.addr)])
        .args(["--users", "10", "--spawn-rate", "10", "--run-time", "10s"])
        .arg("--out")
        .arg(out.path())
        .env("LOCUST_MEMBERS", MEMBERS)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "loadtest/run.sh failed:\n{said}");
    let stats = std::fs::read_to_string(out.path().join("stats_stats.csv")).unwrap();
    let aggregated = stats
        .lines()
        .find(|l| l.contains(",Aggregated,"))
        .unwrap_or_else(|| panic!("no Aggregated row: {stats}"));
    let fields: Vec<&str> = aggregated.split(',').collect();
    let (requests, failures): (u64, u64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
    assert!(requests >= 20 && failures == 0, "{aggregated}\n{said}");
    for task in ["/v1/auth/login/", "/v1/stories/", "/v1/search/?q=[query]"] {
        assert!(
            stats.contains(&format!(",{task},")),
            "{task} never ran: {stats}"
        );
    }
    assert!(out.path().join("report.html").metadata().unwrap().len() > 1000);

    // What a day brings besides: a caller over its limit, a malformed
    // path, and a request Django fails on.
    let search = gateway.url("/v1/search/?q=lantern");
    let limited = (0..25)
        .filter(|_| status(&["-o", "/dev/null", &search]) == 429)
        .count();
    assert!(limited > 0, "25 searches, none limited");
    assert_eq!(status(&[&gateway.url("/v1/%zz/")]), 400);
    let broken = "{\"title\": \"t\", \"author_id\": \"not a number\"}";
    let url = gateway.url("/v1/stories/");
    assert_eq!(status(&["-X", "POST", "--data", broken, &url]), 500);

    // Redis goes away: limits are counted in the gateway, and RedisUnavailable sees it.
    redis.kill();
    let redis_down = prometheus.alert("RedisUnavailable");
    assert!(
        wait_for(Duration::from_secs(30), || {
            let _ = status(&["-o", "/dev/null", &gateway.url("/v1/stories/?page=2")]);
            prometheus.query(&redis_down).is_ok_and(|r| !r.is_empty())
        }),
        "RedisUnavailable never held with Redis killed"
    );
    redis.restart();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let _ = status(&["-o", "/dev/null", &gateway.url("/v1/stories/?page=3")]);
            prometheus
                .query("gatehouse_ratelimit_shared == 1")
                .is_ok_and(|r| !r.is_empty())
        }),
        "limits never went back to Redis"
    );

    // One more scrape of everything that happened.
    std::thread::sleep(Duration::from_secs(3));

    // Every panel and every alert signal, against what Prometheus scraped.
    let mut problems = Vec::new();
    let mut expressions = Vec::new();
    for file in [
        "gateway.json",
        "cache_performance.json",
        "database_metrics.json",
    ] {
        for (title, expr) in panel_queries(&repo().join("docker/grafana/dashboards").join(file)) {
            expressions.push((format!("{file}: {title}"), expr));
        }
    }
    // The rules Prometheus loaded from the file, each evaluating cleanly.
    let rules = prometheus.alert_rules();
    assert_eq!(rules.len(), 11, "{rules:?}");
    for (name, expr, error) in &rules {
        if let Some(error) = error {
            problems.push(format!("alert {name}: {error}"));
        }
        if let Err(e) = prometheus.query(expr) {
            problems.push(format!("alert {name}: {e}: {expr}"));
        }
        expressions.push((format!("alert {name} (signal)"), signal(expr).to_string()));
    }
    for (what, expr) in &expressions {
        match prometheus.query(expr) {
            Err(e) => problems.push(format!("{what}: {e}: {expr}")),
            Ok(series) if series.is_empty() => problems.push(format!("{what}: no series: {expr}")),
            Ok(_) => {}
        }
    }
    let exported: BTreeSet<String> = prometheus.api("label/__name__/values", &[])["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for (what, expr) in &expressions {
        for name in metric_names(expr).difference(&exported) {
            problems.push(format!("{what}: {name} is not exported"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} expressions:\n{}",
        problems.len(),
        expressions.len(),
        problems.join("\n")
    );
    // The replica goes away: ReplicaDown names it.
    replica.stop();
    let replica_down = prometheus.alert("ReplicaDown");
    let node = format!("127.0.0.1:{}", replica.port);
    assert!(
        wait_for(Duration::from_secs(30), || prometheus
            .query(&replica_down)
            .is_ok_and(|r| r
                .iter()
                .any(|s| s["metric"]["node"] == node.as_str()))),
        "ReplicaDown never named {node}: {:?}",
        prometheus.query(&replica_down)
    );
    // The stack still answers reads, from the primary.
    assert_eq!(
        status(&["-o", "/dev/null", &gateway.url("/v1/users/2/")]),
        200
    );

    // The pool is still answering through the router with the replica gone.
    assert!(metric(&db_admin, "gatehouse_db_primary_up").is_some_and(|v| v == 1.0));
}

#[test]
fn signal_drops_the_last_comparison_outside_brackets() {
    assert_eq!(signal("a / b > 0.05"), "a / b");
    assert_eq!(signal("min by (node) (up) == 0"), "min by (node) (up)");
    assert_eq!(
        signal("x{result!=\"ok\", a=~\"b>c\"} < 1"),
        "x{result!=\"ok\", a=~\"b>c\"}"
    );
    assert_eq!(signal("1 - a / b >= 2"), "1 - a / b");
    assert_eq!(signal("sum(rate(x[5m]))"), "sum(rate(x[5m]))");
}
