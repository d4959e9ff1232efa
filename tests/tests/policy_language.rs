//! The agent policy language in the kernel: rules that name catalog services, and their rate
//! limits, taken per identity by real connects to real listeners. Run as root, one at a time
//! (`cargo xtask test`).

use std::time::{Duration, Instant};

use agentwall_tests::{TcpSink, TestDaemon, UdpSink, lines, serial, tcp_policy, wait_for};

/// A catalog with one service on loopback, at `port`.
fn catalog(name: &str, protocol: &str, port: u16) -> String {
    format!(
        "kind: Service\nservice:\n  name: {name}\n  endpoints:\n    - to: 127.0.0.1\n      protocol: {protocol}\n      ports: [{port}]\n"
    )
}

#[test]
fn the_eleventh_connect_within_a_minute_to_a_ten_per_minute_service_gets_eperm() {
    let _s = serial();
    let slack = TcpSink::new("127.0.0.1:0");
    let policy = "\
kind: Policy
policy:
  name: pipeline
  rules:
    - resource: service:slack
      actions: [write:message]
      conditions: { channels: [\"#alerts\"] }
      rateLimit: 10 per minute
";
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("slack", "tcp", slack.port())),
        ("pipeline.yaml", policy),
    ]);
    let events = d.events();
    let to = format!("tcp 127.0.0.1:{}", slack.port());
    let out = d.exec("pipeline", None, &[to.as_str(); 11]);
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    assert_eq!(got[..10], ["ok"; 10], "the first ten: {got:?}");
    assert_eq!(got[10], "err EPERM", "the eleventh: {got:?}");
    agentwall_tests::wait_for(
        Duration::from_secs(5),
        "the listener to accept the ten",
        || (slack.accepted() == 10).then_some(()),
    );
    // The bucket is the identity's, not the process's: another process of the same policy
    // finds it empty too.
    let again = d.exec("pipeline", None, &[&to]);
    assert_eq!(lines(&again), ["err EPERM"]);
    assert_eq!(
        slack.accepted(),
        10,
        "nothing past the limit reached the listener"
    );
    // Each refusal names the rule, which leads to its line.
    let evs = events.drain(Duration::from_millis(500));
    let refused: Vec<_> = evs
        .iter()
        .filter(|e| e.hook == "connect4" && e.verdict == "deny")
        .collect();
    assert_eq!(refused.len(), 2, "{evs:#?}");
    for e in &refused {
        assert_eq!(e.reason, "rate_limited");
        assert!(
            e.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("pipeline.yaml:5")),
            "{e:?}"
        );
    }
    assert_eq!(d.counter("rate_limited"), 2);
    assert_eq!(d.counter("condition_errors"), 0);

    // A reload that keeps the rule keeps its bucket (and its rule id may change).
    d.write_policy(
        "pipeline.yaml",
        &format!("{policy}    - resource: cidr:127.0.0.2\n      protocol: tcp\n      ports: [9]\n"),
    );
    assert!(d.cli(&["reload"]).status.success());
    let after = d.exec("pipeline", None, &[&to]);
    assert_eq!(lines(&after), ["err EPERM"], "a reload does not refill");
    // One that changes the rate starts a new bucket.
    d.write_policy(
        "pipeline.yaml",
        &policy.replace("10 per minute", "2 per hour"),
    );
    assert!(d.cli(&["reload"]).status.success());
    let fresh = d.exec("pipeline", None, &[&to, &to, &to]);
    assert_eq!(lines(&fresh), ["ok", "ok", "err EPERM"]);
}

#[test]
fn a_rate_limited_rule_in_audit_mode_lets_the_excess_through_and_reports_it() {
    let _s = serial();
    let db = TcpSink::new("127.0.0.1:0");
    let dns = UdpSink::new("127.0.0.1:0");
    let policy = format!(
        "\
policy:
  name: pipeline
  rules:
    - resource: service:analytics-db
      rateLimit: 2 per hour
      mode: audit
    - resource: cidr:127.0.0.1
      protocol: udp
      ports: [{}]
      rateLimit: 1 per hour
",
        dns.port()
    );
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("analytics-db", "tcp", db.port())),
        ("pipeline.yaml", &policy),
    ]);
    let events = d.events();
    let tcp = format!("tcp 127.0.0.1:{}", db.port());
    let udp = format!("udp-sendto 127.0.0.1:{} x", dns.port());
    let out = d.exec("pipeline", None, &[&tcp, &tcp, &tcp, &udp, &udp]);
    // Audit mode passes the third connect; the enforced UDP limit refuses the second send.
    assert_eq!(lines(&out), ["ok", "ok", "ok", "ok", "err EPERM"]);
    agentwall_tests::wait_for(
        Duration::from_secs(5),
        "three connects and one datagram",
        || (db.accepted() == 3 && dns.datagrams() == 1).then_some(()),
    );
    let evs = events.drain(Duration::from_millis(500));
    let audited: Vec<_> = evs.iter().filter(|e| e.reason == "rate_audit").collect();
    assert_eq!(audited.len(), 1, "{evs:#?}");
    assert_eq!(audited[0].verdict, "allow");
    assert_eq!(audited[0].port, db.port());
    assert!(d.counter("audit_passed") >= 1);
    assert!(
        evs.iter()
            .any(|e| e.reason == "rate_limited" && e.port == dns.port() && e.protocol == "udp"),
        "{evs:#?}"
    );
}

