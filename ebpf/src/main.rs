//! agentwall's kernel programs.
//!
//! Each hook turns its context into a [`decide::Flow`] and calls [`decide::decide`], the one
//! decision function, so that connect, sendmsg and the egress backstop cannot drift apart.
//! Programs return 1 to allow and 0 to deny; a denied connect or sendmsg fails with EPERM,
//! a denied packet is dropped.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod budget;
mod conditions;
mod decide;
mod emit;
mod flowcache;
mod ingress;
mod lsm;
mod unix;

use agentwall_common::{
    addr::{self, Quads},
    event::{Hook, Reason, Verdict},
    peers::FlowKey,
    rules::proto,
};
use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};

use crate::decide::{Flow, decide};

pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const SOCK_RAW: u32 = 3;

#[cgroup_sock_addr(connect4)]
fn aw_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, Hook::CONNECT4)
}

#[cgroup_sock_addr(connect6)]
fn aw_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, Hook::CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
fn aw_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, Hook::SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
fn aw_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, Hook::SENDMSG6)
}

/// connect4/6 and sendmsg4/6: the destination is in the socket address the caller passed.
#[inline(always)]
fn sock_addr(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    let v6 = hook == Hook::CONNECT6 || hook == Hook::SENDMSG6;
    let connect = hook == Hook::CONNECT4 || hook == Hook::CONNECT6;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; each field is read with
    // its own 4-byte load, the access size the verifier accepts for these fields.
    let (orig, port, sock_type, protocol) = unsafe {
        // A connected UDP send with a control message (IP_PKTINFO, IPV6_PKTINFO) comes to
        // sendmsg4/6 without an address (`__cgroup_bpf_run_filter_sock_addr` passes an empty
        // one: all zeros): its destination is the socket's peer. Only an address that is zero
        // throughout is that: IPv4's udp_sendmsg also sends to an address of family AF_UNSPEC
        // that names a host and port, which is judged as given.
        let connected_send = !connect
            && core::ptr::read_volatile(&raw const (*sa).user_family) == 0
            && core::ptr::read_volatile(&raw const (*sa).user_port) == 0
            && if v6 {
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]) == 0
                    && core::ptr::read_volatile(&raw const (*sa).user_ip6[1]) == 0
                    && core::ptr::read_volatile(&raw const (*sa).user_ip6[2]) == 0
                    && core::ptr::read_volatile(&raw const (*sa).user_ip6[3]) == 0
            } else {
                core::ptr::read_volatile(&raw const (*sa).user_ip4) == 0
            };
        let orig: Quads = if connected_send {
            let sk = core::ptr::read_volatile(&raw const (*sa).__bindgen_anon_1.sk);
            if v6 {
                [
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
                ]
            } else {
                addr::quads_from_v4(core::ptr::read_volatile(&raw const (*sk).dst_ip4))
            }
        } else if v6 {
            [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ]
        } else {
            addr::quads_from_v4(core::ptr::read_volatile(&raw const (*sa).user_ip4))
        };
        let port = if connected_send {
            let sk = core::ptr::read_volatile(&raw const (*sa).__bindgen_anon_1.sk);
            u16::from_be(core::ptr::read_volatile(&raw const (*sk).dst_port))
        } else {
            // `user_port` holds the port in network order in its first two bytes.
            u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16)
        };
        let sock_type = core::ptr::read_volatile(&raw const (*sa).type_);
        let protocol = core::ptr::read_volatile(&raw const (*sa).protocol);
        (orig, port, sock_type, protocol)
    };
    let flow = Flow {
        cgroup_id: decide::current_cgroup_id(),
        orig,
        dst: addr::classify_quads(orig),
        port,
        proto: protocol as u8,
        hook,
        sock_type: sock_type as u8,
        family: if v6 { AF_INET6 } else { AF_INET },
    };
    // The event record is reserved and filled before the decision (see `emit::begin`).
    let record = emit::begin(&flow, true);
    let d = decide(&flow);
    emit::finish(record, &flow, &d);
    if connect {
        // A connected TCP or UDP socket sends to one destination (an explicit address on a
        // UDP send passes sendmsg4/6): cache its verdict. A ping socket's sendto reaches no
        // address hook, so its packets are always judged by the backstop.
        let cookie = flowcache::cookie(ctx.sock_addr.cast());
        let one_destination = flow.proto == proto::TCP || flow.proto == proto::UDP;
        if d.verdict == Verdict::ALLOW && one_destination {
            flowcache::remember(cookie, &d);
        } else {
            flowcache::forget(cookie);
        }
    }
    if d.verdict == Verdict::ALLOW {
        ALLOW
    } else {
        DENY
    }
}

