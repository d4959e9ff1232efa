//! Global policy state, read by every decision.

/// The single entry of the state array. Rules are keyed by generation; the daemon writes a
/// complete new generation, then flips `generation` with one map update, so a decision sees
/// the old rules or the new ones and never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Active rule generation. 0 means no policy was ever loaded: everything is denied.
    pub generation: u32,
    /// Bumped by the daemon after every change that can take a permission away (a new
    /// generation, a binding changed or removed). A cached flow verdict ([`FlowCacheEntry`])
    /// or decision ([`DecisionCacheEntry`]) is trusted only while its epoch is the current one.
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyState>() == 8);

impl PolicyState {
    /// The state from its 8 bytes read as one little-endian word (generation in the low half:
    /// it comes first), so that both fields come from one read.
    #[inline(always)]
    pub const fn from_word(word: u64) -> Self {
        Self {
            generation: word as u32,
            epoch: (word >> 32) as u32,
        }
    }

    /// The epoch that follows `epoch`: never 0, which a slot emptied from userspace holds and
    /// must never match (see `Enforcer::bump_epoch` in the daemon).
    #[inline(always)]
    pub const fn next_epoch(epoch: u32) -> u32 {
        match epoch.wrapping_add(1) {
            0 => 1,
            e => e,
        }
    }
}

use crate::{addr::Quads, binding::Binding};

/// Slots of the per-CPU flow verdict cache (a power of two). Socket cookies come one after
/// another, so successive connects write successive slots: the table is kept small enough to
/// stay in the CPU's cache between two visits of a slot (1024 slots had gone cold, a miss on
/// every connect). A socket whose slot another took is judged in full, which the decision
/// cache ([`DecisionCacheEntry`]) makes cheap.
pub const FLOW_CACHE_SLOTS: u32 = 128;

/// One slot of the per-CPU flow verdict cache, indexed by socket cookie. A connected socket
/// allowed by the connect hook (or a TCP socket allowed by the egress hook) is remembered
/// here, and the egress hook passes its next packets without a rule lookup while nothing
/// has changed. Kernel-only: the daemon never reads or writes it.
///
/// A slot belongs to one CPU, but a program on that CPU can be interrupted by another one
/// (a connect in process context by the egress hook of a packet sent from a softirq), which
/// may read or write the same slot. `seq` guards against both mixes: it is odd while a write
/// is in progress, a write nested in another is dropped (not caching is always safe), and a
/// read that saw a write begin or happen in its midst counts as a miss. Without it, a nested
/// write could leave one socket's cookie beside another verdict's epoch, and an interrupted
/// read could see such a mix: a verdict vouched for under an epoch it was not made in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// Socket cookie; 0 (never a cookie) marks an empty slot.
    pub cookie: u64,
    /// [`PolicyState::epoch`] of the allowing verdict.
    pub epoch: u32,
    /// Write sequence: odd while a write is in progress.
    pub seq: u32,
    /// Expiry of the binding that allowed (`CLOCK_BOOTTIME` ns), 0 for none.
    pub expires_boot_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCacheEntry>() == 24);
// `seq` is the upper half of the 8-byte word at `epoch` (see `seq_write`).
const _: () = assert!(core::mem::offset_of!(FlowCacheEntry, epoch) == 8);
const _: () = assert!(core::mem::offset_of!(FlowCacheEntry, seq) == 12);

impl FlowCacheEntry {
    /// Whether this slot vouches for socket `cookie` now.
    #[inline(always)]
    pub fn vouches(&self, cookie: u64, state: &PolicyState, now_boot_ns: u64) -> bool {
        cookie != 0
            && self.cookie == cookie
            && self.seq & 1 == 0
            && state.generation != 0
            && self.epoch == state.epoch
            && (self.expires_boot_ns == 0 || now_boot_ns < self.expires_boot_ns)
    }

