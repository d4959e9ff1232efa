//! cgroup v2 file system access: finding the mount, creating and removing cgroups, ids.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::OwnedFd,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
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
    #[error(
        "this process is in a cgroup namespace of its own: the cgroup v2 mount {at} shows {root:?} \
         of it, not the whole hierarchy, and other processes' cgroups would be misnamed; run \
         agentwall in the host's cgroup namespace (in a container: `nsenter --target 1 --cgroup \
         -- agentwall run ...` with the host's process namespace, as the Helm chart deploy/helm/agentwall does)"
    )]
    PrivateNamespace { at: PathBuf, root: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A cgroup v2 mount: where it is, and which cgroup of the hierarchy it shows at its root,
/// as this process's cgroup namespace sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub at: PathBuf,
    pub root: String,
}

/// The cgroup v2 mounts listed in a mountinfo text, in its order.
fn cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options... - fstype source ...
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            let mut f = pre.split_whitespace().skip(3);
            let root = unescape_mountinfo(f.next()?);
            let at = PathBuf::from(unescape_mountinfo(f.next()?));
            Some(Cgroup2Mount { at, root })
        })
        .collect()
}

/// The mount to use: the first that shows the whole hierarchy (root `/`), else the first.
fn pick(mounts: &[Cgroup2Mount]) -> Result<&Cgroup2Mount, CgroupError> {
    mounts
        .iter()
        .find(|m| m.root == "/")
        .or_else(|| mounts.first())
        .ok_or(CgroupError::NoCgroup2)
}

fn read_mountinfo() -> Result<String, CgroupError> {
    fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)
}

/// The cgroup v2 mount point, read from /proc/self/mountinfo (never assumed: it is
/// /sys/fs/cgroup on unified hosts and /sys/fs/cgroup/unified on hybrid ones). A mount of the
/// whole hierarchy is preferred over one of a subtree (a container's own).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    Ok(pick(&cgroup2_mounts(&read_mountinfo()?))?.at.clone())
}

/// Refuses a cgroup namespace of its own (a container's): there, /proc/PID/cgroup of other
/// processes reads relative to it (`/..`), and no mount shows the whole hierarchy, so the
/// cgroups of agents would be misnamed. The daemon runs in the host's cgroup namespace.
pub fn ensure_host_cgroup_namespace() -> Result<PathBuf, CgroupError> {
    host_mount(&cgroup2_mounts(&read_mountinfo()?))
}

fn host_mount(mounts: &[Cgroup2Mount]) -> Result<PathBuf, CgroupError> {
    let m = pick(mounts)?;
    if m.root == "/" {
        Ok(m.at.clone())
    } else {
        Err(CgroupError::PrivateNamespace {
            at: m.at.clone(),
            root: m.root.clone(),
        })
    }
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

    /// Sets a `trusted.` extended attribute on the cgroup's directory: a note the daemon
    /// leaves for its successor. Only a holder of CAP_SYS_ADMIN on the host can write one,
    /// so no agent can forge or change it.
    pub fn set_note(&self, name: &str, value: &[u8]) -> Result<(), CgroupError> {
        let (path, key) = xattr_names(&self.path, name)?;
        // SAFETY: both strings are NUL-terminated and live across the call; value is a slice.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(io_err("writing a note on cgroup", &self.path)(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// A note [`Cgroup::set_note`] left, or `None` if there is none.
    pub fn note(&self, name: &str) -> Result<Option<Vec<u8>>, CgroupError> {
        let (path, key) = xattr_names(&self.path, name)?;
        let mut buf = [0u8; 64];
        // SAFETY: both strings are NUL-terminated; buf is writable for its length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODATA) {
                return Ok(None);
            }
            return Err(io_err("reading a note on cgroup", &self.path)(e));
        }
        Ok(Some(buf[..n as usize].to_vec()))
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

/// How a walk of the processes below some cgroups ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Every process was seen.
    Done,
    /// The caller stopped it.
    Stopped,
    /// More cgroup directories than the walk may read: the rest were not seen.
    TooManyCgroups,
}

/// Calls `f` with the pid of each process of the cgroups at `dirs` and of their descendants,
/// reading at most `max_dirs` cgroup directories (an agent may make many below its own). A
/// cgroup or process gone meanwhile is skipped: it has nothing left to find.
pub fn for_each_process_below(
    dirs: &[PathBuf],
    max_dirs: usize,
    mut f: impl FnMut(&str) -> std::ops::ControlFlow<()>,
) -> Walk {
    let mut stack = dirs.to_vec();
    let mut read = 0;
    while let Some(dir) = stack.pop() {
        read += 1;
        if read > max_dirs {
            return Walk::TooManyCgroups;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                if f(pid).is_break() {
                    return Walk::Stopped;
                }
            }
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Walk::Done
}

/// The directory and the attribute name of a note, as C strings.
fn xattr_names(dir: &Path, name: &str) -> Result<(CString, CString), CgroupError> {
    let bad = |_| io_err("naming a note on cgroup", dir)(io::ErrorKind::InvalidInput.into());
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(bad)?;
    let key = CString::new(format!("trusted.agentwall.{name}")).map_err(bad)?;
    Ok((path, key))
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
    fn the_mount_of_the_whole_hierarchy_is_chosen_and_a_private_namespace_refused() {
        let host = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    30 1 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let mounts = cgroup2_mounts(host);
        assert_eq!(
            mounts,
            [Cgroup2Mount {
                at: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            }]
        );
        assert_eq!(
            host_mount(&mounts).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        // A container: the runtime's mount shows its own cgroup; the host's, bound in, the
        // whole hierarchy (seen from the host's cgroup namespace).
        let container = "700 600 0:30 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                         701 700 0:30 / /host/cgroup\\040v2 rw - cgroup2 cgroup2 rw\n";
        let mounts = cgroup2_mounts(container);
        assert_eq!(pick(&mounts).unwrap().at, Path::new("/host/cgroup v2"));
        assert_eq!(host_mount(&mounts).unwrap(), Path::new("/host/cgroup v2"));
        // In a cgroup namespace of its own, the same mounts read relative to it.
        let private = "700 600 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                       701 700 0:30 /.. /host/cgroup rw - cgroup2 cgroup2 rw\n";
        let mounts = cgroup2_mounts(private);
        assert_eq!(pick(&mounts).unwrap().at, Path::new("/sys/fs/cgroup"));
        let private = "701 700 0:30 /.. /host/cgroup rw - cgroup2 cgroup2 rw\n";
        let e = host_mount(&cgroup2_mounts(private)).unwrap_err();
        assert!(matches!(e, CgroupError::PrivateNamespace { .. }), "{e}");
        assert!(e.to_string().contains("nsenter --target 1 --cgroup"), "{e}");
        assert!(matches!(host_mount(&[]), Err(CgroupError::NoCgroup2)));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
