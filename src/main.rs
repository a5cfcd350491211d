use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use tollgate::admin::{AdminRequest, AdminResponse};
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
        /// Run the whole flow but only log and audit the AWS/Kubernetes
        /// writes, for trying Tollgate before giving it IAM rights.
        #[arg(long)]
        dry_run: bool,
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

async fn admin(config: &std::path::Path, request: AdminRequest, json: bool) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let response = match tollgate::server::admin_command(config, request).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match response {
        AdminResponse::Grants { grants } => {
            for g in grants {
                let expires = g.expires_at.and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                });
                if json {
                    let line = serde_json::json!({
                        "id": g.id, "state": g.state.label(), "requester": g.requester.user_id,
                        "email": g.requester.email, "cluster": g.access.cluster, "role": g.access.role,
                        "principal": g.access.principal, "namespaces": g.access.namespaces, "expires_at": expires,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{}  {:<13} {:<20} {:<10} {:<28} {}",
                        g.id,
                        g.state.label(),
                        g.access.cluster,
                        g.access.role,
                        g.requester.email,
                        expires.unwrap_or_else(|| "-".into())
                    );
                }
            }
            ExitCode::SUCCESS
        }
        AdminResponse::Audit { events } => {
            for e in events {
                match serde_json::to_string(&e) {
                    Ok(line) => println!("{line}"),
                    Err(err) => eprintln!("error: unprintable audit event: {err}"),
                }
            }
            ExitCode::SUCCESS
        }
        AdminResponse::Done { message } => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        AdminResponse::Error { message } => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // aws-smithy and slack-morphism must agree on one rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tollgate::telemetry::init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config, dry_run } => {
            let mut config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            config.dry_run = dry_run;
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
            action: GrantsCmd::List { config, json },
        } => admin(&config, AdminRequest::ListGrants, json).await,
        Cmd::Grants {
            action: GrantsCmd::Revoke { config, id, reason },
        } => admin(&config, AdminRequest::Revoke { id, reason }, false).await,
        Cmd::Audit {
            action: AuditCmd::Export { config, since },
        } => {
            let since = match since.as_deref().map(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            }) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    eprintln!(
                        "error: --since must be an RFC 3339 time like 2026-11-23T12:00:00Z: {e}"
                    );
                    return ExitCode::from(2);
                }
            };
            admin(&config, AdminRequest::AuditExport { since }, true).await
        }
        Cmd::Store {
            action: StoreCmd::Init { config },
        } => match load(&config) {
            Ok(c) => report(tollgate::store::cli::init(&c).await),
            Err(code) => code,
        },
        Cmd::Store {
            action:
                StoreCmd::Copy {
                    from_config,
                    to_config,
                },
        } => match (load(&from_config), load(&to_config)) {
            (Ok(from), Ok(to)) => report(tollgate::store::cli::copy(&from, &to).await),
            (Err(code), _) | (_, Err(code)) => code,
        },
    }
}

fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
