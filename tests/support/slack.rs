//! A stand-in for the Slack Web API: answers the methods tollgate uses with
//! the shapes real Slack sends, records every call, and lets tests inject the
//! failures Slack produces (API errors, rate limits, outages).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

pub const TEAM_ID: &str = "T0TEST";
pub const BOT_USER_ID: &str = "U0BOT";
pub const BOT_ID: &str = "B0BOT";

/// First message timestamp handed out, in microseconds; Slack's `ts` is
/// seconds with six decimals and unique per channel.
const FIRST_TS_MICROS: u64 = 1_763_900_000_000_100;
const TS_STEP_MICROS: u64 = 100;
/// Fixed creation time reported for every channel.
const CHANNEL_CREATED: i64 = 1_700_000_000;

/// One request the stand-in received, with what it answered.
#[derive(Clone, Debug)]
pub struct Call {
    /// Web API method (`chat.postMessage`), or `response:{name}` for a POST to
    /// [`SlackStandIn::response_url`].
    pub method: String,
    /// HTTP verb the client used (`GET` or `POST`).
    pub http_method: String,
    /// Query string and body merged into one object. Query and form values
    /// are strings; JSON bodies are kept as sent.
    pub params: Value,
    /// Bearer token from the `Authorization` header, or the `token` param.
    pub token: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// JSON answer (`Value::Null` when the answer was not JSON).
    pub response: Value,
    pub at: Instant,
}

#[derive(Clone, Debug)]
pub struct UserSpec {
    pub id: String,
    pub email: String,
    pub deleted: bool,
    pub is_bot: bool,
    /// Answered as `is_restricted` (a multi-channel guest).
    pub is_guest: bool,
    pub tz: String,
    pub tz_offset: i64,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    users: HashMap<String, UserSpec>,
    usergroups: HashMap<String, Vec<String>>,
    /// Channel id → whether the bot is a member.
    channels: HashMap<String, bool>,
    /// Method → error codes to answer with, one per upcoming call.
    method_failures: HashMap<String, VecDeque<String>>,
    channel_failures: HashMap<String, String>,
    /// Method → `Retry-After` seconds, one per upcoming call.
    rate_limits: HashMap<String, VecDeque<u64>>,
    /// Method (or `*`) → number of upcoming calls to answer with HTTP 500.
    server_errors: HashMap<String, usize>,
    /// Until this instant every API method and response URL answers 500.
    outage_until: Option<Instant>,
    /// Slack's per-channel message limit, when a test turns it on.
    channel_rate: Option<ChannelRate>,
    /// Channel → (tokens left, when they were counted).
    channel_buckets: HashMap<String, (f64, Instant)>,
    /// Method → its rate-limit tier, for the methods a test limits
    /// (`limit_method`, `slack_tiers`); none by default.
    method_rates: HashMap<String, MethodRate>,
    /// Method → (tokens left, when they were counted).
    method_buckets: HashMap<String, (f64, Instant)>,
    messages: HashMap<(String, String), Value>,
    issued_ts: u64,
}

/// About one message a second per channel with short bursts, as Slack
/// documents for `chat.postMessage`: a token bucket per channel.
#[derive(Clone, Copy, Debug)]
struct ChannelRate {
    per_second: f64,
    burst: f64,
}

/// Slack's Web API tiers, in requests a minute (Slack's "Rate limits"
/// page: Tier 1 1+, Tier 2 20+, Tier 3 50+, Tier 4 100+ per minute, "per
/// API method per workspace per app", with bursts).
pub const TIER_1: f64 = 1.0;
pub const TIER_2: f64 = 20.0;
pub const TIER_3: f64 = 50.0;
pub const TIER_4: f64 = 100.0;

/// The tier of each method Tollgate calls, from each method's reference
/// page; `chat.postMessage` is Slack's special tier (per channel, see
/// `limit_channels`), and `auth.test` is called once at start-up.
pub const METHOD_TIERS: &[(&str, f64)] = &[
    ("users.info", TIER_4),
    ("usergroups.users.list", TIER_2),
    ("conversations.open", TIER_3),
    ("conversations.info", TIER_3),
    ("chat.update", TIER_3),
    ("views.open", TIER_4),
    ("views.publish", TIER_4),
];

/// A token bucket of one method: `burst` tokens, refilled at `per_minute`.
#[derive(Clone, Copy, Debug)]
struct MethodRate {
    per_minute: f64,
    burst: f64,
}

