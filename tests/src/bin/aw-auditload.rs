//! Writes audit records as fast as it can into a log directory and prints the sequence number
//! of the last record of every acknowledged (synced) batch, one per line. The crash test kills
//! it at random moments and checks that every printed number is still in the log.
//!
//! Usage: aw-auditload DIR KEYHEX

use std::io::Write as _;

use agentwall::audit::{
    keys::AuditKey,
    store::{Rotation, Writer},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(key)) = (args.get(1), args.get(2)) else {
        std::process::exit(2);
    };
    let key = AuditKey::from_hex(key, "argument").unwrap_or_else(|_| std::process::exit(2));
    let rotation = Rotation {
        max_bytes: 256 * 1024,
        max_age: std::time::Duration::from_secs(3600),
    };
    let Ok((mut w, _)) = Writer::open(std::path::Path::new(dir), key, rotation) else {
        std::process::exit(3);
    };
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        let batch: Vec<Vec<u8>> = (0..64)
            .map(|i| format!("{{\"kind\":\"load\",\"n\":{}}}", n + i).into_bytes())
            .collect();
        n += 64;
        let Ok(first) = w.append(&batch) else {
            std::process::exit(4);
        };
        if writeln!(out, "{}", first + 63)
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}
