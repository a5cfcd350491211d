//! Creating the table (`tollgate store init`) and checking that an existing
//! one has the layout this version expects (`tollgate check`, start-up).

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TableDescription, TableStatus,
};
use aws_sdk_dynamodb::Client;
use std::time::{Duration, Instant};

use super::error::{classify, describe};
use super::items::{
    key, live_item, n, request_of, s, LIVE_INDEX, LIVE_INDEX_VERSION, META, PK, REQUEST, SK,
    VERSION,
};
use super::DynamoStore;
use crate::store::StoreError;

/// Creating an on-demand table usually takes seconds; this bounds a stuck
/// creation so `store init` says so instead of hanging.
const ACTIVE_DEADLINE: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, PartialEq, Eq)]
pub enum InitOutcome {
    Created,
    AlreadyThere,
    /// An existing table made before the live index: every live row got its
    /// `LIVE` item.
    Upgraded {
        live: usize,
    },
}

async fn describe_table(
    client: &Client,
    table: &str,
) -> Result<Option<TableDescription>, StoreError> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(out.table),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
        Err(e) => Err(classify(table, "DescribeTable", e)),
    }
}

/// What is wrong with an existing table's key schema, if anything.
fn schema_problem(table: &str, desc: &TableDescription) -> Option<String> {
    let keys: Vec<(String, String)> = desc
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    let want = vec![
        (PK.to_string(), "HASH".to_string()),
        (SK.to_string(), "RANGE".to_string()),
    ];
    if keys != want {
        let got: Vec<String> = keys.iter().map(|(n, t)| format!("{n} {t}")).collect();
        return Some(format!(
            "table {table} has key schema [{}], Tollgate needs [pk HASH, sk RANGE] (both strings); \
             point store.table at a new table and run `tollgate store init`",
            got.join(", ")
        ));
    }
    for name in [PK, SK] {
        let ty = desc
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == name)
            .map(|d| d.attribute_type().as_str().to_string());
        if ty.as_deref() != Some("S") {
            return Some(format!(
                "table {table}: key attribute {name} is of type {}, Tollgate needs S (string)",
                ty.unwrap_or_else(|| "undefined".into())
            ));
        }
    }
    None
}

/// Checks the table exists, is usable and has the expected keys; the error
/// says what is wrong and what to do.
pub async fn verify(client: &Client, table: &str) -> Result<String, StoreError> {
    let Some(desc) = describe_table(client, table).await? else {
        return Err(StoreError::Backend(format!(
            "DynamoDB table {table} does not exist in this account and region: run `tollgate store init`"
        )));
    };
    if let Some(problem) = schema_problem(table, &desc) {
        return Err(StoreError::Backend(problem));
    }
    match desc.table_status() {
        Some(TableStatus::Active) | Some(TableStatus::Updating) | None => {}
        Some(other) => {
            return Err(StoreError::Unavailable(format!(
                "DynamoDB table {table} is {}, not ACTIVE",
                other.as_str()
            )))
        }
    }
    if !has_live_index(client, table).await? {
        return Err(StoreError::Backend(format!(
            "DynamoDB table {table} has no live index (it was made by an older Tollgate): \
             stop every replica, run `tollgate store init` once, then start them again"
        )));
    }
    Ok(format!(
        "DynamoDB table {table} (key pk/sk, live index) is ready"
    ))
}

async fn has_live_index(client: &Client, table: &str) -> Result<bool, StoreError> {
    let out = client
        .get_item()
        .table_name(table)
        .set_key(Some(key(META, LIVE_INDEX)))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify(table, "GetItem (live index marker)", e))?;
    Ok(out
        .item()
        .and_then(|i| i.get(VERSION))
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|v| v >= LIVE_INDEX_VERSION))
}

/// Gives every live row its `LIVE` item, then writes the marker. Run with
/// no replica serving: a row an older replica changes meanwhile would not
/// have its item follow it. Running it again rewrites the same items.
async fn build_live_index(client: &Client, table: &str) -> Result<usize, StoreError> {
    let store = DynamoStore::new(client.clone(), table);
    let mut items = Vec::new();
    for row in store.query(REQUEST, None, None).await? {
        if let Some(item) = live_item(&request_of(&row)?)? {
            items.push(item);
        }
    }
    let live = items.len();
    store.batch_write(items).await?;
    let mut marker = key(META, LIVE_INDEX);
    marker.insert(VERSION.into(), n(LIVE_INDEX_VERSION));
    marker.insert("note".into(), s("every live request has its LIVE item"));
    client
        .put_item()
        .table_name(table)
        .set_item(Some(marker))
        .send()
        .await
        .map_err(|e| classify(table, "PutItem (live index marker)", e))?;
    Ok(live)
}

/// Creates the table (on-demand billing) and waits until it is ACTIVE.
/// Safe to run again: an existing table with the right keys is left as it
/// is, one with other keys is an error.
pub async fn init(client: &Client, table: &str) -> Result<InitOutcome, StoreError> {
    let outcome = match describe_table(client, table).await? {
        Some(desc) => {
            if let Some(problem) = schema_problem(table, &desc) {
                return Err(StoreError::Backend(problem));
            }
            InitOutcome::AlreadyThere
        }
        None => {
            create(client, table).await?;
            InitOutcome::Created
        }
    };
    wait_active(client, table).await?;
    if has_live_index(client, table).await? {
        return Ok(outcome);
    }
    let live = build_live_index(client, table).await?;
    Ok(match outcome {
        InitOutcome::Created => InitOutcome::Created,
        _ => InitOutcome::Upgraded { live },
    })
}

fn attribute(name: &str) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| StoreError::Backend(describe(&e)))
}

fn key_element(name: &str, key_type: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .map_err(|e| StoreError::Backend(describe(&e)))
}

async fn create(client: &Client, table: &str) -> Result<(), StoreError> {
    let result = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(PK)?)
        .attribute_definitions(attribute(SK)?)
        .key_schema(key_element(PK, KeyType::Hash)?)
        .key_schema(key_element(SK, KeyType::Range)?)
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        // Another `store init` got there first; the wait and its schema
        // check decide whether that table is usable.
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
        Err(e) => Err(classify(table, "CreateTable", e)),
    }
}

async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    let deadline = Instant::now() + ACTIVE_DEADLINE;
    loop {
        let desc = describe_table(client, table).await?;
        let status = desc.as_ref().and_then(|d| d.table_status.clone());
        if desc.is_some() && matches!(status, Some(TableStatus::Active) | None) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Unavailable(format!(
                "DynamoDB table {table} not ACTIVE after {ACTIVE_DEADLINE:?} (status {})",
                status.as_ref().map_or("unknown", |s| s.as_str())
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
