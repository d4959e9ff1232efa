//! `agentwall policy`: policy tools that need no daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use super::admin::{count, count_plural};
use crate::policy;

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Validate a policy directory and show what it compiles to.
    Check {
        /// Policy directory.
        dir: PathBuf,
    },
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Check { dir } = cmd;
    let set = policy::load_dir(&dir)?;
    let mut next = 0;
    let slots: std::collections::HashMap<String, u32> = set
        .policies
        .iter()
        .map(|p| {
            next += 1;
            (p.name.clone(), next)
        })
        .collect();
    let compiled = policy::compile(&set, |n| slots.get(n).copied().unwrap_or(0))
        .map_err(|problems| policy::PolicyError { problems })?;
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
        println!(
            "policy {} ({}) at {}: {}{identity}",
            p.name,
            p.mode,
            p.source,
            count(p.egress.len(), "egress rule")
        );
    }
    println!(
        "{}, {}, {}: OK",
        count_plural(set.policies.len(), "policy", "policies"),
        count(compiled.rules.len(), "rule"),
        count(compiled.nodes.len(), "kernel rule node")
    );
    Ok(ExitCode::SUCCESS)
}