/// Takes a token from a bucket refilled at `per_second` up to `burst`, or
/// says how many whole seconds to wait for the next one (Slack's
/// `Retry-After` is whole seconds, at least 1).
fn take_token(bucket: &mut (f64, Instant), per_second: f64, burst: f64) -> Option<u64> {
    let now = Instant::now();
    let (tokens, since) = bucket;
    *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * per_second).min(burst);
    *since = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        return None;
    }
    Some((((1.0 - *tokens) / per_second).ceil() as u64).max(1))
}

impl State {
    /// Takes a token from `method`'s bucket when a test limits it.
    fn take_method_token(&mut self, method: &str) -> Option<u64> {
        let rate = *self.method_rates.get(method)?;
        let bucket = self
            .method_buckets
            .entry(method.to_string())
            .or_insert((rate.burst, Instant::now()));
        take_token(bucket, rate.per_minute / 60.0, rate.burst)
    }

    /// Takes a token from `channel`'s bucket, or says how many whole
    /// seconds to wait (Slack's `Retry-After` is in seconds, at least 1).
    fn take_channel_token(&mut self, channel: &str) -> Option<u64> {
        let rate = self.channel_rate?;
        let bucket = self
            .channel_buckets
            .entry(channel.to_string())
            .or_insert((rate.burst, Instant::now()));
        take_token(bucket, rate.per_second, rate.burst)
    }

    fn next_ts(&mut self) -> String {
        let micros = FIRST_TS_MICROS + self.issued_ts * TS_STEP_MICROS;
        self.issued_ts += 1;
        format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
    }

    fn take_server_error(&mut self, method: &str) -> bool {
        if self
            .outage_until
            .is_some_and(|until| Instant::now() < until)
        {
            return true;
        }
        [method, "*"]
            .into_iter()
            .any(|key| match self.server_errors.get_mut(key) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            })
    }
}

