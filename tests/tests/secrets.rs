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
    d.audit_records(kind)
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
    let mut d = TestDaemon::prepare_with_secrets(&[("p.yaml", &tcp_policy("web", &[1]))], "");
    let key_file = d.secrets_key();
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
        (
            "daemon output".to_string(),
            fs::read(d.dir.join("stdout.jsonl")).unwrap_or_default(),
        ),
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

fn python() -> std::path::PathBuf {
    let p = std::path::PathBuf::from("/usr/bin/python3");
    if p.exists() { p } else { "python3".into() }
}

/// The example client, copied where any user can read it.
fn secret_agent(d: &TestDaemon) -> std::path::PathBuf {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/secret_agent.py");
    let dst = d.dir.join("secret_agent.py");
    fs::copy(&src, &dst).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
    dst
}

/// The example client with the SVID `cert`/`key`: launched by `agentwall exec` (in an
/// enforced cgroup bound to the identity) when `exec`, else as a plain process.
fn client(
    d: &TestDaemon,
    exec: bool,
    (cert, key): &(String, String),
    address: &str,
    args: &[&str],
) -> Command {
    let script = secret_agent(d);
    let mut c = if exec {
        let mut c = Command::new(d.world_copy(&agentwall_bin()));
        c.arg("exec")
            .arg("--socket")
            .arg(&d.socket)
            .args(["--cert", cert, "--key", key, "--"])
            .arg(python());
        c
    } else {
        let mut c = Command::new(python());
        c.env("AGENTWALL_SVID", cert)
            .env("AGENTWALL_SVID_KEY", key)
            .env(
                "AGENTWALL_BUNDLE",
                std::path::Path::new(cert).with_file_name("bundle.pem"),
            );
        c
    };
    c.arg(script).args(["--address", address]).args(args);
    c
}

/// `agentwall exec` of `sh -c script` under identity `agent/reader/prod`, with the secret
/// `agent/reader/db-password` as file `db`.
fn reader_with_secret(d: &TestDaemon, script: &str) -> Command {
    let mut c = Command::new(d.world_copy(&agentwall_bin()));
    c.arg("exec").arg("--socket").arg(&d.socket).args([
        "--identity",
        "agent/reader/prod",
        "--secret",
        "db=agent/reader/db-password",
        "--",
        "sh",
        "-c",
        script,
    ]);
    c
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    lines(o)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {o:?}")))
        .collect()
}

