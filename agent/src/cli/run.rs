//! `agentwall run` (the daemon) and `agentwall teardown`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    cgroup::{self, Cgroup},
    config::{Config, LogFormat, Overrides},
    daemon, enforce, logging,
};

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// Config file (default: /etc/agentwall/agentwall.yaml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy directory.
    #[arg(long)]
    policies: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Managed cgroup subtree, relative to the cgroup v2 mount.
    #[arg(long)]
    cgroup_root: Option<String>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Enrollment socket (agents prove their identity here).
    #[arg(long)]
    enroll_socket: Option<PathBuf>,
    /// The SPIFFE Workload API socket (agents launched with `exec --identity` ask here).
    #[arg(long)]
    workload_socket: Option<PathBuf>,
    /// The decision API socket (callees and gateways ask about their callers here).
    #[arg(long)]
    decision_socket: Option<PathBuf>,
    /// Directory of the files of agents launched with `exec --cert`.
    #[arg(long)]
    agent_dir: Option<PathBuf>,
    /// Audit log directory (default: <state dir>/audit).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Audit key file (64 hex digits; created if missing), outside the audit directory.
    #[arg(long)]
    audit_key: Option<PathBuf>,
    /// For tests only: judge time windows as if the wall clock read this RFC 3339 time now.
    #[arg(long, hide = true)]
    test_wall_clock: Option<jiff::Timestamp>,
}

pub(super) fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        config: a.config,
        policy_dir: a.policies,
        state_dir: a.state_dir,
        pin_dir: a.pin_dir,
        socket: a.socket,
        cgroup_root: a.cgroup_root,
        log_format: a.log_format,
        enroll_socket: a.enroll_socket,
        workload_socket: a.workload_socket,
        decision_socket: a.decision_socket,
        agent_dir: a.agent_dir,
        audit_dir: a.audit_dir,
        audit_key: a.audit_key,
        test_wall_clock: a.test_wall_clock,
    };
    let cfg = Config::load(&overrides)?;
    logging::init(cfg.log_format, "info");
    // Revocations are handled by the admin thread and enrollments by their own pool:
    // the runtime's threads do background work (the end of a revocation, renewals,
    // the collector) and keep the default slice, so they do not cut into the agents'.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(daemon::run(cfg, frontends))
        .context("cannot enforce")?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's ways in: the SPIFFE Workload API and the decision API, then the admin socket
/// and metrics. The admin socket comes last: once it answers, every other socket is bound.
fn frontends(
    daemon: &std::sync::Arc<daemon::Daemon>,
    supervisor: &crate::supervise::Supervisor,
    admin_connections: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::workload::start(daemon, supervisor)?;
    crate::decision::start(daemon, supervisor)?;
    crate::control::start(daemon, supervisor, admin_connections)
}

/// Removes agentwall from the kernel: every pin and the managed cgroup subtree.
#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn teardown(
    pin_dir: &Path,
    cgroup_root: &str,
    kill: bool,
    socket: &Path,
) -> anyhow::Result<ExitCode> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "the daemon is running (its socket {} answers); stop it first",
            socket.display()
        );
    }
    let mount = cgroup::cgroup2_mount()?;
    let root = Cgroup::under(&mount, cgroup_root)?;
    root.ensure_not_root(&mount)?;
    if root.exists() && root.populated()? {
        if !kill {
            bail!(
                "{} still holds processes, which would run unenforced after teardown; \
                 stop them or pass --kill",
                root.path().display()
            );
        }
        root.kill_all()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while root.populated()? {
            if std::time::Instant::now() > deadline {
                bail!(
                    "processes in {} did not die within 10 s",
                    root.path().display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let removed = enforce::teardown(pin_dir)?;
    root.remove_tree()?;
    println!(
        "removed {} pins under {} and the cgroup subtree {}",
        removed.len(),
        pin_dir.display(),
        root.path().display()
    );
    Ok(ExitCode::SUCCESS)
}
