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
    /// is trusted only while its epoch is the current one.
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyState>() == 8);

/// Slots of the per-CPU flow verdict cache (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 1024;

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
            let seq = core::ptr::read_volatile(&raw const (*e).seq);
            if seq & 1 != 0 {
                return false;
            }
            core::ptr::write_volatile(&raw mut (*e).seq, seq.wrapping_add(1));
            core::ptr::write_volatile(&raw mut (*e).cookie, 0);
            core::ptr::write_volatile(&raw mut (*e).epoch, epoch);
            between();
            core::ptr::write_volatile(&raw mut (*e).expires_boot_ns, expires_boot_ns);
            core::ptr::write_volatile(&raw mut (*e).cookie, cookie);
            core::ptr::write_volatile(&raw mut (*e).seq, seq.wrapping_add(2));
        }
        true
    }

    /// Empties the slot at `e` if it holds socket `cookie`.
    ///
    /// # Safety
    /// As for [`Self::store_with`].
    #[inline(always)]
    pub unsafe fn clear(e: *mut Self, cookie: u64) {
        // SAFETY: the caller's contract. One store empties the slot; the sequence moves on
        // (parity kept) so that a read this interrupted sees a change.
        unsafe {
            if core::ptr::read_volatile(&raw const (*e).cookie) == cookie {
                core::ptr::write_volatile(&raw mut (*e).cookie, 0);
                let seq = core::ptr::read_volatile(&raw const (*e).seq);
                core::ptr::write_volatile(&raw mut (*e).seq, seq.wrapping_add(2));
            }
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
            let before = core::ptr::read_volatile(&raw const (*e).seq);
            if before & 1 != 0 {
                return None;
            }
            let cookie = core::ptr::read_volatile(&raw const (*e).cookie);
            between();
            let epoch = core::ptr::read_volatile(&raw const (*e).epoch);
            let expires_boot_ns = core::ptr::read_volatile(&raw const (*e).expires_boot_ns);
            let after = core::ptr::read_volatile(&raw const (*e).seq);
            (after == before).then_some(Self {
                cookie,
                epoch,
                seq: before,
                expires_boot_ns,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            FlowCacheEntry::clear(e, 12);
            assert!(
                FlowCacheEntry::load_with(e, || {})
                    .unwrap()
                    .vouches(11, &STATE, 0)
            );
            let across = FlowCacheEntry::load_with(e, || FlowCacheEntry::clear(e, 11));
            assert_eq!(across, None);
            assert!(
                !FlowCacheEntry::load_with(e, || {})
                    .unwrap()
                    .vouches(11, &STATE, 0)
            );
        }
    }
}
