//! Enrollment: verify the presented X509-SVID, attest the caller, bind its cgroup; and
//! JWT-SVIDs for enrolled callers.

use super::*;

/// Why a caller of the enrollment socket is not admitted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error(transparent)]
    Verify(#[from] crate::identity::service::Refusal),
    #[error("certificate rejected: it expired at {}; renew it", humantime::format_rfc3339_seconds(*.0))]
    Expired(SystemTime),
    #[error("no policy governs {0}; name it in a policy's `identity:` field")]
    Ungoverned(String),
    #[error("{mismatch} (selectors of policy {policy} at {source_at})")]
    Selectors {
        mismatch: attest::Mismatch,
        policy: String,
        source_at: String,
    },
}

impl Daemon {
    /// Verifies the presented chain (trust, SPIFFE rules, revocation, expiry), finds the policy
    /// governing its identity and checks that policy's selectors against the peer.
    pub(in crate::daemon) fn admit(
        &self,
        peer: &Peer,
        chain: &[CertificateDer<'_>],
    ) -> Result<(VerifiedSvid, Grant), AdmitError> {
        let svid = self.identity.verify(chain, SystemTime::now())?;
        if svid.not_after <= SystemTime::now() {
            // Within the clock tolerance of the verifier, but a binding would be dead on arrival.
            return Err(AdmitError::Expired(svid.not_after));
        }
        let grant = self
            .policies
            .grant_for(&svid.id, self.identity.trust_domain());
        let Some(grant) = grant else {
            return Err(AdmitError::Ungoverned(svid.id.to_string()));
        };
        attest::check(&grant.attest, peer).map_err(|mismatch| AdmitError::Selectors {
            mismatch,
            policy: grant.policy.clone(),
            source_at: grant.source.to_string(),
        })?;
        Ok((svid, grant))
    }

    /// A JWT-SVID for an attested holder of a certificate.
    pub(in crate::daemon) fn token(
        &self,
        peer: &Peer,
        chain: &[CertificateDer<'_>],
        audience: &[String],
    ) -> EnrollReply {
        let (svid, _) = match self.admit(peer, chain) {
            Ok(a) => a,
            Err(e) => return refuse(e.to_string()),
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
    pub(in crate::daemon) async fn enroll(
        &self,
        peer: &Peer,
        chain: &[CertificateDer<'_>],
    ) -> EnrollReply {
        let (svid, grant) = match self.admit(peer, chain) {
            Ok(a) => a,
            Err(e) => return refuse(e.to_string()),
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
        self.enrollments.learn_cgroup_path(cgroup_id, &peer.cgroup);
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
        let Some((slot, mode)) = self.policies.slot_mode(&grant.policy) else {
            return refuse(format!("policy {} is not loaded", grant.policy));
        };
        let mut registry = self.registry.hold().await;
        if let Some(other) = registry
            .get(cgroup_id)
            .and_then(|m| m.bound.as_ref())
            .filter(|b| b.spiffe_id != id_text)
        {
            return refuse(format!(
                "cgroup {} is already bound to {}; one identity per cgroup",
                peer.cgroup, other.spiffe_id
            ));
        }
        if let Some(cut) = registry
            .get(cgroup_id)
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
        if let Some(m) = registry.get(cgroup_id)
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
            && !registry.contains(cgroup_id)
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
        let policies = Arc::clone(&self.policies);
        let mode_flag = move || {
            let now = policies.mode_of_slot(slot).unwrap_or(mode);
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
            .get(cgroup_id)
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
        let entry = registry.entry(cgroup_id, || {
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
}
