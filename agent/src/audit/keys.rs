//! Audit keys: the AEAD keys that encrypt records (read from a file or the environment, never
//! stored beside the log) and the node's Ed25519 key that signs checkpoints.

use std::path::{Path, PathBuf};

use aws_lc_rs::{
    aead,
    rand::SystemRandom,
    signature::{self, Ed25519KeyPair, KeyPair as _},
};

use super::{hex, unhex};

/// Environment variable that may hold the audit key (64 hex digits).
pub const KEY_ENV: &str = "AGENTWALL_AUDIT_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("audit key {source_name}: {message}")]
    Bad {
        source_name: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no audit key: give one with --key FILE or in {KEY_ENV} (64 hex digits)")]
    Missing,
    #[error("{0}")]
    Sign(String),
}

/// First 8 bytes of SHA-256 of a key: names the key in segment headers without revealing it.
pub type KeyId = [u8; 8];

/// One AEAD key.
pub struct AuditKey {
    id: KeyId,
    key: aead::LessSafeKey,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "AuditKey({})", hex(&self.id))
    }
}

impl AuditKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Self, KeyError> {
        let bad = |message: &str| KeyError::Bad {
            source_name: source_name.into(),
            message: message.into(),
        };
        if bytes.len() != 32 {
            return Err(bad("must be 32 bytes (64 hex digits)"));
        }
        if bytes.iter().all(|b| *b == 0) {
            return Err(bad("is all zeros"));
        }
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, bytes)
            .map_err(|_| bad("rejected by AES-256-GCM"))?;
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d.as_ref()[..8]);
        Ok(Self {
            id,
            key: aead::LessSafeKey::new(unbound),
        })
    }

    /// A key written as 64 hex digits (whitespace around is ignored).
    pub fn from_hex(text: &str, source_name: &str) -> Result<Self, KeyError> {
        let bytes = unhex(text).ok_or_else(|| KeyError::Bad {
            source_name: source_name.into(),
            message: "is not hex digits".into(),
        })?;
        Self::from_bytes(&bytes, source_name)
    }

    /// The current key of a key file: its first key (see [`parse_key_file`]).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let mut keys = read_key_file(path)?;
        Ok(keys.remove(0))
    }

    /// The key of `--key FILE`, or else of the environment.
    pub fn from_file_or_env(path: Option<&Path>) -> Result<Self, KeyError> {
        match path {
            Some(p) => Self::from_file(p),
            None => match std::env::var(KEY_ENV) {
                Ok(v) => Self::from_hex(&v, KEY_ENV),
                Err(_) => Err(KeyError::Missing),
            },
        }
    }

    /// A fresh random key, as hex (for `agentwall audit keygen`).
    pub fn generate_hex() -> Result<String, KeyError> {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::SecureRandom::fill(&SystemRandom::new(), &mut k)
            .map_err(|_| KeyError::Sign("no randomness".into()))?;
        Ok(hex(&k))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        data: &mut Vec<u8>,
    ) -> Result<(), KeyError> {
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                data,
            )
            .map_err(|_| KeyError::Sign("encryption failed".into()))
    }

    pub(crate) fn open<'a>(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        data: &'a mut [u8],
    ) -> Option<&'a mut [u8]> {
        self.key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                data,
            )
            .ok()
    }
}

/// The keys of a key file: one key (64 hex digits) per line, the current one first, then the
/// retired ones that older segments were written under. Empty lines and lines starting with
/// `#` are ignored. At least one key.
pub fn parse_key_file(text: &str, source_name: &str) -> Result<Vec<AuditKey>, KeyError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(AuditKey::from_hex(
            line,
            &format!("{source_name} line {}", n + 1),
        )?);
    }
    if keys.is_empty() {
        return Err(KeyError::Bad {
            source_name: source_name.into(),
            message: "holds no key (64 hex digits per line)".into(),
        });
    }
    Ok(keys)
}

fn read_key_file(path: &Path) -> Result<Vec<AuditKey>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_key_file(&text, &path.display().to_string())
}

