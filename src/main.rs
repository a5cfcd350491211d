use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use tollgate::admin::{AdminRequest, AdminResponse};
use tollgate::config::Config;
use tollgate::tunables::Tunables;

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
        /// Print each failure's whole error, not only its causes.
        #[arg(long)]
        verbose: bool,
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
    /// Standing access: who reaches each cluster without Tollgate. Exit
    /// status 0 all clusters read, 3 some could not be read, 1 none (or the
    /// store could not be asked), 2 bad config or arguments.
    Discover {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
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
    /// Remove requests that ended before a time, printing their audit
    /// events as JSON lines first.
    Prune {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
        /// RFC 3339, e.g. 2026-01-01T00:00:00Z
        #[arg(long)]
        before: String,
    },
    /// Turn row integrity on for a store that already has live rows: sign
    /// each live request row that carries no MAC, once, printing each.
    /// Refused on a store already sealed (`[store] integrity_key_env`).
    Seal {
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// The process settings from the environment, the row integrity key
/// included: a key the config names but the environment does not hold
/// stops the command (exit 2), naming the variable, never a value.
fn tunables(config: &Config) -> Result<Tunables, ExitCode> {
    let mut tunables = Tunables::from_env(config);
    tunables.integrity = tollgate::tunables::integrity_key(config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    Ok(tunables)
}

async fn admin(config: &std::path::Path, request: AdminRequest, json: bool) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let tunables = match tunables(&config) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let response = match tollgate::server::admin_command(config, &tunables, request).await {
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
        // Only `discover` and `store prune` ask for these, and they read
        // the answer themselves.
        AdminResponse::Records { .. } | AdminResponse::PrunePlan { .. } => {
            eprintln!("error: unexpected answer from the server");
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
            let tunables = match tunables(&config) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match tollgate::server::serve(config, tunables).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Check { config, verbose } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let tunables = match tunables(&config) {
                Ok(t) => t,
                Err(code) => return code,
            };
            if tollgate::server::check(config, &tunables, verbose).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Grants {
            action: GrantsCmd::List { config, json },
        } => admin(&config, AdminRequest::ListLive, json).await,
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
        Cmd::Discover {
            config,
            cluster,
            json,
        } => match load(&config) {
            Ok(c) => {
                let tunables = Tunables::from_env(&c);
                ExitCode::from(
                    tollgate::discover::run(c, &tunables, cluster.as_deref(), json).await,
                )
            }
            Err(code) => code,
        },
        Cmd::Store {
            action: StoreCmd::Seal { config },
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let tunables = match tunables(&config) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let Some(key) = tunables.integrity else {
                eprintln!(
                    "error: {}: [store] integrity_key_env is not set; there is no key to seal rows with",
                    config.path
                );
                return ExitCode::from(2);
            };
            report(tollgate::store::cli::seal(&config, &key).await)
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
        Cmd::Store {
            action: StoreCmd::Prune { config, before },
        } => {
            let before = match time::OffsetDateTime::parse(
                &before,
                &time::format_description::well_known::Rfc3339,
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!(
                        "error: --before must be an RFC 3339 time like 2026-01-01T00:00:00Z: {e}"
                    );
                    return ExitCode::from(2);
                }
            };
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // stdout carries the removed events; the summary goes to stderr.
            match tollgate::store::cli::prune(&config, before, &mut std::io::stdout()).await {
                Ok(summary) => {
                    eprintln!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
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
