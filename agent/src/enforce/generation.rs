//! A policy generation's nodes in the kernel's maps: their numbers, their writing (split
//! between threads for a large set) and the removal of a generation's leftovers.

use std::{os::fd::AsFd as _, thread};

use agentwall_common::rules::{RuleKey, RuleSet};
use aya::maps::{
    HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};

use super::{EnforceError, map_err};

/// The generation number after `last` (the last one written), never 0 (none) nor `active`.
pub(super) fn next_generation(last: u32, active: u32) -> u32 {
    let mut next = last;
    loop {
        next = next.wrapping_add(1);
        if next != 0 && next != active {
            return next;
        }
    }
}

/// Sets of nodes up to this size are written by one thread.
const WRITE_ALONE: usize = 2048;
/// Most threads that write one set of nodes.
const MAX_WRITERS: usize = 4;

/// Writes `nodes` into `trie` as generation `generation`.
///
/// Each node is one system call, which costs more than the kernel's work under the trie's
/// lock: a large set is split between threads, one per CPU, each writing through a
/// descriptor of its own for the same map.
pub(super) fn write_trie(
    trie: &mut LpmTrie<MapData, RuleKey, RuleSet>,
    nodes: &[crate::policy::compile::Node],
    generation: u32,
) -> Result<(), MapError> {
    let writers = thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_WRITERS)
        .min(nodes.len().div_ceil(WRITE_ALONE));
    if writers <= 1 {
        return write_nodes(trie, nodes, generation);
    }
    let per = nodes.len().div_ceil(writers);
    let mut chunks = nodes.chunks(per);
    let mine = chunks.next().unwrap_or_default();
    let mut others = Vec::with_capacity(writers - 1);
    for chunk in chunks {
        let fd = aya::maps::IterableMap::map(&*trie)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                })
            })?;
        let other: LpmTrie<MapData, RuleKey, RuleSet> =
            LpmTrie::try_from(aya::maps::Map::LpmTrie(MapData::from_fd(fd)?))?;
        others.push((other, chunk));
    }
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(others.len());
        let mut result = Ok(());
        for (mut other, chunk) in others {
            // A thread that cannot be made (a host out of threads) leaves its share to this
            // one: the write goes on, slower, and fails only as a write can.
            match thread::Builder::new()
                .name("agentwall-nodes".into())
                .spawn_scoped(s, move || write_nodes(&mut other, chunk, generation))
            {
                Ok(h) => handles.push(h),
                Err(_) => {
                    if result.is_ok() {
                        result = write_nodes(trie, chunk, generation);
                    }
                }
            }
        }
        if result.is_ok() {
            result = write_nodes(trie, mine, generation);
        }
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::other("a thread writing the nodes panicked"),
                }))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Writes `nodes` into `trie` as generation `generation`, one after another.
fn write_nodes(
    trie: &mut LpmTrie<MapData, RuleKey, RuleSet>,
    nodes: &[crate::policy::compile::Node],
    generation: u32,
) -> Result<(), MapError> {
    for node in nodes {
        let key = Key::new(
            RuleKey::prefix_len(node.bits),
            RuleKey {
                slot: node.slot,
                generation,
                addr: node.addr,
            },
        );
        trie.insert(&key, node.set, 0)?;
    }
    Ok(())
}

/// Removes the nodes of `trie` whose generation `stale` picks.
/// Returns how many nodes are left.
pub(super) fn purge_trie(
    trie: &mut LpmTrie<MapData, RuleKey, RuleSet>,
    name: &'static str,
    stale: impl Fn(u32) -> bool,
) -> Result<usize, EnforceError> {
    let (keys, kept): (Vec<Key<RuleKey>>, Vec<Key<RuleKey>>) = trie
        .keys()
        .filter_map(Result::ok)
        .partition(|k| stale(k.data().generation));
    for k in keys {
        match trie.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name, "removing a stale entry")(e)),
        }
    }
    Ok(kept.len())
}

/// Removes the entries of hash map `map` whose key `stale` picks.
pub(super) fn purge_keys<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    stale: impl Fn(&K) -> bool,
) -> Result<(), EnforceError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for k in keys {
        match map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name, "removing a stale entry")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::next_generation;

    #[test]
    fn a_generation_number_is_never_written_twice() {
        assert_eq!(next_generation(4, 4), 5);
        // The write of 5 failed (last written 5, 4 still in force): the next try is 6, so
        // nodes of 5 that its purge missed can never be flipped in.
        assert_eq!(next_generation(5, 4), 6);
        // Past the wrap: never 0 (no policy), never the one in force.
        assert_eq!(next_generation(u32::MAX, 3), 1);
        assert_eq!(next_generation(u32::MAX, 1), 2);
        assert_eq!(next_generation(0, 0), 1);
    }
}
