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
use agentwall_tests::quantile;

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
/// port) and `n` further prefixes. With `limited`, the one TCP port is granted by a rule with
/// a rate limit no loop reaches: each connect takes a token from its bucket.
fn policy_text(n: usize, port: u16, spread: (u16, u16), udp_port: u16, limited: bool) -> String {
    let one = if limited {
        String::new()
    } else {
        format!("{port}, ")
    };
    let mut t = format!(
        "policy:\n  name: bench\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{one}\"{}-{}\"]\n    - to: 127.0.0.1\n      protocol: udp\n      ports: [{udp_port}]\n",
        spread.0, spread.1
    );
    let mut rules = String::new();
    if limited {
        let _ = write!(
            rules,
            "  rules:\n    - resource: cidr:127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n      rateLimit: 1000000 per second\n"
        );
    }
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
    t.push_str(&rules);
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

/// Makes `ops` UDP sockets, each bound to `local` (free again once the last is closed: UDP
/// has no TIME_WAIT) and connected to `port`. A fixed local address keeps the kernel's search
/// for a free ephemeral port, whose cost varies widely from call to call, out of the loop.
fn udp_round(local: SocketAddr, port: u16, ops: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..ops {
        let s = UdpSocket::bind(local).unwrap();
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

/// The floor of enforcement: a program that only returns 1 (allow) on each hook the enforcer
/// attaches to (sock_create, connect4/6, sendmsg4/6, egress, ingress, sock_ops, and the Unix
/// connect and sendmsg hooks where the kernel has them), linked to `cg`. What the kernel charges for running any
/// cgroup program there at all; enforced minus floor is what agentwall's programs cost.
/// The links detach when the returned descriptors close.
fn floor_links(cg: &Cgroup) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use aya_obj::generated::{bpf_attach_type as at, bpf_cmd, bpf_prog_type as pt};
    /// bpf(2) with a 128-byte attribute block, fields at their offsets of union bpf_attr.
    fn bpf(cmd: bpf_cmd, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
        // SAFETY: `attr` is as large as the size given, and every pointer in it outlives the
        // call.
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.as_mut_ptr(), 128) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: PROG_LOAD and LINK_CREATE return a new descriptor of ours.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    }
    // `r0 = 1; exit`.
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
    let license = c"GPL";
    let cgroup = cg.open().unwrap();
    let hooks = [
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK,
            at::BPF_CGROUP_INET_SOCK_CREATE,
        ),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_INET4_CONNECT,
        ),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_INET6_CONNECT,
        ),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_UDP4_SENDMSG,
        ),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_UDP6_SENDMSG,
        ),
        (pt::BPF_PROG_TYPE_CGROUP_SKB, at::BPF_CGROUP_INET_EGRESS),
        (pt::BPF_PROG_TYPE_CGROUP_SKB, at::BPF_CGROUP_INET_INGRESS),
        (pt::BPF_PROG_TYPE_SOCK_OPS, at::BPF_CGROUP_SOCK_OPS),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_UNIX_CONNECT,
        ),
        (
            pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            at::BPF_CGROUP_UNIX_SENDMSG,
        ),
    ];
    let mut links = Vec::new();
    for (prog_type, attach) in hooks {
        let mut a = [0u64; 16];
        a[0] = prog_type as u64 | (insns.len() as u64) << 32;
        a[1] = insns.as_ptr() as u64;
        a[2] = license.as_ptr() as u64;
        // expected_attach_type, at byte 68.
        a[8] = (attach as u64) << 32;
        let prog = match bpf(bpf_cmd::BPF_PROG_LOAD, &mut a) {
            Ok(fd) => fd,
            // The Unix hooks are newer than the others: the enforcer goes without them too.
            Err(e)
                if matches!(
                    attach,
                    at::BPF_CGROUP_UNIX_CONNECT | at::BPF_CGROUP_UNIX_SENDMSG
                ) =>
            {
                eprintln!("floor: no {attach:?} program ({e})");
                continue;
            }
            Err(e) => panic!("floor program for {attach:?}: {e}"),
        };
        let mut l = [0u64; 16];
        l[0] = prog.as_raw_fd() as u64 | (cgroup.as_raw_fd() as u64) << 32;
        l[1] = attach as u64;
        links.push(bpf(bpf_cmd::BPF_LINK_CREATE, &mut l).expect("floor link"));
    }
    links
}

