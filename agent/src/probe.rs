//! The health probe: before the daemon reports healthy it proves that the kernel denies.
//! A child process started inside a probe cgroup (bound to nothing it may reach) connects to
//! a listener of the daemon's on loopback, and where the Unix socket hooks run, to an abstract
//! Unix socket of the daemon's too; each connect must fail with EPERM and neither listener
//! may receive anything.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::AsFd as _,
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
    },
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
    pub const UNIX_CONNECTED: i32 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe's connect from an enforced cgroup was allowed: the kernel is not enforcing")]
    Allowed,
    #[error("the probe's listener received a connection: the kernel is not enforcing")]
    Received,
    #[error(
        "the probe's Unix socket connect from an enforced cgroup was allowed: the Unix socket hooks are not enforcing"
    )]
    UnixAllowed,
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
    let mut args = vec![PROBE_COMMAND.to_string(), addr.to_string()];
    // An abstract name: nothing to remove afterwards, and the cgroup's own name keeps two
    // daemons (tests) apart.
    let unix = if enforcer
        .unix_hooks_missing()
        .await
        .map_err(CallError::from)?
        .is_none()
    {
        let name = format!("agentwall-probe-{}-{id}", std::process::id());
        let l = UnixAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| UnixListener::bind_addr(&a))
            .map_err(ProbeError::Listener)?;
        l.set_nonblocking(true).map_err(ProbeError::Listener)?;
        args.push(name);
        Some(l)
    } else {
        None
    };
    let cmd = spawn::Command::new("/proc/self/exe", args);
    let fd = cg.open()?;
    let pid = spawn::spawn_in_cgroup(&cmd, fd.as_fd())?.pid;
    let status = tokio::task::spawn_blocking(move || wait_bounded(pid, PROBE_TIMEOUT))
        .await
        .map_err(|e| ProbeError::Listener(io::Error::other(e)))??;
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(_) => return Err(ProbeError::Received),
        Err(e) => return Err(ProbeError::Listener(e)),
    }
    match unix.as_ref().map(UnixListener::accept) {
        None => {}
        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
        Some(Ok(_)) => return Err(ProbeError::Received),
        Some(Err(e)) => return Err(ProbeError::Listener(e)),
    }
    match status {
        WaitStatus::Exited(_, exit::DENIED) => Ok(()),
        WaitStatus::Exited(_, exit::CONNECTED) => Err(ProbeError::Allowed),
        WaitStatus::Exited(_, exit::UNIX_CONNECTED) => Err(ProbeError::UnixAllowed),
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
pub fn child_main(addr: &str, unix: Option<&str>) -> i32 {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("agentwall probe: bad address {addr:?}");
        return exit::OTHER_ERROR;
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => return exit::CONNECTED,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => {
            eprintln!("agentwall probe: connect to {addr} failed with {e}, expected EPERM");
            return exit::OTHER_ERROR;
        }
    }
    let Some(name) = unix else {
        return exit::DENIED;
    };
    let r =
        UnixAddr::from_abstract_name(name.as_bytes()).and_then(|a| UnixStream::connect_addr(&a));
    match r {
        Ok(_) => exit::UNIX_CONNECTED,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => exit::DENIED,
        Err(e) => {
            eprintln!(
                "agentwall probe: connect to Unix socket @{name} failed with {e}, expected EPERM"
            );
            exit::OTHER_ERROR
        }
    }
}
