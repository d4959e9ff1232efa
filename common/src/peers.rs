//! Agent-to-agent calls on one host: who opened a TCP connection, as the callee's kernel
//! programs learn it.
//!
//! A packet that arrives at a listener says which addresses and ports it came from, not
//! which agent sent it. The caller's own egress program knows: when an enforced cgroup sends
//! a SYN, it records the connection's addresses and ports ([`FlowKey`]) with the cgroup
//! ([`Caller`]). The callee's ingress program looks the record up for the SYN it receives,
//! resolves the caller's binding as it is now (revoked, expired or unbound admits nothing)
//! and asks [`PeerKey`] whether the callee's policy admits that caller's policy to the port.
//! The ingress notes the caller's slot in the record when it admits it; the callee's
//! `aw_sockops` takes the record when the connection is established and keeps that slot with
//! the accepted socket, so that its replies are judged by the same grant (in the policy
//! generation in force when they are sent).

use crate::addr::Quads;

/// A TCP connection from the callee's side: the caller's address and port (`remote`) and
/// the callee's (`local`), addresses in word form as the packet carries them (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub remote: Quads,
    pub local: Quads,
    /// Host order.
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// The enforced cgroup that sent a connection's SYN, when (boot clock) and with which initial
/// sequence number; once the callee's ingress admitted it by an `agent:` rule, the caller's
/// slot (0 before). Only a SYN with that sequence number (or the ACK that follows it) is the
/// recorded one: another process reusing the addresses and ports gets a sequence number of
/// its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub cgroup_id: u64,
    pub at_boot_ns: u64,
    pub slot: u32,
    pub isn: u32,
}
const _: () = assert!(core::mem::size_of::<Caller>() == 24);

impl Caller {
    /// How long a record vouches for its connection's SYN: as long as Linux sends a SYN
    /// again by default (six retries, 127 s), so that a slow handshake keeps its caller. The
    /// record binds the SYN's own sequence number, so its age is no opening to others.
    pub const FRESH_NS: u64 = 130_000_000_000;

    /// Whether the record still vouches at boot time `now`.
    #[inline(always)]
    pub const fn fresh(&self, now: u64) -> bool {
        now >= self.at_boot_ns && now - self.at_boot_ns <= Self::FRESH_NS
    }
}

/// (generation, callee's slot, caller's slot) → the `RuleSet` of the callee's local TCP
/// ports the caller may connect to, each entry naming the caller's `agent:` rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub generation: u32,
    pub callee_slot: u32,
    pub caller_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_vouches_for_a_syns_retries_and_not_before_it_was_made() {
        let c = Caller {
            cgroup_id: 7,
            at_boot_ns: 1_000,
            ..Caller::default()
        };
        assert!(c.fresh(1_000));
        assert!(c.fresh(1_000 + Caller::FRESH_NS));
        assert!(!c.fresh(1_001 + Caller::FRESH_NS));
        assert!(!c.fresh(999), "a clock before the record is not trusted");
    }
}
