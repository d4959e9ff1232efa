//! `agentwall policy`: policy tools that need no daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use super::admin::{count, count_plural};
use crate::policy;

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Validate a policy directory and show what it compiles to. Lists every problem of the
    /// directory (file, line, column, field, what is expected) and exits 1 if there is any.
    Check {
        /// Policy directory.
        dir: PathBuf,
        /// One JSON object on stdout: `ok`, the `problems` (for CI annotations), and for a
        /// valid directory its policies, services, agents and rule count.
        #[arg(long)]
        json: bool,
    },
    /// What a change to a policy directory grants and removes, per policy and identity. OLD
    /// and NEW are directories, or git revisions of the directory `--path` in the repository
    /// of the current directory (such as `main` and `HEAD`).
    Diff {
        old: String,
        new: String,
        /// The policy directory within the repository, for git revisions.
        #[arg(long, default_value = "policies")]
        path: PathBuf,
        /// Print JSON: one document per line.
        #[arg(long)]
        json: bool,
    },
    /// Explain what the kernel would do with a connect of an identity, and what the decision
    /// API would answer for an action: the verdict and the deciding rule (file:line), or why
    /// nothing matched. Exits 0 for allow, 1 for deny.
    Explain {
        /// Policy directory.
        #[arg(long, default_value = crate::defaults::POLICY_DIR)]
        policies: PathBuf,
        /// The caller: a SPIFFE ID, or a path such as agent/reader/prod in the trust domain.
        #[arg(long, conflicts_with = "policy", required_unless_present = "policy")]
        identity: Option<String>,
        /// Or a policy by name (for `agentwall exec --policy` cgroups).
        #[arg(long)]
        policy: Option<String>,
        /// `service:NAME` or `agent:NAME/ENV` (its first endpoint), or
        /// `ADDRESS:PORT[/tcp|udp|icmp]` (`[::1]:443` for IPv6).
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        to: Option<String>,
        /// Or who connects to the identity (its ingress): `agent:NAME/ENV` or `policy:NAME`
        /// (a process of this host under that agent's or that policy's rules), or an ADDRESS.
        #[arg(long, requires = "port")]
        from: Option<String>,
        /// With --from: the identity's local TCP port connected to.
        #[arg(long)]
        port: Option<u16>,
        /// The action to ask the decision API about, such as `read`.
        #[arg(long)]
        action: Option<String>,
        /// Attributes of the action, `NAME=VALUE`; repeatable.
        #[arg(long = "attr", value_name = "NAME=VALUE")]
        attrs: Vec<String>,
        /// When (RFC 3339), for time windows; default now.
        #[arg(long)]
        at: Option<jiff::Timestamp>,
        /// The trust domain of identity paths.
        #[arg(long, default_value = crate::defaults::TRUST_DOMAIN)]
        trust_domain: String,
        /// Print JSON: one document per line.
        #[arg(long)]
        json: bool,
    },
}

