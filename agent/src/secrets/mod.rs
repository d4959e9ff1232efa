//! Secrets for agents: values (API keys, passwords, signing keys) kept encrypted at rest and
//! handed out by identity and policy.
//!
//! The seam is [`SecretStore`]: paths to versioned values. The embedded store
//! ([`local::LocalStore`], in the state directory) is the default; an external one (HashiCorp
//! Vault or OpenBao KV version 2, which version values the same way) implements the same
//! trait. Who may read what is not the store's business: the daemon decides by policy before
//! it asks the store, and audits every access.
//!
//! A value lives in memory only as [`SecretValue`], which is wiped when dropped and never
//! printed.

pub mod lease;
pub mod local;
pub mod postgres;

use std::fmt;

pub use crate::policy::secret::MAX_PATH;
/// Largest secret value, in bytes.
/// (Sent base64 on the admin socket, whose lines are at most 64 KiB.)
pub const MAX_VALUE: usize = 32 * 1024;

/// Why a secret could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret path {path:?}: {message}")]
    BadPath { path: String, message: String },
    #[error("secret {path}: the value is {len} bytes, over the {MAX_VALUE} a secret may hold")]
    TooLarge { path: String, len: usize },
    #[error("secret value: {0}")]
    BadValue(String),
    #[error("secret {path}: the value is empty")]
    Empty { path: String },
    #[error("no secret {path}")]
    NotFound { path: String },
    #[error("secret {path} has no version {version} (it has {have})")]
    NoVersion {
        path: String,
        version: u32,
        have: String,
    },
    /// A stored secret failed its integrity check: the file was changed by someone other than
    /// the daemon, or belongs to another path.
    #[error(
        "secret store {file}: {message}; the file was changed outside agentwall: restore it from a backup, or remove it and put the secret again"
    )]
    Tampered { file: String, message: String },
    #[error(
        "secret {path} version {version} is sealed under key {key_id}, which the key file no longer holds; put the retired key back below the current one"
    )]
    UnknownKey {
        path: String,
        version: u32,
        key_id: String,
    },
    #[error("secrets master key: {0}")]
    Key(#[from] crate::audit::keys::KeyError),
    #[error("secret store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret store: {0}")]
    Crypto(String),
}

/// A secret's path: segments of letters, digits, `.`, `_` and `-`, joined by `/`
/// (`agent/data-pipeline-agent/db-password`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretPath(String);

impl SecretPath {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        crate::policy::secret::check_path(text).map_err(|message| SecretError::BadPath {
            path: text.chars().take(MAX_PATH).collect(),
            message,
        })?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret's value: wiped from memory when dropped, never shown by `Debug`.
pub struct SecretValue(zeroize::Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(zeroize::Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue({} bytes)", self.0.len())
    }
}

/// One version of a secret, as read.
#[derive(Debug)]
pub struct Secret {
    pub path: SecretPath,
    pub version: u32,
    /// When the version was put (RFC 3339).
    pub created: String,
    pub value: SecretValue,
}

/// What a listing says of a secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretInfo {
    pub path: String,
    /// The versions kept, oldest first.
    pub versions: Vec<u32>,
    /// When the newest version was put (RFC 3339).
    pub updated: String,
}

/// A store of versioned secrets. Each put makes a new version; reads name a version or take
/// the newest; a removal ends every version of the path.
pub trait SecretStore: Send + Sync {
    /// Stores `value` as the next version of `path`; returns that version.
    fn put(&self, path: &SecretPath, value: &[u8]) -> Result<u32, SecretError>;
    /// The newest version of `path`, or the one named.
    fn get(&self, path: &SecretPath, version: Option<u32>) -> Result<Secret, SecretError>;
    /// The secrets whose paths start with `prefix` (every one for an empty prefix), by path.
    fn list(&self, prefix: &str) -> Result<Vec<SecretInfo>, SecretError>;
    /// Removes `path` with all its versions; whether it existed.
    fn remove(&self, path: &SecretPath) -> Result<bool, SecretError>;
}

/// Checks a value before it is stored.
fn check_value(path: &SecretPath, value: &[u8]) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_string(),
        });
    }
    if value.len() > MAX_VALUE {
        return Err(SecretError::TooLarge {
            path: path.to_string(),
            len: value.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_with_a_reason() {
        for (text, why) in [
            ("", "is empty"),
            ("/a", "empty segment"),
            ("a/", "empty segment"),
            ("a//b", "empty segment"),
            ("a/../b", "`..` segment"),
            ("a/./b", "`.` or `..` segment"),
            ("a/b c", "has ' '"),
            ("a/b*", "has '*'"),
            ("ä", "has 'ä'"),
        ] {
            let e = SecretPath::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let long = "a".repeat(MAX_PATH + 1);
        assert!(
            SecretPath::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("over 256 bytes")
        );
        assert_eq!(
            SecretPath::parse("agent/data-pipeline-agent/db.password_1")
                .unwrap()
                .as_str(),
            "agent/data-pipeline-agent/db.password_1"
        );
    }

    #[test]
    fn a_value_never_shows_in_debug() {
        let v = SecretValue::new(b"hunter2".to_vec());
        assert_eq!(format!("{v:?}"), "SecretValue(7 bytes)");
    }
}
