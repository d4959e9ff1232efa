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
        /// valid directory its policies, services and rule count.
        #[arg(long)]
        json: bool,
    },
}

/// `policy check --json` output.
#[derive(serde::Serialize)]
struct CheckReport {
    ok: bool,
    problems: Vec<ProblemJson>,
    policies: Vec<PolicyJson>,
    services: Vec<String>,
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
    let PolicyCommand::Check { dir, json } = cmd;
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
                rules: compiled.rules.len(),
                kernel_rule_nodes: compiled.nodes.len(),
            },
            Err(e) => CheckReport {
                ok: false,
                problems: e.problems.iter().map(ProblemJson::from).collect(),
                policies: Vec::new(),
                services: Vec::new(),
                rules: 0,
                kernel_rule_nodes: 0,
            },
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
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
        println!(
            "policy {} ({}) at {}: {}{}{identity}",
            p.name,
            p.mode,
            p.source,
            count(p.egress.len() + p.unix.len(), "rule"),
            if limited == 0 {
                String::new()
            } else {
                format!(" ({limited} rate-limited)")
            }
        );
    }
    println!(
        "{}, {}, {}, {}: OK",
        count_plural(set.policies.len(), "policy", "policies"),
        count(set.services.len(), "service"),
        count(compiled.rules.len(), "rule"),
        count(compiled.nodes.len(), "kernel rule node")
    );
    Ok(ExitCode::SUCCESS)
}
