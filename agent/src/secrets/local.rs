//! The embedded secret store: one file per secret in a private directory of the state
//! directory, every value encrypted with a data key of its own, every data key wrapped by the
//! master key, which lives in a file apart (like the audit key).
//!
//! - A version's value is sealed with AES-256-GCM under a fresh random data key; the data key
//!   is sealed under the master key. Both seals bind the path and the version (additional
//!   data), so a sealed value moved to another path or version does not open.
//! - A file's listing of versions (numbers, dates, which key wrapped each) is authenticated
//!   under the master key as well: a version dropped, added or renumbered is detected.
//!   Replacing the whole file with an older copy of itself is not (nothing outside the file
//!   remembers its last version); back up the store and the key file together.
//! - The master key file holds the current key first and retired keys below it (the format
//!   of the audit key file). [`LocalStore::rotate_key`] puts a fresh key first; secrets
//!   sealed under older keys stay readable and are rewrapped by [`LocalStore::rewrap`],
//!   after which the retired keys may be dropped from the file.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
};

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

use super::{Secret, SecretError, SecretInfo, SecretPath, SecretStore, SecretValue, check_value};
use crate::audit::{
    hex,
    keys::{AuditKey, KeyError, parse_key_file},
    unhex,
};

/// Versions kept per secret; a put past it drops the oldest.
pub const KEPT_VERSIONS: usize = 10;
/// Suffix of a secret's file (its name is the SHA-256 of the path, in hex).
const SUFFIX: &str = ".secret.json";
/// Largest secret file read: ten versions of the largest value, in hex, and then some.
const MAX_FILE: u64 = 1 << 20;
/// AES-256-GCM's tag.
const TAG_LEN: usize = 16;

/// The file of one secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    format: u32,
    path: String,
    versions: Vec<StoredVersion>,
    /// Key id (hex) and GMAC (nonce and tag, hex) over the listing, under the master key.
    mac_key: String,
    mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredVersion {
    version: u32,
    created: String,
    /// The master key the data key is wrapped under (its id, hex).
    key: String,
    /// The data key: nonce, then ciphertext and tag (hex).
    wrapped: String,
    /// The value: nonce, then ciphertext and tag (hex).
    sealed: String,
}

/// The master keys: the current one (first in the file) and the retired ones.
struct MasterKeys {
    keys: Vec<AuditKey>,
}

impl MasterKeys {
    fn current(&self) -> &AuditKey {
        &self.keys[0]
    }

    fn by_id(&self, id: &str) -> Option<&AuditKey> {
        self.keys.iter().find(|k| hex(&k.id()) == id)
    }
}

/// The embedded store (see the module's text).
pub struct LocalStore {
    dir: PathBuf,
    key_file: PathBuf,
    keys: RwLock<MasterKeys>,
    /// Puts, removals and rewraps one at a time: no update is lost to another.
    writes: Mutex<()>,
    rng: SystemRandom,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("dir", &self.dir)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Additional data of a seal: what it is, the path and the version.
fn aad(what: &str, path: &str, version: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(what.len() + path.len() + 6);
    a.extend_from_slice(what.as_bytes());
    a.push(0);
    a.extend_from_slice(path.as_bytes());
    a.push(0);
    a.extend_from_slice(&version.to_be_bytes());
    a
}

/// Additional data of a file's GMAC: everything the file says but the values themselves
/// (which their own seals protect) and the GMAC.
fn listing(path: &str, versions: &[StoredVersion]) -> Vec<u8> {
    let mut a = b"agentwall secret listing v1\0".to_vec();
    a.extend_from_slice(path.as_bytes());
    for v in versions {
        a.push(0);
        a.extend_from_slice(&v.version.to_be_bytes());
        for field in [&v.created, &v.key, &v.wrapped, &v.sealed] {
            a.extend_from_slice(&(field.len() as u32).to_be_bytes());
            a.extend_from_slice(field.as_bytes());
        }
    }
    a
}

/// A store file's bytes: a regular file (no link followed, no FIFO waited on) of at most
/// [`MAX_FILE`] bytes.
fn read_regular(file: &Path) -> Result<Vec<u8>, SecretError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(file)
        .map_err(io(file))?;
    let md = f.metadata().map_err(io(file))?;
    let tampered = |message: String| SecretError::Tampered {
        file: file.display().to_string(),
        message,
    };
    if !md.is_file() {
        return Err(tampered("it is not a regular file".into()));
    }
    if md.len() > MAX_FILE {
        return Err(tampered(format!("it is over {MAX_FILE} bytes")));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(md.len()).unwrap_or(0));
    f.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io(file))?;
    Ok(bytes)
}

