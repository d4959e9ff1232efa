//! The X509-SVID profile: what the SPIFFE X509-SVID standard asks of a leaf and of a
//! signing certificate, judged on the parsed certificate (x509-parser).
//!
//! Who checks what. This module: the SPIFFE ID (one URI SAN, its grammar, a path on a leaf
//! and none on a signing certificate), the URI SAN's criticality when the subject is empty,
//! basic constraints of the leaf and of trust anchors, key usage (present, critical, the
//! bits of each role) and the leaf's extended key usage. rustls-webpki (see verify.rs): the
//! RFC 5280 path itself, that is signatures, issuer names, `cA` of intermediates,
//! `pathLenConstraint`, validity of intermediates, unknown critical extensions of the leaf
//! and the intermediates, name constraints (URI constraints fail closed) and the
//! clientAuth purpose along the chain. webpki ignores key usage, so the signing
//! profile is applied here to every certificate of the path webpki accepted.

use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
};

pub use super::refusal::SigningFault;
use super::{refusal::SvidError, spiffe::SpiffeId};

fn uri_sans<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<(Vec<&'a str>, bool), x509_parser::error::X509Error> {
    let san = cert.subject_alternative_name()?;
    let critical = san.as_ref().is_some_and(|s| s.critical);
    let uris = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    Ok((uris, critical))
}

fn subject_is_empty(cert: &X509Certificate<'_>) -> bool {
    cert.subject().iter_attributes().next().is_none()
}

/// Checks a leaf X509-SVID and returns its SPIFFE ID.
pub(super) fn leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());
    let (uris, san_critical) = uri_sans(cert).map_err(malformed)?;
    let id = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => SpiffeId::workload(one).map_err(SvidError::BadId)?,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    if subject_is_empty(cert) && !san_critical {
        return Err(SvidError::SanNotCritical);
    }
    if cert
        .basic_constraints()
        .map_err(malformed)?
        .is_some_and(|b| b.value.ca)
    {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::LeafCanSign("keyCertSign"));
    }
    if ku.value.crl_sign() {
        return Err(SvidError::LeafCanSign("cRLSign"));
    }
    if let Some(eku) = cert.extended_key_usage().map_err(malformed)? {
        if !eku.value.client_auth {
            return Err(SvidError::EkuLacks("id-kp-clientAuth"));
        }
        if !eku.value.server_auth {
            return Err(SvidError::EkuLacks("id-kp-serverAuth"));
        }
    }
    Ok(id)
}

/// Checks a certificate that signs X509-SVIDs: a trust anchor (`anchor`, whose extensions
/// webpki does not judge) or an intermediate of a path webpki accepted.
pub(super) fn signing(cert: &X509Certificate<'_>, anchor: bool) -> Result<(), SigningFault> {
    let malformed = |e: x509_parser::error::X509Error| SigningFault::Malformed(e.to_string());
    if anchor {
        // webpki reads trust anchors leniently; RFC 5280 4.2 does not.
        if let Some(ext) = cert.extensions().iter().find(|e| {
            e.critical
                && matches!(
                    e.parsed_extension(),
                    ParsedExtension::UnsupportedExtension { .. }
                )
        }) {
            return Err(SigningFault::UnknownCritical(ext.oid.to_id_string()));
        }
        if !cert
            .basic_constraints()
            .map_err(malformed)?
            .is_some_and(|b| b.value.ca)
        {
            return Err(SigningFault::NotCa);
        }
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SigningFault::NoKeyUsage)?;
    if !ku.critical {
        return Err(SigningFault::KeyUsageNotCritical);
    }
    if !ku.value.key_cert_sign() {
        return Err(SigningFault::NoKeyCertSign);
    }
    let (uris, _) = uri_sans(cert).map_err(|e| SigningFault::Malformed(e.to_string()))?;
    match uris.as_slice() {
        [] => Ok(()),
        [one] => {
            let id: SpiffeId = one.parse().map_err(SigningFault::BadId)?;
            if id.path().is_empty() {
                Ok(())
            } else {
                Err(SigningFault::IdHasPath((*one).to_string()))
            }
        }
        many => Err(SigningFault::MultipleUriSans(many.len())),
    }
}

