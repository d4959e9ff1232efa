//! The audit log written by a real daemon: what it records, that `audit verify` accepts it and
//! names the first bad record once it is tampered with, and that a SIGKILL loses nothing
//! acknowledged. Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{fs, process::Output};

use agentwall_tests::{TcpSink, TestDaemon, Tmpfs, lines, serial, tcp_policy};

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

/// `audit verify` with another key file than the daemon's.
fn verify_with_key(d: &TestDaemon, key: &std::path::Path) -> Output {
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let dir = d.audit_dir().display().to_string();
    let key = key.display().to_string();
    d.cli(&["audit", "verify", &dir, "--key", &key, "--node-key", &node])
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
    d.stop_cleanly();

    let v = verify(&d);
    assert!(v.status.success(), "{v:?}");
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("OK:"),
        "{v:?}"
    );
    // An auditor without the key checks the chain against the signed checkpoints.
    let integrity = |d: &TestDaemon| {
        let node = d.state_dir().join("audit-node.pub").display().to_string();
        let dir = d.audit_dir().display().to_string();
        d.cli(&[
            "audit",
            "verify",
            &dir,
            "--integrity-only",
            "--node-key",
            &node,
        ])
    };
    let v = integrity(&d);
    assert!(v.status.success(), "{v:?}");
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("integrity only: nothing decrypted"),
        "{v:?}"
    );

    let deny = records(&audit(&d, &["query", "--verdict", "deny"]));
    assert!(
        deny.iter().any(|r| r["kind"] == "verdict"
            && r["port"] == denied.port()
            && r["reason"] == "no_rule"
            && r["policy"] == "web"
            && r["spiffe_id"] == "spiffe://agentwall.local/agent/web/prod"),
        "{deny:#?}"
    );
    let all = records(&audit(&d, &["tail", "-n", "1000"]));
    let kinds: Vec<&str> = all.iter().filter_map(|r| r["kind"].as_str()).collect();
    for k in [
        "daemon_start",
        "health",
        "certificate_issued",
        "enrolled",
        "revoked",
        "daemon_stop",
    ] {
        assert!(kinds.contains(&k), "no {k} record in {kinds:?}");
    }
    // The certificate `identity issue` made while the daemon ran, copied from the issuance log.
    let issued = all
        .iter()
        .find(|r| {
            r["kind"] == "certificate_issued"
                && r["spiffe_id"] == "spiffe://agentwall.local/agent/web/prod"
        })
        .unwrap_or_else(|| panic!("the agent's certificate in {all:#?}"));
    assert_eq!(
        issued["sha256"].as_str().map(str::len),
        Some(64),
        "{issued}"
    );
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
    // The enrollment, the revocation and the agent's verdicts.
    assert!(
        by_identity.iter().any(|r| r["kind"] == "verdict"),
        "{by_identity:#?}"
    );
    assert!(by_identity.len() >= 4, "{by_identity:#?}");

    // A wrong key is refused with a clear reason.
    let wrong = d.dir.join("wrong.key");
    fs::write(&wrong, "ab".repeat(32)).unwrap();
    let o = verify_with_key(&d, &wrong);
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
    let o = integrity(&d);
    assert!(
        !o.status.success(),
        "keyless verification sees the change too: {o:?}"
    );
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
    d.stop_cleanly();
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

#[test]
fn a_hundred_sigkills_during_heavy_writes_lose_no_acknowledged_record() {
    use agentwall::audit::{
        keys::{AuditKey, Keyring, NodeKey},
        verify,
    };
    use std::io::BufRead as _;
    let _s = serial();
    const KEY: &str = "5f4dcc3b5aa765d61d8327deb882cf995f4dcc3b5aa765d61d8327deb882cf99";
    let dir = std::env::temp_dir().join(format!("awt-crash-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("aw-auditload");
    let mut acked = 0u64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..100 {
        let mut child = std::process::Command::new(&bin)
            .arg(&dir)
            .arg(KEY)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        // Kill after a pseudo-random number of acknowledged batches (1 to 8), mid-write.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let batches = 1 + seed % 8;
        let mut line = String::new();
        for _ in 0..batches {
            line.clear();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "round {round}: writer died"
            );
            acked = acked.max(line.trim().parse().unwrap());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // What was acknowledged is there, every round; the torn tail is cut at the next open.
        let keys = Keyring::new(vec![AuditKey::from_hex(KEY, "test").unwrap()]);
        let (mut w, _) = agentwall::audit::store::Writer::open(
            &dir,
            AuditKey::from_hex(KEY, "test").unwrap(),
            Default::default(),
        )
        .unwrap();
        assert!(
            w.next_seq() > acked,
            "round {round}: record {acked} was acknowledged, the log ends at {}",
            w.next_seq() - 1
        );
        w.append(&[b"{\"kind\":\"restart\"}".to_vec()]).unwrap();
        drop(w);
        let node = NodeKey::load_or_create(&dir.with_extension("node")).unwrap();
        let s = verify::verify(&dir, Some(&keys), &node.public_hex(), &[])
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        acked = s.last_seq;
    }
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_file(dir.with_extension("node"));
}

#[test]
fn durable_records_are_shipped_as_json_lines_on_stdout() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some("audit:\n  stdout: true\n"),
    );
    let out = d.exec("web", None, &[&format!("tcp 127.0.0.1:{}", denied.port())]);
    assert_eq!(lines(&out), ["err EPERM"]);
    let shipped = agentwall_tests::wait_for(
        std::time::Duration::from_secs(5),
        "the denial on the daemon's stdout",
        || {
            let text = fs::read_to_string(d.dir.join("stdout.jsonl")).ok()?;
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["record"]["kind"] == "verdict" && v["record"]["port"] == denied.port())
        },
    );
    assert!(shipped["seq"].as_u64().unwrap() > 0, "{shipped}");
    assert_eq!(shipped["record"]["verdict"], "deny");
    let sink = d.status().audit.sinks["stdout"].clone();
    assert!(sink.sent >= 1 && sink.dropped == 0, "{sink:?}");
}