impl LocalStore {
    /// Opens the store in `dir` (created 0700 if missing; refused if others may enter it)
    /// with the master keys of `key_file` (created 0600 with a fresh key if missing; refused if
    /// others may read it).
    pub fn open(dir: &Path, key_file: &Path) -> Result<Self, SecretError> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io(dir))?;
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        crate::state::check_private_dir(dir, "secret store").map_err(|e| SecretError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if key_file.starts_with(dir) {
            return Err(SecretError::Key(KeyError::Bad {
                source_name: key_file.display().to_string(),
                message: "the master key must not be kept inside the store it protects".into(),
            }));
        }
        if !key_file.exists() {
            // A store with secrets and no key lost its key (or the configuration names
            // another file): a new key would open none of them, and what is put under it would
            // be lost when the old key comes back.
            let held = fs::read_dir(dir)
                .map_err(io(dir))?
                .flatten()
                .any(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(SUFFIX)));
            if held {
                return Err(SecretError::Key(KeyError::Bad {
                    source_name: key_file.display().to_string(),
                    message: format!(
                        "is missing, but the store {} holds secrets sealed under it: restore the key file (or name it in secrets.key_file); a new key would open none of them",
                        dir.display()
                    ),
                }));
            }
            let hex_key = AuditKey::generate_hex()?;
            if let Some(parent) = key_file.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            crate::state::write_atomic(key_file, format!("{hex_key}\n").as_bytes(), 0o600)
                .map_err(io(key_file))?;
            tracing::warn!(path = %key_file.display(), "created a new secrets master key; keep a copy off this host: without it no secret can be read");
        }
        let keys = Self::read_keys(key_file)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key_file: key_file.to_path_buf(),
            keys: RwLock::new(keys),
            writes: Mutex::new(()),
            rng: SystemRandom::new(),
        })
    }

    fn read_keys(key_file: &Path) -> Result<MasterKeys, SecretError> {
        crate::identity::svid::check_key_file(key_file).map_err(|e| KeyError::Bad {
            source_name: key_file.display().to_string(),
            message: e.to_string(),
        })?;
        let text = fs::read_to_string(key_file).map_err(io(key_file))?;
        let keys = parse_key_file(&text, &key_file.display().to_string())?;
        Ok(MasterKeys { keys })
    }

    /// Puts a fresh master key first in the key file; the old ones stay below it, so every
    /// secret stays readable. Returns the new key's id. [`Self::rewrap`] then moves the
    /// secrets to it.
    pub fn rotate_key(&self) -> Result<String, SecretError> {
        let _turn = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let new = crate::audit::keys::rotate_key_file(&self.key_file)?;
        let keys = Self::read_keys(&self.key_file)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(hex(&new.id()))
    }

    /// Wraps every data key (and every listing) sealed under a retired master key again
    /// under the current one. Returns how many secrets were rewritten.
    pub fn rewrap(&self) -> Result<usize, SecretError> {
        let _turn = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let mut rewritten = 0;
        for file in self.files()? {
            let mut f = self.read_file(&file, None)?;
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let current = hex(&keys.current().id());
            if f.mac_key == current && f.versions.iter().all(|v| v.key == current) {
                continue;
            }
            // Each version is sealed again under a fresh data key: whoever kept a retired
            // master key (and a copy of the store) learns nothing of the new seals.
            for v in &mut f.versions {
                if v.key == current {
                    continue;
                }
                let value = self.open_value(&keys, &file, &f.path, v)?;
                let (wrapped, sealed) =
                    self.seal_version(keys.current(), &f.path, v.version, &value)?;
                v.wrapped = wrapped;
                v.sealed = sealed;
                v.key.clone_from(&current);
            }
            drop(keys);
            self.write_file(&file, &f.path, f.versions)?;
            rewritten += 1;
        }
        Ok(rewritten)
    }

    /// Seals version `version` of `path`: `value` under a fresh data key, which is wrapped
    /// under the master key `master`. Returns (wrapped data key, sealed value).
    fn seal_version(
        &self,
        master: &AuditKey,
        path: &str,
        version: u32,
        value: &[u8],
    ) -> Result<(String, String), SecretError> {
        let mut data_key = zeroize::Zeroizing::new([0u8; 32]);
        self.rng
            .fill(&mut data_key[..])
            .map_err(|_| SecretError::Crypto("no randomness".into()))?;
        let value_key = AuditKey::from_bytes(&data_key[..], "a data key")?;
        let sealed = self.seal(&value_key, &aad("value", path, version), value)?;
        let wrapped = self.seal(master, &aad("data key", path, version), &data_key[..])?;
        Ok((wrapped, sealed))
    }

    /// The value of a stored version.
    fn open_value(
        &self,
        keys: &MasterKeys,
        file: &Path,
        path: &str,
        v: &StoredVersion,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        let data_key = self.unwrap_key(keys, path, v)?;
        let value_key = AuditKey::from_bytes(&data_key, "a data key")?;
        let a = aad("value", path, v.version);
        Self::open_with(|n, d| value_key.open(n, &a, d).map(|p| p.len()), &v.sealed).ok_or_else(
            || SecretError::Tampered {
                file: file.display().to_string(),
                message: format!("the value of version {} does not open", v.version),
            },
        )
    }

    /// Seals `plain` under `key`: a fresh nonce, then ciphertext and tag, in hex.
    fn seal(&self, key: &AuditKey, aad: &[u8], plain: &[u8]) -> Result<String, SecretError> {
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretError::Crypto("no randomness".into()))?;
        // Room for the tag up front: a buffer grown by the seal would leave the plaintext in
        // the one it freed.
        let mut data = zeroize::Zeroizing::new(Vec::with_capacity(plain.len() + TAG_LEN));
        data.extend_from_slice(plain);
        key.seal(nonce, aad, &mut data)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(hex(&out))
    }

    /// Opens what [`Self::seal`] made with an AES-256-GCM key.
    fn open_with(
        open: impl FnOnce([u8; 12], &mut [u8]) -> Option<usize>,
        sealed: &str,
    ) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        let bytes = unhex(sealed)?;
        if bytes.len() < 12 + 16 {
            return None;
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&bytes[..12]);
        let mut data = zeroize::Zeroizing::new(bytes[12..].to_vec());
        let len = open(nonce, &mut data)?;
        data.truncate(len);
        Some(data)
    }

    fn unwrap_key(
        &self,
        keys: &MasterKeys,
        path: &str,
        v: &StoredVersion,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        let key = keys.by_id(&v.key).ok_or_else(|| SecretError::UnknownKey {
            path: path.to_owned(),
            version: v.version,
            key_id: v.key.clone(),
        })?;
        let a = aad("data key", path, v.version);
        Self::open_with(|n, d| key.open(n, &a, d).map(|p| p.len()), &v.wrapped)
            .filter(|k| k.len() == 32)
            .ok_or_else(|| SecretError::Tampered {
                file: self.file_of_str(path).display().to_string(),
                message: format!("the data key of version {} does not open", v.version),
            })
    }

    fn file_of_str(&self, path: &str) -> PathBuf {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, path.as_bytes());
        self.dir.join(format!("{}{SUFFIX}", hex(d.as_ref())))
    }

    fn file_of(&self, path: &SecretPath) -> PathBuf {
        self.file_of_str(path.as_str())
    }

    /// The store's secret files.
    fn files(&self) -> Result<Vec<PathBuf>, SecretError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(SUFFIX)) {
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }

    /// Reads and authenticates a secret's file; with `path`, it must be that secret's.
    fn read_file(&self, file: &Path, path: Option<&SecretPath>) -> Result<SecretFile, SecretError> {
        let tampered = |message: String| SecretError::Tampered {
            file: file.display().to_string(),
            message,
        };
        let text = read_regular(file)?;
        let f: SecretFile = serde_json::from_slice(&text)
            .map_err(|e| tampered(format!("not a secret file ({e})")))?;
        if f.format != 1 {
            return Err(tampered(format!(
                "format {} is not one this agentwall reads",
                f.format
            )));
        }
        if path.is_some_and(|p| p.as_str() != f.path) || self.file_of_str(&f.path) != file {
            return Err(tampered(format!(
                "it holds the secret {:?}, which belongs in another file",
                f.path
            )));
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.by_id(&f.mac_key).ok_or_else(|| {
            tampered(format!(
                "its listing is sealed under key {}, which the key file no longer holds",
                f.mac_key
            ))
        })?;
        let a = listing(&f.path, &f.versions);
        let ok = Self::open_with(|n, d| key.open(n, &a, d).map(|p| p.len()), &f.mac)
            .is_some_and(|p| p.is_empty());
        if !ok {
            return Err(tampered(
                "its listing of versions does not match its seal".into(),
            ));
        }
        Ok(f)
    }

    /// Writes a secret's file (its listing sealed under the current key), atomically.
    fn write_file(
        &self,
        file: &Path,
        path: &str,
        versions: Vec<StoredVersion>,
    ) -> Result<(), SecretError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mac = self.seal(keys.current(), &listing(path, &versions), &[])?;
        let f = SecretFile {
            format: 1,
            path: path.to_owned(),
            versions,
            mac_key: hex(&keys.current().id()),
            mac,
        };
        let bytes = serde_json::to_vec_pretty(&f)
            .map_err(|e| SecretError::Crypto(format!("encoding the secret file: {e}")))?;
        crate::state::write_atomic(file, &bytes, 0o600).map_err(io(file))
    }
}

