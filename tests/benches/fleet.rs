//! Fleet benchmarks: how long a revocation made on one node takes to be enforced on the
//! others through etcd, and the footprint of an idle daemon with 100 agents and 10,000 rules.
//!
//! Propagation: three release daemons share an etcd on loopback (Debian's etcd-server). Each
//! round revokes a fresh identity on node a through its admin socket and times, from just
//! before the request, the first denied connect of an agent with that identity on each node.
//! Node a's own agent is the baseline of the same round (the local path: kernel flag and
//! socket cut, no etcd); the others are the fleet path.
//!
//! Footprint: one release daemon with 10,000 rules in force and 100 agents it launched, left
//! idle for a while: its resident memory and its CPU time over that while. The baseline is the
//! same daemon before any agent or rule (one policy of one rule).
//!
//! Run with `cargo xtask bench` (root); it writes its section of docs/benchmarks.md.
#![expect(clippy::print_stdout, reason = "a benchmark reports to the terminal")]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use agentwall::control::{Reply, Request, client::Client};
use agentwall_tests::{Repl, TcpSink, TestDaemon, etcd::TestEtcd, process_cpu, quantile, wait_for};

fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}=");
    std::env::args().find_map(|a| a.strip_prefix(&key).map(str::to_string))
}

fn identity_policy(port: u16) -> String {
    format!(
        "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    )
}

/// Polls `agent` until its connect to `to` is denied; when that was, or none within 10 s.
fn denied_at(agent: &mut Repl, to: &str) -> Option<Instant> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if agent.cmd(to) == "err EPERM" {
            return Some(Instant::now());
        }
    }
    None
}

/// Per round: the local latency (node a) and the fleet latencies (b, c), in ms.
fn propagation(rounds: usize) -> (Vec<f64>, Vec<f64>) {
    let sink = TcpSink::new("127.0.0.1:0");
    let to = format!("tcp 127.0.0.1:{}", sink.port());
    let prefix = format!("/awt-{}-bench", std::process::id());
    let etcd = TestEtcd::start(
        std::env::temp_dir().join(format!("awt-{}-bench-etcd", std::process::id())),
    );
    let nodes: Vec<TestDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let config = format!(
                "fleet:\n  etcd: [\"{}\"]\n  prefix: {prefix}\n  node: {n}\n",
                etcd.url()
            );
            TestDaemon::start_with_config(
                &[("r.yaml", &identity_policy(sink.port()))],
                Some(&config),
            )
        })
        .collect();
    for d in &nodes {
        wait_for(Duration::from_secs(10), "every node in the fleet", || {
            d.status().fleet.is_some_and(|f| f.connected).then_some(())
        });
    }
    let (mut local, mut fleet) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // A version of the reader's identity of its own per round: its policy governs it.
        let id = format!("agent/reader/prod/r{round}");
        let mut agents: Vec<Repl> = nodes
            .iter()
            .map(|d| {
                let (cert, key) = d.issue(&id, "10m");
                d.repl_under(&["--cert", &cert, "--key", &key])
            })
            .collect();
        for a in &mut agents {
            assert_eq!(a.cmd(&to), "ok");
        }
        let t0 = Instant::now();
        match Client::call(
            &nodes[0].socket,
            &Request::Revoke {
                target: format!("spiffe://agentwall.local/{id}"),
                reason: "benchmark".into(),
            },
        )
        .unwrap()
        {
            Reply::Revoked { .. } => {}
            other => panic!("revoke: {other:?}"),
        }
        let at = |a: &mut Repl| {
            denied_at(a, &to).map_or(f64::INFINITY, |t| (t - t0).as_secs_f64() * 1e3)
        };
        local.push(at(&mut agents[0]));
        // b and c polled in turn, each from the same start.
        let (mut b_at, mut c_at) = (None, None);
        let end = Instant::now() + Duration::from_secs(10);
        while (b_at.is_none() || c_at.is_none()) && Instant::now() < end {
            for (i, slot) in [(1, &mut b_at), (2, &mut c_at)] {
                if slot.is_none() && agents[i].cmd(&to) == "err EPERM" {
                    *slot = Some((Instant::now() - t0).as_secs_f64() * 1e3);
                }
            }
        }
        fleet.push(b_at.unwrap_or(f64::INFINITY));
        fleet.push(c_at.unwrap_or(f64::INFINITY));
        for a in agents {
            let _ = a.quit();
        }
    }
    (local, fleet)
}

