//! Enforcement overhead: TCP connect+accept+close and UDP connect, with the programs attached
//! and a policy of 10k and 100k rules loaded, against the same operations unenforced.
//!
//! One process, interleaved rounds: in each round the process moves itself into the enforced
//! cgroup and into a plain sibling (order alternating), and times the same loop in each. The
//! reported ratio is the median of the per-round ratios, with its quartiles. Run it with
//! `cargo xtask bench` (root); it writes docs/benchmarks.md.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark reports to the terminal"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Instant,
};

use agentwall::{
    cgroup::{self, Cgroup},
    config::Limits,
    enforce::Enforcer,
    policy,
};
use agentwall_common::{binding::Binding, state::DECISION_CACHE_SLOTS};

struct Args {
    rounds: usize,
    ops: usize,
    report: Option<PathBuf>,
    /// `--only=plain|enforced`: for profiling, run the TCP loop at 10k rules in that cgroup
    /// alone, `rounds` times, and report nothing; with `--spread`, the new-destination loop.
    only: Option<String>,
    spread: bool,
}

fn args() -> Args {
    let mut a = Args {
        rounds: 61,
        ops: 2000,
        report: None,
        only: None,
        spread: false,
    };
    for arg in std::env::args().skip(1) {
        if let Some(v) = arg.strip_prefix("--rounds=") {
            a.rounds = v.parse().expect("--rounds=N");
        } else if let Some(v) = arg.strip_prefix("--ops=") {
            a.ops = v.parse().expect("--ops=N");
        } else if let Some(v) = arg.strip_prefix("--report=") {
            a.report = Some(PathBuf::from(v));
        } else if let Some(v) = arg.strip_prefix("--only=") {
            assert!(v == "plain" || v == "enforced", "--only=plain|enforced");
            a.only = Some(v.to_owned());
        } else if arg == "--spread" {
            a.spread = true;
        }
    }
    assert!(a.rounds >= 11, "at least 11 rounds");
    a
}

/// Everything the benchmark creates, removed on drop (also on panic).
struct Guard {
    mount: PathBuf,
    base: Cgroup,
    pin_dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = join(&Cgroup::at(self.mount.clone()));
        let _ = agentwall::enforce::teardown(&self.pin_dir);
        let _ = self.base.remove_tree();
    }
}

fn join(cg: &Cgroup) -> std::io::Result<()> {
    fs::write(
        cg.path().join("cgroup.procs"),
        std::process::id().to_string(),
    )
}

/// A policy with the benchmark's own loopback ports (one TCP port, a range of them, one UDP
/// port) and `n` further prefixes.
fn policy_text(n: usize, port: u16, spread: (u16, u16), udp_port: u16) -> String {
    let mut t = format!(
        "policy:\n  name: bench\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}, \"{}-{}\"]\n    - to: 127.0.0.1\n      protocol: udp\n      ports: [{udp_port}]\n",
        spread.0, spread.1
    );
    for i in 0..n {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        if i % 2 == 0 {
            let _ = write!(
                t,
                "    - to: 10.{a}.{b}.{c}\n      protocol: tcp\n      ports: [443]\n"
            );
        } else {
            let _ = write!(
                t,
                "    - to: \"2001:db8:{a:x}:{b:x}{c:02x}::/64\"\n      protocol: tcp\n      ports: [443]\n"
            );
        }
    }
    t
}

/// Connects to the listeners in turn, `ops` times: one listener is one destination every
/// time; many are a new destination (port) for each connect.
fn tcp_round(listeners: &[(TcpListener, SocketAddr)], ops: usize) -> f64 {
    let t = Instant::now();
    for i in 0..ops {
        let (listener, addr) = &listeners[i % listeners.len()];
        let c = TcpStream::connect(addr).expect("allowed connect");
        let (s, _) = listener.accept().expect("accept");
        // Close with a reset: thousands of TIME_WAIT sockets per round would slow every later
        // round and drown the difference being measured.
        nix::sys::socket::setsockopt(
            &c,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .expect("SO_LINGER");
        drop(c);
        drop(s);
    }
    t.elapsed().as_nanos() as f64 / ops as f64
}

/// Loopback listeners on `n` ports, each with its address. The soft limit on open files is
/// raised to the hard one first: the default of 1024 is too few.
fn listeners(n: usize) -> Vec<(TcpListener, SocketAddr)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the calls to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
    (0..n)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0")
                .expect("a listener (the benchmark needs 2100 open files: raise `ulimit -n`)");
            let a = l.local_addr().unwrap();
            (l, a)
        })
        .collect()
}

fn udp_round(port: u16, ops: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..ops {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(("127.0.0.1", port)).expect("allowed udp connect");
        drop(s);
    }
    t.elapsed().as_nanos() as f64 / ops as f64
}

