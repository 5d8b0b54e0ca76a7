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
    /// More nodes: replicas, or nodes that may become the primary. Every
    /// node's role is discovered, not configured.
    pub nodes: Vec<RawNode>,
    pub router: RawRouter,
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
            nodes: Vec::new(),
            router: RawRouter::default(),
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
    /// The group the socket file is given to (e.g. "www-data"); empty = the
    /// group gatehouse runs as.
    pub socket_group: String,
    /// Also listen on TCP at this address; empty = socket only.
    pub listen: String,
    pub max_message_size: ByteSize,
    /// A client must finish startup and authentication within this time.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Clients connected at once; more are refused (SQLSTATE 53300).
    pub max_client_connections: u32,
    /// On SIGTERM, how long transactions in progress may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads serving clients: 1 for one event loop (as PgBouncer, the
    /// default), 0 for one per core, or that many.
    pub threads: u32,
    /// "normal", or "batch": the threads' wakeups do not preempt other
    /// processes (Linux SCHED_BATCH).
    pub cpu_scheduling: String,
}

impl Default for RawDbServer {
    fn default() -> Self {
        RawDbServer {
            socket_dir: "/run/gatehouse".into(),
            port: 6432,
            socket_mode: "0660".into(),
            socket_group: String::new(),
            listen: String::new(),
            max_message_size: ByteSize(64 * 1024 * 1024),
            login_timeout: Duration::from_secs(60),
            max_client_connections: 1000,
            drain_timeout: Duration::from_secs(30),
            threads: 1,
            cpu_scheduling: "normal".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNode {
    /// A host name or address (with `:port` or not), a socket directory
    /// (starts with `/`), or a `postgresql://` URI.
    pub host: String,
    pub port: u16,
    /// Its share of the reads while it is a replica.
    pub weight: u32,
}

impl Default for RawNode {
    fn default() -> Self {
        RawNode {
            host: "127.0.0.1".into(),
            port: 5432,
            weight: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouter {
    /// How often every node is asked its role and WAL position.
    #[serde(with = "humantime_serde")]
    pub topology_interval: Duration,
    /// A replica further behind the primary than this many bytes of WAL...
    pub max_lag_bytes: ByteSize,
    /// ...or than this long gets no reads.
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    /// Consecutive connect or query failures that open a node's breaker.
    pub failures_to_ban: u32,
    /// How long an open breaker keeps a node out before a probe.
    #[serde(with = "humantime_serde")]
    pub ban_time: Duration,
    /// How long a write waits for a primary when there is none.
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// "connection" or "database".
    pub read_your_writes: String,
    /// With read_your_writes = "database": how long a write holds reads of
    /// its database to replicas that replayed it.
    #[serde(with = "humantime_serde")]
    pub read_your_writes_window: Duration,
    /// Functions besides PostgreSQL's immutable and stable ones that a
    /// replica may run.
    pub replica_functions: Vec<String>,
    /// `<db>_replica` and `<db>_primary` for every listed database.
    pub virtual_databases: bool,
    /// Who the topology monitor logs in as, and where; empty = the first
    /// user and the first listed database.
    pub monitor_user: String,
    pub monitor_database: String,
}

impl Default for RawRouter {
    fn default() -> Self {
        RawRouter {
            topology_interval: Duration::from_secs(1),
            max_lag_bytes: ByteSize(16 * 1024 * 1024),
            max_lag: Duration::from_secs(5),
            failures_to_ban: 3,
            ban_time: Duration::from_secs(10),
            failover_timeout: Duration::from_secs(30),
            read_your_writes: "connection".into(),
            read_your_writes_window: Duration::from_secs(5),
            replica_functions: Vec::new(),
            virtual_databases: true,
            monitor_user: String::new(),
            monitor_database: String::new(),
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
    /// Log a statement that took at least this long; 0 = never.
    #[serde(with = "humantime_serde")]
    pub slow_query_threshold: Duration,
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
            slow_query_threshold: Duration::ZERO,
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
    /// `trust` with no `trusted_uids` lets in any TCP client that names this
    /// user; refused unless this says so.
    #[serde(default)]
    pub trust_over_tcp: bool,
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
    /// The socket file's group, by name.
    pub socket_group: Option<String>,
    pub listen: Option<SocketAddr>,
    pub max_message_size: usize,
    pub login_timeout: Duration,
    pub max_client_connections: usize,
    pub drain_timeout: Duration,
    /// 0 = one per core.
    pub threads: usize,
    pub cpu_scheduling: CpuScheduling,
    pub admin_listen: Option<SocketAddr>,
    pub primary: Node,
    /// Every node, the `[primary]` first, each with its read weight.
    pub nodes: Vec<WeightedNode>,
    pub router: RouterConfig,
    pub pool: PoolConfig,
    pub users: Vec<DbUser>,
    pub databases: Vec<Database>,
    pub log: LogConfig,
}

/// A `[[databases]]` name that lets clients ask for any database.
pub const ANY_DATABASE: &str = "*";

impl DbConfig {
    /// `<socket_dir>/.s.PGSQL.<port>`, where libpq (and Django) look.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// How clients may use `name`: its own entry, else the `"*"` entry.
    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases
            .iter()
            .find(|d| d.name == name)
            .or_else(|| self.databases.iter().find(|d| d.name == ANY_DATABASE))
    }

    /// A client's database name as the server knows it, with its routing:
    /// `<db>_replica` and `<db>_primary` name a listed `<db>` (with
    /// `router.virtual_databases`), unless they are listed themselves.
    pub fn resolve<'n>(&self, name: &'n str) -> (&'n str, Routing) {
        if self.router.virtual_databases && !self.lists(name) {
            for (suffix, routing) in [
                ("_replica", Routing::Replica),
                ("_primary", Routing::Primary),
            ] {
                if let Some(base) = name.strip_suffix(suffix) {
                    if self.lists(base) {
                        return (base, routing);
                    }
                }
            }
        }
        (name, Routing::Auto)
    }

    /// Whether `name` has an entry of its own (its pools are kept and
    /// warmed); others are made on first use and dropped when idle.
    pub fn lists(&self, name: &str) -> bool {
        name != ANY_DATABASE && self.databases.iter().any(|d| d.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// A node and its share of the reads while it is a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedNode {
    pub node: std::sync::Arc<Node>,
    pub weight: u32,
}

/// Whose reads a write holds to replicas that replayed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadYourWrites {
    /// The writing client connection's own later reads.
    Connection,
    /// Every client of the database, for `read_your_writes_window`.
    Database,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    pub topology_interval: Duration,
    pub max_lag_bytes: u64,
    pub max_lag: Duration,
    pub failures_to_ban: u32,
    pub ban_time: Duration,
    pub failover_timeout: Duration,
    pub read_your_writes: ReadYourWrites,
    pub read_your_writes_window: Duration,
    /// Lower case.
    pub replica_functions: Vec<String>,
    pub virtual_databases: bool,
    pub monitor_user: String,
    pub monitor_database: String,
}

/// How a client's database name routes its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Reads that can go to a replica do; the rest to the primary.
    Auto,
    /// `<db>_replica`: every transaction to a replica.
    Replica,
    /// `<db>_primary`: every transaction to the primary.
    Primary,
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
    /// Zero: no slow-query log.
    pub slow_query_threshold: Duration,
}

/// The scheduling policy of the threads that serve clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuScheduling {
    Normal,
    /// Linux `SCHED_BATCH`: waking up does not preempt other processes.
    Batch,
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
    /// `trust` with no `trusted_uids` accepted from TCP clients too.
    pub trust_over_tcp: bool,
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
    /// `host:port`, a socket directory, or a `postgresql://` URI.
    pub primary: Option<String>,
    pub socket_group: Option<String>,
}

/// The embedded defaults: the shipped `config/db.toml`.
const EMBEDDED: &str = include_str!("../../config/db.toml");

impl DbConfig {
    pub fn load(
        path: Option<&Path>,
        overrides: &DbOverrides,
        env: &dyn EnvSource,
    ) -> Result<DbConfig, ConfigError> {
        let source = match path {
            Some(path) => SourceFile::read(path)?,
            None => SourceFile {
                name: "embedded defaults (config/db.toml)".into(),
                text: EMBEDDED.into(),
            },
        };
        let source = Some(source);
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
        apply_overrides(&mut raw, overrides)?;
        apply_primary_credentials(&mut raw);
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
    // DB_REPLICA_1_HOST, DB_REPLICA_2_HOST, ... until one is missing.
    for n in 1.. {
        let Some(host) = env.var(&format!("DB_REPLICA_{n}_HOST")) else {
            break;
        };
        let listed = raw
            .nodes
            .iter()
            .any(|node| node.host == host && node.port == raw.primary.port);
        if !listed {
            raw.nodes.push(RawNode {
                host,
                port: raw.primary.port,
                weight: 1,
            });
        }
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
                trust_over_tcp: false,
                server_password: None,
            }),
        }
    }
    Ok(())
}

fn apply_overrides(raw: &mut RawDb, overrides: &DbOverrides) -> Result<(), ConfigError> {
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
    if let Some(group) = &overrides.socket_group {
        raw.server.socket_group = group.clone();
    }
    if let Some(primary) = &overrides.primary {
        // Checked here, so that the error names the flag.
        if let Err(message) = Primary::parse(primary, raw.primary.port) {
            return Err(ConfigError::one("--primary", "", message));
        }
        raw.primary.host = primary.clone();
    }
    Ok(())
}

/// A `postgresql://` URI's user, password and database, merged as the seed
/// names are: its user logs in to PostgreSQL with its password (and clients
/// log in as that user with it), its database may be asked for.
fn apply_primary_credentials(raw: &mut RawDb) {
    let Ok(primary) = Primary::parse(&raw.primary.host, raw.primary.port) else {
        return;
    };
    if let Some(name) = primary.database {
        if !raw.databases.iter().any(|d| d.name == name) {
            raw.databases.push(RawDatabase {
                name,
                pool_mode: transaction(),
            });
        }
    }
    let Some(name) = primary.user else { return };
    match raw.users.iter_mut().find(|u| u.name == name) {
        Some(existing) => {
            if existing.server_password.is_none() {
                existing.server_password = primary.password;
            }
        }
        None => raw.users.push(RawUser {
            name,
            password: primary.password,
            auth: scram(),
            trusted_uids: Vec::new(),
            trust_over_tcp: false,
            server_password: None,
        }),
    }
}

/// What `primary.host` (or `--primary`, or `DB_PRIMARY_HOST`) names: a node,
/// and from a URI, credentials and a database.
#[derive(Debug, PartialEq, Eq)]
struct Primary {
    node: Node,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
}

impl Primary {
    /// `host`, `host:port`, `[v6]:port`, `/socket/dir`, or
    /// `postgresql://[user[:password]@][host][:port][/database][?host=…&port=…]`;
    /// `port` when none is given. Errors never repeat a password.
    fn parse(text: &str, port: u16) -> Result<Primary, String> {
        let text = text.trim();
        let plain = |node| Primary {
            node,
            user: None,
            password: None,
            database: None,
        };
        if let Some(rest) = text
            .strip_prefix("postgresql://")
            .or_else(|| text.strip_prefix("postgres://"))
        {
            return parse_uri(rest, port).map_err(|e| format!("`{}`: {e}", redact_uri(text)));
        }
        if text.contains("://") {
            return Err(format!(
                "`{}`: only postgresql:// URIs are understood",
                redact_uri(text)
            ));
        }
        if text.starts_with('/') {
            return Ok(plain(Node::Socket {
                dir: text.into(),
                port,
            }));
        }
        host_port(text, port)
            .map(|(host, port)| plain(Node::Tcp { host, port }))
            .map_err(|e| format!("`{text}`: {e}"))
    }
}

/// `host`, `host:port` or `[v6]:port` (a bare IPv6 address is a host).
fn host_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    const SHAPES: &str = "give host:port, a socket directory, or a postgresql:// URI";
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(SHAPES)?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(SHAPES.into()),
        }
    } else if text.parse::<std::net::Ipv6Addr>().is_ok() {
        (text, None)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || !host.chars().all(valid) {
        return Err(SHAPES.into());
    }
    let port = match port {
        None => default_port,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{port}` is not a port"))?,
    };
    Ok((host.to_string(), port))
}

/// A URI after its scheme.
fn parse_uri(rest: &str, default_port: u16) -> Result<Primary, String> {
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, database) = main.split_once('/').unwrap_or((main, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (Some(decode(user)?), Some(decode(password)?)),
            None => (Some(decode(info)?), None),
        },
        None => (None, None),
    };
    // The port is split off first: a socket directory comes encoded.
    let (hostport, mut port) = match hostport.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => match after.strip_prefix(':') {
                Some(port) => (host, Some(port.to_string())),
                None => return Err("an address in brackets is followed by `:port`".into()),
            },
            None => return Err("an unclosed `[`".into()),
        },
        None => match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.to_string())),
            None => (hostport, None),
        },
    };
    let mut host = decode(hostport)?;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match key {
            "host" => host = value,
            "port" => port = Some(value),
            "sslmode" if matches!(value.as_str(), "disable" | "allow" | "prefer") => {}
            "sslmode" => {
                return Err(format!(
                    "sslmode={value}: gatehouse does not use TLS to PostgreSQL"
                ));
            }
            other => return Err(format!("the parameter `{other}` is not supported")),
        }
    }
    if host.contains(',') {
        return Err("one primary: several hosts are not supported".into());
    }
    let node = if host.starts_with('/') {
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("`{p}` is not a port"))?,
            None => host_port("x", default_port)?.1,
        };
        Node::Socket {
            dir: host.into(),
            port,
        }
    } else {
        let with_port = match port {
            Some(p) if host.contains(':') => format!("[{host}]:{p}"),
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let (host, port) = host_port(&with_port, default_port)?;
        Node::Tcp { host, port }
    };
    Ok(Primary {
        node,
        user: user.filter(|u| !u.is_empty()),
        password,
        database: Some(decode(database)?).filter(|d| !d.is_empty()),
    })
}

/// Percent-decoding, as URIs carry socket directories and passwords.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a `%` not followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding that is not UTF-8".to_string())
}

/// A URI with its password replaced by `***`, for messages.
fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((info, host)) => match info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => uri.to_string(),
        },
        None => uri.to_string(),
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
        trust_over_tcp: raw.trust_over_tcp,
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
    let primary = match Primary::parse(&raw.primary.host, raw.primary.port) {
        Ok(primary) => primary.node,
        Err(message) => {
            problems.push(("primary.host".into(), message));
            Node::Tcp {
                host: String::new(),
                port: raw.primary.port,
            }
        }
    };
    let mut nodes = vec![WeightedNode {
        node: std::sync::Arc::new(primary.clone()),
        weight: raw.primary.weight,
    }];
    for (i, node) in raw.nodes.iter().enumerate() {
        let parsed = if node.host.contains("://") {
            Err("give host:port or a socket directory; credentials go in [[users]]".to_string())
        } else {
            Primary::parse(&node.host, node.port).map(|p| p.node)
        };
        match parsed {
            Ok(parsed) if nodes.iter().any(|n| *n.node == parsed) => problems.push((
                format!("nodes[{i}].host"),
                format!("{parsed} is listed twice"),
            )),
            Ok(parsed) => nodes.push(WeightedNode {
                node: std::sync::Arc::new(parsed),
                weight: node.weight,
            }),
            Err(message) => problems.push((format!("nodes[{i}].host"), message)),
        }
    }
    let r = &raw.router;
    for (key, value) in [
        ("router.topology_interval", r.topology_interval),
        ("router.ban_time", r.ban_time),
    ] {
        if value.is_zero() {
            problems.push((key.into(), "must be greater than zero".into()));
        }
    }
    if r.failures_to_ban == 0 {
        problems.push(("router.failures_to_ban".into(), "must be at least 1".into()));
    }
    let read_your_writes = match r.read_your_writes.as_str() {
        "connection" => ReadYourWrites::Connection,
        "database" => ReadYourWrites::Database,
        other => {
            problems.push((
                "router.read_your_writes".into(),
                format!("`{other}`: use \"connection\" or \"database\""),
            ));
            ReadYourWrites::Connection
        }
    };
    if !r.monitor_user.is_empty() && !raw.users.iter().any(|u| u.name == r.monitor_user) {
        problems.push((
            "router.monitor_user".into(),
            format!("`{}` is not among [[users]]", r.monitor_user),
        ));
    }
    let router = RouterConfig {
        topology_interval: r.topology_interval,
        max_lag_bytes: r.max_lag_bytes.0,
        max_lag: r.max_lag,
        failures_to_ban: r.failures_to_ban,
        ban_time: r.ban_time,
        failover_timeout: r.failover_timeout,
        read_your_writes,
        read_your_writes_window: r.read_your_writes_window,
        replica_functions: r
            .replica_functions
            .iter()
            .map(|f| f.to_ascii_lowercase())
            .collect(),
        virtual_databases: r.virtual_databases,
        monitor_user: r.monitor_user.clone(),
        monitor_database: r.monitor_database.clone(),
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
    let cpu_scheduling = match s.cpu_scheduling.as_str() {
        "normal" => CpuScheduling::Normal,
        "batch" => CpuScheduling::Batch,
        other => {
            problems.push((
                "server.cpu_scheduling".into(),
                format!("`{other}`: use \"normal\" or \"batch\""),
            ));
            CpuScheduling::Normal
        }
    };
    if s.max_client_connections == 0 {
        problems.push((
            "server.max_client_connections".into(),
            "must be at least 1".into(),
        ));
    }
    let mut users: Vec<DbUser> = Vec::new();
    for (i, raw_user) in raw.users.iter().enumerate() {
        let u = user(i, raw_user, &mut problems);
        if listen.is_some()
            && u.auth == AuthMethod::Trust
            && u.trusted_uids.is_empty()
            && !u.trust_over_tcp
        {
            problems.push((
                format!("users[{i}].auth"),
                format!(
                    "`trust` with no trusted_uids would let any client of server.listen in as \
                     `{}`: set trusted_uids (socket clients only), or trust_over_tcp = true",
                    u.name
                ),
            ));
        }
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
        socket_group: Some(s.socket_group.trim().to_string()).filter(|g| !g.is_empty()),
        max_client_connections: s.max_client_connections as usize,
        drain_timeout: s.drain_timeout,
        threads: s.threads as usize,
        cpu_scheduling,
        listen,
        max_message_size: usize::try_from(s.max_message_size.0).unwrap_or(usize::MAX),
        login_timeout: s.login_timeout,
        admin_listen,
        primary,
        nodes,
        router,
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
            slow_query_threshold: p.slow_query_threshold,
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
