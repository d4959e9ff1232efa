//! Policies: a directory of YAML files, parsed and validated into [`PolicySet`], then compiled
//! into the kernel's rule form by [`compile`].
//!
//! Format (one or more YAML documents per file):
//! ```yaml
//! policy:
//!   name: web-fetcher          # [a-z0-9][a-z0-9._-]*, at most 63 characters, unique
//!   mode: enforce              # enforce (default) | audit
//!   egress:
//!     - to: 10.0.0.0/8         # an address or CIDR, or a list of them
//!       protocol: tcp          # tcp | udp | icmp | any (default any)
//!       ports: [443, 8000-8099] # ports and ranges; default all ports; not with icmp
//!     - unix: /run/app/api.sock  # a Unix socket path, or @name for an abstract one, or a list
//! ```

pub mod compile;
pub mod decide;
pub mod diff;
pub mod explain;
mod parse;
pub mod secret;
mod spans;
pub mod window;

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::compile::{Compiled, Grant, RuleInfo, compile};

/// What a policy directory may hold. A directory is reviewed like code; these bound what a
/// mistake, or a file written to hurt, costs the daemon (memory, and time at every reload)
/// before anything is compiled. Beyond each, loading stops with an error naming the limit.
pub mod limits {
    /// Policy files in the directory.
    pub const MAX_FILES: usize = 4096;
    /// Bytes of one policy file (a policy of 100,000 rules takes about 6 MiB).
    pub const MAX_FILE_BYTES: u64 = 16 << 20;
    /// Bytes of all policy files together.
    pub const MAX_DIR_BYTES: u64 = 64 << 20;
    /// YAML nodes the aliases of one file stand for: a few aliases that each repeat the one
    /// before can otherwise stand for billions of nodes.
    pub const MAX_ALIASED_NODES: u64 = 100_000;
    /// (destination, port range) pairs of all egress rules together.
    pub const MAX_RULE_ENTRIES: usize = 200_000;
}

/// Whether denials are enforced or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Where something was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
    /// 1-based; 0 when unknown. Not shown: a rule is named by file and line.
    #[serde(skip)]
    pub column: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Destinations × protocol × ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub to: Vec<IpNet>,
    /// Host names (services catalog only), resolved by the daemon: the addresses of each
    /// answer are granted until its TTL runs out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    pub protocol: Protocol,
    /// Empty means every port.
    pub ports: Vec<PortRange>,
}

/// A rate limit: `count` uses per `per`, all of them at once if unused (a token bucket of
/// `count` tokens, refilled one every `per / count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub count: u32,
    pub per: Per,
}

/// The period of a [`RateLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    pub const fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.per {
            Per::Second => "second",
            Per::Minute => "minute",
            Per::Hour => "hour",
        };
        write!(f, "{} per {per}", self.count)
    }
}

/// What a `rules:` entry grants beyond the network: the actions on the resource and the
/// attributes they must carry. The kernel cannot see these; the decision API answers them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Access {
    /// The resource as written, e.g. `service:analytics-db`.
    pub resource: String,
    /// Allowed actions; empty means every action.
    pub actions: Vec<String>,
    /// Attribute → allowed values; every attribute named must hold one of its values.
    pub conditions: std::collections::BTreeMap<String, Vec<String>>,
    /// For a `secret:` rule: how long the lease of a fetch lasts, in seconds (the default if
    /// `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

/// One allowed egress: its endpoints (written inline, or those of a catalog service), and
/// for a `rules:` entry what it grants there and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// Filled from the services catalog for a `service:` rule once every file is read.
    pub endpoints: Vec<Endpoint>,
    /// The catalog service this rule names.
    pub service: Option<ServiceRef>,
    /// `None` for an `egress:` entry.
    pub access: Option<Access>,
    pub rate: Option<RateLimit>,
    /// A rule's own mode: `audit` lets through what its rate limit or time window would
    /// deny, and records it.
    pub mode: Option<Mode>,
    /// When the rule grants; always if `None`.
    pub window: Option<window::Window>,
    pub source: Source,
}

/// Which catalog a resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `service:NAME`.
    Service,
    /// `agent:NAME/ENV`: the caller's egress to the agent's endpoints, and the callee's
    /// ingress from the caller.
    Agent,
}

