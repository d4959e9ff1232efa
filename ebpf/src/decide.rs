//! The one decision function and the maps it reads.

use agentwall_common::{
    addr::Quads,
    binding::Binding,
    counters,
    event::{Hook, Reason, Verdict},
    maps::{DEFAULT_MAX_BINDINGS, DEFAULT_MAX_RULE_NODES},
    rules::{MAX_ENTRIES_PER_PREFIX, PortRule, RuleKey, RuleSet, flags as rule_flags},
    state::{
        BINDING_CACHE_SLOTS, BindingCacheEntry, DECISION_CACHE_SLOTS, DecisionCacheEntry,
        PolicyState,
    },
};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};

use crate::{conditions, emit};

/// Whether a use of a rate-limited rule by `flow` takes a token: a connect or an addressed
/// send does, and so does a packet of a protocol without a connect (ICMP); a TCP or UDP
/// packet belongs to a connect or send that took one.
#[inline(always)]
fn takes_token(flow: &Flow) -> bool {
    flow.hook != Hook::EGRESS
        || !(flow.proto == agentwall_common::rules::proto::TCP
            || flow.proto == agentwall_common::rules::proto::UDP)
}

/// Flag for maps whose entries are freed under RCU (see `agentwall_common::maps::BINDINGS`).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static AW_BINDINGS: HashMap<u64, Binding> =
    HashMap::pinned(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map]
static AW_RULES: LpmTrie<RuleKey, RuleSet> = LpmTrie::pinned(DEFAULT_MAX_RULE_NODES, 0);

#[map]
static AW_STATE: Array<PolicyState> = Array::pinned(1, 0);

/// Copies of recently read bindings, per CPU (`agentwall_common::state::BindingCacheEntry`).
#[map]
static AW_BINDING_COPIES: PerCpuArray<BindingCacheEntry> =
    PerCpuArray::with_max_entries(BINDING_CACHE_SLOTS, 0);

/// Recent decisions of rules, per CPU (`agentwall_common::state::DecisionCacheEntry`).
#[map]
static AW_DECISIONS: PerCpuArray<DecisionCacheEntry> =
    PerCpuArray::with_max_entries(DECISION_CACHE_SLOTS, 0);

/// A rules trie key laid out as `Key<RuleKey>` but aligned, so that it is built with word
/// stores: aya's `Key` is packed, and a packed key is written byte by byte, which the trie's
/// word-wise compare then reads back through stalled store forwarding.
#[repr(C, align(4))]
pub(crate) struct LookupKey {
    pub(crate) prefix_len: u32,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) addr: Quads,
}
const _: () = assert!(core::mem::size_of::<LookupKey>() == core::mem::size_of::<Key<RuleKey>>());

impl LookupKey {
    #[inline(always)]
    pub(crate) fn as_key(&self) -> &Key<RuleKey> {
        // SAFETY: same size and field order as `Key<RuleKey>` (prefix length, then `RuleKey`:
        // slot, generation, the 16 address bytes, which `Quads` holds in memory order), and
        // `Key` is packed, so any alignment suits it.
        unsafe { &*(self as *const Self).cast::<Key<RuleKey>>() }
    }
}

/// One flow (or packet, or socket) to judge.
pub(crate) struct Flow {
    pub(crate) cgroup_id: u64,
    /// Destination as given, canonical form (word form) before classification.
    pub(crate) orig: Quads,
    /// The destination it really reaches (`agentwall_common::addr::classify_quads` of
    /// `orig`), computed once.
    pub(crate) dst: Quads,
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
    /// Policy epoch the decision was made under (for the flow cache).
    pub(crate) epoch: u32,
    /// Expiry of the binding that allowed, 0 for none.
    pub(crate) expires_boot_ns: u64,
    /// The boot clock as the decision read it, 0 if it did not (the event reuses it).
    pub(crate) now_boot_ns: u64,
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
            epoch: 0,
            expires_boot_ns: 0,
            now_boot_ns: 0,
        }
    }
}

