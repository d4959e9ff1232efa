//! Kernel enforcement through the daemon and `agentwall exec`: real programs, real cgroups,
//! real sockets to real listeners on loopback. Run as root, one at a time (`cargo xtask test`).

use std::{fs, os::fd::AsFd as _, time::Duration};

use agentwall::{cgroup::Cgroup, events::EventRecord, spawn};
use agentwall_tests::{
    HttpSink, TcpSink, TestDaemon, UdpSink, lines, netprobe_bin, serial, tcp_policy, wait_for,
};

#[test]
fn tcp_to_denied_destinations_gets_eperm_in_every_address_form() {
    let _s = serial();
    // Dual-stack listeners: every loopback form reaches them unless the kernel refuses.
    let allowed = TcpSink::new("[::]:0");
    let denied = TcpSink::new("[::]:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))]);
    let (a, x) = (allowed.port(), denied.port());
    let out = d.exec(
        "web",
        None,
        &[
            &format!("tcp 127.0.0.1:{x}"),
            &format!("tcp [::1]:{x}"),
            &format!("tcp [::ffff:127.0.0.1]:{x}"),
            &format!("tcp 0.0.0.0:{x}"),
            &format!("tcp [::]:{x}"),
            &format!("tcp 127.0.0.2:{x}"),
            &format!("tcp 127.0.0.1:{a}"),
            &format!("tcp [::1]:{a}"),
            &format!("tcp [::ffff:127.0.0.1]:{a}"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    assert_eq!(got[..6], ["err EPERM"; 6], "denied forms: {got:?}");
    assert_eq!(got[6..], ["ok"; 3], "allowed forms: {got:?}");
    wait_for(
        Duration::from_secs(5),
        "the allowed listener to read 3 greetings",
        || (allowed.accepted() == 3 && allowed.bytes() == 3 * "hello\n".len()).then_some(()),
    );
    assert_eq!(
        denied.accepted(),
        0,
        "the denied listener must receive nothing"
    );
    assert_eq!(denied.bytes(), 0);
}

#[test]
fn udp_sendto_and_connected_udp_are_refused_unless_allowed() {
    let _s = serial();
    let denied4 = UdpSink::new("127.0.0.1:0");
    let denied6 = UdpSink::new("[::1]:0");
    let allowed = UdpSink::new("127.0.0.1:0");
    let policy = format!(
        "policy:\n  name: dns\n  egress:\n    - to: 127.0.0.1\n      protocol: udp\n      ports: [{}]\n",
        allowed.port()
    );
    let d = TestDaemon::start(&[("p.yaml", &policy)]);
    let out = d.exec(
        "dns",
        None,
        &[
            &format!("udp-sendto 127.0.0.1:{} ping", denied4.port()),
            &format!("udp-sendto [::1]:{} ping", denied6.port()),
            &format!("udp-connect 127.0.0.1:{} ping", denied4.port()),
            &format!("udp-connect [::1]:{} ping", denied6.port()),
            &format!("udp-sendto 127.0.0.1:{} allowed", allowed.port()),
            &format!("udp-connect 127.0.0.1:{} again", allowed.port()),
        ],
    );
    let got = lines(&out);
    assert_eq!(
        got,
        [
            "err EPERM",
            "err EPERM",
            "err EPERM",
            "err EPERM",
            "ok",
            "ok"
        ],
        "{out:?}"
    );
    wait_for(
        Duration::from_secs(5),
        "two datagrams at the allowed listener",
        || {
            (allowed.datagrams() == 2 && allowed.bytes() == "allowed".len() + "again".len())
                .then_some(())
        },
    );
    assert_eq!(
        denied4.datagrams() + denied6.datagrams(),
        0,
        "denied listeners must receive nothing"
    );
}

#[test]
fn raw_sockets_are_refused_in_enforced_cgroups_only() {
    let _s = serial();
    let d = TestDaemon::start(&[(
        "p.yaml",
        "policy:\n  name: open\n  egress:\n    - to: 0.0.0.0/0\n",
    )]);
    // The same binary outside any enforced cgroup, as root, may open raw sockets.
    let control = std::process::Command::new(netprobe_bin())
        .args(["raw4", "raw6"])
        .output()
        .unwrap();
    assert_eq!(
        lines(&control),
        ["ok", "ok"],
        "control run outside enforcement"
    );
    let events = d.events();
    // Root's capabilities kept, so that the kernel's own check passes and the program's
    // refusal is what is seen (a confined root agent has no CAP_NET_RAW at all).
    let out = d.exec_privileged("open", &["raw4", "raw6"]);
    assert_eq!(lines(&out), ["err EPERM", "err EPERM"], "{out:?}");
    let evs = events.drain(Duration::from_millis(300));
    let raw: Vec<_> = evs.iter().filter(|e| e.hook == "sock_create").collect();
    assert_eq!(raw.len(), 2, "{evs:#?}");
    assert!(
        raw.iter()
            .all(|e| e.verdict == "deny" && e.reason == "raw_socket" && e.comm == "aw-netprobe")
    );
    assert!(d.counter("raw_socket_denied") >= 2);
}

#[test]
fn every_verdict_is_one_event_with_its_fields() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))]);
    let events = d.events();
    // The allowed destination four times: after the first, the connects of a CPU that judged
    // it are answered from the decision cache, and must be reported the same.
    let to_allowed = format!("tcp 127.0.0.1:{}", allowed.port());
    let out = d.exec(
        "web",
        None,
        &[
            "pid",
            &to_allowed,
            &to_allowed,
            &to_allowed,
            &to_allowed,
            &format!("tcp 127.0.0.2:{}", denied.port()),
            &format!("tcp [::ffff:127.0.0.3]:{}", denied.port()),
        ],
    );
    let got = lines(&out);
    assert_eq!(got[1..], ["ok", "ok", "ok", "ok", "err EPERM", "err EPERM"]);
    let pid: u32 = got[0].parse().unwrap();
    let evs: Vec<_> = events
        .drain(Duration::from_millis(500))
        .into_iter()
        .filter(|e| e.tgid == pid)
        .collect();
    let connects: Vec<_> = evs.iter().filter(|e| e.hook == "connect4").collect();
    assert_eq!(connects.len(), 5, "one event per connect verdict: {evs:#?}");
    let (allow, deny) = (connects[0], connects[4]);
    for again in &connects[1..4] {
        let untimed = |e: &EventRecord| EventRecord {
            time: String::new(),
            ..e.clone()
        };
        assert_eq!(
            untimed(again),
            untimed(allow),
            "a repeated verdict reads the same"
        );
    }
    assert_eq!(
        (allow.verdict.as_str(), allow.reason.as_str()),
        ("allow", "rule")
    );
    assert_eq!(allow.port, allowed.port());
    assert_eq!(allow.dst, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(allow.dst_given, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(allow.protocol, "tcp");
    assert_eq!(allow.policy.as_deref(), Some("web"));
    assert!(allow.rule_id > 0);
    let rule = allow.rule.as_deref().unwrap();
    assert!(
        rule.ends_with("p.yaml:4"),
        "rule {rule} must name the file and line of the rule"
    );
    assert_eq!(
        (deny.verdict.as_str(), deny.reason.as_str()),
        ("deny", "no_rule")
    );
    assert_eq!(deny.port, denied.port());
    assert_eq!(deny.rule_id, 0);
    // A loopback alias is judged as the loopback address it reaches, and reported as given.
    assert_eq!(deny.dst, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(deny.dst_given, Some("127.0.0.2".parse().unwrap()));
    assert_eq!(deny.comm, "aw-netprobe");
    assert_eq!(deny.pid, pid, "single-threaded helper: pid == tgid");
    assert_eq!(allow.cgroup_id, deny.cgroup_id);
    assert_ne!(deny.cgroup_id, 0);
    assert_eq!(allow.generation, deny.generation);
    // The same over IPv6, with an IPv4-mapped address: the four address words in order.
    let six: Vec<_> = evs.iter().filter(|e| e.hook == "connect6").collect();
    assert_eq!(six.len(), 1, "{evs:#?}");
    assert_eq!(
        (six[0].verdict.as_str(), six[0].reason.as_str(), six[0].port),
        ("deny", "no_rule", denied.port())
    );
    assert_eq!(six[0].dst, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(six[0].dst_given, Some("127.0.0.3".parse().unwrap()));
    assert_eq!(six[0].comm, "aw-netprobe");
    // Creating an ordinary socket is not a verdict (policy applies per flow); no other event.
    assert_eq!(evs.len(), 6, "{evs:#?}");
}

#[test]
fn an_unprivileged_process_cannot_leave_its_cgroup() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    let mount = agentwall_tests::cgroup_mount();
    let sibling = d.root_cgroup().join("elsewhere");
    fs::create_dir(&sibling).unwrap();
    let out = d.exec(
        "web",
        Some("nobody"),
        &[
            "cgroup",
            &format!("join-cgroup {}", mount.display()),
            &format!("join-cgroup {}", sibling.display()),
            &format!("join-cgroup {}", d.root_cgroup().display()),
            "cgroup",
            &format!("tcp 127.0.0.1:{}", denied.port()),
        ],
    );
    let got = lines(&out);
    assert!(
        got[0].starts_with(&format!("/{}/exec-", d.cgroup_root)),
        "{got:?}"
    );
    assert_eq!(
        got[1..4],
        ["err EACCES", "err EACCES", "err EACCES"],
        "{got:?}"
    );
    assert_eq!(got[4], got[0], "still in its own cgroup");
    assert_eq!(got[5], "err EPERM", "and still enforced");
    fs::remove_dir(&sibling).unwrap();
}

#[test]
fn a_cgroup_without_binding_is_denied_and_counted() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))]);
    let before = d.counter("no_binding");
    // A cgroup in the enforced subtree that agentwall never bound: programs apply, no rule.
    let cg = Cgroup::at(d.root_cgroup().join("unbound"));
    cg.create().unwrap();
    let out_file = d.dir.join("unbound.out");
    let script = format!(
        "exec {} 'tcp 127.0.0.1:{}' > {}",
        netprobe_bin().display(),
        allowed.port(),
        out_file.display()
    );
    let cmd = spawn::Command::new("/bin/sh", ["-c".to_string(), script]);
    let fd = cg.open().unwrap();
    let pid = spawn::spawn_in_cgroup(&cmd, fd.as_fd()).unwrap().pid;
    assert_eq!(spawn::exit_code(spawn::wait(pid).unwrap()), 0);
    assert_eq!(fs::read_to_string(&out_file).unwrap().trim(), "err EPERM");
    wait_for(
        Duration::from_secs(2),
        "no_binding to count the denial",
        || (d.counter("no_binding") > before).then_some(()),
    );
    assert_eq!(
        allowed.accepted(),
        0,
        "an allowed port of some policy is still denied without a binding"
    );
    cg.remove_tree().unwrap();
}

