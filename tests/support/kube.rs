//! A stand-in for kube-apiserver, serving the calls Tollgate makes:
//! RoleBindings, ClusterRoleBindings and ConfigMaps over HTTPS (HTTP/1.1 and
//! HTTP/2) with a CA it generates, authenticated with EKS bearer tokens.
//!
//! It follows the real API server where Tollgate could tell the difference:
//! - every request is authenticated first (a bad token is 401 even on an
//!   unknown path); the token must be `k8s-aws-v1.` + base64url (no padding)
//!   of a presigned STS GetCallerIdentity URL signing `x-k8s-aws-id`, signed
//!   no more than 15 minutes ago by the stand-in's clock. Only the shape is
//!   checked, not the HMAC;
//! - objects carry `metadata.resourceVersion` (one global counter, as a
//!   string), `uid`, `creationTimestamp`, and `namespace` for namespaced kinds;
//! - errors are `Status` objects: 404 NotFound, 409 AlreadyExists, 409
//!   Conflict for a PUT with a stale `resourceVersion` (a PUT without one is
//!   an unconditional update), 422 Invalid, 400 BadRequest;
//! - a PUT to a missing RoleBinding or ClusterRoleBinding creates it (201),
//!   as the RBAC strategies allow; a PUT to a missing ConfigMap is 404;
//! - a POST carrying `metadata.resourceVersion` is a 500, as etcd storage
//!   answers; `roleRef` cannot change on update (422);
//! - an update that changes nothing keeps the resourceVersion;
//! - label keys and values, names, subjects and roleRef are validated the way
//!   the API server validates them, and User/Group subjects get their
//!   `apiGroup` defaulted;
//! - DELETE answers a `Status` Success with details; DELETE on a collection
//!   (deletecollection, honouring `labelSelector`) answers the list of what
//!   it deleted;
//! - LIST honours `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`,
//!   `k in (a,b)`, `k notin (a,b)`, comma-separated AND) and `fieldSelector`
//!   on `metadata.name` / `metadata.namespace`; list items carry no
//!   `kind`/`apiVersion`, as in real list answers;
//! - `?dryRun=All` validates without storing;
//! - `set_lying(true)` makes it a lying API for read-back tests: binding
//!   DELETEs and ConfigMap PUTs are answered as done and change nothing;
//! - RBAC (`start`; `start_unrestricted` turns it off for the stand-in's
//!   own self-tests): every authenticated caller is Tollgate's identity and
//!   gets exactly the rules the shipped `manifests/rbac-*.yaml` bind to
//!   `tollgate:controller` (see `kube_rbac.rs`); anything else is a 403
//!   `Forbidden` Status worded as kube-apiserver words it, and writing a
//!   binding to a ClusterRole also needs `bind` on it (the escalation
//!   check); `POST .../selfsubjectaccessreviews` answers from the same
//!   rules.
//!
//! Not served: watches, PATCH, pagination (`limit` is ignored; every list is
//! complete), and namespaces as objects (any namespace exists).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::kube_rbac::{forbidden_body, Attributes, Rbac};

pub const TOKEN_PREFIX: &str = "k8s-aws-v1.";
/// How long after its `X-Amz-Date` EKS accepts a token.
pub const TOKEN_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// How far in the future a token's `X-Amz-Date` may be (SigV4 clock skew).
pub const TOKEN_MAX_SKEW: Duration = Duration::from_secs(5 * 60);
/// Largest `X-Amz-Expires` accepted.
pub const TOKEN_MAX_EXPIRES_SECS: u64 = 60;
/// First resourceVersion handed out.
const FIRST_REVISION: u64 = 1000;
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
const OPTIMISTIC_LOCK_MESSAGE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The kinds the stand-in stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    RoleBinding,
    ClusterRoleBinding,
    ConfigMap,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::RoleBinding, Kind::ClusterRoleBinding, Kind::ConfigMap];

    /// `RoleBinding`
    pub fn name(self) -> &'static str {
        match self {
            Kind::RoleBinding => "RoleBinding",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
            Kind::ConfigMap => "ConfigMap",
        }
    }

    /// `rolebindings`
    pub fn plural(self) -> &'static str {
        match self {
            Kind::RoleBinding => "rolebindings",
            Kind::ClusterRoleBinding => "clusterrolebindings",
            Kind::ConfigMap => "configmaps",
        }
    }

    /// API group, empty for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::RoleBinding | Kind::ClusterRoleBinding => RBAC_GROUP,
            Kind::ConfigMap => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::RoleBinding | Kind::ClusterRoleBinding => "rbac.authorization.k8s.io/v1",
            Kind::ConfigMap => "v1",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::ClusterRoleBinding)
    }

    /// Whether a PUT to a missing object creates it (`AllowCreateOnUpdate`
    /// of the API server's strategy for the kind).
    pub fn allow_create_on_update(self) -> bool {
        matches!(self, Kind::RoleBinding | Kind::ClusterRoleBinding)
    }

    /// `rolebindings.rbac.authorization.k8s.io`, `configmaps`: how errors
    /// name the resource.
    fn qualified_resource(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// `RoleBinding.rbac.authorization.k8s.io`, `ConfigMap`: how validation
    /// errors name the kind.
    fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.name().to_string(),
            group => format!("{}.{group}", self.name()),
        }
    }

    /// Collection path for `ns` (ignored for cluster-scoped kinds).
    pub fn collection_path(self, ns: &str) -> String {
        let prefix = match self.group() {
            "" => "/api/v1".to_string(),
            _ => format!("/apis/{}", self.api_version()),
        };
        if self.namespaced() {
            format!("{prefix}/namespaces/{ns}/{}", self.plural())
        } else {
            format!("{prefix}/{}", self.plural())
        }
    }
}

/// One request the stand-in received, with what it answered.
#[derive(Clone, Debug)]
pub struct KubeCall {
    pub method: String,
    pub path: String,
    /// Raw query string, empty when there was none.
    pub query: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub http_version: String,
    /// Bearer token sent, accepted or not.
    pub token: Option<String>,
    pub status: u16,
    /// Request body as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
    pub response: Value,
    pub at: Instant,
}

/// What a token says, once its shape has been checked.
#[derive(Clone, Debug)]
pub struct EksToken {
    /// The presigned STS URL.
    pub url: String,
    /// Region of the STS endpoint (`us-east-1` for the global endpoint).
    pub region: String,
    pub access_key_id: String,
    pub signed_at: SystemTime,
    pub expires_secs: u64,
    pub security_token: Option<String>,
}

type ConcurrentWrite = Box<dyn FnOnce(&mut Value) + Send>;
type ObjectKey = (Kind, String, String);

struct Reply {
    status: StatusCode,
    body: Value,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body,
            retry_after: None,
        }
    }
}

