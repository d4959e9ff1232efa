//! State the daemon keeps on disk between runs: which identity slot each policy name holds.
//! The kernel's bindings refer to slots, and they outlive the daemon in pinned maps, so a
//! restarted daemon must give every policy the slot it had.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt ({source}); move it away to start with fresh slots, and restart enforced commands"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no identity slot is left (u32 exhausted)")]
    Exhausted,
    #[error("{what} {path}: {why}")]
    NotPrivate {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Refuses a directory the daemon keeps its things in (state, pins) unless it is a real
/// directory of the daemon's own user that no one else can write: another user who owns it,
/// or may write it, could put files, links or pinned objects there for the daemon to trust.
/// (A world-writable parent such as a 1777 bpffs is fine once this directory is the daemon's:
/// the sticky bit keeps others from renaming or removing it.)
pub fn check_private_dir(path: &Path, what: &'static str) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt as _;
    let refuse = |why: String| StateError::NotPrivate {
        what,
        path: path.to_path_buf(),
        why,
    };
    let md = fs::symlink_metadata(path).map_err(|source| StateError::Io {
        op: "inspecting",
        path: path.to_path_buf(),
        source,
    })?;
    if md.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link; point the configuration at the real directory".into(),
        ));
    }
    if !md.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(refuse(format!(
            "is owned by uid {}, not by the daemon's user (uid {me}): another user could plant what the daemon reads there; remove it (or `chown {me} {}` if it is yours) and start again",
            md.uid(),
            path.display()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "is writable by its group or by others (mode {:04o}): run `chmod go-w {}`",
            md.mode() & 0o7777,
            path.display()
        )));
    }
    Ok(())
}

/// Policy name → slot. Slot 0 is never handed out: it has no rules (the probe uses it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotTable {
    next: u32,
    slots: BTreeMap<String, u32>,
}

impl SlotTable {
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Io {
                op: "reading",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the table atomically (temporary file, fsync, rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |op, source| StateError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io("encoding", e.into()))?;
        write_atomic(path, &bytes, 0o600).map_err(|e| io("writing", e))
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.slots.get(name).copied()
    }

    /// The slot of `name`, assigning a new one if it has none.
    pub fn assign(&mut self, name: &str) -> Result<u32, StateError> {
        if let Some(s) = self.slots.get(name) {
            return Ok(*s);
        }
        let s = self.next.max(1);
        self.next = s.checked_add(1).ok_or(StateError::Exhausted)?;
        self.slots.insert(name.to_string(), s);
        Ok(s)
    }

    pub fn name_of(&self, slot: u32) -> Option<&str> {
        self.slots
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(n, _)| n.as_str())
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the new, never a
/// mix: a temporary file created with `mode`, synced, renamed over `path`, and the directory
/// synced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_owned(path, bytes, mode, None)
}

/// [`write_atomic`], the new file owned by `owner` (uid, gid). Ownership is set through the
/// open descriptor before the rename, never by path: in a directory its user controls, a path
/// could be swapped for a symbolic link to another file between the rename and a chown.
pub(crate) fn write_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_others_own_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("aw-private-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        check_private_dir(&dir, "state directory").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_private_dir(&dir, "state directory")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by its group or by others (mode 1777)"),
            "{e}"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = check_private_dir(&dir, "state directory")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is owned by uid 65534"), "{e}");
        let link = dir.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = check_private_dir(&link, "pin directory")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        fs::remove_file(link).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn slots_are_stable_and_never_zero() {
        let mut t = SlotTable::default();
        assert_eq!(t.assign("a").unwrap(), 1);
        assert_eq!(t.assign("b").unwrap(), 2);
        assert_eq!(t.assign("a").unwrap(), 1);
        assert_eq!(t.name_of(2), Some("b"));
        let dir = std::env::temp_dir().join(format!("aw-slots-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("slots.json");
        t.save(&p).unwrap();
        let mut back = SlotTable::load(&p).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.assign("c").unwrap(), 3);
        fs::write(&p, b"{not json").unwrap();
        assert!(
            SlotTable::load(&p)
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
