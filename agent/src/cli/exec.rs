//! `agentwall exec`: run a command in a new enforced cgroup.

use std::{ffi::OsString, path::Path, path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::Args;

use super::{SocketArg, code};
use crate::{config::LogFormat, exec, logging};

// `agentwall exec`'s arguments (its help is the doc of `Command::Exec`).
#[derive(Debug, Args)]
pub(super) struct ExecArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Run the command as this user (name or uid).
    #[arg(long)]
    pub user: Option<String>,
    /// Policy the command runs under.
    #[arg(long, conflicts_with_all = ["cert", "key", "bundle", "self_enroll", "identity"], required_unless_present_any = ["cert", "self_enroll", "identity"])]
    pub policy: Option<String>,
    /// Identity the command runs as (a SPIFFE ID, or a path in the local trust domain such
    /// as agent/reader/prod): its policy applies from the first instruction, and the command
    /// gets its X509-SVID and JWT-SVIDs from the SPIFFE Workload API that
    /// SPIFFE_ENDPOINT_SOCKET names. The private key never touches the disk.
    #[arg(long, value_name = "ID", conflicts_with_all = ["cert", "key", "bundle", "self_enroll", "audience"])]
    pub identity: Option<String>,
    /// The command enrolls itself (AGENTWALL_ENROLL_SOCKET, AGENTWALL_BUNDLE); everything
    /// is denied until it has.
    #[arg(long, conflicts_with_all = ["cert", "key", "bundle"])]
    pub self_enroll: bool,
    /// X509-SVID (PEM) the command enrolls with; its identity's policy applies.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Further CA certificates the command should trust (PEM), added to the local CA's.
    #[arg(long, requires = "cert")]
    pub bundle: Option<PathBuf>,
    /// Keep a JWT-SVID for this audience (repeatable) fresh in the file AGENTWALL_TOKEN names.
    #[arg(long, requires = "cert")]
    pub audience: Vec<String>,
    /// Keep the secret PATH in the file NAME of the directory AGENTWALL_SECRETS_DIR names
    /// (repeatable), as the identity's policy grants it: renewed there before its lease ends,
    /// removed when the lease ends or the identity is revoked. Never in the environment or
    /// the command line. Needs --identity or --cert.
    #[arg(long, value_name = "NAME=PATH", value_parser = name_and_path, conflicts_with_all = ["policy", "self_enroll"])]
    pub secret: Vec<(String, String)>,
    /// Pass descriptors 3 .. 3+N to the command (systemd's convention); every other
    /// inherited descriptor is closed, so that no socket made outside the cgroup reaches it.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub preserve_fds: u32,
    /// A command that runs as root keeps root's capabilities and the host's cgroup and
    /// mount namespaces. Without it, it is confined: it cannot leave its cgroup, see
    /// agentwall's state, pins and audit log, write the cgroup file system, mount, load
    /// BPF, open packet or raw sockets or ptrace (docs/threat-model.md).
    #[arg(long)]
    pub keep_privileges: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

pub(super) fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    logging::init(LogFormat::Text, "warn");
    let under = match (a.policy, a.cert, a.key) {
        (Some(p), _, _) => exec::Under::Policy(p),
        _ if a.identity.is_some() => exec::Under::Workload(a.identity.unwrap_or_default()),
        _ if a.self_enroll => exec::Under::SelfEnroll,
        (None, Some(cert), Some(key)) => exec::Under::Identity {
            cert,
            key,
            bundle: a.bundle,
            audience: a.audience,
        },
        _ => bail!("give --policy NAME, --identity ID, or --cert FILE and --key FILE"),
    };
    Ok(code(exec::run(
        &a.socket.socket,
        a.user.as_deref(),
        &under,
        &a.command,
        exec::Options {
            preserve_fds: a.preserve_fds,
            keep_privileges: a.keep_privileges,
            secrets: a.secret,
        },
    )?))
}

/// `--secret NAME=PATH`.
fn name_and_path(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), path.to_owned()))
        }
        _ => Err(format!(
            "{s:?}: write NAME=PATH, such as db=agent/reporter/db-password"
        )),
    }
}

/// The hidden step of `exec --cert` inside the new cgroup: enroll, then become the command.
pub(super) fn enroll_exec(
    socket: &Path,
    dir: &Path,
    command: &[OsString],
) -> anyhow::Result<ExitCode> {
    logging::init(LogFormat::Text, "warn");
    Ok(code(exec::enroll_exec(socket, dir, command)))
}
