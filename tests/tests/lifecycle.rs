//! The daemon's life: crashes, restarts, reloads, full maps and refusals to start. Enforcement
//! must hold through all of it, and nothing may fail open.

use std::{fs, os::fd::AsFd as _, os::unix::process::CommandExt as _, thread, time::Duration};

use agentwall::{cgroup::Cgroup, spawn};
use agentwall_tests::{TcpSink, TestDaemon, lines, netprobe_bin, serial, tcp_policy, wait_for};

#[test]
fn sigkill_keeps_enforcing_and_a_restart_adopts_without_a_gap() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let (a, x) = (allowed.port(), denied.port());
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[a]))]);
    let mut repl = d.repl("web");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{a}")), "ok");
    let links_before = d.root_links();
    // Eight cgroup programs (connect, sendmsg, egress, ingress, sockops, sock_create), and the
    // two Unix socket programs where the kernel has their hooks.
    let programs = if d.status().protections.unix_sockets {
        10
    } else {
        8
    };
    assert_eq!(links_before.len(), programs, "{links_before:?}");

    d.kill9();
    // Down: the pinned programs and maps still decide.
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{a}")), "ok");
    // A new cgroup in the subtree, never bound, is denied too while the daemon is down.
    let cg = Cgroup::at(d.root_cgroup().join("while-down"));
    cg.create().unwrap();
    let out_file = d.dir.join("down.out");
    let script = format!(
        "exec {} 'tcp 127.0.0.1:{a}' > {}",
        netprobe_bin().display(),
        out_file.display()
    );
    let pid = spawn::spawn_in_cgroup(
        &spawn::Command::new("/bin/sh", ["-c".to_string(), script]),
        cg.open().unwrap().as_fd(),
    )
    .unwrap()
    .pid;
    spawn::wait(pid).unwrap();
    assert_eq!(fs::read_to_string(&out_file).unwrap().trim(), "err EPERM");
    cg.remove_tree().unwrap();

    // Restart while the agent hammers the denied port: not one connect may get through.
    let watcher = thread::spawn(move || {
        let r = repl.cmd(&format!("watch 127.0.0.1:{x} 3000"));
        (repl, r)
    });
    thread::sleep(Duration::from_millis(300));
    d.launch();
    d.wait_healthy();
    let (mut repl, watched) = watcher.join().unwrap();
    assert!(
        watched.starts_with("ok=0 "),
        "a denied connect got through during the restart: {watched}"
    );
    let eperm: u64 = watched
        .split_whitespace()
        .find_map(|f| f.strip_prefix("eperm="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        eperm > 100,
        "the watcher must have been connecting throughout: {watched}"
    );
    assert_eq!(denied.accepted(), 0);

    // Adopted: same enforcement, new links in place of the old ones, the exec cgroup known.
    let links_after = d.root_links();
    assert_eq!(links_after.len(), programs, "{links_after:?}");
    assert!(
        links_after.iter().all(|l| !links_before.contains(l)),
        "old links must be replaced: {links_before:?} {links_after:?}"
    );
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{a}")), "ok");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    let cgroup = repl.cmd("cgroup");
    d.assert_under_policy(&cgroup, "web");
    assert_eq!(repl.quit(), Some(0));
    let dir = agentwall_tests::cgroup_mount().join(cgroup.trim_start_matches('/'));
    wait_for(
        Duration::from_secs(5),
        "the adopted cgroup to be collected",
        || (!dir.exists()).then_some(()),
    );
}

#[test]
fn sigterm_leaves_enforcement_in_place() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    let mut repl = d.repl("web");
    let st = d.stop();
    assert!(st.success(), "orderly stop: {st}");
    assert!(!d.socket.exists(), "the admin socket goes with the daemon");
    assert_eq!(
        repl.cmd(&format!("tcp 127.0.0.1:{}", denied.port())),
        "err EPERM"
    );
    assert_eq!(repl.quit(), Some(0));
}

/// The steps the daemon logged as it stopped (`stop step`, with the step's name), from its
/// JSON log lines or its text ones (ANSI styling removed).
fn stop_steps(log: &str) -> Vec<String> {
    let plain: String = {
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // An SGR sequence: ESC [ ... m
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    plain
        .lines()
        .filter(|l| l.contains("stop step"))
        .filter_map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) => v["step"].as_str().map(str::to_string),
            Err(_) => l
                .split("step=")
                .nth(1)
                .map(|s| s.trim().trim_matches('"').to_string()),
        })
        .collect()
}

