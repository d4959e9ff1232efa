//! Leases on databases (`database/SERVICE`): each is a login role the engine makes with the
//! privileges the agent's policy names on the service's tables, extends at each renewal and
//! drops when the lease ends. The role's `VALID UNTIL` is the lease's end, so a role the
//! daemon could not drop (it died, the database was away) cannot log in past it either.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use super::{FetchRefused, Leased, SecretAsker};
use crate::{
    audit::schema::Suppressed,
    daemon::Daemon,
    policy::Mode,
    secrets::{
        Secret, SecretError, SecretPath, SecretStore as _, SecretValue,
        lease::{self, Lease},
        postgres::{DatabaseConfig, Grants, Postgres, Role},
    },
};

/// The roles of the database leases in force, and those to drop.
#[derive(Debug, Default)]
pub(crate) struct Databases {
    /// Lease id → its role.
    roles: Mutex<HashMap<String, DbRole>>,
    /// Roles whose lease ended, not dropped yet (tried again each second).
    to_drop: Mutex<Vec<DbRole>>,
    /// One change to the databases' roles at a time: PostgreSQL refuses a grant and a revoke
    /// on one table at once ("tuple concurrently updated").
    changes: tokio::sync::Mutex<()>,
}

/// A lease's role: where, which, its password (the agent gets it again at each renewal) and
/// the privileges it was made with.
#[derive(Clone)]
struct DbRole {
    service: String,
    name: String,
    password: zeroize::Zeroizing<String>,
    grants: Grants,
}

