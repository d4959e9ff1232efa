//! Identity in the daemon: enrollment (verify, attest, bind), revocation, renewal of the
//! certificates of launched agents, and the enrollment socket.

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

use super::{AdminError, Daemon, DaemonError, Kind, Managed};
use crate::{
    agentdir::{AgentDir, files},
    cgroup::Cgroup,
    identity::{
        attest::{self, Peer},
        enroll::{self, EnrollReply, EnrollRequest, Enrolled},
        revoke::Target,
        service::grant_for,
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

    /// At start: bindings that the kernel or their record show revoked, but that the
    /// revocation list does not cover. The previous daemon died between flagging the kernel
    /// and making the revocation durable (or could not write it): the flag is the evidence,
    /// and the certificate's serial is revoked again, durably, so that enrolling once more
    /// with it is refused (enrolling would rebind the cgroup without the flag). The original
    /// command had not succeeded; if it named the whole SPIFFE ID, it must be given again.
    pub(super) async fn recover_revocations(&self, revoked: Vec<(String, String, u64)>) {
        let mut recovered = Vec::new();
        for (spiffe_id, serial, cgroup_id) in revoked {
            if self.identity.check_revoked(&spiffe_id, &serial).is_err() {
                continue;
            }
            let Ok(target) = Target::parse(&serial) else {
                tracing::error!(cgroup_id, %spiffe_id, %serial, "a revoked binding's record holds no valid serial; its cgroup stays flagged in the kernel");
                self.count_error("revocation_recovery");
                continue;
            };
            self.identity.revoke(
                target,
                "recovered at restart: the kernel had this certificate's binding revoked, the \
                 revocation list did not",
                "agentwall",
            );
            tracing::error!(cgroup_id, %spiffe_id, %serial, "a revocation the previous daemon did not make durable was recovered from the kernel; its serial is revoked again (revoke the SPIFFE ID again if that was the target)");
            self.count_error("revocation_recovered");
            recovered.push((spiffe_id, serial, cgroup_id));
        }
        if recovered.is_empty() {
            return;
        }
        let identity = Arc::clone(&self.identity);
        match crate::sched::blocking(move || identity.save_revocations()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the recovered revocations are not persisted; they hold until the daemon restarts");
                self.count_error("revocation_save");
            }
            Err(e) => {
                tracing::error!(error = %e, "the recovered revocations are not persisted");
                self.count_error("revocation_save");
            }
        }
        for (spiffe_id, serial, cgroup_id) in recovered {
            self.audit
                .record(&crate::audit::schema::AuditRecord::Revoked {
                    target: format!("serial {serial}"),
                    spiffe_id: Some(spiffe_id),
                    reason: "recovered from the kernel's flag".into(),
                    by: "agentwall at restart".into(),
                    by_uid: None,
                    new: false,
                    cgroups: vec![cgroup_id],
                    sockets_destroyed: 0,
                    persisted: true,
                });
        }
    }

    /// Destroys the open TCP and UDP sockets of `cgroups`, in the daemon's network namespace
    /// and in those their processes are in.
    pub(super) async fn destroy_sockets(&self, cgroups: HashSet<u64>) -> Destroyed {
        let dirs: Vec<PathBuf> = {
            let registry = self.cgroups.lock().await;
            cgroups
                .iter()
                .filter_map(|id| registry.get(id))
                .map(|m| m.cgroup.path().to_path_buf())
                .collect()
        };
        let work = move || {
            let namespaces = sockdiag::foreign_namespaces(&dirs);
            sockdiag::destroy_sockets_in(&cgroups, &namespaces)
        };
        match crate::sched::blocking(work).await {
            Ok(Ok(d)) => {
                if d.failed > 0 {
                    self.count_error("socket_destroy");
                }
                d
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot destroy sockets (sock_diag); open flows are cut by the packet backstop instead");
                self.count_error("socket_destroy");
                Destroyed::default()
            }
            Err(e) => {
                tracing::error!(error = %e, "socket destruction task failed");
                self.count_error("socket_destroy");
                Destroyed::default()
            }
        }
    }

    /// Sets the revoked flag on every binding whose identity is revoked (after a restart, or
    /// a revocation list edited while the daemon was down). Returns the cgroups changed.
    ///
    /// Cgroups whose flag could not be written are returned as failures and tried again on
    /// the next call (the collector calls this every half second), so a failed write never
    /// leaves a revoked identity allowed for long.
    pub(super) async fn enforce_revocations(&self) -> (Vec<u64>, Vec<(u64, String)>) {
        let (mut hit, mut failed) = (Vec::new(), Vec::new());
        let mut registry = self.cgroups.lock().await;
        for (id, m) in registry.iter_mut() {
            let Some(b) = m.bound.as_mut() else {
                continue;
            };
            // Looked up in place: a copy of the whole list per revocation grew with it.
            if b.revoked || !b.cut_by(&self.identity) {
                continue;
            }
            let marked = self
                .enforcer
                .rebind(*id, |k| {
                    let k = k.unwrap_or_default();
                    Binding {
                        flags: k.flags | flags::REVOKED,
                        ..k
                    }
                })
                .await;
            if let Err(e) = marked {
                tracing::error!(cgroup_id = id, error = %e, "cannot mark a binding revoked; trying again");
                self.count_error("revoke_bind");
                failed.push((*id, e.to_string()));
                continue;
            }
            b.revoked = true;
            hit.push(*id);
        }
        (hit, failed)
    }

    pub async fn revoke(
        &self,
        target: &str,
        reason: &str,
        uid: u32,
    ) -> Result<super::Revoked, AdminError> {
        let started = std::time::Instant::now();
        let target = Target::parse(target).map_err(|e| AdminError::BadTarget(e.to_string()))?;
        if reason.trim().is_empty() {
            return Err(AdminError::NoReason);
        }
        let by = format!("uid {uid}");
        let new = self.identity.revoke(target.clone(), reason, &by);
        // Certificates the daemon renewed from a revoked one are revoked with it, so that the
        // newest of the chain cannot enroll anywhere either.
        if let Target::Serial(serial) = &target {
            let renewed: Vec<String> = self
                .cgroups
                .lock()
                .await
                .values()
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
                .collect();
            for later in renewed {
                self.identity.revoke(
                    Target::Serial(later),
                    &format!("renewed from revoked serial {serial}: {reason}"),
                    &by,
                );
            }
        }
        // The kernel first: new connects are denied from here on. Then the open sockets are
        // cut, and only then is the list made durable (a sync, about a millisecond here): a
        // connect already in flight is ended at once rather than after the sync. The command
        // reports success only once the list is durable.
        let (cgroups, failed) = self.enforce_revocations().await;
        let in_kernel_us = started.elapsed().as_micros();
        // In the kernel: the rest is ordinary work (on the admin thread, done here at normal
        // priority, without waking another thread that could take an agent's CPU).
        let _down = crate::sched::step_down();
        let destroyed = self
            .destroy_sockets(cgroups.iter().copied().collect())
            .await;
        let identity = Arc::clone(&self.identity);
        let saved = crate::sched::blocking(move || identity.save_revocations())
            .await
            .unwrap_or_else(|e| {
                Err(crate::identity::revoke::RevokeError::Write {
                    path: self.cfg.state_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let not_persisted = match saved {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "revocation not persisted; it holds until the daemon restarts");
                self.count_error("revocation_save");
                Some(e.to_string())
            }
        };
        self.save_enrollments_of(&cgroups).await;
        tracing::warn!(%target, reason, ?cgroups, sockets = destroyed.sockets, in_kernel_us, "identity revoked");
        self.audit
            .record(&crate::audit::schema::AuditRecord::Revoked {
                target: target.to_string(),
                spiffe_id: None,
                reason: reason.to_string(),
                by: format!("uid {uid}"),
                by_uid: Some(uid),
                new,
                cgroups: cgroups.clone(),
                sockets_destroyed: destroyed.sockets,
                persisted: not_persisted.is_none(),
            });
        if !failed.is_empty() {
            let which: Vec<String> = failed
                .iter()
                .map(|(id, e)| format!("cgroup {id}: {e}"))
                .collect();
            return Err(AdminError::RevocationNotInKernel {
                target: target.to_string(),
                failed: which,
            });
        }
        Ok(super::Revoked {
            target: target.to_string(),
            new,
            cgroups,
            sockets_destroyed: destroyed.sockets,
            not_persisted,
        })
    }

    /// The JWKS that verifies this node's JWT-SVIDs.
    pub fn jwks(&self) -> serde_json::Value {
        self.identity.jwks()
    }

    pub fn check_token(&self, token: &str, audience: &str) -> super::Checked {
        match self.identity.verify_token(token.trim(), audience) {
            Ok(c) => super::Checked {
                valid: true,
                spiffe_id: Some(c.sub),
                serial: Some(c.svid_serial),
                not_after: Some(
                    humantime::format_rfc3339_seconds(
                        SystemTime::UNIX_EPOCH + Duration::from_secs(c.exp),
                    )
                    .to_string(),
                ),
                message: "valid".into(),
            },
            Err(e) => invalid(e.to_string()),
        }
    }

    pub fn revocations(&self) -> Vec<crate::identity::revoke::Revocation> {
        self.identity.revocations()
    }

    /// Whether a certificate chain is valid here now (trust bundle, SPIFFE rules, revocation).
    pub fn check(&self, pem: &str) -> Result<super::Checked, AdminError> {
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
        let chain = match chain {
            Ok(c) if !c.is_empty() => c,
            _ => return Err(AdminError::NoCertificate),
        };
        Ok(match self.identity.verify(&chain, SystemTime::now()) {
            Ok(s) => super::Checked {
                valid: true,
                spiffe_id: Some(s.id.to_string()),
                serial: Some(s.serial),
                not_after: Some(humantime::format_rfc3339_seconds(s.not_after).to_string()),
                message: "valid".into(),
            },
            Err(e) => invalid(e.to_string()),
        })
    }

    /// Verifies the presented chain (trust, SPIFFE rules, revocation, expiry), finds the policy
    /// governing its identity and checks that policy's selectors against the peer.
    fn admit(
        &self,
        peer: &Peer,
        chain: &[CertificateDer<'_>],
    ) -> Result<(VerifiedSvid, Grant), String> {
        let svid = self
            .identity
            .verify(chain, SystemTime::now())
            .map_err(|e| e.to_string())?;
        if svid.not_after <= SystemTime::now() {
            // Within the clock tolerance of the verifier, but a binding would be dead on arrival.
            return Err(format!(
                "certificate rejected: it expired at {}; renew it",
                humantime::format_rfc3339_seconds(svid.not_after)
            ));
        }
        let grant = {
            let book = self
                .book
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            grant_for(
                &book.current.identities,
                &svid.id,
                self.identity.trust_domain(),
            )
            .cloned()
        };
        let Some(grant) = grant else {
            return Err(format!(
                "no policy governs {}; name it in a policy's `identity:` field",
                svid.id
            ));
        };
        attest::check(&grant.attest, peer).map_err(|e| {
            format!(
                "{e} (selectors of policy {} at {})",
                grant.policy, grant.source
            )
        })?;
        Ok((svid, grant))
    }

    /// A JWT-SVID for an attested holder of a certificate.
    pub(super) fn token(
        &self,
        peer: &Peer,
        chain: &[CertificateDer<'_>],
        audience: &[String],
    ) -> EnrollReply {
        let (svid, _) = match self.admit(peer, chain) {
            Ok(a) => a,
            Err(m) => return refuse(m),
        };
        let holder = crate::identity::token::Holder {
            id: &svid.id,
            serial: &svid.serial,
            not_after: svid.not_after,
        };
        match self.identity.issue_token(holder, audience) {
            Ok((token, claims)) => EnrollReply::Token {
                token,
                spiffe_id: claims.sub,
                expires_at: humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp),
                )
                .to_string(),
            },
            Err(e) => refuse(e.to_string()),
        }
    }

    /// Verifies, attests and binds one enrolling process.
    pub(super) async fn enroll(&self, peer: &Peer, chain: &[CertificateDer<'_>]) -> EnrollReply {
        let (svid, grant) = match self.admit(peer, chain) {
            Ok(a) => a,
            Err(m) => return refuse(m),
        };
        let id_text = svid.id.to_string();
        let rel = peer.cgroup.trim_start_matches('/');
        if rel.is_empty() {
            return refuse(
                "the process is in the root cgroup, which agentwall never enforces; start it in \
                 a cgroup of its own (agentwall exec --cert, or systemd-run --scope)",
            );
        }
        let cg = match Cgroup::under(&self.mount, rel) {
            Ok(cg) => cg,
            Err(e) => return refuse(e.to_string()),
        };
        // Placed by its cgroup id, the path was just checked to have it (see `CgroupNames`).
        let cgroup_id = match peer.cgroup_id.map_or_else(|| cg.id(), Ok) {
            Ok(id) => id,
            Err(e) => return refuse(e.to_string()),
        };
        self.cgroup_names.learn(cgroup_id, &peer.cgroup);
        let inside = cg.path().starts_with(self.root.path()) && cg.path() != self.root.path();
        if !inside && grant.attest.cgroup.is_none() {
            return refuse(format!(
                "cgroup {} is outside agentwall's subtree {}; policy {} must name the cgroups \
                 its agents may enroll from with attest.cgroup before agentwall enforces there",
                peer.cgroup,
                self.root.path().display(),
                grant.policy
            ));
        }
        let (slot, mode) = {
            let book = self
                .book
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match book.current.policies.get(&grant.policy) {
                Some(p) => *p,
                None => return refuse(format!("policy {} is not loaded", grant.policy)),
            }
        };
        let mut registry = self.cgroups.lock().await;
        if let Some(other) = registry
            .get(&cgroup_id)
            .and_then(|m| m.bound.as_ref())
            .filter(|b| b.spiffe_id != id_text)
        {
            return refuse(format!(
                "cgroup {} is already bound to {}; one identity per cgroup",
                peer.cgroup, other.spiffe_id
            ));
        }
        if let Some(cut) = registry
            .get(&cgroup_id)
            .and_then(|m| m.bound.as_ref())
            .filter(|b| b.revoked)
        {
            return refuse(format!(
                "cgroup {} was cut by the revocation of certificate {} ({}); it stays denied \
                 whatever certificate enrolls: start the agent in a new cgroup (a new \
                 `agentwall exec`, or a restart of its unit)",
                peer.cgroup, cut.serial, cut.spiffe_id
            ));
        }
        if let Some(m) = registry.get(&cgroup_id)
            && m.bound.is_none()
            && m.policy.is_some()
        {
            return refuse(format!(
                "cgroup {} runs under policy {} by `agentwall exec --policy`; it cannot take an identity",
                peer.cgroup,
                m.policy.as_deref().unwrap_or_default()
            ));
        }
        if !inside
            && !registry.contains_key(&cgroup_id)
            && let Err(e) = self.enforcer.attach(cg.clone()).await
        {
            self.count_error("enroll_attach");
            return refuse(format!("cannot enforce cgroup {}: {e}", peer.cgroup));
        }
        let expires_boot_ns = boot_ns_at(svid.not_after);
        // The mode is read again as the binding is written, in the same step: a reload that
        // switched it after `mode` was read has either not swapped its rule book yet (its
        // pass over the bindings then comes after and finds this one), or has, and this
        // reads the new mode. Either way no stale audit flag stays.
        let book = Arc::clone(&self.book);
        let mode_flag = move || {
            let book = book
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = book
                .current
                .policies
                .values()
                .find(|(s, _)| *s == slot)
                .map_or(mode, |(_, m)| *m);
            if now == Mode::Audit { flags::AUDIT } else { 0 }
        };
        // A quarantine, a hold while the audit log is down, or a revocation the registry does
        // not know of (its record was lost) stays in force.
        let rebound = self
            .enforcer
            .rebind(cgroup_id, move |old| Binding {
                slot,
                flags: old.map_or(0, |b| {
                    b.flags & (flags::DENY_ALL | flags::AUDIT_HOLD | flags::REVOKED)
                }) | mode_flag(),
                expires_boot_ns,
            })
            .await;
        let old = match rebound {
            Ok(old) => old,
            Err(e) => {
                self.count_error("enroll_bind");
                return refuse(format!("cannot bind cgroup {}: {e}", peer.cgroup));
            }
        };
        if old.is_some_and(|b| b.flags & flags::REVOKED != 0) {
            // The kernel kept the flag (see above): the cgroup stays cut.
            return refuse(format!(
                "cgroup {} was cut by a revocation; it stays denied whatever certificate \
                 enrolls: start the agent in a new cgroup",
                peer.cgroup
            ));
        }
        // The process must still be the one attested when the binding lands.
        if let Err(e) = peer.still_there() {
            // Back to what it was; a cgroup that had no binding is left denying everything.
            let undo = old.unwrap_or(Binding {
                slot,
                flags: flags::DENY_ALL,
                expires_boot_ns,
            });
            if self.enforcer.bind(cgroup_id, undo).await.is_err() {
                self.count_error("enroll_bind");
            }
            return refuse(e.to_string());
        }
        // The same certificate enrolling again keeps the chain it was renewed along.
        let renewed_from = registry
            .get(&cgroup_id)
            .and_then(|m| m.bound.as_ref())
            .filter(|b| b.spiffe_id == id_text && b.serial == svid.serial)
            .map(|b| b.renewed_from.clone())
            .unwrap_or_default();
        let bound = Bound {
            spiffe_id: id_text.clone(),
            serial: svid.serial.clone(),
            not_after: unix_secs(svid.not_after),
            capabilities: svid.capabilities.clone(),
            revoked: false,
            renewed_from,
        };
        let entry = registry.entry(cgroup_id).or_insert_with(|| {
            Managed::new(
                cg.clone(),
                None,
                if inside { Kind::Exec } else { Kind::Enrolled },
            )
        });
        // An agent enrolling again with the same certificate changes nothing to record.
        let changed = entry.policy.as_deref() != Some(grant.policy.as_str())
            || entry.bound.as_ref() != Some(&bound);
        entry.policy = Some(grant.policy.clone());
        entry.bound = Some(bound.clone());
        let wants_token = entry.agent_dir.is_some() && !entry.audience.is_empty();
        drop(registry);
        if wants_token && let Err(e) = self.refresh_token(cgroup_id).await {
            tracing::warn!(cgroup_id, error = %e, "cannot write the agent's token");
            self.count_error("token");
        }
        if changed {
            self.save_enrollments_of(&[cgroup_id]).await;
        }
        // The audit log records every enrollment; the daemon's log only when asked for.
        tracing::debug!(spiffe_id = %id_text, serial = %svid.serial, pid = peer.pid, cgroup = %peer.cgroup, policy = %grant.policy, source = ?peer.source, "enrolled");
        self.audit
            .record(&crate::audit::schema::AuditRecord::Enrolled {
                spiffe_id: id_text.clone(),
                serial: svid.serial.clone(),
                policy: grant.policy.clone(),
                pid: peer.pid,
                uid: peer.uid,
                exe: peer.exe.display().to_string(),
                cgroup: peer.cgroup.clone(),
                cgroup_id,
                expires_at: bound.expires_at(),
                peer_source: peer.source,
            });
        EnrollReply::Enrolled(Enrolled {
            spiffe_id: id_text,
            serial: svid.serial,
            policy: grant.policy,
            cgroup: peer.cgroup.clone(),
            cgroup_id,
            expires_at: bound.expires_at(),
        })
    }

    /// Renews the certificate of one launched agent into its directory and extends its
    /// binding. Returns the new serial.
    async fn renew(&self, cgroup_id: u64) -> Result<String, String> {
        let (bound, dir) = {
            let registry = self.cgroups.lock().await;
            let m = registry.get(&cgroup_id).ok_or("no such cgroup")?;
            match (&m.bound, &m.agent_dir) {
                (Some(b), Some(d)) => (b.clone(), d.clone()),
                _ => return Err("not an agent launched with --cert".into()),
            }
        };
        if bound.revoked {
            return Err("revoked".into());
        }
        let id = SpiffeId::workload(&bound.spiffe_id).map_err(|e| e.to_string())?;
        if id.trust_domain() != self.identity.trust_domain() {
            return Err(format!(
                "{} belongs to trust domain {}, whose CA is not this daemon's; renew it there",
                bound.spiffe_id,
                id.trust_domain()
            ));
        }
        let req = LeafRequest {
            id,
            lifetime: self.identity.config().svid_lifetime,
            capabilities: bound.capabilities.clone(),
        };
        let issued = self
            .identity
            .issue(&req, &format!("agentwall renewal for cgroup {cgroup_id}"))
            .map_err(|e| e.to_string())?;
        // The files keep the owner the launcher gave the key (the user the agent runs as).
        let dir = AgentDir::open(&dir).map_err(|e| e.to_string())?;
        let owner = dir.owner_of(files::KEY).map_err(|e| e.to_string())?;
        dir.write_svid(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), owner)
            .map_err(|e| e.to_string())?;
        // Read and written in one enforcer job: a revocation that lands meanwhile keeps its
        // flag (a read, then a separate write, would put the flagless binding back).
        let expires_boot_ns = boot_ns_at(issued.not_after);
        let before = self
            .enforcer
            .rebind(cgroup_id, move |old| {
                let k = old.unwrap_or(Binding {
                    slot: 0,
                    flags: flags::DENY_ALL,
                    expires_boot_ns: 0,
                });
                if old.is_none() || k.flags & flags::REVOKED != 0 {
                    k
                } else {
                    Binding {
                        expires_boot_ns,
                        ..k
                    }
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        if before.is_none() {
            return Err("the cgroup has no binding".into());
        }
        if let Some(m) = self.cgroups.lock().await.get_mut(&cgroup_id)
            && let Some(b) = m.bound.as_mut()
        {
            let previous = std::mem::replace(&mut b.serial, issued.serial.clone());
            b.renewed_from.push(previous);
            let excess = b.renewed_from.len().saturating_sub(MAX_RENEWAL_CHAIN);
            b.renewed_from.drain(..excess);
            b.not_after = unix_secs(issued.not_after);
        }
        // A revocation of an earlier serial that came while this certificate was being made
        // found no chain to follow yet: it follows it now.
        let cut = self
            .cgroups
            .lock()
            .await
            .get(&cgroup_id)
            .and_then(|m| m.bound.as_ref())
            .is_some_and(|b| {
                b.renewed_from
                    .iter()
                    .any(|s| self.identity.check_revoked(&b.spiffe_id, s).is_err())
            });
        if cut {
            self.identity.revoke(
                Target::Serial(issued.serial.clone()),
                "renewed from a serial revoked during the renewal",
                "agentwall",
            );
            let _ = self.enforce_revocations().await;
            let identity = Arc::clone(&self.identity);
            if let Ok(Err(e)) = crate::sched::blocking(move || identity.save_revocations()).await {
                tracing::error!(error = %e, "revocation not persisted; it holds until the daemon restarts");
                self.count_error("revocation_save");
            }
            return Err("an earlier certificate of this agent was revoked".into());
        }
        self.save_enrollments_of(&[cgroup_id]).await;
        tracing::info!(cgroup_id, serial = %issued.serial, "renewed an agent's certificate");
        self.audit
            .record(&crate::audit::schema::AuditRecord::CertificateRenewed {
                spiffe_id: issued.id.to_string(),
                serial: issued.serial.clone(),
                previous_serial: bound.serial.clone(),
                not_after: humantime::format_rfc3339_seconds(issued.not_after).to_string(),
                sha256: issued.sha256.clone(),
                cgroup_id,
            });
        Ok(issued.serial)
    }

    /// Writes a fresh JWT-SVID into a launched agent's directory.
    async fn refresh_token(&self, cgroup_id: u64) -> Result<(), String> {
        let (bound, audience, dir) = {
            let registry = self.cgroups.lock().await;
            let m = registry.get(&cgroup_id).ok_or("no such cgroup")?;
            match (&m.bound, &m.agent_dir) {
                (Some(b), Some(d)) if !b.revoked => (b.clone(), m.audience.clone(), d.clone()),
                _ => return Err("no live identity".into()),
            }
        };
        let id = SpiffeId::workload(&bound.spiffe_id).map_err(|e| e.to_string())?;
        let holder = crate::identity::token::Holder {
            id: &id,
            serial: &bound.serial,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(bound.not_after),
        };
        let (token, claims) = self
            .identity
            .issue_token(holder, &audience)
            .map_err(|e| e.to_string())?;
        let dir = AgentDir::open(&dir).map_err(|e| e.to_string())?;
        let owner = dir.owner_of(files::KEY).map_err(|e| e.to_string())?;
        dir.write(files::TOKEN, token.as_bytes(), 0o600, owner)
            .map_err(|e| e.to_string())?;
        if let Some(m) = self.cgroups.lock().await.get_mut(&cgroup_id) {
            m.token_exp = claims.exp;
        }
        Ok(())
    }

    /// Renews every launched agent whose certificate expires within `within`.
    pub(super) async fn renew_due(&self, within: Duration) -> (usize, Vec<String>) {
        let limit = unix_secs(SystemTime::now() + within);
        let local = format!("spiffe://{}/", self.identity.trust_domain());
        let due: Vec<u64> = self
            .cgroups
            .lock()
            .await
            .iter()
            // Only agents whose certificate lives in their directory (`exec --cert`).
            .filter(|(_, m)| {
                m.agent_dir
                    .as_ref()
                    .is_some_and(|d| d.join(files::CERT).exists())
            })
            // Only this daemon's CA can renew: certificates of other trust domains run out.
            .filter(|(_, m)| {
                m.bound.as_ref().is_some_and(|b| {
                    !b.revoked && b.not_after <= limit && b.spiffe_id.starts_with(&local)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        // Tokens are refreshed at half their lifetime.
        let half = self.identity.config().token_lifetime / 2;
        let token_limit = unix_secs(SystemTime::now() + half);
        let tokens: Vec<u64> = self
            .cgroups
            .lock()
            .await
            .iter()
            .filter(|(_, m)| m.agent_dir.is_some() && !m.audience.is_empty())
            .filter(|(_, m)| m.bound.as_ref().is_some_and(|b| !b.revoked))
            .filter(|(_, m)| m.token_exp <= token_limit)
            .map(|(id, _)| *id)
            .collect();
        for id in tokens {
            if let Err(e) = self.refresh_token(id).await {
                tracing::warn!(cgroup_id = id, error = %e, "cannot refresh an agent's token");
                self.count_error("token");
            }
        }
        let (mut ok, mut failed) = (0, Vec::new());
        for id in due {
            match self.renew(id).await {
                Ok(_) => ok += 1,
                Err(e) => {
                    tracing::warn!(cgroup_id = id, error = %e, "cannot renew an agent's certificate");
                    self.count_error("renew");
                    failed.push(format!("cgroup {id}: {e}"));
                }
            }
        }
        (ok, failed)
    }

    /// Renews every launched agent's certificate now; returns how many.
    pub async fn rotate(&self) -> Result<usize, AdminError> {
        let (ok, failed) = self
            .renew_due(Duration::from_secs(u64::from(u32::MAX)))
            .await;
        if failed.is_empty() {
            Ok(ok)
        } else {
            Err(AdminError::Renewal {
                renewed: ok,
                failed,
            })
        }
    }
}

/// Enrollments in progress at once (threads of the enrollment pool). Beyond that, new
/// connections wait in the socket's backlog; each enrollment is bounded by
/// [`enroll::CLIENT_TIMEOUT`], so a flood of idle connections delays enrollments but cannot
/// exhaust the daemon.
const MAX_ENROLL_THREADS: usize = crate::limits::ENROLL_THREADS;
/// Enrollments of one user (peer uid) in progress at once. The socket is open to every user:
/// one holding many connections idle or slow keeps at most this many threads, and the rest of
/// its connections are refused at once, so that others' enrollments go on.
pub(super) const MAX_ENROLLMENTS_PER_UID: usize = 16;
/// Enrollments from one cgroup in progress at once: agents often share a user, and one of
/// them holding connections must not keep the others of that user from enrolling. (A user
/// that can make cgroups of its own is still bounded by [`MAX_ENROLLMENTS_PER_UID`].)
pub(super) const MAX_ENROLLMENTS_PER_CGROUP: usize = 4;
/// Enrollment threads kept waiting in `accept` when there is nothing to do.
const SPARE_ENROLL_THREADS: usize = 2;
/// A thread beyond the spare ones that waited this long for a connection ends.
const ENROLL_THREAD_IDLE: Duration = Duration::from_secs(10);

/// The enrollment pool: threads that each accept a connection and handle it to the end. A
/// handshake is a short burst of computation between a few blocking reads and writes; doing
/// it on the thread that accepted it costs no hand-over.
///
/// Idle threads wait in epoll, each with its own instance, on the listener registered with
/// `EPOLLEXCLUSIVE`: the kernel wakes one thread per connection, the first in registration
/// order that is waiting at that moment. Agents enrolling one after another are so served by
/// the same thread, whose memory is still in the caches; threads waiting in `accept` itself
/// would take turns (the kernel queues them in the order they began waiting), and each
/// enrollment would start on the thread that had been idle longest.
struct EnrollPool {
    /// Non-blocking: a woken thread whose connection another thread took sees `WouldBlock`.
    listener: std::os::unix::net::UnixListener,
    daemon: Arc<Daemon>,
    rt: tokio::runtime::Handle,
    /// Threads in the pool, and those of them waiting for a connection.
    threads: std::sync::atomic::AtomicUsize,
    idle: std::sync::atomic::AtomicUsize,
    /// Enrollments in progress per peer uid and per peer cgroup.
    in_progress: std::sync::Mutex<InProgress>,
}

#[derive(Default)]
struct InProgress {
    per_uid: HashMap<u32, usize>,
    per_cgroup: HashMap<String, usize>,
}

fn give_back<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// A peer's place among the enrollments in progress; given back when dropped.
struct PeerTurn<'a> {
    pool: &'a EnrollPool,
    uid: u32,
    cgroup: String,
}

impl Drop for PeerTurn<'_> {
    fn drop(&mut self) {
        let mut p = self
            .pool
            .in_progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        give_back(&mut p.per_uid, &self.uid);
        give_back(&mut p.per_cgroup, &self.cgroup);
    }
}

/// Serves the enrollment socket from a pool of blocking threads (see [`EnrollPool`]).
pub(super) fn serve_enroll(listener: UnixListener, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    listener.set_nonblocking(true)?;
    let pool = Arc::new(EnrollPool {
        listener,
        daemon,
        rt: tokio::runtime::Handle::current(),
        threads: std::sync::atomic::AtomicUsize::new(0),
        idle: std::sync::atomic::AtomicUsize::new(0),
        in_progress: std::sync::Mutex::default(),
    });
    for _ in 0..SPARE_ENROLL_THREADS {
        EnrollPool::spawn(&pool)?;
    }
    Ok(())
}

impl EnrollPool {
    fn spawn(pool: &Arc<Self>) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        pool.threads.fetch_add(1, SeqCst);
        let p = Arc::clone(pool);
        std::thread::Builder::new()
            .name("agentwall-enroll".into())
            .spawn(move || p.run())
            .map(drop)
            .inspect_err(|_| {
                pool.threads.fetch_sub(1, SeqCst);
            })
    }

    /// A turn for the peer of `stream`, unless its cgroup has [`MAX_ENROLLMENTS_PER_CGROUP`]
    /// or its user [`MAX_ENROLLMENTS_PER_UID`] enrollments in progress: that peer is told so
    /// in one plain line (before any TLS: `agentwall`'s client shows it as it is) and the
    /// connection is closed.
    fn turn_for(&self, stream: &std::os::unix::net::UnixStream) -> Option<PeerTurn<'_>> {
        use std::io::Write as _;
        // A peer whose credentials or cgroup cannot be read counts as one of its own kind.
        let cred =
            nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok();
        let uid = cred.map_or(u32::MAX, |c| c.uid());
        let cgroup = cred
            .and_then(|c| crate::identity::attest::cgroup_of(c.pid()).ok())
            .unwrap_or_else(|| "(unknown)".into());
        let refused = {
            let mut p = self
                .in_progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let by_uid = p.per_uid.get(&uid).copied().unwrap_or(0);
            let by_cgroup = p.per_cgroup.get(&cgroup).copied().unwrap_or(0);
            if by_cgroup >= MAX_ENROLLMENTS_PER_CGROUP {
                format!(
                    "{MAX_ENROLLMENTS_PER_CGROUP} enrollments from cgroup {cgroup} are in progress, the most one cgroup may have"
                )
            } else if by_uid >= MAX_ENROLLMENTS_PER_UID {
                format!(
                    "{MAX_ENROLLMENTS_PER_UID} enrollments of uid {uid} are in progress, the most one user may have"
                )
            } else {
                *p.per_uid.entry(uid).or_default() += 1;
                *p.per_cgroup.entry(cgroup.clone()).or_default() += 1;
                return Some(PeerTurn {
                    pool: self,
                    uid,
                    cgroup,
                });
            }
        };
        self.daemon.count_error("enroll_busy_refused");
        tracing::debug!(uid, %cgroup, "enrollment refused: too many in progress for this peer");
        let _ = stream.set_nonblocking(true);
        let _ = (&*stream).write_all(
            format!(
                "{}{refused}: try again once they are done\n",
                enroll::BUSY_PREFIX
            )
            .as_bytes(),
        );
        None
    }

    /// This thread's wait for connections (see [`EnrollPool`]).
    fn waiter(&self) -> nix::Result<nix::sys::epoll::Epoll> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            &self.listener,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, 0),
        )?;
        Ok(epoll)
    }

    fn run(self: Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        crate::sched::may_block_here();
        // Without its epoll instance (out of file descriptors) the thread cannot wait: it
        // tries again rather than end, so that the pool never runs out of threads.
        let waiter = loop {
            match self.waiter() {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, "an enrollment thread cannot wait for connections");
                    self.daemon.count_error("enroll_thread");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let idle_wait = nix::sys::epoll::EpollTimeout::try_from(ENROLL_THREAD_IDLE)
            .unwrap_or(nix::sys::epoll::EpollTimeout::MAX);
        loop {
            // A connection that came while every thread was busy is taken before waiting.
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.idle.fetch_add(1, SeqCst);
                    let mut events = [nix::sys::epoll::EpollEvent::empty()];
                    let woken = waiter.wait(&mut events, idle_wait);
                    self.idle.fetch_sub(1, SeqCst);
                    match woken {
                        Ok(0) => {
                            // Idle for ENROLL_THREAD_IDLE: a surplus thread ends.
                            let left = self.threads.fetch_sub(1, SeqCst) - 1;
                            if left >= SPARE_ENROLL_THREADS {
                                return;
                            }
                            self.threads.fetch_add(1, SeqCst);
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "waiting for enrollments failed");
                            self.daemon.count_error("enroll_accept");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "enrollment socket accept failed");
                    self.daemon.count_error("enroll_accept");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Some(_turn) = self.turn_for(&stream) else {
                continue;
            };
            // No thread is left waiting: another one takes over the waiting.
            if self.idle.load(SeqCst) == 0 {
                if self.threads.load(SeqCst) < MAX_ENROLL_THREADS {
                    if let Err(e) = Self::spawn(&self) {
                        tracing::warn!(error = %e, "cannot start an enrollment thread");
                        self.daemon.count_error("enroll_thread");
                    }
                } else {
                    tracing::warn!(
                        "{MAX_ENROLL_THREADS} enrollments in progress; further ones wait their turn"
                    );
                    self.daemon.count_error("enroll_busy");
                }
            }
            // A connection that panics must not take the pool with it.
            let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                enroll_connection(stream, &self.daemon, &self.rt)
            }));
            match handled {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "enrollment connection failed"),
                Err(_) => {
                    tracing::error!("an enrollment panicked; the enrollment socket goes on");
                    self.daemon.count_error("enroll_panic");
                }
            }
        }
    }
}

