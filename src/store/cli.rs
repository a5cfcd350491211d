//! `tollgate store init` and `tollgate store copy`.

use crate::config::{Backend, Config};

use super::{copy, dynamodb, DynamoStore};

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
