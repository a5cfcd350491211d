//! `slack-app.yaml` is a valid app manifest by Slack's own published
//! schema (shipped in docs/schemas/), and asks for exactly the scopes the
//! Web API methods Tollgate calls need.

mod support;

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(root().join("slack-app.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Validates `doc` against the shipped schema with Python's jsonschema
/// (Draft 7, as the schema declares), installed with kubernetes-validate.
fn schema_errors(doc: &Value) -> Vec<String> {
    support::ministack::ensure_tools();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("manifest.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let schema = root().join("docs/schemas/slack-app-manifest.schema.1.0.0.json");
    let script = "import json, sys, jsonschema\n\
                  schema = json.load(open(sys.argv[1]))\n\
                  doc = json.load(open(sys.argv[2]))\n\
                  for e in jsonschema.Draft7Validator(schema).iter_errors(doc):\n\
                  \x20   print('/'.join(map(str, e.path)) + ': ' + e.message)\n";
    let out = Command::new(root().join(".venv-test/bin/python"))
        .arg("-c")
        .arg(script)
        .arg(&schema)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_manifest_validates_against_slacks_schema() {
    let doc = manifest();
    assert_eq!(schema_errors(&doc), Vec::<String>::new());
    // The schema does refuse what Slack would: an unknown setting.
    let mut bad = doc.clone();
    bad["settings"]["socket_mode"] = Value::Bool(true);
    assert!(!schema_errors(&bad).is_empty());
}

#[test]
fn scopes_are_exactly_what_the_web_api_calls_need() {
    // Method Tollgate calls → the bot scope it needs.
    let needed = [
        ("slash command /access", "commands"),
        ("chat.postMessage, chat.update", "chat:write"),
        ("conversations.open (DMs)", "im:write"),
        ("users.info", "users:read"),
        ("users.info profile.email", "users:read.email"),
        ("usergroups.users.list", "usergroups:read"),
        ("conversations.info on a public channel", "channels:read"),
        ("conversations.info on a private channel", "groups:read"),
    ];
    let doc = manifest();
    let mut scopes: Vec<&str> = doc["oauth_config"]["scopes"]["bot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    scopes.sort();
    let mut expected: Vec<&str> = needed.iter().map(|(_, s)| *s).collect();
    expected.sort();
    assert_eq!(scopes, expected);
    // Both endpoints point at the routes the server serves.
    let command_url = doc["features"]["slash_commands"][0]["url"]
        .as_str()
        .unwrap();
    assert!(command_url.ends_with("/slack/commands"));
    let interactions = doc["settings"]["interactivity"]["request_url"]
        .as_str()
        .unwrap();
    assert!(interactions.ends_with("/slack/interactions"));
}
