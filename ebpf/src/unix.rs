//! Unix sockets are egress too: a confined agent that may not reach the network could ask a
//! host helper to (the resolver, a container runtime, any local proxy). `connect_unix` and
//! `sendmsg_unix` (Linux >= 6.7) judge the socket name the caller passed against the names
//! its identity may reach ([`agentwall_common::unix`]); default deny, like everything else.
//!
//! aya 0.14 knows neither hook, so these programs sit in sections that name an attach type
//! aya parses (it never loads them); the daemon loads and attaches them with their real
//! attach type (`agent/src/enforce/unix.rs`). The kernel offers the name only through the
//! context's kernel object (`struct bpf_sock_addr_kern`), read here with
//! `bpf_probe_read_kernel` at offsets the daemon checked against the kernel's BTF.

use agentwall_common::{
    addr, counters,
    event::{Hook, Reason, Verdict},
    maps::DEFAULT_MAX_UNIX_RULES,
    unix::{SUN_PATH_MAX, SUN_PATH_OFFSET, UnixKey, kern},
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::bpf_probe_read_kernel,
    macros::map,
    maps::{HashMap, PerCpuArray},
};

use crate::{
    ALLOW, DENY,
    decide::{self, Decision, Flow},
    emit,
};

const AF_UNIX: u8 = 1;

#[map]
static AW_UNIX: HashMap<UnixKey, u32> = HashMap::pinned(DEFAULT_MAX_UNIX_RULES, 0);