struct State {
    now: Option<SystemTime>,
    allowed_tokens: HashSet<String>,
    tokens_seen: Vec<String>,
    rejections: Vec<String>,
    calls: Vec<KubeCall>,
    /// (kind, namespace or "" for cluster-scoped, name) → stored object.
    objects: BTreeMap<ObjectKey, Value>,
    revision: u64,
    conflicts: HashMap<Kind, usize>,
    concurrent_writes: HashMap<ObjectKey, VecDeque<ConcurrentWrite>>,
    /// HTTP method (or `*`) → status codes to answer upcoming requests with.
    failures: HashMap<String, VecDeque<u16>>,
    generated_names: u64,
    /// What Tollgate's identity may do; `None` lets every authenticated
    /// caller do anything (the stand-in's own self-tests).
    rbac: Option<Rbac>,
    /// A lying API (`set_lying`): deletes of bindings and updates of
    /// ConfigMaps are answered as done but change nothing.
    lying: bool,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the
        // recorded calls from another test's panic message.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct KubeStandIn {
    addr: SocketAddr,
    ca_pem: String,
    ca_der: Vec<u8>,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for KubeStandIn {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn generate_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().expect("generating the stand-in CA key");
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).expect("stand-in CA parameters");
    // EKS cluster CAs are named `kubernetes`.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kubernetes");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params
        .self_signed(&ca_key)
        .expect("self-signing the stand-in CA");

    let key = KeyPair::generate().expect("generating the stand-in server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()])
        .expect("stand-in server certificate parameters");
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("signing the stand-in server certificate");
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().to_vec(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

fn tls_acceptor(pki: &Pki) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
        )
        .expect("stand-in TLS configuration");
    // kube's client may negotiate either.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

impl KubeStandIn {
    /// Serves HTTPS on a free loopback port until dropped, authorizing
    /// every request with the rights the shipped manifests give Tollgate.
    pub async fn start() -> KubeStandIn {
        KubeStandIn::start_with(Some(Rbac::shipped())).await
    }

    /// Serves without RBAC: every authenticated request is allowed.
    pub async fn start_unrestricted() -> KubeStandIn {
        KubeStandIn::start_with(None).await
    }

    /// Replaces the rights Tollgate's identity has (`None`: unrestricted).
    pub fn set_rbac(&self, rbac: Option<Rbac>) {
        self.shared.lock().rbac = rbac;
    }

    /// Requests refused with 403 by RBAC, as (verb, resource, name).
    pub fn forbidden(&self) -> Vec<KubeCall> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.status == 403)
            .cloned()
            .collect()
    }

