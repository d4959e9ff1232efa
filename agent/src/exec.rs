//! `agentwall exec`: run a command under a policy, in a cgroup of its own.

use std::{
    ffi::OsString,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicI32, Ordering},
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use rustls_pki_types::pem::PemObject as _;

use crate::{
    agentdir::{AgentDir, AgentDirError},
    cgroup::{Cgroup, CgroupError},
    control::client::{Client, ClientError},
    spawn::{self, RunAs, SpawnError},
};

/// Environment variables the command receives.
pub mod env {
    /// Name of the policy the command runs under.
    pub const POLICY: &str = "AGENTWALL_POLICY";
    /// Absolute path of the command's cgroup directory.
    pub const CGROUP: &str = "AGENTWALL_CGROUP";
    /// The agent's X509-SVID (PEM), replaced in place when renewed.
    pub const SVID: &str = "AGENTWALL_SVID";
    /// Its private key (PEM, 0600).
    pub const SVID_KEY: &str = "AGENTWALL_SVID_KEY";
    /// CA certificates to verify peers (and the daemon) with (PEM).
    pub const BUNDLE: &str = "AGENTWALL_BUNDLE";
    /// The agent's SPIFFE ID.
    pub const SPIFFE_ID: &str = "AGENTWALL_SPIFFE_ID";
    /// The directory of the secrets `--secret NAME=PATH` asked for: one file per NAME,
    /// renewed in place.
    pub const SECRETS_DIR: &str = "AGENTWALL_SECRETS_DIR";
    /// The enrollment socket.
    pub const ENROLL_SOCKET: &str = "AGENTWALL_ENROLL_SOCKET";
    /// The SPIFFE Workload API, as SPIFFE clients look for it (`unix:///PATH`).
    pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
    /// A JWT-SVID for the audiences given with `--audience`, refreshed in place.
    pub const TOKEN: &str = "AGENTWALL_TOKEN";
}

pub use crate::agentdir::files;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "the daemon prepared no enrollment for this cgroup: are the CLI and the daemon the same version?"
    )]
    NoEnrollment,
    #[error(
        "the daemon named no Workload API for this cgroup: are the CLI and the daemon the same version?"
    )]
    NoWorkload,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("waiting for the command: {0}")]
    Wait(nix::errno::Errno),
    #[error("no command given: use `agentwall exec --policy NAME -- CMD [ARGS...]`")]
    NoCommand,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing the agent directory: {0}")]
    AgentDir(#[from] AgentDirError),
    #[error("{0} is not a PEM certificate and {1} not a PEM private key")]
    Pem(PathBuf, PathBuf),
    #[error("--preserve-fds {count} passes descriptors 3 to {last}, but {fd} is not open here")]
    PreservedNotOpen { count: u32, last: u32, fd: u32 },
    #[error(
        "the daemon gave no uid to map root to (exec.root_uids all in use, or an older daemon); run the command as another user, or as root with --keep-privileges"
    )]
    NoRootUid,
}

/// How the command gets its policy.
#[derive(Debug, Clone)]
pub enum Under {
    /// A named policy, bound before the command starts.
    Policy(String),
    /// An identity: the command enrolls with this certificate from inside its cgroup first.
    Identity {
        cert: PathBuf,
        key: PathBuf,
        bundle: Option<PathBuf>,
        /// Audiences of a JWT-SVID the daemon keeps fresh in `AGENTWALL_TOKEN`.
        audience: Vec<String>,
    },
    /// The command enrolls itself with a certificate of its own; until it does, everything is
    /// denied.
    SelfEnroll,
    /// An identity the daemon issues: its policy is bound before the command starts, and the
    /// command gets its X509-SVID from the SPIFFE Workload API (`SPIFFE_ENDPOINT_SOCKET`); the
    /// key never touches the disk.
    Workload(String),
}

fn read(path: &Path) -> Result<Vec<u8>, ExecError> {
    std::fs::read(path).map_err(|source| ExecError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Fills an agent's directory: its certificate and key, and the bundle (the daemon's CA, then
/// the caller's own bundle if given), all owned by `owner`, the host uid and gid the command
/// runs as. The directory stays the daemon's: the agent reads its files, it cannot replace
/// them.
fn prepare_agent_dir(
    dir: &Path,
    cert: &Path,
    key: &Path,
    bundle: Option<&Path>,
    daemon_bundle: &str,
    owner: (u32, u32),
) -> Result<(), ExecError> {
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let has_cert = rustls_pki_types::CertificateDer::pem_slice_iter(&cert_pem)
        .next()
        .is_some_and(|c| c.is_ok());
    let has_key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem).is_ok();
    if !has_cert || !has_key {
        return Err(ExecError::Pem(cert.to_path_buf(), key.to_path_buf()));
    }
    let agent_dir = write_bundle(dir, daemon_bundle, bundle, owner)?;
    agent_dir.write_svid(&cert_pem, &key_pem, owner)?;
    Ok(())
}

/// The user the command runs as, or the launcher's.
fn ids_of(run_as: Option<&RunAs>) -> (u32, u32) {
    run_as.map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |u| (u.uid, u.gid),
    )
}

