//! The identity service's part of the daemon's configuration (`identity:`).

use std::path::PathBuf;

use serde::Deserialize;

use crate::clock::duration_text;

/// The identity service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Trust domain of the embedded CA, and of policy identities given as paths.
    pub trust_domain: String,
    /// Lifetime of certificates the daemon issues (`agentwall exec --cert`, renewals).
    #[serde(with = "duration_text")]
    pub svid_lifetime: std::time::Duration,
    /// How long before expiry certificates of launched agents are renewed.
    #[serde(with = "duration_text")]
    pub renew_before: std::time::Duration,
    /// Lifetime of JWT-SVID tokens.
    #[serde(with = "duration_text")]
    pub token_lifetime: std::time::Duration,
    /// Tolerated clock difference when judging validity periods.
    #[serde(with = "duration_text")]
    pub clock_skew: std::time::Duration,
    /// Further trusted trust domains, each with its CA bundle (PEM), such as one exported by a
    /// SPIRE server (`spire-server bundle show -format pem`).
    pub bundles: Vec<BundleEntry>,
    /// Where the files of agents launched by `agentwall exec --cert` live, one directory per
    /// cgroup; renewals replace them there.
    pub agent_dir: PathBuf,
    /// Key type of the certificates the local CA issues, and of the CA itself when it is
    /// created: `ed25519` (default) or `ecdsa-p256`.
    pub key_algorithm: super::svid::KeyAlgorithm,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            trust_domain: crate::defaults::TRUST_DOMAIN.into(),
            svid_lifetime: Duration::from_secs(3600),
            renew_before: Duration::from_secs(300),
            token_lifetime: Duration::from_secs(300),
            clock_skew: Duration::from_secs(30),
            bundles: Vec::new(),
            agent_dir: PathBuf::from(crate::defaults::AGENT_DIR),
            key_algorithm: super::svid::KeyAlgorithm::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEntry {
    pub trust_domain: String,
    pub file: PathBuf,
}
