//! `manifests/iam-policy.json` grants exactly what the code calls, with the
//! conditions that keep Tollgate to its own access entries and to the
//! access policies its configuration names.
//!
//! The AWS calls are found in `src/` by name: every operation of the
//! aws-sdk-eks, aws-sdk-sts, aws-sdk-dynamodb and aws-sdk-scheduler versions in Cargo.lock
//! (read from the crates' sources in the Cargo registry) that the code
//! invokes as `.operation(`.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tollgate::config::Config;

/// Calls an operator makes, not the server: `tollgate store init`.
const OPERATOR_ONLY: [&str; 1] = ["dynamodb:CreateTable"];
/// Calls IAM does not authorise.
const NEEDS_NO_PERMISSION: [&str; 1] = ["sts:GetCallerIdentity"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn policy() -> Value {
    manifest_json("iam-policy.json")
}

fn manifest_json(name: &str) -> Value {
    let text = std::fs::read_to_string(root().join("manifests").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The configuration the shipped manifests deploy, with the backstop
/// turned on as the README's setup step does: its commented block
/// uncommented.
fn shipped_config() -> Config {
    let cm_path = root().join("manifests/overlays/sled/configmap.yaml");
    let cm: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cm_path).unwrap()).unwrap();
    let text = cm["data"]["tollgate.toml"].as_str().unwrap();
    let mut on = String::new();
    let mut in_block = false;
    for line in text.lines() {
        in_block = (in_block && !line.trim().is_empty()) || line == "# [clusters.backstop]";
        match line.strip_prefix("# ").filter(|_| in_block) {
            Some(uncommented) => on.push_str(uncommented),
            None => on.push_str(line),
        }
        on.push('\n');
    }
    assert!(on.contains("\n[clusters.backstop]\n"), "{on}");
    Config::parse(&on, "configmap").unwrap()
}

fn as_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        _ => Vec::new(),
    }
}

fn statement<'a>(policy: &'a Value, sid: &str) -> &'a Value {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid}"))
}

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The operations (snake_case) of an SDK crate at the version Cargo.lock
/// pins, from its `src/operation/` directory.
fn operations(krate: &str) -> BTreeSet<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains(&format!("name = \"{krate}\"\n")))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap_or_else(|| panic!("{krate} not in Cargo.lock"));
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let registry = cargo_home.join("registry/src");
    let dir = std::fs::read_dir(&registry)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .join(format!("{krate}-{version}/src/operation"))
        })
        .find(|p| p.is_dir())
        .unwrap_or_else(|| panic!("{krate} {version} sources not under {}", registry.display()));
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            path.is_dir()
                .then(|| path.file_name().unwrap().to_string_lossy().into_owned())
        })
        .collect()
}

fn rust_sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path, text));
        }
    }
}

/// IAM actions the code needs, each with where it is called.
fn actions_called() -> BTreeMap<String, String> {
    let services = [
        ("eks", operations("aws-sdk-eks")),
        ("sts", operations("aws-sdk-sts")),
        ("dynamodb", operations("aws-sdk-dynamodb")),
        ("scheduler", operations("aws-sdk-scheduler")),
    ];
    let mut sources = Vec::new();
    rust_sources(&root().join("src"), &mut sources);
    let mut called = BTreeMap::new();
    for (path, text) in &sources {
        let at = path.strip_prefix(root()).unwrap().display().to_string();
        // Unit tests call nothing on AWS.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for (i, _) in code.match_indices('.') {
            let rest = &code[i + 1..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.is_empty() || !rest[name.len()..].starts_with('(') {
                continue;
            }
            let matching: Vec<&str> = services
                .iter()
                .filter(|(_, ops)| ops.contains(&name))
                .map(|(service, _)| *service)
                .collect();
            // An operation several SDKs share (TagResource) belongs to the
            // SDK the file uses, when it names exactly one of them.
            let used: Vec<&str> = matching
                .iter()
                .copied()
                .filter(|service| code.contains(&format!("aws_sdk_{service}")))
                .collect();
            let owners = if matching.len() > 1 && used.len() == 1 {
                used
            } else {
                matching
            };
            for service in owners {
                called.insert(format!("{service}:{}", pascal(&name)), at.clone());
            }
        }
        // Credentials for a cluster's `assume_role_arn`.
        if code.contains("AssumeRoleProvider") {
            called.insert("sts:AssumeRole".into(), at.clone());
        }
        // A schedule's target role is passed to Scheduler on create/update.
        if code.contains("aws_sdk_scheduler") && code.contains(".role_arn(") {
            called.insert("iam:PassRole".into(), at.clone());
        }
        // Tags on CreateAccessEntry are authorised as TagResource too.
        if code.contains(".create_access_entry()") && code.contains(".tags(") {
            called.insert("eks:TagResource".into(), at.clone());
        }
    }
    // IAM has no TransactWriteItems action: each item of a transaction is
    // authorised as the single-item action it is.
    if called.remove("dynamodb:TransactWriteItems").is_some() {
        for (path, text) in &sources {
            for (kind, action) in [
                ("put", "PutItem"),
                ("update", "UpdateItem"),
                ("delete", "DeleteItem"),
                ("condition_check", "ConditionCheckItem"),
            ] {
                if text.contains(&format!("TransactWriteItem::builder().{kind}(")) {
                    let at = path.strip_prefix(root()).unwrap().display().to_string();
                    called.insert(format!("dynamodb:{action}"), at);
                }
            }
        }
    }
    for skip in OPERATOR_ONLY.iter().chain(&NEEDS_NO_PERMISSION) {
        called.remove(*skip);
    }
    called
}

