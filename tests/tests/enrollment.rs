//! Identity in the kernel: agents enroll over the mTLS socket, the daemon attests the process
//! and binds its cgroup, and the identity's policy is enforced; revocation, expiry and renewal.
//! Real daemon, real kernel programs, real cgroups, loopback listeners. Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use agentwall_tests::{PartnerCa, Repl, TcpSink, TestDaemon, lines, serial, sign_svid, wait_for};

/// A policy for identity `agent/<name>/prod` allowing TCP to one loopback port.
fn identity_policy(name: &str, port: u16, attest: &str) -> String {
    format!(
        "policy:\n  name: {name}\n  identity: agent/{name}/prod\n{attest}  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    )
}

fn python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3");
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// The Python example agent, copied where any user can read it.
fn python_agent(d: &TestDaemon) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/enroll.py");
    let dst = d.dir.join("enroll.py");
    fs::copy(&src, &dst).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
    dst
}

/// `agentwall exec --self-enroll [--user U] -- python3 enroll.py --cert C --key K --connect..`
fn run_python(
    d: &TestDaemon,
    user: Option<&str>,
    cert: &str,
    key: &str,
    connect: &[String],
) -> Output {
    let mut c = Command::new(agentwall_tests::agentwall_bin());
    c.arg("exec")
        .arg("--socket")
        .arg(&d.socket)
        .arg("--self-enroll");
    if let Some(u) = user {
        c.arg("--user").arg(u);
    }
    c.arg("--").arg(python()).arg(python_agent(d));
    c.args(["--cert", cert, "--key", key]);
    for a in connect {
        c.arg("--connect").arg(a);
    }
    c.output().unwrap()
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    lines(o)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {o:?}")))
        .collect()
}

#[test]
fn two_agents_with_different_identities_get_exactly_their_own_policies() {
    let _s = serial();
    let (a, b) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let d = TestDaemon::start(&[
        ("reader.yaml", &identity_policy("reader", a.port(), "")),
        ("writer.yaml", &identity_policy("writer", b.port(), "")),
    ]);
    let (rc, rk) = d.issue("agent/reader/prod", "10m");
    let (wc, wk) = d.issue("agent/writer/prod", "10m");
    let to = |p: u16| format!("tcp 127.0.0.1:{p}");
    let reader = d
        .exec_under(
            &["--cert", &rc, "--key", &rk],
            None,
            &[&to(a.port()), &to(b.port())],
        )
        .output()
        .unwrap();
    assert!(reader.status.success(), "{reader:?}");
    assert_eq!(lines(&reader), ["ok", "err EPERM"], "reader");
    let writer = d
        .exec_under(
            &["--cert", &wc, "--key", &wk],
            None,
            &[&to(a.port()), &to(b.port())],
        )
        .output()
        .unwrap();
    assert_eq!(lines(&writer), ["err EPERM", "ok"], "writer");
    wait_for(
        Duration::from_secs(5),
        "one greeting on each allowed listener",
        || (a.accepted() == 1 && b.accepted() == 1).then_some(()),
    );
    // The launched agent saw its identity's files and ID.
    let env = d
        .exec_under(
            &["--cert", &rc, "--key", &rk],
            None,
            &["env AGENTWALL_SPIFFE_ID"],
        )
        .output()
        .unwrap();
    assert_eq!(lines(&env), ["spiffe://agentwall.local/agent/reader/prod"]);
}

