//! Hostile load (issue 22), as root with a release daemon (`AGENTWALL_BIN`), each measure
//! against a baseline in the same run:
//!
//! - One agent floods denied UDP sends for a while; a quiet agent beside it makes 50 denied
//!   connects spread over the flood. Measured with the default event budgets and with the
//!   budgets off: audit bytes written per second, the quiet agent's records missing from the
//!   log, the flood's verdicts accounted for (records, summaries, gap records), and the
//!   daemon's peak resident memory.
//! - Enrollment latency (an `agentwall exec --cert` that enrolls and runs a no-op) while
//!   another user holds 4000 idle connections to the enrollment socket, against the same
//!   without them, and the daemon's peak memory in each case.
//!
//! Writes its section of docs/benchmarks.md with --report=PATH.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark reports to the terminal"
)]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use agentwall::audit::{keys::Keyring, verify};
use agentwall_tests::{TcpSink, TestDaemon, lines, quantile, tcp_policy};

/// `--name=VALUE`, or `--name` alone (an empty value).
fn arg(name: &str) -> Option<String> {
    let flag = format!("--{name}");
    std::env::args().skip(1).find_map(|a| {
        if a == flag {
            Some(String::new())
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

/// Peak resident memory of a process, KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Flood {
    offered: u64,
    secs: f64,
    audit_bytes_per_sec: f64,
    quiet_recorded: u64,
    /// The flood's verdicts: recorded one by one, counted in summaries, lost in gap records.
    recorded: u64,
    summarized: u64,
    lost: u64,
    peak_rss_kib: u64,
}

const QUIET: u64 = 50;

fn flood_run(budgets: bool, millis: u64) -> Flood {
    let quiet_target = TcpSink::new("127.0.0.1:0");
    let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let config = if budgets {
        "events:\n  summary_every: 1s\n"
    } else {
        "events:\n  cgroup_rate: 0\n"
    };
    let mut d =
        TestDaemon::start_with_config(&[("p.yaml", &tcp_policy("web", &[1]))], Some(config));
    let pid = d.pid().unwrap();
    let before = dir_bytes(&d.audit_dir());
    let t0 = Instant::now();
    let flooder = d
        .exec_under(
            &["--policy", "web"],
            None,
            &[&format!("udp-flood-for 127.0.0.1:{port} {millis}")],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The quiet agent: a denied connect every 100 ms while the flood goes on.
    let to = format!("tcp 127.0.0.1:{}", quiet_target.port());
    let pause = format!("sleep {}", (millis / (QUIET + 2)).max(1));
    let mut cmds = Vec::new();
    for _ in 0..QUIET {
        cmds.push(pause.as_str());
        cmds.push(to.as_str());
    }
    let quiet = d.exec("web", None, &cmds);
    assert!(
        lines(&quiet).iter().filter(|l| *l == "err EPERM").count() as u64 == QUIET,
        "{quiet:?}"
    );
    let out = flooder.wait_with_output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let report = lines(&out).join(" ");
    let offered = agentwall_tests::all_denied(&report)
        .unwrap_or_else(|| panic!("every send denied: {report}"));
    // The log as the flood left it: its records drained and summarized.
    std::thread::sleep(Duration::from_millis(1500));
    let bytes = dir_bytes(&d.audit_dir()) - before;
    let peak = peak_rss_kib(pid);
    d.stop_cleanly();
    let key = Keyring::from_files(&[d.audit_key()]).unwrap();
    let (quiet_needle, flood_needle) = (
        format!("\"port\":{},", quiet_target.port()),
        format!("\"port\":{port},"),
    );
    let (mut quiet_recorded, mut recorded, mut summarized, mut lost) = (0, 0, 0, 0);
    verify::walk(&d.audit_dir(), &key, &BTreeSet::new(), |_, body| {
        let json = agentwall::audit::record::json(body).unwrap();
        let text = std::str::from_utf8(&json).unwrap_or("");
        if text.contains("\"kind\":\"verdict\"") {
            if text.contains(&quiet_needle) {
                quiet_recorded += 1;
            } else if text.contains(&flood_needle) {
                recorded += 1;
            }
        } else if text.contains("\"kind\":\"verdict_summary\"") {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            summarized += v["suppressed"].as_u64().unwrap_or(0);
        } else if text.contains("\"kind\":\"events_lost\"") {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            lost += v["lost"].as_u64().unwrap_or(0);
        }
    })
    .unwrap();
    let f = Flood {
        offered,
        secs,
        audit_bytes_per_sec: bytes as f64 / secs,
        quiet_recorded,
        recorded,
        summarized,
        lost,
        peak_rss_kib: peak,
    };
    eprintln!(
        "flood (budgets {}): {offered} denied sends in {secs:.1} s; audit {:.0} B/s; quiet {quiet_recorded}/{QUIET} recorded; flood recorded {recorded}, summarized {summarized}, lost {lost}; peak RSS {peak} KiB",
        if budgets { "on" } else { "off" },
        f.audit_bytes_per_sec
    );
    f
}

/// The flood with budgets off while the audit file system is full: the log cannot take a
/// record, its queue fills, the kernel ring fills. Returns the daemon's peak memory, whether
/// the sends were all still denied, and how long a SIGTERM took to end the daemon.
fn full_disk_run(millis: u64) -> (u64, bool, f64) {
    use std::io::Write as _;
    // In a directory of its own, which the guard removes with the mount point.
    let base = std::env::temp_dir()
        .join(format!("aw-bench-fullfs-{}", std::process::id()))
        .join("fs");
    let fs_guard = agentwall_tests::Tmpfs::new(base.clone(), "1m");
    let log = base.join("log");
    let config = format!(
        "audit:\n  dir: {}\n  checkpoint_every: 1s\nevents:\n  cgroup_rate: 0\n",
        log.display()
    );
    let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let mut d =
        TestDaemon::start_with_config(&[("p.yaml", &tcp_policy("web", &[1]))], Some(&config));
    let pid = d.pid().unwrap();
    {
        let mut f = fs::File::create(base.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    }
    let out = d.exec(
        "web",
        None,
        &[&format!("udp-flood-for 127.0.0.1:{port} {millis}")],
    );
    let all_denied = lines(&out)
        .first()
        .is_some_and(|l| l.starts_with("eperm=") && l.ends_with(" other=0"));
    let failing = d.status().audit.failing;
    let peak = peak_rss_kib(pid);
    let t = Instant::now();
    let _ = d.stop();
    let stop_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "flood on a full audit file system: denied {all_denied}, audit failing {failing}, peak RSS {peak} KiB, stopped in {stop_secs:.1} s"
    );
    drop(d);
    drop(fs_guard);
    (peak, all_denied && failing, stop_secs)
}

struct Enroll {
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: u64,
    held: String,
}

fn enroll_run(flood: bool, n: usize) -> Enroll {
    let policy = "policy:\n  name: reader\n  identity: agent/reader/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [9]\n";
    let d = TestDaemon::start(&[("r.yaml", policy)]);
    let (flooder, held) = if flood {
        let (f, held) = d.hold_enroll_connections(65534, 4000);
        (Some(f), held)
    } else {
        (None, String::new())
    };
    let (cert, key) = d.issue("agent/reader/prod", "1h");
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let o = d
            .exec_under(&["--cert", &cert, "--key", &key], None, &["pid"])
            .output()
            .unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(o.status.success(), "enrolled ({held}): {o:?}");
    }
    let peak = peak_rss_kib(d.pid().unwrap());
    if let Some(f) = flooder {
        f.quit();
    }
    let e = Enroll {
        p50_ms: quantile(&mut ms, 0.5),
        p99_ms: quantile(&mut ms, 0.99),
        peak_rss_kib: peak,
        held,
    };
    eprintln!(
        "enrollment ({}): p50 {:.1} ms p99 {:.1} ms; peak RSS {} KiB {}",
        if flood {
            "4000 idle connections"
        } else {
            "quiet"
        },
        e.p50_ms,
        e.p99_ms,
        e.peak_rss_kib,
        e.held
    );
    e
}

fn main() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "run as root (cargo xtask bench)"
    );
    let millis: u64 = arg("flood-ms").map_or(10_000, |v| v.parse().unwrap());
    let n: usize = arg("enrollments").map_or(100, |v| v.parse().unwrap());
    let on = flood_run(true, millis);
    let off = flood_run(false, millis);
    let (full_rss, full_ok, full_stop) = full_disk_run(millis);
    let quiet_enroll = enroll_run(false, n);
    let flooded_enroll = enroll_run(true, n);

    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut md = String::new();
    let _ = writeln!(md, "## Hostile load\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/load.rs), a release daemon fresh for \
         each run.\n"
    );
    let _ = writeln!(
        md,
        "| run | denied sends | audit bytes/s | quiet agent's records | flood recorded / summarized / lost | peak RSS |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (name, f) in [("default budgets", &on), ("budgets off (baseline)", &off)] {
        let _ = writeln!(
            md,
            "| {name} | {} ({:.0}/s) | {:.0} | {} of {QUIET} | {} / {} / {} | {} MiB |",
            f.offered,
            f.offered as f64 / f.secs,
            f.audit_bytes_per_sec,
            f.quiet_recorded,
            f.recorded,
            f.summarized,
            f.lost,
            f.peak_rss_kib / 1024
        );
    }
    let _ = writeln!(
        md,
        "| budgets off, audit file system full | - | 0 | - | - | {} MiB |",
        full_rss / 1024
    );
    let accounted = on.recorded + on.summarized + on.lost == on.offered;
    let _ = writeln!(
        md,
        "\nTarget: audit bytes under the flood ≤ 100 KB/s with the default budgets: {} \
         ({:.1} KB/s). The baseline writes {:.0}x as much, {:.1} KB/s.\n\n\
         Target: the quiet agent loses no record: {} ({} of {QUIET}).\n\n\
         Target: every verdict of the flood accounted for: {}.\n",
        met(on.audit_bytes_per_sec <= 100_000.0),
        on.audit_bytes_per_sec / 1000.0,
        off.audit_bytes_per_sec / on.audit_bytes_per_sec.max(1.0),
        off.audit_bytes_per_sec / 1000.0,
        met(on.quiet_recorded == QUIET),
        on.quiet_recorded,
        met(accounted),
    );
    let _ = writeln!(
        md,
        "With the audit file system full, the log cannot take a record. The alarm is up ({}). \
         Every send is still denied. The writer's queue and the kernel ring fill, and the rest \
         is counted as lost.\n\n\
         The daemon's memory stays bounded ({} MiB at its peak), and a SIGTERM ends it in \
         {full_stop:.1} s.\n",
        if full_ok { "yes" } else { "NO" },
        full_rss / 1024
    );
    let _ = writeln!(
        md,
        "Enrollment: {n} `agentwall exec --cert` runs in a row, while another user holds 4000 \
         idle connections to the enrollment socket, against the same without them.\n"
    );
    let _ = writeln!(md, "| run | p50 | p99 | peak RSS |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, e) in [
        ("4000 idle connections held", &flooded_enroll),
        ("no flood (baseline)", &quiet_enroll),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.1} ms | {:.1} ms | {} MiB |",
            e.p50_ms,
            e.p99_ms,
            e.peak_rss_kib / 1024
        );
    }
    let ratio = flooded_enroll.p99_ms / quiet_enroll.p99_ms;
    let _ = writeln!(
        md,
        "\nTarget: enrollment p99 under the flood within 2x of the baseline's: {} ({ratio:.2}x).\n\n\
         The flooder's connections past the few in progress its cgroup and user may have are \
         refused at once ({}).",
        met(ratio <= 2.0),
        flooded_enroll.held.trim()
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         One agent floods denied UDP sends for {:.0} s flat out. A quiet agent beside it makes \
         {QUIET} denied connects spread over the flood.\n\n\
         The flood runs with the default event budgets: 200 records a second per cgroup, \
         bursts of 2000, and summaries every 1 s here. The baseline of the same run has the \
         budgets off.\n\n\
         Audit bytes: the growth of the audit directory over the flood.\n\n\
         Accounted for: the flood's verdicts recorded one by one, counted in summary records, \
         and lost in gap records. They are compared against the sends the kernel denied.\n\n\
         Memory: the daemon's peak resident set (VmHWM).\n\n\
         The full audit file system is a 1 MiB tmpfs, filled before the flood.\n\n\
         Each enrollment run enrolls over mTLS, attests, binds and runs a no-op.",
        millis as f64 / 1000.0
    );
    print!("{md}");
    if let Some(path) = arg("report") {
        agentwall_tests::write_report_section(&PathBuf::from(&path), "hostile-load", &md);
        eprintln!("wrote {path}");
    }
}