#[test]
fn every_call_has_a_statement_and_every_statement_a_call() {
    let policy = policy();
    let called = actions_called();
    assert!(called.contains_key("eks:CreateAccessEntry"), "{called:?}");
    assert!(called.contains_key("dynamodb:Query"), "{called:?}");
    let mut granted = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow");
        for action in as_list(&s["Action"]) {
            assert!(!action.contains('*'), "wildcard action {action}");
            assert!(
                called.contains_key(&action),
                "{action} ({}) is granted but the code never calls it",
                s["Sid"]
            );
            granted.insert(action);
        }
        for resource in as_list(&s["Resource"]) {
            assert_ne!(resource, "*", "{}: every resource is named", s["Sid"]);
        }
    }
    for (action, at) in &called {
        assert!(
            granted.contains(action),
            "{at} calls {action}, which manifests/iam-policy.json does not grant"
        );
    }
}

#[test]
fn conditions_keep_tollgate_to_its_own_entries_and_configured_policies() {
    let policy = policy();

    let create = statement(&policy, "CreateOwnStandardEntries");
    assert_eq!(as_list(&create["Action"]), ["eks:CreateAccessEntry"]);
    let eq = &create["Condition"]["StringEquals"];
    assert_eq!(eq["eks:accessEntryType"], "STANDARD");
    assert_eq!(eq["aws:RequestTag/managed-by"], "tollgate");
    assert_eq!(eq["aws:RequestTag/tollgate-instance"], "tollgate");
    // No Kubernetes groups and no username: an entry Tollgate creates can
    // carry no access beyond the policies it associates.
    let null = &create["Condition"]["Null"];
    assert_eq!(null["eks:kubernetesGroups"], "true");
    assert_eq!(null["eks:username"], "true");

    let tag = statement(&policy, "TagEntriesItCreates");
    assert_eq!(
        tag["Condition"]["StringEquals"]["aws:RequestTag/managed-by"],
        "tollgate"
    );

    let delete = statement(&policy, "DeleteOnlyOwnEntries");
    assert_eq!(as_list(&delete["Action"]), ["eks:DeleteAccessEntry"]);
    let eq = &delete["Condition"]["StringEquals"];
    assert_eq!(eq["aws:ResourceTag/managed-by"], "tollgate");
    assert_eq!(eq["aws:ResourceTag/tollgate-instance"], "tollgate");

    // Associating is limited to the access policies the shipped config's
    // roles name: never ClusterAdmin unless a role names it.
    let assoc = statement(&policy, "OnlyConfiguredAccessPolicies");
    let mut allowed = as_list(&assoc["Condition"]["ArnEquals"]["eks:policyArn"]);
    allowed.sort();
    let cfg = shipped_config();
    let mut configured: Vec<String> = cfg
        .clusters
        .iter()
        .flat_map(|c| c.roles.values())
        .filter_map(|r| r.access_policy.clone())
        .collect();
    configured.sort();
    configured.dedup();
    assert_eq!(allowed, configured);
    assert!(!allowed.iter().any(|a| a.contains("ClusterAdmin")));

    // No other statement may associate, delete or create without them.
    for s in policy["Statement"].as_array().unwrap() {
        let actions = as_list(&s["Action"]);
        for guarded in [
            "eks:AssociateAccessPolicy",
            "eks:DeleteAccessEntry",
            "eks:CreateAccessEntry",
        ] {
            if actions.iter().any(|a| a == guarded) {
                assert!(
                    s["Condition"].is_object(),
                    "{guarded} without conditions in {}",
                    s["Sid"]
                );
            }
        }
    }

    // AssumeRole only into named roles of named accounts.
    let assume = statement(&policy, "AssumeListedClusterRoles");
    for arn in as_list(&assume["Resource"]) {
        let account = arn.split(':').nth(4).unwrap();
        assert!(
            account.len() == 12 && account.chars().all(|c| c.is_ascii_digit()),
            "{arn}"
        );
        assert!(!arn.contains('*'), "{arn}");
    }
}