    async fn start_with(rbac: Option<Rbac>) -> KubeStandIn {
        let pki = generate_pki();
        let acceptor = tls_acceptor(&pki);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                now: None,
                allowed_tokens: HashSet::new(),
                tokens_seen: Vec::new(),
                rejections: Vec::new(),
                calls: Vec::new(),
                objects: BTreeMap::new(),
                revision: FIRST_REVISION,
                conflicts: HashMap::new(),
                concurrent_writes: HashMap::new(),
                failures: HashMap::new(),
                generated_names: 0,
                rbac,
                lying: false,
            }),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding the Kubernetes stand-in");
        let addr = listener.local_addr().expect("Kubernetes stand-in address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (shutdown, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Dropping the set when the loop ends aborts open connections,
            // so keep-alive clients see the server go away.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        let service = TowerToHyperService::new(app.clone());
                        connections.spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        KubeStandIn {
            addr,
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der,
            shared,
            shutdown: Some(shutdown),
        }
    }

    /// `https://127.0.0.1:PORT`, the `endpoint` config key of a cluster.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca_der.clone()
    }

    /// Writes the CA PEM to `dir/kube-ca-PORT.pem` (the `ca_file` config key)
    /// and returns its path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("kube-ca-{}.pem", self.addr.port()));
        std::fs::write(&path, &self.ca_pem).expect("writing the stand-in CA");
        path
    }

    /// A `kube::Config` for this stand-in authenticating with `token`.
    pub fn kube_config(&self, token: &str) -> ::kube::Config {
        let mut config = ::kube::Config::new(self.endpoint().parse().expect("stand-in endpoint"));
        config.root_cert = Some(vec![pem_to_der(&self.ca_pem)]);
        // `AuthInfo::token` is a `secrecy::SecretString`, which converts from
        // `String` and `&str`.
        config.auth_info.token = Some(token.into());
        config
    }

    /// A kube client for this stand-in authenticating with `token`.
    pub fn client(&self, token: &str) -> ::kube::Client {
        ::kube::Client::try_from(self.kube_config(token)).expect("kube client for the stand-in")
    }

    // ---- clock and authentication ----

    /// Sets the clock token freshness and `creationTimestamp` are judged by.
    pub fn set_now(&self, t: SystemTime) {
        self.shared.lock().now = Some(t);
    }

    /// Back to the real clock.
    pub fn use_real_clock(&self) {
        self.shared.lock().now = None;
    }

    pub fn now(&self) -> SystemTime {
        self.shared.lock().now()
    }

    /// Accepts `token` verbatim, without checking its shape.
    pub fn allow_token(&self, token: &str) {
        self.shared.lock().allowed_tokens.insert(token.to_string());
    }

    /// Distinct accepted tokens, in the order first seen.
    pub fn tokens_seen(&self) -> Vec<String> {
        self.shared.lock().tokens_seen.clone()
    }

    /// Number of requests answered 401.
    pub fn rejected_count(&self) -> usize {
        self.shared.lock().rejections.len()
    }

    /// Why each 401 was answered, in order.
    pub fn rejections(&self) -> Vec<String> {
        self.shared.lock().rejections.clone()
    }

    // ---- request log ----

    /// `(method, path)` of every request, in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .calls
            .iter()
            .map(|call| (call.method.clone(), call.path.clone()))
            .collect()
    }

    pub fn calls(&self) -> Vec<KubeCall> {
        self.shared.lock().calls.clone()
    }

    /// Requests that changed something or tried to (POST, PUT, PATCH, DELETE).
    pub fn writes(&self) -> Vec<KubeCall> {
        self.calls()
            .into_iter()
            .filter(|call| call.method != "GET")
            .collect()
    }

    pub fn clear_calls(&self) {
        self.shared.lock().calls.clear();
    }

    // ---- objects ----

    /// Stores `obj` as another client would have created it (replacing any
    /// object of that name), without validation, and returns it with its
    /// system fields. `ns` is ignored for cluster-scoped kinds.
    pub fn seed(&self, kind: Kind, ns: &str, obj: Value) -> Value {
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|name| !name.is_empty())
            .expect("seeded objects need metadata.name")
            .to_string();
        let ns = if kind.namespaced() { ns } else { "" };
        let mut state = self.shared.lock();
        let mut obj = obj;
        let rv = state.next_revision();
        let uid = new_uid();
        let created = rfc3339(state.now());
        fill_system_fields(kind, ns, &name, &mut obj, &uid, &created, rv);
        state
            .objects
            .insert((kind, ns.to_string(), name), obj.clone());
        obj
    }

    pub fn seed_rolebinding(&self, ns: &str, obj: Value) -> Value {
        self.seed(Kind::RoleBinding, ns, obj)
    }

    pub fn seed_clusterrolebinding(&self, obj: Value) -> Value {
        self.seed(Kind::ClusterRoleBinding, "", obj)
    }

    pub fn seed_configmap(&self, ns: &str, obj: Value) -> Value {
        self.seed(Kind::ConfigMap, ns, obj)
    }

    /// The stored object, with `kind` and `apiVersion`. `ns` is ignored for
    /// cluster-scoped kinds.
    pub fn get_object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&key(kind, ns, name))
            .cloned()
    }

    /// Every stored object of `kind`, ordered by namespace and name.
    pub fn list_objects(&self, kind: Kind) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Deletes as another client would; returns whether it existed.
    pub fn delete_object(&self, kind: Kind, ns: &str, name: &str) -> bool {
        let mut state = self.shared.lock();
        let removed = state.objects.remove(&key(kind, ns, name)).is_some();
        if removed {
            state.next_revision();
        }
        removed
    }

    /// Changes a stored object now, as another writer would: `f` edits it and
    /// its resourceVersion moves on. Returns the new object. Panics when the
    /// object does not exist.
    pub fn modify_object(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Value {
        let mut state = self.shared.lock();
        let key = key(kind, ns, name);
        assert!(
            state.objects.contains_key(&key),
            "modify_object: no {} {ns}/{name}",
            kind.name()
        );
        state.write_as_other_client(&key, f);
        state.objects[&key].clone()
    }

    /// Current resourceVersion of the whole store (what a LIST reports).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().revision
    }

    // ---- failure injection ----

    /// The next `n` PUTs to an existing object of `kind` answer 409 Conflict
    /// whatever resourceVersion they carry, and each such conflict moves the
    /// stored object's resourceVersion on, as if another writer had got in
    /// first. A client that re-reads before retrying succeeds afterwards; one
    /// that retries with the old body keeps getting 409.
    pub fn inject_conflicts(&self, kind: Kind, n: usize) {
        *self.shared.lock().conflicts.entry(kind).or_insert(0) += n;
    }

    /// Runs `f` on the stored object just before the next PUT to it is
    /// handled, as another writer between the client's read and its write:
    /// the object changes and its resourceVersion moves on, so that PUT (if it
    /// carries the resourceVersion it read) answers 409 Conflict, and a
    /// client that re-reads sees `f`'s change and must keep it. Queued writes
    /// run in order, all before the same PUT. `ns` is ignored for
    /// cluster-scoped kinds. Dropped if the object is missing by then.
    pub fn inject_concurrent_write(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value) + Send + 'static,
    ) {
        self.shared
            .lock()
            .concurrent_writes
            .entry(key(kind, ns, name))
            .or_default()
            .push_back(Box::new(f));
    }

    /// Turns the lying API on or off: while on, a DELETE of a RoleBinding
    /// or ClusterRoleBinding answers 200 with the Success `Status` a real
    /// API server sends, and a PUT of a ConfigMap answers 200 with the
    /// object as sent (its resourceVersion bumped), but the stored objects
    /// stay exactly as they were. What only a read-back can catch.
    pub fn set_lying(&self, on: bool) {
        self.shared.lock().lying = on;
    }

    /// The next authenticated request with HTTP `method` (`"*"` for any)
    /// answers `code` with the `Status` the API server would send (429 comes
    /// with `Retry-After: 1`). One injected answer per call.
    ///
    /// Note kube's client retries 429, 503 and 504 by itself.
    pub fn fail_next(&self, method: &str, code: u16) {
        self.shared
            .lock()
            .failures
            .entry(method.to_ascii_uppercase())
            .or_default()
            .push_back(code);
    }

    /// Polls every 100 ms until `pred` holds for the object (None when
    /// missing) and returns it; panics after `timeout`, with the requests
    /// seen.
    pub async fn wait_for_object(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        pred: impl Fn(Option<&Value>) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let obj = self.get_object(kind, ns, name);
            if pred(obj.as_ref()) {
                return obj;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} {ns}/{name} did not reach the expected state within {timeout:?}; \
                     it is {obj:?}; requests: {:?}",
                    kind.name(),
                    self.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
    let ns = if kind.namespaced() { ns } else { "" };
    (kind, ns.to_string(), name.to_string())
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

/// Query parameters aws-iam-authenticator lets through (lowercased).
const TOKEN_PARAMS: [&str; 9] = [
    "action",
    "version",
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-security-token",
    "x-amz-signature",
    "x-amz-signedheaders",
];

/// Checks the shape and freshness of an EKS bearer token as of `now`: what
/// EKS checks before asking STS about the signature.
pub fn parse_eks_token(token: &str, now: SystemTime) -> Result<EksToken, String> {
    let b64 = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| format!("token does not start with {TOKEN_PREFIX}"))?;
    if b64.contains('=') {
        return Err("token is padded base64".into());
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| format!("token is not base64url: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "token is not UTF-8".to_string())?;
    let url = url::Url::parse(&text).map_err(|e| format!("token is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("STS URL scheme is {}, not https", url.scheme()));
    }
    if url.path() != "/" {
        return Err(format!("STS URL path is {}, not /", url.path()));
    }
    let host = url.host_str().unwrap_or_default();
    let region = sts_region(host).ok_or_else(|| format!("{host} is not an STS endpoint"))?;

    let mut params: HashMap<String, String> = HashMap::new();
    for (name, value) in url.query_pairs() {
        let name = name.to_ascii_lowercase();
        if !TOKEN_PARAMS.contains(&name.as_str()) {
            return Err(format!("unexpected query parameter {name}"));
        }
        if params.insert(name.clone(), value.into_owned()).is_some() {
            return Err(format!("query parameter {name} given twice"));
        }
    }
    let param = |name: &str| -> Result<&str, String> {
        params
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("missing {name}"))
    };
    if param("action")? != "GetCallerIdentity" {
        return Err(format!(
            "Action is {}, not GetCallerIdentity",
            param("action")?
        ));
    }
    if param("version")? != "2011-06-15" {
        return Err(format!("Version is {}, not 2011-06-15", param("version")?));
    }
    if param("x-amz-algorithm")? != "AWS4-HMAC-SHA256" {
        return Err("X-Amz-Algorithm is not AWS4-HMAC-SHA256".into());
    }
    let signed: Vec<&str> = param("x-amz-signedheaders")?.split(';').collect();
    if !signed.contains(&"x-k8s-aws-id") {
        return Err("X-Amz-SignedHeaders does not include x-k8s-aws-id".into());
    }
    if !signed.contains(&"host") {
        return Err("X-Amz-SignedHeaders does not include host".into());
    }
    let signature = param("x-amz-signature")?;
    if signature.len() != 64
        || !signature
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err("X-Amz-Signature is not 64 lowercase hex digits".into());
    }
    let expires: u64 = param("x-amz-expires")?
        .parse()
        .map_err(|_| "X-Amz-Expires is not a number".to_string())?;
    if expires == 0 || expires > TOKEN_MAX_EXPIRES_SECS {
        return Err(format!(
            "X-Amz-Expires {expires} is outside 1..={TOKEN_MAX_EXPIRES_SECS}"
        ));
    }
    let date = param("x-amz-date")?;
    let signed_at =
        parse_amz_date(date).ok_or_else(|| format!("X-Amz-Date {date} is malformed"))?;
    if signed_at > now + TOKEN_MAX_SKEW {
        return Err(format!("token signed in the future ({date})"));
    }
    if let Ok(age) = now.duration_since(signed_at) {
        if age > TOKEN_MAX_AGE {
            return Err(format!(
                "token expired: signed {}s ago ({date})",
                age.as_secs()
            ));
        }
    }
    let credential = param("x-amz-credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    match scope.as_slice() {
        [key_id, day, cred_region, "sts", "aws4_request"] if !key_id.is_empty() => {
            if *day != &date[..8] {
                return Err(format!(
                    "credential scope date {day} differs from X-Amz-Date {date}"
                ));
            }
            if *cred_region != region {
                return Err(format!(
                    "credential scope region {cred_region} differs from endpoint region {region}"
                ));
            }
        }
        _ => return Err(format!("X-Amz-Credential {credential} is malformed")),
    }
    Ok(EksToken {
        url: text.clone(),
        region: region.to_string(),
        access_key_id: scope[0].to_string(),
        signed_at,
        expires_secs: expires,
        security_token: params.get("x-amz-security-token").cloned(),
    })
}

/// Region of an STS endpoint host: `sts.amazonaws.com` (us-east-1),
/// `sts.<region>.amazonaws.com`, `sts.<region>.amazonaws.com.cn`.
fn sts_region(host: &str) -> Option<&str> {
    if host == "sts.amazonaws.com" {
        return Some("us-east-1");
    }
    let rest = host.strip_prefix("sts.")?;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    let ok = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then_some(region)
}

fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let t = time::PrimitiveDateTime::parse(s, format).ok()?;
    Some(t.assume_utc().into())
}

