//! The SPIFFE Workload API with a real third-party client: py-spiffe (the `spiffe` package
//! of PyPI) inside a cgroup of `agentwall exec --identity`, running as an unprivileged user,
//! gets its X509-SVID (key made by the daemon, never on disk), bundles and JWT-SVIDs, sees
//! rotations arrive on its stream and the stream end on revocation; callers without an
//! identity, or without the security header, are refused as the specification says.
//! Real daemon, real kernel programs, real cgroups. Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use agentwall_tests::{PartnerCa, TcpSink, TestDaemon, fixture, lines, py_spiffe, serial};
use serde_json::Value;

const READER: &str = "spiffe://agentwall.local/agent/reader/prod";

fn reader_policy(port: u16) -> String {
    format!(
        "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    )
}

/// `agentwall exec UNDER... --user nobody -- python client.py ARGS...`.
fn client(d: &TestDaemon, under: &[&str], args: &[&str]) -> Command {
    let script = d.world_copy(&fixture("workload/client.py"));
    let mut c = Command::new(d.world_copy(&agentwall_tests::agentwall_bin()));
    c.arg("exec")
        .arg("--socket")
        .arg(&d.socket)
        .args(under)
        .args(["--user", "nobody", "--"])
        .arg(py_spiffe())
        .arg(script)
        .args(args);
    c
}

/// The client streaming X509 contexts for `seconds` in an agent of the reader identity,
/// and its JSON lines as they come.
fn streaming(d: &TestDaemon, args: &[&str]) -> (std::process::Child, mpsc::Receiver<Value>) {
    let mut child = client(
        d,
        &["--identity", "agent/reader/prod"],
        &[&["stream"], args].concat(),
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    (child, rx)
}

/// The client's JSON lines by step.
fn steps(out: &Output) -> BTreeMap<String, Value> {
    lines(out)
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["step"].as_str().unwrap_or_default().to_string(), v))
        .collect()
}

/// The audit records of `kind` (without their sequence numbers), read after the daemon
/// stopped.
fn audit_records(d: &TestDaemon, kind: &str) -> Vec<Value> {
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let q = d.cli(&["audit", "query", &dir, "--key", &key, "--kind", kind]);
    assert!(q.status.success(), "{q:?}");
    lines(&q)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["record"].clone())
        .collect()
}