#[test]
fn the_backstop_role_can_undo_exactly_what_schedules_ask_and_no_more() {
    use tollgate::domain::backstop::Undo;
    use tollgate::domain::grant::Scope;

    let cfg = shipped_config();
    let backstops: Vec<_> = cfg
        .clusters
        .iter()
        .filter_map(|c| c.backstop.as_ref().map(|b| (c, b)))
        .collect();
    assert!(!backstops.is_empty(), "the shipped config shows a backstop");
    let mut policies: Vec<String> = cfg
        .clusters
        .iter()
        .flat_map(|c| c.roles.values())
        .filter_map(|r| r.access_policy.clone())
        .collect();
    policies.sort();
    policies.dedup();

    // The server: the four schedule calls on the group's schedules only,
    // the group read for `check`, and PassRole on the backstop role only,
    // only to Scheduler.
    let server = policy();
    let schedules = statement(&server, "BackstopSchedules");
    let mut actions = as_list(&schedules["Action"]);
    actions.sort();
    assert_eq!(
        actions,
        [
            "scheduler:CreateSchedule",
            "scheduler:DeleteSchedule",
            "scheduler:GetSchedule",
            "scheduler:UpdateSchedule"
        ]
    );
    let wanted: Vec<String> = backstops
        .iter()
        .map(|(c, b)| {
            format!(
                "arn:aws:scheduler:{}:{}:schedule/{}/*",
                c.region, c.account_id, b.group
            )
        })
        .collect();
    assert_eq!(as_list(&schedules["Resource"]), wanted);
    let group = statement(&server, "BackstopGroupCheck");
    assert_eq!(as_list(&group["Action"]), ["scheduler:GetScheduleGroup"]);
    let pass = statement(&server, "PassOnlyTheBackstopRole");
    let roles: Vec<String> = backstops.iter().map(|(_, b)| b.role_arn.clone()).collect();
    assert_eq!(as_list(&pass["Resource"]), roles);
    assert_eq!(
        pass["Condition"]["StringEquals"]["iam:PassedToService"],
        "scheduler.amazonaws.com"
    );
    for s in server["Statement"].as_array().unwrap() {
        if as_list(&s["Action"]).iter().any(|a| a == "iam:PassRole") {
            assert_eq!(s["Sid"], "PassOnlyTheBackstopRole");
        }
    }

    // The role Scheduler assumes: every call a schedule can make, on the
    // configured clusters' entries only; deletes only of Tollgate-tagged
    // entries; (dis)associations only of the configured policies.
    let role = manifest_json("backstop-role-policy.json");
    let mut granted = BTreeSet::new();
    let entry_resources: Vec<String> = backstops
        .iter()
        .map(|(c, _)| {
            format!(
                "arn:aws:eks:{}:{}:access-entry/{}/*",
                c.region, c.account_id, c.name
            )
        })
        .collect();
    for s in role["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow");
        assert!(s["Condition"].is_object(), "{} has no condition", s["Sid"]);
        assert_eq!(as_list(&s["Resource"]), entry_resources, "{}", s["Sid"]);
        let actions = as_list(&s["Action"]);
        if actions.iter().any(|a| a == "eks:DeleteAccessEntry") {
            assert_eq!(actions, ["eks:DeleteAccessEntry"]);
            let eq = &s["Condition"]["StringEquals"];
            assert_eq!(eq["aws:ResourceTag/managed-by"], "tollgate");
            assert_eq!(eq["aws:ResourceTag/tollgate-instance"], cfg.server.instance);
        } else {
            assert_eq!(
                actions.len(),
                1,
                "one EKS action per statement: {}",
                s["Sid"]
            );
            let mut allowed = as_list(&s["Condition"]["ArnEquals"]["eks:policyArn"]);
            allowed.sort();
            assert_eq!(allowed, policies, "{}", s["Sid"]);
            // The one action that can give access: never cluster-wide (a
            // cluster-wide baseline needs no restore), so whoever misuses
            // the role gets at most namespaced access.
            if actions[0] == "eks:AssociateAccessPolicy" {
                assert_eq!(
                    s["Condition"]["StringEquals"]["eks:accessScope"], "namespace",
                    "{}",
                    s["Sid"]
                );
            }
        }
        granted.extend(actions);
    }
    let needed: BTreeSet<String> = [
        Undo::DeleteEntry,
        Undo::Disassociate,
        Undo::Restore(Scope::Cluster),
    ]
    .iter()
    .map(|u| {
        let a = u.action();
        format!("eks:{}{}", a[..1].to_ascii_uppercase(), &a[1..])
    })
    .collect();
    assert_eq!(granted, needed);

    // Only Scheduler of this account, for this group, may assume it.
    let trust = manifest_json("backstop-role-trust.json");
    let statements = trust["Statement"].as_array().unwrap();
    assert_eq!(statements.len(), 1);
    let t = &statements[0];
    assert_eq!(
        t["Principal"],
        serde_json::json!({"Service": "scheduler.amazonaws.com"})
    );
    assert_eq!(t["Action"], "sts:AssumeRole");
    let (c, b) = backstops[0];
    assert_eq!(
        t["Condition"]["StringEquals"]["aws:SourceAccount"],
        c.account_id.as_str()
    );
    assert_eq!(
        t["Condition"]["ArnEquals"]["aws:SourceArn"],
        format!(
            "arn:aws:scheduler:{}:{}:schedule-group/{}",
            c.region, c.account_id, b.group
        )
    );
}

