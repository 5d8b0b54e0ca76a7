//! `gatehouse db` as a router, against real streaming replication: a
//! primary and replicas made with `pg_basebackup -R`. Reads land on
//! replicas by weight and everything that may write on the primary; a
//! client reads its own writes even from a delayed replica; a killed
//! replica costs no transaction; a promoted replica becomes the primary
//! and no acknowledged write is lost.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[allow(dead_code)]
#[path = "support/harness.rs"]
mod harness;
#[path = "support/postgres.rs"]
mod postgres;
#[path = "support/db.rs"]
mod support;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use postgres::{APP_DB, APP_PASSWORD, APP_USER, TestPostgres};
use support::{GatehouseDb, Wire, free_port, http_get, metric, wait_for};

/// The example Django app's database.
const DJANGO_DB: &str = "app_django";

/// The binary's replication: a primary, two replicas, and a replica that
/// applies WAL three seconds late.
struct Cluster {
    primary: TestPostgres,
    replicas: Vec<TestPostgres>,
    delayed: TestPostgres,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let primary = TestPostgres::start();
        prepare(&primary);
        let replicas = vec![primary.replica(""), primary.replica("")];
        let delayed = primary.replica("-c recovery_min_apply_delay=3s");
        for replica in replicas.iter().chain([&delayed]) {
            answering(replica);
        }
        Cluster {
            primary,
            replicas,
            delayed,
        }
    })
}

/// The schema the tests use, made on a primary before its replicas.
fn prepare(primary: &TestPostgres) {
    primary.superuser_sql(&format!("GRANT pg_monitor TO {APP_USER}"));
    app_sql(
        primary,
        "CREATE TABLE items (id serial PRIMARY KEY, note text); \
         INSERT INTO items (note) VALUES ('first'), ('second'); \
         CREATE TABLE counter (n int PRIMARY KEY); \
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'",
    )
    .unwrap();
}

/// A primary of the test's own with the schema, set up further by `setup`,
/// and `count` streaming replicas of it, answering.
fn own_cluster(
    count: usize,
    setup: impl FnOnce(&TestPostgres),
) -> (TestPostgres, Vec<TestPostgres>) {
    let primary = TestPostgres::start();
    prepare(&primary);
    setup(&primary);
    let replicas: Vec<TestPostgres> = (0..count).map(|_| primary.replica("")).collect();
    for replica in &replicas {
        answering(replica);
    }
    (primary, replicas)
}

/// Wait until a new replica answers queries (it reached consistency).
fn answering(replica: &TestPostgres) {
    assert!(
        wait_for(Duration::from_secs(30), || app_sql(
            replica,
            "SELECT count(*) FROM items"
        )
        .is_ok()),
        "the replica does not answer"
    );
}

/// SQL as `app` straight to a node.
fn app_sql(pg: &TestPostgres, sql: &str) -> Result<String, String> {
    app_sql_on(pg, APP_DB, sql)
}

fn app_sql_on(pg: &TestPostgres, database: &str, sql: &str) -> Result<String, String> {
    let address = std::path::Path::new("127.0.0.1");
    postgres::try_psql(address, pg.port, APP_USER, APP_PASSWORD, database, sql)
}

/// `gatehouse db` routing over `nodes` (the first as `[primary]`), each
/// `(node, weight)`, with `router` lines under `[router]`; with its admin
/// address.
fn router(nodes: &[(&TestPostgres, u32)], router: &str) -> (GatehouseDb, String) {
    // The admin listener on a port the kernel picks (`admin_address`).
    let admin = "127.0.0.1:0";
    let (first, weight) = nodes[0];
    let mut config = format!(
        "[server]\nsocket_dir = \"/set/at/start\"\nport = {port}\n\n\
         [admin]\nenabled = true\nlisten = \"{admin}\"\n\n\
         [primary]\nhost = \"127.0.0.1\"\nport = {}\nweight = {weight}\n\n\
         [router]\n{interval}{router}\n\n\
         [pool]\nmin_connections = 0\nconnect_timeout = \"2s\"\n\n\
         [[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\n\n\
         [[databases]]\nname = \"{APP_DB}\"\n\n[[databases]]\nname = \"{DJANGO_DB}\"\n",
        first.port,
        port = free_port(),
        interval = if router.contains("topology_interval") {
            ""
        } else {
            "topology_interval = \"200ms\"\n"
        },
    );
    for (node, weight) in &nodes[1..] {
        config.push_str(&format!(
            "\n[[nodes]]\nhost = \"127.0.0.1\"\nport = {}\nweight = {weight}\n",
            node.port
        ));
    }
    let db = GatehouseDb::start_with_text(&config);
    let admin = db.admin_address();
    (db, admin)
}