/// A 512 KiB file system for an audit log, in a test directory of its own: the file system, its
/// directory, and the log directory on it.
fn small_audit_fs() -> (Tmpfs, std::path::PathBuf, std::path::PathBuf) {
    audit_fs_of("512k")
}

/// [`small_audit_fs`] of another size.
fn audit_fs_of(size: &str) -> (Tmpfs, std::path::PathBuf, std::path::PathBuf) {
    let d0 = TestDaemon::prepare(&[], None);
    let fs_dir = d0.dir.join("auditfs");
    let tmpfs = Tmpfs::new(fs_dir.clone(), size);
    let log_dir = fs_dir.join("log");
    drop(d0);
    (tmpfs, fs_dir, log_dir)
}

/// Fills the file system of `dir` with one file, which it returns.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let filler = dir.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    filler
}

#[test]
fn a_full_disk_raises_the_alarm_applies_the_down_rule_and_loses_nothing() {
    use std::time::Duration;
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let (tmpfs, fs_dir, log_dir) = small_audit_fs();
    let metrics = format!("127.0.0.1:{}", agentwall_tests::free_port());
    let config = format!(
        "audit:\n  dir: {}\n  when_down: deny\n  checkpoint_every: 1s\nmetrics:\n  listen: {metrics}\n",
        log_dir.display()
    );
    let scrape = || {
        let (code, text) = agentwall_tests::http(&metrics, "GET", "/metrics");
        assert_eq!(code, 200, "{text}");
        text
    };
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    let mut repl = d.repl("web");
    let to = format!("tcp 127.0.0.1:{}", allowed.port());
    assert_eq!(repl.cmd(&to), "ok");
    // Fill the file system.
    let filler = fill(&fs_dir);
    // Verdicts keep coming; their commit fails; the alarm rises and the rule applies.
    agentwall_tests::wait_for(
        Duration::from_secs(10),
        "the audit alarm and the hold",
        || {
            let r = repl.cmd(&to);
            (d.status().audit.failing && r == "err EPERM").then_some(())
        },
    );
    assert!(d.status().audit.write_errors > 0);
    // The alarm is a metric too.
    let m = scrape();
    assert_eq!(
        agentwall_tests::metric(&m, "agentwall_audit_failing"),
        Some(1.0),
        "{m}"
    );
    assert!(agentwall_tests::metric(&m, "agentwall_audit_write_errors_total") > Some(0.0));
    // Space again: the waiting records are written, the hold is lifted.
    fs::remove_file(&filler).unwrap();
    agentwall_tests::wait_for(Duration::from_secs(15), "the log to recover", || {
        (!d.status().audit.failing && repl.cmd(&to) == "ok").then_some(())
    });
    assert_eq!(
        agentwall_tests::metric(&scrape(), "agentwall_audit_failing"),
        Some(0.0)
    );
    drop(repl);
    let mut d = d;
    d.stop_cleanly();
    let key = d.audit_key().display().to_string();
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let v = d.cli(&[
        "audit",
        "verify",
        log_dir.to_str().unwrap(),
        "--key",
        &key,
        "--node-key",
        &node,
    ]);
    assert!(v.status.success(), "{v:?}");
    let t = d.cli(&[
        "audit",
        "query",
        log_dir.to_str().unwrap(),
        "--key",
        &key,
        "--verdict",
        "deny",
    ]);
    let held: Vec<serde_json::Value> = records(&t)
        .into_iter()
        .filter(|r| r["reason"] == "audit_down")
        .collect();
    assert!(
        !held.is_empty(),
        "the denials of the hold are in the log once it is back"
    );
    drop(d);
    drop(tmpfs);
}