/// An orderly stop takes its steps in one fixed order, whether a signal or a failed task
/// asked for it: the hard time limit first, then the runtime's tasks end (nothing collects,
/// renews or changes a hold while the daemon stops), the log ends with `daemon_stop` and is
/// sealed, and the socket files go last. The pinned programs keep enforcing throughout.
/// A stop or reload signal sent as soon as the daemon answers healthy (a service manager's
/// stop, an operator's reload) is handled: the daemon neither dies by the signal's default
/// action nor loses the reload.
#[test]
fn signals_right_after_healthy_are_handled() {
    use std::time::{Duration, Instant};
    let _s = serial();
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    d.stop_cleanly();
    for round in 0..10 {
        d.launch();
        let pid = d.pid().unwrap();
        // Polled without pause: the signal follows the first healthy answer at once.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.is_healthy() {
            assert!(Instant::now() < deadline, "not healthy:\n{}", d.log_text());
        }
        let sig = if round % 2 == 0 {
            nix::sys::signal::Signal::SIGHUP
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
        if sig == nix::sys::signal::Signal::SIGHUP {
            // Still there, and answering.
            std::thread::sleep(Duration::from_millis(200));
            let _ = d.status();
        }
        d.stop_cleanly();
    }
}

#[test]
fn an_orderly_stop_takes_its_steps_in_order() {
    const ORDER: [&str; 11] = [
        "limit",
        "tasks",
        "revocations",
        "leases",
        "summaries",
        "ring",
        "issuance",
        "baselines",
        "stop_record",
        "seal",
        "sockets",
    ];
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[1]))]);
    let mut repl = d.repl("web");
    let probe = format!("tcp 127.0.0.1:{}", denied.port());
    assert_eq!(repl.cmd(&probe), "err EPERM");
    d.stop_cleanly();
    let log = d.log_text();
    assert_eq!(stop_steps(&log), ORDER, "{log}");
    assert!(
        !log.contains("stopping the daemon"),
        "no task reported as failed while it was stopped: {log}"
    );
    assert!(!d.socket.exists());
    let (key, dir) = (
        d.audit_key().display().to_string(),
        d.audit_dir().display().to_string(),
    );
    let tail = d.cli(&["audit", "tail", &dir, "--key", &key, "-n", "1"]);
    let last: serde_json::Value =
        serde_json::from_str(lines(&tail).last().expect("a record")).unwrap();
    assert_eq!(last["record"]["kind"], "daemon_stop", "{tail:?}");
    assert_eq!(repl.cmd(&probe), "err EPERM", "enforced after the stop");
    // A task that dies stops the daemon the same way, with exit code 1.
    let mut c = d.run_command();
    c.env("AGENTWALL_TEST_FAULT", "gc");
    let out = d.run_refused_command(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(stop_steps(&err), ORDER, "{err}");
    assert_eq!(repl.cmd(&probe), "err EPERM");
    assert_eq!(repl.quit(), Some(0));
    assert_eq!(denied.accepted(), 0);
}

#[test]
fn invalid_policies_refuse_to_start_and_load_nothing() {
    let _s = serial();
    let d = TestDaemon::prepare(
        &[
            ("good.yaml", &tcp_policy("web", &[80])),
            (
                "bad.yaml",
                "policy:\n  name: bad\n  egress:\n    - to: 10.0.0.1/8\n",
            ),
        ],
        None,
    );
    let out = d.run_command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:4:11: policy.egress[0].to"),
        "file, line, column and field: {err}"
    );
    assert!(err.contains("did you mean 10.0.0.0/8?"), "{err}");
    assert!(d.nothing_pinned(), "nothing may be loaded into the kernel");
    assert!(!d.root_cgroup().exists());
}

#[test]
fn without_ebpf_the_daemon_exits_with_one_line() {
    let _s = serial();
    let mut d = TestDaemon::prepare(&[("p.yaml", &tcp_policy("web", &[80]))], None);
    // A daemon started by an unprivileged user, not by systemd: no unit's sandbox, which only
    // root could set up.
    d.without_unit();
    fs::create_dir_all(d.dir.join("state")).unwrap();
    let st = d.dir.join("state");
    nix::unistd::chown(&st, Some(65534.into()), Some(65534.into())).unwrap();
    // An unprivileged user cannot load programs: the daemon must say so and exit non-zero.
    let bin = d.world_copy(&agentwall_tests::agentwall_bin());
    let out = d
        .run_command_of(&bin)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let line = refusal(&out);
    assert!(line.starts_with("agentwall: cannot enforce: "), "{line}");
}

/// The one line a daemon that refused to start printed (JSON log lines aside); it must have
/// exited non-zero.
fn refusal(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let err_lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('{'))
        .collect();
    assert_eq!(err_lines.len(), 1, "exactly one line: {err}");
    err_lines[0].to_string()
}

