//! Ingress: which peers may open TCP connections to an enforced cgroup's listeners, by the
//! cgroup's policy's `ingress:` rules (`agentwall_common::maps::INGRESS`), and the replies on
//! the connections they opened.
//!
//! A policy without ingress rules has no node in the trie: its cgroups' inbound connections
//! are not judged (their replies still need egress rules). One with them has a node at
//! prefix length 0, so every peer finds a node, empty unless a rule covers it.

use agentwall_common::{
    counters,
    event::{Reason, Verdict},
    maps::{DEFAULT_MAX_INGRESS_NODES, DEFAULT_MAX_PASSIVE},
    rules::{RuleKey, RuleSet, proto},
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::map,
    maps::{HashMap, LpmTrie},
    programs::SockOpsContext,
};

use crate::{
    decide::{self, Decision, Flow, LookupKey},
    emit,
};

#[map]
static AW_INGRESS: LpmTrie<RuleKey, RuleSet> = LpmTrie::pinned(DEFAULT_MAX_INGRESS_NODES, 0);

#[map]
static AW_PASSIVE: HashMap<u64, u8> = HashMap::pinned(DEFAULT_MAX_PASSIVE, 0);

/// Marks a socket established passively, until it closes.
#[inline(always)]
pub(crate) fn track_passive(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: the program's own context, as the helper requires.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if AW_PASSIVE.insert(cookie, 1, 0).is_err() {
            emit::count(counters::PASSIVE_UNTRACKED);
        }
        // Its close is reported to this program too, to unmark it.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // SAFETY: as above.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        let _ = AW_PASSIVE.remove(cookie);
    }
}

/// Whether socket `cookie` was established passively.
#[inline(always)]
pub(crate) fn passive(cookie: u64) -> bool {
    // SAFETY: the value is only tested for presence.
    cookie != 0 && unsafe { AW_PASSIVE.get(cookie) }.is_some()
}

/// Whether cgroup `cgroup_id`'s policy judges ingress (or its binding admits nothing, which
/// is judged the same: refused).
#[inline(always)]
pub(crate) fn judges(cgroup_id: u64) -> bool {
    let Some(state) = decide::state() else {
        return true;
    };
    match decide::admitted(cgroup_id, state.generation, state.epoch) {
        Ok((_, slot, _)) => node(slot, state.generation, [0; 4]).is_some(),
        Err(_) => true,
    }
}

/// The ingress node of `slot` in `generation` for the peer `peer` (classified).
#[inline(always)]
fn node(
    slot: u32,
    generation: u32,
    peer: agentwall_common::addr::Quads,
) -> Option<&'static RuleSet> {
    let key = LookupKey {
        prefix_len: RuleKey::prefix_len(128),
        slot,
        generation,
        addr: peer,
    };
    AW_INGRESS.get(key.as_key())
}

/// Judges a connection `flow.dst` (the peer) asks of local port `flow.port`; `None` when the
/// cgroup's policy judges no ingress.
#[inline(always)]
pub(crate) fn judge(flow: &Flow) -> Option<Decision> {
    let Some(state) = decide::state() else {
        emit::count(counters::NO_POLICY);
        return Some(Decision::deny(Reason::NO_POLICY, 0, 0));
    };
    let (generation, epoch) = (state.generation, state.epoch);
    if generation == 0 {
        emit::count(counters::NO_POLICY);
        return Some(Decision::deny(Reason::NO_POLICY, 0, 0));
    }
    let (binding, slot, now) = match decide::admitted(flow.cgroup_id, generation, epoch) {
        Ok(a) => a,
        Err(d) => return Some(d),
    };
    let set = node(slot, generation, flow.dst)?;
    let (verdict, reason, rule_id) = match set.find(proto::TCP, flow.port) {
        Some(rule_id) => (Verdict::ALLOW, Reason::RULE, rule_id),
        None if binding.audit_only() => (Verdict::ALLOW, Reason::AUDIT, 0),
        None => (Verdict::DENY, Reason::NO_RULE, 0),
    };
    Some(Decision {
        verdict,
        reason,
        rule_id,
        slot,
        generation,
        epoch,
        expires_boot_ns: binding.expires_boot_ns,
        now_boot_ns: now,
    })
}

/// The ingress rule that lets the peer `flow.dst` connect to local port `sport`, for a packet
/// the cgroup sends from that port: a reply on a connection the peer could open.
#[inline(always)]
pub(crate) fn reply(flow: &Flow, slot: u32, generation: u32, sport: u16) -> Option<u32> {
    if slot == 0 || generation == 0 {
        return None;
    }
    node(slot, generation, flow.dst)?.find(proto::TCP, sport)
}