impl SecretStore for LocalStore {
    fn put(&self, path: &SecretPath, value: &[u8]) -> Result<u32, SecretError> {
        check_value(path, value)?;
        let _turn = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.file_of(path);
        let mut versions = match self.read_file(&file, Some(path)) {
            Ok(f) => f.versions,
            Err(SecretError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let Some(version) = versions
            .last()
            .map_or(Some(1), |v| v.version.checked_add(1))
        else {
            return Err(SecretError::Crypto(format!(
                "{path} has no version number left"
            )));
        };
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let (wrapped, sealed) = self.seal_version(keys.current(), path.as_str(), version, value)?;
        let key = hex(&keys.current().id());
        drop(keys);
        versions.push(StoredVersion {
            version,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            key,
            wrapped,
            sealed,
        });
        if versions.len() > KEPT_VERSIONS {
            versions.drain(..versions.len() - KEPT_VERSIONS);
        }
        self.write_file(&file, path.as_str(), versions)?;
        Ok(version)
    }

    fn get(&self, path: &SecretPath, version: Option<u32>) -> Result<Secret, SecretError> {
        let file = self.file_of(path);
        let f = match self.read_file(&file, Some(path)) {
            Ok(f) => f,
            Err(SecretError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(SecretError::NotFound {
                    path: path.to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let v = match version {
            None => f.versions.last(),
            Some(n) => f.versions.iter().find(|v| v.version == n),
        };
        let Some(v) = v else {
            let have: Vec<String> = f.versions.iter().map(|v| v.version.to_string()).collect();
            return Err(match version {
                Some(n) => SecretError::NoVersion {
                    path: path.to_string(),
                    version: n,
                    have: have.join(", "),
                },
                None => SecretError::NotFound {
                    path: path.to_string(),
                },
            });
        };
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let value = self.open_value(&keys, &file, &f.path, v)?;
        drop(keys);
        Ok(Secret {
            path: path.clone(),
            version: v.version,
            created: v.created.clone(),
            value: SecretValue::new(value.to_vec()),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<SecretInfo>, SecretError> {
        let mut out = Vec::new();
        for file in self.files()? {
            let f = match self.read_file(&file, None) {
                Ok(f) => f,
                // Removed since the directory was read.
                Err(SecretError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !f.path.starts_with(prefix) {
                continue;
            }
            out.push(SecretInfo {
                updated: f
                    .versions
                    .last()
                    .map(|v| v.created.clone())
                    .unwrap_or_default(),
                versions: f.versions.iter().map(|v| v.version).collect(),
                path: f.path,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn remove(&self, path: &SecretPath) -> Result<bool, SecretError> {
        let _turn = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.file_of(path);
        match fs::remove_file(&file) {
            Ok(()) => {
                if let Ok(d) = fs::File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&file)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("aw-secrets-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        Dir(d)
    }

    fn store(d: &Dir) -> LocalStore {
        LocalStore::open(&d.0.join("store"), &d.0.join("secrets.key")).unwrap()
    }

    fn p(s: &str) -> SecretPath {
        SecretPath::parse(s).unwrap()
    }

    #[test]
    fn values_are_versioned_and_never_stored_in_clear() {
        let d = scratch("versions");
        let s = store(&d);
        let path = p("agent/data-pipeline-agent/db-password");
        assert_eq!(s.put(&path, b"planted-value-one").unwrap(), 1);
        assert_eq!(s.put(&path, b"planted-value-two").unwrap(), 2);
        assert_eq!(
            s.get(&path, None).unwrap().value.expose(),
            b"planted-value-two"
        );
        let first = s.get(&path, Some(1)).unwrap();
        assert_eq!(
            (first.version, first.value.expose()),
            (1, &b"planted-value-one"[..])
        );
        let e = s.get(&path, Some(7)).unwrap_err().to_string();
        assert!(e.contains("has no version 7 (it has 1, 2)"), "{e}");
        for f in s.files().unwrap() {
            let text = fs::read_to_string(f).unwrap();
            assert!(!text.contains("planted-value"), "{text}");
        }
        let listed = s.list("agent/").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].versions, [1, 2]);
        assert!(s.list("other/").unwrap().is_empty());
        for _ in 0..KEPT_VERSIONS {
            s.put(&path, b"more").unwrap();
        }
        assert_eq!(s.list("").unwrap()[0].versions.len(), KEPT_VERSIONS);
        assert!(s.remove(&path).unwrap());
        assert!(!s.remove(&path).unwrap());
        assert!(matches!(
            s.get(&path, None),
            Err(SecretError::NotFound { .. })
        ));
    }

    #[test]
    fn values_survive_a_reopen_and_need_the_key() {
        let d = scratch("reopen");
        store(&d).put(&p("a/b"), b"v").unwrap();
        assert_eq!(store(&d).get(&p("a/b"), None).unwrap().value.expose(), b"v");
        // Another master key opens nothing.
        fs::write(
            d.0.join("secrets.key"),
            format!("{}\n", AuditKey::generate_hex().unwrap()),
        )
        .unwrap();
        let e = store(&d).get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("no longer holds"), "{e}");
    }

    #[test]
    fn tampering_is_detected() {
        let d = scratch("tamper");
        let s = store(&d);
        s.put(&p("a/b"), b"one").unwrap();
        s.put(&p("a/b"), b"two").unwrap();
        s.put(&p("a/c"), b"three").unwrap();
        let file = s.file_of(&p("a/b"));
        let orig: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        let write =
            |v: &serde_json::Value| fs::write(&file, serde_json::to_vec(v).unwrap()).unwrap();
        // The newest version dropped (a rollback to the older value).
        let mut v = orig.clone();
        v["versions"].as_array_mut().unwrap().pop();
        write(&v);
        let e = s.get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("does not match its seal"), "{e}");
        // A version renumbered.
        let mut v = orig.clone();
        v["versions"][0]["version"] = 5.into();
        write(&v);
        assert!(matches!(
            s.get(&p("a/b"), None),
            Err(SecretError::Tampered { .. })
        ));
        // A flipped bit in a value.
        let mut v = orig.clone();
        let sealed = v["versions"][1]["sealed"].as_str().unwrap().to_owned();
        let flipped = format!(
            "{}{}",
            &sealed[..30],
            if &sealed[30..31] == "0" { "1" } else { "0" }
        );
        v["versions"][1]["sealed"] = format!("{flipped}{}", &sealed[31..]).into();
        write(&v);
        assert!(matches!(
            s.get(&p("a/b"), None),
            Err(SecretError::Tampered { .. })
        ));
        // Another secret's file put in its place.
        fs::copy(s.file_of(&p("a/c")), &file).unwrap();
        let e = s.get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("belongs in another file"), "{e}");
        // Restored, it reads again.
        write(&orig);
        assert_eq!(s.get(&p("a/b"), None).unwrap().value.expose(), b"two");
    }

    #[test]
    fn a_rotated_key_keeps_old_secrets_readable_and_rewraps_them() {
        let d = scratch("rotate");
        let s = store(&d);
        s.put(&p("a/b"), b"old").unwrap();
        let old_id = hex(&s.keys.read().unwrap().current().id());
        let new_id = s.rotate_key().unwrap();
        assert_ne!(old_id, new_id);
        assert_eq!(s.get(&p("a/b"), None).unwrap().value.expose(), b"old");
        s.put(&p("a/b"), b"new").unwrap();
        assert_eq!(s.rewrap().unwrap(), 1);
        assert_eq!(s.rewrap().unwrap(), 0);
        // With only the new key left, both versions still open.
        fs::write(d.0.join("secrets.key"), {
            let text = fs::read_to_string(d.0.join("secrets.key")).unwrap();
            format!("{}\n", text.lines().next().unwrap())
        })
        .unwrap();
        let s = store(&d);
        assert_eq!(s.get(&p("a/b"), Some(1)).unwrap().value.expose(), b"old");
        assert_eq!(s.get(&p("a/b"), None).unwrap().value.expose(), b"new");
    }

    #[test]
    fn a_lost_key_is_not_replaced_over_a_store_that_holds_secrets() {
        let d = scratch("lost");
        store(&d).put(&p("a/b"), b"v").unwrap();
        fs::remove_file(d.0.join("secrets.key")).unwrap();
        let e = LocalStore::open(&d.0.join("store"), &d.0.join("secrets.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("restore the key file"), "{e}");
        assert!(!d.0.join("secrets.key").exists());
    }

    #[test]
    fn store_files_that_are_links_fifos_or_huge_are_refused() {
        let d = scratch("files");
        let s = store(&d);
        s.put(&p("a/b"), b"v").unwrap();
        let file = s.file_of(&p("a/b"));
        let big = d.0.join("big");
        fs::write(&big, vec![b' '; usize::try_from(MAX_FILE).unwrap() + 1]).unwrap();
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&big, &file).unwrap();
        let e = s.get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("symbolic links"), "{e}");
        fs::remove_file(&file).unwrap();
        fs::copy(&big, &file).unwrap();
        let e = s.get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("over 1048576 bytes"), "{e}");
        fs::remove_file(&file).unwrap();
        nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = s.get(&p("a/b"), None).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_rewrap_seals_every_version_under_a_fresh_data_key() {
        let d = scratch("fresh");
        let s = store(&d);
        s.put(&p("a/b"), b"value").unwrap();
        let read = || -> serde_json::Value {
            serde_json::from_slice(&fs::read(s.file_of(&p("a/b"))).unwrap()).unwrap()
        };
        let before = read();
        s.rotate_key().unwrap();
        s.rewrap().unwrap();
        let after = read();
        assert_ne!(
            before["versions"][0]["sealed"],
            after["versions"][0]["sealed"]
        );
        assert_ne!(
            before["versions"][0]["wrapped"],
            after["versions"][0]["wrapped"]
        );
        assert_eq!(s.get(&p("a/b"), None).unwrap().value.expose(), b"value");
    }

    #[test]
    fn bad_values_and_homes_are_refused_with_a_reason() {
        let d = scratch("refuse");
        let s = store(&d);
        let e = s.put(&p("a"), b"").unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let big = vec![1u8; super::super::MAX_VALUE + 1];
        let e = s.put(&p("a"), &big).unwrap_err().to_string();
        assert!(e.contains("over the 32768"), "{e}");
        let e = LocalStore::open(&d.0.join("store"), &d.0.join("store/key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inside the store"), "{e}");
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(d.0.join("secrets.key"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(LocalStore::open(&d.0.join("store"), &d.0.join("secrets.key")).is_err());
    }
}
