//! The daemon's secret store, for its operators (`agentwall secret`, on the admin socket):
//! put, get, list, remove and rotate the master key; each is audited, none records a value.
//!
//! The store is opened on first use, so that a daemon that keeps no secrets never makes a
//! master key; a failure to open it (a key file others may read, say) is answered to the
//! operator who asked and tried again at the next request.
//!
//! Agents fetch secrets over mutual TLS (`crate::decision`): the identity they proved, its
//! policy's `secret:` rules and its standing (not revoked) decide; each fetch is a lease,
//! renewed by the same identity and judged again then, ended at once by a revocation.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

mod databases;
mod delivery;
mod standing;

pub use self::delivery::{ExecSecret, ExecSecrets};
use super::{AdminError, Daemon};
use crate::{
    audit::schema::AuditRecord,
    policy::decide::Query,
    secrets::{
        Secret, SecretError, SecretInfo, SecretPath, SecretStore as _,
        lease::{self, Lease, LeaseError, Leases},
        local::LocalStore,
    },
};

/// The store (once opened), the leases agents hold, and the budget of their requests.
#[derive(Debug, Default)]
pub(crate) struct Secrets {
    store: Arc<Mutex<Option<Arc<LocalStore>>>>,
    leases: Leases,
    /// Leases whose secret the daemon keeps in an agent's directory, by lease id.
    delivered: Mutex<std::collections::HashMap<String, delivery::Delivery>>,
    /// The roles of leases on databases.
    databases: databases::Databases,
    /// Fetches and renewals of one identity a second (and their records); past it, refused
    /// and counted into its next record.
    budget: super::decisions::RecordBudget,
    /// The policy set the leases were last judged under (`standing`).
    judged_set: Mutex<Option<Arc<crate::policy::PolicySet>>>,
    /// A lease was granted or renewed under a policy that changed meanwhile: every lease
    /// is judged again at the next pass.
    judge_again: std::sync::atomic::AtomicBool,
}

/// An agent that asks for a secret: the identity its certificate proved, that
/// certificate's serial, and the connection's description for the audit.
#[derive(Debug, Clone)]
pub struct SecretAsker {
    pub spiffe_id: String,
    pub serial: String,
    pub detail: String,
}

/// A secret handed to an agent, with its lease.
#[derive(Debug)]
pub struct Leased {
    pub secret: Secret,
    pub lease: Lease,
}

/// Why an agent's fetch or renewal was refused.
#[derive(Debug, thiserror::Error)]
pub enum FetchRefused {
    /// The policy does not grant it, or the identity may not ask.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Over the identity's request budget, or the lease table's bounds.
    #[error("{0}")]
    TooMany(String),
    /// The store cannot be read now (its key, its files); the operator is told in the log.
    #[error("{0}")]
    Unavailable(String),
}

impl Secrets {
    /// The store in `slot`, opened now if it was not yet (blocking: file work).
    fn open(
        slot: &Mutex<Option<Arc<LocalStore>>>,
        dir: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Result<Arc<LocalStore>, SecretError> {
        let mut slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(Arc::clone(s));
        }
        let store = Arc::new(LocalStore::open(dir, key_file)?);
        *slot = Some(Arc::clone(&store));
        Ok(store)
    }
}

/// What a put made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretStored {
    pub path: String,
    pub version: u32,
}

/// What a rotation of the master key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyRotated {
    pub key_id: String,
    pub rewrapped: usize,
}

/// A secret operation, for its audit record.
#[derive(Debug, Clone, Copy)]
enum Op {
    Put,
    Get,
    List,
    Remove,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Get => "get",
            Self::List => "list",
            Self::Remove => "remove",
        }
    }
}