#[inline(always)]
pub(crate) fn current_cgroup_id() -> u64 {
    // SAFETY: helper without arguments, allowed in every cgroup program type used here.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
pub(crate) fn now_boot_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The policy state, if readable.
/// The policy state, if readable, read in one step: generation and epoch come from the same
/// update (the daemon writes the 8-byte entry whole; two 4-byte loads could see one field of
/// one update beside the other field of the next).
#[inline(always)]
pub(crate) fn state() -> Option<PolicyState> {
    let p = AW_STATE.get_ptr(0)?;
    // SAFETY: the array's entry is an 8-byte `PolicyState`, 8-aligned (array map values are);
    // one volatile 8-byte load.
    let word = unsafe { core::ptr::read_volatile(p.cast::<u64>()) };
    Some(PolicyState::from_word(word))
}

/// Judges a flow. Every path that is not an explicit rule match denies: a missing state entry,
/// a missing binding, a failed lookup. A rule's verdict is remembered in the per-CPU decision
/// cache and answered from there while the policy state it was made under holds.
#[inline(always)]
pub(crate) fn decide(flow: &Flow) -> Decision {
    let Some(state) = state() else {
        emit::count(counters::NO_POLICY);
        return Decision::deny(Reason::NO_POLICY, 0, 0);
    };
    // The epoch is read before the binding: a decision made on a binding older than the epoch
    // it records would outlive the change that bumped it.
    let (generation, epoch) = (state.generation, state.epoch);
    if generation == 0 {
        emit::count(counters::NO_POLICY);
        return Decision::deny(Reason::NO_POLICY, 0, 0);
    }
    let cached = AW_DECISIONS.get_ptr_mut(DecisionCacheEntry::index(
        flow.cgroup_id,
        &flow.dst,
        flow.port,
        flow.proto,
    ));
    // Judged against the state as read above, as the full decision below is.
    let seen = PolicyState { generation, epoch };
    if let Some(d) = cached.and_then(|e| recall(e, flow, &seen)) {
        return d;
    }
    let (binding, slot, now) = match admitted(flow.cgroup_id, generation, epoch) {
        Ok(a) => a,
        Err(d) => return d,
    };
    let key = LookupKey {
        prefix_len: RuleKey::prefix_len(128),
        slot,
        generation,
        addr: flow.dst,
    };
    let judged = AW_RULES.get(key.as_key()).map_or(Judged::NoMatch, |set| {
        judge(set, flow, generation, slot, binding.audit_only())
    });
    // A flow a window allows may be cached only until the window's span ends.
    let mut expires_boot_ns = binding.expires_boot_ns;
    let (verdict, reason, rule_id) = match judged {
        Judged::Plain(rule_id) => {
            // Only an unconditional rule's verdict is cached: each use of a rule with a limit
            // or a window is judged.
            if let Some(e) = cached {
                let value = DecisionCacheEntry {
                    cgroup_id: flow.cgroup_id,
                    dst: flow.dst,
                    port: flow.port,
                    proto: flow.proto,
                    _pad: 0,
                    seq: 0,
                    epoch,
                    generation,
                    slot,
                    rule_id,
                    expires_boot_ns: binding.expires_boot_ns,
                };
                // SAFETY: this CPU's slot (see `DecisionCacheEntry` for the nesting protocol).
                unsafe { DecisionCacheEntry::store_with(e, &value, || {}) };
            }
            (Verdict::ALLOW, Reason::RULE, rule_id)
        }
        Judged::Allowed(reason, rule_id, until) => {
            if until != 0 && (expires_boot_ns == 0 || until < expires_boot_ns) {
                expires_boot_ns = until;
            }
            (Verdict::ALLOW, reason, rule_id)
        }
        Judged::Denied(reason, rule_id) => {
            return Decision {
                rule_id,
                now_boot_ns: now,
                ..Decision::deny(reason, slot, generation)
            };
        }
        Judged::NoMatch if binding.audit_only() => (Verdict::ALLOW, Reason::AUDIT, 0),
        Judged::NoMatch => {
            return Decision {
                now_boot_ns: now,
                ..Decision::deny(Reason::NO_RULE, slot, generation)
            };
        }
    };
    Decision {
        verdict,
        reason,
        rule_id,
        slot,
        generation,
        epoch,
        expires_boot_ns,
        now_boot_ns: now,
    }
}

/// What the entries of a rule node say of a flow.
enum Judged {
    /// An entry without conditions allows.
    Plain(u32),
    /// An entry with conditions allows (`Reason::RULE`), or its conditions failed and audit
    /// mode lets the flow through (`RATE_AUDIT`, `WINDOW_AUDIT`); with the rule id, and the
    /// end of the window's span that allows (boot clock, 0 for none).
    Allowed(Reason, u32, u64),
    /// Entries matched, but their conditions failed: the first failure, with its rule id.
    Denied(Reason, u32),
    NoMatch,
}

/// Judges `flow` by the entries of its node, in order: the first unconditional entry that
/// matches allows. Otherwise the first two entries with conditions that match (of two
/// rules) are tried in turn: one allows if its window is open and it has a token (taken only by a connect or an
/// addressed send, see [`takes_token`]). When their conditions failed, the first failure
/// denies, or is let through if that rule or the binding is in audit mode; a condition that
/// could not be read denies in every mode.
///
/// (Two alternatives, not all: the verifier follows every path through the conditions, and
/// a third rule with a limit or window for the very same destination and port is not
/// consulted.)
#[inline(always)]
fn judge(set: &RuleSet, flow: &Flow, generation: u32, slot: u32, audit_binding: bool) -> Judged {
    // Unconditional entries come first (the compiler sorts them so): if the first match has
    // no conditions, no other entry need be looked at.
    let Some(first) = first_match(set, flow, None) else {
        return Judged::NoMatch;
    };
    if first.flags & (rule_flags::LIMITED | rule_flags::WINDOWED) == 0 {
        return Judged::Plain(first.rule_id);
    }
    let a = conditions_of(&first, flow, generation, slot, audit_binding);
    if let Judged::Allowed(Reason::RULE, ..) = a {
        return a;
    }
    let Some(second) = first_match(set, flow, Some(first.rule_id)) else {
        return a;
    };
    match conditions_of(&second, flow, generation, slot, audit_binding) {
        allowed @ Judged::Allowed(Reason::RULE, ..) => allowed,
        // An audit pass of either lets the flow through; otherwise the first failure stands.
        b @ Judged::Allowed(..) if matches!(a, Judged::Denied(..)) => b,
        _ => a,
    }
}

/// The first entry of `set` that matches `flow`; with `other_than`, the first entry with
/// conditions of another rule. Each loop ends at its first match and keeps no state across
/// turns but its index, which keeps the verifier's work linear.
#[inline(always)]
fn first_match(set: &RuleSet, flow: &Flow, other_than: Option<u32>) -> Option<PortRule> {
    let mut i = 0;
    while i < MAX_ENTRIES_PER_PREFIX {
        if i as u32 >= set.len {
            return None;
        }
        let e = set.entries[i];
        let wanted = match other_than {
            None => true,
            Some(id) => e.rule_id != id && e.flags != 0,
        };
        if wanted && e.matches(flow.proto, flow.port) {
            return Some(e);
        }
        i += 1;
    }
    None
}

/// Whether the conditions of entry `e`, which matches `flow`, hold: `Allowed(RULE)` if so;
/// else `Allowed` with an audit reason if `e`'s rule or the binding is in audit mode, or
/// `Denied` (always, for a condition that could not be read).
#[inline(always)]
fn conditions_of(
    e: &PortRule,
    flow: &Flow,
    generation: u32,
    slot: u32,
    audit_binding: bool,
) -> Judged {
    let audit = e.flags & rule_flags::AUDIT != 0 || audit_binding;
    let mut until = 0;
    if e.flags & rule_flags::WINDOWED != 0 {
        match conditions::window_until(generation, e.rule_id) {
            Some(Some(end)) => until = end,
            Some(None) if audit => return Judged::Allowed(Reason::WINDOW_AUDIT, e.rule_id, 0),
            Some(None) => return Judged::Denied(Reason::OUTSIDE_WINDOW, e.rule_id),
            None => return Judged::Denied(Reason::CONDITION_ERROR, e.rule_id),
        }
    }
    if e.flags & rule_flags::LIMITED != 0 && takes_token(flow) {
        match conditions::take(generation, slot, e.rule_id) {
            Some(true) => {}
            Some(false) if audit => return Judged::Allowed(Reason::RATE_AUDIT, e.rule_id, until),
            Some(false) => return Judged::Denied(Reason::RATE_LIMITED, e.rule_id),
            None => return Judged::Denied(Reason::CONDITION_ERROR, e.rule_id),
        }
    }
    Judged::Allowed(Reason::RULE, e.rule_id, until)
}

/// The binding of `cgroup_id` if it admits flows to be judged by rules: with its slot and
/// the boot clock as read (0 if the binding cannot expire). Otherwise the denial.
#[inline(always)]
pub(crate) fn admitted(
    cgroup_id: u64,
    generation: u32,
    epoch: u32,
) -> Result<(Binding, u32, u64), Decision> {
    let Some(binding) = binding_of(cgroup_id, epoch) else {
        emit::count(counters::NO_BINDING);
        return Err(Decision::deny(Reason::NO_BINDING, 0, generation));
    };
    // The clock is read only for a binding that can expire.
    let now = if binding.expires_boot_ns == 0 {
        0
    } else {
        now_boot_ns()
    };
    match binding.admit(now) {
        Ok(slot) => Ok((binding, slot, now)),
        Err(reason) => Err(Decision {
            now_boot_ns: now,
            ..Decision::deny(reason, binding.slot, generation)
        }),
    }
}

/// The cached decision for `flow`, if its slot `e` holds one made under the current state.
#[inline(always)]
fn recall(e: *mut DecisionCacheEntry, flow: &Flow, state: &PolicyState) -> Option<Decision> {
    // SAFETY: this CPU's slot; a read that a write interrupted is a miss.
    let entry = unsafe { DecisionCacheEntry::load_with(e, || {}) }?;
    // The clock is read only for a binding that can expire.
    let now = if entry.expires_boot_ns == 0 {
        0
    } else {
        now_boot_ns()
    };
    entry
        .answers(flow.cgroup_id, &flow.dst, flow.port, flow.proto, state, now)
        .then_some(Decision {
            verdict: Verdict::ALLOW,
            reason: Reason::RULE,
            rule_id: entry.rule_id,
            slot: entry.slot,
            generation: entry.generation,
            epoch: entry.epoch,
            expires_boot_ns: entry.expires_boot_ns,
            now_boot_ns: now,
        })
}

/// The binding of `cgroup_id`: this CPU's copy if it was read under `epoch` (the current one),
/// else the bindings map's entry, which is then copied. `None` for a cgroup without one.
#[inline(always)]
fn binding_of(cgroup_id: u64, epoch: u32) -> Option<Binding> {
    let slot = AW_BINDING_COPIES.get_ptr_mut(BindingCacheEntry::index(cgroup_id));
    if let Some(e) = slot {
        // SAFETY: this CPU's slot; a read that a write interrupted is a miss.
        let copy = unsafe { BindingCacheEntry::load_with(e, || {}) };
        if let Some(binding) = copy.and_then(|c| c.binding_of(cgroup_id, epoch)) {
            return Some(binding);
        }
    }
    // SAFETY: the bindings map is allocated without preallocation, so the entry a reader holds
    // is not reused while the program runs (freed after an RCU grace period).
    let binding = *unsafe { AW_BINDINGS.get(cgroup_id) }?;
    if let Some(e) = slot {
        let value = BindingCacheEntry {
            cgroup_id,
            epoch,
            seq: 0,
            binding,
        };
        // SAFETY: this CPU's slot (see `BindingCacheEntry` for the nesting protocol).
        unsafe { BindingCacheEntry::store_with(e, &value, || {}) };
    }
    Some(binding)
}
