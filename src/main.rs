use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use tollgate::config::Config;

/// Just-in-time, time-boxed access to Amazon EKS, approved in Slack.
#[derive(Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server: Slack endpoints, probes, scheduler.
    Serve {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
    },
    /// Check config, Slack, AWS and every cluster; non-zero on failure.
    Check {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
    },
    /// Inspect or revoke grants.
    Grants {
        #[command(subcommand)]
        action: GrantsCmd,
    },
    /// Audit log.
    Audit {
        #[command(subcommand)]
        action: AuditCmd,
    },
    /// Store maintenance.
    Store {
        #[command(subcommand)]
        action: StoreCmd,
    },
}

#[derive(Subcommand)]
enum GrantsCmd {
    List {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    Revoke {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    Export {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    Init {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
    },
    Copy {
        #[arg(long)]
        from_config: PathBuf,
        #[arg(long)]
        to_config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn not_yet(what: &str) -> ExitCode {
    eprintln!("error: `tollgate {what}` is not available in this version of Tollgate");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    // aws-smithy and slack-morphism must agree on one rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tollgate::telemetry::init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match tollgate::server::serve(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Check { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if tollgate::server::check(config).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Grants {
            action: GrantsCmd::List { .. },
        } => not_yet("grants list"),
        Cmd::Grants {
            action: GrantsCmd::Revoke { .. },
        } => not_yet("grants revoke"),
        Cmd::Audit {
            action: AuditCmd::Export { .. },
        } => not_yet("audit export"),
        Cmd::Store {
            action: StoreCmd::Init { config },
        } => match load(&config) {
            Ok(c) if c.store.backend == tollgate::config::Backend::Sled => {
                println!("store.backend = \"sled\": nothing to initialise");
                ExitCode::SUCCESS
            }
            Ok(_) => not_yet("store init (dynamodb)"),
            Err(code) => code,
        },
        Cmd::Store {
            action: StoreCmd::Copy { .. },
        } => not_yet("store copy"),
    }
}
