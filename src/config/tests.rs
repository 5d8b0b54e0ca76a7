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

#[test]
fn limits_live_with_their_route() {
    let config = load(
        "[[routes]]\nname = \"login\"\nmethods = [\"post\"]\npath_pattern = \"/v1/auth/login/\"\n\
         [[routes.limits]]\nlimit = 5\nscope = \"ip\"\nalgorithm = \"sliding_log\"\n\
         [[routes.limits]]\nname = \"login-all\"\nlimit = 100\nscope = \"global\"\n",
    )
    .expect("valid");
    let route = &config.routes[0];
    assert_eq!(route.methods, [http::Method::POST]);
    let names: Vec<&str> = route
        .limits
        .iter()
        .map(|i| config.ratelimit.endpoints[*i].name.as_str())
        .collect();
    assert_eq!(names, ["login", "login-all"]);
}

#[test]
fn a_second_unnamed_limit_on_a_route_is_refused() {
    let err = load(
        "[[routes]]\nname = \"a\"\npath_prefix = \"/a/\"\n[[routes.limits]]\nlimit = 5\n\
         [[routes.limits]]\nlimit = 6\n",
    )
    .expect_err("two rules named a");
    assert_eq!(err.problems[0].key, "routes[0].limits[1].name");
    assert!(err.problems[0].message.contains("give this limit a `name`"));
}

#[test]
fn the_old_endpoint_shape_is_refused_with_the_new_one_shown() {
    let err = load(
        "[ratelimit]\nper_user = 5\n\n[[ratelimit.endpoints]]\nname = \"search\"\n\
         path_prefix = \"/v1/search/\"\nlimit = 20\n",
    )
    .expect_err("old shape");
    let problem = &err.problems[0];
    assert_eq!(problem.key, "ratelimit.endpoints");
    assert_eq!(problem.line, Some(4));
    assert!(problem.message.contains("[[routes.limits]]"), "{problem}");
}

#[test]
fn session_verification_needs_what_it_checks_with() {
    let err = load("[identity.session]\nverify = \"signed_cookies\"\n").expect_err("no key");
    assert_eq!(err.problems[0].key, "identity.session.secret_key");
    let err = load("[identity.session]\nverify = \"redis\"\n").expect_err("no redis");
    assert_eq!(err.problems[0].key, "identity.session.verify");
    let err = load("[identity.session]\nverify = \"maybe\"\n").expect_err("unknown");
    assert_eq!(err.problems[0].line, Some(2));
    let config = load(
        "[identity.session]\nverify = \"signed_cookies\"\nsecret_key = \"k\"\n\
         secret_key_fallbacks = [\"old\"]\n",
    )
    .expect("valid");
    assert_eq!(
        config.identity.session.unwrap().verify,
        identity::SessionVerify::SignedCookies {
            secret_keys: vec![b"k".to_vec(), b"old".to_vec()],
            max_age: Duration::from_secs(1_209_600),
        }
    );
}

#[test]
fn real_ip_header_is_one_of_two() {
    let config = load("[server]\nreal_ip_header = \"Forwarded\"\n").expect("valid");
    assert_eq!(
        config.server.real_ip_header,
        crate::net::RealIpHeader::Forwarded
    );
    let err = load("[server]\nreal_ip_header = \"x-real-ip\"\n").expect_err("unsupported");
    assert_eq!(err.problems[0].key, "server.real_ip_header");
}

#[test]
fn an_unknown_key_does_not_hide_the_other_problems() {
    let err = load(
        "[server]\nlisten = \"127.0.0.1:8080\"\nlisten_backlog = 5\n\n[upstream]\nretries = \"many\"\n\
         conect_timeout = \"1s\"\n\n[ratelimit]\nglobal = 0\n",
    )
    .expect_err("four problems");
    let found: Vec<(&str, Option<usize>)> = err
        .problems
        .iter()
        .map(|p| (p.key.as_str(), p.line))
        .collect();
    for expected in [
        ("server.listen_backlog", Some(3)),
        ("upstream.retries", Some(6)),
        ("upstream.conect_timeout", Some(7)),
        ("ratelimit.global", Some(10)),
    ] {
        assert!(found.contains(&expected), "{expected:?} in {found:?}");
    }
}
