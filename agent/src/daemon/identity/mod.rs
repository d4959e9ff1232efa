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
use tokio::net::UnixListener;

mod admission;
mod renew;
mod revocation;
mod socket;
mod svids;
mod workload;

pub(super) use self::socket::serve_enroll;
pub(crate) use self::svids::{Issue, Svids, X509Svid};
pub use self::workload::ExecIdentityError;
pub(crate) use self::workload::{Caller, Entitled, RefusalBudget, WorkloadRefusal};
use super::{
    AdminError, Daemon, DaemonError,
    registry::{Bound, Kind, Managed, Record},
};
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

pub(in crate::daemon) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `CLOCK_BOOTTIME` nanoseconds at wall-clock instant `at` (what the kernel compares expiry
/// with: it keeps counting across suspend and does not jump with the wall clock).
pub(in crate::daemon) fn boot_ns_at(at: SystemTime) -> u64 {
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
        if let Err(e) = self.enrollments.save_all(&self.registry).await {
            tracing::error!(error = %e, "cannot save the enrollment records");
            self.count_error("enrollments_save");
        }
    }

    /// [`Self::save_enrollments`] after a change to `ids` only.
    pub(super) async fn save_enrollments_of(&self, ids: &[u64]) {
        if let Err(e) = self.enrollments.save_some(&self.registry, ids).await {
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