/// `/metrics/json .database.nodes`.
fn nodes(admin: &str) -> Vec<serde_json::Value> {
    let (_, body) = http_get(admin, "/metrics/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["database"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Wait until the monitor has found one primary and `replicas` replicas.
fn wait_for_roles(admin: &str, replicas: usize) {
    assert!(
        wait_for(Duration::from_secs(15), || {
            let nodes = nodes(admin);
            let count = |role: &str| {
                nodes
                    .iter()
                    .filter(|n| n["role"] == role && n["up"] == true)
                    .count()
            };
            count("primary") == 1 && count("replica") == replicas
        }),
        "roles not found: {:?}",
        nodes(admin)
    );
}

fn port_of(wire: &mut Wire, sql: &str) -> u16 {
    wire.value(sql).parse().unwrap()
}

#[test]
fn reads_go_to_replicas_by_weight_and_the_rest_to_the_primary() {
    let c = cluster();
    let (a, b) = (&c.replicas[0], &c.replicas[1]);
    // Other tests write to the cluster meanwhile: lag limits that they
    // cannot reach.
    let (db, admin) = router(
        &[(&c.primary, 1), (a, 3), (b, 1)],
        "max_lag = \"30s\"\nmax_lag_bytes = \"1GiB\"",
    );
    wait_for_roles(&admin, 2);
    let mut wire = db.wire();
    let mut landed: HashMap<u16, u32> = HashMap::new();
    for _ in 0..400 {
        *landed
            .entry(port_of(&mut wire, "SELECT inet_server_port()"))
            .or_default() += 1;
    }
    let on = |pg: &TestPostgres| landed.get(&pg.port).copied().unwrap_or(0);
    assert_eq!(on(&c.primary), 0, "{landed:?}");
    assert_eq!(on(a) + on(b), 400, "{landed:?}");
    // Weights 3:1, roughly: 300 and 100 expected.
    assert!(on(a) > 2 * on(b) && on(b) > 40, "{landed:?}");

    // Extended protocol: a named statement, executed.
    wire.prepare("where", "SELECT inet_server_port()");
    let frames = wire.execute_prepared("where");
    let port: u16 = support::first_value(&frames).unwrap().parse().unwrap();
    assert_ne!(port, c.primary.port);

    // A read-only transaction runs on one replica.
    wire.query("BEGIN READ ONLY");
    let first = port_of(&mut wire, "SELECT inet_server_port()");
    assert_ne!(first, c.primary.port);
    for _ in 0..5 {
        assert_eq!(port_of(&mut wire, "SELECT inet_server_port()"), first);
    }
    wire.query("COMMIT");

    // Everything that may write, and what asks for the primary.
    for sql in [
        "SELECT inet_server_port() FROM (SELECT nextval('items_id_seq')) s",
        "SELECT inet_server_port() FROM items LIMIT 1 FOR UPDATE",
        "SELECT inet_server_port() FROM items LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
        "WITH x AS (INSERT INTO items (note) VALUES ('cte') RETURNING id) SELECT inet_server_port() FROM x",
        "SELECT inet_server_port(); SELECT 1",
        "/* gatehouse:primary */ SELECT inet_server_port()",
        // A function of the application's own: it may write (and may set
        // session state, which pins this client to its primary connection).
        "SELECT inet_server_port() + bump() - 1",
    ] {
        for _ in 0..3 {
            assert_eq!(port_of(&mut wire, sql), c.primary.port, "{sql}");
        }
    }
    wire.query("BEGIN");
    assert_eq!(
        port_of(&mut wire, "SELECT inet_server_port()"),
        c.primary.port
    );
    wire.query("INSERT INTO items (note) VALUES ('in a transaction')");
    wire.query("COMMIT");

    // Virtual databases.
    let mut primary_only = db.wire_to("app_primary");
    let mut replicas_only = db.wire_to("app_replica");
    for _ in 0..5 {
        assert_eq!(
            port_of(&mut primary_only, "SELECT inet_server_port()"),
            c.primary.port
        );
        let port = port_of(
            &mut replicas_only,
            "SELECT inet_server_port() FROM (SELECT random()) s",
        );
        assert!(port == a.port || port == b.port, "{port}");
    }
    let reads = metric(
        &admin,
        "gatehouse_db_routed_transactions_total{reason=\"read\",target=\"replica\"}",
    )
    .unwrap();
    let writes = metric(
        &admin,
        "gatehouse_db_routed_transactions_total{reason=\"write\",target=\"primary\"}",
    )
    .unwrap();
    assert!(
        reads >= 400.0 && writes >= 15.0,
        "{reads} {writes}: {}",
        http_get(&admin, "/metrics")
            .1
            .lines()
            .filter(|l| l.contains("routed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let nodes = nodes(&admin);
    assert!(nodes.iter().all(|n| n["circuit"] == "closed"), "{nodes:?}");
    assert!(
        nodes
            .iter()
            .any(|n| n["role"] == "replica" && n["lag_bytes"].is_u64()),
        "{nodes:?}"
    );
}

#[test]
fn a_client_reads_its_own_writes_from_a_delayed_replica() {
    let c = cluster();
    // The delayed replica is within max_lag: other clients may read it.
    // (Other tests write to the cluster at the same time: no limit on bytes.)
    let (db, admin) = router(
        &[(&c.primary, 1), (&c.delayed, 1)],
        "max_lag = \"60s\"\nmax_lag_bytes = \"1GiB\"",
    );
    wait_for_roles(&admin, 1);
    let mut writer = db.wire();
    let mut other = db.wire();
    for round in 0..5 {
        let note = format!("own-{round}-{}", free_port());
        writer.query(&format!("INSERT INTO items (note) VALUES ('{note}')"));
        let seen = writer.row(&format!(
            "SELECT count(*), inet_server_port() FROM items WHERE note = '{note}'"
        ));
        assert_eq!(
            seen[0], "1",
            "the writer sees its row (read on {})",
            seen[1]
        );
        // Another connection is not held to that write: it may read the
        // replica, which has not applied it yet.
        let stale = other.row(&format!(
            "SELECT count(*), inet_server_port() FROM items WHERE note = '{note}'"
        ));
        assert_eq!(stale[1], c.delayed.port.to_string(), "{stale:?}");
        assert_eq!(stale[0], "0", "{stale:?}");
    }
    let ryw = metric(
        &admin,
        "gatehouse_db_routed_transactions_total{reason=\"read_your_writes\",target=\"primary\"}",
    )
    .unwrap();
    assert!(ryw >= 5.0, "{ryw}");

    // Per database: every client's reads wait for the last write.
    let (db, admin) = router(
        &[(&c.primary, 1), (&c.delayed, 1)],
        "max_lag = \"60s\"\nread_your_writes = \"database\"\nread_your_writes_window = \"10s\"",
    );
    wait_for_roles(&admin, 1);
    let mut writer = db.wire();
    let mut other = db.wire();
    let note = format!("shared-{}", free_port());
    writer.query(&format!("INSERT INTO items (note) VALUES ('{note}')"));
    let seen = other.row(&format!("SELECT count(*) FROM items WHERE note = '{note}'"));
    assert_eq!(seen[0], "1");
    // A writer pinned to its server connection (LISTEN) marks its writes
    // too.
    let mut pinned = db.wire();
    pinned.query("LISTEN nothing");
    let note = format!("pinned-{}", free_port());
    pinned.query(&format!("INSERT INTO items (note) VALUES ('{note}')"));
    let seen = other.row(&format!("SELECT count(*) FROM items WHERE note = '{note}'"));
    assert_eq!(seen[0], "1");

    // Beyond max_lag, nobody reads the delayed replica.
    let (db, admin) = router(&[(&c.primary, 1), (&c.delayed, 1)], "max_lag = \"1s\"");
    wait_for_roles(&admin, 1);
    let mut other = db.wire();
    // Writes every 100 ms keep the replica three seconds behind.
    let writing = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                app_sql(&c.primary, "INSERT INTO items (note) VALUES ('lagging')").unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let behind = wait_for(Duration::from_secs(10), || {
            nodes(&admin)
                .iter()
                .any(|n| n["role"] == "replica" && n["lag_seconds"].as_f64() > Some(1.5))
        });
        let ports: Vec<u16> = (0..5)
            .map(|_| port_of(&mut other, "SELECT inet_server_port()"))
            .collect();
        writing.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(behind, "{:?}", nodes(&admin));
        assert!(ports.iter().all(|p| *p == c.primary.port), "{ports:?}");
    });
    assert!(
        metric(
            &admin,
            "gatehouse_db_routed_transactions_total{reason=\"lag_fallback\",target=\"primary\"}"
        )
        .unwrap()
            >= 1.0
    );
}

/// pgbench -S for `seconds` through `db` with `clients`; its output.
fn pgbench_select(db: &GatehouseDb, seconds: u32, clients: u32) -> std::process::Output {
    std::process::Command::new("pgbench")
        .arg("-h")
        .arg(db.socket_dir.path())
        .args(["-p", &db.port.to_string(), "-U", APP_USER, "-n", "-S"])
        .args(["-T", &seconds.to_string(), "-c", &clients.to_string()])
        .arg(APP_DB)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .expect("pgbench is installed (apt-get install postgresql)")
}

#[test]
fn a_killed_replica_costs_no_transaction_and_comes_back() {
    let (primary, replicas) = own_cluster(2, |primary| {
        let pgbench = std::process::Command::new("pgbench")
            .args([
                "-i",
                "-s",
                "1",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
            ])
            .args(["-U", APP_USER, APP_DB])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap();
        assert!(
            pgbench.status.success(),
            "{}",
            String::from_utf8_lossy(&pgbench.stderr)
        );
    });
    let (db, admin) = router(
        &[(&primary, 1), (&replicas[0], 1), (&replicas[1], 1)],
        "failures_to_ban = 1\nban_time = \"1s\"",
    );
    wait_for_roles(&admin, 2);
    let bench = std::thread::scope(|scope| {
        let bench = scope.spawn(|| pgbench_select(&db, 6, 4));
        std::thread::sleep(Duration::from_secs(2));
        replicas[0].stop();
        bench.join().unwrap()
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&bench.stdout),
        String::from_utf8_lossy(&bench.stderr)
    );
    assert!(
        bench.status.success(),
        "pgbench failed: {text}\n{}",
        db.log()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!text.contains("aborted"), "{text}");
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    let down = nodes(&admin);
    assert!(
        down.iter()
            .any(|n| n["up"] == false && n["circuit"] != "closed"),
        "{down:?}"
    );

    // Back: reads reach it again.
    replicas[0].restart();
    wait_for_roles(&admin, 2);
    let mut wire = db.wire();
    assert!(
        wait_for(Duration::from_secs(10), || port_of(
            &mut wire,
            "SELECT inet_server_port()"
        ) == replicas[0].port),
        "{:?}",
        nodes(&admin)
    );
}

#[test]
fn a_promoted_replica_becomes_the_primary_and_no_acknowledged_write_is_lost() {
    let (primary, replicas) = own_cluster(2, |_| {});
    // Acknowledged means on both replicas too: nothing a promotion loses.
    primary.superuser_sql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (*)'");
    primary.superuser_sql("SELECT pg_reload_conf()");
    primary.superuser_sql(&format!(
        "ALTER ROLE {APP_USER} SET synchronous_commit = on"
    ));
    let (db, admin) = router(
        &[(&primary, 1), (&replicas[0], 1), (&replicas[1], 1)],
        "failover_timeout = \"30s\"",
    );
    wait_for_roles(&admin, 2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acknowledged, promoted_at, resumed_at) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut acknowledged = Vec::new();
            let mut times = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                if db
                    .psql(
                        APP_USER,
                        APP_PASSWORD,
                        &format!("INSERT INTO counter VALUES ({n})"),
                    )
                    .is_ok()
                {
                    acknowledged.push(n);
                    times.push(Instant::now());
                }
            }
            (acknowledged, times)
        });
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(http_get(&admin, "/ready").0, 200);
        primary.stop();
        // No primary: not ready, and writes wait.
        assert!(wait_for(Duration::from_secs(3), || http_get(
            &admin, "/ready"
        )
        .0 == 503));
        std::thread::sleep(Duration::from_millis(500));
        replicas[0].promote();
        let promoted_at = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (acknowledged, times) = writer.join().unwrap();
        let resumed_at = times.iter().copied().find(|t| *t > promoted_at);
        (acknowledged, promoted_at, resumed_at)
    });
    let resumed_at = resumed_at.expect("writes resumed after the promotion");
    assert!(
        resumed_at.duration_since(promoted_at) < Duration::from_secs(3),
        "writes resumed {:?} after the promotion\n{}",
        resumed_at.duration_since(promoted_at),
        db.log()
    );
    let stored: Vec<i64> = app_sql(&replicas[0], "SELECT n FROM counter ORDER BY n")
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    for n in &acknowledged {
        assert!(
            stored.contains(&i64::from(*n)),
            "write {n} acknowledged and lost"
        );
    }
    assert!(acknowledged.len() > 10, "{acknowledged:?}");
    let nodes = nodes(&admin);
    let new_primary = nodes.iter().find(|n| n["role"] == "primary").unwrap();
    assert_eq!(
        new_primary["address"],
        format!("127.0.0.1:{}", replicas[0].port)
    );
    assert!(metric(&admin, "gatehouse_db_failovers_total").unwrap() >= 1.0);
    assert_eq!(http_get(&admin, "/ready").0, 200);
    assert!(
        metric(
            &admin,
            "gatehouse_db_primary_waits_total{outcome=\"served\"}"
        )
        .unwrap()
            >= 1.0
    );
    // The replica left on the old timeline gets no reads.
    let mut wire = db.wire();
    for _ in 0..20 {
        assert_ne!(
            port_of(&mut wire, "SELECT inet_server_port()"),
            replicas[1].port,
            "{nodes:?}"
        );
    }
    assert!(db.log().contains("failover"), "{}", db.log());
}

