//! The `gatehouse db` configuration (`config/db.toml`): the socket clients
//! connect to, the primary, users and their secrets, databases and pools.
//! Loaded like the gateway's: file, then `GATEHOUSE_DB_SECTION__KEY`, then the
//! seed names `DB_NAME DB_USER DB_PASSWORD DB_PRIMARY_HOST DB_PORT`, then
//! flags; every problem names its file and line, or its variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use super::units::ByteSize;
use super::{
    ConfigError, EnvSource, LogConfig, Problems, SourceFile, all_problems, extract_all, locate,
    socket_addr,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDb {
    pub server: RawDbServer,
    pub admin: super::raw::RawAdmin,
    pub primary: RawNode,
    pub pool: RawPool,
    pub users: Vec<RawUser>,
    pub databases: Vec<RawDatabase>,
    pub log: super::raw::RawLog,
}

impl Default for RawDb {
    fn default() -> Self {
        RawDb {
            server: RawDbServer::default(),
            admin: super::raw::RawAdmin {
                enabled: true,
                listen: "127.0.0.1:9092".into(),
            },
            primary: RawNode::default(),
            pool: RawPool::default(),
            users: Vec::new(),
            databases: Vec::new(),
            log: super::raw::RawLog::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDbServer {
    pub socket_dir: PathBuf,
    pub port: u16,
    /// Octal permission bits of the socket file, as a string ("0660").
    pub socket_mode: String,
    /// Also listen on TCP at this address; empty = socket only.
    pub listen: String,
    pub max_message_size: ByteSize,
    /// A client must finish startup and authentication within this time.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
}

impl Default for RawDbServer {
    fn default() -> Self {
        RawDbServer {
            socket_dir: "/run/gatehouse".into(),
            port: 6432,
            socket_mode: "0660".into(),
            listen: String::new(),
            max_message_size: ByteSize(64 * 1024 * 1024),
            login_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNode {
    /// A host name or address, or a socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
}

impl Default for RawNode {
    fn default() -> Self {
        RawNode {
            host: "127.0.0.1".into(),
            port: 5432,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    pub min_connections: u32,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Named protocol-level statements each server connection keeps for
    /// transaction-pooled clients; 0 = pin a client that names one.
    pub max_prepared_statements: u32,
    /// "pin" or "refuse" a transaction-pooled client's session state.
    pub session_state: String,
}

/// The seed's pool: min 10, max 50, idle 300 s, lifetime 3600 s, connect
/// timeout 10 s, statement timeout 30 s.
impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            min_connections: 10,
            max_connections: 50,
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            checkout_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            max_prepared_statements: 200,
            session_state: "pin".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub name: String,
    /// In clear, or as PostgreSQL stores it (`SCRAM-SHA-256$…`, `md5…`).
    pub password: Option<String>,
    /// How clients prove they are this user: scram-sha-256, md5 or trust.
    #[serde(default = "scram")]
    pub auth: String,
    /// For `trust` on the Unix socket: only these peer uids (SO_PEERCRED).
    #[serde(default)]
    pub trusted_uids: Vec<u32>,
    /// The password gatehouse logs in to PostgreSQL with, when `password`
    /// is a stored verifier rather than the clear password.
    pub server_password: Option<String>,
}

fn scram() -> String {
    "scram-sha-256".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub name: String,
    #[serde(default = "transaction")]
    pub pool_mode: String,
}

fn transaction() -> String {
    "transaction".into()
}

/// The validated `gatehouse db` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DbConfig {
    pub socket_dir: PathBuf,
    pub port: u16,
    pub socket_mode: u32,
    pub listen: Option<SocketAddr>,
    pub max_message_size: usize,
    pub login_timeout: Duration,
    pub admin_listen: Option<SocketAddr>,
    pub primary: Node,
    pub pool: PoolConfig,
    pub users: Vec<DbUser>,
    pub databases: Vec<Database>,
    pub log: LogConfig,
}

impl DbConfig {
    /// `<socket_dir>/.s.PGSQL.<port>`, where libpq (and Django) look.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Tcp {
        host: String,
        port: u16,
    },
    /// `<dir>/.s.PGSQL.<port>`
    Socket {
        dir: PathBuf,
        port: u16,
    },
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Tcp { host, port } => write!(f, "{host}:{port}"),
            Node::Socket { dir, port } => write!(f, "{}/.s.PGSQL.{port}", dir.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub min_connections: u32,
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub connect_timeout: Duration,
    pub checkout_timeout: Duration,
    pub statement_timeout: Duration,
    pub max_prepared_statements: usize,
    pub session_state: SessionState,
}

/// What transaction pooling does with a client that sets session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Keep its server connection until it leaves.
    Pin,
    /// Fail the statement with SQLSTATE 0A000.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

/// A user's secret as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    Clear(String),
    /// A stored `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`,
    /// as text: `gatehouse db` parses it.
    Scram(String),
    /// `md5` + hex(md5(password + user))
    Md5(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbUser {
    pub name: String,
    pub auth: AuthMethod,
    pub secret: Option<Secret>,
    pub trusted_uids: Vec<u32>,
    /// What gatehouse sends PostgreSQL for this user.
    pub server_password: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub name: String,
    pub pool_mode: PoolMode,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct DbOverrides {
    pub socket_dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// `host:port` or a socket directory.
    pub primary: Option<String>,
}

impl DbConfig {
    pub fn load(
        path: Option<&Path>,
        overrides: &DbOverrides,
        env: &dyn EnvSource,
    ) -> Result<DbConfig, ConfigError> {
        let source = path.map(SourceFile::read).transpose()?;
        let mut figment = Figment::new();
        if let Some(file) = &source {
            figment = figment.merge(Toml::string(&file.text));
        }
        figment = figment.merge(
            Env::prefixed("GATEHOUSE_DB_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let (raw, extracted) = extract_all::<RawDb>(&figment, source.as_ref());
        let Some(mut raw) = raw else {
            return Err(ConfigError {
                problems: extracted,
            });
        };
        apply_seed(&mut raw, env)?;
        apply_overrides(&mut raw, overrides);
        let validated = validate(&raw).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| locate(source.as_ref(), key, message))
                .collect()
        });
        all_problems(extracted, validated)
    }
}

/// The seed's names: one database, one user, the primary's address.
fn apply_seed(raw: &mut RawDb, env: &dyn EnvSource) -> Result<(), ConfigError> {
    if let Some(host) = env.var("DB_PRIMARY_HOST") {
        raw.primary.host = host;
    }
    if let Some(port) = env.var("DB_PORT") {
        raw.primary.port = port.trim().parse().map_err(|_| {
            ConfigError::one(
                "environment variable DB_PORT",
                "",
                format!("`{port}` is not a port"),
            )
        })?;
    }
    if let Some(name) = env.var("DB_NAME") {
        if !raw.databases.iter().any(|d| d.name == name) {
            raw.databases.push(RawDatabase {
                name,
                pool_mode: transaction(),
            });
        }
    }
    if let Some(user) = env.var("DB_USER") {
        let password = env.var("DB_PASSWORD");
        match raw.users.iter_mut().find(|u| u.name == user) {
            Some(existing) => {
                if password.is_some() {
                    existing.password = password;
                }
            }
            None => raw.users.push(RawUser {
                name: user,
                password,
                auth: scram(),
                trusted_uids: Vec::new(),
                server_password: None,
            }),
        }
    }
    Ok(())
}

fn apply_overrides(raw: &mut RawDb, overrides: &DbOverrides) {
    if let Some(dir) = &overrides.socket_dir {
        raw.server.socket_dir = dir.clone();
    }
    if let Some(port) = overrides.port {
        raw.server.port = port;
    }
    if let Some(listen) = &overrides.listen {
        raw.server.listen = listen.clone();
    }
    if let Some(admin) = &overrides.admin_listen {
        raw.admin.listen = admin.clone();
        raw.admin.enabled = true;
    }
    if let Some(primary) = &overrides.primary {
        match primary.rsplit_once(':') {
            Some((host, port)) if !primary.starts_with('/') => {
                raw.primary.host = host.to_string();
                raw.primary.port = port.parse().unwrap_or(raw.primary.port);
            }
            _ => raw.primary.host = primary.clone(),
        }
    }
}

fn user(index: usize, raw: &RawUser, problems: &mut Problems) -> DbUser {
    let key = format!("users[{index}]");
    if raw.name.is_empty() {
        problems.push((format!("{key}.name"), "a user needs a name".into()));
    }
    let auth = match raw.auth.as_str() {
        "scram-sha-256" => AuthMethod::ScramSha256,
        "md5" => AuthMethod::Md5,
        "trust" => AuthMethod::Trust,
        other => {
            problems.push((
                format!("{key}.auth"),
                format!("`{other}`: use \"scram-sha-256\", \"md5\" or \"trust\""),
            ));
            AuthMethod::ScramSha256
        }
    };
    let secret = raw.password.as_deref().map(|p| {
        if p.starts_with("SCRAM-SHA-256$") {
            if !scram_shape(p) {
                problems.push((
                    format!("{key}.password"),
                    "malformed SCRAM-SHA-256 verifier".into(),
                ));
            }
            Secret::Scram(p.to_string())
        } else if p.len() == 35
            && p.starts_with("md5")
            && p[3..].chars().all(|c| c.is_ascii_hexdigit())
        {
            Secret::Md5(p.to_string())
        } else {
            Secret::Clear(p.to_string())
        }
    });
    match (&auth, &secret) {
        (AuthMethod::Trust, _) => {}
        (_, None) => problems.push((
            format!("{key}.password"),
            "needed unless auth = \"trust\"".into(),
        )),
        (AuthMethod::ScramSha256, Some(Secret::Md5(_))) => problems.push((
            format!("{key}.password"),
            "an md5 secret cannot check SCRAM; give the password or its SCRAM verifier".into(),
        )),
        (AuthMethod::Md5, Some(Secret::Scram(_))) => problems.push((
            format!("{key}.password"),
            "a SCRAM verifier cannot check md5; give the password or its md5 secret".into(),
        )),
        _ => {}
    }
    let server_password = raw.server_password.clone().or_else(|| match &secret {
        Some(Secret::Clear(p)) => Some(p.clone()),
        _ => None,
    });
    DbUser {
        name: raw.name.clone(),
        auth,
        secret,
        trusted_uids: raw.trusted_uids.clone(),
        server_password,
    }
}

fn validate(raw: &RawDb) -> Result<DbConfig, Problems> {
    let mut problems = Problems::new();
    let s = &raw.server;
    if !s.socket_dir.is_absolute() {
        problems.push((
            "server.socket_dir".into(),
            "must be an absolute path".into(),
        ));
    }
    let socket_mode = u32::from_str_radix(s.socket_mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .unwrap_or_else(|| {
            problems.push((
                "server.socket_mode".into(),
                format!("`{}` is not an octal mode such as \"0660\"", s.socket_mode),
            ));
            0o660
        });
    if s.login_timeout.is_zero() {
        problems.push((
            "server.login_timeout".into(),
            "must be greater than zero".into(),
        ));
    }
    let listen = (!s.listen.is_empty())
        .then(|| socket_addr("server.listen", &s.listen, &mut problems))
        .flatten();
    let admin_listen = raw
        .admin
        .enabled
        .then(|| socket_addr("admin.listen", &raw.admin.listen, &mut problems))
        .flatten();
    let primary = if raw.primary.host.starts_with('/') {
        Node::Socket {
            dir: raw.primary.host.clone().into(),
            port: raw.primary.port,
        }
    } else if raw.primary.host.is_empty() {
        problems.push((
            "primary.host".into(),
            "a host, an address or a socket directory".into(),
        ));
        Node::Tcp {
            host: String::new(),
            port: raw.primary.port,
        }
    } else {
        Node::Tcp {
            host: raw.primary.host.clone(),
            port: raw.primary.port,
        }
    };
    let p = &raw.pool;
    if p.max_connections == 0 {
        problems.push(("pool.max_connections".into(), "must be at least 1".into()));
    }
    if p.min_connections > p.max_connections {
        problems.push((
            "pool.min_connections".into(),
            "must not exceed max_connections".into(),
        ));
    }
    for (key, value) in [
        ("pool.connect_timeout", p.connect_timeout),
        ("pool.checkout_timeout", p.checkout_timeout),
    ] {
        if value.is_zero() {
            problems.push((key.into(), "must be greater than zero".into()));
        }
    }
    let session_state = match p.session_state.as_str() {
        "pin" => SessionState::Pin,
        "refuse" => SessionState::Refuse,
        other => {
            problems.push((
                "pool.session_state".into(),
                format!("`{other}`: use \"pin\" or \"refuse\""),
            ));
            SessionState::Pin
        }
    };
    if raw.users.is_empty() {
        problems.push((
            "users".into(),
            "at least one [[users]] entry (or DB_USER) is needed".into(),
        ));
    }
    let mut users: Vec<DbUser> = Vec::new();
    for (i, raw_user) in raw.users.iter().enumerate() {
        let u = user(i, raw_user, &mut problems);
        if users.iter().any(|o| o.name == u.name) {
            problems.push((
                format!("users[{i}].name"),
                format!("`{}` is listed twice", u.name),
            ));
        }
        users.push(u);
    }
    if raw.databases.is_empty() {
        problems.push((
            "databases".into(),
            "at least one [[databases]] entry (or DB_NAME) is needed".into(),
        ));
    }
    let mut databases: Vec<Database> = Vec::new();
    for (i, d) in raw.databases.iter().enumerate() {
        let pool_mode = match d.pool_mode.as_str() {
            "transaction" => PoolMode::Transaction,
            "session" => PoolMode::Session,
            other => {
                problems.push((
                    format!("databases[{i}].pool_mode"),
                    format!("`{other}`: use \"transaction\" or \"session\""),
                ));
                PoolMode::Transaction
            }
        };
        if databases.iter().any(|o| o.name == d.name) {
            problems.push((
                format!("databases[{i}].name"),
                format!("`{}` is listed twice", d.name),
            ));
        }
        databases.push(Database {
            name: d.name.clone(),
            pool_mode,
        });
    }
    let log = super::log_config(&raw.log, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(DbConfig {
        socket_dir: s.socket_dir.clone(),
        port: s.port,
        socket_mode,
        listen,
        max_message_size: usize::try_from(s.max_message_size.0).unwrap_or(usize::MAX),
        login_timeout: s.login_timeout,
        admin_listen,
        primary,
        pool: PoolConfig {
            min_connections: p.min_connections,
            max_connections: p.max_connections,
            idle_timeout: p.idle_timeout,
            max_lifetime: p.max_lifetime,
            connect_timeout: p.connect_timeout,
            checkout_timeout: p.checkout_timeout,
            statement_timeout: p.statement_timeout,
            max_prepared_statements: p.max_prepared_statements as usize,
            session_state,
        },
        users,
        databases,
        log,
    })
}

#[cfg(test)]
mod tests;

/// Whether `text` has the shape of a stored SCRAM-SHA-256 verifier (RFC 5803):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64, with
/// 32-byte keys.
fn scram_shape(text: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let parts = text
        .strip_prefix("SCRAM-SHA-256$")
        .and_then(|rest| rest.split_once('$'))
        .and_then(|(params, keys)| Some((params.split_once(':')?, keys.split_once(':')?)));
    let Some(((iterations, salt), (stored, server))) = parts else {
        return false;
    };
    iterations.parse::<u32>().is_ok_and(|i| i > 0)
        && b64.decode(salt).is_ok()
        && [stored, server]
            .iter()
            .all(|k| b64.decode(k).is_ok_and(|k| k.len() == 32))
}
