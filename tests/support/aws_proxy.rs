//! A loopback proxy in front of MiniStack that makes AWS look as far away as
//! it is, and counts what crosses it.
//!
//! MiniStack answers in about a millisecond; EKS and STS answer in tens. A
//! client pointed at the proxy (`AWS_ENDPOINT_URL`) has every call held for
//! a fixed delay before it is forwarded, so a comparison against the bare
//! SDK calls (made through the same proxy) weighs extra round trips as they
//! would weigh against AWS. The proxy also names each call's operation
//! (`eks:ListAccessEntries`, `dynamodb:Query`, `sts:AssumeRole`) and counts
//! the DynamoDB items each answer read, so a benchmark can state how many
//! calls and reads a piece of work cost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::Value;

use super::loopback::{answer, pass_upstream, Served};

/// What crossed the proxy since it started (or since the snapshot a
/// difference is taken against).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// Operation → calls.
    pub calls: BTreeMap<String, u64>,
    /// DynamoDB items read: `ScannedCount` of every Query and Scan, one per
    /// GetItem that found its item, every item of a BatchGetItem or
    /// TransactGetItems answer.
    pub items_read: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.calls.values().sum()
    }

    /// Calls whose operation starts with `prefix` (`eks:`, `dynamodb:`).
    pub fn of(&self, prefix: &str) -> u64 {
        self.calls
            .iter()
            .filter(|(op, _)| op.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// What happened after `earlier` was taken.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let calls = self
            .calls
            .iter()
            .map(|(op, n)| (op.clone(), n - earlier.calls.get(op).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        Counts {
            calls,
            items_read: self.items_read - earlier.items_read,
        }
    }

    /// `eks:ListAccessEntries 3, eks:DescribeAccessEntry 20`, for messages.
    pub fn describe(&self, prefix: &str) -> String {
        let parts: Vec<String> = self
            .calls
            .iter()
            .filter(|(op, _)| op.starts_with(prefix))
            .map(|(op, n)| format!("{} {n}", op.trim_start_matches(prefix)))
            .collect();
        parts.join(", ")
    }
}

struct Shared {
    upstream: String,
    delay: Duration,
    client: reqwest::Client,
    counts: Mutex<Counts>,
}

pub struct AwsProxy {
    pub endpoint: String,
    shared: Arc<Shared>,
    _served: Served,
}

impl AwsProxy {
    /// Serves on a free loopback port, forwarding to `upstream` (MiniStack's
    /// endpoint) after holding every call for `delay`.
    pub async fn start(upstream: &str, delay: Duration) -> AwsProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            delay,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("proxy client"),
            counts: Mutex::new(Counts::default()),
        });
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let served = Served::start(app, "AWS proxy").await;
        AwsProxy {
            endpoint: served.endpoint.clone(),
            shared,
            _served: served,
        }
    }

    pub fn counts(&self) -> Counts {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The standard AWS variables pointing at the proxy (MiniStack's
    /// throwaway credentials).
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

async fn forward(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op = operation(&method, &uri, &headers, &body);
    tokio::time::sleep(shared.delay).await;
    // MiniStack answers ListAccessEntries with the first `maxResults` and no
    // `nextToken`; EKS pages them, 100 at most a page. The proxy asks for
    // all and hands them out a page at a time, as EKS would.
    let page = (op == "eks:ListAccessEntries").then(|| EntriesPage::of(&uri));
    let path = match &page {
        Some(_) => format!("{}?maxResults=1000000", uri.path()),
        None => uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string(),
    };
    let (status, answer_headers, mut answer_body) = match pass_upstream(
        &shared.client,
        &shared.upstream,
        method,
        &path,
        &headers,
        body,
    )
    .await
    {
        Ok(parts) => parts,
        Err(failed) => return failed,
    };
    if let Some(page) = page.filter(|_| status.is_success()) {
        answer_body = page.cut(&answer_body);
    }
    let read = if op.starts_with("dynamodb:") {
        items_read(&answer_body)
    } else {
        0
    };
    {
        let mut counts = shared.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.calls.entry(op).or_default() += 1;
        counts.items_read += read;
    }
    answer(status, answer_headers, answer_body)
}

/// Which page of ListAccessEntries a call asked for.
struct EntriesPage {
    offset: usize,
    size: usize,
}

impl EntriesPage {
    fn of(uri: &Uri) -> EntriesPage {
        let param = |name: &str| {
            uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<usize>().ok())
            })
        };
        EntriesPage {
            // The token is the offset of the next page.
            offset: param("nextToken").unwrap_or(0),
            size: param("maxResults").unwrap_or(100).clamp(1, 100),
        }
    }

    /// The page out of MiniStack's whole answer, with `nextToken` when more
    /// entries follow.
    fn cut(&self, body: &[u8]) -> Bytes {
        let Ok(answer) = serde_json::from_slice::<Value>(body) else {
            return Bytes::copy_from_slice(body);
        };
        let all = answer["accessEntries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let end = (self.offset + self.size).min(all.len());
        let mut page = serde_json::json!({
            "accessEntries": all.get(self.offset.min(end)..end).unwrap_or_default(),
        });
        if end < all.len() {
            page["nextToken"] = Value::String(end.to_string());
        }
        Bytes::from(page.to_string())
    }
}