/// A stream whose reads and writes give up at a deadline: the whole exchange is bounded, not
/// each operation (a client trickling bytes cannot hold a thread for long). Reads wait in
/// `poll` until the deadline (see [`enroll::read_when_readable`]); the socket's send timeout
/// is set again only when the time left has shrunk by a quarter, which keeps the bound
/// within 4/3 of the deadline at a fraction of the system calls.
struct Deadline {
    sock: std::os::unix::net::UnixStream,
    until: std::time::Instant,
    write_timeout: Option<Duration>,
}

impl Deadline {
    fn new(sock: std::os::unix::net::UnixStream, within: Duration) -> Self {
        Self {
            sock,
            until: std::time::Instant::now() + within,
            write_timeout: None,
        }
    }

    /// The time left, and whether a timeout set earlier must shrink to it.
    fn left(&self, set: Option<Duration>) -> std::io::Result<Option<Duration>> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the enrollment took too long",
            ));
        }
        Ok(match set {
            Some(t) if left * 4 >= t * 3 => None,
            _ => Some(left),
        })
    }
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        enroll::read_when_readable(&self.sock, buf, self.until, "the enrollment took too long")
    }
}

impl std::io::Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(t) = self.left(self.write_timeout)? {
            self.sock.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.sock.write(buf)
    }

    // rustls hands over a flight as several records: one writev, one wake-up of the client.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        if let Some(t) = self.left(self.write_timeout)? {
            self.sock.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

