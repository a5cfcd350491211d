//! `tollgate store init` and `tollgate store copy`.

use crate::config::{Backend, Config};

use super::{copy, dynamodb, prune, DynamoStore, SealedStore};
use crate::domain::integrity::{self, RowKey};

/// Creates the DynamoDB table the config names; nothing to do for sled.
pub async fn init(config: &Config) -> anyhow::Result<String> {
    match (&config.store.backend, config.store.table.as_deref()) {
        (Backend::Sled, _) => Ok("store.backend = \"sled\": nothing to initialise".into()),
        (Backend::Dynamodb, None) => {
            anyhow::bail!(
                "{}: the dynamodb backend needs `table` in [store]",
                config.path
            )
        }
        (Backend::Dynamodb, Some(table)) => {
            let store = DynamoStore::connect(table).await;
            match dynamodb::init(store.client(), table).await? {
                dynamodb::InitOutcome::Created => Ok(format!(
                    "created DynamoDB table {table} (on-demand, key pk/sk); it is ACTIVE"
                )),
                dynamodb::InitOutcome::AlreadyThere => Ok(format!(
                    "DynamoDB table {table} already exists with the expected key schema; nothing changed"
                )),
                dynamodb::InitOutcome::Upgraded { live } => Ok(format!(
                    "DynamoDB table {table} upgraded: live index built ({live} live requests)"
                )),
            }
        }
    }
}

/// `store seal` (spec 9.8): turning row integrity on for a store that
/// has live rows signs each live row without a MAC, once, through the
/// same CAS write every change uses. A store where any row already
/// verifies is refused: its unsigned rows were written by someone else
/// after the key was on, and signing them would launder a forgery (the
/// server handles them as tampered instead). Stop the server first.
pub async fn seal(config: &Config, key: &RowKey) -> anyhow::Result<String> {
    let raw = super::open(config).await?;
    let all = raw.list().await?;
    if let Some(r) = all.iter().find(|r| key.row_intact(r)) {
        anyhow::bail!(
            "{}: the store is already sealed (row {} carries a valid MAC); a row without one was written outside Tollgate and is handled as tampered by the server; nothing signed",
            config.path,
            r.id
        );
    }
    let store = SealedStore::wrap(raw.clone(), Some(key));
    let live = raw.live().await?;
    let mut lines = Vec::new();
    for row in integrity::unsigned(&live) {
        store
            .update(row, row.clone(), Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("sealing {}: {e}", row.id))?;
        lines.push(format!(
            "sealed {} ({}, {} on {} as {}, requested by {})",
            row.id,
            row.state.label(),
            row.access.role,
            row.access.cluster,
            row.access.principal,
            row.requester.user_id
        ));
    }
    raw.flush().await?;
    lines.push(format!("{} live request row(s) sealed", lines.len()));
    Ok(lines.join("\n"))
}

/// Copies everything from one configured store into another. Both must be
/// quiet: stop Tollgate first (sled refuses a second opener anyway).
pub async fn copy(from: &Config, to: &Config) -> anyhow::Result<String> {
    if from.store.backend == to.store.backend
        && from.store.path == to.store.path
        && from.store.table == to.store.table
    {
        anyhow::bail!(
            "{} and {} name the same store; nothing to copy",
            from.path,
            to.path
        );
    }
    let source = super::open(from).await?;
    let target = super::open(to).await?;
    let report = copy::copy(source.as_ref(), target.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("copying {} to {}: {e}", from.path, to.path))?;
    Ok(report.to_string())
}

/// `store prune`: the audit events of the requests to remove are written to
/// `out` (and flushed) before anything is removed, so an export cut short
/// removes nothing. Goes through a running server's admin socket when one
/// answers (sled allows one opener), else opens the store itself.
pub async fn prune(
    config: &Config,
    before: time::OffsetDateTime,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<String> {
    use crate::admin::{self, AdminRequest, AdminResponse};
    let socket = admin::socket_path(&config.store.path);
    let write = |out: &mut dyn std::io::Write, plan: &prune::PrunePlan| -> anyhow::Result<()> {
        for entry in &plan.audit {
            writeln!(out, "{}", serde_json::to_string(&entry.event)?)?;
        }
        out.flush()?;
        Ok(())
    };
    if let Some(answer) = admin::call(&socket, &AdminRequest::PrunePlan { before }).await? {
        let plan = match answer {
            AdminResponse::PrunePlan { plan } => plan,
            AdminResponse::Error { message } => anyhow::bail!(message),
            _ => anyhow::bail!("the server answered the prune plan with something else"),
        };
        write(out, &plan)?;
        return match admin::call(&socket, &AdminRequest::PruneApply { before, plan }).await? {
            Some(AdminResponse::Done { message }) => Ok(message),
            Some(AdminResponse::Error { message }) => anyhow::bail!(message),
            _ => anyhow::bail!("the server went away before removing; run the prune again"),
        };
    }
    let store = super::open(config).await?;
    let plan = prune::plan(store.as_ref(), before).await?;
    write(out, &plan)?;
    let (rows, events) = prune::apply(store.as_ref(), &plan, before).await?;
    store.flush().await?;
    Ok(prune::summary(rows, events, before))
}
