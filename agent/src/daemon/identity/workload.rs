//! Agents of the SPIFFE Workload API (`agentwall exec --identity`): their X509-SVIDs, made
//! and renewed here with keys that stay in the daemon's memory, and who may ask for them.

use super::*;
use crate::identity::{attest::AttestError, spiffe::IdError};

/// A caller of the Workload API: the process that connected, and the cgroup it was in then.
/// Its identity is that of this cgroup, for as long as it stays there.
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) peer: crate::identity::attest::Peer,
    pub(crate) cgroup_id: u64,
    /// Set once a call of this connection was found entitled (see `workload::conn`).
    pub(crate) entitled: std::sync::atomic::AtomicBool,
}

/// Refusals recorded per uid: any local user can call the Workload API as often as it likes,
/// and its refusals must not fill the audit log or stall its writer. Each uid has
/// [`REFUSALS_PER_SECOND`] records a second, and all uids together [`REFUSALS_PER_SECOND_ALL`]
/// (a user may hold many uids); the rest are counted, and the uid's next record says how
/// many went unrecorded.
#[derive(Debug, Default)]
pub(crate) struct RefusalBudget(std::sync::Mutex<(Option<Window>, HashMap<u32, Window>)>);

/// One uid's current second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    start: std::time::Instant,
    recorded: u32,
    suppressed: u64,
}

/// Records of refusals per uid per second.
pub(crate) const REFUSALS_PER_SECOND: u32 = 10;
/// Records of refusals per second, all uids together.
pub(crate) const REFUSALS_PER_SECOND_ALL: u32 = 200;
/// Uids tracked at once; past it, windows that ended are dropped (their counts with them).
const REFUSAL_UIDS: usize = 4096;

impl RefusalBudget {
    /// `Some(n)`: record this refusal, `n` of the uid's went unrecorded before it. `None`:
    /// over the budget, counted.
    pub(crate) fn admit(&self, uid: u32, now: std::time::Instant) -> Option<u64> {
        let second = std::time::Duration::from_secs(1);
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (all, m) = &mut *guard;
        let all = all.get_or_insert(Window {
            start: now,
            recorded: 0,
            suppressed: 0,
        });
        if now.duration_since(all.start) >= second {
            (all.start, all.recorded) = (now, 0);
        }
        if m.len() >= REFUSAL_UIDS && !m.contains_key(&uid) {
            m.retain(|_, w| now.duration_since(w.start) < second);
            if m.len() >= REFUSAL_UIDS {
                return None;
            }
        }
        let w = m.entry(uid).or_insert(Window {
            start: now,
            recorded: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= second {
            w.start = now;
            w.recorded = 0;
        }
        if w.recorded >= REFUSALS_PER_SECOND || all.recorded >= REFUSALS_PER_SECOND_ALL {
            w.suppressed += 1;
            return None;
        }
        w.recorded += 1;
        all.recorded += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// Why the Workload API gives a caller nothing. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkloadRefusal {
    #[error("the calling process (pid {0}) exited; the answer would reach whoever has its socket")]
    Gone(i32),
    #[error("cannot identify the calling process: {0}")]
    Attest(AttestError),
    #[error(
        "the calling process moved from cgroup {was} to cgroup {now} after it connected; its \
         identity is that of the cgroup it connected from: connect again"
    )]
    Moved { was: u64, now: u64 },
    #[error(
        "no identity issued: cgroup {cgroup} is not bound to an identity (launch the agent with \
         `agentwall exec --identity ID`)"
    )]
    NoIdentity { cgroup: String },
    #[error("no identity issued: {spiffe_id} (serial {serial}) of cgroup {cgroup} is revoked")]
    Revoked {
        spiffe_id: String,
        serial: String,
        cgroup: String,
    },
    #[error("no identity issued: no loaded policy governs {0} any more")]
    Ungoverned(String),
    #[error("no identity issued: {mismatch} (selectors of policy {policy} at {source_at})")]
    Selectors {
        mismatch: attest::Mismatch,
        policy: String,
        source_at: String,
    },
    #[error(
        "no X509-SVID for cgroup {cgroup}: it enrolled with a key of its own, which agentwall \
         never held (JWT-SVIDs and bundles are served; launch the agent with `agentwall exec \
         --identity` for an X509-SVID from here)"
    )]
    KeyNotHeld { cgroup: String },
    #[error("the identity {spiffe_id} of cgroup {cgroup} is not a workload ID: {error}")]
    BadId {
        spiffe_id: String,
        cgroup: String,
        error: IdError,
    },
}

impl WorkloadRefusal {
    /// The caller has no identity here (the specification's PermissionDenied), as opposed to
    /// a caller that could not be identified.
    pub(crate) fn is_denial(&self) -> bool {
        !matches!(self, Self::Gone(_) | Self::Attest(_))
    }
}

/// What a caller of the Workload API is entitled to: the identity of its cgroup.
#[derive(Debug, Clone)]
pub(crate) struct Entitled {
    pub(crate) cgroup_id: u64,
    pub(crate) id: SpiffeId,
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
    /// The daemon holds the key of its X509-SVID (`agentwall exec --identity`).
    pub(crate) key_held: bool,
}