#[test]
fn valid_certificate_with_wrong_selectors_is_refused_and_stays_denied() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[(
        "reader.yaml",
        &identity_policy(
            "reader",
            sink.port(),
            "  attest:\n    uid: 0\n    exe: /usr/bin/true\n",
        ),
    )]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    // Launched as root by `exec --cert`: the executable enrolling is not /usr/bin/true.
    let o = d
        .exec_under(
            &["--cert", &cert, "--key", &key],
            None,
            &["tcp 127.0.0.1:1"],
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(126), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("attestation failed") && err.contains("is not /usr/bin/true"),
        "{err}"
    );
    assert!(lines(&o).is_empty(), "the command must not run: {o:?}");

    // A self-enrolling agent as uid 65534: the uid selector refuses it, and its cgroup, never
    // bound, keeps denying everything.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let addr = format!("127.0.0.1:{}", sink.port());
    let o = run_python(&d, Some("nobody"), &cert, &key, &[addr.clone(), addr]);
    let got = json_lines(&o);
    assert_eq!(got[0]["type"], "error", "{got:?}");
    let msg = got[0]["message"].as_str().unwrap();
    assert!(msg.contains("uid 65534 is not one of [0]"), "{msg}");
    for attempt in &got[1..] {
        assert_eq!(attempt["ok"], false, "{got:?}");
        assert_eq!(attempt["errno"], libc::EPERM, "{got:?}");
    }
    assert_eq!(sink.accepted(), 0, "the listener must receive nothing");
    assert!(
        d.status()
            .daemon_errors
            .get("enroll_refused")
            .copied()
            .unwrap_or(0)
            >= 2
    );
}

#[test]
fn a_python_agent_enrolls_itself_and_is_enforced() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let exe = fs::canonicalize(python()).unwrap_or_else(|_| python());
    let attest = format!("  attest:\n    uid: 65534\n    exe: {}\n", exe.display());
    let d = TestDaemon::start(&[("py.yaml", &identity_policy("py", allowed.port(), &attest))]);
    let (cert, key) = d.issue("agent/py/prod", "10m");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_python(
        &d,
        Some("nobody"),
        &cert,
        &key,
        &[
            format!("127.0.0.1:{}", allowed.port()),
            format!("127.0.0.1:{}", denied.port()),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let got = json_lines(&o);
    assert_eq!(got[0]["type"], "enrolled", "{got:?}");
    assert_eq!(
        got[0]["spiffe_id"],
        "spiffe://agentwall.local/agent/py/prod"
    );
    assert_eq!(got[0]["policy"], "py");
    assert_eq!(got[1]["ok"], true, "{got:?}");
    assert_eq!(got[2]["errno"], libc::EPERM, "{got:?}");
    wait_for(
        Duration::from_secs(5),
        "the allowed listener's greeting",
        || (allowed.bytes() > 0).then_some(()),
    );
    assert_eq!(denied.accepted(), 0);
}

/// A daemon with policy `reader` (one allowed listener) and an agent launched with the
/// certificate of `agent/reader/prod`; also returns the certificate, its key and the
/// listener's address.
fn reader_agent() -> (TcpSink, TestDaemon, Repl, (String, String), String) {
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", sink.port(), ""))]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let to = format!("127.0.0.1:{}", sink.port());
    (sink, d, agent, (cert, key), to)
}

/// Enrolling again with the revoked certificate is refused, and the revocation list holds
/// an entry whose text has `listed`.
fn assert_revoked(d: &TestDaemon, (cert, key): (&str, &str), to: &str, listed: &str) {
    let again = d
        .exec_under(
            &["--cert", cert, "--key", key],
            None,
            &[&format!("tcp {to}")],
        )
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(126), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("was revoked"),
        "{again:?}"
    );
    let list = d.cli(&["revoke", "--list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(listed),
        "{list:?}"
    );
}

/// `agentwall revoke` of the reader agent's SPIFFE ID ("key leaked"), which must succeed.
fn revoke_reader(d: &TestDaemon) -> std::process::Output {
    let o = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "key leaked",
    ]);
    assert!(o.status.success(), "{o:?}");
    o
}

#[test]
fn revocation_cuts_open_streams_denies_new_connects_and_survives_a_restart() {
    let _s = serial();
    let (sink, mut d, mut agent, (cert, key), to) = reader_agent();
    assert_eq!(agent.cmd(&format!("stream {to}")), "ok");
    sink.wait_flowing();

    let o = revoke_reader(&d);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(": 1 cgroup denied everything, 1 socket destroyed"),
        "{out}"
    );
    // The next connect, right after the command returned, is refused.
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
    // The open stream was destroyed: the agent's write fails, the listener sees the end.
    assert_eq!(agent.cmd("stream-end 3000"), "err ECONNABORTED");
    wait_for(
        Duration::from_secs(5),
        "the listener to see the stream end",
        || (sink.ended() >= 1).then_some(()),
    );
    sink.assert_stopped("after revocation");
    let st = d.status();
    let cg = st
        .cgroups
        .iter()
        .find(|c| c.spiffe_id.is_some())
        .expect("bound cgroup");
    assert!(cg.revoked, "{cg:?}");

    // Restart: the revocation holds for the running agent and for new enrollments.
    d.stop();
    d.launch();
    d.wait_healthy();
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
    assert_revoked(&d, (&cert, &key), &to, "key leaked");
    let st = d.status();
    assert!(st.cgroups.iter().any(|c| c.revoked), "{:?}", st.cgroups);
    drop(agent);
}

