//! The revocation list: SPIFFE IDs and certificate serials that are no longer trusted.
//!
//! Kept in `<state dir>/revocations.json` (0600, `{"entries": [...]}`, written atomically) and
//! `<state dir>/revocations.journal` (0600, one JSON revocation per line): a revocation is one
//! line appended and synced, whatever the length of the list; past [`FOLD_AT`] lines the
//! journal is folded into a new snapshot. Both are read at start, so that a revocation
//! outlives the daemon. Entries are never removed by the daemon.
//!
//! Loading refuses any damage, because skipping a revocation would trust a revoked identity
//! again, with one exception: a last line without its newline is what a crash in the middle
//! of an append leaves, and that revocation was never confirmed (the command answers only
//! after the sync); it is dropped, and cut off before the next append.

use std::{
    collections::HashMap,
    io::{Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("reading the revocation list {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the revocation list {path} is corrupt ({message}); it is never skipped, because that \
         would trust revoked identities again: restore it from a backup or fix it by hand"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("writing the revocation list {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0:?} is neither a SPIFFE ID (spiffe://...) nor a certificate serial (hex digits, as \
         `agentwall identity log` prints them)"
    )]
    BadTarget(String),
}

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every certificate of this SPIFFE ID, past and future.
    SpiffeId(String),
    /// One certificate, by serial (upper-case hex).
    Serial(String),
}

impl Target {
    /// A SPIFFE ID (validated) or a serial in hex.
    pub fn parse(s: &str) -> Result<Self, RevokeError> {
        let s = s.trim();
        if s.starts_with("spiffe://") {
            return super::spiffe::SpiffeId::workload(s)
                .map(|id| Self::SpiffeId(id.to_string()))
                .map_err(|_| RevokeError::BadTarget(s.into()));
        }
        let hex = s.replace(':', "");
        if !hex.is_empty() && hex.len() <= 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Serial(hex.to_ascii_uppercase()));
        }
        Err(RevokeError::BadTarget(s.into()))
    }
}