/// Why `agentwall exec --identity` cannot launch under an identity.
#[derive(Debug, thiserror::Error)]
pub enum ExecIdentityError {
    #[error(
        "the Workload API is off (workload.enabled: false); agents cannot get an identity from it"
    )]
    Disabled,
    #[error("{0:?} is not a SPIFFE ID of a workload: {1}")]
    BadId(String, IdError),
    #[error("{id} belongs to trust domain {domain}, but this daemon's CA issues for {local} only")]
    ForeignTrustDomain {
        id: String,
        domain: String,
        local: String,
    },
    #[error("no policy governs {0}; name it in a policy's `identity:` field")]
    Ungoverned(String),
    #[error("{0} is revoked: {1}")]
    Revoked(String, crate::identity::service::Refusal),
    #[error("issuing its certificate: {0}")]
    Issue(#[from] crate::identity::IdentityError),
    #[error("its certificate: {0}")]
    Material(String),
}

/// A workload ID as an operator writes it: a whole SPIFFE ID, or a path in the local trust
/// domain (`agent/reader/prod`).
pub(crate) fn parse_id(text: &str, local: &str) -> Result<SpiffeId, ExecIdentityError> {
    let full = if text.starts_with("spiffe://") {
        text.to_string()
    } else {
        format!("spiffe://{local}/{}", text.trim_start_matches('/'))
    };
    SpiffeId::workload(&full).map_err(|e| ExecIdentityError::BadId(text.to_string(), e))
}

/// The SVID as the Workload API hands it out: the chain and the key as DER.
fn material(issued: &crate::identity::svid::Issued) -> Result<X509Svid, ExecIdentityError> {
    use rustls_pki_types::PrivateKeyDer;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| ExecIdentityError::Material(format!("its key: {e}")))?;
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(ExecIdentityError::Material("its key is not PKCS#8".into()));
    };
    Ok(X509Svid::new(
        issued.id.to_string(),
        issued.serial.clone(),
        issued.cert_der.to_vec(),
        zeroize::Zeroizing::new(pkcs8.secret_pkcs8_der().to_vec()),
    ))
}

impl Daemon {
    /// The X509-SVIDs of the agents of the Workload API.
    pub(crate) fn svids(&self) -> &super::Svids {
        &self.svids
    }

    pub(crate) fn identity_service(&self) -> &crate::identity::service::IdentityService {
        &self.identity
    }

    /// Checks that `text` names an identity this daemon can issue and a policy governs;
    /// returns it, the governing policy and a fresh X509-SVID for it.
    pub(in crate::daemon) fn workload_issue(
        &self,
        text: &str,
        requester: &str,
    ) -> Result<(SpiffeId, Grant, crate::identity::svid::Issued), ExecIdentityError> {
        if !self.cfg.workload.enabled {
            return Err(ExecIdentityError::Disabled);
        }
        let local = self.identity.trust_domain();
        let id = parse_id(text, local)?;
        if id.trust_domain() != local {
            return Err(ExecIdentityError::ForeignTrustDomain {
                id: id.to_string(),
                domain: id.trust_domain().to_string(),
                local: local.to_string(),
            });
        }
        let grant = self
            .policies
            .grant_for(&id, local)
            .ok_or_else(|| ExecIdentityError::Ungoverned(id.to_string()))?;
        self.identity
            .check_revoked(&id.to_string(), "")
            .map_err(|e| ExecIdentityError::Revoked(id.to_string(), e))?;
        let req = LeafRequest {
            id: id.clone(),
            lifetime: self.identity.config().svid_lifetime,
            capabilities: Vec::new(),
        };
        let issued = self.identity.issue(&req, requester)?;
        Ok((id, grant, issued))
    }

    /// Makes `issued` the SVID the Workload API hands to cgroup `cgroup_id`'s agent.
    pub(in crate::daemon) fn workload_publish(
        &self,
        cgroup_id: u64,
        issued: &crate::identity::svid::Issued,
    ) -> Result<(), ExecIdentityError> {
        self.svids.publish(cgroup_id, material(issued)?);
        Ok(())
    }

    /// Whether cgroup `cgroup_id` holds an identity that is not revoked: which pool of the
    /// Workload API's connections its callers go to.
    pub(crate) async fn workload_has_identity(&self, cgroup_id: u64) -> bool {
        self.registry
            .identity_of(cgroup_id)
            .await
            .is_some_and(|(bound, _)| !bound.revoked)
    }

