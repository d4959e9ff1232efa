//! A kernel verdict as the daemon names it (`EventRecord`), and the summary of the verdicts
//! an event budget held back (`VerdictSummary`): what the event reader makes, the audit log
//! stores and `agentwall events` streams.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use agentwall_common::{
    addr::{self, Addr16},
    event::{Event, Hook, Reason},
    rules::proto,
};
use serde::{Deserialize, Serialize};

pub mod unix_names;

/// A decoded verdict, as logged and streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Wall-clock time, RFC 3339.
    pub time: String,
    pub hook: String,
    pub verdict: String,
    pub reason: String,
    pub cgroup_id: u64,
    /// 0 on the egress hook (the sending task is not known there).
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub protocol: String,
    pub family: String,
    /// Destination as judged (loopback aliases folded to 127.0.0.1).
    pub dst: Option<IpAddr>,
    /// Destination as the caller gave it.
    pub dst_given: Option<IpAddr>,
    /// The Unix socket named, on the Unix hooks: a path, or `@name` for an abstract one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<String>,
    pub port: u16,
    pub rule_id: u32,
    /// `file:line` of the rule that allowed (or whose rate limit denied).
    pub rule: Option<String>,
    pub policy: Option<String>,
    /// The SPIFFE ID the cgroup enrolled with, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    pub slot: u32,
    pub generation: u32,
}

/// Whether the hook's record names a Unix socket (`agentwall_common::unix::UnixEvent`).
pub(crate) fn is_unix(hook: Hook) -> bool {
    hook == Hook::CONNECT_UNIX || hook == Hook::SENDMSG_UNIX
}

/// Resolves slots and rule ids to names; the daemon supplies its current rule book.
pub trait Resolve {
    fn policy(&self, slot: u32) -> Option<String>;
    fn rule(&self, generation: u32, rule_id: u32) -> Option<String>;
    /// The SPIFFE ID a cgroup is bound to by enrollment.
    fn identity(&self, _cgroup_id: u64) -> Option<String> {
        None
    }
    /// Remembers a Unix socket name a verdict record of the cgroup carried (see
    /// [`unix_names`]).
    fn learn_unix_name(&self, _cgroup_id: u64, _name: &[u8]) {}
    /// The name of a Unix socket summarized by its first bytes and its length.
    fn unix_name(&self, _cgroup_id: u64, prefix: &[u8; 16], len: u16) -> String {
        unix_names::UnixNames::default().name(0, prefix, len)
    }
}

/// The address in the form a user would write: IPv4 for the mapped range.
pub fn display_addr(a: &Addr16) -> IpAddr {
    match addr::as_v4(a) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::V6(Ipv6Addr::from(*a)),
    }
}

pub(crate) fn code_name(name: Option<&'static str>, raw: u8) -> String {
    name.map_or_else(|| format!("unknown({raw})"), str::to_string)
}

pub(crate) fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        0 => "any".into(),
        n => n.to_string(),
    }
}

pub(crate) fn family_name(f: u8) -> String {
    match f {
        1 => "unix".into(),
        2 => "ipv4".into(),
        10 => "ipv6".into(),
        0 => String::new(),
        n => n.to_string(),
    }
}

/// Converts `CLOCK_BOOTTIME` timestamps to wall-clock time, with the clocks read once (per
/// batch of events, not per event).
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    now_boot: Duration,
    now_wall: SystemTime,
}

impl BootClock {
    pub fn now() -> Self {
        Self {
            now_boot: Duration::from_nanos(crate::clock::boot_ns()),
            now_wall: SystemTime::now(),
        }
    }

    pub fn wall(&self, ts_boot_ns: u64) -> SystemTime {
        let ts = Duration::from_nanos(ts_boot_ns);
        if ts <= self.now_boot {
            self.now_wall
                .checked_sub(self.now_boot - ts)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            // An event stamped after the clocks were read (the batch goes on meanwhile).
            self.now_wall + (ts - self.now_boot)
        }
    }
}

impl EventRecord {
    pub fn decode(e: &Event, names: &dyn Resolve) -> Self {
        Self::decode_at(e, names, BootClock::now().wall(e.ts_boot_ns))
    }