#[test]
fn events_the_kernel_could_not_deliver_become_gap_records_that_add_up() {
    use std::time::Duration;
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    // The smallest ring (about 39 events), and a daemon that stalls for half a second while
    // an agent keeps connecting (a connect a millisecond): its verdicts overflow the ring.
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[sink.port()]))],
        Some("limits:\n  event_ring_bytes: 4096\n"),
    );
    let watcher = d
        .exec_under(
            &["--policy", "web"],
            None,
            &[&format!("watch 127.0.0.1:{} 1500", sink.port())],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    agentwall_tests::wait_for(Duration::from_secs(5), "the agent's first connects", || {
        (sink.accepted() > 0).then_some(())
    });
    let daemon = nix::unistd::Pid::from_raw(d.pid().unwrap() as i32);
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = watcher.wait_with_output().unwrap();
    let line = lines(&out).join(" ");
    assert!(line.contains("eperm=0"), "{out:?}");
    let dropped = || {
        d.status()
            .kernel_counters
            .totals
            .get("events_dropped")
            .copied()
            .unwrap_or(0)
    };
    agentwall_tests::wait_for(
        Duration::from_secs(5),
        "the kernel to count dropped events",
        || (dropped() > 0).then_some(()),
    );
    // The watcher reports each second; give it time to see the final count.
    std::thread::sleep(Duration::from_millis(2500));
    let total = dropped();
    d.stop_cleanly();
    let gaps = records(&audit(&d, &["tail", "-n", "1000000"]));
    let lost: u64 = gaps
        .iter()
        .filter(|r| r["kind"] == "events_lost")
        .map(|r| r["lost"].as_u64().unwrap())
        .sum();
    assert_eq!(
        lost, total,
        "gap records account for every event the kernel dropped"
    );
}

#[test]
fn repeated_denials_raise_a_behavioral_alert_in_the_log() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some(concat!(
            "detect:\n  denials: 5\n  denial_window: 1m\n",
            // The alerts counted here are the detector's: not one of a host disk that happens
            // to be over 80% full.
            "audit:\n  space_warn_percent: 1\n"
        )),
    );
    let to = format!("tcp 127.0.0.1:{}", denied.port());
    let out = d.exec("web", None, &[&to, &to, &to, &to, &to, &to]);
    assert_eq!(lines(&out), ["err EPERM"; 6]);
    agentwall_tests::wait_for(std::time::Duration::from_secs(5), "the alert", || {
        (d.status().audit.alerts >= 1).then_some(())
    });
    d.stop_cleanly();
    let alerts = records(&audit(&d, &["tail", "-n", "100000"]));
    let alert = alerts
        .iter()
        .find(|r| r["kind"] == "alert")
        .expect("an alert record");
    assert_eq!(alert["alert"], "repeated_denials");
    assert_eq!(alert["identity"], "web");
}

#[test]
fn the_audit_key_rotates_while_the_daemon_runs_and_both_keys_read_the_log() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    let to = format!("tcp 127.0.0.1:{}", denied.port());
    assert_eq!(lines(&d.exec("web", None, &[&to])), ["err EPERM"]);
    let old_key = fs::read_to_string(d.audit_key()).unwrap();
    let segments = || {
        fs::read_dir(d.audit_dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "aws")
            })
            .count()
    };
    let before = segments();
    let r = d.cli(&["audit", "rotate-key"]);
    assert!(r.status.success(), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("retired"),
        "{r:?}"
    );
    assert_eq!(segments(), before + 1, "the new key starts a segment");
    // The key file: the new key first, the old one kept below it, still 0600.
    let text = fs::read_to_string(d.audit_key()).unwrap();
    let keys: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(keys.len(), 2, "{text}");
    assert_ne!(keys[0], old_key.trim());
    assert_eq!(keys[1], old_key.trim());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(d.audit_key()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(lines(&d.exec("web", None, &[&to])), ["err EPERM"]);
    d.stop_cleanly();

    // The key file reads the whole log; it verifies across the key change.
    let v = verify(&d);
    assert!(v.status.success(), "{v:?}");
    let denials = records(&audit(&d, &["query", "--verdict", "deny"]));
    assert_eq!(
        denials
            .iter()
            .filter(|r| r["port"] == denied.port())
            .count(),
        2,
        "{denials:#?}"
    );
    let rotation = records(&audit(&d, &["query", "--kind", "audit_key_rotation"]));
    assert_eq!(rotation.len(), 1, "{rotation:#?}");
    assert_ne!(rotation[0]["from_key"], rotation[0]["to_key"]);
    // With the new key alone, the older segment cannot be read: verify says which key it needs.
    let only_new = d.dir.join("new-only.key");
    fs::write(&only_new, format!("{}\n", keys[0])).unwrap();
    let o = verify_with_key(&d, &only_new);
    assert!(!o.status.success(), "{o:?}");
    let from = rotation[0]["from_key"].as_str().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(from),
        "names the missing key {from}: {o:?}"
    );
}

