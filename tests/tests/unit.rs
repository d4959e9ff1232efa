//! The shipped systemd unit: its exposure score, and the daemon running under its
//! restrictions (applied by `aw-unit-sandbox`, as systemd is not PID 1 here) starts, enforces,
//! gives a launched agent its files, revokes and cuts an open connection, reloads and is
//! restarted onto its pins.
//!
//! `AGENTWALL_UNDER_UNIT=deploy/systemd/agentwall.service cargo xtask test` runs every root
//! test's daemon under the unit the same way.
#![expect(clippy::unwrap_used, reason = "a test: failing here fails the test")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use agentwall_tests::{Repl, TcpSink, TestDaemon, serial};

fn unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/agentwall.service")
}

fn sandbox() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("aw-unit-sandbox")
}

#[test]
fn the_units_are_exposed_at_most_3_0() {
    for name in ["agentwall.service", "agentwall-agents.service"] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit().with_file_name(name))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| {
                l.split(&format!("Overall exposure level for {name}: "))
                    .nth(1)
            })
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no overall exposure in: {text}"));
        assert!(score <= 3.0, "{name}: exposure {score}: {text}");
    }
}

/// `sh -c SCRIPT` under the unit's sandbox (the test's directory writable).
fn sandboxed(unit: &Path, dir: &Path, script: &str) -> Output {
    Command::new(sandbox())
        .arg("--unit")
        .arg(unit)
        .arg("--cgroup")
        .arg(agentwall_tests::cgroup_mount().join("awt-sandbox-probe"))
        .arg("--pins")
        .arg(dir.join("no-pins"))
        .arg("--rw")
        .arg(dir)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap()
}

/// Removes the test's directory and the cgroup the sandbox made, whatever happens.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(agentwall_tests::cgroup_mount().join("awt-sandbox-probe"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_sandbox_applies_the_units_restrictions_and_refuses_settings_it_does_not_know() {
    let _s = serial();
    let dir = std::env::temp_dir().join(format!("awt-{}-sandbox", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let check = |script: &str| sandboxed(&unit(), &dir, script);
    // Writable: the test's directory; read-only: the rest, /etc and the cgroups included.
    let o = check(&format!("touch {}/w", dir.display()));
    assert!(o.status.success(), "{o:?}");
    for path in ["/etc/aw-test", "/usr/aw-test", "/sys/fs/cgroup/aw-test"] {
        let o = check(&format!("touch {path}"));
        assert!(!o.status.success(), "{path} was writable: {o:?}");
    }
    // The bounding set is the unit's: CAP_CHOWN (0), CAP_NET_ADMIN (12), CAP_SYS_PTRACE (19),
    // CAP_SYS_ADMIN (21), CAP_SYS_NICE (23), CAP_PERFMON (38), CAP_BPF (39).
    let o = check("grep CapBnd /proc/self/status");
    let want = [0u32, 12, 19, 21, 23, 38, 39]
        .iter()
        .fold(0u64, |m, b| m | 1 << b);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("CapBnd:\t{want:016x}"),
        "{o:?}"
    );
    // ProcSubset=pid: no /proc/sys. PrivateTmp: another /tmp. ProtectHome: no /root.
    for script in ["cat /proc/sys/kernel/osrelease", "ls /root"] {
        let o = check(script);
        assert!(!o.status.success(), "{script}: {o:?}");
    }
    // The system-call filter: no new user namespace (RestrictNamespaces), no mount.
    for script in ["unshare -U true", "mount -t tmpfs none /mnt"] {
        let o = check(script);
        assert!(!o.status.success(), "{script}: {o:?}");
    }
    // A setting the harness does not apply fails the run rather than being skipped.
    let extra = dir.join("extra.service");
    let text = std::fs::read_to_string(unit()).unwrap();
    std::fs::write(
        &extra,
        text.replace("[Service]\n", "[Service]\nIPAddressDeny=any\n"),
    )
    .unwrap();
    let o = sandboxed(&extra, &dir, "true");
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("IPAddressDeny"),
        "{o:?}"
    );
    // So does a writable /sys/fs/bpf, which systemd would keep read-only under
    // ProtectKernelTunables (the read-only entry for the same path wins).
    std::fs::write(
        &extra,
        text.replace(
            "ReadWritePaths=/sys/fs/bpf/agentwall",
            "ReadWritePaths=/sys/fs/bpf",
        ),
    )
    .unwrap();
    let o = sandboxed(&extra, &dir, "true");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ProtectKernelTunables"),
        "{o:?}"
    );
}

#[test]
fn under_the_unit_the_daemon_enforces_revokes_reloads_and_restarts_onto_its_pins() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let policy = format!(
        "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        sink.port()
    );
    let mut d = TestDaemon::prepare(&[("r.yaml", &policy)], None);
    d.set_unit(unit());
    // Healthy means its probe, started in a cgroup of its own, was denied: clone3 is refused
    // under RestrictNamespaces, so the probe child moved itself there.
    d.launch();
    d.wait_healthy();
    // An agent of another user under an identity: the daemon gives it its files (CAP_CHOWN).
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    let mut agent =
        Repl::spawn(d.exec_under(&["--cert", &cert, "--key", &key], Some("nobody"), &["repl"]));
    let to = format!("127.0.0.1:{}", sink.port());
    assert_eq!(agent.cmd(&format!("stream {to}")), "ok");
    sink.wait_flowing();
    assert_eq!(
        agent.cmd(&format!("tcp 127.0.0.1:{}", denied.port())),
        "err EPERM"
    );
    assert_eq!(denied.accepted(), 0);

    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{o:?}");

    // A revocation cuts the open stream (sock_diag, CAP_NET_ADMIN).
    let o = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "unit test",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 socket destroyed"),
        "{o:?}\n{}",
        d.log_text()
    );
    assert_eq!(agent.cmd("stream-end 3000"), "err ECONNABORTED");

    // Restarted under the unit, it takes over its pins: the revocation holds.
    d.stop_cleanly();
    d.launch();
    d.wait_healthy();
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
    drop(agent);
}
