//! From a [`PolicySet`] to the kernel's rule nodes.
//!
//! Each egress rule becomes one rule id and, per destination and port range, one
//! [`PortRule`] entry at the destination's prefix. Destinations are put in the canonical
//! 16-byte form of [`agentwall_common::addr`]; a prefix that covers any loopback alias also
//! grants the canonical loopback address, which is all the kernel ever looks up for them.
//! Then every prefix node receives the entries of the shorter prefixes of its slot that cover
//! it, because a longest-prefix match returns only the most specific node.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
};

use agentwall_common::{
    addr::{self, Addr16, LOOPBACK, MAPPED_PREFIX_BITS},
    rules::{Limit, MAX_ENTRIES_PER_PREFIX, PortRule, RuleSet, flags as rule_flags, proto},
};
use ipnet::IpNet;
use serde::Serialize;

use super::{
    Access, EgressRule, Endpoint, Mode, PolicySet, PortRange, Problem, Protocol, RateLimit,
    RefKind, Source, window::Window,
};

/// The kernel form of `rate` for `rule` of `policy`. Its bucket is named by what the rule
/// says (the policy, the resource, the actions, the endpoints, the window, the rate) and by
/// `ordinal`, its place among the policy's rules that say the same: so a reload that keeps
/// the rule keeps the bucket's state (its rule id may change), a rule that changes starts a
/// fresh one, and no two rules share one.
fn limit_of(policy: &str, rule: &EgressRule, rate: RateLimit, ordinal: u32) -> Limit {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [
        policy.to_string(),
        bucket_text(rule, rate),
        ordinal.to_string(),
    ] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    let d = ctx.finish();
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.as_ref()[..4]);
    Limit::new(u32::from_le_bytes(b), rate.count, rate.per.seconds())
}

/// What names a rule's bucket, besides its policy and ordinal.
fn bucket_text(rule: &EgressRule, rate: RateLimit) -> String {
    let access = rule.access.as_ref();
    format!(
        "{}|{}|{:?}|{}|{rate}",
        access.map_or("", |a| a.resource.as_str()),
        access.map_or(String::new(), |a| a.actions.join(",")),
        rule.endpoints,
        rule.window
            .as_ref()
            .map_or(String::new(), ToString::to_string),
    )
}

/// What a rule id stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    pub id: u32,
    pub policy: String,
    pub source: Source,
    pub endpoints: Vec<Endpoint>,
    /// For a Unix socket rule: the socket name as the policy writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix: Option<String>,
    /// For a `rules:` entry: the resource, actions and conditions it grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateLimit>,
    /// The rule's own mode, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// For the addresses a host name of the rule resolved to: the name, and when the answer
    /// expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolution>,
}

/// Where a rule id's addresses came from: a host name, whose answer expires at
/// `until_boot_ns` (boot clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolution {
    pub name: String,
    pub until_boot_ns: u64,
}

/// Host name → its addresses, each with the instant (boot clock) its answer expires: what
/// the daemon resolved. A name without an entry grants nothing.
pub type Resolved = BTreeMap<String, Vec<(std::net::IpAddr, u64)>>;

/// The time window of a rule id (its spans are written with the generation, and again as
/// they pass), and the instant its resolved addresses expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowEntry {
    pub rule_id: u32,
    /// Always open if `None`.
    pub window: Option<Window>,
    /// Closed for good from this instant on (boot clock), if set.
    pub until_boot_ns: Option<u64>,
}

/// The rate limit of a rule id, as the kernel holds it (generation set when written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitEntry {
    pub rule_id: u32,
    pub slot: u32,
    pub limit: Limit,
}

/// One allowed Unix socket name of a slot (generation is set when it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixEntry {
    pub slot: u32,
    pub name: String,
    pub rule_id: u32,
}

/// One node of the rules trie (generation is set when it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub slot: u32,
    pub addr: Addr16,
    /// Prefix length over the 128-bit canonical address.
    pub bits: u32,
    pub set: RuleSet,
}

/// Which callers' policies may connect to which local ports of a callee's (generation is
/// set when it is written): the `agent:` rules of the caller naming the callee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub callee_slot: u32,
    pub caller_slot: u32,
    pub set: RuleSet,
}

/// A compiled policy set.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub nodes: Vec<Node>,
    /// Nodes of the ingress trie (peer prefixes → local TCP ports), for the policies with
    /// `ingress:` rules; each such slot has a node at prefix length 0.
    pub ingress: Vec<Node>,
    /// Callers admitted to callees on this host by who they are (`agent:` rules).
    pub peers: Vec<Peer>,
    /// Unix socket names, one entry per (slot, name): the first rule that names it.
    pub unix: Vec<UnixEntry>,
    /// Indexed by rule id - 1.
    pub rules: Vec<RuleInfo>,
    /// Rate limits of rule ids.
    pub limits: Vec<LimitEntry>,
    /// Time windows of rule ids.
    pub windows: Vec<WindowEntry>,
    /// Policy name → (slot, mode).
    pub policies: BTreeMap<String, (u32, Mode)>,
    /// Identity as the policy names it (full SPIFFE ID or path) → the policy governing it.
    pub identities: BTreeMap<String, Grant>,
}

/// What an identity is granted, and what its holder must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub policy: String,
    pub attest: super::Attest,
    pub source: Source,
}

impl Compiled {
    pub fn rule(&self, id: u32) -> Option<&RuleInfo> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }

    fn next_rule_id(&self) -> u32 {
        u32::try_from(self.rules.len() + 1).unwrap_or(u32::MAX)
    }

    fn add_unix(&mut self, slot: u32, name: &str, rule_id: u32) {
        if !self.unix.iter().any(|e| e.slot == slot && e.name == name) {
            self.unix.push(UnixEntry {
                slot,
                name: name.to_string(),
                rule_id,
            });
        }
    }

    /// Lets every process of an enforced cgroup, bound or not, revoked or not, reach the Unix
    /// socket `name`, as a rule of agentwall's own (`what` says which socket, for
    /// audit records): the enrollment socket, through which agents enroll, renew their
    /// certificates and fetch tokens.
    pub fn allow_unix_everywhere(&mut self, name: &str, what: &str) {
        let id = self.next_rule_id();
        self.rules.push(RuleInfo {
            id,
            policy: "(agentwall)".into(),
            source: Source {
                file: PathBuf::from(format!("<built in: {what}>")),
                line: 0,
                column: 0,
            },
            endpoints: Vec::new(),
            unix: Some(name.to_string()),
            access: None,
            rate: None,
            mode: None,
            window: None,
            resolved: None,
        });
        // Slot 0's names are open to every enforced cgroup, bound or not (ebpf/src/unix.rs).
        let slots: Vec<u32> = std::iter::once(0)
            .chain(self.policies.values().map(|(slot, _)| *slot))
            .collect();
        for slot in slots {
            self.add_unix(slot, name, id);
        }
    }
}

