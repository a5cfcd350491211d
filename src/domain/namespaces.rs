//! Spec 9.7: the namespaces Tollgate never grants. Namespaced access to
//! Tollgate's own namespace reaches its Secret (the Slack signing secret:
//! every approval forgeable) and its ServiceAccount (its IAM role); the
//! system namespaces reach the controllers' roles. Either outlives a revoke,
//! so such a request is refused before it is recorded, and a row that asks
//! for one is refused again at grant time.
//!
//! Patterns are globs over namespace names with one wildcard, `*`, which
//! matches any run of characters (none included).

/// `[server] namespace` unless set: where the shipped manifests install
/// Tollgate.
pub const DEFAULT_SERVER_NAMESPACE: &str = "tollgate";

/// `[defaults] deny_namespaces` unless set.
pub const DEFAULT_DENY: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// One role's namespace rules, resolved from `[server]`, `[defaults]`, the
/// cluster and the role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRules {
    /// `[server] namespace`: never granted, whatever the other keys say.
    pub server: String,
    /// `deny_namespaces` (globs); ignored when `allow` is set.
    pub deny: Vec<String>,
    /// The role's `namespaces` allow-list (globs): when set, only these,
    /// and a request must name namespaces.
    pub allow: Option<Vec<String>>,
    /// `sensitive_namespaces` (globs): marked on the approval card.
    pub sensitive: Vec<String>,
}

impl Default for NamespaceRules {
    fn default() -> Self {
        NamespaceRules {
            server: DEFAULT_SERVER_NAMESPACE.to_string(),
            deny: DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            allow: None,
            sensitive: Vec::new(),
        }
    }
}

/// Why a namespace rule refuses a request, naming the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceRefusal {
    /// `[server] namespace`.
    Server { namespace: String },
    /// `deny_namespaces`, with the pattern that matched.
    Denied { namespace: String, pattern: String },
    /// Outside the role's `namespaces` allow-list.
    NotAllowed {
        namespace: String,
        allow: Vec<String>,
    },
    /// Cluster-wide, for a role limited to an allow-list: cluster-wide
    /// would reach every namespace, the denied ones included.
    ClusterWide { allow: Vec<String> },
}

impl NamespaceRefusal {
    /// The configuration key that refused: what an operator looks up.
    pub fn rule(&self) -> &'static str {
        match self {
            NamespaceRefusal::Server { .. } => "server.namespace",
            NamespaceRefusal::Denied { .. } => "deny_namespaces",
            NamespaceRefusal::NotAllowed { .. } | NamespaceRefusal::ClusterWide { .. } => {
                "namespaces"
            }
        }
    }

    /// Words for the requester (mrkdwn; every name in it passed
    /// `validate_namespace` or `validate_glob`, so none can format or ping).
    pub fn message(&self, role: &str, cluster: &str) -> String {
        match self {
            NamespaceRefusal::Server { namespace } => format!(
                "`{namespace}` is the namespace Tollgate itself runs in (`[server] namespace`): it is never granted, on any cluster, whatever the role."
            ),
            NamespaceRefusal::Denied { namespace, pattern } => format!(
                "`{namespace}` is a denied namespace for `{role}` on {cluster} (`deny_namespaces` has \"{pattern}\")."
            ),
            NamespaceRefusal::NotAllowed { namespace, allow } => format!(
                "`{namespace}` is outside the namespaces `{role}` on {cluster} may reach (`namespaces` = {}).",
                quoted(allow)
            ),
            NamespaceRefusal::ClusterWide { allow } => format!(
                "`{role}` on {cluster} is limited to namespaces {} (`namespaces`): add `--ns <namespace>`.",
                quoted(allow)
            ),
        }
    }
}