impl Daemon {
    /// Runs `f` on the store off the runtime's threads (file I/O and crypto); a failure is
    /// audited as refused, counted and returned.
    async fn with_store<T: Send + 'static>(
        &self,
        op: Op,
        path: &str,
        by: &str,
        f: impl FnOnce(&LocalStore) -> Result<T, SecretError> + Send + 'static,
    ) -> Result<T, AdminError> {
        // Opening the store (a first use makes its key and directory) is file work too.
        let slot = std::sync::Arc::clone(&self.secrets.store);
        let (key_file, dir) = (self.cfg.secrets.key_file.clone(), self.cfg.secrets_dir());
        let r = tokio::task::spawn_blocking(move || {
            let store = Secrets::open(&slot, &dir, &key_file)?;
            f(&store)
        })
        .await
        .unwrap_or_else(|e| Err(SecretError::Crypto(format!("the store's task: {e}"))));
        r.map_err(|e| self.secret_refused(op.name(), path, by, e))
    }

    /// Audits and counts a refused secret operation; the error for the operator.
    fn secret_refused(&self, op: &str, path: &str, by: &str, e: SecretError) -> AdminError {
        self.count_error("secret_refused");
        self.audit.record(&AuditRecord::SecretRefused {
            // As given, which may be anything: cut to a path's longest.
            path: path.chars().take(crate::secrets::MAX_PATH).collect(),
            op: op.into(),
            by: by.to_owned(),
            error: e.to_string(),
        });
        AdminError::Secret(e)
    }

    /// Stores `value` as the next version of `path`.
    pub async fn secret_put(
        &self,
        path: &str,
        value: Vec<u8>,
        by: &str,
    ) -> Result<SecretStored, AdminError> {
        let value = zeroize::Zeroizing::new(value);
        let parsed = SecretPath::parse(path);
        let version = self
            .with_store(Op::Put, path, by, move |s| s.put(&parsed?, &value))
            .await?;
        self.audit.record(&AuditRecord::SecretStored {
            path: path.to_owned(),
            version,
            by: by.to_owned(),
        });
        Ok(SecretStored {
            path: path.to_owned(),
            version,
        })
    }

    /// The newest version of `path`, or the one named.
    pub async fn secret_get(
        &self,
        path: &str,
        version: Option<u32>,
        by: &str,
    ) -> Result<Secret, AdminError> {
        let parsed = SecretPath::parse(path);
        let secret = self
            .with_store(Op::Get, path, by, move |s| s.get(&parsed?, version))
            .await?;
        self.audit.record(&AuditRecord::SecretRead {
            path: path.to_owned(),
            version: secret.version,
            by: by.to_owned(),
        });
        Ok(secret)
    }

    /// The secrets under `prefix`, without their values.
    pub async fn secret_list(&self, prefix: &str, by: &str) -> Result<Vec<SecretInfo>, AdminError> {
        let p = prefix.to_owned();
        self.with_store(Op::List, prefix, by, move |s| s.list(&p))
            .await
    }

    /// Removes `path` and every version of it; whether it existed.
    pub async fn secret_remove(&self, path: &str, by: &str) -> Result<bool, AdminError> {
        let parsed = SecretPath::parse(path);
        let existed = self
            .with_store(Op::Remove, path, by, move |s| s.remove(&parsed?))
            .await?;
        if existed {
            self.audit.record(&AuditRecord::SecretRemoved {
                path: path.to_owned(),
                by: by.to_owned(),
            });
        }
        Ok(existed)
    }

    /// A fresh master key first in the key file, then every secret rewrapped under it.
    pub async fn secret_rotate_key(&self, by: &str) -> Result<SecretKeyRotated, AdminError> {
        let slot = std::sync::Arc::clone(&self.secrets.store);
        let (key_file, dir) = (self.cfg.secrets.key_file.clone(), self.cfg.secrets_dir());
        let r = tokio::task::spawn_blocking(move || {
            let store = Secrets::open(&slot, &dir, &key_file)?;
            let key_id = store.rotate_key()?;
            Ok::<_, SecretError>((key_id, store.rewrap()))
        })
        .await
        .unwrap_or_else(|e| Err(SecretError::Crypto(format!("the store's task: {e}"))));
        let (key_id, rewrapped) = r.map_err(|e| {
            self.count_error("secret_key_rotation");
            self.secret_refused("rotate-key", "", by, e)
        })?;
        let (n, error) = match rewrapped {
            Ok(n) => (n, None),
            Err(e) => {
                self.count_error("secret_rewrap");
                (0, Some(e.to_string()))
            }
        };
        self.audit.record(&AuditRecord::SecretKeyRotation {
            to_key: key_id.clone(),
            rewrapped: n,
            by: by.to_owned(),
            error: error.clone(),
        });
        match error {
            None => Ok(SecretKeyRotated {
                key_id,
                rewrapped: n,
            }),
            Some(e) => Err(AdminError::Secret(SecretError::Crypto(format!(
                "the new key {key_id} is in force for new secrets, but the older ones could not be rewrapped ({e}); they stay readable under the retired key"
            )))),
        }
    }
}

