//! Audit events (spec 8.5). Built by the service, written by the store in the
//! same transaction as the state change they describe.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::request::Request;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub event: String,
    pub request_id: String,
    pub actor: String,
    pub cluster: String,
    pub principal: String,
    pub details: Value,
    /// With `[store] integrity_key_env`: the HMAC of this event
    /// (`domain::integrity`), set by the store wrapper when it is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

pub const ACTOR_TOLLGATE: &str = "tollgate";

impl AuditEvent {
    pub fn for_request(
        req: &Request,
        event: &str,
        actor: &str,
        now: OffsetDateTime,
        details: Value,
    ) -> Self {
        AuditEvent {
            ts: now,
            event: event.to_string(),
            request_id: req.id.to_string(),
            actor: actor.to_string(),
            cluster: req.access.cluster.clone(),
            principal: req.access.principal.clone(),
            details,
            mac: None,
        }
    }
}
