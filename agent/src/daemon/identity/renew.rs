//! Renewal of the certificates of launched agents: into their directories (`exec --cert`),
//! or into the daemon's memory for the Workload API (`exec --identity`); and of the tokens
//! kept in directories.

use super::*;
use crate::daemon::registry::{Launched, NotLaunched};
use crate::{
    agentdir::AgentDirError,
    enforce::actor::CallError,
    identity::{IdentityError, service::Refusal, spiffe::IdError},
};

/// Why a launched agent's certificate or token was not renewed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenewError {
    #[error("no such cgroup")]
    NoCgroup,
    #[error("not an agent launched with --cert or --identity")]
    NotLaunched,
    #[error("the renewed SVID cannot be handed out: {0}")]
    Workload(#[from] super::workload::ExecIdentityError),
    #[error("revoked")]
    Revoked,
    #[error("no live identity")]
    NoLiveIdentity,
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("{id} belongs to trust domain {domain}, whose CA is not this daemon's; renew it there")]
    ForeignTrustDomain { id: String, domain: String },
    #[error(transparent)]
    Issue(#[from] IdentityError),
    #[error(transparent)]
    Token(#[from] Refusal),
    #[error(transparent)]
    AgentDir(#[from] AgentDirError),
    #[error(transparent)]
    Kernel(#[from] CallError),
    #[error("the cgroup has no binding")]
    Unbound,
    #[error("an earlier certificate of this agent was revoked")]
    EarlierRevoked,
}

impl Daemon {
    /// Renews the certificate of one launched agent, into its directory or for the Workload
    /// API, and extends its binding. Returns the new serial.
    pub(in crate::daemon) async fn renew(&self, cgroup_id: u64) -> Result<String, RenewError> {
        // Files of `exec --cert`, or (none) the daemon's memory for `exec --identity`.
        let (bound, dir) = match self.registry.launched(cgroup_id).await {
            Ok(Launched {
                bound, agent_dir, ..
            }) => (bound, Some(agent_dir)),
            Err(NotLaunched::Unknown) => return Err(RenewError::NoCgroup),
            Err(NotLaunched::NoFiles) => match self.registry.identity_of(cgroup_id).await {
                Some((bound, true)) => (bound, None),
                _ => return Err(RenewError::NotLaunched),
            },
        };
        if bound.revoked {
            return Err(RenewError::Revoked);
        }
        let id = SpiffeId::workload(&bound.spiffe_id)?;
        if id.trust_domain() != self.identity.trust_domain() {
            return Err(RenewError::ForeignTrustDomain {
                id: bound.spiffe_id.clone(),
                domain: id.trust_domain().to_string(),
            });
        }
        let req = LeafRequest {
            id,
            lifetime: self.identity.config().svid_lifetime,
            capabilities: bound.capabilities.clone(),
        };
        let issued = self
            .identity
            .issue(&req, &format!("agentwall renewal for cgroup {cgroup_id}"))?;
        match &dir {
            Some(dir) => {
                // The files keep the owner the launcher gave the key (the user the agent runs
                // as).
                let dir = AgentDir::open(dir)?;
                let owner = dir.owner_of(files::KEY)?;
                dir.write_svid(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), owner)?;
            }
            // Open streams get it at once (before the binding is extended: an agent that
            // gets a certificate the kernel does not honour yet only waits for it).
            None => self.workload_publish(cgroup_id, &issued)?,
        }
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
            .await?;
        // A revocation or the cgroup's end that came while the certificate was being made
        // withdrew the SVIDs before this one was published: withdraw it again. (One that
        // comes after the binding was read withdraws after the publication.)
        if dir.is_none() && before.is_none_or(|b| b.flags & flags::REVOKED != 0) {
            self.svids.withdraw(cgroup_id);
        }
        if before.is_none() {
            return Err(RenewError::Unbound);
        }
        self.registry
            .note_renewal(
                cgroup_id,
                issued.serial.clone(),
                unix_secs(issued.not_after),
            )
            .await;
        // A revocation of an earlier serial that came while this certificate was being made
        // found no chain to follow yet: it follows it now.
        let cut = self.registry.bound(cgroup_id).await.is_some_and(|b| {
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
            return Err(RenewError::EarlierRevoked);
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
    pub(in crate::daemon) async fn refresh_token(&self, cgroup_id: u64) -> Result<(), RenewError> {
        let (bound, audience, dir) = match self.registry.launched(cgroup_id).await {
            Ok(l) if !l.bound.revoked => (l.bound, l.audience, l.agent_dir),
            Ok(_) | Err(NotLaunched::NoFiles) => return Err(RenewError::NoLiveIdentity),
            Err(NotLaunched::Unknown) => return Err(RenewError::NoCgroup),
        };
        let id = SpiffeId::workload(&bound.spiffe_id)?;
        let holder = crate::identity::token::Holder {
            id: &id,
            serial: &bound.serial,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(bound.not_after),
        };
        let (token, claims) = self.identity.issue_token(holder, &audience)?;
        let dir = AgentDir::open(&dir)?;
        let owner = dir.owner_of(files::KEY)?;
        dir.write(files::TOKEN, token.as_bytes(), 0o600, owner)?;
        self.registry.set_token_expiry(cgroup_id, claims.exp).await;
        Ok(())
    }

    /// Renews every launched agent whose certificate expires within `within`.
    pub(in crate::daemon) async fn renew_due(&self, within: Duration) -> (usize, Vec<String>) {
        let limit = unix_secs(SystemTime::now() + within);
        let local = format!("spiffe://{}/", self.identity.trust_domain());
        // Only this daemon's CA can renew: certificates of other trust domains run out.
        let due: Vec<u64> = self
            .registry
            .renewals_due(limit, &local)
            .await
            .into_iter()
            // Only agents whose certificate lives in their directory (`exec --cert`).
            .filter(|(_, dir)| dir.join(files::CERT).exists())
            .map(|(id, _)| id)
            .collect();
        // Tokens are refreshed at half their lifetime.
        let half = self.identity.config().token_lifetime / 2;
        let token_limit = unix_secs(SystemTime::now() + half);
        let tokens = self.registry.tokens_due(token_limit).await;
        for id in tokens {
            if let Err(e) = self.refresh_token(id).await {
                tracing::warn!(cgroup_id = id, error = %e, "cannot refresh an agent's token");
                self.count_error("token");
            }
        }
        // Agents of the Workload API: due, or without an SVID in memory (a restarted daemon's).
        let svids = &self.svids;
        let workload = self
            .registry
            .workload_renewals_due(limit, &local, |id| !svids.holds(id))
            .await;
        let (mut ok, mut failed) = (0, Vec::new());
        for id in due.into_iter().chain(workload) {
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
    pub async fn rotate(&self) -> Result<crate::daemon::Rotated, AdminError> {
        let (ok, mut failed) = self
            .renew_due(Duration::from_secs(u64::from(u32::MAX)))
            .await;
        // The credentials the daemon keeps for agents, renewed with their certificates.
        let (credentials, not_renewed) = self.renew_kept_secrets(true).await;
        failed.extend(not_renewed);
        if failed.is_empty() {
            Ok(crate::daemon::Rotated {
                renewed: ok,
                credentials,
            })
        } else {
            Err(AdminError::Renewal {
                renewed: ok,
                failed,
            })
        }
    }
}