#[test]
fn quarantine_blocks_the_next_connect_and_stops_an_open_stream() {
    let _s = serial();
    // Over IPv4, IPv6 and IPv4-mapped IPv6 (an AF_INET6 socket): the socket search covers
    // both families.
    let sink = TcpSink::new("[::]:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[sink.port()]))]);
    for (n, host) in ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"]
        .into_iter()
        .enumerate()
    {
        let to = format!("{host}:{}", sink.port());
        let mut repl = d.repl("web");
        let cgroup = repl.cmd("cgroup");
        assert_eq!(repl.cmd(&format!("stream {to}")), "ok", "{host}");
        sink.wait_flowing();
        let out = d.cli(&["quarantine", cgroup.trim_start_matches('/')]);
        assert!(out.status.success(), "{out:?}");
        sink.assert_stopped("once the cgroup is quarantined");
        // The open socket was destroyed: the agent's write fails and the listener sees the
        // end (the reset passes the backstop, which drops everything else of the cgroup).
        assert_eq!(repl.cmd("stream-end 3000"), "err ECONNABORTED", "{host}");
        wait_for(
            Duration::from_secs(5),
            "the listener to see the stream end",
            || (sink.ended() > n).then_some(()),
        );
        assert_eq!(repl.cmd(&format!("tcp {to}")), "err EPERM", "{host}");
        let out = d.cli(&["quarantine", "--lift", cgroup.trim_start_matches('/')]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(repl.cmd(&format!("tcp {to}")), "ok", "{host}");
        assert_eq!(repl.quit(), Some(0));
    }
}

#[test]
fn exec_returns_the_exit_code_and_its_cgroup_goes_away() {
    let _s = serial();
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    let out = d.exec("web", None, &["cgroup", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let cgroup = lines(&out)[0].clone();
    let dir = agentwall_tests::cgroup_mount().join(cgroup.trim_start_matches('/'));
    wait_for(
        Duration::from_secs(5),
        "the exec cgroup to be removed",
        || (!dir.exists()).then_some(()),
    );
    let out = d.cli(&["exec", "--policy", "nope", "--", "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no policy named \"nope\"") && err.contains("web"),
        "{err}"
    );
}

#[test]
fn audit_mode_lets_denials_through_and_reports_them() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", "policy:\n  name: watch\n  mode: audit\n")]);
    let events = d.events();
    let out = d.exec("watch", None, &[&format!("tcp 127.0.0.1:{}", sink.port())]);
    assert_eq!(lines(&out), ["ok"]);
    let evs = events.drain(Duration::from_millis(500));
    assert!(
        evs.iter().any(|e| e.hook == "connect4"
            && e.verdict == "allow"
            && e.reason == "audit"
            && e.port == sink.port()),
        "{evs:#?}"
    );
    assert!(d.counter("audit_passed") >= 1);
}

#[test]
fn curl_under_exec_reaches_the_allowed_port_and_gets_operation_not_permitted_elsewhere() {
    let _s = serial();
    let http = HttpSink::new();
    let denied = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[http.port()]))]);
    let ok = d.cli(&[
        "exec",
        "--policy",
        "web",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{}/", http.port()),
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout), HttpSink::BODY);
    let no = d.cli(&[
        "exec",
        "--policy",
        "web",
        "--",
        "curl",
        "-sSv",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{}/", denied.port()),
    ]);
    assert_eq!(
        no.status.code(),
        Some(7),
        "curl's 'could not connect': {no:?}"
    );
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(denied.accepted(), 0);
}

