//! From YAML text to validated [`Policy`] values, with file, line and field for every problem.
//!
//! Size: one pass over the YAML with a check per field, each with its error text; about 210
//! lines are tests.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::spiffe::SpiffeId;

use super::{
    Access, Agent, Attest, EgressRule, Endpoint, IngressRule, Mode, Per, Policy, PortRange,
    Problem, Protocol, RateLimit, RefKind, Service, ServiceRef, Source, UnixRule,
    spans::Spans,
    window::{self, Window},
};

const MAX_NAME_LEN: usize = 63;

/// The `apiVersion` a file may name.
pub(super) const API_VERSION: &str = "agentwall.dev/v1";

/// One YAML document: a policy or a catalog service, optionally with Kubernetes-style
/// `apiVersion` and `kind`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    policy: Option<RawPolicy>,
    #[serde(default)]
    service: Option<RawService>,
    #[serde(default)]
    agent: Option<RawAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    hosts: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    #[serde(default)]
    to: Option<OneOrMany>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    #[serde(default)]
    days: Option<OneOrMany>,
    #[serde(default)]
    hours: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    resource: String,
    #[serde(default)]
    actions: Option<OneOrMany>,
    #[serde(default)]
    conditions: std::collections::BTreeMap<String, OneOrMany>,
    #[serde(default, rename = "rateLimit")]
    rate_limit: Option<String>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    when: Option<RawWhen>,
    /// Only for `cidr:` resources.
    #[serde(default)]
    protocol: Option<Protocol>,
    /// Only for `cidr:` resources.
    #[serde(default)]
    ports: Vec<RawPort>,
    /// Only for `secret:` resources: how long a fetched secret's lease lasts.
    #[serde(default)]
    lease: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    attest: Option<RawAttest>,
    #[serde(default)]
    egress: Vec<RawEgress>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    ingress: Option<Vec<RawIngress>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngress {
    #[serde(default)]
    from: Option<OneOrMany>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttest {
    #[serde(default)]
    uid: Option<Ids>,
    #[serde(default)]
    gid: Option<Ids>,
    #[serde(default)]
    exe: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    cgroup: Option<String>,
    #[serde(default)]
    systemd_unit: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

impl Ids {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(v) => vec![v],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    to: Option<OneOrMany>,
    #[serde(default)]
    unix: Option<OneOrMany>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

/// Collects problems of one document, locating each field through the spans.
struct Checker<'a> {
    file: &'a Path,
    spans: &'a Spans,
    doc: usize,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    /// Where `field` was written.
    fn source(&self, field: &str) -> Source {
        let at = self.spans.at(self.doc, field);
        Source {
            file: PathBuf::from(self.file),
            line: at.map_or(1, |a| a.line),
            column: at.map_or(0, |a| a.column),
        }
    }

    fn problem(&mut self, field: String, message: String) {
        let at = self.spans.at(self.doc, &field);
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line: at.map(|a| a.line),
            column: at.map(|a| a.column),
            field,
            message,
        });
    }
}

/// What one file holds.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub(super) policies: Vec<Policy>,
    pub(super) services: Vec<Service>,
    pub(super) agents: Vec<Agent>,
}

/// Parses every document of one file.
pub(super) fn file(path: &Path, text: &str) -> Result<(Parsed, Vec<Problem>), Vec<Problem>> {
    let whole = |message: String| Problem {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: String::new(),
        message,
    };
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if blank {
        return Err(vec![whole(
            "the file holds no policy; a policy file holds `policy:` or `service:` documents"
                .into(),
        )]);
    }
    let spans = Spans::index(text);
    if spans.aliased_nodes() > super::limits::MAX_ALIASED_NODES {
        return Err(vec![whole(format!(
            "its YAML aliases expand to more than {} nodes; write the repeated values out, or alias less",
            super::limits::MAX_ALIASED_NODES
        ))]);
    }
    let mut out = Parsed::default();
    let mut problems = Vec::new();
    for (doc_index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = match Doc::deserialize(de) {
            Ok(d) => d,
            Err(e) => {
                problems.push(serde_problem(path, &e));
                // After a syntax error the rest of the stream cannot be trusted.
                break;
            }
        };
        let mut c = Checker {
            file: path,
            spans: &spans,
            doc: doc_index,
            problems: Vec::new(),
        };
        check_header(&mut c, &doc);
        match (doc.policy, doc.service, doc.agent) {
            // Kept with its problems, so that checks across files (references, duplicates)
            // report theirs in the same run; a set with any problem is not loaded.
            (Some(p), None, None) => out.policies.push(check_policy(&mut c, p)),
            (None, Some(svc), None) => out.services.push(check_service(&mut c, svc)),
            (None, None, Some(a)) => out.agents.push(check_agent(&mut c, a)),
            (None, None, None) => c.problem(
                String::new(),
                "the document holds none of `policy:`, `service:` and `agent:`".into(),
            ),
            (_, _, agent) => c.problem(
                if agent.is_some() { "agent" } else { "service" }.into(),
                "a document holds one `policy:`, `service:` or `agent:`; separate them with `---`"
                    .into(),
            ),
        }
        problems.append(&mut c.problems);
    }
    Ok((out, problems))
}

fn serde_problem(path: &Path, e: &serde_norway::Error) -> Problem {
    let at = e.location();
    // serde_norway's message is "<path>: <message> at line L column C"; keep the message only,
    // the position is reported in its own place.
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    let (field, message) = match msg.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
        _ => (String::new(), msg),
    };
    Problem {
        file: path.to_path_buf(),
        line: at.as_ref().map(serde_norway::Location::line),
        column: at.as_ref().map(serde_norway::Location::column),
        field,
        message,
    }
}

/// `apiVersion` and `kind`, when given, must agree with the document.
fn check_header(c: &mut Checker<'_>, doc: &Doc) {
    if let Some(v) = &doc.api_version
        && v != API_VERSION
    {
        c.problem(
            "apiVersion".into(),
            format!("{v:?} is not a version this agentwall reads; write {API_VERSION:?}"),
        );
    }
    if let Some(k) = &doc.kind {
        let want = match (&doc.policy, &doc.service, &doc.agent) {
            (Some(_), None, None) => "Policy",
            (None, Some(_), None) => "Service",
            (None, None, Some(_)) => "Agent",
            _ => return,
        };
        if k != want {
            c.problem(
                "kind".into(),
                format!(
                    "{k:?} does not match the document, which holds a {want}; write kind: {want}"
                ),
            );
        }
    }
}