/// An nftables table of the benchmark's own, deleted on drop (also on panic).
struct NftTable {
    name: String,
}

impl NftTable {
    /// Loads `ruleset` (which defines `table inet NAME`) with `nft -f -`.
    fn load(name: &str, ruleset: &str) -> Self {
        use std::io::Write as _;
        let mut child = std::process::Command::new(NFT)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft (Debian's nftables; `cargo xtask bench` installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "nft -f refused the ruleset"
        );
        Self {
            name: name.to_owned(),
        }
    }

    /// Packets the table's final drop rule counted.
    fn dropped(&self) -> u64 {
        let out = std::process::Command::new(NFT)
            .args(["list", "chain", "inet", &self.name, "confined"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let l = l.trim();
                l.ends_with("drop")
                    .then(|| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))?
            })
            .and_then(|n| n.parse().ok())
            .expect("the drop rule's counter")
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = std::process::Command::new(NFT)
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}

const NFT: &str = "/usr/sbin/nft";

/// The same allow/deny as [`policy_text`] in nftables, for the packets of sockets of cgroup
/// `cg` (given as nft names it: its path below /sys/fs/cgroup, and its depth): the allowed
/// (address, protocol, port) triples in one interval set per family, looked up by the output
/// hook for every packet; everything else from that cgroup dropped. Sockets of other cgroups
/// leave the chain after the cgroup match.
fn nft_ruleset(
    table: &str,
    cg: (&str, usize),
    n: usize,
    port: u16,
    spread: (u16, u16),
    udp_port: u16,
) -> String {
    let mut v4 = format!(
        "127.0.0.1 . tcp . {port}, 127.0.0.1 . tcp . {}-{}, 127.0.0.1 . udp . {udp_port}",
        spread.0, spread.1
    );
    let mut v6 = String::new();
    for i in 0..n {
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        if i % 2 == 0 {
            let _ = write!(v4, ", 10.{a}.{b}.{c} . tcp . 443");
        } else {
            if !v6.is_empty() {
                v6.push_str(", ");
            }
            let _ = write!(v6, "2001:db8:{a:x}:{b:x}{c:02x}::/64 . tcp . 443");
        }
    }
    format!(
        "table inet {table} {{\n\
         \x20 set allow4 {{\n    type ipv4_addr . inet_proto . inet_service\n    flags interval\n    elements = {{ {v4} }}\n  }}\n\
         \x20 set allow6 {{\n    type ipv6_addr . inet_proto . inet_service\n    flags interval\n    elements = {{ {v6} }}\n  }}\n\
         \x20 chain output {{\n    type filter hook output priority filter; policy accept;\n    socket cgroupv2 level {} \"{}\" jump confined\n  }}\n\
         \x20 chain confined {{\n    ip daddr . meta l4proto . th dport @allow4 accept\n    ip6 daddr . meta l4proto . th dport @allow6 accept\n    counter drop\n  }}\n\
         }}\n",
        cg.1, cg.0
    )
}

/// How nft names cgroup `cg`: its path below /sys/fs/cgroup and its level (depth below the
/// cgroup2 root `mount`). None when cgroup2 is mounted elsewhere.
fn nft_cgroup(mount: &Path, cg: &Cgroup) -> Option<(String, usize)> {
    let below = cg.path().strip_prefix("/sys/fs/cgroup").ok()?;
    let level = cg.path().strip_prefix(mount).ok()?.components().count();
    Some((below.to_str()?.to_owned(), level))
}

/// Listening ports the spread TCP case takes in turn (8 times the decision cache's slots).
const SPREAD_PORTS: usize = 2048;
const _: () = assert!(SPREAD_PORTS >= 8 * DECISION_CACHE_SLOTS as usize);
const SPREAD_OP: &str = "TCP connect+accept+close, a new destination port each time";
const LIMITED_OP: &str = "TCP connect+accept+close, one destination, its rule rate-limited";

