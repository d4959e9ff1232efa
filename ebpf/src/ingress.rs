//! Ingress: which peers may open TCP connections to an enforced cgroup's listeners, by the
//! cgroup's policy's `ingress:` rules (`agentwall_common::maps::INGRESS`), and the replies on
//! the connections they opened.
//!
//! A policy without ingress rules has no node in the trie: its cgroups' inbound connections
//! are not judged (their replies still need egress rules). One with them has a node at
//! prefix length 0, so every peer finds a node, empty unless a rule covers it.
//!
//! Callers on this host are also admitted by who they are: see `agentwall_common::peers`.

use agentwall_common::{
    counters,
    event::{Reason, Verdict},
    maps::{
        DEFAULT_MAX_CALLERS, DEFAULT_MAX_INGRESS_NODES, DEFAULT_MAX_PASSIVE, DEFAULT_MAX_PEERS,
    },
    peers::{Caller, FlowKey, PeerKey},
    rules::{RuleKey, RuleSet, flags as rule_flags, proto},
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap},
    programs::SockOpsContext,
};

use crate::{
    decide::{self, Decision, Flow, LookupKey},
    emit,
};

#[map]
static AW_INGRESS: LpmTrie<RuleKey, RuleSet> = LpmTrie::pinned(DEFAULT_MAX_INGRESS_NODES, 0);

#[map]
static AW_PASSIVE: HashMap<u64, u64> = HashMap::pinned(DEFAULT_MAX_PASSIVE, 0);

#[map]
static AW_CALLERS: LruHashMap<FlowKey, Caller> = LruHashMap::pinned(DEFAULT_MAX_CALLERS, 0);

#[map]
static AW_PEERS: HashMap<PeerKey, RuleSet> = HashMap::pinned(DEFAULT_MAX_PEERS, 0);

/// Records that enforced cgroup `cgroup_id` sent the SYN of connection `key`, with initial
/// sequence number `isn`.
#[inline(always)]
pub(crate) fn record_caller(key: &FlowKey, cgroup_id: u64, isn: u32) {
    let caller = Caller {
        cgroup_id,
        at_boot_ns: decide::now_boot_ns(),
        slot: 0,
        isn,
    };
    if AW_CALLERS.insert(key, caller, 0).is_err() {
        emit::count(counters::CALLERS_UNRECORDED);
    }
}

/// The record of the enforced cgroup whose SYN opened connection `key`, if it still vouches.
#[inline(always)]
fn caller_of(key: &FlowKey) -> Option<Caller> {
    // SAFETY: the value is copied out at once.
    let c = unsafe { AW_CALLERS.get(key) }.copied()?;
    c.fresh(decide::now_boot_ns()).then_some(c)
}

/// The slot of the caller that the ingress admitted on connection `key` by its `agent:`
/// rule, 0 if none: for the handshake's answer.
#[inline(always)]
pub(crate) fn admitted_caller(key: &FlowKey) -> u32 {
    caller_of(key).map_or(0, |c| c.slot)
}

/// The caller's `agent:` rule that lets a caller of slot `caller_slot` connect to local TCP
/// port `port` of a cgroup with slot `slot`.
#[inline(always)]
fn peer_rule(caller_slot: u32, slot: u32, generation: u32, port: u16) -> Option<u32> {
    let key = PeerKey {
        generation,
        callee_slot: slot,
        caller_slot,
        _pad: 0,
    };
    // SAFETY: the value is only read here, under RCU.
    unsafe { AW_PEERS.get(key) }?.find(proto::TCP, port)
}

