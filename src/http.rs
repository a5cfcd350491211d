//! The HTTP server loop for the Slack and metrics listeners. axum's own
//! `serve` has no header or request deadlines; a client that trickles its
//! headers would hold a connection (and a task) before any authentication.
//! Here every connection is HTTP/1.1 (what a load balancer speaks to its
//! targets) with a header deadline, and the handlers bound the body read
//! (see `slack::routes::read_limited`), so a whole request is in within
//! [`REQUEST_TIMEOUT`] or the connection is closed.
//!
//! At `max_connections`, a new connection displaces the one that has waited
//! longest for its client: a request head or body that stopped arriving, or
//! a keep-alive connection idle between requests. A client that sends what
//! it means to send is done in milliseconds; only a flood opening
//! `max_connections` new connections within those milliseconds makes it the
//! longest waiting (a connection still receiving its body, or writing its
//! answer, counts as waiting). Only when every connection is working on a
//! complete request is the new one answered 503.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// A connection that has not sent a complete request head within this is
/// closed. It also closes a keep-alive connection idle for this long, so a
/// load balancer in front must time idle connections out sooner (the
/// shipped Ingress sets the ALB's idle timeout below it).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Headers and body together arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests under way.
const DRAIN: Duration = Duration::from_secs(10);
/// The request line and headers together (spec 9.9); longer is answered
/// 431 by hyper before any handler runs.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// 503s being written at once to connections over the limit; more are
/// closed without one.
const MAX_REFUSALS: usize = 64;
/// Time given to the 503 written to a connection over the limit.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 42\r\nconnection: close\r\nretry-after: 1\r\n\r\nToo many connections to Tollgate; retry.\r\n";

/// What one listener may hold: at most `max_connections` connections, each
/// with at most [`MAX_HEADER_BYTES`] of request head and (the handlers'
/// rule) 64 KiB of body, so a flood bounds memory at about
/// `max_connections` × 80 KiB whatever it sends. `inflight` shows the
/// connections held.
pub struct Limits {
    pub max_connections: usize,
    pub metrics: Arc<Metrics>,
    /// Whether this listener's connections are `tollgate_http_inflight`.
    pub counted: bool,
}

pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let held = Arc::new(Mutex::new(Held::default()));
    let epoch = Instant::now();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of file descriptors and the like: wait, never spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let now = epoch.elapsed();
        let (admitted, displacing) = {
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            let mut displacing = None;
            if held.conns.len() >= limits.max_connections {
                displacing = displaced(held.waiting()).and_then(|id| held.conns.remove(&id));
            }
            let room = held.conns.len() < limits.max_connections;
            (room.then(|| held.admit(now)), displacing)
        };
        // Aborted outside the lock: the task's own clean-up takes it.
        if let Some(old) = displacing {
            limits.metrics.rejected("stalled");
            if let Some(task) = old.task {
                task.abort();
            }
        }
        let Some((id, state)) = admitted else {
            limits.metrics.rejected("too_many_connections");
            // A client that never reads could hold each refusal for its
            // write deadline; past a few at once the socket is just closed.
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let service = TowerToHyperService::new(marking(app.clone(), state, epoch));
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let inflight = limits.counted.then(|| limits.metrics.http_inflight.clone());
        if let Some(g) = &inflight {
            g.inc();
        }
        // Removed from `held` however the task ends: done, or aborted to
        // make room (then `held` has dropped it already).
        let leaving = Leaving {
            held: held.clone(),
            id,
            inflight,
        };
        let task = tokio::spawn(async move {
            let _leaving = leaving;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
        });
        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = held.conns.get_mut(&id) {
            c.task = Some(task.abort_handle());
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open at shutdown were cut off");
    }
    Ok(())
}

/// Over the connection limit: a 503 at once, without reading the request,
/// then the connection is closed.
async fn refuse(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        tcp.write_all(OVER_CAPACITY).await?;
        tcp.shutdown().await
    })
    .await;
}

