//! The daemon side of the admin socket.

use std::{
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::Path,
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
};

use super::{MAX_LINE, Reply, Request};
use crate::daemon::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another agentwall daemon answers on {0}; stop it first")]
    InUse(String),
    #[error("admin socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unknown group {0:?} (config socket_group or enrollment.group)")]
    UnknownGroup(String),
    #[error("unknown user {0:?} (config enrollment.owner)")]
    UnknownUser(String),
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub gid: Option<u32>,
}

fn group_id(group: Option<&str>) -> Result<Option<u32>, ServerError> {
    group
        .map(|g| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid.as_raw())
                .ok_or_else(|| ServerError::UnknownGroup(g.into()))
        })
        .transpose()
}

fn user_id(user: Option<&str>) -> Result<Option<u32>, ServerError> {
    user.map(|u| {
        nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .map(|us| us.uid.as_raw())
            .ok_or_else(|| ServerError::UnknownUser(u.into()))
    })
    .transpose()
}

/// Binds a Unix stream socket created with no access for anyone but its owner, then given
/// `owner`, `group` and `mode`. A stale socket file of a dead daemon is replaced; a live one
/// is not.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    owner: Option<&str>,
    group: Option<&str>,
) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    };
    let (uid, gid) = (user_id(owner)?, group_id(group)?);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        fs::remove_file(path).map_err(err)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(path, uid.map(Into::into), gid.map(Into::into))
            .map_err(|e| err(e.into()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Binds the admin socket: 0600, or 0660 for a configured group.
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, Access), ServerError> {
    let gid = group_id(group)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let listener = bind_unix(path, mode, None, group)?;
    Ok((listener, Access { gid }))
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: UnixListener, access: Access, daemon: Arc<Daemon>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                daemon.count_error("admin_accept");
                continue;
            }
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, access, daemon).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Supplementary groups of the peer at connect time (SO_PEERGROUPS, Linux 4.13).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / size_of::<u32>());
    groups
}

fn allowed(stream: &UnixStream, access: Access) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    if cred.uid() == 0 {
        return Ok(0);
    }
    if let Some(gid) = access.gid
        && (cred.gid() == gid || peer_groups(stream).contains(&gid))
    {
        return Ok(cred.uid());
    }
    Err(format!(
        "uid {} may not use the admin socket (root or the configured admin group only)",
        cred.uid()
    ))
}

async fn write(w: &mut OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn connection(stream: UnixStream, access: Access, daemon: Arc<Daemon>) -> io::Result<()> {
    let who = allowed(&stream, access);
    let (r, mut w) = stream.into_split();
    let uid = match who {
        Ok(uid) => uid,
        Err(message) => {
            tracing::warn!(%message, "admin socket: peer refused");
            daemon.count_error("admin_refused");
            return write(&mut w, &Reply::Error { message }).await;
        }
    };
    let mut reader = BufReader::new(r).take(MAX_LINE as u64 + 1);
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(());
    }
    if line.len() > MAX_LINE {
        return write(
            &mut w,
            &Reply::Error {
                message: format!("request longer than {MAX_LINE} bytes"),
            },
        )
        .await;
    }
    let req: Request = match serde_json::from_str(line.trim_end()) {
        Ok(r) => r,
        Err(e) => {
            let message = format!(
                "bad request: {e}; send one JSON object per line, such as {{\"op\":\"status\"}}"
            );
            return write(&mut w, &Reply::Error { message }).await;
        }
    };
    tracing::debug!(?req, uid, "admin request");
    let reader = reader.into_inner();
    match req {
        Request::Status => write(&mut w, &daemon.status().await).await,
        Request::Reload => write(&mut w, &daemon.reload().await).await,
        Request::Quarantine { cgroup, lift } => {
            write(&mut w, &daemon.quarantine(&cgroup, lift).await).await
        }
        Request::ExecBegin { policy, audience } => {
            let (reply, lease) = daemon.exec_begin(policy.as_deref(), audience).await;
            write(&mut w, &reply).await?;
            if let Some(lease) = lease {
                // The lease lasts until the client closes the connection (or sends anything).
                let mut rest = String::new();
                let mut reader = reader;
                let _ = reader.read_line(&mut rest).await;
                daemon.exec_end(lease).await;
            }
            Ok(())
        }
        Request::Revoke { target, reason } => {
            write(&mut w, &daemon.revoke(&target, &reason, uid).await).await
        }
        Request::Revocations => write(&mut w, &daemon.revocations()).await,
        Request::Check { pem } => write(&mut w, &daemon.check(&pem)).await,
        Request::Rotate => write(&mut w, &daemon.rotate().await).await,
        Request::Jwks => write(&mut w, &daemon.jwks()).await,
        Request::RotateAuditKey => write(&mut w, &daemon.rotate_audit_key().await).await,
        Request::CheckToken { token, audience } => {
            write(&mut w, &daemon.check_token(&token, &audience)).await
        }
        Request::Events => {
            let mut rx = daemon.subscribe();
            // Acknowledged once subscribed, so a client can act knowing it will see the verdicts.
            write(
                &mut w,
                &Reply::Done {
                    message: "subscribed".into(),
                },
            )
            .await?;
            loop {
                let reply = match rx.recv().await {
                    Ok(e) => Reply::Event(Box::new((*e).clone())),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        Reply::Lagged { missed }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                };
                write(&mut w, &reply).await?;
            }
        }
    }
}
