//! Event budgets (`agentwall_common::budget`): whether a verdict's record is written, or
//! counted into a summary.

use agentwall_common::{
    budget::{self, Bucket, BudgetConfig, Rate, Summary, SummaryKey},
    event::Verdict,
    maps::{DEFAULT_MAX_ALLOWED_SUMMARIES, DEFAULT_MAX_BINDINGS, DEFAULT_MAX_SUMMARIES},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};

use crate::decide::{Decision, Flow};

/// `bpf_map_update_elem` flag: only create.
const BPF_NOEXIST: u64 = 1;
/// Map flag: entries allocated on insert and freed under RCU.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static AW_BUDGET_CFG: Array<BudgetConfig> = Array::pinned(1, 0);

/// Cgroup and identity buckets, for allowed and denied verdicts apart: at most two per
/// binding and two per policy slot, and the unbound one; the daemon sizes it to four times
/// the bindings.
#[map]
static AW_BUDGETS: LruHashMap<u64, Bucket> = LruHashMap::pinned(DEFAULT_MAX_BINDINGS * 4, 0);

/// Denied flows held back: the oldest make room for new ones (their counts stay in the
/// buckets' totals).
#[map]
static AW_SUMMARIES: LruHashMap<SummaryKey, Summary> = LruHashMap::pinned(DEFAULT_MAX_SUMMARIES, 0);

/// Allowed flows held back: each is a destination an agent reached, so none is evicted (a
/// flood of denials cannot push one out); when full, a verdict is recorded instead. Freed
/// under RCU, so that a program still adding to an entry the daemon just took never writes
/// into another flow's.
#[map]
static AW_ALLOWED_SUMMARIES: HashMap<SummaryKey, Summary> =
    HashMap::pinned(DEFAULT_MAX_ALLOWED_SUMMARIES, BPF_F_NO_PREALLOC);

/// Adds `n` to the u64 at `p` with the BPF atomic add (see `emit::count`).
#[inline(always)]
fn atomic_add(p: *mut u64, n: u64) {
    // SAFETY: `p` points to an 8-aligned u64 in a map value, valid for the program's run;
    // the instruction reads and writes those 8 bytes only.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {n}",
            p = in(reg) p,
            n = in(reg) n,
            options(nostack),
        );
    }
}

/// Takes one record from the bucket `key` at `now`: `Ok` if it conforms, with the bucket and
/// its new arrival time if the bucket existed (a new one is made, and the record let
/// through); `Err` with the bucket if it is over budget.
#[inline(always)]
fn take(key: u64, rate: &Rate, now: u64) -> Result<Option<(*mut Bucket, u64)>, *mut Bucket> {
    let Some(b) = AW_BUDGETS.get_ptr_mut(key) else {
        let fresh = Bucket {
            tat_ns: now + rate.interval_ns,
            suppressed: 0,
        };
        // A full LRU map makes room; a failure leaves the bucket for the next record.
        let _ = AW_BUDGETS.insert(key, fresh, BPF_NOEXIST);
        return Ok(None);
    };
    // SAFETY: a value of the map, valid for the program's run; another CPU may write the
    // same word meanwhile (see `agentwall_common::budget`), so it is read and written whole.
    unsafe {
        let tat = core::ptr::read_volatile(&raw const (*b).tat_ns);
        match rate.take(tat, now) {
            Some(next) => {
                core::ptr::write_volatile(&raw mut (*b).tat_ns, next);
                Ok(Some((b, next)))
            }
            None => Err(b),
        }
    }
}

/// Whether the record of verdict `d` on `flow` at `now` is written. If not, the verdict is
/// counted in its cgroup's bucket and in the summaries, and `false` is returned.
#[inline(always)]
pub(crate) fn admit(flow: &Flow, d: &Decision, now: u64) -> bool {
    let Some(cfg) = AW_BUDGET_CFG.get_ptr(0) else {
        return true;
    };
    // SAFETY: the array's only entry, written whole by the daemon before any program is
    // attached and not changed afterwards.
    let cfg = unsafe { *cfg };
    if cfg.cgroup.interval_ns == 0 {
        return true;
    }
    let allowed = d.verdict == Verdict::ALLOW;
    let key = if budget::unbound(d.reason) {
        budget::UNBOUND_KEY
    } else {
        budget::cgroup_key(flow.cgroup_id, allowed)
    };
    let bucket = match take(key, &cfg.cgroup, now) {
        Ok(None) => return true,
        Ok(Some((bucket, tat))) => {
            // A quiet cgroup is not charged to its identity (see `Rate::quiet`).
            if d.slot == 0 || cfg.identity.interval_ns == 0 || cfg.cgroup.quiet(tat, now) {
                return true;
            }
            match take(budget::identity_key(d.slot, allowed), &cfg.identity, now) {
                Ok(_) => return true,
                Err(_) => bucket,
            }
        }
        Err(bucket) => bucket,
    };
    // The flow first, then the total, which the daemon reads before the flows: a window's
    // flows then hold every verdict its total counts (but those a full table evicted). An
    // allowed flow the table cannot keep is recorded after all.
    if !summarize(flow, d, now) {
        return true;
    }
    // SAFETY: as in `take`.
    atomic_add(unsafe { &raw mut (*bucket).suppressed }, 1);
    false
}

/// Counts a verdict held back into its entry of `$map` at `$now`; whether it was kept (an
/// LRU map always makes room; a hash map that is full does not).
macro_rules! count_into {
    ($map:expr, $key:expr, $now:expr) => {{
        if let Some(s) = $map.get_ptr_mut($key) {
            // SAFETY: a value of the map, valid for the program's run.
            unsafe {
                atomic_add(&raw mut (*s).count, 1);
                core::ptr::write_volatile(&raw mut (*s).last_ns, $now);
            }
            true
        } else {
            let fresh = Summary {
                count: 1,
                first_ns: $now,
                last_ns: $now,
            };
            if $map.insert($key, fresh, BPF_NOEXIST).is_ok() {
                true
            } else if let Some(s) = $map.get_ptr_mut($key) {
                // Another CPU made it meanwhile: add to its count.
                // SAFETY: as above.
                unsafe {
                    atomic_add(&raw mut (*s).count, 1);
                    core::ptr::write_volatile(&raw mut (*s).last_ns, $now);
                }
                true
            } else {
                false
            }
        }
    }};
}

/// Counts a verdict held back into its summary; `false` if it could not be kept (the table
/// of allowed flows is full), and its record is then written after all.
#[inline(always)]
fn summarize(flow: &Flow, d: &Decision, now: u64) -> bool {
    let key = SummaryKey {
        cgroup_id: flow.cgroup_id,
        // On the Unix hooks, the first bytes of the name (see `unix::judge`).
        addr: agentwall_common::addr::from_quads(flow.dst),
        port: flow.port,
        hook: flow.hook,
        proto: flow.proto,
        verdict: d.verdict,
        reason: d.reason,
        family: flow.family,
        _pad: 0,
        slot: d.slot,
        _pad2: 0,
    };
    if d.verdict == Verdict::ALLOW {
        count_into!(AW_ALLOWED_SUMMARIES, key, now)
    } else {
        count_into!(AW_SUMMARIES, key, now)
    }
}