fn check_policy(c: &mut Checker<'_>, raw: RawPolicy) -> Policy {
    let _ = raw.description;
    if let Err(e) = check_name(&raw.name) {
        c.problem("policy.name".into(), e.to_string());
    }
    let identity = raw.identity.map(|id| {
        let id = id.trim().to_string();
        if let Err(e) = check_identity(&id) {
            c.problem("policy.identity".into(), e.to_string());
        }
        id
    });
    let attest = match raw.attest {
        None => Attest::default(),
        Some(a) => {
            if identity.is_none() {
                c.problem(
                    "policy.attest".into(),
                    "selectors need an identity to attest; add `identity:` or remove `attest:`"
                        .into(),
                );
            }
            check_attest(c, a)
        }
    };
    let mut egress = Vec::with_capacity(raw.egress.len());
    let mut unix = Vec::new();
    for (i, e) in raw.egress.into_iter().enumerate() {
        let field = format!("policy.egress[{i}]");
        match (e.to.is_some(), e.unix.is_some()) {
            (true, false) => {
                if let Some(rule) = check_egress(c, &field, e) {
                    egress.push(rule);
                }
            }
            (false, true) => unix.extend(check_unix(c, &field, e)),
            (true, true) => c.problem(
                field,
                "has both `to` and `unix`; write a network rule and a Unix socket rule apart"
                    .into(),
            ),
            (false, false) => c.problem(
                field,
                "names nothing; give `to:` (addresses) or `unix:` (Unix socket paths)".into(),
            ),
        }
    }
    let ingress = raw.ingress.map(|list| {
        list.into_iter()
            .enumerate()
            .filter_map(|(i, r)| check_ingress(c, &format!("policy.ingress[{i}]"), r))
            .collect()
    });
    for (i, r) in raw.rules.into_iter().enumerate() {
        let field = format!("policy.rules[{i}]");
        match check_rule(c, &field, r) {
            Some(Checked::Egress(rule)) => egress.push(*rule),
            Some(Checked::Unix(rule)) => unix.push(rule),
            None => {}
        }
    }
    Policy {
        name: raw.name,
        mode: raw.mode,
        identity,
        attest,
        egress,
        unix,
        ingress,
        source: c.source("policy"),
    }
}

/// One `ingress:` entry: peers (`from`) and local TCP ports.
fn check_ingress(c: &mut Checker<'_>, field: &str, raw: RawIngress) -> Option<IngressRule> {
    let _ = raw.description;
    if !matches!(raw.protocol, None | Some(Protocol::Tcp)) {
        c.problem(
            format!("{field}.protocol"),
            "ingress judges TCP connections only; write protocol: tcp or leave it out".into(),
        );
        return None;
    }
    let from = listed(field, "from", raw.from);
    if from.is_empty() {
        c.problem(
            format!("{field}.from"),
            "names no peer; give addresses or CIDRs (127.0.0.1 for callers on this host)".into(),
        );
        return None;
    }
    let ep = check_endpoint(c, field, from, Some(Protocol::Tcp), raw.ports)?;
    Some(IngressRule {
        from: ep.to,
        ports: ep.ports,
        source: c.source(field),
    })
}

/// A catalog service: a name and its endpoints.
fn check_service(c: &mut Checker<'_>, raw: RawService) -> Service {
    let _ = raw.description;
    if let Err(e) = check_name(&raw.name) {
        c.problem(
            "service.name".into(),
            e.to_string().replace("policy name", "service name"),
        );
    }
    if raw.endpoints.is_empty() {
        c.problem(
            "service.endpoints".into(),
            "a service needs at least one endpoint (`to:` addresses with `protocol` and `ports`)"
                .into(),
        );
    }
    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    for (i, e) in raw.endpoints.into_iter().enumerate() {
        let _ = e.description;
        let field = format!("service.endpoints[{i}]");
        let to = listed(&field, "to", e.to);
        if let Some(ep) = check_endpoint_named(c, &field, to, e.protocol, e.ports, true) {
            endpoints.push(ep);
        }
    }
    Service {
        name: raw.name,
        endpoints,
        source: c.source("service"),
    }
}

/// An agent of the catalog: its name (`NAME/ENV`), its identity, the endpoints it serves
/// (TCP) and the other hosts it runs on.
fn check_agent(c: &mut Checker<'_>, raw: RawAgent) -> Agent {
    let _ = raw.description;
    let name = raw.name.trim().to_string();
    if let Err(m) = check_agent_name(&name) {
        c.problem("agent.name".into(), m);
    }
    let identity = raw
        .identity
        .map_or_else(|| format!("agent/{name}"), |id| id.trim().to_string());
    if let Err(e) = check_identity(&identity) {
        c.problem("agent.identity".into(), e.to_string());
    }
    if raw.endpoints.is_empty() {
        c.problem(
            "agent.endpoints".into(),
            "an agent needs at least one endpoint it serves (`to:` addresses and `ports`)".into(),
        );
    }
    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    for (i, e) in raw.endpoints.into_iter().enumerate() {
        let _ = e.description;
        let field = format!("agent.endpoints[{i}]");
        if !matches!(e.protocol, None | Some(Protocol::Tcp)) {
            c.problem(
                format!("{field}.protocol"),
                "agents are called over TCP (the kernel judges who connects); write protocol: tcp or leave it out".into(),
            );
            continue;
        }
        let to = listed(&field, "to", e.to);
        if let Some(ep) = check_endpoint_named(c, &field, to, Some(Protocol::Tcp), e.ports, true) {
            endpoints.push(ep);
        }
    }
    let mut hosts = Vec::new();
    for (f, h) in listed("agent", "hosts", raw.hosts) {
        match parse_destination(&h) {
            Ok(net) => hosts.push(net),
            Err(e) => c.problem(f, e.to_string()),
        }
    }
    Agent {
        name,
        identity,
        endpoints,
        hosts,
        source: c.source("agent"),
    }
}

/// An agent's name: `NAME/ENV`, each part a name.
fn check_agent_name(name: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{name:?} is not an agent name: write NAME/ENV (such as report-api/prod), each part \
             1 to 63 of a-z, 0-9, -, _ and ., starting with a letter or digit"
        )
    };
    let (n, env) = name.split_once('/').ok_or_else(bad)?;
    check_name(n).map_err(|_| bad())?;
    check_name(env).map_err(|_| bad())
}

enum Checked {
    Egress(Box<EgressRule>),
    Unix(UnixRule),
}

/// What a `resource:` names.
enum Resource {
    Service(String),
    Agent(String),
    Cidr(String),
    Unix(String),
    Secret(String),
}

