//! Unix sockets are egress too: a confined agent reaches only the Unix sockets its policy
//! names (`unix:` rules), by path or abstract name, over stream connects, datagram sends and
//! datagram connects; every other one is refused with EPERM before the listener sees a byte,
//! and the audit log names the socket.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    io::Read as _,
    os::unix::net::{UnixDatagram, UnixListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use agentwall_tests::{TestDaemon, lines, serial, wait_for};

/// A listening Unix socket (stream or datagram, by path or abstract name) that counts the
/// bytes it receives.
struct Sink {
    bytes: Arc<AtomicUsize>,
}

impl Sink {
    fn stream(listener: UnixListener) -> Self {
        let bytes = Arc::new(AtomicUsize::new(0));
        let b = Arc::clone(&bytes);
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { break };
                let b = Arc::clone(&b);
                thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        Self { bytes }
    }

    fn at(path: &Path) -> Self {
        Self::stream(UnixListener::bind(path).unwrap())
    }

    fn abstract_name(name: &str) -> Self {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Self::stream(UnixListener::bind_addr(&addr).unwrap())
    }

    fn datagrams(path: &Path) -> Self {
        let s = UnixDatagram::bind(path).unwrap();
        let bytes = Arc::new(AtomicUsize::new(0));
        let b = Arc::clone(&bytes);
        thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.recv(&mut buf) {
                b.fetch_add(n, Ordering::SeqCst);
            }
        });
        Self { bytes }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

fn audit(d: &TestDaemon, args: &[&str]) -> Vec<serde_json::Value> {
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let mut all = vec!["audit", args[0], &dir, "--key", &key];
    all.extend_from_slice(&args[1..]);
    let o = d.cli(&all);
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn unix_sockets_are_reached_only_by_the_names_policy_gives() {
    let _s = serial();
    // The sockets live where the agent cannot write (the test's root-owned directory), so
    // that a name in the policy stands for the socket the test bound there.
    let dir = std::env::temp_dir().join(format!("awt-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| -> PathBuf { dir.join(n) };
    let tag = std::process::id();
    let (ok_abs, no_abs) = (format!("awt-ok-{tag}"), format!("awt-no-{tag}"));
    let allowed = Sink::at(&p("allowed.sock"));
    let denied = Sink::at(&p("denied.sock"));
    let allowed_abs = Sink::abstract_name(&ok_abs);
    let denied_abs = Sink::abstract_name(&no_abs);
    let allowed_dg = Sink::datagrams(&p("allowed-dg.sock"));
    let denied_dg = Sink::datagrams(&p("denied-dg.sock"));
    // Another name for the allowed socket: names are matched as given, so it is refused.
    std::os::unix::fs::symlink(p("allowed.sock"), p("alias.sock")).unwrap();
    let policy = format!(
        "policy:\n  name: agent\n  egress:\n    - unix: [{}, \"@{ok_abs}\", {}]\n",
        p("allowed.sock").display(),
        p("allowed-dg.sock").display(),
    );
    let d = TestDaemon::start(&[("p.yaml", &policy)]);
    let events = d.events();
    let s = |n: &str| p(n).display().to_string();
    // Root as it was (`--keep-privileges`): the sockets and the admin socket are root's, and
    // this is about what the kernel hooks let through, not about file permissions.
    let out = d.exec_privileged(
        "agent",
        &[
            &format!("unix-connect {} hello", s("allowed.sock")),
            &format!("unix-connect @{ok_abs} hello"),
            &format!("unix-sendto {} hello", s("allowed-dg.sock")),
            &format!("unix-dgram-connect {} hello", s("allowed-dg.sock")),
            &format!("unix-connect {} hello", s("denied.sock")),
            &format!("unix-connect @{no_abs} hello"),
            &format!("unix-sendto {} hello", s("denied-dg.sock")),
            &format!("unix-dgram-connect {} hello", s("denied-dg.sock")),
            &format!("unix-connect {} hello", s("alias.sock")),
            // agentwall's own sockets are reachable whatever the policy: agents renew through
            // the enrollment socket, units ask `enforce-self` over the admin socket (which
            // answers only root and its group).
            &format!("unix-connect {} x", d.enroll_socket.display()),
            &format!("unix-connect {} x", d.socket.display()),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        lines(&out),
        [
            "ok",
            "ok",
            "ok",
            "ok",
            "err EPERM",
            "err EPERM",
            "err EPERM",
            "err EPERM",
            "err EPERM",
            "ok",
            "ok",
        ]
    );
    wait_for(Duration::from_secs(5), "the allowed sockets' bytes", || {
        (allowed.bytes() == 5 && allowed_abs.bytes() == 5 && allowed_dg.bytes() == 10).then_some(())
    });
    assert_eq!(denied.bytes(), 0, "the denied stream socket read nothing");
    assert_eq!(
        denied_abs.bytes(),
        0,
        "the denied abstract socket read nothing"
    );
    assert_eq!(
        denied_dg.bytes(),
        0,
        "the denied datagram socket read nothing"
    );

    // The verdicts name the socket, as the live stream and the audit log carry them.
    let seen = events.drain(Duration::from_millis(500));
    let denial = |hook: &str, name: &str| {
        seen.iter().any(|e| {
            e.hook == hook
                && e.verdict == "deny"
                && e.reason == "no_rule"
                && e.unix.as_deref() == Some(name)
                && e.policy.as_deref() == Some("agent")
        })
    };
    assert!(denial("connect_unix", &s("denied.sock")), "{seen:#?}");
    assert!(denial("connect_unix", &format!("@{no_abs}")), "{seen:#?}");
    assert!(denial("sendmsg_unix", &s("denied-dg.sock")), "{seen:#?}");
    assert!(denial("connect_unix", &s("alias.sock")), "{seen:#?}");
    let allowed_rule = seen
        .iter()
        .find(|e| e.hook == "connect_unix" && e.verdict == "allow")
        .unwrap_or_else(|| panic!("an allowed connect in {seen:#?}"));
    assert!(
        allowed_rule
            .rule
            .as_deref()
            .is_some_and(|r| r.ends_with("p.yaml:4")),
        "{allowed_rule:?}"
    );
    let logged = audit(&d, &["query", "--verdict", "deny"]);
    assert!(
        logged
            .iter()
            .any(|r| r["record"]["hook"] == "connect_unix"
                && r["record"]["unix"] == s("denied.sock")),
        "{logged:#?}"
    );
    assert!(
        d.status().protections.unix_sockets,
        "status reports the Unix hooks"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past its event budget, a flood of denied Unix connects was summarized without the socket
/// name (every Unix flow of a cgroup was one flow). The summary's flow now names the socket:
/// whole when the records before the budget ran out named it, else its start and length.
#[test]
fn a_flood_of_unix_connects_is_summarized_by_socket_name() {
    let _s = serial();
    let dir = std::env::temp_dir().join(format!("awt-unixsum-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Two names longer than 16 bytes, alike in their first 16.
    let flooded = dir.join("flooded-socket.sock");
    let other = dir.join("other-socket-name.sock");
    let _a = Sink::at(&flooded);
    let _b = Sink::at(&other);
    let policy = "policy:\n  name: agent\n  egress:\n    - unix: [/run/nothing.sock]\n";
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", policy)],
        Some("events:\n  cgroup_rate: 10\n  cgroup_burst: 20\n  summary_every: 30s\n"),
    );
    let n = 3000;
    let out = d.exec(
        "agent",
        None,
        &[
            &format!("unix-flood {} {n}", flooded.display()),
            &format!("unix-flood {} 5", other.display()),
        ],
    );
    assert_eq!(
        lines(&out),
        [format!("eperm={n} other=0"), "eperm=5 other=0".to_string()],
        "{out:?}"
    );
    d.stop_cleanly();
    let all = audit(&d, &["tail", "-n", "100000"]);
    let flows: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["record"]["kind"] == "verdict_summary")
        .flat_map(|r| r["record"]["flows"].as_array().unwrap())
        .collect();
    let named = |name: &Path| {
        flows
            .iter()
            .filter(|f| f["socket"] == name.display().to_string())
            .map(|f| f["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    let recorded = all
        .iter()
        .filter(|r| {
            r["record"]["kind"] == "verdict" && r["record"]["unix"] == flooded.display().to_string()
        })
        .count() as u64;
    assert!(recorded >= 1, "the first verdicts were recorded one by one");
    assert_eq!(
        named(&flooded) + recorded,
        n,
        "every verdict is recorded or summarized under the socket's name: {flows:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cgroup adopted from an earlier daemon runs that daemon's programs until this one attaches
/// its own: one whose links lack the Unix hooks (pinned by a daemon from before them) had its
/// Unix connects unjudged after the upgrade. At start the daemon now attaches its programs to
/// every adopted cgroup that has links of its own.
#[test]
fn an_adopted_cgroup_gets_the_unix_hooks_its_links_lacked() {
    let _s = serial();
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("awt-unixadopt-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let denied_path = dir.join("denied.sock");
    let denied = Sink::at(&denied_path);
    let name = format!("awt-{tag}-adopt");
    let mount = agentwall_tests::cgroup_mount();
    let parent = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(mount.join(&name)));
    parent.0.create().unwrap();
    let guard = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
        mount.join(&name).join("agent"),
    ));
    guard.0.create().unwrap();
    let policy = format!(
        "policy:\n  name: adopt\n  identity: agent/adopt/prod\n  attest:\n    cgroup: /{name}/*\n  egress:\n    - unix: [/run/nothing.sock]\n"
    );
    let mut d = TestDaemon::start(&[("p.yaml", &policy)]);
    let (cert, _key) = d.issue("agent/adopt/prod", "10m");
    let svid_dir = Path::new(&cert).parent().unwrap().to_path_buf();
    std::fs::copy(d.state_dir().join("ca/ca.crt"), svid_dir.join("bundle.pem")).unwrap();
    // A shell that moves into the cgroup, then runs `then` there.
    let in_cgroup = |then: String| -> String {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {then}",
            guard.0.path().display()
        );
        let o = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let probe = agentwall_tests::netprobe_bin();
    let connect = format!(
        "{} 'unix-connect {} x'",
        probe.display(),
        denied_path.display()
    );
    let enrolled = in_cgroup(format!(
        "{} __enroll-exec --socket {} --dir {} -- {connect}",
        agentwall_tests::agentwall_bin().display(),
        d.enroll_socket.display(),
        svid_dir.display(),
    ));
    assert_eq!(enrolled, "err EPERM", "enrolled and judged");
    // What a daemon from before the Unix hooks left: links without them.
    d.stop();
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(guard.0.path()).unwrap());
    let links = d.pin_dir.join("links").join(id.to_string());
    let mut removed = 0;
    for e in std::fs::read_dir(&links).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("aw_connect_unix") || n.starts_with("aw_sendmsg_unix") {
            std::fs::remove_file(e.path()).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 2, "{links:?}");
    assert_eq!(in_cgroup(connect.clone()), "ok", "unjudged without them");
    wait_for(Duration::from_secs(5), "the unjudged byte", || {
        (denied.bytes() == 1).then_some(())
    });
    d.launch();
    d.wait_healthy();
    assert_eq!(in_cgroup(connect.clone()), "err EPERM", "judged again");
    assert_eq!(denied.bytes(), 1, "only the unjudged connect was heard");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
