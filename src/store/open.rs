//! Opening the store a config names.

use std::sync::Arc;

use super::{dynamodb, DynamoStore, SledStore, Store};
use crate::config::{Backend, Config};

/// The configured store. For DynamoDB the table is checked first, so a
/// missing or foreign table stops start-up with a line saying what to do.
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.store.backend {
        Backend::Sled => Ok(Arc::new(SledStore::open(&config.store.path)?)),
        Backend::Dynamodb => {
            let table = config.store.table.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: the dynamodb backend needs `table` in [store]",
                    config.path
                )
            })?;
            let store = DynamoStore::connect(table).await;
            dynamodb::verify(store.client(), table)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.path))?;
            Ok(Arc::new(store))
        }
    }
}
