//! The request modal's fields → the same `RequestArgs` a typed command
//! gives, with every problem attached to the field it belongs to, so Slack
//! can show it under that field.

use super::command::{validate_namespace, RequestArgs};
use super::duration::parse_in_range;
use super::policy::{ClusterPolicy, Strategy};
use super::text::{clip, escape_slack, has_hidden_characters};

/// The modal's input blocks; the names are the `block_id`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Cluster,
    Role,
    Namespaces,
    Duration,
    Reason,
}

impl Field {
    pub fn block_id(self) -> &'static str {
        match self {
            Field::Cluster => "cluster",
            Field::Role => "role",
            Field::Namespaces => "namespaces",
            Field::Duration => "duration",
            Field::Reason => "reason",
        }
    }
}

/// What the user entered, as text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestForm {
    pub cluster: String,
    pub role: String,
    pub namespaces: String,
    pub duration: String,
    pub reason: String,
}

pub type FieldErrors = Vec<(Field, String)>;

/// Checks every field against the configuration and reports all problems
/// at once, not just the first.
/// The same bound as a typed command: a reason longer than this would not
/// fit on the card.
pub const MAX_REASON_CHARS: usize = 1000;

pub fn check(form: &RequestForm, clusters: &[ClusterPolicy]) -> Result<RequestArgs, FieldErrors> {
    let mut errors = FieldErrors::new();
    // What the approver reads must be what was typed: no hidden or
    // direction-changing characters anywhere, as for a typed command.
    for (field, text) in [
        (Field::Namespaces, &form.namespaces),
        (Field::Duration, &form.duration),
        (Field::Reason, &form.reason),
    ] {
        if has_hidden_characters(text) {
            errors.push((
                field,
                "Contains control or text-direction characters; type it again in plain text."
                    .into(),
            ));
        }
    }
    if form.reason.chars().count() > MAX_REASON_CHARS {
        errors.push((
            Field::Reason,
            format!("At most {MAX_REASON_CHARS} characters, please."),
        ));
    }
    let Some(cluster) = clusters.iter().find(|c| c.name == form.cluster) else {
        errors.push((Field::Cluster, "Choose one of the clusters offered.".into()));
        return Err(errors);
    };
    let role = cluster.roles.get(form.role.as_str());
    if role.is_none() {
        errors.push((
            Field::Role,
            format!(
                "{} has no role `{}`; its roles: {}.",
                cluster.name,
                clip(&form.role, 40),
                cluster.role_names()
            ),
        ));
    }
    let mut namespaces: Vec<String> = Vec::new();
    for ns in form
        .namespaces
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
    {
        match validate_namespace(ns) {
            Ok(()) if !namespaces.iter().any(|n| n == ns) => namespaces.push(ns.to_string()),
            Ok(()) => {}
            Err(e) => {
                errors.push((Field::Namespaces, e));
                break;
            }
        }
    }
    if cluster.strategy == Strategy::AwsAuth && !namespaces.is_empty() {
        errors.push((
            Field::Namespaces,
            format!(
                "{} grants cluster-wide aws-auth groups; leave namespaces empty.",
                cluster.name
            ),
        ));
    }
    if let Some(role) = role {
        if role.namespaced && namespaces.is_empty() {
            errors.push((
                Field::Namespaces,
                format!(
                    "`{}` is namespaced: name at least one namespace.",
                    role.name
                ),
            ));
        }
        // Spec 9.7, under the field that asked; `submit` checks it again.
        if let Err(refusal) = role.namespace_rules.check(&namespaces) {
            errors.push((
                Field::Namespaces,
                refusal.message(&role.name, &cluster.name),
            ));
        }
        if let Err(e) = parse_in_range(&form.duration, &role.limits.range()) {
            errors.push((Field::Duration, e));
        }
        if role.limits.require_reason && form.reason.trim().is_empty() {
            errors.push((
                Field::Reason,
                format!(
                    "`{}` on {} needs a reason, e.g. a ticket.",
                    role.name, cluster.name
                ),
            ));
        }
    }
    if !errors.is_empty() {
        // Slack shows one message per field: the first is the one to fix.
        let mut seen = Vec::new();
        errors.retain(|(f, _)| {
            let first = !seen.contains(f);
            seen.push(*f);
            first
        });
        return Err(errors);
    }
    let mut words = vec![form.role.clone()];
    words.extend(form.reason.split_whitespace().map(str::to_string));
    Ok(RequestArgs {
        cluster: cluster.name.clone(),
        duration: form.duration.trim().to_string(),
        words,
        namespaces: (!namespaces.is_empty()).then_some(namespaces),
        break_glass: None,
    })
}

