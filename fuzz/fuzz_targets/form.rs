//! The request modal's fields, checked against a real configuration.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tollgate::config::Config;
use tollgate::domain::form::{check, RequestForm};

const CONFIG: &str = r#"
[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[[clusters]]
name = "prod"
region = "us-east-1"
account_id = "111122223333"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"

[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaced = true
require_reason = true
"#;

fn config() -> &'static Config {
    static CELL: OnceLock<Config> = OnceLock::new();
    CELL.get_or_init(|| Config::parse(CONFIG, "fuzz.toml").expect("the fuzz config is valid"))
}

fuzz_target!(|text: &str| {
    // Five fields, one per line; missing ones are empty.
    let mut fields = text.splitn(5, '\n').map(str::to_string);
    let form = RequestForm {
        cluster: fields.next().unwrap_or_default(),
        role: fields.next().unwrap_or_default(),
        namespaces: fields.next().unwrap_or_default(),
        duration: fields.next().unwrap_or_default(),
        reason: fields.next().unwrap_or_default(),
    };
    let _ = check(&form, &config().clusters);
});