#[test]
fn a_reload_that_takes_a_permission_away_stops_an_open_stream() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[sink.port()]))]);
    let mut repl = d.repl("web");
    assert_eq!(repl.cmd(&format!("stream 127.0.0.1:{}", sink.port())), "ok");
    sink.wait_flowing();
    // The stream's packets pass through the per-CPU flow cache by now; a new generation
    // without the port must stop them all the same.
    d.write_policy("p.yaml", &tcp_policy("web", &[1]));
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    sink.assert_stopped("once the policy no longer allows the flow");
    assert_eq!(
        repl.cmd(&format!("tcp 127.0.0.1:{}", sink.port())),
        "err EPERM"
    );
    // And a reload that grants it again lets new connections through.
    d.write_policy("p.yaml", &tcp_policy("web", &[sink.port()]));
    assert!(d.cli(&["reload"]).status.success());
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{}", sink.port())), "ok");
}

/// An agent in a network namespace other than the daemon's (a container's): the daemon's
/// socket search in its own namespace does not list the agent's sockets, so it searches the
/// namespaces the cgroup's processes are in. The listener, outside the enforced cgroup, makes
/// the namespace (its loopback only); the agent joins it and streams to it.
#[test]
fn quarantine_cuts_an_open_stream_in_the_agents_own_network_namespace() {
    let _s = serial();
    // Any port: the namespace is new. The same one in the daemon's namespace stays closed, so
    // a connect that went there would fail, not reach the listener.
    let port = 47_613;
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[port]))]);
    let mut host = agentwall_tests::Repl::spawn({
        let mut c = std::process::Command::new(agentwall_tests::netprobe_bin());
        c.arg("repl");
        c
    });
    assert_eq!(host.cmd("unshare-net"), "ok");
    let to = format!("127.0.0.1:{port}");
    assert_eq!(host.cmd(&format!("listen {to}")), "ok");
    let netns = format!("/proc/{}/ns/net", host.cmd("pid"));

    // Joining another network namespace takes root's capabilities.
    let mut agent = d.repl_under(&["--policy", "web", "--keep-privileges"]);
    let cgroup = agent.cmd("cgroup");
    assert_eq!(agent.cmd(&format!("join-net {netns}")), "ok");
    assert_eq!(agent.cmd(&format!("stream {to}")), "ok");
    assert_eq!(agent.cmd("stream-end 300"), "running", "the stream flows");
    let out = d.cli(&["quarantine", cgroup.trim_start_matches('/')]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent.cmd("stream-end 3000"), "err ECONNABORTED");
    assert_eq!(agent.cmd(&format!("tcp {to}")), "err EPERM");
}

