//! The PostgreSQL engine: instead of a long-lived password, each lease on a database is a
//! login role of its own, made for the lease with `VALID UNTIL` its end and the privileges
//! the agent's policy names, extended at each renewal, and dropped (its sessions ended) when
//! the lease ends.
//!
//! A database is a service of the catalog (`resource: service:NAME`). What a role may do is
//! what the policy's rules on that service say: `read` grants SELECT, `write` INSERT,
//! UPDATE and DELETE (a rule naming no action grants all four), on the tables its
//! `conditions: { tables: [...] }` lists. A rule that lists no tables grants nothing here.
//!
//! Every name that reaches SQL is checked here and quoted: role names are made here (`aw_`
//! and random hex), tables must be plain identifiers; a password reaches the server only as
//! its SCRAM verifier. The daemon connects as an administrator role whose password is a
//! secret of the store.

use std::{collections::BTreeSet, fmt::Write as _, time::SystemTime};

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use serde::Deserialize;

/// A database the engine issues roles for (`secrets.databases` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The catalog service agents reach it as; agents fetch `database/SERVICE`.
    pub service: String,
    /// `postgresql`, the one engine so far.
    #[serde(default = "postgresql")]
    pub engine: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The database the roles log in to.
    pub database: String,
    /// The role the daemon connects as to make and drop roles.
    pub admin_user: String,
    /// The path, in the secret store, of that role's password.
    pub admin_password_secret: String,
    /// How long a lease (and its role) lasts unless renewed: 10s to 24h, 15m if not given.
    #[serde(default)]
    pub ttl: Option<String>,
}

fn postgresql() -> String {
    "postgresql".into()
}

fn default_port() -> u16 {
    5432
}

/// The shortest and longest lease on a database, and the default.
pub const MIN_TTL: std::time::Duration = std::time::Duration::from_secs(10);
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl DatabaseConfig {
    /// What is wrong with it, if anything (for the configuration's check).
    pub fn check(&self) -> Result<(), String> {
        if self.engine != "postgresql" {
            return Err(format!(
                "{}: engine {:?} is not known; the one engine is postgresql",
                self.service, self.engine
            ));
        }
        if self.service.is_empty() || !self.service.bytes().all(name_byte) {
            return Err(format!(
                "{:?} is not a service name (letters, digits, `-`, `_`, `.`)",
                self.service
            ));
        }
        for (what, v) in [
            ("host", &self.host),
            ("database", &self.database),
            ("admin_user", &self.admin_user),
        ] {
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(format!(
                    "{}: `{what}` is empty or holds control characters",
                    self.service
                ));
            }
        }
        crate::policy::secret::check_path(&self.admin_password_secret)
            .map_err(|e| format!("{}: admin_password_secret {e}", self.service))?;
        self.ttl_seconds().map(|_| ())
    }

    /// The lease's length, in seconds.
    pub fn ttl_seconds(&self) -> Result<u64, String> {
        let Some(text) = &self.ttl else {
            return Ok(DEFAULT_TTL.as_secs());
        };
        let d = humantime::parse_duration(text.trim())
            .map_err(|e| format!("{}: ttl {text:?} is not a duration ({e})", self.service))?;
        if d < MIN_TTL || d > MAX_TTL {
            return Err(format!(
                "{}: ttl {text:?} is not between 10s and 24h",
                self.service
            ));
        }
        Ok(d.as_secs())
    }
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.".contains(&b)
}

/// Why the engine could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("database {service}: {message}")]
    Grants { service: String, message: String },
    #[error("database {service} at {host}:{port}: {source}")]
    Postgres {
        service: String,
        host: String,
        port: u16,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database {service}: no randomness for a role")]
    Random { service: String },
    #[error("database {service}: no answer within {OP_LIMIT:?}")]
    Timeout { service: String },
}

/// The privileges a role gets, table by table: which of SELECT, INSERT, UPDATE, DELETE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub by_table: std::collections::BTreeMap<String, BTreeSet<&'static str>>,
}

impl Grants {
    /// Adds what one rule grants: `actions` (none means every action) on its `tables`, and
    /// on those only.
    pub fn add(&mut self, actions: &[String], tables: &[String]) -> Result<(), String> {
        for t in tables {
            check_table(t)?;
        }
        let mut privileges = BTreeSet::new();
        if actions.is_empty() {
            privileges.extend(["SELECT", "INSERT", "UPDATE", "DELETE"]);
        }
        for a in actions {
            match a.as_str() {
                "read" => {
                    privileges.insert("SELECT");
                }
                "write" => privileges.extend(["INSERT", "UPDATE", "DELETE"]),
                "*" => privileges.extend(["SELECT", "INSERT", "UPDATE", "DELETE"]),
                _ => {}
            }
        }
        if privileges.is_empty() {
            return Ok(());
        }
        for t in tables {
            self.by_table
                .entry(t.clone())
                .or_default()
                .extend(privileges.iter().copied());
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }
}

/// A table as a rule may name it: `name` or `schema.name`, each a plain identifier.
fn check_table(t: &str) -> Result<(), String> {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| ok(p)) {
        Ok(())
    } else {
        Err(format!(
            "table {t:?} is not a plain name: write NAME or SCHEMA.NAME, letters, digits and _"
        ))
    }
}

