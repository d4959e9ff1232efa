//! Verifying an X509-SVID presented as a client certificate: the SPIFFE rules with
//! x509-parser, the chain with rustls-webpki against the trust bundle of the ID's own trust
//! domain. Each rejection has its own error. The clock is a parameter, so tests can stand at
//! any instant.
//!
//! A chain that passed is remembered by the SHA-256 of its exact bytes until the first
//! instant at which the leaf or one of the CAs it was judged against stops being valid: an
//! agent that presents the same certificate again (re-enrolling, fetching tokens) costs no
//! second signature check. Only the verdict is remembered; the caller still checks the
//! revocation list every time, and the TLS handshake still proves possession of the key.
//!
//! Size: about half of the file (360 lines) is tests of the verifier against crafted chains.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, Der, TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;

pub use super::refusal::SvidError;
use super::{
    profile::{self, SigningFault},
    spiffe::SpiffeId,
    svid::CAPS_PREFIX,
};

/// Default tolerance for clocks that disagree.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);

/// A verified client identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub id: SpiffeId,
    /// Upper-case hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub capabilities: Vec<String>,
}

/// A trusted CA certificate, parsed once into the form webpki verifies against, and its
/// validity window (webpki does not judge the validity of trust anchors; we do).
#[derive(Debug, Clone)]
struct Anchor {
    anchor: TrustAnchor<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Its `pathLenConstraint`: webpki applies those of intermediates, not of anchors.
    path_len: Option<u32>,
}

/// The trusted CA certificates of each trust domain.
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    domains: BTreeMap<String, Vec<Anchor>>,
}

impl TrustBundles {
    /// Adds a CA certificate (DER) to the bundle of `trust_domain`.
    pub fn add(
        &mut self,
        trust_domain: &str,
        ca: CertificateDer<'static>,
    ) -> Result<(), SvidError> {
        let (_, cert) = x509_parser::parse_x509_certificate(&ca)
            .map_err(|e| SvidError::Malformed(e.to_string()))?;
        profile::signing(&cert, true).map_err(|fault| SvidError::Signing {
            which: format!("a CA certificate of trust domain {trust_domain:?}"),
            fault,
        })?;
        let path_len = cert
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|b| b.value.path_len_constraint);
        let anchor = Anchor {
            path_len,
            not_before: to_system(cert.validity().not_before),
            not_after: to_system(cert.validity().not_after),
            anchor: webpki::anchor_from_trusted_cert(&ca)
                .map_err(|e| {
                    SvidError::Malformed(format!(
                        "the CA certificate cannot serve as a trust anchor: {e}"
                    ))
                })?
                .to_owned(),
        };
        self.domains
            .entry(trust_domain.to_string())
            .or_default()
            .push(anchor);
        Ok(())
    }

    pub fn trusts(&self, trust_domain: &str) -> bool {
        self.domains.contains_key(trust_domain)
    }
}

#[derive(Debug, Clone)]
pub struct Verifier {
    bundles: TrustBundles,
    skew: Duration,
    /// Chains that passed, by the SHA-256 of their bytes (see the module documentation).
    passed: Arc<Mutex<HashMap<[u8; 32], Passed>>>,
}

/// A verdict that holds from `from` to `until` (both inclusive).
#[derive(Debug, Clone)]
struct Passed {
    svid: VerifiedSvid,
    from: SystemTime,
    until: SystemTime,
}

/// Chains remembered at most; beyond, the stale ones go, and if none is stale, all.
const PASSED_MAX: usize = 4096;

