//! Events and counters.

use agentwall_common::{
    counters,
    event::{Event, Reason, Verdict},
    maps::DEFAULT_EVENT_RING_BYTES,
};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_boot_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};

use crate::decide::{Decision, Flow};

/// Flags of `bpf_ringbuf_submit` (include/uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// Neither flag: the kernel wakes the reader only if it consumed every earlier record.
const BPF_RB_ADAPTIVE_WAKEUP: u64 = 0;
/// A CPU forces a wakeup for a denial at most this often; between those, the kernel's
/// adaptive rule decides.
const FORCE_WAKEUP_EVERY_NS: u64 = 1_000_000;

#[map]
static AW_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

#[map]
static AW_EVENTS: RingBuf = RingBuf::pinned(DEFAULT_EVENT_RING_BYTES, 0);

/// Per CPU: when it last forced a wakeup of the reader (boot clock, ns).
#[map]
static AW_WAKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The wakeup flag for a denial. A reader that consumed everything before it sleeps, so the
/// adaptive rule wakes it; one that has allowed verdicts waiting (written without a wakeup)
/// may sleep too, so a forced wakeup goes out, but at most once a millisecond per CPU: a
/// flood of denials costs no interrupt per event while the reader works through it.
#[inline(always)]
fn denial_wakeup(now: u64) -> u64 {
    let Some(last) = AW_WAKE.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP;
    };
    // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
    unsafe {
        if now.wrapping_sub(*last) >= FORCE_WAKEUP_EVERY_NS {
            *last = now;
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_ADAPTIVE_WAKEUP
        }
    }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(p) = AW_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
        unsafe { *p += 1 };
    }
}

/// Counts the verdict and writes its event. `task` says whether the current task is the one
/// that acted (not so on the egress hook).
#[inline(always)]
pub(crate) fn event(flow: &Flow, d: &Decision, task: bool) {
    count(if d.verdict == Verdict::ALLOW {
        counters::ALLOWED
    } else {
        counters::DENIED
    });
    if d.reason == Reason::AUDIT {
        count(counters::AUDIT_PASSED);
    }
    let Some(mut entry) = AW_EVENTS.reserve::<Event>(0) else {
        count(counters::EVENTS_DROPPED);
        return;
    };
    let (pid_tgid, comm) = if task {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    } else {
        (0, [0; 16])
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    entry.write(Event {
        ts_boot_ns: now,
        cgroup_id: flow.cgroup_id,
        pid_tgid,
        addr: flow.dst,
        orig_addr: flow.orig,
        rule_id: d.rule_id,
        slot: d.slot,
        generation: d.generation,
        port: flow.port,
        hook: flow.hook,
        proto: flow.proto,
        verdict: d.verdict,
        reason: d.reason,
        sock_type: flow.sock_type,
        family: flow.family,
        _pad: [0; 4],
        comm,
    });
    // Allowed verdicts are picked up by the reader's next wakeup or its periodic poll, which
    // spares a wakeup (an irq_work) per allowed connect; denials wake it (see above).
    entry.submit(if d.verdict == Verdict::ALLOW {
        BPF_RB_NO_WAKEUP
    } else {
        denial_wakeup(now)
    });
}