#[test]
fn a_bad_reload_keeps_the_policy_in_force() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))]);
    let generation = d.status().generation;
    d.write_policy(
        "p.yaml",
        "policy:\n  name: web\n  egress:\n    - to: 127.0.0.1\n      ports: [99999]\n",
    );
    let out = d.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:5:15: policy.egress[0].ports[0]: 99999 is not a destination port"),
        "{err}"
    );
    let status = d.status();
    assert_eq!(
        status.generation, generation,
        "the generation must not change"
    );
    assert_eq!(status.daemon_errors.get("reload_rejected"), Some(&1));
    assert_eq!(
        lines(&d.exec("web", None, &[&format!("tcp 127.0.0.1:{}", allowed.port())])),
        ["ok"]
    );
    // The count of rule nodes the daemon keeps is the policy's, through a refused reload...
    let nodes = |text: &str| {
        let set = agentwall::policy::parse_texts(&[(d.policies.join("p.yaml"), text.to_string())])
            .unwrap();
        agentwall::policy::compile(&set, |_| 1).unwrap().nodes.len()
    };
    let first = tcp_policy("web", &[allowed.port()]);
    assert_eq!(status.rule_nodes, nodes(&first));
    // A good reload then takes effect, and the count follows it.
    let wider = format!(
        "{}    - to: 127.0.0.2\n      protocol: tcp\n      ports: [2]\n    - to: 10.9.0.0/16\n      protocol: udp\n      ports: [53]\n",
        tcp_policy("web", &[1])
    );
    d.write_policy("p.yaml", &wider);
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let status = d.status();
    assert_eq!(status.generation, generation + 1);
    assert_eq!(status.rule_nodes, nodes(&wider));
    assert_ne!(nodes(&wider), nodes(&first));
    assert_eq!(
        lines(&d.exec("web", None, &[&format!("tcp 127.0.0.1:{}", allowed.port())])),
        ["err EPERM"]
    );
}

#[test]
fn policy_swaps_are_atomic_under_load() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    // Many prefixes, so that each generation takes a while to write.
    let mut policy = tcp_policy("web", &[allowed.port()]);
    for i in 0..2000u32 {
        policy.push_str(&format!(
            "    - to: 10.{}.{}.0/24\n      protocol: tcp\n      ports: [443]\n",
            i / 256,
            i % 256
        ));
    }
    let d = TestDaemon::start(&[("p.yaml", &policy)]);
    let mut ok_repl = d.repl("web");
    let mut deny_repl = d.repl("web");
    let a = allowed.port();
    let x = denied.port();
    let w1 = thread::spawn(move || ok_repl.cmd(&format!("watch 127.0.0.1:{a} 3000")));
    let w2 = thread::spawn(move || deny_repl.cmd(&format!("watch 127.0.0.1:{x} 3000")));
    let start = d.status().generation;
    let mut reloads = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        let out = d.cli(&["reload"]);
        assert!(out.status.success(), "{out:?}");
        reloads += 1;
    }
    let (r1, r2) = (w1.join().unwrap(), w2.join().unwrap());
    assert!(reloads >= 3, "only {reloads} reloads");
    assert_eq!(d.status().generation, start + reloads);
    assert!(
        r1.contains(" eperm=0 other=0"),
        "an allowed connect was denied during a swap: {r1}"
    );
    assert!(
        r2.starts_with("ok=0 "),
        "a denied connect was allowed during a swap: {r2}"
    );
    assert_eq!(denied.accepted(), 0);
}

#[test]
fn a_full_bindings_map_refuses_exec_and_counts_it() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[sink.port()]))],
        Some("limits:\n  max_bindings: 2\n"),
    );
    let _r1 = d.repl("web");
    let _r2 = d.repl("web");
    let out = d.exec("web", None, &[&format!("tcp 127.0.0.1:{}", sink.port())]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "the command must not have run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot prepare a cgroup") && err.contains(agentwall_common::maps::BINDINGS),
        "{err}"
    );
    assert_eq!(d.status().daemon_errors.get("exec_begin"), Some(&1));
    assert_eq!(sink.accepted(), 0, "the refused command never ran");
}

#[test]
fn a_rules_map_too_small_rejects_the_reload() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some("limits:\n  max_rule_nodes: 3\n"),
    );
    let generation = d.status().generation;
    d.write_policy(
        "q.yaml",
        "policy:\n  name: wide\n  egress:\n    - to: [10.0.0.0/8, 11.0.0.0/8]\n",
    );
    let out = d.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("raise limits.max_rule_nodes"), "{err}");
    assert_eq!(d.status().generation, generation);
    assert_eq!(
        lines(&d.exec("web", None, &[&format!("tcp 127.0.0.1:{}", allowed.port())])),
        ["ok"]
    );
}

#[test]
fn the_admin_socket_answers_bad_requests_and_refuses_other_users() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let _s = serial();
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[80]))]);
    let mode = fs::metadata(&d.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "root only by default");
    for (request, expect) in [
        ("garbage\n", "bad request"),
        (
            "{\"op\":\"format_disk\"}\n",
            "unknown variant `format_disk`",
        ),
        ("{\"op\":\"exec_begin\",\"policy\":7}\n", "invalid type"),
        (
            "{\"op\":\"quarantine\",\"cgroup\":\"../../etc\",\"lift\":false}\n",
            "must be relative to the cgroup v2 mount",
        ),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(
            line.contains("\"type\":\"error\"") && line.contains(expect),
            "{request:?} -> {line}"
        );
    }
    let bin = d.world_copy(&agentwall_tests::agentwall_bin());
    let out = std::process::Command::new(bin)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the agentwall daemon") && err.contains("Permission denied"),
        "{err}"
    );
    // The daemon is unharmed.
    assert!(matches!(
        d.status().health,
        agentwall::control::Health::Healthy { .. }
    ));
}