/// What one connection shows the accept loop.
struct ConnState {
    /// Working on a request whose body has fully arrived (never displaced).
    busy: AtomicBool,
    /// Since when (ms after the listener's start) it has waited for its
    /// client: accepted, or its last response finished.
    waiting_since_ms: AtomicU64,
}

struct HeldConn {
    state: Arc<ConnState>,
    /// Set right after the task is spawned, before the next accept.
    task: Option<tokio::task::AbortHandle>,
}

/// The listener's connections, in the order they were accepted.
#[derive(Default)]
struct Held {
    next: u64,
    conns: BTreeMap<u64, HeldConn>,
}

impl Held {
    fn admit(&mut self, now: Duration) -> (u64, Arc<ConnState>) {
        let id = self.next;
        self.next += 1;
        let state = Arc::new(ConnState {
            busy: AtomicBool::new(false),
            waiting_since_ms: AtomicU64::new(now.as_millis() as u64),
        });
        self.conns.insert(
            id,
            HeldConn {
                state: state.clone(),
                task: None,
            },
        );
        (id, state)
    }

    /// (id, busy, waiting since) of every connection.
    fn waiting(&self) -> impl Iterator<Item = (u64, bool, Duration)> + '_ {
        self.conns.iter().map(|(id, c)| {
            (
                *id,
                c.state.busy.load(Ordering::Relaxed),
                Duration::from_millis(c.state.waiting_since_ms.load(Ordering::Relaxed)),
            )
        })
    }
}

/// The connection a new one displaces at the limit: of those waiting on
/// their client, the one waiting longest.
fn displaced(conns: impl Iterator<Item = (u64, bool, Duration)>) -> Option<u64> {
    conns
        .filter(|(_, busy, _)| !busy)
        .min_by_key(|(id, _, since)| (*since, *id))
        .map(|(id, _, _)| id)
}

struct Leaving {
    held: Arc<Mutex<Held>>,
    id: u64,
    inflight: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.conns.remove(&self.id);
        if let Some(g) = &self.inflight {
            g.dec();
        }
    }
}

/// The router, with each request marking its connection busy from the
/// moment its body has fully arrived until its response is handed over.
fn marking(
    app: Router,
    state: Arc<ConnState>,
    epoch: Instant,
) -> impl tower::Service<
    axum::http::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |req: axum::http::Request<Incoming>| {
        let (app, state) = (app.clone(), state.clone());
        async move {
            use tower::ServiceExt;
            let (parts, body) = req.into_parts();
            if hyper::body::Body::is_end_stream(&body) {
                state.busy.store(true, Ordering::Relaxed);
            }
            let body = Body::new(Marked {
                inner: body,
                state: state.clone(),
            });
            let response = app
                .oneshot(axum::http::Request::from_parts(parts, body))
                .await;
            state
                .waiting_since_ms
                .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            state.busy.store(false, Ordering::Relaxed);
            response
        }
    })
}

/// A request body that marks its connection busy once it has all arrived.
struct Marked {
    inner: Incoming,
    state: Arc<ConnState>,
}

impl hyper::body::Body for Marked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.state.busy.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_new_connection_displaces_the_longest_waiting_never_a_busy_one() {
        // Busy: working on a complete request, never displaced.
        assert_eq!(
            displaced([(1, true, s(0)), (2, true, s(9_500))].into_iter()),
            None
        );
        // Of those waiting, the one waiting longest, whatever its id (an
        // old keep-alive connection idle since its last answer is younger).
        assert_eq!(
            displaced(
                [
                    (1, true, s(0)),
                    (2, false, s(8_000)),
                    (3, false, s(5_000)),
                    (4, false, s(9_900))
                ]
                .into_iter()
            ),
            Some(3)
        );
        assert_eq!(displaced(std::iter::empty()), None);
    }
}