/// A destination in canonical form.
fn canonical(net: &IpNet) -> (Addr16, u32) {
    match net {
        IpNet::V4(n) => (
            addr::from_v4(n.network().octets()),
            MAPPED_PREFIX_BITS + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    }
}

/// `a` with every bit after the first `bits` cleared.
fn mask(a: &Addr16, bits: u32) -> Addr16 {
    let v = u128::from_be_bytes(*a);
    let m = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits.min(128))
    };
    (v & m).to_be_bytes()
}

/// Whether prefix (a, abits) contains prefix (b, bbits).
fn contains(a: &Addr16, abits: u32, b: &Addr16, bbits: u32) -> bool {
    abits <= bbits && mask(a, abits) == mask(b, abits)
}

/// Every address form that reaches loopback (see `agentwall_common::addr`), as prefixes.
fn loopback_aliases() -> [(Addr16, u32); 4] {
    [
        (addr::from_v4([127, 0, 0, 0]), MAPPED_PREFIX_BITS + 8),
        (addr::from_v4([0, 0, 0, 0]), 128),
        (std::net::Ipv6Addr::LOCALHOST.octets(), 128),
        (std::net::Ipv6Addr::UNSPECIFIED.octets(), 128),
    ]
}

fn proto_code(p: Protocol) -> u8 {
    match p {
        Protocol::Any => proto::ANY,
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Icmp => proto::ICMP,
    }
}

/// Entries of one node collected at most before it is refused (see `compile`).
const COLLECT_MAX: usize = 4 * MAX_ENTRIES_PER_PREFIX;

/// Prefix → (entries written for it, source of the first rule there), for one slot.
/// The nodes of one slot: a prefix → its entries and the first rule that wrote it. Keyed
/// by a fast hash, seeded at random: the keys are the policy directory's prefixes and the
/// addresses its host names resolved to (at most 64 a name), too few to flood it.
type SlotNodes<'a> = HashMap<(Addr16, u32), (Entries, &'a Source), foldhash::fast::RandomState>;
/// The entries of one prefix: most have one or two, kept in place.
type Entries = smallvec::SmallVec<[PortRule; 2]>;

/// Compiles `set`; `slot_of` gives each policy's identity slot (never 0). Host names grant
/// nothing (see [`compile_resolved`]).
pub fn compile(set: &PolicySet, slot_of: impl Fn(&str) -> u32) -> Result<Compiled, Vec<Problem>> {
    compile_resolved(set, slot_of, &Resolved::new())
}

