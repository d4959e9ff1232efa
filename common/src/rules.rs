//! Rules as the kernel holds them: an LPM trie keyed by (slot, generation, destination prefix)
//! whose value lists the protocol and port ranges allowed for that prefix.
//!
//! A longest-prefix match returns one node only, so the compiler stores in every node the
//! entries of all shorter prefixes of the same slot that cover it. One lookup then answers.

use crate::addr::Addr16;

/// IP protocol numbers as rules use them.
pub mod proto {
    /// Any protocol.
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Flags of a [`PortRule`].
pub mod flags {
    /// The rule has a rate limit ([`super::Limit`], keyed by generation and rule id): each
    /// connect or addressed send it allows takes a token from the bucket of the caller's
    /// identity.
    pub const LIMITED: u8 = 1;
    /// The rule is in audit mode: what its limit or window would deny passes and is
    /// reported.
    pub const AUDIT: u8 = 2;
    /// The rule has a time window ([`super::WindowSpans`], keyed by generation and rule id):
    /// it grants only while the kernel's clock is inside one of the spans.
    pub const WINDOWED: u8 = 4;
    /// An ingress entry for the other hosts a caller runs on (`hosts:` of the agents
    /// catalog): it admits no connection that comes from this host.
    pub const REMOTE_ONLY: u8 = 8;
    /// The entry grants an address a host name resolved to, until the answer expires (its
    /// `WINDOWED` spans end there). The kernel reads nothing more in it; the compiler puts
    /// such entries before those with a limit or a window of their own.
    pub const RESOLVED: u8 = 16;
}

/// When a windowed rule grants: up to two spans `[start, end)` of the boot clock, the one
/// in course (or next) and the one after, so that the daemon has a whole span's time to
/// write the next. Unused spans are `(0, 0)`. The kernel compares its clock with them: the
/// rule opens and closes at the exact instant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSpans {
    pub spans: [[u64; 2]; 2],
}
const _: () = assert!(core::mem::size_of::<WindowSpans>() == 32);

impl WindowSpans {
    /// Whether `now` (boot clock) is inside a span.
    #[inline(always)]
    pub fn open(&self, now: u64) -> bool {
        self.open_until(now).is_some()
    }

    /// The end of the span `now` is inside, if any.
    #[inline(always)]
    pub fn open_until(&self, now: u64) -> Option<u64> {
        if self.spans[0][0] <= now && now < self.spans[0][1] {
            Some(self.spans[0][1])
        } else if self.spans[1][0] <= now && now < self.spans[1][1] {
            Some(self.spans[1][1])
        } else {
            None
        }
    }
}

/// A rule's rate limit, in the generic cell rate form of [`crate::budget::Rate`]: a token
/// bucket of `count` tokens refilled one every `interval_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Names the bucket within the identity's slot; stable across reloads that keep the rule.
    pub bucket: u32,
    pub _pad: u32,
    pub rate: crate::budget::Rate,
}
const _: () = assert!(core::mem::size_of::<Limit>() == 24);

impl Limit {
    /// `count` uses per `per_seconds`, all of them at once when the bucket is full.
    pub const fn new(bucket: u32, count: u32, per_seconds: u64) -> Self {
        let count = if count == 0 { 1 } else { count as u64 };
        let interval_ns = per_seconds * 1_000_000_000 / count;
        Self {
            bucket,
            _pad: 0,
            rate: crate::budget::Rate {
                interval_ns,
                tolerance_ns: interval_ns * (count - 1),
            },
        }
    }

    /// Key of the limit of `rule_id` in rule generation `generation`.
    #[inline(always)]
    pub const fn key(generation: u32, rule_id: u32) -> u64 {
        ((generation as u64) << 32) | rule_id as u64
    }

    /// Key of this limit's bucket for the identity slot `slot`.
    #[inline(always)]
    pub const fn bucket_key(&self, slot: u32) -> u64 {
        ((slot as u64) << 32) | self.bucket as u64
    }

    /// Takes a token at `now` from a bucket word that other CPUs update at the same time:
    /// `load` reads the word, `cas(expected, new)` writes `new` if it still holds `expected`
    /// and returns what it held. A write that lost to another CPU's is retried from what that
    /// CPU left, up to `attempts` times; past them the use is refused as contended.
    #[inline(always)]
    pub fn take(
        &self,
        now: u64,
        attempts: u32,
        mut load: impl FnMut() -> u64,
        mut cas: impl FnMut(u64, u64) -> u64,
    ) -> Taken {
        let mut tat = load();
        let mut i = 0;
        while i < attempts {
            let Some(next) = self.rate.take(tat, now) else {
                return Taken::Over;
            };
            let held = cas(tat, next);
            if held == tat {
                return Taken::Granted;
            }
            tat = held;
            i += 1;
        }
        Taken::Contended
    }
}