    /// Decodes an event that happened at `at` (wall clock).
    pub fn decode_at(e: &Event, names: &dyn Resolve, at: SystemTime) -> Self {
        let comm_len = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
        let has_addr =
            e.hook != Hook::SOCK_CREATE && e.reason != Reason::UNPARSED && !is_unix(e.hook);
        Self {
            time: humantime::format_rfc3339_micros(at).to_string(),
            hook: code_name(e.hook.name(), e.hook.0),
            verdict: code_name(e.verdict.name(), e.verdict.0),
            reason: code_name(e.reason.name(), e.reason.0),
            cgroup_id: e.cgroup_id,
            pid: e.pid_tgid as u32,
            tgid: (e.pid_tgid >> 32) as u32,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            protocol: proto_name(e.proto),
            family: family_name(e.family),
            dst: has_addr.then(|| display_addr(&e.addr)),
            dst_given: has_addr.then(|| display_addr(&e.orig_addr)),
            unix: None,
            port: e.port,
            rule_id: e.rule_id,
            rule: (e.rule_id != 0)
                .then(|| names.rule(e.generation, e.rule_id))
                .flatten(),
            policy: (e.slot != 0).then(|| names.policy(e.slot)).flatten(),
            spiffe_id: names.identity(e.cgroup_id),
            slot: e.slot,
            generation: e.generation,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One agent's verdicts held back in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictSummary {
    /// The end of the window, RFC 3339.
    pub time: String,
    pub window_start: String,
    /// The cgroup; none for the cgroups without a binding, which share one budget (each
    /// flow names its cgroup).
    pub cgroup_id: Option<u64>,
    pub policy: Option<String>,
    pub spiffe_id: Option<String>,
    /// 0, or the number of a further record of the same window and cgroup that lists more
    /// allowed flows (its totals are 0: they are the first record's).
    #[serde(skip_serializing_if = "is_zero")]
    pub part: u32,
    /// Every verdict held back in the window, exactly. The flows' counts add up to it but
    /// for `unattributed`, and for verdicts at the window's edges, which one window may
    /// count in its total and the next in its flows: over consecutive windows the totals
    /// are exact.
    pub suppressed: u64,
    pub flows: Vec<SummaryFlow>,
    /// Denied flows past the `events::summary::MAX_DENIED_FLOWS` listed, and their verdicts.
    pub other_flows: u64,
    pub other_count: u64,
    /// Verdicts in `suppressed` whose flow was not kept (the kernel's table of flows was
    /// full, or the verdict was counted while its flow was being read).
    pub unattributed: u64,
}

/// One flow of a summary: what a verdict record would have said, but for the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryFlow {
    pub cgroup_id: u64,
    pub hook: String,
    pub verdict: String,
    pub reason: String,
    pub protocol: String,
    pub family: String,
    /// The destination as judged; none on the Unix hooks and for socket creations.
    pub dst: Option<IpAddr>,
    pub port: u16,
    /// On the Unix hooks, the socket name (see `events::unix_names`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    pub count: u64,
    pub first: String,
    pub last: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentwall_common::event::Verdict;

    #[test]
    fn a_verdict_serializes_with_its_time_first() {
        // The audit writer keeps a record's own time only when it leads the object
        // (`audit::sink::encode`); otherwise it would stamp the queueing time.
        let r = EventRecord::decode(&raw(), &Names);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.starts_with("{\"time\":"), "{json}");
    }

    struct Names;
    impl Resolve for Names {
        fn policy(&self, slot: u32) -> Option<String> {
            (slot == 3).then(|| "web".to_string())
        }
        fn rule(&self, generation: u32, rule_id: u32) -> Option<String> {
            (generation == 7 && rule_id == 2).then(|| "policies/web.yaml:9".to_string())
        }
    }

    fn raw() -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            ts_boot_ns: 1,
            cgroup_id: 42,
            pid_tgid: (100u64 << 32) | 101,
            addr: addr::LOOPBACK,
            orig_addr: addr::from_v4([127, 0, 0, 2]),
            rule_id: 2,
            slot: 3,
            generation: 7,
            port: 8080,
            hook: Hook::CONNECT6,
            proto: proto::TCP,
            verdict: Verdict::ALLOW,
            reason: Reason::RULE,
            sock_type: 1,
            family: 10,
            _pad: [0; 4],
            comm,
        }
    }

    #[test]
    fn decodes_every_field() {
        let r = EventRecord::decode(&raw(), &Names);
        assert_eq!(r.hook, "connect6");
        assert_eq!(r.verdict, "allow");
        assert_eq!(r.reason, "rule");
        assert_eq!(r.cgroup_id, 42);
        assert_eq!((r.tgid, r.pid), (100, 101));
        assert_eq!(r.comm, "curl");
        assert_eq!(r.protocol, "tcp");
        assert_eq!(r.family, "ipv6");
        assert_eq!(r.dst, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(r.dst_given, Some("127.0.0.2".parse().unwrap()));
        assert_eq!(r.port, 8080);
        assert_eq!(r.rule.as_deref(), Some("policies/web.yaml:9"));
        assert_eq!(r.policy.as_deref(), Some("web"));
    }

    #[test]
    fn unknown_codes_are_shown_not_trusted() {
        let mut e = raw();
        e.hook = Hook(77);
        e.reason = Reason(99);
        e.verdict = Verdict(5);
        e.rule_id = 0;
        let r = EventRecord::decode(&e, &Names);
        assert_eq!(r.hook, "unknown(77)");
        assert_eq!(r.reason, "unknown(99)");
        assert_eq!(r.verdict, "unknown(5)");
        assert_eq!(r.rule, None);
    }

    #[test]
    fn decodes_from_ring_bytes() {
        let e = raw();
        // SAFETY: `Event` is plain old data; viewing it as bytes is what the kernel writes.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const e).cast::<u8>(), size_of::<Event>()) };
        let back = Event::from_bytes(bytes).unwrap();
        assert_eq!(back, e);
        let r = EventRecord::decode(&back, &Names);
        assert_eq!(r.port, 8080);
    }
}