/// Writes the bundle into the agent's directory; returns the directory, held open.
fn write_bundle(
    dir: &Path,
    daemon_bundle: &str,
    bundle: Option<&Path>,
    owner: (u32, u32),
) -> Result<AgentDir, ExecError> {
    let mut bundle_pem = daemon_bundle.as_bytes().to_vec();
    if let Some(b) = bundle {
        bundle_pem.push(b'\n');
        bundle_pem.extend(read(b)?);
    }
    let agent_dir = AgentDir::open(dir)?;
    agent_dir.write(files::BUNDLE, &bundle_pem, 0o644, owner)?;
    Ok(agent_dir)
}

/// Hidden subcommand of the launcher that enrolls and then executes the command.
pub const ENROLL_EXEC: &str = "__enroll-exec";

/// Runs inside the new cgroup: enrolls with the agent directory's files, then replaces itself
/// with the command. Returns only on failure (exit code 126, like a command that cannot run).
pub fn enroll_exec(socket: &Path, dir: &Path, cmd: &[OsString]) -> i32 {
    use std::os::unix::process::CommandExt as _;
    let files = (
        std::fs::read(dir.join(files::CERT)),
        std::fs::read(dir.join(files::KEY)),
        std::fs::read(dir.join(files::BUNDLE)),
    );
    let (Ok(cert), Ok(key), Ok(bundle)) = files else {
        tracing::error!(dir = %dir.display(), "cannot read the agent's certificate, key or bundle");
        return 126;
    };
    match crate::identity::enroll::enroll(socket, &cert, &key, &bundle) {
        Ok(e) => {
            let Some((program, args)) = cmd.split_first() else {
                return 126;
            };
            let err = std::process::Command::new(program)
                .args(args)
                .env(env::SPIFFE_ID, &e.spiffe_id)
                .exec();
            tracing::error!(program = %program.to_string_lossy(), error = %err, "cannot execute the command");
            if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
        Err(e) => {
            tracing::error!("{}", crate::error_chain(&e));
            126
        }
    }
}

/// A pidfd of the child the launcher forwards termination signals to (-1 before there is
/// one). Not a pid: a signal that arrives after the child was reaped must not reach whatever
/// process got its pid next.
static CHILD: AtomicI32 = AtomicI32::new(-1);

/// A signal that came before there was a child to forward it to (0: none); sent once there is.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pidfd = CHILD.load(Ordering::Relaxed);
    if pidfd < 0 {
        PENDING.store(sig, Ordering::Relaxed);
        return;
    }
    // SAFETY: a raw system call, async-signal-safe; a reaped child gives ESRCH.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// `own_session`: the command runs in a session of its own (a confined root command), so the
/// terminal's interrupts reach only the launcher, which passes them on.
fn install_forwarding(own_session: bool) {
    let fwd = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // Otherwise the terminal sends these to the whole process group, the command included;
    // the launcher waits for the command's own answer to them.
    let interrupt = if own_session { &fwd } else { &ign };
    // SAFETY: the handler only reads an atomic and calls pidfd_send_signal(2).
    unsafe {
        let _ = sigaction(Signal::SIGTERM, &fwd);
        let _ = sigaction(Signal::SIGHUP, &fwd);
        let _ = sigaction(Signal::SIGINT, interrupt);
        let _ = sigaction(Signal::SIGQUIT, interrupt);
    }
}

/// How the command is started, beside what it runs under.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Descriptors 3 .. 3+N pass to the command.
    pub preserve_fds: u32,
    /// A command that runs as root is not confined ([`spawn::Confinement`]).
    pub keep_privileges: bool,
    /// Secrets the daemon keeps in the agent's directory: (file name, secret path).
    pub secrets: Vec<(String, String)>,
}