impl Daemon {
    /// Hands `path`'s newest version to the agent `who`, under a new lease, if its policy
    /// grants it.
    pub async fn secret_fetch(
        &self,
        who: &SecretAsker,
        path: &str,
    ) -> Result<Leased, FetchRefused> {
        let generation = self.policies.generation();
        let r = self.first_fetch(who, path).await;
        self.leased_under(generation, &r);
        r
    }

    async fn first_fetch(&self, who: &SecretAsker, path: &str) -> Result<Leased, FetchRefused> {
        let path = path.trim();
        let suppressed = self.secret_admit(who)?;
        let parsed = SecretPath::parse(path).map_err(|e| {
            self.secret_denied(who, path, e.to_string(), None, suppressed, |m| {
                FetchRefused::BadRequest(m)
            })
        })?;
        if let Some(db) = self.database_of(path) {
            return self.database_fetch(who, &parsed, db, suppressed).await;
        }
        let (rule, ttl) = self.secret_judge(who, path).await.map_err(|(why, rule)| {
            self.secret_denied(who, path, why, rule, suppressed, FetchRefused::Denied)
        })?;
        let secret = self.secret_read(who, &parsed, suppressed).await?;
        let granted = self.secrets.leases.grant(
            Lease {
                id: String::new(),
                identity: who.spiffe_id.clone(),
                serial: who.serial.clone(),
                path: path.to_owned(),
                version: secret.version,
                rule: rule.clone(),
                ttl_seconds: ttl,
                expires: 0,
                role: None,
            },
            lease::now_secs(),
        );
        let lease = granted.map_err(|e| {
            self.secret_denied(
                who,
                path,
                e.to_string(),
                Some(rule.clone()),
                suppressed,
                FetchRefused::TooMany,
            )
        })?;
        self.revoked_meanwhile(who, &lease, suppressed)?;
        self.secret_leased(who, &lease, false, suppressed);
        Ok(Leased { secret, lease })
    }

