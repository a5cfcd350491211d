//! The HTTP endpoints Slack calls, and the probes; `/metrics` has its own
//! router for its own listener. Order per request: size limit and deadline
//! while reading, signature, timestamp, replay, UTF-8, then parsing (nothing
//! is parsed before the signature is good), then the workspace and app the
//! request is for.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::modal;
use super::verify::{Rejection, Verifier};
use crate::domain::inbox::{Click, Interaction as RecordedClick};
use crate::service::directory::{answering, Ack};
use crate::service::{Service, SlashCommand};

pub const MAX_BODY_BYTES: usize = 64 * 1024;

const STORE_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Slack gives up after three seconds; answer before that whatever happens.
const COMMAND_DEADLINE: Duration = Duration::from_millis(2700);

/// A click not on disk by then is answered non-200 (within Slack's three
/// seconds), so Slack tells the clicker it failed.
const CLICK_RECORD_DEADLINE: Duration = Duration::from_millis(2500);

/// The answer of a command whose work waits on Slack; the outcome follows
/// through the command's `response_url`.
pub const WORKING_ON_IT: &str =
    "Working on it: Tollgate is asking Slack about you; the answer follows here in a moment.";

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub verifier: Verifier,
    pub ready: Arc<AtomicBool>,
    /// The bot token's workspace (`auth.test`): requests from any other
    /// are refused, and every request while it is not yet known (Slack
    /// unreachable at start-up).
    pub team_id: Arc<std::sync::OnceLock<String>>,
    /// `[slack] app_id`: when set, requests for another app are refused.
    pub app_id: Option<String>,
}

/// What Slack's listener serves; `/metrics` is not among it, so exposing
/// this port to Slack never exposes the metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/slack/commands", post(commands))
        .route("/slack/interactions", post(interactions))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The metrics listener (`[server] metrics_listen`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Ready: recovery done, the scheduler running, and the store answering (a
/// replica that lost a shared store is taken out of the load balancer
/// until it is back; it keeps answering whoever still reaches it).
async fn readyz(State(app): State<AppState>) -> Response {
    if !app.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response();
    }
    if app.team_id.get().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for Slack auth.test to name the workspace",
        )
            .into_response();
    }
    match tokio::time::timeout(STORE_PING_TIMEOUT, app.service.store().ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response(),
    }
}

/// Gauges that describe the store are computed when scraped, so they can
/// never drift from it.
async fn metrics(State(app): State<AppState>) -> Response {
    let service = &app.service;
    service.refresh_gauges().await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.metrics().render(),
    )
        .into_response()
}

fn ephemeral(text: String) -> Response {
    Json(json!({"response_type": "ephemeral", "text": text})).into_response()
}

/// A client still sending when the 413 goes out may see its connection
/// reset instead of the answer; past the limit the rest is read and thrown
/// away, up to this much, so ordinary clients get the 413.
const DRAIN_BYTES: usize = 1024 * 1024;

/// Keeps at most 64 KiB of the body; anything longer is a 413, and a body
/// that has not arrived within its deadline is a 408 that closes the
/// connection (the header deadline is the server loop's, `crate::http`).
async fn read_limited(body: Body) -> Result<Bytes, StatusCode> {
    let body_deadline = crate::http::REQUEST_TIMEOUT - crate::http::HEADER_TIMEOUT;
    tokio::time::timeout(body_deadline, read_body(body))
        .await
        .unwrap_or(Err(StatusCode::REQUEST_TIMEOUT))
}

