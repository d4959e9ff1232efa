//! bpffs: mounting it when missing, the pin layout, and checking pinned maps before reuse.
//!
//! Layout under the pin directory (default /sys/fs/bpf/agentwall):
//! - `maps/<MAP>`: every map, pinned by name, reused by the next daemon;
//! - `links/<cgroup id>/<program>.<seq>`: one link per program per enforced cgroup. A new
//!   daemon attaches its programs (new `seq`) before it unpins the old links, so the cgroup is
//!   never without a program.
//! - `links/tasks/<program>.<seq>`: the task-scoped (BPF LSM) programs' links, attached once
//!   for the host, replaced the same way.
//! - `layout-v<N>`: an empty directory naming the layout version of what is pinned (bpffs
//!   holds no plain files). Pins without one are those of agentwall 0.1.0: layout 1.
//!
//! A new daemon takes over the pins of the one before it, of this release or an earlier one
//! (an upgrade): [`take_over`] migrates an older layout step by step to [`LAYOUT_VERSION`],
//! refuses a newer one (a downgrade) and pinned maps of another shape, each with an error that
//! says what to do, and in every case leaves the pinned programs enforcing.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use agentwall_common::{
    binding::Binding,
    budget::{Bucket, BudgetConfig, Summary, SummaryKey},
    counters, maps,
    peers::{Caller, FlowKey, PeerKey},
    rules::{Limit, RuleKey, RuleSet, WindowSpans},
    state::PolicyState,
    unix::UnixKey,
};
use aya::maps::MapInfo;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::EnforceError;

/// The version of the pin layout this build reads and writes. Bump it whenever a pinned
/// map's shape or the meaning of its entries changes, and give [`migrate`] the step from the
/// version before: `layout_shapes_are_those_of_their_version` fails on a changed shape left
/// at the old version.
pub(super) const LAYOUT_VERSION: u32 = 2;

/// The name of the marker of layout `version`.
fn marker_name(version: u32) -> String {
    format!("layout-v{version}")
}

