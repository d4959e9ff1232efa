//! The one decision function and the maps it reads.

use agentwall_common::{
    addr::{self, Addr16},
    binding::Binding,
    counters,
    event::{Hook, Reason, Verdict},
    maps::{DEFAULT_MAX_BINDINGS, DEFAULT_MAX_RULE_NODES},
    rules::{RuleKey, RuleSet},
    state::PolicyState,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};

use crate::emit;

/// Flag for maps whose entries are freed under RCU (see `agentwall_common::maps::BINDINGS`).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static AW_BINDINGS: HashMap<u64, Binding> =
    HashMap::pinned(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map]
static AW_RULES: LpmTrie<RuleKey, RuleSet> = LpmTrie::pinned(DEFAULT_MAX_RULE_NODES, 0);

#[map]
static AW_STATE: Array<PolicyState> = Array::pinned(1, 0);

/// One flow (or packet, or socket) to judge.
pub(crate) struct Flow {
    pub(crate) cgroup_id: u64,
    /// Destination as given, canonical 16-byte form before classification.
    pub(crate) orig: Addr16,
    pub(crate) port: u16,
    pub(crate) proto: u8,
    pub(crate) hook: Hook,
    pub(crate) sock_type: u8,
    pub(crate) family: u8,
}

pub(crate) struct Decision {
    pub(crate) verdict: Verdict,
    pub(crate) reason: Reason,
    pub(crate) rule_id: u32,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl Decision {
    #[inline(always)]
    pub(crate) fn deny(reason: Reason, slot: u32, generation: u32) -> Self {
        Self {
            verdict: Verdict::DENY,
            reason,
            rule_id: 0,
            slot,
            generation,
        }
    }
}

#[inline(always)]
pub(crate) fn current_cgroup_id() -> u64 {
    // SAFETY: helper without arguments, allowed in every cgroup program type used here.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Judges a flow. Every path that is not an explicit rule match denies: a missing state entry,
/// a missing binding, a failed lookup.
#[inline(always)]
pub(crate) fn decide(flow: &Flow) -> Decision {
    let Some(state) = AW_STATE.get(0) else {
        emit::count(counters::NO_POLICY);
        return Decision::deny(Reason::NO_POLICY, 0, 0);
    };
    let generation = state.generation;
    if generation == 0 {
        emit::count(counters::NO_POLICY);
        return Decision::deny(Reason::NO_POLICY, 0, 0);
    }
    // SAFETY: the bindings map is allocated without preallocation, so the entry a reader holds
    // is not reused while the program runs (freed after an RCU grace period).
    let Some(binding) = (unsafe { AW_BINDINGS.get(flow.cgroup_id) }) else {
        emit::count(counters::NO_BINDING);
        return Decision::deny(Reason::NO_BINDING, 0, generation);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let slot = match binding.admit(now) {
        Ok(slot) => slot,
        Err(reason) => return Decision::deny(reason, binding.slot, generation),
    };
    let key = Key::new(
        RuleKey::prefix_len(128),
        RuleKey {
            slot,
            generation,
            addr: addr::classify(flow.orig),
        },
    );
    let rule = AW_RULES
        .get(&key)
        .and_then(|set| set.find(flow.proto, flow.port));
    match rule {
        Some(rule_id) => Decision {
            verdict: Verdict::ALLOW,
            reason: Reason::RULE,
            rule_id,
            slot,
            generation,
        },
        None if binding.audit_only() => Decision {
            verdict: Verdict::ALLOW,
            reason: Reason::AUDIT,
            rule_id: 0,
            slot,
            generation,
        },
        None => Decision::deny(Reason::NO_RULE, slot, generation),
    }
}