/// The policy of `agent/reader/prod` governs its versions (`…/prod/v2`), but revoking it
/// matched the SPIFFE ID exactly: a running version kept its connections and new ones
/// enrolled. A revocation covers every identity that gets the revoked one's grants.
#[test]
fn revoking_an_identity_revokes_its_versions() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", sink.port(), ""))]);
    let to = format!("127.0.0.1:{}", sink.port());
    let (cert, key) = d.issue("agent/reader/prod/v2", "10m");
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    assert_eq!(
        agent.cmd(&format!("tcp {to}")),
        "ok",
        "the version is granted"
    );
    let o = revoke_reader(&d);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(": 1 cgroup denied everything, "), "{out}");
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
    assert_revoked(
        &d,
        (&cert, &key),
        &to,
        "covers spiffe://agentwall.local/agent/reader/prod and its versions",
    );
    // A sibling identity is not covered.
    let (other, other_key) = d.issue("agent/reader/prodx", "10m");
    let refused = d
        .exec_under(&["--cert", &other, "--key", &other_key], None, &["pid"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&refused.stderr).contains("was revoked"),
        "{refused:?}"
    );
    drop(agent);
}

/// A revocation the daemon could not make durable (out of descriptors or space) held until the
/// next restart and was then gone, unless a bound cgroup's kernel flag brought its serial
/// back. It is now saved again every half second until it is durable.
#[test]
fn a_revocation_that_could_not_be_saved_is_retried_until_durable() {
    let _s = serial();
    let mut d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    let (cert, _) = d.issue("agent/reader/prod", "10m");
    let checked = d.cli(&["identity", "check", &cert]);
    assert!(checked.status.success(), "{checked:?}");
    let serial = String::from_utf8_lossy(&checked.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    // A directory where the journal goes: the append fails.
    let journal = d.state_dir().join("revocations.journal");
    let _ = fs::remove_file(&journal);
    fs::create_dir(&journal).unwrap();
    let r = d.cli(&["revoke", &serial, "--reason", "saved later"]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("NOT saved yet"),
        "{r:?}"
    );
    // It holds meanwhile.
    let c = d.cli(&["identity", "check", &cert]);
    assert!(!c.status.success(), "{c:?}");
    fs::remove_dir(&journal).unwrap();
    wait_for(Duration::from_secs(5), "the retried save", || {
        d.status()
            .daemon_errors
            .contains_key("revocation_saved_on_retry")
            .then_some(())
    });
    d.kill9();
    d.launch();
    d.wait_healthy();
    let list = d.cli(&["revoke", "--list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("saved later"),
        "{list:?}"
    );
}

/// Kills the daemon (SIGKILL) and deletes the snapshot and journal named `store` from its state
/// directory; the agent's connect to `to` meanwhile gets `while_down`. Then starts the daemon
/// again, after which the agent's connect is refused.
fn restart_having_lost(
    d: &mut TestDaemon,
    agent: &mut Repl,
    to: &str,
    store: &str,
    while_down: &str,
) {
    d.kill9();
    for ext in ["json", "journal"] {
        let _ = fs::remove_file(d.state_dir().join(format!("{store}.{ext}")));
    }
    assert_eq!(agent.cmd(&format!("tcp {to}")), while_down, "daemon down");
    d.launch();
    d.wait_healthy();
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
}

/// The daemon counted one error named `what`.
fn assert_counted_once(d: &TestDaemon, what: &str) {
    let st = d.status();
    assert_eq!(
        st.daemon_errors.get(what),
        Some(&1),
        "{what}: {:?}",
        st.daemon_errors
    );
}

#[test]
fn a_revocation_lost_with_the_daemon_is_recovered_from_the_kernel_at_restart() {
    let _s = serial();
    let (_sink, mut d, mut agent, (cert, key), to) = reader_agent();
    assert_eq!(agent.cmd(&format!("tcp {to}")), "ok");
    revoke_reader(&d);
    // A daemon that died after flagging the kernel, before its revocation list was durable.
    // The kernel holds the revocation while the daemon is down.
    restart_having_lost(&mut d, &mut agent, &to, "revocations", "err EPERM");
    // Enrolling again with the certificate would rebind a cgroup without the flag: refused.
    assert_revoked(&d, (&cert, &key), &to, "recovered at restart");
    assert_counted_once(&d, "revocation_recovered");
    drop(agent);
}

#[test]
fn a_binding_whose_enrollment_record_was_lost_is_removed_at_restart() {
    let _s = serial();
    let (_sink, mut d, mut agent, _, to) = reader_agent();
    assert_eq!(agent.cmd(&format!("tcp {to}")), "ok");
    // A daemon that died between binding the cgroup and writing its record: the binding is in
    // the kernel, no record names its identity (so a revocation by ID could not find it). The
    // binding outlives the daemon.
    restart_having_lost(&mut d, &mut agent, &to, "enrollments", "ok");
    assert_counted_once(&d, "enrollment_unknown");
    let st = d.status();
    assert!(
        st.cgroups.iter().all(|c| c.spiffe_id.is_none()),
        "{:?}",
        st.cgroups
    );
    drop(agent);
}

#[test]
fn an_external_trust_domain_is_trusted_and_its_binding_expires_with_the_certificate() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let partner = PartnerCa::new("partner.org");
    let config = partner.trusted_config();
    let policy = format!(
        "policy:\n  name: partner-reader\n  identity: spiffe://partner.org/agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        sink.port()
    );
    let d = TestDaemon::start_with_config(&[("p.yaml", &policy)], Some(&config));
    // Issued by the partner's CA, not this daemon's; it expires in a few seconds and this
    // daemon cannot renew it.
    let (cert, key) = sign_svid(
        &partner.state(),
        "spiffe://partner.org/agent/reader/prod",
        Duration::from_secs(4),
        &d.dir.join("short"),
    );
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let to = format!("tcp 127.0.0.1:{}", sink.port());
    assert_eq!(agent.cmd(&to), "ok");
    // The kernel compares the binding's expiry with the boot clock on every connect.
    wait_for(Duration::from_secs(15), "the binding to expire", || {
        (agent.cmd(&to) == "err EPERM").then_some(())
    });
    let accepted = sink.accepted();
    assert_eq!(agent.cmd(&to), "err EPERM");
    assert_eq!(sink.accepted(), accepted);
    // An expired certificate is refused at enrollment with the reason.
    let o = d
        .exec_under(&["--cert", &cert, "--key", &key], None, &[&to])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(126));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expired"),
        "{o:?}"
    );
}