async fn read_body(body: Body) -> Result<Bytes, StatusCode> {
    let mut body = body;
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > DRAIN_BYTES {
            break;
        }
        if seen <= MAX_BODY_BYTES {
            kept.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY_BYTES {
        Err(StatusCode::PAYLOAD_TOO_LARGE)
    } else {
        Ok(Bytes::from(kept))
    }
}

fn reject(
    app: &AppState,
    reason: &'static str,
    status: StatusCode,
    text: &'static str,
) -> Response {
    tracing::warn!(reason, "request rejected");
    app.service.metrics().rejected(reason);
    let mut response = (status, text).into_response();
    if status == StatusCode::REQUEST_TIMEOUT {
        // The rest of a trickled body is not worth waiting for.
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Tells the client the connection ends with this answer: the rest of
/// what it sends is not read.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Reads at most 64 KiB and checks the signature, its timestamp, that it
/// was not seen before and that the body is text; the error is the
/// response.
async fn authenticated_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    // Judged on the declared length, before any body byte is awaited: a
    // client cannot hold the connection open with a body it never sends
    // in full or that was always going to be too long (spec 9.9).
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        None => {
            return Err(closing(reject(
                app,
                "length_required",
                StatusCode::LENGTH_REQUIRED,
                "Content-Length required",
            )))
        }
        Some(n) if n > MAX_BODY_BYTES as u64 => {
            return Err(closing(reject(
                app,
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body over 64 KiB",
            )))
        }
        Some(_) => {}
    }
    let bytes = read_limited(body).await.map_err(|status| match status {
        StatusCode::REQUEST_TIMEOUT => reject(app, "timeout", status, "request body too slow"),
        StatusCode::PAYLOAD_TOO_LARGE => {
            reject(app, "too_large", status, "request body over 64 KiB")
        }
        _ => reject(app, "bad_body", status, "unreadable request body"),
    })?;
    app.verifier
        .verify(headers, &bytes)
        .map_err(|r: Rejection| {
            let (status, text) = match r {
                Rejection::BadBody => (StatusCode::BAD_REQUEST, "request body is not UTF-8 text"),
                Rejection::Replay => (StatusCode::UNAUTHORIZED, "request already received"),
                Rejection::ReplayCacheFull => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many requests to remember; try again",
                ),
                _ => (StatusCode::UNAUTHORIZED, "invalid Slack signature"),
            };
            reject(app, r.label(), status, text)
        })?;
    Ok(bytes)
}

/// The workspace and app a signed request says it is for. A signing
/// secret is per app, but an app can be installed in several workspaces
/// (and an org-wide install signs for all of them): only the bot token's
/// workspace, and only the configured app, are served.
fn check_origin(
    app: &AppState,
    team_id: Option<&str>,
    api_app_id: Option<&str>,
) -> Result<(), Box<Response>> {
    let Some(ours) = app.team_id.get() else {
        return Err(Box::new(reject(
            app,
            "workspace_unknown",
            StatusCode::SERVICE_UNAVAILABLE,
            "Tollgate has not yet confirmed its Slack workspace; try again shortly",
        )));
    };
    let team_ok = team_id == Some(ours.as_str());
    let app_ok = app
        .app_id
        .as_deref()
        .is_none_or(|want| api_app_id == Some(want));
    if team_ok && app_ok {
        Ok(())
    } else {
        Err(Box::new(reject(
            app,
            "wrong_team",
            StatusCode::UNAUTHORIZED,
            "request is for another Slack workspace or app",
        )))
    }
}

#[derive(Deserialize)]
struct CommandOrigin {
    team_id: Option<String>,
    api_app_id: Option<String>,
}

async fn commands(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match authenticated_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let origin = serde_urlencoded::from_bytes::<CommandOrigin>(&bytes).ok();
    if let Err(resp) = check_origin(
        &app,
        origin.as_ref().and_then(|o| o.team_id.as_deref()),
        origin.as_ref().and_then(|o| o.api_app_id.as_deref()),
    ) {
        return *resp;
    }
    let cmd: SlashCommand = match serde_urlencoded::from_bytes(&bytes) {
        Ok(c) => c,
        Err(_) => {
            return ephemeral("Tollgate could not read that command. Please try again.".into())
        }
    };
    let service = app.service.clone();
    let response_url = cmd.response_url.clone();
    // The work runs in its own task so a late answer is still finished,
    // recorded and delivered through response_url after Slack stopped
    // waiting for the HTTP answer. The answer never waits out Slack's rate
    // limits (spec 9.9): the moment the work would (a profile or a group
    // not remembered while Slack says Retry-After), or once its Slack calls
    // took `directory::ASK_BUDGET`, it is answered "working on it", and the
    // outcome follows through the response_url.
    let ack = Arc::new(Ack::default());
    let gate = ack.clone();
    let mut work = tokio::spawn(answering(
        gate,
        async move { service.handle_command(cmd).await },
    ));
    let answered = tokio::select! {
        done = &mut work => Some(done),
        _ = ack.deferred() => None,
        _ = tokio::time::sleep(COMMAND_DEADLINE) => None,
    };
    match answered {
        // The modal opened: Slack wants an empty 200, not a message.
        Some(Ok(text)) if text.is_empty() => StatusCode::OK.into_response(),
        Some(Ok(text)) => ephemeral(text),
        Some(Err(e)) => {
            tracing::error!(error = %e, "command handler failed");
            ephemeral(
                "Tollgate hit an internal error handling that command; nothing was requested."
                    .into(),
            )
        }
        None => {
            let service = app.service.clone();
            tokio::spawn(async move {
                // An empty answer means a modal opened: nothing to say.
                match work.await {
                    Ok(text) if !text.is_empty() => {
                        service.follow_up(response_url.as_deref(), text).await
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "command handler failed"),
                }
            });
            ephemeral(WORKING_ON_IT.into())
        }
    }
}