/// Backstop on every packet an enforced socket sends: ICMP, flows opened before a verdict
/// changed, anything the address hooks do not see.
#[cgroup_skb(egress)]
fn aw_egress(ctx: SkBuffContext) -> i32 {
    let cookie = flowcache::cookie(ctx.skb.skb.cast());
    // The cache vouches for a socket's destination, which its packets go to unless they carry
    // a source route (IPv4 options, an IPv6 routing header): those are judged in full.
    let plain = plain_header(&ctx);
    // A connection asked of this host (the loopback device carries every packet to a local
    // address): the callee learns who asks (see `agentwall_common::peers`). Recorded whatever
    // the verdict: a SYN that is dropped reaches no callee.
    if let Some(Some(at)) = plain
        && to_loopback(&ctx)
        && syn_at(&ctx, at)
    {
        record_syn(&ctx, at);
    }
    if plain.is_some() && flowcache::vouches(cookie) {
        emit::tally(agentwall_common::counters::SKB_PASSED);
        return ALLOW;
    }
    // In cgroup_skb the current task may be anyone (softirq, timers); the packet's own socket
    // says which cgroup sent it.
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff` for this program invocation.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(packet) = parse_packet(&ctx) else {
        emit::count(agentwall_common::counters::SKB_UNPARSED);
        let flow = Flow {
            cgroup_id,
            orig: [0; 4],
            dst: [0; 4],
            port: 0,
            proto: 0,
            hook: Hook::EGRESS,
            sock_type: 0,
            family: 0,
        };
        let d = decide::Decision::deny(Reason::UNPARSED, 0, 0);
        emit::event(&flow, &d, false);
        emit::count(agentwall_common::counters::SKB_DROPPED);
        return DENY;
    };
    let Packet {
        orig,
        port,
        sport,
        proto,
        family,
        bare_rst,
        synack,
        routed,
        ..
    } = packet;
    let flow = Flow {
        cgroup_id,
        orig,
        dst: addr::classify_quads(orig),
        port,
        proto,
        hook: Hook::EGRESS,
        sock_type: 0,
        family,
    };
    let mut d = match routed {
        Some(reason) => decide::Decision::deny(reason, 0, 0),
        None => decide(&flow),
    };
    // A packet of a TCP connection the peer opened, as the policy's ingress rules let it: the
    // handshake's answer (SYN and ACK, no data), or a packet of a socket accepted from a
    // listener (marked by `aw_sockops`), to a peer the ingress rules let connect to its source
    // port, or whose caller's `agent:` rule grants it. A socket that connected out is never
    // one.
    if d.reason == Reason::NO_RULE && proto == agentwall_common::rules::proto::TCP {
        let caller = if synack {
            Some(ingress::admitted_caller(&packet.answered()))
        } else {
            ingress::passive(cookie)
        };
        if let Some(caller_slot) = caller
            && let Some(rule_id) = ingress::reply(&flow, d.slot, d.generation, sport, caller_slot)
        {
            d.verdict = Verdict::ALLOW;
            d.reason = Reason::REPLY;
            d.rule_id = rule_id;
        }
    }
    if d.verdict == Verdict::ALLOW {
        if proto == agentwall_common::rules::proto::TCP {
            // A TCP socket's destination is fixed: its next packets may use the cache.
            flowcache::remember(cookie, &d);
        }
        emit::tally(agentwall_common::counters::SKB_PASSED);
        ALLOW
    } else if bare_rst {
        // A reset without payload carries nothing out; it tells the peer of a socket that
        // revocation or quarantine destroyed that the connection is gone.
        emit::count(agentwall_common::counters::RST_PASSED);
        ALLOW
    } else {
        // Only drops are reported per packet: a report per passed packet would flood the ring.
        emit::event(&flow, &d, false);
        emit::count(agentwall_common::counters::SKB_DROPPED);
        DENY
    }
}

/// What the backstop judges of an outgoing packet.
struct Packet {
    orig: Quads,
    port: u16,
    /// Source address (word form) and port.
    src: Quads,
    sport: u16,
    proto: u8,
    family: u8,
    /// A TCP segment with RST set and no payload.
    bare_rst: bool,
    /// A TCP segment with SYN set and ACK clear: a connection asked for.
    syn: bool,
    /// A TCP segment with SYN and ACK set: a connection's answer.
    synack: bool,
    /// A TCP segment's sequence number.
    seq: u32,
    /// Why the packet may go past its header's destination (IPv4 options, which can hold a
    /// source route; an IPv6 routing header), if it may: such packets are denied.
    routed: Option<Reason>,
}

impl Packet {
    /// The connection a packet belongs to, from the side that did not send it: its source is
    /// the remote end (a caller's SYN as the callee sees it).
    #[inline(always)]
    fn asked(&self) -> FlowKey {
        FlowKey {
            remote: self.src,
            local: self.orig,
            remote_port: self.sport,
            local_port: self.port,
            _pad: 0,
        }
    }

    /// The connection a packet belongs to, from the side that sent it (a callee's SYN-ACK as
    /// the callee sees it).
    #[inline(always)]
    fn answered(&self) -> FlowKey {
        FlowKey {
            remote: self.orig,
            local: self.src,
            remote_port: self.port,
            local_port: self.sport,
            _pad: 0,
        }
    }
}

/// IPv6 next-header values of extension headers.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

/// Whether the packet's header names its final destination (IPv4 without options, IPv6 whose
/// first next header is TCP or UDP), and if so where its TCP flags are (`None` if not TCP).
#[inline(always)]
fn plain_header(ctx: &SkBuffContext) -> Option<Option<usize>> {
    let h = ctx.load::<[u8; 10]>(0).ok()?;
    match h[0] >> 4 {
        4 if h[0] & 0x0f == 5 => Some((h[9] == proto::TCP).then_some(20 + 13)),
        6 if h[6] == proto::TCP => Some(Some(40 + 13)),
        6 if h[6] == proto::UDP => Some(None),
        _ => None,
    }
}

/// Whether the TCP flags at `at` ask for a connection (SYN without ACK).
#[inline(always)]
fn syn_at(ctx: &SkBuffContext, at: usize) -> bool {
    ctx.load::<u8>(at)
        .is_ok_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// Records the sending cgroup of a SYN whose TCP flags are at `flags_at` (a plain header:
/// IPv4 without options, or IPv6 with TCP next), for the callee's ingress.
#[inline(always)]
fn record_syn(ctx: &SkBuffContext, flags_at: usize) {
    // The TCP header starts 13 bytes before its flags.
    let (key, isn) = if flags_at == 20 + 13 {
        let Ok(h) = ctx.load::<[u8; 28]>(0) else {
            return;
        };
        (
            FlowKey {
                remote: addr::quads_from_v4(u32::from_ne_bytes([h[12], h[13], h[14], h[15]])),
                local: addr::quads_from_v4(u32::from_ne_bytes([h[16], h[17], h[18], h[19]])),
                remote_port: u16::from_be_bytes([h[20], h[21]]),
                local_port: u16::from_be_bytes([h[22], h[23]]),
                _pad: 0,
            },
            u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        )
    } else {
        let Ok(h) = ctx.load::<[u8; 48]>(0) else {
            return;
        };
        let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        (
            FlowKey {
                remote: [word(8), word(12), word(16), word(20)],
                local: [word(24), word(28), word(32), word(36)],
                remote_port: u16::from_be_bytes([h[40], h[41]]),
                local_port: u16::from_be_bytes([h[42], h[43]]),
                _pad: 0,
            },
            u32::from_be_bytes([h[44], h[45], h[46], h[47]]),
        )
    };
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff` for this program invocation.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(ctx.skb.skb) };
    ingress::record_caller(&key, cgroup_id, isn);
}

