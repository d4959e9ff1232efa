//! A restarted daemon takes over what the previous one left in the kernel and the cgroup
//! tree.

use super::*;

impl Daemon {
    /// Brings the registry in line with what the kernel and the cgroup tree hold after a
    /// restart: adopts exec cgroups of the previous daemon, drops bindings and link pins of
    /// cgroups that are gone.
    pub(super) async fn reconcile(&self) -> Result<(), DaemonError> {
        let records = self.load_enrollments().await;
        let mut by_id: HashMap<u64, Cgroup> = HashMap::new();
        for child in self.root.children()? {
            let name = child
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with(EXEC_PREFIX)
                && let Ok(id) = child.id()
            {
                by_id.insert(id, child);
            }
        }
        let root_id = self.root.id()?;
        let slots = self.policies.slots();
        let bindings = self
            .enforcer
            .bindings()
            .await
            .map_err(crate::enforce::actor::CallError::from)?;
        let mut registry = self.registry.hold().await;
        let configured: Vec<u64> = registry.ids();
        // Identities revoked in the kernel or in their record: (SPIFFE ID, serial, cgroup).
        let mut revoked = Vec::new();
        for (id, b) in &bindings {
            if configured.contains(id) {
                continue;
            }
            let record = records.iter().find(|r| r.cgroup_id == *id);
            let enrolled = record
                .filter(|r| r.kind == Kind::Enrolled)
                .map(|r| Cgroup::at(PathBuf::from(&r.cgroup)))
                .filter(|cg| cg.id().ok() == Some(*id));
            match by_id.remove(id).or(enrolled) {
                Some(cg)
                    if b.expires_boot_ns != 0
                        && record.and_then(|r| r.bound.as_ref()).is_none() =>
                {
                    // Only an identity's binding expires. The previous daemon died between
                    // binding the cgroup and writing its record: an identity this daemon cannot
                    // name it could not revoke, so the binding goes (the cgroup denies
                    // everything) until the agent enrolls again.
                    tracing::error!(cgroup = %cg.path().display(), cgroup_id = id, "a cgroup is bound to an identity that no enrollment record names; its binding is removed until its agent enrolls again");
                    self.count_error("enrollment_unknown");
                    self.enforcer.unbind(*id).await?;
                    let kind = record.map_or(Kind::Exec, |r| r.kind);
                    let mut m = Managed::new(cg, None, kind);
                    if let Some(r) = record {
                        m.agent_dir.clone_from(&r.agent_dir);
                        m.audience.clone_from(&r.audience);
                    }
                    registry.insert(*id, m);
                }
                Some(cg) => {
                    tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, "adopted a cgroup of the previous daemon");
                    let kind = record.map_or(Kind::Exec, |r| r.kind);
                    let mut m = Managed::new(cg, slots.name_of(b.slot).map(str::to_string), kind);
                    m.quarantined = b.flags & flags::DENY_ALL != 0;
                    if let Some(r) = record {
                        m.bound.clone_from(&r.bound);
                        m.agent_dir.clone_from(&r.agent_dir);
                        m.audience.clone_from(&r.audience);
                        m.workload = r.workload;
                    }
                    if let Some(bound) = m.bound.as_mut() {
                        let flagged = b.flags & flags::REVOKED != 0;
                        if bound.revoked || flagged {
                            revoked.push((bound.spiffe_id.clone(), bound.serial.clone(), *id));
                        }
                        // What the kernel holds, not what the record says: a binding the list
                        // covers but the kernel does not flag is flagged again below.
                        bound.revoked = flagged;
                    }
                    registry.insert(*id, m);
                }
                None => {
                    tracing::info!(
                        cgroup_id = id,
                        "dropping the binding of a cgroup that no longer exists"
                    );
                    self.enforcer.unbind(*id).await?;
                }
            }
        }
        // Exec cgroups without a binding: nothing may run there (no binding means deny);
        // collect them once empty.
        for (id, cg) in by_id {
            let mut m = Managed::new(cg, None, Kind::Exec);
            m.agent_dir = records
                .iter()
                .find(|r| r.cgroup_id == id)
                .and_then(|r| r.agent_dir.clone());
            registry.insert(id, m);
        }
        // The uids the previous daemon gave root commands are taken until their cgroups go.
        for m in registry.exec_mut() {
            m.root_uid = self.cfg.exec.root_uids.handed_to(&m.cgroup);
        }
        let live: HashMap<u64, Cgroup> = registry.cgroups();
        drop(registry);
        self.recover_revocations(revoked).await;
        self.save_enrollments().await;
        let _ = self.enforce_revocations().await;
        for id in self
            .enforcer
            .linked_cgroups()
            .await
            .map_err(crate::enforce::actor::CallError::from)?
        {
            match live.get(&id) {
                None if id != root_id => self.enforcer.detach(id).await?,
                None => {}
                // An adopted cgroup with links of its own runs the programs of the daemon that
                // attached them, which may lack some (the Unix hooks, say): this daemon's
                // replace them, pinned before the old ones go. Attached already: a no-op.
                // On failure the old links stay, and enforce what they did.
                Some(cg) => {
                    if let Err(e) = self.enforcer.attach(cg.clone()).await {
                        tracing::error!(cgroup = %cg.path().display(), error = %e, "cannot attach this daemon's programs to an adopted cgroup; the previous daemon's stay");
                        self.count_error("reattach");
                    }
                }
            }
        }
        Ok(())
    }
}