/// Threads on every CPU connect at once to one rate-limited service: exactly the limit gets
/// through. (The window in which two CPUs could both take the last token is too short for
/// connects to hit it reliably; `Limit::take`'s unit test plays that interleaving.)
#[test]
fn racing_threads_on_every_cpu_get_no_more_than_the_limit() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let policy = "\
policy:
  name: racer
  rules:
    - resource: service:api
      rateLimit: 200 per hour
";
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("api", "tcp", sink.port())),
        ("racer.yaml", policy),
    ]);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    let race = format!("tcp-race 127.0.0.1:{} {threads} 200", sink.port());
    let out = d.exec("racer", None, &[&race]);
    let got = lines(&out);
    let total = threads * 200;
    assert_eq!(
        got,
        [format!("ok=200 eperm={} other=0", total - 200)],
        "{out:?}"
    );
    assert_eq!(
        d.counter("condition_errors"),
        0,
        "no bucket stayed contended"
    );
}

/// A rule with a time window grants only inside it: it opens and closes on the daemon's test
/// clock, which starts a few seconds before the window.
#[test]
fn a_time_window_opens_and_closes_on_the_injected_clock() {
    let _s = serial();
    let api = TcpSink::new("127.0.0.1:0");
    let policy = "\
policy:
  name: nightly
  rules:
    - resource: service:api
      when:
        days: daily
        hours: \"09:00:00-09:00:04\"
        timezone: UTC
";
    let mut d = TestDaemon::prepare(
        &[
            ("catalog.yaml", &catalog("api", "tcp", api.port())),
            ("nightly.yaml", policy),
        ],
        None,
    );
    // The window opens 8 s after the daemon starts and stays open 4 s.
    let mut c = d.run_command();
    c.args(["--test-wall-clock", "2026-12-07T08:59:52Z"]);
    d.launch_command(c);
    d.wait_healthy();
    let events = d.events();
    let mut repl = d.repl("nightly");
    let to = format!("tcp 127.0.0.1:{}", api.port());
    let start = Instant::now();
    let mut seen: Vec<(String, Duration)> = Vec::new();
    // Connect every 100 ms until the window has opened and closed again (at most 30 s).
    while start.elapsed() < Duration::from_secs(30) {
        let got = repl.cmd(&to);
        if seen.last().is_none_or(|(last, _)| *last != got) {
            if got == "ok" {
                // A stream opened inside the window, to be cut when it closes.
                assert_eq!(repl.cmd(&format!("stream 127.0.0.1:{}", api.port())), "ok");
                api.wait_flowing();
            }
            seen.push((got, start.elapsed()));
        }
        if seen.len() == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let states: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(states, ["err EPERM", "ok", "err EPERM"], "{seen:?}");
    api.assert_stopped("once the window closed");
    let open_for = seen[2].1 - seen[1].1;
    assert!(
        open_for > Duration::from_secs(3) && open_for < Duration::from_secs(6),
        "open for {open_for:?}: {seen:?}"
    );
    let evs = events.drain(Duration::from_millis(500));
    assert!(
        evs.iter().any(|e| e.reason == "outside_window"
            && e.verdict == "deny"
            && e.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("nightly.yaml:4"))),
        "{evs:#?}"
    );
    assert!(d.counter("outside_window") >= 2);
    let _ = repl.quit();
}