/// Rotates a key file: a fresh key goes first (current), the keys it held stay below it
/// (retired, to read older segments). Written atomically, 0600. Returns the new key.
pub fn rotate_key_file(path: &Path) -> Result<AuditKey, KeyError> {
    crate::identity::svid::check_key_file(path).map_err(|e| KeyError::Bad {
        source_name: path.display().to_string(),
        message: e.to_string(),
    })?;
    let old = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let current = parse_key_file(&old, &path.display().to_string())?;
    let hex_key = AuditKey::generate_hex()?;
    let new = AuditKey::from_hex(&hex_key, "the new key")?;
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let text = format!(
        "{hex_key}\n# {at}: key {} retired; older keys below it read older segments\n{}",
        hex(&current[0].id),
        old.trim_start()
    );
    crate::state::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(new)
}

/// Keys a reader may need: the current one and those of older segments (rotation).
#[derive(Debug, Default)]
pub struct Keyring {
    keys: Vec<AuditKey>,
}

impl Keyring {
    pub fn new(keys: Vec<AuditKey>) -> Self {
        Self { keys }
    }

    pub fn get(&self, id: &KeyId) -> Option<&AuditKey> {
        self.keys.iter().find(|k| k.id == *id)
    }

    /// Every key of the given key files.
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for p in paths {
            keys.extend(read_key_file(p.as_ref())?);
        }
        Ok(Self { keys })
    }
}

/// The node's checkpoint signing key (`<state>/audit-node.key`, PKCS#8, 0600).
pub struct NodeKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public_hex())
    }
}

impl NodeKey {
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let bad = |m: String| KeyError::Bad {
            source_name: path.display().to_string(),
            message: m,
        };
        let pkcs8 = if path.exists() {
            crate::identity::svid::check_key_file(path).map_err(|e| bad(e.to_string()))?;
            std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })?
        } else {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| bad("cannot generate".into()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            }
            crate::state::write_atomic(path, doc.as_ref(), 0o600)
                .map_err(|e| bad(e.to_string()))?;
            doc.as_ref().to_vec()
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| bad(e.to_string()))?;
        Ok(Self { pair })
    }

    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

/// Checks an Ed25519 signature with a public key given in hex.
pub fn verify_signature(public_hex: &str, msg: &[u8], sig: &[u8]) -> bool {
    let Some(pk) = unhex(public_hex) else {
        return false;
    };
    signature::UnparsedPublicKey::new(&signature::ED25519, pk)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn key_files_hold_the_current_key_first_and_retired_keys_below() {
        let (a, b) = (
            AuditKey::generate_hex().unwrap(),
            AuditKey::generate_hex().unwrap(),
        );
        let keys = parse_key_file(&format!("# current\n{a}\n\n# retired\n{b}\n"), "f").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].id(), AuditKey::from_hex(&a, "a").unwrap().id());
        let e = parse_key_file(&format!("{a}\nnot a key\n"), "f").unwrap_err();
        assert!(e.to_string().contains("f line 2"), "{e}");
        assert!(parse_key_file("# nothing\n", "f").is_err());
        assert!(parse_key_file(&"00".repeat(32), "f").is_err());
    }

    #[test]
    fn rotating_a_key_file_keeps_the_old_keys_and_the_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("aw-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.key");
        let first = AuditKey::generate_hex().unwrap();
        crate::state::write_atomic(&path, format!("{first}\n").as_bytes(), 0o600).unwrap();
        let new = rotate_key_file(&path).unwrap();
        let again = rotate_key_file(&path).unwrap();
        let keys = read_key_file(&path).unwrap();
        let ids: Vec<KeyId> = keys.iter().map(AuditKey::id).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0], again.id());
        assert_eq!(ids[1], new.id());
        assert_eq!(ids[2], AuditKey::from_hex(&first, "f").unwrap().id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A key file others can read is not rotated (nor used).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(rotate_key_file(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
