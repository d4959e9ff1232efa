//! Identity in the daemon: the enrollment records and their persistence here; enrollment
//! (verify, attest, bind) in `admission`, revocation in `revocation`, renewal of the
//! certificates of launched agents in `renew`, the enrollment socket in `socket`.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agentwall_common::binding::{Binding, flags};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

mod admission;
mod renew;
mod revocation;
mod socket;

pub(super) use self::socket::serve_enroll;
use super::{AdminError, Daemon, DaemonError, Kind, Managed};
use crate::{
    agentdir::{AgentDir, files},
    cgroup::Cgroup,
    identity::{
        attest::{self, Peer},
        enroll::{self, EnrollReply, EnrollRequest, Enrolled},
        revoke::Target,
        spiffe::SpiffeId,
        svid::LeafRequest,
        verify::VerifiedSvid,
    },
    policy::{Grant, Mode},
    sockdiag::{self, Destroyed},
};

/// The identity a cgroup is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Bound {
    pub(super) spiffe_id: String,
    pub(super) serial: String,
    /// Seconds since the Unix epoch.
    pub(super) not_after: u64,
    #[serde(default)]
    pub(super) capabilities: Vec<String>,
    #[serde(default)]
    pub(super) revoked: bool,
    /// Serials this certificate was renewed from, oldest first (at most
    /// [`MAX_RENEWAL_CHAIN`]): revoking one of them revokes this one too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) renewed_from: Vec<String>,
}

/// Serials of earlier certificates a binding remembers.
const MAX_RENEWAL_CHAIN: usize = 64;

impl Bound {
    /// Whether this binding's certificate, or one it was renewed from, is revoked.
    fn cut_by(&self, identity: &crate::identity::service::IdentityService) -> bool {
        std::iter::once(&self.serial)
            .chain(&self.renewed_from)
            .any(|serial| identity.check_revoked(&self.spiffe_id, serial).is_err())
    }

    pub(super) fn expires_at(&self) -> String {
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(self.not_after),
        )
        .to_string()
    }
}

