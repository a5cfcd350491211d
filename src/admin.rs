//! The local admin socket: how `tollgate grants …` and `tollgate audit
//! export` reach a running server, whose sled store no other process may
//! open. A Unix socket in the store directory, readable and writable by its
//! owner only: file permissions are the authentication.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::domain::audit::AuditEvent;
use crate::domain::request::Request;
use crate::domain::standing::GrantRecord;
use crate::service::Service;
use crate::store::prune::PrunePlan;

pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join("admin.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    ListGrants,
    Revoke {
        id: String,
        reason: Option<String>,
        os_user: String,
    },
    AuditExport {
        #[serde(with = "time::serde::rfc3339::option")]
        since: Option<time::OffsetDateTime>,
    },
    /// What `store prune` would remove; nothing is removed yet.
    PrunePlan {
        #[serde(with = "time::serde::rfc3339")]
        before: time::OffsetDateTime,
    },
    /// Removes what a plan selected, once the CLI has written its audit out.
    PruneApply {
        #[serde(with = "time::serde::rfc3339")]
        before: time::OffsetDateTime,
        plan: PrunePlan,
    },
    /// `tollgate discover`: the requests behind Tollgate's marks.
    StandingRecords {
        ids: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Grants { grants: Vec<Request> },
    Done { message: String },
    Audit { events: Vec<AuditEvent> },
    PrunePlan { plan: PrunePlan },
    Records { records: Vec<GrantRecord> },
    Error { message: String },
}

pub async fn handle(service: &Arc<Service>, request: AdminRequest) -> AdminResponse {
    let result = match request {
        AdminRequest::ListGrants => service
            .live_requests()
            .await
            .map(|grants| AdminResponse::Grants { grants }),
        AdminRequest::Revoke {
            id,
            reason,
            os_user,
        } => service
            .admin_revoke(&id, reason.as_deref(), &os_user)
            .await
            .map(|message| AdminResponse::Done { message }),
        AdminRequest::AuditExport { since } => service
            .audit_since(since)
            .await
            .map(|events| AdminResponse::Audit { events }),
        AdminRequest::PrunePlan { before } => service
            .prune_plan(before)
            .await
            .map(|plan| AdminResponse::PrunePlan { plan }),
        AdminRequest::PruneApply { before, plan } => service
            .prune_apply(&plan, before)
            .await
            .map(|message| AdminResponse::Done { message }),
        AdminRequest::StandingRecords { ids } => service
            .standing_records(&ids)
            .await
            .map(|records| AdminResponse::Records { records }),
    };
    result.unwrap_or_else(|message| AdminResponse::Error { message })
}

/// Serves one JSON request line → one JSON response line per connection.
pub async fn serve(
    service: Arc<Service>,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // A socket left by a killed server would refuse the bind.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(service, stream).await {
                        tracing::warn!(error = %e, "admin connection failed");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn connection(service: Arc<Service>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(request) => handle(&service, request).await,
        Err(e) => AdminResponse::Error {
            message: format!("bad admin request: {e}"),
        },
    };
    let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// The CLI side: `Ok(None)` when no server listens (the caller then opens
/// the store itself).
pub async fn call(path: &Path, request: &AdminRequest) -> std::io::Result<Option<AdminResponse>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(std::io::Error::other)
}