/// What taking a token from a rate limit's bucket said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Granted,
    /// The bucket is empty.
    Over,
    /// Other CPUs changed the bucket at every attempt.
    Contended,
}

/// Most entries one prefix node can hold, inherited ones included.
pub const MAX_ENTRIES_PER_PREFIX: usize = 16;

/// Bits of [`RuleKey`] before the address: slot and generation, always matched in full.
pub const KEY_FIXED_BITS: u32 = 64;

/// Data part of the LPM trie key (the trie's own key prepends a `u32` prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub slot: u32,
    pub generation: u32,
    /// Destination in canonical form ([`crate::addr`]).
    pub addr: Addr16,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 24);

impl RuleKey {
    /// Prefix length of a key for an address prefix of `addr_bits` (0..=128).
    pub const fn prefix_len(addr_bits: u32) -> u32 {
        KEY_FIXED_BITS + addr_bits
    }
}

/// One allowed (protocol, port range) at a prefix, with the rule it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// Rule id, resolved by the daemon to the policy file and line. Never 0.
    pub rule_id: u32,
    /// Inclusive destination port range (host order). Ignored for ICMP.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`proto`] value.
    pub proto: u8,
    /// [`flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 12);

impl PortRule {
    /// Whether this entry allows `proto` to `port`. Ports mean TCP and UDP: an entry for any
    /// protocol that names ports admits only those two within its range (a ping socket's
    /// connect carries a "port" of the caller's choosing), and one without ports (the whole
    /// range) admits every protocol. An ICMP entry admits ICMP and ICMPv6, whatever the port.
    #[inline(always)]
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        let in_range = self.port_lo <= port && port <= self.port_hi;
        if self.proto == proto::ANY {
            return if proto == proto::TCP || proto == proto::UDP {
                in_range
            } else {
                self.port_lo == 0 && self.port_hi == u16::MAX
            };
        }
        if proto == proto::ICMP || proto == proto::ICMPV6 {
            return self.proto == proto::ICMP || self.proto == proto::ICMPV6;
        }
        self.proto == proto && in_range
    }
}

/// Value of the rules trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// Number of valid entries; never above [`MAX_ENTRIES_PER_PREFIX`].
    pub len: u32,
    pub _pad: u32,
    pub entries: [PortRule; MAX_ENTRIES_PER_PREFIX],
}
const _: () = assert!(core::mem::size_of::<RuleSet>() == 8 + 12 * MAX_ENTRIES_PER_PREFIX);

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            entries: [PortRule::default(); MAX_ENTRIES_PER_PREFIX],
        }
    }
}

impl RuleSet {
    /// The id of the first entry that allows `proto` to `port`.
    #[inline(always)]
    pub fn find(&self, proto: u8, port: u16) -> Option<u32> {
        self.find_entry(proto, port).map(|e| e.rule_id)
    }

    /// The id of the first entry that allows `proto` to `port` and has none of the flags
    /// `skip`.
    #[inline(always)]
    pub fn find_skipping(&self, proto: u8, port: u16, skip: u8) -> Option<u32> {
        let mut i = 0;
        while i < MAX_ENTRIES_PER_PREFIX {
            if i as u32 >= self.len {
                return None;
            }
            let e = &self.entries[i];
            if e.flags & skip == 0 && e.matches(proto, port) {
                return Some(e.rule_id);
            }
            i += 1;
        }
        None
    }

