//! Audit store throughput: records made durable (encrypted, chained, group-committed) per
//! second, and records verified per second, each against a baseline in the same run: the same
//! bytes written and synced in the same batches without encryption or chaining, and the same
//! bytes only hashed with SHA-256. Writes its section of docs/benchmarks.md with --report=PATH.
//!
//! Then, as root with a daemon (`AGENTWALL_BIN`), the whole pipeline: a workload in an
//! enforced cgroup makes denied UDP sends as fast as it can; every one is a kernel event that
//! the daemon reads from the ring buffer, names, encodes, and makes durable. Measured: durable
//! records per second, events the kernel could not deliver (each in a gap record), events
//! unaccounted for (must be zero), and event-to-durable latency as the daemon measured it.
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
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use agentwall::{
    audit::{
        keys::{AuditKey, Keyring},
        store::{Rotation, Writer},
        verify,
    },
    events::{EventRecord, Resolve},
};
use agentwall_common::{
    addr,
    event::{Event, Hook, Reason, Verdict},
    rules::proto,
};

const KEY: &str = "8f14e45fceea167a5a36dedd4bea2543c9f0f895fb98ab9159f51fd0297e236d";

/// `--name=VALUE`, or `--name` alone (an empty value).
fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}");
    std::env::args().find_map(|a| {
        let rest = a.strip_prefix(&key)?;
        if rest.is_empty() {
            Some(String::new())
        } else {
            rest.strip_prefix('=').map(str::to_string)
        }
    })
}

/// Names a verdict as the daemon's resolver would: an enrolled agent's policy, rule and
/// SPIFFE ID.
struct Names;

impl Resolve for Names {
    fn policy(&self, _slot: u32) -> Option<String> {
        Some("analytics-reader".into())
    }
    fn rule(&self, _generation: u32, rule_id: u32) -> Option<String> {
        Some(format!("policies/analytics-reader.yaml:{rule_id}"))
    }
    fn identity(&self, _cgroup_id: u64) -> Option<String> {
        Some("spiffe://example.org/agent/analytics-reader/prod".into())
    }
}

/// A verdict record as the daemon writes it (compact form), and its JSON length.
fn record(i: u64) -> (Vec<u8>, usize) {
    let mut comm = [0u8; 16];
    comm[..7].copy_from_slice(b"python3");
    let e = Event {
        ts_boot_ns: 0,
        cgroup_id: 4000 + i % 7,
        pid_tgid: ((1000 + i % 97) << 32) | (1000 + i % 97),
        addr: addr::from_v4([10, 20, 1, 7]),
        orig_addr: addr::from_v4([10, 20, 1, 7]),
        rule_id: 7,
        slot: 2,
        generation: 1,
        port: 5432,
        hook: Hook::CONNECT4,
        proto: proto::TCP,
        verdict: Verdict::ALLOW,
        reason: Reason::RULE,
        sock_type: 1,
        family: 2,
        _pad: [0; 4],
        comm,
    };
    let at = std::time::UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_000 + i * 17);
    let rec = EventRecord::decode_at(&e, &Names, at);
    let body = agentwall::audit::record::verdict(&e, &rec, at);
    let json = agentwall::audit::record::json(&body).unwrap().len();
    (body, json)
}

fn main() {
    if let Some(w) = arg("worker-udp") {
        worker_udp(&w);
        return;
    }
    if arg("no-store").is_none() {
        store();
    }
    if arg("no-pipeline").is_none() {
        pipeline();
    }
}