    /// Writes an allowing verdict for socket `cookie` into the slot at `e`, unless a write
    /// of that slot is in progress below this program (it then writes nothing). Returns
    /// whether it wrote. `between` runs in the middle of the write; the kernel programs pass
    /// nothing, the tests an interruption.
    ///
    /// # Safety
    /// `e` points to a valid slot that only programs of the calling CPU use.
    #[inline(always)]
    pub unsafe fn store_with(
        e: *mut Self,
        cookie: u64,
        epoch: u32,
        expires_boot_ns: u64,
        between: impl FnOnce(),
    ) -> bool {
        // SAFETY: the caller's contract; volatile accesses keep the program order, which is
        // all that a program interrupting this one on the same CPU can observe.
        unsafe {
            seq_write((&raw mut (*e).epoch).cast::<u64>(), || {
                core::ptr::write_volatile(&raw mut (*e).cookie, 0);
                core::ptr::write_volatile(&raw mut (*e).epoch, epoch);
                between();
                core::ptr::write_volatile(&raw mut (*e).expires_boot_ns, expires_boot_ns);
                core::ptr::write_volatile(&raw mut (*e).cookie, cookie);
            })
        }
    }

    /// Empties the slot at `e` if it holds socket `cookie`, as one guarded write; returns
    /// whether the slot no longer holds it. A clear that finds another write in progress does
    /// nothing: the kernel programs clear a socket's slot when its connect to a new destination
    /// was refused, which leaves the socket as it was, so its cached verdict still holds.
    ///
    /// # Safety
    /// As for [`Self::store_with`].
    #[inline(always)]
    pub unsafe fn clear(e: *mut Self, cookie: u64) -> bool {
        // SAFETY: the caller's contract.
        unsafe {
            core::ptr::read_volatile(&raw const (*e).cookie) != cookie
                || seq_write((&raw mut (*e).epoch).cast::<u64>(), || {
                    if core::ptr::read_volatile(&raw const (*e).cookie) == cookie {
                        core::ptr::write_volatile(&raw mut (*e).cookie, 0);
                    }
                })
        }
    }

    /// Reads the slot at `e` whole; `None` if a write was in progress when the read began or
    /// happened while it read. `between` as in [`Self::store_with`].
    ///
    /// # Safety
    /// As for [`Self::store_with`].
    #[inline(always)]
    pub unsafe fn load_with(e: *const Self, between: impl FnOnce()) -> Option<Self> {
        // SAFETY: the caller's contract.
        unsafe {
            seq_read(&raw const (*e).seq, |seq| {
                let cookie = core::ptr::read_volatile(&raw const (*e).cookie);
                between();
                Self {
                    cookie,
                    epoch: core::ptr::read_volatile(&raw const (*e).epoch),
                    seq,
                    expires_boot_ns: core::ptr::read_volatile(&raw const (*e).expires_boot_ns),
                }
            })
        }
    }
}

/// Runs `write` as one write of a sequence-guarded per-CPU slot. `word` is the slot's aligned
/// 8-byte word whose upper half (bytes 4..8, little-endian) is the sequence: odd while a write
/// is in progress. A write that finds the sequence odd interrupted another on the same CPU and
/// writes nothing (returns false): not caching is always safe. The sequence is made odd by a
/// compare-and-swap of the whole word, so that a program preempted between reading it and
/// making it odd (sock_addr programs run with migration, not preemption, disabled) cannot
/// claim a slot that another program wrote meanwhile, and so hand a reader that read across
/// both writes an unchanged sequence over a mix of the two.
///
/// # Safety
/// `word` points to that word of a valid slot that only programs of the calling CPU use.
#[inline(always)]
unsafe fn seq_write(word: *mut u64, write: impl FnOnce()) -> bool {
    // SAFETY: the caller's contract.
    unsafe { seq_write_claiming(word, || {}, write) }
}

/// [`seq_write`], with `claiming` run between the read of the sequence and the step that makes
/// it odd (the tests put another write there, as a preemption would).
///
/// # Safety
/// As for [`seq_write`].
#[inline(always)]
unsafe fn seq_write_claiming(
    word: *mut u64,
    claiming: impl FnOnce(),
    write: impl FnOnce(),
) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        let w = core::ptr::read_volatile(word);
        claiming();
        if (w >> 32) & 1 != 0 || !compare_and_swap(word, w, w + (1 << 32)) {
            return false;
        }
        write();
        core::ptr::write_volatile(
            word.cast::<u32>().add(1),
            ((w >> 32) as u32).wrapping_add(2),
        );
    }
    true
}