    /// The first entry that allows `proto` to `port` (the compiler puts entries without a
    /// rate limit first).
    #[inline(always)]
    pub fn find_entry(&self, proto: u8, port: u16) -> Option<PortRule> {
        // A fixed bound keeps the kernel verifier's loop analysis simple.
        let mut i = 0;
        while i < MAX_ENTRIES_PER_PREFIX {
            if i as u32 >= self.len {
                return None;
            }
            let e = &self.entries[i];
            if e.matches(proto, port) {
                return Some(*e);
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rule_id: u32, proto: u8, lo: u16, hi: u16) -> PortRule {
        PortRule {
            rule_id,
            port_lo: lo,
            port_hi: hi,
            proto,
            flags: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn port_rule_matching() {
        let tcp_80 = entry(1, proto::TCP, 80, 80);
        assert!(tcp_80.matches(proto::TCP, 80));
        assert!(!tcp_80.matches(proto::TCP, 81));
        assert!(!tcp_80.matches(proto::UDP, 80));
        assert!(!tcp_80.matches(proto::ICMP, 0));

        let any_range = entry(2, proto::ANY, 1000, 2000);
        assert!(any_range.matches(proto::UDP, 1000));
        assert!(any_range.matches(proto::TCP, 2000));
        assert!(!any_range.matches(proto::TCP, 2001));
        // ICMP carries no port; an any-protocol rule with a port range does not cover it.
        assert!(!any_range.matches(proto::ICMP, 0));
        assert!(entry(3, proto::ANY, 0, u16::MAX).matches(proto::ICMP, 0));
        // A ping socket's connect names a port of its own choosing: ports mean TCP and UDP.
        let any_53 = entry(4, proto::ANY, 53, 53);
        assert!(!any_53.matches(proto::ICMP, 53));
        assert!(!any_53.matches(proto::ICMPV6, 53));
        assert!(!any_53.matches(47, 53), "GRE has no ports either");
        assert!(any_53.matches(proto::UDP, 53));
        assert!(entry(5, proto::ANY, 0, u16::MAX).matches(47, 0));

        let icmp = entry(4, proto::ICMP, 0, 0);
        assert!(icmp.matches(proto::ICMP, 0));
        assert!(icmp.matches(proto::ICMPV6, 0));
        assert!(!icmp.matches(proto::TCP, 0));
    }

    #[test]
    fn rule_set_find_respects_len() {
        let mut set = RuleSet::default();
        set.entries[0] = entry(10, proto::TCP, 443, 443);
        set.entries[1] = entry(11, proto::UDP, 53, 53);
        set.len = 1;
        assert_eq!(set.find(proto::TCP, 443), Some(10));
        assert_eq!(
            set.find(proto::UDP, 53),
            None,
            "entry beyond len must not match"
        );
        set.len = 2;
        assert_eq!(set.find(proto::UDP, 53), Some(11));
        set.len = u32::MAX;
        assert_eq!(set.find(proto::UDP, 54), None);
    }

    #[test]
    fn limits_hold_count_uses_at_once() {
        let l = Limit::new(7, 10, 60);
        assert_eq!(l.rate.interval_ns, 6_000_000_000);
        let mut tat = 0;
        let now = 1_000_000_000_000;
        for i in 0..10 {
            tat = l.rate.take(tat, now).unwrap_or_else(|| panic!("use {i}"));
        }
        assert_eq!(l.rate.take(tat, now), None, "the 11th within the minute");
        assert!(
            l.rate.take(tat, now + 6_000_000_000).is_some(),
            "one token back"
        );
        assert_eq!(Limit::key(2, 5), (2 << 32) | 5);
        assert_eq!(l.bucket_key(3), (3 << 32) | 7);
    }

    /// Two CPUs take the last token at once: the one whose write comes second sees the word
    /// changed, retries from what the first left, and finds the bucket empty.
    #[test]
    fn the_last_token_goes_to_one_of_two_racing_cpus() {
        let l = Limit::new(1, 2, 60);
        let now = 1_000_000_000_000;
        let word = core::cell::Cell::new(0u64);
        let cas = |expected: u64, new: u64| {
            let held = word.get();
            if held == expected {
                word.set(new);
            }
            held
        };
        assert_eq!(l.take(now, 4, || word.get(), cas), Taken::Granted);
        // CPU A reads the word; CPU B takes the last token before A writes.
        let mut b_ran = false;
        let got = l.take(
            now,
            4,
            || word.get(),
            |expected, new| {
                if !b_ran {
                    b_ran = true;
                    assert_eq!(l.take(now, 4, || word.get(), cas), Taken::Granted, "B");
                }
                cas(expected, new)
            },
        );
        assert_eq!(got, Taken::Over, "A must not take the token B took");
        // A word that changes at every attempt is refused, not taken.
        let mut n = 0;
        let busy = l.take(
            now,
            4,
            || 0,
            |_, _| {
                n += 1;
                n
            },
        );
        assert_eq!(busy, Taken::Contended);
    }

    #[test]
    fn a_window_is_open_from_its_start_to_just_before_its_end() {
        let w = WindowSpans {
            spans: [[100, 200], [300, 400]],
        };
        for (now, open) in [
            (99, false),
            (100, true),
            (199, true),
            (200, false),
            (299, false),
            (300, true),
            (399, true),
            (400, false),
        ] {
            assert_eq!(w.open(now), open, "{now}");
        }
        assert!(!WindowSpans::default().open(0), "no span, never open");
        assert_eq!(w.open_until(150), Some(200));
        assert_eq!(w.open_until(350), Some(400));
        assert_eq!(w.open_until(250), None);
    }

    #[test]
    fn key_prefix_len() {
        assert_eq!(RuleKey::prefix_len(0), 64);
        assert_eq!(RuleKey::prefix_len(128), 192);
    }
}