    /// Who the caller is, by the kernel's account now, and what its cgroup entitles it to.
    pub(crate) async fn workload_caller(
        &self,
        caller: &Arc<Caller>,
    ) -> Result<Entitled, WorkloadRefusal> {
        let now = caller
            .peer
            .cgroup_id_now(&self.mount)
            .map_err(|e| match e {
                AttestError::Gone(pid) => WorkloadRefusal::Gone(pid),
                e => WorkloadRefusal::Attest(e),
            })?;
        if now != caller.cgroup_id {
            return Err(WorkloadRefusal::Moved {
                was: caller.cgroup_id,
                now,
            });
        }
        let cgroup = caller.peer.cgroup.clone();
        let Some((bound, key_held)) = self.registry.identity_of(now).await else {
            return Err(WorkloadRefusal::NoIdentity { cgroup });
        };
        if bound.revoked || bound.cut_by(&self.identity) {
            return Err(WorkloadRefusal::Revoked {
                spiffe_id: bound.spiffe_id,
                serial: bound.serial,
                cgroup,
            });
        }
        let id = SpiffeId::workload(&bound.spiffe_id).map_err(|error| WorkloadRefusal::BadId {
            spiffe_id: bound.spiffe_id.clone(),
            cgroup: cgroup.clone(),
            error,
        })?;
        let grant = self
            .policies
            .grant_for(&id, self.identity.trust_domain())
            .ok_or_else(|| WorkloadRefusal::Ungoverned(id.to_string()))?;
        // Selectors may hash the executable: off the runtime's threads.
        let held = Arc::clone(caller);
        let attest = grant.attest.clone();
        let checked = crate::sched::blocking(move || attest::check(&attest, &held.peer))
            .await
            .map_err(|e| WorkloadRefusal::Attest(AttestError::Cred(std::io::Error::other(e))))?;
        checked.map_err(|mismatch| WorkloadRefusal::Selectors {
            mismatch,
            policy: grant.policy.clone(),
            source_at: grant.source.to_string(),
        })?;
        Ok(Entitled {
            cgroup_id: now,
            id,
            serial: bound.serial,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(bound.not_after),
            key_held,
        })
    }

    /// Records what the Workload API refused, and counts it.
    pub(crate) fn workload_refused(&self, rpc: &str, caller: &Caller, why: &WorkloadRefusal) {
        tracing::debug!(rpc, pid = caller.peer.pid, error = %why, "workload API refused");
        self.count_error("workload_refused");
        let Some(suppressed) = self
            .workload_refusals
            .admit(caller.peer.uid, std::time::Instant::now())
        else {
            return;
        };
        self.audit
            .record(&crate::audit::schema::AuditRecord::WorkloadRefused {
                rpc: rpc.to_string(),
                reason: why.to_string(),
                pid: caller.peer.pid,
                uid: caller.peer.uid,
                exe: caller.peer.exe.display().to_string(),
                cgroup: caller.peer.cgroup.clone(),
                suppressed: (suppressed > 0).then_some(suppressed),
            });
    }

    /// Records an X509-SVID and its key handed to a process.
    pub(crate) fn workload_delivered(&self, caller: &Caller, svid: &X509Svid) {
        self.audit
            .record(&crate::audit::schema::AuditRecord::SvidDelivered {
                spiffe_id: svid.spiffe_id.clone(),
                serial: svid.serial.clone(),
                pid: caller.peer.pid,
                uid: caller.peer.uid,
                exe: caller.peer.exe.display().to_string(),
                cgroup_id: caller.cgroup_id,
            });
    }

    /// Records a JWT-SVID handed out.
    pub(crate) fn token_issued(&self, claims: &crate::identity::token::Claims) {
        self.audit
            .record(&crate::audit::schema::AuditRecord::TokenIssued {
                spiffe_id: claims.sub.clone(),
                expires_at: humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp),
                )
                .to_string(),
            });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn refusals_are_recorded_within_a_budget_per_uid_and_counted_beyond() {
        let b = RefusalBudget::default();
        let t0 = std::time::Instant::now();
        let n = REFUSALS_PER_SECOND as usize;
        let first: Vec<_> = (0..3 * n).map(|_| b.admit(1000, t0)).collect();
        assert!(first[..n].iter().all(|r| *r == Some(0)));
        assert!(
            first[n..].iter().all(Option::is_none),
            "a flood is not recorded"
        );
        assert_eq!(b.admit(1001, t0), Some(0), "another uid has its own budget");
        let later = t0 + std::time::Duration::from_secs(1);
        assert_eq!(
            b.admit(1000, later),
            Some(2 * n as u64),
            "the next record says how many went unrecorded"
        );
        assert_eq!(b.admit(1000, later), Some(0));
        // Many uids at once: all of them together are bounded too.
        let t1 = later + std::time::Duration::from_secs(5);
        let recorded = (0..1000u32)
            .filter(|uid| b.admit(50_000 + uid, t1).is_some())
            .count();
        assert_eq!(recorded, REFUSALS_PER_SECOND_ALL as usize);
    }

    #[test]
    fn an_id_is_whole_or_a_path_in_the_local_trust_domain() {
        assert_eq!(
            parse_id("agent/reader/prod", "td.example")
                .unwrap()
                .to_string(),
            "spiffe://td.example/agent/reader/prod"
        );
        assert_eq!(
            parse_id("/agent/reader/prod", "td.example")
                .unwrap()
                .to_string(),
            "spiffe://td.example/agent/reader/prod"
        );
        assert_eq!(
            parse_id("spiffe://other.example/x", "td.example")
                .unwrap()
                .trust_domain(),
            "other.example"
        );
        assert!(parse_id("spiffe://td.example", "td.example").is_err());
        assert!(parse_id("agent//x", "td.example").is_err());
    }
}