fn enroll_connection(
    stream: std::os::unix::net::UnixStream,
    daemon: &Daemon,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    use std::io::{BufRead as _, Read as _, Write as _};
    // The peer is identified from the socket before any byte is read.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)
        .and_then(|cred| {
            Peer::of_socket(
                stream.as_raw_fd(),
                Some(cred.pid()),
                cred.uid(),
                cred.gid(),
                &|id| daemon.cgroup_names.name(&daemon.mount, id),
            )
            .map_err(std::io::Error::other)
        });
    let tls_config = daemon
        .identity
        .server_tls()
        .map_err(std::io::Error::other)?;
    let conn = rustls::ServerConnection::new(tls_config).map_err(std::io::Error::other)?;
    let sock = Deadline::new(stream, enroll::CLIENT_TIMEOUT);
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut line = String::new();
    std::io::BufReader::new((&mut tls).take(enroll::MAX_LINE as u64)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<EnrollRequest>(line.trim_end()) {
        Err(e) => refuse(format!(
            "bad request: {e}; send one JSON line such as {{\"op\":\"enroll\"}}"
        )),
        Ok(req) => match &peer {
            Err(e) => refuse(format!("cannot identify the enrolling process: {e}")),
            Ok(peer) => {
                let chain: Vec<CertificateDer<'static>> = tls
                    .conn
                    .peer_certificates()
                    .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                    .unwrap_or_default();
                match req {
                    EnrollRequest::Enroll => rt.block_on(daemon.enroll(peer, &chain)),
                    EnrollRequest::Token { audience } => daemon.token(peer, &chain, &audience),
                }
            }
        },
    };
    match &reply {
        EnrollReply::Error { message } => {
            tracing::warn!(%message, pid = peer.as_ref().map(|p| p.pid).unwrap_or(0), "enrollment refused");
            daemon.count_error("enroll_refused");
            daemon
                .audit
                .record(&crate::audit::schema::AuditRecord::EnrollRefused {
                    reason: message.clone(),
                    pid: peer.as_ref().map(|p| p.pid).ok(),
                    uid: peer.as_ref().map(|p| p.uid).ok(),
                    exe: peer.as_ref().map(|p| p.exe.display().to_string()).ok(),
                    cgroup: peer.as_ref().map(|p| p.cgroup.clone()).ok(),
                });
        }
        EnrollReply::Token {
            spiffe_id,
            expires_at,
            ..
        } => daemon
            .audit
            .record(&crate::audit::schema::AuditRecord::TokenIssued {
                spiffe_id: spiffe_id.clone(),
                expires_at: expires_at.clone(),
            }),
        EnrollReply::Enrolled(_) => {}
    }
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    // The reply and the close_notify leave in one write.
    tls.conn.writer().write_all(&out)?;
    tls.conn.send_close_notify();
    tls.flush()
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
    use std::io::Read as _;

    use super::*;

    #[test]
    fn a_silent_client_is_dropped_at_the_deadline() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut d = Deadline::new(a, Duration::from_millis(50));
        let t = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let e = d.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        // Past the deadline nothing is even tried.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            d.read(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
    }

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
