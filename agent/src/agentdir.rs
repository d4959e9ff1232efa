//! The directory of an agent launched with `agentwall exec --cert`: its certificate, key,
//! bundle and token, which the launcher writes first and the daemon replaces on renewal.
//!
//! The agent reads these files; it must not be able to make the daemon write, chown or chmod
//! anything else. Two layers see to that:
//! - the directory is root's and not writable by anyone else, so an unprivileged agent cannot
//!   put a link or a file of its own in it;
//! - every write goes through a descriptor of the directory opened with `O_NOFOLLOW`; the new
//!   file is created `O_EXCL|O_NOFOLLOW`, given its owner and mode through its own descriptor,
//!   and only then renamed into place. Nothing is ever done by path inside the directory, so
//!   even an agent that could write it (root inside the agent) cannot redirect a write.
//!
//! Files are owned by the user the agent runs as (the key and token mode 0600), so that the
//! agent can read them and other users cannot.

use std::{
    io::Write as _,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, openat, renameat},
    sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat},
    unistd::{Gid, Uid, UnlinkatFlags, fchown, fsync, unlinkat},
};

/// Names of the files in an agent's directory.
pub mod files {
    pub const CERT: &str = "svid.pem";
    pub const KEY: &str = "svid.key";
    pub const BUNDLE: &str = "bundle.pem";
    pub const TOKEN: &str = "token.jwt";
}

/// Mode of an agent's directory: root's, readable and searchable by the agent.
const DIR_MODE: u32 = 0o755;
/// Mode of the directory that holds the agents' directories: searchable, not listable.
const BASE_MODE: u32 = 0o711;

#[derive(Debug, thiserror::Error)]
pub enum AgentDirError {
    #[error("{op} {path}: {errno}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error(
        "{path} is not a regular file (a link or something else took its place); the agent's files are not replaced"
    )]
    NotAFile { path: PathBuf },
    #[error("{path} is not a directory of its own (a link or something else took its place)")]
    NotADirectory { path: PathBuf },
}

