//! The HTTP server loop for the Slack and metrics listeners. axum's own
//! `serve` has no header or request deadlines; a client that trickles its
//! headers would hold a connection (and a task) before any authentication.
//! Here every connection is HTTP/1.1 (what a load balancer speaks to its
//! targets) with a header deadline, and the handlers bound the body read
//! (see `slack::routes::read_limited`), so a whole request is in within
//! [`REQUEST_TIMEOUT`] or the connection is closed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// A connection that has not sent a complete request head within this is
/// closed. It also closes a keep-alive connection idle for this long, so a
/// load balancer in front must time idle connections out sooner (the
/// shipped Ingress sets the ALB's idle timeout below it).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Headers and body together arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests under way.
const DRAIN: Duration = Duration::from_secs(10);

pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
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
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
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
