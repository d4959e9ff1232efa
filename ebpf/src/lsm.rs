//! Task-scoped hooks (BPF LSM): every connect and send of a task in an enforced cgroup is
//! judged by that task's cgroup, whatever socket it uses.
//!
//! The cgroup programs run for sockets created in an enforced cgroup and judge them there;
//! these hooks leave those sockets to them and judge the rest: sockets created elsewhere and
//! brought in (inherited across exec, received over `SCM_RIGHTS`, taken with `pidfd_getfd`).
//! They are attached once for the whole host, so the first thing each does is ask whether
//! the current task is enforced at all; a task of the root cgroup never is.

use agentwall_common::{
    addr::{self, Quads},
    counters,
    event::{Hook, Reason, Verdict},
    lsm::{KernelLayout, MAX_CGROUP_DEPTH},
    maps::DEFAULT_MAX_BINDINGS,
    rules::proto,
};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_get_current_ancestor_cgroup_id},
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};

use crate::{
    decide::{self, Decision, Flow, decide},
    emit,
};

/// `-EPERM`, what a denying LSM hook returns (the caller's syscall fails with it).
const EPERM: i32 = -1;

const AF_UNSPEC: u16 = 0;
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_NETLINK: u16 = 16;
const AF_PACKET: u16 = 17;
const SOCK_STREAM: u16 = 1;
const SOCK_DGRAM: u16 = 2;
/// `IPPROTO_MPTCP`: a multipath TCP socket, judged as TCP.
const IPPROTO_MPTCP: u16 = 262;

/// Offsets of kernel structure members, set by the daemon from the kernel's BTF before the
/// programs load (see `agentwall_common::lsm::KernelLayout`). The initial value marks it
/// unknown, and keeps the global in the read-only data section that the loader fills.
#[unsafe(no_mangle)]
static AW_LAYOUT: KernelLayout = KernelLayout {
    socket_sk: u32::MAX,
    socket_file: u32::MAX,
    socket_type: u32::MAX,
    sock_protocol: u32::MAX,
    sock_family: u32::MAX,
    sock_daddr: u32::MAX,
    sock_dport: u32::MAX,
    sock_v6_daddr: u32::MAX,
    sock_cgroup: u32::MAX,
    cgroup_kn: u32::MAX,
    kernfs_id: u32::MAX,
    msghdr_name: u32::MAX,
    valid: 0,
    _pad: 0,
};

/// Cgroups whose tasks (with those of their descendants) these hooks judge.
#[map]
static AW_ENFORCED: HashMap<u64, u32> = HashMap::pinned(DEFAULT_MAX_BINDINGS, 0);

#[inline(always)]
fn layout() -> KernelLayout {
    // SAFETY: a plain read of a global; volatile so that the value the loader wrote is read,
    // not the initial one folded in at compile time.
    unsafe { core::ptr::read_volatile(&raw const AW_LAYOUT) }
}

