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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// Socket cookie; 0 (never a cookie) marks an empty or half-written slot.
    pub cookie: u64,
    /// [`PolicyState::epoch`] of the allowing verdict.
    pub epoch: u32,
    pub _pad: u32,
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
            && state.generation != 0
            && self.epoch == state.epoch
            && (self.expires_boot_ns == 0 || now_boot_ns < self.expires_boot_ns)
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
            _pad: 0,
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
}