#[test]
fn baselines_and_copied_issuance_records_survive_restarts() {
    use std::time::Duration;
    let _s = serial();
    let (known, new) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[known.port(), new.port()]))],
        Some(concat!(
            "detect:\n  learn_for: 2s\n  off_hours: false\n",
            // The alerts counted here are the detector's: not one of a host disk that happens
            // to be over 80% full.
            "audit:\n  space_warn_percent: 1\n"
        )),
    );
    let to_known = format!("tcp 127.0.0.1:{}", known.port());
    assert_eq!(lines(&d.exec("web", None, &[&to_known])), ["ok"]);
    // A certificate issued now is copied into the audit log once, not again at each restart.
    let _ = d.issue("agent/once/test", "10m");
    // Past the learning period, then a clean stop saves the baselines.
    std::thread::sleep(Duration::from_millis(2500));
    d.stop_cleanly();
    let saved = d.state_dir().join("baselines.json");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    d.launch();
    d.wait_healthy();
    // Restored, not learning again: the known destination is quiet, a new one alerts at once.
    let to_new = format!("tcp 127.0.0.1:{}", new.port());
    assert_eq!(
        lines(&d.exec("web", None, &[&to_known, &to_new])),
        ["ok", "ok"]
    );
    agentwall_tests::wait_for(Duration::from_secs(5), "the alert", || {
        (d.status().audit.alerts >= 1).then_some(())
    });
    d.stop_cleanly();
    let alerts = records(&audit(&d, &["query", "--kind", "alert"]));
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["alert"], "new_destination");
    assert_eq!(alerts[0]["port"], new.port());

    // An unreadable baselines file is set aside, not lost, and learning starts again.
    fs::write(&saved, "not json").unwrap();
    d.launch();
    d.wait_healthy();
    let status = d.status();
    assert_eq!(status.daemon_errors.get("baselines_unreadable"), Some(&1));
    d.stop_cleanly();
    let issued = records(&audit(&d, &["query", "--kind", "certificate_issued"]));
    assert_eq!(
        issued
            .iter()
            .filter(|r| r["spiffe_id"] == "spiffe://agentwall.local/agent/once/test")
            .count(),
        1,
        "{issued:#?}"
    );
    let aside: Vec<_> = fs::read_dir(d.state_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("baselines.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read_to_string(d.state_dir().join(&aside[0])).unwrap(),
        "not json"
    );
}

/// SIGTERM while the audit file system is full: the daemon is gone within seconds rather than
/// waiting for space, notes what it could not write, and the next start records that as a
/// gap; the log verifies.
#[test]
fn sigterm_with_a_full_audit_file_system_stops_the_daemon_promptly() {
    use std::time::Duration;
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let (tmpfs, fs_dir, log_dir) = small_audit_fs();
    let config = format!(
        "audit:\n  dir: {}\n  checkpoint_every: 1s\n",
        log_dir.display()
    );
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    let mut repl = d.repl("web");
    let to = format!("tcp 127.0.0.1:{}", allowed.port());
    let filler = fill(&fs_dir);
    agentwall_tests::wait_for(Duration::from_secs(10), "the audit alarm", || {
        repl.cmd(&to);
        d.status().audit.failing.then_some(())
    });
    drop(repl);
    let pid = d.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Gone (a zombie waiting for this test to reap it) well before a service manager's
    // stop timeout.
    agentwall_tests::wait_for(Duration::from_secs(15), "the daemon to stop", || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
        matches!(state, None | Some('Z')).then_some(())
    });
    d.stop_cleanly();
    assert!(
        d.log_text()
            .contains("the audit log could not be made durable"),
        "the stop says why it did not wait"
    );
    // Space again: the next start records what the stop could not write.
    fs::remove_file(&filler).unwrap();
    d.launch();
    d.wait_healthy();
    d.stop_cleanly();
    let key = d.audit_key().display().to_string();
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let log = log_dir.to_str().unwrap();
    let v = d.cli(&["audit", "verify", log, "--key", &key, "--node-key", &node]);
    assert!(v.status.success(), "{v:?}");
    let q = d.cli(&[
        "audit",
        "query",
        log,
        "--key",
        &key,
        "--kind",
        "audit_unwritten",
    ]);
    let gap = records(&q);
    assert_eq!(gap.len(), 1, "{q:?}");
    assert!(gap[0]["records"].as_u64().unwrap() > 0, "{gap:?}");
    drop(d);
    drop(tmpfs);
}

