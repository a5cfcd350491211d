//! From SDK errors to `StoreError`: what is about the data (a failed
//! condition) is told apart from what is about reaching DynamoDB, so the
//! service can re-read on a conflict and say "temporarily unavailable" on an
//! outage.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;

use crate::store::StoreError;

/// Error codes that mean "not now" rather than "not this": retrying later,
/// with the same input, can succeed.
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionInProgressException",
];

pub(super) fn describe<E: std::error::Error>(e: &E) -> String {
    aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string()
}

/// Any SDK error of an operation on `table`.
pub(super) fn classify<E, R>(table: &str, op: &str, e: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let text = format!("DynamoDB {op} on table {table}: {}", describe(&e));
    match &e {
        SdkError::ConstructionFailure(_) => StoreError::Backend(text),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(text)
        }
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            if TRANSIENT_CODES.contains(&code) {
                StoreError::Unavailable(text)
            } else if code == "ResourceNotFoundException" {
                StoreError::Backend(format!(
                    "{text} (does the table exist? `tollgate store init` creates it)"
                ))
            } else {
                StoreError::Backend(text)
            }
        }
        _ => StoreError::Unavailable(text),
    }
}

/// How a `TransactWriteItems` was refused.
pub(super) enum Refusal {
    /// The condition on the first item (the request row) did not hold.
    Condition,
    /// Another transaction touched one of the items at the same moment;
    /// nothing was written and the same write may succeed on a retry.
    Contended,
    Other(StoreError),
}

pub(super) fn refusal(
    table: &str,
    e: SdkError<TransactWriteItemsError, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> Refusal {
    let Some(TransactWriteItemsError::TransactionCanceledException(cancel)) = e.as_service_error()
    else {
        return Refusal::Other(classify(table, "TransactWriteItems", e));
    };
    let codes: Vec<&str> = cancel
        .cancellation_reasons()
        .iter()
        .map(|r| r.code().unwrap_or("None"))
        .collect();
    if codes.contains(&"ConditionalCheckFailed") {
        return Refusal::Condition;
    }
    if codes.contains(&"TransactionConflict") {
        return Refusal::Contended;
    }
    if codes
        .iter()
        .any(|c| *c == "ThrottlingError" || *c == "ProvisionedThroughputExceeded")
    {
        return Refusal::Other(StoreError::Unavailable(format!(
            "DynamoDB TransactWriteItems on table {table} throttled: {}",
            codes.join(", ")
        )));
    }
    // Only the request row carries a condition, so a cancellation that names
    // no reason (some emulators omit them) can only be that condition.
    if codes.iter().all(|c| *c == "None") {
        return Refusal::Condition;
    }
    Refusal::Other(StoreError::Backend(format!(
        "DynamoDB TransactWriteItems on table {table} cancelled: {}",
        codes.join(", ")
    )))
}