fn amz_date(t: SystemTime) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::from(t)
        .format(format)
        .expect("formatting X-Amz-Date")
}

/// A token of the right shape signed at `signed_at` for `region`, with a
/// made-up signature: the stand-in accepts it, real EKS would not.
pub fn fake_eks_token(region: &str, signed_at: SystemTime) -> String {
    let date = amz_date(signed_at);
    let mut url = url::Url::parse(&format!(
        "https://sts.{region}.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"
    ))
    .expect("STS URL");
    url.query_pairs_mut()
        .append_pair("X-Amz-Algorithm", "AWS4-HMAC-SHA256")
        .append_pair(
            "X-Amz-Credential",
            &format!(
                "AKIAIOSFODNN7EXAMPLE/{}/{region}/sts/aws4_request",
                &date[..8]
            ),
        )
        .append_pair("X-Amz-Date", &date)
        .append_pair("X-Amz-Expires", "60")
        .append_pair("X-Amz-SignedHeaders", "host;x-k8s-aws-id")
        .append_pair("X-Amz-Signature", &"0123456789abcdef".repeat(4));
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(url.as_str()))
}

/// DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|line| !line.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END CERTIFICATE-----"))
        .collect();
    STANDARD.decode(body).expect("PEM body is base64")
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = bearer_token(&headers);
    let mut state = shared.lock();
    let reply = state.serve(&method, &uri, token.as_deref(), &body);
    state.calls.push(KubeCall {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        http_version: format!("{version:?}"),
        token,
        status: reply.status.as_u16(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        response: reply.body.clone(),
        at: Instant::now(),
    });
    drop(state);
    let mut response = (
        reply.status,
        [(header::CONTENT_TYPE, "application/json")],
        reply.body.to_string(),
    )
        .into_response();
    if let Some(secs) = reply.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// The token of an `Authorization: Bearer` header; a header with another
/// scheme yields an empty token, which no check accepts.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(token.trim().to_string())
        }
        _ => Some(String::new()),
    }
}

enum Target {
    Version,
    AccessReview,
    Collection {
        kind: Kind,
        ns: Option<String>,
    },
    Item {
        kind: Kind,
        ns: String,
        name: String,
    },
}

fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (core, rest) = match segments.as_slice() {
        ["version"] => return Some(Target::Version),
        ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"] => {
            return Some(Target::AccessReview)
        }
        ["api", "v1", rest @ ..] => (true, rest),
        ["apis", RBAC_GROUP, "v1", rest @ ..] => (false, rest),
        _ => return None,
    };
    let kind_of = |plural: &str| match (core, plural) {
        (true, "configmaps") => Some(Kind::ConfigMap),
        (false, "rolebindings") => Some(Kind::RoleBinding),
        (false, "clusterrolebindings") => Some(Kind::ClusterRoleBinding),
        _ => None,
    };
    match rest {
        ["namespaces", ns, plural] if !ns.is_empty() => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Collection {
                kind,
                ns: Some(ns.to_string()),
            })
        }
        ["namespaces", ns, plural, name] if !ns.is_empty() && !name.is_empty() => {
            let kind = kind_of(plural).filter(|k| k.namespaced())?;
            Some(Target::Item {
                kind,
                ns: ns.to_string(),
                name: name.to_string(),
            })
        }
        [plural] => Some(Target::Collection {
            kind: kind_of(plural)?,
            ns: None,
        }),
        [plural, name] if !name.is_empty() => {
            let kind = kind_of(plural).filter(|k| !k.namespaced())?;
            Some(Target::Item {
                kind,
                ns: String::new(),
                name: name.to_string(),
            })
        }
        _ => None,
    }
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

