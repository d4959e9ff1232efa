//! The per-CPU flow verdict cache.
//!
//! A socket with one destination for all its packets (a connected socket) that was allowed
//! is remembered by its cookie, with the policy epoch of the verdict; the egress backstop then
//! passes its packets after three cheap reads instead of a full decision. The daemon bumps
//! the epoch after any change that can take a permission away, so a quarantine, a revocation,
//! an unbinding or a new policy generation sends the next packet of every flow through the
//! full decision again. Per-CPU slots need no allocation and no lock: only programs on the
//! same CPU touch a slot, and the slot's write sequence makes a program that interrupts
//! another on that CPU (a softirq's egress inside a connect) miss rather than see a mix or
//! make one (`FlowCacheEntry`).

use agentwall_common::state::{FLOW_CACHE_SLOTS, FlowCacheEntry};
use aya_ebpf::{helpers::generated::bpf_get_socket_cookie, macros::map, maps::PerCpuArray};

use crate::decide::{self, Decision};

#[map]
static AW_FLOWS: PerCpuArray<FlowCacheEntry> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The socket cookie of a program context (`bpf_get_socket_cookie`); 0 without a socket.
#[inline(always)]
pub(crate) fn cookie(ctx: *mut core::ffi::c_void) -> u64 {
    // SAFETY: `ctx` is the program's own context (sock_addr or skb), as the helper requires.
    unsafe { bpf_get_socket_cookie(ctx) }
}

#[inline(always)]
fn slot(cookie: u64) -> Option<*mut FlowCacheEntry> {
    AW_FLOWS.get_ptr_mut((cookie as u32) & (FLOW_CACHE_SLOTS - 1))
}

/// Remembers that the flow of socket `cookie` was allowed by `d` (unless this program
/// interrupted a write of the same slot: then nothing is cached).
#[inline(always)]
pub(crate) fn remember(cookie: u64, d: &Decision) {
    if cookie == 0 {
        return;
    }
    if let Some(e) = slot(cookie) {
        // SAFETY: this CPU's slot (see `FlowCacheEntry` for the nesting protocol).
        unsafe { FlowCacheEntry::store_with(e, cookie, d.epoch, d.expires_boot_ns, || {}) };
    }
}

/// Forgets socket `cookie` (its connect to a new destination was denied).
#[inline(always)]
pub(crate) fn forget(cookie: u64) {
    if cookie == 0 {
        return;
    }
    if let Some(e) = slot(cookie) {
        // SAFETY: this CPU's slot.
        let _ = unsafe { FlowCacheEntry::clear(e, cookie) };
    }
}

/// Whether the cache vouches for a packet of socket `cookie` now.
#[inline(always)]
pub(crate) fn vouches(cookie: u64) -> bool {
    if cookie == 0 {
        return false;
    }
    let (Some(e), Some(state)) = (slot(cookie), decide::state()) else {
        return false;
    };
    // SAFETY: this CPU's slot; a read that a write interrupted is a miss.
    let Some(entry) = (unsafe { FlowCacheEntry::load_with(e, || {}) }) else {
        return false;
    };
    // The clock is read only for a binding that can expire.
    let now = if entry.expires_boot_ns == 0 {
        0
    } else {
        decide::now_boot_ns()
    };
    entry.vouches(cookie, &state, now)
}