/// A `--keep` client: its lines, one at a time; a line on its input asks for a renewal.
struct Kept {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Kept {
    fn spawn(mut c: Command) -> Self {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead as _;
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    fn renew(&mut self) -> serde_json::Value {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"renew\n").unwrap();
        stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Agents fetch their own secrets over mutual TLS, as their policies' `secret:` rules grant:
/// the value reaches what the agent uses it for, other paths and wrong conditions are refused
/// with the reason, leases are renewed (with the newest version), end when their time is up,
/// and end at once when the identity is revoked. Every step is audited without the value.
#[test]
fn agents_fetch_their_secrets_over_mtls_under_leases() {
    use base64::Engine as _;
    let _s = serial();
    let port = agentwall_tests::free_port();
    let address = format!("127.0.0.1:{port}");
    let reader = "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n  rules:\n    - resource: secret:agent/reader/*\n      lease: 1m\n    - resource: secret:shared/report-key\n      rateLimit: 1 per hour\n";
    let other = "policy:\n  name: other\n  identity: agent/other/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n  rules:\n    - resource: secret:shared/*\n      lease: 10s\n";
    let mut d = TestDaemon::prepare_with_secrets(
        &[("reader.yaml", reader), ("other.yaml", other)],
        &format!("decision:\n  listen: {address}\n"),
    );
    d.launch();
    d.wait_healthy();
    let tag = std::process::id();
    let planted = [
        format!("aw-planted-db-{tag}"),
        format!("aw-planted-report-{tag}"),
        format!("aw-planted-other-{tag}"),
        format!("aw-planted-db-v2-{tag}"),
    ];
    for (path, value) in [
        ("agent/reader/db-password", &planted[0]),
        ("shared/report-key", &planted[1]),
        ("agent/other/key", &planted[2]),
    ] {
        ok(&secret(&d, &["put", path], value.as_bytes()));
    }
    let reader_svid = d.issue("agent/reader/prod", "10m");
    let other_svid = d.issue("agent/other/prod", "10m");
    let mut outputs: Vec<Vec<u8>> = Vec::new();

    // The agent, confined and bound to its identity, fetches its secret and uses it: the
    // listener gets the value, byte for byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let send_to = listener.local_addr().unwrap().to_string();
    let used = std::thread::spawn(move || {
        use std::io::Read as _;
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let o = client(
        &d,
        true,
        &reader_svid,
        &address,
        &["agent/reader/db-password", "--send", &send_to],
    )
    .output()
    .unwrap();
    let said = json_lines(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(said[0]["fetched"], true, "{said:?}");
    assert_eq!(said[0]["version"], 1);
    assert_eq!(said[0]["lease"]["ttl_seconds"], 60);
    assert_eq!(said[1]["sent"], planted[0].len());
    assert_eq!(used.join().unwrap(), planted[0].as_bytes());
    outputs.push(o.stdout);

    // What the policy does not grant is refused, with the reason.
    let refused_with = |svid: &(String, String), args: &[&str]| {
        let o = client(&d, false, svid, &address, args).output().unwrap();
        let said = json_lines(&o);
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        (
            said[0]["status"].as_u64().unwrap(),
            said[0]["error"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        refused_with(&reader_svid, &["agent/other/key"]),
        (
            403,
            "no rule of policy \"reader\" names secret:agent/other/key".to_owned()
        )
    );
    assert_eq!(
        refused_with(&other_svid, &["agent/reader/db-password"]),
        (
            403,
            "no rule of policy \"other\" names secret:agent/reader/db-password".to_owned()
        )
    );
    let (status, e) = refused_with(&reader_svid, &["agent/reader/none"]);
    assert_eq!((status, e.as_str()), (404, "no secret agent/reader/none"));
    let (status, e) = refused_with(&reader_svid, &["agent/../reader/x"]);
    assert!(status == 400 && e.contains("`..` segment"), "{e}");
    // Not on the Unix socket, where no certificate is proved.
    let (status, body) = agentwall_tests::post(
        &d.decision_socket,
        "POST",
        "/v1/secrets/fetch",
        r#"{"path":"agent/reader/db-password"}"#,
    );
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("mutual TLS only"),
        "{body}"
    );

    // The shared key, once an hour; the other agent's lease of it (10 s) ends on its own.
    let o = client(&d, false, &reader_svid, &address, &["shared/report-key"])
        .output()
        .unwrap();
    assert_eq!(json_lines(&o)[0]["fetched"], true, "{o:?}");
    outputs.push(o.stdout);
    assert_eq!(
        refused_with(&reader_svid, &["shared/report-key"]),
        (403, "over the rule's rate limit (1 per hour)".to_owned())
    );
    let o = client(&d, false, &other_svid, &address, &["shared/report-key"])
        .output()
        .unwrap();
    let said = json_lines(&o);
    assert_eq!(said[0]["lease"]["ttl_seconds"], 10, "{o:?}");
    let other_lease = said[0]["lease"]["id"].as_str().unwrap().to_owned();
    outputs.push(o.stdout);

    // Two holders that stay: one confined by `agentwall exec`, one a plain process (a
    // gateway, say) whose connection the revocation does not cut.
    let mut confined = Kept::spawn(client(
        &d,
        true,
        &reader_svid,
        &address,
        &["agent/reader/db-password", "--keep"],
    ));
    let mut plain = Kept::spawn(client(
        &d,
        false,
        &reader_svid,
        &address,
        &["agent/reader/db-password", "--keep"],
    ));
    assert_eq!(confined.line()["fetched"], true);
    assert_eq!(plain.line()["fetched"], true);
    ok(&secret(
        &d,
        &["put", "agent/reader/db-password"],
        planted[3].as_bytes(),
    ));
    let renewed = confined.renew();
    assert_eq!(
        (renewed["renewed"].clone(), renewed["version"].clone()),
        (true.into(), 2.into()),
        "{renewed}"
    );
    let leases = |d: &TestDaemon| -> Vec<serde_json::Value> {
        ok(&secret(d, &["leases", "--json"], b""))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let reader_id = "spiffe://agentwall.local/agent/reader/prod";
    let held = leases(&d);
    assert_eq!(
        held.iter().filter(|l| l["identity"] == reader_id).count(),
        4,
        "{held:#?}"
    );
    assert!(held.iter().all(|l| l.get("value").is_none()));

    // Revoked: every lease of the identity ends at once, and no renewal is granted.
    let r = d.cli(&["revoke", reader_id, "--reason", "test"]);
    assert!(r.status.success(), "{r:?}");
    let held = leases(&d);
    assert_eq!(
        held.iter().filter(|l| l["identity"] == reader_id).count(),
        0,
        "{held:#?}"
    );
    let refused = confined.renew();
    assert_eq!(refused["renewed"], false, "{refused}");
    let refused = plain.renew();
    assert_eq!(refused["renewed"], false, "{refused}");
    assert_eq!(refused["status"], 404, "{refused}");

    // The 10 s lease ends when its time is up.
    agentwall_tests::wait_for(
        std::time::Duration::from_secs(20),
        "the 10 s lease to end",
        || (!leases(&d).iter().any(|l| l["id"] == other_lease.as_str())).then_some(()),
    );
    drop((confined, plain));
    d.stop_cleanly();

    let leased = records(&d, "secret_leased");
    assert_eq!(leased.len(), 6, "{leased:#?}");
    assert_eq!(leased[0]["identity"], reader_id);
    assert_eq!(leased[0]["path"], "agent/reader/db-password");
    assert_eq!(leased[0]["version"], 1);
    assert_eq!(leased[0]["renewal"], false);
    assert!(
        leased[0]["rule"]
            .as_str()
            .unwrap()
            .ends_with("reader.yaml:8"),
        "{leased:#?}"
    );
    assert!(
        leased
            .iter()
            .any(|r| r["renewal"] == true && r["version"] == 2),
        "{leased:#?}"
    );
    let denied = records(&d, "secret_denied");
    assert!(denied.len() >= 6, "{denied:#?}");
    assert!(
        denied.iter().any(|r| r["path"] == "shared/report-key"
            && r["reason"] == "over the rule's rate limit (1 per hour)"
            && r["rule"]
                .as_str()
                .is_some_and(|r| r.ends_with("reader.yaml:10"))),
        "{denied:#?}"
    );
    let ended = records(&d, "secret_lease_ended");
    let revoked = ended
        .iter()
        .filter(|r| r["reason"].as_str().unwrap().starts_with("revoked:"))
        .count();
    assert_eq!(revoked, 4, "{ended:#?}");
    assert!(
        ended
            .iter()
            .any(|r| r["lease"] == other_lease.as_str() && r["reason"] == "expired"),
        "{ended:#?}"
    );

    // No value anywhere but where the agent used it.
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let all_audit = d.cli(&["audit", "query", &dir, "--key", &key]);
    let mut haystacks = vec![
        ("daemon log".to_string(), d.log_text().into_bytes()),
        (
            "daemon output".to_string(),
            fs::read(d.dir.join("stdout.jsonl")).unwrap_or_default(),
        ),
        ("audit log".to_string(), all_audit.stdout),
    ];
    haystacks.extend(
        outputs
            .into_iter()
            .map(|o| ("an agent's output".to_string(), o)),
    );
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

/// The exec cgroups of `d` still there.
fn exec_cgroups(d: &TestDaemon) -> Vec<String> {
    let root = agentwall_tests::cgroup_mount().join(&d.cgroup_root);
    fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("exec-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `agentwall exec --secret NAME=PATH` keeps the secret in a file of the agent's own
/// directory, owned by the user it runs as and readable by it alone, never in its
/// environment or command line; renewed in place when a newer version is put; removed the
/// moment the identity is revoked, and by a restarted daemon, which holds no lease. A secret
/// the policy does not grant stops the launch.
#[test]
fn exec_keeps_granted_secrets_in_the_agents_directory() {
    let _s = serial();
    let reader = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: secret:agent/reader/*\n      lease: 15s\n";
    let mut d = TestDaemon::prepare_with_secrets(&[("reader.yaml", reader)], "");
    d.launch();
    d.wait_healthy();
    let tag = std::process::id();
    let planted = [
        format!("aw-planted-exec-{tag}"),
        format!("aw-planted-exec-v2-{tag}"),
        format!("aw-planted-exec-other-{tag}"),
    ];
    ok(&secret(
        &d,
        &["put", "agent/reader/db-password"],
        planted[0].as_bytes(),
    ));
    ok(&secret(
        &d,
        &["put", "agent/other/key"],
        planted[2].as_bytes(),
    ));
    let exec = |args: &[&str], script: &str| {
        Command::new(d.world_copy(&agentwall_bin()))
            .arg("exec")
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .args(["--", "sh", "-c", script])
            .output()
            .unwrap()
    };
    let show = r#"f="$AGENTWALL_SECRETS_DIR/db"; cat "$f"; echo; stat -c '%a %u' "$f"; tr '\0' '\n' < /proc/self/environ | grep -c aw-planted; tr '\0' ' ' < /proc/self/cmdline; echo"#;

    // Under an identity the daemon issues, as an unprivileged user.
    let o = exec(
        &[
            "--identity",
            "agent/reader/prod",
            "--user",
            "nobody",
            "--secret",
            "db=agent/reader/db-password",
        ],
        show,
    );
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], planted[0], "{o:?}");
    assert_eq!(
        lines[1], "400 65534",
        "owned by nobody, readable by it alone: {o:?}"
    );
    assert_eq!(lines[2], "0", "no value in the environment: {o:?}");
    assert!(!lines[3].contains(&planted[0]), "{o:?}");

    // With a certificate the agent enrolls with: that identity's policy decides.
    let svid = d.issue("agent/reader/prod", "10m");
    let o = exec(
        &[
            "--cert",
            &svid.0,
            "--key",
            &svid.1,
            "--secret",
            "db=agent/reader/db-password",
        ],
        show,
    );
    assert_eq!(ok(&o).lines().next(), Some(planted[0].as_str()), "{o:?}");

    // A secret the policy does not grant: no launch, and the reason.
    let o = exec(
        &[
            "--identity",
            "agent/reader/prod",
            "--secret",
            "db=agent/reader/db-password",
            "--secret",
            "x=agent/other/key",
        ],
        "echo ran",
    );
    let e = refused(&o);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ran"), "{o:?}");
    assert!(
        e.contains("agentwall exec --secret: x (agent/other/key) for spiffe://agentwall.local/agent/reader/prod: no rule of policy \"reader\" names secret:agent/other/key"),
        "{e}"
    );
    let e = refused(&exec(
        &[
            "--policy",
            "reader",
            "--secret",
            "db=agent/reader/db-password",
        ],
        "true",
    ));
    assert!(e.contains("cannot be used with"), "{e}");
    let e = refused(&exec(
        &[
            "--identity",
            "agent/reader/prod",
            "--secret",
            "../db=agent/reader/db-password",
        ],
        "true",
    ));
    assert!(e.contains("is not a file name"), "{e}");

    // A long-running agent, and the directory of its secrets.
    let long_running = |d: &TestDaemon| {
        let mut child = reader_with_secret(d, r#"echo "$AGENTWALL_SECRETS_DIR"; exec sleep 60"#)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead as _;
        let mut l = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut l)
            .unwrap();
        (child, std::path::PathBuf::from(l.trim()))
    };
    // The launcher passes a stop on to the command.
    let stop = |child: &mut std::process::Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let _ = child.wait();
    };

    // A restarted daemon holds no lease: it removes the files an earlier one kept.
    let (mut held, held_dir) = long_running(&d);
    assert!(held_dir.join("db").exists());
    d.stop_cleanly();
    d.launch();
    d.wait_healthy();
    assert!(!held_dir.join("db").exists(), "a secret outlived its lease");
    stop(&mut held);

    // Renewed in place with the newer version, gone at revocation.
    let (mut child, dir) = long_running(&d);
    let file = dir.join("db");
    assert_eq!(fs::read_to_string(&file).unwrap(), planted[0]);
    ok(&secret(
        &d,
        &["put", "agent/reader/db-password"],
        planted[1].as_bytes(),
    ));
    agentwall_tests::wait_for(
        std::time::Duration::from_secs(20),
        "the renewed version in the file",
        || (fs::read_to_string(&file).ok()? == planted[1]).then_some(()),
    );
    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "test",
    ]);
    assert!(r.status.success(), "{r:?}");
    assert!(
        !file.exists(),
        "the secret is removed when the revocation returns"
    );
    stop(&mut child);
    agentwall_tests::wait_for(
        std::time::Duration::from_secs(10),
        "the exec cgroups to go",
        || exec_cgroups(&d).is_empty().then_some(()),
    );
    d.stop_cleanly();

    let leased = records(&d, "secret_leased");
    assert!(
        leased
            .iter()
            .any(|r| r["renewal"] == true && r["version"] == 2),
        "{leased:#?}"
    );
    assert!(
        leased.iter().all(|r| r["asker"]
            .as_str()
            .unwrap()
            .starts_with("agentwall exec (cgroup ")),
        "{leased:#?}"
    );
    let ended = records(&d, "secret_lease_ended");
    assert!(
        ended
            .iter()
            .any(|r| r["reason"].as_str().unwrap().starts_with("revoked")),
        "{ended:#?}"
    );
    assert!(
        ended
            .iter()
            .any(|r| r["reason"] == "the agent's command ended"),
        "{ended:#?}"
    );
    assert!(
        ended.iter().any(|r| r["reason"] == "the launch failed"),
        "{ended:#?}"
    );
    let key = d.audit_key().display().to_string();
    let audit_dir = d.audit_dir().display().to_string();
    let all_audit = d.cli(&["audit", "query", &audit_dir, "--key", &key]);
    for p in &planted {
        for (what, text) in [
            ("daemon log", d.log_text()),
            (
                "daemon output",
                fs::read_to_string(d.dir.join("stdout.jsonl")).unwrap_or_default(),
            ),
            (
                "audit log",
                String::from_utf8_lossy(&all_audit.stdout).into_owned(),
            ),
        ] {
            assert!(
                !text.contains(p.as_str()),
                "a secret value is in the {what}"
            );
        }
    }
}

/// A lease lasts until its renewal judges it again, up to a day: what no longer stands ends
/// it sooner. A reload that takes the grant away ends the lease of an agent launched with the
/// secret within seconds, and a quarantine of the agent's cgroup takes its file. (Both lasted
/// until the renewal, when a third of the lease was left: 40 minutes here.)
#[test]
fn a_reload_that_takes_the_grant_away_or_a_quarantine_ends_the_lease() {
    use std::{io::BufRead as _, sync::mpsc, time::Duration};
    let _s = serial();
    let granted = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: secret:agent/reader/*\n      lease: 1h\n";
    let taken = "policy:\n  name: reader\n  identity: agent/reader/prod\n";
    let mut d = TestDaemon::prepare_with_secrets(&[("reader.yaml", granted)], "");
    d.launch();
    d.wait_healthy();
    d.secret_put("agent/reader/db-password", "aw-planted-standing");
    // The agent says where its secret is, then waits for the file to go.
    let agent = || {
        let mut child = reader_with_secret(
            &d,
            r#"echo "$AGENTWALL_SECRETS_DIR"; while [ -e "$AGENTWALL_SECRETS_DIR/db" ]; do sleep 0.1; done; echo gone"#,
        )
        .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let dir = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (agentwall_tests::KillOnDrop(child), rx, dir)
    };

    let (_a, said, _) = agent();
    d.write_policy("reader.yaml", taken);
    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        said.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("gone"),
        "the secret's file outlived the grant"
    );

    d.write_policy("reader.yaml", granted);
    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let (_b, said, dir) = agent();
    // The secrets of an agent launched under an identity are in the directory of its cgroup.
    let cgroup_id = std::path::Path::new(&dir)
        .parent()
        .and_then(|p| p.file_name())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let o = d.cli(&["quarantine", &format!("id:{cgroup_id}")]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        said.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("gone"),
        "the secret's file outlived the quarantine"
    );

    let ended = records(&d, "secret_lease_ended");
    assert!(
        ended.iter().any(|r| r["reason"]
            .as_str()
            .unwrap()
            .starts_with("no longer granted: ")),
        "{ended:#?}"
    );
    assert!(
        ended
            .iter()
            .any(|r| r["reason"] == "the agent's cgroup is quarantined"),
        "{ended:#?}"
    );
}