/// Whether the current task's cgroup or one of its ancestors below the root is enforced.
#[inline(always)]
fn enforced_task() -> bool {
    // Level 0 is the root cgroup, never enforced: the walk starts below it, and a task of the
    // root cgroup has no ancestor at level 1 (the helper returns 0).
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper taking a level, allowed in LSM programs.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: the value is not read, only its presence.
        if unsafe { AW_ENFORCED.get(id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == u32::MAX {
        return None;
    }
    // SAFETY: the helper copies from kernel memory and fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

/// What the hooks read of a socket.
struct Sock {
    sk: u64,
    /// The socket's own family (not the address a caller passes).
    family: u16,
    sock_type: u16,
    protocol: u8,
    /// Whether user space holds it through a file: sockets the kernel made for itself
    /// (NFS, NBD, ...) have none, and may send in an agent's context on others' behalf.
    user: bool,
}

#[inline(always)]
fn sock_of(l: &KernelLayout, sock: u64) -> Option<Sock> {
    let sk: u64 = read(sock, l.socket_sk)?;
    let file: u64 = read(sock, l.socket_file)?;
    let sock_type: u16 = read(sock, l.socket_type)?;
    let family: u16 = read(sk, l.sock_family)?;
    let protocol: u16 = read(sk, l.sock_protocol)?;
    let protocol = match protocol {
        IPPROTO_MPTCP => proto::TCP,
        p => p as u8,
    };
    Some(Sock {
        sk,
        family,
        sock_type,
        protocol,
        user: file != 0,
    })
}

/// The cgroup the socket was created in.
#[inline(always)]
fn sock_cgroup_id(l: &KernelLayout, sk: u64) -> Option<u64> {
    let cgroup: u64 = read(sk, l.sock_cgroup)?;
    let kn: u64 = read(cgroup, l.cgroup_kn)?;
    read(kn, l.kernfs_id)
}

/// Whether the cgroup programs judge this socket's connects and packets: an IP stream or
/// datagram socket (the only kind they see) created in the current task's own cgroup, which
/// is enforced.
#[inline(always)]
fn judged_by_cgroup_hooks(l: &KernelLayout, s: &Sock) -> bool {
    (s.family == AF_INET || s.family == AF_INET6)
        && (s.sock_type == SOCK_STREAM || s.sock_type == SOCK_DGRAM)
        && sock_cgroup_id(l, s.sk) == Some(decide::current_cgroup_id())
}

/// A destination read from a `struct sockaddr` in kernel memory, read as family `family`.
#[inline(always)]
fn sockaddr_as(addr: u64, family: u16) -> Option<(u16, Quads, u16)> {
    match family {
        AF_INET => {
            let port: u16 = read(addr, 2)?;
            let ip: u32 = read(addr, 4)?;
            Some((family, addr::quads_from_v4(ip), u16::from_be(port)))
        }
        AF_INET6 => {
            let port: u16 = read(addr, 2)?;
            let ip: Quads = read(addr, 8)?;
            Some((family, ip, u16::from_be(port)))
        }
        other => Some((other, [0; 4], 0)),
    }
}

/// A destination read from a `struct sockaddr` in kernel memory of `len` bytes.
#[inline(always)]
fn sockaddr(addr: u64, len: i32) -> Option<(u16, Quads, u16)> {
    let family: u16 = read(addr, 0)?;
    match family {
        AF_INET if len < 8 => None,
        AF_INET6 if len < 24 => None,
        f => sockaddr_as(addr, f),
    }
}

/// The peer of a connected socket: family, address, port.
#[inline(always)]
fn peer(l: &KernelLayout, s: &Sock) -> Option<(u16, Quads, u16)> {
    let port: u16 = read(s.sk, l.sock_dport)?;
    let ip = match s.family {
        AF_INET => addr::quads_from_v4(read(s.sk, l.sock_daddr)?),
        AF_INET6 => read(s.sk, l.sock_v6_daddr)?,
        _ => [0; 4],
    };
    Some((s.family, ip, u16::from_be(port)))
}

/// Where a send on `s` with the kernel copy of the caller's address `name` (0 for none) goes:
/// a stream socket sends to its peer whatever address comes with the data; an IPv4 datagram
/// socket sends to an AF_UNSPEC address as to an AF_INET one; an IPv6 one takes AF_UNSPEC for
/// "the peer" (udp_sendmsg, udpv6_sendmsg).
#[inline(always)]
fn send_destination(l: &KernelLayout, s: &Sock, name: u64) -> Option<(u16, Quads, u16)> {
    if name == 0 || s.sock_type == SOCK_STREAM {
        return peer(l, s);
    }
    let family: u16 = read(name, 0)?;
    match family {
        AF_UNSPEC if s.family == AF_INET => sockaddr_as(name, AF_INET),
        AF_UNSPEC if s.family == AF_INET6 => peer(l, s),
        // The kernel copied the address in (`move_addr_to_kernel`) and the protocol checks
        // its length; the family's full size is read.
        f => sockaddr_as(name, f),
    }
}

/// Judges the current task sending to or connecting to (family, address, port) over `s`.
/// The socket's own kind decides first: IP and packet sockets other than stream and datagram
/// ones carry headers of the caller's making, and packet sockets bypass the IP hooks, so
/// neither passes. Then the destination's family: AF_UNSPEC (a datagram socket dissolving its
/// association), AF_UNIX (left to the Unix socket hooks) and AF_NETLINK (the kernel itself)
/// pass; IP destinations are decided by policy; every other family is denied.
#[inline(always)]
fn judge(s: &Sock, dst: Option<(u16, Quads, u16)>, hook: Hook, report_allowed: bool) -> i32 {
    let cgroup_id = decide::current_cgroup_id();
    let (family, orig, port) = dst.unwrap_or((0, [0; 4], 0));
    let mut flow = Flow {
        cgroup_id,
        orig,
        dst: addr::classify_quads(orig),
        port,
        proto: s.protocol,
        hook,
        sock_type: s.sock_type as u8,
        family: family as u8,
    };
    let ip_socket = s.family == AF_INET || s.family == AF_INET6;
    let d = if s.family == AF_PACKET
        || (ip_socket && s.sock_type != SOCK_STREAM && s.sock_type != SOCK_DGRAM)
    {
        Decision::deny(Reason::RAW_SOCKET, 0, 0)
    } else {
        match dst {
            None => Decision::deny(Reason::UNREADABLE, 0, 0),
            Some((AF_UNSPEC | AF_UNIX | AF_NETLINK, _, _)) => return 0,
            Some((AF_INET | AF_INET6, _, _)) if ip_socket => decide(&flow),
            Some(_) => {
                flow.dst = [0; 4];
                Decision::deny(Reason::FAMILY, 0, 0)
            }
        }
    };
    if d.verdict == Verdict::ALLOW {
        if report_allowed {
            emit::event(&flow, &d, true);
        } else {
            emit::tally(counters::ALLOWED);
        }
        0
    } else {
        emit::event(&flow, &d, true);
        EPERM
    }
}

/// What both hooks do first: defer to an earlier LSM's denial, let every task outside the
/// enforced cgroups be, read the socket (`struct socket *` in argument 0), and leave the
/// kernel's own sockets and those the cgroup hooks judge. `Err` is the hook's answer;
/// `Ok` the socket to judge, with the layout.
#[inline(always)]
fn subject(
    ctx: &LsmContext,
    hook: Hook,
    report_allowed: bool,
) -> Result<(KernelLayout, Sock), i32> {
    let earlier: i32 = ctx.arg(3);
    if earlier != 0 {
        return Err(earlier);
    }
    if !enforced_task() {
        return Err(0);
    }
    let l = layout();
    let sock: u64 = ctx.arg(0);
    let Some(s) = sock_of(&l, sock).filter(|_| l.valid != 0) else {
        return Err(judge(&unknown(), None, hook, report_allowed));
    };
    if !s.user || judged_by_cgroup_hooks(&l, &s) {
        return Err(0);
    }
    Ok((l, s))
}

/// `socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)`.
#[lsm(hook = "socket_connect")]
fn aw_lsm_connect(ctx: LsmContext) -> i32 {
    match subject(&ctx, Hook::LSM_CONNECT, true) {
        Err(answer) => answer,
        Ok((_, s)) => {
            let (address, len): (u64, i32) = (ctx.arg(1), ctx.arg(2));
            judge(&s, sockaddr(address, len), Hook::LSM_CONNECT, true)
        }
    }
}

/// `socket_sendmsg(struct socket *sock, struct msghdr *msg, int size)`: every send, write
/// included.
#[lsm(hook = "socket_sendmsg")]
fn aw_lsm_sendmsg(ctx: LsmContext) -> i32 {
    match subject(&ctx, Hook::LSM_SENDMSG, false) {
        Err(answer) => answer,
        Ok((l, s)) => {
            let msg: u64 = ctx.arg(1);
            let dst =
                read::<u64>(msg, l.msghdr_name).and_then(|name| send_destination(&l, &s, name));
            judge(&s, dst, Hook::LSM_SENDMSG, false)
        }
    }
}

#[inline(always)]
fn unknown() -> Sock {
    Sock {
        sk: 0,
        family: 0,
        sock_type: 0,
        protocol: 0,
        user: true,
    }
}
