//! Audit keys: the AEAD keys that encrypt records (read from a file or the environment, never
//! stored beside the log) and the node's Ed25519 key that signs checkpoints.

use std::path::{Path, PathBuf};

use ring::{
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
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
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

    /// A key from a file holding 64 hex digits.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text, &path.display().to_string())
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
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut k)
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
