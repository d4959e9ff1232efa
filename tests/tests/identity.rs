//! The identity CLI end to end: issue from the local CA, inspect, list the issuance log.

use std::{fs, os::unix::fs::PermissionsExt as _, process::Command};

use agentwall_tests::{agentwall_bin, serial};

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: failing here fails the test"
)]
fn run(args: &[&str]) -> std::process::Output {
    Command::new(agentwall_bin()).args(args).output().unwrap()
}

#[test]
fn issue_inspect_and_log() {
    let _s = serial();
    let dir = std::env::temp_dir().join(format!("awt-identity-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let (state, out) = (dir.join("state"), dir.join("out"));
    let (state_s, out_s) = (state.to_str().unwrap(), out.to_str().unwrap());
    let o = run(&[
        "identity",
        "issue",
        "--state-dir",
        state_s,
        "--trust-domain",
        "example.org",
        "--id",
        "agent/reader/prod",
        "--cap",
        "read:analytics",
        "--lifetime",
        "15m",
        "--out",
        out_s,
    ]);
    assert!(o.status.success(), "{o:?}");
    for (file, mode) in [
        ("svid.key", 0o600),
        ("svid.pem", 0o644),
        ("bundle.pem", 0o644),
    ] {
        assert_eq!(
            fs::metadata(out.join(file)).unwrap().permissions().mode() & 0o777,
            mode,
            "{file}"
        );
    }
    assert_eq!(
        fs::metadata(state.join("ca/ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let svid = out.join("svid.pem");
    let o = run(&[
        "identity",
        "inspect",
        "--state-dir",
        state_s,
        "--trust-domain",
        "example.org",
        svid.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        text.contains("spiffe://example.org/agent/reader/prod")
            && text.contains("read:analytics")
            && text.contains("valid"),
        "{text}"
    );
    // Against another trust domain's CA the same file is refused, with the reason.
    let o = run(&[
        "identity",
        "inspect",
        "--state-dir",
        state_s,
        "--trust-domain",
        "other.org",
        svid.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("trust domain \"example.org\" is not trusted here"),
        "{o:?}"
    );
    let o = run(&["identity", "log", "--state-dir", state_s, "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(
        lines[0]["spiffe_id"],
        "spiffe://example.org/agent/reader/prod"
    );
    assert_eq!(lines[0]["sha256"].as_str().unwrap().len(), 64);
    // Bad input: each answered with what to fix, nothing issued.
    for (args, want) in [
        (vec!["--id", "agent/a/../b"], "\".\" or \"..\""),
        (vec!["--id", "agent/a/prod", "--lifetime", "2d"], "outside"),
        (
            vec!["--id", "agent/a/prod", "--cap", "Read Everything"],
            "capability",
        ),
        (
            vec!["--id", "spiffe://other.org/agent/a/prod"],
            "not in this CA's trust domain",
        ),
    ] {
        let mut a = vec![
            "identity",
            "issue",
            "--state-dir",
            state_s,
            "--trust-domain",
            "example.org",
            "--out",
            out_s,
        ];
        a.extend(args);
        let o = run(&a);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{a:?}: {err}");
    }
    let o = run(&["identity", "log", "--state-dir", state_s]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "refused requests issue nothing"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn renew_keeps_the_key_type_of_the_certificate_unless_told() {
    let _s = serial();
    let dir = std::env::temp_dir().join(format!("awt-identity-renew-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let state_s = state.to_str().unwrap();
    let ca = ["--state-dir", state_s, "--trust-domain", "example.org"];
    let key_of = |svid: &std::path::Path| {
        let o = run(&[&["identity", "inspect"][..], &ca, &[svid.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{o:?}");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.starts_with("key:"))
            .unwrap_or_default();
        line.trim_start_matches("key:").trim().to_string()
    };
    let out = |n: &str| dir.join(n);
    let p256 = out("p256");
    let o = run(&[
        &["identity", "issue"][..],
        &ca,
        &["--id", "agent/reader/prod", "--key-algorithm", "ecdsa-p256"],
        &["--out", p256.to_str().unwrap()],
    ]
    .concat());
    assert!(o.status.success(), "{o:?}");
    assert_eq!(key_of(&p256.join("svid.pem")), "ecdsa-p256");
    let cert = p256.join("svid.pem");
    let renew = |extra: &[&str], to: &std::path::Path| {
        let o = run(&[
            &["identity", "renew"][..],
            &ca,
            &[
                "--cert",
                cert.to_str().unwrap(),
                "--out",
                to.to_str().unwrap(),
            ],
            extra,
        ]
        .concat());
        assert!(o.status.success(), "{o:?}");
        key_of(&to.join("svid.pem"))
    };
    assert_eq!(
        renew(&[], &out("kept")),
        "ecdsa-p256",
        "renewal keeps the key type"
    );
    assert_eq!(
        renew(&["--key-algorithm", "ed25519"], &out("changed")),
        "ed25519",
        "unless told otherwise"
    );
    let o = run(&[
        &["identity", "issue"][..],
        &ca,
        &["--id", "agent/reader/prod"],
        &["--out", out("default").to_str().unwrap()],
    ]
    .concat());
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        key_of(&out("default").join("svid.pem")),
        "ed25519",
        "the default"
    );
    fs::remove_dir_all(&dir).unwrap();
}