/// Compiles `set` with the addresses its host names resolved to (`resolved`).
pub fn compile_resolved(
    set: &PolicySet,
    slot_of: impl Fn(&str) -> u32,
    resolved: &Resolved,
) -> Result<Compiled, Vec<Problem>> {
    let mut out = Compiled::default();
    out.rules.reserve(
        set.policies
            .iter()
            .map(|p| p.unix.len() + p.egress.len() + p.ingress.as_ref().map_or(0, Vec::len))
            .sum(),
    );
    let mut own: BTreeMap<u32, SlotNodes<'_>> = BTreeMap::new();
    let mut ingress_own: BTreeMap<u32, SlotNodes<'_>> = BTreeMap::new();
    // `agent:` rules: (caller's slot, rule id, the callee agent, the caller policy).
    let mut calls: Vec<(u32, u32, &str, &super::Policy, &EgressRule)> = Vec::new();
    for policy in &set.policies {
        let slot = slot_of(&policy.name);
        out.policies
            .insert(policy.name.clone(), (slot, policy.mode));
        if let Some(id) = &policy.identity {
            out.identities.insert(
                id.clone(),
                Grant {
                    policy: policy.name.clone(),
                    attest: policy.attest.clone(),
                    source: policy.source.clone(),
                },
            );
        }
        for rule in &policy.unix {
            let id = out.next_rule_id();
            out.rules.push(RuleInfo {
                id,
                policy: policy.name.clone(),
                source: rule.source.clone(),
                endpoints: Vec::new(),
                unix: Some(rule.name.clone()),
                access: None,
                rate: None,
                mode: None,
                window: None,
                resolved: None,
            });
            out.add_unix(slot, &rule.name, id);
        }
        let nodes = own.entry(slot).or_default();
        // Rules of this policy that say the same, by what names their buckets.
        let mut same: HashMap<String, u32> = HashMap::new();
        for rule in &policy.egress {
            let id = out.next_rule_id();
            out.rules.push(RuleInfo {
                id,
                policy: policy.name.clone(),
                source: rule.source.clone(),
                endpoints: rule.endpoints.clone(),
                unix: None,
                access: rule.access.clone(),
                rate: rule.rate,
                mode: rule.mode,
                window: rule.window.clone(),
                resolved: None,
            });
            if let Some(r) = &rule.service
                && r.kind == RefKind::Agent
            {
                calls.push((slot, id, r.name.as_str(), policy, rule));
            }
            let mut flags = 0;
            if let Some(rate) = rule.rate {
                flags |= rule_flags::LIMITED;
                let ordinal = same.entry(bucket_text(rule, rate)).or_insert(0);
                out.limits.push(LimitEntry {
                    rule_id: id,
                    slot,
                    limit: limit_of(&policy.name, rule, rate, *ordinal),
                });
                *ordinal += 1;
            }
            if let Some(w) = &rule.window {
                flags |= rule_flags::WINDOWED;
                out.windows.push(WindowEntry {
                    rule_id: id,
                    window: Some(w.clone()),
                    until_boot_ns: None,
                });
            }
            if flags != 0 && rule.mode == Some(Mode::Audit) {
                flags |= rule_flags::AUDIT;
            }
            for ep in &rule.endpoints {
                let ports: &[PortRange] = if ep.protocol == Protocol::Icmp {
                    &[]
                } else {
                    &ep.ports
                };
                let entry = PortRule {
                    rule_id: id,
                    proto: proto_code(ep.protocol),
                    flags,
                    ..PortRule::default()
                };
                add_entries(nodes, &ep.to, ports, &rule.source, entry);
                for name in &ep.names {
                    add_resolved(
                        &mut out,
                        nodes,
                        (slot, rule, id),
                        name,
                        resolved,
                        ports,
                        entry,
                    );
                }
            }
        }
        if let Some(ingress) = &policy.ingress {
            let nodes = ingress_own.entry(slot).or_default();
            // The slot judges ingress: every peer finds a node, empty unless a rule covers it.
            nodes
                .entry((Addr16::default(), 0))
                .or_insert_with(|| (Entries::new(), &policy.source));
            for rule in ingress {
                let id = out.next_rule_id();
                out.rules.push(RuleInfo {
                    id,
                    policy: policy.name.clone(),
                    source: rule.source.clone(),
                    endpoints: vec![Endpoint {
                        to: rule.from.clone(),
                        names: Vec::new(),
                        protocol: Protocol::Tcp,
                        ports: rule.ports.clone(),
                    }],
                    unix: None,
                    access: None,
                    rate: None,
                    mode: None,
                    window: None,
                    resolved: None,
                });
                let entry = PortRule {
                    rule_id: id,
                    proto: proto::TCP,
                    ..PortRule::default()
                };
                add_entries(nodes, &rule.from, &rule.ports, &rule.source, entry);
            }
        }
    }

    let mut problems = Vec::new();
    out.peers = compile_calls(set, &slot_of, &calls, &mut ingress_own, &mut problems);
    out.nodes = finish_nodes(&own, &out.policies, "policy.egress", &mut problems);
    out.ingress = finish_nodes(&ingress_own, &out.policies, "policy.ingress", &mut problems);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The addresses host name `name` of rule `id` (of the policy at `slot`) resolved to: one
/// rule id per answer, alike in all but its expiry, which the kernel enforces as a window
/// that closes at that instant (the rule's own window, if any, within it). A rate-limited
/// rule's ids share its bucket.
fn add_resolved<'a>(
    out: &mut Compiled,
    nodes: &mut SlotNodes<'a>,
    (slot, rule, id): (u32, &'a EgressRule, u32),
    name: &str,
    resolved: &Resolved,
    ports: &[PortRange],
    entry: PortRule,
) {
    let mut by_expiry: BTreeMap<u64, Vec<IpNet>> = BTreeMap::new();
    for (ip, until) in resolved.get(name).into_iter().flatten() {
        by_expiry.entry(*until).or_default().push(IpNet::from(*ip));
    }
    let limit = out.limits.iter().find(|l| l.rule_id == id).map(|l| l.limit);
    for (until, nets) in by_expiry {
        let derived = out.next_rule_id();
        let Some(mut info) = out.rule(id).cloned() else {
            return;
        };
        info.id = derived;
        info.resolved = Some(Resolution {
            name: name.to_string(),
            until_boot_ns: until,
        });
        out.rules.push(info);
        if let Some(limit) = limit {
            out.limits.push(LimitEntry {
                rule_id: derived,
                slot,
                limit,
            });
        }
        out.windows.push(WindowEntry {
            rule_id: derived,
            window: rule.window.clone(),
            until_boot_ns: Some(until),
        });
        let mut flags = entry.flags | rule_flags::WINDOWED | rule_flags::RESOLVED;
        if rule.mode == Some(Mode::Audit) {
            flags |= rule_flags::AUDIT;
        }
        add_entries(
            nodes,
            &nets,
            ports,
            &rule.source,
            PortRule {
                rule_id: derived,
                flags,
                ..entry
            },
        );
    }
}

/// The path of an identity as a policy or the agents catalog writes it: `agent/x/prod` of
/// `agent/x/prod`, `/agent/x/prod` and `spiffe://td/agent/x/prod`.
pub(crate) fn identity_path(id: &str) -> &str {
    let path = id
        .strip_prefix("spiffe://")
        .map_or(id, |rest| rest.split_once('/').map_or("", |(_, p)| p));
    path.trim_start_matches('/')
}

/// The callee ends of `agent:` rules (`calls`): a callee whose policy is in `set` judges
/// ingress, and admits each caller's policy (by who the caller is, on this host) to the ports
/// of its endpoints, and the caller's other hosts (`hosts:` of its own catalog entry) by
/// address.
fn compile_calls<'a>(
    set: &'a PolicySet,
    slot_of: &impl Fn(&str) -> u32,
    calls: &[(u32, u32, &str, &'a super::Policy, &'a EgressRule)],
    ingress_own: &mut BTreeMap<u32, SlotNodes<'a>>,
    problems: &mut Vec<Problem>,
) -> Vec<Peer> {
    // Identities are compared by their path: a policy may write the full SPIFFE ID of the
    // node's trust domain where the catalog writes the path, or the other way round.
    // Every policy of the path is a callee: were one left out (two trust domains writing
    // the same path), its cgroups would not be judged at all.
    let mut governed: HashMap<&str, Vec<&super::Policy>> = HashMap::new();
    for p in &set.policies {
        if let Some(id) = p.identity.as_deref() {
            governed.entry(identity_path(id)).or_default().push(p);
        }
    }
    let callees_of = |identity: &str| {
        governed
            .get(identity_path(identity))
            .map_or(&[][..], Vec::as_slice)
    };
    let agents: HashMap<&str, &super::Agent> =
        set.agents.iter().map(|a| (a.name.as_str(), a)).collect();
    let agent_of: HashMap<&str, &super::Agent> = set
        .agents
        .iter()
        .map(|a| (identity_path(&a.identity), a))
        .collect();
    // Every catalogued agent governed here judges who connects to it.
    for agent in &set.agents {
        for callee in callees_of(&agent.identity) {
            ingress_own
                .entry(slot_of(&callee.name))
                .or_default()
                .entry((Addr16::default(), 0))
                .or_insert_with(|| (Entries::new(), &callee.source));
        }
    }
    let mut pairs: BTreeMap<(u32, u32), (Vec<PortRule>, Source)> = BTreeMap::new();
    for &(caller_slot, rule_id, name, caller, rule) in calls {
        let Some(agent) = agents.get(name) else {
            continue;
        };
        // None: governed on another host, only the caller's egress is here.
        for callee in callees_of(&agent.identity) {
            add_call(
                slot_of(&callee.name),
                (caller_slot, rule_id, caller, rule),
                agent,
                &agent_of,
                &mut pairs,
                ingress_own,
            );
        }
    }
    finish_pairs(pairs, problems)
}

