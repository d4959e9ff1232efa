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
        if r.reason.chars().count() > MAX_REASON_CHARS {
            r.reason = r.reason.chars().take(MAX_REASON_CHARS).collect::<String>() + "…";
        }
        Ok(r)
    }

    /// Who made it, as this node's list and audit log say it.
    pub fn made_by(&self) -> String {
        format!("{} on node {} (fleet)", self.by, self.node)
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
        let nameless = br#"{"target":{"serial":"AB"},"reason":"r","at":"t","by":"b","node":""}"#;
        assert!(matches!(
            FleetRevocation::parse("/p", k.as_bytes(), nameless),
            Err(FleetValueError::Node)
        ));
    }
}
