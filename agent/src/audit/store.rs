//! Writing the audit log: segments, frames, group commit, rotation, torn-tail recovery and
//! checkpoints.
//!
//! Size: the on-disk format (segments, frames, checkpoints) and its recovery rely on each
//! other's invariants, so they are read together.

use std::{
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use aws_lc_rs::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};

use super::{
    Chain, SegmentChain, genesis, hex,
    keys::{AuditKey, KeyError, KeyId, NodeKey},
};

pub const MAGIC: &[u8; 8] = b"AWAUDIT1";
/// Format version written. 2: a salt in the header, one running chain hash per segment, and
/// bodies that may be compact verdicts ([`super::record`]). Version 1 segments (chain value
/// per record, JSON bodies) are still read and verified.
pub const VERSION: u32 = 2;
/// Oldest format version read.
pub const OLDEST_VERSION: u32 = 1;
/// Header length of a version 2 segment (version 1: [`HEADER_LEN_V1`]).
pub const HEADER_LEN: usize = 80;
pub const HEADER_LEN_V1: usize = 64;
/// Length of a segment's salt.
pub const SALT_LEN: usize = 16;
/// Largest record body accepted (a frame longer than this is corrupt).
pub const MAX_RECORD: usize = 1 << 20;
/// seq + nonce before the ciphertext.
pub const FRAME_PREFIX: usize = 8 + 12;
pub const TAG_LEN: usize = 16;
pub const CHECKPOINTS: &str = "checkpoints.jsonl";
/// Signed retention anchors: "the history kept starts after record N, whose chain value is
/// H" (see `super::retention`), one per line.
pub const ANCHORS: &str = "retention.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("audit segment {path} is not an agentwall audit segment ({message})")]
    Header {
        path: PathBuf,
        #[source]
        message: HeaderError,
    },
    #[error("a record of {0} bytes is larger than the largest allowed ({MAX_RECORD})")]
    TooLarge(usize),
    #[error("the key cannot change now: {0}")]
    KeySwitch(&'static str),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a segment's header cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} bytes, shorter than a header")]
    Short(usize),
    #[error("wrong magic")]
    Magic,
    #[error(
        "format version {0}, this build reads versions {OLDEST_VERSION} to {VERSION} (written by a newer agentwall?)"
    )]
    Version(u32),
}

/// The fixed header of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub key_id: KeyId,
    pub first_seq: u64,
    /// Chain head before the segment's first record.
    pub prev_chain: Chain,
    /// Random, different for every segment ever started (version 2; zero in version 1): part
    /// of each record's associated data, so that a record decrypts only in its own segment.
    pub salt: [u8; SALT_LEN],
}

impl Header {
    /// Length of the header on disk.
    pub fn encoded_len(&self) -> usize {
        if self.version == 1 {
            HEADER_LEN_V1
        } else {
            HEADER_LEN
        }
    }

    /// The header as written (version 2 and later).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16: flags, zero.
        h[16..24].copy_from_slice(&self.key_id);
        h[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        h[32..64].copy_from_slice(&self.prev_chain);
        h[64..80].copy_from_slice(&self.salt);
        h
    }

    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN_V1 {
            return Err(HeaderError::Short(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        let mut salt = [0u8; SALT_LEN];
        if version >= 2 {
            let s = b.get(64..HEADER_LEN).ok_or(HeaderError::Short(b.len()))?;
            salt.copy_from_slice(s);
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&b[16..24]);
        let mut first = [0u8; 8];
        first.copy_from_slice(&b[24..32]);
        let mut prev_chain = [0u8; 32];
        prev_chain.copy_from_slice(&b[32..64]);
        Ok(Self {
            version,
            key_id,
            first_seq: u64::from_le_bytes(first),
            prev_chain,
            salt,
        })
    }
}

/// The associated data of a version 1 record: its place in the log.
pub fn aad_v1(seq: u64, key_id: &KeyId, prev: &Chain) -> [u8; 48] {
    let mut a = [0u8; 48];
    a[..8].copy_from_slice(&seq.to_le_bytes());
    a[8..16].copy_from_slice(key_id);
    a[16..48].copy_from_slice(prev);
    a
}

/// The associated data of a version 2 record: its sequence number, its segment's salt and
/// key id.
pub fn aad_v2(seq: u64, salt: &[u8; SALT_LEN], key_id: &KeyId) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..8].copy_from_slice(&seq.to_le_bytes());
    a[8..24].copy_from_slice(salt);
    a[24..32].copy_from_slice(key_id);
    a
}

