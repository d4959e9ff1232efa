//! The record every kernel verdict writes to the event ring buffer, and its codes.

use crate::addr::Addr16;

macro_rules! code {
    ($(#[$m:meta])* $name:ident { $($(#[$cm:meta])* $c:ident = $v:expr, $s:expr;)* }) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name(pub u8);
        impl $name {
            $($(#[$cm])* pub const $c: Self = Self($v);)*
            /// Stable lower-case name, or `None` for a value this version does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 { $($v => Some($s),)* _ => None }
            }
        }
    };
}

code!(
    /// The kernel hook that judged.
    Hook {
        CONNECT4 = 1, "connect4";
        CONNECT6 = 2, "connect6";
        SENDMSG4 = 3, "sendmsg4";
        SENDMSG6 = 4, "sendmsg6";
        EGRESS = 5, "egress";
        SOCK_CREATE = 6, "sock_create";
        /// The task-scoped connect hook (BPF LSM `socket_connect`), which judges sockets
        /// the cgroup hooks do not see: those created outside the task's cgroup.
        LSM_CONNECT = 7, "lsm_connect";
        /// The task-scoped send hook (BPF LSM `socket_sendmsg`), likewise.
        LSM_SENDMSG = 8, "lsm_sendmsg";
        /// A Unix socket connect (`cgroup/connect_unix`); the record is a
        /// [`crate::unix::UnixEvent`] that names the socket.
        CONNECT_UNIX = 9, "connect_unix";
        /// A Unix datagram sent to a named socket (`cgroup/sendmsg_unix`); likewise.
        SENDMSG_UNIX = 10, "sendmsg_unix";
        /// A TCP connection asked of an enforced cgroup's listener (`cgroup_skb/ingress`, the
        /// SYN): the record's address and port are the peer's address and the local port.
        INGRESS = 11, "ingress";
    }
);

code!(
    /// What the hook did.
    Verdict {
        DENY = 0, "deny";
        ALLOW = 1, "allow";
    }
);

code!(
    /// Why.
    Reason {
        /// A rule allowed it ([`Event::rule_id`] names it).
        RULE = 1, "rule";
        /// No rule of the cgroup's identity covers the destination, protocol and port.
        NO_RULE = 2, "no_rule";
        /// The cgroup is enforced but has no binding.
        NO_BINDING = 3, "no_binding";
        /// No policy generation is active (or the state map could not be read).
        NO_POLICY = 4, "no_policy";
        /// The cgroup is quarantined.
        DENY_ALL = 5, "deny_all";
        /// The binding's certificate expired.
        EXPIRED = 6, "expired";
        /// The identity was revoked.
        REVOKED = 7, "revoked";
        /// The binding carries flags this version does not know.
        BAD_BINDING = 8, "bad_binding";
        /// A raw socket was refused.
        RAW_SOCKET = 9, "raw_socket";
        /// A policy denial let through because the binding is in audit mode.
        AUDIT = 10, "audit";
        /// The egress backstop could not parse the packet.
        UNPARSED = 12, "unparsed";
        /// The audit log cannot be written and the configured rule is to deny meanwhile.
        AUDIT_DOWN = 13, "audit_down";
        /// An address family enforced tasks may not use (not IP, Unix or netlink).
        FAMILY = 14, "family";
        /// The LSM hooks could not read the socket (kernel layout unknown or a read failed).
        UNREADABLE = 15, "unreadable";
        /// An IPv4 packet with options (they can hold a source route past the destination the
        /// header names), or an IPv6 packet with hop-by-hop or destination options or a
        /// fragment header (which a routing header can follow), from an enforced cgroup.
        IP_OPTIONS = 16, "ip_options";
        /// An IPv6 packet with a routing header (its final destination is not the header's).
        ROUTING_HEADER = 17, "routing_header";
        /// The rule that grants the destination has a rate limit, and the identity's bucket
        /// for it is empty ([`Event::rule_id`] names the rule).
        RATE_LIMITED = 18, "rate_limited";
        /// Over a rule's rate limit, let through because the rule or the binding is in
        /// audit mode ([`Event::rule_id`] names the rule).
        RATE_AUDIT = 19, "rate_audit";
        /// The rule that grants the destination has a time window, and it is closed
        /// ([`Event::rule_id`] names the rule).
        OUTSIDE_WINDOW = 20, "outside_window";
        /// Outside a rule's time window, let through because the rule or the binding is in
        /// audit mode.
        WINDOW_AUDIT = 21, "window_audit";
        /// A rule's limit, bucket or window could not be read (denied, whatever the mode).
        CONDITION_ERROR = 22, "condition_error";
        /// A packet of a TCP connection the policy's ingress rules let the peer open: a reply
        /// ([`Event::rule_id`] names the ingress rule).
        REPLY = 23, "reply";
    }
);

/// One verdict, as written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_boot_ns: u64,
    pub cgroup_id: u64,
    /// `tgid << 32 | pid`; 0 on the egress hook, which may run outside the sender's context.
    pub pid_tgid: u64,
    /// Destination after classification ([`crate::addr::classify`]).
    pub addr: Addr16,
    /// Destination as the caller gave it (mapped form for IPv4).
    pub orig_addr: Addr16,
    /// Rule that allowed (or whose rate limit denied), or 0.
    pub rule_id: u32,
    pub slot: u32,
    pub generation: u32,
    /// Destination port, host order; 0 where there is none.
    pub port: u16,
    pub hook: Hook,
    /// IP protocol number.
    pub proto: u8,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Socket type (`SOCK_STREAM` = 1, `SOCK_DGRAM` = 2, `SOCK_RAW` = 3), 0 if unknown.
    pub sock_type: u8,
    /// Address family the caller used (`AF_UNIX` = 1, `AF_INET` = 2, `AF_INET6` = 10).
    pub family: u8,
    pub _pad: [u8; 4],
    /// Command name of the calling task, NUL-padded; empty on the egress hook.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Event>() == 96);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

impl Event {
    /// Reads an event from ring buffer bytes, or `None` if there are too few of them.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length is checked above; `Event` is `repr(C)`, made of integers, byte
        // arrays and `u8` newtypes, so every bit pattern is valid; `read_unaligned` makes no
        // alignment assumption about the ring buffer slice.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_names_and_unknowns_do_not() {
        assert_eq!(Hook::CONNECT6.name(), Some("connect6"));
        assert_eq!(Verdict::DENY.name(), Some("deny"));
        assert_eq!(Reason::NO_RULE.name(), Some("no_rule"));
        assert_eq!(Hook(0).name(), None);
        assert_eq!(Reason(200).name(), None);
        assert_eq!(Verdict(2).name(), None);
    }

    #[test]
    fn from_bytes_rejects_short_input() {
        assert!(Event::from_bytes(&[0u8; 95]).is_none());
        let e = Event::from_bytes(&[0u8; 96]).unwrap();
        assert_eq!(e.verdict, Verdict::DENY);
    }

    #[test]
    fn layout() {
        assert_eq!(core::mem::offset_of!(Event, addr), 24);
        assert_eq!(core::mem::offset_of!(Event, rule_id), 56);
        assert_eq!(core::mem::offset_of!(Event, port), 68);
        assert_eq!(core::mem::offset_of!(Event, comm), 80);
    }
}
