//! The daemon's secret store, for its operators (`agentwall secret`, on the admin socket):
//! put, get, list, remove and rotate the master key; each is audited, none records a value.
//!
//! The store is opened on first use, so that a daemon that keeps no secrets never makes a
//! master key; a failure to open it (a key file others may read, say) is answered to the
//! operator who asked and tried again at the next request.

use std::sync::{Arc, Mutex};

use super::{AdminError, Daemon};
use crate::{
    audit::schema::AuditRecord,
    secrets::{Secret, SecretError, SecretInfo, SecretPath, SecretStore as _, local::LocalStore},
};

/// The store, once opened.
#[derive(Debug, Default)]
pub(crate) struct Secrets(Arc<Mutex<Option<Arc<LocalStore>>>>);

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
        let slot = std::sync::Arc::clone(&self.secrets.0);
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
        let slot = std::sync::Arc::clone(&self.secrets.0);
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
