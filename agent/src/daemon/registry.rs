//! The registry service: every cgroup the daemon manages, by cgroup id, with what it knows
//! of each (its policy, its kind, the lease of its launcher, a quarantine, the identity bound
//! to it, the files of a launched agent).
//!
//! The map is private. Single questions and changes are the service's methods, each taking
//! the lock for itself. A change that must see the registry unchanged across several steps,
//! some of them in the kernel (an enrollment checking and then binding a cgroup, a
//! revocation flagging bindings, the adoption of a previous daemon's cgroups), holds it with
//! [`Registry::hold`] and works on the [`Held`] registry.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard};

use crate::cgroup::Cgroup;

/// How a cgroup came to be managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kind {
    /// Created by `agentwall exec` below the managed root.
    Exec,
    /// Named in the config's `enforce:` list.
    Configured,
    /// A cgroup elsewhere whose process enrolled.
    Enrolled,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::Exec => "exec",
            Kind::Configured => "configured",
            Kind::Enrolled => "enrolled",
        }
    }
}

/// What the daemon knows of one managed cgroup.
#[derive(Debug, Clone)]
pub(super) struct Managed {
    pub(super) cgroup: Cgroup,
    pub(super) policy: Option<String>,
    pub(super) kind: Kind,
    /// An `agentwall exec` launcher holds the cgroup: it is not collected, even empty.
    pub(super) leased: bool,
    pub(super) quarantined: bool,
    /// The identity bound by enrollment.
    pub(super) bound: Option<Bound>,
    /// Files of an agent launched with `agentwall exec --cert` (renewed there).
    pub(super) agent_dir: Option<PathBuf>,
    /// Audiences of the JWT-SVID kept in the agent's directory, and its expiry (Unix seconds).
    pub(super) audience: Vec<String>,
    pub(super) token_exp: u64,
    /// The host uid root of an exec cgroup's command is mapped to (see `rootuid`).
    pub(super) root_uid: Option<u32>,
    /// Launched with `agentwall exec --identity`: the daemon holds the key of its X509-SVID
    /// and hands it out over the Workload API (see `crate::workload`).
    pub(super) workload: bool,
}

impl Managed {
    pub(super) fn new(cgroup: Cgroup, policy: Option<String>, kind: Kind) -> Self {
        Self {
            cgroup,
            policy,
            kind,
            leased: false,
            quarantined: false,
            bound: None,
            agent_dir: None,
            audience: Vec::new(),
            token_exp: 0,
            root_uid: None,
            workload: false,
        }
    }

    /// The record of this cgroup, if it has anything to record.
    fn record(&self, cgroup_id: u64) -> Option<Record> {
        (self.bound.is_some() || self.agent_dir.is_some()).then(|| Record {
            cgroup_id,
            cgroup: self.cgroup.path().display().to_string(),
            kind: self.kind,
            bound: self.bound.clone(),
            agent_dir: self.agent_dir.clone(),
            audience: self.audience.clone(),
            workload: self.workload,
        })
    }

    fn name(&self) -> Option<String> {
        Some(self.bound.as_ref()?.spiffe_id.clone())
    }
}

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
    pub(super) fn cut_by(&self, identity: &crate::identity::service::IdentityService) -> bool {
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

    /// This certificate was renewed: `serial` is the new one, the old joins the chain.
    fn renewed(&mut self, serial: String, not_after: u64) {
        let previous = std::mem::replace(&mut self.serial, serial);
        self.renewed_from.push(previous);
        let excess = self.renewed_from.len().saturating_sub(MAX_RENEWAL_CHAIN);
        self.renewed_from.drain(..excess);
        self.not_after = not_after;
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
    /// An agent of the Workload API (`agentwall exec --identity`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) workload: bool,
}

/// An agent launched with `agentwall exec --cert`, as renewal needs it.
#[derive(Debug, Clone)]
pub(super) struct Launched {
    pub(super) bound: Bound,
    pub(super) agent_dir: PathBuf,
    pub(super) audience: Vec<String>,
}

/// Why a cgroup has no launched agent to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotLaunched {
    /// The registry does not know the cgroup.
    Unknown,
    /// It has no identity, or no directory of files to renew.
    NoFiles,
}

#[derive(Debug, Default)]
pub(super) struct Registry {
    cgroups: AsyncMutex<BTreeMap<u64, Managed>>,
}

