//! A set of keyed records kept on disk as a snapshot plus an append-only journal of changes.
//!
//! `<name>.json` holds the records as a JSON array (written atomically: temporary file, sync,
//! rename, directory sync). `<name>.journal` holds one JSON line per change since:
//! `{"set":RECORD}` or `{"remove":KEY}`. A save appends the lines of what changed and syncs
//! once, so making a change durable costs one small append, whatever the number of records;
//! the journal is folded into a new snapshot when it grows past [`FOLD_AT`] and when the
//! records are loaded.
//!
//! A crash can leave a torn last line: loading replays up to it and reports it. A failed
//! append is cut off again before the next one; if even that fails, the next save writes a
//! snapshot instead.
//!
//! Records that describe state which itself ends with the machine (kernel maps pinned in
//! bpffs, cgroups) need to outlive the process, not a power cut: for them
//! [`Journaled::until_reboot`] appends without the sync. A write that returned is in the page
//! cache, which the kernel keeps when the process dies, even by SIGKILL; after a reboot such
//! records describe nothing that still exists. Snapshots are always written and synced.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Journal size beyond which a save writes a new snapshot instead.
pub const FOLD_AT: u64 = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Line<T> {
    Set(T),
    Remove(u64),
}

/// What loading found besides the records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Lines of the journal replayed.
    pub replayed: usize,
    /// The snapshot or a journal line could not be read, with where and why; the records
    /// are what came before it.
    pub damage: Option<String>,
    /// The records were read but could not be folded into a new snapshot (why); the next
    /// save tries again, and nothing is appended to the old journal meanwhile.
    pub unfolded: Option<String>,
}

#[derive(Debug)]
pub struct Journaled {
    snapshot: PathBuf,
    journal: PathBuf,
    /// Key → the record's JSON as last made durable.
    durable: BTreeMap<u64, Vec<u8>>,
    /// The journal, open for appending, and its length when last durable.
    out: Option<(fs::File, u64)>,
    /// A failed append could not be cut off: the next save writes a snapshot.
    must_fold: bool,
    /// Appends are synced (see the module comment for when they need not be).
    sync: bool,
    /// `durable` holds every record the files hold (after a load, a full save or a fold):
    /// only then can a save name just the keys that changed.
    whole: bool,
}

fn with_ext(path: &Path, ext: &str) -> PathBuf {
    path.with_extension(ext)
}

impl Journaled {
    /// The store of `snapshot` (`<name>.json`; its journal is `<name>.journal`), empty until
    /// [`Self::load`].
    pub fn new(snapshot: &Path) -> Self {
        Self {
            snapshot: snapshot.to_path_buf(),
            journal: with_ext(snapshot, "journal"),
            durable: BTreeMap::new(),
            out: None,
            must_fold: false,
            sync: true,
            whole: false,
        }
    }

    /// A store whose appends need to outlive the process but not the machine: they are not
    /// synced (see the module comment).
    pub fn until_reboot(snapshot: &Path) -> Self {
        Self {
            sync: false,
            ..Self::new(snapshot)
        }
    }

    fn sync(&self, file: &fs::File) -> std::io::Result<()> {
        if self.sync { file.sync_data() } else { Ok(()) }
    }