/// Segment file name for a first sequence number.
pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.aws")
}

/// Segment files of `dir`, in sequence order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".aws"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// One frame as read from a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    pub nonce: [u8; 12],
    /// Where the ciphertext (with its tag) lies in the segment's bytes.
    pub ct: std::ops::Range<usize>,
    /// Offset of the frame in its segment file.
    pub offset: u64,
}

/// Splits a segment's bytes after the header into frames. Stops at the first frame that is
/// cut short or malformed and returns the offset where the valid frames end.
pub fn frames(bytes: &[u8]) -> (Vec<Frame>, usize, Option<String>) {
    let mut out = Vec::new();
    let (end, problem) = frames_into(bytes, &mut out);
    (out, end, problem)
}

/// [`frames`] into a vector the caller reuses (cleared first).
pub fn frames_into(bytes: &[u8], out: &mut Vec<Frame>) -> (usize, Option<String>) {
    out.clear();
    let mut off = Header::decode(bytes).map_or(HEADER_LEN, |h| h.encoded_len());
    while off < bytes.len() {
        let Some(len_bytes) = bytes.get(off..off + 4) else {
            return (off, Some("a frame length cut short".into()));
        };
        let len =
            u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if !(FRAME_PREFIX + TAG_LEN..=FRAME_PREFIX + MAX_RECORD + TAG_LEN).contains(&len) {
            return (off, Some(format!("a frame length of {len} bytes")));
        }
        let Some(body) = bytes.get(off + 4..off + 4 + len) else {
            return (off, Some("a frame cut short".into()));
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[..8]);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&body[8..20]);
        out.push(Frame {
            seq: u64::from_le_bytes(seq),
            nonce,
            ct: off + 4 + FRAME_PREFIX..off + 4 + len,
            offset: off as u64,
        });
        off += 4 + len;
    }
    (off, None)
}

/// Limits of one segment.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_bytes: u64,
    pub max_age: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// What opening the log found at its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    pub segment: String,
    /// Length of the segment before and after the cut.
    pub from_bytes: u64,
    pub to_bytes: u64,
    pub reason: String,
    /// The first sequence number that will be written again.
    pub next_seq: u64,
}