/// A `resource: service:NAME` or `agent:NAME/ENV`, with where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub kind: RefKind,
    /// Path of the `resource` field, e.g. `policy.rules[0].resource`.
    pub field: String,
    pub at: Source,
}

/// A named set of endpoints that policies grant by name (`resource: service:NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub source: Source,
}

/// An agent of the catalog: who it is and where it is called, so that `agent:` rules
/// compile to the caller's egress and the callee's ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// `NAME/ENV`.
    pub name: String,
    /// Its SPIFFE ID as policies write it (default `agent/NAME/ENV`): the policy with this
    /// `identity:` governs it.
    pub identity: String,
    /// What it serves (TCP).
    pub endpoints: Vec<Endpoint>,
    /// The other hosts it runs on: its calls to agents here come from these addresses.
    pub hosts: Vec<IpNet>,
    pub source: Source,
}

/// Peers that may open TCP connections to the policy's cgroups, and to which local ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    pub from: Vec<IpNet>,
    /// Local ports; empty means every port.
    pub ports: Vec<PortRange>,
    pub source: Source,
}

/// One allowed Unix socket: a filesystem path, or `@name` for an abstract one, matched
/// exactly as the caller passes it (see `agentwall_common::unix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixRule {
    pub name: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    /// The SPIFFE ID whose holders this policy governs: a full `spiffe://` ID, or a path such
    /// as `agent/reader/prod` in the node's trust domain. `None`: only `agentwall exec
    /// --policy` and configured cgroups use it.
    pub identity: Option<String>,
    /// What the enrolling process must be, besides holding the certificate.
    pub attest: Attest,
    pub egress: Vec<EgressRule>,
    /// The Unix sockets the identity may connect or send to; none by default.
    pub unix: Vec<UnixRule>,
    /// Who may open TCP connections to it: `None` (no `ingress:` key) judges no inbound
    /// connection; a list (even empty) admits only what it names.
    pub ingress: Option<Vec<IngressRule>>,
    pub source: Source,
}

/// Attestation selectors of an identity. Every selector given must match the enrolling
/// process; a list matches when any of its values does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attest {
    pub uid: Vec<u32>,
    pub gid: Vec<u32>,
    /// Absolute path of the executable.
    pub exe: Option<PathBuf>,
    /// SHA-256 of the executable, lower-case hex.
    pub sha256: Option<String>,
    /// Pattern over the cgroup path (from the cgroup v2 root, starting with `/`); `*` matches
    /// within one path segment, `**` across segments.
    pub cgroup: Option<String>,
    /// The systemd unit whose cgroup the process runs in: a system unit such as
    /// `reader.service`, or a unit of one user's manager, `user@1000.service/reader.service`.
    pub systemd_unit: Option<String>,
}

impl Attest {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Every policy and service of a directory, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    pub services: Vec<Service>,
    pub agents: Vec<Agent>,
}

/// One problem in one file, with the line and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Path of the field, e.g. `policy.egress[2].ports[0]`; empty for the whole file.
    pub field: String,
    pub message: String,
}

impl Problem {
    /// A problem of the field written at `at` (`field` names it, from the document's top).
    fn at(at: &Source, field: &str, message: String) -> Self {
        Self {
            file: at.file.clone(),
            line: Some(at.line),
            column: (at.column > 0).then_some(at.column),
            field: field.to_string(),
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a policy directory. Nothing of it is loaded.
#[derive(Debug, thiserror::Error)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} problem{} in the policies, nothing loaded",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl PolicyError {
    pub(crate) fn one(file: &Path, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                file: file.to_path_buf(),
                line: None,
                column: None,
                field: String::new(),
                message: message.into(),
            }],
        }
    }
}

/// The host names the policies of `set` reach (through the services and agents catalogs),
/// sorted, once each: what the daemon resolves.
pub fn host_names(set: &PolicySet) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = set
        .policies
        .iter()
        .flat_map(|p| &p.egress)
        .flat_map(|r| &r.endpoints)
        .flat_map(|e| &e.names)
        .collect();
    names.into_iter().cloned().collect()
}

