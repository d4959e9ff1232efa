//! X509-SVIDs: the local certificate authority (created on first use in the state
//! directory) and the short-lived leaf certificates it issues.
//!
//! Leaf certificates follow the X509-SVID rules: exactly one URI SAN (the SPIFFE ID), basic
//! constraints CA:false, key usage digitalSignature (critical), extended key usage client and
//! server authentication. Capabilities (scopes such as `read:analytics`) ride in the subject
//! as one organizationalUnitName `caps:<scope> <scope> ...`; they can only narrow what policy
//! grants. Keys are Ed25519 by default, or ECDSA P-256 for peers whose TLS stacks lack Ed25519
//! (`identity.key_algorithm`); private keys are written with mode 0600.
//!
//! Size: over 600 lines with its tests (about 140). Issuing, the key algorithms and the
//! key-file checks share the CA's types, so they stay together.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aws_lc_rs::rand::SecureRandom as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use super::spiffe::SpiffeId;

/// Prefix of the organizationalUnitName that carries capabilities.
pub const CAPS_PREFIX: &str = "caps:";
/// Default leaf lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Shortest and longest leaf lifetimes accepted.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the local CA certificate.
pub(crate) const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Leaves are valid from slightly before issuance, for peers whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:o} and owner uid {uid}: a private key must be mode 0600 and owned by root (run `chmod 600 {path}`)"
    )]
    KeyPermissions { path: PathBuf, mode: u32, uid: u32 },
    #[error("{path} is not a usable {what}: {message}")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("the CA in {path} belongs to trust domain {found:?}, not {wanted:?}")]
    TrustDomain {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("lifetime {0:?} is outside {MIN_LIFETIME:?}..={MAX_LIFETIME:?}")]
    Lifetime(Duration),
    #[error("capability {0:?} may hold only a-z, 0-9, ':', '.', '_' and '-'")]
    Capability(String),
    #[error("SPIFFE ID {id} is not in this CA's trust domain {trust_domain}")]
    ForeignId { id: String, trust_domain: String },
    #[error("issuing the certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("no randomness for a serial number")]
    Random,
    #[error("generating a new {0} key failed (the system's random source?)")]
    KeyGen(&'static str),
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub id: SpiffeId,
    pub lifetime: Duration,
    pub capabilities: Vec<String>,
}

/// An issued certificate with its fresh private key (which its `Debug` leaves out).
#[derive(Clone)]
pub struct Issued {
    pub id: SpiffeId,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
    /// Upper-case hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub sha256: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// The key type of the certificates the local CA creates: its own (when it is created) and
/// every leaf it issues.
///
/// Ed25519 is the default: a handshake verifies an Ed25519 signature in about two thirds of
/// the time of an ECDSA P-256 one, and an enrollment with a certificate never seen before
/// verifies two (the CA's over the leaf, the agent's over the handshake). Every agent already
/// speaks it, since the daemon's enrollment server certificate is Ed25519. ECDSA P-256 is for
/// agents whose other peers' TLS stacks lack Ed25519 (Java before 15, OpenSSL before 1.1.1,
/// proxies that take RSA and ECDSA certificates only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    #[default]
    Ed25519,
    EcdsaP256,
}

impl KeyAlgorithm {
    /// A new key of this type.
    fn generate(self) -> Result<KeyPair, CaError> {
        match self {
            Self::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
            // Written as PKCS#8 v1 (RFC 8410, no public key): OpenSSL 3.0, and with it Python's
            // `ssl`, refuses the v2 document that `KeyPair::generate_for` (ring) writes.
            Self::Ed25519 => {
                let doc = aws_lc_rs::signature::Ed25519KeyPair::generate()
                    .and_then(|k| k.to_pkcs8v1())
                    .map_err(|_| CaError::KeyGen(self.name()))?;
                Ok(KeyPair::from_pkcs8_der_and_sign_algo(
                    &rustls_pki_types::PrivatePkcs8KeyDer::from(doc.as_ref()),
                    &rcgen::PKCS_ED25519,
                )?)
            }
        }
    }

