//! Principal resolution: whatever the email, the result is refused or a
//! well-formed IAM ARN (Kubernetes username on session-rbac) naming only
//! IAM characters, in an allowed domain.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::domain::identity::{check_arn, is_iam_name_char, resolve, IdentityPolicy};
use tollgate::domain::policy::Strategy;

fuzz_target!(|input: (u8, &str)| {
    let (pick, email) = input;
    let strategy = match pick % 3 {
        0 => Strategy::AccessEntry,
        1 => Strategy::AwsAuth,
        _ => Strategy::SessionRbac,
    };
    let template = match pick / 3 % 3 {
        0 => "arn:aws:iam::{account_id}:role/{email_local}",
        1 => "arn:aws:iam::{account_id}:role/people/{email}",
        _ => "arn:aws:iam::{account_id}:user/{email_local}",
    };
    let policy = IdentityPolicy {
        principal_template: Some(template.into()),
        principals: Default::default(),
        allowed_email_domains: vec!["example.com".into()],
        allow_guests: false,
    };
    let Ok(p) = resolve(&policy, "111122223333", strategy, email) else {
        return;
    };
    let normalized = email.trim().to_ascii_lowercase();
    assert!(normalized.ends_with("@example.com"), "{email:?}");
    assert!(normalized.chars().all(is_iam_name_char), "{email:?}");
    assert_eq!(p.k8s_user, format!("tollgate:{normalized}"));
    match strategy {
        Strategy::SessionRbac => assert_eq!(p.principal, p.k8s_user),
        _ => {
            assert!(
                check_arn(&p.principal).is_ok(),
                "{email:?} -> {}",
                p.principal
            );
            let local = normalized.split('@').next().unwrap_or_default();
            assert!(
                p.principal.ends_with(&format!("/{local}"))
                    || p.principal.ends_with(&format!("/{normalized}"))
            );
        }
    }
});