#[test]
fn a_cgroup_named_in_the_config_is_attached_and_bound() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    // A cgroup of the test's own, outside the managed subtree, as a systemd unit's would be.
    let name = format!("awt-{}-unit", std::process::id());
    let extra =
        agentwall_tests::CgroupGuard(Cgroup::at(agentwall_tests::cgroup_mount().join(&name)));
    extra.0.create().unwrap();
    let config = format!("enforce:\n  - cgroup: {name}\n    policy: web\n");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    let out_file = d.dir.join("unit.out");
    let script = format!(
        "exec {} 'tcp 127.0.0.1:{}' 'tcp 127.0.0.1:{}' > {}",
        netprobe_bin().display(),
        allowed.port(),
        denied.port(),
        out_file.display()
    );
    let pid = spawn::spawn_in_cgroup(
        &spawn::Command::new("/bin/sh", ["-c".to_string(), script]),
        extra.0.open().unwrap().as_fd(),
    )
    .unwrap()
    .pid;
    spawn::wait(pid).unwrap();
    assert_eq!(
        fs::read_to_string(&out_file)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        ["ok", "err EPERM"]
    );
    let status = d.status();
    assert!(
        status.cgroups.iter().any(|c| c.path.ends_with(&name)
            && c.kind == "configured"
            && c.policy.as_deref() == Some("web")),
        "{status:#?}"
    );
    // The root cgroup is refused outright.
    let bad = TestDaemon::prepare(
        &[("p.yaml", &tcp_policy("web", &[80]))],
        Some("enforce:\n  - cgroup: /\n    policy: web\n"),
    );
    let out = bad.run_command().output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the root cgroup cannot be enforced"),
        "{out:?}"
    );
    drop(d);
    // After teardown the programs are gone from the extra cgroup too.
    let out_file = std::env::temp_dir().join(format!("{name}.out"));
    let pid = spawn::spawn_in_cgroup(
        &spawn::Command::new(
            "/bin/sh",
            [
                "-c".to_string(),
                format!(
                    "exec {} 'tcp 127.0.0.1:{}' > {}",
                    netprobe_bin().display(),
                    denied.port(),
                    out_file.display()
                ),
            ],
        ),
        extra.0.open().unwrap().as_fd(),
    )
    .unwrap()
    .pid;
    spawn::wait(pid).unwrap();
    let after = fs::read_to_string(&out_file).unwrap();
    let _ = fs::remove_file(&out_file);
    assert_eq!(after.trim(), "ok");
}

#[test]
fn metrics_show_health_and_verdicts_and_refuse_other_requests() {
    use agentwall_tests::{free_port, http, metric};
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&format!("metrics:\n  listen: {addr}\n")),
    );
    let scrape = || {
        let (code, text) = http(&addr, "GET", "/metrics");
        assert_eq!(code, 200, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        text
    };
    let m = scrape();
    assert_eq!(metric(&m, "agentwall_healthy"), Some(1.0), "{m}");
    assert!(m.contains("agentwall_build_info{version=\""), "{m}");
    openmetrics_parser_reads(&m);
    let series = "agentwall_kernel_denied_total";
    let before = metric(&m, series).unwrap_or(0.0);
    let mut repl = d.repl("web");
    assert_eq!(
        repl.cmd(&format!("tcp 127.0.0.1:{}", denied.port())),
        "err EPERM"
    );
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{}", allowed.port())), "ok");
    // Kernel counters are per-CPU sums read at each scrape.
    let after = metric(&scrape(), series).unwrap_or(0.0);
    assert!(after > before, "denied {before} -> {after}");
    assert!(
        metric(&scrape(), "agentwall_cgroups{state=\"enforced\"}") >= Some(1.0),
        "the repl's cgroup"
    );
    drop(repl);
    assert_eq!(http(&addr, "GET", "/nope").0, 404);
    assert_eq!(http(&addr, "POST", "/metrics").0, 405);
    // A second daemon configured on the same address cannot start, and says why.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    drop(d);
    let d2 = TestDaemon::prepare(
        &[("p.yaml", &tcp_policy("web", &[80]))],
        Some(&format!("metrics:\n  listen: 127.0.0.1:{port}\n")),
    );
    let out = d2.run_command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("metrics.listen 127.0.0.1:{port}: cannot listen")),
        "{err}"
    );
}