impl State {
    fn now(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn authenticate(&mut self, token: Option<&str>) -> Result<(), String> {
        let token = token.ok_or_else(|| "no bearer token".to_string())?;
        if !self.allowed_tokens.contains(token) {
            parse_eks_token(token, self.now())?;
        }
        if !self.tokens_seen.iter().any(|seen| seen == token) {
            self.tokens_seen.push(token.to_string());
        }
        Ok(())
    }

    fn take_failure(&mut self, method: &Method) -> Option<u16> {
        [method.as_str(), "*"].into_iter().find_map(|key| {
            self.failures
                .get_mut(key)
                .and_then(|queue| queue.pop_front())
        })
    }

    fn serve(&mut self, method: &Method, uri: &Uri, token: Option<&str>, body: &[u8]) -> Reply {
        if let Err(why) = self.authenticate(token) {
            self.rejections.push(why);
            return failure(401, "Unauthorized", "Unauthorized".into(), None);
        }
        if let Some(code) = self.take_failure(method) {
            return injected_failure(code);
        }
        let query = parse_query(uri.query());
        let dry_run = query.contains_key("dryRun");
        let Some(target) = route(uri.path()) else {
            return failure(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                Some(json!({})),
            );
        };
        if let Some(reply) = self.authorize(&target, method, &query, body) {
            return reply;
        }
        match (target, method.clone()) {
            (Target::AccessReview, Method::POST) => self.access_review(body),
            (Target::Version, Method::GET) => Reply::ok(
                StatusCode::OK,
                json!({
                    "major": "1",
                    "minor": "33",
                    "gitVersion": "v1.33.0-eks-standin",
                    "platform": "linux/amd64",
                }),
            ),
            (Target::Collection { kind, ns }, Method::GET) => {
                self.list(kind, ns.as_deref(), &query)
            }
            (Target::Collection { kind, ns }, Method::POST)
                if ns.is_some() || !kind.namespaced() =>
            {
                self.create(kind, ns.as_deref().unwrap_or_default(), body, dry_run)
            }
            (Target::Collection { kind, ns }, Method::DELETE)
                if ns.is_some() || !kind.namespaced() =>
            {
                self.delete_collection(kind, ns.as_deref().unwrap_or_default(), &query, dry_run)
            }
            (Target::Item { kind, ns, name }, Method::GET) => {
                match self.objects.get(&key(kind, &ns, &name)) {
                    Some(obj) => Reply::ok(StatusCode::OK, obj.clone()),
                    None => not_found(kind, &name),
                }
            }
            (Target::Item { kind, ns, name }, Method::PUT) => {
                self.replace(kind, &ns, &name, body, dry_run)
            }
            (Target::Item { kind, ns, name }, Method::DELETE) => {
                self.delete(kind, &ns, &name, body, dry_run)
            }
            (_, Method::PATCH) => failure(
                405,
                "MethodNotAllowed",
                "PATCH is not implemented by the Kubernetes stand-in".into(),
                Some(json!({})),
            ),
            _ => failure(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
                Some(json!({})),
            ),
        }
    }

    /// RBAC, as kube-apiserver applies it after authentication: the verb on
    /// the resource, then, for a binding being written, `bind` on the role
    /// it refers to (the escalation check; the stand-in does not know the
    /// roles' contents, so holding `bind` is the only way through).
    fn authorize(
        &self,
        target: &Target,
        method: &Method,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Option<Reply> {
        let rbac = self.rbac.as_ref()?;
        let (kind, ns, name, verb) = match (target, method) {
            (Target::Version | Target::AccessReview, _) => return None,
            (Target::Collection { kind, ns }, m) => {
                let verb = match *m {
                    Method::GET if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                        "watch"
                    }
                    Method::GET => "list",
                    Method::POST => "create",
                    Method::DELETE => "deletecollection",
                    _ => return None,
                };
                (*kind, ns.clone().unwrap_or_default(), String::new(), verb)
            }
            (Target::Item { kind, ns, name }, m) => {
                let verb = match *m {
                    Method::GET => "get",
                    Method::PUT => "update",
                    Method::DELETE => "delete",
                    Method::PATCH => "patch",
                    _ => return None,
                };
                (*kind, ns.clone(), name.clone(), verb)
            }
        };
        let attrs = Attributes {
            verb: verb.into(),
            group: kind.group().into(),
            resource: kind.plural().into(),
            namespace: ns.clone(),
            name: name.clone(),
        };
        if !rbac.allows(&attrs) {
            return Some(Reply::ok(StatusCode::FORBIDDEN, forbidden_body(&attrs)));
        }
        let writes_binding = matches!(kind, Kind::RoleBinding | Kind::ClusterRoleBinding)
            && matches!(verb, "create" | "update");
        let sent = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
        let role_ref = Some(sent["roleRef"].clone()).filter(|r| r.is_object());
        if let (true, Some(role_ref)) = (writes_binding, role_ref) {
            let resource = match role_ref["kind"].as_str() {
                Some("Role") => "roles",
                _ => "clusterroles",
            };
            let role = role_ref["name"].as_str().unwrap_or_default();
            let bind = Attributes {
                verb: "bind".into(),
                group: RBAC_GROUP.into(),
                resource: resource.into(),
                namespace: ns,
                name: role.into(),
            };
            if !rbac.allows(&bind) {
                let mut body = forbidden_body(&attrs);
                body["message"] = json!(format!(
                    "{} \"{}\" is forbidden: user \"{}\" (groups=[\"{}\" \"system:authenticated\"]) is attempting to grant RBAC permissions not currently held: no bind permission on {resource} \"{role}\"",
                    kind.qualified_resource(),
                    meta_str(&sent, "name"),
                    super::kube_rbac::TOLLGATE_USER,
                    super::kube_rbac::TOLLGATE_GROUP,
                ));
                return Some(Reply::ok(StatusCode::FORBIDDEN, body));
            }
        }
        None
    }

    /// SelfSubjectAccessReview: whether Tollgate's identity may do what
    /// `spec.resourceAttributes` describes, from the same rules.
    fn access_review(&self, body: &[u8]) -> Reply {
        let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
            return bad_request("the body of a SelfSubjectAccessReview must be JSON".into());
        };
        let ra = &review["spec"]["resourceAttributes"];
        if !ra.is_object() {
            return invalid_review("spec.resourceAttributes: Required value");
        }
        let field = |f: &str| ra[f].as_str().unwrap_or_default().to_string();
        let attrs = Attributes {
            verb: field("verb"),
            group: field("group"),
            resource: field("resource"),
            namespace: field("namespace"),
            name: field("name"),
        };
        let allowed = self.rbac.as_ref().is_none_or(|rbac| rbac.allows(&attrs));
        review["status"] = if allowed {
            json!({"allowed": true, "reason": "RBAC: allowed by the shipped rules"})
        } else {
            json!({"allowed": false})
        };
        review["apiVersion"] = json!("authorization.k8s.io/v1");
        review["kind"] = json!("SelfSubjectAccessReview");
        review["metadata"] = json!({"creationTimestamp": null});
        Reply::ok(StatusCode::CREATED, review)
    }

