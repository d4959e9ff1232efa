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
    Attest, EgressRule, Mode, Policy, PortRange, Problem, Protocol, Source, UnixRule, spans::Spans,
};

const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    policy: RawPolicy,
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
    fn line(&self, field: &str) -> usize {
        self.spans.line(self.doc, field).unwrap_or(1)
    }

    fn problem(&mut self, field: String, message: String) {
        let line = self.spans.line(self.doc, &field);
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            field,
            message,
        });
    }
}

/// Parses every document of one file.
pub(super) fn file(path: &Path, text: &str) -> Result<Vec<Policy>, Vec<Problem>> {
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if blank {
        return Err(vec![Problem {
            file: path.to_path_buf(),
            line: None,
            field: String::new(),
            message: "the file holds no policy; a policy file holds `policy:` documents".into(),
        }]);
    }
    let spans = Spans::index(text);
    if spans.aliased_nodes() > super::limits::MAX_ALIASED_NODES {
        return Err(vec![Problem {
            file: path.to_path_buf(),
            line: None,
            field: String::new(),
            message: format!(
                "its YAML aliases expand to more than {} nodes; write the repeated values out, or alias less",
                super::limits::MAX_ALIASED_NODES
            ),
        }]);
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (doc_index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
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
        let policy = check_policy(&mut c, doc.policy);
        if c.problems.is_empty() {
            out.push(policy);
        } else {
            problems.append(&mut c.problems);
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

fn serde_problem(path: &Path, e: &serde_yaml::Error) -> Problem {
    let line = e.location().map(|l| l.line());
    // serde_yaml's message is "<path>: <message> at line L column C"; keep the message only,
    // the line is reported in its own place.
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
        line,
        field,
        message,
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
    Policy {
        name: raw.name,
        mode: raw.mode,
        identity,
        attest,
        egress,
        unix,
        source: Source {
            file: PathBuf::from(c.file),
            line: c.line("policy"),
        },
    }
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
    let mut out = Vec::new();
    for (f, name) in names {
        let shape_ok = name.starts_with('/') || (name.starts_with('@') && name.len() > 1);
        if !shape_ok {
            c.problem(
                f,
                format!(
                    "{name:?} is not a Unix socket name: give an absolute path (/run/app.sock) \
                     or @ and an abstract name (@app)"
                ),
            );
            continue;
        }
        if agentwall_common::unix::UnixKey::from_policy_name(0, 0, &name).is_none() {
            c.problem(
                f,
                format!(
                    "{name:?} does not fit in a Unix socket address (at most {} bytes, no NUL)",
                    agentwall_common::unix::SUN_PATH_MAX
                ),
            );
            continue;
        }
        out.push(UnixRule {
            name,
            source: Source {
                file: PathBuf::from(c.file),
                line: c.line(&f),
            },
        });
    }
    out
}

fn check_egress(c: &mut Checker<'_>, field: &str, raw: RawEgress) -> Option<EgressRule> {
    let before = c.problems.len();
    let _ = raw.description;
    let protocol = raw.protocol.unwrap_or_default();
    let to_raw = listed(field, "to", raw.to);
    if to_raw.is_empty() {
        c.problem(
            format!("{field}.to"),
            "names no destination; give an address or CIDR".into(),
        );
    }
    let mut to = Vec::with_capacity(to_raw.len());
    for (f, s) in to_raw {
        match parse_destination(&s) {
            Ok(net) => to.push(net),
            Err(e) => c.problem(f, e.to_string()),
        }
    }
    let mut ports = Vec::with_capacity(raw.ports.len());
    if protocol == Protocol::Icmp && !raw.ports.is_empty() {
        c.problem(
            format!("{field}.ports"),
            "ICMP has no ports; remove `ports` or change `protocol`".into(),
        );
    }
    for (i, p) in raw.ports.into_iter().enumerate() {
        match parse_port(&p) {
            Ok(r) => ports.push(r),
            Err(e) => c.problem(format!("{field}.ports[{i}]"), e.to_string()),
        }
    }
    if c.problems.len() > before {
        return None;
    }
    Some(EgressRule {
        to,
        protocol,
        ports,
        source: Source {
            file: PathBuf::from(c.file),
            line: c.line(field),
        },
    })
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
        file(Path::new("p.yaml"), text)
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
            p.egress[0].ports,
            vec![
                PortRange { lo: 443, hi: 443 },
                PortRange { lo: 8000, hi: 8099 }
            ]
        );
        assert_eq!(p.egress[0].source.line, 5);
        assert_eq!(p.egress[1].source.line, 8);
        assert_eq!(p.egress[1].to.len(), 2);
        assert_eq!(p.egress[1].to[0].prefix_len(), 128);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "policy:\n  name: web\n  egress:\n    - to: 10.0.0.1/8\n      ports: [0, 70000, \"9-3\", \"x\"]\n    - to: nope.example\n      protocol: icmp\n      ports: [1]\n";
        let got = problems(text);
        let want = [
            "p.yaml:4: policy.egress[0].to: \"10.0.0.1/8\" has bits set after the prefix length; did you mean 10.0.0.0/8?",
            "p.yaml:5: policy.egress[0].ports[0]: 0 is not a destination port (1 to 65535)",
            "p.yaml:5: policy.egress[0].ports[1]: 70000 is not a destination port (1 to 65535)",
            "p.yaml:5: policy.egress[0].ports[2]: range \"9-3\" is empty: its start is above its end",
            "p.yaml:5: policy.egress[0].ports[3]: \"x\" is not a port or a range such as 8000-8099",
        ];
        for w in want {
            assert!(got.iter().any(|g| g == w), "missing {w:?} in {got:#?}");
        }
        assert!(
            got.iter().any(|g| g.starts_with(
                "p.yaml:6: policy.egress[1].to: \"nope.example\" is not an IP address"
            )),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("p.yaml:8: policy.egress[1].ports: ICMP has no ports")),
            "{got:#?}"
        );
    }

    #[test]
    fn serde_errors_keep_line_and_field() {
        let got =
            problems("policy:\n  name: web\n  egress:\n    - to: 10.0.0.0/8\n      protocl: tcp\n");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("p.yaml:5: policy.egress[0]: unknown field `protocl`"),
            "{got:?}"
        );

        let got = problems("policy:\n  name: web\n  mode: strict\n");
        assert!(
            got[0].starts_with("p.yaml:3: policy.mode: unknown variant `strict`"),
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
                "p.yaml:4: policy.egress[0].unix: \"app.sock\" is not a Unix socket name: give an absolute path (/run/app.sock) or @ and an abstract name (@app)",
                "p.yaml:5: policy.egress[1].unix: \"@\" is not a Unix socket name: give an absolute path (/run/app.sock) or @ and an abstract name (@app)",
                &format!(
                    "p.yaml:6: policy.egress[2].unix: \"{long}\" does not fit in a Unix socket address (at most 108 bytes, no NUL)"
                ),
                "p.yaml:7: policy.egress[3]: a `unix:` rule has no protocol or ports; remove them",
                "p.yaml:9: policy.egress[4]: has both `to` and `unix`; write a network rule and a Unix socket rule apart",
                "p.yaml:11: policy.egress[5]: names nothing; give `to:` (addresses) or `unix:` (Unix socket paths)",
                "p.yaml:12: policy.egress[6].unix: names no socket; give a path such as /run/app.sock or @abstract-name",
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
            "b.yaml:3: policy.name: policy \"x\" is already defined at a.yaml:1"
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
            "p.yaml:3: policy.identity:",
            "p.yaml:5: policy.attest.exe:",
            "p.yaml:6: policy.attest.sha256:",
            "p.yaml:7: policy.attest.cgroup:",
            "p.yaml:8: policy.attest.systemd_unit:",
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
}
