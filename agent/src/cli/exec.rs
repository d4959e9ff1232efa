//! `agentwall exec`: run a command in a new enforced cgroup.

use std::{ffi::OsString, path::Path, path::PathBuf, process::ExitCode};

use anyhow::bail;

use super::code;
use crate::{config::LogFormat, exec, logging};

/// How the command is launched: under what, and with which descriptors and privileges.
pub(super) struct Launch {
    pub policy: Option<String>,
    pub self_enroll: bool,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub bundle: Option<PathBuf>,
    pub audience: Vec<String>,
    pub preserve_fds: u32,
    pub keep_privileges: bool,
}

pub(super) fn exec(
    socket: &Path,
    user: Option<&str>,
    l: Launch,
    command: &[OsString],
) -> anyhow::Result<ExitCode> {
    logging::init(LogFormat::Text, "warn");
    let under = match (l.policy, l.cert, l.key) {
        (Some(p), _, _) => exec::Under::Policy(p),
        _ if l.self_enroll => exec::Under::SelfEnroll,
        (None, Some(cert), Some(key)) => exec::Under::Identity {
            cert,
            key,
            bundle: l.bundle,
            audience: l.audience,
        },
        _ => bail!("give --policy NAME, or --cert FILE and --key FILE"),
    };
    Ok(code(exec::run(
        socket,
        user,
        &under,
        command,
        exec::Options {
            preserve_fds: l.preserve_fds,
            keep_privileges: l.keep_privileges,
        },
    )?))
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
