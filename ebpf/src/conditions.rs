//! Conditions of rules: rate limits (`agentwall_common::rules::Limit`), a token bucket per
//! identity slot and rule, taken from by connects and addressed sends the rule allows; and
//! time windows (`agentwall_common::rules::WindowSpans`), compared with the boot clock.
//!
//! A bucket is one word, its theoretical arrival time, updated by compare-and-exchange so
//! that two CPUs using the same bucket at once cannot both take its last token
//! (`Limit::take`). A bucket that stays contended through every attempt denies: the limit
//! holds under any load.

use agentwall_common::{
    counters,
    maps::{DEFAULT_MAX_LIMITS, DEFAULT_MAX_RATE_BUCKETS, DEFAULT_MAX_WINDOWS},
    rules::{Limit, Taken, WindowSpans},
};
use aya_ebpf::{macros::map, maps::HashMap};

use crate::{decide, emit};

/// Flag for maps whose entries are freed under RCU: an entry a program holds is never reused
/// for another key while it runs, and a replaced value is a new entry, never a torn one.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static AW_LIMITS: HashMap<u64, Limit> = HashMap::pinned(DEFAULT_MAX_LIMITS, BPF_F_NO_PREALLOC);

#[map]
static AW_RATE_BUCKETS: HashMap<u64, u64> =
    HashMap::pinned(DEFAULT_MAX_RATE_BUCKETS, BPF_F_NO_PREALLOC);

#[map]
static AW_WINDOWS: HashMap<u64, WindowSpans> =
    HashMap::pinned(DEFAULT_MAX_WINDOWS, BPF_F_NO_PREALLOC);

/// Until when (boot clock) the window of rule `rule_id` of `generation` is open: `Some(None)`
/// if it is closed now, `None` if its spans are missing (counted; the caller denies).
#[inline(always)]
pub(crate) fn window_until(generation: u32, rule_id: u32) -> Option<Option<u64>> {
    // SAFETY: entries are freed under RCU (see above) and copied at once.
    let Some(w) = (unsafe { AW_WINDOWS.get(Limit::key(generation, rule_id)) }).copied() else {
        emit::count(counters::CONDITION_ERRORS);
        return None;
    };
    let until = w.open_until(decide::now_boot_ns());
    if until.is_none() {
        emit::count(counters::OUTSIDE_WINDOW);
    }
    Some(until)
}

/// Attempts at a contended bucket before the use is denied.
const ATTEMPTS: u32 = 4;

/// Takes a token for rule `rule_id` of `generation` from the bucket of identity `slot`.
/// `None` if the limit or the bucket is missing, or the bucket stayed contended.
#[inline(always)]
pub(crate) fn take(generation: u32, slot: u32, rule_id: u32) -> Option<bool> {
    // SAFETY: the limits map is preallocated and read once; the daemon replaces entries only
    // of generations not yet (or no longer) in force.
    let Some(limit) = (unsafe { AW_LIMITS.get(Limit::key(generation, rule_id)) }).copied() else {
        emit::count(counters::CONDITION_ERRORS);
        return None;
    };
    let Some(bucket) = AW_RATE_BUCKETS.get_ptr_mut(limit.bucket_key(slot)) else {
        emit::count(counters::CONDITION_ERRORS);
        return None;
    };
    let taken = limit.take(
        decide::now_boot_ns(),
        ATTEMPTS,
        // SAFETY: `bucket` is an 8-aligned value of the map, valid for the program's run.
        || unsafe { core::ptr::read_volatile(bucket) },
        |expected, new| cmpxchg(bucket, expected, new),
    );
    match taken {
        Taken::Granted => Some(true),
        Taken::Over => {
            emit::count(counters::RATE_LIMITED);
            Some(false)
        }
        Taken::Contended => {
            emit::count(counters::CONDITION_ERRORS);
            None
        }
    }
}

/// Writes `new` to the u64 at `p` if it holds `expected`; returns what it held.
#[inline(always)]
fn cmpxchg(p: *mut u64, expected: u64, new: u64) -> u64 {
    let old: u64;
    // The BPF target offers no compare-and-swap through core: the instruction itself (BPF
    // atomics, kernel 5.12 and later). It compares with and returns in r0.
    // SAFETY: `p` points to an 8-aligned u64 in a map value, valid for the program's run;
    // the instruction reads and writes those 8 bytes only.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") expected => old,
            options(nostack),
        );
    }
    old
}