impl Registry {
    /// The registry held for a change of several steps; other callers wait.
    pub(super) async fn hold(&self) -> Held<'_> {
        Held {
            map: self.cgroups.lock().await,
        }
    }

    pub(super) async fn kind_of(&self, id: u64) -> Option<Kind> {
        self.cgroups.lock().await.get(&id).map(|m| m.kind)
    }

    /// Whether a configured cgroup at `path` (the unit's previous run, say) is quarantined.
    pub(super) async fn configured_quarantined_at(&self, path: &Path) -> bool {
        self.cgroups
            .lock()
            .await
            .values()
            .any(|m| m.kind == Kind::Configured && m.cgroup.path() == path && m.quarantined)
    }

    /// Registers configured cgroup `id`; the earlier cgroups at its path leave the registry
    /// and are returned (their unit ran before).
    pub(super) async fn put_configured(&self, id: u64, m: Managed) -> Vec<u64> {
        let mut map = self.cgroups.lock().await;
        let earlier: Vec<u64> = map
            .iter()
            .filter(|(old, o)| {
                **old != id && o.kind == Kind::Configured && o.cgroup.path() == m.cgroup.path()
            })
            .map(|(old, _)| *old)
            .collect();
        for old in &earlier {
            map.remove(old);
        }
        map.insert(id, m);
        earlier
    }

    pub(super) async fn set_quarantined(&self, id: u64, quarantined: bool) {
        if let Some(m) = self.cgroups.lock().await.get_mut(&id) {
            m.quarantined = quarantined;
        }
    }

    /// The launcher of exec cgroup `id` let it go: it is collected once empty.
    pub(super) async fn end_lease(&self, id: u64) {
        if let Some(m) = self.cgroups.lock().await.get_mut(&id) {
            m.leased = false;
        }
    }

    /// Exec cgroups no launcher holds, to collect once empty.
    pub(super) async fn unleased_exec(&self) -> Vec<(u64, Cgroup)> {
        self.cgroups
            .lock()
            .await
            .iter()
            .filter(|(_, m)| m.kind == Kind::Exec && !m.leased)
            .map(|(id, m)| (*id, m.cgroup.clone()))
            .collect()
    }

    /// Enrolled cgroups elsewhere that their owner removed.
    pub(super) async fn enrolled_gone(&self) -> Vec<u64> {
        self.cgroups
            .lock()
            .await
            .iter()
            .filter(|(_, m)| m.kind == Kind::Enrolled && !m.cgroup.exists())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Takes cgroup `id` out of the registry; returns its agent's directory, if any.
    pub(super) async fn remove(&self, id: u64) -> Option<PathBuf> {
        self.cgroups.lock().await.remove(&id)?.agent_dir
    }

    /// The paths of those of `ids` the registry knows.
    pub(super) async fn paths_of(&self, ids: &HashSet<u64>) -> Vec<PathBuf> {
        let map = self.cgroups.lock().await;
        ids.iter()
            .filter_map(|id| map.get(id))
            .map(|m| m.cgroup.path().to_path_buf())
            .collect()
    }

    /// Every cgroup, as it is now.
    pub(super) async fn snapshot(&self) -> Vec<(u64, Managed)> {
        let map = self.cgroups.lock().await;
        map.iter().map(|(id, m)| (*id, m.clone())).collect()
    }

    /// The agent launched in cgroup `id`, with its identity and files.
    pub(super) async fn launched(&self, id: u64) -> Result<Launched, NotLaunched> {
        let map = self.cgroups.lock().await;
        let m = map.get(&id).ok_or(NotLaunched::Unknown)?;
        match (&m.bound, &m.agent_dir) {
            (Some(b), Some(d)) => Ok(Launched {
                bound: b.clone(),
                agent_dir: d.clone(),
                audience: m.audience.clone(),
            }),
            _ => Err(NotLaunched::NoFiles),
        }
    }

    /// The identity bound to cgroup `id`.
    pub(super) async fn bound(&self, id: u64) -> Option<Bound> {
        self.cgroups.lock().await.get(&id)?.bound.clone()
    }

    /// Cgroup `id`'s certificate was renewed to `serial`, valid until `not_after`.
    pub(super) async fn note_renewal(&self, id: u64, serial: String, not_after: u64) {
        if let Some(b) = self
            .cgroups
            .lock()
            .await
            .get_mut(&id)
            .and_then(|m| m.bound.as_mut())
        {
            b.renewed(serial, not_after);
        }
    }

    pub(super) async fn set_token_expiry(&self, id: u64, exp: u64) {
        if let Some(m) = self.cgroups.lock().await.get_mut(&id) {
            m.token_exp = exp;
        }
    }

    /// Launched agents of identities under `prefix` (this daemon's trust domain) whose
    /// certificate, not revoked, ends by `limit` (Unix seconds): with their directories.
    pub(super) async fn renewals_due(&self, limit: u64, prefix: &str) -> Vec<(u64, PathBuf)> {
        let map = self.cgroups.lock().await;
        map.iter()
            .filter_map(|(id, m)| {
                let b = m.bound.as_ref()?;
                if b.revoked || b.not_after > limit || !b.spiffe_id.starts_with(prefix) {
                    return None;
                }
                Some((*id, m.agent_dir.clone()?))
            })
            .collect()
    }

    /// Agents of the Workload API under `prefix` whose certificate, not revoked, ends by
    /// `limit`, or that `missing` says have none in memory (a restarted daemon's).
    pub(super) async fn workload_renewals_due(
        &self,
        limit: u64,
        prefix: &str,
        missing: impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let map = self.cgroups.lock().await;
        map.iter()
            .filter(|(_, m)| m.workload)
            .filter_map(|(id, m)| {
                let b = m.bound.as_ref()?;
                let due = b.not_after <= limit || missing(*id);
                (!b.revoked && due && b.spiffe_id.starts_with(prefix)).then_some(*id)
            })
            .collect()
    }

    /// The identity bound to cgroup `id`, and whether the daemon holds its key (an agent of
    /// the Workload API).
    pub(super) async fn identity_of(&self, id: u64) -> Option<(Bound, bool)> {
        let map = self.cgroups.lock().await;
        let m = map.get(&id)?;
        Some((m.bound.clone()?, m.workload))
    }

    /// The policy, the bound identity and the quarantine of managed cgroup `id`, for a
    /// decision about a process in it.
    pub(super) async fn caller(&self, id: u64) -> Option<(Option<String>, Option<Bound>, bool)> {
        let map = self.cgroups.lock().await;
        let m = map.get(&id)?;
        Some((m.policy.clone(), m.bound.clone(), m.quarantined))
    }

    /// Launched agents with a token, not revoked, whose token ends by `limit`.
    pub(super) async fn tokens_due(&self, limit: u64) -> Vec<u64> {
        let map = self.cgroups.lock().await;
        map.iter()
            .filter(|(_, m)| m.agent_dir.is_some() && !m.audience.is_empty())
            .filter(|(_, m)| m.bound.as_ref().is_some_and(|b| !b.revoked))
            .filter(|(_, m)| m.token_exp <= limit)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The serials renewed from `serial`, down every chain that holds it.
    pub(super) async fn renewed_after(&self, serial: &str) -> Vec<String> {
        let map = self.cgroups.lock().await;
        map.values()
            .filter_map(|m| m.bound.as_ref())
            .filter_map(|b| {
                let at = b.renewed_from.iter().position(|s| s == serial)?;
                Some(
                    b.renewed_from[at + 1..]
                        .iter()
                        .chain(std::iter::once(&b.serial))
                        .cloned()
                        .collect::<Vec<_>>(),
                )
            })
            .flatten()
            .collect()
    }

    /// The records of every cgroup, and the identity names by cgroup id.
    pub(super) async fn records(&self) -> (Vec<Record>, HashMap<u64, String>) {
        let map = self.cgroups.lock().await;
        let records = map.iter().filter_map(|(id, m)| m.record(*id)).collect();
        let names = map
            .iter()
            .filter_map(|(id, m)| Some((*id, m.name()?)))
            .collect();
        (records, names)
    }

    /// The records of `ids` (none for a cgroup gone or with nothing to record), and their
    /// identity names.
    pub(super) async fn records_of(
        &self,
        ids: &[u64],
    ) -> Vec<(u64, Option<Record>, Option<String>)> {
        let map = self.cgroups.lock().await;
        ids.iter()
            .map(|id| {
                let m = map.get(id);
                (
                    *id,
                    m.and_then(|m| m.record(*id)),
                    m.and_then(Managed::name),
                )
            })
            .collect()
    }
}

/// The registry, held (see [`Registry::hold`]).
pub(super) struct Held<'a> {
    map: MutexGuard<'a, BTreeMap<u64, Managed>>,
}

