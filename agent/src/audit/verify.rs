//! Reading and verifying an audit directory: every segment follows its predecessor, every
//! record sits at its sequence number, decrypts in its place and extends the chain, and every
//! signed checkpoint (the local ones and copies exported off the host) matches the chain.
//!
//! Size: more than half of the file is tests: tampered, truncated and reordered logs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use super::{
    Chain, SegmentChain, genesis, hex,
    keys::Keyring,
    store::{self, Checkpoint, Header},
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The first record that is not what the log claims; `seq` names it.
    #[error("record {seq}: {reason}")]
    Bad { seq: u64, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// What a verified log holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub segments: usize,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hex.
    pub chain_head: String,
    pub checkpoints: usize,
    pub last_checkpoint_seq: u64,
    /// Hex chain value before the first record kept: the genesis value, or where retention
    /// removed older segments.
    pub start_chain: String,
    /// When older segments were removed by retention: the time of the signed anchor that
    /// vouches for where the kept history starts (`first_seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_anchor: Option<String>,
}

fn setup_error(e: store::CheckpointsError) -> VerifyError {
    VerifyError::Setup(e.to_string())
}

fn bad(seq: u64, reason: impl Into<String>) -> VerifyError {
    VerifyError::Bad {
        seq,
        reason: reason.into(),
    }
}

/// Walks the log from its first record, calling `each(seq, plaintext)` for every record, and
/// returns the chain value after each sequence number in `want`.
pub fn walk(
    dir: &Path,
    keys: &Keyring,
    want: &BTreeSet<u64>,
    each: impl FnMut(u64, &[u8]),
) -> Result<(Summary, BTreeMap<u64, Chain>), VerifyError> {
    walk_with(dir, Some(keys), want, each)
}

/// [`walk`]; without keys, only the order and the chain are checked (nothing is decrypted and
/// `each` is not called).
pub fn walk_with(
    dir: &Path,
    keys: Option<&Keyring>,
    want: &BTreeSet<u64>,
    mut each: impl FnMut(u64, &[u8]),
) -> Result<(Summary, BTreeMap<u64, Chain>), VerifyError> {
    let segs = store::segments(dir).map_err(|e| VerifyError::Setup(e.to_string()))?;
    if segs.is_empty() {
        return Err(VerifyError::Setup(format!(
            "{} holds no audit segment (seg-*.aws)",
            dir.display()
        )));
    }
    // The log starts at record 1 from the genesis value, or, once retention removed older
    // segments, where its first segment says; `verify` then asks a signed anchor to vouch
    // for that start.
    let (mut chain, mut next) = match fs::read(&segs[0])
        .ok()
        .and_then(|b| Header::decode(&b).ok())
    {
        Some(h) if h.first_seq > 1 => (h.prev_chain, h.first_seq),
        _ => (genesis(), 1u64),
    };
    let mut summary = Summary {
        segments: segs.len(),
        first_seq: next,
        start_chain: hex(&chain),
        ..Summary::default()
    };
    let mut chains = BTreeMap::new();
    // One buffer for every segment: its pages are mapped once, not once per segment.
    let mut buffer = Vec::new();
    let mut scratch = Vec::new();
    let mut frames = Vec::new();
    for (i, path) in segs.iter().enumerate() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let setup = |e: std::io::Error| VerifyError::Setup(format!("{name}: {e}"));
        // A sealed segment (every one but the last; only the last is ever cut back, by a writer
        // recovering from a crash or a failed write) is read through a read-only mapping
        // instead of a copy; records are decrypted in a scratch buffer.
        let mapped = if i + 1 < segs.len() {
            let f = fs::File::open(path).map_err(setup)?;
            // SAFETY: a read-only mapping of a sealed segment, which nothing shrinks while it
            // is mapped (see above).
            Some(unsafe { memmap2::Mmap::map(&f) }.map_err(setup)?)
        } else {
            buffer.clear();
            fs::File::open(path)
                .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buffer))
                .map_err(setup)?;
            None
        };
        let bytes: &[u8] = match &mapped {
            Some(m) => m,
            None => &buffer,
        };
        let header =
            Header::decode(bytes).map_err(|m| bad(next, format!("segment {name}: {m}")))?;
        if header.first_seq != next {
            return Err(if header.first_seq > next {
                bad(
                    next,
                    format!(
                        "missing: segment {name} starts at record {}, records {next} to {} are gone",
                        header.first_seq,
                        header.first_seq - 1
                    ),
                )
            } else {
                bad(
                    header.first_seq,
                    format!(
                        "segment {name} starts at record {}, which an earlier segment holds",
                        header.first_seq
                    ),
                )
            });
        }
        if header.prev_chain != chain {
            return Err(bad(
                next,
                format!(
                    "segment {name} does not continue the chain of its predecessor (replaced or from another log)"
                ),
            ));
        }
        let key = keys
            .map(|k| {
                k.get(&header.key_id).ok_or_else(|| {
                    bad(
                        next,
                        format!(
                            "segment {name} is encrypted under key {}, which was not given (wrong key?)",
                            hex(&header.key_id)
                        ),
                    )
                })
            })
            .transpose()?;
        let (_, problem) = store::frames_into(bytes, &mut frames);
        let mut seg_chain = SegmentChain::start(&header, bytes);
        let holds_records = !frames.is_empty();
        for f in frames.drain(..) {
            if f.seq != next {
                return Err(bad(
                    next,
                    format!(
                        "found record {} where {next} belongs (a record was deleted, inserted or moved)",
                        f.seq
                    ),
                ));
            }
            // The chain covers the frame as stored.
            let aad = seg_chain.aad(&header, f.seq);
            seg_chain.push(&bytes[f.offset as usize..f.ct.end]);
            if let Some(key) = key {
                scratch.clear();
                scratch.extend_from_slice(&bytes[f.ct.clone()]);
                let plain = key
                    .open(f.nonce, aad.as_ref(), &mut scratch)
                    .ok_or_else(|| {
                        bad(
                            next,
                            "does not decrypt in its place: modified, or moved here",
                        )
                    })?;
                each(f.seq, plain);
            }
            if want.contains(&f.seq) {
                chains.insert(f.seq, seg_chain.value());
            }
            summary.records += 1;
            next += 1;
        }
        if holds_records {
            chain = seg_chain.value();
        }
        if let Some(p) = problem {
            return Err(bad(
                next,
                format!("segment {name}: {p} (a torn tail or damage)"),
            ));
        }
    }
    summary.last_seq = next - 1;
    summary.chain_head = hex(&chain);
    Ok((summary, chains))
}