/// Writes `new` to `*word` if it holds `old`, in one atomic step; whether it did.
///
/// # Safety
/// `word` is valid and 8-aligned.
#[inline(always)]
unsafe fn compare_and_swap(word: *mut u64, old: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        let found: u64;
        // SAFETY: the caller's contract; the instruction reads and writes those 8 bytes only
        // (BPF_ATOMIC | BPF_CMPXCHG: r0 is the expected value in and the found value out).
        unsafe {
            core::arch::asm!(
                "r0 = cmpxchg_64({p} + 0, r0, {new})",
                p = in(reg) word,
                new = in(reg) new,
                inout("r0") old => found,
                options(nostack),
            );
        }
        found == old
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        // SAFETY: the caller's contract.
        let atomic = unsafe { core::sync::atomic::AtomicU64::from_ptr(word) };
        atomic
            .compare_exchange(
                old,
                new,
                core::sync::atomic::Ordering::SeqCst,
                core::sync::atomic::Ordering::SeqCst,
            )
            .is_ok()
    }
}

/// Runs `read` (given the sequence it reads under) as one read of a sequence-guarded slot
/// (see [`seq_write`]); `None` if a write was in progress when the read began or happened
/// while it read.
///
/// # Safety
/// As for [`seq_write`].
#[inline(always)]
unsafe fn seq_read<T>(seq: *const u32, read: impl FnOnce(u32) -> T) -> Option<T> {
    // SAFETY: the caller's contract.
    unsafe {
        let before = core::ptr::read_volatile(seq);
        if before & 1 != 0 {
            return None;
        }
        let value = read(before);
        let after = core::ptr::read_volatile(seq);
        (after == before).then_some(value)
    }
}

/// Slots of the per-CPU decision cache (a power of two): as few as keep the table in the CPU's
/// cache between two visits of a slot when flows to many destinations take turns (256 slots
/// had gone cold there: a miss on every decision), as many as the destinations an agent
/// calls. A flow whose slot another took is judged in full and takes the slot back.
pub const DECISION_CACHE_SLOTS: u32 = 128;

/// One slot of the per-CPU decision cache: a flow that the rules allowed, by who made it and
/// where it went (cgroup, destination as classified, port, protocol), with what the decision
/// found (slot, generation, rule) and the policy epoch it was made under. The decision function
/// asks it before the binding and rule lookups, so an agent that connects or sends to the same
/// destination again is judged from one per-CPU read while nothing has changed: the verdict is
/// a function of exactly these inputs and the maps, and every change to the maps that can take
/// a permission away bumps the epoch ([`PolicyState::epoch`]; the daemon bumps it after every
/// binding change and policy swap). Only verdicts of a rule are cached; a denial, or a flow let
/// through by audit mode, is judged in full every time. Kernel-only, sequence-guarded like
/// [`FlowCacheEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionCacheEntry {
    pub cgroup_id: u64,
    /// Destination as classified ([`crate::addr::classify_quads`]); the rules see this one.
    pub dst: Quads,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    /// Write sequence: odd while a write is in progress.
    pub seq: u32,
    /// [`PolicyState::epoch`] of the decision.
    pub epoch: u32,
    /// Rule generation of the decision.
    pub generation: u32,
    /// Identity slot the cgroup was bound to.
    pub slot: u32,
    /// Rule that allowed.
    pub rule_id: u32,
    /// Expiry of the binding that allowed (`CLOCK_BOOTTIME` ns), 0 for none.
    pub expires_boot_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DecisionCacheEntry>() == 56);
// `seq` is the upper half of the 8-byte word at `port` (see `seq_write`).
const _: () = assert!(core::mem::offset_of!(DecisionCacheEntry, port) == 24);
const _: () = assert!(core::mem::offset_of!(DecisionCacheEntry, seq) == 28);

