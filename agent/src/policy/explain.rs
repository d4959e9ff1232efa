//! `agentwall policy explain`: what the kernel would say of a connect, and the decision API of
//! an action, for an identity, read from the compiled rules exactly as the kernel reads them
//! (the same classification, the same longest-prefix node, the same entry order), so that an
//! explanation and a verdict agree. A test connects for real and compares.

use std::net::IpAddr;

use agentwall_common::{
    addr,
    rules::{PortRule, flags, proto},
};
use jiff::Timestamp;
use serde::Serialize;

use super::{
    Compiled, Protocol,
    compile::{Node, display_prefix},
    decide::{Answer, Query},
};

/// What the kernel would do with a connect (or addressed send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelVerdict {
    pub allow: bool,
    /// The deciding rule: the one that allows, or the first whose condition denies.
    pub rule_id: Option<u32>,
    /// `file:line` of that rule.
    pub rule: Option<String>,
    /// `rule`, `no_rule`, `outside_window`; for a rate-limited rule, `rule` and `limited`.
    pub reason: String,
    /// The rule's rate limit, which a connect takes a token from (the explanation assumes
    /// one is left).
    pub limited: Option<String>,
    /// Allowed only because of audit mode.
    pub audit: bool,
    /// The destination as the kernel judges it, and the node that matched.
    pub judged_as: String,
    pub node: Option<String>,
}

/// An explanation: the kernel's verdict and, with an action, the decision API's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub policy: String,
    pub kernel: KernelVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Answer>,
}

fn proto_code(p: Protocol) -> u8 {
    match p {
        Protocol::Any | Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Icmp => proto::ICMP,
    }
}

/// The kernel's verdict for policy `policy` (slot `slot`) on `dst:port` over `protocol`, at
/// wall time `at` (for windows).
pub fn kernel(
    compiled: &Compiled,
    policy: &str,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
    at: Timestamp,
) -> KernelVerdict {
    let audit_policy = compiled
        .policies
        .get(policy)
        .is_some_and(|(_, m)| *m == super::Mode::Audit);
    let slot = compiled.policies.get(policy).map_or(0, |(s, _)| *s);
    let raw = match dst {
        IpAddr::V4(v) => addr::from_v4(v.octets()),
        IpAddr::V6(v) => v.octets(),
    };
    let a = addr::classify(raw);
    let judged_as = display_prefix(&a, 128)
        .trim_end_matches("/128")
        .trim_end_matches("/32")
        .to_string();
    let node: Option<&Node> = compiled
        .nodes
        .iter()
        .filter(|n| n.slot == slot && contains(&n.addr, n.bits, &a))
        .max_by_key(|n| n.bits);
    let p = proto_code(protocol);
    let entries: &[PortRule] = node.map_or(&[], |n| &n.set.entries[..n.set.len as usize]);
    let rule_of = |id: u32| compiled.rule(id).map(|r| r.source.to_string());
    let mut verdict = KernelVerdict {
        allow: false,
        rule_id: None,
        rule: None,
        reason: "no_rule".into(),
        limited: None,
        audit: false,
        judged_as,
        node: node.map(|n| display_prefix(&n.addr, n.bits)),
    };
    let matching: Vec<&PortRule> = entries.iter().filter(|e| e.matches(p, port)).collect();
    // As the kernel: the first match if unconditional; else the first two alternatives.
    let conditional = |e: &PortRule| e.flags & (flags::LIMITED | flags::WINDOWED) != 0;
    let candidates: Vec<&PortRule> = match matching.first() {
        None => Vec::new(),
        Some(first) if !conditional(first) => vec![*first],
        Some(first) => std::iter::once(*first)
            .chain(
                matching
                    .iter()
                    .copied()
                    .find(|e| e.rule_id != first.rule_id && e.flags != 0),
            )
            .collect(),
    };
    let mut failed: Option<u32> = None;
    let mut any_audit = false;
    for e in candidates {
        let info = compiled.rule(e.rule_id);
        let window_closed = e.flags & flags::WINDOWED != 0
            && info
                .and_then(|r| r.window.as_ref())
                .is_none_or(|w| w.spans(at, 1).first().is_none_or(|(s, _)| *s > at));
        if window_closed {
            failed.get_or_insert(e.rule_id);
            any_audit |= e.flags & flags::AUDIT != 0;
            continue;
        }
        verdict.allow = true;
        verdict.rule_id = Some(e.rule_id);
        verdict.rule = rule_of(e.rule_id);
        verdict.reason = "rule".into();
        verdict.limited = info.and_then(|r| r.rate).map(|r| r.to_string());
        return verdict;
    }
    if let Some(id) = failed {
        verdict.rule_id = Some(id);
        verdict.rule = rule_of(id);
        verdict.reason = "outside_window".into();
        verdict.allow = any_audit || audit_policy;
        verdict.audit = verdict.allow;
    } else if audit_policy {
        verdict.allow = true;
        verdict.audit = true;
    }
    verdict
}