/// Text logs to a pipe or a file (the journal, a log collector) are plain lines: no colour
/// escapes, which only a terminal reads.
#[test]
fn text_logs_off_a_terminal_have_no_colour_escapes() {
    let _s = serial();
    let d = TestDaemon::prepare(&[("p.yaml", "policy:\n  name: [broken\n")], None);
    let out =
        d.run_refused_command(d.run_command_logging(&agentwall_tests::agentwall_bin(), "text"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(" INFO "), "a text log line: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour escapes off a terminal: {err:?}"
    );
}

/// The Prometheus client's OpenMetrics parser reads `text`, which has one metric per kernel
/// counter and its latencies as histograms.
#[allow(
    clippy::unwrap_used,
    reason = "a test helper: failing here fails the test"
)]
fn openmetrics_parser_reads(text: &str) {
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
types = {f.name: f.type for f in text_string_to_metric_families(sys.stdin.read())}
print(chr(10).join(f"{n} {t}" for n, t in sorted(types.items())))
"#;
    let mut child = std::process::Command::new(agentwall_tests::py_spiffe())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let types = String::from_utf8_lossy(&out.stdout);
    for want in [
        "agentwall_kernel_denied counter",
        "agentwall_kernel_allowed counter",
        "agentwall_kernel_events_dropped counter",
        "agentwall_audit_event_to_durable_seconds histogram",
        "agentwall_healthy gauge",
    ] {
        assert!(types.lines().any(|l| l == want), "{want} in\n{types}");
    }
    assert!(
        !types.lines().any(|l| l.starts_with("agentwall_kernel ")),
        "no catch-all kernel metric: {types}"
    );
}

/// The daemon in a container: a cgroup namespace of its own (rooted at its cgroup) sees other
/// processes' cgroups relative to it, so the daemon refuses to start there; joined to the
/// host's cgroup namespace first, as the Helm chart runs it, it enforces.
#[test]
fn in_a_cgroup_namespace_of_its_own_the_daemon_refuses_and_runs_once_it_joins_the_hosts() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let name = format!("awt-{}-ns", std::process::id());
    let cg = agentwall_tests::CgroupGuard(Cgroup::at(agentwall_tests::cgroup_mount().join(&name)));
    cg.0.create().unwrap();
    let mut d = TestDaemon::prepare(&[("p.yaml", &tcp_policy("web", &[allowed.port()]))], None);
    // sh moves itself into the cgroup, then `unshare --cgroup` roots a new namespace there.
    let enter = format!(
        "echo $$ > {}/cgroup.procs && exec \"$@\"",
        cg.0.path().display()
    );
    let contained = |prefix: &[&str]| {
        let run = d.run_command();
        let mut c = std::process::Command::new("/bin/sh");
        c.args(["-c", &enter, "sh", "unshare", "--cgroup", "--"])
            .args(prefix)
            .arg(run.get_program())
            .args(run.get_args());
        for (k, v) in run.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    };
    let line = refusal(&contained(&[]).output().unwrap());
    assert!(
        line.contains("cgroup namespace of its own")
            && line.contains("nsenter --target 1 --cgroup"),
        "{line}"
    );
    assert!(
        d.nothing_pinned(),
        "nothing loaded: {}",
        d.pin_dir.display()
    );

    // The Helm chart joins the namespace of PID 1 (the host's init, with hostPID); here,
    // where PID 1's namespaces may not be opened, that of this test, also the host's.
    let me = std::process::id().to_string();
    d.launch_command(contained(&["nsenter", "--target", &me, "--cgroup", "--"]));
    d.wait_healthy();
    let o = d.exec(
        "web",
        None,
        &[
            &format!("tcp 127.0.0.1:{}", allowed.port()),
            &format!("tcp 127.0.0.1:{}", denied.port()),
        ],
    );
    assert_eq!(lines(&o), ["ok", "err EPERM"], "{o:?}");
    // The probe command of the Helm chart: success while healthy, failure once the daemon
    // is gone.
    let o = d.cli(&["status", "--check"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("healthy: enforcing"),
        "{o:?}"
    );
    d.kill9();
    assert!(!d.cli(&["status", "--check"]).status.success());
}

/// Bindings outlive the daemon in the kernel and name identity slots; the slot table says
/// which policy each slot is. Without it (lost, or an older copy) a restarted daemon would
/// hand the slots out anew and point live bindings at other policies: it refuses instead, and
/// the pins go on enforcing as they were.
#[test]
fn a_lost_slot_table_fails_closed_and_says_how_to_recover() {
    let _s = serial();
    let (a, b) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let mut d = TestDaemon::start(&[("b.yaml", &tcp_policy("b", &[b.port()]))]);
    // Policy a arrives later and takes the next slot; b's agent runs on.
    d.write_policy("a.yaml", &tcp_policy("a", &[a.port()]));
    assert!(d.cli(&["reload"]).status.success());
    let mut agent = d.repl("b");
    let to_b = format!("tcp 127.0.0.1:{}", b.port());
    let to_a = format!("tcp 127.0.0.1:{}", a.port());
    assert_eq!(agent.cmd(&to_b), "ok");
    d.kill9();
    fs::remove_file(d.state_dir().join("slots.json")).unwrap();
    let out = d.run_refused();
    let line = refusal(&out);
    assert!(
        line.contains("the kernel holds bindings to identity slots [")
            && line
                .contains("slots.json does not name (it is missing, or older than the bindings)")
            && line.contains("agentwall teardown --pin-dir"),
        "{line}"
    );
    // Nothing changed in the kernel: the agent keeps exactly its policy.
    assert_eq!(agent.cmd(&to_b), "ok");
    assert_eq!(agent.cmd(&to_a), "err EPERM");
}

