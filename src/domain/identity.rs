//! Who a Slack user is in AWS and Kubernetes (spec 9.1): one pure function
//! from a Slack email to the principal that receives access, or a refusal.
//!
//! Rules, in order:
//! * The email is trimmed and ASCII-lowercased: Slack and mail servers treat
//!   `Alice@Example.com` and `alice@example.com` as one address, so they get
//!   one principal. Anything outside ASCII stays as it is and is refused
//!   below (look-alike letters never become a name).
//! * It must be exactly `local@domain`, both parts non-empty.
//! * With `allowed_email_domains` set, the domain must be one of them
//!   (exact match, case-insensitive; subdomains are not implied).
//! * The explicit `[identity.principals]` table wins over the template.
//! * An email that feeds a template (and every email that becomes a
//!   Kubernetes username) may only hold IAM name characters
//!   `[A-Za-z0-9+=,.@_-]`, and a `+` tag is refused rather than guessed
//!   (`alice+ops` is neither `alice` nor a role anyone created on purpose);
//!   such users are mapped through `[identity.principals]`.
//! * The result must be a well-formed IAM ARN: `arn:aws:iam::<12 digits>:`
//!   `role/` or `user/`, then path segments and a name of IAM characters,
//!   each 1-64 long. Nothing else is ever sent to AWS or Kubernetes.
//! * On `aws-auth` clusters the role's path is dropped, because EKS matches
//!   `mapRoles` items against the ARN without it.

use std::collections::BTreeMap;

use super::policy::Strategy;
use super::text::escape_slack;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityPolicy {
    pub principal_template: Option<String>,
    /// Keys lowercased: email addresses compare case-insensitively.
    pub principals: BTreeMap<String, String>,
    /// Lowercased; empty = any domain (allowed only when no template uses
    /// the email, which the config loader enforces).
    pub allowed_email_domains: Vec<String>,
    /// Slack guests (`is_restricted` / `is_ultra_restricted`) may request.
    pub allow_guests: bool,
}

/// What a request's access is given to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The IAM ARN (aws-auth: without the role path); on session-rbac
    /// clusters the Kubernetes username, as everyone shares one role there.
    pub principal: String,
    /// The Kubernetes username Tollgate gives the user (`tollgate:<email>`).
    pub k8s_user: String,
}

/// The characters IAM allows in user, role and path names.
pub fn is_iam_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '=' | ',' | '.' | '@' | '_' | '-')
}

/// IAM's limit on a role or user name, applied to every path segment.
pub const MAX_SEGMENT: usize = 64;

/// Whether a template needs the email.
pub fn uses_email(template: &str) -> bool {
    template.contains("{email}") || template.contains("{email_local}")
}

/// Checks the shape `arn:aws:iam::<12 digits>:role|user/<segments>`.
pub fn check_arn(arn: &str) -> Result<(), String> {
    let rest = arn
        .strip_prefix("arn:aws:iam::")
        .ok_or("it does not start with `arn:aws:iam::`")?;
    let (account, resource) = rest
        .split_once(':')
        .ok_or("it has no `:` after the account id")?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the account id is not 12 digits".into());
    }
    let names = resource
        .strip_prefix("role/")
        .or_else(|| resource.strip_prefix("user/"))
        .ok_or("it names neither a `role/` nor a `user/`")?;
    for segment in names.split('/') {
        if segment.is_empty() {
            return Err("it has an empty name or path segment".into());
        }
        if segment.chars().count() > MAX_SEGMENT {
            return Err(format!(
                "a name or path segment is longer than {MAX_SEGMENT} characters"
            ));
        }
        if !segment.chars().all(is_iam_name_char) {
            return Err(
                "it holds characters IAM does not allow in names (only letters, digits and `+=,.@_-`)"
                    .into(),
            );
        }
    }
    Ok(())
}

/// EKS matches `mapRoles` items against the role ARN without its path, so
/// an SSO role's `/aws-reserved/sso.amazonaws.com/...` must be dropped.
pub fn strip_role_path(arn: &str) -> String {
    match arn.split_once(":role/") {
        Some((prefix, rest)) => {
            let name = rest.rsplit('/').next().unwrap_or(rest);
            format!("{prefix}:role/{name}")
        }
        None => arn.to_string(),
    }
}