/// Whether a directory entry is a policy file: `*.yaml` or `*.yml`, not hidden.
pub(crate) fn is_policy_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml")) && path.is_file()
}

/// SHA-256 over the policy files of `dir` (names and contents, in name order), hex; recorded
/// with every load so that the audit log names the exact directory content in force.
pub fn dir_hash(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_policy_file(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name.as_bytes());
        let body = fs::read(&f).unwrap_or_default();
        ctx.update(&(body.len() as u64).to_le_bytes());
        ctx.update(&body);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Loads and validates every policy file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
    let entries = fs::read_dir(dir)
        .map_err(|e| PolicyError::one(dir, format!("cannot read the policy directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PolicyError::one(dir, format!("listing: {e}")))?;
        if is_policy_file(&entry.path()) {
            files.push(entry.path());
            if files.len() > limits::MAX_FILES {
                return Err(PolicyError::one(
                    dir,
                    format!(
                        "holds more than {} policy files; merge policies into fewer files",
                        limits::MAX_FILES
                    ),
                ));
            }
        }
    }
    files.sort();
    let mut texts = Vec::with_capacity(files.len());
    let mut total: u64 = 0;
    for f in files {
        let text = read_bounded(&f)?;
        total += text.len() as u64;
        if total > limits::MAX_DIR_BYTES {
            return Err(PolicyError::one(
                dir,
                format!(
                    "its policy files hold more than {} MiB together; split the policies over several nodes' directories or shorten them",
                    limits::MAX_DIR_BYTES >> 20
                ),
            ));
        }
        texts.push((f, text));
    }
    parse_texts(&texts)
}

/// Reads a policy file of at most [`limits::MAX_FILE_BYTES`] (a larger one is refused without
/// being read whole).
fn read_bounded(f: &Path) -> Result<String, PolicyError> {
    use std::io::Read as _;
    let file = fs::File::open(f).map_err(|e| PolicyError::one(f, format!("cannot read: {e}")))?;
    let mut text = String::new();
    file.take(limits::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| PolicyError::one(f, format!("cannot read: {e}")))?;
    if text.len() as u64 > limits::MAX_FILE_BYTES {
        return Err(PolicyError::one(
            f,
            format!(
                "is larger than {} MiB; split it into several files",
                limits::MAX_FILE_BYTES >> 20
            ),
        ));
    }
    Ok(text)
}

/// Parses and validates policy file contents (path, text) as one set.
pub fn parse_texts(files: &[(PathBuf, String)]) -> Result<PolicySet, PolicyError> {
    let mut problems = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    let mut services: Vec<Service> = Vec::new();
    let mut agents: Vec<Agent> = Vec::new();
    for (path, text) in files {
        match parse::file(path, text) {
            Ok((parsed, mut own)) => {
                policies.extend(parsed.policies);
                services.extend(parsed.services);
                agents.extend(parsed.agents);
                problems.append(&mut own);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    let catalog = Catalog {
        services: unique(
            &services,
            |s| (&s.name, &s.source),
            "service",
            "service.name",
            &mut problems,
        ),
        agents: unique(
            &agents,
            |a| (&a.name, &a.source),
            "agent",
            "agent.name",
            &mut problems,
        ),
    };
    unique(
        &agents,
        |a| (&a.identity, &a.source),
        "an agent of identity",
        "agent.identity",
        &mut problems,
    );
    for p in &mut policies {
        resolve_services(p, &catalog, &mut problems);
    }
    let entries: usize = policies
        .iter()
        .flat_map(|p| &p.egress)
        .flat_map(|r| &r.endpoints)
        .map(|e| e.to.len() * e.ports.len().max(1))
        .sum();
    if entries > limits::MAX_RULE_ENTRIES {
        problems.push(Problem {
            file: policies
                .first()
                .map(|p| p.source.file.clone())
                .unwrap_or_default(),
            line: None,
            column: None,
            field: "policy.egress".into(),
            message: format!(
                "the directory's egress rules name {entries} (destination, port range) pairs; at most {} are compiled: use wider prefixes and port ranges",
                limits::MAX_RULE_ENTRIES
            ),
        });
    }
    check_duplicates(&policies, &mut problems);
    if problems.is_empty() {
        Ok(PolicySet {
            policies,
            services,
            agents,
        })
    } else {
        Err(PolicyError { problems })
    }
}

/// The services and agents by name.
struct Catalog<'a> {
    services: HashMap<&'a str, &'a Service>,
    agents: HashMap<&'a str, &'a Agent>,
}

/// `items` by the key `key_of` gives (with where each is written); a second definition of a
/// key is a problem of `field` (`what` names the key).
fn unique<'a, T>(
    items: &'a [T],
    key_of: impl Fn(&'a T) -> (&'a String, &'a Source),
    what: &str,
    field: &str,
    problems: &mut Vec<Problem>,
) -> HashMap<&'a str, &'a T> {
    let mut by_key: HashMap<&str, (&T, &Source)> = HashMap::new();
    for item in items {
        let (key, source) = key_of(item);
        if let Some((_, first)) = by_key.get(key.as_str()) {
            problems.push(Problem::at(
                source,
                field,
                format!("{what} {key:?} is already defined at {first}"),
            ));
        } else {
            by_key.insert(key, (item, source));
        }
    }
    by_key.into_iter().map(|(k, (v, _))| (k, v)).collect()
}

/// Gives each `service:` and `agent:` rule of `p` the endpoints of what it names.
fn resolve_services(p: &mut Policy, catalog: &Catalog<'_>, problems: &mut Vec<Problem>) {
    for rule in &mut p.egress {
        let Some(ServiceRef {
            name,
            kind,
            field,
            at,
        }) = &rule.service
        else {
            continue;
        };
        let (found, mut known, what, doc) = match kind {
            RefKind::Service => (
                catalog.services.get(name.as_str()).map(|s| &s.endpoints),
                catalog.services.keys().copied().collect::<Vec<_>>(),
                "service",
                "a `service:` document",
            ),
            RefKind::Agent => (
                catalog.agents.get(name.as_str()).map(|a| &a.endpoints),
                catalog.agents.keys().copied().collect::<Vec<_>>(),
                "agent",
                "an `agent:` document (the agents catalog)",
            ),
        };
        match found {
            Some(endpoints) => rule.endpoints.clone_from(endpoints),
            None => {
                known.sort_unstable();
                let hint = if known.is_empty() {
                    format!("the directory defines no {what}; add {doc}")
                } else {
                    format!("the catalog has {}", known.join(", "))
                };
                problems.push(Problem::at(
                    at,
                    field,
                    format!("policy {:?}: no {what} named {name:?}; {hint}", p.name),
                ));
            }
        }
    }
}

/// One name, one policy; one identity, one policy.
fn check_duplicates(policies: &[Policy], problems: &mut Vec<Problem>) {
    // First definitions by name and by identity (linear in the number of policies).
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut by_identity: HashMap<&str, usize> = HashMap::new();
    for (i, p) in policies.iter().enumerate() {
        by_name.entry(p.name.as_str()).or_insert(i);
        if let Some(id) = &p.identity {
            by_identity.entry(id.as_str()).or_insert(i);
        }
    }
    for (i, p) in policies.iter().enumerate() {
        if let Some(first) = by_name
            .get(p.name.as_str())
            .filter(|f| **f < i)
            .map(|f| &policies[*f])
        {
            problems.push(Problem::at(
                &p.source,
                "policy.name",
                format!("policy {:?} is already defined at {}", p.name, first.source),
            ));
        }
        if let Some(id) = &p.identity
            && let Some(first) = by_identity
                .get(id.as_str())
                .filter(|f| **f < i)
                .map(|f| &policies[*f])
        {
            problems.push(Problem::at(
                &p.source,
                "policy.identity",
                format!(
                    "identity {id:?} is already governed by policy {:?} at {}; one identity, one policy",
                    first.name, first.source
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout kubelet gives a mounted ConfigMap: each file a symlink into `..data`, itself a
    /// symlink to a hidden, timestamped directory. Every policy loads once, from its top name.
    #[test]
    fn a_config_map_directory_loads_each_policy_once() {
        let dir = std::env::temp_dir().join(format!("aw-configmap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let stamp = dir.join("..2026_11_26_12_00_00.1");
        fs::create_dir_all(&stamp).unwrap();
        fs::write(stamp.join("sealed.yaml"), "policy:\n  name: sealed\n").unwrap();
        fs::write(stamp.join("notes.txt"), "not a policy").unwrap();
        std::os::unix::fs::symlink("..2026_11_26_12_00_00.1", dir.join("..data")).unwrap();
        for f in ["sealed.yaml", "notes.txt"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
        let set = load_dir(&dir);
        let hash = dir_hash(&dir);
        fs::remove_dir_all(&dir).unwrap();
        let names: Vec<String> = set
            .unwrap()
            .policies
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(names, ["sealed"]);
        assert_eq!(hash.len(), 64);
    }

    #[test]
    fn a_directory_beyond_its_limits_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("aw-policy-limits-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A file too large is refused before it is read whole.
        let big = dir.join("big.yaml");
        fs::write(&big, vec![b'#'; (limits::MAX_FILE_BYTES + 1) as usize]).unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("big.yaml") && e.contains("is larger than 16 MiB"),
            "{e}"
        );
        fs::remove_file(&big).unwrap();
        // An alias bomb is refused before serde expands it.
        let mut laughs = String::from("x0: &x0 [a, a]\n");
        for i in 1..=40 {
            laughs.push_str(&format!("x{i}: &x{i} [*x{}, *x{}]\n", i - 1, i - 1));
        }
        laughs.push_str("policy:\n  name: p\n");
        fs::write(dir.join("laughs.yaml"), laughs).unwrap();
        // (Expanded, it would be 2^41 nodes: the test would not end.)
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("aliases expand to more than 100000 nodes"),
            "{e}"
        );
        fs::remove_file(dir.join("laughs.yaml")).unwrap();
        // Too many (destination, port) pairs.
        let to: Vec<String> = (0..250).map(|i| format!("10.0.{i}.0/24")).collect();
        let ports: Vec<String> = (1..=1000).map(|p| p.to_string()).collect();
        fs::write(
            dir.join("wide.yaml"),
            format!(
                "policy:\n  name: w\n  egress:\n    - to: [{}]\n      protocol: tcp\n      ports: [{}]\n",
                to.join(", "),
                ports.join(", ")
            ),
        )
        .unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("name 250000 (destination, port range) pairs; at most 200000"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The repository's own examples are valid: the `policies/` directory as a whole, and
    /// each YAML example of docs/policy.md beside the `policies/` catalogs.
    #[test]
    fn the_example_policies_and_the_documented_examples_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("policies");
        let set = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let pipeline = set
            .policies
            .iter()
            .find(|p| p.name == "data-pipeline")
            .expect("the design brief's agent");
        assert!(pipeline.egress.iter().any(|r| r.rate.is_some()));
        assert!(pipeline.egress.iter().any(|r| r.window.is_some()));
        compile::compile(&set, |_| 1).unwrap();

        let catalog = fs::read_to_string(dir.join("catalog.yaml")).unwrap();
        let agents = fs::read_to_string(dir.join("agents.yaml")).unwrap();
        assert!(
            !set.agents.is_empty()
                && set
                    .policies
                    .iter()
                    .flat_map(|p| &p.egress)
                    .any(|r| r.service.as_ref().is_some_and(|s| s.kind == RefKind::Agent)),
            "an agent calling another"
        );
        let doc = fs::read_to_string(root.join("docs/policy.md")).unwrap();
        let mut examples = 0;
        for (i, block) in doc.split("```yaml\n").skip(1).enumerate() {
            let text = block.split("```").next().unwrap();
            let mut files = vec![(PathBuf::from(format!("example-{i}.yaml")), text.to_string())];
            if !text.contains("kind: Service") {
                files.push((PathBuf::from("catalog.yaml"), catalog.clone()));
            }
            if !text.contains("kind: Agent") {
                files.push((PathBuf::from("agents.yaml"), agents.clone()));
            }
            let set = parse_texts(&files)
                .unwrap_or_else(|e| panic!("docs/policy.md example {i}:\n{text}\n{e}"));
            compile::compile(&set, |_| 1).unwrap();
            examples += 1;
        }
        assert!(examples >= 5, "{examples} examples found");
    }
}