#[test]
fn rotate_renews_launched_agents_and_extends_their_binding() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", sink.port(), ""))]);
    let (cert, key) = sign_svid(
        &d.state_dir(),
        "spiffe://agentwall.local/agent/reader/prod",
        Duration::from_secs(4),
        &d.dir.join("short"),
    );
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let svid_path = agent.cmd("env AGENTWALL_SVID");
    let before = fs::read_to_string(&svid_path).unwrap();
    let o = d.cli(&["identity", "rotate"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("renewed 1"),
        "{o:?}"
    );
    let after = fs::read_to_string(&svid_path).unwrap();
    assert_ne!(before, after, "the certificate file was replaced");
    // Past the old certificate's expiry the binding holds: it follows the renewed one.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(agent.cmd(&format!("tcp 127.0.0.1:{}", sink.port())), "ok");
    let st = d.status();
    let cg = st.cgroups.iter().find(|c| c.spiffe_id.is_some()).unwrap();
    let log = d.cli(&[
        "identity",
        "log",
        "--state-dir",
        d.state_dir().to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&log.stdout).contains(cg.serial.as_deref().unwrap()),
        "the renewed certificate is in the issuance log"
    );
}

#[test]
fn enrollment_refusals_name_their_reason() {
    let _s = serial();
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    // An identity no policy governs.
    let (cert, key) = d.issue("agent/stranger/prod", "10m");
    let o = d
        .exec_under(&["--cert", &cert, "--key", &key], None, &["pid"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(126));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no policy governs"),
        "{o:?}"
    );
    // A certificate of another CA for the same trust domain.
    let other = d.dir.join("other-state");
    let o = Command::new(agentwall_tests::agentwall_bin())
        .args(["identity", "issue", "--state-dir"])
        .arg(&other)
        .args(["--id", "agent/reader/prod", "--out"])
        .arg(d.dir.join("other"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let (oc, ok) = (
        d.dir.join("other/svid.pem").display().to_string(),
        d.dir.join("other/svid.key").display().to_string(),
    );
    let o = d
        .exec_under(&["--cert", &oc, "--key", &ok], None, &["pid"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(126));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not chain"),
        "{o:?}"
    );
    // Garbage instead of TLS: the daemon drops the connection and keeps serving.
    {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&d.enroll_socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"{\"op\":\"enroll\"}\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let (rc, rk) = d.issue("agent/reader/prod", "10m");
    let o = d
        .exec_under(&["--cert", &rc, "--key", &rk], None, &["pid"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn enrollments_go_on_while_silent_clients_hold_connections() {
    use std::io::{ErrorKind, Read as _};
    let _s = serial();
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    // More silent connections than the pool keeps threads waiting (2): each holds a thread
    // until its deadline. Four, the most one cgroup may have in progress (more are refused at
    // once: `hostile.rs`).
    let silent: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.enroll_socket).unwrap())
        .collect();
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let o = d
        .exec_under(&["--cert", &cert, "--key", &key], None, &["pid"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // Served while every silent connection was still held open by its thread (nothing to
    // read yet, no end of stream).
    for mut s in silent {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let e = s.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    }
}

/// An agent that enrolls from four threads, each one enrollment after another, is never
/// refused: an enrollment stops counting against its cgroup's four in progress once it is
/// answered, not once its thread is done with the connection. (It counted until then, so a
/// thread that connected again at once was sometimes refused.)
#[test]
fn an_agent_enrolling_from_four_threads_in_a_row_is_not_refused() {
    let _s = serial();
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let bundle = d.state_dir().join("ca/ca.crt").display().to_string();
    let burst = format!(
        "enroll-burst {} {cert} {key} {bundle} 4 100",
        d.enroll_socket.display()
    );
    // Root as it was: it reads the certificate and key `issue` wrote for root.
    let o = d
        .exec_under(&["--self-enroll", "--keep-privileges"], None, &[&burst])
        .output()
        .unwrap();
    assert_eq!(lines(&o), ["ok"], "{o:?}");
}

#[test]
fn tokens_are_issued_to_attested_holders_verified_and_rejected_after_revocation() {
    let _s = serial();
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let bundle = d.state_dir().join("ca/ca.crt").display().to_string();
    let enroll = d.enroll_socket.display().to_string();
    let token_of = |aud: &str| {
        d.cli(&[
            "identity",
            "token",
            "--enroll-socket",
            &enroll,
            "--cert",
            &cert,
            "--key",
            &key,
            "--bundle",
            &bundle,
            "--audience",
            aud,
        ])
    };
    let o = token_of("billing-api");
    assert!(o.status.success(), "{o:?}");
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let check = |aud: &str, t: &str| d.cli(&["identity", "check-token", "--audience", aud, t]);
    let ok = check("billing-api", &token);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("spiffe://agentwall.local/agent/reader/prod")
    );
    let wrong = check("other-api", &token);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not valid"),
        "{wrong:?}"
    );
    // The JWKS verifies it too, for callers that check tokens themselves.
    let jwks = d.cli(&["identity", "jwks"]);
    assert!(
        String::from_utf8_lossy(&jwks.stdout).contains("\"ES256\""),
        "{jwks:?}"
    );

    // A launched agent gets a token file for its audience.
    let out = d
        .exec_under(
            &["--cert", &cert, "--key", &key, "--audience", "billing-api"],
            None,
            &["env AGENTWALL_TOKEN"],
        )
        .output()
        .unwrap();
    let path = lines(&out)[0].clone();
    assert!(path.ends_with("token.jwt"), "{out:?}");

    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "gone",
    ]);
    assert!(r.status.success(), "{r:?}");
    let after = check("billing-api", &token);
    assert!(!after.status.success());
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("revoked"),
        "{after:?}"
    );
    let refused = token_of("billing-api");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{refused:?}"
    );
}