fn quoted(patterns: &[String]) -> String {
    format!(
        "[{}]",
        patterns
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl NamespaceRules {
    /// Whether a request for `namespaces` (empty: cluster-wide) may be
    /// recorded or granted; the first namespace refused, by the first rule
    /// that refuses it. The server namespace is looked for first, across the
    /// whole list: no allow-list can admit it, and it is the rule to name.
    pub fn check(&self, namespaces: &[String]) -> Result<(), NamespaceRefusal> {
        if namespaces.is_empty() {
            return match &self.allow {
                Some(allow) => Err(NamespaceRefusal::ClusterWide {
                    allow: allow.clone(),
                }),
                None => Ok(()),
            };
        }
        if let Some(ns) = namespaces.iter().find(|ns| **ns == self.server) {
            return Err(NamespaceRefusal::Server {
                namespace: ns.clone(),
            });
        }
        for ns in namespaces {
            match &self.allow {
                Some(allow) => {
                    if !allow.iter().any(|p| glob_match(p, ns)) {
                        return Err(NamespaceRefusal::NotAllowed {
                            namespace: ns.clone(),
                            allow: allow.clone(),
                        });
                    }
                }
                None => {
                    if let Some(pattern) = self.deny.iter().find(|p| glob_match(p, ns)) {
                        return Err(NamespaceRefusal::Denied {
                            namespace: ns.clone(),
                            pattern: pattern.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The namespaces of a request that match `sensitive_namespaces`, in
    /// the request's order.
    pub fn sensitive_of(&self, namespaces: &[String]) -> Vec<String> {
        namespaces
            .iter()
            .filter(|ns| self.sensitive.iter().any(|p| glob_match(p, ns)))
            .cloned()
            .collect()
    }

    /// One line for `tollgate check`: what this role may and may not reach.
    /// `namespaced`: the role requires `--ns`; otherwise a request without
    /// it is cluster-wide and reaches every namespace.
    pub fn summary(&self, namespaced: bool) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let scope = match (&self.allow, namespaced) {
            (Some(allow), _) => format!(
                "only namespaces {} (allow-list; deny_namespaces does not apply), never {}",
                list(allow),
                self.server
            ),
            (None, true) => format!(
                "namespaces except {} and denied {}",
                self.server,
                list(&self.deny)
            ),
            (None, false) => format!(
                "cluster-wide without --ns (every namespace, {} included); with --ns, namespaces except {} and denied {}",
                self.server,
                self.server,
                list(&self.deny)
            ),
        };
        format!("{scope}; sensitive {}", list(&self.sensitive))
    }
}

/// `*` matches any run of characters, none included; everything else
/// matches itself. Iterative, remembering only the last `*`: linear in
/// practice and never exponential, whatever the pattern.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // The last `*` seen and the name position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let that `*` swallow one more character and try again.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A pattern in `deny_namespaces`, `namespaces` or `sensitive_namespaces`:
/// what a namespace name may hold (lowercase letters, digits, `-`) plus `*`.
/// Anything else could never match a namespace, so it is a typo that would
/// silently deny or allow nothing.
pub fn validate_glob(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern.len() <= 63
        && pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{pattern}` is not a namespace pattern: lowercase letters, digits, `-`, and `*` for any run of characters, at most 63 characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn glob_star_matches_any_run_and_nothing_else_is_special() {
        for (p, n) in [
            ("kube-system", "kube-system"),
            ("kube-*", "kube-system"),
            ("kube-*", "kube-"),
            ("*-prod", "payments-prod"),
            ("*", "anything"),
            ("team-*-prod", "team-a-prod"),
            ("team-*-prod", "team--prod"),
            ("*a*b*", "xxaxxbxx"),
            ("a**b", "ab"),
        ] {
            assert!(glob_match(p, n), "{p} should match {n}");
        }
        for (p, n) in [
            ("kube-system", "kube-systemx"),
            ("kube-system", "xkube-system"),
            ("kube-*", "kube"),
            ("*-prod", "prod"),
            ("*-prod", "payments-prod2"),
            ("team-*-prod", "team-a-dev"),
            ("*a*b*", "xxbxxaxx"),
            ("", "x"),
        ] {
            assert!(!glob_match(p, n), "{p} should not match {n}");
        }
        // No backtracking blow-up: many stars against a long near-miss.
        let long = "a".repeat(63);
        assert!(!glob_match("*a*a*a*a*a*a*a*a*a*a*b", &long));
    }

    #[test]
    fn globs_are_namespace_characters_and_star() {
        for good in ["kube-system", "*-prod", "*", "team-*", "a1-*-b"] {
            assert!(validate_glob(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Kube-*",
            "kube system",
            "kube/*",
            "team-?",
            "[a-z]",
            &"a".repeat(64),
        ] {
            let err = validate_glob(bad).unwrap_err();
            assert!(err.contains("not a namespace pattern"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_server_namespace_is_refused_whatever_the_allow_list() {
        let mut rules = NamespaceRules::default();
        let err = rules.check(&ns(&["tollgate"])).unwrap_err();
        assert_eq!(err.rule(), "server.namespace");
        // An allow-list that names it, or matches everything, does not help.
        for allow in [ns(&["tollgate"]), ns(&["*"]), ns(&["toll*"])] {
            rules.allow = Some(allow.clone());
            let err = rules.check(&ns(&["payments", "tollgate"])).unwrap_err();
            assert_eq!(
                err,
                NamespaceRefusal::Server {
                    namespace: "tollgate".into()
                },
                "{allow:?}"
            );
            assert!(err.message("edit", "prod").contains("[server] namespace"));
        }
        // Renamed: the new name is the protected one.
        let rules = NamespaceRules {
            server: "access-gate".into(),
            ..NamespaceRules::default()
        };
        assert!(rules.check(&ns(&["tollgate"])).is_ok());
        assert_eq!(
            rules.check(&ns(&["access-gate"])).unwrap_err().rule(),
            "server.namespace"
        );
    }

    #[test]
    fn deny_list_by_default_and_its_globs() {
        let rules = NamespaceRules::default();
        assert!(rules.check(&ns(&["payments", "web"])).is_ok());
        assert!(rules.check(&[]).is_ok(), "cluster-wide is the role's call");
        for denied in ["kube-system", "kube-public", "kube-node-lease"] {
            let err = rules.check(&ns(&["payments", denied])).unwrap_err();
            assert_eq!(err.rule(), "deny_namespaces");
            let text = err.message("edit", "prod");
            assert!(
                text.contains(denied) && text.contains("deny_namespaces"),
                "{text}"
            );
        }
        let rules = NamespaceRules {
            deny: ns(&["kube-*", "*-system"]),
            ..NamespaceRules::default()
        };
        assert_eq!(
            rules.check(&ns(&["istio-system"])).unwrap_err(),
            NamespaceRefusal::Denied {
                namespace: "istio-system".into(),
                pattern: "*-system".into()
            }
        );
        assert!(rules.check(&ns(&["kube-anything"])).is_err());
        assert!(rules.check(&ns(&["kubeflow"])).is_ok());
    }

    #[test]
    fn an_allow_list_replaces_the_deny_list_and_needs_namespaces() {
        let rules = NamespaceRules {
            allow: Some(ns(&["team-*", "kube-system"])),
            ..NamespaceRules::default()
        };
        assert!(rules.check(&ns(&["team-a", "kube-system"])).is_ok());
        let err = rules.check(&ns(&["team-a", "payments"])).unwrap_err();
        assert_eq!(err.rule(), "namespaces");
        let text = err.message("edit", "prod");
        assert!(
            text.contains("`payments`") && text.contains("\"team-*\""),
            "{text}"
        );
        let err = rules.check(&[]).unwrap_err();
        assert!(
            matches!(err, NamespaceRefusal::ClusterWide { .. })
                && err.message("edit", "prod").contains("--ns"),
            "{err:?}"
        );
    }

    #[test]
    fn sensitive_namespaces_are_picked_in_request_order() {
        let rules = NamespaceRules {
            sensitive: ns(&["*-prod", "payments"]),
            ..NamespaceRules::default()
        };
        assert_eq!(
            rules.sensitive_of(&ns(&["web-prod", "web", "payments"])),
            ns(&["web-prod", "payments"])
        );
        assert!(rules.sensitive_of(&ns(&["web"])).is_empty());
    }

    #[test]
    fn summary_names_every_rule() {
        let rules = NamespaceRules {
            sensitive: ns(&["payments"]),
            ..NamespaceRules::default()
        };
        let s = rules.summary(false);
        assert!(
            s.contains("cluster-wide without --ns")
                && s.contains("except tollgate")
                && s.contains("kube-system, kube-public, kube-node-lease")
                && s.contains("sensitive payments"),
            "{s}"
        );
        let allowed = NamespaceRules {
            allow: Some(ns(&["team-*"])),
            ..NamespaceRules::default()
        };
        let s = allowed.summary(true);
        assert!(
            s.contains("only namespaces team-*") && s.contains("never tollgate"),
            "{s}"
        );
    }
}