    fn list(&self, kind: Kind, ns: Option<&str>, query: &HashMap<String, String>) -> Reply {
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return bad_request("the Kubernetes stand-in does not serve watches".into());
        }
        let items = match self.select(kind, ns, query) {
            Ok(keys) => keys
                .iter()
                .map(|key| without_type_meta(&self.objects[key]))
                .collect::<Vec<_>>(),
            Err(reply) => return reply,
        };
        Reply::ok(StatusCode::OK, self.list_body(kind, items))
    }

    fn list_body(&self, kind: Kind, items: Vec<Value>) -> Value {
        json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        })
    }

    /// Keys of the objects of `kind` in `ns` (all when None) matching the
    /// `labelSelector` and `fieldSelector` of `query`.
    fn select(
        &self,
        kind: Kind,
        ns: Option<&str>,
        query: &HashMap<String, String>,
    ) -> Result<Vec<ObjectKey>, Reply> {
        let labels = parse_label_selector(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = parse_field_selector(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(bad_request)?;
        Ok(self
            .objects
            .iter()
            .filter(|((k, o_ns, _), _)| *k == kind && ns.is_none_or(|ns| ns == o_ns))
            .filter(|(_, obj)| {
                labels
                    .iter()
                    .all(|req| req.matches(&obj["metadata"]["labels"]))
            })
            .filter(|(_, obj)| fields.iter().all(|req| req.matches(obj)))
            .map(|(key, _)| key.clone())
            .collect())
    }

    fn create(&mut self, kind: Kind, ns: &str, body: &[u8], dry_run: bool) -> Reply {
        let mut obj = match parse_body(kind, body) {
            Ok(obj) => obj,
            Err(reply) => return reply,
        };
        if let Err(reply) = check_namespace(kind, ns, &obj) {
            return reply;
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if !prefix.is_empty() {
                self.generated_names += 1;
                name = format!("{prefix}{}", generated_suffix(self.generated_names));
            }
        }
        if let Err(reply) = validate(kind, &name, &mut obj, None) {
            return reply;
        }
        if !meta_str(&obj, "resourceVersion").is_empty() {
            return failure(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created".into(),
                Some(
                    json!({"causes": [{"message": "resourceVersion should not be set on objects to be created"}]}),
                ),
            );
        }
        if self.objects.contains_key(&key(kind, ns, &name)) {
            return already_exists(kind, &name);
        }
        self.insert_new(kind, ns, &name, obj, dry_run)
    }

    fn insert_new(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut obj: Value,
        dry_run: bool,
    ) -> Reply {
        let rv = if dry_run {
            self.revision
        } else {
            self.next_revision()
        };
        let created = rfc3339(self.now());
        fill_system_fields(kind, ns, name, &mut obj, &new_uid(), &created, rv);
        if !dry_run {
            self.objects.insert(key(kind, ns, name), obj.clone());
        }
        Reply::ok(StatusCode::CREATED, obj)
    }

    fn replace(&mut self, kind: Kind, ns: &str, name: &str, body: &[u8], dry_run: bool) -> Reply {
        let mut obj = match parse_body(kind, body) {
            Ok(obj) => obj,
            Err(reply) => return reply,
        };
        if let Err(reply) = check_namespace(kind, ns, &obj) {
            return reply;
        }
        let body_name = meta_str(&obj, "name");
        if body_name != name {
            return bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            ));
        }
        let key = key(kind, ns, name);
        // Another writer gets in between the client's read and this write.
        if let Some(writes) = self.concurrent_writes.remove(&key) {
            if self.objects.contains_key(&key) {
                for write in writes {
                    self.write_as_other_client(&key, write);
                }
            }
        }
        let Some(existing) = self.objects.get(&key).cloned() else {
            if !kind.allow_create_on_update() {
                return not_found(kind, name);
            }
            if let Err(reply) = validate(kind, name, &mut obj, None) {
                return reply;
            }
            return self.insert_new(kind, ns, name, obj, dry_run);
        };
        if let Some(left) = self.conflicts.get_mut(&kind).filter(|left| **left > 0) {
            *left -= 1;
            if !dry_run {
                self.write_as_other_client(&key, |_| {});
            }
            return conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE);
        }
        let sent_rv = meta_str(&obj, "resourceVersion");
        if !sent_rv.is_empty() && sent_rv != meta_str(&existing, "resourceVersion") {
            return conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE);
        }
        // A uid in the body is a precondition: the object must be that one,
        // not one deleted and created again under the same name.
        let sent_uid = meta_str(&obj, "uid");
        let uid = meta_str(&existing, "uid");
        if !sent_uid.is_empty() && sent_uid != uid {
            return conflict(
                kind,
                name,
                &format!("Precondition failed: UID in precondition: {sent_uid}, UID in object meta: {uid}"),
            );
        }
        if let Err(reply) = validate(kind, name, &mut obj, Some(&existing)) {
            return reply;
        }
        let existing_rv: u64 = meta_str(&existing, "resourceVersion").parse().unwrap_or(0);
        fill_system_fields(
            kind,
            ns,
            name,
            &mut obj,
            meta_str(&existing, "uid"),
            meta_str(&existing, "creationTimestamp"),
            existing_rv,
        );
        // etcd skips a write that changes nothing; the version stays.
        if obj == existing || dry_run {
            return Reply::ok(StatusCode::OK, obj);
        }
        if self.lying && kind == Kind::ConfigMap {
            // Answered as stored; nothing is.
            obj["metadata"]["resourceVersion"] = json!((existing_rv + 1).to_string());
            return Reply::ok(StatusCode::OK, obj);
        }
        let rv = self.next_revision();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, obj.clone());
        Reply::ok(StatusCode::OK, obj)
    }

    fn delete(&mut self, kind: Kind, ns: &str, name: &str, body: &[u8], dry_run: bool) -> Reply {
        let options = match parse_delete_options(body) {
            Ok(options) => options,
            Err(reply) => return reply,
        };
        let key = key(kind, ns, name);
        let Some(existing) = self.objects.get(&key) else {
            return not_found(kind, name);
        };
        let uid = meta_str(existing, "uid").to_string();
        let rv = meta_str(existing, "resourceVersion").to_string();
        let preconditions = &options["preconditions"];
        if let Some(want) = preconditions["uid"].as_str() {
            if want != uid {
                return conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                    ),
                );
            }
        }
        if let Some(want) = preconditions["resourceVersion"].as_str() {
            if want != rv {
                return conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, \
                         ResourceVersion in object meta: {rv}"
                    ),
                );
            }
        }
        let lie = self.lying && matches!(kind, Kind::RoleBinding | Kind::ClusterRoleBinding);
        if !dry_run && !lie {
            self.objects.remove(&key);
            self.next_revision();
        }
        let mut details = details(kind, name);
        details["uid"] = json!(uid);
        Reply::ok(
            StatusCode::OK,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }),
        )
    }

    fn delete_collection(
        &mut self,
        kind: Kind,
        ns: &str,
        query: &HashMap<String, String>,
        dry_run: bool,
    ) -> Reply {
        let ns = kind.namespaced().then_some(ns);
        let keys = match self.select(kind, ns, query) {
            Ok(keys) => keys,
            Err(reply) => return reply,
        };
        let mut items = Vec::new();
        for key in keys {
            let obj = if dry_run {
                self.objects.get(&key).cloned()
            } else {
                let obj = self.objects.remove(&key);
                self.next_revision();
                obj
            };
            items.extend(obj.map(|obj| without_type_meta(&obj)));
        }
        Reply::ok(StatusCode::OK, self.list_body(kind, items))
    }

    /// Applies `f` to the stored object as another client's update: system
    /// fields stay, the resourceVersion moves on.
    fn write_as_other_client(&mut self, key: &ObjectKey, f: impl FnOnce(&mut Value)) {
        let Some(mut obj) = self.objects.get(key).cloned() else {
            return;
        };
        let uid = meta_str(&obj, "uid").to_string();
        let created = meta_str(&obj, "creationTimestamp").to_string();
        f(&mut obj);
        let rv = self.next_revision();
        let (kind, ns, name) = key;
        fill_system_fields(*kind, ns, name, &mut obj, &uid, &created, rv);
        self.objects.insert(key.clone(), obj);
    }
}

// ---------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