impl DecisionCacheEntry {
    /// The slot index of a flow: a multiplicative hash of its key.
    #[inline(always)]
    pub fn index(cgroup_id: u64, dst: &Quads, port: u16, proto: u8) -> u32 {
        let h = (cgroup_id as u32)
            ^ ((cgroup_id >> 32) as u32)
            ^ dst[0]
            ^ dst[1].rotate_left(8)
            ^ dst[2].rotate_left(16)
            ^ dst[3].rotate_left(24)
            ^ (u32::from(port) << 8 | u32::from(proto));
        h.wrapping_mul(0x9e37_79b1) >> (32 - DECISION_CACHE_SLOTS.trailing_zeros())
    }

    /// Whether this slot holds the decision for this flow, valid under `state` at `now`.
    #[inline(always)]
    pub fn answers(
        &self,
        cgroup_id: u64,
        dst: &Quads,
        port: u16,
        proto: u8,
        state: &PolicyState,
        now_boot_ns: u64,
    ) -> bool {
        self.cgroup_id == cgroup_id
            && cgroup_id != 0
            && self.dst == *dst
            && self.port == port
            && self.proto == proto
            && self.seq & 1 == 0
            && state.generation != 0
            && self.generation == state.generation
            && self.epoch == state.epoch
            && (self.expires_boot_ns == 0 || now_boot_ns < self.expires_boot_ns)
    }

    /// Writes `value` into the slot at `e` (its `seq` is ignored), unless a write of that slot
    /// is in progress below this program (it then writes nothing). Returns whether it wrote.
    /// `between` as in [`FlowCacheEntry::store_with`].
    ///
    /// # Safety
    /// `e` points to a valid slot that only programs of the calling CPU use.
    #[inline(always)]
    pub unsafe fn store_with(e: *mut Self, value: &Self, between: impl FnOnce()) -> bool {
        // SAFETY: the caller's contract; volatile accesses keep the program order.
        unsafe {
            seq_write((&raw mut (*e).port).cast::<u64>(), || {
                core::ptr::write_volatile(&raw mut (*e).cgroup_id, value.cgroup_id);
                core::ptr::write_volatile(&raw mut (*e).dst, value.dst);
                core::ptr::write_volatile(&raw mut (*e).port, value.port);
                core::ptr::write_volatile(&raw mut (*e).proto, value.proto);
                between();
                core::ptr::write_volatile(&raw mut (*e).epoch, value.epoch);
                core::ptr::write_volatile(&raw mut (*e).generation, value.generation);
                core::ptr::write_volatile(&raw mut (*e).slot, value.slot);
                core::ptr::write_volatile(&raw mut (*e).rule_id, value.rule_id);
                core::ptr::write_volatile(&raw mut (*e).expires_boot_ns, value.expires_boot_ns);
            })
        }
    }

    /// Reads the slot at `e` whole; `None` if a write was in progress when the read began or
    /// happened while it read. `between` as in [`Self::store_with`].
    ///
    /// # Safety
    /// As for [`Self::store_with`].
    #[inline(always)]
    pub unsafe fn load_with(e: *const Self, between: impl FnOnce()) -> Option<Self> {
        // SAFETY: the caller's contract.
        unsafe {
            seq_read(&raw const (*e).seq, |seq| {
                let cgroup_id = core::ptr::read_volatile(&raw const (*e).cgroup_id);
                let dst = core::ptr::read_volatile(&raw const (*e).dst);
                between();
                Self {
                    cgroup_id,
                    dst,
                    port: core::ptr::read_volatile(&raw const (*e).port),
                    proto: core::ptr::read_volatile(&raw const (*e).proto),
                    _pad: 0,
                    seq,
                    epoch: core::ptr::read_volatile(&raw const (*e).epoch),
                    generation: core::ptr::read_volatile(&raw const (*e).generation),
                    slot: core::ptr::read_volatile(&raw const (*e).slot),
                    rule_id: core::ptr::read_volatile(&raw const (*e).rule_id),
                    expires_boot_ns: core::ptr::read_volatile(&raw const (*e).expires_boot_ns),
                }
            })
        }
    }
}

