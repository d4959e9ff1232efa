//! Audit store throughput: records made durable (encrypted, chained, group-committed) per
//! second, and records verified per second, each against a baseline in the same run: the same
//! bytes written and synced in the same batches without encryption or chaining, and the same
//! bytes only hashed with SHA-256. Writes its section of docs/benchmarks.md with --report=PATH.
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

use agentwall::audit::{
    keys::{AuditKey, Keyring},
    store::{Rotation, Writer},
    verify,
};

const KEY: &str = "8f14e45fceea167a5a36dedd4bea2543c9f0f895fb98ab9159f51fd0297e236d";

fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}=");
    std::env::args().find_map(|a| a.strip_prefix(&key).map(str::to_string))
}

/// A verdict record of the size the daemon writes.
fn record(i: u64) -> Vec<u8> {
    format!(
        "{{\"time\":\"2026-11-25T12:00:00.{:03}Z\",\"kind\":\"verdict\",\"hook\":\"connect4\",\"verdict\":\"allow\",\"reason\":\"rule\",\"cgroup_id\":{},\"pid\":{},\"tgid\":{},\"comm\":\"python3\",\"protocol\":\"tcp\",\"family\":\"ipv4\",\"dst\":\"10.20.1.7\",\"dst_given\":\"10.20.1.7\",\"port\":5432,\"rule_id\":3,\"rule\":\"policies/analytics-reader.yaml:7\",\"policy\":\"analytics-reader\",\"slot\":2,\"generation\":1}}",
        i % 1000,
        4000 + i % 7,
        1000 + i % 97,
        1000 + i % 97
    )
    .into_bytes()
}

fn main() {
    let n: u64 = arg("records").map_or(1_000_000, |v| v.parse().unwrap());
    let batch: usize = arg("batch").map_or(8192, |v| v.parse().unwrap());
    let base = std::env::temp_dir().join(format!("aw-bench-audit-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let dir = base.join("log");
    let records: Vec<Vec<u8>> = (0..batch as u64).map(record).collect();
    let bytes_per = records.iter().map(Vec::len).sum::<usize>() as f64 / batch as f64;
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

    // Verification, on one core.
    let keys = Keyring::new(vec![AuditKey::from_hex(KEY, "bench").unwrap()]);
    let t = Instant::now();
    let (summary, _) = verify::walk(&dir, &keys, &BTreeSet::new(), |_, b| {
        std::hint::black_box(b);
    })
    .unwrap();
    let verify_rate = summary.records as f64 / t.elapsed().as_secs_f64();
    assert_eq!(summary.records as f64, written);
    // Baseline: SHA-256 over the same record bytes.
    let t = Instant::now();
    for _ in 0..batches {
        for r in &records {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, r));
        }
    }
    let hash_rate = written / t.elapsed().as_secs_f64();
    // The floor of verification: SHA-256 over exactly what the chain covers per record (the
    // previous chain value, sequence number, nonce, ciphertext and tag).
    let chain_inputs: Vec<Vec<u8>> = records
        .iter()
        .map(|r| vec![0x5a; 32 + 8 + 12 + r.len() + 16])
        .collect();
    let t = Instant::now();
    for _ in 0..batches {
        for r in &chain_inputs {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, r));
        }
    }
    let chain_rate = written / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&base);

    eprintln!(
        "audit: write {write_rate:.0}/s (raw {raw_rate:.0}/s), verify {verify_rate:.0}/s (sha256 {hash_rate:.0}/s, chain hash alone {chain_rate:.0}/s)"
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "## Audit store\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/audit.rs). Linux {}, the state directory's \
         file system. {} verdict-sized records ({bytes_per:.0} bytes of JSON each) in batches of \
         {batch}, one sync per batch.\n",
        kernel.trim(),
        written
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
        "| records verified per second, one core (decrypt, chain, order) | {verify_rate:.0}/s | SHA-256 of the same records: {hash_rate:.0}/s | {:.2}x | ≥ 3000000/s: {} |",
        hash_rate / verify_rate,
        met(verify_rate >= 3_000_000.0)
    );
    let _ = writeln!(
        md,
        "| the same, against its floor | {verify_rate:.0}/s | SHA-256 of exactly the bytes the chain covers ({:.0} bytes a record): {chain_rate:.0}/s | {:.2}x | |",
        bytes_per + 68.0,
        chain_rate / verify_rate,
    );
    let _ = writeln!(
        md,
        "\nThis measures the store alone; the daemon's path from the kernel to the store is the \
         next section. The chain hashes every ciphertext in full (a chain over tags alone would \
         let a holder of the key swap a record for another with the same tag), so one core \
         cannot verify faster than it can hash those bytes: the floor row shows how close \
         verification comes to that."
    );
    print!("{md}");
    if let Some(path) = arg("report") {
        agentwall_tests::write_report_section(&PathBuf::from(&path), "audit", &md);
        eprintln!("wrote {path}");
    }
}
