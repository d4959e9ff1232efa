//! `agentwall exec`: run a command under a policy, in a cgroup of its own.

use std::{
    ffi::OsString,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicI32, Ordering},
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{
    cgroup::{Cgroup, CgroupError},
    control::{
        Reply, Request,
        client::{Client, ClientError},
    },
    spawn::{self, RunAs, SpawnError},
};

/// Environment variables the command receives.
pub mod env {
    /// Name of the policy the command runs under.
    pub const POLICY: &str = "AGENTWALL_POLICY";
    /// Absolute path of the command's cgroup directory.
    pub const CGROUP: &str = "AGENTWALL_CGROUP";
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("unexpected answer from the daemon: {0:?}")]
    Unexpected(Box<Reply>),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("waiting for the command: {0}")]
    Wait(nix::errno::Errno),
    #[error("no command given: use `agentwall exec --policy NAME -- CMD [ARGS...]`")]
    NoCommand,
}

/// The child the launcher forwards termination signals to.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn install_forwarding() {
    let fwd = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only reads an atomic and calls kill(2).
    unsafe {
        let _ = sigaction(Signal::SIGTERM, &fwd);
        let _ = sigaction(Signal::SIGHUP, &fwd);
        // The terminal sends these to the whole process group, the command included; the
        // launcher waits for the command's own answer to them.
        let _ = sigaction(Signal::SIGINT, &ign);
        let _ = sigaction(Signal::SIGQUIT, &ign);
    }
}

/// Runs `cmd` under `policy`; returns its exit code (128 + signal if a signal ended it).
pub fn run(
    socket: &Path,
    user: Option<&str>,
    policy: &str,
    cmd: &[OsString],
) -> Result<i32, ExecError> {
    let (program, args) = cmd.split_first().ok_or(ExecError::NoCommand)?;
    let run_as = user.map(RunAs::lookup).transpose()?;
    let mut client = Client::connect(socket)?;
    client.send(&Request::ExecBegin {
        policy: policy.to_string(),
    })?;
    let cgroup = match client.recv()? {
        Reply::ExecReady { cgroup, .. } => PathBuf::from(cgroup),
        other => return Err(ExecError::Unexpected(Box::new(other))),
    };
    let cg = Cgroup::at(cgroup.clone());
    let fd = cg.open()?;
    let mut command = spawn::Command::new(program.clone(), args.iter().cloned());
    command.user = run_as;
    command.set_env(env::POLICY, policy);
    command.set_env(env::CGROUP, cgroup.into_os_string());
    install_forwarding();
    let pid = spawn::spawn_in_cgroup(&command, fd.as_fd())?;
    CHILD.store(pid.as_raw(), Ordering::Relaxed);
    let status = spawn::wait(pid).map_err(ExecError::Wait)?;
    // Closing the connection ends the lease; the daemon removes the cgroup once it is empty.
    drop(client);
    Ok(spawn::exit_code(status))
}