/// A token was tied to its subject only: revoking the certificate it was issued for (by
/// serial) left it valid, and its expiry came from the token lifetime alone, minutes past the
/// certificate's end.
#[test]
fn a_token_ends_with_its_certificate_and_with_the_certificates_revocation() {
    let _s = serial();
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", 9, ""))]);
    let (cert, key) = d.issue("agent/reader/prod", "1m");
    let bundle = d.state_dir().join("ca/ca.crt").display().to_string();
    let enroll = d.enroll_socket.display().to_string();
    let o = d.cli(&[
        "identity",
        "token",
        "--enroll-socket",
        &enroll,
        "--cert",
        &cert,
        "--key",
        &key,
        "--bundle",
        &bundle,
        "--audience",
        "billing-api",
    ]);
    assert!(o.status.success(), "{o:?}");
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // `valid: ID serial S until T`, for the certificate and for the token.
    let fields = |o: &std::process::Output| {
        assert!(o.status.success(), "{o:?}");
        let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let w: Vec<String> = text.split_whitespace().map(String::from).collect();
        assert_eq!(
            (w.len(), w[2].as_str(), w[4].as_str()),
            (6, "serial", "until"),
            "{text}"
        );
        (w[3].clone(), w[5].clone())
    };
    let (cert_serial, cert_end) = fields(&d.cli(&["identity", "check", &cert]));
    let check = || {
        d.cli(&[
            "identity",
            "check-token",
            "--audience",
            "billing-api",
            &token,
        ])
    };
    let (token_serial, token_end) = fields(&check());
    assert_eq!(token_serial, cert_serial, "the token names its certificate");
    // RFC 3339 in UTC, seconds: ordered as text.
    assert!(
        token_end <= cert_end,
        "the token (until {token_end}) outlives its certificate (until {cert_end})"
    );
    let r = d.cli(&["revoke", &cert_serial, "--reason", "key leaked"]);
    assert!(r.status.success(), "{r:?}");
    let after = check();
    assert!(!after.status.success(), "{after:?}");
    let err = String::from_utf8_lossy(&after.stderr);
    assert!(
        err.contains("revoked") && err.contains(&cert_serial),
        "{after:?}"
    );
    // Another certificate of the same identity still gets tokens that check.
    let (cert2, key2) = d.issue("agent/reader/prod", "10m");
    let o = d.cli(&[
        "identity",
        "token",
        "--enroll-socket",
        &enroll,
        "--cert",
        &cert2,
        "--key",
        &key2,
        "--bundle",
        &bundle,
        "--audience",
        "billing-api",
    ]);
    assert!(o.status.success(), "{o:?}");
    let token2 = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let ok = d.cli(&[
        "identity",
        "check-token",
        "--audience",
        "billing-api",
        &token2,
    ]);
    assert!(ok.status.success(), "{ok:?}");
}