/// A policy directory as a path or as a git revision of one.
fn load_side(side: &str, path: &std::path::Path) -> anyhow::Result<policy::PolicySet> {
    if std::path::Path::new(side).is_dir() {
        return Ok(policy::load_dir(std::path::Path::new(side))?);
    }
    let git = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let o = std::process::Command::new("git")
            .args(args)
            .output()
            .map_err(|e| anyhow::anyhow!("running git: {e}"))?;
        if !o.status.success() {
            anyhow::bail!(
                "{side:?} is neither a directory nor a git revision here: git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(o.stdout)
    };
    let dir = path.to_string_lossy().trim_end_matches('/').to_string();
    let listing = git(&[
        "ls-tree",
        "--name-only",
        "-z",
        side,
        "--",
        &format!("{dir}/"),
    ])?;
    let mut files = Vec::new();
    for name in listing.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let file = name.rsplit('/').next().unwrap_or(&name).to_string();
        if file.starts_with('.') || !(file.ends_with(".yaml") || file.ends_with(".yml")) {
            continue;
        }
        let text = git(&["show", &format!("{side}:{name}")])?;
        files.push((
            std::path::PathBuf::from(format!("{side}:{name}")),
            String::from_utf8(text).map_err(|_| anyhow::anyhow!("{side}:{name} is not UTF-8"))?,
        ));
    }
    Ok(policy::parse_texts(&files)?)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn diff(old: &str, new: &str, path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let d = policy::diff::diff(&load_side(old, path)?, &load_side(new, path)?);
    if json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    if d.is_empty() {
        println!("no access changes");
        return Ok(ExitCode::SUCCESS);
    }
    let (mut granted, mut removed) = (0, 0);
    for p in &d {
        println!(
            "policy {} ({}){}",
            p.policy,
            p.change,
            p.identity
                .as_deref()
                .map_or(String::new(), |i| format!(", identity {i}"))
        );
        for g in &p.granted {
            println!("  + {g}");
        }
        for r in &p.removed {
            println!("  - {r}");
        }
        for o in &p.other {
            println!("  ~ {o}");
        }
        granted += p.granted.len();
        removed += p.removed.len();
    }
    println!(
        "{}: {} granted, {} removed",
        count_plural(d.len(), "policy", "policies"),
        count_plural(granted, "access", "accesses"),
        count_plural(removed, "access", "accesses")
    );
    Ok(ExitCode::SUCCESS)
}

/// `policy explain --from`: whether `from` may connect to local TCP port `port` of processes
/// under policy `name`, and by which rule.
#[expect(clippy::print_stdout, reason = "CLI output")]
fn explain_ingress(
    set: &policy::PolicySet,
    compiled: &policy::Compiled,
    name: &str,
    from: &str,
    port: u16,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use policy::explain::Peer;
    let peer = if let Some(agent) = from.strip_prefix("agent:") {
        let a = set
            .agents
            .iter()
            .find(|a| a.name == agent)
            .ok_or_else(|| anyhow::anyhow!("no agent named {agent:?} in the catalog"))?;
        let path = policy::compile::identity_path(&a.identity);
        let policy = set
            .policies
            .iter()
            .find(|p| {
                p.identity
                    .as_deref()
                    .is_some_and(|id| policy::compile::identity_path(id) == path)
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no policy governs agent {agent:?} (identity {}) on this host",
                    a.identity
                )
            })?;
        Peer::Local(policy.name.clone())
    } else if let Some(p) = from.strip_prefix("policy:") {
        if !compiled.policies.contains_key(p) {
            anyhow::bail!("no policy named {p:?}");
        }
        Peer::Local(p.to_string())
    } else {
        Peer::Address(from.parse().map_err(|_| {
            anyhow::anyhow!(
                "{from:?} is not agent:NAME/ENV, policy:NAME or an IP address (such as 10.0.0.5)"
            )
        })?)
    };
    let v = policy::explain::ingress(compiled, name, &peer, port);
    if json {
        let e = policy::explain::Explanation {
            policy: name.to_string(),
            kernel: v.clone(),
            decision: None,
        };
        println!("{}", serde_json::to_string(&e)?);
    } else {
        println!("policy {name}");
        let verdict = if v.allow { "allow" } else { "deny" };
        let why = match (&v.rule, v.reason.as_str()) {
            (_, "not_judged") => format!(
                ": policy {name} does not judge who connects (no ingress: rules, not an agent of the catalog)"
            ),
            (Some(rule), _) => format!(" by {rule}"),
            (None, _) => format!(
                ": no ingress rule of policy {name} and no agent: rule of the caller admits it{}",
                if v.audit {
                    "; audit mode: let through and recorded"
                } else {
                    ""
                }
            ),
        };
        println!("kernel: {verdict} {} to port {port}/tcp{why}", v.judged_as);
    }
    Ok(if v.allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Where `--to` points: the address, port and protocol, and the resource it names.
fn destination(
    set: &policy::PolicySet,
    to: &str,
) -> anyhow::Result<(std::net::IpAddr, u16, policy::Protocol, Option<String>)> {
    let named = if let Some(name) = to.strip_prefix("service:") {
        let svc = set.services.iter().find(|s| s.name == name);
        Some(("service", name, svc.map(|s| &s.endpoints)))
    } else if let Some(name) = to.strip_prefix("agent:") {
        let agent = set.agents.iter().find(|a| a.name == name);
        Some(("agent", name, agent.map(|a| &a.endpoints)))
    } else {
        None
    };
    if let Some((what, name, endpoints)) = named {
        let endpoints =
            endpoints.ok_or_else(|| anyhow::anyhow!("no {what} named {name:?} in the catalog"))?;
        let ep = endpoints
            .first()
            .ok_or_else(|| anyhow::anyhow!("{what} {name:?} has no endpoint"))?;
        let net = ep
            .to
            .first()
            .ok_or_else(|| anyhow::anyhow!("{what} {name:?} has no address"))?;
        let port = ep.ports.first().map_or(0, |p| p.lo);
        return Ok((net.network(), port, ep.protocol, Some(to.to_string())));
    }
    let (addr, proto) = match to.rsplit_once('/') {
        Some((a, p)) => (
            a,
            match p {
                "tcp" => policy::Protocol::Tcp,
                "udp" => policy::Protocol::Udp,
                "icmp" => policy::Protocol::Icmp,
                _ => anyhow::bail!("{p:?} is not a protocol: write tcp, udp or icmp"),
            },
        ),
        None => (to, policy::Protocol::Tcp),
    };
    let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
        anyhow::anyhow!(
            "{addr:?} is not ADDRESS:PORT (such as 10.0.0.5:5432 or [::1]:443), service:NAME or agent:NAME/ENV; host names are not resolved here"
        )
    })?;
    Ok((sock.ip(), sock.port(), proto, None))
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn explain(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Explain {
        policies,
        identity,
        policy: by_name,
        to,
        from,
        port,
        action,
        attrs,
        at,
        trust_domain,
        json,
    } = cmd
    else {
        anyhow::bail!("not an explain command");
    };
    let (set, compiled) = check(&policies)?;
    let name = match (&identity, by_name) {
        (_, Some(n)) => {
            if !compiled.policies.contains_key(&n) {
                anyhow::bail!("no policy named {n:?} in {}", policies.display());
            }
            n
        }
        (Some(id), None) => {
            let full = if id.contains("://") {
                id.clone()
            } else {
                format!("spiffe://{trust_domain}/{}", id.trim_start_matches('/'))
            };
            let parsed = crate::spiffe::SpiffeId::workload(&full)
                .map_err(|e| anyhow::anyhow!("{id:?} is not a SPIFFE ID: {e}"))?;
            crate::identity::service::grant_for(&compiled.identities, &parsed, &trust_domain)
                .map(|g| g.policy.clone())
                .ok_or_else(|| {
                    anyhow::anyhow!("no policy in {} governs {full}", policies.display())
                })?
        }
        (None, None) => anyhow::bail!("give --identity or --policy"),
    };
    if let (Some(from), Some(port)) = (&from, port) {
        return explain_ingress(&set, &compiled, &name, from, port, json);
    }
    let to = to.ok_or_else(|| anyhow::anyhow!("give --to or --from"))?;
    let (ip, port, protocol, service) = destination(&set, &to)?;
    let at = at.unwrap_or_else(jiff::Timestamp::now);
    let mut attributes = std::collections::BTreeMap::new();
    for a in &attrs {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{a:?} is not NAME=VALUE"))?;
        attributes.insert(k.to_string(), v.to_string());
    }
    let kernel = policy::explain::kernel(&compiled, &name, ip, port, protocol, at);
    // The resource the action is asked on: the service named, or the deciding rule's.
    let resource = service.or_else(|| {
        kernel
            .rule_id
            .and_then(|id| compiled.rule(id))
            .and_then(|r| r.access.as_ref())
            .map(|a| a.resource.clone())
    });
    let decision = match (&action, &resource) {
        (Some(action), Some(resource)) => Some(policy::decide::decide(
            &compiled,
            &name,
            &policy::decide::Query {
                resource: resource.clone(),
                action: action.clone(),
                attributes,
            },
            at,
            |_, _| true,
        )),
        (Some(_), None) => anyhow::bail!(
            "no rule with actions reaches {to}; name the resource with --to service:NAME"
        ),
        (None, _) => None,
    };
    let allow = kernel.allow && decision.as_ref().is_none_or(|d| d.allow);
    if json {
        let e = policy::explain::Explanation {
            policy: name,
            kernel,
            decision,
        };
        println!("{}", serde_json::to_string(&e)?);
    } else {
        let proto = match protocol {
            policy::Protocol::Udp => "udp",
            policy::Protocol::Icmp => "icmp",
            _ => "tcp",
        };
        let dst = std::net::SocketAddr::new(ip, port);
        println!("policy {name}");
        let mut line = format!(
            "kernel: {} {dst}/{proto}",
            if kernel.allow { "allow" } else { "deny" }
        );
        match (&kernel.rule, kernel.reason.as_str()) {
            (Some(rule), "rule") => line.push_str(&format!(" by {rule}")),
            (Some(rule), why) => line.push_str(&format!(": {why} ({rule})")),
            (None, _) => line.push_str(&format!(
                ": no rule of policy {name} covers it{}",
                kernel
                    .node
                    .as_deref()
                    .map_or(String::new(), |n| format!(" (nearest rule node {n})"))
            )),
        }
        if let Some(l) = &kernel.limited {
            line.push_str(&format!("; rate limit {l}, a token per connect"));
        }
        if kernel.audit {
            line.push_str("; audit mode: let through and recorded");
        }
        println!("{line}");
        if let (Some(d), Some(resource), Some(action)) = (&decision, &resource, &action) {
            println!(
                "decision: {} {action} on {resource}: {}{}{}",
                if d.allow { "allow" } else { "deny" },
                d.reason,
                d.rule
                    .as_deref()
                    .map_or(String::new(), |r| format!(" ({r})")),
                if d.audit { "; audit mode" } else { "" }
            );
        }
    }
    Ok(if allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `policy check --json` output.
#[derive(serde::Serialize)]
struct CheckReport {
    ok: bool,
    problems: Vec<ProblemJson>,
    policies: Vec<PolicyJson>,
    services: Vec<String>,
    agents: Vec<String>,
    rules: usize,
    kernel_rule_nodes: usize,
}

#[derive(serde::Serialize)]
struct ProblemJson {
    file: String,
    line: Option<usize>,
    column: Option<usize>,
    field: String,
    message: String,
}

#[derive(serde::Serialize)]
struct PolicyJson {
    name: String,
    mode: policy::Mode,
    identity: Option<String>,
    file: String,
    line: usize,
    rules: usize,
}

impl From<&policy::Problem> for ProblemJson {
    fn from(p: &policy::Problem) -> Self {
        Self {
            file: p.file.display().to_string(),
            line: p.line,
            column: p.column,
            field: p.field.clone(),
            message: p.message.clone(),
        }
    }
}

/// Loads and compiles `dir` as the daemon would (slots numbered in order).
fn check(
    dir: &std::path::Path,
) -> Result<(policy::PolicySet, policy::Compiled), policy::PolicyError> {
    let set = policy::load_dir(dir)?;
    let slots: std::collections::HashMap<String, u32> = set
        .policies
        .iter()
        .zip(1..)
        .map(|(p, slot)| (p.name.clone(), slot))
        .collect();
    let compiled = policy::compile(&set, |n| slots.get(n).copied().unwrap_or(0))
        .map_err(|problems| policy::PolicyError { problems })?;
    Ok((set, compiled))
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let (dir, json) = match cmd {
        PolicyCommand::Check { dir, json } => (dir, json),
        explain_cmd @ PolicyCommand::Explain { .. } => return explain(explain_cmd),
        PolicyCommand::Diff {
            old,
            new,
            path,
            json,
        } => return diff(&old, &new, &path, json),
    };
    let checked = check(&dir);
    if json {
        let report = match &checked {
            Ok((set, compiled)) => CheckReport {
                ok: true,
                problems: Vec::new(),
                policies: set
                    .policies
                    .iter()
                    .map(|p| PolicyJson {
                        name: p.name.clone(),
                        mode: p.mode,
                        identity: p.identity.clone(),
                        file: p.source.file.display().to_string(),
                        line: p.source.line,
                        rules: p.egress.len() + p.unix.len(),
                    })
                    .collect(),
                services: set.services.iter().map(|s| s.name.clone()).collect(),
                agents: set.agents.iter().map(|a| a.name.clone()).collect(),
                rules: compiled.rules.len(),
                kernel_rule_nodes: compiled.nodes.len(),
            },
            Err(e) => CheckReport {
                ok: false,
                problems: e.problems.iter().map(ProblemJson::from).collect(),
                policies: Vec::new(),
                services: Vec::new(),
                agents: Vec::new(),
                rules: 0,
                kernel_rule_nodes: 0,
            },
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let (set, compiled) = checked?;
    for s in &set.services {
        println!(
            "service {} at {}: {}",
            s.name,
            s.source,
            count(s.endpoints.len(), "endpoint")
        );
    }
    for a in &set.agents {
        let path = policy::compile::identity_path(&a.identity);
        let callee = compiled
            .identities
            .iter()
            .find(|(id, _)| policy::compile::identity_path(id) == path)
            .and_then(|(_, g)| compiled.policies.get(&g.policy));
        let callers = compiled
            .peers
            .iter()
            .filter(|p| callee.is_some_and(|(slot, _)| *slot == p.callee_slot))
            .count();
        println!(
            "agent {} at {}: identity {}, {}, {}",
            a.name,
            a.source,
            a.identity,
            count(a.endpoints.len(), "endpoint"),
            if callee.is_some() {
                format!(
                    "{} admitted on this host",
                    count_plural(callers, "caller policy", "caller policies")
                )
            } else {
                "no policy here (its ingress is judged where it runs)".to_string()
            }
        );
    }
    for p in &set.policies {
        let identity = p.identity.as_deref().map_or(String::new(), |id| {
            format!(
                ", identity {id}{}",
                if p.attest.is_empty() {
                    ""
                } else {
                    " (with attestation selectors)"
                }
            )
        });
        let limited = p.egress.iter().filter(|r| r.rate.is_some()).count();
        let windowed = p.egress.iter().filter(|r| r.window.is_some()).count();
        let conditions: Vec<String> = [(limited, "rate-limited"), (windowed, "with a time window")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        println!(
            "policy {} ({}) at {}: {}{}{identity}",
            p.name,
            p.mode,
            p.source,
            count(p.egress.len() + p.unix.len(), "rule"),
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" ({})", conditions.join(", "))
            }
        );
    }
    println!(
        "{}, {}, {}, {}, {}: OK",
        count_plural(set.policies.len(), "policy", "policies"),
        count(set.services.len(), "service"),
        count(set.agents.len(), "agent"),
        count(compiled.rules.len(), "rule"),
        count(compiled.nodes.len(), "kernel rule node")
    );
    Ok(ExitCode::SUCCESS)
}
