//! Audit space: retention by size and age, and free-space watermarks.
//!
//! Retention removes whole sealed segments, oldest first, never the one being written. Before
//! it removes any, the writer makes a record of what goes (durable, in the chain) and signs a
//! retention anchor: "the history kept starts after record N, whose chain value is H", which
//! is what the first kept segment's header says it continues. `audit verify` accepts a log
//! that starts past record 1 only with such an anchor, and says where the kept history
//! starts; a log whose older segments someone else removed stays a log with records missing.
//! With an archive directory the segments (and the checkpoints and anchors) are copied there,
//! synced, before they are removed; put them back beside the kept ones to verify the whole
//! history.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    keys::NodeKey,
    store::{self, Checkpoint, Header, Statement, StoreError, Writer},
};

/// What to keep, from `audit:` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The segments together stay under this many bytes...
    pub max_bytes: u64,
    /// ...and under this share of the audit file system.
    pub max_percent: u8,
    /// Sealed segments older than this go; zero keeps them whatever their age.
    pub max_age: Duration,
    /// Where removed segments are copied first; none removes them.
    pub archive: Option<PathBuf>,
    /// An alert when the audit file system has less than this share free.
    pub warn_free_percent: u8,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_percent: 50,
            max_age: Duration::ZERO,
            archive: None,
            warn_free_percent: 20,
        }
    }
}

/// A segment as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// When it was last written (its last record).
    pub modified: SystemTime,
}

/// What one pruning removes, as recorded (`audit_retention`) before it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pruning {
    pub segments: Vec<String>,
    /// The records removed.
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// `size` or `age`.
    pub reason: &'static str,
    /// The limit the segments were above, in bytes (the smaller of `retain_bytes` and
    /// `retain_percent` of the file system).
    pub limit_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_to: Option<String>,
    #[serde(skip)]
    remove: Vec<SegmentInfo>,
    #[serde(skip)]
    keep: Header,
}

/// How many of `segs` (oldest first) go: the oldest while the whole is above `limit` bytes,
/// and every one last written before `now - max_age` (if `max_age` is not zero). The last
/// (the segment being written) never goes, nor does anything after a segment that stays.
/// With the reason of the last one removed.
pub fn plan(
    segs: &[SegmentInfo],
    limit: u64,
    max_age: Duration,
    now: SystemTime,
) -> (usize, &'static str) {
    let mut total: u64 = segs.iter().map(|s| s.bytes).sum();
    let mut n = 0;
    let mut reason = "size";
    let sealed = segs.len().saturating_sub(1);
    while n < sealed {
        let s = &segs[n];
        let old = !max_age.is_zero()
            && now
                .duration_since(s.modified)
                .is_ok_and(|age| age > max_age);
        if total > limit {
            reason = "size";
        } else if old {
            reason = "age";
        } else {
            break;
        }
        total -= s.bytes;
        n += 1;
    }
    (n, reason)
}

/// Free and total bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let frag = s.fragment_size() as u64;
    Some((
        (s.blocks_available() as u64).saturating_mul(frag),
        (s.blocks() as u64).saturating_mul(frag),
    ))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What retention would remove from the log `writer` writes now, if anything.
