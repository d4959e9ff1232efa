//! Policy benchmarks: compiling and swapping rule sets of 1k, 10k and 100k rules into the
//! kernel, and the decision API's latency and throughput per core.
//!
//! Each figure has a baseline from the same run: the swap of a one-rule set (the fixed cost
//! of a generation, its 20 ms grace included); for decisions, the same request on the same
//! connection answered by the server's do-nothing path (a path it does not serve: read,
//! parsed, answered 404), so the difference is the decision itself. Run with `cargo xtask
//! bench` (root); it writes its section of docs/benchmarks.md.
#![expect(clippy::print_stdout, reason = "a benchmark reports to the terminal")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agentwall_tests::{TestDaemon, process_cpu, quantile};

fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}=");
    std::env::args().find_map(|a| a.strip_prefix(&key).map(str::to_string))
}

/// A policy of `n` rules, each a /32 destination of its own with one port.
fn policy_of(n: usize) -> String {
    let mut s = String::from("policy:\n  name: big\n  egress:\n");
    for i in 0..n {
        let _ = write!(
            s,
            "    - to: 10.{}.{}.{}\n      protocol: tcp\n      ports: [443]\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    s
}

/// Removes an enforcer's pins when the benchmark ends, even by a panic.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = agentwall::enforce::teardown(&self.0);
    }
}

/// Medians in ms for a set of `n` rules.
struct Timings {
    /// Reading the policy text (YAML, checks, positions).
    parse: f64,
    /// The checked set to the kernel's nodes.
    compile: f64,
    /// `Enforcer::apply` until the new generation is in force (written, flipped).
    in_force: f64,
    /// All of `Enforcer::apply`: with the grace and the removal of the old generation.
    swap: f64,
}

fn compile_and_swap(e: &mut agentwall::enforce::Enforcer, n: usize) -> Timings {
    let text = policy_of(n);
    let (mut parse, mut compile, mut in_force, mut swap) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let set =
            agentwall::policy::parse_texts(&[(PathBuf::from("big.yaml"), text.clone())]).unwrap();
        parse.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let compiled = agentwall::policy::compile(&set, |_| 1).unwrap();
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        e.apply(&compiled).unwrap();
        swap.push(t.elapsed().as_secs_f64() * 1e3);
        in_force.push(e.last_in_force_after().unwrap().as_secs_f64() * 1e3);
    }
    Timings {
        parse: quantile(&mut parse, 0.5),
        compile: quantile(&mut compile, 0.5),
        in_force: quantile(&mut in_force, 0.5),
        swap: quantile(&mut swap, 0.5),
    }
}

/// One keep-alive HTTP/1.1 client of the decision socket.
type Http = agentwall_tests::http::KeepAlive<UnixStream>;

fn connect(socket: &Path) -> Http {
    Http::new(UnixStream::connect(socket).unwrap())
}