/// `t` quoted as an identifier, each part (checked by [`check_table`] before).
fn quote_table(t: &str) -> String {
    t.split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// A role the engine made: its name and password.
pub struct Role {
    pub name: String,
    pub password: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Role({})", self.name)
    }
}

fn random_hex(bytes: usize, service: &str) -> Result<String, EngineError> {
    let mut b = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| EngineError::Random {
            service: service.to_owned(),
        })?;
    Ok(crate::audit::hex(&b))
}

/// An instant as PostgreSQL reads a timestamp with time zone.
fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Sessions one role may hold at once.
const CONNECTIONS: u32 = 4;
/// The longest one operation (connect and statements) may take.
const OP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The engine of one database.
#[derive(Debug, Clone)]
pub struct Postgres {
    cfg: DatabaseConfig,
}

impl Postgres {
    pub fn new(cfg: DatabaseConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &DatabaseConfig {
        &self.cfg
    }

    /// The connection URI a role logs in with.
    pub fn uri(&self, role: &Role) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(format!(
            "postgresql://{}:{}@{}:{}/{}",
            role.name,
            role.password.as_str(),
            self.cfg.host,
            self.cfg.port,
            self.cfg.database
        ))
    }

    fn failed(&self, source: tokio_postgres::Error) -> EngineError {
        EngineError::Postgres {
            service: self.cfg.service.clone(),
            host: self.cfg.host.clone(),
            port: self.cfg.port,
            source,
        }
    }

    /// A connection as the administrator role, its driver spawned on the runtime.
    async fn admin(&self, password: &[u8]) -> Result<tokio_postgres::Client, EngineError> {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.cfg.host)
            .port(self.cfg.port)
            .dbname(&self.cfg.database)
            .user(&self.cfg.admin_user)
            .password(password)
            .application_name("agentwall")
            // A lock an agent's own session holds (it may alter its role) or a slow server
            // fails the statement, to be tried again, rather than holding the daemon.
            .options("-c lock_timeout=2000 -c statement_timeout=5000")
            .connect_timeout(std::time::Duration::from_secs(5));
        let (client, connection) = c
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| self.failed(e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
        Ok(client)
    }

    /// `op`, or a timeout.
    async fn limited<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        tokio::time::timeout(OP_LIMIT, op)
            .await
            .unwrap_or_else(|_| {
                Err(EngineError::Timeout {
                    service: self.cfg.service.clone(),
                })
            })
    }

    /// Makes a login role valid until `until`, with `grants`.
    pub async fn create(
        &self,
        admin_password: &[u8],
        grants: &Grants,
        until: SystemTime,
    ) -> Result<Role, EngineError> {
        self.limited(self.create_now(admin_password, grants, until))
            .await
    }

    async fn create_now(
        &self,
        admin_password: &[u8],
        grants: &Grants,
        until: SystemTime,
    ) -> Result<Role, EngineError> {
        if grants.is_empty() {
            return Err(EngineError::Grants {
                service: self.cfg.service.clone(),
                message: "nothing to grant".into(),
            });
        }
        let role = Role {
            name: format!("aw_{}", random_hex(8, &self.cfg.service)?),
            password: zeroize::Zeroizing::new(random_hex(24, &self.cfg.service)?),
        };
        // The server gets the password's SCRAM verifier, never the password: a statement log
        // on its side shows nothing that logs in.
        let verifier = postgres_protocol::password::scram_sha_256(role.password.as_bytes());
        let mut sql = zeroize::Zeroizing::new(String::new());
        let _ = write!(
            sql,
            "BEGIN; CREATE ROLE \"{name}\" LOGIN PASSWORD '{verifier}' VALID UNTIL '{until}' \
             CONNECTION LIMIT {CONNECTIONS};",
            name = role.name,
            until = timestamp(until),
        );
        for (table, privileges) in &grants.by_table {
            let privileges: Vec<&str> = privileges.iter().copied().collect();
            let _ = write!(
                sql,
                " GRANT {} ON {} TO \"{}\";",
                privileges.join(", "),
                quote_table(table),
                role.name
            );
        }
        sql.push_str(" COMMIT;");
        let admin = self.admin(admin_password).await?;
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(role)
    }

    /// Moves the end of `role` to `until`.
    pub async fn extend(
        &self,
        admin_password: &[u8],
        role: &str,
        until: SystemTime,
    ) -> Result<(), EngineError> {
        self.limited(async {
            let admin = self.admin(admin_password).await?;
            admin
                .batch_execute(&format!(
                    "ALTER ROLE \"{}\" VALID UNTIL '{}'",
                    checked_role(role),
                    timestamp(until)
                ))
                .await
                .map_err(|e| self.failed(e))
        })
        .await
    }

    /// Ends `role`: its sessions terminated (first: one may hold a lock on the role), no
    /// more logins, its sessions terminated again (one that logged in meanwhile), its
    /// privileges and itself dropped. A role already gone is fine.
    pub async fn drop_role(&self, admin_password: &[u8], role: &str) -> Result<(), EngineError> {
        self.limited(async {
            let admin = self.admin(admin_password).await?;
            self.drop_with(&admin, checked_role(role)).await
        })
        .await
    }

    async fn drop_with(
        &self,
        admin: &tokio_postgres::Client,
        role: &str,
    ) -> Result<(), EngineError> {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(|e| self.failed(e))?
            .is_some();
        if !exists {
            return Ok(());
        }
        let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1";
        admin
            .execute(terminate, &[&role])
            .await
            .map_err(|e| self.failed(e))?;
        admin
            .batch_execute(&format!("ALTER ROLE \"{role}\" NOLOGIN"))
            .await
            .map_err(|e| self.failed(e))?;
        admin
            .execute(terminate, &[&role])
            .await
            .map_err(|e| self.failed(e))?;
        admin
            .batch_execute(&format!(
                "BEGIN; DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\"; COMMIT;"
            ))
            .await
            .map_err(|e| self.failed(e))
    }

    /// Drops every role the engine made here (`aw_` and 16 hex digits): at start, the leases
    /// of an earlier daemon are gone with it. Returns how many.
    pub async fn sweep(&self, admin_password: &[u8]) -> Result<usize, EngineError> {
        tokio::time::timeout(OP_LIMIT * 6, async {
            let admin = self.admin(admin_password).await?;
            let rows = admin
                .query(
                    "SELECT rolname FROM pg_roles WHERE rolname ~ '^aw_[0-9a-f]{16}$'",
                    &[],
                )
                .await
                .map_err(|e| self.failed(e))?;
            let mut n = 0;
            for row in rows {
                let name: String = row.get(0);
                self.drop_with(&admin, checked_role(&name)).await?;
                n += 1;
            }
            Ok(n)
        })
        .await
        .unwrap_or_else(|_| {
            Err(EngineError::Timeout {
                service: self.cfg.service.clone(),
            })
        })
    }
}