/// Resident memory (KiB) and CPU seconds of process `pid`.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A policy file with `rules` egress rules (distinct /32 destinations, one port each).
fn many_rules(rules: usize) -> String {
    let mut p = String::from("policy:\n  name: many\n  egress:\n");
    for i in 0..rules {
        let _ = writeln!(
            p,
            "    - to: 10.{}.{}.{}\n      protocol: tcp\n      ports: [443]",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    p
}

/// (RSS MiB, CPU % of one core) of an idle daemon over `idle`.
fn idle_footprint(d: &TestDaemon, idle: Duration) -> (f64, f64) {
    let pid = d.pid().expect("the daemon's pid");
    // Settled: what start-up and launching did is over.
    thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (process_cpu(pid), Instant::now());
    thread::sleep(idle);
    let cpu = (process_cpu(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    (rss_kib(pid) as f64 / 1024.0, cpu)
}

fn footprint(agents: usize, rules: usize, idle: Duration) -> ((f64, f64), (f64, f64)) {
    let sink = TcpSink::new("127.0.0.1:0");
    let mut d = TestDaemon::start(&[(
        "web.yaml",
        &agentwall_tests::tcp_policy("web", &[sink.port()]),
    )]);
    let base = idle_footprint(&d, idle);
    d.write_policy("many.yaml", &many_rules(rules));
    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let mut held = Vec::new();
    for _ in 0..agents {
        let mut r = d.repl("many");
        assert_eq!(r.cmd("pid").parse::<u32>().map(|_| ()), Ok(()));
        held.push(r);
    }
    let loaded = idle_footprint(&d, idle);
    assert_eq!(
        d.status()
            .cgroups
            .iter()
            .filter(|c| c.policy.as_deref() == Some("many"))
            .count(),
        agents
    );
    for r in held {
        let _ = r.quit();
    }
    let _ = d.stop();
    (base, loaded)
}

fn main() {
    let report = PathBuf::from(arg("report").expect("--report=FILE"));
    let rounds: usize = arg("rounds").map_or(41, |r| r.parse().unwrap());
    println!("fleet: revocation propagation, {rounds} rounds");
    let (mut local, mut fleet) = propagation(rounds);
    println!("fleet: idle footprint");
    let idle = Duration::from_secs(20);
    let (base, loaded) = footprint(100, 10_000, idle);

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let (l50, l99) = (quantile(&mut local, 0.5), quantile(&mut local, 0.99));
    let (f50, f99) = (quantile(&mut fleet, 0.5), quantile(&mut fleet, 0.99));
    let mut md = String::new();
    let _ = writeln!(md, "## Fleet\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/fleet.rs) with the release daemon. \
         Linux {}, {cpus} CPUs; three daemons, etcd and the agents share them.\n",
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "| measure | p50 | p99 | baseline p50 / p99 (same run) | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        md,
        "| revocation on node a to the first denied connect on nodes b and c ({} samples) | {f50:.1} ms | {f99:.1} ms | on node a itself: {l50:.1} / {l99:.1} ms | p99 ≤ 1000 ms: {} |",
        fleet.len(),
        met(f99 <= 1000.0)
    );
    let _ = writeln!(
        md,
        "\n| idle daemon | RSS | CPU (of one core) | baseline: no agent, one rule | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        md,
        "| 100 agents, 10,000 rules, {}s idle | {:.1} MiB | {:.2} % | {:.1} MiB, {:.2} % | ≤ 50 MiB: {}; ≤ 0.5 %: {} |",
        idle.as_secs(),
        loaded.0,
        loaded.1,
        base.0,
        base.1,
        met(loaded.0 <= 50.0),
        met(loaded.1 <= 0.5)
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         Each round issues a certificate of a new version of the reader's identity \
         (`agent/reader/prod/rN`, governed by its policy) on each node, launches an agent with it \
         on each node, and revokes that SPIFFE ID through node a's admin socket. From just \
         before the request, each agent connects in a loop until a connect is denied; the \
         time of that connect is the latency. Node a's agent is the baseline: the same \
         revocation, enforced where it was made. Nodes b and c learn of it from their etcd \
         watch, apply it and flag its cgroups in the kernel.\n\n\
         The idle footprint is the daemon's resident memory (VmRSS) at the end of the idle \
         span and its CPU time over the span (all threads, from schedstat), first with one \
         policy of one rule and no agent, then with a second policy of 10,000 rules in force \
         and 100 agents launched under it, each a process waiting on its stdin."
    );
    agentwall_tests::write_report_section(&report, "fleet", &md);
    println!("{md}");
}