/// A unit listed under `enforce:` gets a new cgroup each time it (re)starts. Its first step,
/// `agentwall enforce-self` (a unit's `ExecStartPre=+`), has the daemon enforce that new
/// cgroup before anything else runs there: the first connect after a restart is judged. A
/// cgroup not listed is refused, and so is the command (the unit would not start).
#[test]
fn a_restarted_unit_is_enforced_from_its_first_connect() {
    use std::os::fd::AsFd as _;
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let name = format!("awt-{}-units", std::process::id());
    let unit_path = format!("{name}/app.service");
    let parent = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
        agentwall_tests::cgroup_mount().join(&name),
    ));
    parent.0.create().unwrap();
    let unit = || agentwall::cgroup::Cgroup::at(agentwall_tests::cgroup_mount().join(&unit_path));
    unit().create().unwrap();
    let config = format!("enforce:\n  - cgroup: {unit_path}\n    policy: web\n");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    // One run of the unit: `enforce-self`, then connects, in the unit's cgroup.
    let run = |cg: &agentwall::cgroup::Cgroup| {
        let script = format!(
            "{bin} enforce-self --socket {sock} >/dev/null && {} 'tcp 127.0.0.1:{}' 'tcp 127.0.0.1:{}' \
             && {{ {bin} status --socket {sock} 2>&1 | grep -o 'may only ask enforce_self'; }}",
            agentwall_tests::netprobe_bin().display(),
            denied.port(),
            allowed.port(),
            bin = agentwall_tests::agentwall_bin().display(),
            sock = d.socket.display(),
        );
        let out = d.dir.join("unit.out");
        let cmd = agentwall::spawn::Command::new(
            "/bin/sh",
            [
                "-c".to_string(),
                format!("{{ {script}; }} > {} 2>&1", out.display()),
            ],
        );
        let fd = cg.open().unwrap();
        let pid = agentwall::spawn::spawn_in_cgroup(&cmd, fd.as_fd())
            .unwrap()
            .pid;
        let code = agentwall::spawn::exit_code(agentwall::spawn::wait(pid).unwrap());
        (code, fs::read_to_string(&out).unwrap_or_default())
    };
    assert_eq!(
        run(&unit()),
        (0, "err EPERM\nok\nmay only ask enforce_self\n".into())
    );
    // The unit restarts: systemd removes its cgroup and makes a new one (a new id). The
    // watcher of new cgroups learns of it too, and may enforce it first; the unit's
    // `enforce-self` then waits until the watcher's cut of earlier sockets is over, so the
    // cut never takes the unit's own first, judged connect. Many restarts give that race
    // its chances (bounded: 40 runs).
    for restart in 1..=40 {
        unit().remove_tree().unwrap();
        unit().create().unwrap();
        assert_eq!(
            run(&unit()),
            (0, "err EPERM\nok\nmay only ask enforce_self\n".into()),
            "the first connect of run {restart} after a restart"
        );
    }
    assert_eq!(denied.accepted(), 0);
    let st = d.status();
    let configured: Vec<_> = st
        .cgroups
        .iter()
        .filter(|c| c.kind == "configured")
        .collect();
    assert_eq!(
        configured.len(),
        1,
        "the previous run's cgroup was let go: {configured:?}"
    );
    // A cgroup the configuration does not list is refused, and the command fails.
    let other = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
        agentwall_tests::cgroup_mount()
            .join(&name)
            .join("other.service"),
    ));
    other.0.create().unwrap();
    let (code, text) = run(&other.0);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "cgroup /{name}/other.service is not listed under `enforce:`"
        )),
        "{text}"
    );
    drop(other);
    let _ = unit().remove_tree();
}

