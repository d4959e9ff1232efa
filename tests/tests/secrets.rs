//! The secret store of a real daemon, through `agentwall secret`: versions, the master key's
//! rotation, removal, refusals with their reasons, an audit record for each, and no value
//! anywhere it should not be (logs, status, the store's files, the audit log). Root, one at a
//! time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output, Stdio},
};

use agentwall_tests::{TestDaemon, agentwall_bin, lines, serial, tcp_policy};

/// `agentwall secret ARGS`, with `input` on its standard input.
fn secret(d: &TestDaemon, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(agentwall_bin())
        .arg("secret")
        .args(args)
        .env("AGENTWALL_SOCKET", d.dir.join("admin.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn refused(o: &Output) -> String {
    assert!(!o.status.success(), "{o:?}");
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// The audit records of `kind`.
fn records(d: &TestDaemon, kind: &str) -> Vec<serde_json::Value> {
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let o = d.cli(&["audit", "query", &dir, "--key", &key, "--kind", kind]);
    assert!(o.status.success(), "{o:?}");
    lines(&o)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect()
}

/// Every file below `dir`, read whole.
fn files_below(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_below(&p, out);
        } else if let Ok(bytes) = fs::read(&p) {
            out.push((p.display().to_string(), bytes));
        }
    }
}

#[test]
fn secrets_are_versioned_rotated_removed_and_never_leak() {
    use base64::Engine as _;
    let _s = serial();
    let mut d = TestDaemon::prepare(&[("p.yaml", &tcp_policy("web", &[1]))], Some(""));
    let key_file = d.dir.join("keys").join("secrets.key");
    fs::write(
        d.dir.join("agentwall.yaml"),
        format!("secrets:\n  key_file: {}\n", key_file.display()),
    )
    .unwrap();
    d.launch();
    d.wait_healthy();
    // Opened on first use: no key until a secret is stored.
    assert!(!key_file.exists());

    let planted = [
        format!("aw-planted-one-{}", std::process::id()),
        format!("aw-planted-two-{}", std::process::id()),
    ];
    let path = "agent/web/db-password";
    let out = ok(&secret(&d, &["put", path], planted[0].as_bytes()));
    assert_eq!(out.trim(), format!("stored {path} version 1"));
    let value_file = d.dir.join("value");
    fs::write(&value_file, &planted[1]).unwrap();
    let out = ok(&secret(
        &d,
        &["put", path, "--file", value_file.to_str().unwrap()],
        b"",
    ));
    assert_eq!(out.trim(), format!("stored {path} version 2"));
    fs::remove_file(&value_file).unwrap();

    assert_eq!(ok(&secret(&d, &["get", path], b"")), planted[1]);
    assert_eq!(
        ok(&secret(&d, &["get", path, "--version", "1"], b"")),
        planted[0]
    );
    let listed = ok(&secret(&d, &["list", "agent/", "--json"], b""));
    let entry: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(entry["path"], path);
    assert_eq!(entry["versions"], serde_json::json!([1, 2]));
    assert!(ok(&secret(&d, &["list", "other/"], b"")).is_empty());

    // The key and the store are private.
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&d.state_dir().join("secrets")), 0o700);

    // Refusals say what to fix.
    let e = refused(&secret(&d, &["get", "agent/web/nothing"], b""));
    assert!(e.contains("no secret agent/web/nothing"), "{e}");
    let e = refused(&secret(&d, &["get", path, "--version", "9"], b""));
    assert!(e.contains("has no version 9 (it has 1, 2)"), "{e}");
    let e = refused(&secret(&d, &["put", "agent/../etc"], b"x"));
    assert!(e.contains("`..` segment"), "{e}");
    let e = refused(&secret(&d, &["put", "agent/web/empty"], b""));
    assert!(e.contains("the value is empty"), "{e}");

    // A rotation keeps every version readable, and moves them to the new key.
    let out = ok(&secret(&d, &["rotate-key"], b""));
    assert!(out.contains("1 secret(s) rewrapped"), "{out}");
    let keys: Vec<String> = fs::read_to_string(&key_file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(keys.len(), 2);
    // Only the new key left: both versions still open (after a restart, which reads it).
    fs::write(&key_file, format!("{}\n", keys[0])).unwrap();
    d.stop_cleanly();
    d.launch();
    d.wait_healthy();
    assert_eq!(ok(&secret(&d, &["get", path], b"")), planted[1]);
    assert_eq!(
        ok(&secret(&d, &["get", path, "--version", "1"], b"")),
        planted[0]
    );

    // A store file changed behind the daemon's back is refused, not believed.
    let mut files = Vec::new();
    files_below(&d.state_dir().join("secrets"), &mut files);
    assert_eq!(files.len(), 1);
    let (file, bytes) = &files[0];
    let mut doc: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    doc["versions"].as_array_mut().unwrap().pop();
    fs::write(file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let e = refused(&secret(&d, &["get", path], b""));
    assert!(e.contains("changed outside agentwall"), "{e}");
    fs::write(file, bytes).unwrap();

    let out = ok(&secret(&d, &["rm", path], b""));
    assert!(out.contains("removed agent/web/db-password"), "{out}");
    let e = refused(&secret(&d, &["get", path], b""));
    assert!(e.contains("no secret"), "{e}");
    let status = d.cli(&["status", "--json"]);
    d.stop_cleanly();

    // Each operation is audited, by path and version, never with its value.
    let stored = records(&d, "secret_stored");
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["path"], path);
    assert_eq!(stored[1]["version"], 2);
    let read = records(&d, "secret_read");
    assert_eq!(read.len(), 4, "{read:?}");
    assert!(read.iter().all(|r| r["by"] == "uid 0"), "{read:?}");
    assert_eq!(records(&d, "secret_removed").len(), 1);
    assert_eq!(records(&d, "secret_key_rotation")[0]["rewrapped"], 1);
    let refusals = records(&d, "secret_refused");
    assert_eq!(refusals.len(), 6, "{refusals:?}");

    // No value anywhere: the daemon's log, its status, the store's files, the decrypted
    // audit log, in clear or base64.
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let all_audit = d.cli(&["audit", "query", &dir, "--key", &key]);
    let mut haystacks = vec![
        ("daemon log".to_string(), d.log_text().into_bytes()),
        ("status".to_string(), status.stdout),
        ("audit log".to_string(), all_audit.stdout),
    ];
    files_below(&d.state_dir(), &mut haystacks);
    for p in &planted {
        let b64 = base64::engine::general_purpose::STANDARD.encode(p);
        for (what, bytes) in &haystacks {
            let text = String::from_utf8_lossy(bytes);
            assert!(
                !text.contains(p.as_str()) && !text.contains(&b64),
                "a secret value is in {what}"
            );
        }
    }
}
