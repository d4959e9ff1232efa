//! Names for kernel events: the policy and rule of a verdict, and the identity of its
//! cgroup, read from the event reader's thread.

use super::*;

/// Resolves names for events from the policies in force and the enrolled identities.
pub(super) struct Names(
    pub(super) Arc<super::Policies>,
    pub(super) Identities,
    pub(super) crate::events::unix_names::UnixNames,
);

/// Cgroup id → SPIFFE ID of its enrollment, readable from the event reader's thread.
pub(super) type Identities = Arc<RwLock<IdentityNames>>;

/// How long a cgroup that lost its binding (revoked, expired, gone) is still named by its
/// last identity: its events may still wait in the ring buffer.
pub(super) const NAME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
pub(crate) struct IdentityNames {
    current: HashMap<u64, String>,
    departed: HashMap<u64, (String, std::time::Instant)>,
}

impl IdentityNames {
    /// The bound cgroups now; those that were bound and are no longer stay named for
    /// [`NAME_GRACE`].
    pub(crate) fn replace(&mut self, now_bound: HashMap<u64, String>) {
        let now = std::time::Instant::now();
        self.departed.retain(|id, (_, at)| {
            now.duration_since(*at) < NAME_GRACE && !now_bound.contains_key(id)
        });
        for (id, name) in self.current.drain() {
            if !now_bound.contains_key(&id) {
                self.departed.insert(id, (name, now));
            }
        }
        self.current = now_bound;
    }

    /// One cgroup's name now (`None`: no longer bound, named for [`NAME_GRACE`]).
    pub(crate) fn set(&mut self, cgroup_id: u64, name: Option<String>) {
        let now = std::time::Instant::now();
        self.departed
            .retain(|_, (_, at)| now.duration_since(*at) < NAME_GRACE);
        match name {
            Some(n) => {
                self.departed.remove(&cgroup_id);
                self.current.insert(cgroup_id, n);
            }
            None => {
                if let Some(old) = self.current.remove(&cgroup_id) {
                    self.departed.insert(cgroup_id, (old, now));
                }
            }
        }
    }

    fn get(&self, cgroup_id: u64) -> Option<&String> {
        self.current.get(&cgroup_id).or_else(|| {
            self.departed
                .get(&cgroup_id)
                .filter(|(_, at)| at.elapsed() < NAME_GRACE)
                .map(|(n, _)| n)
        })
    }
}

impl Resolve for Names {
    fn identity(&self, cgroup_id: u64) -> Option<String> {
        self.1.read().ok()?.get(cgroup_id).cloned()
    }

    fn learn_unix_name(&self, cgroup_id: u64, name: &[u8]) {
        self.2.learn(cgroup_id, name);
    }

    fn unix_name(&self, cgroup_id: u64, prefix: &[u8; 16], len: u16) -> String {
        self.2.name(cgroup_id, prefix, len)
    }

    fn policy(&self, slot: u32) -> Option<String> {
        self.0.name_of_slot(slot)
    }

    fn rule(&self, generation: u32, rule_id: u32) -> Option<String> {
        self.0.rule(generation, rule_id)
    }
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Names")
    }
}

#[cfg(test)]
mod tests {
    use super::IdentityNames;
    use std::collections::HashMap;

    #[test]
    fn a_cgroup_that_loses_its_binding_stays_named_for_its_pending_events() {
        let mut n = IdentityNames::default();
        n.replace(HashMap::from([(7, "spiffe://d/a".to_string())]));
        assert_eq!(n.get(7).map(String::as_str), Some("spiffe://d/a"));
        n.replace(HashMap::new());
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/a"),
            "in grace"
        );
        n.replace(HashMap::from([(7, "spiffe://d/b".to_string())]));
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/b"),
            "bound again"
        );
        assert_eq!(n.get(8), None);
        // One cgroup at a time, as a save of one enrollment does.
        n.set(8, Some("spiffe://d/c".into()));
        n.set(7, None);
        assert_eq!(n.get(8).map(String::as_str), Some("spiffe://d/c"));
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/b"),
            "in grace after set(None)"
        );
        n.set(7, Some("spiffe://d/a".into()));
        assert_eq!(n.get(7).map(String::as_str), Some("spiffe://d/a"));
    }
}
