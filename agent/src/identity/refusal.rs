//! Why a presented certificate is not accepted as an X509-SVID: one error per rule, shared by
//! the profile checks (`profile`) and the chain verification (`verify`).

use super::spiffe::IdError;

/// Why a certificate is refused as an X509-SVID; each says which rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("no certificate was presented")]
    NoCertificate,
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the certificate has no URI SAN; an X509-SVID carries its SPIFFE ID in exactly one")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(IdError),
    #[error("the certificate is a CA certificate; a leaf X509-SVID must not be")]
    LeafIsCa,
    #[error("the certificate has no key usage extension; an X509-SVID leaf needs digitalSignature")]
    NoKeyUsage,
    #[error("the certificate's key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error(
        "the certificate's subject is empty, so its URI SAN must be marked critical (RFC 5280 4.1.2.6)"
    )]
    SanNotCritical,
    #[error("the certificate's key usage extension is not marked critical; an X509-SVID's must be")]
    KeyUsageNotCritical,
    #[error(
        "the certificate's key usage sets {0}; a leaf X509-SVID must not, only signing certificates may"
    )]
    LeafCanSign(&'static str),
    #[error(
        "the certificate's extended key usage lacks {0}; a leaf X509-SVID that has the extension allows both id-kp-clientAuth and id-kp-serverAuth"
    )]
    EkuLacks(&'static str),
    #[error("{which} cannot sign X509-SVIDs: {fault}")]
    Signing { which: String, fault: SigningFault },
    #[error("the certificate expired at {not_after} (now {now}, tolerance {skew_secs} s)")]
    Expired {
        not_after: String,
        now: String,
        skew_secs: u64,
    },
    #[error("the certificate is valid only from {not_before} (now {now}, tolerance {skew_secs} s)")]
    NotYetValid {
        not_before: String,
        now: String,
        skew_secs: u64,
    },
    #[error("trust domain {0:?} is not trusted here")]
    UnknownTrustDomain(String),
    #[error("the certificate does not chain to a CA of trust domain {trust_domain:?}: {reason}")]
    Chain {
        trust_domain: String,
        reason: String,
    },
}

/// Why a certificate cannot sign X509-SVIDs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningFault {
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("its basic constraints do not set cA")]
    NotCa,
    #[error("it has no key usage extension; a signing certificate needs keyCertSign")]
    NoKeyUsage,
    #[error("its key usage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("its key usage lacks keyCertSign")]
    NoKeyCertSign,
    #[error("it has {0} URI SANs; a signing certificate carries at most one SPIFFE ID")]
    MultipleUriSans(usize),
    #[error(
        "its URI SAN {0:?} has a path; a signing certificate's SPIFFE ID names only the trust domain"
    )]
    IdHasPath(String),
    #[error("its URI SAN is not a SPIFFE ID: {0}")]
    BadId(IdError),
    #[error("it carries the critical extension {0}, which agentwall does not process")]
    UnknownCritical(String),
}