/// What survives a restart about a cgroup: `<state dir>/enrollments.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) cgroup_id: u64,
    pub(super) cgroup: String,
    pub(super) kind: Kind,
    pub(super) bound: Option<Bound>,
    pub(super) agent_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) audience: Vec<String>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `CLOCK_BOOTTIME` nanoseconds at wall-clock instant `at` (what the kernel compares expiry
/// with: it keeps counting across suspend and does not jump with the wall clock).
fn boot_ns_at(at: SystemTime) -> u64 {
    let now_wall = SystemTime::now();
    let boot = crate::clock::boot_ns();
    match at.duration_since(now_wall) {
        // Down to a whole millisecond (earlier, never later): the two clock readings are a
        // few hundred ns apart, so an agent enrolling again with the same certificate gets
        // the same expiry, and its unchanged binding is not written again.
        Ok(ahead) => {
            let at = boot.saturating_add(ahead.as_nanos() as u64);
            (at - at % 1_000_000).max(1)
        }
        // Already past: one nanosecond of boot time, which every later reading exceeds.
        Err(_) => 1,
    }
}

/// The answer to a validity check that failed.
fn invalid(message: String) -> super::Checked {
    super::Checked {
        valid: false,
        spiffe_id: None,
        serial: None,
        not_after: None,
        message,
    }
}

fn refuse(message: impl Into<String>) -> EnrollReply {
    EnrollReply::Error {
        message: message.into(),
    }
}

/// The record of a managed cgroup, if it has anything to record.
fn record_of(cgroup_id: u64, m: &Managed) -> Option<Record> {
    (m.bound.is_some() || m.agent_dir.is_some()).then(|| Record {
        cgroup_id,
        cgroup: m.cgroup.path().display().to_string(),
        kind: m.kind,
        bound: m.bound.clone(),
        agent_dir: m.agent_dir.clone(),
        audience: m.audience.clone(),
    })
}

/// The store of the enrollment records. They link kernel bindings (pinned in bpffs) and
/// cgroups to identities; both end with the machine, so a record must outlive the daemon
/// (a crash, SIGKILL, a restart), not a power cut: appends go to the page cache without a
/// sync (see [`crate::journal`]). After a reboot the records name cgroups that are gone, and
/// [`Daemon::reconcile`] drops them.
pub(super) fn enrollment_store(state_dir: &std::path::Path) -> crate::journal::Journaled {
    crate::journal::Journaled::until_reboot(&state_dir.join("enrollments.json"))
}

/// Paths of cgroups that agents enrolled from, by cgroup id, so that an agent enrolling again
/// is placed from the cgroup id the kernel reports with its pidfd instead of a read of
/// /proc/PID/cgroup. A path is used only while it still has that id (a cgroup can be renamed
/// or removed; ids are never reused while the machine runs).
#[derive(Debug, Default)]
pub(super) struct CgroupNames(std::sync::Mutex<HashMap<u64, String>>);

impl CgroupNames {
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

impl Daemon {
    fn enrollments_path(&self) -> PathBuf {
        self.cfg.state_dir.join("enrollments.json")
    }

    /// Creates the directory of an agent launched with `agentwall exec --cert` (the
    /// daemon's, not writable by the agent: see [`crate::agentdir`]).
    pub(super) fn identity_agent_dir(&self, cgroup_id: u64) -> Result<PathBuf, DaemonError> {
        let dir = AgentDir::create(&self.cfg.identity.agent_dir, &cgroup_id.to_string())?;
        Ok(dir.path().to_path_buf())
    }

    /// The enrollment records of the previous daemon (snapshot and journal, see
    /// [`crate::journal`]).
    pub(super) async fn load_enrollments(&self) -> Vec<Record> {
        let mut store = self.persisted.lock().await;
        match store.load(|r: &Record| r.cgroup_id) {
            Ok((records, loaded)) => {
                if let Some(damage) = loaded.damage {
                    // Bindings stay in the kernel and keep denying or allowing as they did;
                    // what is lost is the link from a cgroup to its identity (revocation by
                    // ID then misses it, so the daemon says so loudly).
                    tracing::error!(%damage, "the enrollment records are damaged; identities of the cgroups recorded after the damage are unknown until they enroll again");
                    self.count_error("enrollments_corrupt");
                }
                if let Some(e) = loaded.unfolded {
                    tracing::error!(error = %e, "cannot write the enrollment records anew; the next change retries");
                    self.count_error("enrollments_save");
                }
                records
            }
            Err(e) => {
                tracing::error!(path = %self.enrollments_path().display(), error = %e, "cannot read the enrollment records; identities of bound cgroups are unknown until they enroll again");
                self.count_error("enrollments_corrupt");
                Vec::new()
            }
        }
    }

    /// Makes the enrollment records durable if they changed: one journal line per changed
    /// cgroup, one write. Saves are serialized (snapshot and write under one lock), so
    /// concurrent callers share a save: the first one's snapshot holds the others' changes.
    pub(super) async fn save_enrollments(&self) {
        let mut store = self.persisted.lock().await;
        let registry = self.cgroups.lock().await;
        let named: HashMap<u64, String> = registry
            .iter()
            .filter_map(|(id, m)| Some((*id, m.bound.as_ref()?.spiffe_id.clone())))
            .collect();
        if let Ok(mut ids) = self.identities.write() {
            ids.replace(named);
        }
        let records: Vec<Record> = registry
            .iter()
            .filter_map(|(id, m)| record_of(*id, m))
            .collect();
        drop(registry);
        self.persist(&mut store, move |s| {
            s.save(&records, |r: &Record| r.cgroup_id)
        })
        .await;
    }

    /// [`Self::save_enrollments`] after a change to `ids` only: the cost follows the cgroups
    /// changed, not the number of cgroups bound.
    pub(super) async fn save_enrollments_of(&self, ids: &[u64]) {
        let mut store = self.persisted.lock().await;
        if !store.is_whole() {
            drop(store);
            return self.save_enrollments().await;
        }
        let registry = self.cgroups.lock().await;
        let records: Vec<(u64, Option<Record>)> = ids
            .iter()
            .map(|id| (*id, registry.get(id).and_then(|m| record_of(*id, m))))
            .collect();
        let names: Vec<(u64, Option<String>)> = ids
            .iter()
            .map(|id| {
                let name = registry
                    .get(id)
                    .and_then(|m| Some(m.bound.as_ref()?.spiffe_id.clone()));
                (*id, name)
            })
            .collect();
        drop(registry);
        if let Ok(mut n) = self.identities.write() {
            for (id, name) in names {
                n.set(id, name);
            }
        }
        self.persist(&mut store, move |s| {
            let changes: Vec<(u64, Option<&Record>)> =
                records.iter().map(|(id, r)| (*id, r.as_ref())).collect();
            s.save_some(&changes)
        })
        .await;
    }

    /// Runs a save on the store: on this thread if it may block, else on the blocking pool.
    async fn persist(
        &self,
        store: &mut crate::journal::Journaled,
        save: impl FnOnce(&mut crate::journal::Journaled) -> std::io::Result<bool> + Send + 'static,
    ) {
        // The store is lent to the save, which may run on another thread; should that panic,
        // a fresh store (which has not read the files, so its next save rewrites them) stays.
        let mut lent = std::mem::replace(store, enrollment_store(&self.cfg.state_dir));
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
        if let Err(e) = saved {
            tracing::error!(error = %e, "cannot save the enrollment records");
            self.count_error("enrollments_save");
        }
    }
}

#[cfg(test)]
mod names_by_id_tests {
    use super::CgroupNames;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_path_names_its_id_only_while_it_still_has_it() {
        // Any directory tree stands for the cgroup tree: the check is the inode number.
        let root = std::env::temp_dir().join(format!("aw-cgnames-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        let id = std::fs::metadata(root.join("a")).unwrap().ino();
        let names = CgroupNames::default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_expiry_is_in_the_future_or_already_past() {
        let soon = boot_ns_at(SystemTime::now() + Duration::from_secs(60));
        let now_ns = crate::clock::boot_ns();
        assert!(soon > now_ns + 59_000_000_000 && soon < now_ns + 61_000_000_000);
        assert_eq!(boot_ns_at(SystemTime::now() - Duration::from_secs(1)), 1);
        assert_eq!(soon % 1_000_000, 0, "whole milliseconds");
        let at = SystemTime::now() + Duration::from_secs(3600);
        let same = (0..20).filter(|_| boot_ns_at(at) == boot_ns_at(at)).count();
        assert!(same >= 15, "the same expiry again and again: {same} of 20");
    }
}
