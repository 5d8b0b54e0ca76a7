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

fn no_env() -> FakeEnv {
    FakeEnv(HashMap::new())
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("write");
    file
}

fn load(text: &str) -> Result<Config, ConfigError> {
    let file = write(text);
    Config::load_with_env(Some(file.path()), &Overrides::default(), &no_env())
}

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[test]
fn shipped_file_equals_embedded_defaults() {
    let from_file = Config::load_with_env(
        Some(&repo_file("config/gateway.toml")),
        &Overrides::default(),
        &no_env(),
    )
    .expect("config/gateway.toml is valid");
    let embedded =
        Config::load_with_env(None, &Overrides::default(), &no_env()).expect("defaults are valid");
    assert_eq!(from_file, embedded);
    assert_eq!(embedded.server.listen, "0.0.0.0:80".parse().unwrap());
    assert_eq!(
        embedded.admin_listen,
        Some("127.0.0.1:9091".parse().unwrap())
    );
    assert_eq!(
        embedded.upstream.servers[0].target,
        UpstreamTarget::Tcp {
            authority: "127.0.0.1:8000".into()
        }
    );
    assert_eq!(embedded.ratelimit.per_user, 100);
    assert_eq!(embedded.ratelimit.global, 10_000);
    assert_eq!(embedded.cache.l1_max_entries, 1000);
}

#[test]
fn misspelt_key_names_file_line_and_key() {
    let file =
        write("[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstream]\nconect_timeout = \"1s\"\n");
    let err = Config::load_with_env(Some(file.path()), &Overrides::default(), &no_env())
        .expect_err("misspelt key must fail");
    let problem = &err.problems[0];
    assert_eq!(problem.origin, file.path().display().to_string());
    assert_eq!(problem.line, Some(5));
    assert_eq!(problem.key, "upstream.conect_timeout");
    let shown = err.to_string();
    assert!(
        shown.contains(":5: `upstream.conect_timeout`: unknown key"),
        "{shown}"
    );
}

#[test]
fn invalid_values_are_all_reported_with_lines() {
    let err = load(
        "[server]\nlisten = \"nowhere\"\ntrusted_proxies = [\"10.0.0.0/8\", \"banana\"]\n\n\
         [[upstream.servers]]\nurl = \"http://a:1\"\n\n[[upstream.servers]]\nurl = \"ftp://b\"\nweight = 0\n",
    )
    .expect_err("invalid values");
    let keys: Vec<(&str, Option<usize>)> = err
        .problems
        .iter()
        .map(|p| (p.key.as_str(), p.line))
        .collect();
    assert!(keys.contains(&("server.listen", Some(2))), "{keys:?}");
    assert!(
        keys.contains(&("server.trusted_proxies[1]", Some(3))),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("upstream.servers[1].weight", Some(10))),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("upstream.servers[1].url", Some(9))),
        "{keys:?}"
    );
}

#[test]
fn wrong_type_names_the_key() {
    let err = load("[upstream]\nretries = \"many\"\n").expect_err("wrong type");
    assert_eq!(err.problems[0].key, "upstream.retries");
    assert_eq!(err.problems[0].line, Some(2));
}

#[test]
fn duplicate_routes_are_rejected() {
    let err = load(
        "[[routes]]\nname = \"a\"\npath_prefix = \"/x/\"\n\n[[routes]]\nname = \"b\"\npath_prefix = \"/x/\"\n",
    )
    .expect_err("duplicate prefix");
    assert_eq!(err.problems[0].key, "routes[1].path_prefix");
    assert_eq!(err.problems[0].line, Some(7));
}

#[test]
fn seed_environment_names_apply() {
    let env = FakeEnv(HashMap::from([
        ("RATE_LIMIT_PER_USER", "7"),
        ("RATE_LIMIT_GLOBAL", "70"),
        ("RATE_LIMIT_WINDOW", "30"),
        ("CACHE_TTL_DEFAULT", "120"),
        ("CACHE_TTL_STORIES", "5"),
        ("CACHE_TTL_USERS", "6"),
        ("CACHE_L1_SIZE", "10"),
        ("CACHE_L1_TTL", "9"),
        ("REDIS_HOST", "cache.internal"),
        ("REDIS_PORT", "6380"),
        ("REDIS_PASSWORD", "s3cret"),
        ("REDIS_DB", "2"),
        ("METRICS_PORT", "9999"),
    ]));
    let config = Config::load_with_env(None, &Overrides::default(), &env).expect("valid");
    assert_eq!(config.ratelimit.per_user, 7);
    assert_eq!(config.ratelimit.global, 70);
    assert_eq!(config.ratelimit.window, Duration::from_secs(30));
    assert_eq!(config.cache.default_ttl, Duration::from_secs(120));
    assert_eq!(config.cache.l1_max_entries, 10);
    assert_eq!(config.cache.l1_ttl, Duration::from_secs(9));
    let ttl = |name: &str| {
        config
            .routes
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .cache_ttl
    };
    assert_eq!(ttl("stories"), Some(Duration::from_secs(5)));
    assert_eq!(ttl("users"), Some(Duration::from_secs(6)));
    assert_eq!(
        config.redis,
        Some(RedisConfig {
            url: "redis://:s3cret@cache.internal:6380/2".into(),
            cluster_nodes: Vec::new(),
        })
    );
    assert_eq!(config.admin_listen, Some("127.0.0.1:9999".parse().unwrap()));

    let off = FakeEnv(HashMap::from([("ENABLE_METRICS", "false")]));
    let config = Config::load_with_env(None, &Overrides::default(), &off).expect("valid");
    assert_eq!(config.admin_listen, None);
}

#[test]
fn bad_seed_value_names_the_variable() {
    let env = FakeEnv(HashMap::from([("RATE_LIMIT_PER_USER", "lots")]));
    let err = Config::load_with_env(None, &Overrides::default(), &env).expect_err("bad value");
    assert_eq!(
        err.problems[0].origin,
        "environment variable RATE_LIMIT_PER_USER"
    );
}

#[test]
fn flags_override_the_file() {
    let file = write("[server]\nlisten = \"127.0.0.1:1\"\n");
    let overrides = Overrides {
        listen: Some("127.0.0.1:2".into()),
        admin_listen: Some("127.0.0.1:3".into()),
        upstreams: vec![
            "unix:/run/gunicorn.sock".into(),
            "http://10.0.0.5:8001".into(),
        ],
    };
    let config = Config::load_with_env(Some(file.path()), &overrides, &no_env()).expect("valid");
    assert_eq!(config.server.listen, "127.0.0.1:2".parse().unwrap());
    assert_eq!(config.admin_listen, Some("127.0.0.1:3".parse().unwrap()));
    assert_eq!(
        config.upstream.servers[0].target,
        UpstreamTarget::Unix {
            path: "/run/gunicorn.sock".into()
        }
    );
    assert_eq!(
        config.upstream.servers[1].target.to_string(),
        "http://10.0.0.5:8001"
    );
}

#[test]
fn missing_file_is_an_error() {
    let err = Config::load_with_env(
        Some(std::path::Path::new("/nonexistent/gateway.toml")),
        &Overrides::default(),
        &no_env(),
    )
    .expect_err("missing file");
    assert!(err.to_string().contains("/nonexistent/gateway.toml"));
}