/// Admits the caller recorded for connection `key` (whose SYN carried `isn`) to local port
/// `port` of a cgroup with slot `slot`, by its binding as it is now and its `agent:` rules;
/// the record keeps the caller's slot, for the replies. A record of another SYN on the same
/// addresses and ports (sent by a process whose SYNs are not recorded, reusing them) does not
/// count.
#[inline(always)]
fn admit_caller(
    key: &FlowKey,
    isn: u32,
    slot: u32,
    generation: u32,
    epoch: u32,
    port: u16,
) -> Option<u32> {
    let mut caller = caller_of(key).filter(|c| c.isn == isn)?;
    let (_, caller_slot, _) = decide::admitted(caller.cgroup_id, generation, epoch).ok()?;
    let rule_id = peer_rule(caller_slot, slot, generation, port)?;
    caller.slot = caller_slot;
    let _ = AW_CALLERS.insert(key, caller, 0);
    Some(rule_id)
}

/// The connection of a sock_ops context, from its own side.
#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    const AF_INET: u32 = 2;
    let ops = ctx.ops;
    // SAFETY: the kernel's `bpf_sock_ops` for this invocation. Every field is read, each with
    // its own volatile load at a constant offset, and the values are chosen after: the
    // verifier refuses a context pointer moved by a computed amount, which is what the
    // compiler makes of loads chosen by the family.
    let (family, r4, l4, r6, l6, rport, lport) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).remote_ip4),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*ops).remote_port),
            core::ptr::read_volatile(&raw const (*ops).local_port),
        )
    };
    let v4 = family == AF_INET;
    FlowKey {
        remote: if v4 {
            agentwall_common::addr::quads_from_v4(r4)
        } else {
            r6
        },
        local: if v4 {
            agentwall_common::addr::quads_from_v4(l4)
        } else {
            l6
        },
        // `remote_port` holds the port in network order in its upper half, `local_port` in
        // host order.
        remote_port: (u32::from_be(rport) & 0xffff) as u16,
        local_port: lport as u16,
        _pad: 0,
    }
}

/// Marks a socket established passively, until it closes, with the cgroup that called.
#[inline(always)]
pub(crate) fn track_passive(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: the program's own context, as the helper requires.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        // The record is taken: the connection it vouched for is established.
        let key = flow_key(ctx);
        let caller = admitted_caller(&key);
        let _ = AW_CALLERS.remove(key);
        if AW_PASSIVE.insert(cookie, u64::from(caller), 0).is_err() {
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

/// If socket `cookie` was established passively: the slot of the caller its ingress admitted
/// by an `agent:` rule (0 if none did).
#[inline(always)]
pub(crate) fn passive(cookie: u64) -> Option<u32> {
    if cookie == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { AW_PASSIVE.get(cookie) }.map(|v| *v as u32)
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

/// Judges a connection `flow.dst` (the peer) asks of local port `flow.port` (`key` is the
/// connection and `isn` the caller's initial sequence number, for the caller's record;
/// `local` says the packet came from this host); `None` when the cgroup's policy judges no
/// ingress.
#[inline(always)]
pub(crate) fn judge(flow: &Flow, key: &FlowKey, isn: u32, local: bool) -> Option<Decision> {
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
    // Entries for the hosts a caller runs on elsewhere admit nothing that comes from here.
    let skip = if local { rule_flags::REMOTE_ONLY } else { 0 };
    let found = set
        .find_skipping(proto::TCP, flow.port, skip)
        .or_else(|| admit_caller(key, isn, slot, generation, epoch, flow.port));
    if found.is_none() {
        // Spent: a SYN sent again records anew.
        let _ = AW_CALLERS.remove(key);
    }
    let (verdict, reason, rule_id) = match found {
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
/// `caller_slot` is the slot of the caller the ingress admitted by its `agent:` rule (0 if
/// none), whose rule must still grant it.
#[inline(always)]
pub(crate) fn reply(
    flow: &Flow,
    slot: u32,
    generation: u32,
    sport: u16,
    caller_slot: u32,
) -> Option<u32> {
    if slot == 0 || generation == 0 {
        return None;
    }
    node(slot, generation, flow.dst)?
        .find(proto::TCP, sport)
        .or_else(|| {
            (caller_slot != 0)
                .then(|| peer_rule(caller_slot, slot, generation, sport))
                .flatten()
        })
}
