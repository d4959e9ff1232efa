//! The X509-SVIDs the daemon made for agents of the Workload API (`agentwall exec
//! --identity`), held in memory only: the Workload API (`crate::workload`) reads them, the
//! launch, renewal and revocation here write them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use zeroize::Zeroizing;

/// An X509-SVID the daemon issued to an agent of the Workload API, with its private key.
pub(crate) struct X509Svid {
    pub(crate) spiffe_id: String,
    /// Upper-case hex.
    pub(crate) serial: String,
    /// DER certificates, leaf first.
    pub(crate) chain: Vec<u8>,
    /// PKCS#8 DER, wiped when the last holder lets go.
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    pub(crate) fn new(
        spiffe_id: String,
        serial: String,
        chain: Vec<u8>,
        key: Zeroizing<Vec<u8>>,
    ) -> Self {
        Self {
            spiffe_id,
            serial,
            chain,
            key,
        }
    }

    pub(crate) fn key_der(&self) -> &[u8] {
        &self.key
    }
}

/// What a cgroup's agent may have now.
#[derive(Debug, Clone)]
pub(crate) enum Issue {
    /// Bound, its certificate being made (at launch, or again by a restarted daemon).
    Pending,
    Issued(Arc<X509Svid>),
    /// Revoked, or its cgroup gone: streams end with PermissionDenied.
    Withdrawn,
}

/// The X509-SVIDs of the agents of the Workload API, by cgroup id: each a watch channel,
/// so that a rotation reaches every open stream of the cgroup at once.
#[derive(Debug, Default)]
pub(crate) struct Svids {
    by_cgroup: Mutex<HashMap<u64, watch::Sender<Issue>>>,
}

impl Svids {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, watch::Sender<Issue>>> {
        self.by_cgroup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cgroup `cgroup_id`'s agent has `svid` from now on.
    pub(crate) fn publish(&self, cgroup_id: u64, svid: X509Svid) {
        let issue = Issue::Issued(Arc::new(svid));
        match self.map().entry(cgroup_id) {
            std::collections::hash_map::Entry::Occupied(e) => {
                e.get().send_replace(issue);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(watch::Sender::new(issue));
            }
        }
    }

    /// Cgroup `cgroup_id` has no identity any more: its open streams end.
    pub(crate) fn withdraw(&self, cgroup_id: u64) {
        if let Some(tx) = self.map().remove(&cgroup_id) {
            tx.send_replace(Issue::Withdrawn);
        }
    }

    /// Whether the daemon holds an SVID for the cgroup (not after a restart, until renewal
    /// issues one again).
    pub(crate) fn holds(&self, cgroup_id: u64) -> bool {
        self.map()
            .get(&cgroup_id)
            .is_some_and(|tx| matches!(*tx.borrow(), Issue::Issued(_)))
    }

    /// The cgroup's SVIDs as they come, starting with the current state. Only for a cgroup
    /// whose caller was found entitled: the entry it makes stays until the cgroup goes.
    pub(crate) fn watch(&self, cgroup_id: u64) -> watch::Receiver<Issue> {
        self.map()
            .entry(cgroup_id)
            .or_insert_with(|| watch::Sender::new(Issue::Pending))
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn svid(serial: &str) -> X509Svid {
        X509Svid::new(
            "spiffe://td/a".into(),
            serial.into(),
            vec![1],
            Zeroizing::new(vec![2]),
        )
    }

    #[tokio::test]
    async fn a_stream_sees_rotation_then_withdrawal() {
        let s = Svids::default();
        let mut rx = s.watch(7);
        assert!(matches!(*rx.borrow_and_update(), Issue::Pending));
        assert!(!s.holds(7));
        s.publish(7, svid("A"));
        rx.changed().await.unwrap();
        assert!(matches!(&*rx.borrow_and_update(), Issue::Issued(x) if x.serial == "A"));
        assert!(s.holds(7));
        s.publish(7, svid("B"));
        rx.changed().await.unwrap();
        assert!(matches!(&*rx.borrow_and_update(), Issue::Issued(x) if x.serial == "B"));
        s.withdraw(7);
        // The last value is seen before the channel closes.
        let _ = rx.changed().await;
        assert!(matches!(*rx.borrow_and_update(), Issue::Withdrawn));
        assert!(rx.changed().await.is_err());
        assert!(!s.holds(7));
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let text = format!("{:?}", svid("A"));
        assert!(!text.contains("key"), "{text}");
    }
}