/// Runs `cmd` under a policy or an identity; returns its exit code (128 + signal if a signal
/// ended it).
pub fn run(
    socket: &Path,
    user: Option<&str>,
    under: &Under,
    cmd: &[OsString],
    options: Options,
) -> Result<i32, ExecError> {
    let Options {
        preserve_fds,
        keep_privileges,
        secrets,
    } = options;
    let (program, args) = cmd.split_first().ok_or(ExecError::NoCommand)?;
    // Checked before this process opens anything that could take a number in the range.
    let last = 2 + preserve_fds;
    if let Some(fd) = (3..=last).find(|fd| {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        (unsafe { libc::fcntl(*fd as i32, libc::F_GETFD) }) < 0
    }) {
        return Err(ExecError::PreservedNotOpen {
            count: preserve_fds,
            last,
            fd,
        });
    }
    let run_as = user.map(RunAs::lookup).transpose()?;
    let (uid, gid) = ids_of(run_as.as_ref());
    let confine_root = uid == 0 && !keep_privileges;
    let secrets = if secrets.is_empty() {
        None
    } else {
        Some(crate::daemon::ExecSecrets {
            files: secrets
                .into_iter()
                .map(|(name, path)| crate::daemon::ExecSecret { name, path })
                .collect(),
            cert_pem: match under {
                Under::Identity { cert, .. } => {
                    Some(String::from_utf8_lossy(&read(cert)?).into_owned())
                }
                _ => None,
            },
            uid,
            gid,
            confined_root: confine_root,
        })
    };
    let (ready, lease) = Client::exec_begin(
        socket,
        match under {
            Under::Policy(p) => Some(p.clone()),
            Under::Identity { .. } | Under::SelfEnroll | Under::Workload(_) => None,
        },
        match under {
            Under::Identity { audience, .. } => audience.clone(),
            _ => Vec::new(),
        },
        match under {
            Under::Workload(id) => Some(id.clone()),
            _ => None,
        },
        secrets,
    )?;
    let (cgroup, enroll, workload, protect) = (
        PathBuf::from(ready.cgroup),
        ready.enroll,
        ready.workload,
        ready.protect,
    );
    // Root inside the cgroup stays inside it (see `spawn::Confinement`): it is root of a user
    // namespace whose uid 0 is a host uid of its own, and its files belong to that uid.
    let owner = if confine_root {
        let u = protect.root_uid.ok_or(ExecError::NoRootUid)?;
        (u, u)
    } else {
        (uid, gid)
    };
    let cg = Cgroup::at(cgroup.clone());
    let fd = cg.open()?;
    let mut command = match (under, enroll) {
        (Under::Policy(policy), _) => {
            let mut c = spawn::Command::new(program.clone(), args.iter().cloned());
            c.set_env(env::POLICY, policy.as_str());
            c
        }
        (
            Under::Identity {
                cert,
                key,
                bundle,
                audience,
            },
            Some(e),
        ) => {
            let dir = PathBuf::from(&e.agent_dir);
            prepare_agent_dir(&dir, cert, key, bundle.as_deref(), &e.bundle_pem, owner)?;
            // The launcher itself enrolls from inside the cgroup, then becomes the command.
            let mut helper: Vec<OsString> = vec![
                ENROLL_EXEC.into(),
                "--socket".into(),
                e.socket.clone().into(),
                "--dir".into(),
                dir.clone().into_os_string(),
                "--".into(),
            ];
            helper.extend(cmd.iter().cloned());
            let mut c = spawn::Command::new(OsString::from("/proc/self/exe"), helper);
            c.set_env(env::SVID, dir.join(files::CERT).into_os_string());
            c.set_env(env::SVID_KEY, dir.join(files::KEY).into_os_string());
            c.set_env(env::BUNDLE, dir.join(files::BUNDLE).into_os_string());
            c.set_env(env::ENROLL_SOCKET, e.socket.as_str());
            if !audience.is_empty() {
                c.set_env(env::TOKEN, dir.join(files::TOKEN).into_os_string());
            }
            c
        }
        (Under::SelfEnroll, Some(e)) => {
            let dir = PathBuf::from(&e.agent_dir);
            write_bundle(&dir, &e.bundle_pem, None, owner)?;
            let mut c = spawn::Command::new(program.clone(), args.iter().cloned());
            c.set_env(env::BUNDLE, dir.join(files::BUNDLE).into_os_string());
            c.set_env(env::ENROLL_SOCKET, e.socket.as_str());
            c
        }
        (Under::Workload(_), _) => {
            let w = workload.ok_or(ExecError::NoWorkload)?;
            let mut c = spawn::Command::new(program.clone(), args.iter().cloned());
            c.set_env(env::SPIFFE_ENDPOINT_SOCKET, format!("unix://{}", w.socket));
            c.set_env(env::SPIFFE_ID, w.spiffe_id.as_str());
            c
        }
        (Under::Identity { .. } | Under::SelfEnroll, None) => {
            return Err(ExecError::NoEnrollment);
        }
    };
    if confine_root {
        let paths = |v: Vec<String>| v.into_iter().map(PathBuf::from).collect();
        command.confine = Some(spawn::Confinement {
            hide_dirs: paths(protect.hide_dirs),
            hide_files: paths(protect.hide_files),
            read_only: paths(protect.read_only),
            root_maps_to: owner.0,
        });
    }
    if let Some(dir) = &ready.secrets_dir {
        command.set_env(env::SECRETS_DIR, dir.as_str());
    }
    command.user = run_as;
    command.preserve_fds = preserve_fds;
    command.set_env(env::CGROUP, cgroup.into_os_string());
    install_forwarding(confine_root);
    let child = spawn::spawn_in_cgroup(&command, fd.as_fd())?;
    CHILD.store(child.pidfd.as_raw_fd(), Ordering::Relaxed);
    // A stop asked for while the command was being started reaches it now.
    let pending = PENDING.swap(0, Ordering::Relaxed);
    if pending != 0 {
        forward(pending);
    }
    let status = spawn::wait(child.pid).map_err(ExecError::Wait);
    // Forget the number before the pidfd is closed with `child`.
    CHILD.store(-1, Ordering::Relaxed);
    let status = status?;
    // Closing the connection ends the lease; the daemon removes the cgroup once it is empty.
    drop(lease);
    Ok(spawn::exit_code(status))
}