/// The callee end of one `agent:` rule (`rule`, id `rule_id`, of `caller` at `caller_slot`)
/// at the callee's slot: the caller's policy admitted to the agent's ports, and its other
/// hosts by address.
fn add_call<'a>(
    callee_slot: u32,
    (caller_slot, rule_id, caller, rule): (u32, u32, &'a super::Policy, &'a EgressRule),
    agent: &'a super::Agent,
    agent_of: &HashMap<&str, &'a super::Agent>,
    pairs: &mut BTreeMap<(u32, u32), (Vec<PortRule>, Source)>,
    ingress_own: &mut BTreeMap<u32, SlotNodes<'a>>,
) {
    let entry = PortRule {
        rule_id,
        proto: proto::TCP,
        ..PortRule::default()
    };
    let (entries, _) = pairs
        .entry((callee_slot, caller_slot))
        .or_insert_with(|| (Vec::new(), rule.source.clone()));
    let all = [PortRange::ALL];
    for ep in &agent.endpoints {
        let ranges = if ep.ports.is_empty() {
            &all[..]
        } else {
            &ep.ports[..]
        };
        for r in ranges {
            if !entries
                .iter()
                .any(|e| e.port_lo == r.lo && e.port_hi == r.hi)
            {
                entries.push(PortRule {
                    port_lo: r.lo,
                    port_hi: r.hi,
                    ..entry
                });
            }
        }
    }
    // The caller's calls from the other hosts it runs on.
    let own = caller
        .identity
        .as_deref()
        .and_then(|id| agent_of.get(identity_path(id)));
    if let Some(me) = own.filter(|me| !me.hosts.is_empty()) {
        let nodes = ingress_own.entry(callee_slot).or_default();
        for ep in &agent.endpoints {
            let remote = PortRule {
                flags: rule_flags::REMOTE_ONLY,
                ..entry
            };
            add_entries(nodes, &me.hosts, &ep.ports, &rule.source, remote);
        }
    }
}

/// The kernel's peer sets of `pairs`; a pair over the limit is a problem.
fn finish_pairs(
    pairs: BTreeMap<(u32, u32), (Vec<PortRule>, Source)>,
    problems: &mut Vec<Problem>,
) -> Vec<Peer> {
    let mut out = Vec::with_capacity(pairs.len());
    for ((callee_slot, caller_slot), (entries, source)) in pairs {
        if entries.len() > MAX_ENTRIES_PER_PREFIX {
            problems.push(Problem {
                file: source.file.clone(),
                line: Some(source.line),
                column: None,
                field: "policy.rules".into(),
                message: format!(
                    "the agent: rules of this policy give one callee {} port ranges; at most \
                     {MAX_ENTRIES_PER_PREFIX} fit. Merge the callee's endpoint ports.",
                    entries.len()
                ),
            });
            continue;
        }
        let mut set = RuleSet {
            len: entries.len() as u32,
            ..RuleSet::default()
        };
        set.entries[..entries.len()].copy_from_slice(&entries);
        out.push(Peer {
            callee_slot,
            caller_slot,
            set,
        });
    }
    out
}

/// Adds `entry`, once per port range of `ports` (every port if none), at each of `nets`.
fn add_entries<'a>(
    nodes: &mut SlotNodes<'a>,
    nets: &[IpNet],
    ports: &[PortRange],
    source: &'a Source,
    entry: PortRule,
) {
    let all = [PortRange::ALL];
    let ranges = if ports.is_empty() { &all[..] } else { ports };
    for net in nets {
        for r in ranges {
            let e = PortRule {
                port_lo: r.lo,
                port_hi: r.hi,
                ..entry
            };
            add_entry(nodes, net, source, e);
        }
    }
}

/// Adds `entry` at the canonical prefix of `net` in `nodes`, and at the canonical loopback
/// address too when the prefix covers a loopback alias (all the kernel ever looks up for
/// them).
fn add_entry<'a>(nodes: &mut SlotNodes<'a>, net: &IpNet, source: &'a Source, entry: PortRule) {
    let (a, bits) = canonical(net);
    let covers_alias = loopback_aliases()
        .iter()
        .any(|(la, lb)| contains(&a, bits, la, *lb) || contains(la, *lb, &a, bits));
    let also_loopback = covers_alias && !contains(&a, bits, &LOOPBACK, 128);
    let prefixes = [(a, bits), (LOOPBACK, 128)];
    for prefix in &prefixes[..if also_loopback { 2 } else { 1 }] {
        let (entries, _) = nodes
            .entry(*prefix)
            .or_insert_with(|| (Entries::new(), source));
        entries.push(entry);
    }
}

