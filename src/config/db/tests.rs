use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use super::*;

struct FakeEnv(HashMap<&'static str, &'static str>);

impl EnvSource for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.to_string())
    }
}

fn env(pairs: &[(&'static str, &'static str)]) -> FakeEnv {
    FakeEnv(pairs.iter().copied().collect())
}

fn load(text: &str, vars: &[(&'static str, &'static str)]) -> Result<DbConfig, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    DbConfig::load(Some(file.path()), &DbOverrides::default(), &env(vars))
}

#[test]
fn shipped_file_is_valid_and_has_the_seed_pool() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/db.toml");
    let config = DbConfig::load(Some(&path), &DbOverrides::default(), &env(&[])).unwrap();
    assert_eq!(
        config.socket_path(),
        PathBuf::from("/run/gatehouse/.s.PGSQL.6432")
    );
    assert_eq!(config.socket_mode, 0o660);
    assert_eq!(
        (config.pool.min_connections, config.pool.max_connections),
        (10, 50)
    );
    assert_eq!(config.pool.statement_timeout, Duration::from_secs(30));
    assert_eq!(config.users[0].auth, AuthMethod::Trust);
    assert_eq!(config.users[0].trusted_uids, [33]);
    assert_eq!(config.databases[0].pool_mode, PoolMode::Transaction);
}

#[test]
fn seed_names_add_the_database_user_and_primary() {
    let config = load(
        "",
        &[
            ("DB_NAME", "shop"),
            ("DB_USER", "web"),
            ("DB_PASSWORD", "s3cret"),
            ("DB_PRIMARY_HOST", "db1.internal"),
            ("DB_PORT", "5433"),
        ],
    )
    .unwrap();
    assert_eq!(config.databases[0].name, "shop");
    assert_eq!(config.users[0].name, "web");
    assert_eq!(config.users[0].secret, Some(Secret::Clear("s3cret".into())));
    assert_eq!(config.users[0].server_password.as_deref(), Some("s3cret"));
    assert_eq!(
        config.primary,
        Node::Tcp {
            host: "db1.internal".into(),
            port: 5433
        }
    );
}

#[test]
fn stored_secrets_are_recognised_and_checked_against_the_method() {
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let md5 = postgres_protocol::password::md5(b"pw", "u");
    let text = format!(
        "[[databases]]\nname = \"d\"\n\n[[users]]\nname = \"a\"\npassword = \"{verifier}\"\n\n\
         [[users]]\nname = \"b\"\nauth = \"md5\"\npassword = \"{md5}\"\n"
    );
    let config = load(&text, &[]).unwrap();
    assert!(matches!(config.users[0].secret, Some(Secret::Scram(_))));
    assert_eq!(config.users[0].server_password, None);
    assert_eq!(config.users[1].secret, Some(Secret::Md5(md5.clone())));

    let wrong =
        format!("[[databases]]\nname = \"d\"\n\n[[users]]\nname = \"a\"\npassword = \"{md5}\"\n");
    let err = load(&wrong, &[]).unwrap_err();
    assert_eq!(err.problems[0].key, "users[0].password");
    assert_eq!(err.problems[0].line, Some(6));
}

#[test]
fn problems_name_file_line_and_key() {
    let err = load(
        "[server]\nsocket_mode = \"999\"\n\n[pool]\nmax_conections = 5\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(err.problems[0].key, "pool.max_conections");
    assert_eq!(err.problems[0].line, Some(5));
    let err = load(
        "[server]\nsocket_mode = \"999\"\n\n[[databases]]\nname = \"d\"\npool_mode = \"statement\"\n",
        &[],
    )
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"server.socket_mode"), "{keys:?}");
    assert!(keys.contains(&"databases[0].pool_mode"), "{keys:?}");
    assert!(keys.contains(&"users"), "{keys:?}");
}