/// Verifies the log in `dir` with `keys` and the node's public key (hex). Checkpoints are read
/// from the directory and from `exported` files; each must carry the node's signature and
/// match the chain, and none may lie beyond the log's end (truncation).
///
/// Without keys (an auditor who may not read the records) the same is checked but for
/// decryption: order, segment links, the chain against every signed checkpoint, truncation.
/// A modified record is then found at the first checkpoint after it, not at the record
/// itself, and records after the last checkpoint are covered by no signature yet.
pub fn verify(
    dir: &Path,
    keys: Option<&Keyring>,
    node_public: &str,
    exported: &[PathBuf],
) -> Result<Summary, VerifyError> {
    let mut cps: Vec<Checkpoint> = Vec::new();
    let local = dir.join(store::CHECKPOINTS);
    if local.exists() {
        cps.extend(store::read_checkpoints(&local).map_err(setup_error)?);
    }
    for f in exported {
        cps.extend(store::read_checkpoints(f).map_err(setup_error)?);
    }
    for cp in &cps {
        if !cp.signed_by(node_public) {
            return Err(bad(
                cp.seq,
                format!(
                    "the checkpoint of {} does not carry the node's signature",
                    cp.time
                ),
            ));
        }
    }
    let want: BTreeSet<u64> = cps.iter().map(|c| c.seq).collect();
    let (mut summary, chains) = walk_with(dir, keys, &want, |_, _| {})?;
    if summary.first_seq > 1 {
        summary.history_anchor = Some(anchor(dir, node_public, &summary)?);
    }
    let mut sorted = cps.clone();
    sorted.sort_by_key(|c| c.seq);
    for cp in &sorted {
        // Checkpoints of records retention removed cannot be checked any more; the anchor
        // vouches for the chain where the kept history starts.
        if cp.seq == 0 || cp.seq < summary.first_seq {
            continue;
        }
        if cp.seq > summary.last_seq {
            return Err(bad(
                summary.last_seq + 1,
                format!(
                    "truncated: the log ends at record {} but the checkpoint of {} covers records up to {}",
                    summary.last_seq, cp.time, cp.seq
                ),
            ));
        }
        if chains.get(&cp.seq).map(|c| hex(c)) != Some(cp.chain.clone()) {
            return Err(bad(
                cp.seq,
                format!(
                    "the chain differs from the checkpoint of {}: records up to here were rewritten",
                    cp.time
                ),
            ));
        }
    }
    summary.checkpoints = sorted.len();
    summary.last_checkpoint_seq = sorted.last().map_or(0, |c| c.seq);
    Ok(summary)
}