    /// A revocation that came while the secret was read (after the judgement, before the
    /// lease was in the table to be ended) ends the new lease here, and nothing is handed
    /// out. One that comes later finds the lease in the table.
    fn revoked_meanwhile(
        &self,
        who: &SecretAsker,
        lease: &Lease,
        suppressed: Option<crate::audit::schema::Suppressed>,
    ) -> Result<(), FetchRefused> {
        match self.identity.check_revoked(&who.spiffe_id, &who.serial) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.secret_end(&lease.id, &format!("revoked: {e}"));
                Err(self.secret_denied(
                    who,
                    &lease.path,
                    format!("{} is revoked: {e}", who.spiffe_id),
                    None,
                    suppressed,
                    FetchRefused::Denied,
                ))
            }
        }
    }

    /// Renews lease `id` of the agent `who`: judged again (identity, certificate, policy), and
    /// with the secret's newest version; a renewal refused by the policy ends the lease. The
    /// lease takes the serial of the certificate that renewed it, and the rule (and length)
    /// that grants it now.
    pub async fn secret_renew(&self, who: &SecretAsker, id: &str) -> Result<Leased, FetchRefused> {
        let generation = self.policies.generation();
        let r = self.renewal(who, id).await;
        self.leased_under(generation, &r);
        r
    }

    async fn renewal(&self, who: &SecretAsker, id: &str) -> Result<Leased, FetchRefused> {
        let suppressed = self.secret_admit(who)?;
        let held = self
            .secrets
            .leases
            .get(id, &who.spiffe_id, lease::now_secs())
            .map_err(|e| {
                self.secret_denied(
                    who,
                    "",
                    e.to_string(),
                    None,
                    suppressed,
                    FetchRefused::NotFound,
                )
            })?;
        let path = held.path.clone();
        let parsed =
            SecretPath::parse(&path).map_err(|e| FetchRefused::BadRequest(e.to_string()))?;
        if let Some(db) = self.database_of(&path) {
            return self
                .database_renew(who, held, &parsed, db, suppressed)
                .await;
        }
        let (rule, ttl) = match self.secret_judge(who, &path).await {
            Ok(granted) => granted,
            Err((why, rule)) => {
                self.secret_end(id, &format!("no longer granted: {why}"));
                return Err(self.secret_denied(
                    who,
                    &path,
                    why,
                    rule,
                    suppressed,
                    FetchRefused::Denied,
                ));
            }
        };
        let secret = self.secret_read(who, &parsed, suppressed).await?;
        let renewed = lease::Renewal {
            identity: &who.spiffe_id,
            serial: &who.serial,
            rule: &rule,
            ttl_seconds: ttl,
            version: secret.version,
        };
        let lease = self
            .secrets
            .leases
            .renew(id, renewed, lease::now_secs())
            .map_err(|e: LeaseError| {
                self.secret_denied(
                    who,
                    &path,
                    e.to_string(),
                    None,
                    suppressed,
                    FetchRefused::NotFound,
                )
            })?;
        self.revoked_meanwhile(who, &lease, suppressed)?;
        self.secret_leased(who, &lease, true, suppressed);
        Ok(Leased { secret, lease })
    }

    /// The leases in force, soonest to end first (never a value).
    pub fn secret_leases(&self) -> Vec<Lease> {
        self.secrets.leases.list()
    }

    /// Ends the leases of identities and certificates now revoked, and those the daemon
    /// keeps in the directories of `cgroups` (whose binding was revoked): at the revocation.
    pub(super) fn end_revoked_leases(&self, cgroups: &[u64]) {
        let identity = &self.identity;
        let in_cgroups: std::collections::HashSet<String> = self
            .delivered()
            .iter()
            .filter(|(_, d)| cgroups.contains(&d.cgroup_id))
            .map(|(id, _)| id.clone())
            .collect();
        let ended = self.secrets.leases.end_where(|l| {
            in_cgroups.contains(&l.id) || identity.check_revoked(&l.identity, &l.serial).is_err()
        });
        for l in ended {
            let why = match identity.check_revoked(&l.identity, &l.serial) {
                Err(e) => format!("revoked: {e}"),
                Ok(()) => "revoked".into(),
            };
            self.lease_ended(&l, why);
        }
    }

    /// Ends every lease (the daemon stops).
    pub(super) fn end_all_leases(&self, why: &str) {
        for l in self.secrets.leases.end_where(|_| true) {
            self.lease_ended(&l, why.to_owned());
        }
    }

    /// Ends the leases whose time is up (called every second).
    pub(super) fn expire_leases(&self) {
        for l in self.secrets.leases.expire(lease::now_secs()) {
            self.lease_ended(&l, "expired".into());
        }
    }

    fn secret_end(&self, id: &str, why: &str) {
        if let Some(l) = self.secrets.leases.end(id) {
            self.lease_ended(&l, why.to_owned());
        }
    }

    fn lease_ended(&self, l: &Lease, reason: String) {
        let delivered = self.delivered().remove(&l.id);
        if let Some(d) = delivered {
            self.withdraw_file(&d);
        }
        self.database_lease_ended(&l.id);
        self.audit.record(&AuditRecord::SecretLeaseEnded {
            identity: l.identity.clone(),
            path: l.path.clone(),
            version: l.version,
            lease: l.id.clone(),
            role: l.role.clone(),
            reason,
        });
    }

    /// Whether the agent may ask now (its budget), with what it had held back.
    fn secret_admit(
        &self,
        who: &SecretAsker,
    ) -> Result<Option<crate::audit::schema::Suppressed>, FetchRefused> {
        match self.secrets.budget.admit(&who.spiffe_id, false) {
            Some(held) => Ok(held),
            None => {
                self.count_error("secret_requests_over_budget");
                Err(FetchRefused::TooMany(format!(
                    "{} asks for secrets too often; slow down (fetch once, renew the lease as it nears its end)",
                    who.spiffe_id
                )))
            }
        }
    }

    /// The policy governing `who`, if its identity and certificate stand (not revoked), or
    /// why not.
    async fn standing_policy(&self, who: &SecretAsker) -> Result<String, (String, Option<String>)> {
        if let Err(e) = self.identity.check_revoked(&who.spiffe_id, &who.serial) {
            return Err((format!("{} is revoked: {e}", who.spiffe_id), None));
        }
        self.resolve_caller(&super::CallerRef::SpiffeId(who.spiffe_id.clone()))
            .await
            .map(|(_, policy)| policy)
            .map_err(|why| (why, None))
    }

    /// Whether the agent's identity stands (trusted, not revoked) and its policy grants read
    /// on `path`: the granting rule and the lease's length, or why not.
    async fn secret_judge(
        &self,
        who: &SecretAsker,
        path: &str,
    ) -> Result<(String, u64), (String, Option<String>)> {
        let policy = self.standing_policy(who).await?;
        let q = Query {
            resource: format!("secret:{path}"),
            action: "read".into(),
            attributes: BTreeMap::new(),
        };
        let (answer, ttl) = self.judge(&policy, &q, &who.spiffe_id, &who.spiffe_id);
        if !answer.allow {
            return Err((answer.reason, answer.rule));
        }
        Ok((
            answer.rule.unwrap_or_default(),
            ttl.unwrap_or(crate::policy::secret::DEFAULT_TTL.as_secs()),
        ))
    }

    /// Reads the newest version of `path` for an agent.
    async fn secret_read(
        &self,
        who: &SecretAsker,
        path: &SecretPath,
        suppressed: Option<crate::audit::schema::Suppressed>,
    ) -> Result<Secret, FetchRefused> {
        let slot = Arc::clone(&self.secrets.store);
        let (key_file, dir) = (self.cfg.secrets.key_file.clone(), self.cfg.secrets_dir());
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            Secrets::open(&slot, &dir, &key_file)?.get(&p, None)
        })
        .await
        .unwrap_or_else(|e| Err(SecretError::Crypto(format!("the store's task: {e}"))));
        read.map_err(|e| match e {
            SecretError::NotFound { .. } => {
                self.secret_denied(who, path.as_str(), e.to_string(), None, suppressed, FetchRefused::NotFound)
            }
            e => {
                tracing::error!(error = %e, path = %path, "a secret an agent may read cannot be read");
                self.count_error("secret_unreadable");
                self.secret_denied(
                    who,
                    path.as_str(),
                    e.to_string(),
                    None,
                    suppressed,
                    |_| FetchRefused::Unavailable("the secret cannot be read now; the operator is told".into()),
                )
            }
        })
    }

    fn secret_leased(
        &self,
        who: &SecretAsker,
        l: &Lease,
        renewal: bool,
        suppressed: Option<crate::audit::schema::Suppressed>,
    ) {
        self.audit.record(&AuditRecord::SecretLeased {
            identity: l.identity.clone(),
            path: l.path.clone(),
            version: l.version,
            lease: l.id.clone(),
            expires: l.expires_text(),
            rule: l.rule.clone(),
            renewal,
            asker: who.detail.clone(),
            role: l.role.clone(),
            suppressed,
        });
    }

    /// Audits a refusal; the refusal for the agent (`kind` of `why`).
    fn secret_denied(
        &self,
        who: &SecretAsker,
        path: &str,
        why: String,
        rule: Option<String>,
        suppressed: Option<crate::audit::schema::Suppressed>,
        kind: impl FnOnce(String) -> FetchRefused,
    ) -> FetchRefused {
        self.audit.record(&AuditRecord::SecretDenied {
            identity: who.spiffe_id.clone(),
            path: path.chars().take(crate::secrets::MAX_PATH).collect(),
            reason: why.clone(),
            rule,
            asker: who.detail.clone(),
            suppressed,
        });
        kind(why)
    }
}