/// The writer of one audit directory.
pub struct Writer {
    dir: PathBuf,
    key: AuditKey,
    rotation: Rotation,
    file: fs::File,
    segment: PathBuf,
    header: Header,
    segment_bytes: u64,
    segment_opened: Instant,
    next_seq: u64,
    /// The chain value after the last durable record.
    chain: Chain,
    /// The running chain of the current segment, up to its last durable record.
    seg_chain: SegmentChain,
    rng: aws_lc_rs::rand::SystemRandom,
    /// A failed append may have left part of its batch at the end of the segment.
    torn: bool,
    /// A failed append's sequence numbers are written again: in a new segment, under a new
    /// salt, so that no (salt, sequence number) pair ever covers two different records.
    fresh_segment: bool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("dir", &self.dir)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// Creates a segment file with a fresh header, synced with its directory. A file of that name
/// holding at most a header (a rotation that failed half-way, e.g. on a full disk, or a
/// segment whose every record was cut as a torn tail) held no record and is started again.
fn new_segment(
    dir: &Path,
    rng: &aws_lc_rs::rand::SystemRandom,
    key: &AuditKey,
    first_seq: u64,
    prev_chain: Chain,
) -> Result<(fs::File, PathBuf, Header), StoreError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill(&mut salt)
        .map_err(|_| StoreError::Key(KeyError::Sign("no randomness".into())))?;
    let header = Header {
        version: VERSION,
        key_id: key.id(),
        first_seq,
        prev_chain,
        salt,
    };
    let path = dir.join(segment_name(first_seq));
    if fs::metadata(&path).is_ok_and(|m| m.len() <= HEADER_LEN as u64) {
        fs::remove_file(&path).map_err(io(&path))?;
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    file.write_all(&header.encode()).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    sync_dir(dir)?;
    Ok((file, path, header))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl Writer {
    /// Opens (or creates) the log in `dir`. A torn tail (a frame cut short by a crash, or one
    /// that does not decrypt in its place) is cut off and reported; everything before it was
    /// acknowledged and stays. Writing continues in the last segment when it is of this
    /// format, under this key and was not cut; otherwise in a new segment, so that no
    /// sequence number is ever written twice under one segment's salt.
    pub fn open(
        dir: &Path,
        key: AuditKey,
        rotation: Rotation,
    ) -> Result<(Self, Option<Truncation>), StoreError> {
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // Records are encrypted; who acted when is nobody else's business either.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let mut segs = segments(dir)?;
        // A segment shorter than its header is a rotation a crash cut short: it never held a
        // record (the header is synced before any record goes in), so it goes.
        let mut unfinished = None;
        while let Some(last) = segs.last() {
            let len = fs::metadata(last).map_err(io(last))?.len();
            let short = if len < HEADER_LEN_V1 as u64 {
                true
            } else if len < HEADER_LEN as u64 {
                // Long enough for a version 1 header only.
                let mut head = [0u8; HEADER_LEN_V1];
                fs::File::open(last)
                    .and_then(|mut f| f.read_exact(&mut head))
                    .map_err(io(last))?;
                Header::decode(&head).is_ok_and(|h| h.version != 1)
            } else {
                false
            };
            if !short {
                break;
            }
            fs::remove_file(last).map_err(io(last))?;
            sync_dir(dir)?;
            unfinished = last
                .file_name()
                .map(|n| (n.to_string_lossy().into_owned(), len));
            segs.pop();
        }
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let Some(last) = segs.last() else {
            let w = Self::create_segment(dir, key, rotation, rng, 1, genesis())?;
            return Ok((w, None));
        };
        let bytes = fs::read(last).map_err(io(last))?;
        let header = Header::decode(&bytes).map_err(|message| StoreError::Header {
            path: last.clone(),
            message,
        })?;
        let (frames, mut end, mut problem) = frames(&bytes);
        // Walk the chain; with the segment's key at hand, every record must also decrypt.
        let mut seg_chain = SegmentChain::start(&header, &bytes);
        let mut chain = header.prev_chain;
        let mut next = header.first_seq;
        for f in &frames {
            let ok_seq = f.seq == next;
            let ok_aead = key.id() != header.key_id || {
                let mut ct = bytes[f.ct.clone()].to_vec();
                key.open(f.nonce, seg_chain.aad(&header, f.seq).as_ref(), &mut ct)
                    .is_some()
            };
            if !ok_seq || !ok_aead {
                end = f.offset as usize;
                problem = Some(if ok_seq {
                    format!("record {} does not decrypt in its place", f.seq)
                } else {
                    format!("record {} where {next} belongs", f.seq)
                });
                break;
            }
            seg_chain.push(&bytes[f.offset as usize..f.ct.end]);
            chain = seg_chain.value();
            next += 1;
        }
        let truncation = match problem {
            Some(reason) if end < bytes.len() => {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(last)
                    .map_err(io(last))?;
                file.set_len(end as u64).map_err(io(last))?;
                file.sync_all().map_err(io(last))?;
                Some(Truncation {
                    segment: last
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    from_bytes: bytes.len() as u64,
                    to_bytes: end as u64,
                    reason,
                    next_seq: next,
                })
            }
            _ => unfinished.map(|(segment, len)| Truncation {
                segment,
                from_bytes: len,
                to_bytes: 0,
                reason: "a segment whose header a crash cut short (removed; it held no record)"
                    .into(),
                next_seq: next,
            }),
        };
        let cut_here = truncation.as_ref().is_some_and(|t| t.to_bytes != 0);
        let w = if header.key_id == key.id() && header.version == VERSION && !cut_here {
            let file = fs::OpenOptions::new()
                .append(true)
                .open(last)
                .map_err(io(last))?;
            Self {
                dir: dir.to_path_buf(),
                key,
                rotation,
                file,
                segment: last.clone(),
                header,
                segment_bytes: end as u64,
                segment_opened: Instant::now(),
                next_seq: next,
                chain,
                seg_chain,
                rng,
                torn: false,
                fresh_segment: false,
            }
        } else {
            Self::create_segment(dir, key, rotation, rng, next, chain)?
        };
        Ok((w, truncation))
    }

    fn create_segment(
        dir: &Path,
        key: AuditKey,
        rotation: Rotation,
        rng: aws_lc_rs::rand::SystemRandom,
        first_seq: u64,
        prev_chain: Chain,
    ) -> Result<Self, StoreError> {
        let (file, path, header) = new_segment(dir, &rng, &key, first_seq, prev_chain)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            rotation,
            file,
            segment: path,
            seg_chain: SegmentChain::start(&header, &header.encode()),
            header,
            segment_bytes: HEADER_LEN as u64,
            segment_opened: Instant::now(),
            next_seq: first_seq,
            chain: prev_chain,
            rng,
            torn: false,
            fresh_segment: false,
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The chain value after the last durable record.
    pub fn chain(&self) -> Chain {
        self.chain
    }

    pub fn segment_name(&self) -> String {
        self.segment
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Appends records (bodies, see [`super::record`]) and makes them durable with one sync:
    /// group commit. Returns the sequence number of the first; once this returns, they are
    /// acknowledged.
    pub fn append(&mut self, bodies: &[Vec<u8>]) -> Result<u64, StoreError> {
        if bodies.is_empty() {
            return Ok(self.next_seq);
        }
        if let Some(b) = bodies.iter().find(|b| b.len() > MAX_RECORD) {
            return Err(StoreError::TooLarge(b.len()));
        }
        if self.torn {
            self.file
                .set_len(self.segment_bytes)
                .and_then(|()| self.file.sync_all())
                .map_err(io(&self.segment))?;
            self.torn = false;
        }
        if self.fresh_segment {
            self.rotate()?;
            self.fresh_segment = false;
        }
        // A segment holds at least one record.
        let full = self.segment_bytes >= self.rotation.max_bytes
            || self.segment_opened.elapsed() >= self.rotation.max_age;
        if full && self.segment_bytes > HEADER_LEN as u64 {
            self.rotate()?;
        }
        // Nonces: one random 96-bit base per batch, the record's index added to its low
        // 32 bits; unique with overwhelming probability.
        let mut base = [0u8; 12];
        self.rng
            .fill(&mut base)
            .map_err(|_| StoreError::Key(KeyError::Sign("no randomness".into())))?;
        let first = self.next_seq;
        let mut buf = Vec::with_capacity(bodies.iter().map(|b| b.len() + 64).sum());
        let mut seg_chain = self.seg_chain.clone();
        let mut seq = self.next_seq;
        for (i, body) in bodies.iter().enumerate() {
            let mut nonce = base;
            let low =
                u32::from_le_bytes([base[8], base[9], base[10], base[11]]).wrapping_add(i as u32);
            nonce[8..].copy_from_slice(&low.to_le_bytes());
            let at = buf.len();
            let len = (FRAME_PREFIX + body.len() + TAG_LEN) as u32;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&nonce);
            let aad = seg_chain.aad(&self.header, seq);
            let mut data = body.clone();
            self.key.seal(nonce, aad.as_ref(), &mut data)?;
            buf.extend_from_slice(&data);
            seg_chain.push(&buf[at..]);
            seq += 1;
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Part of the batch may be in the file: cut it back to the last durable record
            // (the next append cuts again if this fails), and continue in a new segment.
            self.torn = true;
            if self.file.set_len(self.segment_bytes).is_ok() && self.file.sync_all().is_ok() {
                self.torn = false;
            }
            self.fresh_segment = true;
            return Err(io(&self.segment)(e));
        }
        self.segment_bytes += buf.len() as u64;
        self.chain = seg_chain.value();
        self.seg_chain = seg_chain;
        self.next_seq = seq;
        Ok(first)
    }

    /// Starts a new segment after the last durable record.
    fn rotate(&mut self) -> Result<(), StoreError> {
        self.start_segment(None)
    }

    /// Starts a new segment, under `key` if given; on error nothing changed.
    fn start_segment(&mut self, key: Option<&AuditKey>) -> Result<(), StoreError> {
        let (file, path, header) = new_segment(
            &self.dir,
            &self.rng,
            key.unwrap_or(&self.key),
            self.next_seq,
            self.chain,
        )?;
        self.file = file;
        self.segment = path;
        self.seg_chain = SegmentChain::start(&header, &header.encode());
        self.header = header;
        self.segment_bytes = HEADER_LEN as u64;
        self.segment_opened = Instant::now();
        self.fresh_segment = false;
        Ok(())
    }

    /// Writes from now on under `key`, in a new segment (each segment is under one key). The
    /// current segment must hold a record already, so that no segment is ever replaced; on
    /// error nothing changed.
    pub fn switch_key(&mut self, key: AuditKey) -> Result<(), StoreError> {
        if key.id() == self.key.id() {
            return Ok(());
        }
        if self.torn {
            return Err(StoreError::KeySwitch("a failed append is not cut back yet"));
        }
        if self.segment_bytes <= HEADER_LEN as u64 {
            return Err(StoreError::KeySwitch(
                "the current segment holds no record yet",
            ));
        }
        self.start_segment(Some(&key))?;
        self.key = key;
        Ok(())
    }

    pub fn key_id(&self) -> KeyId {
        self.key.id()
    }

    /// The audit directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment being written (never removed by retention).
    pub fn current_segment(&self) -> &Path {
        &self.segment
    }

    /// Signs the chain head and appends the checkpoint to `checkpoints.jsonl` (synced).
    pub fn checkpoint(&self, node: &NodeKey) -> Result<Checkpoint, StoreError> {
        let cp = Checkpoint::sign(
            node,
            self.next_seq.saturating_sub(1),
            &self.segment_name(),
            &self.chain,
            SystemTime::now(),
        );
        cp.append_to(&self.dir.join(CHECKPOINTS))?;
        Ok(cp)
    }
}

/// A signed statement of the chain head after record `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub segment: String,
    /// Hex.
    pub chain: String,
    pub time: String,
    /// Ed25519 signature, hex.
    pub sig: String,
}

/// What a signed statement says: a checkpoint of the chain head, or a retention anchor (the
/// start of the history kept after older segments were removed). The two are signed under
/// different texts, so that neither can pass for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statement {
    Checkpoint,
    Anchor,
}

impl Statement {
    fn prefix(self) -> &'static str {
        match self {
            Self::Checkpoint => "agentwall audit checkpoint v1",
            Self::Anchor => "agentwall audit retention anchor v1",
        }
    }
}