fn parse_resource(s: &str) -> Result<Resource, String> {
    let (kind, rest) = s.split_once(':').unwrap_or(("", s));
    let rest = rest.trim();
    match kind.trim() {
        "service" => check_name(rest)
            .map(|()| Resource::Service(rest.to_string()))
            .map_err(|e| e.to_string().replace("policy name", "service name")),
        "cidr" => Ok(Resource::Cidr(rest.to_string())),
        "unix" => Ok(Resource::Unix(rest.to_string())),
        "agent" => check_agent_name(rest).map(|()| Resource::Agent(rest.to_string())),
        "secret" => {
            super::secret::SecretPattern::parse(rest).map(|_| Resource::Secret(rest.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not a resource: write service:NAME (a service of the catalog), \
             agent:NAME/ENV (an agent of the catalog), cidr:ADDRESS[/LEN] (with protocol and \
             ports), unix:PATH or secret:PATH"
        )),
    }
}

/// A `secret:` rule's `lease:`: a duration (such as 5m or 1h) in seconds.
fn secret_lease(text: &str) -> Result<u64, String> {
    use super::secret::{MAX_TTL, MIN_TTL};
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write such as 5m or 1h"))?;
    if d < MIN_TTL || d > MAX_TTL {
        return Err(format!(
            "{text:?}: a lease lasts from {} to {}",
            humantime::format_duration(MIN_TTL),
            humantime::format_duration(MAX_TTL)
        ));
    }
    Ok(d.as_secs())
}

/// One entry of `rules:`.
fn check_rule(c: &mut Checker<'_>, field: &str, raw: RawRule) -> Option<Checked> {
    let _ = raw.description;
    let before = c.problems.len();
    let resource_field = format!("{field}.resource");
    let resource = match parse_resource(&raw.resource) {
        Ok(r) => Some(r),
        Err(m) => {
            c.problem(resource_field.clone(), m);
            None
        }
    };
    let actions: Vec<String> = listed(field, "actions", raw.actions)
        .into_iter()
        .filter_map(|(f, a)| {
            let ok = !a.is_empty()
                && a.len() <= 128
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:*/".contains(&b));
            if ok {
                Some(a)
            } else {
                c.problem(
                    f,
                    format!(
                        "{a:?} is not an action: use letters, digits and - _ . : * / (such as read or write:message), at most 128"
                    ),
                );
                None
            }
        })
        .collect();
    let mut conditions = std::collections::BTreeMap::new();
    for (k, v) in raw.conditions {
        let f = format!("{field}.conditions.{k}");
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !key_ok {
            c.problem(
                f,
                format!(
                    "{k:?} is not an attribute name: use letters, digits, - _ and ., at most 64"
                ),
            );
            continue;
        }
        let values: Vec<String> = listed(field, &format!("conditions.{k}"), Some(v))
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        if values.is_empty() {
            c.problem(
                f,
                "lists no value; a condition names the values the attribute may have".into(),
            );
            continue;
        }
        conditions.insert(k, values);
    }
    let rate = raw.rate_limit.and_then(|r| match parse_rate(&r) {
        Ok(rate) => Some(rate),
        Err(m) => {
            c.problem(format!("{field}.rateLimit"), m);
            None
        }
    });
    let has_when = raw.when.is_some();
    let window = raw
        .when
        .and_then(|w| check_when(c, &format!("{field}.when"), w));
    let source = c.source(field);
    let is_secret = matches!(resource, Some(Resource::Secret(_)));
    let lease = match (raw.lease, is_secret) {
        (None, _) => None,
        (Some(_), false) => {
            c.problem(
                format!("{field}.lease"),
                "only a secret: rule takes a lease; remove it".into(),
            );
            None
        }
        (Some(text), true) => match secret_lease(&text) {
            Ok(secs) => Some(secs),
            Err(m) => {
                c.problem(format!("{field}.lease"), m);
                None
            }
        },
    };
    let access = Access {
        resource: raw.resource.trim().to_string(),
        actions,
        conditions,
        lease,
    };
    let network_only = |c: &mut Checker<'_>, what: &str| {
        if raw.protocol.is_some() || !raw.ports.is_empty() {
            c.problem(
                field.to_string(),
                format!("{what}; remove `protocol` and `ports`"),
            );
        }
    };
    let checked = match resource? {
        r @ (Resource::Service(_) | Resource::Agent(_)) => {
            let (kind, name) = match r {
                Resource::Agent(name) => {
                    network_only(c, "an agent's ports are those of its catalog entry");
                    (RefKind::Agent, name)
                }
                Resource::Service(name)
                | Resource::Cidr(name)
                | Resource::Unix(name)
                | Resource::Secret(name) => {
                    network_only(
                        c,
                        "a service's protocol and ports are those of its catalog entry",
                    );
                    (RefKind::Service, name)
                }
            };
            EgressRule {
                window,
                endpoints: Vec::new(),
                service: Some(ServiceRef {
                    name,
                    kind,
                    at: c.source(&resource_field),
                    field: resource_field,
                }),
                access: Some(access),
                rate,
                mode: raw.mode,
                source,
            }
        }
        Resource::Cidr(net) => {
            let to = vec![(resource_field.clone(), net)];
            let ep = check_endpoint(c, field, to, raw.protocol, raw.ports)?;
            EgressRule {
                window,
                endpoints: vec![ep],
                service: None,
                access: Some(access),
                rate,
                mode: raw.mode,
                source,
            }
        }
        Resource::Secret(_) => {
            network_only(c, "a secret is not reached over the network");
            if raw.mode.is_some() {
                c.problem(
                    format!("{field}.mode"),
                    "a secret: rule takes no mode: no secret is handed out on a would-be grant; remove it".into(),
                );
            }
            if !access.conditions.is_empty() {
                c.problem(
                    format!("{field}.conditions"),
                    "a secret: rule takes no conditions: the agent that fetches would vouch for them itself; grant the paths by identity (one policy per identity)".into(),
                );
            }
            let mut access = access;
            if access.actions.is_empty() {
                access.actions.push("read".into());
            } else if let Some(a) = access.actions.iter().find(|a| *a != "read") {
                c.problem(
                    format!("{field}.actions"),
                    format!("{a:?}: a secret: rule grants read only (agents fetch secrets; operators put them)"),
                );
            }
            EgressRule {
                window,
                endpoints: Vec::new(),
                service: None,
                access: Some(access),
                rate,
                mode: None,
                source,
            }
        }
        Resource::Unix(name) => {
            network_only(c, "a Unix socket has no protocol or ports");
            if rate.is_some()
                || has_when
                || raw.mode.is_some()
                || !access.actions.is_empty()
                || !access.conditions.is_empty()
            {
                c.problem(
                    field.to_string(),
                    "a unix: resource takes no actions, conditions, rateLimit, when or mode: the kernel sees the connect only".into(),
                );
            }
            let rule = unix_rule(c, &resource_field, name)?;
            if c.problems.len() > before {
                return None;
            }
            return Some(Checked::Unix(rule));
        }
    };
    (c.problems.len() == before).then_some(Checked::Egress(Box::new(checked)))
}

/// A rule's `when:`: days (all if none), hours (the whole day if none), a time zone (UTC if
/// none); at least days or hours.
fn check_when(c: &mut Checker<'_>, field: &str, raw: RawWhen) -> Option<Window> {
    let before = c.problems.len();
    if raw.days.is_none() && raw.hours.is_none() {
        c.problem(
            field.to_string(),
            "names no days and no hours; give `days:` (such as mon-fri), `hours:` (such as 09:00-17:00) or both".into(),
        );
    }
    let days_listed = listed(field, "days", raw.days);
    let days = if days_listed.is_empty() {
        Window::ALL_DAYS
    } else {
        let names: Vec<String> = days_listed.iter().map(|(_, d)| d.clone()).collect();
        match window::parse_days(&names) {
            Ok(d) => d,
            Err(m) => {
                // The first item that fails, where it is written.
                let at = days_listed
                    .iter()
                    .find(|(_, d)| window::parse_days(std::slice::from_ref(d)).is_err())
                    .map_or_else(|| format!("{field}.days"), |(f, _)| f.clone());
                c.problem(at, m);
                0
            }
        }
    };
    let (from, until) = match raw.hours.as_deref().map(window::parse_hours) {
        None => (0, 86_400),
        Some(Ok(h)) => h,
        Some(Err(m)) => {
            c.problem(format!("{field}.hours"), m);
            (0, 0)
        }
    };
    let timezone = raw.timezone.unwrap_or_else(|| "UTC".into());
    if let Err(m) = window::check_timezone(&timezone) {
        c.problem(format!("{field}.timezone"), m);
    }
    (c.problems.len() == before).then_some(Window {
        days,
        from,
        until,
        timezone,
    })
}

