//! `tollgate discover`: standing access, who reaches each cluster without
//! Tollgate (spec section 12). It only reads the clusters (with the
//! operator's AWS credentials, as every CLI command does) and asks the store
//! which marked objects are really Tollgate's — through the running
//! server's admin socket, or the store directly when no server runs.

use std::sync::Arc;

use crate::access::kube::KubeClients;
use crate::access::standing::ClusterReader;
use crate::access::AwsClients;
use crate::admin::{AdminRequest, AdminResponse};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::domain::standing::{sort, summary_json, summary_line, ClusterStanding};
use crate::domain::text::terminal_safe;
use crate::service::standing::{classify_all, marked_ids, read_clusters};

/// Every cluster was read.
pub const EXIT_OK: u8 = 0;
/// Nothing could be listed: the store could not be asked, or no cluster
/// could be read.
pub const EXIT_FAILED: u8 = 1;
/// Bad config or arguments (as for every command).
pub const EXIT_USAGE: u8 = 2;
/// Some clusters were listed, others could not be read.
pub const EXIT_PARTIAL: u8 = 3;

/// Runs discovery and prints it; returns the exit status.
pub async fn run(
    config: Config,
    tunables: &crate::tunables::Tunables,
    only: Option<&str>,
    json: bool,
) -> u8 {
    let clusters = match only {
        Some(name) => match config.cluster(name) {
            Some(c) => vec![c.clone()],
            None => {
                let known: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
                eprintln!(
                    "error: no cluster `{name}` in {}; configured: {}",
                    config.path,
                    known.join(", ")
                );
                return EXIT_USAGE;
            }
        },
        None => config.clusters.clone(),
    };
    let clients = Arc::new(AwsClients::new(crate::aws_sdk::load_base_config().await));
    let kube = Arc::new(KubeClients::new(clients.clone(), Arc::new(SystemClock)));
    let reader = ClusterReader::new(clients, kube);
    let readings = read_clusters(&reader, &clusters).await;
    let request = AdminRequest::StandingRecords {
        ids: marked_ids(&readings),
    };
    // Without the store nothing can be told apart from Tollgate's own
    // grants: better no list than one that counts them as standing.
    let records = match crate::server::admin_command(config, tunables, request).await {
        Ok(AdminResponse::Records { records }) => records,
        Ok(AdminResponse::Error { message }) => {
            eprintln!("error: the store cannot say which objects are Tollgate's: {message}");
            return EXIT_FAILED;
        }
        Ok(_) => {
            eprintln!("error: the server gave an unexpected answer; is it an older Tollgate?");
            return EXIT_FAILED;
        }
        Err(e) => {
            eprintln!("error: the store cannot say which objects are Tollgate's: {e:#}");
            return EXIT_FAILED;
        }
    };
    let standing = classify_all(readings, &records);
    print!("{}", render(&standing, json));
    for c in &standing {
        if let Err(e) = &c.result {
            eprintln!(
                "error: cluster {} cannot be read: {}",
                terminal_safe(&c.cluster),
                terminal_safe(&e.to_string())
            );
        }
    }
    exit_status(&standing)
}

/// The whole output: every standing grant sorted by level, then a summary
/// per cluster (`--json`: one object per line, summaries last).
pub fn render(standing: &[ClusterStanding], json: bool) -> String {
    let mut grants: Vec<_> = standing
        .iter()
        .filter_map(|c| c.result.as_ref().ok())
        .flatten()
        .cloned()
        .collect();
    sort(&mut grants);
    let mut out = String::new();
    if json {
        for g in &grants {
            out.push_str(&serde_json::to_string(g).unwrap_or_default());
            out.push('\n');
        }
        for c in standing {
            out.push_str(&summary_json(c).to_string());
            out.push('\n');
        }
    } else {
        let width = grants
            .iter()
            .map(|g| terminal_safe(&g.principal).chars().count())
            .max()
            .unwrap_or(0);
        if !grants.is_empty() {
            out.push_str(&format!(
                "{:<13} {:<16} {:<18} {:<width$}  {}\n",
                "LEVEL", "CLUSTER", "SOURCE", "PRINCIPAL", "DETAILS"
            ));
        }
        for g in &grants {
            out.push_str(&g.text_line(width));
            out.push('\n');
        }
        out.push('\n');
        for c in standing {
            out.push_str(&summary_line(c));
            out.push('\n');
        }
    }
    out
}

pub fn exit_status(standing: &[ClusterStanding]) -> u8 {
    let failed = standing.iter().filter(|c| c.result.is_err()).count();
    if failed == 0 {
        EXIT_OK
    } else if failed < standing.len() {
        EXIT_PARTIAL
    } else {
        EXIT_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_when_some_clusters_cannot_be_read() {
        let ok = |n: &str| ClusterStanding {
            cluster: n.into(),
            result: Ok(Vec::new()),
        };
        let bad = |n: &str| ClusterStanding {
            cluster: n.into(),
            result: Err("down".into()),
        };
        assert_eq!(exit_status(&[ok("a"), ok("b")]), EXIT_OK);
        assert_eq!(exit_status(&[ok("a"), bad("b"), ok("c")]), EXIT_PARTIAL);
        assert_eq!(exit_status(&[bad("a")]), EXIT_FAILED);
        let text = render(&[ok("a"), bad("b")], false);
        assert!(text.contains("b: cannot be read: down"), "{text}");
        let json = render(&[ok("a"), bad("b")], true);
        let lines: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["summary"]["cluster-admin"], 0);
        assert_eq!(lines[1]["error"], "down");
    }
}