/// How the authenticator compares two role ARNs: without the path and
/// ignoring case. The one key aws-auth items, the reconciler and discovery
/// match principals by.
pub fn role_arn_key(arn: &str) -> String {
    strip_role_path(arn).to_ascii_lowercase()
}

/// A username Tollgate gives a requester: `tollgate:<email>`. Other
/// `tollgate:` names (Tollgate's own mapping, a `{{SessionName}}` template)
/// are not its grants.
pub fn is_grant_username(username: &str) -> bool {
    username
        .strip_prefix("tollgate:")
        .is_some_and(|rest| rest.contains('@') && !rest.contains("{{"))
}

const NO_EMAIL: &str = "Tollgate could not read your email address from Slack (scope `users:read.email`), so it cannot tell who you are in the cluster. Ask an admin to check the app's scopes.";

/// The one principal a Slack email maps to on a cluster, or why none.
pub fn resolve(
    policy: &IdentityPolicy,
    account_id: &str,
    strategy: Strategy,
    email: &str,
) -> Result<Principal, String> {
    let email = email.trim().to_ascii_lowercase();
    if email.is_empty() {
        return Err(NO_EMAIL.into());
    }
    let shown = || escape_slack(&super::text::clip(&email, 80));
    let (local, domain) = match email.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() && !d.contains('@') => (l, d),
        _ => {
            return Err(format!(
                "Your Slack email `{}` is not a plain address (`name@domain`), so Tollgate maps it to no principal. Ask an admin.",
                shown()
            ))
        }
    };
    if !policy.allowed_email_domains.is_empty()
        && !policy.allowed_email_domains.iter().any(|d| d == domain)
    {
        return Err(format!(
            "Your Slack email's domain `{}` is not one Tollgate grants access to ({}), so you map to no principal.",
            escape_slack(&super::text::clip(domain, 60)),
            policy
                .allowed_email_domains
                .iter()
                .map(|d| format!("`{d}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The Kubernetes username and any template take the email verbatim, so
    // it must be made of characters that cannot change what they name.
    let bad_chars = || {
        Err(format!(
            "Your Slack email `{}` holds characters Tollgate does not put into a principal (only letters, digits and `=,._-` before the `@`), so it maps to no principal. Ask an admin to map you in `[identity.principals]`.",
            shown()
        ))
    };
    if !email.chars().all(is_iam_name_char) || local.contains('+') {
        // Only an explicit table entry maps such an address, and only to an
        // ARN: the Kubernetes username of the other strategies is the email.
        if strategy != Strategy::AccessEntry || !policy.principals.contains_key(&email) {
            return bad_chars();
        }
    }
    let k8s_user = format!("tollgate:{email}");
    if strategy == Strategy::SessionRbac {
        return Ok(Principal {
            principal: k8s_user.clone(),
            k8s_user,
        });
    }
    let arn = if let Some(arn) = policy.principals.get(&email) {
        arn.clone()
    } else {
        let Some(template) = &policy.principal_template else {
            return Err(format!(
                "No IAM principal is configured for {}. Ask a Tollgate admin to add you to `[identity.principals]`.",
                shown()
            ));
        };
        if local.chars().count() > MAX_SEGMENT
            || (email.chars().count() > MAX_SEGMENT && template.contains("{email}"))
        {
            return Err(format!(
                "Your Slack email `{}` is too long for an IAM name ({MAX_SEGMENT} characters at most), so it maps to no principal. Ask an admin to map you in `[identity.principals]`.",
                shown()
            ));
        }
        template
            .replace("{account_id}", account_id)
            .replace("{email_local}", local)
            .replace("{email}", &email)
    };
    check_arn(&arn).map_err(|why| {
        format!(
            "The IAM principal Tollgate would use for you, `{}`, is not a well-formed IAM ARN ({why}); nothing was requested. Ask an admin.",
            escape_slack(&super::text::clip(&arn, 120))
        )
    })?;
    let principal = match strategy {
        Strategy::AwsAuth => strip_role_path(&arn),
        _ => arn,
    };
    Ok(Principal {
        principal,
        k8s_user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "111122223333";

    fn policy() -> IdentityPolicy {
        IdentityPolicy {
            principal_template: Some("arn:aws:iam::{account_id}:role/{email_local}".into()),
            principals: BTreeMap::new(),
            allowed_email_domains: vec!["example.com".into()],
            allow_guests: false,
        }
    }

    fn arn(email: &str) -> Result<String, String> {
        resolve(&policy(), ACCOUNT, Strategy::AccessEntry, email).map(|p| p.principal)
    }

    #[test]
    fn hostile_emails_map_to_one_arn_or_none() {
        let role = |name: &str| Ok(format!("arn:aws:iam::{ACCOUNT}:role/{name}"));
        let long_local = "a".repeat(65);
        let max_local = "a".repeat(64);
        let cases: Vec<(String, Result<String, String>)> = vec![
            ("alice@example.com".into(), role("alice")),
            ("  Alice@Example.COM ".into(), role("alice")),
            (
                "first.last_x-y=z,w@example.com".into(),
                role("first.last_x-y=z,w"),
            ),
            (format!("{max_local}@example.com"), role(&max_local)),
            ("ops/admin@example.com".into(), Err("characters".into())),
            ("../admin@example.com".into(), Err("characters".into())),
            ("*@example.com".into(), Err("characters".into())),
            ("a*@example.com".into(), Err("characters".into())),
            ("{{alice}}@example.com".into(), Err("characters".into())),
            ("{email}@example.com".into(), Err("characters".into())),
            ("al ice@example.com".into(), Err("characters".into())),
            ("alice\n@example.com".into(), Err("characters".into())),
            ("al\u{0}ice@example.com".into(), Err("characters".into())),
            ("alice\u{200b}@example.com".into(), Err("characters".into())),
            // Cyrillic 'а' and 'е' look like Latin ones.
            ("\u{0430}lice@example.com".into(), Err("characters".into())),
            ("alic\u{0435}@example.com".into(), Err("characters".into())),
            ("ａlice@example.com".into(), Err("characters".into())),
            ("alice+ops@example.com".into(), Err("characters".into())),
            ("alice:x@example.com".into(), Err("characters".into())),
            (format!("{long_local}@example.com"), Err("too long".into())),
            ("alice@contractor.io".into(), Err("domain".into())),
            ("alice@example.com.evil.io".into(), Err("domain".into())),
            ("alice@sub.example.com".into(), Err("domain".into())),
            ("alice@exаmple.com".into(), Err("domain".into())),
            (
                "alice@example.com@example.com".into(),
                Err("plain address".into()),
            ),
            ("alice".into(), Err("plain address".into())),
            ("@example.com".into(), Err("plain address".into())),
            ("".into(), Err("email address".into())),
        ];
        for (email, expected) in cases {
            let got = arn(&email);
            match (&got, &expected) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{email:?}"),
                (Err(why), Err(needle)) => {
                    assert!(why.contains(needle.as_str()), "{email:?}: {why}")
                }
                _ => panic!("{email:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn refused_emails_are_refused_for_kubernetes_usernames_too() {
        for strategy in [
            Strategy::SessionRbac,
            Strategy::AwsAuth,
            Strategy::AccessEntry,
        ] {
            for email in [
                "ops/admin@example.com",
                "*@example.com",
                "a b@example.com",
                "x@other.io",
            ] {
                assert!(
                    resolve(&policy(), ACCOUNT, strategy, email).is_err(),
                    "{email} {strategy:?}"
                );
            }
        }
        let p = resolve(&policy(), ACCOUNT, Strategy::SessionRbac, "Bob@Example.com").unwrap();
        assert_eq!(p.principal, "tollgate:bob@example.com");
        assert_eq!(p.k8s_user, "tollgate:bob@example.com");
    }

    #[test]
    fn table_wins_but_still_must_be_a_good_arn_in_an_allowed_domain() {
        let mut p = policy();
        p.principals.insert(
            "alice+ops@example.com".into(),
            "arn:aws:iam::111122223333:role/alice-admin".into(),
        );
        p.principals.insert(
            "bob@example.com".into(),
            "arn:aws:iam::111122223333:role/*".into(),
        );
        p.principals.insert(
            "carol@other.io".into(),
            "arn:aws:iam::111122223333:role/carol".into(),
        );
        let r = |p: &IdentityPolicy, e: &str| {
            resolve(p, ACCOUNT, Strategy::AccessEntry, e).map(|p| p.principal)
        };
        assert_eq!(
            r(&p, "Alice+Ops@example.com").unwrap(),
            "arn:aws:iam::111122223333:role/alice-admin"
        );
        assert!(r(&p, "bob@example.com")
            .unwrap_err()
            .contains("well-formed"));
        assert!(r(&p, "carol@other.io").unwrap_err().contains("domain"));
        p.principal_template = None;
        assert!(r(&p, "dave@example.com")
            .unwrap_err()
            .contains("No IAM principal"));
    }

    #[test]
    fn aws_auth_drops_the_role_path_and_email_template_is_one_segment() {
        let mut p = policy();
        p.principal_template = Some("arn:aws:iam::{account_id}:role/people/{email}".into());
        assert_eq!(
            resolve(&p, ACCOUNT, Strategy::AwsAuth, "alice@example.com")
                .unwrap()
                .principal,
            "arn:aws:iam::111122223333:role/alice@example.com"
        );
        assert_eq!(
            resolve(&p, ACCOUNT, Strategy::AccessEntry, "alice@example.com")
                .unwrap()
                .principal,
            "arn:aws:iam::111122223333:role/people/alice@example.com"
        );
        let long = format!("{}@example.com", "a".repeat(60));
        assert!(resolve(&p, ACCOUNT, Strategy::AccessEntry, &long)
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn arn_shape() {
        for good in [
            "arn:aws:iam::111122223333:role/a",
            "arn:aws:iam::111122223333:user/path/b",
            "arn:aws:iam::111122223333:role/aws-reserved/sso.amazonaws.com/eu-west-1/AWSReservedSSO_Dev_abc",
        ] {
            assert!(check_arn(good).is_ok(), "{good}");
        }
        for bad in [
            "arn:aws:iam::11112222333:role/a",
            "arn:aws:iam::1111222233334:role/a",
            "arn:aws:iam::111122223333:group/a",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role//a",
            "arn:aws:iam::111122223333:role/a*",
            "arn:aws:iam::111122223333:role/{{a}}",
            "arn:aws:sts::111122223333:assumed-role/a/b",
            "arn:aws:iam:::role/a",
            " arn:aws:iam::111122223333:role/a",
        ] {
            assert!(check_arn(bad).is_err(), "{bad}");
        }
        assert!(check_arn(&format!(
            "arn:aws:iam::111122223333:role/{}",
            "a".repeat(65)
        ))
        .is_err());
    }

    #[test]
    fn strips_sso_paths_only_from_roles() {
        assert_eq!(
            strip_role_path("arn:aws:iam::123:role/aws-reserved/sso.amazonaws.com/x/Dev"),
            "arn:aws:iam::123:role/Dev"
        );
        assert_eq!(
            strip_role_path("arn:aws:iam::123:user/p/bob"),
            "arn:aws:iam::123:user/p/bob"
        );
    }

    /// Property: over generated emails, whatever resolves is a well-formed
    /// ARN naming exactly the lowercased local part, and anything holding a
    /// character outside the IAM set, or another domain, is refused.
    #[test]
    fn generated_emails_never_escape_their_name() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "aZ09+=,.@_-/*{} \t\n:;'\"\\<>|\u{0}\u{430}\u{200b}é"
            .chars()
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..70);
            let local: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let domain = if rng.gen_bool(0.8) {
                "example.com"
            } else {
                "evil.io"
            };
            let email = format!("{local}@{domain}");
            // Surrounding whitespace is trimmed, as Slack never sends it.
            let local = local.trim_start();
            match arn(&email) {
                Ok(arn) => {
                    assert!(check_arn(&arn).is_ok(), "{email:?} -> {arn}");
                    assert_eq!(
                        arn,
                        format!("arn:aws:iam::{ACCOUNT}:role/{}", local.to_ascii_lowercase())
                    );
                    assert_eq!(domain, "example.com");
                    assert!(local
                        .chars()
                        .all(|c| is_iam_name_char(c) && c != '@' && c != '+'));
                }
                Err(_) => assert!(
                    domain != "example.com"
                        || local.is_empty()
                        || local.chars().count() > MAX_SEGMENT
                        || !local
                            .chars()
                            .all(|c| is_iam_name_char(c) && c != '@' && c != '+'),
                    "{email:?} refused"
                ),
            }
        }
    }
}
