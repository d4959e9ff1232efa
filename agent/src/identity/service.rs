//! The daemon's identity service: the local CA, the trust bundles, the revocation list and the
//! TLS configuration of the enrollment socket.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::config::IdentityConfig;
use super::{
    IdentityError, ca_dir, enroll, log, log_path,
    revoke::{Revocation, RevocationList, RevocationStore, RevokeError, Target},
    spiffe::SpiffeId,
    svid::{Issued, LeafRequest, LocalCa},
    token::TokenSigner,
    verify::{SvidError, TrustBundles, VerifiedSvid, Verifier},
};
use crate::policy::Grant;

/// Lifetime of the daemon's own enrollment server certificate; it is issued again at start
/// and whenever less than a quarter of it is left.
const SERVER_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Revoke(#[from] RevokeError),
    #[error("trust bundle {path} for {trust_domain}: {message}")]
    Bundle {
        path: PathBuf,
        trust_domain: String,
        message: String,
    },
    #[error("enrollment TLS: {0}")]
    Tls(#[from] enroll::TlsSetupError),
    #[error(transparent)]
    Token(#[from] super::token::TokenError),
}

/// Why a presented certificate is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("certificate rejected: {0}")]
    Svid(#[from] SvidError),
    #[error(transparent)]
    Token(#[from] super::token::TokenError),
    #[error("{target} was revoked at {at}: {reason}")]
    Revoked {
        target: String,
        at: String,
        reason: String,
    },
}

struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    not_after: SystemTime,
}

pub struct IdentityService {
    cfg: IdentityConfig,
    state_dir: PathBuf,
    ca: LocalCa,
    verifier: Verifier,
    revocations: RwLock<RevocationList>,
    /// Saves are serialized here, apart from the list, which enrollments read meanwhile.
    revocation_store: std::sync::Mutex<RevocationStore>,
    server: RwLock<ServerTls>,
    tokens: TokenSigner,
    /// The X.509 bundle of every trusted trust domain, the local one included: concatenated
    /// DER certificates, as the Workload API hands them out.
    x509_bundles: BTreeMap<String, Vec<u8>>,
    jwks: jsonwebtoken::jwk::JwkSet,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("trust_domain", &self.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

fn read_bundle(
    path: &Path,
    trust_domain: &str,
) -> Result<Vec<CertificateDer<'static>>, ServiceError> {
    let err = |message: String| ServiceError::Bundle {
        path: path.to_path_buf(),
        trust_domain: trust_domain.into(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Issues (and logs) the enrollment server's certificate.
fn issue_server(
    ca: &LocalCa,
    state_dir: &Path,
    now: SystemTime,
) -> Result<ServerTls, ServiceError> {
    let id = SpiffeId::workload(&format!("spiffe://{}/agentwall/node", ca.trust_domain()))
        .map_err(IdentityError::from)?;
    let req = LeafRequest {
        id,
        lifetime: SERVER_LIFETIME,
        capabilities: Vec::new(),
    };
    let issued = ca
        .issue_server(&req, &[enroll::SERVER_NAME], now)
        .map_err(IdentityError::from)?;
    log::append(
        &log_path(state_dir),
        &log::Entry::of(&issued, "agentwall daemon (enrollment server)", now),
    )
    .map_err(IdentityError::from)?;
    Ok(ServerTls {
        config: enroll::server_config(&issued.cert_pem, &issued.key_pem)?,
        not_after: issued.not_after,
    })
}

impl IdentityService {
    /// Loads (or creates) the local CA, the configured bundles and the revocation list, and
    /// issues the enrollment server's certificate.
    pub fn start(state_dir: &Path, cfg: &IdentityConfig) -> Result<Self, ServiceError> {
        let now = SystemTime::now();
        let ca = LocalCa::load_or_create(
            &ca_dir(state_dir),
            &cfg.trust_domain,
            cfg.key_algorithm,
            now,
        )
        .map_err(IdentityError::from)?;
        let mut bundles = TrustBundles::default();
        let mut x509_bundles: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        x509_bundles.insert(cfg.trust_domain.clone(), ca.cert_der().to_vec());
        bundles
            .add(&cfg.trust_domain, ca.cert_der().clone())
            .map_err(|e| ServiceError::Bundle {
                path: ca_dir(state_dir).join("ca.crt"),
                trust_domain: cfg.trust_domain.clone(),
                message: e.to_string(),
            })?;
        for b in &cfg.bundles {
            for der in read_bundle(&b.file, &b.trust_domain)? {
                x509_bundles
                    .entry(b.trust_domain.clone())
                    .or_default()
                    .extend_from_slice(&der);
                bundles
                    .add(&b.trust_domain, der)
                    .map_err(|e| ServiceError::Bundle {
                        path: b.file.clone(),
                        trust_domain: b.trust_domain.clone(),
                        message: e.to_string(),
                    })?;
            }
            tracing::info!(trust_domain = %b.trust_domain, file = %b.file.display(), "trusting an external bundle");
        }
        let (revocations, revocation_store) =
            RevocationList::open(&RevocationList::path(state_dir))?;
        let server = issue_server(&ca, state_dir, now)?;
        let tokens = TokenSigner::load_or_create(&ca_dir(state_dir), &cfg.trust_domain)?;
        tokens.write_jwks(&Self::jwks_path(state_dir))?;
        let jwks = serde_json::from_value(tokens.jwks()).map_err(|e| {
            super::token::TokenError::BadKey {
                path: Self::jwks_path(state_dir),
                message: e.to_string(),
            }
        })?;
        Ok(Self {
            tokens,
            x509_bundles,
            jwks,
            cfg: cfg.clone(),
            state_dir: state_dir.to_path_buf(),
            verifier: Verifier::new(bundles, cfg.clock_skew),
            revocations: RwLock::new(revocations),
            revocation_store: std::sync::Mutex::new(revocation_store),
            server: RwLock::new(server),
            ca,
        })
    }

    /// Where the JWKS of the token key is published.
    pub fn jwks_path(state_dir: &Path) -> PathBuf {
        state_dir.join("jwks.json")
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.tokens.jwks()
    }

    /// A JWT-SVID for the holder of a certificate (already verified and attested by the
    /// caller), unless that certificate or its identity is revoked.
    pub fn issue_token(
        &self,
        holder: super::token::Holder<'_>,
        audience: &[String],
    ) -> Result<(String, super::token::Claims), Refusal> {
        self.check_revoked(&holder.id.to_string(), holder.serial)?;
        Ok(self
            .tokens
            .issue(holder, audience, self.cfg.token_lifetime, SystemTime::now())?)
    }

    /// Verifies a token for `audience`, and that neither the certificate it was issued for
    /// nor its subject is revoked.
    pub fn verify_token(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<super::token::Claims, Refusal> {
        let claims = super::token::verify(
            &self.jwks,
            &self.cfg.trust_domain,
            token,
            audience,
            self.cfg.clock_skew,
            SystemTime::now(),
        )?;
        self.check_revoked(&claims.sub, &claims.svid_serial)?;
        Ok(claims)
    }

    /// Concatenated DER CA certificates by trust domain, the local one included.
    pub fn x509_bundles(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.x509_bundles
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.cfg
    }

    /// The local CA certificate (what agents verify the daemon and each other with).
    pub fn bundle_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The TLS configuration for a new enrollment connection.
    pub fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, ServiceError> {
        let now = SystemTime::now();
        let fresh = self
            .server
            .read()
            .ok()
            .filter(|s| s.not_after > now + SERVER_LIFETIME / 4)
            .map(|s| Arc::clone(&s.config));
        match fresh {
            Some(c) => Ok(c),
            None => {
                let fresh = issue_server(&self.ca, &self.state_dir, now)?;
                let config = Arc::clone(&fresh.config);
                if let Ok(mut s) = self.server.write() {
                    *s = fresh;
                }
                Ok(config)
            }
        }
    }

    /// Verifies a presented chain and checks the revocation list.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<VerifiedSvid, Refusal> {
        let svid = self.verifier.verify_client(chain, now)?;
        self.check_revoked(&svid.id.to_string(), &svid.serial)?;
        Ok(svid)
    }

    pub fn check_revoked(&self, spiffe_id: &str, serial: &str) -> Result<(), Refusal> {
        let list = self
            .revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match list.find(spiffe_id, serial) {
            Some(r) => Err(Refusal::Revoked {
                target: r.target.to_string(),
                at: r.at.clone(),
                reason: r.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Adds a revocation to the list in memory; returns whether it was new. The caller applies
    /// it in the kernel, then saves the list with [`Self::save_revocations`].
    pub fn revoke(&self, target: Target, reason: &str, by: &str) -> bool {
        let mut list = self
            .revocations
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.add(Revocation {
            target,
            reason: reason.to_string(),
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            by: by.to_string(),
        })
    }

    /// Makes the revocations added since the last save durable (one synced append), so that
    /// they hold after a restart.
    pub fn save_revocations(&self) -> Result<(), RevokeError> {
        self.with_revocation_store(|store, list| store.save(list))
    }

    /// Revocations that hold in memory but are not durable yet (a save failed).
    pub fn unsaved_revocations(&self) -> usize {
        self.with_revocation_store(|store, list| store.pending(list))
    }

    /// `f` with the store locked and the list read-locked: enrollments go on checking
    /// meanwhile; a new revocation waits.
    fn with_revocation_store<T>(
        &self,
        f: impl FnOnce(&mut RevocationStore, &RevocationList) -> T,
    ) -> T {
        let mut store = self
            .revocation_store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = self
            .revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut store, &list)
    }

    /// How many revocations the list holds.
    pub fn revocation_count(&self) -> usize {
        self.revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries()
            .len()
    }

    /// Whether `target` itself is on the revocation list.
    pub fn is_revoked(&self, target: &Target) -> bool {
        self.revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(target)
    }

    pub fn revocations(&self) -> Vec<Revocation> {
        self.revocations
            .read()
            .map(|l| l.entries().to_vec())
            .unwrap_or_default()
    }

    /// Issues a certificate from the local CA and records it in the issuance log first.
    pub fn issue(&self, req: &LeafRequest, requester: &str) -> Result<Issued, IdentityError> {
        let now = SystemTime::now();
        let issued = self.ca.issue(req, now)?;
        log::append(
            &log_path(&self.state_dir),
            &log::Entry::of(&issued, requester, now),
        )?;
        Ok(issued)
    }
}

/// The grant for `id`: a policy naming exactly this ID, or this ID without its last segment
/// (`agent/<name>/<env>` governs the versions `agent/<name>/<env>/<version>`). Identities named
/// as paths are read in the node's trust domain.
pub fn grant_for<'a>(
    identities: &'a BTreeMap<String, Grant>,
    id: &SpiffeId,
    node_trust_domain: &str,
) -> Option<&'a Grant> {
    let full = id.to_string();
    let parent = full.rsplit_once('/').map(|(p, _)| p.to_string());
    let resolve = |k: &str| {
        if k.contains("://") {
            k.to_string()
        } else {
            format!("spiffe://{node_trust_domain}/{}", k.trim_start_matches('/'))
        }
    };
    identities
        .iter()
        .find(|(k, _)| resolve(k) == full)
        .or_else(|| identities.iter().find(|(k, _)| Some(resolve(k)) == parent))
        .map(|(_, g)| g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Attest, Source};

    #[test]
    fn grants_match_exactly_or_one_version_below() {
        let g = |p: &str| Grant {
            policy: p.into(),
            attest: Attest::default(),
            source: Source {
                file: "p.yaml".into(),
                line: 1,
                column: 0,
            },
        };
        let ids: BTreeMap<String, Grant> = [
            ("agent/reader/prod".to_string(), g("reader")),
            ("spiffe://other.org/agent/x/prod".to_string(), g("x")),
        ]
        .into();
        let id = |s: &str| SpiffeId::workload(s).unwrap();
        let td = "node.local";
        let find = |s: &str| grant_for(&ids, &id(s), td).map(|g| g.policy.clone());
        assert_eq!(
            find("spiffe://node.local/agent/reader/prod").as_deref(),
            Some("reader")
        );
        assert_eq!(
            find("spiffe://node.local/agent/reader/prod/v2").as_deref(),
            Some("reader")
        );
        assert_eq!(find("spiffe://node.local/agent/reader/prod/v2/x"), None);
        assert_eq!(find("spiffe://node.local/agent/reader"), None);
        assert_eq!(find("spiffe://elsewhere/agent/reader/prod"), None);
        assert_eq!(
            find("spiffe://other.org/agent/x/prod").as_deref(),
            Some("x")
        );
        assert_eq!(find("spiffe://node.local/agent/x/prod"), None);
    }
}