struct Row {
    rules: usize,
    op: &'static str,
    m: Measured,
    target: f64,
}

/// A ratio's median over the rounds, with its quartiles.
#[derive(Clone, Copy)]
struct Ratio {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Ratio {
    fn of(mut v: Vec<f64>) -> Self {
        Self {
            median: quantile(&mut v, 0.5),
            q1: quantile(&mut v, 0.25),
            q3: quantile(&mut v, 0.75),
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}x [{:.3}, {:.3}]", self.median, self.q1, self.q3)
    }
}

/// Median times per operation in the plain, floor and enforced cgroups, and the per-round
/// ratios between them.
struct Measured {
    plain: f64,
    floor: f64,
    enforced: f64,
    /// enforced / plain: what the targets are about.
    overhead: Ratio,
    /// floor / plain: the hooks with programs that do nothing.
    floor_ratio: Ratio,
    /// enforced / floor: agentwall's programs on top of that.
    programs: Ratio,
}

/// Every order of the three cgroups, taken in turn by the rounds.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [2, 1, 0],
    [1, 2, 0],
    [0, 2, 1],
    [2, 0, 1],
    [1, 0, 2],
];

/// Runs `round` in each of `cgs` (plain, floor, enforced) once per round, in an order that
/// changes from round to round, after a warm-up pair not recorded.
fn measure(rounds: usize, mut round: impl FnMut() -> f64, cgs: [&Cgroup; 3]) -> Measured {
    let mut t: [Vec<f64>; 3] = Default::default();
    for cg in cgs {
        join(cg).unwrap();
        round();
    }
    for i in 0..rounds {
        for &k in &ORDERS[i % ORDERS.len()] {
            join(cgs[k]).unwrap();
            // Settle after the move; the timed loop follows.
            round();
            t[k].push(round());
        }
    }
    let ratio =
        |a: usize, b: usize| Ratio::of(t[a].iter().zip(&t[b]).map(|(x, y)| x / y).collect());
    let (overhead, floor_ratio, programs) = (ratio(2, 0), ratio(1, 0), ratio(2, 1));
    let [p, f, e] = t.map(|mut v| quantile(&mut v, 0.5));
    Measured {
        plain: p,
        floor: f,
        enforced: e,
        overhead,
        floor_ratio,
        programs,
    }
}