/// ICMP is judged by the egress backstop: an echo request sent on a ping socket passes no
/// address hook, so the egress program drops it unless a rule allows icmp to the destination
/// (over IPv4 the send fails with EPERM; over IPv6 the kernel does not report the drop to the
/// sender, and the reply never comes). The probe runs in a network namespace of its own, where it
/// may open ping sockets without touching the host's settings.
#[test]
fn icmp_echo_is_dropped_by_the_backstop_unless_a_rule_allows_it() {
    let _s = serial();
    let pinger = "policy:\n  name: pinger\n  egress:\n    - to: [127.0.0.1, \"::1\"]\n      protocol: icmp\n";
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1])), ("q.yaml", pinger)]);
    let events = d.events();
    let pings = ["unshare-net", "ping-allow", "ping 127.0.0.1", "ping ::1"];
    let out = d.exec_privileged("web", &pings);
    // The ICMPv6 send path does not hand the drop back to the sender: no reply comes.
    assert_eq!(
        lines(&out),
        ["ok", "ok", "err EPERM", "err timeout"],
        "{out:?}"
    );
    let drops: Vec<_> = events
        .drain(Duration::from_millis(500))
        .into_iter()
        .filter(|e| e.hook == "egress" && e.verdict == "deny")
        .map(|e| (e.protocol, e.dst_given.map(|a| a.to_string()), e.reason))
        .collect();
    // Reported as sent (the judged destination is loopback's canonical 127.0.0.1 for both).
    for (proto, dst) in [("icmp", "127.0.0.1"), ("icmpv6", "::1")] {
        assert!(
            drops.contains(&(proto.into(), Some(dst.into()), "no_rule".into())),
            "a {proto} drop to {dst} reported: {drops:?}"
        );
    }
    let out = d.exec_privileged("pinger", &pings);
    assert_eq!(lines(&out), ["ok", "ok", "ok", "ok"], "{out:?}");
}

