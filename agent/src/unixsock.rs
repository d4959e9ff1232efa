//! Unix stream sockets the daemon listens on (the admin and the enrollment socket): made
//! with no access for anyone but root, then given their owner, group and mode.

use std::{fs, io, os::unix::fs::PermissionsExt as _, path::Path};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another agentwall daemon answers on {0}; stop it first")]
    InUse(String),
    #[error("socket {path}: {source}")]
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

/// The gid of `group`, which must exist.
pub fn group_id(group: Option<&str>) -> Result<Option<u32>, ListenError> {
    group
        .map(|g| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid.as_raw())
                .ok_or_else(|| ListenError::UnknownGroup(g.into()))
        })
        .transpose()
}

/// The uid of `user`, which must exist.
pub fn user_id(user: Option<&str>) -> Result<Option<u32>, ListenError> {
    user.map(|u| {
        nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .map(|us| us.uid.as_raw())
            .ok_or_else(|| ListenError::UnknownUser(u.into()))
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
) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError::Io {
        path: path.display().to_string(),
        source,
    };
    let (uid, gid) = (user_id(owner)?, group_id(group)?);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
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
