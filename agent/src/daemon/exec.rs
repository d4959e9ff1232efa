//! Cgroups of `agentwall exec`: made and bound before the command runs, leased to its
//! launcher, removed once the lease ended and no process is left.

use serde::{Deserialize, Serialize};

use super::*;
use crate::daemon::registry::Bound;

/// The daemon's files a root agent's mount namespace hides or makes read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protect {
    /// Directories covered by an empty read-only file system: the state directory, the pin
    /// directory, the audit log.
    pub hide_dirs: Vec<String>,
    /// Files covered by an empty one: the audit key.
    pub hide_files: Vec<String>,
    /// Mounts made read-only: the cgroup file system.
    pub read_only: Vec<String>,
    /// The host uid (and gid) root of the command's user namespace is mapped to; none from
    /// a daemon that hands out none (the launcher then refuses to run a command as root
    /// without `--keep-privileges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_uid: Option<u32>,
}

/// What an exec cgroup's launcher needs: the cgroup to move its command into, the files of
/// an agent that enrolls, the Workload API of an agent launched under an identity, and what a
/// command running as root must not reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecReady {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub enroll: Option<ExecEnroll>,
    pub workload: Option<ExecWorkload>,
    pub protect: Protect,
    /// Where the secrets asked for are kept (`agentwall exec --secret`).
    pub secrets_dir: Option<String>,
}

/// An agent launched under an identity (`agentwall exec --identity`): the identity its cgroup
/// is bound to and the Workload API socket it gets its X509-SVID from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecWorkload {
    pub spiffe_id: String,
    /// Absolute path; the command gets it as `SPIFFE_ENDPOINT_SOCKET=unix://PATH`.
    pub socket: String,
}

/// Where an enrolling agent's files go (renewals replace them there), the CA bundle to check
/// the daemon with, and the enrollment socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnroll {
    pub agent_dir: String,
    pub bundle_pem: String,
    pub socket: String,
}

impl Daemon {
    /// The daemon's files a root agent must not reach, and the host uid its root is mapped to
    /// (see `spawn::Confinement`).
    pub(super) fn protect(&self, root_uid: Option<u32>) -> Protect {
        let show = |p: &std::path::Path| p.display().to_string();
        // What the agent needs stays visible: its own directory and the enrollment socket
        // (a configuration may put them under the state directory).
        let needed = [
            self.cfg.identity.agent_dir.as_path(),
            self.cfg.enrollment.socket.as_path(),
            self.cfg.workload.socket.as_path(),
        ];
        let hide = [
            self.cfg.state_dir.clone(),
            self.cfg.pin_dir.clone(),
            self.cfg.audit_dir(),
            self.cfg.secrets_dir(),
        ];
        Protect {
            hide_dirs: hide
                .iter()
                .filter(|d| !needed.iter().any(|n| n.starts_with(d)))
                .map(|d| show(d))
                .collect(),
            hide_files: vec![
                show(&self.cfg.audit.key_file),
                show(&self.cfg.secrets.key_file),
            ],
            read_only: vec![show(&self.mount)],
            root_uid,
        }
    }