impl std::fmt::Debug for DbRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbRole({} of {})", self.name, self.service)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Daemon {
    /// The database `path` names (`database/SERVICE` of `secrets.databases`), if any.
    pub(super) fn database_of(&self, path: &str) -> Option<DatabaseConfig> {
        let service = path.strip_prefix("database/")?;
        self.cfg
            .secrets
            .databases
            .iter()
            .find(|d| d.service == service)
            .cloned()
    }

    /// What the policy of `who` grants on `db` now: the privileges and tables of its rules
    /// on the service whose window is open, and those rules (`file:line`); or why nothing.
    pub(super) async fn database_grants(
        &self,
        who: &SecretAsker,
        db: &DatabaseConfig,
    ) -> Result<(Grants, String), (String, Option<String>)> {
        let policy = self.standing_policy(who).await?;
        let compiled = self.policies.current();
        if compiled.policies.get(&policy).map(|(_, m)| *m) == Some(Mode::Audit) {
            return Err((
                format!("policy {policy:?} is in audit mode: it is handed no credentials"),
                None,
            ));
        }
        let resource = format!("service:{}", db.service);
        let now = jiff::Timestamp::now();
        let mut grants = Grants::default();
        let mut rules = Vec::new();
        for r in compiled.rules.iter().filter(|r| r.policy == policy) {
            let Some(access) = r.access.as_ref().filter(|a| a.resource == resource) else {
                continue;
            };
            let open = r.window.as_ref().is_none_or(|w| {
                w.spans(now, 1)
                    .first()
                    .is_some_and(|(start, _)| *start <= now)
            });
            if !open {
                continue;
            }
            let tables = access.conditions.get("tables").cloned().unwrap_or_default();
            grants
                .add(&access.actions, &tables)
                .map_err(|e| (e, Some(r.source.to_string())))?;
            rules.push(r.source.to_string());
        }
        if grants.is_empty() {
            return Err((
                format!(
                    "no rule of policy {policy:?} grants read or write on tables of {resource} now (a rule lists them as conditions: {{ tables: [...] }})"
                ),
                rules.first().cloned(),
            ));
        }
        Ok((grants, rules.join(", ")))
    }

    /// The grants of the role of database lease `lease_id`, if it holds one.
    pub(super) fn database_role_grants(&self, lease_id: &str) -> Option<Grants> {
        lock(&self.secrets.databases.roles)
            .get(lease_id)
            .map(|r| r.grants.clone())
    }

    /// The administrator's password of `db`, from the store.
    async fn database_admin_password(&self, db: &DatabaseConfig) -> Result<SecretValue, String> {
        let slot = std::sync::Arc::clone(&self.secrets.store);
        let (key_file, dir) = (self.cfg.secrets.key_file.clone(), self.cfg.secrets_dir());
        let path = db.admin_password_secret.clone();
        tokio::task::spawn_blocking(move || {
            let p = SecretPath::parse(&path)?;
            super::Secrets::open(&slot, &dir, &key_file)?.get(&p, None)
        })
        .await
        .unwrap_or_else(|e| Err(SecretError::Crypto(format!("the store's task: {e}"))))
        .map(|s| s.value)
        .map_err(|e| {
            format!(
                "the administrator's password ({}): {e}",
                db.admin_password_secret
            )
        })
    }

    /// The secret an agent gets for a database lease: the role's connection URI.
    fn database_secret(engine: &Postgres, path: &SecretPath, role: &Role) -> Secret {
        Secret {
            path: path.clone(),
            version: 0,
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            value: SecretValue::new(engine.uri(role).as_bytes().to_vec()),
        }
    }

    /// A first fetch of `database/SERVICE`: a new role with what the policy grants, valid
    /// until the lease's end.
    pub(super) async fn database_fetch(
        &self,
        who: &SecretAsker,
        parsed: &SecretPath,
        db: DatabaseConfig,
        suppressed: Option<Suppressed>,
    ) -> Result<Leased, FetchRefused> {
        let path = parsed.as_str();
        let (grants, rule) = self
            .database_grants(who, &db)
            .await
            .map_err(|(why, rule)| {
                self.secret_denied(who, path, why, rule, suppressed, FetchRefused::Denied)
            })?;
        let ttl = db.ttl_seconds().unwrap_or(900);
        let unavailable = |e: String| {
            tracing::error!(error = %e, database = %db.service, "cannot issue a database credential");
            self.count_error("database_issue");
            self.secret_denied(who, path, e, None, suppressed, |_| {
                FetchRefused::Unavailable(
                    "the database credential cannot be issued now; the operator is told".into(),
                )
            })
        };
        // A lease that could not be held is refused before a role is made for it.
        self.secrets.leases.room_for(&who.spiffe_id).map_err(|e| {
            self.secret_denied(
                who,
                path,
                e.to_string(),
                None,
                suppressed,
                FetchRefused::TooMany,
            )
        })?;
        let admin = self
            .database_admin_password(&db)
            .await
            .map_err(unavailable)?;
        let engine = Postgres::new(db.clone());
        let until = SystemTime::now() + Duration::from_secs(ttl);
        let role = {
            let _one = self.secrets.databases.changes.lock().await;
            engine.create(admin.expose(), &grants, until).await
        }
        .map_err(|e| unavailable(e.to_string()))?;
        let secret = Self::database_secret(&engine, parsed, &role);
        let granted = self.secrets.leases.grant(
            Lease {
                id: String::new(),
                identity: who.spiffe_id.clone(),
                serial: who.serial.clone(),
                path: path.to_owned(),
                version: 0,
                rule,
                ttl_seconds: ttl,
                expires: 0,
                role: Some(role.name.clone()),
            },
            lease::now_secs(),
        );
        let db_role = DbRole {
            service: db.service.clone(),
            name: role.name.clone(),
            password: role.password.clone(),
            grants,
        };
        let lease = match granted {
            Ok(l) => l,
            Err(e) => {
                lock(&self.secrets.databases.to_drop).push(db_role);
                self.drop_pending_roles().await;
                return Err(self.secret_denied(
                    who,
                    path,
                    e.to_string(),
                    None,
                    suppressed,
                    FetchRefused::TooMany,
                ));
            }
        };
        lock(&self.secrets.databases.roles).insert(lease.id.clone(), db_role);
        // A lease ended before its role was listed (a revocation, a policy change) found no
        // role to drop: its role is dropped now.
        if self.secrets.leases.find(&lease.id).is_none() {
            self.database_lease_ended(&lease.id);
        }
        self.revoked_meanwhile(who, &lease, suppressed)?;
        self.secret_leased(who, &lease, false, suppressed);
        Ok(Leased { secret, lease })
    }

    /// A renewal of a database lease: its role's end moved to the lease's new end, if the
    /// policy still grants what the role was made with (a change of grants ends the lease:
    /// the agent fetches a role with the new ones).
    pub(super) async fn database_renew(
        &self,
        who: &SecretAsker,
        held: Lease,
        parsed: &SecretPath,
        db: DatabaseConfig,
        suppressed: Option<Suppressed>,
    ) -> Result<Leased, FetchRefused> {
        let path = held.path.clone();
        let Some(db_role) = lock(&self.secrets.databases.roles).get(&held.id).cloned() else {
            return Err(FetchRefused::NotFound(format!(
                "no lease {} of yours is in force; fetch the credential again",
                held.id
            )));
        };
        let judged = self
            .database_grants(who, &db)
            .await
            .and_then(|(grants, rule)| {
                if grants == db_role.grants {
                    Ok(rule)
                } else {
                    Err((
                        "the policy's grants on the database changed; fetch a new credential"
                            .into(),
                        None,
                    ))
                }
            });
        let rule = match judged {
            Ok(rule) => rule,
            Err((why, rule)) => {
                self.secret_end(&held.id, &format!("no longer granted: {why}"));
                self.drop_pending_roles().await;
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
        let ttl = db.ttl_seconds().unwrap_or(900);
        let admin = self.database_admin_password(&db).await.map_err(|e| {
            self.count_error("database_issue");
            self.secret_denied(who, &path, e, None, suppressed, |_| {
                FetchRefused::Unavailable(
                    "the database credential cannot be renewed now; the operator is told".into(),
                )
            })
        })?;
        let engine = Postgres::new(db);
        let until = SystemTime::now() + Duration::from_secs(ttl);
        engine
            .extend(admin.expose(), &db_role.name, until)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot renew a database credential");
                self.count_error("database_issue");
                self.secret_denied(who, &path, e.to_string(), None, suppressed, |_| {
                    FetchRefused::Unavailable(
                        "the database credential cannot be renewed now; the operator is told"
                            .into(),
                    )
                })
            })?;
        let renewed = lease::Renewal {
            identity: &who.spiffe_id,
            serial: &who.serial,
            rule: &rule,
            ttl_seconds: ttl,
            version: 0,
        };
        let lease = self
            .secrets
            .leases
            .renew(&held.id, renewed, lease::now_secs())
            .map_err(|e| FetchRefused::NotFound(e.to_string()))?;
        self.revoked_meanwhile(who, &lease, suppressed)?;
        let role = Role {
            name: db_role.name.clone(),
            password: db_role.password.clone(),
        };
        let secret = Self::database_secret(&engine, parsed, &role);
        self.secret_leased(who, &lease, true, suppressed);
        Ok(Leased { secret, lease })
    }

    /// A lease ended: its role, if it had one, is to be dropped.
    pub(super) fn database_lease_ended(&self, lease_id: &str) {
        let role = lock(&self.secrets.databases.roles).remove(lease_id);
        if let Some(role) = role {
            lock(&self.secrets.databases.to_drop).push(role);
        }
    }

    /// Drops the roles whose lease ended (their sessions end); those that fail are tried
    /// again at the next call (every second), and until then cannot log in past their end.
    /// A role leaves the list only once dropped: a call cut short loses none.
    pub(crate) async fn drop_pending_roles(&self) {
        let pending = lock(&self.secrets.databases.to_drop).clone();
        for role in pending {
            let Some(db) = self.database_of(&format!("database/{}", role.service)) else {
                tracing::error!(role = %role.name, database = %role.service, "a role to drop belongs to a database no longer configured; drop it by hand");
                self.count_error("database_drop");
                self.forget_drop(&role.name);
                continue;
            };
            let dropped = match self.database_admin_password(&db).await {
                Ok(admin) => {
                    let _one = self.secrets.databases.changes.lock().await;
                    Postgres::new(db)
                        .drop_role(admin.expose(), &role.name)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            match dropped {
                Ok(()) => {
                    self.forget_drop(&role.name);
                    tracing::info!(role = %role.name, database = %role.service, "database role dropped");
                }
                Err(e) => {
                    tracing::warn!(role = %role.name, error = %e, "cannot drop a database role yet; it cannot log in past its end");
                    self.count_error("database_drop");
                }
            }
        }
    }

    fn forget_drop(&self, name: &str) {
        lock(&self.secrets.databases.to_drop).retain(|r| r.name != name);
    }

    /// At start: the roles an earlier daemon made are dropped (their leases ended with it),
    /// database by database; one that cannot be reached now is told and tried at the next
    /// start (its roles cannot log in past their end meanwhile).
    pub(crate) async fn sweep_stale_roles(&self) {
        for db in self.cfg.secrets.databases.clone() {
            let service = db.service.clone();
            let swept = match self.database_admin_password(&db).await {
                Ok(admin) => {
                    let _one = self.secrets.databases.changes.lock().await;
                    Postgres::new(db)
                        .sweep(admin.expose())
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            match swept {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(database = %service, roles = n, "roles an earlier daemon made were dropped: their leases ended with it")
                }
                Err(e) => {
                    tracing::error!(database = %service, error = %e, "cannot drop the roles an earlier daemon made");
                    self.count_error("database_sweep");
                }
            }
        }
    }
}