/// The time of the signed retention anchor that vouches for the start of a log whose older
/// segments were removed: its record number is the one before the first kept, its chain
/// value the one the first kept segment continues. Without one, the missing records are
/// missing.
fn anchor(dir: &Path, node_public: &str, summary: &Summary) -> Result<String, VerifyError> {
    let before = summary.first_seq - 1;
    let path = dir.join(store::ANCHORS);
    let anchors = if path.exists() {
        store::read_checkpoints(&path).map_err(setup_error)?
    } else {
        Vec::new()
    };
    anchors
        .iter()
        .find(|a| {
            a.seq == before
                && a.chain == summary.start_chain
                && a.signed_as(store::Statement::Anchor, node_public)
        })
        .map(|a| a.time.clone())
        .ok_or_else(|| {
            bad(
                1,
                format!(
                    "missing: the log starts at record {}, and no retention anchor signed by the node vouches for that start (records 1 to {before} were removed by someone other than agentwall's retention, or {} is gone)",
                    summary.first_seq,
                    store::ANCHORS
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{
        keys::{AuditKey, NodeKey},
        store::{Rotation, Writer},
    };

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn key() -> AuditKey {
        AuditKey::from_hex(KEY, "test").unwrap()
    }

    fn ring() -> Keyring {
        Keyring::new(vec![key()])
    }

    /// A test's log directory, and the node key kept beside it (see [`node_key`]); both go
    /// when the test ends.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
            let _ = fs::remove_file(self.0.with_extension("node.key"));
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("aw-audit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        Dir(d)
    }

    fn body(i: u64) -> Vec<u8> {
        format!("{{\"kind\":\"verdict\",\"n\":{i}}}").into_bytes()
    }

    /// A log of 30 records in 3 segments (10 per segment), with a checkpoint at the end.
    fn build(d: &Path, node: &NodeKey) -> Vec<PathBuf> {
        let rot = Rotation {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        };
        let (mut w, t) = Writer::open(d, key(), rot).unwrap();
        assert!(t.is_none());
        for batch in 0..3u64 {
            let bodies: Vec<Vec<u8>> = (0..10).map(|i| body(batch * 10 + i)).collect();
            w.append(&bodies).unwrap();
        }
        w.checkpoint(node).unwrap();
        store::segments(d).unwrap()
    }

    fn node_key(d: &Path) -> NodeKey {
        NodeKey::load_or_create(&d.with_extension("node.key")).unwrap()
    }

    fn expect_bad(d: &Path, node: &NodeKey, exported: &[PathBuf], seq: u64, words: &str) {
        match verify(d, Some(&ring()), &node.public_hex(), exported) {
            Err(VerifyError::Bad { seq: s, reason }) => {
                assert_eq!(s, seq, "{reason}");
                assert!(reason.contains(words), "{reason}");
            }
            other => panic!("expected record {seq} ({words}), got {other:?}"),
        }
    }

    /// Byte offset of the frame of `seq` in its segment, and its length.
    fn frame_at(seg: &Path, seq: u64) -> (usize, usize) {
        let bytes = fs::read(seg).unwrap();
        let (frames, _, _) = store::frames(&bytes);
        let i = frames.iter().position(|f| f.seq == seq).unwrap();
        let start = frames[i].offset as usize;
        let end = frames.get(i + 1).map_or(bytes.len(), |f| f.offset as usize);
        (start, end - start)
    }

    #[test]
    fn an_intact_log_verifies_and_reads_back() {
        let d = dir("intact");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        assert_eq!(segs.len(), 3);
        let s = verify(&d.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!(
            (s.records, s.last_seq, s.checkpoints, s.last_checkpoint_seq),
            (30, 30, 1, 30)
        );
        // Without the key: the same log, the same summary.
        assert_eq!(verify(&d.0, None, &node.public_hex(), &[]).unwrap(), s);
        let mut seen = Vec::new();
        walk(&d.0, &ring(), &BTreeSet::new(), |seq, b| {
            seen.push((seq, b.to_vec()))
        })
        .unwrap();
        assert_eq!(seen[7], (8, body(7)));
    }

    #[test]
    fn a_flipped_byte_is_found_at_its_record() {
        let d = dir("flip");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let (off, len) = frame_at(&segs[1], 15);
        let mut bytes = fs::read(&segs[1]).unwrap();
        bytes[off + len - 3] ^= 0x40;
        fs::write(&segs[1], bytes).unwrap();
        expect_bad(&d.0, &node, &[], 15, "does not decrypt");
        // Without the key the change is found too, at the first segment link or checkpoint
        // after it.
        match verify(&d.0, None, &node.public_hex(), &[]) {
            Err(VerifyError::Bad { seq, reason }) => {
                assert!(seq > 15, "{seq}: {reason}");
                assert!(reason.contains("chain"), "{reason}");
            }
            other => panic!("a modified record must fail keyless verification: {other:?}"),
        }
    }

    #[test]
    fn retention_removes_old_segments_under_a_signed_anchor() {
        use crate::audit::retention::{self, Retention};
        let d = dir("retention");
        let node = node_key(&d.0);
        let rot = Rotation {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        };
        let (mut w, _) = Writer::open(&d.0, key(), rot).unwrap();
        for batch in 0..4u64 {
            let bodies: Vec<Vec<u8>> = (0..10).map(|i| body(batch * 10 + i)).collect();
            w.append(&bodies).unwrap();
        }
        w.checkpoint(&node).unwrap();
        let segs = store::segments(&d.0).unwrap();
        // Room for the last two (records 1 to 9 have shorter bodies than the rest).
        let seg_bytes = fs::metadata(&segs[3]).unwrap().len();
        let archive = d.0.with_extension("archive");
        let _ = fs::remove_dir_all(&archive);
        let r = Retention {
            max_bytes: seg_bytes * 2,
            archive: Some(archive.clone()),
            ..Retention::default()
        };
        let p = retention::plan_for(&w, &r)
            .unwrap()
            .expect("over the limit");
        assert_eq!((p.first_seq, p.last_seq, p.reason), (1, 20, "size"));
        retention::execute(&p, &d.0, &node).unwrap();
        assert!(
            retention::plan_for(&w, &r).unwrap().is_none(),
            "under it now"
        );

        let s = verify(&d.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!((s.first_seq, s.last_seq), (21, 40));
        assert!(s.history_anchor.is_some());
        // Without the key too.
        verify(&d.0, None, &node.public_hex(), &[]).unwrap();

        // The archive put back beside the kept segments is the whole history again.
        let whole = dir("retention-whole");
        fs::create_dir_all(&whole.0).unwrap();
        for dir in [&archive, &d.0] {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                fs::copy(e.path(), whole.0.join(e.file_name())).unwrap();
            }
        }
        let s = verify(&whole.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!((s.first_seq, s.last_seq, s.history_anchor), (1, 40, None));
        fs::remove_dir_all(&archive).unwrap();

        // Without the anchor, the start is not vouched for.
        fs::remove_file(d.0.join(store::ANCHORS)).unwrap();
        expect_bad(&d.0, &node, &[], 1, "no retention anchor");
    }

    #[test]
    fn segments_removed_by_hand_or_a_checkpoint_posing_as_an_anchor_are_missing_records() {
        let d = dir("hand");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        fs::remove_file(&segs[0]).unwrap();
        expect_bad(&d.0, &node, &[], 1, "the log starts at record 11");
        // A checkpoint signed over the right chain value, but as a checkpoint: no anchor.
        let h = store::Header::decode(&fs::read(&segs[1]).unwrap()).unwrap();
        let cp =
            store::Checkpoint::sign(&node, 10, "x", &h.prev_chain, std::time::SystemTime::now());
        cp.append_to(&d.0.join(store::ANCHORS)).unwrap();
        expect_bad(&d.0, &node, &[], 1, "no retention anchor");
    }

    #[test]
    fn deleted_inserted_and_swapped_records_are_found() {
        // Delete record 12.
        let d = dir("delete");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let (off, len) = frame_at(&segs[1], 12);
        let mut bytes = fs::read(&segs[1]).unwrap();
        bytes.drain(off..off + len);
        fs::write(&segs[1], bytes).unwrap();
        expect_bad(&d.0, &node, &[], 12, "where 12 belongs");

        // Insert a copy of record 13 after itself.
        let d = dir("insert");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let (off, len) = frame_at(&segs[1], 13);
        let mut bytes = fs::read(&segs[1]).unwrap();
        let copy = bytes[off..off + len].to_vec();
        bytes.splice(off + len..off + len, copy);
        fs::write(&segs[1], bytes).unwrap();
        expect_bad(&d.0, &node, &[], 14, "where 14 belongs");

        // Swap records 16 and 17.
        let d = dir("swap");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let (o16, l16) = frame_at(&segs[1], 16);
        let (o17, l17) = frame_at(&segs[1], 17);
        let bytes = fs::read(&segs[1]).unwrap();
        let mut out = bytes[..o16].to_vec();
        out.extend_from_slice(&bytes[o17..o17 + l17]);
        out.extend_from_slice(&bytes[o16..o16 + l16]);
        out.extend_from_slice(&bytes[o17 + l17..]);
        fs::write(&segs[1], out).unwrap();
        expect_bad(&d.0, &node, &[], 16, "where 16 belongs");
    }

    #[test]
    fn truncation_is_found_against_an_exported_checkpoint() {
        let d = dir("truncate");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let exported = d.0.with_extension("exported.jsonl");
        fs::copy(d.0.join(store::CHECKPOINTS), &exported).unwrap();
        // Cut the last segment back to record 25 and drop the local checkpoints, as an
        // attacker on the host would.
        let (off, _) = frame_at(&segs[2], 26);
        let f = fs::OpenOptions::new().write(true).open(&segs[2]).unwrap();
        f.set_len(off as u64).unwrap();
        fs::remove_file(d.0.join(store::CHECKPOINTS)).unwrap();
        assert!(
            verify(&d.0, Some(&ring()), &node.public_hex(), &[]).is_ok(),
            "undetectable without the export"
        );
        expect_bad(
            &d.0,
            &node,
            std::slice::from_ref(&exported),
            26,
            "truncated",
        );
        let _ = fs::remove_file(exported);
    }

    #[test]
    fn a_replaced_segment_and_a_wrong_key_are_found() {
        // Segment 2 replaced by the segment 2 of another log with the same key.
        let d = dir("replace");
        let other = dir("replace-other");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let osegs = build(&other.0, &node);
        fs::copy(&osegs[1], &segs[1]).unwrap();
        expect_bad(&d.0, &node, &[], 11, "does not continue the chain");

        let d = dir("wrongkey");
        let node = node_key(&d.0);
        build(&d.0, &node);
        let wrong = Keyring::new(vec![AuditKey::from_hex(&"ab".repeat(32), "wrong").unwrap()]);
        match verify(&d.0, Some(&wrong), &node.public_hex(), &[]) {
            Err(VerifyError::Bad { seq: 1, reason }) => {
                assert!(reason.contains("wrong key"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A forged checkpoint (not the node's signature).
        let stranger = NodeKey::load_or_create(&d.0.with_extension("stranger.key")).unwrap();
        match verify(&d.0, Some(&ring()), &stranger.public_hex(), &[]) {
            Err(VerifyError::Bad { reason, .. }) => {
                assert!(reason.contains("signature"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let _ = fs::remove_file(d.0.with_extension("stranger.key"));
    }

    #[test]
    fn a_torn_tail_is_cut_on_open_and_writing_goes_on() {
        let d = dir("torn");
        let node = node_key(&d.0);
        let segs = build(&d.0, &node);
        let len = fs::metadata(&segs[2]).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&segs[2]).unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        let (mut w, t) = Writer::open(&d.0, key(), Rotation::default()).unwrap();
        let t = t.expect("a truncation");
        assert_eq!(t.next_seq, 30, "{t:?}");
        assert_eq!(w.next_seq(), 30);
        w.append(&[body(99)]).unwrap();
        // Record 30 is written again in a new segment (under a new salt), not where the cut
        // one was.
        let now = store::segments(&d.0).unwrap();
        assert_eq!(now.len(), 4, "{now:?}");
        assert!(now[3].ends_with(store::segment_name(30)), "{now:?}");
        // The checkpoint at 30 now disagrees: record 30 was rewritten after the crash. The
        // daemon records the truncation itself, so that this is explained.
        expect_bad(&d.0, &node, &[], 30, "chain differs");
        fs::remove_file(d.0.join(store::CHECKPOINTS)).unwrap();
        let s = verify(&d.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!(s.last_seq, 30);
    }

    #[test]
    fn a_rotation_cut_short_by_a_crash_is_undone_on_open() {
        let d = dir("rotation");
        let node = node_key(&d.0);
        build(&d.0, &node);
        // The next segment's file exists, its header only partly written.
        let half = d.0.join(store::segment_name(31));
        fs::write(&half, &store::MAGIC[..5]).unwrap();
        let (mut w, t) = Writer::open(&d.0, key(), Rotation::default()).unwrap();
        let t = t.expect("the unfinished segment is reported");
        assert!(t.reason.contains("header"), "{t:?}");
        assert!(!half.exists());
        assert_eq!(w.next_seq(), 31);
        w.append(&[body(31)]).unwrap();
        assert_eq!(
            verify(&d.0, Some(&ring()), &node.public_hex(), &[])
                .unwrap()
                .last_seq,
            31
        );
    }

    /// Two logs under one key: a record moved from one into the other at the same sequence
    /// number does not decrypt there (each segment has its own salt).
    #[test]
    fn a_record_from_another_log_under_the_same_key_is_found() {
        let (a, b) = (dir("splice-a"), dir("splice-b"));
        let node = node_key(&a.0);
        let segs_a = build(&a.0, &node);
        let segs_b = build(&b.0, &node_key(&b.0));
        let (off, len) = frame_at(&segs_a[1], 15);
        let (off_b, len_b) = frame_at(&segs_b[1], 15);
        assert_eq!(len, len_b);
        let mut bytes = fs::read(&segs_a[1]).unwrap();
        bytes[off..off + len].copy_from_slice(&fs::read(&segs_b[1]).unwrap()[off_b..off_b + len]);
        fs::write(&segs_a[1], bytes).unwrap();
        expect_bad(&a.0, &node, &[], 15, "does not decrypt");
    }

    /// A log of format version 1 (a chain value per record, the previous one in the
    /// associated data) still verifies and reads back; a writer continues it in a version 2
    /// segment, and the whole verifies.
    #[test]
    fn a_version_1_log_is_read_and_continued() {
        let d = dir("v1");
        fs::create_dir_all(&d.0).unwrap();
        let node = node_key(&d.0);
        let k = key();
        let mut out = Vec::new();
        out.extend_from_slice(store::MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&k.id());
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&genesis());
        let mut chain = genesis();
        for seq in 1..=5u64 {
            let nonce = [seq as u8; 12];
            let mut data = body(seq);
            k.seal(nonce, &store::aad_v1(seq, &k.id(), &chain), &mut data)
                .unwrap();
            out.extend_from_slice(&((store::FRAME_PREFIX + data.len()) as u32).to_le_bytes());
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            ctx.update(&chain);
            for part in [&seq.to_le_bytes()[..], &nonce, &data] {
                out.extend_from_slice(part);
                ctx.update(part);
            }
            chain.copy_from_slice(ctx.finish().as_ref());
        }
        fs::write(d.0.join(store::segment_name(1)), out).unwrap();
        let s = verify(&d.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!((s.records, s.chain_head.clone()), (5, hex(&chain)));
        let (mut w, t) = Writer::open(&d.0, key(), Rotation::default()).unwrap();
        assert!(t.is_none());
        assert_eq!((w.next_seq(), w.chain()), (6, chain));
        w.append(&[body(6), body(7)]).unwrap();
        w.checkpoint(&node).unwrap();
        assert_eq!(store::segments(&d.0).unwrap().len(), 2);
        let s = verify(&d.0, Some(&ring()), &node.public_hex(), &[]).unwrap();
        assert_eq!((s.records, s.checkpoints), (7, 1));
        let mut seen = Vec::new();
        walk(&d.0, &ring(), &BTreeSet::new(), |seq, b| {
            seen.push((seq, b.to_vec()))
        })
        .unwrap();
        assert_eq!(seen[2], (3, body(3)));
        assert_eq!(seen[6], (7, body(7)));
    }
}