/// Ports mean TCP and UDP: a rule for any protocol that names ports does not admit a ping
/// socket's connect, whose "port" is a number of the caller's choosing.
#[test]
fn an_any_protocol_rule_with_ports_admits_no_ping_connect() {
    let _s = serial();
    let dns = "policy:\n  name: dns\n  egress:\n    - to: 127.0.0.1\n      protocol: any\n      ports: [53]\n";
    let d = TestDaemon::start(&[("p.yaml", dns)]);
    let out = d.exec_privileged(
        "dns",
        &[
            "unshare-net",
            "ping-allow",
            "ping-connect 127.0.0.1:53",
            "ping-connect 127.0.0.1:54",
            "udp-connect 127.0.0.1:53 x",
        ],
    );
    assert_eq!(
        lines(&out),
        ["ok", "ok", "err EPERM", "err EPERM", "ok"],
        "{out:?}"
    );
}

/// The flow cache vouches for a socket's destination, not for the socket: a ping socket
/// connected to an allowed address that sends elsewhere (its sendto passes no address hook)
/// is judged by the backstop. The other address is on loopback of a network namespace of the
/// probe's own, so nothing leaves the machine either way.
#[test]
fn a_connected_ping_socket_cannot_send_past_its_destination() {
    let _s = serial();
    let pinger = "policy:\n  name: pinger\n  egress:\n    - to: 127.0.0.1\n      protocol: icmp\n";
    let d = TestDaemon::start(&[("p.yaml", pinger)]);
    let out = d.exec_privileged(
        "pinger",
        &[
            "unshare-net",
            "ping-allow",
            "lo-alias 192.0.2.1",
            "ping-via 127.0.0.1:0 127.0.0.1",
            "ping-via 127.0.0.1:0 192.0.2.1",
            "ping 192.0.2.1",
        ],
    );
    assert_eq!(
        lines(&out),
        ["ok", "ok", "ok", "ok", "err EPERM", "err EPERM"],
        "{out:?}"
    );
}

