//! Indices of the per-CPU counter array. Every error path in the kernel programs counts here,
//! and the daemon exports each counter in status and metrics.

/// Flows (connects, datagrams, socket creations) allowed by a rule.
pub const ALLOWED: u32 = 0;
/// Flows denied, for any reason.
pub const DENIED: u32 = 1;
/// Policy denials let through because the binding is in audit mode.
pub const AUDIT_PASSED: u32 = 2;
/// Events that could not be written because the ring buffer was full.
pub const EVENTS_DROPPED: u32 = 3;
/// Lookups of a cgroup with no binding (denied).
pub const NO_BINDING: u32 = 4;
/// The policy state entry could not be read, or no policy was ever loaded (denied).
pub const NO_POLICY: u32 = 5;
/// Packets dropped by the egress backstop.
pub const SKB_DROPPED: u32 = 6;
/// Packets passed by the egress backstop.
pub const SKB_PASSED: u32 = 7;
/// Packets the backstop could not parse (dropped).
pub const SKB_UNPARSED: u32 = 8;
/// Raw sockets refused at creation.
pub const RAW_SOCKET_DENIED: u32 = 9;
/// Bare TCP resets (no payload) the backstop let out of a denied flow, so that the peer of a
/// destroyed socket learns the connection ended.
pub const RST_PASSED: u32 = 10;
/// Connects and sends denied by a rule's rate limit.
pub const RATE_LIMITED: u32 = 11;
/// Uses of a rule with conditions whose limit, bucket or window the programs could not
/// read, or whose bucket stayed contended (denied).
pub const CONDITION_ERRORS: u32 = 12;
/// Flows denied because the rule's time window was closed.
pub const OUTSIDE_WINDOW: u32 = 13;
/// TCP connections refused by a policy's ingress rules (their SYN dropped).
pub const INGRESS_DENIED: u32 = 14;
/// Sockets accepted from a listener that the passive sockets map had no room for: their
/// replies are denied.
pub const PASSIVE_UNTRACKED: u32 = 15;
/// Inbound packets to a listener of a cgroup whose policy judges ingress that could not be
/// read as TCP (IPv4 options, IPv6 extension headers, unparsed): dropped.
pub const INGRESS_UNPARSED: u32 = 16;
/// SYNs of enforced cgroups whose caller could not be recorded for the callee (see
/// `crate::peers`): an agent-to-agent connect they start is refused by the callee's ingress.
pub const CALLERS_UNRECORDED: u32 = 17;
/// Number of counters; the size of the array.
pub const COUNT: u32 = 18;

/// Names in index order, as exported in status and metrics.
pub const NAMES: [&str; COUNT as usize] = [
    "allowed",
    "denied",
    "audit_passed",
    "events_dropped",
    "no_binding",
    "no_policy",
    "skb_dropped",
    "skb_passed",
    "skb_unparsed",
    "raw_socket_denied",
    "rst_passed",
    "rate_limited",
    "condition_errors",
    "outside_window",
    "ingress_denied",
    "passive_untracked",
    "ingress_unparsed",
    "callers_unrecorded",
];

/// What each counter counts, in index order: the HELP text of its metric.
pub const HELP: [&str; COUNT as usize] = [
    "Flows (connects, datagrams, socket creations) allowed by a rule",
    "Flows denied, for any reason",
    "Policy denials let through because the binding is in audit mode",
    "Events that could not be written because the ring buffer was full, per CPU",
    "Lookups of a cgroup with no binding (denied)",
    "Flows denied because no policy state could be read or none was ever loaded",
    "Packets dropped by the egress backstop",
    "Packets passed by the egress backstop",
    "Packets the egress backstop could not parse (dropped)",
    "Raw and packet sockets refused at creation",
    "Bare TCP resets the egress backstop let out of a denied flow",
    "Connects and sends denied by a rule's rate limit",
    "Uses of a rule whose limit, bucket or window could not be read, or whose bucket stayed contended (denied)",
    "Flows denied because the rule's time window was closed",
    "TCP connections refused by a policy's ingress rules (their SYN dropped)",
    "Sockets accepted from a listener that the passive sockets map had no room for (their replies are denied)",
    "Inbound packets to a listener judged on ingress that could not be read as TCP (dropped)",
    "SYNs whose caller could not be recorded for the callee (the callee's ingress refuses them)",
];
