//! Configuration, shared by both services: the raw TOML shape (`raw`), units
//! (`units`), where values may come from (file, `GATEHOUSE_*` and the seed's
//! environment names, command-line flags), located problems, reload, and
//! `check-config`. Each service's validated configuration has its module:
//! [`gateway`] (with `identity`, `ratelimit` and `route`) and [`db`].
//!
//! Precedence, lowest first: embedded defaults < the TOML file <
//! `GATEHOUSE_SECTION__KEY` < seed names (`RATE_LIMIT_*`, `CACHE_*`,
//! `REDIS_*`, `METRICS_PORT`, `ENABLE_METRICS`) < command-line flags.
//! Every problem names its origin: file and line, or the environment variable.

pub mod db;
pub mod gateway;
pub mod identity;
pub mod ratelimit;
pub mod raw;
pub mod route;
pub mod units;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::Serialized;
use http::Method;
use ipnet::IpNet;

pub use gateway::{
    CacheConfig, Config, HealthCheck, Overrides, RedisConfig, ServerConfig, UpstreamConfig,
    UpstreamServer, UpstreamTarget,
};
pub use identity::IdentityConfig;
pub use ratelimit::RatelimitConfig;
pub use route::Route;

/// One problem with a configuration, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file, environment variable or flag the bad value came from.
    pub origin: String,
    /// 1-based line in `origin` when it is a file.
    pub line: Option<usize>,
    /// Dotted key, such as `upstream.servers[1].weight`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.origin, line)?,
            None => write!(f, "{}: ", self.origin)?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one load; the config is used only when there are none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl ConfigError {
    fn one(origin: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![ConfigProblem {
                origin: origin.into(),
                line: None,
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    pub access_log_path: Option<PathBuf>,
}

/// Where the process environment comes from; tests pass their own.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A checked configuration file: the gateway's or `gatehouse db`'s.
#[derive(Debug)]
pub enum Checked {
    Gateway(Box<Config>),
    Db(Box<db::DbConfig>),
}

/// A reload, for either service: load the file again (`load`) and return the
/// new configuration with the file's name, or, when it is invalid, log each
/// problem, count an `error` in `reloads`, and return `None` so that the
/// running configuration stays.
pub fn reloaded<T>(
    path: Option<&Path>,
    reloads: &prometheus::IntCounterVec,
    load: impl FnOnce() -> Result<T, ConfigError>,
) -> Option<(T, String)> {
    let file = path.map_or_else(
        || "embedded defaults".to_string(),
        |p| p.display().to_string(),
    );
    match load() {
        Ok(config) => Some((config, file)),
        // Said before it is counted: whoever sees the count can read why.
        Err(e) => {
            for problem in &e.problems {
                tracing::error!(%file, %problem, "reload rejected; keeping the running configuration");
            }
            reloads.with_label_values(&["error"]).inc();
            None
        }
    }
}

/// A reload applied: say so, then count it.
pub fn reload_applied(reloads: &prometheus::IntCounterVec, file: &str) {
    tracing::info!(%file, "configuration reloaded");
    reloads.with_label_values(&["ok"]).inc();
}

/// Validate a file for `check-config`. A file with `[primary]`,
/// `[[users]]`, `[[databases]]` or `[pool]` is a `gatehouse db` file.
pub fn check_file(path: &Path) -> Result<Checked, ConfigError> {
    let source = SourceFile::read(path)?;
    let is_db = toml_edit::Document::parse(source.text.as_str())
        .map(|doc| {
            ["primary", "users", "databases", "pool"]
                .iter()
                .any(|k| doc.as_table().contains_key(k))
        })
        .unwrap_or(false);
    if is_db {
        db::DbConfig::load(Some(path), &db::DbOverrides::default(), &ProcessEnv)
            .map(|c| Checked::Db(Box::new(c)))
    } else {
        Config::load(Some(path), &Overrides::default()).map(|c| Checked::Gateway(Box::new(c)))
    }
}

/// A config file's name and text, kept to point problems at their line.
struct SourceFile {
    name: String,
    text: String,
}

impl SourceFile {
    fn read(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(&name, "", format!("cannot read: {e}")))?;
        Ok(SourceFile { name, text })
    }

    /// The 1-based line of a dotted key path (`["upstream", "servers", "1", "weight"]`).
    fn line_of(&self, path: &[String]) -> Option<usize> {
        let doc = toml_edit::Document::parse(self.text.as_str()).ok()?;
        let mut item = doc.as_item();
        let mut span = None;
        for segment in path {
            let next = match segment.parse::<usize>() {
                Ok(index) => item.get(index),
                Err(_) => {
                    if let Some(key) = item.as_table_like().and_then(|t| t.key(segment)) {
                        span = key.span().or(span);
                    }
                    item.get(segment.as_str())
                }
            };
            match next {
                Some(next) => {
                    item = next;
                    span = item.span().or(span);
                }
                None => break,
            }
        }
        let offset = span?.start;
        Some(self.text[..offset].matches('\n').count() + 1)
    }
}

fn dotted(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

fn locate(source: Option<&SourceFile>, key: String, message: String) -> ConfigProblem {
    let path = split_key(&key);
    ConfigProblem {
        origin: source.map_or_else(|| "configuration".to_string(), |s| s.name.clone()),
        line: source.and_then(|s| s.line_of(&path)),
        key,
        message,
    }
}

/// `upstream.servers[1].weight` → `["upstream", "servers", "1", "weight"]`.
fn split_key(key: &str) -> Vec<String> {
    key.replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The key an extraction error is about, the unknown field included.
fn error_path(e: &figment::Error) -> Vec<String> {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind {
        // figment includes the field in the path on some versions only.
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    path
}

/// Deserialize the merged sources into `T`, reporting every key that does
/// not fit, not only the first (serde stops at the first): a key that fails
/// is reported, taken out, and the rest tried again. Returns what remains
/// (so that its values can be validated too) and the problems.
fn extract_all<T: serde::de::DeserializeOwned>(
    figment: &Figment,
    source: Option<&SourceFile>,
) -> (Option<T>, Vec<ConfigProblem>) {
    let mut errors = match figment.extract::<T>() {
        Ok(raw) => return (Some(raw), Vec::new()),
        Err(errors) => errors,
    };
    let Ok(mut value) = figment.extract::<figment::value::Value>() else {
        return (None, from_figment(errors, source).problems);
    };
    let mut problems = Vec::new();
    // Each round removes at least one key; a file has far fewer than this.
    for _ in 0..256 {
        let found: Vec<figment::Error> = errors
            .into_iter()
            .map(|mut e| {
                // Later rounds read a merged copy: ask the real sources
                // whether the key came from the environment.
                if let Some(meta) = figment.find_metadata(&e.path.join(".")) {
                    e.metadata = Some(meta.clone());
                }
                e
            })
            .collect();
        let mut removed = false;
        for e in &found {
            removed |= remove_key(&mut value, &error_path(e));
        }
        problems.extend(found.into_iter().map(|e| problem_of(e, source)));
        if !removed {
            break;
        }
        match Figment::from(Serialized::defaults(&value)).extract::<T>() {
            Ok(rest) => return (Some(rest), problems),
            Err(next) => errors = next,
        }
    }
    (None, problems)
}

/// Validation problems after extraction problems, all located; the value
/// only when there are none.
fn all_problems<T>(
    extracted: Vec<ConfigProblem>,
    validated: Result<T, Vec<ConfigProblem>>,
) -> Result<T, ConfigError> {
    match validated {
        Ok(config) if extracted.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError {
            problems: extracted,
        }),
        Err(more) => Err(ConfigError {
            problems: extracted.into_iter().chain(more).collect(),
        }),
    }
}

/// Take `path` out of a merged configuration value; whether it was there.
fn remove_key(value: &mut figment::value::Value, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        node = match node {
            Value::Dict(_, dict) => match dict.get_mut(segment) {
                Some(next) => next,
                None => return false,
            },
            Value::Array(_, items) => {
                match segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match node {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        Value::Array(_, items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn from_figment(error: figment::Error, source: Option<&SourceFile>) -> ConfigError {
    ConfigError {
        problems: error.into_iter().map(|e| problem_of(e, source)).collect(),
    }
}

fn problem_of(e: figment::Error, source: Option<&SourceFile>) -> ConfigProblem {
    let path = error_path(&e);
    let message = match &e.kind {
        figment::error::Kind::UnknownField(_, expected) => {
            format!("unknown key (expected one of: {})", expected.join(", "))
        }
        kind => kind.to_string(),
    };
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    if from_env {
        let var = e
            .metadata
            .as_ref()
            .map(|m| m.interpolate(&figment::Profile::Default, &path))
            .unwrap_or_default();
        ConfigProblem {
            origin: format!("environment variable {}", var.to_uppercase()),
            line: None,
            key: dotted(&path),
            message,
        }
    } else {
        ConfigProblem {
            origin: source.map_or_else(|| "configuration".into(), |s| s.name.clone()),
            line: source.and_then(|s| s.line_of(&path)),
            key: dotted(&path),
            message,
        }
    }
}

fn env_number(env: &dyn EnvSource, name: &str) -> Result<Option<u64>, ConfigError> {
    env.var(name)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ConfigError::one(
                    format!("environment variable {name}"),
                    "",
                    format!("`{v}` is not a whole number"),
                )
            })
        })
        .transpose()
}

/// Seed durations are whole seconds (`RATE_LIMIT_WINDOW=60`); a unit is also accepted.
fn env_duration(env: &dyn EnvSource, name: &str) -> Result<Option<String>, ConfigError> {
    Ok(env.var(name).map(|v| {
        let v = v.trim().to_string();
        if v.chars().all(|c| c.is_ascii_digit()) {
            format!("{v}s")
        } else {
            v
        }
    }))
}

/// Problems as (dotted key, message); `locate` adds the file and line.
type Problems = Vec<(String, String)>;

fn socket_addr(key: &str, text: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match text.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Some(addr),
        _ => {
            problems.push((
                key.into(),
                format!("`{text}` is not an address such as 127.0.0.1:8080"),
            ));
            None
        }
    }
}

fn positive(key: &str, value: Duration, problems: &mut Problems) {
    if value.is_zero() {
        problems.push((key.into(), "must be greater than zero".into()));
    }
}

/// A host as the cache keys it: lower case, without a trailing dot or the
/// default port.
pub fn normalise_host(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let host = host.strip_suffix(":80").unwrap_or(&host);
    host.strip_suffix('.').unwrap_or(host).to_string()
}

/// `methods = [...]` of a route or rule at `key`.
fn parse_methods(key: &str, raw: &[String], problems: &mut Problems) -> Vec<Method> {
    let mut methods = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => problems.push((
                format!("{key}.methods[{i}]"),
                format!("`{m}` is not a method"),
            )),
        }
    }
    methods
}

/// Rule and route names become metric labels and Redis key parts.
fn check_name(key: &str, name: &str, problems: &mut Problems) {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        problems.push((key.into(), "use letters, digits, `_` and `-`".into()));
    }
}

/// The `[log]` section, shared by both services.
fn log_config(raw: &raw::RawLog, problems: &mut Problems) -> LogConfig {
    let format = match raw.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            problems.push((
                "log.format".into(),
                format!("`{other}`: use \"text\" or \"json\""),
            ));
            LogFormat::Text
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&raw.level).is_err() {
        problems.push((
            "log.level".into(),
            format!("`{}` is not a log filter", raw.level),
        ));
    }
    LogConfig {
        level: raw.level.clone(),
        format,
        access_log: raw.access_log,
        access_log_path: raw.access_log_path.clone(),
    }
}

/// An address or CIDR (`10.0.0.0/8`, `192.0.2.7`).
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests;