#[test]
fn the_primary_is_a_host_port_a_directory_or_a_uri() {
    let tcp = |host: &str, port| Node::Tcp {
        host: host.into(),
        port,
    };
    for (text, node) in [
        ("db1", tcp("db1", 5432)),
        ("db1:5433", tcp("db1", 5433)),
        ("10.0.0.5:6000", tcp("10.0.0.5", 6000)),
        ("[::1]:5433", tcp("::1", 5433)),
        ("::1", tcp("::1", 5432)),
        (
            "/var/run/postgresql",
            Node::Socket {
                dir: "/var/run/postgresql".into(),
                port: 5432,
            },
        ),
        ("postgresql://db1:5433/shop", tcp("db1", 5433)),
        ("postgres://db1", tcp("db1", 5432)),
        (
            "postgresql://%2Fvar%2Frun%2Fpostgresql:5434/shop",
            Node::Socket {
                dir: "/var/run/postgresql".into(),
                port: 5434,
            },
        ),
        (
            "postgresql:///shop?host=/tmp/pg&port=5999",
            Node::Socket {
                dir: "/tmp/pg".into(),
                port: 5999,
            },
        ),
    ] {
        assert_eq!(Primary::parse(text, 5432).unwrap().node, node, "{text}");
    }
    let uri = Primary::parse(
        "postgresql://web:p%40ss:word@db1:5433/shop?sslmode=prefer",
        5432,
    )
    .unwrap();
    assert_eq!(uri.user.as_deref(), Some("web"));
    assert_eq!(uri.password.as_deref(), Some("p@ss:word"));
    assert_eq!(uri.database.as_deref(), Some("shop"));
}

