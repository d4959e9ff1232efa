//! The audit log: append-only, hash-chained, encrypted records in segment files, sealed by
//! signed checkpoints.
//!
//! Layout of an audit directory:
//! - `seg-<first seq, 20 digits>.aws`: a 64-byte header (magic, format version, key id, first
//!   sequence number, chain head before the segment), then frames: `len: u32 LE` and a body of
//!   `seq: u64 LE`, a 12-byte nonce and the AES-256-GCM ciphertext of one JSON record.
//! - `checkpoints.jsonl`: signed statements "the chain head after record N is H", one per line.
//!
//! Each record extends the chain: `chain_n = SHA-256(chain_{n-1} || seq || nonce ||
//! ciphertext)`, from a fixed genesis value. The AEAD's associated data is the sequence number,
//! the key id and `chain_{n-1}`, so a record decrypts only in its own place. Checkpoints are
//! signed with the node's Ed25519 key; copies exported off the host let `verify` detect a log
//! truncated back past them.

pub mod detect;
pub mod forward;
pub mod keys;
pub mod sink;
pub mod store;
pub mod verify;

use ring::digest;

/// Length of a chain value (SHA-256).
pub const CHAIN_LEN: usize = 32;
pub type Chain = [u8; CHAIN_LEN];

/// The chain value before the first record of a log.
pub fn genesis() -> Chain {
    let d = digest::digest(&digest::SHA256, b"agentwall audit log v1 genesis");
    let mut c = [0u8; CHAIN_LEN];
    c.copy_from_slice(d.as_ref());
    c
}

/// The chain value after a record.
pub fn extend(prev: &Chain, seq: u64, nonce: &[u8], ciphertext: &[u8]) -> Chain {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev);
    ctx.update(&seq.to_le_bytes());
    ctx.update(nonce);
    ctx.update(ciphertext);
    let mut c = [0u8; CHAIN_LEN];
    c.copy_from_slice(ctx.finish().as_ref());
    c
}

/// [`extend`] over a frame body as stored: `seq: u64 LE || nonce || ciphertext`, contiguous.
pub fn extend_frame(prev: &Chain, body: &[u8]) -> Chain {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev);
    ctx.update(body);
    let mut c = [0u8; CHAIN_LEN];
    c.copy_from_slice(ctx.finish().as_ref());
    c
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