#[test]
fn an_agent_in_a_cgroup_of_its_own_enrolls_when_policy_names_that_cgroup() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let name = format!("awt-{}-svc", std::process::id());
    let parent = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
        agentwall_tests::cgroup_mount().join(&name),
    ));
    parent.0.create().unwrap();
    let guard = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
        agentwall_tests::cgroup_mount().join(&name).join("agent"),
    ));
    guard.0.create().unwrap();
    // Without attest.cgroup, a cgroup outside agentwall's subtree is not taken.
    let mut d = TestDaemon::start(&[("py.yaml", &identity_policy("py", allowed.port(), ""))]);
    let (cert, key) = d.issue("agent/py/prod", "10m");
    let bundle = d.state_dir().join("ca/ca.crt");
    let run = |d: &TestDaemon| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} {} --socket {} --bundle {} --cert {cert} --key {key} --connect 127.0.0.1:{} --connect 127.0.0.1:{}",
            guard.0.path().display(),
            python().display(),
            python_agent(d).display(),
            d.enroll_socket.display(),
            bundle.display(),
            allowed.port(),
            denied.port(),
        );
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    };
    let o = run(&d);
    let got = json_lines(&o);
    assert_eq!(got[0]["type"], "error", "{got:?}");
    assert!(
        got[0]["message"]
            .as_str()
            .unwrap()
            .contains("outside agentwall's subtree"),
        "{got:?}"
    );
    // Not enforced at all before enrolling: agentwall does not touch cgroups it was not given.
    assert_eq!(got[2]["ok"], true, "{got:?}");

    let attest = format!("  attest:\n    cgroup: /{name}/*\n");
    d.write_policy("py.yaml", &identity_policy("py", allowed.port(), &attest));
    let r = d.cli(&["reload"]);
    assert!(r.status.success(), "{r:?}");
    let o = run(&d);
    let got = json_lines(&o);
    assert_eq!(got[0]["type"], "enrolled", "{got:?}");
    assert_eq!(got[0]["cgroup"], format!("/{name}/agent"));
    assert_eq!(got[1]["ok"], true, "{got:?}");
    assert_eq!(got[2]["errno"], libc::EPERM, "{got:?}");
    let bound = |d: &TestDaemon| {
        d.status()
            .cgroups
            .iter()
            .any(|c| c.kind == "enrolled" && c.path.ends_with(&format!("{name}/agent")))
    };
    assert!(bound(&d));
    // The binding and the programs outlive a daemon restart ...
    d.stop();
    d.launch();
    d.wait_healthy();
    assert!(bound(&d), "{:?}", d.status().cgroups);
    // ... and end when the cgroup goes away.
    drop(guard);
    wait_for(
        Duration::from_secs(5),
        "the enrolled cgroup to be released",
        || (!bound(&d)).then_some(()),
    );
    drop(parent);
}

