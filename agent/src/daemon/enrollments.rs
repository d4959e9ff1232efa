//! The enrollments service: the records that link bound cgroups to their identities, kept
//! durable across restarts of the daemon, and the names verdicts get from them.
//!
//! The records link kernel bindings (pinned in bpffs) and cgroups to identities; both end
//! with the machine, so a record must outlive the daemon (a crash, SIGKILL, a restart), not
//! a power cut: appends go to the page cache without a sync (see [`crate::journal`]). After
//! a reboot the records name cgroups that are gone, and `Daemon::reconcile` drops them.
//!
//! The records are made from the daemon's registry of managed cgroups, which the service
//! reads (it never changes it) under its own lock: saves are serialized, so concurrent
//! callers share one, the first one's snapshot holding the others' changes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::Mutex as AsyncMutex;

use super::{
    names::Identities,
    registry::{Record, Registry},
};
use crate::journal::{Journaled, Loaded};

/// Why the records could not be read or saved. Bindings stay in the kernel either way; what
/// is at stake is the link from a cgroup to its identity.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollmentsError {
    #[error("cannot read the enrollment records at {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot save the enrollment records: {0}")]
    Save(std::io::Error),
}

#[derive(Debug)]
pub(crate) struct Enrollments {
    state_dir: PathBuf,
    /// The records as last written.
    store: AsyncMutex<Journaled>,
    /// Enrolled identities by cgroup id, for naming verdicts; kept by every save.
    names: Identities,
    /// Cgroups enrolling agents were found in, by id (see [`CgroupPaths`]).
    paths: CgroupPaths,
}

impl Enrollments {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            store: AsyncMutex::new(store(state_dir)),
            names: Arc::default(),
            paths: CgroupPaths::default(),
        }
    }

    /// The identities by cgroup id, for the event reader's thread.
    pub(crate) fn names(&self) -> Identities {
        Arc::clone(&self.names)
    }

    /// The path cgroup `id` had when an agent enrolled from it, if it still has that id.
    pub(crate) fn cgroup_path(&self, mount: &Path, id: u64) -> Option<String> {
        self.paths.name(mount, id)
    }

    /// Remembers that cgroup `id` is at `path` (an agent enrolled from it).
    pub(crate) fn learn_cgroup_path(&self, id: u64, path: &str) {
        self.paths.learn(id, path);
    }

    /// The records of the previous daemon (snapshot and journal), and what reading them
    /// found: damage, or a snapshot that could not be written anew.
    pub(crate) async fn load(&self) -> Result<(Vec<Record>, Loaded), EnrollmentsError> {
        let mut store = self.store.lock().await;
        store
            .load(|r: &Record| r.cgroup_id)
            .map_err(|source| EnrollmentsError::Read {
                path: self.state_dir.join(FILE),
                source,
            })
    }

    /// Makes the records of every cgroup in `registry` durable if they changed: one journal
    /// line per changed cgroup, one write.
    pub(crate) async fn save_all(&self, registry: &Registry) -> Result<(), EnrollmentsError> {
        let mut store = self.store.lock().await;
        let (records, named) = registry.records().await;
        self.names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(named);
        self.persist(&mut store, move |s| {
            s.save(&records, |r: &Record| r.cgroup_id)
        })
        .await
    }

    /// [`Self::save_all`] after a change to `ids` only: the cost follows the cgroups changed,
    /// not the number of cgroups bound.
    pub(crate) async fn save_some(
        &self,
        registry: &Registry,
        ids: &[u64],
    ) -> Result<(), EnrollmentsError> {
        let mut store = self.store.lock().await;
        if !store.is_whole() {
            drop(store);
            return self.save_all(registry).await;
        }
        let changed = registry.records_of(ids).await;
        let mut records: Vec<(u64, Option<Record>)> = Vec::with_capacity(ids.len());
        {
            let mut n = self
                .names
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, record, name) in changed {
                n.set(id, name);
                records.push((id, record));
            }
        }
        self.persist(&mut store, move |s| {
            let changes: Vec<(u64, Option<&Record>)> =
                records.iter().map(|(id, r)| (*id, r.as_ref())).collect();
            s.save_some(&changes)
        })
        .await
    }

    /// Runs a save on the store: on this thread if it may block, else on the blocking pool.
    async fn persist(
        &self,
        store: &mut Journaled,
        save: impl FnOnce(&mut Journaled) -> std::io::Result<bool> + Send + 'static,
    ) -> Result<(), EnrollmentsError> {
        // The store is lent to the save, which may run on another thread; should that panic,
        // a fresh store (which has not read the files, so its next save rewrites them) stays.
        let mut lent = std::mem::replace(store, self::store(&self.state_dir));
        let saved = match crate::sched::blocking(move || {
            let r = save(&mut lent);
            (lent, r)
        })
        .await
        {
            Ok((back, r)) => {
                *store = back;
                r
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        saved.map(drop).map_err(EnrollmentsError::Save)
    }
}

/// The records' file in the state directory (with its journal beside it).
const FILE: &str = "enrollments.json";

fn store(state_dir: &Path) -> Journaled {
    Journaled::until_reboot(&state_dir.join(FILE))
}

/// Paths of cgroups that agents enrolled from, by cgroup id, so that an agent enrolling again
/// is placed from the cgroup id the kernel reports with its pidfd instead of a read of
/// /proc/PID/cgroup. A path is used only while it still has that id (a cgroup can be renamed
/// or removed; ids are never reused while the machine runs).
#[derive(Debug, Default)]
struct CgroupPaths(std::sync::Mutex<HashMap<u64, String>>);

impl CgroupPaths {
    const MAX: usize = 4096;

    /// The path of cgroup `id`, checked against the cgroup tree under `mount`.
    fn name(&self, mount: &std::path::Path, id: u64) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let mut names = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = names.get(&id)?.clone();
        let still = std::fs::metadata(mount.join(path.trim_start_matches('/')))
            .is_ok_and(|m| m.ino() == id);
        if still {
            Some(path)
        } else {
            names.remove(&id);
            None
        }
    }

    fn learn(&self, id: u64, path: &str) {
        let mut names = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if names.len() >= Self::MAX && !names.contains_key(&id) {
            names.clear();
        }
        names.insert(id, path.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::CgroupPaths;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_path_names_its_id_only_while_it_still_has_it() {
        // Any directory tree stands for the cgroup tree: the check is the inode number.
        let root = std::env::temp_dir().join(format!("aw-cgnames-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        let id = std::fs::metadata(root.join("a")).unwrap().ino();
        let names = CgroupPaths::default();
        assert_eq!(names.name(&root, id), None, "never learned");
        names.learn(id, "/a");
        assert_eq!(names.name(&root, id).as_deref(), Some("/a"));
        // Renamed: the old path no longer has the id, and is forgotten.
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        assert_eq!(names.name(&root, id), None);
        std::fs::rename(root.join("b"), root.join("a")).unwrap();
        assert_eq!(names.name(&root, id), None, "forgotten until learned again");
        // A path learned for another id (another directory there now) is not used.
        names.learn(id + 1, "/a");
        assert_eq!(names.name(&root, id + 1), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
