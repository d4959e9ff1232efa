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
pub(super) fn record_of(cgroup_id: u64, m: &Managed) -> Option<Record> {
    (m.bound.is_some() || m.agent_dir.is_some()).then(|| Record {
        cgroup_id,
        cgroup: m.cgroup.path().display().to_string(),
        kind: m.kind,
        bound: m.bound.clone(),
        agent_dir: m.agent_dir.clone(),
        audience: m.audience.clone(),
    })
}

impl Daemon {
    /// The enrollment records of the previous daemon; damage is logged and counted, and
    /// what came before it is used.
    pub(super) async fn load_enrollments(&self) -> Vec<Record> {
        match self.enrollments.load().await {
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
                tracing::error!(error = %e, "identities of bound cgroups are unknown until they enroll again");
                self.count_error("enrollments_corrupt");
                Vec::new()
            }
        }
    }

    /// Makes the enrollment records durable if they changed (see
    /// [`super::enrollments::Enrollments::save_all`]); a failure is logged and counted.
    pub(super) async fn save_enrollments(&self) {
        if let Err(e) = self.enrollments.save_all(&self.cgroups).await {
            tracing::error!(error = %e, "cannot save the enrollment records");
            self.count_error("enrollments_save");
        }
    }

    /// [`Self::save_enrollments`] after a change to `ids` only.
    pub(super) async fn save_enrollments_of(&self, ids: &[u64]) {
        if let Err(e) = self.enrollments.save_some(&self.cgroups, ids).await {
            tracing::error!(error = %e, "cannot save the enrollment records");
            self.count_error("enrollments_save");
        }
    }

    /// Creates the directory of an agent launched with `agentwall exec --cert` (the
    /// daemon's, not writable by the agent: see [`crate::agentdir`]).
    pub(super) fn identity_agent_dir(&self, cgroup_id: u64) -> Result<PathBuf, DaemonError> {
        let dir = AgentDir::create(&self.cfg.identity.agent_dir, &cgroup_id.to_string())?;
        Ok(dir.path().to_path_buf())
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