/// A change to the policy directory is reloaded without a command; a broken file is refused
/// and the policy in force stays, until the file is fixed.
#[test]
fn a_change_to_the_policy_directory_is_reloaded_without_a_command() {
    let _s = serial();
    let (a, b) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[a.port()]))]);
    let generation = d.status().generation;
    let to = |p: u16| format!("tcp 127.0.0.1:{p}");
    d.write_policy("p.yaml", &tcp_policy("web", &[b.port()]));
    wait_for(Duration::from_secs(10), "the watcher's reload", || {
        (d.status().generation > generation).then_some(())
    });
    assert_eq!(
        lines(&d.exec("web", None, &[&to(b.port()), &to(a.port())])),
        ["ok", "err EPERM"]
    );
    // A broken file: refused, counted, and the policy in force stays.
    let in_force = d.status().generation;
    d.write_policy("q.yaml", "policy:\n  name: [broken\n");
    wait_for(Duration::from_secs(10), "the rejection", || {
        (d.status().daemon_errors.get("reload_rejected") == Some(&1)).then_some(())
    });
    assert_eq!(d.status().generation, in_force);
    assert_eq!(lines(&d.exec("web", None, &[&to(b.port())])), ["ok"]);
    assert!(d.log_text().contains("reload rejected"), "logged");
    // Fixed: taken.
    d.write_policy("q.yaml", &tcp_policy("other", &[1]));
    wait_for(
        Duration::from_secs(10),
        "the reload of the fixed file",
        || (d.status().generation > in_force).then_some(()),
    );
    assert_eq!(d.status().daemon_errors.get("reload_rejected"), Some(&1));
}