impl Held<'_> {
    pub(super) fn get(&self, id: u64) -> Option<&Managed> {
        self.map.get(&id)
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    pub(super) fn insert(&mut self, id: u64, m: Managed) {
        self.map.insert(id, m);
    }

    /// Cgroup `id`'s entry, made by `new` if there is none.
    pub(super) fn entry(&mut self, id: u64, new: impl FnOnce() -> Managed) -> &mut Managed {
        self.map.entry(id).or_insert_with(new)
    }

    pub(super) fn ids(&self) -> Vec<u64> {
        self.map.keys().copied().collect()
    }

    /// The uids handed to root commands of exec cgroups.
    pub(super) fn root_uids_in_use(&self) -> HashSet<u32> {
        self.map.values().filter_map(|m| m.root_uid).collect()
    }

    /// Exec cgroups, to change.
    pub(super) fn exec_mut(&mut self) -> impl Iterator<Item = &mut Managed> {
        self.map.values_mut().filter(|m| m.kind == Kind::Exec)
    }

    /// The bound identities, to change.
    pub(super) fn bound_mut(&mut self) -> impl Iterator<Item = (u64, &mut Bound)> {
        self.map
            .iter_mut()
            .filter_map(|(id, m)| Some((*id, m.bound.as_mut()?)))
    }

    /// Every cgroup by id.
    pub(super) fn cgroups(&self) -> HashMap<u64, Cgroup> {
        self.map
            .iter()
            .map(|(id, m)| (*id, m.cgroup.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(id: u64) -> Managed {
        Managed::new(
            Cgroup::at(PathBuf::from(format!("/x/exec-{id}"))),
            None,
            Kind::Exec,
        )
    }

    fn bound(serial: &str, not_after: u64) -> Bound {
        Bound {
            spiffe_id: "spiffe://td/agent".into(),
            serial: serial.into(),
            not_after,
            capabilities: Vec::new(),
            revoked: false,
            renewed_from: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_exec_cgroup_is_collected_only_after_its_lease_ends() {
        let r = Registry::default();
        let mut m = exec(7);
        m.leased = true;
        r.hold().await.insert(7, m);
        assert!(r.unleased_exec().await.is_empty());
        r.end_lease(7).await;
        assert_eq!(r.unleased_exec().await.len(), 1);
        assert_eq!(r.remove(7).await, None);
        assert!(r.unleased_exec().await.is_empty());
    }

    #[tokio::test]
    async fn a_renewal_chain_is_bounded_and_followed_by_revocation() {
        let r = Registry::default();
        let mut m = exec(1);
        m.bound = Some(bound("s0", 10));
        m.agent_dir = Some(PathBuf::from("/dir"));
        r.hold().await.insert(1, m);
        for n in 1..=(MAX_RENEWAL_CHAIN + 5) {
            r.note_renewal(1, format!("s{n}"), 10 + n as u64).await;
        }
        let b = r.bound(1).await.unwrap();
        assert_eq!(b.renewed_from.len(), MAX_RENEWAL_CHAIN);
        assert_eq!(b.serial, format!("s{}", MAX_RENEWAL_CHAIN + 5));
        // The oldest serials fell off the chain; a later one still leads to the newest.
        assert!(r.renewed_after("s0").await.is_empty());
        let after = r
            .renewed_after(&format!("s{}", MAX_RENEWAL_CHAIN + 3))
            .await;
        assert_eq!(
            after,
            vec![
                format!("s{}", MAX_RENEWAL_CHAIN + 4),
                format!("s{}", MAX_RENEWAL_CHAIN + 5)
            ]
        );
    }

    #[tokio::test]
    async fn only_live_local_certificates_near_their_end_are_due() {
        let r = Registry::default();
        for (id, spiffe, not_after, revoked) in [
            (1, "spiffe://td/a", 100, false),
            (2, "spiffe://td/b", 900, false),
            (3, "spiffe://other/c", 100, false),
            (4, "spiffe://td/d", 100, true),
        ] {
            let mut m = exec(id);
            let mut b = bound("s", not_after);
            b.spiffe_id = spiffe.into();
            b.revoked = revoked;
            m.bound = Some(b);
            m.agent_dir = Some(PathBuf::from("/dir"));
            r.hold().await.insert(id, m);
        }
        // One without files is not due either.
        let mut m = exec(5);
        m.bound = Some(bound("s", 100));
        r.hold().await.insert(5, m);
        let due: Vec<u64> = r
            .renewals_due(500, "spiffe://td/")
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(due, vec![1]);
        assert_eq!(r.launched(5).await.unwrap_err(), NotLaunched::NoFiles);
        assert_eq!(r.launched(9).await.unwrap_err(), NotLaunched::Unknown);
    }

    #[tokio::test]
    async fn a_configured_unit_restarted_replaces_its_earlier_cgroup() {
        let r = Registry::default();
        let at = || Managed::new(Cgroup::at(PathBuf::from("/x/unit")), None, Kind::Configured);
        let mut first = at();
        first.quarantined = true;
        assert!(r.put_configured(1, first).await.is_empty());
        assert!(r.configured_quarantined_at(Path::new("/x/unit")).await);
        assert_eq!(r.put_configured(2, at()).await, vec![1]);
        assert_eq!(r.kind_of(1).await, None);
        assert_eq!(r.kind_of(2).await, Some(Kind::Configured));
        assert!(!r.configured_quarantined_at(Path::new("/x/unit")).await);
    }
}