/// What a webpki path error means, in words an operator can act on.
pub(super) fn explain_chain_error(e: &webpki::Error) -> String {
    use webpki::Error as E;
    let what = match e {
        E::UnknownIssuer => {
            "no CA of the trust bundle issued it (nor an intermediate presented with it)"
        }
        E::InvalidSignatureForPublicKey | E::SignatureAlgorithmMismatch => {
            "a signature in the chain does not verify"
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "a signature in the chain uses an algorithm this verifier does not accept"
        }
        E::CaUsedAsEndEntity => "a CA certificate was presented as the leaf",
        E::EndEntityUsedAsCa => {
            "an intermediate certificate is not a CA (its basic constraints do not set cA)"
        }
        E::PathLenConstraintViolated => "the chain is longer than a CA's pathLenConstraint allows",
        E::UnsupportedCriticalExtension | E::UnsupportedCertVersion => {
            "a certificate carries a critical extension that is not processed, and RFC 5280 requires rejecting it"
        }
        E::NameConstraintViolation | E::UnsupportedNameType | E::MalformedNameConstraint => {
            "a CA's name constraints exclude the certificate's names (URI name constraints are not supported and always fail)"
        }
        E::CertExpired { .. } => "an intermediate certificate has expired",
        E::CertNotValidYet { .. } => "an intermediate certificate is not valid yet",
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            "a certificate of the chain restricts its extended key usage and does not allow client authentication"
        }
        E::MaximumPathDepthExceeded | E::MaximumPathBuildCallsExceeded => {
            "the chain is too long or has too many candidate paths"
        }
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            "a certificate of the chain is not valid DER"
        }
        E::ExtensionValueInvalid => {
            "a certificate carries an extension twice or with a malformed value"
        }
        _ => "the chain does not validate",
    };
    format!("{what} ({e:?})")
}

