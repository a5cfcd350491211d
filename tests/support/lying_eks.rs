//! A lying EKS API for read-back tests: a loopback HTTP proxy between
//! Tollgate and MiniStack that forwards every request unchanged, except
//! that while told to lie it answers DisassociateAccessPolicy and/or
//! DeleteAccessEntry itself, with the success EKS sends (HTTP 200, empty
//! body), without forwarding them. The association or entry stays in
//! MiniStack: only reading the cluster back can tell.
//!
//! Told to hold AssociateAccessPolicy (`hold_associations`), it forwards
//! that call only after the given delay, from a task of its own: a caller
//! that gave up waiting (a converge cut off by its time limit) has its
//! association land later anyway, as a call already sent to EKS would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;

use super::loopback::{answer, pass_upstream, Served};

/// The two EKS calls that remove access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// `DELETE /clusters/{name}/access-entries/{principal}/access-policies/{policy}`
    DisassociateAccessPolicy,
    /// `DELETE /clusters/{name}/access-entries/{principal}`
    DeleteAccessEntry,
}

impl Removal {
    /// Which removal a request is, by EKS's REST paths.
    fn of(method: &Method, path: &str) -> Option<Removal> {
        if method != Method::DELETE {
            return None;
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["clusters", _, "access-entries", _, "access-policies", _] => {
                Some(Removal::DisassociateAccessPolicy)
            }
            ["clusters", _, "access-entries", _] => Some(Removal::DeleteAccessEntry),
            _ => None,
        }
    }
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    lie_disassociate: AtomicBool,
    lie_delete_entry: AtomicBool,
    disassociations_swallowed: AtomicUsize,
    deletions_swallowed: AtomicUsize,
    /// Milliseconds AssociateAccessPolicy is held before it is forwarded.
    hold_associate_ms: std::sync::atomic::AtomicU64,
    associations_landed: AtomicUsize,
}

pub struct LyingEks {
    /// `http://127.0.0.1:PORT`: give it to Tollgate as `AWS_ENDPOINT_URL`.
    pub endpoint: String,
    shared: Arc<Shared>,
    _served: Served,
}

impl LyingEks {
    /// Starts the proxy in front of `upstream` (MiniStack's endpoint),
    /// honest until told otherwise.
    pub async fn start(upstream: &str) -> LyingEks {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            lie_disassociate: AtomicBool::new(false),
            lie_delete_entry: AtomicBool::new(false),
            disassociations_swallowed: AtomicUsize::new(0),
            deletions_swallowed: AtomicUsize::new(0),
            hold_associate_ms: std::sync::atomic::AtomicU64::new(0),
            associations_landed: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let served = Served::start(app, "lying EKS proxy").await;
        LyingEks {
            endpoint: served.endpoint.clone(),
            shared,
            _served: served,
        }
    }

    /// Which removals are answered without being made.
    pub fn lie_about(&self, disassociate: bool, delete_entry: bool) {
        self.shared
            .lie_disassociate
            .store(disassociate, Ordering::SeqCst);
        self.shared
            .lie_delete_entry
            .store(delete_entry, Ordering::SeqCst);
    }

    /// AssociateAccessPolicy is forwarded only `delay` after it arrives
    /// (zero: at once), whether or not its caller still waits.
    pub fn hold_associations(&self, delay: std::time::Duration) {
        self.shared
            .hold_associate_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many AssociateAccessPolicy calls reached MiniStack so far.
    pub fn associations_landed(&self) -> usize {
        self.shared.associations_landed.load(Ordering::SeqCst)
    }

    /// How many calls of `kind` were answered with a lie so far.
    pub fn swallowed(&self, kind: Removal) -> usize {
        match kind {
            Removal::DisassociateAccessPolicy => &self.shared.disassociations_swallowed,
            Removal::DeleteAccessEntry => &self.shared.deletions_swallowed,
        }
        .load(Ordering::SeqCst)
    }
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lie = match Removal::of(&method, uri.path()) {
        Some(Removal::DisassociateAccessPolicy)
            if shared.lie_disassociate.load(Ordering::SeqCst) =>
        {
            shared
                .disassociations_swallowed
                .fetch_add(1, Ordering::SeqCst);
            true
        }
        Some(Removal::DeleteAccessEntry) if shared.lie_delete_entry.load(Ordering::SeqCst) => {
            shared.deletions_swallowed.fetch_add(1, Ordering::SeqCst);
            true
        }
        _ => false,
    };
    if lie {
        // What EKS answers both calls with: 200 and an empty body.
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("x-amzn-requestid", "00000000-0000-0000-0000-0000000000aa")
            .body(Body::empty())
            .unwrap();
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if is_associate(&method, uri.path()) {
        let hold = shared.hold_associate_ms.load(Ordering::SeqCst);
        let (shared, path) = (shared.clone(), path.to_string());
        // Its own task: dropping this handler (the caller hung up) does
        // not stop the call from landing.
        let landed = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(hold)).await;
            let result = pass_upstream(
                &shared.client,
                &shared.upstream,
                method,
                &path,
                &headers,
                body,
            )
            .await;
            shared.associations_landed.fetch_add(1, Ordering::SeqCst);
            result
        });
        return match landed.await {
            Ok(Ok((status, headers, bytes))) => answer(status, headers, bytes),
            Ok(Err(failed)) => failed,
            Err(e) => panic!("held association task failed: {e}"),
        };
    }
    match pass_upstream(
        &shared.client,
        &shared.upstream,
        method,
        path,
        &headers,
        body,
    )
    .await
    {
        Ok((status, headers, bytes)) => answer(status, headers, bytes),
        Err(failed) => failed,
    }
}

/// `POST /clusters/{name}/access-entries/{principal}/access-policies`
fn is_associate(method: &Method, path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    method == Method::POST
        && matches!(
            parts.as_slice(),
            ["clusters", _, "access-entries", _, "access-policies"]
        )
}
