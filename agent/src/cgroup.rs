//! cgroup v2 file system access: finding the mount, creating and removing cgroups, ids.

use std::{
    fs,
    io::{self, BufRead as _},
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
};

use nix::{fcntl::OFlag, sys::stat::Mode};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 file system is mounted (looked in /proc/self/mountinfo); agentwall needs cgroup v2"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("cgroup path {0:?} must be relative to the cgroup v2 mount, without `..`")]
    BadPath(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to use the root cgroup {0}: every process of the host lives there")]
    RootCgroup(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup v2 mount point, read from /proc/self/mountinfo (never assumed: it is
/// /sys/fs/cgroup on unified hosts and /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let f = fs::File::open("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    for line in io::BufReader::new(f).lines() {
        let line = line.map_err(CgroupError::MountInfo)?;
        // Fields: id parent major:minor root mount-point options... - fstype source super-options
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = pre.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(unescape_mountinfo(mount)));
        }
    }
    Err(CgroupError::NoCgroup2)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup directory under the v2 mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `rel` below `mount`. `rel` must be relative and free of `..`.
    pub fn under(mount: &Path, rel: &str) -> Result<Self, CgroupError> {
        let rel_path = Path::new(rel.trim_start_matches('/'));
        if rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(CgroupError::BadPath(rel.to_string()));
        }
        Ok(Self {
            path: mount.join(rel_path),
        })
    }

    /// A cgroup given by its absolute directory path.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn child(&self, name: &str) -> Self {
        Self {
            path: self.path.join(name),
        }
    }

    pub fn exists(&self) -> bool {
        self.path.join("cgroup.procs").exists()
    }

    /// Creates the directory if missing. Parents must exist.
    pub fn create(&self) -> Result<(), CgroupError> {
        match fs::create_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err("creating cgroup", &self.path)(e)),
        }
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the directory's inode.
    pub fn id(&self) -> Result<u64, CgroupError> {
        Ok(fs::metadata(&self.path)
            .map_err(io_err("reading cgroup", &self.path))?
            .ino())
    }

    /// An fd of the directory, for attaching programs and for `CLONE_INTO_CGROUP`.
    pub fn open(&self) -> Result<OwnedFd, CgroupError> {
        nix::fcntl::open(
            &self.path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("opening cgroup", &self.path)(e.into()))
    }

    /// Whether any process lives in this cgroup or below (`populated` in `cgroup.events`).
    pub fn populated(&self) -> Result<bool, CgroupError> {
        let p = self.path.join("cgroup.events");
        let text = fs::read_to_string(&p).map_err(io_err("reading", &p))?;
        Ok(text.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Kills every process in the cgroup and below (`cgroup.kill`, Linux 5.14).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let p = self.path.join("cgroup.kill");
        fs::write(&p, "1").map_err(io_err("writing", &p))
    }

    /// Child cgroup directories.
    pub fn children(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err("listing cgroup", &self.path))? {
            let entry = entry.map_err(io_err("listing cgroup", &self.path))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(Cgroup { path: entry.path() });
            }
        }
        Ok(out)
    }

    /// Removes this cgroup and its descendants, deepest first. Fails if one is populated.
    pub fn remove_tree(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        for child in self.children()? {
            child.remove_tree()?;
        }
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing cgroup", &self.path)(e)),
        }
    }

    /// Refuses the mount's root: attaching a deny program there would cut off the host.
    pub fn ensure_not_root(&self, mount: &Path) -> Result<(), CgroupError> {
        let canon = fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let mount_canon = fs::canonicalize(mount).unwrap_or_else(|_| mount.to_path_buf());
        if canon == mount_canon {
            return Err(CgroupError::RootCgroup(self.path.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            Cgroup::under(m, "agentwall/x").unwrap().path(),
            Path::new("/sys/fs/cgroup/agentwall/x")
        );
        assert_eq!(
            Cgroup::under(m, "/agentwall").unwrap().path(),
            Path::new("/sys/fs/cgroup/agentwall")
        );
        assert!(matches!(
            Cgroup::under(m, "../etc"),
            Err(CgroupError::BadPath(_))
        ));
        assert!(matches!(
            Cgroup::under(m, "a/../../b"),
            Err(CgroupError::BadPath(_))
        ));
        assert!(matches!(
            Cgroup::under(m, "./a"),
            Err(CgroupError::BadPath(_))
        ));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
