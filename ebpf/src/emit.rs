//! Events and counters.

use agentwall_common::{
    addr::Quads,
    counters,
    event::{Event, Reason, Verdict},
    maps::DEFAULT_EVENT_RING_BYTES,
    unix::UnixEvent,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_comm as bpf_get_current_comm_raw, bpf_ktime_get_boot_ns},
    },
    macros::map,
    maps::{PerCpuArray, RingBuf, ring_buf::RingBufEntry},
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

/// Adds one to a counter of something denied, dropped or lost, atomically: a program can be
/// interrupted on its CPU by another (a softirq's egress inside a connect) that counts the
/// same thing, and a plain increment would then lose one of the two. The loss of an event
/// must be counted exactly: the audit log accounts for every one.
#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(p) = AW_COUNTERS.get_ptr_mut(index) {
        // The BPF target has no compare-and-swap, so core offers no `fetch_add` there: the
        // atomic add instruction itself.
        // SAFETY: `p` is this CPU's 8-aligned counter slot, valid for the program's run; the
        // instruction reads and writes those 8 bytes only.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {one}",
                p = in(reg) p,
                one = in(reg) 1u64,
                options(nostack),
            );
        }
    }
}

/// Adds one to a statistical counter on the hot path (every allowed verdict, every packet
/// passed): a plain increment, of which one in a nested pair may be lost.
#[inline(always)]
pub(crate) fn tally(index: u32) {
    if let Some(p) = AW_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
        unsafe { *p += 1 };
    }
}

/// An event record reserved in the ring and holding the flow's fields, waiting for the
/// verdict ([`finish`]).
/// `T` is [`Event`] or a record that starts with one (`agentwall_common::unix::UnixEvent`).
pub(crate) struct Record<T: 'static = Event>(RingBufEntry<T>);

impl<T> Record<T> {
    /// The whole record, for the fields after the common [`Event`].
    #[inline(always)]
    pub(crate) fn as_mut_ptr(&mut self) -> *mut T {
        self.0.as_mut_ptr()
    }
}

/// Reserves the event record of `flow` and writes what is known before the decision: the flow
/// and, when `task` says the current task is the one that acted (not so on the egress hook),
/// its pid and command name. Done before the decision, the record's fresh cache lines can be
/// fetched while the lookups run rather than at the submit (no gain measurable on its own in
/// the enforcement benchmark). `None` if the ring is full (counted by [`finish`]).
#[inline(always)]
pub(crate) fn begin(flow: &Flow, task: bool) -> Option<Record> {
    let mut entry = AW_EVENTS.reserve::<Event>(0)?;
    write_head(entry.as_mut_ptr(), flow, task);
    Some(Record(entry))
}

/// [`begin`] for a Unix-socket verdict, whose record names the socket after the common
/// part; the caller writes the name.
#[inline(always)]
pub(crate) fn begin_unix(flow: &Flow) -> Option<Record<UnixEvent>> {
    let mut entry = AW_EVENTS.reserve::<UnixEvent>(0)?;
    write_head(entry.as_mut_ptr().cast(), flow, true);
    Some(Record(entry))
}

/// Writes what [`begin`] knows into the reserved record `e`.
#[inline(always)]
fn write_head(e: *mut Event, flow: &Flow, task: bool) {
    // The record is written field by field in place, the command name by the helper itself:
    // no copy through the stack, and whole-word stores for the addresses. Between `begin` and
    // `finish` every byte of the record is written (the reserved memory holds whatever was
    // there before).
    // SAFETY: `e` points to a reserved, exclusively owned, 8-aligned record of at least
    // `size_of::<Event>()` bytes that starts with an `Event`; each write stays inside its
    // own field.
    unsafe {
        (&raw mut (*e).cgroup_id).write(flow.cgroup_id);
        (&raw mut (*e).pid_tgid).write(if task { bpf_get_current_pid_tgid() } else { 0 });
        (&raw mut (*e).addr).cast::<Quads>().write(flow.dst);
        (&raw mut (*e).orig_addr).cast::<Quads>().write(flow.orig);
        (&raw mut (*e).port).write(flow.port);
        (&raw mut (*e).hook).write(flow.hook);
        (&raw mut (*e).proto).write(flow.proto);
        (&raw mut (*e).sock_type).write(flow.sock_type);
        (&raw mut (*e).family).write(flow.family);
        (&raw mut (*e)._pad).cast::<u32>().write(0);
        let comm = (&raw mut (*e).comm).cast::<[u64; 2]>();
        // The helper fills all 16 bytes (NUL-padded, or zeros if it fails).
        if !task || bpf_get_current_comm_raw(comm.cast(), 16) != 0 {
            comm.write([0; 2]);
        }
    }
}

/// Counts the verdict `d` and submits its event record (begun by [`begin`]), or counts the
/// event as lost if the ring had no room for it.
#[inline(always)]
pub(crate) fn finish<T: 'static>(record: Option<Record<T>>, flow: &Flow, d: &Decision) {
    if d.verdict == Verdict::ALLOW {
        tally(counters::ALLOWED);
    } else {
        count(counters::DENIED);
    }
    if d.reason == Reason::AUDIT
        || d.reason == Reason::RATE_AUDIT
        || d.reason == Reason::WINDOW_AUDIT
    {
        count(counters::AUDIT_PASSED);
    }
    // One clock reading per verdict: the decision's, if it took one.
    let now = if d.now_boot_ns != 0 {
        d.now_boot_ns
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_boot_ns() }
    };
    // Past the cgroup's budget the verdict is summarized, not recorded (nor lost).
    if !crate::budget::admit(flow, d, now) {
        if let Some(Record(entry)) = record {
            entry.discard(BPF_RB_NO_WAKEUP);
        }
        return;
    }
    let Some(Record(mut entry)) = record else {
        count(counters::EVENTS_DROPPED);
        return;
    };
    let e: *mut Event = entry.as_mut_ptr().cast();
    // SAFETY: as in `begin`; these are the fields `begin` left.
    unsafe {
        (&raw mut (*e).ts_boot_ns).write(now);
        (&raw mut (*e).rule_id).write(d.rule_id);
        (&raw mut (*e).slot).write(d.slot);
        (&raw mut (*e).generation).write(d.generation);
        (&raw mut (*e).verdict).write(d.verdict);
        (&raw mut (*e).reason).write(d.reason);
    }
    // Allowed verdicts are picked up by the reader's next wakeup or its periodic poll, which
    // spares a wakeup (an irq_work) per allowed connect; denials wake it (see above).
    entry.submit(if d.verdict == Verdict::ALLOW {
        BPF_RB_NO_WAKEUP
    } else {
        denial_wakeup(now)
    });
}

/// Counts the verdict and writes its event in one step, for hooks whose decision is already
/// made. `task` as in [`begin`].
#[inline(always)]
pub(crate) fn event(flow: &Flow, d: &Decision, task: bool) {
    finish(begin(flow, task), flow, d);
}