#[test]
fn two_primaries_the_higher_timeline_wins_and_the_other_gets_nothing() {
    let (primary, mut replicas) = own_cluster(1, |_| {});
    let replica = replicas.remove(0);
    let (db, admin) = router(&[(&primary, 1), (&replica, 1)], "");
    wait_for_roles(&admin, 1);
    // Promoted while the old primary still runs: both accept writes.
    replica.promote();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let nodes = nodes(&admin);
            nodes.iter().any(|n| n["role"] == "refused")
                && nodes.iter().any(|n| {
                    n["role"] == "primary" && n["address"] == format!("127.0.0.1:{}", replica.port)
                })
        }),
        "{:?}",
        nodes(&admin)
    );
    let mut wire = db.wire();
    for _ in 0..10 {
        assert_eq!(
            port_of(&mut wire, "SELECT inet_server_port()"),
            replica.port
        );
        assert_eq!(
            port_of(
                &mut wire,
                "SELECT inet_server_port() FROM (SELECT nextval('items_id_seq')) s"
            ),
            replica.port
        );
    }
    assert!(db.log().contains("SPLIT BRAIN"), "{}", db.log());
}

/// Django answers a POST and the GET after it on different connections
/// (`CONN_MAX_AGE = 0`, its default, opens one per request): with `read_your_writes = "database"` the GET sees the new story even
/// with the only replica applying WAL three seconds late.
#[test]
fn django_reads_its_own_post_through_the_gateway_and_a_delayed_replica() {
    let c = cluster();
    c.primary
        .superuser_sql(&format!("CREATE DATABASE {DJANGO_DB} OWNER {APP_USER}"));
    assert!(wait_for(Duration::from_secs(15), || app_sql_on(
        &c.delayed, DJANGO_DB, "SELECT 1"
    )
    .is_ok()));
    let (db, admin) = router(
        &[(&c.primary, 1), (&c.delayed, 1)],
        "max_lag = \"60s\"\nread_your_writes = \"database\"\nread_your_writes_window = \"10s\"",
    );
    wait_for_roles(&admin, 1);
    let host = db.socket_dir.path().display().to_string();
    let port = db.port.to_string();
    let gunicorn = harness::Gunicorn::start_with_env(
        2,
        &[
            ("DB_NAME", DJANGO_DB),
            ("DB_USER", APP_USER),
            ("DB_PASSWORD", APP_PASSWORD),
            ("DB_HOST", host.as_str()),
            ("DB_PORT", port.as_str()),
            ("DB_CONN_MAX_AGE", "0"),
        ],
    );
    let gateway = harness::Gatehouse::start(&format!(
        "routes = []\n[server]\nworkers = 2\n\n[upstream.health_check]\nenabled = false\n\n\
         [[upstream.servers]]\nurl = \"{}\"\n\n[ratelimit]\nenabled = false\n",
        gunicorn.upstream_url()
    ));
    // Past the seed data's writes: the replica is three seconds behind
    // whatever is written next.
    std::thread::sleep(Duration::from_secs(4));
    for round in 0..6 {
        let title = format!("read your own post {round}");
        let body = format!("{{\"title\": \"{title}\", \"author_id\": 1}}");
        let (status, headers, created) = harness::curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
            &gateway.url("/v1/stories/"),
        ]);
        assert_eq!(status, 201, "{created}");
        let location = harness::header_line(&headers, "location")
            .unwrap()
            .trim()
            .to_string();
        let (status, _, story) = harness::curl(&[&gateway.url(&location)]);
        assert_eq!(status, 200, "{location}: {story}");
        assert_eq!(harness::json(story.as_bytes())["title"], title.as_str());
    }
    let ryw = metric(
        &admin,
        "gatehouse_db_routed_transactions_total{reason=\"read_your_writes\",target=\"primary\"}",
    )
    .unwrap_or(0.0);
    assert!(ryw >= 6.0, "{ryw}");
}