impl Target {
    /// What the revocation covers, in words: a SPIFFE ID's versions get its grants (see
    /// `identity::service::grant_for`), so they are revoked with it.
    pub fn covers(&self) -> String {
        match self {
            Self::SpiffeId(id) => format!("{id} and its versions {id}/*"),
            Self::Serial(s) => {
                format!("the certificate with serial {s} and the certificates renewed from it")
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SpiffeId(id) => f.write_str(id),
            Self::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub target: Target,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
    /// Who asked (uid on the admin socket).
    pub by: String,
}

/// Journal lines beyond which a save writes a new snapshot instead.
pub const FOLD_AT: usize = 4096;

/// The revocation list in memory, indexed: a certificate is checked against it at every
/// enrollment and token request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    entries: Vec<Revocation>,
    /// Position in `entries` of each target.
    index: HashMap<Target, usize>,
}

/// The snapshot file's form.
#[derive(Serialize, Deserialize)]
struct Snapshot<E> {
    entries: E,
}

impl RevocationList {
    /// The snapshot; the journal is beside it ([`Self::journal_path`]).
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("revocations.json")
    }

    pub fn journal_path(snapshot: &Path) -> PathBuf {
        snapshot.with_extension("journal")
    }

    pub fn entries(&self) -> &[Revocation] {
        &self.entries
    }

    /// Reads the snapshot and the journal beside it; missing files are an empty list, damage
    /// an error (see the module documentation for the torn last line).
    pub fn load(path: &Path) -> Result<Self, RevokeError> {
        Ok(Self::open(path)?.0)
    }

    /// [`Self::load`], with the store that makes later revocations durable.
    pub fn open(path: &Path) -> Result<(Self, RevocationStore), RevokeError> {
        let corrupt = |path: &Path, message: String| RevokeError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RevokeError::Read {
                path: path.to_path_buf(),
                source,
            }),
        };
        let mut list = Self::default();
        if let Some(bytes) = read(path)? {
            let snap: Snapshot<Vec<Revocation>> =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
            for r in snap.entries {
                list.add(r);
            }
        }
        let journal = Self::journal_path(path);
        let (mut whole, mut lines) = (0usize, 0usize);
        if let Some(bytes) = read(&journal)? {
            let mut rest = &bytes[..];
            while let Some(n) = rest.iter().position(|b| *b == b'\n') {
                lines += 1;
                let r: Revocation = serde_json::from_slice(&rest[..n])
                    .map_err(|e| corrupt(&journal, format!("line {lines}: {e}")))?;
                list.add(r);
                whole += n + 1;
                rest = &rest[n + 1..];
            }
            if !rest.is_empty() {
                tracing::warn!(journal = %journal.display(), bytes = rest.len(), "the revocation journal ends in a torn line (a revocation that was never confirmed); it is dropped");
            }
        }
        let store = RevocationStore {
            snapshot: path.to_path_buf(),
            journal,
            persisted: list.entries.len(),
            journal_len: whole as u64,
            journal_lines: lines,
            fold_at: FOLD_AT,
        };
        Ok((list, store))
    }

    /// Writes the whole list as the snapshot (atomically, synced).
    fn save_snapshot(&self, path: &Path) -> Result<(), RevokeError> {
        let bytes = serde_json::to_vec_pretty(&Snapshot {
            entries: &self.entries,
        })
        .map_err(|e| RevokeError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        crate::state::write_atomic(path, &bytes, 0o600).map_err(|source| RevokeError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The revocation that covers a certificate, if any: of its serial, of its SPIFFE ID, or
    /// of the SPIFFE ID one segment up, whose grants a version of it gets (`agent/x/prod`
    /// covers `agent/x/prod/v2`).
    /// Whether `target` itself is on the list.
    pub fn contains(&self, target: &Target) -> bool {
        self.index.contains_key(target)
    }

    pub fn find(&self, spiffe_id: &str, serial: &str) -> Option<&Revocation> {
        let by_id = |id: &str| self.index.get(&Target::SpiffeId(id.to_string()));
        let parent = spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.rsplit_once('/'))
            .filter(|(up, _)| up.contains('/'))
            .map(|(up, _)| format!("spiffe://{up}"));
        let at = by_id(spiffe_id)
            .or_else(|| parent.as_deref().and_then(by_id))
            .or_else(|| self.index.get(&Target::Serial(serial.to_ascii_uppercase())))?;
        self.entries.get(*at)
    }

    /// Adds a revocation unless the same target is already revoked; returns whether it was new.
    /// A serial is kept in upper case without colons, the form certificates are checked in (a
    /// list edited by hand may hold another).
    pub fn add(&mut self, mut r: Revocation) -> bool {
        if let Target::Serial(s) = &mut r.target {
            s.retain(|c| c != ':');
            s.make_ascii_uppercase();
        }
        if self.index.contains_key(&r.target) {
            return false;
        }
        self.index.insert(r.target.clone(), self.entries.len());
        self.entries.push(r);
        true
    }
}

/// Makes a growing [`RevocationList`] durable, one synced append per save.
#[derive(Debug)]
pub struct RevocationStore {
    snapshot: PathBuf,
    journal: PathBuf,
    /// Entries of the list already durable (the list only grows).
    persisted: usize,
    /// Bytes of the journal that are whole lines, durable.
    journal_len: u64,
    journal_lines: usize,
    /// [`FOLD_AT`], lower in tests.
    fold_at: usize,
}

impl RevocationStore {
    /// Entries of `list` not yet durable.
    pub fn pending(&self, list: &RevocationList) -> usize {
        list.entries.len().saturating_sub(self.persisted)
    }

    /// Makes the entries of `list` added since the last save durable: appended to the journal
    /// and synced, or written with all others as a new snapshot when the journal is long. On
    /// failure nothing counts as saved; the next save tries again.
    pub fn save(&mut self, list: &RevocationList) -> Result<(), RevokeError> {
        let pending = list.entries.get(self.persisted..).unwrap_or_default();
        if pending.is_empty() {
            return Ok(());
        }
        if self.journal_lines + pending.len() > self.fold_at {
            list.save_snapshot(&self.snapshot)?;
            self.persisted = list.entries.len();
            // Every entry is in the snapshot now; a journal that cannot be emptied only
            // repeats some of them, which loading ignores.
            if self.truncate_journal().is_ok() {
                (self.journal_len, self.journal_lines) = (0, 0);
            }
            return Ok(());
        }
        let mut text = Vec::new();
        for r in pending {
            serde_json::to_writer(&mut text, r).map_err(|e| self.write_err(e.into()))?;
            text.push(b'\n');
        }
        self.append(&text).map_err(|e| self.write_err(e))?;
        self.persisted = list.entries.len();
        self.journal_len += text.len() as u64;
        self.journal_lines += pending.len();
        Ok(())
    }

    fn write_err(&self, source: std::io::Error) -> RevokeError {
        RevokeError::Write {
            path: self.journal.clone(),
            source,
        }
    }

    fn open_journal(&self) -> std::io::Result<(std::fs::File, bool)> {
        let existed = self.journal.exists();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&self.journal)?;
        Ok((f, !existed))
    }

    /// Appends `text` after the durable part of the journal (cutting off whatever a failed
    /// append or a crash left beyond it) and syncs it; a new journal's directory entry too.
    fn append(&self, text: &[u8]) -> std::io::Result<()> {
        let (mut f, created) = self.open_journal()?;
        if f.metadata()?.len() != self.journal_len {
            f.set_len(self.journal_len)?;
        }
        f.seek(std::io::SeekFrom::Start(self.journal_len))?;
        f.write_all(text)?;
        f.sync_data()?;
        if created && let Some(dir) = self.journal.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn truncate_journal(&self) -> std::io::Result<()> {
        let (f, _) = self.open_journal()?;
        f.set_len(0)?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_match() {
        let id = Target::parse("spiffe://example.org/agent/a/prod").unwrap();
        let serial = Target::parse("7f:0a:bc").unwrap();
        assert_eq!(serial, Target::Serial("7F0ABC".into()));
        let mut l = RevocationList::default();
        l.add(revocation(id));
        l.add(revocation(serial));
        assert!(l.find("spiffe://example.org/agent/a/prod", "01").is_some());
        assert!(l.find("spiffe://example.org/agent/a/dev", "01").is_none());
        assert!(l.find("spiffe://x/y", "7f0abc").is_some());
        // A version gets the grants of the identity one segment up, and so its revocation.
        assert!(
            l.find("spiffe://example.org/agent/a/prod/v2", "01")
                .is_some()
        );
        assert!(
            l.find("spiffe://example.org/agent/a/prod/v2/x", "01")
                .is_none()
        );
        assert!(l.find("spiffe://example.org/agent/a", "01").is_none());
        assert!(l.find("spiffe://example.org/agent/a/prodx", "01").is_none());
        for bad in ["", "spiffe://Example.org/a", "xyz", "agent/a/prod"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    fn revocation(target: Target) -> Revocation {
        Revocation {
            target,
            reason: "key leaked".into(),
            at: "2026-01-01T00:00:00Z".into(),
            by: "uid 0".into(),
        }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("aw-revoke-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn each_revocation_is_one_synced_line_and_survives_a_reopen() {
        let dir = Dir::new("append");
        let p = RevocationList::path(&dir.0);
        let (mut l, mut store) = RevocationList::open(&p).unwrap();
        assert!(l.entries().is_empty());
        let a = revocation(Target::Serial("AB".into()));
        let b = revocation(Target::SpiffeId("spiffe://example.org/agent/a/prod".into()));
        assert!(l.add(a.clone()));
        assert!(!l.add(a.clone()), "a target is revoked once");
        store.save(&l).unwrap();
        assert!(l.add(b.clone()));
        store.save(&l).unwrap();
        store.save(&l).unwrap();
        let journal = std::fs::read_to_string(RevocationList::journal_path(&p)).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
        assert!(!p.exists(), "no snapshot before the journal is long");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(RevocationList::journal_path(&p))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = RevocationList::load(&p).unwrap();
        assert_eq!(again.entries(), &[a, b]);
        assert!(
            again.find("spiffe://x/y", "ab").is_some(),
            "serials in any case"
        );
        assert!(
            again
                .find("spiffe://example.org/agent/a/prod", "01")
                .is_some()
        );
        assert!(
            again
                .find("spiffe://example.org/agent/a/dev", "01")
                .is_none()
        );
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_off_before_the_next_append() {
        let dir = Dir::new("torn");
        let p = RevocationList::path(&dir.0);
        let (mut l, mut store) = RevocationList::open(&p).unwrap();
        l.add(revocation(Target::Serial("01".into())));
        store.save(&l).unwrap();
        let journal = RevocationList::journal_path(&p);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        f.write_all(b"{\"target\":{\"serial\":\"02\"},\"rea")
            .unwrap();
        drop(f);
        let (mut l, mut store) = RevocationList::open(&p).unwrap();
        assert_eq!(
            l.entries().len(),
            1,
            "the unconfirmed revocation is dropped"
        );
        l.add(revocation(Target::Serial("03".into())));
        store.save(&l).unwrap();
        let l = RevocationList::load(&p).unwrap();
        let serials: Vec<String> = l.entries().iter().map(|r| r.target.to_string()).collect();
        assert_eq!(serials, ["serial 01", "serial 03"]);
    }

    #[test]
    fn a_serial_written_by_hand_in_another_form_still_matches() {
        let dir = Dir::new("case");
        let p = RevocationList::path(&dir.0);
        std::fs::write(
            &p,
            br#"{"entries": [{"target": {"serial": "0a:1b"}, "reason": "r", "at": "t", "by": "b"}]}"#,
        )
        .unwrap();
        let l = RevocationList::load(&p).unwrap();
        assert!(l.find("spiffe://example.org/a", "0A1B").is_some());
        assert!(l.find("spiffe://example.org/a", "0a1b").is_some());
    }

    #[test]
    fn damage_anywhere_else_is_refused() {
        let dir = Dir::new("corrupt");
        let p = RevocationList::path(&dir.0);
        let journal = RevocationList::journal_path(&p);
        std::fs::write(&journal, b"{\"target\":{\"serial\":\"01\"}}\n").unwrap();
        let e = RevocationList::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("corrupt") && e.contains("line 1") && e.contains("never skipped"),
            "{e}"
        );
        std::fs::remove_file(&journal).unwrap();
        std::fs::write(&p, b"{\"entries\": [").unwrap();
        let e = RevocationList::load(&p).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("never skipped"), "{e}");
    }

    #[test]
    fn a_long_journal_is_folded_into_the_snapshot() {
        let dir = Dir::new("fold");
        let p = RevocationList::path(&dir.0);
        let (mut l, mut store) = RevocationList::open(&p).unwrap();
        store.fold_at = 2;
        for i in 0..5 {
            l.add(revocation(Target::Serial(format!("{i:02X}"))));
            store.save(&l).unwrap();
        }
        let journal = std::fs::read_to_string(RevocationList::journal_path(&p)).unwrap();
        assert!(journal.lines().count() <= 2, "{journal}");
        assert!(p.exists());
        assert_eq!(RevocationList::load(&p).unwrap(), l);
        // A crash between a fold and emptying the journal leaves entries in both: read once.
        let mut line = serde_json::to_vec(&l.entries()[0]).unwrap();
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(RevocationList::journal_path(&p))
            .unwrap();
        f.write_all(&line).unwrap();
        assert_eq!(RevocationList::load(&p).unwrap(), l);
    }
}