#[test]
fn a_bad_primary_is_refused_without_its_password() {
    for (text, expected) in [
        ("db1:bad", "`bad` is not a port"),
        ("db1:0", "`0` is not a port"),
        ("db1:99999", "`99999` is not a port"),
        ("http://db1", "only postgresql:// URIs"),
        ("postgresql://[::1]:5433/app?port=x", "`x` is not a port"),
        ("db 1", "give host:port"),
        ("", "give host:port"),
        ("postgresql://u:hunter2@db1:bad/shop", "`bad` is not a port"),
        (
            "postgresql://u:hunter2@db1/shop?sslmode=require",
            "does not use TLS",
        ),
        (
            "postgresql://u:hunter2@db1/shop?target_session_attrs=any",
            "not supported",
        ),
        ("postgresql://u:hunter2@db1,db2/shop", "one primary"),
        ("postgresql://u:hunter2@db1/sh%zzop", "two hex digits"),
    ] {
        let message = Primary::parse(text, 5432).unwrap_err();
        assert!(message.contains(expected), "{text}: {message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
    // As a flag, the error names the flag; the old port is not kept.
    let overrides = DbOverrides {
        primary: Some("db1:bad".into()),
        ..DbOverrides::default()
    };
    let error = DbConfig::load(None, &overrides, &env(&[])).unwrap_err();
    assert!(error.to_string().contains("--primary"), "{error}");
    // In the file, the error names the key and its line.
    let error = load(
        "[primary]\nhost = \"postgresql://u:hunter2@db1:x/app\"\n",
        &[],
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("primary.host") && text.contains(":2"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn a_uri_brings_its_user_and_database() {
    let overrides = DbOverrides {
        primary: Some("postgresql://shop:s3cret@db1:5433/orders".into()),
        ..DbOverrides::default()
    };
    let config = DbConfig::load(None, &overrides, &env(&[])).unwrap();
    assert_eq!(
        config.primary,
        Node::Tcp {
            host: "db1".into(),
            port: 5433
        }
    );
    let user = config.users.iter().find(|u| u.name == "shop").unwrap();
    assert_eq!(user.server_password.as_deref(), Some("s3cret"));
    assert!(config.databases.iter().any(|d| d.name == "orders"));
}

#[test]
fn embedded_defaults_are_the_shipped_file() {
    let embedded = DbConfig::load(None, &DbOverrides::default(), &env(&[])).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/db.toml");
    let shipped = DbConfig::load(Some(&path), &DbOverrides::default(), &env(&[])).unwrap();
    assert_eq!(embedded, shipped);
    assert_eq!(embedded.socket_group.as_deref(), Some("www-data"));
    assert_eq!(embedded.users[0].trusted_uids, [33]);
}

#[test]
fn trust_for_everyone_is_refused_on_tcp_unless_asked_for() {
    let base = "[server]\nlisten = \"127.0.0.1:6432\"\n\n[[databases]]\nname = \"app\"\n\n\
                [[users]]\nname = \"web\"\nauth = \"trust\"\n";
    let error = load(base, &[]).unwrap_err().to_string();
    assert!(
        error.contains("users[0].auth") && error.contains("trust_over_tcp"),
        "{error}"
    );
    assert!(load(&format!("{base}trust_over_tcp = true\n"), &[]).is_ok());
    assert!(load(&format!("{base}trusted_uids = [33]\n"), &[]).is_ok());
    // On the socket alone, trust needs no more.
    let socket_only = base.replace("listen = \"127.0.0.1:6432\"", "listen = \"\"");
    assert!(load(&socket_only, &[]).is_ok());
}

#[test]
fn nodes_come_from_the_file_and_the_seed_names() {
    let config = load(
        "[[users]]\nname = \"u\"\npassword = \"p\"\n[[databases]]\nname = \"d\"\n\
         [[nodes]]\nhost = \"10.0.0.2\"\nweight = 3\n",
        &[
            ("DB_PRIMARY_HOST", "10.0.0.1"),
            ("DB_PORT", "5433"),
            ("DB_REPLICA_1_HOST", "10.0.0.3"),
            ("DB_REPLICA_2_HOST", "10.0.0.4"),
            // A gap ends the list.
            ("DB_REPLICA_4_HOST", "10.0.0.9"),
        ],
    )
    .unwrap();
    let nodes: Vec<(String, u32)> = config
        .nodes
        .iter()
        .map(|n| (n.node.to_string(), n.weight))
        .collect();
    assert_eq!(
        nodes,
        [
            ("10.0.0.1:5433".to_string(), 1),
            ("10.0.0.2:5432".to_string(), 3),
            ("10.0.0.3:5433".to_string(), 1),
            ("10.0.0.4:5433".to_string(), 1),
        ]
    );
    assert_eq!(config.router.topology_interval, Duration::from_secs(1));
    assert_eq!(config.router.failover_timeout, Duration::from_secs(30));
    assert_eq!(config.router.read_your_writes, ReadYourWrites::Connection);
    assert_eq!(config.resolve("d_replica"), ("d", Routing::Replica));
    assert_eq!(config.resolve("d_primary"), ("d", Routing::Primary));
    assert_eq!(config.resolve("d"), ("d", Routing::Auto));
    assert_eq!(config.resolve("x_replica"), ("x_replica", Routing::Auto));
}

#[test]
fn bad_nodes_and_router_settings_name_their_line() {
    let text = "[[users]]\nname = \"u\"\npassword = \"p\"\n[[databases]]\nname = \"d\"\n\
                [[nodes]]\nhost = \"postgresql://u:secret@h/d\"\n\
                [[nodes]]\nhost = \"127.0.0.1\"\nport = 5432\n\
                [router]\nread_your_writes = \"sometimes\"\nfailures_to_ban = 0\n\
                monitor_user = \"nobody\"\n";
    let message = load(text, &[]).unwrap_err().to_string();
    for expected in [
        ":7: `nodes[0].host`",
        "nodes[1].host",
        "listed twice",
        "router.read_your_writes",
        "`sometimes`",
        "router.failures_to_ban",
        "router.monitor_user",
    ] {
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert!(!message.contains("secret"), "{message}");
}