/// The serial the status shows for the one bound cgroup.
fn bound_serial(d: &TestDaemon) -> String {
    let st = d.status();
    let cg = st.cgroups.iter().find(|c| c.spiffe_id.is_some()).unwrap();
    cg.serial.clone().unwrap()
}

#[test]
fn a_revoked_cgroup_stays_cut_and_renewals_go_with_their_origin() {
    let _s = serial();
    let (_sink, d, mut agent, _, to) = reader_agent();
    let tcp = format!("tcp {to}");
    assert_eq!(agent.cmd(&tcp), "ok");
    let first = bound_serial(&d);
    let o = d.cli(&["identity", "rotate"]);
    assert!(o.status.success(), "{o:?}");
    let renewed = bound_serial(&d);
    assert_ne!(first, renewed);
    // The serial that leaked is the first one; the agent holds the renewed certificate.
    let o = d.cli(&["revoke", &first, "--reason", "key leaked"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        agent.cmd(&tcp),
        "err EPERM",
        "the renewed certificate went with it"
    );
    let list = String::from_utf8_lossy(&d.cli(&["revoke", "--list"]).stdout).into_owned();
    assert!(
        list.contains(&renewed) && list.contains(&format!("renewed from revoked serial {first}")),
        "{list}"
    );
    // Another certificate of the same identity, enrolled from inside the cut cgroup (a process
    // joined to it), does not lift the cut.
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let rel = agent.cmd("cgroup");
    let procs = agentwall_tests::cgroup_mount()
        .join(rel.trim_start_matches('/'))
        .join("cgroup.procs");
    let mut c = Command::new(python());
    c.arg(python_agent(&d))
        .arg("--socket")
        .arg(&d.enroll_socket)
        .arg("--bundle")
        .arg(d.state_dir().join("ca/ca.crt"))
        .args(["--cert", &cert, "--key", &key]);
    // SAFETY: the closure only writes a file (a system call) before exec.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        c.pre_exec(move || fs::write(&procs, "0"));
    }
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("was cut by the revocation"),
        "{o:?}"
    );
    assert_eq!(agent.cmd(&tcp), "err EPERM");
}