fn fill_system_fields(
    kind: Kind,
    ns: &str,
    name: &str,
    obj: &mut Value,
    uid: &str,
    created: &str,
    rv: u64,
) {
    if !obj.is_object() {
        *obj = json!({});
    }
    obj["kind"] = json!(kind.name());
    obj["apiVersion"] = json!(kind.api_version());
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let meta = obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object");
    meta.insert("name".into(), json!(name));
    if kind.namespaced() {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    meta.insert("uid".into(), json!(uid));
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.insert("creationTimestamp".into(), json!(created));
    for field in ["generateName", "selfLink", "deletionTimestamp"] {
        if meta.get(field).is_some_and(|v| v.is_null() || v == "") {
            meta.remove(field);
        }
    }
}

fn without_type_meta(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(map) = obj.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    obj
}

fn new_uid() -> String {
    let n: u128 = rand::random();
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

fn generated_suffix(n: u64) -> String {
    // The API server appends five random characters from this alphabet.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = n.wrapping_mul(2_654_435_761).wrapping_add(7);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from(t)
        .format(format)
        .expect("formatting a timestamp")
}

fn parse_body(kind: Kind, body: &[u8]) -> Result<Value, Reply> {
    let obj: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("error decoding request body: {e}")))?;
    if !obj.is_object() {
        return Err(bad_request("request body is not a JSON object".into()));
    }
    if let Some(sent) = obj.get("kind").and_then(Value::as_str) {
        if sent != kind.name() {
            return Err(bad_request(format!(
                "the kind of the provided object ({sent}) does not match the resource ({})",
                kind.name()
            )));
        }
    }
    if let Some(sent) = obj.get("apiVersion").and_then(Value::as_str) {
        if sent != kind.api_version() {
            return Err(bad_request(format!(
                "the API version in the data ({sent}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
    }
    let meta = &obj["metadata"];
    if !(meta.is_null() || meta.is_object()) {
        return Err(bad_request("metadata is not an object".into()));
    }
    for field in ["labels", "annotations"] {
        string_map(&meta[field])
            .map_err(|e| bad_request(format!("error decoding metadata.{field}: {e}")))?;
    }
    if kind == Kind::ConfigMap {
        string_map(&obj["data"]).map_err(|e| bad_request(format!("error decoding data: {e}")))?;
    }
    Ok(obj)
}

/// Checks a `map[string]string` field (null allowed).
fn string_map(value: &Value) -> Result<(), String> {
    match value {
        Value::Null => Ok(()),
        Value::Object(map) => match map.iter().find(|(_, v)| !v.is_string()) {
            Some((k, _)) => Err(format!("value of {k:?} is not a string")),
            None => Ok(()),
        },
        _ => Err("not an object".into()),
    }
}

fn check_namespace(kind: Kind, ns: &str, obj: &Value) -> Result<(), Reply> {
    let sent = meta_str(obj, "namespace");
    if kind.namespaced() && !sent.is_empty() && sent != ns {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        ));
    }
    Ok(())
}

fn parse_delete_options(body: &[u8]) -> Result<Value, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("error decoding DeleteOptions: {e}")))
}

// ---------------------------------------------------------------------------
// Validation, as the API server's strategies validate
// ---------------------------------------------------------------------------

/// Defaults and validates `obj` (to be stored as `name`); `old` is the
/// stored object on update.
fn validate(kind: Kind, name: &str, obj: &mut Value, old: Option<&Value>) -> Result<(), Reply> {
    let mut errors: Vec<(String, String)> = Vec::new();
    if name.is_empty() {
        errors.push((
            "metadata.name".into(),
            "Required value: name or generateName is required".into(),
        ));
    } else {
        let ok = match kind {
            Kind::ConfigMap => is_dns_subdomain(name),
            Kind::RoleBinding | Kind::ClusterRoleBinding => is_path_segment_name(name),
        };
        if !ok {
            let why = match kind {
                Kind::ConfigMap => {
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                     characters, '-' or '.', and must start and end with an alphanumeric character"
                }
                _ => "may not be '.' or '..' and may not contain '/' or '%'",
            };
            errors.push((
                "metadata.name".into(),
                format!("Invalid value: {name:?}: {why}"),
            ));
        }
    }
    for (k, v) in obj["metadata"]["labels"].as_object().into_iter().flatten() {
        if !is_qualified_name(k) {
            errors.push((
                "metadata.labels".into(),
                format!("Invalid value: {k:?}: {QUALIFIED_NAME_RULE}"),
            ));
        }
        let v = v.as_str().unwrap_or_default();
        if !is_label_value(v) {
            errors.push((
                "metadata.labels".into(),
                format!(
                    "Invalid value: {v:?}: a valid label must be an empty string or consist of \
                     alphanumeric characters, '-', '_' or '.', and must start and end with an \
                     alphanumeric character (at most 63 characters)"
                ),
            ));
        }
    }
    for k in obj["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        if !is_qualified_name(&k.to_ascii_lowercase()) {
            errors.push((
                "metadata.annotations".into(),
                format!("Invalid value: {k:?}: {QUALIFIED_NAME_RULE}"),
            ));
        }
    }
    match kind {
        Kind::RoleBinding | Kind::ClusterRoleBinding => {
            validate_binding(kind, obj, old, &mut errors)
        }
        Kind::ConfigMap => {
            for k in obj["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    errors.push((
                        format!("data[{k}]"),
                        format!(
                            "Invalid value: {k:?}: a valid config key must consist of \
                             alphanumeric characters, '-', '_' or '.'"
                        ),
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid(kind, name, errors))
    }
}

const QUALIFIED_NAME_RULE: &str = "name part must consist of alphanumeric characters, '-', '_' \
     or '.', and must start and end with an alphanumeric character (at most 63 characters), \
     with an optional DNS subdomain prefix and '/'";

fn validate_binding(
    kind: Kind,
    obj: &mut Value,
    old: Option<&Value>,
    errors: &mut Vec<(String, String)>,
) {
    // v1 defaulting.
    if obj["roleRef"].is_object() && obj["roleRef"]["apiGroup"].as_str().unwrap_or("").is_empty() {
        obj["roleRef"]["apiGroup"] = json!(RBAC_GROUP);
    }
    if let Some(subjects) = obj["subjects"].as_array_mut() {
        for subject in subjects {
            let kind = subject["kind"].as_str().unwrap_or_default();
            if matches!(kind, "User" | "Group")
                && subject["apiGroup"].as_str().unwrap_or("").is_empty()
            {
                subject["apiGroup"] = json!(RBAC_GROUP);
            }
        }
    }

    let role_ref = &obj["roleRef"];
    if !role_ref.is_object() {
        errors.push(("roleRef".into(), "Required value".into()));
    } else {
        if role_ref["apiGroup"] != RBAC_GROUP {
            errors.push((
                "roleRef.apiGroup".into(),
                format!(
                    "Unsupported value: {}: supported values: \"{RBAC_GROUP}\"",
                    role_ref["apiGroup"]
                ),
            ));
        }
        let allowed: &[&str] = match kind {
            Kind::RoleBinding => &["Role", "ClusterRole"],
            _ => &["ClusterRole"],
        };
        let ref_kind = role_ref["kind"].as_str().unwrap_or_default();
        if !allowed.contains(&ref_kind) {
            errors.push((
                "roleRef.kind".into(),
                format!("Unsupported value: {ref_kind:?}: supported values: {allowed:?}"),
            ));
        }
        let ref_name = role_ref["name"].as_str().unwrap_or_default();
        if ref_name.is_empty() {
            errors.push(("roleRef.name".into(), "Required value".into()));
        } else if !is_path_segment_name(ref_name) {
            errors.push((
                "roleRef.name".into(),
                format!("Invalid value: {ref_name:?}: may not contain '/' or '%'"),
            ));
        }
        if let Some(old) = old {
            if old["roleRef"] != obj["roleRef"] {
                errors.push((
                    "roleRef".into(),
                    format!("Invalid value: {}: cannot change roleRef", obj["roleRef"]),
                ));
            }
        }
    }
    match &obj["subjects"] {
        Value::Null => {}
        Value::Array(subjects) => {
            for (i, subject) in subjects.iter().enumerate() {
                let field = format!("subjects[{i}]");
                let name = subject["name"].as_str().unwrap_or_default();
                if name.is_empty() {
                    errors.push((format!("{field}.name"), "Required value".into()));
                }
                let api_group = subject["apiGroup"].as_str().unwrap_or_default();
                match subject["kind"].as_str().unwrap_or_default() {
                    "User" | "Group" => {
                        if api_group != RBAC_GROUP {
                            errors.push((
                                format!("{field}.apiGroup"),
                                format!(
                                    "Unsupported value: {api_group:?}: supported values: \
                                     \"{RBAC_GROUP}\""
                                ),
                            ));
                        }
                    }
                    "ServiceAccount" => {
                        if !api_group.is_empty() {
                            errors.push((
                                format!("{field}.apiGroup"),
                                format!("Unsupported value: {api_group:?}: supported values: \"\""),
                            ));
                        }
                        if kind == Kind::ClusterRoleBinding
                            && subject["namespace"].as_str().unwrap_or("").is_empty()
                        {
                            errors.push((format!("{field}.namespace"), "Required value".into()));
                        }
                    }
                    other => errors.push((
                        format!("{field}.kind"),
                        format!(
                            "Unsupported value: {other:?}: supported values: \
                             \"ServiceAccount\", \"User\", \"Group\""
                        ),
                    )),
                }
            }
        }
        _ => errors.push(("subjects".into(), "Invalid value: not a list".into())),
    }
}

