//! `agentwall policy diff`: what a change to a policy directory grants and takes away, per
//! policy and identity, in words a reviewer of a policy pull request can check.
//!
//! Each rule is described whole (its resource and the endpoints it reaches, its actions and
//! conditions, its rate limit, its window, its mode), so a change to a catalog service shows
//! under every policy that names it, as access removed and access granted.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{EgressRule, Endpoint, Mode, Policy, PolicySet, Protocol};

/// What changed for one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    pub policy: String,
    /// The identity it governs, in the new set if it is there.
    pub identity: Option<String>,
    /// `added`, `removed` or `changed`.
    pub change: String,
    /// Access the new set grants that the old did not.
    pub granted: Vec<String>,
    /// Access the old set granted that the new does not.
    pub removed: Vec<String>,
    /// Other changes: mode, identity, attestation selectors.
    pub other: Vec<String>,
}

fn endpoint_text(e: &Endpoint) -> String {
    let to: Vec<String> =
        e.to.iter()
            .map(ToString::to_string)
            .chain(e.names.iter().cloned())
            .collect();
    let proto = match e.protocol {
        Protocol::Any => "any protocol",
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
    };
    let ports = if e.ports.is_empty() || e.protocol == Protocol::Icmp {
        String::new()
    } else {
        let p: Vec<String> = e.ports.iter().map(ToString::to_string).collect();
        format!(" port {}", p.join(", "))
    };
    format!("{} {proto}{ports}", to.join(", "))
}

/// One rule in words.
fn rule_text(r: &EgressRule) -> String {
    let endpoints: Vec<String> = r.endpoints.iter().map(endpoint_text).collect();
    let mut s = match &r.access {
        Some(a) if endpoints.is_empty() => a.resource.clone(),
        Some(a) => format!("{} ({})", a.resource, endpoints.join("; ")),
        None => format!("egress to {}", endpoints.join("; ")),
    };
    if let Some(a) = &r.access {
        if a.actions.is_empty() {
            s.push_str(": every action");
        } else {
            s.push_str(&format!(": {}", a.actions.join(", ")));
        }
        for (k, v) in &a.conditions {
            s.push_str(&format!(" where {k} is {}", v.join(" or ")));
        }
    }
    if let Some(rate) = r.rate {
        s.push_str(&format!("; at most {rate}"));
    }
    if let Some(secs) = r.access.as_ref().and_then(|a| a.lease) {
        s.push_str(&format!("; leases of {secs} s"));
    }
    if let Some(w) = &r.window {
        s.push_str(&format!("; only {w}"));
    }
    if r.mode == Some(Mode::Audit) {
        s.push_str("; its limits in audit mode");
    }
    s
}

fn grants(p: &Policy) -> BTreeSet<String> {
    let ingress = p.ingress.iter().flatten().map(|r| {
        format!(
            "ingress from {}",
            endpoint_text(&Endpoint {
                to: r.from.clone(),
                names: Vec::new(),
                protocol: Protocol::Tcp,
                ports: r.ports.clone(),
            })
        )
    });
    p.egress
        .iter()
        .map(rule_text)
        .chain(p.unix.iter().map(|u| format!("unix socket {}", u.name)))
        .chain(ingress)
        .collect()
}

