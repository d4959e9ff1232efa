//! The fleet: what nodes share through etcd, as keys and values.
//!
//! Every node watches `<prefix>/revocations/` and applies what appears there; a node
//! publishes each revocation an operator makes on it. A revocation only ever takes access
//! away, and a deleted key lifts nothing: a node keeps every revocation it has applied. So
//! the worst a writer to etcd can do with this prefix is deny (which the audit log records
//! with the node it names), never allow.
//!
//! Values are bounded and checked before anything is applied: a key that does not name the
//! value's target, an unknown field or an oversized value is refused and counted.
//!
//! Policies travel as one signed bundle at `<prefix>/policies/bundle`: the policy files of a
//! directory and a version, signed with an Ed25519 key whose public half the nodes are given
//! (`fleet.policy_keys`). Grants come only from a bundle that verifies: a writer to etcd
//! without the key can neither grant nor roll the fleet back to an older bundle.

use serde::{Deserialize, Serialize};

use crate::identity::revoke::{Revocation, Target};

/// The largest value read from etcd; anything bigger is refused unread.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The longest reason kept (the rest is cut, marked with an ellipsis).
const MAX_REASON_CHARS: usize = 512;

/// The key prefix of the revocations under the fleet's prefix.
pub fn revocations_prefix(prefix: &str) -> String {
    format!("{}/revocations/", prefix.trim_end_matches('/'))
}

/// The key of `target`'s revocation: `…/revocations/spiffe://…` or `…/revocations/serial/HEX`.
pub fn revocation_key(prefix: &str, target: &Target) -> String {
    let name = match target {
        Target::SpiffeId(id) => id.clone(),
        Target::Serial(s) => format!("serial/{s}"),
    };
    format!("{}{name}", revocations_prefix(prefix))
}

/// The target a revocation's key names (the key of a delete, which carries no value).
pub fn target_of_key(prefix: &str, key: &[u8]) -> Option<Target> {
    let rest = key.strip_prefix(revocations_prefix(prefix).as_bytes())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let t = match rest.strip_prefix("serial/") {
        Some(serial) => Target::parse(serial).ok()?,
        None => Target::parse(rest).ok()?,
    };
    (revocation_key(prefix, &t).as_bytes() == key).then_some(t)
}

/// The end of the key range of `prefix` (its last byte plus one).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The first key after `key`.
pub fn after(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// A key from etcd as logs may show it: its first 128 bytes, escaped.
pub fn key_text(key: &[u8]) -> String {
    let shown = &key[..key.len().min(128)];
    let text = format!("{:?}", String::from_utf8_lossy(shown));
    if key.len() > 128 {
        format!("{text}… ({} bytes)", key.len())
    } else {
        text
    }
}

/// A revocation as the fleet holds it: the list entry and the node it was made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRevocation {
    pub target: Target,
    pub reason: String,
    /// RFC 3339, when it was made.
    pub at: String,
    /// Who made it on its node (`uid N`).
    pub by: String,
    /// The node it was made on.
    pub node: String,
}

/// Why a value under the revocations prefix was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetValueError {
    #[error("{len} bytes, more than the {MAX_VALUE_BYTES} a revocation may take")]
    TooLarge { len: usize },
    #[error("not a revocation: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the target is not valid: {0}")]
    Target(String),
    #[error("the key names another target than its value ({0})")]
    KeyMismatch(String),
    #[error("the node name is empty or longer than 255 bytes")]
    Node,
    #[error("{0} holds control characters or is longer than {MAX_REASON_CHARS} characters")]
    Text(&'static str),
}

impl FleetRevocation {
    pub fn of(r: &Revocation, node: &str) -> Self {
        Self {
            target: r.target.clone(),
            reason: r.reason.clone(),
            at: r.at.clone(),
            by: r.by.clone(),
            node: node.to_string(),
        }
    }