/// What a pin directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No pinned map: a first start, or one after `agentwall teardown`.
    Nothing,
    /// Pins of this layout version.
    Layout(u32),
}

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

    /// The layout version of what is pinned: its marker, or 1 for pinned maps without one.
    /// Beside the newest marker an older one may remain (a stop between making the new one
    /// and removing the old): the newest counts.
    pub fn found(&self) -> Result<Found, EnforceError> {
        let mut newest = None;
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some(v) = name.to_str().and_then(|n| n.strip_prefix("layout-v")) else {
                continue;
            };
            let exact = !v.is_empty()
                && !v.starts_with('0')
                && v.len() <= 9
                && v.bytes().all(|b| b.is_ascii_digit());
            let Some(v) = exact.then(|| v.parse::<u32>().ok()).flatten() else {
                return Err(self.layout_error(format!(
                    "{} is no layout marker this agentwall knows; remove it if nothing made it, \
                     or run the agentwall that did",
                    e.path().display()
                )));
            };
            newest = newest.max(Some(v));
        }
        if let Some(v) = newest {
            return Ok(Found::Layout(v));
        }
        let any_map = fs::read_dir(self.maps())
            .into_iter()
            .flatten()
            .flatten()
            .next()
            .is_some();
        Ok(if any_map {
            Found::Layout(1)
        } else {
            Found::Nothing
        })
    }

    /// Marks the pins as of [`LAYOUT_VERSION`], once they are: the marker of an older layout
    /// goes after the new one is in place.
    pub fn stamp(&self) -> Result<(), EnforceError> {
        let new = self.root.join(marker_name(LAYOUT_VERSION));
        match fs::create_dir(&new) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(EnforceError::Io {
                    op: "marking the pin layout",
                    path: new,
                    source: e,
                });
            }
            _ => {}
        }
        for v in 1..LAYOUT_VERSION {
            let old = self.root.join(marker_name(v));
            match fs::remove_dir(&old) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(EnforceError::Io {
                        op: "removing an old pin layout marker",
                        path: old,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the layout markers (at a teardown).
    pub fn unstamp(&self) {
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("layout-v") {
                let _ = fs::remove_dir(e.path());
            }
        }
    }

    fn layout_error(&self, message: String) -> EnforceError {
        EnforceError::PinLayout {
            dir: self.root.clone(),
            message,
        }
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

/// What each pinned map must look like for this build's programs to share it: name, key and
/// value sizes, and for arrays (whose index the programs compute) the number of entries.
fn expected_shapes() -> [(&'static str, u32, u32, Option<u32>); 17] {
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let rules = (4 + size(size_of::<RuleKey>()), size(size_of::<RuleSet>()));
    let summaries = (size(size_of::<SummaryKey>()), size(size_of::<Summary>()));
    [
        (maps::INGRESS, rules.0, rules.1, None),
        (maps::PASSIVE, 8, 8, None),
        (
            maps::CALLERS,
            size(size_of::<FlowKey>()),
            size(size_of::<Caller>()),
            None,
        ),
        (
            maps::PEERS,
            size(size_of::<PeerKey>()),
            size(size_of::<RuleSet>()),
            None,
        ),
        (maps::ENFORCED, 8, 4, None),
        (maps::BINDINGS, 8, size(size_of::<Binding>()), None),
        (maps::RULES, rules.0, rules.1, None),
        (maps::STATE, 4, size(size_of::<PolicyState>()), Some(1)),
        (maps::COUNTERS, 4, 8, Some(counters::COUNT)),
        (maps::UNIX_RULES, size(size_of::<UnixKey>()), 4, None),
        (
            maps::BUDGET_CONFIG,
            4,
            size(size_of::<BudgetConfig>()),
            Some(1),
        ),
        (maps::BUDGETS, 8, size(size_of::<Bucket>()), None),
        (maps::SUMMARIES, summaries.0, summaries.1, None),
        (maps::ALLOWED_SUMMARIES, summaries.0, summaries.1, None),
        (maps::LIMITS, 8, size(size_of::<Limit>()), None),
        (maps::RATE_BUCKETS, 8, 8, None),
        (maps::WINDOWS, 8, size(size_of::<WindowSpans>()), None),
    ]
}

/// Makes what a previous daemon pinned usable by this build: refuses a newer layout and
/// maps of another shape, migrates an older layout one step at a time to [`LAYOUT_VERSION`].
/// An empty directory is marked at once, before anything is pinned in it; migrated pins are
/// marked by the caller once its programs are loaded on the maps.
pub(super) fn take_over(layout: &PinLayout) -> Result<Found, EnforceError> {
    let found = check_readable(layout)?;
    match found {
        Found::Nothing => layout.stamp()?,
        Found::Layout(v) => {
            for from in v..LAYOUT_VERSION {
                migrate(layout, from)?;
                tracing::info!(from, to = from + 1, "pin layout migrated");
            }
        }
    }
    check_pinned_maps(layout)?;
    Ok(found)
}

/// Whether this build can read what is pinned, changing nothing: not a newer layout.
pub(super) fn check_readable(layout: &PinLayout) -> Result<Found, EnforceError> {
    let found = layout.found()?;
    if let Found::Layout(v) = found
        && v > LAYOUT_VERSION
    {
        return Err(layout.layout_error(format!(
            "layout {v}, left by a newer agentwall; this one knows layouts up to \
             {LAYOUT_VERSION}. Enforcement by the pinned programs continues. Run the newer \
             agentwall, or run `agentwall teardown` (which ends enforcement until the next \
             start) and start this one"
        )));
    }
    Ok(found)
}

/// The step from layout `from` to `from + 1`.
fn migrate(layout: &PinLayout, from: u32) -> Result<(), EnforceError> {
    match from {
        // agentwall 0.1.0: the same maps, no marker yet.
        1 => Ok(()),
        _ => Err(layout.layout_error(format!(
            "no migration from layout {from}; run `agentwall teardown` and start again"
        ))),
    }
}

/// Refuses pinned maps of another shape (left by an incompatible version): aya would reuse
/// them as they are, and the programs would read the wrong bytes.
pub(super) fn check_pinned_maps(layout: &PinLayout) -> Result<(), EnforceError> {
    for (name, key_size, value_size, entries) in expected_shapes() {
        let path = layout.maps().join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| EnforceError::PinnedMap {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let found_entries = entries.map(|_| info.max_entries());
        if info.key_size() != key_size
            || info.value_size() != value_size
            || found_entries != entries
        {
            let count = |e: Option<u32>| e.map(|n| format!(", {n} entries")).unwrap_or_default();
            return Err(EnforceError::PinnedMap {
                path,
                message: format!(
                    "key/value sizes are {}/{} bytes{}, this agentwall needs {key_size}/{value_size}{}; \
                     it was left by an incompatible version. Enforcement by the old pins continues; \
                     run `agentwall teardown` to remove them, then start again",
                    info.key_size(),
                    info.value_size(),
                    count(found_entries),
                    count(entries),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of layout 2, written down: a change to one of the shared structures shows
    /// here, and must come with a new [`LAYOUT_VERSION`] and its step in [`migrate`].
    #[test]
    fn layout_shapes_are_those_of_their_version() {
        assert_eq!(
            LAYOUT_VERSION, 2,
            "write down the shapes of the new layout here"
        );
        assert_eq!(
            expected_shapes(),
            SHAPES_V2,
            "a pinned map changed shape: bump LAYOUT_VERSION, write the step in `migrate`, \
             and write the new shapes down here"
        );
    }

    const SHAPES_V2: [(&str, u32, u32, Option<u32>); 17] = [
        ("AW_INGRESS", 28, 200, None),
        ("AW_PASSIVE", 8, 8, None),
        ("AW_CALLERS", 40, 24, None),
        ("AW_PEERS", 16, 200, None),
        ("AW_ENFORCED", 8, 4, None),
        ("AW_BINDINGS", 8, 16, None),
        ("AW_RULES", 28, 200, None),
        ("AW_STATE", 4, 8, Some(1)),
        ("AW_COUNTERS", 4, 8, Some(18)),
        ("AW_UNIX", 120, 4, None),
        ("AW_BUDGET_CFG", 4, 32, Some(1)),
        ("AW_BUDGETS", 8, 16, None),
        ("AW_SUMMARIES", 40, 24, None),
        ("AW_ALLOWED_SUMMARIES", 40, 24, None),
        ("AW_LIMITS", 8, 24, None),
        ("AW_RATE_BUCKETS", 8, 8, None),
        ("AW_WINDOWS", 8, 32, None),
    ];

    #[test]
    fn a_directory_says_its_layout() {
        struct Scratch(PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let dir = Scratch(std::env::temp_dir().join(format!("aw-pins-{}", std::process::id())));
        let _ = fs::remove_dir_all(&dir.0);
        let l = PinLayout::new(&dir.0);
        fs::create_dir_all(l.maps()).unwrap();
        assert_eq!(l.found().unwrap(), Found::Nothing);
        fs::write(l.maps().join("AW_BINDINGS"), b"").unwrap();
        assert_eq!(l.found().unwrap(), Found::Layout(1), "0.1.0 left no marker");
        l.stamp().unwrap();
        assert_eq!(l.found().unwrap(), Found::Layout(LAYOUT_VERSION));
        // A stop between the new marker and the old one's removal: the newest counts.
        fs::create_dir(dir.0.join("layout-v1")).unwrap();
        assert_eq!(l.found().unwrap(), Found::Layout(LAYOUT_VERSION));
        l.stamp().unwrap();
        assert!(!dir.0.join("layout-v1").exists());
        for odd in ["layout-v02", "layout-v+2", "layout-v"] {
            fs::create_dir(dir.0.join(odd)).unwrap();
            let e = l.found().unwrap_err().to_string();
            assert!(e.contains("is no layout marker"), "{odd}: {e}");
            fs::remove_dir(dir.0.join(odd)).unwrap();
        }
        fs::create_dir(dir.0.join("layout-vx")).unwrap();
        let e = l.found().unwrap_err().to_string();
        assert!(e.contains("layout-vx is no layout marker"), "{e}");
        fs::remove_dir(dir.0.join("layout-vx")).unwrap();
        fs::create_dir(dir.0.join("layout-v9")).unwrap();
        l.unstamp();
        assert_eq!(l.found().unwrap(), Found::Layout(1));
        fs::create_dir(dir.0.join("layout-v9")).unwrap();
        let e = take_over(&l).unwrap_err().to_string();
        assert!(
            e.contains("layout 9, left by a newer agentwall") && e.contains("agentwall teardown"),
            "{e}"
        );
    }
}
