//! Revocation: the list, its enforcement in the kernel (open flows cut), recovery after a
//! restart, and the checks operators ask for (certificates, tokens).

use super::*;

/// How long after a first pass of socket destruction the second one runs (see
/// `Daemon::destroy_sockets`).
const SECOND_PASS_AFTER: Duration = Duration::from_millis(5);

/// The longest a revocation waits for the database roles of its leases to be dropped.
const ROLES_DROP_LIMIT: Duration = Duration::from_secs(5);

impl Daemon {
    /// At start: bindings that the kernel or their record show revoked, but that the
    /// revocation list does not cover. The previous daemon died between flagging the kernel
    /// and making the revocation durable (or could not write it): the flag is the evidence,
    /// and the certificate's serial is revoked again, durably, so that enrolling once more
    /// with it is refused (enrolling would rebind the cgroup without the flag). The original
    /// command had not succeeded; if it named the whole SPIFFE ID, it must be given again.
    pub(in crate::daemon) async fn recover_revocations(&self, revoked: Vec<(String, String, u64)>) {
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
    /// and in those their processes are in. Returns what the first pass cut.
    ///
    /// A connect its hook allowed just before the binding changed enters the kernel's socket
    /// tables only as it picks its port, a moment later: the first pass cannot see it. Its
    /// packets are dropped by the egress program from the start, so nothing flows; but it
    /// would wait for the TCP timeout (minutes). A second pass [`SECOND_PASS_AFTER`] later
    /// cuts it. That pass runs in the background, off the caller's path: the command that
    /// revoked does not wait for it (it is logged, and its failures counted).
    pub(in crate::daemon) async fn destroy_sockets(&self, cgroups: HashSet<u64>) -> Destroyed {
        self.destroy_sockets_passes(cgroups).await.0
    }

    /// [`Self::destroy_sockets`], with the second pass to wait for (none if the first failed).
    pub(in crate::daemon) async fn destroy_sockets_passes(
        &self,
        cgroups: HashSet<u64>,
    ) -> (Destroyed, Option<tokio::task::JoinHandle<()>>) {
        let dirs: Vec<PathBuf> = self.registry.paths_of(&cgroups).await;
        let work = move || {
            let namespaces = sockdiag::foreign_namespaces(&dirs);
            let first = sockdiag::destroy_sockets_in(&cgroups, &namespaces);
            (first, cgroups, namespaces)
        };
        let (first, cgroups, namespaces) = match crate::sched::blocking(work).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "socket destruction task failed");
                self.count_error("socket_destroy");
                return (Destroyed::default(), None);
            }
        };
        let errors = Arc::clone(&self.errors);
        let second = tokio::task::spawn_blocking(move || {
            std::thread::sleep(SECOND_PASS_AFTER);
            match sockdiag::destroy_sockets_in(&cgroups, &namespaces) {
                Ok(second) => {
                    if second.failed > 0 {
                        crate::daemon::count(&errors, "socket_destroy");
                    }
                    if second.sockets > 0 {
                        tracing::info!(
                            sockets = second.sockets,
                            "the second pass cut sockets that were connecting during the first"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot destroy sockets (sock_diag, second pass); the packet backstop holds them");
                    crate::daemon::count(&errors, "socket_destroy");
                }
            }
        });
        let first = match first {
            Ok(d) => {
                if d.failed > 0 {
                    self.count_error("socket_destroy");
                }
                d
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot destroy sockets (sock_diag); open flows are cut by the packet backstop instead");
                self.count_error("socket_destroy");
                Destroyed::default()
            }
        };
        (first, Some(second))
    }

    /// Sets the revoked flag on every binding whose identity is revoked (after a restart, or
    /// a revocation list edited while the daemon was down). Returns the cgroups changed.
    ///
    /// Cgroups whose flag could not be written are returned as failures and tried again on
    /// the next call (the collector calls this every half second), so a failed write never
    /// leaves a revoked identity allowed for long.
    pub(in crate::daemon) async fn enforce_revocations(&self) -> (Vec<u64>, Vec<(u64, String)>) {
        let (mut hit, mut failed) = (Vec::new(), Vec::new());
        let mut registry = self.registry.hold().await;
        for (id, b) in registry.bound_mut() {
            // Looked up in place: a copy of the whole list per revocation grew with it.
            if b.revoked || !b.cut_by(&self.identity) {
                continue;
            }
            let marked = self
                .enforcer
                .rebind(id, |k| {
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
                failed.push((id, e.to_string()));
                continue;
            }
            b.revoked = true;
            // Streams of the Workload API end; fetches find the flag.
            self.svids.withdraw(id);
            hit.push(id);
        }
        (hit, failed)
    }

    /// An operator's revocation (uid `uid` on the admin socket); in a fleet, published to
    /// the other nodes.
    pub async fn revoke(
        &self,
        target: &str,
        reason: &str,
        uid: u32,
    ) -> Result<crate::daemon::Revoked, AdminError> {
        let target = Target::parse(target).map_err(|e| AdminError::BadTarget(e.to_string()))?;
        if reason.trim().is_empty() {
            return Err(AdminError::NoReason);
        }
        let done = self
            .apply_revocation(target, reason, &format!("uid {uid}"), Some(uid))
            .await;
        // On the list even when the kernel could not take it everywhere: the fleet is told.
        self.fleet.wake();
        done
    }

    /// Revokes `target` here: the list, the kernel, the open sockets, the durable list and
    /// the audit record. `by` says who asked: `uid N`, or a node of the fleet.
    pub(in crate::daemon) async fn apply_revocation(
        &self,
        target: Target,
        reason: &str,
        by: &str,
        by_uid: Option<u32>,
    ) -> Result<crate::daemon::Revoked, AdminError> {
        let started = std::time::Instant::now();
        let new = self.identity.revoke(target.clone(), reason, by);
        // Certificates the daemon renewed from a revoked one are revoked with it, so that the
        // newest of the chain cannot enroll anywhere either.
        if let Target::Serial(serial) = &target {
            for later in self.registry.renewed_after(serial).await {
                self.identity.revoke(
                    Target::Serial(later),
                    &format!("renewed from revoked serial {serial}: {reason}"),
                    by,
                );
            }
        }
        // The kernel first: new connects are denied from here on. Then the open sockets are
        // cut, and only then is the list made durable (a sync, about a millisecond here): a
        // connect already in flight is ended at once rather than after the sync. The command
        // reports success only once the list is durable.
        let (cgroups, failed) = self.enforce_revocations().await;
        let in_kernel_us = started.elapsed().as_micros();
        // Its secret leases end now, and the secrets kept in its agents' directories go.
        self.end_revoked_leases(&cgroups);
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
                by: by.to_string(),
                by_uid,
                new,
                cgroups: cgroups.clone(),
                sockets_destroyed: destroyed.sockets,
                persisted: not_persisted.is_none(),
            });
        // Their database roles are dropped and their sessions ended before the command
        // returns, as far as the database answers in time; what is left, the leases' task
        // drops (a role cannot log in past its end meanwhile).
        let _ = tokio::time::timeout(ROLES_DROP_LIMIT, self.drop_pending_roles()).await;
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
        Ok(crate::daemon::Revoked {
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

    pub fn check_token(&self, token: &str, audience: &str) -> crate::daemon::Checked {
        match self.identity.verify_token(token.trim(), audience) {
            Ok(c) => crate::daemon::Checked {
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
    pub fn check(&self, pem: &str) -> Result<crate::daemon::Checked, AdminError> {
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
        let chain = match chain {
            Ok(c) if !c.is_empty() => c,
            _ => return Err(AdminError::NoCertificate),
        };
        Ok(self.check_chain(&chain))
    }

    /// Whether a certificate chain (DER, leaf first) is valid here now.
    pub fn check_chain(&self, chain: &[CertificateDer<'_>]) -> crate::daemon::Checked {
        match self.identity.verify(chain, SystemTime::now()) {
            Ok(s) => crate::daemon::Checked {
                valid: true,
                spiffe_id: Some(s.id.to_string()),
                serial: Some(s.serial),
                not_after: Some(humantime::format_rfc3339_seconds(s.not_after).to_string()),
                message: "valid".into(),
            },
            Err(e) => invalid(e.to_string()),
        }
    }

    /// The TLS configuration of the daemon's own listeners (its server certificate, client
    /// certificates required).
    pub fn tls_server_config(
        &self,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, crate::identity::service::ServiceError> {
        self.identity.server_tls()
    }
}