    /// Reads the value at `key`, refusing what could not have been published by a node.
    pub fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Result<Self, FleetValueError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(FleetValueError::TooLarge { len: value.len() });
        }
        let mut r: Self = serde_json::from_slice(value)?;
        // The target as a revocation on this node would hold it (a SPIFFE ID checked, a
        // serial in upper-case hex).
        let text = match &r.target {
            Target::SpiffeId(id) => id.clone(),
            Target::Serial(s) => s.clone(),
        };
        r.target = Target::parse(&text).map_err(|e| FleetValueError::Target(e.to_string()))?;
        let want = revocation_key(prefix, &r.target);
        if want.as_bytes() != key {
            return Err(FleetValueError::KeyMismatch(r.target.to_string()));
        }
        if r.node.is_empty() || r.node.len() > 255 {
            return Err(FleetValueError::Node);
        }
        // What reaches logs, the list, status and terminals: no escapes, bounded.
        for (field, text) in [
            ("node", &r.node),
            ("by", &r.by),
            ("at", &r.at),
            ("reason", &r.reason),
        ] {
            if text.chars().any(char::is_control) || text.chars().count() > MAX_REASON_CHARS {
                return Err(FleetValueError::Text(field));
            }
        }
        Ok(r)
    }

    /// Who made it, as this node's list and audit log say it.
    pub fn made_by(&self) -> String {
        format!("{} on node {} (fleet)", self.by, self.node)
    }
}

/// The key of the policy bundle under the fleet's prefix.
pub fn bundle_key(prefix: &str) -> String {
    format!("{}/policies/bundle", prefix.trim_end_matches('/'))
}

/// The largest bundle (etcd takes requests up to 1.5 MiB by default).
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// A policy file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    /// A plain file name ending in `.yaml` or `.yml`.
    pub name: String,
    pub text: String,
}

/// What a bundle's signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundlePayload {
    /// Higher than every bundle before it; a node refuses a lower one (a rollback).
    pub version: u64,
    /// RFC 3339, when it was signed.
    pub created: String,
    pub files: Vec<BundleFile>,
}

/// A bundle as etcd holds it: the payload's exact bytes, the signer's public key and the
/// signature over those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBundle {
    /// The payload's JSON, base64.
    pub payload: String,
    /// The signer's Ed25519 public key, hex.
    pub key: String,
    /// The signature over the payload's bytes, base64.
    pub signature: String,
}

/// Why a bundle was refused; nothing of it is in force.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{len} bytes, more than the {MAX_BUNDLE_BYTES} a bundle may take")]
    TooLarge { len: usize },
    #[error("not a signed bundle: {0}")]
    Parse(String),
    #[error("signed by key {0}, which this node does not trust (fleet.policy_keys)")]
    Untrusted(String),
    #[error("the signature does not verify: the bundle was changed or not signed by key {0}")]
    BadSignature(String),
    #[error("file name {0:?} is not a plain .yaml or .yml file name")]
    FileName(String),
    #[error("names file {0:?} twice")]
    Duplicate(String),
    #[error("version {got} is not newer than version {have} in force here (a rollback)")]
    Rollback { got: u64, have: u64 },
}