/// In the enforced cgroup: `n` denied UDP sends to 127.0.0.1:`port`, as fast as possible or
/// at `rate` per second (spec `PORT,N[,RATE]`); prints how many were denied and how long
/// they took.
fn worker_udp(spec: &str) {
    let parts: Vec<u64> = spec.split(',').map(|p| p.parse().unwrap()).collect();
    let (port, n, rate) = (
        u16::try_from(parts[0]).unwrap(),
        parts[1],
        parts.get(2).copied(),
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let t = Instant::now();
    let mut denied = 0u64;
    for i in 0..n {
        if let Some(r) = rate
            && i % 100 == 0
        {
            let due = Duration::from_secs_f64(i as f64 / r as f64);
            if let Some(wait) = due.checked_sub(t.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let Err(e) = sock.send_to(b"x", to)
            && e.raw_os_error() == Some(libc::EPERM)
        {
            denied += 1;
        }
    }
    println!("{denied} {}", t.elapsed().as_secs_f64());
}

/// What one pipeline run measured.
struct Run {
    offered: u64,
    offered_rate: f64,
    durable_rate: f64,
    verdicts: u64,
    lost: u64,
    unaccounted: i64,
    lat: agentwall::control::LatencyStatus,
}

/// A fresh daemon; `n` denied sends (at `rate` per second, or flat out); waits until the log
/// is idle, stops the daemon, and counts in the log itself.
fn pipeline_run(n: u64, rate: Option<u64>) -> Run {
    use agentwall_tests::TestDaemon;
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let policy = "policy:\n  name: bench\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [1]\n";
    // Event budgets off: this measures what the pipeline can take, every verdict a record
    // (tests/benches/load.rs measures a flood under the default budgets).
    let mut d = TestDaemon::start_with_config(
        &[("bench.yaml", policy)],
        Some("events:\n  cgroup_rate: 0\n"),
    );
    let me = d.world_copy(&std::env::current_exe().unwrap());
    let run = |count: u64, rate: Option<u64>| -> (u64, f64) {
        let spec = match rate {
            Some(r) => format!("{port},{count},{r}"),
            None => format!("{port},{count}"),
        };
        let o = std::process::Command::new(agentwall_tests::agentwall_bin())
            .args(["exec", "--socket"])
            .arg(&d.socket)
            .args(["--policy", "bench", "--"])
            .arg(&me)
            .arg(format!("--worker-udp={spec}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let text = String::from_utf8_lossy(&o.stdout);
        let (a, b) = text.trim().split_once(' ').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };
    // Waits until the log has not grown for half a second; returns when it last grew.
    let settle = |d: &TestDaemon| -> (Instant, u64) {
        let mut last = (Instant::now(), d.status().audit.committed);
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let c = d.status().audit.committed;
            if c != last.1 {
                last = (Instant::now(), c);
            } else if last.0.elapsed() >= Duration::from_millis(500) {
                return last;
            }
        }
    };
    let (_, before) = settle(&d);
    let t0 = Instant::now();
    let (denied, work_secs) = run(n, rate);
    let (t_end, after) = settle(&d);
    let lat = d.status().audit.event_to_durable;
    d.stop_cleanly();
    assert_eq!(denied, n, "every send was denied");
    let key = Keyring::from_files(&[d.audit_key()]).unwrap();
    let needle = format!("\"port\":{port},");
    let (mut verdicts, mut lost) = (0u64, 0u64);
    verify::walk(&d.audit_dir(), &key, &BTreeSet::new(), |_, body| {
        let json = agentwall::audit::record::json(body).unwrap();
        let text = std::str::from_utf8(&json).unwrap_or("");
        if text.contains("\"kind\":\"verdict\"") && text.contains(&needle) {
            verdicts += 1;
        } else if text.contains("\"kind\":\"events_lost\"") {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            lost += v["lost"].as_u64().unwrap_or(0);
        }
    })
    .unwrap();
    let r = Run {
        offered: n,
        offered_rate: n as f64 / work_secs,
        durable_rate: (after - before) as f64 / t_end.duration_since(t0).as_secs_f64(),
        verdicts,
        lost,
        unaccounted: n as i64 - (verdicts + lost) as i64,
        lat,
    };
    eprintln!(
        "audit pipeline ({}): {n} events offered at {:.0}/s; durable {:.0}/s; verdicts {verdicts}, lost (gap records) {lost}, unaccounted {}; event to durable p50 {} us p99 {} us max {} us",
        rate.map_or("flat out".to_string(), |r| format!("{r}/s")),
        r.offered_rate,
        r.durable_rate,
        r.unaccounted,
        r.lat.p50_us,
        r.lat.p99_us,
        r.lat.max_us
    );
    r
}

fn pipeline() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("audit pipeline: skipped (needs root to load the programs)");
        return;
    }
    let n: u64 = arg("events").map_or(1_000_000, |v| v.parse().unwrap());
    let flat = pipeline_run(n, None);
    // The target rate, sustained for 2 seconds, then a moderate one for latency.
    let paced = pipeline_run(1_000_000, Some(500_000));
    let light = pipeline_run(200_000, Some(100_000));
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut md = String::new();
    let _ = writeln!(md, "## Audit pipeline: kernel events to durable records\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/audit.rs), a release daemon fresh for \
         each run.\n"
    );
    let _ = writeln!(
        md,
        "| run | offered | durable | recorded | lost, in gap records | unaccounted | latency p50 / p99 / max |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("flat out", &flat),
        ("paced at 500000/s", &paced),
        ("paced at 100000/s", &light),
    ] {
        let _ = writeln!(
            md,
            "| {name}, {} events | {:.0}/s | {:.0}/s | {} | {} | {} | {} / {} / {} µs |",
            r.offered,
            r.offered_rate,
            r.durable_rate,
            r.verdicts,
            r.lost,
            r.unaccounted,
            r.lat.p50_us,
            r.lat.p99_us,
            r.lat.max_us
        );
    }
    let sustained = paced.lost == 0 && paced.unaccounted == 0 && paced.verdicts == paced.offered;
    let _ = writeln!(
        md,
        "\nTarget ≥ 500000 records/s durable with zero unaccounted loss: {} (paced at 500000/s: \
         {:.0}/s durable, {} lost, {} unaccounted).\n\n\
         Flat out, the workload offers more than the daemon takes. The kernel ring fills and \
         the excess is lost. Every lost event is counted in a gap record ({} unaccounted), \
         never silently.",
        met(sustained && paced.durable_rate >= 495_000.0),
        paced.durable_rate,
        paced.lost,
        paced.unaccounted,
        flat.unaccounted,
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         The daemon runs its default configuration but for the event budgets. They are off so \
         that every verdict is a record. The event ring is {} KiB, and behavioral detection is \
         on.\n\n\
         A workload in an enforced cgroup makes denied UDP sends. Each is a kernel event that \
         the daemon reads from the ring buffer, names, encodes as JSON, encrypts, chains and \
         syncs in groups.\n\n\
         The first run is flat out: the workload takes one of the 2 CPUs, the daemon the \
         other. The next runs are paced.\n\n\
         Durable rate: records made durable from the workload's start until the log is \
         idle.\n\n\
         Recorded and lost events are counted in the log itself, as verdict records and gap \
         records.\n\n\
         Latency runs from the kernel's event timestamp to the sync that made its record \
         durable. The daemon measures it (`agentwall status`).",
        agentwall::config::Limits::default().event_ring_bytes / 1024
    );
    print!("{md}");
    if let Some(path) = arg("report") {
        agentwall_tests::write_report_section(&PathBuf::from(&path), "audit-pipeline", &md);
        eprintln!("wrote {path}");
    }
    for r in [&flat, &paced, &light] {
        assert_eq!(r.unaccounted, 0, "events unaccounted for");
    }
}

fn store() {
    let n: u64 = arg("records").map_or(1_000_000, |v| v.parse().unwrap());
    let batch: usize = arg("batch").map_or(8192, |v| v.parse().unwrap());
    let base = std::env::temp_dir().join(format!("aw-bench-audit-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let dir = base.join("log");
    let (records, json_lens): (Vec<Vec<u8>>, Vec<usize>) = (0..batch as u64).map(record).unzip();
    let bytes_per = records.iter().map(Vec::len).sum::<usize>() as f64 / batch as f64;
    let json_per = json_lens.iter().sum::<usize>() as f64 / batch as f64;
    let batches = (n as usize).div_ceil(batch);

    // Durable, encrypted, chained records.
    let (mut w, _) = Writer::open(
        &dir,
        AuditKey::from_hex(KEY, "bench").unwrap(),
        Rotation {
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    let t = Instant::now();
    for _ in 0..batches {
        w.append(&records).unwrap();
    }
    let written = (batches * batch) as f64;
    let write_rate = written / t.elapsed().as_secs_f64();
    drop(w);

    // Baseline: the same bytes, framed the same way, written and synced per batch.
    let raw = base.join("raw");
    let mut f = fs::File::create(&raw).unwrap();
    let t = Instant::now();
    for _ in 0..batches {
        let mut buf = Vec::with_capacity(batch * 400);
        for r in &records {
            buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
            buf.extend_from_slice(r);
        }
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
    }
    let raw_rate = written / t.elapsed().as_secs_f64();

    // Verification, on one core; the median of three runs.
    let keys = Keyring::new(vec![AuditKey::from_hex(KEY, "bench").unwrap()]);
    let median_rate = |run: &dyn Fn() -> u64| {
        let mut rates: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let n = run();
                assert_eq!(n as f64, written);
                n as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        rates[1]
    };
    let verify_rate = median_rate(&|| {
        let (summary, _) = verify::walk(&dir, &keys, &BTreeSet::new(), |_, b| {
            std::hint::black_box(b);
        })
        .unwrap();
        summary.records
    });
    // Without the key: order, links and chain only.
    let integrity_rate = median_rate(&|| {
        let (summary, _) = verify::walk_with(&dir, None, &BTreeSet::new(), |_, _| {}).unwrap();
        summary.records
    });
    // Baseline: SHA-256 over the same record bytes.
    let t = Instant::now();
    for _ in 0..batches {
        for r in &records {
            std::hint::black_box(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, r));
        }
    }
    let hash_rate = written / t.elapsed().as_secs_f64();
    // The floor of verification: the cryptography it cannot skip. SHA-256 running over every
    // frame as stored (length, sequence number, nonce, ciphertext and tag) and one AES-256-GCM
    // open per record, nothing else.
    let gcm = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[0x5a; 32]).unwrap(),
    );
    let sealed: Vec<(Vec<u8>, Vec<u8>)> = records
        .iter()
        .map(|r| {
            let mut ct = r.clone();
            gcm.seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                aws_lc_rs::aead::Aad::from([2u8; 32]),
                &mut ct,
            )
            .unwrap();
            (vec![0x5a; 4 + 8 + 12 + ct.len()], ct)
        })
        .collect();
    let frame_bytes = sealed.iter().map(|(f, _)| f.len()).sum::<usize>() as f64 / batch as f64;
    let mut scratch = Vec::new();
    let t = Instant::now();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for _ in 0..batches {
        for (frame, ct) in &sealed {
            ctx.update(frame);
            scratch.clear();
            scratch.extend_from_slice(ct);
            let plain = gcm.open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                aws_lc_rs::aead::Aad::from([2u8; 32]),
                &mut scratch,
            );
            std::hint::black_box(plain.unwrap());
        }
    }
    std::hint::black_box(ctx.finish());
    let chain_rate = written / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&base);

    eprintln!(
        "audit: write {write_rate:.0}/s (raw {raw_rate:.0}/s), verify {verify_rate:.0}/s, without the key {integrity_rate:.0}/s (sha256 {hash_rate:.0}/s, crypto floor {chain_rate:.0}/s)"
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "## Audit store\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/audit.rs). Linux {}, the state \
         directory's file system. A ratio is the baseline's rate divided by agentwall's.\n",
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "| measure | agentwall | baseline (same run) | ratio | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        md,
        "| records made durable per second (AES-256-GCM, SHA-256 chain, group commit) | {write_rate:.0}/s | same bytes framed, written and synced unencrypted: {raw_rate:.0}/s | {:.2}x | ≥ 500000/s: {} |",
        raw_rate / write_rate,
        met(write_rate >= 500_000.0)
    );
    let _ = writeln!(
        md,
        "| records verified per second, one core (`verify`: decrypt, chain, order) | {verify_rate:.0}/s | SHA-256 of the same records: {hash_rate:.0}/s | {:.2}x | ≥ 3000000/s: {} |",
        hash_rate / verify_rate,
        met(verify_rate >= 3_000_000.0)
    );
    let _ = writeln!(
        md,
        "| records verified per second without the key, one core (`verify --integrity-only`: order, links, chain) | {integrity_rate:.0}/s | SHA-256 of the same records: {hash_rate:.0}/s | {:.2}x | ≥ 3000000/s: {} |",
        hash_rate / integrity_rate,
        met(integrity_rate >= 3_000_000.0)
    );
    let _ = writeln!(
        md,
        "| full verification against its floor | {verify_rate:.0}/s | the cryptography alone: SHA-256 over every frame as stored ({frame_bytes:.0} bytes a record) and one AES-256-GCM open per record: {chain_rate:.0}/s | {:.2}x | |",
        chain_rate / verify_rate,
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         This measures the store alone. The daemon's path from the kernel to the store is the \
         next section.\n\n\
         The store takes {} kernel verdict records as the daemon writes them. Each is an \
         enrolled agent's allowed connect: {bytes_per:.0} bytes in compact form, \
         {json_per:.0} bytes as the JSON readers get.\n\n\
         The records go in batches of {batch}, one sync per batch.\n\n\
         Verification rates are the median of three passes over the log.\n\n\
         The chain hashes every frame in full. A chain over tags alone would let a holder of \
         the key swap a record for another with the same tag.\n\n\
         Every record is also decrypted. So one core cannot verify faster than the floor row's \
         cryptography.\n\n\
         Kernel verdicts are kept in a compact binary form (read back as JSON), so that there \
         are fewer bytes to hash.",
        written
    );
    print!("{md}");
    if let Some(path) = arg("report") {
        agentwall_tests::write_report_section(&PathBuf::from(&path), "audit", &md);
        eprintln!("wrote {path}");
    }
}