    /// Creates and binds a cgroup for `agentwall exec`: under `policy`; under `identity`,
    /// whose policy it binds and whose X509-SVID the daemon issues for the Workload API; or
    /// (neither) unbound, for an agent that enrolls. On success the caller holds its lease
    /// (the cgroup id) until it calls [`Daemon::exec_end`].
    pub async fn exec_begin(
        &self,
        policy: Option<&str>,
        audience: Vec<String>,
        identity: Option<&str>,
        secrets: Option<super::ExecSecrets>,
    ) -> Result<ExecReady, AdminError> {
        self.check_exec_secrets(secrets.as_ref(), policy, identity)?;
        // An agent that enrolls with a certificate gets the secrets of that certificate's
        // identity, which must be valid here now.
        let enrolling_as = match secrets.as_ref().and_then(|s| s.cert_pem.as_deref()) {
            Some(pem) if identity.is_none() => {
                let c = self
                    .check(pem)
                    .map_err(|e| AdminError::ExecSecret(e.to_string()))?;
                if !c.valid {
                    return Err(AdminError::ExecSecret(format!(
                        "the agent's certificate is not valid here: {}",
                        c.message
                    )));
                }
                Some((
                    c.spiffe_id.unwrap_or_default(),
                    c.serial.unwrap_or_default(),
                ))
            }
            _ => None,
        };
        let seq = crate::clock::boot_ns();
        let launched = match identity {
            None => None,
            Some(text) => {
                let requester = format!("agentwall exec --identity (exec cgroup {seq:x})");
                let (id, grant, issued) =
                    self.workload_issue(text, &requester).map_err(|error| {
                        AdminError::ExecIdentity {
                            id: text.to_string(),
                            error: Box::new(error),
                        }
                    })?;
                Some((id, grant, issued))
            }
        };
        let policy = match &launched {
            Some((_, grant, _)) => Some(grant.policy.as_str()),
            None => policy,
        };
        let binding = match policy {
            None => None,
            Some(policy) => match self.policies.binding_for(policy) {
                Some(b) => Some(b),
                None => {
                    return Err(AdminError::UnknownPolicy {
                        policy: policy.to_string(),
                        loaded: self.policies.names(),
                    });
                }
            },
        };
        // An identity's binding ends with its certificate, unless renewed.
        let binding = binding.map(|b| match &launched {
            Some((_, _, issued)) => Binding {
                expires_boot_ns: super::identity::boot_ns_at(issued.not_after),
                ..b
            },
            None => b,
        });
        let cg = self.root.child(&format!("{EXEC_PREFIX}{seq:x}"));
        let result = async {
            cg.create()?;
            let id = cg.id()?;
            // Bound before the reply: the command's first instruction runs under its policy.
            // Without a policy the cgroup stays unbound, which denies everything, until a
            // process in it enrolls.
            if let Some(binding) = binding
                && let Err(e) = self.enforcer.bind(id, binding).await
            {
                let _ = cg.remove_tree();
                return Err(DaemonError::from(e));
            }
            let agent_dir = match binding {
                Some(_) => None,
                None => match self.identity_agent_dir(id) {
                    Ok(dir) => Some(dir),
                    Err(e) => {
                        let _ = cg.remove_tree();
                        return Err(e);
                    }
                },
            };
            Ok((id, agent_dir))
        }
        .await;
        match result {
            Ok((id, agent_dir)) => {
                let mut m = Managed::new(cg.clone(), policy.map(str::to_string), Kind::Exec);
                m.leased = true;
                m.agent_dir.clone_from(&agent_dir);
                m.audience = audience;
                if let Some((id, _, issued)) = &launched {
                    m.workload = true;
                    m.bound = Some(Bound {
                        spiffe_id: id.to_string(),
                        serial: issued.serial.clone(),
                        not_after: super::identity::unix_secs(issued.not_after),
                        capabilities: Vec::new(),
                        revoked: false,
                        renewed_from: Vec::new(),
                    });
                }
                let mut registry = self.registry.hold().await;
                let used = registry.root_uids_in_use();
                m.root_uid = self.cfg.exec.root_uids.pick(&used, seq);
                if let Some(uid) = m.root_uid
                    && let Err(e) = RootUids::record(&cg, uid)
                {
                    // Unrecorded, a restarted daemon could hand the uid out twice: no root.
                    tracing::error!(cgroup = %cg.path().display(), error = %e, "cannot note the root uid on the exec cgroup; a command of this cgroup cannot run as root");
                    self.count_error("root_uid_note");
                    m.root_uid = None;
                } else if m.root_uid.is_none() {
                    // The command can still run, unless it runs as root: the launcher then
                    // refuses it (or runs it with `--keep-privileges`, if asked).
                    tracing::warn!(
                        count = self.cfg.exec.root_uids.count,
                        "every uid of exec.root_uids is in use; a command of this cgroup cannot run as root"
                    );
                    self.count_error("root_uids_exhausted");
                }
                let root_uid = m.root_uid;
                registry.insert(id, m);
                drop(registry);
                let workload = match &launched {
                    Some((spiffe_id, grant, issued)) => {
                        if let Err(e) = self.workload_publish(id, issued) {
                            // Bound but without an SVID to hand out: the renewal loop issues
                            // one again within seconds.
                            tracing::error!(cgroup_id = id, error = %e, "cannot hand out the new SVID");
                            self.count_error("workload_svid");
                        }
                        self.save_enrollments_of(&[id]).await;
                        self.audit
                            .record(&crate::audit::schema::AuditRecord::WorkloadLaunched {
                                spiffe_id: spiffe_id.to_string(),
                                serial: issued.serial.clone(),
                                policy: grant.policy.clone(),
                                cgroup: cg.path().display().to_string(),
                                cgroup_id: id,
                                expires_at: humantime::format_rfc3339_seconds(issued.not_after)
                                    .to_string(),
                            });
                        Some(ExecWorkload {
                            spiffe_id: spiffe_id.to_string(),
                            socket: self.cfg.workload.socket.display().to_string(),
                        })
                    }
                    None => None,
                };
                let secrets_dir = match &secrets {
                    None => None,
                    Some(asked) => {
                        let who = match (&launched, &enrolling_as) {
                            (Some((spiffe_id, _, issued)), _) => {
                                (spiffe_id.to_string(), issued.serial.clone())
                            }
                            (None, Some(who)) => who.clone(),
                            (None, None) => (String::new(), String::new()),
                        };
                        let owner = if asked.confined_root {
                            root_uid.map(|u| (u, u))
                        } else {
                            Some((asked.uid, asked.gid))
                        };
                        let dir = match &agent_dir {
                            Some(d) => Ok(d.clone()),
                            None => crate::agentdir::AgentDir::create(
                                &self.cfg.identity.agent_dir,
                                &id.to_string(),
                            )
                            .map(|d| d.path().to_path_buf())
                            .map_err(|e| AdminError::ExecSecret(e.to_string())),
                        };
                        let delivered = match (owner, dir) {
                            (None, _) => Err(AdminError::ExecSecret(
                                "no uid to give a confined root command's secrets to (exec.root_uids all in use)".into(),
                            )),
                            (_, Err(e)) => Err(e),
                            (Some(owner), Ok(dir)) => {
                                self.deliver_exec_secrets(
                                    id,
                                    (&who.0, &who.1),
                                    &dir,
                                    owner,
                                    &asked.files,
                                )
                                .await
                            }
                        };
                        match delivered {
                            Ok(d) => Some(d),
                            Err(e) => {
                                // The cgroup goes with its lease; nothing runs in it.
                                self.exec_end(id).await;
                                return Err(e);
                            }
                        }
                    }
                };
                tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, policy, "exec cgroup ready");
                let enroll = agent_dir.map(|d| ExecEnroll {
                    agent_dir: d.display().to_string(),
                    bundle_pem: self.identity.bundle_pem().to_string(),
                    socket: self.cfg.enrollment.socket.display().to_string(),
                });
                Ok(ExecReady {
                    cgroup: cg.path().display().to_string(),
                    cgroup_id: id,
                    enroll,
                    workload,
                    protect: self.protect(root_uid),
                    secrets_dir,
                })
            }
            Err(e) => {
                self.count_error("exec_begin");
                Err(AdminError::ExecCgroup {
                    what: policy.map_or("enrollment".to_string(), |p| format!("policy {p:?}")),
                    error: Box::new(e),
                })
            }
        }
    }

    pub async fn exec_end(&self, id: u64) {
        self.registry.end_lease(id).await;
        self.gc.notify_one();
    }

    /// Removes exec cgroups whose lease ended and that hold no process.
    pub(super) async fn collect(&self) {
        for (id, cg) in self.registry.unleased_exec().await {
            if cg.exists() && cg.populated().unwrap_or(true) {
                continue;
            }
            if let Err(e) = cg.remove_tree() {
                tracing::debug!(cgroup = %cg.path().display(), error = %e, "exec cgroup not removable yet");
                continue;
            }
            if let Err(e) = self.enforcer.unbind(id).await {
                tracing::error!(cgroup_id = id, error = %e, "cannot remove the binding of a removed cgroup");
                self.count_error("unbind");
                continue;
            }
            self.svids.withdraw(id);
            self.end_exec_secrets(id, "the agent's command ended");
            self.drop_pending_roles().await;
            if let Some(dir) = self.registry.remove(id).await {
                let _ = std::fs::remove_dir_all(dir);
            }
            // The directory made for the secrets of an agent launched under an identity.
            let secrets_home = self.cfg.identity.agent_dir.join(id.to_string());
            if secrets_home.exists() {
                let _ = std::fs::remove_dir_all(secrets_home);
            }
            self.save_enrollments().await;
            tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, "exec cgroup removed");
        }
        // Enrolled cgroups elsewhere are not ours to remove; once their owner removed them,
        // their binding and links go (a new cgroup never reuses the id: it is the inode).
        for id in self.registry.enrolled_gone().await {
            let result = async {
                self.enforcer.unbind(id).await?;
                self.enforcer.detach(id).await?;
                Ok::<_, DaemonError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::error!(cgroup_id = id, error = %e, "cannot release a removed enrolled cgroup");
                self.count_error("unbind");
                continue;
            }
            self.svids.withdraw(id);
            self.registry.remove(id).await;
            self.save_enrollments().await;
            tracing::info!(cgroup_id = id, "enrolled cgroup removed; its binding ended");
        }
    }
}