/// A flood (a netprobe command) by an agent of policy `web`, in the background.
struct Flood(std::process::Child);

impl Flood {
    /// Starts `cmd` and waits until the kernel counter `counter` is past the flood's burst.
    fn start(d: &TestDaemon, cmd: &str, counter: &str) -> Self {
        Self::start_under(d, &["--policy", "web"], cmd, counter)
    }

    /// [`Flood::start`] under `agentwall exec UNDER...`.
    fn start_under(d: &TestDaemon, under: &[&str], cmd: &str, counter: &str) -> Self {
        let child = d
            .exec_under(under, None, &[cmd])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        agentwall_tests::wait_for(
            std::time::Duration::from_secs(20),
            "the flood past its burst",
            || (d.counter(counter) > 5_000).then_some(()),
        );
        Self(child)
    }

    /// Waits for its end, having checked it still ran after `what`; the number of its
    /// attempts, every one refused.
    fn denied_after(mut self, what: &str) -> u64 {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "the flood went on while {what} ran"
        );
        let out = self.0.wait_with_output().unwrap();
        let report = lines(&out).join(" ");
        agentwall_tests::all_denied(&report)
            .unwrap_or_else(|| panic!("every attempt denied: {report}"))
    }
}

/// Issue 22: one agent floods denied sends while another, of the same identity, makes a few
/// denied connects. Every verdict of the quiet one is recorded; the flood is recorded up to
/// its budget and summarized past it, every send accounted for, with an `event_flood` alert;
/// the log verifies.
#[test]
fn a_flooding_agent_is_summarized_and_a_quiet_one_loses_no_record() {
    use std::time::Duration;
    let _s = serial();
    let quiet_target = TcpSink::new("127.0.0.1:0");
    let flood_target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = flood_target.local_addr().unwrap().port();
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some("events:\n  summary_every: 1s\n"),
    );
    let flood = Flood::start(
        &d,
        &format!("udp-flood-for 127.0.0.1:{udp_port} 4000"),
        "denied",
    );
    let to = format!("tcp 127.0.0.1:{}", quiet_target.port());
    let quiet = d.exec("web", None, &[to.as_str(); 50]);
    assert_eq!(lines(&quiet), ["err EPERM"; 50]);
    let n = flood.denied_after("the quiet agent");
    agentwall_tests::wait_for(Duration::from_secs(10), "the flood alert", || {
        (d.status().audit.event_floods >= 1).then_some(())
    });
    let status = d.status();
    assert!(status.audit.events_suppressed > 0, "{:?}", status.audit);
    d.stop_cleanly();

    let v = verify(&d);
    assert!(v.status.success(), "the log with summaries verifies: {v:?}");
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let quiet_recorded = all
        .iter()
        .filter(|r| r["kind"] == "verdict" && r["port"] == quiet_target.port())
        .count();
    assert_eq!(quiet_recorded, 50, "every verdict of the quiet agent");
    let flood_recorded = all
        .iter()
        .filter(|r| r["kind"] == "verdict" && r["port"] == udp_port)
        .count() as u64;
    let (mut suppressed, mut summarized, mut lost) = (0, 0, 0);
    for r in &all {
        if r["kind"] == "verdict_summary" {
            suppressed += r["suppressed"].as_u64().unwrap();
            summarized += r["flows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["port"] == udp_port)
                .map(|f| f["count"].as_u64().unwrap())
                .sum::<u64>();
            assert_eq!(r["policy"], "web", "{r}");
        } else if r["kind"] == "events_lost" {
            lost += r["lost"].as_u64().unwrap();
        }
    }
    assert_eq!(lost, 0, "no verdict lost");
    assert_eq!(
        flood_recorded + suppressed,
        n,
        "recorded {flood_recorded} + summarized {suppressed}"
    );
    // The flows break the totals down; a verdict counted as its flow was read is in the
    // totals only (one at a time per CPU, at most a handful per window).
    assert!(
        summarized <= suppressed && summarized + 1000 >= suppressed,
        "flows {summarized} of {suppressed}"
    );
    // The default budget: a burst of 2000, then 200 a second.
    assert!(
        (2_000..=2_000 + 200 * 60).contains(&flood_recorded),
        "the flood was recorded within its budget: {flood_recorded}"
    );
    let alert = all
        .iter()
        .find(|r| r["kind"] == "alert" && r["alert"] == "event_flood")
        .unwrap_or_else(|| panic!("an event_flood alert"));
    assert_eq!(alert["identity"], "web");
    assert!(alert["suppressed"].as_u64().unwrap() > 0, "{alert}");
}