/// Whether prefix (`p`, `bits`) contains address `a`.
fn contains(p: &addr::Addr16, bits: u32, a: &addr::Addr16) -> bool {
    let m = |x: &addr::Addr16| {
        let v = u128::from_be_bytes(*x);
        if bits == 0 {
            0
        } else {
            v & (u128::MAX << (128 - bits.min(128)))
        }
    };
    m(p) == m(a)
}

/// The kernel's verdict, and the decision API's answer for `action` if given.
pub fn explain(
    compiled: &Compiled,
    policy: &str,
    dst: (IpAddr, u16, Protocol),
    q: Option<&Query>,
    at: Timestamp,
) -> Explanation {
    Explanation {
        policy: policy.to_string(),
        kernel: kernel(compiled, policy, dst.0, dst.1, dst.2, at),
        decision: q.map(|q| super::decide::decide(compiled, policy, q, at, |_, _| true)),
    }
}

/// Who asks for a connection, for [`ingress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process of this host under the policy named: it connects from a loopback address,
    /// and the callee's kernel knows who it is.
    Local(String),
    /// A peer at this address.
    Address(IpAddr),
}

/// What the kernel would do with a TCP connection `peer` asks of local port `port` of a
/// process under `policy`: its ingress rules by the peer's address (entries for a caller's
/// other hosts count only for a peer that is not on this host), then, for a process of this
/// host, the callers its policy's `agent:` rules admit.
pub fn ingress(compiled: &Compiled, policy: &str, peer: &Peer, port: u16) -> KernelVerdict {
    let slot = compiled.policies.get(policy).map_or(0, |(s, _)| *s);
    let audit_policy = compiled
        .policies
        .get(policy)
        .is_some_and(|(_, m)| *m == super::Mode::Audit);
    let (raw, local, caller) = match peer {
        Peer::Local(name) => (
            addr::LOOPBACK,
            true,
            compiled.policies.get(name).map(|(s, _)| *s),
        ),
        Peer::Address(IpAddr::V4(v)) => (addr::from_v4(v.octets()), false, None),
        Peer::Address(IpAddr::V6(v)) => (v.octets(), false, None),
    };
    let a = addr::classify(raw);
    // A loopback address is this host, whatever the caller says.
    let local = local || a == addr::LOOPBACK;
    let judged_as = match peer {
        Peer::Local(name) => format!("a process of this host under policy {name}"),
        Peer::Address(_) => display_prefix(&a, 128)
            .trim_end_matches("/128")
            .trim_end_matches("/32")
            .to_string(),
    };
    let mut verdict = KernelVerdict {
        allow: true,
        rule_id: None,
        rule: None,
        reason: "not_judged".into(),
        limited: None,
        audit: false,
        judged_as,
        node: None,
    };
    let node: Option<&Node> = compiled
        .ingress
        .iter()
        .filter(|n| n.slot == slot && contains(&n.addr, n.bits, &a))
        .max_by_key(|n| n.bits);
    let Some(node) = node else {
        // No ingress node: the policy does not judge who connects.
        return verdict;
    };
    verdict.node = Some(display_prefix(&node.addr, node.bits));
    let skip = if local { flags::REMOTE_ONLY } else { 0 };
    let by_address = node.set.find_skipping(proto::TCP, port, skip);
    let by_caller = || {
        let caller = caller?;
        compiled
            .peers
            .iter()
            .find(|p| p.callee_slot == slot && p.caller_slot == caller)?
            .set
            .find(proto::TCP, port)
    };
    match by_address.or_else(by_caller) {
        Some(id) => {
            verdict.rule_id = Some(id);
            verdict.rule = compiled.rule(id).map(|r| r.source.to_string());
            verdict.reason = "rule".into();
        }
        None => {
            verdict.allow = audit_policy;
            verdict.audit = audit_policy;
            verdict.reason = "no_rule".into();
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{compile, parse_texts};

    fn compiled() -> Compiled {
        let text = "\
service:
  name: api
  endpoints:
    - to: 127.0.0.20
      protocol: tcp
      ports: [8443]
---
policy:
  name: p
  rules:
    - resource: service:api
      actions: [read]
      rateLimit: 5 per minute
    - resource: cidr:10.0.0.0/8
      protocol: udp
      ports: [\"5000-5999\"]
      when: { hours: \"09:00-17:00\" }
  egress:
    - to: 10.1.0.0/16
      protocol: tcp
      ports: [22]
";
        let set = parse_texts(&[(PathBuf::from("p.yaml"), text.to_string())]).unwrap();
        compile(&set, |_| 1).unwrap()
    }

    #[test]
    fn the_explanation_names_the_node_the_rule_and_the_condition() {
        let c = compiled();
        let noon: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let night: Timestamp = "2026-12-07T20:00:00Z".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Every loopback form is the canonical one, as in the kernel.
        let v = kernel(&c, "p", ip("127.0.0.20"), 8443, Protocol::Tcp, noon);
        assert!(v.allow);
        assert_eq!(v.rule.as_deref(), Some("p.yaml:11"));
        assert_eq!(v.limited.as_deref(), Some("5 per minute"));
        assert_eq!(v.judged_as, "127.0.0.1");
        let v = kernel(&c, "p", ip("::1"), 8443, Protocol::Tcp, noon);
        assert!(v.allow, "{v:?}");
        let v = kernel(&c, "p", ip("127.0.0.20"), 8444, Protocol::Tcp, noon);
        assert_eq!((v.allow, v.reason.as_str()), (false, "no_rule"));
        // The window.
        let v = kernel(&c, "p", ip("10.2.3.4"), 5500, Protocol::Udp, noon);
        assert!(v.allow && v.rule.as_deref() == Some("p.yaml:14"), "{v:?}");
        let v = kernel(&c, "p", ip("10.2.3.4"), 5500, Protocol::Udp, night);
        assert_eq!((v.allow, v.reason.as_str()), (false, "outside_window"));
        assert_eq!(v.node.as_deref(), Some("10.0.0.0/8"));
        // The longest prefix holds the wider rule's entries too.
        let v = kernel(&c, "p", ip("10.1.2.3"), 5500, Protocol::Udp, noon);
        assert!(v.allow);
        assert_eq!(v.node.as_deref(), Some("10.1.0.0/16"));
        let v = kernel(&c, "p", ip("10.1.2.3"), 22, Protocol::Tcp, night);
        assert_eq!(v.rule.as_deref(), Some("p.yaml:19"));
        let e = explain(
            &c,
            "p",
            (ip("127.0.0.20"), 8443, Protocol::Tcp),
            Some(&Query {
                resource: "service:api".into(),
                action: "write".into(),
                attributes: Default::default(),
            }),
            noon,
        );
        assert!(e.kernel.allow);
        assert!(!e.decision.unwrap().allow, "the action is not granted");
    }

    /// Ingress as the kernel reads it: the address trie first (entries for a caller's other
    /// hosts only for peers elsewhere), then the callers the `agent:` rules admit.
    #[test]
    fn ingress_explains_addresses_and_callers() {
        let text = "agent:\n  name: b/prod\n  endpoints:\n    - to: 127.0.0.20\n      ports: [8443]\n---\nagent:\n  name: a/prod\n  endpoints:\n    - to: 10.0.0.1\n      ports: [80]\n  hosts: [10.9.0.0/16]\n---\npolicy:\n  name: a\n  identity: agent/a/prod\n  rules:\n    - resource: agent:b/prod\n---\npolicy:\n  name: b\n  identity: agent/b/prod\n  ingress:\n    - from: 192.0.2.0/24\n      ports: [22]\n---\npolicy:\n  name: c\n";
        let set =
            crate::policy::parse_texts(&[(std::path::PathBuf::from("p.yaml"), text.to_string())])
                .unwrap();
        let slots = |n: &str| match n {
            "a" => 1,
            "b" => 2,
            _ => 3,
        };
        let c = crate::policy::compile(&set, slots).unwrap();
        let local = |p: &str, port| ingress(&c, "b", &Peer::Local(p.into()), port);
        let v = local("a", 8443);
        assert!(v.allow);
        assert_eq!(v.rule.as_deref(), Some("p.yaml:18"));
        assert!(!local("a", 22).allow, "not its port");
        assert!(!local("c", 8443).allow, "not its caller");
        let from = |ip: &str, port| ingress(&c, "b", &Peer::Address(ip.parse().unwrap()), port);
        assert!(from("10.9.1.1", 8443).allow, "the caller's other host");
        assert!(!from("10.9.1.1", 22).allow);
        assert_eq!(from("192.0.2.7", 22).rule.as_deref(), Some("p.yaml:24"));
        assert!(
            !from("127.0.0.1", 8443).allow,
            "this host: by who, not where"
        );
        // A policy that judges no ingress.
        let v = ingress(&c, "c", &Peer::Address("10.1.1.1".parse().unwrap()), 1);
        assert!(v.allow);
        assert_eq!(v.reason, "not_judged");
    }
}