/// Slots of the per-CPU binding cache (a power of two).
pub const BINDING_CACHE_SLOTS: u32 = 16;

/// One slot of the per-CPU binding cache: a copy of a cgroup's binding, with the policy epoch
/// it was read under. A decision that the decision cache cannot answer (a destination not
/// judged lately) reads the binding from here instead of the bindings hash map while the epoch
/// holds: the daemon bumps the epoch after every binding change, so a copy never outlives one
/// by more than a cached decision does. A cgroup without a binding is not cached (it is
/// looked up, and denied, every time). Kernel-only, sequence-guarded like
/// [`FlowCacheEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingCacheEntry {
    pub cgroup_id: u64,
    /// [`PolicyState::epoch`] read before the binding was.
    pub epoch: u32,
    /// Write sequence: odd while a write is in progress.
    pub seq: u32,
    pub binding: Binding,
}
const _: () = assert!(core::mem::size_of::<BindingCacheEntry>() == 32);
// `seq` is the upper half of the 8-byte word at `epoch` (see `seq_write`).
const _: () = assert!(core::mem::offset_of!(BindingCacheEntry, epoch) == 8);
const _: () = assert!(core::mem::offset_of!(BindingCacheEntry, seq) == 12);

impl BindingCacheEntry {
    /// The slot index of a cgroup.
    #[inline(always)]
    pub fn index(cgroup_id: u64) -> u32 {
        let h = (cgroup_id as u32) ^ ((cgroup_id >> 32) as u32);
        h.wrapping_mul(0x9e37_79b1) >> (32 - BINDING_CACHE_SLOTS.trailing_zeros())
    }

    /// The binding of `cgroup_id` this slot holds, if it was read under `epoch`.
    #[inline(always)]
    pub fn binding_of(&self, cgroup_id: u64, epoch: u32) -> Option<Binding> {
        (cgroup_id != 0 && self.cgroup_id == cgroup_id && self.epoch == epoch && self.seq & 1 == 0)
            .then_some(self.binding)
    }

    /// Writes `value` into the slot at `e` (its `seq` is ignored), unless a write of that slot
    /// is in progress below this program. Returns whether it wrote. `between` as in
    /// [`FlowCacheEntry::store_with`].
    ///
    /// # Safety
    /// `e` points to a valid slot that only programs of the calling CPU use.
    #[inline(always)]
    pub unsafe fn store_with(e: *mut Self, value: &Self, between: impl FnOnce()) -> bool {
        // SAFETY: the caller's contract; volatile accesses keep the program order.
        unsafe {
            seq_write((&raw mut (*e).epoch).cast::<u64>(), || {
                core::ptr::write_volatile(&raw mut (*e).cgroup_id, value.cgroup_id);
                between();
                core::ptr::write_volatile(&raw mut (*e).epoch, value.epoch);
                core::ptr::write_volatile(&raw mut (*e).binding, value.binding);
            })
        }
    }