/// Test vectors for every MUST and MUST NOT of the X509-SVID standard and the RFC 5280 path
/// checks that apply, each generated here with rcgen and judged by the daemon's `Verifier`.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::identity::verify::{
        DEFAULT_SKEW, TrustBundles, Verifier,
        tests::{ID, good_params, t0},
    };
    use crate::spiffe::IdError;

    /// A private arc, so that no verifier knows the extension.
    const UNKNOWN_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 99999, 1];

    fn der_len(n: usize) -> Vec<u8> {
        assert!(n < 128, "short form only");
        vec![n as u8]
    }

    /// A GeneralNames/GeneralSubtree body holding one URI: `[6] IA5String`.
    fn uri_name(uri: &str) -> Vec<u8> {
        let mut v = vec![0x86];
        v.extend(der_len(uri.len()));
        v.extend(uri.as_bytes());
        v
    }

    fn seq(tag: u8, body: Vec<u8>) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend(der_len(body.len()));
        v.extend(body);
        v
    }

    fn ext(oid: &[u64], content: Vec<u8>, critical: bool) -> CustomExtension {
        let mut e = CustomExtension::from_oid_content(oid, content);
        e.set_criticality(critical);
        e
    }

    fn unknown(critical: bool) -> CustomExtension {
        ext(UNKNOWN_OID, vec![0x05, 0x00], critical)
    }

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        der: CertificateDer<'static>,
    }

    fn ca_params(uri: Option<&str>, path_len: Option<u8>) -> CertificateParams {
        let mut p = CertificateParams::default();
        // Names of their own, so that webpki never mistakes one CA for another.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA {n}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = uri
            .map(|u| SanType::URI(u.try_into().unwrap()))
            .into_iter()
            .collect();
        p.not_before = (t0() - Duration::from_secs(3600)).into();
        p.not_after = (t0() + Duration::from_secs(86400)).into();
        p
    }

    fn root(params: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        Ca { params, key, der }
    }

    fn sub(params: CertificateParams, parent: &Ca) -> Ca {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&parent.params, &parent.key);
        let der = params.signed_by(&key, &issuer).unwrap().der().clone();
        Ca { params, key, der }
    }

    fn leaf_under(parent: &Ca, params: &CertificateParams) -> CertificateDer<'static> {
        sub(params.clone(), parent).der
    }

    fn verifier(anchor: &Ca) -> Verifier {
        let mut b = TrustBundles::default();
        b.add("example.org", anchor.der.clone()).unwrap();
        Verifier::new(b, DEFAULT_SKEW)
    }

    fn verdict(v: &Verifier, chain: &[CertificateDer<'static>]) -> Result<(), SvidError> {
        v.verify_client(chain, t0()).map(|_| ())
    }

    fn chain_reason(r: Result<(), SvidError>) -> String {
        match r {
            Err(SvidError::Chain { reason, .. }) => reason,
            other => panic!("expected a chain error, got {other:?}"),
        }
    }

    #[test]
    fn leaf_profile_each_must_has_its_vector() {
        let ca = root(ca_params(Some("spiffe://example.org"), Some(0)));
        let v = verifier(&ca);
        let with = |f: &dyn Fn(&mut CertificateParams)| {
            let mut p = good_params(&[ID]);
            f(&mut p);
            leaf_under(&ca, &p)
        };
        let table: Vec<(&str, CertificateDer<'static>, Result<(), SvidError>)> = vec![
            ("the profile as issued", with(&|_| {}), Ok(())),
            (
                "a subject and a non-critical SAN",
                with(&|p| p.distinguished_name.push(DnType::CommonName, "reader")),
                Ok(()),
            ),
            (
                "an empty subject and a non-critical SAN",
                with(&|p| {
                    p.subject_alt_names.clear();
                    p.custom_extensions
                        .push(ext(&[2, 5, 29, 17], seq(0x30, uri_name(ID)), false));
                }),
                Err(SvidError::SanNotCritical),
            ),
            (
                "no basic constraints at all",
                with(&|p| p.is_ca = IsCa::NoCa),
                Ok(()),
            ),
            (
                "a key usage that is not critical",
                with(&|p| {
                    p.key_usages.clear();
                    // BIT STRING, 7 unused bits, digitalSignature.
                    p.custom_extensions.push(ext(
                        &[2, 5, 29, 15],
                        vec![0x03, 0x02, 0x07, 0x80],
                        false,
                    ));
                }),
                Err(SvidError::KeyUsageNotCritical),
            ),
            (
                "keyCertSign on a leaf",
                with(&|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
                Err(SvidError::LeafCanSign("keyCertSign")),
            ),
            (
                "cRLSign on a leaf",
                with(&|p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
                Err(SvidError::LeafCanSign("cRLSign")),
            ),
            (
                "keyEncipherment and keyAgreement may be set",
                with(&|p| {
                    p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
                    p.key_usages.push(KeyUsagePurpose::KeyAgreement);
                }),
                Ok(()),
            ),
            (
                "an EKU without serverAuth",
                with(&|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]),
                Err(SvidError::EkuLacks("id-kp-serverAuth")),
            ),
            (
                "an unknown extension that is not critical",
                with(&|p| p.custom_extensions.push(unknown(false))),
                Ok(()),
            ),
        ];
        for (what, der, want) in table {
            assert_eq!(verdict(&v, &[der]), want, "{what}");
        }
        let critical = with(&|p| p.custom_extensions.push(unknown(true)));
        assert_eq!(
            chain_reason(verdict(&v, &[critical])),
            "a certificate carries a critical extension that is not processed, and RFC 5280 \
             requires rejecting it (UnsupportedCriticalExtension)"
        );
        // The messages an operator reads.
        assert_eq!(
            SvidError::LeafCanSign("keyCertSign").to_string(),
            "the certificate's key usage sets keyCertSign; a leaf X509-SVID must not, only \
             signing certificates may"
        );
        assert_eq!(
            SvidError::SanNotCritical.to_string(),
            "the certificate's subject is empty, so its URI SAN must be marked critical \
             (RFC 5280 4.1.2.6)"
        );
    }

    #[test]
    fn the_path_is_judged_by_webpki_and_the_signing_profile_here() {
        let td = Some("spiffe://example.org");
        let root_any = root(ca_params(td, None));
        let v = verifier(&root_any);
        let leaf = |ca: &Ca| leaf_under(ca, &good_params(&[ID]));
        let through = |p: CertificateParams| {
            let mid = sub(p, &root_any);
            let l = leaf(&mid);
            verdict(&v, &[l, mid.der])
        };

        assert_eq!(
            through(ca_params(td, Some(0))),
            Ok(()),
            "a proper intermediate"
        );
        assert_eq!(
            through(ca_params(None, Some(0))),
            Ok(()),
            "no SPIFFE ID is allowed"
        );
        let fault = |f: SigningFault| {
            Err(SvidError::Signing {
                which: "intermediate certificate 1 of the chain".into(),
                fault: f,
            })
        };
        let mut p = ca_params(td, None);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        assert_eq!(through(p), fault(SigningFault::NoKeyCertSign));
        let mut p = ca_params(td, None);
        p.key_usages.clear();
        p.custom_extensions
            .push(ext(&[2, 5, 29, 15], vec![0x03, 0x02, 0x01, 0x06], false));
        assert_eq!(through(p), fault(SigningFault::KeyUsageNotCritical));
        let mut p = ca_params(td, None);
        p.key_usages.clear();
        assert_eq!(through(p), fault(SigningFault::NoKeyUsage));
        assert_eq!(
            through(ca_params(Some("spiffe://example.org/ca/1"), None)),
            fault(SigningFault::IdHasPath("spiffe://example.org/ca/1".into()))
        );
        assert_eq!(
            through(ca_params(Some("spiffe://Example.org"), None)),
            fault(SigningFault::BadId(IdError::UppercaseTrustDomain('E')))
        );
        let mut p = ca_params(td, None);
        p.subject_alt_names
            .push(SanType::URI("spiffe://other.org".try_into().unwrap()));
        assert_eq!(through(p), fault(SigningFault::MultipleUriSans(2)));

        // webpki's part: cA, path length, critical extensions, validity, name constraints.
        let mut p = ca_params(td, None);
        p.is_ca = IsCa::ExplicitNoCa;
        assert_eq!(
            chain_reason(through(p)),
            "an intermediate certificate is not a CA (its basic constraints do not set cA) \
             (EndEntityUsedAsCa)",
            "a non-CA intermediate"
        );
        let mut p = ca_params(td, None);
        p.custom_extensions.push(unknown(true));
        assert!(
            chain_reason(through(p)).ends_with("(UnsupportedCriticalExtension)"),
            "an unknown critical extension on an intermediate"
        );
        let mut p = ca_params(td, None);
        p.not_after = (t0() - Duration::from_secs(60)).into();
        assert!(chain_reason(through(p)).starts_with("an intermediate certificate has expired"));
        // The root allows no intermediate.
        let root0 = root(ca_params(td, Some(0)));
        let mid = sub(ca_params(td, Some(0)), &root0);
        let got = verdict(&verifier(&root0), &[leaf(&mid), mid.der.clone()]);
        assert_eq!(
            chain_reason(got),
            "the chain has 1 intermediate certificate(s), more than the pathLenConstraint 0 of \
             the trust bundle's CA allows",
            "the anchor's own constraint (webpki does not apply it)"
        );
        // An intermediate allows no further intermediate.
        let mid0 = sub(ca_params(td, Some(0)), &root_any);
        let mid1 = sub(ca_params(td, None), &mid0);
        let got = verdict(&v, &[leaf(&mid1), mid1.der.clone(), mid0.der.clone()]);
        assert_eq!(
            chain_reason(got),
            "the chain is longer than a CA's pathLenConstraint allows (PathLenConstraintViolated)"
        );
        // URI name constraints: webpki does not process them, and fails closed.
        let mut p = ca_params(td, None);
        let permitted = seq(0xa0, seq(0x30, uri_name("example.org")));
        p.custom_extensions
            .push(ext(&[2, 5, 29, 30], seq(0x30, permitted), true));
        let constrained = root(p);
        let got = verdict(&verifier(&constrained), &[leaf(&constrained)]);
        assert!(
            chain_reason(got).ends_with("(NameConstraintViolation)"),
            "a URI name constraint"
        );
    }

    #[test]
    fn a_trust_anchor_must_be_a_signing_certificate() {
        let add = |p: CertificateParams| {
            TrustBundles::default()
                .add("example.org", root(p).der)
                .map_err(|e| e.to_string())
        };
        let td = Some("spiffe://example.org");
        assert_eq!(add(ca_params(td, Some(0))), Ok(()));
        let mut p = ca_params(td, None);
        p.is_ca = IsCa::ExplicitNoCa;
        assert_eq!(
            add(p),
            Err(
                "a CA certificate of trust domain \"example.org\" cannot sign X509-SVIDs: \
                 its basic constraints do not set cA"
                    .into()
            )
        );
        let mut p = ca_params(td, None);
        p.key_usages = vec![KeyUsagePurpose::CrlSign];
        assert!(
            add(p)
                .unwrap_err()
                .ends_with("its key usage lacks keyCertSign")
        );
        let mut p = ca_params(td, None);
        p.key_usages.clear();
        assert!(
            add(p).unwrap_err().ends_with(
                "it has no key usage extension; a signing certificate needs keyCertSign"
            )
        );
        assert!(
            add(ca_params(Some("spiffe://example.org/ca"), None))
                .unwrap_err()
                .ends_with(
                    "its URI SAN \"spiffe://example.org/ca\" has a path; a signing \
                     certificate's SPIFFE ID names only the trust domain"
                )
        );
        let mut p = ca_params(td, None);
        p.custom_extensions.push(unknown(true));
        assert!(add(p).unwrap_err().ends_with(
            "it carries the critical extension 1.3.6.1.4.1.99999.1, which agentwall does \
             not process"
        ));
    }
}