/// `N per second|minute|hour` (also `N/s`, `N/min`, `N/h`), N from 1 to 1,000,000.
fn parse_rate(s: &str) -> Result<RateLimit, String> {
    let bad = || {
        format!(
            "{s:?} is not a rate: write N per second, N per minute or N per hour (N from 1 to 1000000)"
        )
    };
    let t = s.trim();
    let (n, unit) = t
        .split_once(" per ")
        .or_else(|| t.split_once('/'))
        .ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 || count > 1_000_000 {
        return Err(bad());
    }
    let per = match unit.trim() {
        "second" | "s" | "sec" => Per::Second,
        "minute" | "min" | "m" => Per::Minute,
        "hour" | "h" => Per::Hour,
        _ => return Err(bad()),
    };
    Ok(RateLimit { count, per })
}

/// What is wrong with one field's value; the caller adds the file, line and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FieldError {
    #[error(
        "{0:?} is not a valid policy name: use 1 to {MAX_NAME_LEN} characters of a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
    )]
    Name(String),
    #[error(
        "{id:?} is not a SPIFFE ID or ID path (such as agent/reader/prod or spiffe://example.org/agent/reader/prod): {error}"
    )]
    Identity {
        id: String,
        error: crate::spiffe::IdError,
    },
    #[error("{given:?} has bits set after the prefix length; did you mean {trunc}?")]
    HostBits { given: String, trunc: IpNet },
    #[error(
        "{0:?} is not an IP address or CIDR (such as 10.0.0.0/8 or 2001:db8::/32); host names come with the services catalog"
    )]
    Destination(String),
    #[error("{0} is not a destination port (1 to 65535)")]
    Port(i64),
    #[error("{0:?} is not a port or a range such as 8000-8099")]
    PortText(String),
    #[error("range {0:?} is empty: its start is above its end")]
    EmptyRange(String),
}

/// A full SPIFFE ID of a workload, or a path to be read in the node's trust domain.
fn check_identity(id: &str) -> Result<(), FieldError> {
    let full = if id.contains("://") {
        id.to_string()
    } else {
        format!(
            "spiffe://trust.domain/{}",
            id.strip_prefix('/').unwrap_or(id)
        )
    };
    SpiffeId::workload(&full)
        .map(|_| ())
        .map_err(|error| FieldError::Identity {
            id: id.to_string(),
            error,
        })
}

fn check_attest(c: &mut Checker<'_>, raw: RawAttest) -> Attest {
    let exe = raw.exe.and_then(|e| {
        if e.starts_with('/') {
            Some(PathBuf::from(e))
        } else {
            c.problem(
                "policy.attest.exe".into(),
                format!("{e:?} is not an absolute path to an executable"),
            );
            None
        }
    });
    let sha256 = raw.sha256.and_then(|h| {
        let h = h.trim().to_ascii_lowercase();
        if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(h)
        } else {
            c.problem(
                "policy.attest.sha256".into(),
                "give the executable's SHA-256 as 64 hex digits (as `sha256sum` prints it)".into(),
            );
            None
        }
    });
    let cgroup = raw.cgroup.and_then(|p| {
        if !p.starts_with('/') {
            c.problem(
                "policy.attest.cgroup".into(),
                format!("{p:?} must start with '/', the root of the cgroup v2 tree"),
            );
            return None;
        }
        match glob::Pattern::new(&p) {
            Ok(_) => Some(p),
            Err(e) => {
                c.problem(
                    "policy.attest.cgroup".into(),
                    format!("{p:?} is not a valid pattern: {e}"),
                );
                None
            }
        }
    });
    let systemd_unit = raw.systemd_unit.and_then(|u| {
        let unit = |s: &str| {
            !s.is_empty()
                && !s.contains('/')
                && [".service", ".scope"].iter().any(|x| s.ends_with(x))
        };
        // A system unit, or a unit of one user's manager: `user@UID.service/NAME`.
        let ok = match u.split_once('/') {
            None => unit(&u),
            Some((m, name)) => {
                m.strip_prefix("user@")
                    .and_then(|r| r.strip_suffix(".service"))
                    .is_some_and(|uid| uid.parse::<u32>().is_ok())
                    && unit(name)
            }
        };
        if ok {
            Some(u)
        } else {
            c.problem(
                "policy.attest.systemd_unit".into(),
                format!(
                    "{u:?} is not a unit name such as reader.service or run-1.scope (a system unit), or user@1000.service/reader.service (a unit of user 1000's own manager)"
                ),
            );
            None
        }
    });
    Attest {
        uid: raw.uid.map(Ids::into_vec).unwrap_or_default(),
        gid: raw.gid.map(Ids::into_vec).unwrap_or_default(),
        exe,
        sha256,
        cgroup,
        systemd_unit,
    }
}

fn check_name(name: &str) -> Result<(), FieldError> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit());
    let ok_rest = name
        .chars()
        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '-' | '_' | '.'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_first || !ok_rest {
        return Err(FieldError::Name(name.to_string()));
    }
    Ok(())
}

/// The entries of a string-or-list field, each with its own field path.
fn listed(field: &str, key: &str, v: Option<OneOrMany>) -> Vec<(String, String)> {
    match v {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![(format!("{field}.{key}"), s)],
        Some(OneOrMany::Many(v)) => v
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("{field}.{key}[{i}]"), s))
            .collect(),
    }
}

/// A `unix:` rule: each name an absolute path or `@` and an abstract name, fitting in
/// `sun_path`; ports and protocols do not apply.
fn check_unix(c: &mut Checker<'_>, field: &str, raw: RawEgress) -> Vec<UnixRule> {
    let _ = raw.description;
    if raw.protocol.is_some() || !raw.ports.is_empty() {
        c.problem(
            field.to_string(),
            "a `unix:` rule has no protocol or ports; remove them".into(),
        );
    }
    let names = listed(field, "unix", raw.unix);
    if names.is_empty() {
        c.problem(
            format!("{field}.unix"),
            "names no socket; give a path such as /run/app.sock or @abstract-name".into(),
        );
    }
    names
        .into_iter()
        .filter_map(|(f, name)| unix_rule(c, &f, name))
        .collect()
}

/// One Unix socket name written at `field`.
fn unix_rule(c: &mut Checker<'_>, field: &str, name: String) -> Option<UnixRule> {
    let shape_ok = name.starts_with('/') || (name.starts_with('@') && name.len() > 1);
    if !shape_ok {
        c.problem(
            field.to_string(),
            format!(
                "{name:?} is not a Unix socket name: give an absolute path (/run/app.sock) \
                 or @ and an abstract name (@app)"
            ),
        );
        return None;
    }
    if agentwall_common::unix::UnixKey::from_policy_name(0, 0, &name).is_none() {
        c.problem(
            field.to_string(),
            format!(
                "{name:?} does not fit in a Unix socket address (at most {} bytes, no NUL)",
                agentwall_common::unix::SUN_PATH_MAX
            ),
        );
        return None;
    }
    Some(UnixRule {
        name,
        source: c.source(field),
    })
}