/// A unit listed under `enforce:` whose unit file lacks `ExecStartPre=+agentwall enforce-self`
/// still gets a new cgroup at every start. The daemon starts while the unit is stopped (its
/// cgroup missing), learns of each new cgroup at the configured path and enforces it; the
/// sockets its processes opened before (here while no daemon ran) are destroyed once it is.
/// A listed cgroup whose policy is not in force is denied everything, not left open.
#[test]
fn a_configured_cgroup_that_appears_later_is_enforced_and_its_earlier_flows_cut() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let name = format!("awt-{}-late", std::process::id());
    let parent =
        agentwall_tests::CgroupGuard(Cgroup::at(agentwall_tests::cgroup_mount().join(&name)));
    parent.0.create().unwrap();
    let unit = |u: &str| Cgroup::at(parent.0.path().join(u));
    let config = format!(
        "enforce:\n  - cgroup: {name}/a.service\n    policy: web\n  - cgroup: {name}/b.service\n    policy: web\n  - cgroup: {name}/c.service\n    policy: late\n"
    );
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );

    // The unit starts, and restarts (a new cgroup at the same path), with no enforce-self:
    // its first steps race the watcher, so the test gives it a moment before it connects.
    let out = d.dir.join("a.out");
    let script = format!(
        "exec {} 'sleep 1500' 'tcp 127.0.0.1:{}' 'tcp 127.0.0.1:{}' > {}",
        netprobe_bin().display(),
        denied.port(),
        allowed.port(),
        out.display()
    );
    for start in 1..=2 {
        unit("a.service").create().unwrap();
        let pid = spawn::spawn_in_cgroup(
            &spawn::Command::new("/bin/sh", ["-c".to_string(), script.clone()]),
            unit("a.service").open().unwrap().as_fd(),
        )
        .unwrap()
        .pid;
        spawn::wait(pid).unwrap();
        assert_eq!(
            fs::read_to_string(&out)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            ["ok", "err EPERM", "ok"],
            "start {start}"
        );
        assert_eq!(denied.accepted(), 0);
        let a_id = unit("a.service").id().unwrap();
        let st = d.status();
        let configured: Vec<_> = st
            .cgroups
            .iter()
            .filter(|c| c.path.ends_with("a.service"))
            .collect();
        assert!(
            configured.len() == 1
                && configured[0].id == a_id
                && configured[0].kind == "configured"
                && configured[0].policy.as_deref() == Some("web"),
            "start {start}: {configured:#?}"
        );
        unit("a.service").remove_tree().unwrap();
    }

    // b.service starts while no daemon runs: nothing enforces it, and it opens a stream to
    // a destination its policy does not allow. The next daemon enforces it at its start and
    // cuts the stream.
    let late = |d: &TestDaemon| {
        d.status()
            .daemon_errors
            .get("configured_enforced_late")
            .copied()
            .unwrap_or(0)
    };
    d.kill9();
    unit("b.service").create().unwrap();
    let procs = unit("b.service").path().join("cgroup.procs");
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(format!(
        "echo $$ > {} && exec {} repl",
        procs.display(),
        netprobe_bin().display()
    ));
    let mut b = agentwall_tests::Repl::spawn(c);
    assert_eq!(b.cmd(&format!("stream 127.0.0.1:{}", denied.port())), "ok");
    denied.wait_flowing();
    d.launch();
    d.wait_healthy();
    assert_eq!(b.cmd("stream-end 5000"), "err ECONNABORTED");
    denied.assert_stopped("once the cgroup is enforced");
    assert_eq!(
        b.cmd(&format!("tcp 127.0.0.1:{}", denied.port())),
        "err EPERM"
    );
    assert_eq!(b.cmd(&format!("tcp 127.0.0.1:{}", allowed.port())), "ok");
    drop(b);
    // Enforced late, with processes in it: counted for status and metrics.
    assert_eq!(late(&d), 1);

    // c.service's policy is not in force: the cgroup is denied everything (fail closed), not
    // left open, until it is.
    unit("c.service").create().unwrap();
    let out = d.dir.join("c.out");
    let run_c = || {
        let script = format!(
            "exec {} 'sleep 1500' 'tcp 127.0.0.1:{}' > {}",
            netprobe_bin().display(),
            allowed.port(),
            out.display()
        );
        let pid = spawn::spawn_in_cgroup(
            &spawn::Command::new("/bin/sh", ["-c".to_string(), script]),
            unit("c.service").open().unwrap().as_fd(),
        )
        .unwrap()
        .pid;
        spawn::wait(pid).unwrap();
        fs::read_to_string(&out).unwrap_or_default()
    };
    assert_eq!(run_c(), "ok\nerr EPERM\n", "no policy named late yet");
    d.write_policy("late.yaml", &tcp_policy("late", &[allowed.port()]));
    let reload = d.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(run_c(), "ok\nok\n", "its policy is in force");
}

