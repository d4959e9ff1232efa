//! The revocation list: SPIFFE IDs and certificate serials that are no longer trusted.
//!
//! Kept in `<state dir>/revocations.json` (0600), replaced atomically on every change, and read
//! at start so that a revocation outlives the daemon. Entries are never removed by the daemon.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("reading the revocation list {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the revocation list {path} is corrupt ({message}); it is never skipped, because that \
         would trust revoked identities again: restore it from a backup or fix it by hand"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("writing the revocation list {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0:?} is neither a SPIFFE ID (spiffe://...) nor a certificate serial (hex digits, as \
         `agentwall identity log` prints them)"
    )]
    BadTarget(String),
}

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every certificate of this SPIFFE ID, past and future.
    SpiffeId(String),
    /// One certificate, by serial (upper-case hex).
    Serial(String),
}

impl Target {
    /// A SPIFFE ID (validated) or a serial in hex.
    pub fn parse(s: &str) -> Result<Self, RevokeError> {
        let s = s.trim();
        if s.starts_with("spiffe://") {
            return super::spiffe::SpiffeId::workload(s)
                .map(|id| Self::SpiffeId(id.to_string()))
                .map_err(|_| RevokeError::BadTarget(s.into()));
        }
        let hex = s.replace(':', "");
        if !hex.is_empty() && hex.len() <= 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Serial(hex.to_ascii_uppercase()));
        }
        Err(RevokeError::BadTarget(s.into()))
    }

    pub fn matches(&self, spiffe_id: &str, serial: &str) -> bool {
        match self {
            Self::SpiffeId(id) => id == spiffe_id,
            Self::Serial(s) => s.eq_ignore_ascii_case(serial),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SpiffeId(id) => f.write_str(id),
            Self::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub target: Target,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
    /// Who asked (uid on the admin socket).
    pub by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub entries: Vec<Revocation>,
}

impl RevocationList {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("revocations.json")
    }

    /// Reads the list; a missing file is an empty list, a corrupt one an error.
    pub fn load(path: &Path) -> Result<Self, RevokeError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RevokeError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RevokeError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), RevokeError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| RevokeError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        crate::state::write_atomic(path, &bytes, 0o600).map_err(|source| RevokeError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The revocation that covers a certificate, if any.
    pub fn find(&self, spiffe_id: &str, serial: &str) -> Option<&Revocation> {
        self.entries
            .iter()
            .find(|r| r.target.matches(spiffe_id, serial))
    }

    /// Adds a revocation unless the same target is already revoked; returns whether it was new.
    pub fn add(&mut self, r: Revocation) -> bool {
        if self.entries.iter().any(|e| e.target == r.target) {
            return false;
        }
        self.entries.push(r);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_match() {
        let id = Target::parse("spiffe://example.org/agent/a/prod").unwrap();
        assert!(id.matches("spiffe://example.org/agent/a/prod", "01"));
        assert!(!id.matches("spiffe://example.org/agent/a/dev", "01"));
        let serial = Target::parse("7f:0a:bc").unwrap();
        assert_eq!(serial, Target::Serial("7F0ABC".into()));
        assert!(serial.matches("spiffe://x/y", "7f0abc"));
        for bad in ["", "spiffe://Example.org/a", "xyz", "agent/a/prod"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_round_trips_and_refuses_corruption() {
        let dir = std::env::temp_dir().join(format!("aw-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = RevocationList::path(&dir);
        assert_eq!(RevocationList::load(&p).unwrap(), RevocationList::default());
        let mut l = RevocationList::default();
        let r = Revocation {
            target: Target::Serial("AB".into()),
            reason: "key leaked".into(),
            at: "2026-01-01T00:00:00Z".into(),
            by: "uid 0".into(),
        };
        assert!(l.add(r.clone()));
        assert!(!l.add(r));
        l.save(&p).unwrap();
        assert_eq!(RevocationList::load(&p).unwrap(), l);
        std::fs::write(&p, b"{\"entries\": [").unwrap();
        let e = RevocationList::load(&p).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("never skipped"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
