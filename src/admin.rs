//! The local admin socket: how `tollgate grants …` and `tollgate audit
//! export` reach a running server, whose sled store no other process may
//! open. A Unix socket in a directory of its own inside the store
//! directory; the directory is created owner-only (0700) before the socket
//! is bound in it, so there is no moment at which anyone else can connect:
//! file permissions are the authentication. Who ran a command is read from
//! the connection's peer credentials (SO_PEERCRED), never from what the
//! client says.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::domain::audit::AuditEvent;
use crate::domain::request::Request;
use crate::domain::standing::GrantRecord;
use crate::service::Service;
use crate::store::prune::PrunePlan;

/// A request line longer than this is refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join("admin").join("admin.sock")
}

/// The name of the user with id `uid` (the passwd database, NSS
/// included), or `uid <n>` when it has none.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes only into `pwd` and `buf` (whose length is
    // passed) and sets `found` to `&pwd` or null; `pw_name` points into
    // `buf`, which outlives its use below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: a non-null pw_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_string_lossy().into_owned()
}

/// The operating-system user this process runs as (its effective uid), for
/// admin commands run directly on the store.
pub fn current_user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    user_name(unsafe { libc::geteuid() })
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The CLI speaks only to a socket this user owns, in a directory this
/// user owns that nobody else may enter (the server makes both so).
fn trusted_socket(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let me = euid();
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing the admin socket {}: {why}; run the command as the server's user",
                path.display()
            ),
        ))
    };
    if !meta.file_type().is_socket() {
        return refuse("it is not a socket".into());
    }
    if meta.uid() != me {
        return refuse(format!(
            "it belongs to {}, not to you ({})",
            user_name(meta.uid()),
            user_name(me)
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_meta = std::fs::symlink_metadata(dir)?;
    if !dir_meta.is_dir() || dir_meta.uid() != me || dir_meta.mode() & 0o077 != 0 {
        return refuse(format!(
            "its directory {} is not yours alone (mode {:o})",
            dir.display(),
            dir_meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates `dir` owner-only, or makes an existing one owner-only, and
/// refuses one owned by someone else.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "{} is not a directory owned by this user",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Every request not yet ended: grants in force and those still pending
    /// or approved (`tollgate grants list`). Older clients say `list_grants`.
    #[serde(alias = "list_grants")]
    ListLive,
    /// Who asks is not part of the request: the server reads it from the
    /// connection (an `os_user` field an older client sends is ignored).
    Revoke { id: String, reason: Option<String> },
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
    StandingRecords { ids: Vec<String> },
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

/// Runs `request` for the operating-system user `os_user`.
pub async fn handle(service: &Arc<Service>, request: AdminRequest, os_user: &str) -> AdminResponse {
    let result = match request {
        AdminRequest::ListLive => service
            .live_requests()
            .await
            .map(|grants| AdminResponse::Grants { grants }),
        AdminRequest::Revoke { id, reason } => service
            .admin_revoke(&id, reason.as_deref(), os_user)
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
    result.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}

/// Serves one JSON request line → one JSON response line per connection.
pub async fn serve(
    service: Arc<Service>,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    // A socket left by a killed server would refuse the bind.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // The directory already keeps others out; the socket says so too.
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
    let os_user = user_name(stream.peer_cred()?.uid());
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    // One byte over the limit tells a long line from one exactly at it.
    BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    let response = if line.len() > MAX_REQUEST_BYTES {
        tracing::warn!(os_user = %os_user, "admin request over 64 KiB refused");
        AdminResponse::Error {
            message: format!(
                "admin request over {} KiB refused",
                MAX_REQUEST_BYTES / 1024
            ),
        }
    } else {
        match serde_json::from_slice::<AdminRequest>(&line) {
            Ok(request) => handle(&service, request, &os_user).await,
            Err(e) => AdminResponse::Error {
                message: format!("bad admin request: {e}"),
            },
        }
    };
    // An audit export answers with the whole log in one line: encoded on
    // a blocking thread, so the runtime's workers go on driving revokes
    // meanwhile (issue 29).
    let text = tokio::task::spawn_blocking(move || {
        serde_json::to_string(&response).map(|mut text| {
            text.push('\n');
            text
        })
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)?;
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// The CLI side: `Ok(None)` when no server listens (the caller then opens
/// the store itself).
///
/// The answer of whoever listens on the socket is believed (a grant
/// "revoked", an audit log), so the socket must be this user's own, in a
/// directory only this user can enter, and the process behind it must run
/// as this user too: anything else is refused, not spoken to.
pub async fn call(path: &Path, request: &AdminRequest) -> std::io::Result<Option<AdminResponse>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(meta) => trusted_socket(path, &meta)?,
    }
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
    let server = stream.peer_cred()?.uid();
    if server != euid() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing the admin socket {}: the process behind it runs as {}, not as you ({})",
                path.display(),
                user_name(server),
                user_name(euid())
            ),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AdminRequest {
        AdminRequest::ListLive
    }

    /// A socket as the server leaves it: its directory made private, the
    /// socket bound in it (no listener behind it afterwards).
    fn planted(dir: &Path) -> PathBuf {
        private_dir(dir).unwrap();
        let path = dir.join("admin.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        path
    }

    #[tokio::test]
    async fn the_cli_refuses_a_socket_it_cannot_trust() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("admin");
        let path = planted(&dir);
        // Ours, private, nobody listening: the CLI opens the store itself.
        assert!(call(&path, &request()).await.unwrap().is_none());

        // A directory others may enter: someone else could have put it there.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = call(&path, &request()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("not yours alone"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        // Not a socket at all.
        let file = dir.join("file.sock");
        std::fs::write(&file, b"").unwrap();
        let e = call(&file, &request()).await.unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");

        // Another user's socket (only root can make one to test with).
        if euid() == 0 {
            std::os::unix::fs::lchown(&path, Some(4242), None).unwrap();
            let e = call(&path, &request()).await.unwrap_err();
            assert!(e.to_string().contains("belongs to"), "{e}");
        }
    }
}