impl Checkpoint {
    fn message(what: Statement, seq: u64, segment: &str, chain: &str, time: &str) -> Vec<u8> {
        format!("{}\n{seq}\n{segment}\n{chain}\n{time}\n", what.prefix()).into_bytes()
    }

    pub fn sign(node: &NodeKey, seq: u64, segment: &str, chain: &Chain, at: SystemTime) -> Self {
        Self::sign_as(Statement::Checkpoint, node, seq, segment, chain, at)
    }

    pub fn sign_as(
        what: Statement,
        node: &NodeKey,
        seq: u64,
        segment: &str,
        chain: &Chain,
        at: SystemTime,
    ) -> Self {
        let chain = hex(chain);
        let time = humantime::format_rfc3339_seconds(at).to_string();
        let sig = hex(&node.sign(&Self::message(what, seq, segment, &chain, &time)));
        Self {
            seq,
            segment: segment.into(),
            chain,
            time,
            sig,
        }
    }

    /// Whether the signature is the node's, on a checkpoint.
    pub fn signed_by(&self, public_hex: &str) -> bool {
        self.signed_as(Statement::Checkpoint, public_hex)
    }

    /// Whether the signature is the node's, on a statement of kind `what`.
    pub fn signed_as(&self, what: Statement, public_hex: &str) -> bool {
        let Some(sig) = super::unhex(&self.sig) else {
            return false;
        };
        super::keys::verify_signature(
            public_hex,
            &Self::message(what, self.seq, &self.segment, &self.chain, &self.time),
            &sig,
        )
    }

    /// Appends `self` as a line of `path`, synced.
    pub fn append_to(&self, path: &Path) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(self).map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        f.write_all(&line).map_err(io(path))?;
        f.sync_data().map_err(io(path))
    }
}

/// Why a checkpoints file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {source}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
}

/// Reads a checkpoints file (one JSON object per line); a malformed line is an error with its
/// line number.
pub fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>, CheckpointsError> {
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|source| CheckpointsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| CheckpointsError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}