fn check_egress(c: &mut Checker<'_>, field: &str, raw: RawEgress) -> Option<EgressRule> {
    let _ = raw.description;
    let to = listed(field, "to", raw.to);
    let ep = check_endpoint(c, field, to, raw.protocol, raw.ports)?;
    Some(EgressRule {
        endpoints: vec![ep],
        service: None,
        access: None,
        rate: None,
        mode: None,
        window: None,
        source: c.source(field),
    })
}

/// Destinations (each with its field), protocol and ports written under `field`: an egress
/// entry, a service's endpoint, a `cidr:` rule (whose destination is its resource).
fn check_endpoint(
    c: &mut Checker<'_>,
    field: &str,
    to_raw: Vec<(String, String)>,
    protocol: Option<Protocol>,
    raw_ports: Vec<RawPort>,
) -> Option<Endpoint> {
    check_endpoint_named(c, field, to_raw, protocol, raw_ports, false)
}

/// [`check_endpoint`], where `names` lets destinations be host names (the catalogs').
fn check_endpoint_named(
    c: &mut Checker<'_>,
    field: &str,
    to_raw: Vec<(String, String)>,
    protocol: Option<Protocol>,
    raw_ports: Vec<RawPort>,
    names: bool,
) -> Option<Endpoint> {
    let before = c.problems.len();
    let protocol = protocol.unwrap_or_default();
    if to_raw.is_empty() {
        c.problem(
            format!("{field}.to"),
            "names no destination; give an address or CIDR".into(),
        );
    }
    let mut to = Vec::with_capacity(to_raw.len());
    let mut hosts = Vec::new();
    for (f, s) in to_raw {
        match parse_destination(&s) {
            Ok(net) => to.push(net),
            Err(FieldError::Destination(d)) if names && is_host_name(&d) => {
                hosts.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
            Err(FieldError::Destination(d)) if names => c.problem(
                f,
                format!(
                    "{d:?} is neither an IP address or CIDR (such as 10.0.0.0/8) nor a host name (such as db.internal.example)"
                ),
            ),
            Err(e) => c.problem(f, e.to_string()),
        }
    }
    let mut ports = Vec::with_capacity(raw_ports.len());
    if protocol == Protocol::Icmp && !raw_ports.is_empty() {
        c.problem(
            format!("{field}.ports"),
            "ICMP has no ports; remove `ports` or change `protocol`".into(),
        );
    }
    for (i, p) in raw_ports.into_iter().enumerate() {
        match parse_port(&p) {
            Ok(r) => ports.push(r),
            Err(e) => c.problem(format!("{field}.ports[{i}]"), e.to_string()),
        }
    }
    (c.problems.len() == before).then_some(Endpoint {
        to,
        names: hosts,
        protocol,
        ports,
    })
}

/// Whether `s` is a DNS host name: dot-separated labels of letters, digits and `-` (not at
/// either end), at most 63 bytes each and 253 in all, the last one not all digits (so that a
/// mistyped address is not taken for a name).
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !s.is_empty()
        && s.len() <= 253
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// An address (a host prefix) or a CIDR whose host bits are zero.
fn parse_destination(s: &str) -> Result<IpNet, FieldError> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    match s.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(FieldError::HostBits {
            given: s.to_string(),
            trunc: net.trunc(),
        }),
        Err(_) => Err(FieldError::Destination(s.to_string())),
    }
}