/// The changes from `old` to `new`, one entry per policy that changed, by name.
pub fn diff(old: &PolicySet, new: &PolicySet) -> Vec<PolicyDiff> {
    let by_name = |s: &PolicySet| -> BTreeMap<String, Policy> {
        s.policies
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect()
    };
    let (old, new) = (by_name(old), by_name(new));
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let (o, n) = (old.get(name), new.get(name));
        let (og, ng) = (
            o.map(grants).unwrap_or_default(),
            n.map(grants).unwrap_or_default(),
        );
        let mut d = PolicyDiff {
            policy: name.clone(),
            identity: n.or(o).and_then(|p| p.identity.clone()),
            change: match (o, n) {
                (None, _) => "added",
                (_, None) => "removed",
                _ => "changed",
            }
            .into(),
            granted: ng.difference(&og).cloned().collect(),
            removed: og.difference(&ng).cloned().collect(),
            other: Vec::new(),
        };
        if let (Some(o), Some(n)) = (o, n) {
            if o.mode != n.mode {
                d.other.push(format!("mode {} → {}", o.mode, n.mode));
            }
            if o.identity != n.identity {
                d.other.push(format!(
                    "identity {} → {}",
                    o.identity.as_deref().unwrap_or("(none)"),
                    n.identity.as_deref().unwrap_or("(none)")
                ));
            }
            if o.ingress.is_some() != n.ingress.is_some() {
                d.other.push(if n.ingress.is_some() {
                    "inbound connections now judged by ingress rules".into()
                } else {
                    "inbound connections no longer judged".into()
                });
            }
            if o.attest != n.attest {
                d.other.push(format!(
                    "attestation selectors {:?} → {:?}",
                    o.attest, n.attest
                ));
            }
        } else if let Some(p) = n.or(o)
            && p.mode == Mode::Audit
        {
            d.other.push("in audit mode".into());
        }
        let changed = d.change != "changed"
            || !d.granted.is_empty()
            || !d.removed.is_empty()
            || !d.other.is_empty();
        if changed {
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::parse_texts;

    fn set(files: &[(&str, &str)]) -> PolicySet {
        let f: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(n, t)| (PathBuf::from(n), t.to_string()))
            .collect();
        parse_texts(&f).unwrap()
    }

    const CATALOG: &str = "service:\n  name: slack\n  endpoints:\n    - to: 10.0.0.11\n      protocol: tcp\n      ports: [443]\n";

    #[test]
    fn a_change_reads_as_access_granted_and_removed() {
        let old = set(&[
            ("c.yaml", CATALOG),
            (
                "p.yaml",
                "policy:\n  name: pipe\n  identity: agent/pipe/prod\n  rules:\n    - resource: service:slack\n      actions: [write:message]\n      conditions: { channels: [\"#alerts\"] }\n      rateLimit: 10 per minute\n  egress:\n    - to: 10.9.0.0/16\n      protocol: tcp\n      ports: [22]\n---\npolicy:\n  name: gone\n",
            ),
        ]);
        let new = set(&[
            ("c.yaml", &CATALOG.replace("10.0.0.11", "10.0.0.12")),
            (
                "p.yaml",
                "policy:\n  name: pipe\n  identity: agent/pipe/prod\n  mode: audit\n  rules:\n    - resource: service:slack\n      actions: [write:message]\n      conditions: { channels: [\"#alerts\"] }\n      rateLimit: 10 per minute\n  egress:\n    - to: 10.9.0.0/16\n      protocol: tcp\n      ports: [22]\n---\npolicy:\n  name: fresh\n  egress:\n    - unix: /run/x.sock\n",
            ),
        ]);
        let d = diff(&old, &new);
        let names: Vec<(&str, &str)> = d
            .iter()
            .map(|p| (p.policy.as_str(), p.change.as_str()))
            .collect();
        assert_eq!(
            names,
            [("fresh", "added"), ("gone", "removed"), ("pipe", "changed")]
        );
        let pipe = &d[2];
        assert_eq!(pipe.identity.as_deref(), Some("agent/pipe/prod"));
        // The catalog moved the service: the same rule, another address.
        assert_eq!(
            pipe.granted,
            [
                "service:slack (10.0.0.12/32 tcp port 443): write:message where channels is #alerts; at most 10 per minute"
            ]
        );
        assert_eq!(
            pipe.removed,
            [
                "service:slack (10.0.0.11/32 tcp port 443): write:message where channels is #alerts; at most 10 per minute"
            ]
        );
        assert_eq!(pipe.other, ["mode enforce → audit"]);
        assert_eq!(d[0].granted, ["unix socket /run/x.sock"]);
        assert!(d[1].granted.is_empty() && d[1].removed.is_empty());
        // Nothing changed: nothing listed.
        assert!(diff(&new, &new).is_empty());
    }
}