/// Issue 22, the attacker's use of budgets: flood denials to have what it reached meanwhile
/// summarized (a count among thousands) rather than recorded. Allowed verdicts have budgets
/// of their own, so the connect it made in the middle of its flood is a record of its own,
/// with its process.
#[test]
fn a_denial_flood_cannot_hide_what_the_agent_reached() {
    let _s = serial();
    let reached = TcpSink::new("127.0.0.1:0");
    let flood_target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = flood_target.local_addr().unwrap().port();
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[reached.port()]))],
        Some("events:\n  summary_every: 1s\n"),
    );
    let out = d.exec(
        "web",
        None,
        &[&format!(
            "udp-flood-around 127.0.0.1:{udp_port} 2000 127.0.0.1:{}",
            reached.port()
        )],
    );
    let report = lines(&out).join(" ");
    assert!(report.starts_with("tcp=ok eperm="), "{report}");
    assert!(report.ends_with(" other=0"), "{report}");
    d.stop_cleanly();
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let recorded: Vec<_> = all
        .iter()
        .filter(|r| r["kind"] == "verdict" && r["port"] == reached.port())
        .collect();
    assert_eq!(recorded.len(), 1, "the connect has a record of its own");
    assert_eq!(recorded[0]["verdict"], "allow");
    assert_eq!(recorded[0]["comm"], "aw-netprobe");
    assert!(
        all.iter().any(|r| r["kind"] == "verdict_summary"),
        "the flood itself was summarized"
    );
}

/// Issue 22, audit space: on a 1 MiB file system, retention keeps the log under half of it,
/// removing the oldest segments under a signed anchor once their removal is recorded; a
/// filler past the free-space watermark raises an alert; the log verifies and says where
/// the kept history starts, and the archive put back makes it whole again.
#[test]
fn retention_keeps_a_small_audit_file_system_alive_and_the_log_verifiable() {
    use std::time::Duration;
    let _s = serial();
    let (tmpfs, fs_dir, log_dir) = audit_fs_of("1m");
    let archive = fs_dir.with_extension("archive");
    let config = format!(
        "audit:\n  dir: {}\n  rotate_bytes: 32768\n  archive_dir: {}\n  space_warn_percent: 20\n",
        log_dir.display(),
        archive.display()
    );
    let flood_target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = flood_target.local_addr().unwrap().port();
    let mut d =
        TestDaemon::start_with_config(&[("p.yaml", &tcp_policy("web", &[1]))], Some(&config));
    // Denials at the default budget (a burst of 2000 records, then 200 a second): the log
    // passes half of the file system within seconds.
    let mut flooder = d
        .exec_under(
            &["--policy", "web"],
            None,
            &[&format!("udp-flood-for 127.0.0.1:{udp_port} 30000")],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = agentwall_tests::wait_for(Duration::from_secs(40), "retention", || {
        let s = d.status().audit;
        (s.segments_removed > 0).then_some(s)
    });
    assert!(!status.failing, "{status:?}");
    assert_eq!(status.retention_errors, 0);
    let used: u64 = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        used < 700 << 10,
        "the log stays near half of the file system: {used}"
    );
    // Space taken by something else: below the watermark, an alert well before it is full.
    let free = status.free_bytes;
    let filler = fs_dir.join("filler");
    fs::write(
        &filler,
        vec![0u8; (free - status.total_bytes / 10) as usize],
    )
    .unwrap();
    let status = agentwall_tests::wait_for(Duration::from_secs(10), "the space alert", || {
        let s = d.status().audit;
        s.space_low.then_some(s)
    });
    assert!(
        !status.failing,
        "the alert comes before the log fails: {status:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(flooder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = flooder.wait();
    fs::remove_file(&filler).unwrap();
    d.stop_cleanly();

    let key = d.audit_key().display().to_string();
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let log = log_dir.to_str().unwrap();
    let v = d.cli(&["audit", "verify", log, "--key", &key, "--node-key", &node]);
    assert!(v.status.success(), "{v:?}");
    let said = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(said.contains("the kept history starts at record"), "{said}");
    let q = d.cli(&[
        "audit",
        "query",
        log,
        "--key",
        &key,
        "--kind",
        "audit_retention",
    ]);
    let removals = records(&q);
    assert!(!removals.is_empty(), "each removal is recorded: {q:?}");
    let q = d.cli(&["audit", "query", log, "--key", &key, "--kind", "alert"]);
    assert!(
        records(&q).iter().any(|r| r["alert"] == "audit_space_low"),
        "{q:?}"
    );
    // The archive and the kept segments together: the whole history from record 1.
    for e in fs::read_dir(&log_dir).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), archive.join(e.file_name())).unwrap();
    }
    let whole = archive.to_str().unwrap();
    let v = d.cli(&["audit", "verify", whole, "--key", &key, "--node-key", &node]);
    assert!(v.status.success(), "{v:?}");
    let said = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(said.contains("(1 to "), "{said}");
    fs::remove_dir_all(&archive).unwrap();
    drop(d);
    drop(tmpfs);
}