impl BundlePayload {
    /// The policy files of a directory, as [`crate::policy::load_dir`] reads them (which also
    /// checks that they are valid together).
    pub fn of_dir(dir: &std::path::Path, version: u64) -> Result<Self, crate::policy::PolicyError> {
        crate::policy::load_dir(dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| crate::policy::PolicyError::one(dir, e.to_string()))?
            .flatten()
        {
            let path = entry.path();
            if !crate::policy::is_policy_file(&path) {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| crate::policy::PolicyError::one(&path, e.to_string()))?;
            files.push(BundleFile {
                name: entry.file_name().to_string_lossy().into_owned(),
                text,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            version,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            files,
        })
    }

    /// The files as (path, text), for [`crate::policy::parse_texts`]; the paths name the
    /// bundle in errors.
    pub fn texts(&self) -> Vec<(std::path::PathBuf, String)> {
        self.files
            .iter()
            .map(|f| {
                (
                    std::path::PathBuf::from(format!("bundle-v{}", self.version)).join(&f.name),
                    f.text.clone(),
                )
            })
            .collect()
    }

    /// Signs it with `key`.
    pub fn sign(
        &self,
        key: &crate::audit::keys::NodeKey,
    ) -> Result<SignedBundle, serde_json::Error> {
        use base64::Engine as _;
        let bytes = serde_json::to_vec(self)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(SignedBundle {
            payload: b64.encode(&bytes),
            key: key.public_hex(),
            signature: b64.encode(key.sign(&bytes)),
        })
    }
}

impl SignedBundle {
    /// Verifies a bundle read from etcd against the trusted public keys (hex) and returns its
    /// payload; a bundle not newer than `have` is refused.
    pub fn verify(
        value: &[u8],
        trusted: &[String],
        have: u64,
    ) -> Result<BundlePayload, BundleError> {
        use base64::Engine as _;
        if value.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len: value.len() });
        }
        let signed: Self =
            serde_json::from_slice(value).map_err(|e| BundleError::Parse(e.to_string()))?;
        let key = signed.key.trim().to_ascii_lowercase();
        if !trusted.iter().any(|t| t.eq_ignore_ascii_case(&key)) {
            return Err(BundleError::Untrusted(key));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64
            .decode(&signed.payload)
            .map_err(|e| BundleError::Parse(format!("payload: {e}")))?;
        let signature = b64
            .decode(&signed.signature)
            .map_err(|e| BundleError::Parse(format!("signature: {e}")))?;
        if !crate::audit::keys::verify_signature(&key, &payload, &signature) {
            return Err(BundleError::BadSignature(key));
        }
        let p: BundlePayload =
            serde_json::from_slice(&payload).map_err(|e| BundleError::Parse(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for f in &p.files {
            let plain = !f.name.is_empty()
                && f.name.len() <= 255
                && !f.name.starts_with('.')
                && !f.name.contains(['/', '\\', '\0'])
                && (f.name.ends_with(".yaml") || f.name.ends_with(".yml"));
            if !plain {
                return Err(BundleError::FileName(f.name.clone()));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(BundleError::Duplicate(f.name.clone()));
            }
        }
        if p.version <= have {
            return Err(BundleError::Rollback {
                got: p.version,
                have,
            });
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str) -> Revocation {
        Revocation {
            target: Target::parse(target).unwrap(),
            reason: "key leaked".into(),
            at: "2026-12-07T12:00:00Z".into(),
            by: "uid 0".into(),
        }
    }

    #[test]
    fn a_published_revocation_reads_back() {
        for t in ["spiffe://agentwall.local/agent/reader", "0A:1b"] {
            let r = FleetRevocation::of(&entry(t), "node-a");
            let key = revocation_key("/agentwall/", &r.target);
            let value = serde_json::to_vec(&r).unwrap();
            let back = FleetRevocation::parse("/agentwall", key.as_bytes(), &value).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.made_by(), "uid 0 on node node-a (fleet)");
        }
        assert_eq!(
            revocation_key("/agentwall", &Target::Serial("0A1B".into())),
            "/agentwall/revocations/serial/0A1B"
        );
    }

    #[test]
    fn values_that_no_node_published_are_refused() {
        let r = FleetRevocation::of(&entry("spiffe://agentwall.local/agent/a"), "n");
        let value = serde_json::to_vec(&r).unwrap();
        let other = revocation_key("/p", &Target::SpiffeId("spiffe://agentwall.local/b".into()));
        let e = FleetRevocation::parse("/p", other.as_bytes(), &value).unwrap_err();
        assert!(matches!(e, FleetValueError::KeyMismatch(_)), "{e}");
        let key = revocation_key("/p", &r.target);
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            FleetRevocation::parse("/p", key.as_bytes(), &big),
            Err(FleetValueError::TooLarge { .. })
        ));
        let unknown =
            br#"{"target":{"serial":"AB"},"reason":"r","at":"t","by":"b","node":"n","grant":1}"#;
        let k = revocation_key("/p", &Target::Serial("AB".into()));
        assert!(matches!(
            FleetRevocation::parse("/p", k.as_bytes(), unknown),
            Err(FleetValueError::Parse(_))
        ));
        let bad =
            br#"{"target":{"spiffe_id":"https://x"},"reason":"r","at":"t","by":"b","node":"n"}"#;
        assert!(matches!(
            FleetRevocation::parse("/p", b"/p/revocations/https://x", bad),
            Err(FleetValueError::Target(_))
        ));
        let lower = br#"{"target":{"serial":"ab"},"reason":"r","at":"t","by":"b","node":"n"}"#;
        let parsed = FleetRevocation::parse("/p", k.as_bytes(), lower).unwrap();
        assert_eq!(parsed.target, Target::Serial("AB".into()));
        let escapes =
            br#"{"target":{"serial":"AB"},"reason":"r\u001b[2J","at":"t","by":"b","node":"n"}"#;
        assert!(matches!(
            FleetRevocation::parse("/p", k.as_bytes(), escapes),
            Err(FleetValueError::Text("reason"))
        ));
        assert_eq!(
            target_of_key("/p", k.as_bytes()),
            Some(Target::Serial("AB".into()))
        );
        assert_eq!(target_of_key("/p", b"/p/revocations/serial/ab"), None);
        assert_eq!(prefix_end("/p/"), b"/p0".to_vec());
        let nameless = br#"{"target":{"serial":"AB"},"reason":"r","at":"t","by":"b","node":""}"#;
        assert!(matches!(
            FleetRevocation::parse("/p", k.as_bytes(), nameless),
            Err(FleetValueError::Node)
        ));
    }

    #[test]
    fn only_a_newer_bundle_signed_by_a_trusted_key_verifies() {
        let dir = std::env::temp_dir().join(format!("aw-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = crate::audit::keys::NodeKey::load_or_create(&dir.join("k")).unwrap();
        let other = crate::audit::keys::NodeKey::load_or_create(&dir.join("o")).unwrap();
        let payload = BundlePayload {
            version: 7,
            created: "2026-12-07T12:00:00Z".into(),
            files: vec![BundleFile {
                name: "p.yaml".into(),
                text: "policy:\n  name: web\n".into(),
            }],
        };
        let trusted = vec![key.public_hex()];
        let signed = payload.sign(&key).unwrap();
        let bytes = serde_json::to_vec(&signed).unwrap();
        assert_eq!(SignedBundle::verify(&bytes, &trusted, 6).unwrap(), payload);
        let e = SignedBundle::verify(&bytes, &trusted, 7).unwrap_err();
        assert!(
            matches!(e, BundleError::Rollback { got: 7, have: 7 }),
            "{e}"
        );
        let by_other = serde_json::to_vec(&payload.sign(&other).unwrap()).unwrap();
        assert!(matches!(
            SignedBundle::verify(&by_other, &trusted, 0),
            Err(BundleError::Untrusted(_))
        ));
        // Another payload under the trusted key's name and signature.
        let mut forged = signed.clone();
        let mut changed = payload.clone();
        changed.files[0].text = "policy:\n  name: everything\n".into();
        forged.payload = payload_b64(&changed);
        let forged = serde_json::to_vec(&forged).unwrap();
        assert!(matches!(
            SignedBundle::verify(&forged, &trusted, 0),
            Err(BundleError::BadSignature(_))
        ));
        for bad in ["../p.yaml", "p.txt", ".p.yaml", "a/p.yaml"] {
            let mut p = payload.clone();
            p.files[0].name = bad.into();
            let b = serde_json::to_vec(&p.sign(&key).unwrap()).unwrap();
            assert!(
                matches!(
                    SignedBundle::verify(&b, &trusted, 0),
                    Err(BundleError::FileName(_))
                ),
                "{bad}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn payload_b64(p: &BundlePayload) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(p).unwrap())
    }
}
