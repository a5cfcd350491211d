//! The request modal: its Block Kit view, and reading a `view_submission`
//! back into a form.

use serde_json::{json, Value};

use crate::domain::form::{Field, RequestForm, MAX_REASON_CHARS};

/// Identifies Tollgate's modal in `view_submission` payloads.
pub const CALLBACK_REQUEST: &str = "tollgate_request";
/// Every input element uses this action id; the block id names the field.
const ACTION_VALUE: &str = "value";
/// Slack allows at most 100 options in a static select.
const MAX_OPTIONS: usize = 100;

fn plain(text: &str) -> Value {
    json!({"type": "plain_text", "text": text})
}

fn option(value: &str) -> Value {
    json!({"text": plain(value), "value": value})
}

fn select(field: Field, label: &str, values: &[String], hint: Option<String>) -> Value {
    let options: Vec<Value> = values.iter().take(MAX_OPTIONS).map(|v| option(v)).collect();
    let mut block = json!({
        "type": "input",
        "block_id": field.block_id(),
        "label": plain(label),
        "element": {"type": "static_select", "action_id": ACTION_VALUE, "options": options},
    });
    if let Some(h) = hint {
        block["hint"] = plain(&h);
    }
    block
}

fn text_input(
    field: Field,
    label: &str,
    placeholder: &str,
    optional: bool,
    multiline: bool,
    max_length: usize,
) -> Value {
    json!({
        "type": "input",
        "block_id": field.block_id(),
        "optional": optional,
        "label": plain(label),
        "element": {
            "type": "plain_text_input",
            "action_id": ACTION_VALUE,
            "multiline": multiline,
            "max_length": max_length,
            "placeholder": plain(placeholder),
        },
    })
}

/// What the user may request, per cluster: (cluster, roles).
pub type Offer = Vec<(String, Vec<String>)>;

/// The modal. The selects offer only what `offer` allows; a cluster/role
/// pair that does not go together is refused on submit, under the role.
/// `private_metadata` carries the command's response_url for the receipt.
pub fn request_view(offer: &Offer, response_url: Option<&str>) -> Value {
    let clusters: Vec<String> = offer.iter().map(|(c, _)| c.clone()).collect();
    let mut roles: Vec<String> = offer.iter().flat_map(|(_, r)| r.iter().cloned()).collect();
    roles.sort();
    roles.dedup();
    let hint = offer
        .iter()
        .map(|(c, r)| format!("{c}: {}", r.join(", ")))
        .collect::<Vec<_>>()
        .join("; ");
    json!({
        "type": "modal",
        "callback_id": CALLBACK_REQUEST,
        "title": plain("Request access"),
        "submit": plain("Request"),
        "close": plain("Cancel"),
        "private_metadata": response_url.unwrap_or_default(),
        "blocks": [
            select(Field::Cluster, "Cluster", &clusters, None),
            select(Field::Role, "Role", &roles, Some(crate::domain::text::clip(&hint, 140))),
            text_input(Field::Namespaces, "Namespaces", "payments, web (empty: cluster-wide)", true, false, 500),
            text_input(Field::Duration, "Duration", "2h", false, false, 20),
            text_input(Field::Reason, "Reason", "INC-1234: why you need it", true, true, MAX_REASON_CHARS),
        ],
    })
}

/// A submitted modal: who, the form, and the response_url it carries.
pub struct Submission {
    pub user_id: String,
    pub form: RequestForm,
    pub response_url: Option<String>,
}

fn field_value(values: &Value, field: Field) -> String {
    let v = &values[field.block_id()][ACTION_VALUE];
    v["selected_option"]["value"]
        .as_str()
        .or_else(|| v["value"].as_str())
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `None` for a payload that is not Tollgate's request modal.
pub fn parse_submission(payload: &Value) -> Option<Submission> {
    let view = &payload["view"];
    if view["callback_id"] != CALLBACK_REQUEST {
        return None;
    }
    let values = &view["state"]["values"];
    let url = view["private_metadata"].as_str().unwrap_or_default();
    Some(Submission {
        user_id: payload["user"]["id"].as_str()?.to_string(),
        form: RequestForm {
            cluster: field_value(values, Field::Cluster),
            role: field_value(values, Field::Role),
            namespaces: field_value(values, Field::Namespaces),
            duration: field_value(values, Field::Duration),
            reason: field_value(values, Field::Reason),
        },
        response_url: (!url.is_empty()).then(|| url.to_string()),
    })
}

/// The answer that keeps the modal open with messages under the fields.
pub fn errors_response(errors: &[(Field, String)]) -> Value {
    let map: serde_json::Map<String, Value> = errors
        .iter()
        .map(|(f, m)| {
            (
                f.block_id().to_string(),
                Value::String(crate::domain::form::for_display(m)),
            )
        })
        .collect();
    json!({"response_action": "errors", "errors": map})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submission_reads_back_what_the_view_asked_for() {
        let offer = vec![("prod".to_string(), vec!["view".to_string()])];
        let view = request_view(&offer, Some("https://hooks.example/1"));
        // Slack's state: selects give selected_option, inputs give value.
        let payload = json!({
            "type": "view_submission",
            "user": {"id": "U1"},
            "view": {
                "callback_id": view["callback_id"],
                "private_metadata": view["private_metadata"],
                "state": {"values": {
                    "cluster": {"value": {"type": "static_select", "selected_option": {"value": "prod"}}},
                    "role": {"value": {"type": "static_select", "selected_option": {"value": "view"}}},
                    "namespaces": {"value": {"type": "plain_text_input", "value": null}},
                    "duration": {"value": {"type": "plain_text_input", "value": " 2h "}},
                    "reason": {"value": {"type": "plain_text_input", "value": "INC-1"}},
                }},
            },
        });
        let s = parse_submission(&payload).unwrap();
        assert_eq!(s.user_id, "U1");
        assert_eq!(s.response_url.as_deref(), Some("https://hooks.example/1"));
        assert_eq!(
            s.form,
            RequestForm {
                cluster: "prod".into(),
                role: "view".into(),
                namespaces: String::new(),
                duration: "2h".into(),
                reason: "INC-1".into(),
            }
        );
        let blocks = view["blocks"].as_array().unwrap();
        let ids: Vec<&str> = blocks
            .iter()
            .filter_map(|b| b["block_id"].as_str())
            .collect();
        assert_eq!(ids, ["cluster", "role", "namespaces", "duration", "reason"]);
    }

    #[test]
    fn other_views_are_not_ours() {
        assert!(parse_submission(&json!({"view": {"callback_id": "x"}})).is_none());
    }
}