    #[cfg(test)]
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }

    /// The key type of a certificate's public key (DER), if it is one of these.
    pub fn of_certificate(der: &[u8]) -> Option<Self> {
        use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let key = &cert.tbs_certificate.subject_pki.algorithm;
        if key.algorithm == OID_SIG_ED25519 {
            return Some(Self::Ed25519);
        }
        let curve = key.parameters.as_ref().and_then(|p| p.as_oid().ok());
        (key.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256))
            .then_some(Self::EcdsaP256)
    }

    /// The name configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256 => "ecdsa-p256",
        }
    }
}

/// The embedded certificate authority of one trust domain.
pub struct LocalCa {
    trust_domain: String,
    key: KeyPair,
    /// Key type of the leaves it issues.
    leaf_keys: KeyAlgorithm,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with `mode` (temporary file, fsync, rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    crate::state::write_atomic(path, bytes, mode).map_err(io("writing", path))
}

/// Refuses a private key file that others can read or that root does not own.
pub(crate) fn check_key_file(path: &Path) -> Result<(), CaError> {
    let md = fs::metadata(path).map_err(io("reading", path))?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 || md.uid() != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
            uid: md.uid(),
        });
    }
    Ok(())
}

fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| CaError::Random)?;
    // A positive INTEGER, never zero.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(serial)
}

impl LocalCa {
    /// A new CA for `trust_domain`, in memory, with keys of the default type.
    pub fn create(trust_domain: &str, now: SystemTime) -> Result<Self, CaError> {
        Self::create_with(trust_domain, KeyAlgorithm::default(), now)
    }

    /// A new CA for `trust_domain` whose own key and leaves' keys are `keys`.
    pub fn create_with(
        trust_domain: &str,
        keys: KeyAlgorithm,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = keys.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agentwall");
        dn.push(DnType::CommonName, format!("agentwall CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            key,
            leaf_keys: keys,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
        })
    }

    /// Loads the CA of `dir` (`ca.crt`, `ca.key`), creating it on first use with a `keys`
    /// key. Leaves get `keys` keys; a CA created before keeps its own key, whatever its type.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        keys: KeyAlgorithm,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if !key_path.exists() {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
            let ca = Self::create_with(trust_domain, keys, now)?;
            write_private(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
            tracing::info!(trust_domain, path = %cert_path.display(), "created the local CA");
            return Ok(ca);
        }
        check_key_file(&key_path)?;
        let key_pem = fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            path: key_path.clone(),
            what: "private key",
            message: e.to_string(),
        })?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e: rustls_pki_types::pem::Error| CaError::Corrupt {
                path: cert_path.clone(),
                what: "certificate",
                message: e.to_string(),
            },
        )?;
        let ca = Self {
            trust_domain: trust_domain.to_string(),
            key,
            leaf_keys: keys,
            cert_pem,
            cert_der: der,
        };
        let found = ca_trust_domain(&ca.cert_der).map_err(|e| CaError::Corrupt {
            path: cert_path.clone(),
            what: "CA certificate",
            message: e.to_string(),
        })?;
        if found != trust_domain {
            return Err(CaError::TrustDomain {
                path: cert_path,
                found,
                wanted: trust_domain.into(),
            });
        }
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, as a trust bundle holds it.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a leaf for `req` with a new key of the CA's leaf key type, valid from `now`
    /// (slightly backdated) for its lifetime.
    pub fn issue(&self, req: &LeafRequest, now: SystemTime) -> Result<Issued, CaError> {
        self.issue_leaf(req, &[], self.leaf_keys, now)
    }

    /// Issues the daemon's enrollment server certificate: it also names DNS hosts (TLS
    /// clients check it by host name), and its key is Ed25519, whose signature (one in every
    /// enrollment handshake) costs the daemon a third of an ECDSA P-256 one. Agents' TLS
    /// stacks must offer the `ed25519` signature scheme (rustls, OpenSSL 1.1.1 and later, Go,
    /// BoringSSL do).
    pub fn issue_server(
        &self,
        req: &LeafRequest,
        dns: &[&str],
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        self.issue_leaf(req, dns, KeyAlgorithm::Ed25519, now)
    }

    fn issue_leaf(
        &self,
        req: &LeafRequest,
        dns: &[&str],
        key_alg: KeyAlgorithm,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        if req.lifetime < MIN_LIFETIME || req.lifetime > MAX_LIFETIME {
            return Err(CaError::Lifetime(req.lifetime));
        }
        if req.id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignId {
                id: req.id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        for c in &req.capabilities {
            let ok = !c.is_empty()
                && c.chars().all(|ch| {
                    ch.is_ascii_lowercase()
                        || ch.is_ascii_digit()
                        || matches!(ch, ':' | '.' | '_' | '-')
                });
            if !ok {
                return Err(CaError::Capability(c.clone()));
            }
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agentwall");
        if !req.capabilities.is_empty() {
            dn.push(
                DnType::OrganizationalUnitName,
                format!("{CAPS_PREFIX}{}", req.capabilities.join(" ")),
            );
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(req.id.to_string().try_into()?)];
        for d in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*d).try_into()?));
        }
        params.use_authority_key_identifier_extension = true;
        let not_before = now - BACKDATE;
        let not_after = now + req.lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf_key = key_alg.generate()?;
        self.sign_key(
            &params,
            req.id.clone(),
            &serial,
            (not_before, not_after),
            &leaf_key,
        )
    }

    /// Signs arbitrary leaf parameters: tests use it to build defective certificates.
    #[cfg(test)]
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        id: SpiffeId,
        serial: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, CaError> {
        let leaf_key = KeyPair::generate()?;
        self.sign_key(params, id, serial, (not_before, not_after), &leaf_key)
    }

    fn sign_key(
        &self,
        params: &CertificateParams,
        id: SpiffeId,
        serial: &[u8],
        (not_before, not_after): (SystemTime, SystemTime),
        leaf_key: &KeyPair,
    ) -> Result<Issued, CaError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = params.signed_by(leaf_key, &issuer)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.der());
        // X.509 times have second precision.
        let trunc = |t: SystemTime| {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
        };
        Ok(Issued {
            id,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            serial: hex(serial, true),
            not_before: trunc(not_before),
            not_after: trunc(not_after),
            sha256: hex(digest.as_ref(), false),
        })
    }
}

