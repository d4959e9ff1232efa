//! The health probe: before the daemon reports healthy it proves that the kernel denies.
//! A child process started inside a probe cgroup (bound to nothing it may reach) connects to
//! a listener of the daemon's on loopback; the connect must fail with EPERM and the listener
//! must receive nothing.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use agentwall_common::binding::{Binding, flags};
use nix::{
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use crate::{
    cgroup::{Cgroup, CgroupError},
    enforce::actor::{CallError, EnforcerHandle},
    spawn::{self, SpawnError},
};

/// Name of the probe cgroup below the managed root.
pub const PROBE_CGROUP: &str = "probe";

/// Hidden subcommand the probe child runs.
pub const PROBE_COMMAND: &str = "__probe-connect";

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit codes of the probe child.
pub mod exit {
    pub const DENIED: i32 = 0;
    pub const CONNECTED: i32 = 1;
    pub const OTHER_ERROR: i32 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe's connect from an enforced cgroup was allowed: the kernel is not enforcing")]
    Allowed,
    #[error("the probe's listener received a connection: the kernel is not enforcing")]
    Received,
    #[error(
        "the probe child failed in an unexpected way (exit status {0:?}); see its message above"
    )]
    Child(WaitStatus),
    #[error("the probe child did not finish within {0:?}")]
    Timeout(Duration),
    #[error("probe listener: {0}")]
    Listener(#[source] io::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Enforcer(#[from] CallError),
    #[error("starting the probe child: {0}")]
    Spawn(#[from] SpawnError),
}

/// Runs the probe under `root`; cleans up its cgroup and binding whatever happens.
pub async fn run(root: &Cgroup, enforcer: &EnforcerHandle) -> Result<(), ProbeError> {
    let cg = root.child(PROBE_CGROUP);
    // A probe cgroup left by a killed daemon may still hold its child.
    if cg.exists() {
        let _ = cg.kill_all();
        let _ = remove_when_empty(&cg).await;
    }
    cg.create()?;
    let id = cg.id()?;
    let result = probe_in(&cg, id, enforcer).await;
    let _ = cg.kill_all();
    let removed = remove_when_empty(&cg).await;
    enforcer.unbind(id).await?;
    result?;
    removed?;
    Ok(())
}

async fn remove_when_empty(cg: &Cgroup) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cg.remove_tree() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn probe_in(cg: &Cgroup, id: u64, enforcer: &EnforcerHandle) -> Result<(), ProbeError> {
    enforcer
        .bind(
            id,
            Binding {
                slot: 0,
                flags: flags::DENY_ALL,
                expires_boot_ns: 0,
            },
        )
        .await?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ProbeError::Listener)?;
    listener
        .set_nonblocking(true)
        .map_err(ProbeError::Listener)?;
    let addr = listener.local_addr().map_err(ProbeError::Listener)?;
    let cmd = spawn::Command::new(
        "/proc/self/exe",
        [PROBE_COMMAND.to_string(), addr.to_string()],
    );
    let fd = cg.open()?;
    let pid = spawn::spawn_in_cgroup(&cmd, fd.as_fd())?;
    let status = tokio::task::spawn_blocking(move || wait_bounded(pid, PROBE_TIMEOUT))
        .await
        .map_err(|e| ProbeError::Listener(io::Error::other(e)))??;
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(_) => return Err(ProbeError::Received),
        Err(e) => return Err(ProbeError::Listener(e)),
    }
    match status {
        WaitStatus::Exited(_, exit::DENIED) => Ok(()),
        WaitStatus::Exited(_, exit::CONNECTED) => Err(ProbeError::Allowed),
        s => Err(ProbeError::Child(s)),
    }
}

fn wait_bounded(pid: Pid, timeout: Duration) -> Result<WaitStatus, ProbeError> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(s),
            Ok(_) => {}
            Err(e) => return Err(ProbeError::Listener(e.into())),
        }
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(ProbeError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The probe child: connect and report the outcome as the exit code.
#[expect(
    clippy::print_stderr,
    reason = "the probe child reports to the daemon's stderr"
)]
pub fn child_main(addr: &str) -> i32 {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("agentwall probe: bad address {addr:?}");
        return exit::OTHER_ERROR;
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => exit::CONNECTED,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => exit::DENIED,
        Err(e) => {
            eprintln!("agentwall probe: connect to {addr} failed with {e}, expected EPERM");
            exit::OTHER_ERROR
        }
    }
}
