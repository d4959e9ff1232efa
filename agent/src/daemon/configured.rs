//! Cgroups the configuration lists under `enforce:`: enforced at start, by the watcher of
//! new cgroups (`units`) and at a unit's own request (`enforce-self`).

use super::*;

impl Daemon {
    /// Attaches the programs to a cgroup the configuration lists under `enforce:` and binds it
    /// to its policy; a cgroup that held that path before (the unit's previous run) is let go.
    /// Returns its id, and whether it was not enforced before this call.
    pub(super) async fn enforce_configured(
        &self,
        e: &crate::config::EnforceEntry,
    ) -> Result<(u64, bool), DaemonError> {
        let _turn = self.configured_turn.lock().await;
        self.enforce_configured_in_turn(e).await
    }

    /// [`Self::enforce_configured`] for a caller that holds `configured_turn` already.
    pub(super) async fn enforce_configured_in_turn(
        &self,
        e: &crate::config::EnforceEntry,
    ) -> Result<(u64, bool), DaemonError> {
        let cg = Cgroup::under(&self.mount, &e.cgroup)?;
        let Some(b) = self.policies.binding_for(&e.policy) else {
            // Fail closed: with the programs attached and no binding, the cgroup is denied
            // everything until its policy is in force (the watcher tries again each second).
            if cg.exists() {
                self.enforcer.attach(cg.clone()).await?;
            }
            return Err(policy::PolicyError {
                problems: vec![policy::Problem {
                    file: PathBuf::from("config"),
                    line: None,
                    column: None,
                    field: "enforce.policy".into(),
                    message: format!(
                        "no policy named {:?} for cgroup {}; it is denied everything until there is",
                        e.policy, e.cgroup
                    ),
                }],
            }
            .into());
        };
        // The id attached, not one read before: the unit may have restarted in between.
        let id = self.enforcer.attach(cg.clone()).await?;
        // Enforced already (its `enforce-self` and the watcher both came): nothing to change,
        // and above all its binding stays as it is (a quarantine on it holds).
        let known = self.registry.kind_of(id).await == Some(Kind::Configured);
        // A quarantine of the unit's previous cgroup at this path holds for the new one:
        // a restart is no way out of it.
        let carried = self.registry.configured_quarantined_at(cg.path()).await;
        if known {
            return Ok((id, false));
        }
        let hold = self
            .audit
            .state
            .failing
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.cfg.audit.when_down == crate::config::WhenDown::Deny;
        // What the kernel holds for this cgroup already (a quarantine, a revocation or a hold
        // a previous daemon set) stays, as at an enrollment.
        let quarantined = self
            .enforcer
            .rebind(id, move |old| Binding {
                flags: b.flags
                    | old.map_or(0, |o| {
                        o.flags & (flags::DENY_ALL | flags::AUDIT_HOLD | flags::REVOKED)
                    })
                    | if carried { flags::DENY_ALL } else { 0 }
                    | if hold { flags::AUDIT_HOLD } else { 0 },
                ..b
            })
            .await?
            .is_some_and(|o| o.flags & flags::DENY_ALL != 0)
            || carried;
        let mut m = Managed::new(cg, Some(e.policy.clone()), Kind::Configured);
        m.quarantined = quarantined;
        let earlier = self.registry.put_configured(id, m).await;
        for old in earlier {
            // The old cgroup is gone with the unit's previous run; its programs and binding go.
            if self.enforcer.unbind(old).await.is_err() || self.enforcer.detach(old).await.is_err()
            {
                self.count_error("unbind");
            }
        }
        Ok((id, true))
    }

    /// Whether process `pid` runs in a cgroup agentwall confines (the managed subtree, or a
    /// configured `enforce:` cgroup or below): such a peer reaches the admin socket only for
    /// `enforce-self` (the Unix hooks let every enforced cgroup reach it, for units'
    /// `ExecStartPre=+`). Unreadable counts as confined.
    pub fn peer_confined(&self, pid: i32) -> bool {
        let Some(rel) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
        else {
            return true;
        };
        let own = self.mount.join(rel.trim_start_matches('/'));
        own.starts_with(self.root.path())
            || self
                .cfg
                .enforce
                .iter()
                .any(|e| own.starts_with(self.mount.join(e.cgroup.trim_start_matches('/'))))
    }

    /// `enforce_self`: enforces the cgroup of process `pid` (the caller) if the configuration
    /// lists it under `enforce:`.
    pub async fn enforce_self(&self, pid: i32) -> Result<SelfEnforced, AdminError> {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            });
        let Some(path) = own else {
            return Err(AdminError::PeerCgroup(pid));
        };
        let rel = path.trim_start_matches('/');
        let Some(e) = self
            .cfg
            .enforce
            .iter()
            .find(|e| e.cgroup.trim_start_matches('/') == rel)
            .cloned()
        else {
            return Err(AdminError::NotConfigured(rel.to_string()));
        };
        match self.enforce_configured(&e).await {
            Ok((id, _)) => {
                tracing::info!(cgroup = rel, cgroup_id = id, policy = %e.policy, "a configured cgroup enforced at its caller's request");
                Ok(SelfEnforced {
                    cgroup: rel.to_string(),
                    cgroup_id: id,
                    policy: e.policy,
                })
            }
            Err(error) => {
                self.count_error("enforce_self");
                Err(AdminError::Enforce {
                    cgroup: rel.to_string(),
                    error: Box::new(error),
                })
            }
        }
    }
}
