//! bpffs: mounting it when missing, the pin layout, and checking pinned maps before reuse.
//!
//! Layout under the pin directory (default /sys/fs/bpf/agentwall):
//! - `maps/<MAP>`: every map, pinned by name, reused by the next daemon;
//! - `links/<cgroup id>/<program>.<seq>`: one link per program per enforced cgroup. A new
//!   daemon attaches its programs (new `seq`) before it unpins the old links, so the cgroup is
//!   never without a program.
//! - `links/tasks/<program>.<seq>`: the task-scoped (BPF LSM) programs' links, attached once
//!   for the host, replaced the same way.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use agentwall_common::{
    binding::Binding,
    budget::{Bucket, BudgetConfig, Summary, SummaryKey},
    maps,
    peers::{Caller, FlowKey, PeerKey},
    rules::{RuleKey, RuleSet},
    state::PolicyState,
    unix::UnixKey,
};
use aya::maps::MapInfo;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::EnforceError;

/// Paths of the pin directory.
#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn task_links(&self) -> PathBuf {
        self.links().join("tasks")
    }

    pub fn cgroup_links(&self, cgroup_id: u64) -> PathBuf {
        self.links().join(cgroup_id.to_string())
    }

    /// Cgroup ids that have pinned links.
    pub fn linked_cgroups(&self) -> Vec<u64> {
        let Ok(rd) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Makes sure the pin directory sits on a bpffs, mounting one at the nearest missing
    /// mount point (normally /sys/fs/bpf), then creates the directories.
    pub fn prepare(&self) -> Result<(), EnforceError> {
        let bpffs = bpffs_mount_point(&self.root);
        if !is_bpffs(&bpffs) {
            fs::create_dir_all(&bpffs).map_err(|source| EnforceError::Bpffs {
                path: bpffs.clone(),
                message: format!("creating the mount point: {source}"),
            })?;
            mount(
                Some("bpf"),
                &bpffs,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| EnforceError::Bpffs {
                path: bpffs.clone(),
                message: format!(
                    "bpffs is not mounted there and mounting it failed: {e} \
                         (mount it with `mount -t bpf bpf {}`)",
                    bpffs.display()
                ),
            })?;
            tracing::info!(path = %bpffs.display(), "mounted bpffs");
        }
        for dir in [self.root.clone(), self.maps(), self.links()] {
            fs::create_dir_all(&dir).map_err(|source| EnforceError::Io {
                op: "creating pin directory",
                path: dir.clone(),
                source,
            })?;
            crate::state::check_private_dir(&dir, "pin directory")
                .map_err(EnforceError::NotPrivate)?;
        }
        Ok(())
    }
}

/// The directory that must be a bpffs mount for `path`: /sys/fs/bpf for the usual layout,
/// otherwise the first existing ancestor of `path`.
fn bpffs_mount_point(path: &Path) -> PathBuf {
    let usual = Path::new("/sys/fs/bpf");
    if path.starts_with(usual) {
        return usual.to_path_buf();
    }
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    p
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// What each pinned map must look like for this build's programs to share it.
fn expected_shapes() -> [(&'static str, u32, u32); 14] {
    [
        (
            maps::INGRESS,
            4 + size_of::<RuleKey>() as u32,
            size_of::<RuleSet>() as u32,
        ),
        (maps::PASSIVE, 8, 8),
        (
            maps::CALLERS,
            size_of::<FlowKey>() as u32,
            size_of::<Caller>() as u32,
        ),
        (
            maps::PEERS,
            size_of::<PeerKey>() as u32,
            size_of::<RuleSet>() as u32,
        ),
        (maps::ENFORCED, 8, 4),
        (maps::BINDINGS, 8, size_of::<Binding>() as u32),
        (
            maps::RULES,
            4 + size_of::<RuleKey>() as u32,
            size_of::<RuleSet>() as u32,
        ),
        (maps::STATE, 4, size_of::<PolicyState>() as u32),
        (maps::COUNTERS, 4, 8),
        (maps::UNIX_RULES, size_of::<UnixKey>() as u32, 4),
        (maps::BUDGET_CONFIG, 4, size_of::<BudgetConfig>() as u32),
        (maps::BUDGETS, 8, size_of::<Bucket>() as u32),
        (
            maps::SUMMARIES,
            size_of::<SummaryKey>() as u32,
            size_of::<Summary>() as u32,
        ),
        (
            maps::ALLOWED_SUMMARIES,
            size_of::<SummaryKey>() as u32,
            size_of::<Summary>() as u32,
        ),
    ]
}

/// Refuses pinned maps of another shape (left by an incompatible version): aya would reuse
/// them as they are, and the programs would read the wrong bytes.
pub(super) fn check_pinned_maps(layout: &PinLayout) -> Result<(), EnforceError> {
    for (name, key_size, value_size) in expected_shapes() {
        let path = layout.maps().join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| EnforceError::PinnedMap {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if info.key_size() != key_size || info.value_size() != value_size {
            return Err(EnforceError::PinnedMap {
                path,
                message: format!(
                    "key/value sizes are {}/{} bytes, this agentwall needs {key_size}/{value_size}; \
                     it was left by an incompatible version. Enforcement by the old pins continues; \
                     run `agentwall teardown` to remove them, then start again",
                    info.key_size(),
                    info.value_size()
                ),
            });
        }
    }
    Ok(())
}

/// The pins in `dir`.
pub(super) fn list(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Releases links pinned by an earlier daemon (once this one's are in place): dropping an
/// unpinned link detaches its program.
pub(super) fn release(old: Vec<PathBuf>) {
    for path in old {
        match aya::programs::links::PinnedLink::from_pin(&path) {
            Ok(link) => drop(link.unpin()),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open an old link pin; removing it")
            }
        }
        let _ = unpin(&path);
    }
}

/// Removes a file on bpffs, ignoring one that is already gone.
pub(super) fn unpin(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
