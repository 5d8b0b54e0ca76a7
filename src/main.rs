//! The `gatehouse` command: parse the CLI, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// Validate configuration files; prints one line per problem.
    CheckConfig {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { files } => check_config(&files),
        Command::Proxy {
            config,
            listen,
            admin_listen,
            upstreams,
        } => {
            let source = ConfigSource {
                path: config,
                overrides: Overrides {
                    listen,
                    admin_listen,
                    upstreams,
                },
            };
            let loaded = match Config::load(source.path.as_deref(), &source.overrides) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            gatehouse::telemetry::init_tracing(&loaded.log);
            match proxy::run(loaded, source) {
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

fn check_config(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match Config::load(Some(file), &Overrides::default()) {
            Ok(_) => println!("{}: ok", file.display()),
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