/// The attacker's use of the shared budget of unbound cgroups: verdicts judged without a
/// policy slot (here raw socket creations) once went to that one bucket, so a bound agent
/// flooding them had every other agent's raw-socket denials summarized. They are its own
/// cgroup's now: the victim's are recorded one by one.
#[test]
fn a_flood_of_slotless_denials_is_charged_to_its_own_cgroup() {
    let _s = serial();
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some("events:\n  summary_every: 1s\n"),
    );
    // Root's capabilities kept: the raw sockets reach the kernel program's refusal.
    let flood = Flood::start_under(
        &d,
        &["--policy", "web", "--keep-privileges"],
        "raw-flood-for 4000",
        "raw_socket_denied",
    );
    let victim = d.exec_privileged("web", &["pid", "raw4", "raw4", "raw4", "raw4", "raw4"]);
    let out = lines(&victim);
    assert_eq!(out[1..], ["err EPERM"; 5]);
    let victim_pid: u64 = out[0].parse().unwrap();
    flood.denied_after("the victim");
    d.stop_cleanly();
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let recorded = all
        .iter()
        .filter(|r| {
            r["kind"] == "verdict" && r["reason"] == "raw_socket" && r["tgid"] == victim_pid
        })
        .count();
    assert_eq!(recorded, 5, "each of the victim's denials is a record");
    let summary = all
        .iter()
        .find(|r| r["kind"] == "verdict_summary")
        .expect("the flood was summarized");
    assert!(
        summary["cgroup_id"].is_u64(),
        "charged to a cgroup: {summary}"
    );
}

/// The attacker's use of summaries: spend its budget of allowed records, make the connect it
/// wants hidden, then spray more distinct denied destinations than the kernel's table of
/// summaries holds, so that the connect's entry is evicted and left as a bare count. Allowed
/// flows have a table of their own that nothing evicts: the connect is in a summary, with
/// its destination.
#[test]
fn a_spray_of_denials_cannot_evict_an_allowed_flow_from_its_summary() {
    let _s = serial();
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let hidden = TcpSink::new("127.0.0.1:0");
    let policy = format!(
        "{}    - to: 127.0.0.1\n      protocol: udp\n      ports: [{busy_port}]\n",
        tcp_policy("web", &[hidden.port()])
    );
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &policy)],
        Some("events:\n  summary_every: 30s\n"),
    );
    let out = d.exec(
        "web",
        None,
        &[
            &format!("udp-flood-for 127.0.0.1:{busy_port} 500"),
            &format!("tcp 127.0.0.1:{}", hidden.port()),
            "udp-spray 127.0.0.2 60000",
        ],
    );
    let said = lines(&out);
    // Allowed sends: none refused.
    assert!(said[0].starts_with("eperm=0 other="), "{said:?}");
    assert_eq!(said[1], "ok");
    // 127.0.0.2 is loopback, as 127.0.0.1: the one port the policy allows goes through.
    assert!(
        ["eperm=60000 other=0", "eperm=59999 other=1"].contains(&said[2].as_str()),
        "{said:?}"
    );
    d.stop_cleanly();
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let recorded = all
        .iter()
        .any(|r| r["kind"] == "verdict" && r["port"] == hidden.port());
    let summarized = all
        .iter()
        .filter(|r| r["kind"] == "verdict_summary")
        .flat_map(|r| r["flows"].as_array().unwrap().iter())
        .any(|f| f["port"] == hidden.port() && f["verdict"] == "allow" && f["count"] == 1);
    assert!(
        recorded || summarized,
        "the hidden connect is in the log with its destination"
    );
}