/// Per CPU: the key being built (too large for the program's stack beside the rest).
#[map]
static AW_UNIX_KEY: PerCpuArray<UnixKey> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: how many times a Unix hook took the key above. These programs run with migration
/// disabled, not preemption: another task's hook may take the same CPU's key between this
/// one's build and lookup. A program whose count moved meanwhile denies.
#[map]
static AW_UNIX_USES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/connect4/aw_connect_unix")]
fn aw_connect_unix(ctx: *mut bpf_sock_addr) -> i32 {
    judge(ctx, Hook::CONNECT_UNIX)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/sendmsg4/aw_sendmsg_unix")]
fn aw_sendmsg_unix(ctx: *mut bpf_sock_addr) -> i32 {
    judge(ctx, Hook::SENDMSG_UNIX)
}

#[inline(always)]
fn judge(ctx: *mut bpf_sock_addr, hook: Hook) -> i32 {
    // SAFETY: the kernel hands the program a valid context; `type` is readable in every
    // sock_addr program.
    let sock_type = unsafe { core::ptr::read_volatile(&raw const (*ctx).type_) };
    let flow = Flow {
        cgroup_id: decide::current_cgroup_id(),
        orig: [0; 4],
        dst: addr::classify_quads([0; 4]),
        port: 0,
        proto: 0,
        hook,
        sock_type: sock_type as u8,
        family: AF_UNIX,
    };
    let Some(key) = AW_UNIX_KEY.get_ptr_mut(0) else {
        let d = Decision::deny(Reason::UNREADABLE, 0, 0);
        emit::finish(emit::begin_unix(&flow), &flow, &d);
        return DENY;
    };
    let Some(uses) = AW_UNIX_USES.get_ptr_mut(0) else {
        let d = Decision::deny(Reason::UNREADABLE, 0, 0);
        emit::finish(emit::begin_unix(&flow), &flow, &d);
        return DENY;
    };
    // SAFETY: this CPU's counter; volatile, so that the check below reads it again.
    let mine = unsafe {
        let n = core::ptr::read_volatile(uses).wrapping_add(1);
        core::ptr::write_volatile(uses, n);
        n
    };
    // SAFETY: this CPU's scratch key; another task's hook may write it meanwhile (see
    // `AW_UNIX_USES`), which the check after the last read of it catches.
    let key = unsafe { &mut *key };
    let d = if read_name(ctx, key) {
        decide_name(flow.cgroup_id, key)
    } else {
        key.len = 0;
        Decision::deny(Reason::UNREADABLE, 0, 0)
    };
    let mut record = emit::begin_unix(&flow);
    if let Some(r) = record.as_mut() {
        let e = r.as_mut_ptr();
        // SAFETY: the reserved record, exclusively owned; each write stays in its field.
        unsafe {
            (&raw mut (*e).len).write(key.len);
            (&raw mut (*e)._pad).write(0);
            (&raw mut (*e).path).write(key.path);
            (&raw mut (*e)._pad2).write([0; 4]);
        }
    }
    // SAFETY: this CPU's counter.
    let undisturbed = unsafe { core::ptr::read_volatile(uses) } == mine;
    let d = if undisturbed {
        d
    } else {
        Decision::deny(Reason::UNREADABLE, d.slot, d.generation)
    };
    // A verdict past its budget is counted under its name's first 16 bytes and its length
    // (`agentwall_common::budget::SummaryKey`): fixed-size, no loop over the name, and the
    // daemon gives the whole name from the records it read before.
    // SAFETY: the first 16 of the key's 108 name bytes; any alignment.
    let prefix = unsafe { core::ptr::read_unaligned(key.path.as_ptr().cast::<addr::Quads>()) };
    let flow = Flow {
        dst: prefix,
        port: key.len as u16,
        ..flow
    };
    emit::finish(record, &flow, &d);
    if d.verdict == Verdict::ALLOW {
        ALLOW
    } else {
        DENY
    }
}

/// Reads the caller's socket name into `key` (name and length only). False if the kernel
/// object could not be read.
#[inline(always)]
fn read_name(ctx: *mut bpf_sock_addr, key: &mut UnixKey) -> bool {
    let mut kern_ctx = [0u64; kern::READ_SIZE / 8];
    // SAFETY: reads kernel memory into a local buffer of exactly that size; the helper checks
    // the source and zeroes the buffer if the read faults. The context pointer is the
    // address of the kernel's `bpf_sock_addr_kern` for this call.
    let r = unsafe {
        bpf_probe_read_kernel(
            kern_ctx.as_mut_ptr().cast(),
            kern::READ_SIZE as u32,
            ctx.cast_const().cast(),
        )
    };
    if r != 0 {
        return false;
    }
    let uaddr = kern_ctx[kern::UADDR_OFFSET / 8];
    let uaddrlen = kern_ctx[kern::UADDRLEN_OFFSET / 8] as u32;
    if uaddr == 0 {
        return false;
    }
    let raw_len = (uaddrlen as usize).saturating_sub(SUN_PATH_OFFSET);
    let raw_len = if raw_len > SUN_PATH_MAX {
        SUN_PATH_MAX
    } else {
        raw_len
    };
    key.path = [0; SUN_PATH_MAX];
    if raw_len > 0 {
        // SAFETY: reads at most `sun_path`'s size from the kernel's copy of the caller's
        // address into the key's buffer of that size.
        let r = unsafe {
            bpf_probe_read_kernel(
                key.path.as_mut_ptr().cast(),
                raw_len as u32,
                (uaddr as usize + SUN_PATH_OFFSET) as *const core::ffi::c_void,
            )
        };
        if r != 0 {
            return false;
        }
    }
    key.set_name(raw_len);
    true
}

#[inline(always)]
fn lookup(key: &UnixKey) -> Option<u32> {
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { AW_UNIX.get(key) }.copied()
}

/// Judges the name in `key` for the cgroup: its binding, then the names of its slot under
/// the current generation. Every path that is not an explicit match denies (or, in audit
/// mode, lets through as an audit verdict).
#[inline(always)]
fn decide_name(cgroup_id: u64, key: &mut UnixKey) -> Decision {
    let Some(state) = decide::state().filter(|s| s.generation != 0) else {
        emit::count(counters::NO_POLICY);
        return Decision::deny(Reason::NO_POLICY, 0, 0);
    };
    key.generation = state.generation;
    // Slot 0's names (agentwall's enrollment socket) are open to every enforced cgroup,
    // whatever its binding: a process enrolls from the cgroup it is to be bound in, and a
    // cut or expired one hears from the daemon why it is refused.
    key.slot = 0;
    if let Some(rule_id) = lookup(key) {
        return Decision {
            verdict: Verdict::ALLOW,
            reason: Reason::RULE,
            rule_id,
            slot: 0,
            generation: state.generation,
            epoch: state.epoch,
            expires_boot_ns: 0,
            now_boot_ns: 0,
        };
    }
    let (binding, slot, now) = match decide::admitted(cgroup_id, state.generation, state.epoch) {
        Ok(a) => a,
        Err(d) => return d,
    };
    key.slot = slot;
    let rule = lookup(key);
    let (verdict, reason, rule_id) = match rule {
        Some(rule_id) => (Verdict::ALLOW, Reason::RULE, rule_id),
        None if binding.audit_only() => (Verdict::ALLOW, Reason::AUDIT, 0),
        None => (Verdict::DENY, Reason::NO_RULE, 0),
    };
    Decision {
        verdict,
        reason,
        rule_id,
        slot,
        generation: state.generation,
        epoch: state.epoch,
        expires_boot_ns: binding.expires_boot_ns,
        now_boot_ns: now,
    }
}
