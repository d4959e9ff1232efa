//! Unix socket names for verdict summaries.
//!
//! A verdict held back by its budget is counted in the kernel under a fixed-size key: on the
//! Unix hooks, the first 16 bytes of the socket name and its length (a digest of the whole
//! name costs the verifier too much). The event reader learns whole names from the verdict
//! records it reads, and a summary gives the whole name when one cgroup has used exactly
//! one name with that start and length; otherwise it gives the start and the length.

use std::{collections::HashMap, sync::Mutex};

use agentwall_common::unix::DisplayName;

/// Names remembered at most; when full, the table starts over (a summary then gives a start
/// and a length until the names are seen again).
const MAX_NAMES: usize = 4096;
/// Bytes of the name a summary's key holds.
pub const PREFIX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NameKey {
    cgroup_id: u64,
    prefix: [u8; PREFIX],
    len: u16,
}

impl NameKey {
    fn of(cgroup_id: u64, name: &[u8]) -> Self {
        let mut prefix = [0u8; PREFIX];
        let n = name.len().min(PREFIX);
        prefix[..n].copy_from_slice(&name[..n]);
        Self {
            cgroup_id,
            prefix,
            len: u16::try_from(name.len()).unwrap_or(u16::MAX),
        }
    }
}

#[derive(Debug)]
enum Learned {
    One(String),
    /// Two names or more share the key: none is given.
    Several,
}

/// Whole Unix socket names by cgroup and summary key (see the module documentation).
#[derive(Debug, Default)]
pub struct UnixNames {
    names: Mutex<HashMap<NameKey, Learned>>,
}

impl UnixNames {
    /// A name a verdict record of `cgroup_id` carried (its raw bytes: a leading NUL for an
    /// abstract name).
    pub fn learn(&self, cgroup_id: u64, name: &[u8]) {
        let key = NameKey::of(cgroup_id, name);
        let shown = DisplayName(name).to_string();
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if names.len() >= MAX_NAMES && !names.contains_key(&key) {
            names.clear();
        }
        names
            .entry(key)
            .and_modify(|l| {
                if matches!(l, Learned::One(n) if *n != shown) {
                    *l = Learned::Several;
                }
            })
            .or_insert(Learned::One(shown));
    }

    /// The name of a summary's flow: the whole name if it is known and alone with its start
    /// and length, else its first bytes, `…` and its length.
    pub fn name(&self, cgroup_id: u64, prefix: &[u8; PREFIX], len: u16) -> String {
        let key = NameKey {
            cgroup_id,
            prefix: *prefix,
            len,
        };
        let names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(Learned::One(n)) = names.get(&key) {
            return n.clone();
        }
        let start = DisplayName(&prefix[..usize::from(len).min(PREFIX)]);
        if usize::from(len) > PREFIX {
            format!("{start}… ({len} bytes)")
        } else {
            start.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(name: &[u8]) -> [u8; PREFIX] {
        NameKey::of(0, name).prefix
    }

    #[test]
    fn a_learned_name_is_given_whole_and_an_ambiguous_one_by_its_start() {
        let names = UnixNames::default();
        let long = b"/run/user/1000/bus";
        let len = long.len() as u16;
        assert_eq!(
            names.name(7, &prefix(long), len),
            "/run/user/1000/b… (18 bytes)"
        );
        names.learn(7, long);
        assert_eq!(names.name(7, &prefix(long), len), "/run/user/1000/bus");
        // Another cgroup has not used it.
        assert_eq!(
            names.name(8, &prefix(long), len),
            "/run/user/1000/b… (18 bytes)"
        );
        // Another name with the same start and length: neither is given whole.
        names.learn(7, b"/run/user/1000/bux");
        assert_eq!(
            names.name(7, &prefix(long), len),
            "/run/user/1000/b… (18 bytes)"
        );
        // Short names are whole in the key; abstract ones show their @.
        assert_eq!(names.name(7, &prefix(b"\0dns"), 4), "@dns");
    }

    #[test]
    fn the_table_stays_bounded() {
        let names = UnixNames::default();
        for i in 0..(MAX_NAMES as u64 + 10) {
            names.learn(i, b"/run/x.sock");
        }
        assert!(names.names.lock().unwrap().len() <= MAX_NAMES);
    }
}
