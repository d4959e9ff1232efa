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
/// `bpf_ringbuf_query`: bytes written and not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// With this much waiting, the reader is busy draining (it reads until the ring is empty) or
/// its periodic poll is due: a denial does not wake it again.
const WAKE_BELOW_BACKLOG: u64 = 64 << 10;

#[map]
static AW_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

#[map]
static AW_EVENTS: RingBuf = RingBuf::pinned(DEFAULT_EVENT_RING_BYTES, 0);

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
    entry.write(Event {
        // SAFETY: helper without arguments.
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
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
    // Denials wake the reader at once, unless it is far behind already (then it is draining,
    // or its poll is due): a flood of denials costs no interrupt per event. Allowed verdicts
    // are picked up by its next wakeup or its periodic poll, which spares a wakeup (an
    // irq_work) per allowed connect.
    entry.submit(
        if d.verdict == Verdict::ALLOW || AW_EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKE_BELOW_BACKLOG {
            BPF_RB_NO_WAKEUP
        } else {
            BPF_RB_FORCE_WAKEUP
        },
    );
}