/// TCP header bytes up to the flags: ports, sequence, acknowledgment, data offset, flags.
const TCP_FLAGS_LEN: usize = 14;
const TCP_RST: u8 = 0x04;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Of the TCP header at `at`: whether it is a reset with exactly `payload_len` bytes after
/// the IP header, that is, no data; whether it asks for a connection (SYN, no ACK); whether
/// it answers one (SYN and ACK); its sequence number.
#[inline(always)]
fn tcp_kind(ctx: &SkBuffContext, at: usize, payload_len: usize) -> (bool, bool, bool, u32) {
    let Ok(t) = ctx.load::<[u8; TCP_FLAGS_LEN]>(at) else {
        return (false, false, false, 0);
    };
    let doff = usize::from(t[12] >> 4) * 4;
    let syn = t[13] & TCP_SYN != 0;
    let ack = t[13] & TCP_ACK != 0;
    (
        t[13] & TCP_RST != 0 && doff >= 20 && payload_len == doff,
        syn && !ack,
        syn && ack,
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
    )
}

/// Addresses, ports, protocol and family of a packet.
#[inline(always)]
fn parse_packet(ctx: &SkBuffContext) -> Option<Packet> {
    // cgroup_skb programs see the packet from its network header on.
    // Fixed-size loads: the verifier must see a constant, non-zero length.
    let first: [u8; 1] = ctx.load(0).ok()?;
    match first[0] >> 4 {
        4 => {
            let h: [u8; 20] = ctx.load(0).ok()?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            let proto = h[9];
            let dst = addr::quads_from_v4(u32::from_ne_bytes([h[16], h[17], h[18], h[19]]));
            let src = addr::quads_from_v4(u32::from_ne_bytes([h[12], h[13], h[14], h[15]]));
            // Egress runs before fragmentation (ip_finish_output), so a later fragment here
            // was crafted: without its transport header it cannot be judged.
            if frag_offset != 0 {
                return None;
            }
            let (sport, port) = if proto == proto::TCP || proto == proto::UDP {
                let p: [u8; 4] = ctx.load(ihl).ok()?;
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            } else {
                (0, 0)
            };
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let (rst, syn, synack, seq) = if proto == proto::TCP {
                tcp_kind(ctx, ihl, total.saturating_sub(ihl))
            } else {
                (false, false, false, 0)
            };
            Some(Packet {
                orig: dst,
                port,
                src,
                sport,
                proto,
                family: AF_INET,
                bare_rst: rst,
                syn,
                synack,
                seq,
                routed: (ihl > 20).then_some(Reason::IP_OPTIONS),
            })
        }
        6 => {
            let h: [u8; 40] = ctx.load(0).ok()?;
            let next = h[6];
            let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let dst = [word(24), word(28), word(32), word(36)];
            let src = [word(8), word(12), word(16), word(20)];
            let (sport, port) = if next == proto::TCP || next == proto::UDP {
                let p: [u8; 4] = ctx.load(40).ok()?;
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            } else {
                (0, 0)
            };
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let (rst, syn, synack, seq) = if next == proto::TCP {
                tcp_kind(ctx, 40, payload)
            } else {
                (false, false, false, 0)
            };
            // Extension headers are judged as their own protocol number: only a rule for any
            // protocol and every port lets them through.
            Some(Packet {
                orig: dst,
                port,
                src,
                sport,
                proto: next,
                family: AF_INET6,
                bare_rst: rst,
                syn,
                synack,
                seq,
                routed: match next {
                    IPV6_ROUTING => Some(Reason::ROUTING_HEADER),
                    // Hop-by-hop and destination options and a fragment header can stand
                    // before a routing header; only the first next header is read here.
                    IPV6_HOP_BY_HOP | IPV6_DEST_OPTS | IPV6_FRAGMENT => Some(Reason::IP_OPTIONS),
                    _ => None,
                },
            })
        }
        _ => None,
    }
}

