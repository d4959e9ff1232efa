//! Secrets the daemon keeps in agents' directories (`agentwall exec --secret NAME=PATH`):
//! judged for the agent's identity at launch, written as files only the agent reads, renewed
//! in place, and removed the moment their lease ends.

use super::SecretAsker;
use crate::{
    daemon::{AdminError, Daemon},
    secrets::{
        SecretPath,
        lease::{self, Lease},
    },
};

/// The secrets `agentwall exec --secret NAME=PATH` asks for, and for whom.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSecrets {
    pub files: Vec<ExecSecret>,
    /// For an agent that enrolls with a certificate: that certificate (PEM), whose identity
    /// the secrets are judged for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
    /// The host uid and gid the command runs as (the files' owner).
    pub uid: u32,
    pub gid: u32,
    /// It runs as root, confined: its files belong to the host uid its root maps to.
    #[serde(default)]
    pub confined_root: bool,
}

/// One secret file: its name in the agent's secrets directory, and the secret's path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSecret {
    pub name: String,
    pub path: String,
}

/// The directory below an agent's that holds its secret files.
const SECRETS_SUBDIR: &str = "secrets";

/// A secret kept in an agent's directory: renewed there, removed when its lease ends.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    pub(super) cgroup_id: u64,
    /// The agent's secrets directory, and the file's name in it.
    pub(super) dir: std::path::PathBuf,
    pub(super) name: String,
    pub(super) owner: (u32, u32),
}

/// Checks the names of `agentwall exec --secret` files: what to fix, if anything.
fn check_files(files: &[ExecSecret]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        let ok = !f.name.is_empty()
            && f.name.len() <= 64
            && !f.name.starts_with('.')
            && f.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(format!(
                "{:?} is not a file name: use letters, digits, `.`, `_` and `-` (not first), at most 64",
                f.name
            ));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(format!("{:?} is named twice", f.name));
        }
        SecretPath::parse(&f.path).map_err(|e| format!("{}: {e}", f.name))?;
    }
    Ok(())
}