/// A port (1..=65535) or an inclusive range `lo-hi`.
fn parse_port(p: &RawPort) -> Result<PortRange, FieldError> {
    let one = |v: i64| -> Result<u16, FieldError> {
        match u16::try_from(v) {
            Ok(0) | Err(_) => Err(FieldError::Port(v)),
            Ok(p) => Ok(p),
        }
    };
    match p {
        RawPort::Number(n) => one(*n).map(|v| PortRange { lo: v, hi: v }),
        RawPort::Text(t) => {
            let t = t.trim();
            let parse = |s: &str| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| FieldError::PortText(t.to_string()))
            };
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (one(parse(a)?)?, one(parse(b)?)?),
                None => {
                    let v = one(parse(t)?)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(FieldError::EmptyRange(t.to_string()));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_texts;

    fn parse_one(text: &str) -> Result<Vec<Policy>, Vec<Problem>> {
        match file(Path::new("p.yaml"), text) {
            Ok((p, problems)) if problems.is_empty() => Ok(p.policies),
            Ok((_, problems)) | Err(problems) => Err(problems),
        }
    }

    fn problems(text: &str) -> Vec<String> {
        parse_one(text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn valid_policy() {
        let ps = parse_one(
            "policy:\n  name: web\n  mode: audit\n  egress:\n    - to: 10.0.0.0/8\n      protocol: tcp\n      ports: [443, \"8000-8099\"]\n    - to: [\"::1\", 192.168.1.7]\n      protocol: icmp\n",
        )
        .unwrap();
        assert_eq!(ps.len(), 1);
        let p = &ps[0];
        assert_eq!(p.name, "web");
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.egress.len(), 2);
        assert_eq!(
            p.egress[0].endpoints[0].ports,
            vec![
                PortRange { lo: 443, hi: 443 },
                PortRange { lo: 8000, hi: 8099 }
            ]
        );
        assert_eq!(p.egress[0].source.line, 5);
        assert_eq!(p.egress[1].source.line, 8);
        assert_eq!(p.egress[1].endpoints[0].to.len(), 2);
        assert_eq!(p.egress[1].endpoints[0].to[0].prefix_len(), 128);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "policy:\n  name: web\n  egress:\n    - to: 10.0.0.1/8\n      ports: [0, 70000, \"9-3\", \"x\"]\n    - to: nope.example\n      protocol: icmp\n      ports: [1]\n";
        let got = problems(text);
        let want = [
            "p.yaml:4:11: policy.egress[0].to: \"10.0.0.1/8\" has bits set after the prefix length; did you mean 10.0.0.0/8?",
            "p.yaml:5:15: policy.egress[0].ports[0]: 0 is not a destination port (1 to 65535)",
            "p.yaml:5:18: policy.egress[0].ports[1]: 70000 is not a destination port (1 to 65535)",
            "p.yaml:5:25: policy.egress[0].ports[2]: range \"9-3\" is empty: its start is above its end",
            "p.yaml:5:32: policy.egress[0].ports[3]: \"x\" is not a port or a range such as 8000-8099",
        ];
        for w in want {
            assert!(got.iter().any(|g| g == w), "missing {w:?} in {got:#?}");
        }
        assert!(
            got.iter().any(|g| g.starts_with(
                "p.yaml:6:11: policy.egress[1].to: \"nope.example\" is not an IP address"
            )),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("p.yaml:8:7: policy.egress[1].ports: ICMP has no ports")),
            "{got:#?}"
        );
    }

    #[test]
    fn serde_errors_keep_line_and_field() {
        let got =
            problems("policy:\n  name: web\n  egress:\n    - to: 10.0.0.0/8\n      protocl: tcp\n");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("p.yaml:5:7: policy.egress[0]: unknown field `protocl`"),
            "{got:?}"
        );

        let got = problems("policy:\n  name: web\n  mode: strict\n");
        assert!(
            got[0].starts_with("p.yaml:3:9: policy.mode: unknown variant `strict`"),
            "{got:?}"
        );

        let got = problems("policy:\n  name: [web\n");
        assert!(got[0].starts_with("p.yaml:"), "{got:?}");

        let got = problems("");
        assert!(got[0].contains("holds no policy"), "{got:?}");
    }

    #[test]
    fn unix_rules_name_paths_and_abstract_sockets() {
        let p = parse_one(
            "policy:\n  name: u\n  egress:\n    - unix: /run/app.sock\n    - unix: [\"@bus\", /run/b.sock]\n",
        )
        .unwrap();
        let names: Vec<(&str, usize)> = p[0]
            .unix
            .iter()
            .map(|u| (u.name.as_str(), u.source.line))
            .collect();
        assert_eq!(
            names,
            [("/run/app.sock", 4), ("@bus", 5), ("/run/b.sock", 5)]
        );
        assert!(p[0].egress.is_empty());
        let long = format!("/{}", "a".repeat(108));
        let got = problems(&format!(
            "policy:\n  name: u\n  egress:\n    - unix: app.sock\n    - unix: \"@\"\n    - unix: {long}\n    - unix: /a\n      protocol: tcp\n    - to: 10.0.0.1\n      unix: /a\n    - protocol: tcp\n    - unix: []\n"
        ));
        assert_eq!(
            got,
            [
                "p.yaml:4:13: policy.egress[0].unix: \"app.sock\" is not a Unix socket name: give an absolute path (/run/app.sock) or @ and an abstract name (@app)",
                "p.yaml:5:13: policy.egress[1].unix: \"@\" is not a Unix socket name: give an absolute path (/run/app.sock) or @ and an abstract name (@app)",
                &format!(
                    "p.yaml:6:13: policy.egress[2].unix: \"{long}\" does not fit in a Unix socket address (at most 108 bytes, no NUL)"
                ),
                "p.yaml:7:7: policy.egress[3]: a `unix:` rule has no protocol or ports; remove them",
                "p.yaml:9:7: policy.egress[4]: has both `to` and `unix`; write a network rule and a Unix socket rule apart",
                "p.yaml:11:7: policy.egress[5]: names nothing; give `to:` (addresses) or `unix:` (Unix socket paths)",
                "p.yaml:12:7: policy.egress[6].unix: names no socket; give a path such as /run/app.sock or @abstract-name",
            ]
        );
    }

    #[test]
    fn bad_names() {
        for n in ["", "Web", "-x", "a b", &"x".repeat(64)] {
            let got = problems(&format!("policy:\n  name: {n:?}\n"));
            assert!(
                got[0].contains("policy.name") && got[0].contains("not a valid policy name"),
                "{n}: {got:?}"
            );
        }
    }

    #[test]
    fn duplicate_names_across_files() {
        let files = vec![
            (PathBuf::from("a.yaml"), "policy:\n  name: x\n".to_string()),
            (
                PathBuf::from("b.yaml"),
                "\n\npolicy:\n  name: x\n".to_string(),
            ),
        ];
        let e = parse_texts(&files).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(
            e.problems[0].to_string(),
            "b.yaml:3:1: policy.name: policy \"x\" is already defined at a.yaml:1"
        );
    }

    #[test]
    fn identity_and_attest() {
        let ps = parse_one(
            "policy:\n  name: r\n  identity: agent/reader/prod\n  attest:\n    uid: 1000\n    gid: [10, 20]\n    exe: /usr/bin/python3\n    sha256: ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n    cgroup: /agentwall/*\n    systemd_unit: reader.service\n",
        )
        .unwrap();
        let p = &ps[0];
        assert_eq!(p.identity.as_deref(), Some("agent/reader/prod"));
        assert_eq!(p.attest.uid, vec![1000]);
        assert_eq!(p.attest.gid, vec![10, 20]);
        assert_eq!(
            p.attest.sha256.as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        let got = problems(
            "policy:\n  name: r\n  identity: agent/Reader/../x\n  attest:\n    exe: python3\n    sha256: xyz\n    cgroup: agentwall\n    systemd_unit: a/b\n",
        );
        for f in [
            "p.yaml:3:13: policy.identity:",
            "p.yaml:5:10: policy.attest.exe:",
            "p.yaml:6:13: policy.attest.sha256:",
            "p.yaml:7:13: policy.attest.cgroup:",
            "p.yaml:8:19: policy.attest.systemd_unit:",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(f)),
                "missing {f} in {got:#?}"
            );
        }
        let got = problems("policy:\n  name: r\n  attest:\n    uid: 0\n");
        assert!(got[0].contains("selectors need an identity"), "{got:?}");
        let files = vec![
            (
                PathBuf::from("a.yaml"),
                "policy:\n  name: x\n  identity: agent/a/b\n".to_string(),
            ),
            (
                PathBuf::from("b.yaml"),
                "policy:\n  name: y\n  identity: agent/a/b\n".to_string(),
            ),
        ];
        let e = parse_texts(&files).unwrap_err();
        assert!(
            e.problems[0]
                .to_string()
                .contains("one identity, one policy"),
            "{e}"
        );
    }

    #[test]
    fn multi_document_files() {
        let ps = parse_one(
            "policy:\n  name: a\n---\npolicy:\n  name: b\n  egress:\n    - to: 1.1.1.1\n",
        )
        .unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].egress[0].source.line, 7);
    }

    const CATALOG: &str = "\
kind: Service
apiVersion: agentwall.dev/v1
service:
  name: analytics-db
  endpoints:
    - to: 127.0.0.10
      protocol: tcp
      ports: [5432]