#[test]
fn a_py_spiffe_agent_gets_its_identity_bundles_and_tokens() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let partner = PartnerCa::new("partner.org");
    let config = partner.trusted_config();
    let mut d =
        TestDaemon::start_with_config(&[("p.yaml", &reader_policy(sink.port()))], Some(&config));
    let out = client(&d, &["--identity", "agent/reader/prod"], &["fetch"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = steps(&out);
    assert_eq!(s["x509"]["spiffe_id"], READER, "{out:?}");
    assert_eq!(s["x509"]["key_matches"], true, "the key is the leaf's");
    assert_eq!(s["x509"]["chain"], 1);
    assert_eq!(
        s["context"]["domains"],
        serde_json::json!(["agentwall.local", "partner.org"]),
        "the local bundle and the federated one"
    );
    assert_eq!(s["context"]["signed_by_bundle"], true);
    assert_eq!(
        s["bundles"]["domains"],
        serde_json::json!(["agentwall.local", "partner.org"])
    );
    assert_eq!(s["jwt"]["sub"], READER);
    assert_eq!(s["jwt"]["aud"], serde_json::json!(["api", "db"]));
    assert_eq!(s["validate"]["sub"], READER);
    assert_eq!(s["claims"]["sub"], READER);
    for claim in ["aud", "exp", "iat", "sub"] {
        assert!(
            s["claims"]["keys"]
                .as_array()
                .unwrap()
                .contains(&Value::from(claim)),
            "claim {claim}: {out:?}"
        );
    }
    assert_eq!(
        s["jwt_bundle"]["sub"], READER,
        "the token checks with the JWT bundle"
    );
    assert_eq!(s["wrong_audience"]["error"], "INVALID_ARGUMENT");
    assert_eq!(s["tampered"]["error"], "INVALID_ARGUMENT");
    assert_eq!(s["other_subject"]["error"], "PERMISSION_DENIED");

    // The identity's policy holds in the kernel from the command's first instruction.
    let probe = d
        .exec_under(
            &["--identity", "agent/reader/prod"],
            None,
            &[
                &format!("tcp 127.0.0.1:{}", sink.port()),
                // A port the policy does not grant.
                "tcp 127.0.0.1:1",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(lines(&probe), ["ok", "err EPERM"], "{probe:?}");

    // The key was made in the daemon: nothing of it is on disk, in the state directory or
    // in the agents' directory.
    let serial = s["x509"]["serial"].as_str().unwrap().to_string();
    for dir in [d.state_dir(), d.dir.join("agents")] {
        let found = Command::new("grep")
            .args(["-rl", "PRIVATE KEY"])
            .arg(&dir)
            .output()
            .unwrap();
        let files = String::from_utf8_lossy(&found.stdout).to_string();
        assert!(
            files.lines().all(|f| f.contains("/ca/")),
            "only the CA's own keys are on disk: {files}"
        );
    }
    d.stop_cleanly();
    let delivered = audit_records(&d, "svid_delivered");
    assert!(
        delivered
            .iter()
            // Python prints the serial without its leading zeros.
            .any(|r| r["serial"].as_str().unwrap().trim_start_matches('0')
                == serial.trim_start_matches('0')
                && r["spiffe_id"] == READER),
        "{delivered:?}"
    );
    let launched = audit_records(&d, "workload_launched");
    assert_eq!(launched.len(), 2, "{launched:?}");
}

#[test]
fn rotation_reaches_the_stream_and_revocation_ends_it() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    // Short certificates: renewed every few seconds.
    let config = "identity:\n  svid_lifetime: 1m\n  renew_before: 55s\n";
    let d = TestDaemon::start_with_config(&[("p.yaml", &reader_policy(sink.port()))], Some(config));
    let (mut child, lines_in) = streaming(&d, &["60"]);
    let next = |what: &str| {
        lines_in
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no {what} from the client"))
    };
    let first = loop {
        let v = next("first update");
        if v["step"] == "update" {
            break v;
        }
        assert_eq!(v["step"], "streaming", "{v}");
    };
    assert_eq!(first["spiffe_id"], READER);
    // Renewed before it expires: a new serial arrives on the same stream.
    let second = next("rotation");
    assert_eq!(second["step"], "update", "{second}");
    assert_ne!(second["serial"], first["serial"], "a new certificate");
    assert_eq!(second["spiffe_id"], READER);
    // `identity rotate` pushes one at once.
    let r = d.cli(&["identity", "rotate"]);
    assert!(r.status.success(), "{r:?}");
    let third = next("rotation on identity rotate");
    assert_eq!(third["step"], "update", "{third}");
    assert_ne!(third["serial"], second["serial"]);
    // Revoked: the stream ends with PermissionDenied, and a new fetch is refused.
    let r = d.cli(&["revoke", READER, "--reason", "key leaked"]);
    assert!(r.status.success(), "{r:?}");
    let ended = loop {
        let v = next("the end of the stream");
        if v["step"] != "update" {
            break v;
        }
    };
    assert_eq!(ended["step"], "ended", "{ended}");
    assert_eq!(ended["error"], "PERMISSION_DENIED", "{ended}");
    let refetch = next("the refetch");
    assert_eq!(refetch["error"], "PERMISSION_DENIED", "{refetch}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn callers_without_an_identity_or_the_header_are_refused() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[
        ("p.yaml", &reader_policy(sink.port())),
        (
            "w.yaml",
            &format!(
                "policy:\n  name: web\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
                sink.port()
            ),
        ),
    ]);
    let endpoint = format!("unix://{}", d.workload_socket.display());
    // A cgroup bound to a policy, not an identity: nothing to give.
    let out = client(&d, &["--policy", "web"], &["denied"])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = steps(&out);
    for call in ["x509", "bundles", "jwt", "jwt_bundles"] {
        assert_eq!(s[call]["error"], "PERMISSION_DENIED", "{call}: {out:?}");
    }
    // A process outside any managed cgroup (the test's own) gets the same; the
    // `unix:/path` form of the endpoint works too.
    let script = d.world_copy(&fixture("workload/client.py"));
    let out = Command::new(py_spiffe())
        .arg(&script)
        .arg("denied")
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix:{}", d.workload_socket.display()),
        )
        .output()
        .unwrap();
    let s = steps(&out);
    assert_eq!(s["x509"]["error"], "PERMISSION_DENIED", "{out:?}");
    // Without the security header: InvalidArgument, whatever the call; an empty audience
    // too; the WIT-SVID profile is not served.
    let out = client(&d, &["--identity", "agent/reader/prod"], &["raw"])
        .output()
        .unwrap();
    let s = steps(&out);
    assert_eq!(
        s["x509_without_header"]["code"], "INVALID_ARGUMENT",
        "{out:?}"
    );
    assert_eq!(s["jwt_without_header"]["code"], "INVALID_ARGUMENT");
    assert_eq!(s["jwt_empty_audience"]["code"], "INVALID_ARGUMENT");
    assert_eq!(s["wit"]["code"], "UNIMPLEMENTED");
    // An identity no policy governs, or of another trust domain, launches nothing.
    for (id, says) in [
        ("agent/nobody/prod", "no policy governs"),
        (
            "spiffe://partner.org/agent/reader/prod",
            "trust domain partner.org",
        ),
    ] {
        let o = d
            .exec_under(&["--identity", id], None, &["tcp 127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{id}: {o:?}"
        );
    }
    d.stop_cleanly();
    let refused = audit_records(&d, "workload_refused");
    assert!(
        refused
            .iter()
            .any(|r| r["rpc"] == "FetchX509SVID"
                && r["reason"].as_str().unwrap().contains("not bound")),
        "{refused:?}"
    );
}

#[test]
fn a_caller_moved_out_of_the_agents_cgroup_gets_no_more_svids() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &reader_policy(sink.port()))]);
    let mount = agentwall::cgroup::cgroup2_mount().unwrap();
    let elsewhere = agentwall_tests::CgroupGuard(
        agentwall::cgroup::Cgroup::under(&mount, &format!("{}-moved", d.name)).unwrap(),
    );
    elsewhere.0.create().unwrap();
    // The client connects from the agent's cgroup and gets its SVID; then its process is
    // moved to another cgroup (as a root agent could move itself, or a helper it talks to).
    let (mut child, lines_in) = streaming(&d, &["30", "60"]);
    let next = |what: &str| {
        lines_in
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no {what} from the client"))
    };
    let streaming = next("the start");
    assert_eq!(streaming["step"], "streaming", "{streaming}");
    let pid = streaming["pid"].as_u64().unwrap();
    let first = next("the first update");
    assert_eq!(first["step"], "update", "{first}");
    std::fs::write(elsewhere.0.path().join("cgroup.procs"), pid.to_string()).unwrap();
    // The next SVID of the agent's cgroup does not reach the process that left it.
    let r = d.cli(&["identity", "rotate"]);
    assert!(r.status.success(), "{r:?}");
    let after = next("what the moved client got");
    assert_eq!(after["step"], "ended", "the moved process got {after}");
    assert_eq!(after["error"], "PERMISSION_DENIED", "{after}");
    // Its connection, which it keeps open, ends and gives its place in the agents' pool
    // back: a process outside the agent's cgroup holds none of the cgroup's share.
    agentwall_tests::wait_for(
        Duration::from_secs(40),
        "the moved connection's end",
        || {
            d.log_text()
                .contains("its process left its cgroup")
                .then_some(())
        },
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn users_holding_silent_connections_keep_no_agent_from_its_identity() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &reader_policy(sink.port()))]);
    // Nine users outside any agent's cgroup open as many connections as they can, send the
    // HTTP/2 preface and nothing more: more than all the connections the socket takes at
    // once, if they shared one pool with the agents.
    let holders: Vec<_> = (60_001..60_010)
        .map(|uid| {
            let (h, held) = d.hold_unix_connections("hold-h2", &d.workload_socket, uid, 40);
            let n: usize = held
                .strip_prefix("held=")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(n >= 32, "{held}");
            h
        })
        .collect();
    let out = client(&d, &["--identity", "agent/reader/prod"], &["fetch"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(steps(&out)["x509"]["spiffe_id"], READER, "{out:?}");
    // A connection that says nothing is closed within seconds (after the server's own
    // greeting, which it reads first).
    let mut silent = std::os::unix::net::UnixStream::connect(&d.workload_socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut b = [0u8; 256];
    loop {
        match std::io::Read::read(&mut silent, &mut b) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the silent connection is still open: {e}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    drop(holders);
}

#[test]
fn a_caller_that_stops_reading_is_cut_off_in_time_all_the_same() {
    use std::io::Write as _;
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &reader_policy(sink.port()))]);
    // The HTTP/2 preface, then PINGs and never a read: the answers fill the socket, and the
    // server, which cannot write them, stops reading. Its deadlines must hold all the same.
    let t0 = std::time::Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(&d.workload_socket).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let pings: Vec<u8> = [0u8, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8].repeat(1024);
    let (mut at, mut stalled) = (0, None::<std::time::Instant>);
    while t0.elapsed() < Duration::from_secs(8) {
        match s.write(&pings[at..]) {
            Ok(n) => {
                at = (at + n) % pings.len();
                stalled = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the server ended the flood itself ({e}); nothing to check"),
        }
    }
    assert!(
        stalled.is_some(),
        "the server kept reading a client that never reads"
    );
    // Past the deadline of a caller without an identity (10 s), the connection is gone.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed()));
    let after = s.write(&pings[at..]);
    assert!(
        matches!(&after, Err(e) if matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )),
        "the connection is still open: {after:?}"
    );
}
