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