/// A write refused as read-only (25006) by the node taken for the primary
/// makes the monitor ask every node at once, long before its next round.
#[test]
fn a_read_only_refusal_from_the_primary_finds_the_new_one_at_once() {
    let (primary, mut replicas) = own_cluster(1, |_| {});
    let replica = replicas.remove(0);
    let (db, admin) = router(
        &[(&primary, 1), (&replica, 1)],
        "topology_interval = \"60s\"",
    );
    wait_for_roles(&admin, 1);
    let mut wire = db.wire();
    assert_eq!(
        port_of(
            &mut wire,
            "INSERT INTO counter VALUES (1) RETURNING inet_server_port()"
        ),
        primary.port
    );
    // Behind the monitor's back: the replica promoted, the old primary
    // back as a standby.
    replica.promote();
    primary.restart_as_standby();
    let refused = wire.query("INSERT INTO counter VALUES (2)");
    assert_eq!(support::sqlstate_of(&refused).as_deref(), Some("25006"));
    assert!(
        wait_for(Duration::from_secs(5), || {
            let frames = wire.query("INSERT INTO counter VALUES (3) RETURNING inet_server_port()");
            support::first_value(&frames) == Some(replica.port.to_string())
        }),
        "{:?}\n{}",
        nodes(&admin),
        db.log()
    );
}