/// A packet whose header may not name its final destination (IPv4 options can hold a source
/// route) is judged in full, even on a socket whose flow is cached, and denied.
#[test]
fn packets_with_ip_options_are_denied_even_on_an_allowed_flow() {
    let _s = serial();
    let sink = UdpSink::new("127.0.0.1:0");
    let policy = format!(
        "policy:\n  name: u\n  egress:\n    - to: 127.0.0.1\n      protocol: udp\n      ports: [{}]\n",
        sink.port()
    );
    let d = TestDaemon::start(&[("p.yaml", &policy)]);
    let events = d.events();
    let to = format!("127.0.0.1:{}", sink.port());
    let out = d.exec(
        "u",
        None,
        &[
            &format!("udp-connect {to} plain"),
            &format!("udp-options {to} optioned"),
        ],
    );
    assert_eq!(lines(&out), ["ok", "err EPERM"], "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sink.datagrams(), 1, "only the plain datagram arrived");
    let seen = events.drain(Duration::from_millis(500));
    assert!(
        seen.iter()
            .any(|e| e.hook == "egress" && e.verdict == "deny" && e.reason == "ip_options"),
        "{seen:?}"
    );
}

/// A connected UDP send with a packet-info control message reaches sendmsg4/6 without an
/// address; it is judged by the socket's real destination (it was judged as loopback port 0,
/// and denied).
#[test]
fn a_connected_udp_send_with_pktinfo_is_judged_by_its_destination() {
    let _s = serial();
    let (v4, v6) = (UdpSink::new("127.0.0.1:0"), UdpSink::new("[::1]:0"));
    let policy = format!(
        "policy:\n  name: u\n  egress:\n    - to: [127.0.0.1, \"::1\"]\n      protocol: udp\n      ports: [{}, {}]\n",
        v4.port(),
        v6.port()
    );
    let d = TestDaemon::start(&[("p.yaml", &policy)]);
    let events = d.events();
    let out = d.exec(
        "u",
        None,
        &[
            &format!("udp-pktinfo 127.0.0.1:{} four", v4.port()),
            &format!("udp-pktinfo [::1]:{} six", v6.port()),
        ],
    );
    assert_eq!(lines(&out), ["ok", "ok"], "{out:?}");
    wait_for(Duration::from_secs(2), "both datagrams", || {
        (v4.datagrams() == 1 && v6.datagrams() == 1).then_some(())
    });
    let judged: Vec<_> = events
        .drain(Duration::from_millis(500))
        .into_iter()
        .filter(|e| e.hook.starts_with("sendmsg"))
        .map(|e| (e.hook, e.verdict, e.port))
        .collect();
    assert!(
        judged.contains(&("sendmsg4".into(), "allow".into(), v4.port()))
            && judged.contains(&("sendmsg6".into(), "allow".into(), v6.port())),
        "{judged:?}"
    );
    // Only an address that is zero throughout stands for the peer: IPv4's udp_sendmsg sends
    // to an AF_UNSPEC address that names a host and port, judged as given (a denied port).
    let denied = UdpSink::new("127.0.0.1:0");
    let out = d.exec(
        "u",
        None,
        &[&format!(
            "udp-unspec 127.0.0.1:{} 127.0.0.1:{} leak",
            v4.port(),
            denied.port()
        )],
    );
    assert_eq!(lines(&out), ["err EPERM"], "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(denied.datagrams(), 0);
}

/// Removes the pins of an enforcer a test loaded itself, even when the test fails.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = agentwall::enforce::teardown(&self.0);
    }
}

