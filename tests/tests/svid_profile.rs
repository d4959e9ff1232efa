//! The X509-SVID profile at enrollment, over the daemon's real socket: certificates signed
//! by the daemon's own CA key that break the standard are refused with their reason, and
//! the agent never runs. (Every rule's vector is in the agent crate's unit tests; these are
//! the ones a holder of a badly issued certificate would try.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use agentwall_tests::{TcpSink, TestDaemon, serial, sign_svid, svid_params};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

const ID: &str = "spiffe://agentwall.local/agent/reader/prod";

fn leaf_params() -> CertificateParams {
    svid_params(ID, std::time::Duration::from_secs(600))
}

/// Signs `leaf` with the daemon's CA key, through an intermediate CA of that key when
/// `via_intermediate`; writes the chain and the key into `out`, returns their paths.
fn sign(
    state_dir: &Path,
    leaf: &CertificateParams,
    via_intermediate: bool,
    out: &Path,
) -> (String, String) {
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(state_dir.join("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = fs::read_to_string(state_dir.join("ca/ca.crt")).unwrap();
    let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut chain = String::new();
    if via_intermediate {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            "an intermediate the CA was tricked into signing",
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.not_before = leaf.not_before;
        p.not_after = leaf.not_after;
        let mid_key = KeyPair::generate().unwrap();
        let mid = p.signed_by(&mid_key, &ca).unwrap();
        let mid_issuer = Issuer::new(p, mid_key);
        chain.push_str(&leaf.signed_by(&key, &mid_issuer).unwrap().pem());
        chain.push_str(&mid.pem());
    } else {
        chain.push_str(&leaf.signed_by(&key, &ca).unwrap().pem());
    }
    fs::create_dir_all(out).unwrap();
    fs::set_permissions(out, fs::Permissions::from_mode(0o755)).unwrap();
    let (c, k) = (out.join("svid.pem"), out.join("svid.key"));
    fs::write(&c, chain).unwrap();
    fs::write(&k, key.serialize_pem()).unwrap();
    fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn certificates_that_break_the_x509_svid_profile_are_refused_at_enrollment() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let policy = format!(
        "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        sink.port()
    );
    let d = TestDaemon::start(&[("r.yaml", &policy)]);
    let state = d.state_dir();
    let to = format!("tcp 127.0.0.1:{}", sink.port());

    // The control: a proper SVID from the same key enrolls, and the agent is enforced.
    let (c, k) = sign_svid(
        &state,
        ID,
        std::time::Duration::from_secs(600),
        &d.dir.join("good"),
    );
    let (c, k) = (c.display().to_string(), k.display().to_string());
    let o = d
        .exec_under(&["--cert", &c, "--key", &k], None, &[&to])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok");

    let mut signs = leaf_params();
    signs.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let mut crl = leaf_params();
    crl.key_usages.push(KeyUsagePurpose::CrlSign);
    let mut client_only = leaf_params();
    client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cases: [(&str, CertificateParams, bool, &str); 4] = [
        (
            "a leaf below an intermediate, under a CA whose pathLenConstraint is 0",
            leaf_params(),
            true,
            "the chain has 1 intermediate certificate(s), more than the pathLenConstraint 0 of the trust bundle's CA allows",
        ),
        (
            "a leaf that may sign certificates",
            signs,
            false,
            "the certificate's key usage sets keyCertSign; a leaf X509-SVID must not, only signing certificates may",
        ),
        (
            "a leaf that may sign CRLs",
            crl,
            false,
            "the certificate's key usage sets cRLSign; a leaf X509-SVID must not",
        ),
        (
            "a leaf whose extended key usage lacks serverAuth",
            client_only,
            false,
            "the certificate's extended key usage lacks id-kp-serverAuth",
        ),
    ];
    // The control's connection is counted by the listener's thread: wait for it.
    agentwall_tests::wait_for(
        std::time::Duration::from_secs(5),
        "the control's connection",
        || (sink.accepted() == 1).then_some(()),
    );
    let accepted = sink.accepted();
    for (n, (what, params, via, reason)) in cases.into_iter().enumerate() {
        let (c, k) = sign(&state, &params, via, &d.dir.join(format!("bad-{n}")));
        let o = d
            .exec_under(&["--cert", &c, "--key", &k], None, &[&to])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(126), "{what}: {o:?}");
        assert!(err.contains(reason), "{what}: {err}");
        assert!(o.stdout.is_empty(), "{what}: the agent must not run: {o:?}");
    }
    assert_eq!(
        sink.accepted(),
        accepted,
        "no refused agent reached the listener"
    );
}