/// SHA-256 over the chain, each certificate preceded by its length.
fn chain_digest(chain: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for c in chain {
        ctx.update(&(c.len() as u64).to_be_bytes());
        ctx.update(c);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn capabilities(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .filter_map(|s| s.strip_prefix(CAPS_PREFIX))
        .flat_map(|s| s.split(' ').filter(|c| !c.is_empty()).map(str::to_string))
        .collect()
}

impl Verifier {
    pub fn new(bundles: TrustBundles, skew: Duration) -> Self {
        Self {
            bundles,
            skew,
            passed: Arc::default(),
        }
    }

    /// Verifies a client's certificate chain (leaf first) at `now`.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<VerifiedSvid, SvidError> {
        let key = chain_digest(chain);
        {
            let passed = self
                .passed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(p) = passed.get(&key)
                && p.from <= now
                && now <= p.until
            {
                return Ok(p.svid.clone());
            }
        }
        let (svid, until) = self.verify_fully(chain, now)?;
        let mut passed = self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if passed.len() >= PASSED_MAX {
            passed.retain(|_, p| p.from <= now && now <= p.until);
            if passed.len() >= PASSED_MAX {
                passed.clear();
            }
        }
        passed.insert(
            key,
            Passed {
                svid: svid.clone(),
                from: now,
                until,
            },
        );
        Ok(svid)
    }

    /// The whole verification; returns the SVID and the last instant at which the verdict
    /// holds (the earliest end of validity, tolerance included, of the leaf and the CAs it
    /// was judged against).
    fn verify_fully(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(VerifiedSvid, SystemTime), SvidError> {
        let (leaf_der, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| SvidError::Malformed(e.to_string()))?;
        let id = profile::leaf(&cert)?;
        let (not_before, not_after) = (
            to_system(cert.validity().not_before),
            to_system(cert.validity().not_after),
        );
        let skew_secs = self.skew.as_secs();
        if now > not_after + self.skew {
            return Err(SvidError::Expired {
                not_after: rfc3339(not_after),
                now: rfc3339(now),
                skew_secs,
            });
        }
        if now + self.skew < not_before {
            return Err(SvidError::NotYetValid {
                not_before: rfc3339(not_before),
                now: rfc3339(now),
                skew_secs,
            });
        }
        let td = id.trust_domain().to_string();
        let roots = self
            .bundles
            .domains
            .get(&td)
            .ok_or_else(|| SvidError::UnknownTrustDomain(td.clone()))?;
        let chain_err = |reason: String| SvidError::Chain {
            trust_domain: td.clone(),
            reason,
        };
        let valid_roots: Vec<&Anchor> = roots
            .iter()
            .filter(|a| a.not_before <= now + self.skew && now <= a.not_after + self.skew)
            .collect();
        // Intermediates are judged by webpki at an instant no later than now.
        let mut until = not_after + self.skew;
        for der in intermediates {
            let (_, c) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| SvidError::Malformed(format!("intermediate certificate: {e}")))?;
            until = until.min(to_system(c.validity().not_after));
        }
        let until = valid_roots
            .iter()
            .map(|a| a.not_after + self.skew)
            .fold(until, SystemTime::min);
        // Borrowed views of the parsed anchors: nothing parsed or copied per verification.
        let anchors: Vec<TrustAnchor<'_>> = valid_roots
            .iter()
            .map(|a| TrustAnchor {
                subject: Der::from(a.anchor.subject.as_ref()),
                subject_public_key_info: Der::from(a.anchor.subject_public_key_info.as_ref()),
                name_constraints: a
                    .anchor
                    .name_constraints
                    .as_ref()
                    .map(|n| Der::from(n.as_ref())),
            })
            .collect();
        if anchors.is_empty() {
            return Err(chain_err(
                "no CA certificate of the bundle is valid now".into(),
            ));
        }
        let ee = webpki::EndEntityCert::try_from(leaf_der)
            .map_err(|e| chain_err(profile::explain_chain_error(&e)))?;
        // The leaf's own validity was judged above with the tolerance; the chain is judged
        // at an instant inside the leaf's validity, so that only the CAs' validity counts.
        let at = now.clamp(not_before, not_after);
        let at = UnixTime::since_unix_epoch(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let path = ee
            .verify_for_usage(
                // The algorithms of the TLS provider (aws-lc-rs), the same that checked the
                // handshake signature.
                super::enroll::provider()
                    .signature_verification_algorithms
                    .all,
                &anchors,
                intermediates,
                at,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| chain_err(profile::explain_chain_error(&e)))?;
        let depth = path.intermediate_certificates().count();
        let used = valid_roots.iter().find(|a| {
            a.anchor.subject_public_key_info.as_ref()
                == path.anchor().subject_public_key_info.as_ref()
        });
        if let Some(max) = used.and_then(|a| a.path_len)
            && depth > max as usize
        {
            return Err(chain_err(format!(
                "the chain has {depth} intermediate certificate(s), more than the \
                 pathLenConstraint {max} of the trust bundle's CA allows"
            )));
        }
        // webpki does not read key usage: the signing profile of the path it accepted.
        for (n, c) in path.intermediate_certificates().enumerate() {
            let fault = match x509_parser::parse_x509_certificate(c.der().as_ref()) {
                Ok((_, parsed)) => profile::signing(&parsed, false).err(),
                Err(e) => Some(SigningFault::Malformed(e.to_string())),
            };
            if let Some(fault) = fault {
                return Err(SvidError::Signing {
                    which: format!("intermediate certificate {} of the chain", n + 1),
                    fault,
                });
            }
        }
        let svid = VerifiedSvid {
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect(),
            id,
            not_before,
            not_after,
            capabilities: capabilities(&cert),
        };
        Ok((svid, until))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::identity::svid::{DEFAULT_LIFETIME, KeyAlgorithm, LeafRequest, LocalCa};
    use crate::spiffe::IdError;

    pub(in crate::identity) fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    pub(in crate::identity) const ID: &str = "spiffe://example.org/agent/reader/prod";

    struct World {
        ca: LocalCa,
        other: LocalCa,
        verifier: Verifier,
    }

    fn world() -> World {
        let ca = LocalCa::create("example.org", t0()).unwrap();
        let other = LocalCa::create("other.org", t0()).unwrap();
        let mut bundles = TrustBundles::default();
        bundles.add("example.org", ca.cert_der().clone()).unwrap();
        bundles.add("other.org", other.cert_der().clone()).unwrap();
        World {
            ca,
            other,
            verifier: Verifier::new(bundles, DEFAULT_SKEW),
        }
    }

    /// Leaf parameters as `LocalCa::issue` sets them, for tests to spoil one at a time.
    pub(in crate::identity) fn good_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.not_before = (t0() - Duration::from_secs(60)).into();
        p.not_after = (t0() + DEFAULT_LIFETIME).into();
        p
    }

    fn signed(ca: &LocalCa, p: &CertificateParams) -> CertificateDer<'static> {
        let id = SpiffeId::workload(ID).unwrap();
        ca.sign(p, id, &[1, 2, 3], t0(), t0()).unwrap().cert_der
    }

    #[test]
    fn a_proper_svid_is_accepted_with_its_capabilities() {
        let w = world();
        let leaf =
            w.ca.issue(
                &LeafRequest {
                    id: SpiffeId::workload(ID).unwrap(),
                    lifetime: DEFAULT_LIFETIME,
                    capabilities: vec!["read:analytics".into(), "write:logs".into()],
                },
                t0(),
            )
            .unwrap();
        let v = w
            .verifier
            .verify_client(std::slice::from_ref(&leaf.cert_der), t0())
            .unwrap();
        assert_eq!(v.id.to_string(), ID);
        assert_eq!(v.serial, leaf.serial);
        assert_eq!(v.capabilities, ["read:analytics", "write:logs"]);
        assert_eq!(v.not_after, leaf.not_after);
    }

    #[test]
    fn every_rejection_names_its_reason() {
        let w = world();
        let mut ca_leaf = good_params(&[ID]);
        ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut no_ku = good_params(&[ID]);
        no_ku.key_usages = vec![];
        let mut no_ds = good_params(&[ID]);
        no_ds.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let mut server_only = good_params(&[ID]);
        server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut no_eku = good_params(&[ID]);
        no_eku.extended_key_usages = vec![];
        let mut dns_only = good_params(&[]);
        dns_only.subject_alt_names =
            vec![SanType::DnsName("reader.example.org".try_into().unwrap())];
        let foreign_signed = signed(&w.other, &good_params(&[ID]));
        let unknown_td = signed(
            &w.ca,
            &good_params(&["spiffe://nowhere.org/agent/reader/prod"]),
        );
        let long = format!("spiffe://example.org/{}", "a".repeat(2100));

        let table: Vec<(&str, CertificateDer<'static>, Result<(), SvidError>)> = vec![
            ("good", signed(&w.ca, &good_params(&[ID])), Ok(())),
            ("no EKU is allowed", signed(&w.ca, &no_eku), Ok(())),
            (
                "two URI SANs",
                signed(
                    &w.ca,
                    &good_params(&[ID, "spiffe://example.org/agent/x/prod"]),
                ),
                Err(SvidError::MultipleUriSans(2)),
            ),
            (
                "no URI SAN",
                signed(&w.ca, &dns_only),
                Err(SvidError::NoUriSan),
            ),
            (
                "CA as leaf",
                signed(&w.ca, &ca_leaf),
                Err(SvidError::LeafIsCa),
            ),
            (
                "no key usage",
                signed(&w.ca, &no_ku),
                Err(SvidError::NoKeyUsage),
            ),
            (
                "no digitalSignature",
                signed(&w.ca, &no_ds),
                Err(SvidError::NoDigitalSignature),
            ),
            (
                "EKU without clientAuth",
                signed(&w.ca, &server_only),
                Err(SvidError::EkuLacks("id-kp-clientAuth")),
            ),
            (
                "unknown trust domain",
                unknown_td,
                Err(SvidError::UnknownTrustDomain("nowhere.org".into())),
            ),
            (
                "upper-case trust domain",
                signed(&w.ca, &good_params(&["spiffe://Example.org/agent/r/p"])),
                Err(SvidError::BadId(IdError::UppercaseTrustDomain('E'))),
            ),
            (
                "percent-encoding",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent/r%41/p"])),
                Err(SvidError::BadId(IdError::PercentEncoded)),
            ),
            (
                "dot segment",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent/../p"])),
                Err(SvidError::BadId(IdError::DotSegment)),
            ),
            (
                "empty segment",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent//p"])),
                Err(SvidError::BadId(IdError::EmptySegment)),
            ),
            (
                "trailing slash",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent/r/p/"])),
                Err(SvidError::BadId(IdError::TrailingSlash)),
            ),
            (
                "query",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent/r/p?x=1"])),
                Err(SvidError::BadId(IdError::Query)),
            ),
            (
                "fragment",
                signed(&w.ca, &good_params(&["spiffe://example.org/agent/r/p#f"])),
                Err(SvidError::BadId(IdError::Fragment)),
            ),
            (
                "port",
                signed(&w.ca, &good_params(&["spiffe://example.org:443/agent/r/p"])),
                Err(SvidError::BadId(IdError::Port)),
            ),
            (
                "userinfo",
                signed(&w.ca, &good_params(&["spiffe://u@example.org/agent/r/p"])),
                Err(SvidError::BadId(IdError::UserInfo)),
            ),
            (
                "trust domain only",
                signed(&w.ca, &good_params(&["spiffe://example.org"])),
                Err(SvidError::BadId(IdError::NoPath(
                    "spiffe://example.org".into(),
                ))),
            ),
            (
                "over-long ID",
                signed(&w.ca, &good_params(&[&long])),
                Err(SvidError::BadId(IdError::TooLong(long.len()))),
            ),
        ];
        for (what, der, want) in table {
            let got = w.verifier.verify_client(&[der], t0()).map(|_| ());
            assert_eq!(got, want, "{what}");
        }
        // Signed by the CA of another trusted domain: the chain check names the domain.
        let e = w
            .verifier
            .verify_client(&[foreign_signed], t0())
            .unwrap_err();
        assert!(
            matches!(&e, SvidError::Chain { trust_domain, .. } if trust_domain == "example.org"),
            "{e}"
        );
        assert_eq!(
            w.verifier.verify_client(&[], t0()),
            Err(SvidError::NoCertificate)
        );
        assert!(matches!(
            w.verifier
                .verify_client(&[CertificateDer::from(vec![1, 2, 3])], t0()),
            Err(SvidError::Malformed(_))
        ));
    }

    #[test]
    fn validity_boundaries_honour_the_skew() {
        let w = world();
        let leaf = signed(&w.ca, &good_params(&[ID]));
        let not_after = t0() + DEFAULT_LIFETIME;
        let not_before = t0() - Duration::from_secs(60);
        let at = |t: SystemTime| {
            w.verifier
                .verify_client(std::slice::from_ref(&leaf), t)
                .map(|_| ())
        };
        assert_eq!(at(not_after), Ok(()));
        assert_eq!(at(not_after + DEFAULT_SKEW), Ok(()), "inside the tolerance");
        assert!(matches!(
            at(not_after + DEFAULT_SKEW + Duration::from_secs(1)),
            Err(SvidError::Expired { .. })
        ));
        assert_eq!(at(not_before - DEFAULT_SKEW), Ok(()));
        assert!(matches!(
            at(not_before - DEFAULT_SKEW - Duration::from_secs(1)),
            Err(SvidError::NotYetValid { .. })
        ));
        let strict = Verifier::new(w.verifier.bundles.clone(), Duration::ZERO);
        assert!(matches!(
            strict.verify_client(
                std::slice::from_ref(&leaf),
                not_after + Duration::from_secs(1)
            ),
            Err(SvidError::Expired { .. })
        ));
        // An expired CA fails the chain even while the leaf is in its window.
        let mut late = TrustBundles::default();
        let old_ca = LocalCa::create(
            "example.org",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        )
        .unwrap();
        late.add("example.org", old_ca.cert_der().clone()).unwrap();
        let v = Verifier::new(late, DEFAULT_SKEW);
        let leaf2 = signed(&old_ca, &good_params(&[ID]));
        assert!(matches!(
            v.verify_client(&[leaf2], t0()),
            Err(SvidError::Chain { .. })
        ));
    }

    #[test]
    fn a_remembered_verdict_ends_with_the_first_certificate_to_expire() {
        let w = world();
        let leaf = signed(&w.ca, &good_params(&[ID]));
        let at = |v: &Verifier, t: SystemTime| v.verify_client(std::slice::from_ref(&leaf), t);
        let first = at(&w.verifier, t0()).unwrap();
        assert_eq!(w.verifier.passed.lock().unwrap().len(), 1);
        assert_eq!(at(&w.verifier, t0() + Duration::from_secs(1)), Ok(first));
        assert_eq!(
            w.verifier.passed.lock().unwrap().len(),
            1,
            "the same bytes, one entry"
        );
        // Past the leaf's end (and the tolerance) the remembered verdict does not hold.
        assert!(matches!(
            at(
                &w.verifier,
                t0() + DEFAULT_LIFETIME + DEFAULT_SKEW + Duration::from_secs(1)
            ),
            Err(SvidError::Expired { .. })
        ));
        // Other bytes, the same identity: verified on their own (a forgery would fail).
        let other = signed(&w.other, &good_params(&[ID]));
        assert!(matches!(
            w.verifier.verify_client(&[other], t0()),
            Err(SvidError::Chain { .. })
        ));

        // A CA that expires ten minutes after t0, before the leaf does.
        let ca = LocalCa::create(
            "example.org",
            t0() + Duration::from_secs(600) - crate::identity::svid::CA_LIFETIME,
        )
        .unwrap();
        let mut bundles = TrustBundles::default();
        bundles.add("example.org", ca.cert_der().clone()).unwrap();
        let v = Verifier::new(bundles, DEFAULT_SKEW);
        let leaf = signed(&ca, &good_params(&[ID]));
        let at = |t: SystemTime| v.verify_client(std::slice::from_ref(&leaf), t);
        assert!(at(t0()).is_ok());
        assert!(at(t0() + Duration::from_secs(600)).is_ok());
        assert!(matches!(
            at(t0() + Duration::from_secs(600) + DEFAULT_SKEW + Duration::from_secs(1)),
            Err(SvidError::Chain { .. })
        ));
        // A clock that went back is not trusted with the remembered verdict either.
        assert!(at(t0() - Duration::from_secs(30)).is_ok());
    }
    #[test]
    fn svids_of_either_key_type_under_a_ca_of_either_type_verify() {
        let req = LeafRequest {
            id: SpiffeId::workload(ID).unwrap(),
            lifetime: DEFAULT_LIFETIME,
            capabilities: vec![],
        };
        let dir = std::env::temp_dir().join(format!("aw-verify-keys-{}", std::process::id()));
        let all = [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256];
        for ca_keys in all {
            for leaf_keys in all {
                let _ = std::fs::remove_dir_all(&dir);
                // The CA is created with one type, then issues leaves of the other.
                LocalCa::load_or_create(&dir, "example.org", ca_keys, t0()).unwrap();
                let ca = LocalCa::load_or_create(&dir, "example.org", leaf_keys, t0()).unwrap();
                let mut bundles = TrustBundles::default();
                bundles.add("example.org", ca.cert_der().clone()).unwrap();
                let v = Verifier::new(bundles, DEFAULT_SKEW);
                let leaf = ca.issue(&req, t0()).unwrap();
                let got = v.verify_client(std::slice::from_ref(&leaf.cert_der), t0());
                assert_eq!(
                    got.unwrap().serial,
                    leaf.serial,
                    "{ca_keys:?} CA, {leaf_keys:?} leaf"
                );
                // Under another CA of the same types it fails.
                let other = LocalCa::create_with("example.org", ca_keys, t0()).unwrap();
                let mut bundles = TrustBundles::default();
                bundles
                    .add("example.org", other.cert_der().clone())
                    .unwrap();
                let v = Verifier::new(bundles, DEFAULT_SKEW);
                assert!(matches!(
                    v.verify_client(std::slice::from_ref(&leaf.cert_der), t0()),
                    Err(SvidError::Chain { .. })
                ));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