struct Shared {
    bot_token: String,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the
        // recorded calls from the panic message of another.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct SlackStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl SlackStandIn {
    /// Serves on a free loopback port until dropped. Requests to `/api/`
    /// methods must carry `Authorization: Bearer {bot_token}`.
    pub async fn start(bot_token: &str) -> SlackStandIn {
        let shared = Arc::new(Shared {
            bot_token: bot_token.to_string(),
            state: Mutex::new(State::default()),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding the Slack stand-in");
        let addr = listener.local_addr().expect("Slack stand-in address");
        // A fallback instead of routes: slack-morphism joins the base URL and
        // the method with `/`, so a base URL ending in `/` yields `/api//m`,
        // which a route pattern would not match.
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        SlackStandIn {
            addr,
            shared,
            shutdown: Some(shutdown),
        }
    }

    /// Base URL of the Web API, with a trailing slash.
    ///
    /// slack-morphism's `with_slack_api_url` appends `/{method}` itself, so
    /// this yields `/api//{method}` there; the stand-in accepts both forms.
    pub fn api_url(&self) -> String {
        format!("http://{}/api/", self.addr)
    }

    /// A `response_url` as Slack puts in slash commands and interactions.
    /// POSTs to it are recorded as method `response:{name}`.
    pub fn response_url(&self, name: &str) -> String {
        format!("http://{}/response/{name}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    pub fn calls_to(&self, method: &str) -> Vec<Call> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|call| call.method == method)
            .cloned()
            .collect()
    }

    pub fn clear_calls(&self) {
        self.shared.lock().calls.clear();
    }

    /// Waits for a call to `method` matching `pred`, including calls that
    /// arrived before the wait began.
    pub async fn wait_for_call(
        &self,
        method: &str,
        pred: impl Fn(&Call) -> bool,
        timeout: Duration,
    ) -> Call {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(call) = self.calls_to(method).into_iter().find(|call| pred(call)) {
                return call;
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> = self.calls().into_iter().map(|call| call.method).collect();
                panic!("no matching call to {method} within {timeout:?}; calls recorded: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The ts of the approval card for request `id` in `channel`, once
    /// posted (calls made before the wait began count).
    pub async fn card_ts(&self, channel: &str, id: &str, timeout: Duration) -> String {
        let (channel, id) = (channel.to_string(), id.to_string());
        self.wait_for_call(
            "chat.postMessage",
            move |c| c.params["channel"] == channel.as_str() && c.params.to_string().contains(&id),
            timeout,
        )
        .await
        .response["ts"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Current content of a posted message as Slack would render it, after
    /// any `chat.update`. `channel` is the id Slack answered with, so a post
    /// to user `U1` is stored under `DU1`.
    pub fn message(&self, channel: &str, ts: &str) -> Option<Value> {
        self.shared
            .lock()
            .messages
            .get(&(channel.to_string(), ts.to_string()))
            .cloned()
    }

    pub fn add_user(&self, id: &str, email: &str, tz: &str, tz_offset: i64) {
        self.add_user_full(UserSpec {
            id: id.to_string(),
            email: email.to_string(),
            deleted: false,
            is_bot: false,
            is_guest: false,
            tz: tz.to_string(),
            tz_offset,
        });
    }

    pub fn add_user_full(&self, user: UserSpec) {
        self.shared.lock().users.insert(user.id.clone(), user);
    }

    /// Changes a known user's profile (deactivation, new email, guest).
    pub fn edit_user(&self, id: &str, edit: impl FnOnce(&mut UserSpec)) {
        if let Some(user) = self.shared.lock().users.get_mut(id) {
            edit(user);
        }
    }

    pub fn add_usergroup(&self, id: &str, members: &[&str]) {
        let members = members.iter().map(|m| m.to_string()).collect();
        self.shared
            .lock()
            .usergroups
            .insert(id.to_string(), members);
    }

    pub fn add_channel(&self, id: &str, is_member: bool) {
        self.shared
            .lock()
            .channels
            .insert(id.to_string(), is_member);
    }

    /// The next `times` calls to `method` answer `{"ok":false,"error":code}`.
    /// Repeated calls queue up, so different codes can be sequenced.
    pub fn fail_method(&self, method: &str, error_code: &str, times: usize) {
        self.shared
            .lock()
            .method_failures
            .entry(method.to_string())
            .or_default()
            .extend(std::iter::repeat_n(error_code.to_string(), times));
    }

    /// `chat.postMessage` and `chat.postEphemeral` to `channel_id` answer
    /// `{"ok":false,"error":code}` until [`SlackStandIn::clear_fail_channel`].
    pub fn fail_channel(&self, channel_id: &str, error_code: &str) {
        self.shared
            .lock()
            .channel_failures
            .insert(channel_id.to_string(), error_code.to_string());
    }

    pub fn clear_fail_channel(&self, channel_id: &str) {
        self.shared.lock().channel_failures.remove(channel_id);
    }

    /// The next `times` calls to `method` answer HTTP 429 with
    /// `Retry-After: {retry_after_secs}`, as Slack does when rate limiting.
    pub fn rate_limit(&self, method: &str, retry_after_secs: u64, times: usize) {
        self.shared
            .lock()
            .rate_limits
            .entry(method.to_string())
            .or_default()
            .extend(std::iter::repeat_n(retry_after_secs, times));
    }

    /// From now on `chat.postMessage` allows `per_second` messages a second
    /// per channel (a DM's channel is the user) after a burst of `burst`,
    /// and answers 429 with `Retry-After` beyond that, as Slack does.
    pub fn limit_channels(&self, per_second: f64, burst: u32) {
        self.shared.lock().channel_rate = Some(ChannelRate {
            per_second,
            burst: f64::from(burst.max(1)),
        });
    }

    /// From now on `method` allows `per_minute` calls a minute after a
    /// burst of `burst` (a token bucket per method, as Slack limits each
    /// method per app per workspace), and answers HTTP 429 with
    /// `Retry-After` (the whole seconds to the next token) and
    /// `{"ok":false,"error":"ratelimited"}` beyond that. Off by default, so
    /// a test that does not ask for limits never meets one.
    pub fn limit_method(&self, method: &str, per_minute: f64, burst: u32) {
        let mut state = self.shared.lock();
        state.method_rates.insert(
            method.to_string(),
            MethodRate {
                per_minute,
                burst: f64::from(burst.max(1)),
            },
        );
        state.method_buckets.remove(method);
    }

    /// Every method of `METHOD_TIERS` at its documented tier (bucket = one
    /// minute's worth), and `chat.postMessage` at one message a second per
    /// channel after a burst of `channel_burst`. `speedup` compresses time
    /// for short runs: every rate is multiplied by it, buckets stay the
    /// size of Slack's (1.0 = Slack's own limits).
    pub fn slack_tiers(&self, speedup: f64, channel_burst: u32) {
        for (method, per_minute) in METHOD_TIERS {
            self.limit_method(method, per_minute * speedup, *per_minute as u32);
        }
        self.limit_channels(speedup, channel_burst);
    }

    /// How many calls to `method` Slack answered 429.
    pub fn rate_limited_calls(&self, method: &str) -> usize {
        self.calls_to(method)
            .iter()
            .filter(|c| c.status == 429)
            .count()
    }

    /// Slack is down for `length` from now: every call answers HTTP 500.
    pub fn outage_for(&self, length: Duration) {
        self.shared.lock().outage_until = Some(Instant::now() + length);
    }

    /// The next `times` calls to `method` answer HTTP 500. `*` matches every
    /// method and response URL (`response:{name}`).
    pub fn server_error(&self, method_or_star: &str, times: usize) {
        *self
            .shared
            .lock()
            .server_errors
            .entry(method_or_star.to_string())
            .or_default() += times;
    }
}

impl Drop for SlackStandIn {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

enum Answer {
    Json(StatusCode, Value),
    RateLimited(u64),
    ServerError,
    Text(StatusCode, &'static str),
}

impl Answer {
    fn ok(mut body: Value) -> Answer {
        body["ok"] = Value::Bool(true);
        Answer::Json(StatusCode::OK, body)
    }

    fn error(code: &str) -> Answer {
        Answer::Json(StatusCode::OK, json!({"ok": false, "error": code}))
    }

    fn status(&self) -> StatusCode {
        match self {
            Answer::Json(status, _) | Answer::Text(status, _) => *status,
            Answer::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Answer::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> Value {
        match self {
            Answer::Json(_, body) => body.clone(),
            Answer::RateLimited(_) => rate_limited_body(),
            Answer::ServerError | Answer::Text(..) => Value::Null,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Json(status, body) => (status, Json(body)).into_response(),
            Answer::RateLimited(secs) => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(rate_limited_body()),
            )
                .into_response(),
            Answer::ServerError => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>Internal Server Error</body></html>",
            )
                .into_response(),
            Answer::Text(status, text) => (status, text).into_response(),
        }
    }
}

fn rate_limited_body() -> Value {
    json!({"ok": false, "error": "ratelimited"})
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    http_method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let path = uri.path();
    let params = request_params(&uri, &headers, &body);
    let token = bearer_token(&headers).or_else(|| str_param(&params, "token"));

    let (method, answer) = if let Some(method) = path.strip_prefix("/api/") {
        let method = method.trim_start_matches('/').to_string();
        let answer = if token.as_deref() == Some(shared.bot_token.as_str()) {
            answer_api(&mut shared.lock(), &method, &params)
        } else {
            Answer::error("invalid_auth")
        };
        (method, answer)
    } else if let Some(name) = path.strip_prefix("/response/") {
        let method = format!("response:{name}");
        let answer = if http_method != Method::POST {
            Answer::Text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        } else if shared.lock().take_server_error(&method) {
            Answer::ServerError
        } else {
            Answer::Text(StatusCode::OK, "ok")
        };
        (method, answer)
    } else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };

    shared.lock().calls.push(Call {
        method,
        http_method: http_method.to_string(),
        params,
        token,
        status: answer.status().as_u16(),
        response: answer.body(),
        at,
    });
    answer.into_response()
}

/// Failure injection first, in the order Slack's edge applies it: an outage
/// or rate limit never reaches the method, an API error replaces its answer.
fn answer_api(state: &mut State, method: &str, params: &Value) -> Answer {
    if state.take_server_error(method) {
        return Answer::ServerError;
    }
    if let Some(secs) = state
        .rate_limits
        .get_mut(method)
        .and_then(VecDeque::pop_front)
    {
        return Answer::RateLimited(secs);
    }
    if let Some(secs) = state.take_method_token(method) {
        return Answer::RateLimited(secs);
    }
    if method == "chat.postMessage" {
        if let Some(channel) = params.get("channel").and_then(Value::as_str) {
            if let Some(secs) = state.take_channel_token(channel) {
                return Answer::RateLimited(secs);
            }
        }
    }
    if let Some(code) = state
        .method_failures
        .get_mut(method)
        .and_then(VecDeque::pop_front)
    {
        return Answer::error(&code);
    }
    match method {
        "auth.test" => Answer::ok(json!({
            "url": "https://tollgate-test.slack.com/",
            "team": "Test",
            "user": "tollgate",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": false,
        })),
        "chat.postMessage" => post_message(state, params),
        "chat.update" => update_message(state, params),
        "chat.postEphemeral" => post_ephemeral(state, params),
        "conversations.open" => open_conversation(params),
        "conversations.info" => conversation_info(state, params),
        "users.info" => user_info(state, params),
        "usergroups.users.list" => usergroup_members(state, params),
        "views.open" => open_view(params),
        _ => Answer::error("unknown_method"),
    }
}

/// Slack checks the trigger id and the view's shape; the stand-in checks
/// what Tollgate could get wrong: a modal with a title and blocks.
fn open_view(params: &Value) -> Answer {
    if str_param(params, "trigger_id").is_none_or(|t| t.is_empty()) {
        return Answer::error("invalid_trigger_id");
    }
    let view = match params.get("view") {
        Some(Value::String(text)) => serde_json::from_str::<Value>(text).ok(),
        Some(v @ Value::Object(_)) => Some(v.clone()),
        _ => None,
    };
    match view {
        Some(view)
            if view["type"] == "modal"
                && view["title"]["text"].is_string()
                && view["blocks"].is_array() =>
        {
            let mut opened = view.clone();
            opened["id"] = json!("V0TOLLGATE");
            opened["team_id"] = json!(TEAM_ID);
            opened["hash"] = json!("1700000000.tollgate");
            opened["state"] = json!({"values": {}});
            Answer::ok(json!({"view": opened}))
        }
        _ => Answer::error("invalid_arguments"),
    }
}

fn post_message(state: &mut State, params: &Value) -> Answer {
    let Some(requested) = str_param(params, "channel") else {
        return Answer::error("channel_not_found");
    };
    if let Some(code) = channel_failure(state, &requested) {
        return Answer::error(&code);
    }
    if params.get("text").is_none() && params.get("blocks").is_none() {
        return Answer::error("no_text");
    }
    let channel = resolve_channel(&requested);
    let ts = state.next_ts();
    let mut message = json!({
        "type": "message",
        "text": str_param(params, "text").unwrap_or_default(),
        "ts": ts,
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "team": TEAM_ID,
    });
    copy_content(params, &mut message);
    if let Some(thread_ts) = str_param(params, "thread_ts") {
        message["thread_ts"] = Value::String(thread_ts);
    }
    state
        .messages
        .insert((channel.clone(), ts.clone()), message.clone());
    Answer::ok(json!({"channel": channel, "ts": ts, "message": message}))
}

fn update_message(state: &mut State, params: &Value) -> Answer {
    let (Some(requested), Some(ts)) = (str_param(params, "channel"), str_param(params, "ts"))
    else {
        return Answer::error("message_not_found");
    };
    let channel = resolve_channel(&requested);
    let Some(message) = state.messages.get_mut(&(channel.clone(), ts.clone())) else {
        return Answer::error("message_not_found");
    };
    if let Some(text) = str_param(params, "text") {
        message["text"] = Value::String(text);
    }
    // Slack keeps blocks and attachments the update leaves out; an empty
    // array is how a caller removes them.
    copy_content(params, message);
    let mut answer_message = json!({
        "text": message["text"],
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
    });
    copy_content(message, &mut answer_message);
    Answer::ok(json!({
        "channel": channel,
        "ts": ts,
        "text": message["text"],
        "message": answer_message,
    }))
}

fn post_ephemeral(state: &mut State, params: &Value) -> Answer {
    let Some(channel) = str_param(params, "channel") else {
        return Answer::error("channel_not_found");
    };
    if let Some(code) = channel_failure(state, &channel) {
        return Answer::error(&code);
    }
    if str_param(params, "user").is_none() {
        return Answer::error("user_not_in_channel");
    }
    Answer::ok(json!({"message_ts": state.next_ts()}))
}

fn open_conversation(params: &Value) -> Answer {
    if let Some(channel) = str_param(params, "channel") {
        return Answer::ok(json!({"channel": {"id": channel}}));
    }
    let users: Vec<String> = match params.get("users") {
        Some(Value::Array(users)) => users
            .iter()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(users)) => users
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    let channel = match users.as_slice() {
        [] => return Answer::error("users_list_not_supplied"),
        [user] => {
            let mut channel = json!({"id": format!("D{user}")});
            if bool_param(params, "return_im") {
                channel = json!({
                    "id": format!("D{user}"),
                    "created": CHANNEL_CREATED,
                    "is_im": true,
                    "is_org_shared": false,
                    "user": user,
                });
            }
            channel
        }
        many => json!({"id": format!("G{}", many.join(""))}),
    };
    Answer::ok(json!({"channel": channel}))
}

fn conversation_info(state: &State, params: &Value) -> Answer {
    let Some(id) = str_param(params, "channel") else {
        return Answer::error("channel_not_found");
    };
    if let Some(is_member) = state.channels.get(&id) {
        return Answer::ok(json!({"channel": {
            "id": id,
            "name": id.to_lowercase(),
            "created": CHANNEL_CREATED,
            "is_channel": true,
            "is_private": false,
            "is_archived": false,
            "is_member": is_member,
        }}));
    }
    match id.strip_prefix('D') {
        Some(user) if state.users.contains_key(user) => Answer::ok(json!({"channel": {
            "id": id,
            "created": CHANNEL_CREATED,
            "is_im": true,
            "user": user,
        }})),
        _ => Answer::error("channel_not_found"),
    }
}

fn user_info(state: &State, params: &Value) -> Answer {
    let Some(user) = str_param(params, "user").and_then(|id| state.users.get(&id)) else {
        return Answer::error("user_not_found");
    };
    let name = user.email.split('@').next().unwrap_or(&user.id).to_string();
    Answer::ok(json!({"user": {
        "id": user.id,
        "team_id": TEAM_ID,
        "name": name,
        "real_name": name,
        "deleted": user.deleted,
        "is_bot": user.is_bot,
        "is_restricted": user.is_guest,
        "is_ultra_restricted": false,
        "is_admin": false,
        "is_owner": false,
        "is_app_user": false,
        "tz": user.tz,
        "tz_label": tz_label(user.tz_offset),
        "tz_offset": user.tz_offset,
        "updated": CHANNEL_CREATED,
        "profile": {
            "email": user.email,
            "real_name": name,
            "display_name": name,
            "team": TEAM_ID,
        },
    }}))
}

fn usergroup_members(state: &State, params: &Value) -> Answer {
    match str_param(params, "usergroup").and_then(|id| state.usergroups.get(&id)) {
        Some(members) => Answer::ok(json!({"users": members})),
        None => Answer::error("no_such_subteam"),
    }
}

fn channel_failure(state: &State, requested: &str) -> Option<String> {
    [requested.to_string(), resolve_channel(requested)]
        .iter()
        .find_map(|id| state.channel_failures.get(id).cloned())
}

/// Slack delivers a post addressed to a user id into the DM with that user
/// and answers with the DM's id; `conversations.open` uses the same ids.
fn resolve_channel(requested: &str) -> String {
    if requested.starts_with('U') || requested.starts_with('W') {
        format!("D{requested}")
    } else {
        requested.to_string()
    }
}

/// Copies the rich parts of a message that are present in `from`. Form posts
/// carry `blocks` and `attachments` as JSON strings, so those are decoded.
fn copy_content(from: &Value, to: &mut Value) {
    for key in ["blocks", "attachments", "metadata"] {
        match from.get(key) {
            Some(Value::String(encoded)) => {
                let decoded =
                    serde_json::from_str(encoded).unwrap_or(Value::String(encoded.clone()));
                to[key] = decoded;
            }
            Some(Value::Null) | None => {}
            Some(value) => to[key] = value.clone(),
        }
    }
}

fn tz_label(offset_secs: i64) -> String {
    if offset_secs == 0 {
        return "Coordinated Universal Time".to_string();
    }
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let abs = offset_secs.abs();
    format!("UTC{sign}{:02}:{:02}", abs / 3600, abs % 3600 / 60)
}

fn request_params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Value {
    let mut params = Map::new();
    if let Some(query) = uri.query() {
        insert_form(&mut params, query.as_bytes());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("application/json") {
        match serde_json::from_slice(body) {
            Ok(Value::Object(fields)) => params.extend(fields),
            Ok(other) => {
                params.insert("_body".to_string(), other);
            }
            Err(_) => {
                params.insert(
                    "_body".to_string(),
                    Value::String(String::from_utf8_lossy(body).into_owned()),
                );
            }
        }
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        insert_form(&mut params, body);
    } else if !body.is_empty() {
        params.insert(
            "_body".to_string(),
            Value::String(String::from_utf8_lossy(body).into_owned()),
        );
    }
    Value::Object(params)
}

fn insert_form(params: &mut Map<String, Value>, encoded: &[u8]) {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(encoded).unwrap_or_default();
    for (key, value) in pairs {
        params.insert(key, Value::String(value));
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

fn str_param(params: &Value, key: &str) -> Option<String> {
    match params.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bool_param(params: &Value, key: &str) -> bool {
    match params.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true" || s == "1",
        _ => false,
    }
}
