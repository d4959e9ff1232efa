//! Agent identity: SPIFFE IDs, X509-SVIDs from the local CA, verification, and the
//! issuance log. Enrollment over mTLS, rotation and revocation come next (identity issue).

pub mod attest;
pub mod config;
pub mod enroll;
pub mod log;
pub mod profile;
pub mod refusal;
pub mod revoke;
pub mod service;
pub use crate::spiffe;
pub mod svid;
pub mod token;
pub mod verify;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use self::{
    spiffe::{IdError, SpiffeId},
    svid::{CaError, Issued, LeafRequest, LocalCa},
};

/// Where the local CA lives below the state directory.
pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

/// The issuance log below the state directory.
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("issuance.log")
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Log(#[from] log::LogError),
}

/// A full SPIFFE ID, or the path of one in `trust_domain` (`agent/<name>/<env>`).
pub fn parse_id(s: &str, trust_domain: &str) -> Result<SpiffeId, IdError> {
    if s.starts_with("spiffe://") || s.contains("://") {
        SpiffeId::workload(s)
    } else {
        SpiffeId::workload(&format!(
            "spiffe://{trust_domain}/{}",
            s.trim_start_matches('/')
        ))
    }
}

/// Issues an SVID from the state directory's CA, records it in the issuance log, then
/// writes `svid.pem`, `svid.key` (0600) and `bundle.pem` into `out`.
pub fn issue_into(
    state_dir: &Path,
    (trust_domain, keys): (&str, svid::KeyAlgorithm),
    req: &LeafRequest,
    requester: &str,
    out: &Path,
) -> Result<Issued, IdentityError> {
    let now = SystemTime::now();
    let ca = LocalCa::load_or_create(&ca_dir(state_dir), trust_domain, keys, now)?;
    let issued = ca.issue(req, now)?;
    // Recorded before it is handed out: no identity exists that the log does not know.
    log::append(
        &log_path(state_dir),
        &log::Entry::of(&issued, requester, now),
    )?;
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Io { op, path, source }
    };
    std::fs::create_dir_all(out).map_err(io("creating", out))?;
    svid::write_private(&out.join("svid.key"), issued.key_pem.as_bytes(), 0o600)?;
    svid::write_private(&out.join("svid.pem"), issued.cert_pem.as_bytes(), 0o644)?;
    svid::write_private(&out.join("bundle.pem"), ca.cert_pem().as_bytes(), 0o644)?;
    Ok(issued)
}

/// Parses a lifetime such as `1h`, `15m`, `90s`.
pub fn parse_lifetime(s: &str) -> Result<Duration, LifetimeError> {
    humantime::parse_duration(s).map_err(|source| LifetimeError {
        text: s.to_string(),
        source,
    })
}

/// A lifetime that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a duration such as 1h or 15m: {source}")]
pub struct LifetimeError {
    text: String,
    source: humantime::DurationError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_full_or_short() {
        assert_eq!(
            parse_id("agent/a/prod", "example.org").unwrap().to_string(),
            "spiffe://example.org/agent/a/prod"
        );
        assert_eq!(
            parse_id("spiffe://x.org/agent/a/prod", "example.org")
                .unwrap()
                .trust_domain(),
            "x.org"
        );
        assert!(parse_id("https://x.org/a", "example.org").is_err());
        assert!(parse_id("agent/a/../b", "example.org").is_err());
    }
}
