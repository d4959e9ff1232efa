//! The audit log written by a real daemon: what it records, that `audit verify` accepts it and
//! names the first bad record once it is tampered with, and that a SIGKILL loses nothing
//! acknowledged. Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{fs, process::Output};

use agentwall_tests::{TcpSink, TestDaemon, lines, serial, tcp_policy};

fn audit(d: &TestDaemon, args: &[&str]) -> Output {
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let mut all = vec!["audit", args[0], &dir, "--key", &key];
    all.extend_from_slice(&args[1..]);
    d.cli(&all)
}

fn verify(d: &TestDaemon) -> Output {
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    audit(d, &["verify", "--node-key", &node])
}

fn records(o: &Output) -> Vec<serde_json::Value> {
    lines(o)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect()
}

#[test]
fn verdicts_and_identity_events_are_recorded_and_verify() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let policy = format!(
        "{}  identity: agent/web/prod\n",
        tcp_policy("web", &[allowed.port()])
    );
    let mut d = TestDaemon::start(&[("p.yaml", &policy)]);
    let (cert, key) = d.issue("agent/web/prod", "10m");
    let out = d
        .exec_under(
            &["--cert", &cert, "--key", &key],
            None,
            &[
                &format!("tcp 127.0.0.1:{}", allowed.port()),
                &format!("tcp 127.0.0.1:{}", denied.port()),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(lines(&out), ["ok", "err EPERM"], "{out:?}");
    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/web/prod",
        "--reason",
        "audit test",
    ]);
    assert!(r.status.success(), "{r:?}");
    // A clean stop flushes and seals the log.
    assert!(d.stop().success());

    let v = verify(&d);
    assert!(v.status.success(), "{v:?}");
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("OK:"),
        "{v:?}"
    );

    let deny = records(&audit(&d, &["query", "--verdict", "deny"]));
    assert!(
        deny.iter().any(|r| r["kind"] == "verdict"
            && r["port"] == denied.port()
            && r["reason"] == "no_rule"
            && r["policy"] == "web"),
        "{deny:#?}"
    );
    let all = records(&audit(&d, &["tail", "-n", "1000"]));
    let kinds: Vec<&str> = all.iter().filter_map(|r| r["kind"].as_str()).collect();
    for k in [
        "daemon_start",
        "health",
        "enrolled",
        "revoked",
        "daemon_stop",
    ] {
        assert!(kinds.contains(&k), "no {k} record in {kinds:?}");
    }
    let enrolled = all.iter().find(|r| r["kind"] == "enrolled").unwrap();
    assert_eq!(
        enrolled["spiffe_id"],
        "spiffe://agentwall.local/agent/web/prod"
    );
    let by_identity = records(&audit(
        &d,
        &[
            "query",
            "--identity",
            "spiffe://agentwall.local/agent/web/prod",
        ],
    ));
    assert!(by_identity.len() >= 2, "{by_identity:#?}");

    // A wrong key is refused with a clear reason.
    let wrong = d.dir.join("wrong.key");
    fs::write(&wrong, "ab".repeat(32)).unwrap();
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let dir = d.audit_dir().display().to_string();
    let o = d.cli(&[
        "audit",
        "verify",
        &dir,
        "--key",
        wrong.to_str().unwrap(),
        "--node-key",
        &node,
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong key"),
        "{o:?}"
    );

    // Flip one byte in the middle of the log: verify names a record and fails.
    let seg = fs::read_dir(d.audit_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "aws"))
        .unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let mid = 64 + (bytes.len() - 64) / 2;
    bytes[mid] ^= 0x01;
    fs::write(&seg, bytes).unwrap();
    let o = verify(&d);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("verification FAILED at record"), "{err}");
}

#[test]
fn a_sigkill_loses_no_acknowledged_record_and_the_log_verifies_after_restart() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))]);
    let mut repl = d.repl("web");
    // Verdicts keep flowing while the daemon is killed.
    for _ in 0..50 {
        assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{}", allowed.port())), "ok");
    }
    let acked = d.status().audit.last_seq;
    assert!(acked > 0);
    d.kill9();
    d.launch();
    d.wait_healthy();
    for _ in 0..10 {
        assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{}", allowed.port())), "ok");
    }
    assert!(d.stop().success());
    let v = verify(&d);
    assert!(v.status.success(), "{v:?}");
    let all = records(&audit(&d, &["tail", "-n", "100000"]));
    assert!(
        all.len() as u64 >= acked,
        "{} records, {acked} were acknowledged",
        all.len()
    );
    let starts = all.iter().filter(|r| r["kind"] == "daemon_start").count();
    assert_eq!(starts, 2, "both starts are recorded");
    drop(repl);
}