/// The kernel nodes of `own`: each prefix with the entries of the shorter prefixes of its
/// slot that cover it, in the order the kernel reads them. A node over the limit is a
/// problem of `field`.
fn finish_nodes(
    own: &BTreeMap<u32, SlotNodes<'_>>,
    policies: &BTreeMap<String, (u32, Mode)>,
    field: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Node> {
    let mut out = Vec::with_capacity(own.values().map(HashMap::len).sum());
    for (slot, nodes) in own {
        let lengths: Vec<u32> = {
            let mut l: Vec<u32> = nodes
                .keys()
                .map(|(_, b)| *b)
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            l.sort_unstable();
            l
        };
        let mut sorted: Vec<_> = nodes.iter().collect();
        sorted.sort_unstable_by_key(|((a, bits), _)| (*bits, *a));
        for ((a, bits), (entries, source)) in sorted {
            let all = node_entries(nodes, &lengths, a, *bits, entries);
            if all.len() > MAX_ENTRIES_PER_PREFIX {
                let policy = policies
                    .iter()
                    .find(|(_, (s, _))| s == slot)
                    .map(|(n, _)| n.as_str())
                    .unwrap_or("?");
                problems.push(Problem {
                    file: source.file.clone(),
                    line: Some(source.line),
                    column: None,
                    field: field.into(),
                    message: format!(
                        "policy {policy:?}: address {} is covered by at least {} (protocol, \
                         port range) entries, counting those of wider prefixes; at most \
                         {MAX_ENTRIES_PER_PREFIX} fit. Merge port ranges or split the policy.",
                        display_prefix(a, *bits),
                        all.len()
                    ),
                });
                continue;
            }
            let mut set = RuleSet {
                len: all.len() as u32,
                ..RuleSet::default()
            };
            set.entries[..all.len()].copy_from_slice(&all);
            out.push(Node {
                slot: *slot,
                addr: *a,
                bits: *bits,
                set,
            });
        }
    }
    out
}

/// The entries of the node at (`a`, `bits`): its own, then those of the covering prefixes,
/// most specific first (so the nearest rule id is reported), unconditional ones first.
fn node_entries(
    nodes: &SlotNodes<'_>,
    lengths: &[u32],
    a: &Addr16,
    bits: u32,
    entries: &[PortRule],
) -> Vec<PortRule> {
    let mut all: Vec<PortRule> = Vec::with_capacity(entries.len());
    // Entries with conditions (a limit, a window) are alternatives: each is kept once. A
    // node holds few entries (collection stops at COLLECT_MAX), so a scan finds a repeat
    // faster than a hash set would be built.
    let same = |e: &PortRule, f: &PortRule| {
        (e.proto, e.port_lo, e.port_hi) == (f.proto, f.port_lo, f.port_hi)
            && if e.flags == 0 {
                f.flags == 0
            } else {
                f.flags != 0 && f.rule_id == e.rule_id
            }
    };
    let push = |e: &PortRule, all: &mut Vec<PortRule>| {
        if !all.iter().any(|f| same(e, f)) {
            all.push(*e);
        }
    };
    // Collecting stops past four times the limit, so that a prefix many rules cover costs no
    // more than that (compilation stays linear); such a node is refused. Below that bound
    // every entry is collected before the shadowed ones go, so that no entry is left out
    // unseen (the limit is checked after).
    let full = |all: &Vec<PortRule>| all.len() > COLLECT_MAX;
    for e in entries {
        push(e, &mut all);
        if full(&all) {
            break;
        }
    }
    for l in lengths.iter().rev().filter(|l| **l < bits) {
        if full(&all) {
            break;
        }
        if let Some((inherited, _)) = nodes.get(&(mask(a, *l), *l)) {
            for e in inherited {
                push(e, &mut all);
                if full(&all) {
                    break;
                }
            }
        }
    }
    // Entries without conditions first: a destination that one rule grants outright is not
    // limited because another rule grants it with a limit or a window, and the kernel then
    // looks at conditions only when no unconditional entry matches.
    // Of those with conditions, the ones that only expire with their DNS answer come first:
    // the kernel tries two alternatives at most.
    all.sort_by_key(|e| match e.flags {
        0 => 0,
        f if f & !(rule_flags::WINDOWED | rule_flags::RESOLVED | rule_flags::AUDIT) == 0
            && f & rule_flags::RESOLVED != 0 =>
        {
            1
        }
        _ => 2,
    });
    // An entry with conditions behind an unconditional one of the same protocol and ports is
    // never consulted.
    if all.len() <= COLLECT_MAX && all.iter().any(|e| e.flags != 0) {
        let plain: Vec<(u8, u16, u16)> = all
            .iter()
            .filter(|e| e.flags == 0)
            .map(|e| (e.proto, e.port_lo, e.port_hi))
            .collect();
        all.retain(|e| e.flags == 0 || !plain.contains(&(e.proto, e.port_lo, e.port_hi)));
    }
    all
}

/// A canonical prefix as the user wrote it: IPv4 for the mapped range.
pub fn display_prefix(a: &Addr16, bits: u32) -> String {
    match addr::as_v4(a) {
        Some(v4) if bits >= MAPPED_PREFIX_BITS => {
            format!(
                "{}/{}",
                std::net::Ipv4Addr::from(v4),
                bits - MAPPED_PREFIX_BITS
            )
        }
        _ => format!("{}/{bits}", std::net::Ipv6Addr::from(*a)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::parse_texts;

    fn set(text: &str) -> PolicySet {
        parse_texts(&[(Path::new("p.yaml").to_path_buf(), text.to_string())]).unwrap()
    }

    fn slots(name: &str) -> u32 {
        match name {
            "a" => 1,
            "b" => 2,
            _ => 9,
        }
    }

    fn lookup(c: &Compiled, slot: u32, ip: &str, proto: u8, port: u16) -> Option<u32> {
        let a = match ip.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v) => addr::from_v4(v.octets()),
            std::net::IpAddr::V6(v) => v.octets(),
        };
        let a = addr::classify(a);
        // Longest prefix match, as the kernel trie does it.
        c.nodes
            .iter()
            .filter(|n| n.slot == slot && contains(&n.addr, n.bits, &a, 128))
            .max_by_key(|n| n.bits)
            .and_then(|n| n.set.find(proto, port))
    }

    #[test]
    fn longest_match_sees_inherited_entries() {
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: 10.0.0.0/8\n      protocol: tcp\n      ports: [443]\n    - to: 10.1.2.3\n      protocol: udp\n      ports: [53]\n"),
            slots,
        )
        .unwrap();
        assert_eq!(lookup(&c, 1, "10.1.2.3", proto::UDP, 53), Some(2));
        assert_eq!(
            lookup(&c, 1, "10.1.2.3", proto::TCP, 443),
            Some(1),
            "inherited from /8"
        );
        assert_eq!(lookup(&c, 1, "10.9.9.9", proto::TCP, 443), Some(1));
        assert_eq!(lookup(&c, 1, "10.9.9.9", proto::UDP, 53), None);
        assert_eq!(lookup(&c, 1, "11.0.0.1", proto::TCP, 443), None);
        assert_eq!(
            lookup(&c, 2, "10.9.9.9", proto::TCP, 443),
            None,
            "other slot"
        );
        assert_eq!(c.rule(2).unwrap().source.line, 7);
    }

    #[test]
    fn loopback_aliases_reach_the_canonical_node() {
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: 127.0.0.2\n      protocol: tcp\n      ports: [8080]\n"),
            slots,
        )
        .unwrap();
        for ip in [
            "127.0.0.1",
            "127.0.0.2",
            "127.3.4.5",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(lookup(&c, 1, ip, proto::TCP, 8080), Some(1), "{ip}");
            assert_eq!(lookup(&c, 1, ip, proto::TCP, 8081), None, "{ip}");
        }
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: ::1\n"),
            slots,
        )
        .unwrap();
        assert_eq!(lookup(&c, 1, "127.0.0.1", proto::UDP, 53), Some(1));
        // A wide IPv4 range that includes 127/8 covers loopback by itself.
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: 0.0.0.0/0\n"),
            slots,
        )
        .unwrap();
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(lookup(&c, 1, "::1", proto::TCP, 1), Some(1));
        assert_eq!(
            lookup(&c, 1, "2001:db8::1", proto::TCP, 1),
            None,
            "IPv4 range does not cover IPv6"
        );
        // A range beside loopback does not grant it.
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: 126.0.0.0/8\n"),
            slots,
        )
        .unwrap();
        assert_eq!(lookup(&c, 1, "127.0.0.1", proto::TCP, 1), None);
    }

    #[test]
    fn mapped_ipv6_and_ipv4_rules_agree() {
        let c = compile(&set("policy:\n  name: a\n  egress:\n    - to: ::ffff:10.0.0.0/104\n      protocol: tcp\n"), slots).unwrap();
        assert_eq!(lookup(&c, 1, "10.2.3.4", proto::TCP, 1), Some(1));
        assert_eq!(lookup(&c, 1, "::ffff:10.2.3.4", proto::TCP, 1), Some(1));
    }

    #[test]
    fn too_many_entries_is_an_error_with_a_line() {
        let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let text = format!(
            "policy:\n  name: a\n  egress:\n    - to: 10.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
            ports.join(", ")
        );
        let e = compile(&set(&text), slots).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(4));
        assert!(
            e[0].message.contains("10.0.0.1/32") && e[0].message.contains("17"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn duplicate_entries_collapse() {
        let c = compile(
            &set("policy:\n  name: a\n  egress:\n    - to: 10.0.0.0/8\n      protocol: tcp\n      ports: [443]\n    - to: 10.0.0.0/24\n      protocol: tcp\n      ports: [443]\n"),
            slots,
        )
        .unwrap();
        let n = c.nodes.iter().find(|n| n.bits == 96 + 24).unwrap();
        assert_eq!(n.set.len, 1);
        assert_eq!(n.set.entries[0].rule_id, 2);
    }

    #[test]
    fn unix_names_are_entries_per_slot_with_their_rule() {
        let mut c = compile(
            &set("policy:\n  name: a\n  egress:\n    - unix: [/run/x.sock, \"@y\"]\n    - unix: /run/x.sock\n---\npolicy:\n  name: b\n  egress:\n    - unix: /run/x.sock\n"),
            slots,
        )
        .unwrap();
        let got: Vec<(u32, &str, u32)> = c
            .unix
            .iter()
            .map(|e| (e.slot, e.name.as_str(), e.rule_id))
            .collect();
        // One entry per (slot, name): the first rule that names it.
        assert_eq!(
            got,
            [(1, "/run/x.sock", 1), (1, "@y", 2), (2, "/run/x.sock", 4)]
        );
        assert_eq!(c.rule(2).unwrap().unix.as_deref(), Some("@y"));
        assert!(c.nodes.is_empty(), "no network rule");
        c.allow_unix_everywhere("/run/agentwall/enroll.sock", "the enrollment socket");
        let id = c.rules.len() as u32;
        let everywhere: Vec<u32> = c
            .unix
            .iter()
            .filter(|e| e.name == "/run/agentwall/enroll.sock" && e.rule_id == id)
            .map(|e| e.slot)
            .collect();
        assert_eq!(everywhere, [0, 1, 2], "slot 0 and every policy's slot");
        assert_eq!(
            c.rule(id).unwrap().source.to_string(),
            "<built in: the enrollment socket>:0"
        );
    }

    #[test]
    fn empty_egress_compiles_to_no_nodes() {
        let c = compile(&set("policy:\n  name: b\n"), slots).unwrap();
        assert!(c.nodes.is_empty());
        assert_eq!(c.policies.get("b"), Some(&(2, Mode::Enforce)));
    }

    #[test]
    fn display_prefixes() {
        assert_eq!(
            display_prefix(&addr::from_v4([10, 0, 0, 0]), 104),
            "10.0.0.0/8"
        );
        assert_eq!(
            display_prefix(&std::net::Ipv6Addr::LOCALHOST.octets(), 128),
            "::1/128"
        );
    }

    /// Golden: a rate-limited service rule compiles to limited entries behind unlimited ones,
    /// and one limit per rule, whose bucket survives a reload that keeps the rule.
    #[test]
    fn rate_limited_rules_compile_to_flagged_entries_and_limits() {
        let text = "\
service:
  name: slack
  endpoints:
    - to: 127.0.0.11
      protocol: tcp
      ports: [443]
---
policy:
  name: a
  rules:
    - resource: service:slack
      actions: [write:message]
      rateLimit: 10 per minute
    - resource: cidr:127.0.0.0/24
      protocol: tcp
      ports: [443]
      rateLimit: 2/s
      mode: audit
    - resource: cidr:127.0.0.11
      protocol: tcp
      ports: [8443]
    - resource: cidr:127.0.0.12
      protocol: tcp
      ports: [443]
    - resource: cidr:127.0.0.12
      protocol: tcp
      ports: [443]
      rateLimit: 1/s
";
        let c = compile(&set(text), slots).unwrap();
        assert_eq!(c.limits.len(), 3);
        assert_eq!((c.limits[0].rule_id, c.limits[0].slot), (1, 1));
        assert_eq!(c.limits[0].limit.rate.interval_ns, 6_000_000_000);
        assert_eq!(c.limits[0].limit.rate.tolerance_ns, 54_000_000_000);
        assert_eq!(c.limits[1].rule_id, 2);
        assert_ne!(c.limits[0].limit.bucket, c.limits[1].limit.bucket);
        let node = c
            .nodes
            .iter()
            .find(|n| n.slot == 1 && n.addr == addr::from_v4([127, 0, 0, 11]) && n.bits == 128)
            .unwrap();
        let entries: Vec<(u32, u8)> = node.set.entries[..node.set.len as usize]
            .iter()
            .map(|e| (e.rule_id, e.flags))
            .collect();
        // The unlimited rule 3 first, then the limited alternatives for 443 in rule order (the
        // kernel tries rule 2's bucket when rule 1's is empty).
        assert_eq!(
            entries,
            [
                (3, 0),
                (1, rule_flags::LIMITED),
                (2, rule_flags::LIMITED | rule_flags::AUDIT)
            ]
        );
        let at_24 = c
            .nodes
            .iter()
            .find(|n| n.slot == 1 && n.bits == 96 + 24)
            .unwrap();
        assert_eq!(
            at_24.set.entries[0].flags,
            rule_flags::LIMITED | rule_flags::AUDIT
        );
        // An address that one rule grants without a limit is not limited by another's (the
        // limited entries behind it are left out).
        let twelve = c
            .nodes
            .iter()
            .find(|n| n.slot == 1 && n.addr == addr::from_v4([127, 0, 0, 12]))
            .unwrap();
        let entries: Vec<(u32, u8)> = twelve.set.entries[..twelve.set.len as usize]
            .iter()
            .map(|e| (e.rule_id, e.flags))
            .collect();
        assert_eq!(entries, [(4, 0)]);
        let info = c.rule(1).unwrap();
        assert_eq!(info.access.as_ref().unwrap().actions, ["write:message"]);
        assert_eq!(info.rate.unwrap().to_string(), "10 per minute");
        // The same rule in a reloaded directory (another id) keeps its bucket.
        let reordered = text.replace("  rules:\n", "  rules:\n    - resource: cidr:10.0.0.1\n");
        let c2 = compile(&set(&reordered), slots).unwrap();
        assert_eq!(c2.limits[0].rule_id, 2);
        assert_eq!(c2.limits[0].limit.bucket, c.limits[0].limit.bucket);
    }

    /// Entries an unconditional rule shadows go after all are collected: a node with many
    /// of them keeps the entries of wider prefixes it inherits (none is cut off unseen).
    #[test]
    fn shadowed_entries_do_not_crowd_out_inherited_ones() {
        let ports: Vec<String> = (8001..=8009).map(|p| p.to_string()).collect();
        let text = format!(
            "service:\n  name: api\n  endpoints:\n    - to: 10.0.0.5\n      protocol: tcp\n      ports: [{}]\n---\npolicy:\n  name: a\n  rules:\n    - resource: service:api\n      rateLimit: 5/s\n    - resource: service:api\n      actions: [read]\n    - resource: cidr:10.0.0.0/8\n      protocol: udp\n      ports: [53]\n",
            ports.join(", ")
        );
        let c = compile(&set(&text), slots).unwrap();
        assert_eq!(
            lookup(&c, 1, "10.0.0.5", proto::UDP, 53),
            Some(3),
            "inherited"
        );
        for p in 8001..=8009 {
            assert_eq!(
                lookup(&c, 1, "10.0.0.5", proto::TCP, p),
                Some(2),
                "port {p}: the unlimited rule"
            );
        }
    }

    /// Two rules never share a bucket: not a read and a write rule on one resource, not two
    /// rules that say the same thing.
    #[test]
    fn every_limited_rule_has_a_bucket_of_its_own() {
        let text = "policy:\n  name: a\n  rules:\n    - resource: cidr:10.0.0.1\n      actions: [read]\n      rateLimit: 5/s\n    - resource: cidr:10.0.0.1\n      actions: [write]\n      rateLimit: 5/s\n    - resource: cidr:10.0.0.1\n      actions: [write]\n      rateLimit: 5/s\n    - resource: cidr:10.0.0.1\n      protocol: tcp\n      ports: [80]\n      rateLimit: 5/s\n";
        let c = compile(&set(text), slots).unwrap();
        let buckets: HashSet<u32> = c.limits.iter().map(|l| l.limit.bucket).collect();
        assert_eq!(buckets.len(), 4, "{:?}", c.limits);
    }

    /// Ingress rules compile to a trie of their own: a policy with them gets a node at prefix
    /// length 0 (so every peer finds a node), and each peer prefix its local ports; a policy
    /// without them gets no node at all.
    #[test]
    fn ingress_rules_compile_to_peer_prefixes_with_local_ports() {
        let c = compile(
            &set("policy:\n  name: a\n  ingress:\n    - from: 10.1.0.0/16\n      ports: [8443]\n    - from: 127.0.0.1\n      ports: [\"9000-9009\"]\n---\npolicy:\n  name: b\n  ingress: []\n---\npolicy:\n  name: c\n"),
            slots,
        )
        .unwrap();
        let find = |slot: u32, ip: &str, port: u16| {
            let a = match ip.parse::<std::net::IpAddr>().unwrap() {
                std::net::IpAddr::V4(v) => addr::from_v4(v.octets()),
                std::net::IpAddr::V6(v) => v.octets(),
            };
            let a = addr::classify(a);
            c.ingress
                .iter()
                .filter(|n| n.slot == slot && contains(&n.addr, n.bits, &a, 128))
                .max_by_key(|n| n.bits)
                .map(|n| n.set.find(proto::TCP, port))
        };
        assert_eq!(find(1, "10.1.2.3", 8443), Some(Some(1)));
        assert_eq!(find(1, "10.1.2.3", 8444), Some(None), "judged, refused");
        assert_eq!(
            find(1, "10.2.0.1", 8443),
            Some(None),
            "the root node: judged, refused"
        );
        assert_eq!(
            find(1, "::1", 9005),
            Some(Some(2)),
            "loopback forms are one"
        );
        assert_eq!(
            find(2, "10.1.2.3", 8443),
            Some(None),
            "an empty list refuses all"
        );
        assert_eq!(
            find(9, "10.1.2.3", 8443),
            None,
            "no ingress key: not judged"
        );
        assert!(c.nodes.is_empty(), "no egress node");
        assert_eq!(c.rule(1).unwrap().source.line, 4);
    }

    /// An `agent:` rule compiles to both ends: the caller's egress to the agent's endpoints,
    /// and a peer entry that admits the caller's policy to the callee's ports; the callee,
    /// governed here, judges ingress even without `ingress:`; the caller's other hosts are
    /// admitted by address.
    #[test]
    fn agent_rules_compile_to_the_callers_egress_and_the_callees_ingress() {
        let text = "\
agent:
  name: b/prod
  endpoints:
    - to: 127.0.0.20
      ports: [8443, \"9000-9001\"]
---
agent:
  name: a/prod
  endpoints:
    - to: 10.0.0.1
      ports: [80]
  hosts: [10.9.0.0/16]
---
agent:
  name: elsewhere/prod
  endpoints:
    - to: 10.7.7.7
      ports: [443]
---
policy:
  name: a
  identity: agent/a/prod
  rules:
    - resource: agent:b/prod
    - resource: agent:elsewhere/prod
---
policy:
  name: b
  identity: spiffe://example.org/agent/b/prod
";
        // The callee's policy writes its full ID, the catalog the path: the same identity.
        let c = compile(&set(text), slots).unwrap();
        // The caller's egress: TCP to the callee's endpoints, by its rule.
        assert_eq!(lookup(&c, 1, "127.0.0.20", proto::TCP, 8443), Some(1));
        assert_eq!(lookup(&c, 1, "127.0.0.20", proto::TCP, 9001), Some(1));
        assert_eq!(lookup(&c, 1, "127.0.0.20", proto::UDP, 8443), None);
        assert_eq!(lookup(&c, 1, "10.7.7.7", proto::TCP, 443), Some(2));
        // The callee admits the caller's policy, on this host, to its ports.
        assert_eq!(c.peers.len(), 1, "{:?}", c.peers);
        let peer = &c.peers[0];
        assert_eq!((peer.callee_slot, peer.caller_slot), (2, 1));
        assert_eq!(peer.set.find(proto::TCP, 8443), Some(1));
        assert_eq!(peer.set.find(proto::TCP, 9000), Some(1));
        assert_eq!(peer.set.find(proto::TCP, 80), None);
        // It judges ingress: a root node; the caller's other hosts reach its ports.
        let root = c.ingress.iter().find(|n| n.slot == 2 && n.bits == 0);
        assert_eq!(root.map(|n| n.set.len), Some(0));
        let from_hosts = c
            .ingress
            .iter()
            .find(|n| n.slot == 2 && n.addr == addr::from_v4([10, 9, 0, 0]))
            .unwrap();
        assert_eq!(from_hosts.set.find(proto::TCP, 8443), Some(1));
        assert_eq!(from_hosts.set.find(proto::TCP, 22), None);
        // Only from elsewhere: a process of this host at such an address is no caller there.
        assert_eq!(
            from_hosts
                .set
                .find_skipping(proto::TCP, 8443, rule_flags::REMOTE_ONLY),
            None
        );
        // The caller serves too (it is in the catalog): it judges ingress, and no one calls it.
        assert!(c.ingress.iter().any(|n| n.slot == 1 && n.bits == 0));
        assert!(c.peers.iter().all(|p| p.callee_slot != 1));
        assert_eq!(c.rule(1).unwrap().source.line, 24);
    }

    /// Each answer of a host name compiles to a rule id of its own, alike but for its expiry,
    /// which the kernel enforces as a window; a rate-limited rule's ids share its bucket; a
    /// name without an answer grants nothing.
    #[test]
    fn resolved_names_compile_to_expiring_rule_ids() {
        let text = "service:\n  name: wh\n  endpoints:\n    - to: [wh.example, unknown.example]\n      protocol: tcp\n      ports: [9000]\n---\npolicy:\n  name: a\n  rules:\n    - resource: service:wh\n      rateLimit: 10 per minute\n";
        let mut resolved = Resolved::new();
        resolved.insert(
            "wh.example".into(),
            vec![
                ("10.1.0.1".parse().unwrap(), 5_000),
                ("10.1.0.2".parse().unwrap(), 9_000),
            ],
        );
        let c = compile_resolved(&set(text), slots, &resolved).unwrap();
        assert_eq!(c.rules.len(), 3, "the rule, and one id per answer");
        let old = lookup(&c, 1, "10.1.0.1", proto::TCP, 9000).unwrap();
        let new = lookup(&c, 1, "10.1.0.2", proto::TCP, 9000).unwrap();
        assert_ne!(old, new);
        assert_eq!(
            c.rule(old).unwrap().resolved,
            Some(Resolution {
                name: "wh.example".into(),
                until_boot_ns: 5_000
            })
        );
        assert_eq!(c.rule(old).unwrap().source, c.rule(1).unwrap().source);
        let w = c.windows.iter().find(|w| w.rule_id == new).unwrap();
        assert_eq!((w.window.clone(), w.until_boot_ns), (None, Some(9_000)));
        let bucket = |id: u32| c.limits.iter().find(|l| l.rule_id == id).unwrap().limit;
        assert_eq!(bucket(old), bucket(1));
        assert_eq!(bucket(new), bucket(1));
        assert_eq!(lookup(&c, 1, "10.1.0.3", proto::TCP, 9000), None);
        // Without answers, nothing.
        let bare = compile(&set(text), slots).unwrap();
        assert!(bare.nodes.is_empty());
    }

    /// Two policies whose identities share a path (two trust domains): both are the callee,
    /// both judge who connects; neither is left unjudged.
    #[test]
    fn every_policy_of_an_agents_path_judges_its_ingress() {
        let text = "agent:\n  name: b/prod\n  endpoints:\n    - to: 127.0.0.20\n      ports: [8443]\n---\npolicy:\n  name: a\n  rules:\n    - resource: agent:b/prod\n---\npolicy:\n  name: b\n  identity: spiffe://one.example/agent/b/prod\n---\npolicy:\n  name: c\n  identity: agent/b/prod\n";
        let slots = |n: &str| match n {
            "a" => 1,
            "b" => 2,
            _ => 3,
        };
        let c = compile(&set(text), slots).unwrap();
        for callee in [2, 3] {
            assert!(c.ingress.iter().any(|n| n.slot == callee && n.bits == 0));
            assert!(
                c.peers
                    .iter()
                    .any(|p| p.callee_slot == callee && p.caller_slot == 1)
            );
        }
    }
}