/// An agent's directory, held open.
#[derive(Debug)]
pub struct AgentDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Opens `path` as a directory (the operator's configured base: its own path is trusted).
fn open_base(path: &Path) -> Result<OwnedFd, AgentDirError> {
    nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| AgentDirError::Sys {
        op: "opening",
        path: path.to_path_buf(),
        errno,
    })
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

impl AgentDir {
    /// Creates the directory `base/name` for a new agent (the base too if missing), root's
    /// and not writable by anyone else.
    pub fn create(base: &Path, name: &str) -> Result<Self, AgentDirError> {
        let path = base.join(name);
        let sys = |op, path: &Path| {
            let path = path.to_path_buf();
            move |errno| AgentDirError::Sys { op, path, errno }
        };
        std::fs::create_dir_all(base).map_err(|e| AgentDirError::Sys {
            op: "creating",
            path: base.to_path_buf(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        let base_fd = open_base(base)?;
        // Agents of other users pass through (but cannot list) the base to reach their own.
        fchmod(&base_fd, Mode::from_bits_truncate(BASE_MODE)).map_err(sys("chmod", base))?;
        mkdirat(&base_fd, name, Mode::from_bits_truncate(0o700)).map_err(sys("creating", &path))?;
        let dir = Self::open_in(&base_fd, name, path)?;
        // Set by descriptor: the umask does not narrow it, and nothing else is touched.
        fchmod(&dir.fd, Mode::from_bits_truncate(DIR_MODE)).map_err(sys("chmod", &dir.path))?;
        Ok(dir)
    }

    /// Opens an existing agent directory. One that an agent can write (left by an earlier
    /// version, which gave agents their directory) is taken back: the daemon's, mode 0755.
    pub fn open(path: &Path) -> Result<Self, AgentDirError> {
        let not_dir = || AgentDirError::NotADirectory {
            path: path.to_path_buf(),
        };
        let (base, name) = match (path.parent(), path.file_name()) {
            (Some(b), Some(n)) => (b, n),
            _ => return Err(not_dir()),
        };
        let dir = Self::open_in(&open_base(base)?, name, path.to_path_buf())?;
        let st = fstat(&dir.fd).map_err(|errno| AgentDirError::Sys {
            op: "inspecting",
            path: dir.path.clone(),
            errno,
        })?;
        let me = nix::unistd::geteuid();
        if st.st_uid != me.as_raw() || st.st_mode & 0o022 != 0 {
            fchown(&dir.fd, Some(me), Some(nix::unistd::getegid()))
                .and_then(|()| fchmod(&dir.fd, Mode::from_bits_truncate(DIR_MODE)))
                .map_err(|errno| AgentDirError::Sys {
                    op: "taking back",
                    path: dir.path.clone(),
                    errno,
                })?;
        }
        Ok(dir)
    }

    fn open_in(
        base: &OwnedFd,
        name: &(impl nix::NixPath + ?Sized),
        path: PathBuf,
    ) -> Result<Self, AgentDirError> {
        match openat(
            base,
            name,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Self { fd, path }),
            Err(Errno::ELOOP | Errno::ENOTDIR) => Err(AgentDirError::NotADirectory { path }),
            Err(errno) => Err(AgentDirError::Sys {
                op: "opening",
                path,
                errno,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Owner (uid, gid) of the regular file `name`, without following a link.
    pub fn owner_of(&self, name: &str) -> Result<(u32, u32), AgentDirError> {
        let path = self.path.join(name);
        let st =
            fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|errno| {
                AgentDirError::Sys {
                    op: "inspecting",
                    path: path.clone(),
                    errno,
                }
            })?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(AgentDirError::NotAFile { path });
        }
        Ok((st.st_uid, st.st_gid))
    }

    /// Replaces `name` atomically with `bytes`, owned by `owner` with `mode`: a new file,
    /// created exclusively without following links, given owner and mode through its
    /// descriptor, synced, renamed over `name`, and the directory synced.
    pub fn write(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: (u32, u32),
    ) -> Result<(), AgentDirError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let sys = |op, errno| AgentDirError::Sys {
            op,
            path: self.path.join(name),
            errno,
        };
        let fd = openat(
            &self.fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| sys("creating a temporary file for", e))?;
        let filled = (|| {
            // The mode first, while the daemon owns the file: after the chown only
            // CAP_FOWNER could change it, which the systemd unit does not grant.
            fchmod(&fd, Mode::from_bits_truncate(mode))?;
            fchown(
                &fd,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )?;
            let mut f = std::fs::File::from(fd);
            f.write_all(bytes)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
            fsync(f.as_fd())?;
            renameat(&self.fd, tmp.as_str(), &self.fd, name)
        })();
        if let Err(e) = filled {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(sys("writing", e));
        }
        let _ = fsync(&self.fd);
        Ok(())
    }

    /// Removes the file `name`, if it is there (by the directory's descriptor, never
    /// following a link).
    pub fn remove(&self, name: &str) -> Result<(), AgentDirError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(AgentDirError::Sys {
                op: "removing",
                path: self.path.join(name),
                errno,
            }),
        }
    }

    /// Replaces the agent's key and certificate (each atomically, key first), owned by
    /// `owner`.
    pub fn write_svid(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
        owner: (u32, u32),
    ) -> Result<(), AgentDirError> {
        self.write(files::KEY, key_pem, 0o600, owner)?;
        self.write(files::CERT, cert_pem, 0o644, owner)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("aw-agentdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Scratch(d)
    }

    #[test]
    fn files_replace_links_instead_of_following_them() {
        let s = scratch("links");
        let dir = AgentDir::create(&s.0, "7").unwrap();
        let victim = s.0.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // Links where the key, its temporary name and the certificate go.
        std::os::unix::fs::symlink(&victim, dir.path().join(files::KEY)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(files::CERT)).unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        dir.write_svid(b"cert", b"key", me).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let key = dir.path().join(files::KEY);
        let md = std::fs::symlink_metadata(&key).unwrap();
        assert!(md.is_file(), "the link was replaced by a file");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"key");
        assert_eq!(dir.owner_of(files::KEY).unwrap(), me);
        // A link is never taken for the agent's file when its owner is read.
        std::os::unix::fs::symlink(&victim, dir.path().join(files::TOKEN)).unwrap();
        assert!(matches!(
            dir.owner_of(files::TOKEN),
            Err(AgentDirError::NotAFile { .. })
        ));
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn the_directory_is_not_writable_by_others_and_a_link_to_it_is_refused() {
        let s = scratch("dir");
        let dir = AgentDir::create(&s.0, "8").unwrap();
        let md = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, DIR_MODE);
        assert_eq!(
            std::fs::metadata(&s.0).unwrap().permissions().mode() & 0o777,
            BASE_MODE
        );
        // A directory an agent was given is taken back when opened.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let again = AgentDir::open(dir.path()).unwrap();
        let md = std::fs::metadata(again.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, DIR_MODE);
        assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
        // A link in place of the directory is not followed.
        std::os::unix::fs::symlink(dir.path(), s.0.join("9")).unwrap();
        assert!(matches!(
            AgentDir::open(&s.0.join("9")),
            Err(AgentDirError::NotADirectory { .. })
        ));
    }
}