#[derive(Deserialize)]
struct InteractionForm {
    payload: String,
}

/// The fields of an interaction that routing reads.
#[derive(Deserialize)]
pub struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    user: InteractionUser,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    actions: Vec<Action>,
}

#[derive(Deserialize)]
struct InteractionUser {
    id: String,
}

#[derive(Deserialize)]
struct Action {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
    /// Slack's time of the click: the same in each delivery of it.
    #[serde(default)]
    action_ts: Option<String>,
}

/// An interaction body (form field `payload` holding JSON): the raw JSON,
/// which the modal reads, and the routed fields; `None` when malformed.
pub fn decode_interaction(body: &[u8]) -> Option<(Value, Interaction)> {
    let raw = serde_urlencoded::from_bytes::<InteractionForm>(body)
        .ok()
        .and_then(|f| serde_json::from_str::<Value>(&f.payload).ok())?;
    let parsed = serde_json::from_value::<Interaction>(raw.clone()).ok()?;
    Some((raw, parsed))
}

async fn interactions(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match authenticated_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let Some((raw, interaction)) = decode_interaction(&bytes) else {
        return (StatusCode::BAD_REQUEST, "malformed interaction payload").into_response();
    };
    // `team.id` is the workspace the click or submission came from
    // (`user.team_id` for payloads that carry no `team`).
    let team = raw["team"]["id"]
        .as_str()
        .or_else(|| raw["user"]["team_id"].as_str());
    if let Err(resp) = check_origin(&app, team, raw["api_app_id"].as_str()) {
        return *resp;
    }
    match interaction.kind.as_str() {
        "view_submission" => return view_submission(&app, &raw).await,
        "block_actions" => {}
        _ => return StatusCode::OK.into_response(),
    }
    // Every click that changes something is made durable before the 200:
    // Slack never delivers an acknowledged interaction again, so a click
    // answered and then lost with the process would be lost for good.
    let delivery = headers
        .get("x-slack-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = app.service.clock().now();
    let clicks: Vec<RecordedClick> = interaction
        .actions
        .iter()
        .filter_map(|action| {
            let click = Click::from_action_id(&action.action_id)?;
            Some(RecordedClick::new(
                click,
                action.value.as_deref().unwrap_or_default(),
                &interaction.user.id,
                action.action_ts.as_deref(),
                delivery,
                interaction.response_url.as_deref(),
                now,
            ))
        })
        .collect();
    if clicks.is_empty() {
        return StatusCode::OK.into_response();
    }
    if app.service.take_clicks(clicks, CLICK_RECORD_DEADLINE).await {
        StatusCode::OK.into_response()
    } else {
        // Slack shows the clicker that the click failed; they click again.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Tollgate could not record this click; please click again",
        )
            .into_response()
    }
}

/// Slack waits three seconds for the answer to a submission, and only that
/// answer can show errors in the modal; past the deadline the modal closes
/// and the outcome arrives as a message instead.
async fn view_submission(app: &AppState, payload: &Value) -> Response {
    let Some(sub) = modal::parse_submission(payload) else {
        return StatusCode::OK.into_response();
    };
    let service = app.service.clone();
    let url = sub.response_url.clone();
    // Its own task, like a command: once it would wait on Slack, or past
    // the deadline, it still finishes, and whatever it has to say goes
    // through the response_url.
    let ack = Arc::new(Ack::default());
    let mut work = tokio::spawn(answering(ack.clone(), async move {
        service
            .submit_form(&sub.user_id, &sub.form, sub.response_url)
            .await
    }));
    let answered = tokio::select! {
        done = &mut work => Some(done),
        _ = ack.deferred() => None,
        _ = tokio::time::sleep(COMMAND_DEADLINE) => None,
    };
    match answered {
        Some(Ok(Ok(()))) => StatusCode::OK.into_response(),
        Some(Ok(Err(errors))) => Json(modal::errors_response(&errors)).into_response(),
        Some(Err(e)) => {
            tracing::error!(error = %e, "modal submission failed");
            StatusCode::OK.into_response()
        }
        None => {
            let service = app.service.clone();
            tokio::spawn(async move {
                if let Ok(Err(errors)) = work.await {
                    let text = errors
                        .iter()
                        .map(|(field, why)| format!("{}: {why}", field.block_id()))
                        .collect::<Vec<_>>()
                        .join("\n");
                    service
                        .follow_up(url.as_deref(), format!("Nothing was requested.\n{text}"))
                        .await;
                }
            });
            StatusCode::OK.into_response()
        }
    }
}