    /// Reads the snapshot and replays the journal, then folds them into a new snapshot.
    /// Damage is reported, never fatal: the records read before it are returned.
    pub fn load<T: Serialize + DeserializeOwned>(
        &mut self,
        key: impl Fn(&T) -> u64,
    ) -> std::io::Result<(Vec<T>, Loaded)> {
        let mut loaded = Loaded::default();
        let mut records: BTreeMap<u64, T> = BTreeMap::new();
        match fs::read(&self.snapshot) {
            Ok(bytes) => match serde_json::from_slice::<Vec<T>>(&bytes) {
                Ok(v) => records.extend(v.into_iter().map(|r| (key(&r), r))),
                Err(e) => {
                    // Kept aside for whoever wants to look; the fold below replaces it.
                    let aside = with_ext(&self.snapshot, "corrupt");
                    loaded.damage = Some(format!(
                        "{}: {e} (kept as {})",
                        self.snapshot.display(),
                        aside.display()
                    ));
                    let _ = fs::rename(&self.snapshot, &aside);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let journal_len = match fs::File::open(&self.journal) {
            Ok(f) => {
                let len = f.metadata()?.len();
                for (n, line) in std::io::BufReader::new(f).split(b'\n').enumerate() {
                    let line = line?;
                    match serde_json::from_slice::<Line<T>>(&line) {
                        Ok(Line::Set(r)) => {
                            records.insert(key(&r), r);
                        }
                        Ok(Line::Remove(k)) => {
                            records.remove(&k);
                        }
                        Err(e) => {
                            loaded.damage.get_or_insert(format!(
                                "{} line {}: {e}",
                                self.journal.display(),
                                n + 1
                            ));
                            break;
                        }
                    }
                    loaded.replayed += 1;
                }
                len
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let records: Vec<T> = records.into_values().collect();
        let encoded = encode_all(&records, &key)?;
        if (journal_len > 0 || loaded.damage.is_some())
            && let Err(e) = self.fold(encoded.clone())
        {
            loaded.unfolded = Some(e.to_string());
            self.must_fold = true;
            self.durable = encoded;
        } else if journal_len == 0 && loaded.damage.is_none() {
            self.durable = encoded;
        }
        self.whole = true;
        Ok((records, loaded))
    }

    /// Makes `records` (all of them) durable. Returns whether anything had changed.
    pub fn save<T: Serialize>(
        &mut self,
        records: &[T],
        key: impl Fn(&T) -> u64,
    ) -> std::io::Result<bool> {
        let now = encode_all(records, &key)?;
        let mut changes: Vec<(u64, Option<Vec<u8>>)> = now
            .into_iter()
            .filter(|(k, bytes)| self.durable.get(k) != Some(bytes))
            .map(|(k, bytes)| (k, Some(bytes)))
            .collect();
        let present: std::collections::BTreeSet<u64> = records.iter().map(&key).collect();
        changes.extend(
            self.durable
                .keys()
                .filter(|k| !present.contains(k))
                .map(|k| (*k, None)),
        );
        if !self.whole {
            // The files may hold records this store never saw: a snapshot of these replaces
            // them all.
            self.must_fold = true;
        }
        self.apply(changes)
    }

    /// Whether [`Self::save_some`] can be used (the store was loaded or fully saved).
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    /// Makes the records of some keys durable, the others as they were: `Some` sets a
    /// record, `None` removes its key. The cost follows the keys given, not the size of the
    /// set. Returns whether anything had changed.
    pub fn save_some<T: Serialize>(
        &mut self,
        changes: &[(u64, Option<&T>)],
    ) -> std::io::Result<bool> {
        if !self.whole {
            return Err(std::io::Error::other(
                "the records were not loaded: save them all",
            ));
        }
        let mut encoded = Vec::with_capacity(changes.len());
        for (k, r) in changes {
            let bytes = match r {
                Some(r) => Some(serde_json::to_vec(r).map_err(std::io::Error::other)?),
                None => None,
            };
            if self.durable.get(k) != bytes.as_ref() {
                encoded.push((*k, bytes));
            }
        }
        self.apply(encoded)
    }

    /// Appends the lines of `changes` (already filtered against what is durable) and syncs,
    /// or writes a new snapshot when the journal has grown too long.
    fn apply(&mut self, changes: Vec<(u64, Option<Vec<u8>>)>) -> std::io::Result<bool> {
        if changes.is_empty() && !self.must_fold {
            return Ok(false);
        }
        let mut lines = Vec::new();
        for (k, bytes) in &changes {
            match bytes {
                Some(b) => {
                    lines.extend_from_slice(b"{\"set\":");
                    lines.extend_from_slice(b);
                    lines.extend_from_slice(b"}\n");
                }
                None => lines.extend_from_slice(format!("{{\"remove\":{k}}}\n").as_bytes()),
            }
        }
        let len = self.out.as_ref().map_or(0, |(_, l)| *l);
        if self.must_fold || len + lines.len() as u64 > FOLD_AT {
            // Rare (the journal holds up to FOLD_AT): the whole set is written anew.
            let mut next = self.durable.clone();
            apply_to(&mut next, changes);
            self.fold(next)?;
            return Ok(true);
        }
        let (file, len) = match self.out.take() {
            Some(o) => o,
            None => {
                let f = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&self.journal)?;
                let len = f.metadata()?.len();
                (f, len)
            }
        };
        let written = (&file).write_all(&lines).and_then(|()| self.sync(&file));
        match written {
            Ok(()) => {
                self.out = Some((file, len + lines.len() as u64));
                apply_to(&mut self.durable, changes);
                Ok(true)
            }
            Err(e) => {
                // Cut off whatever part of the lines got in, so that the next append starts
                // on a line of its own.
                if file.set_len(len).and_then(|()| self.sync(&file)).is_ok() {
                    self.out = Some((file, len));
                } else {
                    self.must_fold = true;
                }
                Err(e)
            }
        }
    }

    /// Writes `records` (key → the record's JSON) as a new snapshot and empties the journal.
    fn fold(&mut self, records: BTreeMap<u64, Vec<u8>>) -> std::io::Result<()> {
        let mut bytes = b"[\n".to_vec();
        for (i, r) in records.values().enumerate() {
            if i > 0 {
                bytes.extend_from_slice(b",\n");
            }
            bytes.extend_from_slice(r);
        }
        bytes.extend_from_slice(b"\n]\n");
        crate::state::write_atomic(&self.snapshot, &bytes, 0o600)?;
        // A crash here replays the old journal over the new snapshot: the same records.
        self.out = None;
        match fs::remove_file(&self.journal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.durable = records;
        self.must_fold = false;
        self.whole = true;
        Ok(())
    }
}

fn apply_to(map: &mut BTreeMap<u64, Vec<u8>>, changes: Vec<(u64, Option<Vec<u8>>)>) {
    for (k, bytes) in changes {
        match bytes {
            Some(b) => map.insert(k, b),
            None => map.remove(&k),
        };
    }
}

fn encode_all<T: Serialize>(
    records: &[T],
    key: &impl Fn(&T) -> u64,
) -> std::io::Result<BTreeMap<u64, Vec<u8>>> {
    records
        .iter()
        .map(|r| {
            Ok((
                key(r),
                serde_json::to_vec(r).map_err(std::io::Error::other)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct R {
        id: u64,
        name: String,
    }

    fn r(id: u64, name: &str) -> R {
        R {
            id,
            name: name.into(),
        }
    }

    /// A test directory, removed when the test ends, passed or not.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    impl std::ops::Deref for Dir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("aw-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A test directory with an empty store, loaded (as the daemon loads it at start).
    fn loaded_store(tag: &str) -> (Dir, PathBuf, Journaled) {
        let d = dir(tag);
        let path = d.join("records.json");
        let mut j = Journaled::new(&path);
        assert_eq!(j.load(|r: &R| r.id).unwrap().0, Vec::<R>::new());
        (d, path, j)
    }

    fn load(path: &Path) -> (Vec<R>, Loaded) {
        Journaled::new(path).load(|r: &R| r.id).unwrap()
    }

    #[test]
    fn appends_without_sync_are_read_by_the_next_process() {
        // The store of records that end with the machine writes the same lines, unsynced; the
        // next store (a restarted daemon) reads them from the page cache.
        let d = dir("until-reboot");
        let path = d.join("records.json");
        let mut j = Journaled::until_reboot(&path);
        j.load(|r: &R| r.id).unwrap();
        assert!(j.save(&[r(1, "a")], |r| r.id).unwrap());
        assert!(j.save(&[r(1, "a2"), r(2, "b")], |r| r.id).unwrap());
        drop(j);
        let (got, loaded) = load(&path);
        assert_eq!(got, vec![r(1, "a2"), r(2, "b")]);
        assert_eq!(loaded.replayed, 3);
        assert_eq!(loaded.damage, None);
    }

    #[test]
    fn a_store_that_was_not_loaded_replaces_the_files_on_its_first_save() {
        let (_d, path, mut j) = loaded_store("unloaded");
        j.save(&[r(1, "a"), r(2, "b")], |r| r.id).unwrap();
        // A store that never read the files (a fresh one after a failed save) cannot name
        // just the changed keys, and its first full save writes a snapshot of exactly its
        // records: a record it never saw does not survive.
        let mut fresh = Journaled::new(&path);
        assert!(fresh.save_some(&[(3, Some(&r(3, "c")))]).is_err());
        assert!(fresh.save(&[r(2, "b")], |r| r.id).unwrap());
        assert!(fresh.is_whole());
        assert_eq!(load(&path).0, vec![r(2, "b")]);
    }

    #[test]
    fn some_keys_are_saved_and_the_others_kept_through_a_fold() {
        let (_d, path, mut j) = loaded_store("some");
        assert!(
            j.save(&[r(1, "a"), r(2, "b"), r(3, "c")], |r| r.id)
                .unwrap()
        );
        // One key changes, one goes, the third is not mentioned and stays.
        let b2 = r(2, "b2");
        assert!(j.save_some(&[(2, Some(&b2)), (1, None)]).unwrap());
        assert!(
            !j.save_some(&[(2, Some(&b2)), (9, None::<&R>)]).unwrap(),
            "no change"
        );
        assert_eq!(load(&path).0, vec![r(2, "b2"), r(3, "c")]);
        // Past FOLD_AT the whole set is written as a snapshot, unmentioned records included.
        let mut j = Journaled::new(&path);
        j.load(|r: &R| r.id).unwrap();
        let big = "x".repeat(4096);
        let mut n = 0;
        while path.with_extension("journal").exists() || n == 0 {
            n += 1;
            let rec = r(100 + n, &big);
            j.save_some(&[(100 + n, Some(&rec))]).unwrap();
            assert!(n < 1000, "never folded");
        }
        let (got, loaded) = load(&path);
        assert_eq!(loaded.damage, None);
        assert_eq!(got.len(), 2 + n as usize);
        assert_eq!(got[..2], [r(2, "b2"), r(3, "c")]);
    }

    #[test]
    fn changes_are_appended_and_replayed() {
        let (d, path, mut j) = loaded_store("replay");
        assert!(j.save(&[r(1, "a"), r(2, "b")], |r| r.id).unwrap());
        assert!(
            !j.save(&[r(1, "a"), r(2, "b")], |r| r.id).unwrap(),
            "nothing changed"
        );
        assert!(j.save(&[r(2, "b2"), r(3, "c")], |r| r.id).unwrap());
        let journal = fs::read_to_string(d.join("records.journal")).unwrap();
        assert_eq!(journal.lines().count(), 5, "{journal}");
        assert!(!path.exists(), "no snapshot written for small changes");
        let (got, loaded) = load(&path);
        assert_eq!(got, vec![r(2, "b2"), r(3, "c")]);
        assert_eq!(
            loaded,
            Loaded {
                replayed: 5,
                damage: None,
                unfolded: None,
            }
        );
        // Loading folded the journal into the snapshot.
        assert!(!d.join("records.journal").exists());
        assert_eq!(load(&path).0, vec![r(2, "b2"), r(3, "c")]);
    }

    #[test]
    fn a_torn_last_line_loses_only_itself() {
        let (d, path, mut j) = loaded_store("torn");
        j.save(&[r(1, "a")], |r| r.id).unwrap();
        j.save(&[r(1, "a"), r(2, "b")], |r| r.id).unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(d.join("records.journal"))
            .unwrap();
        f.write_all(b"{\"set\":{\"id\":3,\"na").unwrap();
        let (got, loaded) = load(&path);
        assert_eq!(got, vec![r(1, "a"), r(2, "b")]);
        assert_eq!(loaded.replayed, 2);
        assert!(
            loaded
                .damage
                .as_deref()
                .is_some_and(|m| m.contains("line 3")),
            "{loaded:?}"
        );
    }

    #[test]
    fn a_large_journal_is_folded_into_a_snapshot() {
        let d = dir("fold");
        let path = d.join("records.json");
        let mut j = Journaled::new(&path);
        let big = "x".repeat(64 * 1024);
        let mut n = 0;
        while !path.exists() {
            n += 1;
            j.save(&[r(1, &format!("{big}{n}"))], |r| r.id).unwrap();
            assert!(n < 40, "never folded");
        }
        assert!(!d.join("records.journal").exists());
        j.save(&[r(1, "small")], |r| r.id).unwrap();
        assert_eq!(load(&path).0, vec![r(1, "small")]);
    }

    #[test]
    fn a_snapshot_of_the_old_format_is_read() {
        let d = dir("old");
        let path = d.join("records.json");
        fs::write(&path, serde_json::to_vec_pretty(&[r(5, "e")]).unwrap()).unwrap();
        let (got, loaded) = load(&path);
        assert_eq!(got, vec![r(5, "e")]);
        assert_eq!(loaded, Loaded::default());
        fs::write(&path, b"[{\"id\":").unwrap();
        let (got, loaded) = load(&path);
        assert!(got.is_empty());
        assert!(loaded.damage.is_some());
    }
}