/// The trust domain a CA certificate names in its URI SAN.
fn ca_trust_domain(der: &CertificateDer<'_>) -> Result<String, CaIdError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    let san = cert.subject_alternative_name()?.ok_or(CaIdError::NoSan)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            let id: SpiffeId = uri.parse()?;
            return Ok(id.trust_domain().to_string());
        }
    }
    Err(CaIdError::NoSpiffeId)
}

/// Why a CA certificate names no trust domain.
#[derive(Debug, thiserror::Error)]
enum CaIdError {
    #[error(transparent)]
    Der(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error(transparent)]
    X509(#[from] x509_parser::error::X509Error),
    #[error("no subject alternative name")]
    NoSan,
    #[error(transparent)]
    Id(#[from] super::spiffe::IdError),
    #[error("no SPIFFE ID in the subject alternative names")]
    NoSpiffeId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn issues_leaves_of_its_trust_domain_only() {
        let ca = LocalCa::create("example.org", t0()).unwrap();
        let id = SpiffeId::workload("spiffe://example.org/agent/reader/prod").unwrap();
        let leaf = ca
            .issue(
                &LeafRequest {
                    id: id.clone(),
                    lifetime: DEFAULT_LIFETIME,
                    capabilities: vec!["read:analytics".into()],
                },
                t0(),
            )
            .unwrap();
        assert_eq!(
            leaf.not_after.duration_since(leaf.not_before).unwrap(),
            DEFAULT_LIFETIME + BACKDATE
        );
        assert_eq!(leaf.serial.len(), 32);
        assert_eq!(leaf.sha256.len(), 64);
        let shown = format!("{leaf:?}");
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains(&leaf.serial),
            "{shown}"
        );
        let foreign = SpiffeId::workload("spiffe://other.org/agent/reader/prod").unwrap();
        let e = ca
            .issue(
                &LeafRequest {
                    id: foreign,
                    lifetime: DEFAULT_LIFETIME,
                    capabilities: vec![],
                },
                t0(),
            )
            .unwrap_err();
        assert!(matches!(e, CaError::ForeignId { .. }), "{e}");
        for (lifetime, caps) in [
            (Duration::from_secs(10), vec![]),
            (Duration::from_secs(90_000), vec![]),
            (DEFAULT_LIFETIME, vec!["Bad Cap".to_string()]),
        ] {
            assert!(
                ca.issue(
                    &LeafRequest {
                        id: id.clone(),
                        lifetime,
                        capabilities: caps
                    },
                    t0()
                )
                .is_err()
            );
        }
    }

    #[test]
    fn the_ca_is_created_once_and_its_key_kept_private() {
        let dir = std::env::temp_dir().join(format!("aw-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a =
            LocalCa::load_or_create(&dir, "example.org", KeyAlgorithm::default(), t0()).unwrap();
        let mode = fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b =
            LocalCa::load_or_create(&dir, "example.org", KeyAlgorithm::default(), t0()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem(), "loaded, not recreated");
        let e =
            LocalCa::load_or_create(&dir, "other.org", KeyAlgorithm::default(), t0()).unwrap_err();
        assert!(matches!(e, CaError::TrustDomain { .. }), "{e}");
        fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalCa::load_or_create(&dir, "example.org", KeyAlgorithm::default(), t0())
            .unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(
            !format!("{b:?}").contains("PRIVATE"),
            "Debug must not show the key"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn keys_are_of_the_configured_type_and_a_ca_keeps_its_own() {
        let id = SpiffeId::workload("spiffe://example.org/agent/reader/prod").unwrap();
        let req = LeafRequest {
            id,
            lifetime: DEFAULT_LIFETIME,
            capabilities: vec![],
        };
        let alg_of = |pem: &str| KeyPair::from_pem(pem).unwrap().algorithm();
        for keys in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let ca = LocalCa::create_with("example.org", keys, t0()).unwrap();
            assert_eq!(ca.key.algorithm(), keys.rcgen());
            let leaf = ca.issue(&req, t0()).unwrap();
            assert_eq!(alg_of(&leaf.key_pem), keys.rcgen());
            // Read back from the certificates, as `identity renew` and `inspect` do.
            assert_eq!(KeyAlgorithm::of_certificate(&leaf.cert_der), Some(keys));
            assert_eq!(KeyAlgorithm::of_certificate(ca.cert_der()), Some(keys));
        }
        assert_eq!(KeyAlgorithm::of_certificate(b"not a certificate"), None);
        assert_eq!(KeyAlgorithm::default(), KeyAlgorithm::Ed25519);
        // Ed25519 keys are PKCS#8 v1 (version 0, no public key), which OpenSSL 3.0 reads.
        let ca = LocalCa::create_with("example.org", KeyAlgorithm::Ed25519, t0()).unwrap();
        let pem = ca.issue(&req, t0()).unwrap().key_pem;
        let der = KeyPair::from_pem(&pem).unwrap().serialize_der();
        assert_eq!(der[..5], [0x30, 0x2e, 0x02, 0x01, 0x00], "{der:02x?}");
        assert_eq!(der.len(), 48);
        // A CA created with P-256 keys keeps its key when leaves become Ed25519.
        let dir = std::env::temp_dir().join(format!("aw-ca-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let p256 = LocalCa::load_or_create(&dir, "example.org", KeyAlgorithm::EcdsaP256, t0());
        let ed = LocalCa::load_or_create(&dir, "example.org", KeyAlgorithm::Ed25519, t0());
        fs::remove_dir_all(&dir).unwrap();
        let (p256, ed) = (p256.unwrap(), ed.unwrap());
        assert_eq!(p256.cert_pem(), ed.cert_pem());
        assert_eq!(ed.key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            alg_of(&ed.issue(&req, t0()).unwrap().key_pem),
            &rcgen::PKCS_ED25519
        );
        // Configuration names them in kebab case; anything else is refused with the choices.
        let parse = |v: &str| serde_norway::from_str::<KeyAlgorithm>(v);
        assert_eq!(parse("ed25519").unwrap(), KeyAlgorithm::Ed25519);
        assert_eq!(parse("ecdsa-p256").unwrap(), KeyAlgorithm::EcdsaP256);
        let e = parse("rsa").unwrap_err().to_string();
        assert!(e.contains("ed25519") && e.contains("ecdsa-p256"), "{e}");
        for k in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            assert_eq!(parse(k.name()).unwrap(), k);
        }
    }
}