/// A role name as the engine makes them (`aw_` and hex), or one that names nothing.
fn checked_role(role: &str) -> &str {
    let ok = role
        .strip_prefix("aw_")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok { role } else { "aw_invalid" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_grant_privileges_on_the_tables_they_list() {
        let mut g = Grants::default();
        g.add(&["read".into()], &["events".into(), "sessions".into()])
            .unwrap();
        g.add(&["write".into()], &["audit.log_2026".into()])
            .unwrap();
        // Each rule's privileges on its own tables: no write on the tables read.
        assert_eq!(g.by_table["events"], BTreeSet::from(["SELECT"]));
        assert_eq!(g.by_table["sessions"], BTreeSet::from(["SELECT"]));
        assert_eq!(
            g.by_table["audit.log_2026"],
            BTreeSet::from(["INSERT", "UPDATE", "DELETE"])
        );
        g.add(&["read".into()], &["audit.log_2026".into()]).unwrap();
        assert_eq!(g.by_table["audit.log_2026"].len(), 4);
        // An action a database does not know grants nothing; nor does a rule without tables.
        let mut none = Grants::default();
        none.add(&["write:message".into()], &["t".into()]).unwrap();
        none.add(&["read".into()], &[]).unwrap();
        assert!(none.is_empty());
        for bad in ["a;b", "\"x\"", "a.b.c", "1t", "", "t'"] {
            assert!(
                Grants::default().add(&[], &[bad.into()]).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(quote_table("audit.log"), "\"audit\".\"log\"");
        assert_eq!(checked_role("aw_00ff"), "aw_00ff");
        assert_eq!(checked_role("aw_x\"; DROP"), "aw_invalid");
    }

    #[test]
    fn a_database_is_checked_with_what_to_fix() {
        let cfg = |ttl: Option<&str>, engine: &str| DatabaseConfig {
            service: "analytics-db".into(),
            engine: engine.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            database: "analytics".into(),
            admin_user: "agentwall".into(),
            admin_password_secret: "agentwall/databases/analytics-db".into(),
            ttl: ttl.map(Into::into),
        };
        assert!(cfg(None, "postgresql").check().is_ok());
        assert_eq!(cfg(None, "postgresql").ttl_seconds(), Ok(900));
        assert!(
            cfg(Some("5s"), "postgresql")
                .check()
                .unwrap_err()
                .contains("between 10s and 24h")
        );
        assert!(
            cfg(None, "mysql")
                .check()
                .unwrap_err()
                .contains("one engine is postgresql")
        );
    }
}