/// The guard that keeps the backstop from being a way in: only Tollgate's
/// role may write schedules in the group (or delete the group) and pass the
/// backstop role; the shipped example denies everyone else.
#[test]
fn the_guard_denies_schedule_writes_and_passrole_to_all_but_tollgate() {
    let cfg = shipped_config();
    let (c, b) = cfg
        .clusters
        .iter()
        .find_map(|c| c.backstop.as_ref().map(|b| (c, b)))
        .expect("the shipped config shows a backstop");
    // The role Tollgate's calls in the cluster's account come from: the
    // cluster's assume_role_arn, or else the pod's own (IRSA) role.
    let tollgate = c.assume_role_arn.clone().unwrap_or_else(|| {
        let sa: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(root().join("manifests/base/serviceaccount.yaml")).unwrap(),
        )
        .unwrap();
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .expect("the service account names Tollgate's role")
            .to_string()
    });
    let guard = manifest_json("backstop-guard-scp.json");
    let statements = guard["Statement"].as_array().unwrap();
    for s in statements {
        assert_eq!(s["Effect"], "Deny", "{}", s["Sid"]);
        assert_eq!(
            s["Condition"]["ArnNotEquals"]["aws:PrincipalArn"], tollgate,
            "{}: everyone but Tollgate",
            s["Sid"]
        );
    }
    let schedules = statement(&guard, "OnlyTollgateWritesBackstopSchedules");
    let actions = as_list(&schedules["Action"]);
    for a in [
        "scheduler:CreateSchedule",
        "scheduler:UpdateSchedule",
        "scheduler:DeleteSchedule",
        "scheduler:DeleteScheduleGroup",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} not denied");
    }
    let resources = as_list(&schedules["Resource"]);
    for r in [
        format!(
            "arn:aws:scheduler:{}:{}:schedule/{}/*",
            c.region, c.account_id, b.group
        ),
        format!(
            "arn:aws:scheduler:{}:{}:schedule-group/{}",
            c.region, c.account_id, b.group
        ),
    ] {
        assert!(resources.contains(&r), "{r} not covered");
    }
    let pass = statement(&guard, "OnlyTollgatePassesTheBackstopRole");
    assert_eq!(as_list(&pass["Action"]), ["iam:PassRole"]);
    assert_eq!(
        as_list(&pass["Resource"]),
        std::slice::from_ref(&b.role_arn)
    );
}

/// Spec 9.8: the table is the approval authority. The shipped guards (an
/// SCP and the table's own resource policy) deny every item write on the
/// table Tollgate's policy names to everyone but Tollgate's role (and the
/// store-admin role that runs `store init/copy/prune`).
#[test]
fn the_store_guards_let_only_tollgate_write_its_table() {
    let table = as_list(&statement(&policy(), "DynamoDbStore")["Resource"]);
    let sa: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("manifests/base/serviceaccount.yaml")).unwrap(),
    )
    .unwrap();
    let tollgate = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        .as_str()
        .unwrap()
        .to_string();
    let writes = [
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:BatchWriteItem",
        "dynamodb:PartiQLInsert",
        "dynamodb:PartiQLUpdate",
        "dynamodb:PartiQLDelete",
        "dynamodb:DeleteTable",
        "dynamodb:PutResourcePolicy",
    ];
    for name in ["store-guard-scp.json", "store-table-resource-policy.json"] {
        let guard = manifest_json(name);
        let deny = statement(&guard, "OnlyTollgateWritesItsTable");
        assert_eq!(deny["Effect"], "Deny", "{name}");
        let actions = as_list(&deny["Action"]);
        for a in writes {
            assert!(actions.iter().any(|x| x == a), "{name}: {a} not denied");
        }
        let resources = as_list(&deny["Resource"]);
        for t in &table {
            assert!(resources.contains(t), "{name}: {t} not covered");
        }
        let exempt = as_list(&deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]);
        assert!(exempt.contains(&tollgate), "{name}: Tollgate may write");
        assert_eq!(exempt.len(), 2, "{name}: Tollgate and the store admin only");
    }
}
