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
    io::{BufRead as _, BufReader, Read as _, Write as _},
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
struct Http {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Http {
    fn connect(socket: &Path) -> Self {
        let w = UnixStream::connect(socket).unwrap();
        Self {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    /// Sends one request and reads the answer; its status.
    fn post(&mut self, path: &str, body: &str) -> u16 {
        write!(
            self.w,
            "POST {path} HTTP/1.1\r\nHost: agentwall\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status: u16 = line[9..12].parse().unwrap();
        let mut len = 0;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut b = vec![0; len];
        self.r.read_exact(&mut b).unwrap();
        status
    }
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
    let mut c = Http::connect(socket);
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
        assert_eq!(c.post(path, body), want);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let cpu = process_cpu(pid) - cpu0;
    (quantile(&mut v, 0.5), quantile(&mut v, 0.99), cpu)
}

fn main() {
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
    out.push_str("| request | p50 (µs) | p99 (µs) | per daemon core (/s) | vs do-nothing (per core) |\n|---|---|---|---|---|\n");
    for (what, a, b, cpu) in [
        ("do-nothing path (404), the baseline", b50, b99, bcpu),
        ("decide, caller by pid", p50, p99, pcpu),
        ("decide, caller by certificate", c50, c99, ccpu),
    ] {
        println!(
            "{what}: p50 {a:.0} µs, p99 {b:.0} µs, {:.0}/s per core",
            per_core(cpu)
        );
        let _ = writeln!(
            out,
            "| {what} | {a:.0} | {b:.0} | {:.0} | {:.2}x |",
            per_core(cpu),
            per_core(cpu) / per_core(bcpu)
        );
    }
    let _ = writeln!(
        out,
        "\n### Method\n\nParse: read a policy of N rules, each a /32 destination with one port, from its YAML text (the YAML parsed twice, once for the values and once for each node's position, and every field checked). Compile: the checked set to the kernel's nodes. In force after: `Enforcer::apply` until the new generation is flipped in (its nodes written). Swap, all: the whole of `Enforcer::apply` (the grace and the removal of the old generation too). All in the benchmark's own process, medians of 5.\n\nDecisions: {n} requests on one keep-alive connection to the decision socket of a release daemon, paced at 8,000 a second (under one asker's budget of 10,000), one at a time; latency is the client's round trip; per core is the requests over the daemon's CPU seconds (schedstat of all its threads) meanwhile. The baseline is the same body posted to a path the server does not serve (read, parsed, 404) on the same connection. Each decision is also written to the audit log, which the per-core figure includes."
    );
    let _ = agent.quit();
}