/// Every long-lived task and thread of the daemon is watched: one that panics stops the
/// daemon with exit code 1 and a line naming it (for the service manager to start a whole
/// daemon), and the pinned programs keep enforcing meanwhile. A fault is injected into one
/// task at a time (debug builds only: `AGENTWALL_TEST_FAULT`).
#[test]
fn a_task_that_dies_stops_the_daemon_and_the_kernel_keeps_enforcing() {
    let _s = serial();
    let (allowed, denied) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let name = format!("awt-{}-sup", std::process::id());
    let unit =
        agentwall_tests::CgroupGuard(Cgroup::at(agentwall_tests::cgroup_mount().join(&name)));
    unit.0.create().unwrap();
    let config = format!("enforce:\n  - cgroup: {name}\n    policy: web\n");
    let d = TestDaemon::prepare(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    let out_file = d.dir.join("unit.out");
    let script = format!(
        "exec {} 'tcp 127.0.0.1:{}' 'tcp 127.0.0.1:{}' > {}",
        netprobe_bin().display(),
        allowed.port(),
        denied.port(),
        out_file.display()
    );
    for task in [
        "gc",
        "admin",
        "units",
        "renew",
        "decision",
        "decision-accept",
    ] {
        let mut c = d.run_command();
        c.env("AGENTWALL_TEST_FAULT", task);
        let out = d.run_refused_command(c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{task}: {err}");
        assert!(
            err.contains(&format!(
                "the daemon's {task} task panicked; stopping the daemon"
            )),
            "{task}: {err}"
        );
        let pid = spawn::spawn_in_cgroup(
            &spawn::Command::new("/bin/sh", ["-c".to_string(), script.clone()]),
            unit.0.open().unwrap().as_fd(),
        )
        .unwrap()
        .pid;
        spawn::wait(pid).unwrap();
        assert_eq!(
            fs::read_to_string(&out_file)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            ["ok", "err EPERM"],
            "after the {task} task died"
        );
    }
    assert_eq!(denied.accepted(), 0);
}

/// A quarantine of a unit listed under `enforce:` holds against what the unit itself can do:
/// ask `enforce-self` again (root inside the unit may reach the admin socket for that), or
/// exit so that its service manager restarts it in a new cgroup at the same path, which the
/// daemon's watcher enforces. Only `quarantine --lift` ends it.
#[test]
fn a_quarantined_unit_stays_quarantined_through_enforce_self_and_a_restart() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let name = format!("awt-{}-q", std::process::id());
    let parent =
        agentwall_tests::CgroupGuard(Cgroup::at(agentwall_tests::cgroup_mount().join(&name)));
    parent.0.create().unwrap();
    let unit_path = format!("{name}/app.service");
    let unit = || Cgroup::at(agentwall_tests::cgroup_mount().join(&unit_path));
    unit().create().unwrap();
    let config = format!("enforce:\n  - cgroup: {unit_path}\n    policy: web\n");
    let d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[allowed.port()]))],
        Some(&config),
    );
    // One run of the unit: enforce-self (its reply printed), then a connect to the port its
    // policy allows.
    let run = |cg: &Cgroup| {
        let out = d.dir.join("q.out");
        let script = format!(
            "{bin} enforce-self --socket {sock} 2>&1; {probe} 'tcp 127.0.0.1:{port}'",
            bin = agentwall_tests::agentwall_bin().display(),
            sock = d.socket.display(),
            probe = netprobe_bin().display(),
            port = allowed.port(),
        );
        let cmd = spawn::Command::new(
            "/bin/sh",
            [
                "-c".to_string(),
                format!("{{ {script}; }} > {} 2>&1", out.display()),
            ],
        );
        let pid = spawn::spawn_in_cgroup(&cmd, cg.open().unwrap().as_fd())
            .unwrap()
            .pid;
        spawn::wait(pid).unwrap();
        let text = fs::read_to_string(&out).unwrap_or_default();
        text.lines().last().unwrap_or_default().to_string()
    };
    assert_eq!(run(&unit()), "ok", "the policy allows the port");
    let q = d.cli(&["quarantine", &unit_path]);
    assert!(q.status.success(), "{q:?}");
    assert_eq!(
        run(&unit()),
        "err EPERM",
        "enforce-self from inside the unit"
    );
    // The unit restarts: a new cgroup at the same path.
    unit().remove_tree().unwrap();
    unit().create().unwrap();
    assert_eq!(run(&unit()), "err EPERM", "the unit's next run");
    let st = d.status();
    assert!(
        st.cgroups
            .iter()
            .any(|c| c.path.ends_with("app.service") && c.quarantined),
        "{:#?}",
        st.cgroups
    );
    let lift = d.cli(&["quarantine", "--lift", &unit_path]);
    assert!(lift.status.success(), "{lift:?}");
    assert_eq!(run(&unit()), "ok", "lifted");
    // Only the first and the last run's connects arrived.
    wait_for(Duration::from_secs(5), "the second connect", || {
        (allowed.accepted() == 2).then_some(())
    });
    thread::sleep(Duration::from_millis(200));
    assert_eq!(allowed.accepted(), 2);
}

/// Whoever sees the daemon healthy on its admin socket finds every other socket already
/// bound: the admin socket is made last. (It was made first, and a client that connected to
/// the enrollment socket as soon as the daemon answered healthy got ENOENT.) Socket files
/// keep the time they were bound as their modification time, so the order is checked, not
/// raced.
#[test]
fn the_admin_socket_is_bound_after_every_other_socket() {
    use std::os::unix::fs::MetadataExt as _;
    let _s = serial();
    let d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[9]))]);
    let bound_at = |p: &std::path::Path| {
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.mtime(), m.mtime_nsec())
    };
    let admin = bound_at(&d.socket);
    for other in [&d.enroll_socket, &d.workload_socket, &d.decision_socket] {
        let at = bound_at(other);
        assert!(
            at <= admin,
            "{} was bound at {at:?}, after the admin socket ({admin:?})",
            other.display()
        );
    }
}