/// Pins the calling thread to `cpu` when the machine has it (and more than one CPU): the
/// measuring thread and the event reader then keep their own CPUs, and no round pays for a
/// migration that another round did not.
fn pin(cpu: usize) {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 || cpu >= cpus {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// Listening ports the spread TCP case takes in turn (8 times the decision cache's slots).
const SPREAD_PORTS: usize = 2048;
const _: () = assert!(SPREAD_PORTS >= 8 * DECISION_CACHE_SLOTS as usize);
const SPREAD_OP: &str = "TCP connect+accept+close, a new destination port each time";

struct Row {
    rules: usize,
    op: &'static str,
    plain: f64,
    enforced: f64,
    ratio: f64,
    q1: f64,
    q3: f64,
    target: f64,
}

fn measure(
    rounds: usize,
    mut round: impl FnMut() -> f64,
    plain: &Cgroup,
    enforced: &Cgroup,
) -> (f64, f64, f64, f64, f64) {
    let (mut p, mut e, mut r) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up pair, not recorded.
    join(enforced).unwrap();
    round();
    join(plain).unwrap();
    round();
    for i in 0..rounds {
        let order = if i % 2 == 0 {
            [plain, enforced]
        } else {
            [enforced, plain]
        };
        let mut got = [0.0; 2];
        for (k, cg) in order.iter().enumerate() {
            join(cg).unwrap();
            // Settle after the move; the timed loop follows.
            round();
            got[k] = round();
        }
        let (pv, ev) = if i % 2 == 0 {
            (got[0], got[1])
        } else {
            (got[1], got[0])
        };
        p.push(pv);
        e.push(ev);
        r.push(ev / pv);
    }
    (
        quantile(&mut p, 0.5),
        quantile(&mut e, 0.5),
        quantile(&mut r.clone(), 0.5),
        quantile(&mut r.clone(), 0.25),
        quantile(&mut r, 0.75),
    )
}

fn main() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the benchmark loads kernel programs: run it as root"
    );
    let a = args();
    let mount = cgroup::cgroup2_mount().unwrap();
    let name = format!("awbench-{}", std::process::id());
    let base = Cgroup::under(&mount, &name).unwrap();
    let guard = Guard {
        mount: mount.clone(),
        base: base.clone(),
        pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
    };
    base.create().unwrap();
    let enforced = base.child("enforced");
    let plain = base.child("plain");
    enforced.create().unwrap();
    plain.create().unwrap();

    let limits = Limits {
        max_rule_nodes: 2 * 110_000,
        ..Limits::default()
    };
    let (mut enforcer, mut ring) = Enforcer::load(&guard.pin_dir, &limits).unwrap();
    // Event budgets on, as the daemon has them, at a rate no loop here reaches: every verdict
    // pays for the budget check and is still written to the ring (the costlier path).
    let budgets = if std::env::var_os("AW_BENCH_NO_BUDGETS").is_some() {
        agentwall_common::budget::BudgetConfig::default()
    } else {
        agentwall_common::budget::BudgetConfig {
            cgroup: agentwall_common::budget::Rate::new(1_000_000, u32::MAX),
            identity: agentwall_common::budget::Rate::new(1_000_000, u32::MAX),
        }
    };
    enforcer.take_budgets().unwrap().set(budgets).unwrap();
    // Drain the events as the daemon's reader does (allowed verdicts do not wake it; it polls
    // at the same interval); the cost of delivering them is part of the cost.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let drainer = thread::spawn(move || {
        pin(0);
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            while let Some(item) = ring.next() {
                n += item.len() as u64;
            }
            thread::sleep(agentwall::events::POLL_INTERVAL);
        }
        n
    });
    let enforced_id = enforcer.attach(&enforced, &mount).unwrap();
    // Counted before pinning narrows what this thread may use.
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    pin(1);

    let one = listeners(1);
    // More destinations than the decision cache has slots, taken in turn: each connect finds
    // its slot taken by others since, and is judged in full.
    let many = listeners(SPREAD_PORTS);
    let udp_target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (port, udp_port) = (one[0].1.port(), udp_target.local_addr().unwrap().port());
    let spread = many.iter().fold((u16::MAX, 0), |(lo, hi), (_, a)| {
        (lo.min(a.port()), hi.max(a.port()))
    });

    let mut rows = Vec::new();
    for (rules, tcp_target) in [(10_000usize, 1.03), (100_000, 1.05)] {
        let text = policy_text(rules, port, spread, udp_port);
        let set = policy::parse_texts(&[(Path::new("bench.yaml").to_path_buf(), text)]).unwrap();
        let compiled = policy::compile(&set, |_| 1).unwrap();
        let t = Instant::now();
        enforcer.apply(&compiled).unwrap();
        eprintln!(
            "{rules} rules: {} prefix nodes written in {:?}",
            compiled.nodes.len(),
            t.elapsed()
        );
        enforcer
            .bind(
                enforced_id,
                Binding {
                    slot: 1,
                    flags: 0,
                    expires_boot_ns: 0,
                },
            )
            .unwrap();

        if let Some(only) = &a.only {
            join(if only == "plain" { &plain } else { &enforced }).unwrap();
            let set = if a.spread { &many } else { &one };
            let mut t: Vec<f64> = (0..a.rounds).map(|_| tcp_round(set, a.ops)).collect();
            eprintln!(
                "  tcp connect+accept+close, {only} only: {:.0} ns",
                quantile(&mut t, 0.5)
            );
            break;
        }
        for (op, set) in [
            ("TCP connect+accept+close, one destination", &one),
            (SPREAD_OP, &many),
        ] {
            let (p, e, r, q1, q3) = measure(a.rounds, || tcp_round(set, a.ops), &plain, &enforced);
            eprintln!(
                "  {op}: plain {p:.0} ns, enforced {e:.0} ns, ratio {r:.3} [{q1:.3}, {q3:.3}]"
            );
            rows.push(Row {
                rules,
                op,
                plain: p,
                enforced: e,
                ratio: r,
                q1,
                q3,
                target: tcp_target,
            });
        }
        let (p, e, r, q1, q3) = measure(a.rounds, || udp_round(udp_port, a.ops), &plain, &enforced);
        eprintln!(
            "  udp socket+connect+close: plain {p:.0} ns, enforced {e:.0} ns, ratio {r:.3} [{q1:.3}, {q3:.3}]"
        );
        rows.push(Row {
            rules,
            op: "UDP socket+connect+close",
            plain: p,
            enforced: e,
            ratio: r,
            q1,
            q3,
            target: f64::NAN,
        });
    }
    join(&Cgroup::at(mount.clone())).unwrap();
    let counters = enforcer.counters().unwrap();
    stop.store(true, Ordering::Relaxed);
    let drained = drainer.join().unwrap();
    eprintln!(
        "events drained: {} bytes; kernel counters: {:?}",
        drained, counters.totals
    );
    assert_eq!(
        counters.totals.get("denied"),
        Some(&0),
        "every benchmark flow is allowed; a denial means a broken setup"
    );
    if a.only.is_some() {
        return;
    }

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "## Enforcement overhead\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/enforcement.rs). Linux {}, {cpus} CPUs. \
         {} interleaved rounds of {} operations per configuration: in every round the same process \
         runs the loop once inside an enforced cgroup (all six programs attached, the policy loaded, \
         events drained by a reader thread) and once in a plain sibling cgroup, alternating the order; \
         the measuring thread and the event reader are pinned to CPUs of their own. \
         The ratio is the median of the per-round ratios enforced/plain; the brackets give the \
         quartiles of those ratios. Times are medians per operation.\n",
        kernel.trim(),
        a.rounds,
        a.ops
    );
    let _ = writeln!(
        md,
        "| rules loaded | operation | plain | enforced | ratio [q1, q3] | target |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---|---|");
    for r in &rows {
        let target = if r.target.is_nan() {
            "-".to_string()
        } else {
            format!(
                "≤ {:.2}x: {}",
                r.target,
                if r.ratio <= r.target {
                    "met"
                } else {
                    "NOT met"
                }
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} µs | {:.1} µs | {:.3}x [{:.3}, {:.3}] | {target} |",
            r.rules,
            r.op,
            r.plain / 1000.0,
            r.enforced / 1000.0,
            r.ratio,
            r.q1,
            r.q3
        );
    }
    let _ = writeln!(
        md,
        "\nWhat the enforced path adds per TCP connect: the sock_create program (a socket type check), \
         the connect4 program (the decision, the event budget check, one ring buffer event, a \
         per-CPU flow cache entry for the socket; the budgets are set at a rate no loop reaches, \
         so every verdict is recorded) and the egress program on each outgoing packet (a flow cache hit for the \
         packets of a socket judged under the current policy epoch, the full decision otherwise). \
         A decision that a rule allowed is remembered in a per-CPU decision cache (by cgroup, \
         destination, port and protocol, valid while the policy epoch holds), so the decision is \
         one cache read for a destination judged before and the binding lookup plus one \
         longest-prefix lookup in the rules trie otherwise. The one-destination rows connect to \
         the same listener every time, as an agent calling the same service does: after the first \
         connect every decision comes from the cache. The new-destination rows take {SPREAD_PORTS} \
         listening ports in turn, {}x the cache's {DECISION_CACHE_SLOTS} slots per CPU, so \
         that nearly every connect is judged in full. The client closes with SO_LINGER 0 (a \
         reset) so that TIME_WAIT sockets do not pile up across rounds; the UDP loop sends no \
         datagram, it measures socket, connect (one connect4 verdict, from the cache) and close.",
        SPREAD_PORTS / DECISION_CACHE_SLOTS as usize
    );
    print!("{md}");
    if let Some(path) = a.report {
        agentwall_tests::write_report_section(&path, "enforcement", &md);
        eprintln!("wrote {}", path.display());
    }
    drop(enforcer);
    drop(guard);
}