/// A daemon killed in the middle of a window has not reported the verdicts its budgets held
/// back; the budget maps are pinned, and the next daemon reports them: every verdict of a
/// flood is accounted for across the crash.
#[test]
fn verdicts_held_back_when_the_daemon_is_killed_are_reported_by_the_next() {
    use std::time::Duration;
    let _s = serial();
    let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = target.local_addr().unwrap().port();
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some("events:\n  summary_every: 20s\n"),
    );
    let n: u64 = 200_000;
    let out = d.exec(
        "web",
        None,
        &[&format!("udp-flood 127.0.0.1:{udp_port} {n}")],
    );
    assert_eq!(lines(&out), [format!("eperm={n} other=0")]);
    // The records of the burst are durable; the rest is only counted in the kernel. A record
    // the daemon has read but not yet made durable dies with it (only acknowledged records
    // survive a SIGKILL), so wait until the count has stopped moving.
    let mut last = 0;
    let mut still = 0;
    agentwall_tests::wait_for(Duration::from_secs(20), "the burst's records", || {
        std::thread::sleep(Duration::from_millis(200));
        let now = d.status().audit.committed;
        still = if now == last { still + 1 } else { 0 };
        last = now;
        (now >= 2_000 && still >= 3).then_some(())
    });
    assert_eq!(d.status().audit.event_summaries, 0, "no window ended yet");
    d.kill9();
    d.launch();
    d.wait_healthy();
    d.stop_cleanly();

    let v = verify(&d);
    assert!(v.status.success(), "{v:?}");
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let (mut recorded, mut suppressed, mut lost) = (0, 0, 0);
    for r in &all {
        if r["kind"] == "verdict" && r["port"] == udp_port {
            recorded += 1;
        } else if r["kind"] == "verdict_summary" {
            suppressed += r["suppressed"].as_u64().unwrap();
        } else if r["kind"] == "events_lost" {
            lost += r["lost"].as_u64().unwrap();
        }
    }
    assert_eq!(
        recorded + suppressed + lost,
        n,
        "recorded {recorded} + summarized {suppressed} + lost {lost}"
    );
}

/// The identity budget is shared by the cgroups of one policy: a busy one that spent it had
/// a quiet sibling's verdicts summarized, and the flood alert blamed the sibling. A cgroup
/// that used at most half its own burst is not charged to the identity: the sibling's
/// verdicts are recorded one by one.
#[test]
fn a_busy_agent_cannot_spend_a_quiet_siblings_share_of_their_identity() {
    let _s = serial();
    let quiet_target = TcpSink::new("127.0.0.1:0");
    let flood_target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = flood_target.local_addr().unwrap().port();
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some("events:\n  identity_rate: 100\n  identity_burst: 100\n  summary_every: 1s\n"),
    );
    let flood = Flood::start(
        &d,
        &format!("udp-flood-for 127.0.0.1:{udp_port} 4000"),
        "denied",
    );
    let to = format!("tcp 127.0.0.1:{}", quiet_target.port());
    let quiet = d.exec("web", None, &[to.as_str(); 5]);
    assert_eq!(lines(&quiet), ["err EPERM"; 5]);
    flood.denied_after("the sibling");
    d.stop_cleanly();
    let all = records(&audit(&d, &["tail", "-n", "10000000"]));
    let recorded = all
        .iter()
        .filter(|r| r["kind"] == "verdict" && r["port"] == quiet_target.port())
        .count();
    assert_eq!(recorded, 5, "every verdict of the quiet sibling");
    let blamed: Vec<_> = all
        .iter()
        .filter(|r| r["kind"] == "verdict_summary")
        .flat_map(|r| r["flows"].as_array().unwrap().iter())
        .filter(|f| f["port"] == quiet_target.port())
        .collect();
    assert!(blamed.is_empty(), "{blamed:?}");
}

/// A log written by the daemon before its records were one typed enum (commit 1ca4580, by a
/// run of its own: start, the probe, an exec under a policy and one under a certificate, a
/// reload and a rejected one, a revocation, a stop) still verifies, and reads record for
/// record as it did then.
#[test]
fn a_log_written_by_an_earlier_daemon_verifies_and_reads_the_same() {
    use std::os::unix::fs::PermissionsExt as _;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/audit-log-v1");
    // A copy: git keeps no file modes, and the key must be private.
    let dir = std::env::temp_dir().join(format!("aw-audit-v1-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("audit")).unwrap();
    fs::set_permissions(dir.join("audit"), fs::Permissions::from_mode(0o700)).unwrap();
    for e in fs::read_dir(fixture.join("audit")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.join("audit").join(e.file_name())).unwrap();
    }
    let key = dir.join("audit.key");
    fs::copy(fixture.join("audit.key"), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(agentwall_tests::agentwall_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let (log, key) = (dir.join("audit"), key.display().to_string());
    let log = log.display().to_string();
    let node = fixture.join("node.pub").display().to_string();
    let out = run(&["audit", "verify", &log, "--key", &key, "--node-key", &node]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("OK: 15 records"),
        "{out:?}"
    );
    let out = run(&["audit", "query", &log, "--key", &key]);
    assert!(out.status.success(), "{out:?}");
    let expected = fs::read_to_string(fixture.join("records.jsonl")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    fs::remove_dir_all(&dir).unwrap();
}