/// (p50 µs, p99 µs) of `n` requests to `path`, and the daemon's CPU seconds for them.
fn latency(
    socket: &Path,
    pid: u32,
    path: &str,
    body: &str,
    n: usize,
    want: u16,
) -> (f64, f64, f64) {
    let mut c = connect(socket);
    let mut v = Vec::with_capacity(n);
    let cpu0 = process_cpu(pid);
    // Paced under the asker's budget (10,000 a second): the server's cost, not its refusals.
    let pace = Duration::from_micros(125);
    let start = Instant::now();
    for i in 0..n {
        let due = start + pace * i as u32;
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let t = Instant::now();
        assert_eq!(c.post(path, body).0, want);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let cpu = process_cpu(pid) - cpu0;
    (quantile(&mut v, 0.5), quantile(&mut v, 0.99), cpu)
}

/// The clients of the throughput rows: each a process in a cgroup of its own (an asker of its
/// own, with its own budget), each paced at 9,000 requests a second at most.
const CLIENTS: usize = 4;
const CLIENT_RATE: u32 = 9_000;

/// Client mode (`--client=SOCKET --path=P --body=FILE --n=N --want=STATUS`): waits for a line
/// on stdin (its cgroup is set by then), sends `n` requests one after another, at most
/// [`CLIENT_RATE`] a second, and prints how many were answered `want`.
fn client(socket: &str) {
    let path = arg("path").unwrap();
    let body = fs::read_to_string(arg("body").unwrap()).unwrap();
    let n: usize = arg("n").unwrap().parse().unwrap();
    let want: u16 = arg("want").unwrap().parse().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let mut c = connect(Path::new(socket));
    let pace = Duration::from_secs(1) / CLIENT_RATE;
    let start = Instant::now();
    let mut ok = 0;
    for i in 0..n {
        let due = start + pace * i as u32;
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        if c.post(&path, &body).0 == want {
            ok += 1;
        }
    }
    println!("{ok}");
}

/// [`CLIENTS`] clients at once, `n` requests each: (answered `want`, wall seconds, the
/// daemon's CPU seconds).
fn throughput(
    socket: &Path,
    pid: u32,
    (path, body, want): (&str, &str, u16),
    n: usize,
) -> (usize, f64, f64) {
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("awb-{}-body", std::process::id()));
    fs::write(&dir, body).unwrap();
    let mount = agentwall_tests::cgroup_mount();
    let groups: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let g = agentwall_tests::CgroupGuard(agentwall::cgroup::Cgroup::at(
                mount.join(format!("awb-{}-client{i}", std::process::id())),
            ));
            g.0.create().unwrap();
            g
        })
        .collect();
    let mut children: Vec<_> = groups
        .iter()
        .map(|g| {
            let child = Command::new(std::env::current_exe().unwrap())
                .arg(format!("--client={}", socket.display()))
                .arg(format!("--path={path}"))
                .arg(format!("--body={}", dir.display()))
                .arg(format!("--n={n}"))
                .arg(format!("--want={want}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            fs::write(g.0.path().join("cgroup.procs"), child.id().to_string()).unwrap();
            child
        })
        .collect();
    let cpu0 = process_cpu(pid);
    let start = Instant::now();
    for c in &mut children {
        c.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    let mut ok = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        ok += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .unwrap();
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = process_cpu(pid) - cpu0;
    let _ = fs::remove_file(&dir);
    drop(groups);
    (ok, wall, cpu)
}

fn main() {
    if let Some(socket) = arg("client") {
        client(&socket);
        return;
    }
    // `--only=swap|decisions` runs one half, for a quick comparison; it writes no report.
    let only = arg("only");
    let report = arg("report").map(PathBuf::from).filter(|_| only.is_none());
    let mut out = String::from("## Policy\n\n");
    if only.as_deref().is_none_or(|o| o == "swap") {
        swaps(&mut out);
    }
    if only.as_deref().is_none_or(|o| o == "decisions") {
        decisions(&mut out);
    }
    println!("{out}");
    if let Some(r) = report {
        agentwall_tests::write_report_section(&r, "policy", &out);
    }
}

/// Compile and swap at 1k, 10k and 100k rules, against one rule.
fn swaps(out: &mut String) {
    // Compile and swap.
    let name = format!("awb-{}-policy", std::process::id());
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(&name));
    let (mut e, _ring) =
        agentwall::enforce::Enforcer::load(&pins.0, &agentwall::config::Limits::default()).unwrap();
    let base = compile_and_swap(&mut e, 1);
    out.push_str("| rules | parse (ms) | compile (ms) | in force after (ms) | swap, all (ms) | compile + in force (ms) | vs one rule (ms) | target (compile + swap) |\n|---|---|---|---|---|---|---|---|\n");
    for (n, target) in [(1_000, f64::NAN), (10_000, 25.0), (100_000, 250.0)] {
        let t = compile_and_swap(&mut e, n);
        println!(
            "{n} rules: parse {:.1} ms, compile {:.1} ms, in force after {:.1} ms, swap {:.1} ms",
            t.parse, t.compile, t.in_force, t.swap
        );
        let total = t.compile + t.in_force;
        let verdict = if target.is_nan() {
            "-".to_string()
        } else {
            format!(
                "≤ {target:.0} ms: {}",
                if total <= target { "met" } else { "NOT met" }
            )
        };
        let _ = writeln!(
            out,
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | {total:.1} | {:+.1} | {verdict} |",
            t.parse,
            t.compile,
            t.in_force,
            t.swap,
            total - (base.compile + base.in_force),
        );
    }
    let _ = writeln!(
        out,
        "\nOne rule (the baseline): compile {:.1} ms, in force after {:.1} ms; its whole swap {:.1} ms, of which 20 ms is the grace a swap waits before it removes the old generation (the new one is in force from the flip). The target is read as compile plus the time until the new rules are in force; reading the YAML (parse) is reported beside it.\n",
        base.compile, base.in_force, base.swap
    );
    drop(e);
    drop(pins);
}

/// The decision API against its do-nothing path.
fn decisions(out: &mut String) {
    let catalog = "service:\n  name: api\n  endpoints:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [9]\n";
    let policy = "policy:\n  name: bench\n  identity: agent/bench/prod\n  rules:\n    - resource: service:api\n      actions: [read]\n      conditions: { table: [events, sessions] }\n";
    let d = TestDaemon::start(&[("catalog.yaml", catalog), ("bench.yaml", policy)]);
    let pid = d.pid().unwrap();
    let (cert, key) = d.issue("agent/bench/prod", "10m");
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let agent_pid = agent.cmd("pid");
    let pem = fs::read_to_string(&cert).unwrap();
    let by_pid = format!(
        r#"{{"caller":{{"pid":{agent_pid}}},"resource":"service:api","action":"read","attributes":{{"table":"events"}}}}"#
    );
    let by_cert = serde_json::json!({
        "caller": {"certificate": pem},
        "resource": "service:api",
        "action": "read",
        "attributes": {"table": "events"},
    })
    .to_string();
    let n = 20_000;
    let s = &d.decision_socket;
    let (b50, b99, bcpu) = latency(s, pid, "/v1/nothing", &by_pid, n, 404);
    let (p50, p99, pcpu) = latency(s, pid, "/v1/decide", &by_pid, n, 200);
    let (c50, c99, ccpu) = latency(s, pid, "/v1/decide", &by_cert, n, 200);
    let per_core = |cpu: f64| n as f64 / cpu;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    out.push_str("One request at a time:\n\n| request | p50 (µs) | p99 (µs) | per daemon core (/s) | vs do-nothing (per core) | target (p99 ≤ 100 µs) |\n|---|---|---|---|---|---|\n");
    for (what, a, b, cpu) in [
        ("do-nothing path (404), the baseline", b50, b99, bcpu),
        ("decide, caller by pid", p50, p99, pcpu),
        ("decide, caller by certificate", c50, c99, ccpu),
    ] {
        println!(
            "{what}: p50 {a:.0} µs, p99 {b:.0} µs, {:.0}/s per core",
            per_core(cpu)
        );
        let target = if what.starts_with("decide") {
            met(b <= 100.0)
        } else {
            "-"
        };
        let _ = writeln!(
            out,
            "| {what} | {a:.0} | {b:.0} | {:.0} | {:.2}x | {target} |",
            per_core(cpu),
            per_core(cpu) / per_core(bcpu)
        );
    }
    let per_client = 20_000;
    let _ = writeln!(
        out,
        "\n{CLIENTS} askers at once, each on its own connection, up to {CLIENT_RATE} requests a second each:\n\n| request | answered | per second (wall) | per daemon core (/s) | vs do-nothing (per core) | target (≥ 50000/s per core) |\n|---|---|---|---|---|---|"
    );
    let mut base_core = f64::NAN;
    for (what, path, body, want) in [
        (
            "do-nothing path (404), the baseline",
            "/v1/nothing",
            &by_pid,
            404,
        ),
        ("decide, caller by pid", "/v1/decide", &by_pid, 200),
        ("decide, caller by certificate", "/v1/decide", &by_cert, 200),
    ] {
        let (ok, wall, cpu) = throughput(s, pid, (path, body, want), per_client);
        assert_eq!(
            ok,
            CLIENTS * per_client,
            "{what}: every request answered {want}"
        );
        let core = ok as f64 / cpu;
        if base_core.is_nan() {
            base_core = core;
        }
        println!(
            "{what}, {CLIENTS} askers: {:.0}/s, {core:.0}/s per core",
            ok as f64 / wall
        );
        let target = if what.starts_with("decide") {
            met(core >= 50_000.0)
        } else {
            "-"
        };
        let _ = writeln!(
            out,
            "| {what} | {ok} | {:.0} | {core:.0} | {:.2}x | {target} |",
            ok as f64 / wall,
            core / base_core
        );
    }
    let _ = writeln!(
        out,
        "\n### Method\n\nParse: read a policy of N rules, each a /32 destination with one port, from its YAML text (the YAML parsed twice, once for the values and once for each node's position, and every field checked). Compile: the checked set to the kernel's nodes. In force after: `Enforcer::apply` until the new generation is flipped in (its nodes written, by one thread per CPU above 2048 nodes). Swap, all: the whole of `Enforcer::apply` (the grace and the removal of the old generation too). All in the benchmark's own process, medians of 5.\n\nDecisions, one at a time: {n} requests on one keep-alive connection to the decision socket of a release daemon, paced at 8,000 a second (under one asker's budget of 10,000); latency is the client's round trip; per core is the requests over the daemon's CPU seconds (schedstat of all its threads) meanwhile. Each request then finds the daemon asleep: it pays a wake-up.\n\nDecisions, {CLIENTS} askers: {CLIENTS} client processes, each in a cgroup of its own (so an asker with its own budget), each sending {per_client} requests one after another on its own connection, at most {CLIENT_RATE} a second. Per core is all their answers over the daemon's CPU seconds meanwhile.\n\nThe baseline of both is the same body posted to a path the server does not serve (read, parsed, 404) on the same connection. The decision API runs on threads of its own, one per CPU, each with a runtime of its own; the daemon's CPU time counts all its threads. Each decision is also counted for the audit log and recorded up to 100 a second per asker (the rest are summed into the next record), which the per-core figures include. On this host the do-nothing path itself runs near the per-core target: a wake-up and three system calls per request on a 2-CPU VM. The pid path adds two file system lookups per request (`/proc/PID/cgroup`, then the cgroup directory); no cache may stand in for them, since a process can change cgroups and pids are reused."
    );
    let _ = agent.quit();
}
