//! The leases the daemon hands out with each fetch of a secret by an agent.
//!
//! A lease names the identity that fetched (and the serial of the certificate it proved),
//! the secret's path and version, and when it ends. An agent renews it before then; a renewal
//! is judged again by the identity's standing and its policy. Revoking the identity ends its
//! leases at once. The table is bounded per identity and in all; an identity over its bound
//! is refused new leases (it cannot push out those of others).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

use super::SecretError;

/// Leases one identity holds at most.
pub const MAX_PER_IDENTITY: usize = 1024;
/// Leases held at most in all.
pub const MAX_LEASES: usize = 65_536;
/// A lease's id: 128 random bits, in hex.
fn new_id() -> Result<String, SecretError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Crypto("no randomness".into()))?;
    Ok(crate::audit::hex(&b))
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    /// The SPIFFE ID that fetched.
    pub identity: String,
    /// The serial of the certificate it proved (hex).
    pub serial: String,
    pub path: String,
    pub version: u32,
    /// The rule that granted it, at the fetch or the last renewal (`file:line`).
    pub rule: String,
    /// Its length, in seconds, as the rule names it.
    pub ttl_seconds: u64,
    /// When it ends, in seconds since the epoch (UTC).
    pub expires: u64,
    /// For a lease on a database: the login role made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Lease {
    /// When it ends, as RFC 3339.
    pub fn expires_text(&self) -> String {
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(self.expires),
        )
        .to_string()
    }
}

/// A renewal as judged: who asked, with which certificate, what grants it now.
#[derive(Debug, Clone, Copy)]
pub struct Renewal<'a> {
    pub identity: &'a str,
    pub serial: &'a str,
    pub rule: &'a str,
    pub ttl_seconds: u64,
    pub version: u32,
}

/// Why a lease could not be granted or renewed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "{identity} holds {MAX_PER_IDENTITY} secret leases, the most one identity may; let unused ones end (they do at their TTL)"
    )]
    IdentityFull { identity: String },
    #[error("the daemon holds {MAX_LEASES} secret leases, the most it keeps; try again later")]
    Full,
    /// Unknown, ended, or another identity's (which is not said).
    #[error(
        "no lease {id} of yours is in force (it ended, or was never yours); fetch the secret again"
    )]
    Unknown { id: String },
}

/// The leases in force.
#[derive(Debug, Default)]
pub struct Leases(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<String, Lease>,
    per_identity: HashMap<String, usize>,
}