fn is_alnum_edged(s: &str, inner: impl Fn(char) -> bool, edge: impl Fn(char) -> bool) -> bool {
    let (Some(first), Some(last)) = (s.chars().next(), s.chars().last()) else {
        return false;
    };
    edge(first) && edge(last) && s.chars().all(inner)
}

fn is_dns_label_part(s: &str) -> bool {
    let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    is_alnum_edged(s, |c| lower_alnum(c) || c == '-', lower_alnum)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label_part)
}

fn is_path_segment_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('%')
}

fn is_qualified_name_part(s: &str) -> bool {
    s.len() <= 63
        && is_alnum_edged(
            s,
            |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'),
            |c| c.is_ascii_alphanumeric(),
        )
}

fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s)
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

enum LabelRequirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            LabelRequirement::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|got| vs.iter().any(|v| v == got)),
            LabelRequirement::NotIn(k, vs) => {
                !get(k).is_some_and(|got| vs.iter().any(|v| v == got))
            }
        }
    }
}

/// Splits at commas outside parentheses.
fn split_requirements(selector: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    for c in selector.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if is_qualified_name(k) {
            Ok(k.to_string())
        } else {
            Err(format!("invalid label key {k:?}: {QUALIFIED_NAME_RULE}"))
        }
    };
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        if is_label_value(v) {
            Ok(v.to_string())
        } else {
            Err(format!("invalid label value {v:?}"))
        }
    };
    split_requirements(selector)
        .iter()
        .map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("empty requirement in {selector:?}"));
            }
            if let Some(k) = part.strip_prefix('!') {
                return Ok(LabelRequirement::NotExists(key(k)?));
            }
            if let Some((head, rest)) = part.split_once('(') {
                let values = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("missing ')' in {part:?}"))?;
                let values = values
                    .split(',')
                    .map(value)
                    .collect::<Result<Vec<_>, _>>()?;
                let words: Vec<&str> = head.split_whitespace().collect();
                return match words.as_slice() {
                    [k, "in"] => Ok(LabelRequirement::In(key(k)?, values)),
                    [k, "notin"] => Ok(LabelRequirement::NotIn(key(k)?, values)),
                    _ => Err(format!("found {part:?}, expected: in, notin")),
                };
            }
            if let Some((k, v)) = part.split_once("!=") {
                return Ok(LabelRequirement::NotEq(key(k)?, value(v)?));
            }
            if let Some((k, v)) = part.split_once("==") {
                return Ok(LabelRequirement::Eq(key(k)?, value(v)?));
            }
            if let Some((k, v)) = part.split_once('=') {
                return Ok(LabelRequirement::Eq(key(k)?, value(v)?));
            }
            if part.contains(['<', '>']) {
                return Err(format!("{part:?}: the stand-in does not support gt/lt"));
            }
            Ok(LabelRequirement::Exists(key(part)?))
        })
        .collect()
}

struct FieldRequirement {
    field: &'static str,
    value: String,
    equal: bool,
}

impl FieldRequirement {
    fn matches(&self, obj: &Value) -> bool {
        (meta_str(obj, self.field) == self.value) == self.equal
    }
}

fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|part| {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = match field.trim() {
                "metadata.name" => "name",
                "metadata.namespace" => "namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            Ok(FieldRequirement {
                field,
                value: value.trim().to_string(),
                equal,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Status answers
// ---------------------------------------------------------------------------

fn failure(code: u16, reason: &str, message: String, details: Option<Value>) -> Reply {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    Reply::ok(StatusCode::from_u16(code).expect("HTTP status code"), body)
}

fn details(kind: Kind, name: &str) -> Value {
    let mut details = Map::new();
    details.insert("name".into(), json!(name));
    if !kind.group().is_empty() {
        details.insert("group".into(), json!(kind.group()));
    }
    details.insert("kind".into(), json!(kind.plural()));
    Value::Object(details)
}

fn not_found(kind: Kind, name: &str) -> Reply {
    failure(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", kind.qualified_resource()),
        Some(details(kind, name)),
    )
}

fn already_exists(kind: Kind, name: &str) -> Reply {
    failure(
        409,
        "AlreadyExists",
        format!("{} \"{name}\" already exists", kind.qualified_resource()),
        Some(details(kind, name)),
    )
}

fn conflict(kind: Kind, name: &str, why: &str) -> Reply {
    failure(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            kind.qualified_resource()
        ),
        Some(details(kind, name)),
    )
}

fn invalid(kind: Kind, name: &str, errors: Vec<(String, String)>) -> Reply {
    let listed: Vec<String> = errors
        .iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect();
    let summary = match listed.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|(field, message)| {
            json!({"reason": "FieldValueInvalid", "message": message, "field": field})
        })
        .collect();
    let mut details = json!({"name": name, "kind": kind.name(), "causes": causes});
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    failure(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {summary}", kind.qualified_kind()),
        Some(details),
    )
}

fn invalid_review(message: &str) -> Reply {
    failure(
        422,
        "Invalid",
        format!("SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: {message}"),
        None,
    )
}

fn bad_request(message: String) -> Reply {
    failure(400, "BadRequest", message, None)
}

fn injected_failure(code: u16) -> Reply {
    let (reason, message) = match code {
        401 => ("Unauthorized", "Unauthorized"),
        403 => (
            "Forbidden",
            "forbidden: the stand-in was told to refuse this request",
        ),
        409 => ("Conflict", OPTIMISTIC_LOCK_MESSAGE),
        429 => (
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later",
        ),
        500 => (
            "InternalError",
            "an error on the server (\"injected\") has prevented the request from succeeding",
        ),
        503 => (
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ),
        504 => (
            "Timeout",
            "the server was unable to return a response in the time allotted",
        ),
        _ => ("", "injected failure"),
    };
    let mut reply = failure(code, reason, message.into(), None);
    if code == 429 {
        reply.body["details"] = json!({"retryAfterSeconds": 1});
        reply.retry_after = Some(1);
    }
    reply
}