/// The connections peers ask of an enforced cgroup's listeners: a TCP SYN (without ACK), or
/// any packet that arrives at a listening socket (the ACK that completes a SYN cookie), is
/// judged by the cgroup's policy's ingress rules when it has any (see [`ingress`]). A packet
/// at a listener that cannot be read as TCP (IPv4 options, IPv6 extension headers) is
/// dropped for such a cgroup. Every other inbound packet belongs to a flow judged already and
/// passes.
#[cgroup_skb(ingress)]
fn aw_ingress(ctx: SkBuffContext) -> i32 {
    let listener = to_listener(&ctx);
    // The common case first, in three reads: a packet of a connection (not a SYN, not to a
    // listener) passes; so does anything else that does not reach a listener and is not a
    // plain TCP SYN (the full reading below lets all of those pass too).
    if !listener {
        match plain_header(&ctx) {
            Some(Some(at)) if syn_at(&ctx, at) => {}
            _ => return ALLOW,
        }
    }
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff` for this program invocation.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(ctx.skb.skb) };
    let p = parse_packet(&ctx);
    let tcp = p
        .as_ref()
        .is_some_and(|p| p.proto == proto::TCP && p.routed.is_none());
    let asks = tcp && p.as_ref().is_some_and(|p| p.syn || listener);
    let Some(p) = p.filter(|_| asks) else {
        if listener && !tcp && ingress::judges(cgroup_id) {
            emit::count(agentwall_common::counters::INGRESS_UNPARSED);
            return DENY;
        }
        return ALLOW;
    };
    let flow = Flow {
        cgroup_id,
        orig: p.src,
        dst: addr::classify_quads(p.src),
        port: p.port,
        proto: p.proto,
        hook: Hook::INGRESS,
        sock_type: 0,
        family: p.family,
    };
    // The caller's initial sequence number: the SYN's own, or one before the ACK's that
    // completes a handshake (a SYN cookie's).
    let isn = if p.syn { p.seq } else { p.seq.wrapping_sub(1) };
    let Some(d) = ingress::judge(&flow, &p.asked(), isn, from_loopback(&ctx)) else {
        return ALLOW;
    };
    emit::event(&flow, &d, false);
    if d.verdict == Verdict::ALLOW {
        ALLOW
    } else {
        emit::count(agentwall_common::counters::INGRESS_DENIED);
        DENY
    }
}

/// Whether the packet goes out on the loopback device (index 1 in every network namespace):
/// to this host.
#[inline(always)]
fn to_loopback(ctx: &SkBuffContext) -> bool {
    const LOOPBACK_IFINDEX: u32 = 1;
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff`; the field is read whole.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).ifindex) == LOOPBACK_IFINDEX }
}