fn report_line(op: &str, m: &Measured) {
    eprintln!(
        "  {op}: plain {:.0} ns, floor {:.0} ns, enforced {:.0} ns; enforced/plain {}, floor/plain {}, enforced/floor {}",
        m.plain, m.floor, m.enforced, m.overhead, m.floor_ratio, m.programs
    );
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
    let floor = base.child("floor");
    let nft = base.child("nft");
    nft.create().unwrap();
    enforced.create().unwrap();
    plain.create().unwrap();
    floor.create().unwrap();
    let _floor_links = floor_links(&floor);

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
    let udp_local = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (port, udp_port) = (one[0].1.port(), udp_target.local_addr().unwrap().port());
    let spread = many.iter().fold((u16::MAX, 0), |(lo, hi), (_, a)| {
        (lo.min(a.port()), hi.max(a.port()))
    });

    let mut rows = Vec::new();
    for (rules, tcp_target, udp_target_ratio, limited) in [
        (10_000usize, 1.02, 1.03, false),
        (100_000, 1.05, f64::NAN, false),
        (10_000, f64::NAN, f64::NAN, true),
    ] {
        let text = policy_text(rules, port, spread, udp_port, limited);
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
        let cgs = [&plain, &floor, &enforced];
        if limited {
            let m = measure(a.rounds, || tcp_round(&one, a.ops), cgs);
            report_line(LIMITED_OP, &m);
            rows.push(Row {
                rules,
                op: LIMITED_OP,
                m,
                target: tcp_target,
            });
            continue;
        }
        for (op, set) in [
            ("TCP connect+accept+close, one destination", &one),
            (SPREAD_OP, &many),
        ] {
            let m = measure(a.rounds, || tcp_round(set, a.ops), cgs);
            report_line(op, &m);
            rows.push(Row {
                rules,
                op,
                m,
                target: tcp_target,
            });
        }
        let op = "UDP socket+connect+close";
        let m = measure(a.rounds, || udp_round(udp_local, udp_port, 4 * a.ops), cgs);
        report_line(op, &m);
        rows.push(Row {
            rules,
            op,
            m,
            target: udp_target_ratio,
        });
    }
    // Side by side with nftables: the same allow/deny at 10k rules, by `socket cgroupv2`
    // rules on the output hook. The table exists only for these rounds (its cgroup match runs
    // for every packet of the host), and agentwall's enforced cgroup is measured again
    // beside it, with the same plain baseline.
    let mut side = Vec::new();
    if a.only.is_none() {
        let rules = 10_000;
        let text = policy_text(rules, port, spread, udp_port, false);
        let set = policy::parse_texts(&[(Path::new("bench.yaml").to_path_buf(), text)]).unwrap();
        enforcer
            .apply(&policy::compile(&set, |_| 1).unwrap())
            .unwrap();
        let (path, level) = nft_cgroup(&mount, &nft)
            .expect("cgroup2 below /sys/fs/cgroup, where nft looks up the cgroups it names");
        let table_name = format!("awbench-{}", std::process::id());
        let t = Instant::now();
        let table = NftTable::load(
            &table_name,
            &nft_ruleset(&table_name, (&path, level), rules, port, spread, udp_port),
        );
        eprintln!("nftables: {rules} rules loaded in {:?}", t.elapsed());
        for (op, set) in [
            ("TCP connect+accept+close, one destination", &one),
            (SPREAD_OP, &many),
        ] {
            // Measured's fields: plain, agentwall enforced, nftables.
            let m = measure(
                a.rounds,
                || tcp_round(set, a.ops),
                [&plain, &enforced, &nft],
            );
            eprintln!(
                "  {op}: plain {:.0} ns, agentwall {:.0} ns, nftables {:.0} ns; agentwall/plain {}, nftables/plain {}",
                m.plain, m.floor, m.enforced, m.floor_ratio, m.overhead
            );
            side.push((op, m));
        }
        join(&Cgroup::at(mount.clone())).unwrap();
        assert_eq!(
            table.dropped(),
            0,
            "every benchmark flow is allowed by the nftables rules too"
        );
        drop(table);
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
         A ratio is the median of the per-round ratios; the brackets give their quartiles.\n",
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "| rules loaded | operation | plain | floor | enforced | enforced/plain [q1, q3] | floor/plain | enforced/floor | target (enforced/plain) |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---|---|---|---|");
    for r in &rows {
        let m = &r.m;
        let target = if r.target.is_nan() {
            "-".to_string()
        } else {
            format!(
                "≤ {:.2}x: {}",
                r.target,
                if m.overhead.median <= r.target {
                    "met"
                } else {
                    "NOT met"
                }
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} µs | {:.2} µs | {:.2} µs | {} | {} | {} | {target} |",
            r.rules,
            r.op,
            m.plain / 1000.0,
            m.floor / 1000.0,
            m.enforced / 1000.0,
            m.overhead,
            m.floor_ratio,
            m.programs,
        );
    }
    if let Some(r) = rows.first() {
        let m = &r.m;
        let _ = writeln!(
            md,
            "\nThe targets compare with plain. In the first row, the hooks alone cost {:.3}x \
             (floor/plain), running programs that do nothing. That leaves {:+.3} of the {:.2}x \
             target to agentwall's programs, which take {:.3}x on top of the floor \
             (enforced/floor).\n\n\
             Where floor/plain is near or above the target, no program on these hooks can meet \
             it on this host. The enforced/floor ratio is the part agentwall's code decides.",
            m.floor_ratio.median,
            r.target - m.floor_ratio.median,
            r.target,
            m.programs.median,
        );
    }
    if !side.is_empty() {
        let _ = writeln!(
            md,
            "\n### Side by side with nftables (10,000 rules)\n\n\
             | operation | plain | agentwall | nftables `socket cgroupv2` | agentwall/plain [q1, q3] | nftables/plain [q1, q3] |\n\
             |---|---:|---:|---:|---|---|"
        );
        for (op, m) in &side {
            let _ = writeln!(
                md,
                "| {op} | {:.2} µs | {:.2} µs | {:.2} µs | {} | {} |",
                m.plain / 1000.0,
                m.floor / 1000.0,
                m.enforced / 1000.0,
                m.floor_ratio,
                m.overhead,
            );
        }
        let _ = writeln!(
            md,
            "\nThe nftables configuration does the same allow/deny for one cgroup, as a platform \
             team would write it: an output-hook chain whose first rule sends the packets of \
             sockets of that cgroup (`socket cgroupv2 level N \"PATH\"`) to a chain that \
             accepts the allowed (address, protocol, port) triples from two interval sets (one \
             per family, the 10,000 rules of the policy) and drops the rest.\n\n\
             Its rounds run interleaved with a plain cgroup and agentwall's enforced cgroup, \
             while the table is loaded: every packet of the host passes its cgroup match, the \
             plain baseline included.\n\n\
             What each one judges differs. nftables looks up every outgoing packet of the \
             cgroup in its sets and acts on packets: a denied connect is dropped (the caller \
             waits for a timeout) or rejected, never refused with EPERM, and the rules know \
             nothing of identities, revocations or rate limits. agentwall judges the connect \
             (from its decision cache for a destination judged before), passes the packets of \
             a socket judged under the policy in force from its flow cache, and reports each \
             verdict."
        );
    }
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         Each configuration runs {} interleaved rounds of {} operations. In every round the \
         same process runs the loop three times, in an order that changes every round.\n\n\
         The enforced loop runs inside an enforced cgroup: agentwall's programs attached, the policy \
         loaded, events drained by a reader thread.\n\n\
         The plain loop runs in a plain sibling cgroup.\n\n\
         The floor loop runs in a sibling cgroup whose hooks (the same ones) run programs that only \
         return allow.\n\n\
         The measuring thread and the event reader are pinned to CPUs of their own.\n\n\
         The floor/plain ratio is what the kernel charges for running any program on those \
         hooks. The enforced/floor ratio is what agentwall's programs cost on top of that.\n\n\
         Times are medians per operation.",
        a.rounds, a.ops
    );
    let _ = writeln!(
        md,
        "\nPer TCP connect, the enforced path adds three programs. The sock_create program \
         checks the socket type.\n\n\
         The connect4 program makes the decision, checks the event budget, writes one ring \
         buffer event and adds a per-CPU flow cache entry for the socket. The budgets are set \
         at a rate no loop reaches, so every verdict is recorded.\n\n\
         The egress program runs on each outgoing packet. For the packets of a socket judged \
         under the current policy epoch, it is a flow cache hit. Otherwise it makes the full \
         decision.\n\n\
         A decision that a rule allowed is remembered in a per-CPU decision cache. It is keyed \
         by cgroup, destination, port and protocol, and stays valid while the policy epoch \
         holds.\n\n\
         For a destination judged before, the decision is one cache read. Otherwise it is the \
         binding lookup plus one longest-prefix lookup in the rules trie.\n\n\
         The one-destination rows connect to the same listener every time, as an agent calling \
         the same service does. After the first connect, every decision comes from the cache.\n\n\
         The new-destination rows take {SPREAD_PORTS} listening ports in turn. That is {}x the \
         cache's {DECISION_CACHE_SLOTS} slots per CPU, so nearly every connect is judged in \
         full.\n\n\
         The client closes with SO_LINGER 0 (a reset), so that TIME_WAIT sockets do not pile up \
         across rounds.\n\n\
         The UDP loop sends no datagram. It measures socket, bind, connect and close. The bind \
         is to one local port, the same every time. The connect is one connect4 verdict, from \
         the cache.\n\n\
         The UDP loop runs four times as many operations per round as the TCP loops; each is a \
         quarter of the time.\n\n\
         The rate-limited row grants the one destination by a `rules:` entry with `rateLimit: \
         1000000 per second`, which no loop here reaches. A limited rule is never answered from \
         the decision cache: every connect takes a token from the rule's bucket in the kernel \
         (a compare-and-swap on the bucket's arrival time). Compare it with the first row, the \
         same connect granted without a limit.",
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
