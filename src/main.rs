//! The `gatehouse` command: parse the CLI, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: glibc's malloc and free were about 4% of the gateway's time per
/// small request under load (perf); see docs/decisions.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use gatehouse::config::{Config, Overrides};
use gatehouse::proxy::{self, ConfigSource};

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "The edge of a Django deployment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP gateway in front of Gunicorn.
    Proxy {
        /// TOML file; without it the embedded defaults apply (config/gateway.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address for clients, e.g. 0.0.0.0:80.
        #[arg(long)]
        listen: Option<String>,
        /// Address for /health, /ready, /metrics.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Gunicorn: http://host:port or unix:/path/to/gunicorn.sock; repeat for several.
        #[arg(long = "upstream")]
        upstreams: Vec<String>,
    },
    /// Run the PostgreSQL pool on a Unix socket: transaction pooling (or
    /// session pooling per database) in front of the primary.
    Db {
        /// TOML file; without it the embedded defaults apply (config/db.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Directory of the socket `.s.PGSQL.<port>`.
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// Group the socket file is given to; "" for gatehouse's own.
        #[arg(long)]
        socket_group: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// Also accept TCP clients here.
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        admin_listen: Option<String>,
        /// The primary: host:port, a socket directory, or a postgresql:// URI
        /// (its user, password and database are taken too).
        #[arg(long)]
        primary: Option<String>,
    },
    /// Validate configuration files; prints one line per problem.
    CheckConfig {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Rate-limit tools for operators.
    Ratelimit {
        #[command(subcommand)]
        command: RatelimitCommand,
    },
    /// Response-cache tools for operators.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// GET every URL of lists or sitemaps through a gateway, so its cache
    /// holds them (after a deploy, L1 starts empty).
    Warm {
        /// Files of URLs or paths, one per line, or sitemaps (files or
        /// http:// URLs); `-` reads standard input.
        #[arg(required = true)]
        sources: Vec<String>,
        /// The gateway's listener.
        #[arg(long, default_value = "127.0.0.1:80")]
        gateway: std::net::SocketAddr,
        /// Host sent with lines that are paths only.
        #[arg(long)]
        host: Option<String>,
        /// Requests at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

#[derive(Subcommand)]
enum RatelimitCommand {
    /// Show each rule's count, remaining budget and reset for one subject.
    Inspect {
        /// user:42, ip:203.0.113.9, session:<hash>
        #[arg(long)]
        subject: String,
        /// Apply this tier's overrides.
        #[arg(long)]
        tier: Option<String>,
        /// The gateway's admin listener.
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin: std::net::SocketAddr,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Before any thread starts: taking them clears LISTEN_FDS and LISTEN_PID.
    let inherited = match gatehouse::net::Inherited::from_env() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("gatehouse: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { files } => check_config(&files),
        Command::Db {
            config,
            socket_dir,
            socket_group,
            port,
            listen,
            admin_listen,
            primary,
        } => {
            let overrides = gatehouse::config::db::DbOverrides {
                socket_dir,
                socket_group,
                port,
                listen,
                admin_listen,
                primary,
            };
            let source = gatehouse::db::DbSource {
                path: config,
                overrides,
            };
            let loaded = match gatehouse::config::db::DbConfig::load(
                source.path.as_deref(),
                &source.overrides,
                &gatehouse::config::ProcessEnv,
            ) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            gatehouse::telemetry::init_tracing(&loaded.log);
            if !inherited.tcp.is_empty() {
                tracing::warn!("systemd handed over a TCP socket; gatehouse db takes a Unix one");
            }
            let started = gatehouse::db::bind(&loaded, inherited.unix.into_iter().next()).and_then(
                |listeners| {
                    // SIGINT stops `gatehouse db` as SIGTERM does: its socket file
                    // goes, unless it is systemd's.
                    gatehouse::db::run(listeners, loaded, source, signals(false))
                },
            );
            match started {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gatehouse: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ratelimit {
            command:
                RatelimitCommand::Inspect {
                    subject,
                    tier,
                    admin,
                    json,
                },
        } => inspect(admin, &subject, tier.as_deref(), json),
        Command::Cache {
            command:
                CacheCommand::Warm {
                    sources,
                    gateway,
                    host,
                    concurrency,
                },
        } => warm(&sources, gateway, host, concurrency),
        Command::Proxy {
            config,
            listen,
            admin_listen,
            upstreams,
        } => {
            let source = ConfigSource::new(
                config,
                Overrides {
                    listen,
                    admin_listen,
                    upstreams,
                },
            );
            let loaded = match Config::load(source.path.as_deref(), &source.overrides) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            gatehouse::telemetry::init_tracing(&loaded.log);
            if !inherited.unix.is_empty() {
                tracing::warn!(
                    "systemd handed over a Unix socket; gatehouse proxy takes a TCP one"
                );
            }
            let started = proxy::bind(&loaded, inherited.tcp.into_iter().next())
                .and_then(|listeners| proxy::run(listeners, loaded, source, signals(true)));
            match started {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("gatehouse: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Signals as `Control` messages, from a thread of their own: SIGHUP
/// reloads, SIGUSR1 reopens logs, SIGTERM drains. SIGINT exits at once with
/// 130 when `interrupt_exits`, else drains too.
fn signals(interrupt_exits: bool) -> gatehouse::ControlReceiver {
    use gatehouse::Control;
    use tokio::signal::unix::{SignalKind, signal};
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gatehouse: starting the signal thread: {e}");
            std::process::exit(1);
        }
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let (Ok(mut hangup), Ok(mut user1), Ok(mut terminate), Ok(mut interrupt)) = (
                signal(SignalKind::hangup()),
                signal(SignalKind::user_defined1()),
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                eprintln!("gatehouse: cannot install signal handlers");
                std::process::exit(1);
            };
            let _ = ready_tx.send(());
            loop {
                let message = tokio::select! {
                    _ = hangup.recv() => Control::Reload,
                    _ = user1.recv() => Control::ReopenLogs,
                    _ = terminate.recv() => Control::Shutdown,
                    _ = interrupt.recv() => {
                        if interrupt_exits {
                            tracing::info!("SIGINT: exiting now");
                            std::process::exit(130);
                        }
                        Control::Shutdown
                    }
                };
                if sender.send(message).is_err() {
                    return;
                }
            }
        });
    });
    // The handlers are installed before the service starts, so no early
    // signal kills the process by default.
    let _ = ready_rx.recv();
    receiver
}

fn check_config(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match gatehouse::config::check_file(file) {
            Ok(gatehouse::config::Checked::Gateway(_)) => {
                println!("{}: ok (gateway)", file.display())
            }
            Ok(gatehouse::config::Checked::Db(_)) => println!("{}: ok (db)", file.display()),
            Err(e) => {
                ok = false;
                for problem in &e.problems {
                    println!("{problem}");
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn warm(
    sources: &[String],
    gateway: std::net::SocketAddr,
    host: Option<String>,
    concurrency: usize,
) -> ExitCode {
    use gatehouse::proxy::warm;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gatehouse: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut urls = Vec::new();
        for source in sources {
            match warm::read_source(source).await {
                Ok(text) => urls.extend(warm::parse_list(&text)),
                Err(e) => {
                    eprintln!("gatehouse: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let host = host.unwrap_or_else(|| gateway.to_string());
        let report = warm::warm(gateway, &host, &urls, concurrency).await;
        println!(
            "{} URLs: {} stored, {} already cached, {} not cacheable, {} failed",
            urls.len(),
            report.stored,
            report.hits,
            report.not_stored,
            report.failed.len()
        );
        for (url, why) in &report.failed {
            eprintln!("  {url}: {why}");
        }
        if report.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

fn inspect(admin: std::net::SocketAddr, subject: &str, tier: Option<&str>, json: bool) -> ExitCode {
    let answer = match gatehouse::proxy::admin::fetch_inspection(admin, subject, tier) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("gatehouse: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{answer:#}");
        return ExitCode::SUCCESS;
    }
    println!(
        "subject {}  counted in {}{}",
        answer["subject"].as_str().unwrap_or(subject),
        answer["source"].as_str().unwrap_or("?"),
        if answer["exempt"] == true {
            "  (exempt)"
        } else {
            ""
        }
    );
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>10} {:>8}  key",
        "rule", "limit", "window", "used", "remaining", "reset"
    );
    for rule in answer["rules"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:>8} {:>7}s {:>8} {:>10} {:>7}s  {}",
            rule["rule"].as_str().unwrap_or("?"),
            rule["limit"],
            rule["window_secs"],
            rule["used"],
            rule["remaining"],
            rule["reset_secs"],
            rule["key"].as_str().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}