/// Whether the packet came in on the loopback device (index 1 in every network namespace):
/// from this host.
#[inline(always)]
fn from_loopback(ctx: &SkBuffContext) -> bool {
    const LOOPBACK_IFINDEX: u32 = 1;
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff`; the field is read whole.
    unsafe {
        core::ptr::read_volatile(&raw const (*ctx.skb.skb).ingress_ifindex) == LOOPBACK_IFINDEX
    }
}

/// Whether the packet arrives at a listening TCP socket.
#[inline(always)]
fn to_listener(ctx: &SkBuffContext) -> bool {
    const TCP_LISTEN: u32 = 10;
    // SAFETY: `ctx.skb` is the kernel's `__sk_buff`; its `sk` field is read whole, checked
    // for null, and given to the helper, which returns a full socket or null.
    unsafe {
        let sk = core::ptr::read_volatile(&raw const (*ctx.skb.skb).__bindgen_anon_2.sk);
        if sk.is_null() {
            return false;
        }
        let full = aya_ebpf::helpers::generated::bpf_sk_fullsock(sk);
        !full.is_null() && core::ptr::read_volatile(&raw const (*full).state) == TCP_LISTEN
    }
}

/// Sockets the kernel establishes passively (accepted from a listener) are marked from their
/// establishment to their close: only they may send replies under the ingress rules.
#[sock_ops]
fn aw_sockops(ctx: SockOpsContext) -> u32 {
    ingress::track_passive(&ctx);
    1
}

/// No raw sockets in enforced cgroups: they would bypass the address hooks.
#[cgroup_sock(sock_create)]
fn aw_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock`.
    let (family, sock_type, protocol) = unsafe {
        let sk = ctx.sock;
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).type_),
            core::ptr::read_volatile(&raw const (*sk).protocol),
        )
    };
    if sock_type != SOCK_RAW {
        // Not a verdict: policy applies per flow, at connect, sendmsg and egress.
        return ALLOW;
    }
    let flow = Flow {
        cgroup_id: decide::current_cgroup_id(),
        orig: [0; 4],
        dst: [0; 4],
        port: 0,
        proto: protocol as u8,
        hook: Hook::SOCK_CREATE,
        sock_type: sock_type as u8,
        family: family as u8,
    };
    emit::count(agentwall_common::counters::RAW_SOCKET_DENIED);
    emit::event(
        &flow,
        &decide::Decision::deny(Reason::RAW_SOCKET, 0, 0),
        true,
    );
    DENY
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
