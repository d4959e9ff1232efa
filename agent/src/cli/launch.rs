//! `agentwall launch FILE`: one command from an agent's description to the agent running,
//! with its identity (issued by the daemon, renewed by it, through the SPIFFE Workload API)
//! and the credentials of the services it needs (database roles, secrets) kept as files it
//! alone reads: `agentwall exec --identity ... --secret ...`, said once in a file.

use std::{collections::BTreeMap, ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Deserialize;

use super::{SocketArg, code};
use crate::{config::LogFormat, exec, logging};

#[derive(Debug, Args)]
pub(super) struct LaunchArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// The agent's description (YAML; docs/secrets.md).
    pub file: PathBuf,
    /// The command and its arguments, in place of the description's `command`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

/// An agent's description.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Description {
    launch: Launch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Launch {
    /// `NAME/ENV`, as the catalog names agents.
    agent: String,
    /// Its SPIFFE ID (default `agent/NAME/ENV`).
    #[serde(default)]
    identity: Option<String>,
    /// The user it runs as (default: the launcher's).
    #[serde(default)]
    user: Option<String>,
    /// Databases (catalog services of `secrets.databases`) it gets a role for, each in the
    /// file named after the service.
    #[serde(default)]
    databases: Vec<String>,
    /// Further secrets: file name → path in the store.
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    #[serde(default)]
    command: Vec<String>,
}

/// The `exec` a description stands for.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    identity: String,
    user: Option<String>,
    /// (file name, secret path).
    secrets: Vec<(String, String)>,
    command: Vec<OsString>,
}

fn plan(text: &str, command: Vec<OsString>) -> anyhow::Result<Plan> {
    let d: Description = serde_norway::from_str(text)?;
    let l = d.launch;
    let Some((name, env)) = l.agent.split_once('/') else {
        bail!(
            "launch.agent {:?}: write NAME/ENV, such as data-pipeline-agent/prod",
            l.agent
        );
    };
    if name.is_empty() || env.is_empty() || env.contains('/') {
        bail!(
            "launch.agent {:?}: write NAME/ENV, such as data-pipeline-agent/prod",
            l.agent
        );
    }
    let identity = l.identity.unwrap_or_else(|| format!("agent/{}", l.agent));
    let mut files: Vec<(String, String)> = l
        .databases
        .iter()
        .map(|s| (s.clone(), format!("database/{s}")))
        .collect();
    files.extend(l.secrets);
    let command = if command.is_empty() {
        l.command.into_iter().map(OsString::from).collect()
    } else {
        command
    };
    if command.is_empty() {
        bail!("no command: give launch.command in the description, or one after --");
    }
    Ok(Plan {
        identity,
        user: l.user,
        secrets: files,
        command,
    })
}

pub(super) fn launch(a: LaunchArgs) -> anyhow::Result<ExitCode> {
    logging::init(LogFormat::Text, "warn");
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let p = plan(&text, a.command).with_context(|| format!("{}", a.file.display()))?;
    Ok(code(exec::run(
        &a.socket.socket,
        p.user.as_deref(),
        &exec::Under::Workload(p.identity),
        &p.command,
        exec::Options {
            preserve_fds: 0,
            keep_privileges: false,
            secrets: p.secrets,
        },
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_is_an_exec_under_its_identity_with_its_credentials() {
        let text = "launch:\n  agent: data-pipeline-agent/prod\n  user: nobody\n  databases: [analytics-db]\n  secrets: { api-key: agent/data-pipeline-agent/api-key }\n  command: [python3, run.py]\n";
        let p = plan(text, Vec::new()).unwrap();
        assert_eq!(p.identity, "agent/data-pipeline-agent/prod");
        assert_eq!(p.user.as_deref(), Some("nobody"));
        assert_eq!(
            p.secrets,
            [
                (
                    "analytics-db".to_string(),
                    "database/analytics-db".to_string()
                ),
                (
                    "api-key".to_string(),
                    "agent/data-pipeline-agent/api-key".to_string()
                ),
            ]
        );
        assert_eq!(
            p.command,
            [OsString::from("python3"), OsString::from("run.py")]
        );
        let p = plan(text, vec!["true".into()]).unwrap();
        assert_eq!(p.command, [OsString::from("true")]);
        for (bad, why) in [
            ("launch:\n  agent: x\n  command: [true]\n", "write NAME/ENV"),
            ("launch:\n  agent: x/prod\n", "no command"),
            (
                "launch:\n  agent: x/prod\n  command: [true]\n  extra: 1\n",
                "unknown field",
            ),
        ] {
            let e = plan(bad, Vec::new()).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