/// Slack shows field errors as plain text, briefly.
pub fn for_display(message: &str) -> String {
    clip(&escape_slack(message).replace('`', ""), 150)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::tests::cluster;

    fn form(role: &str, ns: &str, duration: &str) -> RequestForm {
        RequestForm {
            cluster: cluster().name,
            role: role.into(),
            namespaces: ns.into(),
            duration: duration.into(),
            reason: "INC-1".into(),
        }
    }

    fn fields(errors: &FieldErrors) -> Vec<Field> {
        errors.iter().map(|(f, _)| *f).collect()
    }

    #[test]
    fn a_valid_form_gives_the_same_args_as_a_command() {
        let c = cluster();
        let role = c.roles.keys().next().unwrap().clone();
        let args = check(
            &form(&role, "payments, web,payments", "1h"),
            std::slice::from_ref(&c),
        )
        .unwrap();
        assert_eq!(args.cluster, c.name);
        assert_eq!(args.words, vec![role, "INC-1".to_string()]);
        assert_eq!(
            args.namespaces,
            Some(vec!["payments".to_string(), "web".to_string()])
        );
        assert_eq!(args.duration, "1h");
    }

    #[test]
    fn every_bad_field_is_reported_under_itself() {
        let c = cluster();
        let role = c.roles.keys().next().unwrap().clone();
        let errors = check(&form(&role, "Bad_NS", "99d"), std::slice::from_ref(&c)).unwrap_err();
        assert_eq!(fields(&errors), vec![Field::Namespaces, Field::Duration]);
        let errors = check(&form("nope", "", "1h"), std::slice::from_ref(&c)).unwrap_err();
        assert_eq!(fields(&errors), vec![Field::Role]);
        let mut unknown = form(&role, "", "1h");
        unknown.cluster = "elsewhere".into();
        assert_eq!(
            fields(&check(&unknown, &[c]).unwrap_err()),
            vec![Field::Cluster]
        );
    }

    /// Spec 9.7: the modal shows a protected namespace under its field.
    #[test]
    fn protected_namespaces_are_refused_under_the_namespaces_field() {
        let c = cluster();
        for ns in ["tollgate", "payments,kube-system"] {
            let errors = check(&form("edit", ns, "1h"), std::slice::from_ref(&c)).unwrap_err();
            assert_eq!(fields(&errors), vec![Field::Namespaces], "{ns}");
            let shown = for_display(&errors[0].1);
            assert!(
                shown.contains("[server] namespace") || shown.contains("deny_namespaces"),
                "{shown}"
            );
        }
        assert!(check(&form("edit", "payments", "1h"), &[c]).is_ok());
    }

    #[test]
    fn hidden_characters_and_long_reasons_are_refused() {
        let c = cluster();
        let mut f = form("view", "", "1h");
        f.reason = "INC-1 \u{202e}evil".into();
        assert_eq!(
            fields(&check(&f, std::slice::from_ref(&c)).unwrap_err()),
            vec![Field::Reason]
        );
        f.reason = "x".repeat(MAX_REASON_CHARS + 1);
        assert_eq!(fields(&check(&f, &[c]).unwrap_err()), vec![Field::Reason]);
    }

    #[test]
    fn display_is_plain_and_short() {
        let shown = for_display(&format!("`<!channel>` {}", "x".repeat(400)));
        assert!(!shown.contains('`') && !shown.contains("<!channel>"));
        assert!(shown.chars().count() <= 151);
    }
}
