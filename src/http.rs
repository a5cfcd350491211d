//! The HTTP server loop for the Slack and metrics listeners. axum's own
//! `serve` has no header or request deadlines; a client that trickles its
//! headers would hold a connection (and a task) before any authentication.
//! Here every connection is HTTP/1.1 (what a load balancer speaks to its
//! targets) with a header deadline, and the handlers bound the body read
//! (see `slack::routes::read_limited`), so a whole request is in within
//! [`REQUEST_TIMEOUT`] or the connection is closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
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
    let permits = Arc::new(Semaphore::new(limits.max_connections));
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
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
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let inflight = limits.counted.then(|| limits.metrics.http_inflight.clone());
        if let Some(g) = &inflight {
            g.inc();
        }
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            if let Some(g) = inflight {
                g.dec();
            }
            drop(permit);
        });
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