/// `service:Operation` of one AWS call: DynamoDB names it in `X-Amz-Target`,
/// STS in the form field `Action`, EKS (REST) in the method and path.
fn operation(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> String {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let op = target.rsplit('.').next().unwrap_or(target);
        return format!("dynamodb:{op}");
    }
    let form = String::from_utf8_lossy(body);
    if let Some(action) = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .or_else(|| {
            uri.query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("Action=")))
        })
    {
        return format!("sts:{action}");
    }
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let op = match (method.as_str(), segments.as_slice()) {
        ("GET", ["clusters"]) => "ListClusters",
        ("GET", ["clusters", _]) => "DescribeCluster",
        ("POST", ["clusters", _, "access-entries"]) => "CreateAccessEntry",
        ("GET", ["clusters", _, "access-entries"]) => "ListAccessEntries",
        ("GET", ["clusters", _, "access-entries", _]) => "DescribeAccessEntry",
        ("POST", ["clusters", _, "access-entries", _]) => "UpdateAccessEntry",
        ("DELETE", ["clusters", _, "access-entries", _]) => "DeleteAccessEntry",
        ("POST", ["clusters", _, "access-entries", _, "access-policies"]) => {
            "AssociateAccessPolicy"
        }
        ("GET", ["clusters", _, "access-entries", _, "access-policies"]) => {
            "ListAssociatedAccessPolicies"
        }
        ("DELETE", ["clusters", _, "access-entries", _, "access-policies", _]) => {
            "DisassociateAccessPolicy"
        }
        ("GET", ["tags", ..]) => "ListTagsForResource",
        ("POST", ["tags", ..]) => "TagResource",
        ("DELETE", ["tags", ..]) => "UntagResource",
        _ => return format!("other:{method} {}", uri.path()),
    };
    format!("eks:{op}")
}

fn items_read(body: &[u8]) -> u64 {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    if let Some(scanned) = answer.get("ScannedCount").and_then(Value::as_u64) {
        return scanned;
    }
    if answer.get("Item").is_some_and(|i| !i.is_null()) {
        return 1;
    }
    match answer.get("Responses") {
        // BatchGetItem: table → items.
        Some(Value::Object(tables)) => tables
            .values()
            .filter_map(Value::as_array)
            .map(|items| items.len() as u64)
            .sum(),
        // TransactGetItems: one entry per key, `Item` when it was found.
        Some(Value::Array(entries)) => entries
            .iter()
            .filter(|e| e.get("Item").is_some_and(|i| !i.is_null()))
            .count() as u64,
        _ => 0,
    }
}