/// `policy explain` reads the compiled rules as the kernel does: over generated destinations
/// (loopback forms, ports around the edges of ranges, TCP and UDP, a closed window), its
/// verdict is the kernel's, connect by connect.
#[test]
fn explain_agrees_with_the_kernel_over_generated_destinations() {
    let _s = serial();
    // A window that is closed now: one minute, twelve hours away.
    let hour = (jiff::Timestamp::now().as_second() / 3600 + 12) % 24;
    let policy = format!(
        "\
policy:
  name: probe
  rules:
    - resource: cidr:127.0.0.0/24
      protocol: tcp
      ports: [\"20000-20099\"]
    - resource: cidr:127.0.0.1
      protocol: udp
      ports: [\"20050-20150\"]
    - resource: cidr:127.0.0.1
      ports: [\"21000-21010\"]
    - resource: cidr:127.0.0.1
      protocol: tcp
      ports: [\"22000-22010\"]
      when: {{ hours: \"{hour:02}:00-{hour:02}:01\", timezone: UTC }}
  egress:
    - to: \"::1\"
      protocol: tcp
      ports: [23000, 23001]
"
    );
    let d = TestDaemon::start(&[("probe.yaml", &policy)]);
    let set = agentwall::policy::load_dir(&d.policies).unwrap();
    let compiled = agentwall::policy::compile(&set, |_| 1).unwrap();
    // Destinations: every loopback form, ports at and around each range's edges.
    let forms = [
        "127.0.0.1",
        "127.0.0.9",
        "127.5.6.7",
        "0.0.0.0",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ];
    let mut ports = Vec::new();
    for edge in [
        20000u16, 20049, 20050, 20099, 20100, 20150, 20151, 21000, 21010, 21011, 22000, 22005,
        23000, 23001, 23002, 19999,
    ] {
        ports.push(edge);
    }
    let mut cmds = Vec::new();
    let mut expected = Vec::new();
    let mut seed = 0x9e37_79b9_u32;
    for i in 0..240 {
        // A small generator of its own, so that a failure reproduces.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let form = forms[(seed as usize) % forms.len()];
        let port = ports[(seed as usize / 7 + i) % ports.len()];
        let udp = seed.is_multiple_of(3);
        let host = form.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().unwrap();
        let proto = if udp {
            agentwall::policy::Protocol::Udp
        } else {
            agentwall::policy::Protocol::Tcp
        };
        let v = agentwall::policy::explain::kernel(
            &compiled,
            "probe",
            ip,
            port,
            proto,
            jiff::Timestamp::now(),
        );
        expected.push((
            format!("{form}:{port}/{}", if udp { "udp" } else { "tcp" }),
            v.allow,
        ));
        cmds.push(if udp {
            format!("udp-sendto {form}:{port} x")
        } else {
            format!("tcp {form}:{port}")
        });
    }
    let args: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = d.exec("probe", None, &args);
    let got = lines(&out);
    assert_eq!(got.len(), expected.len(), "{out:?}");
    let mut allowed = 0;
    for ((what, explained), kernel) in expected.iter().zip(&got) {
        let kernel_allows = kernel != "err EPERM";
        assert_eq!(
            *explained, kernel_allows,
            "{what}: explain says {explained}, the kernel {kernel}"
        );
        allowed += usize::from(kernel_allows);
    }
    assert!(
        allowed > 40 && allowed < 200,
        "both verdicts exercised: {allowed} allowed"
    );
}

/// `policy diff` between two git revisions of a policy directory, as a reviewer of a policy
/// pull request reads it, and as JSON.
#[test]
fn policy_diff_reads_git_revisions() {
    let repo = std::env::temp_dir().join(format!("aw-diff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(repo.join("policies")).unwrap();
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(
        repo.join("policies/catalog.yaml"),
        catalog("slack", "tcp", 443),
    )
    .unwrap();
    std::fs::write(
        repo.join("policies/p.yaml"),
        "policy:\n  name: pipe\n  identity: agent/pipe/prod\n  rules:\n    - resource: service:slack\n      actions: [write:message]\n",
    )
    .unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "one"]);
    std::fs::write(
        repo.join("policies/p.yaml"),
        "policy:\n  name: pipe\n  identity: agent/pipe/prod\n  rules:\n    - resource: service:slack\n      actions: [write:message]\n      rateLimit: 10 per minute\n",
    )
    .unwrap();
    git(&["commit", "-q", "-am", "two"]);
    let run = |args: &[&str]| {
        std::process::Command::new(agentwall_tests::agentwall_bin())
            .args(["policy", "diff"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap()
    };
    let out = run(&["HEAD~1", "HEAD"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        lines(&out),
        [
            "policy pipe (changed), identity agent/pipe/prod",
            "  + service:slack (127.0.0.1/32 tcp port 443): write:message; at most 10 per minute",
            "  - service:slack (127.0.0.1/32 tcp port 443): write:message",
            "1 policy: 1 access granted, 1 access removed",
        ]
    );
    // A revision against the working directory, as JSON.
    std::fs::remove_file(repo.join("policies/p.yaml")).unwrap();
    let out = run(&["HEAD", "policies", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["policy"], "pipe");
    assert_eq!(v[0]["change"], "removed");
    assert_eq!(v[0]["removed"].as_array().unwrap().len(), 1);
    let bad = run(&["nope", "HEAD"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is neither a directory nor a git revision"),
        "{bad:?}"
    );
    std::fs::remove_dir_all(&repo).unwrap();
}

/// An agent that serves: its policy's ingress rules say which peers may open connections to
/// which of its ports, in the kernel, and the replies on those connections pass without any
/// egress rule; a peer the rules do not name gets no connection, and the server cannot use its
/// listening port to reach out.
#[test]
fn ingress_rules_admit_named_peers_and_their_replies_and_nothing_else() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let _s = serial();
    let port = agentwall_tests::free_port();
    let other = TcpSink::new("127.0.0.1:0");
    let served = format!(
        "policy:\n  name: served\n  ingress:\n    - from: 127.0.0.1\n      ports: [{port}]\n"
    );
    let closed = "policy:\n  name: closed\n  ingress: []\n";
    let d = TestDaemon::start(&[("served.yaml", &served), ("closed.yaml", closed)]);
    let events = d.events();
    // An echo server, then (once its client is served) a connect out from its own port.
    let script = "import socket,sys\n\
p=int(sys.argv[1]); o=int(sys.argv[2])\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', p)); s.listen(4)\n\
print('listening', flush=True)\n\
s.settimeout(8)\n\
try:\n    c,_=s.accept(); c.sendall(c.recv(100)); c.close()\nexcept OSError as e:\n    print('accept', type(e).__name__, flush=True)\n\
x=socket.socket(); x.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
try:\n    x.connect(('127.0.0.1', o)); print('out ok', flush=True)\nexcept OSError as e:\n    print('out', e.errno, flush=True)\n";
    let serve = |policy: &str| {
        let mut c = std::process::Command::new(d.world_copy(&agentwall_tests::agentwall_bin()));
        c.arg("exec")
            .arg("--socket")
            .arg(&d.socket)
            .args(["--policy", policy, "--", "/usr/bin/python3", "-c", script])
            .arg(port.to_string())
            .arg(other.port().to_string())
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening");
        (child, out)
    };
    let call = || -> std::io::Result<String> {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };

    // Admitted: the handshake and the echo come back, with no egress rule.
    let (mut child, mut out) = serve("served");
    assert_eq!(call().unwrap(), "ping\n");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    // Its own listening port is no way out: the connect is judged as any other.
    assert_eq!(rest.trim(), "out 1", "EPERM for the connect out: {rest:?}");
    assert_eq!(other.accepted(), 0);

    // Refused: no peer is named, the connection never opens.
    let (mut child, mut out) = serve("closed");
    let refused = call();
    assert!(refused.is_err(), "{refused:?}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = child.wait();
    assert!(
        rest.contains("accept TimeoutError"),
        "the server saw no connection: {rest:?}"
    );
    assert!(d.counter("ingress_denied") >= 1);
    let evs = events.drain(Duration::from_millis(500));
    assert!(
        evs.iter()
            .any(|e| e.hook == "ingress" && e.verdict == "deny" && e.port == port),
        "{evs:#?}"
    );
    assert!(
        evs.iter().any(|e| e.hook == "ingress"
            && e.verdict == "allow"
            && e.port == port
            && e.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("served.yaml:4"))),
        "{evs:#?}"
    );
}

/// The reply rule is for sockets accepted from a listener only: a connection the agent made
/// out from its listening port, once its egress rule is gone, is not a reply and stops.
#[test]
fn a_connection_out_from_a_listening_port_is_no_reply() {
    let _s = serial();
    let port = agentwall_tests::free_port();
    let sink = TcpSink::new("127.0.0.1:0");
    let with_egress = format!(
        "policy:\n  name: leaky\n  ingress:\n    - from: 127.0.0.1\n      ports: [{port}]\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        sink.port()
    );
    let d = TestDaemon::start(&[("leaky.yaml", &with_egress)]);
    // From the listening port, out to the sink, for as long as it may.
    let script = "import socket,sys,time\n\
p=int(sys.argv[1]); o=int(sys.argv[2])\n\
x=socket.socket(); x.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); x.bind(('127.0.0.1', p))\n\
x.connect(('127.0.0.1', o)); print('connected', flush=True)\n\
end=time.time()+8\n\
while time.time()<end:\n    try:\n        x.send(b'x'*64)\n    except OSError:\n        pass\n    time.sleep(0.01)\n";
    let mut c = std::process::Command::new(d.world_copy(&agentwall_tests::agentwall_bin()));
    c.arg("exec")
        .arg("--socket")
        .arg(&d.socket)
        .args(["--policy", "leaky", "--", "/usr/bin/python3", "-c", script])
        .arg(port.to_string())
        .arg(sink.port().to_string())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    sink.wait_flowing();
    // The egress rule goes; the ingress rule for the same port stays.
    d.write_policy(
        "leaky.yaml",
        &format!(
            "policy:\n  name: leaky\n  ingress:\n    - from: 127.0.0.1\n      ports: [{port}]\n"
        ),
    );
    assert!(d.cli(&["reload"]).status.success());
    sink.assert_stopped("once the egress rule is gone: the socket connected out, it is no reply");
    let _ = child.kill();
    let _ = child.wait();
}

/// A SYN behind an IPv6 extension header (Destination Options) reaches the listener's TCP
/// all the same: ingress reads past nothing, so such a packet at a listener of a cgroup whose
/// policy judges ingress is dropped, and no half-open connection appears.
#[test]
fn a_syn_behind_an_ipv6_extension_header_is_dropped() {
    let _s = serial();
    let port = agentwall_tests::free_port();
    // Egress to every loopback port: a SYN-ACK would go out if the SYN got through.
    let policy = "policy:\n  name: closed\n  ingress: []\n  egress:\n    - to: \"::1\"\n      protocol: tcp\n";
    let d = TestDaemon::start(&[("closed.yaml", policy)]);
    let mut server = d.repl("closed");
    assert_eq!(server.cmd(&format!("listen [::1]:{port}")), "ok");
    // From outside the enforced cgroups: an IPv6 packet whose next header is Destination
    // Options (PadN), then a TCP SYN to the listener.
    let script = r#"
import socket, struct, sys
port = int(sys.argv[1])
src = socket.inet_pton(socket.AF_INET6, "::1")
tcp = struct.pack("!HHIIBBHHH", 40001, port, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = src + src + struct.pack("!I3xB", len(tcp), 6)
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
dstopts = bytes([6, 0, 1, 4, 0, 0, 0, 0])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_DSTOPTS)
for _ in range(3):
    s.sendto(dstopts + tcp, ("::1", 0))
print("sent")
"#;
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script, &port.to_string()])
        .output()
        .unwrap();
    assert_eq!(lines(&out), ["sent"], "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    let ss = std::process::Command::new("ss")
        .args(["-Htn", "state", "syn-recv", &format!("sport = :{port}")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ss.stdout).trim(),
        "",
        "no half-open connection on the listener"
    );
    assert!(d.counter("ingress_unparsed") >= 1);
    let _ = server.quit();
}
