//! `/access …` text → `Command`. Pure; every refusal is a message fit to
//! show the user as is.

use super::text::{clip, escape_slack, has_hidden_characters};

pub const MAX_COMMAND_LEN: usize = 2000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/access` alone: open the request form.
    Modal,
    Help,
    List,
    Clusters,
    Revoke {
        id: String,
    },
    Extend {
        id: String,
        duration: String,
    },
    Request(RequestArgs),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestArgs {
    pub cluster: String,
    /// Still text: the range it must fall in depends on the cluster and role.
    pub duration: String,
    /// Words after the duration (without `--ns`); the first may name a role.
    pub words: Vec<String>,
    pub namespaces: Option<Vec<String>>,
    pub break_glass: Option<String>,
}

pub const USAGE: &str = "Usage: `/access eks <cluster> <duration> [role] [--ns a,b] [reason…]`, e.g. `/access eks prod-cluster 2h edit --ns payments INC-1234`. Also: `/access list`, `/access revoke <id>`, `/access extend <id> <duration>`, `/access clusters`, `/access help`.";

pub fn parse(text: &str) -> Result<Command, String> {
    if text.len() > MAX_COMMAND_LEN {
        return Err(format!(
            "That command is {} characters long; the limit is {MAX_COMMAND_LEN}. {USAGE}",
            text.len()
        ));
    }
    if has_hidden_characters(text) {
        return Err(
            "The command contains control or text-direction characters, which could hide what it asks for. Please type it again in plain text."
                .to_string(),
        );
    }
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let Some((&head, rest)) = tokens.split_first() else {
        return Ok(Command::Modal);
    };
    match head.to_ascii_lowercase().as_str() {
        "help" => Ok(Command::Help),
        "list" => Ok(Command::List),
        "clusters" => Ok(Command::Clusters),
        "revoke" => match rest {
            [id] => Ok(Command::Revoke { id: id.to_string() }),
            _ => Err("Usage: `/access revoke <id>`, e.g. `/access revoke R-7F3K2`.".into()),
        },
        "extend" => match rest {
            [id, duration] => Ok(Command::Extend {
                id: id.to_string(),
                duration: duration.to_string(),
            }),
            _ => Err(
                "Usage: `/access extend <id> <duration>`, e.g. `/access extend R-7F3K2 1h`.".into(),
            ),
        },
        "eks" => parse_request(rest).map(Command::Request),
        other => Err(format!(
            "I don't know `{}`. {USAGE}",
            escape_slack(&clip(other, 40))
        )),
    }
}

fn parse_request(tokens: &[&str]) -> Result<RequestArgs, String> {
    let (cluster, duration, rest) = match tokens {
        [cluster, duration, rest @ ..]
            if !cluster.starts_with("--") && !duration.starts_with("--") =>
        {
            (*cluster, *duration, rest)
        }
        _ => return Err(format!("A request needs a cluster and a duration. {USAGE}")),
    };
    let mut words = Vec::new();
    let mut namespaces: Option<Vec<String>> = None;
    let mut break_glass = None;
    let mut i = 0;
    while i < rest.len() {
        let tok = rest[i];
        if tok == "--break-glass" {
            let reason = rest[i + 1..].join(" ");
            if reason.is_empty() {
                return Err(
                    "`--break-glass` needs a reason after it, e.g. `--break-glass SEV1 INC-999`."
                        .into(),
                );
            }
            break_glass = Some(reason);
            break;
        }
        let ns_value = if tok == "--ns" {
            i += 1;
            match rest.get(i) {
                Some(v) => Some(*v),
                None => {
                    return Err(
                        "`--ns` needs namespaces after it, e.g. `--ns payments,web`.".into(),
                    )
                }
            }
        } else {
            tok.strip_prefix("--ns=")
        };
        match ns_value {
            Some(value) => {
                let list = namespaces.get_or_insert_with(Vec::new);
                for ns in value.split(',').filter(|s| !s.is_empty()) {
                    validate_namespace(ns)?;
                    if !list.iter().any(|n| n == ns) {
                        list.push(ns.to_string());
                    }
                }
                if list.is_empty() {
                    return Err(
                        "`--ns` needs at least one namespace, e.g. `--ns payments,web`.".into(),
                    );
                }
            }
            None if tok.starts_with("--") => {
                return Err(format!(
                    "Unknown option `{}`. Options are `--ns` and `--break-glass`.",
                    escape_slack(&clip(tok, 40))
                ))
            }
            None => words.push(tok.to_string()),
        }
        i += 1;
    }
    Ok(RequestArgs {
        cluster: cluster.to_string(),
        duration: duration.to_string(),
        words,
        namespaces,
        break_glass,
    })
}

/// Kubernetes namespace names are RFC 1123 labels.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid namespace name: use lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit.",
            escape_slack(&clip(ns, 63))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> RequestArgs {
        match parse(text) {
            Ok(Command::Request(args)) => args,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn self_service_forms() {
        assert_eq!(parse(""), Ok(Command::Modal));
        assert_eq!(parse("   "), Ok(Command::Modal));
        assert_eq!(parse("help"), Ok(Command::Help));
        assert_eq!(parse("HELP"), Ok(Command::Help));
        assert_eq!(parse("list"), Ok(Command::List));
        assert_eq!(parse("clusters"), Ok(Command::Clusters));
        assert_eq!(
            parse("revoke R-7F3K2"),
            Ok(Command::Revoke {
                id: "R-7F3K2".into()
            })
        );
        assert_eq!(
            parse("extend R-7F3K2 1h"),
            Ok(Command::Extend {
                id: "R-7F3K2".into(),
                duration: "1h".into()
            })
        );
        assert!(parse("revoke").is_err());
        assert!(parse("extend R-7F3K2").is_err());
    }

    #[test]
    fn request_with_role_namespaces_and_reason() {
        let a = req("eks prod-cluster 2h edit --ns payments,web debugging INC-1234");
        assert_eq!(a.cluster, "prod-cluster");
        assert_eq!(a.duration, "2h");
        assert_eq!(a.words, vec!["edit", "debugging", "INC-1234"]);
        assert_eq!(a.namespaces, Some(vec!["payments".into(), "web".into()]));
        assert_eq!(a.break_glass, None);
    }

    #[test]
    fn request_minimal_and_ns_forms() {
        let a = req("eks staging 30m");
        assert!(a.words.is_empty());
        assert_eq!(a.namespaces, None);
        let b = req("eks staging 30m view --ns=a --ns b,a");
        assert_eq!(b.namespaces, Some(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn break_glass_takes_the_rest_of_the_line() {
        let a = req("eks prod-cluster 30m admin --break-glass SEV1 INC-999 --ns x");
        assert_eq!(a.words, vec!["admin"]);
        assert_eq!(a.break_glass.as_deref(), Some("SEV1 INC-999 --ns x"));
        assert!(parse("eks prod-cluster 30m admin --break-glass").is_err());
    }

    #[test]
    fn garbage_is_refused_with_usage() {
        for bad in [
            "eks",
            "eks prod",
            "eks --ns a 2h",
            "frobnicate",
            "eks c 2h --wat",
            "eks c 2h --ns",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(parse("eks").unwrap_err().contains("Usage"));
    }

    #[test]
    fn namespaces_must_be_rfc1123_labels() {
        for bad in [
            "../../etc",
            "Payments",
            "-a",
            "a-",
            "a_b",
            "a.b",
            &"x".repeat(64),
        ] {
            let err = parse(&format!("eks c 1h --ns {bad}")).unwrap_err();
            assert!(err.contains("not a valid namespace"), "{bad}: {err}");
        }
        assert!(parse("eks c 1h --ns a-1,b2").is_ok());
    }

    #[test]
    fn hidden_characters_and_huge_input_refused() {
        assert!(parse("eks prod\u{202E}dorp 1h")
            .unwrap_err()
            .contains("control"));
        assert!(parse("eks prod\u{0000} 1h")
            .unwrap_err()
            .contains("control"));
        let huge = format!("eks {} 1h", "c".repeat(5000));
        assert!(parse(&huge).unwrap_err().contains("limit"));
    }

    #[test]
    fn echoed_text_is_escaped() {
        let err = parse("<!channel> x").unwrap_err();
        assert!(err.contains("&lt;!channel&gt;"), "{err}");
    }
}