pub fn plan_for(writer: &Writer, r: &Retention) -> Result<Option<Pruning>, StoreError> {
    let dir = writer.dir();
    let mut segs = Vec::new();
    for path in store::segments(dir)? {
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        segs.push(SegmentInfo {
            bytes: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
        });
        if segs
            .last()
            .is_some_and(|s| s.path == writer.current_segment())
        {
            break;
        }
    }
    let fs_share = space(dir).map_or(u64::MAX, |(_, total)| {
        total / 100 * u64::from(r.max_percent)
    });
    let limit = r.max_bytes.min(fs_share);
    let (n, reason) = plan(&segs, limit, r.max_age, SystemTime::now());
    if n == 0 {
        return Ok(None);
    }
    let header = |p: &Path| -> Result<Header, StoreError> {
        let mut b = vec![0u8; store::HEADER_LEN];
        let mut f = fs::File::open(p).map_err(io(p))?;
        let got = std::io::Read::read(&mut f, &mut b).map_err(io(p))?;
        Header::decode(&b[..got]).map_err(|message| StoreError::Header {
            path: p.to_path_buf(),
            message,
        })
    };
    let first = header(&segs[0].path)?;
    let keep = header(&segs[n].path)?;
    let remove: Vec<SegmentInfo> = segs[..n].to_vec();
    Ok(Some(Pruning {
        segments: remove
            .iter()
            .filter_map(|s| s.path.file_name()?.to_str().map(str::to_owned))
            .collect(),
        first_seq: first.first_seq,
        last_seq: keep.first_seq - 1,
        bytes: remove.iter().map(|s| s.bytes).sum(),
        reason,
        limit_bytes: limit,
        archived_to: r.archive.as_ref().map(|a| a.display().to_string()),
        remove,
        keep,
    }))
}

/// Removes what `p` names (its record is durable already): signs the anchor of the kept
/// history, copies the segments to the archive if there is one, then removes them.
pub fn execute(p: &Pruning, dir: &Path, node: &NodeKey) -> Result<(), StoreError> {
    let anchor = Checkpoint::sign_as(
        Statement::Anchor,
        node,
        p.keep.first_seq - 1,
        p.segments.last().map_or("", String::as_str),
        &p.keep.prev_chain,
        SystemTime::now(),
    );
    anchor.append_to(&dir.join(store::ANCHORS))?;
    if let Some(archive) = &p.archived_to {
        let archive = Path::new(archive);
        for s in &p.remove {
            copy_synced(&s.path, archive)?;
        }
        for f in [store::CHECKPOINTS, store::ANCHORS] {
            let from = dir.join(f);
            if from.exists() {
                copy_synced(&from, archive)?;
            }
        }
    }
    for s in &p.remove {
        fs::remove_file(&s.path).map_err(io(&s.path))?;
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Copies `from` into `dir` under its own name, durably: a temporary file synced, renamed
/// over any older copy, the directory synced.
fn copy_synced(from: &Path, dir: &Path) -> Result<(), StoreError> {
    {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let name = from.file_name().unwrap_or_default();
    let to = dir.join(name);
    let tmp = dir.join(format!(".{}.part", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut inp = fs::File::open(from).map_err(io(from))?;
        std::io::copy(&mut inp, &mut out).map_err(io(&tmp))?;
        out.flush().map_err(io(&tmp))?;
        out.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &to).map_err(io(&to))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(n: u64, bytes: u64, age_secs: u64, now: SystemTime) -> SegmentInfo {
        SegmentInfo {
            path: PathBuf::from(store::segment_name(n)),
            bytes,
            modified: now - Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn the_oldest_go_until_the_rest_fits_and_the_current_one_stays() {
        let now = SystemTime::now();
        let segs = [
            seg(1, 100, 30, now),
            seg(11, 100, 20, now),
            seg(21, 100, 10, now),
            seg(31, 50, 0, now),
        ];
        assert_eq!(plan(&segs, 1000, Duration::ZERO, now), (0, "size"));
        assert_eq!(plan(&segs, 250, Duration::ZERO, now), (1, "size"));
        assert_eq!(plan(&segs, 150, Duration::ZERO, now), (2, "size"));
        // However small the limit, the segment being written stays.
        assert_eq!(plan(&segs, 0, Duration::ZERO, now), (3, "size"));
    }

    #[test]
    fn old_segments_go_and_younger_ones_stop_the_cut() {
        let now = SystemTime::now();
        let segs = [
            seg(1, 10, 3000, now),
            seg(11, 10, 100, now),
            seg(21, 10, 5000, now),
            seg(31, 10, 9000, now),
        ];
        // The third is old too, but a younger one before it stays, so it does.
        assert_eq!(
            plan(&segs, 1000, Duration::from_secs(1000), now),
            (1, "age")
        );
        assert_eq!(plan(&segs, 1000, Duration::ZERO, now), (0, "size"));
    }
}