impl Daemon {
    pub(super) fn delivered(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Delivery>> {
        self.secrets
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks what `agentwall exec --secret` asks for before a cgroup is made.
    pub(in crate::daemon) fn check_exec_secrets(
        &self,
        asked: Option<&ExecSecrets>,
        policy: Option<&str>,
        identity: Option<&str>,
    ) -> Result<(), AdminError> {
        let Some(asked) = asked else { return Ok(()) };
        check_files(&asked.files).map_err(AdminError::ExecSecret)?;
        if identity.is_none() && (policy.is_some() || asked.cert_pem.is_none()) {
            return Err(AdminError::ExecSecret(
                "secrets are handed to an identity: launch with --identity ID, or --cert and --key"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Hands the secrets asked for to the agent of exec cgroup `cgroup_id`, as files of
    /// `agent_dir/secrets` (made here), each under a lease of `spiffe_id` (certificate
    /// `serial`); returns that directory. None is kept unless all are: on a refusal the
    /// leases granted so far end and their files go.
    pub(in crate::daemon) async fn deliver_exec_secrets(
        &self,
        cgroup_id: u64,
        who: (&str, &str),
        agent_dir: &std::path::Path,
        owner: (u32, u32),
        files: &[ExecSecret],
    ) -> Result<String, AdminError> {
        let r = self
            .deliver_all(cgroup_id, who, agent_dir, owner, files)
            .await;
        if r.is_err() {
            self.end_exec_secrets(cgroup_id, "the launch failed");
        }
        r
    }

    async fn deliver_all(
        &self,
        cgroup_id: u64,
        (spiffe_id, serial): (&str, &str),
        agent_dir: &std::path::Path,
        owner: (u32, u32),
        files: &[ExecSecret],
    ) -> Result<String, AdminError> {
        let dir = crate::agentdir::AgentDir::create(agent_dir, SECRETS_SUBDIR)
            .map_err(|e| AdminError::ExecSecret(e.to_string()))?;
        let who = SecretAsker {
            spiffe_id: spiffe_id.to_owned(),
            serial: serial.to_owned(),
            detail: format!("agentwall exec (cgroup {cgroup_id})"),
        };
        for f in files {
            let leased = self.secret_fetch(&who, &f.path).await.map_err(|e| {
                AdminError::ExecSecret(format!("{} ({}) for {spiffe_id}: {e}", f.name, f.path))
            })?;
            // Recorded first: the lease's end, whatever ends it, removes the file.
            self.delivered().insert(
                leased.lease.id.clone(),
                Delivery {
                    cgroup_id,
                    dir: dir.path().to_path_buf(),
                    name: f.name.clone(),
                    owner,
                },
            );
            dir.write(&f.name, leased.secret.value.expose(), 0o400, owner)
                .map_err(|e| AdminError::ExecSecret(format!("{}: {e}", f.name)))?;
            self.still_leased(&leased.lease)
                .map_err(|()| AdminError::ExecSecret(format!("{}: revoked meanwhile", f.name)))?;
        }
        Ok(dir.path().display().to_string())
    }

    /// Ends the leases kept in the directory of exec cgroup `cgroup_id` (its command ended,
    /// or its launch failed); their files go.
    pub(in crate::daemon) fn end_exec_secrets(&self, cgroup_id: u64, why: &str) {
        let ids: Vec<String> = self
            .delivered()
            .iter()
            .filter(|(_, d)| d.cgroup_id == cgroup_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.secret_end(&id, why);
        }
    }

    /// Renews the secrets kept in agents' directories whose lease has a third or less to
    /// go, then ends the leases whose time is up and drops the roles of those that ended.
    pub(in crate::daemon) async fn tend_secret_leases(&self) {
        self.end_leases_no_longer_held().await;
        self.renew_kept_secrets(false).await;
        self.expire_leases();
        self.drop_pending_roles().await;
    }

    /// Renews the secrets kept in agents' directories: those with a third or less of their
    /// lease to go, or all (`agentwall identity rotate`). A newer version is written in place
    /// of the file. A renewal is refused, and the lease ends, when the agent's cgroup no
    /// longer holds the identity (revoked, quarantined, gone) or the policy no longer grants
    /// it. Returns how many were renewed, and why the others were not.
    pub(crate) async fn renew_kept_secrets(&self, all: bool) -> (usize, Vec<String>) {
        let now = lease::now_secs();
        let delivered = self.delivered().clone();
        let due: Vec<(Lease, Delivery)> = self
            .secrets
            .leases
            .list()
            .into_iter()
            .filter(|l| all || l.expires <= now + l.ttl_seconds / 3)
            .filter_map(|l| delivered.get(&l.id).cloned().map(|d| (l, d)))
            .collect();
        let (mut renewed, mut failed) = (0, Vec::new());
        for (l, d) in due {
            // Renewed with the certificate the cgroup holds now (the daemon renews it too).
            let serial = match self.registry.caller(d.cgroup_id).await {
                Some((_, Some(b), false))
                    if !b.revoked && !b.cut_by(&self.identity) && b.spiffe_id == l.identity =>
                {
                    b.serial
                }
                _ => {
                    self.secret_end(&l.id, "the agent's cgroup no longer holds the identity");
                    continue;
                }
            };
            let who = SecretAsker {
                spiffe_id: l.identity.clone(),
                serial,
                detail: format!("agentwall exec (cgroup {})", d.cgroup_id),
            };
            // A refusal by the policy ends the lease (and its file); any other refusal (the
            // store unreadable, too many requests) is tried again, until the lease runs out.
            match self.secret_renew(&who, &l.id).await {
                Ok(leased) if leased.secret.version != l.version => {
                    let written = crate::agentdir::AgentDir::open(&d.dir).and_then(|dir| {
                        dir.write(&d.name, leased.secret.value.expose(), 0o400, d.owner)
                    });
                    match written.map(|()| self.still_leased(&leased.lease)) {
                        Ok(Ok(())) => renewed += 1,
                        Ok(Err(())) => failed.push(format!("{}: ended meanwhile", l.path)),
                        Err(e) => {
                            tracing::error!(error = %e, file = %d.dir.join(&d.name).display(), "cannot write a renewed secret into an agent's directory; its lease ends");
                            self.count_error("secret_delivery");
                            self.secret_end(
                                &l.id,
                                &format!("the renewed secret could not be written: {e}"),
                            );
                            failed.push(format!("{}: {e}", l.path));
                        }
                    }
                }
                Ok(_) => renewed += 1,
                Err(e) => failed.push(format!("{} for {}: {e}", l.path, l.identity)),
            }
        }
        (renewed, failed)
    }

    /// Whether `lease` is still in force after its file was written: a revocation (or any
    /// end) that came meanwhile found no file to remove; it is removed here.
    fn still_leased(&self, lease: &Lease) -> Result<(), ()> {
        if self
            .secrets
            .leases
            .get(&lease.id, &lease.identity, lease::now_secs())
            .is_ok()
        {
            return Ok(());
        }
        let d = self.delivered().remove(&lease.id);
        if let Some(d) = d {
            self.withdraw_file(&d);
        }
        Err(())
    }

    /// Removes a delivered secret's file.
    pub(super) fn withdraw_file(&self, d: &Delivery) {
        let removed = crate::agentdir::AgentDir::open(&d.dir).and_then(|dir| dir.remove(&d.name));
        // Gone with its directory is fine; anything else is told.
        if let Err(e) = removed
            && d.dir.exists()
        {
            tracing::error!(error = %e, file = %d.dir.join(&d.name).display(), "cannot remove an ended secret from an agent's directory");
            self.count_error("secret_withdraw");
        }
    }

    /// At start: removes the secrets directories of agents (`agentwall exec --secret`) that an
    /// earlier daemon filled; it held their leases in memory, this one holds none.
    pub(in crate::daemon) fn withdraw_unleased_secret_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.identity.agent_dir) else {
            return;
        };
        for entry in entries.flatten() {
            // Agents' directories are the daemon's; a link here is not one of them.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path().join(SECRETS_SUBDIR);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::warn!(dir = %dir.display(), "secrets an earlier daemon kept for an agent were removed: their leases ended with it; launch the agent again to get them")
                    }
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), error = %e, "cannot remove the secrets an earlier daemon kept for an agent");
                        self.count_error("secret_withdraw");
                    }
                }
            }
        }
    }
}
