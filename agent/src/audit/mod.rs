//! The audit log: append-only, hash-chained, encrypted records in segment files, sealed by
//! signed checkpoints.
//!
//! Layout of an audit directory:
//! - `seg-<first seq, 20 digits>.aws`: a 64-byte header (magic, format version, key id, first
//!   sequence number, chain head before the segment), then frames: `len: u32 LE` and a body of
//!   `seq: u64 LE`, a 12-byte nonce and the AES-256-GCM ciphertext of one record: a JSON
//!   object, or a kernel verdict in its compact form ([`record`]), read back as JSON.
//! - `checkpoints.jsonl`: signed statements "the chain head after record N is H", one per line.
//!
//! The chain (format 2): one SHA-256 runs through each segment, over its header and then every
//! frame as stored (length, sequence number, nonce, ciphertext); the chain value after a
//! record is that hash finished there. A segment's header holds the chain value after the
//! record before it, so segments link up and a verifier can start at any segment whose
//! predecessor it trusts. The AEAD's associated data is the sequence number, the segment's
//! salt (random, new for every segment) and the key id, so a record decrypts only in its own
//! place. Format 1 segments (`chain_n = SHA-256(chain_{n-1} || seq || nonce || ciphertext)`,
//! the previous chain value in the associated data) are still read. Checkpoints are signed
//! with the node's Ed25519 key; copies exported off the host let `verify` detect a log
//! truncated back past them.

pub mod detect;
pub mod forward;
pub mod keys;
pub mod record;
pub mod retention;
pub mod schema;
pub mod sink;
pub mod store;
pub mod verify;

use aws_lc_rs::digest;

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

/// The format 1 chain value after a record.
fn extend_v1(prev: &Chain, frame_body: &[u8]) -> Chain {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev);
    ctx.update(frame_body);
    let mut c = [0u8; CHAIN_LEN];
    c.copy_from_slice(ctx.finish().as_ref());
    c
}

/// The chain through one segment (see the module's documentation).
#[derive(Clone)]
pub enum SegmentChain {
    /// The chain value after the last record pushed (or before the segment).
    V1(Chain),
    /// SHA-256 over the header and every frame so far.
    V2(digest::Context),
}

impl std::fmt::Debug for SegmentChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1(_) => "SegmentChain::V1",
            Self::V2(_) => "SegmentChain::V2",
        })
    }
}

impl SegmentChain {
    /// The chain at the start of the segment with `header`, whose bytes on disk are `raw`.
    pub fn start(header: &store::Header, raw: &[u8]) -> Self {
        if header.version == 1 {
            Self::V1(header.prev_chain)
        } else {
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(&raw[..header.encoded_len()]);
            Self::V2(ctx)
        }
    }

    /// Extends the chain over a frame as stored: its 4-byte length, then its body.
    pub fn push(&mut self, frame: &[u8]) {
        match self {
            Self::V1(c) => *c = extend_v1(c, &frame[4..]),
            Self::V2(ctx) => ctx.update(frame),
        }
    }

    /// The chain value after the last frame pushed.
    pub fn value(&self) -> Chain {
        match self {
            Self::V1(c) => *c,
            Self::V2(ctx) => {
                let mut c = [0u8; CHAIN_LEN];
                c.copy_from_slice(ctx.clone().finish().as_ref());
                c
            }
        }
    }

    /// The associated data of record `seq`, the next to be pushed, in the segment of `header`.
    pub fn aad(&self, header: &store::Header, seq: u64) -> Aad {
        let mut a = Aad {
            bytes: [0; 48],
            len: 0,
        };
        match self {
            Self::V1(prev) => {
                a.bytes = store::aad_v1(seq, &header.key_id, prev);
                a.len = 48;
            }
            Self::V2(_) => {
                a.bytes[..32].copy_from_slice(&store::aad_v2(seq, &header.salt, &header.key_id));
                a.len = 32;
            }
        }
        a
    }
}

/// A record's associated data.
#[derive(Debug, Clone, Copy)]
pub struct Aad {
    bytes: [u8; 48],
    len: usize,
}

impl AsRef<[u8]> for Aad {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
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