---
service:
  name: slack
  endpoints:
    - to: [127.0.0.11, \"::1\"]
      protocol: tcp
      ports: [443]
";

    const PIPELINE: &str = "\
apiVersion: agentwall.dev/v1
kind: Policy
policy:
  name: data-pipeline
  identity: agent/data-pipeline/prod
  rules:
    - resource: \"service:analytics-db\"
      actions: [\"read\"]
      conditions: { tables: [\"events\", \"sessions\"] }
    - resource: \"service:slack\"
      actions: [\"write:message\"]
      conditions: { channels: [\"#alerts\"] }
      rateLimit: \"10 per minute\"
    - resource: cidr:127.0.0.0/30
      protocol: udp
      ports: [53]
      rateLimit: 5/s
      mode: audit
    - resource: unix:/run/app.sock
    - resource: service:analytics-db
      actions: [write]
      when:
        days: [mon-fri]
        hours: 09:00-17:00
        timezone: Europe/Berlin
";

    #[test]
    fn rules_name_services_with_actions_conditions_and_limits() {
        let set = parse_texts(&[
            (PathBuf::from("catalog.yaml"), CATALOG.to_string()),
            (PathBuf::from("pipeline.yaml"), PIPELINE.to_string()),
        ])
        .unwrap();
        assert_eq!(set.services.len(), 2);
        let p = &set.policies[0];
        assert_eq!(p.egress.len(), 4);
        let db = &p.egress[0];
        assert_eq!(db.endpoints, set.services[0].endpoints, "the catalog's");
        let access = db.access.as_ref().unwrap();
        assert_eq!(access.resource, "service:analytics-db");
        assert_eq!(access.actions, ["read"]);
        assert_eq!(access.conditions["tables"], ["events", "sessions"]);
        assert_eq!(db.source.line, 7);
        assert_eq!(db.rate, None);
        let slack = &p.egress[1];
        assert_eq!(slack.endpoints[0].to.len(), 2);
        assert_eq!(
            slack.rate,
            Some(RateLimit {
                count: 10,
                per: Per::Minute
            })
        );
        assert_eq!(slack.rate.unwrap().to_string(), "10 per minute");
        let dns = &p.egress[2];
        assert_eq!(dns.endpoints[0].protocol, Protocol::Udp);
        assert_eq!(dns.endpoints[0].to[0].to_string(), "127.0.0.0/30");
        assert_eq!(dns.mode, Some(Mode::Audit));
        assert_eq!(dns.rate.unwrap().per, Per::Second);
        assert_eq!(p.unix[0].name, "/run/app.sock");
        assert_eq!(p.unix[0].source.line, 19);
        let w = p.egress[3].window.as_ref().unwrap();
        assert_eq!(
            w.to_string(),
            "mon,tue,wed,thu,fri 09:00-17:00 Europe/Berlin"
        );
        assert_eq!(p.egress[0].window, None);
    }

    /// Every class of bad input in the new language, with the message it gets.
    #[test]
    fn bad_rules_and_services_are_each_reported_where_written() {
        let bad = "\
policy:
  name: p
  rules:
    - resource: service:nope
    - resource: service:Bad
    - resource: printer:x
    - resource: agent:b
    - resource: cidr:10.0.0.1/8
    - resource: service:analytics-db
      rateLimit: 10 per fortnight
    - resource: service:analytics-db
      ports: [5432]
    - resource: service:analytics-db
      actions: [\"read it\"]
      conditions: { \"a b\": [x], c: [] }
    - resource: unix:/run/x.sock
      rateLimit: 1/s
    - resource: service:analytics-db
      rateLimit: 0 per second
    - resource: service:analytics-db
      when: { days: [mon, funday], hours: 9-17, timezone: Mars/Olympus }
    - resource: service:analytics-db
      when: {}
---
kind: Service
policy:
  name: q
---
apiVersion: v2
service:
  name: analytics-db
  endpoints: []
";
        let e = parse_texts(&[
            (PathBuf::from("catalog.yaml"), CATALOG.to_string()),
            (PathBuf::from("bad.yaml"), bad.to_string()),
        ])
        .unwrap_err();
        let got: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        let want = [
            "bad.yaml:5:17: policy.rules[1].resource: \"Bad\" is not a valid service name",
            "bad.yaml:6:17: policy.rules[2].resource: \"printer:x\" is not a resource: write service:NAME",
            "bad.yaml:7:17: policy.rules[3].resource: \"b\" is not an agent name: write NAME/ENV (such as report-api/prod)",
            "bad.yaml:8:17: policy.rules[4].resource: \"10.0.0.1/8\" has bits set after the prefix length; did you mean 10.0.0.0/8?",
            "bad.yaml:10:18: policy.rules[5].rateLimit: \"10 per fortnight\" is not a rate: write N per second",
            "bad.yaml:11:7: policy.rules[6]: a service's protocol and ports are those of its catalog entry; remove `protocol` and `ports`",
            "bad.yaml:14:17: policy.rules[7].actions[0]: \"read it\" is not an action",
            "bad.yaml:15:21: policy.rules[7].conditions.a b: \"a b\" is not an attribute name",
            "bad.yaml:15:33: policy.rules[7].conditions.c: lists no value",
            "bad.yaml:16:7: policy.rules[8]: a unix: resource takes no actions, conditions, rateLimit, when or mode",
            "bad.yaml:19:18: policy.rules[9].rateLimit: \"0 per second\" is not a rate",
            "bad.yaml:21:27: policy.rules[10].when.days[1]: \"funday\" is not a day",
            "bad.yaml:21:43: policy.rules[10].when.hours: \"9-17\" is not a span of hours",
            "bad.yaml:21:59: policy.rules[10].when.timezone: \"Mars/Olympus\" is not a time zone",
            "bad.yaml:23:7: policy.rules[11].when: names no days and no hours",
            "bad.yaml:25:7: kind: \"Service\" does not match the document, which holds a Policy; write kind: Policy",
            "bad.yaml:29:13: apiVersion: \"v2\" is not a version this agentwall reads; write \"agentwall.dev/v1\"",
            "bad.yaml:32:3: service.endpoints: a service needs at least one endpoint",
            "bad.yaml:30:1: service.name: service \"analytics-db\" is already defined at catalog.yaml:3",
            // Found across files in the same run.
            "bad.yaml:4:17: policy.rules[0].resource: policy \"p\": no service named \"nope\"; the catalog has analytics-db, slack",
        ];
        for w in want {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "missing {w:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
        // References are resolved across files, after all of them are read.
        let e = parse_texts(&[(PathBuf::from("p.yaml"), "policy:\n  name: p\n  rules:\n    - resource: service:nope\n    - resource: cidr:10.0.0.1\n      rateLimit: 3 per week\n".to_string())])
            .unwrap_err();
        let got: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "p.yaml:6:18: policy.rules[1].rateLimit: \"3 per week\" is not a rate: write N per second, N per minute or N per hour (N from 1 to 1000000)",
                "p.yaml:4:17: policy.rules[0].resource: policy \"p\": no service named \"nope\"; the directory defines no service; add a `service:` document",
            ],
            "a file's own problems and those across files, in one run"
        );
        let e = parse_texts(&[
            (PathBuf::from("a.yaml"), CATALOG.to_string()),
            (
                PathBuf::from("b.yaml"),
                "service:\n  name: slack\n  endpoints:\n    - to: 10.0.0.1\n".to_string(),
            ),
            (
                PathBuf::from("c.yaml"),
                "policy:\n  name: p\n  rules:\n    - resource: service:slak\n".to_string(),
            ),
        ])
        .unwrap_err();
        let got: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "b.yaml:1:1: service.name: service \"slack\" is already defined at a.yaml:10",
                "c.yaml:4:17: policy.rules[0].resource: policy \"p\": no service named \"slak\"; the catalog has analytics-db, slack",
            ]
        );
    }

    #[test]
    fn rates_read_in_words_and_short() {
        for (s, count, per) in [
            ("10 per minute", 10, Per::Minute),
            ("1 per second", 1, Per::Second),
            ("3/h", 3, Per::Hour),
            ("1000000 per hour", 1_000_000, Per::Hour),
            (" 7 / min ", 7, Per::Minute),
        ] {
            assert_eq!(parse_rate(s), Ok(RateLimit { count, per }), "{s}");
        }
        for s in [
            "",
            "10",
            "ten per minute",
            "0/s",
            "1000001/s",
            "-1/s",
            "5 per day",
            "5 per",
        ] {
            assert!(parse_rate(s).is_err(), "{s}");
        }
    }

    /// docs/policy.schema.json names exactly the fields the parser reads, object by object:
    /// each object of the schema is compared with the fields serde lists when it refuses an
    /// unknown one at that place.
    #[test]
    fn the_json_schema_names_the_fields_the_parser_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let props = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        // The fields serde expects where `zzz` is written.
        let expected = |text: &str| -> Vec<String> {
            let e = file(Path::new("p.yaml"), text)
                .map(|(_, p)| p)
                .unwrap_or_else(|p| p)
                .into_iter()
                .map(|p| p.message)
                .find(|m| m.contains("unknown field `zzz`"))
                .unwrap_or_else(|| panic!("no unknown-field error for {text:?}"));
            let list = e
                .split_once("expected one of ")
                .map_or_else(|| e.split_once("expected ").unwrap().1, |(_, l)| l);
            let mut k: Vec<String> = list
                .split(", ")
                .map(|f| f.trim().trim_matches('`').to_string())
                .collect();
            k.sort();
            k
        };
        let defs = &schema["$defs"];
        for (def, text) in [
            ("policy", "policy:\n  name: p\n  zzz: 1\n"),
            (
                "attest",
                "policy:\n  name: p\n  identity: a/b\n  attest:\n    zzz: 1\n",
            ),
            ("egress", "policy:\n  name: p\n  egress:\n    - zzz: 1\n"),
            ("ingress", "policy:\n  name: p\n  ingress:\n    - zzz: 1\n"),
            (
                "rule",
                "policy:\n  name: p\n  rules:\n    - resource: cidr:10.0.0.1\n      zzz: 1\n",
            ),
            (
                "when",
                "policy:\n  name: p\n  rules:\n    - resource: cidr:10.0.0.1\n      when:\n        zzz: 1\n",
            ),
            ("service", "service:\n  name: s\n  zzz: 1\n"),
            ("agent", "agent:\n  name: a/prod\n  zzz: 1\n"),
            (
                "endpoint",
                "service:\n  name: s\n  endpoints:\n    - zzz: 1\n",
            ),
        ] {
            assert_eq!(props(&defs[def]), expected(text), "schema $defs.{def}");
        }
        assert_eq!(
            props(&schema),
            expected("zzz: 1\npolicy:\n  name: p\n"),
            "the document"
        );
    }

    #[test]
    fn ingress_entries_name_peers_and_tcp_ports() {
        let p = parse_one("policy:\n  name: a\n  ingress:\n    - from: [10.0.0.0/8, \"::1\"]\n      ports: [443]\n").unwrap();
        let rules = p[0].ingress.as_ref().unwrap();
        assert_eq!(rules[0].from.len(), 2);
        assert_eq!(rules[0].ports, [PortRange { lo: 443, hi: 443 }]);
        assert_eq!(parse_one("policy:\n  name: a\n").unwrap()[0].ingress, None);
        let got = problems(
            "policy:\n  name: a\n  ingress:\n    - from: 10.0.0.1\n      protocol: udp\n    - ports: [1]\n    - from: nope\n",
        );
        assert_eq!(
            got,
            [
                "p.yaml:5:17: policy.ingress[0].protocol: ingress judges TCP connections only; write protocol: tcp or leave it out",
                "p.yaml:6:7: policy.ingress[1].from: names no peer; give addresses or CIDRs (127.0.0.1 for callers on this host)",
                "p.yaml:7:13: policy.ingress[2].from: \"nope\" is not an IP address or CIDR (such as 10.0.0.0/8 or 2001:db8::/32); host names come with the services catalog",
            ]
        );
    }

    /// The agents catalog: a name NAME/ENV, an identity (by default agent/NAME/ENV), the TCP
    /// endpoints it serves, the other hosts it runs on; and its problems, each where written.
    #[test]
    fn agents_are_named_served_over_tcp_and_referenced_by_rules() {
        let good = "agent:\n  name: report-api/prod\n  endpoints:\n    - to: 127.0.0.20\n      ports: [8443]\n  hosts: 10.0.0.0/8\n---\npolicy:\n  name: p\n  rules:\n    - resource: agent:report-api/prod\n      actions: [read]\n";
        let set = parse_texts(&[(PathBuf::from("a.yaml"), good.to_string())]).unwrap();
        let a = &set.agents[0];
        assert_eq!(a.identity, "agent/report-api/prod");
        assert_eq!(a.endpoints[0].protocol, Protocol::Tcp);
        assert_eq!(a.hosts.len(), 1);
        let rule = &set.policies[0].egress[0];
        assert_eq!(rule.endpoints, a.endpoints, "the catalog's");
        assert_eq!(rule.service.as_ref().unwrap().kind, RefKind::Agent);

        let bad = "\
agent:
  name: report-api
  endpoints:
    - to: 127.0.0.20
      protocol: udp
---
agent:
  name: x/prod
  identity: spiffe://
  endpoints: []
  hosts: [nope]
---
agent:
  name: y/prod
  identity: agent/report-api/prod
  endpoints:
    - to: 127.0.0.21
---
agent:
  name: z/prod
  identity: agent/report-api/prod
  endpoints:
    - to: 127.0.0.22
---
policy:
  name: p
  rules:
    - resource: agent:nobody/prod
    - resource: agent:y/prod
      ports: [1]
";
        let e = parse_texts(&[(PathBuf::from("bad.yaml"), bad.to_string())]).unwrap_err();
        let got: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        let want = [
            "bad.yaml:2:9: agent.name: \"report-api\" is not an agent name: write NAME/ENV",
            "bad.yaml:5:17: agent.endpoints[0].protocol: agents are called over TCP",
            "bad.yaml:9:13: agent.identity: ",
            "bad.yaml:10:3: agent.endpoints: an agent needs at least one endpoint",
            "bad.yaml:11:11: agent.hosts[0]: \"nope\" is not an IP address or CIDR",
            "bad.yaml:29:7: policy.rules[1]: an agent's ports are those of its catalog entry",
            "bad.yaml:19:1: agent.identity: an agent of identity \"agent/report-api/prod\" is already defined at bad.yaml:13",
            "bad.yaml:28:17: policy.rules[0].resource: policy \"p\": no agent named \"nobody/prod\"; the catalog has report-api, x/prod, y/prod, z/prod",
        ];
        for w in want {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "missing {w:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
    }

    /// Host names: in the catalogs' endpoints only, each a DNS name whose last label is not a
    /// number (a mistyped address is reported as one).
    #[test]
    fn host_names_are_read_in_the_catalogs_only() {
        let good = "service:\n  name: s\n  endpoints:\n    - to: [Warehouse.Internal.example., 10.0.0.0/8]\n      ports: [9000]\n";
        let set = parse_texts(&[(PathBuf::from("s.yaml"), good.to_string())]).unwrap();
        let ep = &set.services[0].endpoints[0];
        assert_eq!(ep.names, ["warehouse.internal.example"]);
        assert_eq!(ep.to.len(), 1);
        assert!(is_host_name("a-1.b"));
        for bad in ["10.0.0.300", "-a.b", "a..b", "a_b.c", ""] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        let got = problems(
            "policy:\n  name: p\n  egress:\n    - to: db.example\n---\nservice:\n  name: s\n  endpoints:\n    - to: 10.0.0.300\n",
        );
        assert_eq!(
            got,
            [
                "p.yaml:4:11: policy.egress[0].to: \"db.example\" is not an IP address or CIDR (such as 10.0.0.0/8 or 2001:db8::/32); host names come with the services catalog",
                "p.yaml:9:11: service.endpoints[0].to: \"10.0.0.300\" is neither an IP address or CIDR (such as 10.0.0.0/8) nor a host name (such as db.internal.example)",
            ]
        );
    }
}