/// Cache entries hold the epoch they were made under, and a u32 epoch comes back to every
/// value: an entry that lived through a whole round would allow again for a binding long
/// gone. The round is jumped over here (`set_epoch`); the probe runs on one CPU, whose
/// per-CPU cache the first connect filled.
#[test]
fn a_cached_verdict_does_not_outlive_a_round_of_the_epoch() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let mount = agentwall::cgroup::cgroup2_mount().unwrap();
    let name = format!("awt-{}-epoch", std::process::id());
    let cg = agentwall_tests::CgroupGuard(Cgroup::under(&mount, &name).unwrap());
    cg.0.create().unwrap();
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(&name));
    let (mut e, _ring) =
        agentwall::enforce::Enforcer::load(&pins.0, &agentwall::config::Limits::default()).unwrap();
    let text = tcp_policy("p", &[sink.port()]);
    let set = agentwall::policy::parse_texts(&[("p.yaml".into(), text)]).unwrap();
    e.apply(&agentwall::policy::compile(&set, |_| 1).unwrap())
        .unwrap();
    let id = e.attach(&cg.0, &mount).unwrap();
    let connect = || {
        let script = format!(
            "taskset -c 0 {} 'tcp 127.0.0.1:{}' | grep -qx ok",
            netprobe_bin().display(),
            sink.port()
        );
        let cmd = spawn::Command::new("/bin/sh", ["-c".to_string(), script]);
        let fd = cg.0.open().unwrap();
        let pid = spawn::spawn_in_cgroup(&cmd, fd.as_fd()).unwrap().pid;
        spawn::exit_code(spawn::wait(pid).unwrap()) == 0
    };
    e.set_epoch(u32::MAX - 2).unwrap();
    let binding = agentwall_common::binding::Binding {
        slot: 1,
        flags: 0,
        expires_boot_ns: 0,
    };
    e.bind(id, binding).unwrap();
    assert!(connect(), "allowed, and cached under epoch MAX - 1");
    e.unbind(id).unwrap();
    assert!(!connect(), "no binding, no connect");
    // 2^32 - 1 bumps later the epoch is MAX - 1 again.
    e.set_epoch(u32::MAX - 1).unwrap();
    assert!(!connect(), "the verdict cached a round ago answered again");
}

/// The verifier follows every path of a program, up to 1,000,000 instructions, and refuses
/// a program past that. Every program here stays below half of it, so that a change that
/// doubles a program's paths fails here and not on a kernel that counts differently.
#[test]
fn every_program_stays_below_half_the_verifiers_limit() {
    let _s = serial();
    let name = format!("awt-{}-verified", std::process::id());
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(&name));
    let (e, _ring) =
        agentwall::enforce::Enforcer::load(&pins.0, &agentwall::config::Limits::default()).unwrap();
    let counts = e.verified_instructions();
    eprintln!("{counts:?}");
    let connect = counts.iter().find(|(n, _)| n == "aw_connect4");
    assert!(
        connect.is_some_and(|(_, c)| c.is_some()),
        "the kernel reports the count: {counts:?}"
    );
    for (name, count) in &counts {
        if let Some(c) = count {
            assert!(*c < 500_000, "{name}: {c} instructions verified");
        }
    }
}