/// A unit of a user's own systemd manager (`systemd-run --user --unit=reader`) is not the
/// system unit of the same name. Both cgroups are laid out as systemd lays them out, in a
/// subtree of the test's own.
#[test]
fn systemd_unit_attestation_takes_system_units_only() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let name = format!("awt-{}-units", std::process::id());
    let at = |rel: &str| {
        let g = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
            agentwall_tests::cgroup_mount().join(&name).join(rel),
        ));
        g.0.create().unwrap();
        g
    };
    let _parent = at("");
    let _user = at("user@1000.service");
    let user_unit = at("user@1000.service/reader.service");
    let system_unit = at("reader.service");
    let attest = format!("  attest:\n    cgroup: /{name}/**\n    systemd_unit: reader.service\n");
    let d = TestDaemon::start(&[("r.yaml", &identity_policy("reader", sink.port(), &attest))]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let enroll_in = |cg: &agentwall_tests::CgroupGuard| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} {} --socket {} --bundle {} --cert {cert} --key {key}",
            cg.0.path().display(),
            python().display(),
            python_agent(&d).display(),
            d.enroll_socket.display(),
            d.state_dir().join("ca/ca.crt").display(),
        );
        let o = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        json_lines(&o).remove(0)
    };
    let got = enroll_in(&user_unit);
    assert_eq!(got["type"], "error", "{got:?}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("systemd unit user@1000.service/reader.service is not reader.service"),
        "{got:?}"
    );
    let got = enroll_in(&system_unit);
    assert_eq!(got["type"], "enrolled", "{got:?}");
}

/// A reload that switches a policy's mode visits every binding of it; it wrote each back as
/// it had listed it, so a quarantine (or a revocation) that landed on a binding between the
/// listing and the write was undone. Each binding is now changed as it is when the change
/// lands. Many bindings make the pass long; quarantines land at spread moments of it.
#[test]
fn a_reload_racing_a_quarantine_never_undoes_it() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let name = format!("awt-{}-many", std::process::id());
    let guard = |rel: &str| {
        let g = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
            agentwall_tests::cgroup_mount().join(&name).join(rel),
        ));
        g.0.create().unwrap();
        g
    };
    let _parent = guard("");
    let many: Vec<_> = (0..300).map(|i| guard(&format!("c{i}"))).collect();
    let mut config = String::from("enforce:\n");
    for i in 0..300 {
        config.push_str(&format!("  - cgroup: {name}/c{i}\n    policy: reader\n"));
    }
    let policy = |mode: &str| {
        format!(
            "policy:\n  name: reader\n  mode: {mode}\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
            sink.port()
        )
    };
    let d = TestDaemon::start_with_config(&[("r.yaml", &policy("enforce"))], Some(&config));
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let to = format!("tcp 127.0.0.1:{}", sink.port());
    assert_eq!(agent.cmd(&to), "ok");
    let cgroup = agent.cmd("cgroup");
    let cgroup = cgroup.trim_start_matches('/');
    for round in 0..30u64 {
        let mode = if round % 2 == 0 { "audit" } else { "enforce" };
        d.write_policy("r.yaml", &policy(mode));
        let reload = {
            let mut c = std::process::Command::new(agentwall_tests::agentwall_bin());
            c.args(["reload"])
                .env("AGENTWALL_SOCKET", &d.socket)
                .stdout(std::process::Stdio::null());
            c.spawn().unwrap()
        };
        std::thread::sleep(std::time::Duration::from_millis(round % 15));
        let q = d.cli(&["quarantine", cgroup]);
        assert!(q.status.success(), "{q:?}");
        let r = reload.wait_with_output().unwrap();
        assert!(r.status.success(), "{r:?}");
        assert_eq!(
            agent.cmd(&to),
            "err EPERM",
            "round {round} ({mode}): the quarantine stands after the reload"
        );
        let q = d.cli(&["quarantine", "--lift", cgroup]);
        assert!(q.status.success(), "{q:?}");
    }
    agent.quit();
    drop(d);
    drop(many);
}