    /// Reads the slot at `e` whole; `None` if a write was in progress when the read began or
    /// happened while it read. `between` as in [`Self::store_with`].
    ///
    /// # Safety
    /// As for [`Self::store_with`].
    #[inline(always)]
    pub unsafe fn load_with(e: *const Self, between: impl FnOnce()) -> Option<Self> {
        // SAFETY: the caller's contract.
        unsafe {
            seq_read(&raw const (*e).seq, |seq| {
                let cgroup_id = core::ptr::read_volatile(&raw const (*e).cgroup_id);
                between();
                Self {
                    cgroup_id,
                    epoch: core::ptr::read_volatile(&raw const (*e).epoch),
                    seq,
                    binding: core::ptr::read_volatile(&raw const (*e).binding),
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_from_one_word_and_the_epoch_skips_zero() {
        let s = PolicyState {
            generation: 7,
            epoch: 0xdead_beef,
        };
        // SAFETY: `PolicyState` is 8 plain bytes.
        let word: u64 = unsafe { core::mem::transmute(s) };
        assert_eq!(PolicyState::from_word(word), s);
        assert_eq!(PolicyState::next_epoch(5), 6);
        assert_eq!(PolicyState::next_epoch(u32::MAX), 1);
    }

    #[test]
    fn cached_verdicts_die_with_the_epoch_the_binding_and_the_socket() {
        let state = PolicyState {
            generation: 3,
            epoch: 9,
        };
        let e = FlowCacheEntry {
            cookie: 42,
            epoch: 9,
            seq: 0,
            expires_boot_ns: 0,
        };
        assert!(e.vouches(42, &state, u64::MAX));
        assert!(!e.vouches(43, &state, 0), "another socket");
        assert!(!e.vouches(0, &state, 0), "no socket");
        assert!(
            !FlowCacheEntry { cookie: 0, ..e }.vouches(0, &state, 0),
            "empty slot"
        );
        assert!(
            !e.vouches(42, &PolicyState { epoch: 10, ..state }, 0),
            "something changed"
        );
        assert!(
            !e.vouches(
                42,
                &PolicyState {
                    generation: 0,
                    ..state
                },
                0
            ),
            "no policy"
        );
        let x = FlowCacheEntry {
            expires_boot_ns: 100,
            ..e
        };
        assert!(x.vouches(42, &state, 99));
        assert!(!x.vouches(42, &state, 100), "expired binding");
    }
    const STATE: PolicyState = PolicyState {
        generation: 3,
        epoch: 6,
    };

    #[test]
    fn a_write_nested_in_another_is_dropped_and_the_outer_one_lands_whole() {
        let mut slot = FlowCacheEntry::default();
        let e: *mut FlowCacheEntry = &raw mut slot;
        // Socket 7, judged under epoch 5, is being written when a softirq judges socket 9
        // under epoch 6 and tries to cache it in the same slot.
        let mut inner = None;
        // SAFETY: `e` points to `slot`, used by nothing else meanwhile.
        let outer = unsafe {
            FlowCacheEntry::store_with(e, 7, 5, 0, || {
                inner = Some(FlowCacheEntry::store_with(e, 9, 6, 0, || {}));
            })
        };
        assert!(outer);
        assert_eq!(inner, Some(false), "the nested write is refused");
        // SAFETY: as above.
        let got = unsafe { FlowCacheEntry::load_with(e, || {}) }.expect("a quiet slot reads");
        assert_eq!(
            (got.cookie, got.epoch),
            (7, 5),
            "no mix of the two verdicts"
        );
        assert!(
            !got.vouches(7, &STATE, 0),
            "socket 7's verdict is from epoch 5, not the current 6"
        );
        assert!(!got.vouches(9, &STATE, 0));
    }

    #[test]
    fn a_read_that_a_write_interrupts_or_that_interrupts_a_write_misses() {
        let mut slot = FlowCacheEntry::default();
        let e: *mut FlowCacheEntry = &raw mut slot;
        // SAFETY: `e` points to `slot`, used by nothing else meanwhile.
        unsafe {
            assert!(FlowCacheEntry::store_with(e, 7, 5, 0, || {}));
            // A write lands between the read's loads of the cookie and of the epoch.
            let torn = FlowCacheEntry::load_with(e, || {
                assert!(FlowCacheEntry::store_with(e, 9, 6, 0, || {}));
            });
            assert_eq!(torn, None, "a read across a write is a miss");
            // A read nested in a write sees it in progress.
            let mut nested = Some(FlowCacheEntry::default());
            assert!(FlowCacheEntry::store_with(e, 11, 6, 0, || {
                nested = FlowCacheEntry::load_with(e, || {});
            }));
            assert_eq!(nested, None, "a read inside a write is a miss");
            let got = FlowCacheEntry::load_with(e, || {}).expect("quiet again");
            assert!(got.vouches(11, &STATE, 0));
            // Emptied for its socket only, and a read across the emptying misses.
            assert!(
                FlowCacheEntry::clear(e, 12),
                "not its socket: nothing to do"
            );
            assert!(
                FlowCacheEntry::load_with(e, || {})
                    .unwrap()
                    .vouches(11, &STATE, 0)
            );
            let across = FlowCacheEntry::load_with(e, || {
                assert!(FlowCacheEntry::clear(e, 11));
            });
            assert_eq!(across, None);
            assert!(
                !FlowCacheEntry::load_with(e, || {})
                    .unwrap()
                    .vouches(11, &STATE, 0)
            );
        }
    }

    fn decision() -> DecisionCacheEntry {
        DecisionCacheEntry {
            cgroup_id: 77,
            dst: crate::addr::quads_from_v4(u32::from_ne_bytes([10, 1, 2, 3])),
            port: 443,
            proto: crate::rules::proto::TCP,
            _pad: 0,
            seq: 0,
            epoch: STATE.epoch,
            generation: STATE.generation,
            slot: 4,
            rule_id: 12,
            expires_boot_ns: 0,
        }
    }

    fn answers(e: &DecisionCacheEntry, state: &PolicyState, now: u64) -> bool {
        let d = decision();
        e.answers(d.cgroup_id, &d.dst, d.port, d.proto, state, now)
    }

    #[test]
    fn a_cached_decision_answers_only_its_own_flow_under_the_state_it_was_made_in() {
        let e = decision();
        assert!(answers(&e, &STATE, 0));
        let other_flows = [
            DecisionCacheEntry { cgroup_id: 78, ..e },
            DecisionCacheEntry {
                dst: crate::addr::quads_from_v4(u32::from_ne_bytes([10, 1, 2, 4])),
                ..e
            },
            DecisionCacheEntry { port: 444, ..e },
            DecisionCacheEntry {
                proto: crate::rules::proto::UDP,
                ..e
            },
        ];
        for o in other_flows {
            assert!(!answers(&o, &STATE, 0), "{o:?}");
        }
        assert!(
            !e.answers(0, &e.dst, e.port, e.proto, &STATE, 0),
            "no cgroup, no answer"
        );
        let bumped = PolicyState {
            epoch: STATE.epoch + 1,
            ..STATE
        };
        assert!(!answers(&e, &bumped, 0), "a binding changed since");
        let swapped = PolicyState {
            generation: STATE.generation + 1,
            ..STATE
        };
        assert!(!answers(&e, &swapped, 0), "another policy generation");
        let none = PolicyState {
            generation: 0,
            ..STATE
        };
        assert!(
            !answers(&DecisionCacheEntry { generation: 0, ..e }, &none, 0),
            "no policy"
        );
        assert!(
            !answers(&DecisionCacheEntry { seq: 1, ..e }, &STATE, 0),
            "half written"
        );
        let expiring = DecisionCacheEntry {
            expires_boot_ns: 100,
            ..e
        };
        assert!(answers(&expiring, &STATE, 99));
        assert!(!answers(&expiring, &STATE, 100), "the binding expired");
    }

    #[test]
    fn decision_slots_are_written_and_read_whole_or_not_at_all() {
        let mut slot = DecisionCacheEntry::default();
        let e: *mut DecisionCacheEntry = &raw mut slot;
        let first = decision();
        let second = DecisionCacheEntry {
            port: 8443,
            rule_id: 13,
            ..first
        };
        // SAFETY: `e` points to `slot`, used by nothing else meanwhile.
        unsafe {
            let mut inner = None;
            let outer = DecisionCacheEntry::store_with(e, &first, || {
                inner = Some(DecisionCacheEntry::store_with(e, &second, || {}));
            });
            assert!(outer);
            assert_eq!(inner, Some(false), "the nested write is refused");
            let got = DecisionCacheEntry::load_with(e, || {}).expect("a quiet slot reads");
            assert_eq!(
                got,
                DecisionCacheEntry {
                    seq: got.seq,
                    ..first
                },
                "no mix"
            );
            assert!(answers(&got, &STATE, 0));
            let torn = DecisionCacheEntry::load_with(e, || {
                assert!(DecisionCacheEntry::store_with(e, &second, || {}));
            });
            assert_eq!(torn, None, "a read across a write is a miss");
            let mut nested = Some(DecisionCacheEntry::default());
            assert!(DecisionCacheEntry::store_with(e, &first, || {
                nested = DecisionCacheEntry::load_with(e, || {});
            }));
            assert_eq!(nested, None, "a read inside a write is a miss");
        }
    }

    #[test]
    fn decision_slots_spread_flows_over_the_whole_cache() {
        let d = decision();
        let mut seen = [false; DECISION_CACHE_SLOTS as usize];
        for cgroup in 1..64u64 {
            for port in [53, 80, 443, 8443] {
                let i = DecisionCacheEntry::index(cgroup << 12, &d.dst, port, d.proto);
                assert!(i < DECISION_CACHE_SLOTS);
                seen[i as usize] = true;
            }
        }
        let used = seen.iter().filter(|s| **s).count();
        assert!(
            used > DECISION_CACHE_SLOTS as usize / 2,
            "{used} slots for 252 flows"
        );
    }

    #[test]
    fn a_cached_binding_serves_its_cgroup_under_its_epoch_and_is_written_whole() {
        let b = Binding {
            slot: 3,
            flags: crate::binding::flags::AUDIT,
            expires_boot_ns: 500,
        };
        let first = BindingCacheEntry {
            cgroup_id: 91,
            epoch: 6,
            seq: 0,
            binding: b,
        };
        assert_eq!(first.binding_of(91, 6), Some(b));
        assert_eq!(first.binding_of(92, 6), None, "another cgroup");
        assert_eq!(first.binding_of(91, 7), None, "a binding changed since");
        assert_eq!(
            BindingCacheEntry {
                cgroup_id: 0,
                ..first
            }
            .binding_of(0, 6),
            None
        );
        assert!(BindingCacheEntry::index(u64::MAX) < BINDING_CACHE_SLOTS);
        let mut slot = BindingCacheEntry::default();
        let e: *mut BindingCacheEntry = &raw mut slot;
        let second = BindingCacheEntry {
            cgroup_id: 92,
            ..first
        };
        // SAFETY: `e` points to `slot`, used by nothing else meanwhile.
        unsafe {
            let mut inner = None;
            assert!(BindingCacheEntry::store_with(e, &first, || {
                inner = Some(BindingCacheEntry::store_with(e, &second, || {}));
            }));
            assert_eq!(inner, Some(false), "the nested write is refused");
            let got = BindingCacheEntry::load_with(e, || {}).expect("a quiet slot reads");
            assert_eq!(got.binding_of(91, 6), Some(b), "no mix");
            let torn = BindingCacheEntry::load_with(e, || {
                assert!(BindingCacheEntry::store_with(e, &second, || {}));
            });
            assert_eq!(torn, None, "a read across a write is a miss");
        }
    }

    #[test]
    fn a_write_that_lost_its_slot_before_claiming_it_writes_nothing() {
        // A program read the sequence, was preempted, and another program wrote the slot
        // whole meanwhile: the first must not write over it, or a reader that read across
        // both writes would find the sequence where it left it over a mix of the two.
        let mut slot = FlowCacheEntry::default();
        let e: *mut FlowCacheEntry = &raw mut slot;
        // SAFETY: `e` points to `slot`, used by nothing else meanwhile.
        unsafe {
            let word = (&raw mut (*e).epoch).cast::<u64>();
            let lost = seq_write_claiming(
                word,
                || assert!(FlowCacheEntry::store_with(e, 9, 6, 0, || {})),
                || panic!("the write that lost the slot must not run"),
            );
            assert!(!lost);
            let got = FlowCacheEntry::load_with(e, || {}).expect("the slot is quiet");
            assert_eq!((got.cookie, got.epoch, got.seq), (9, 6, 2));
            // A clear that meets a write in progress (odd sequence) leaves the slot to it.
            (*e).seq = 3;
            assert!(!FlowCacheEntry::clear(e, 9));
            assert_eq!((*e).cookie, 9);
        }
    }
}