impl Table {
    fn take(&mut self, id: &str) -> Option<Lease> {
        let lease = self.by_id.remove(id)?;
        if let Some(n) = self.per_identity.get_mut(&lease.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_identity.remove(&lease.identity);
            }
        }
        Some(lease)
    }

    fn take_where(&mut self, mut ends: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        let ids: Vec<String> = self
            .by_id
            .values()
            .filter(|l| ends(l))
            .map(|l| l.id.clone())
            .collect();
        let mut ended: Vec<Lease> = ids.iter().filter_map(|id| self.take(id)).collect();
        ended.sort_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)));
        ended
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Leases {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new lease on `lease` (its id and expiry are set here), `now` in seconds since the
    /// epoch.
    pub fn grant(&self, mut lease: Lease, now: u64) -> Result<Lease, LeaseError> {
        let mut t = self.table();
        if t.per_identity.get(&lease.identity).copied().unwrap_or(0) >= MAX_PER_IDENTITY {
            return Err(LeaseError::IdentityFull {
                identity: lease.identity,
            });
        }
        if t.by_id.len() >= MAX_LEASES {
            return Err(LeaseError::Full);
        }
        lease.id = new_id().map_err(|_| LeaseError::Full)?;
        lease.expires = now.saturating_add(lease.ttl_seconds);
        *t.per_identity.entry(lease.identity.clone()).or_default() += 1;
        t.by_id.insert(lease.id.clone(), lease.clone());
        Ok(lease)
    }

    /// Whether `identity` may hold one more lease.
    pub fn room_for(&self, identity: &str) -> Result<(), LeaseError> {
        let t = self.table();
        if t.per_identity.get(identity).copied().unwrap_or(0) >= MAX_PER_IDENTITY {
            return Err(LeaseError::IdentityFull {
                identity: identity.to_owned(),
            });
        }
        if t.by_id.len() >= MAX_LEASES {
            return Err(LeaseError::Full);
        }
        Ok(())
    }

    /// The lease `id` of `identity` still in force at `now`.
    pub fn get(&self, id: &str, identity: &str, now: u64) -> Result<Lease, LeaseError> {
        self.table()
            .by_id
            .get(id)
            .filter(|l| l.identity == identity && l.expires > now)
            .cloned()
            .ok_or_else(|| LeaseError::Unknown { id: short(id) })
    }

    /// Renews lease `id` of `renewed.identity` from `now`, as judged again: the certificate
    /// that asked (its serial), the rule that grants it now and that rule's length, the
    /// version handed out.
    pub fn renew(&self, id: &str, renewed: Renewal<'_>, now: u64) -> Result<Lease, LeaseError> {
        let mut t = self.table();
        let lease = t
            .by_id
            .get_mut(id)
            .filter(|l| l.identity == renewed.identity && l.expires > now)
            .ok_or_else(|| LeaseError::Unknown { id: short(id) })?;
        renewed.serial.clone_into(&mut lease.serial);
        renewed.rule.clone_into(&mut lease.rule);
        lease.ttl_seconds = renewed.ttl_seconds;
        lease.version = renewed.version;
        lease.expires = now.saturating_add(renewed.ttl_seconds);
        Ok(lease.clone())
    }

    /// Ends lease `id`, if it is in force.
    /// Lease `id`, whoever holds it.
    pub fn find(&self, id: &str) -> Option<Lease> {
        self.table().by_id.get(id).cloned()
    }

    pub fn end(&self, id: &str) -> Option<Lease> {
        self.table().take(id)
    }

    /// Ends the leases `ends` picks (of revoked identities, say); returns them.
    pub fn end_where(&self, ends: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        self.table().take_where(ends)
    }

    /// Ends the leases whose time is up at `now`; returns them.
    pub fn expire(&self, now: u64) -> Vec<Lease> {
        self.table().take_where(|l| l.expires <= now)
    }

    /// The leases in force, soonest to end first.
    pub fn list(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.table().by_id.values().cloned().collect();
        v.sort_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)));
        v
    }

    pub fn len(&self) -> usize {
        self.table().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A lease id as an error may repeat it: a client's text, cut short.
fn short(id: &str) -> String {
    id.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(identity: &str) -> Lease {
        Lease {
            id: String::new(),
            identity: identity.into(),
            serial: "01".into(),
            path: "a/b".into(),
            version: 1,
            rule: "p.yaml:3".into(),
            ttl_seconds: 60,
            expires: 0,
            role: None,
        }
    }

    #[test]
    fn leases_are_renewed_by_their_holder_only_and_end() {
        let t = Leases::default();
        let a = t.grant(lease("spiffe://d/a"), 1000).unwrap();
        assert_eq!(a.id.len(), 32);
        assert_eq!(a.expires, 1060);
        // Another identity cannot renew it, nor learn that it exists.
        let by = |identity, serial, ttl_seconds| Renewal {
            identity,
            serial,
            rule: "p.yaml:9",
            ttl_seconds,
            version: 2,
        };
        let e = t
            .renew(&a.id, by("spiffe://d/b", "01", 60), 1010)
            .unwrap_err();
        assert!(matches!(e, LeaseError::Unknown { .. }), "{e}");
        // Renewed as judged now: the certificate that asked, the rule and its length.
        let r = t.renew(&a.id, by("spiffe://d/a", "02", 30), 1030).unwrap();
        assert_eq!(
            (r.expires, r.version, r.serial.as_str(), r.rule.as_str()),
            (1060, 2, "02", "p.yaml:9")
        );
        // Past its end it cannot be renewed, and the sweep ends it.
        assert!(t.renew(&a.id, by("spiffe://d/a", "02", 30), 1060).is_err());
        assert_eq!(t.expire(1060).len(), 1);
        assert!(t.is_empty());
        let b = t.grant(lease("spiffe://d/b"), 1000).unwrap();
        let c = t.grant(lease("spiffe://d/c"), 1000).unwrap();
        let ended = t.end_where(|l| l.identity == "spiffe://d/b");
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, b.id);
        assert!(t.get(&b.id, "spiffe://d/b", 1001).is_err());
        assert!(t.get(&c.id, "spiffe://d/c", 1001).is_ok());
    }

    #[test]
    fn one_identity_cannot_fill_the_table_for_others() {
        let t = Leases::default();
        for _ in 0..MAX_PER_IDENTITY {
            t.grant(lease("spiffe://d/greedy"), 1000).unwrap();
        }
        let e = t.grant(lease("spiffe://d/greedy"), 1000).unwrap_err();
        assert!(matches!(e, LeaseError::IdentityFull { .. }), "{e}");
        assert!(t.grant(lease("spiffe://d/other"), 1000).is_ok());
        // Ended leases give their places back.
        assert_eq!(
            t.end_where(|l| l.identity == "spiffe://d/greedy").len(),
            MAX_PER_IDENTITY
        );
        assert!(t.grant(lease("spiffe://d/greedy"), 1000).is_ok());
    }
}
