//! Start-up, the signal loop and shutdown of `agentwall run`.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::{Mutex as AsyncMutex, Notify, broadcast};

use super::audit::*;
use super::{Daemon, DaemonError, Names, now_rfc3339, status::Health};
use crate::{
    cgroup::{self, Cgroup},
    config::Config,
    enforce::{Enforcer, actor::EnforcerHandle},
    events::{self, Resolve},
    identity::service::IdentityService,
    policy, probe,
    state::SlotTable,
};

/// Starts what serves the daemon to its operators and agents (the admin socket and the
/// metrics endpoint, in `control`; the SPIFFE Workload API, in `workload`) once enforcement
/// holds; a failure stops the start. Given by the caller, so that the daemon does not know
/// the wire of its clients.
pub type Frontends = fn(
    &Arc<Daemon>,
    &crate::supervise::Supervisor,
    usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Runs the daemon until SIGTERM or SIGINT. Returns an error (and the process exits non-zero)
/// whenever enforcement cannot be established.
/// The longest the spans of time windows go without being written again.
const WINDOW_REFRESH: Duration = Duration::from_secs(1);

pub async fn run(cfg: Config, frontends: Frontends) -> Result<(), DaemonError> {
    // First of all: a stop or reload signal that arrives while the daemon starts (a service
    // manager, or a client that saw it healthy) is handled, never the default action that
    // kills it mid-way.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    // Not dumpable: no process of the same user without CAP_SYS_PTRACE (a root agent,
    // confined by `agentwall exec`) may ptrace it, read its memory or reach its descriptors.
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot make the daemon non-dumpable");
    }
    // Before any descriptor is opened for a client (see `crate::limits`).
    let limits = crate::limits::Limits::raise();
    tracing::info!(
        open_files = limits.nofile,
        admin_connections = limits.admin,
        "descriptor limits"
    );
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    crate::state::check_private_dir(&cfg.state_dir, "state directory")?;
    // A root agent mapped to a host user's id would be that user.
    cfg.exec
        .root_uids
        .check_host(std::path::Path::new("/etc"))?;
    // Two daemons on one state directory would fight over the same kernel objects.
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let mount = cgroup::ensure_host_cgroup_namespace()?;
    let root = Cgroup::under(&mount, &cfg.cgroup_root)?;
    root.ensure_not_root(&mount)?;
    let slots_path = super::policies::slots_path(&cfg.state_dir);
    let slots = SlotTable::load(&slots_path)?;
    check_slots_cover_bindings(&cfg.pin_dir, &slots, &slots_path)?;
    let policies = Arc::new(super::Policies::new(&cfg, slots));
    // With fleet bundles, the one this node had in force last (none: every cgroup denied).
    let bundle_keys = super::fleet::bundle_keys(&cfg)?;
    policies.set_bundle(super::fleet::stored_bundle(&cfg, &bundle_keys));
    // Policies are validated before anything touches the kernel: a bad directory loads nothing.
    let set = Arc::new(policies.load()?);
    policies.compile(&set, &policy::compile::Resolved::new())?;
    let dns = Arc::new(super::dns::Dns::new(&cfg.names));
    let identity = Arc::new(IdentityService::start(&cfg.state_dir, &cfg.identity)?);
    // Every long-lived task and thread from here on is watched: one that ends stops the
    // daemon (see `crate::supervise`).
    let (supervisor, mut ended) = crate::supervise::Supervisor::new();
    let (audit, audit_node_key, audit_thread) = start_audit(&cfg)?;
    supervisor
        .adopt("audit", audit_thread)
        .map_err(AuditStartError::Watch)?;
    record_unwritten(&cfg, &audit);
    let cfg_detect = cfg.detect.clone();

    let (mut enforcer, ring) = Enforcer::load(&cfg.pin_dir, &cfg.limits)?;
    if let Some(at) = cfg.test_wall_clock {
        tracing::warn!(%at, "time windows are judged by a test clock");
        enforcer.set_wall_clock(crate::enforce::windows::WallClock::starting_at(at));
    }
    // The budgets are set before any cgroup program is attached (the task-scoped LSM ones,
    // attached at load, may record a few verdicts without a budget until then).
    let summarizer = match enforcer.take_budgets() {
        Some(b) => Some(Arc::new(std::sync::Mutex::new(
            events::summary::Summarizer::start(b, cfg.events, cfg.state_dir.join(BUDGET_COUNTS))?,
        ))),
        None => None,
    };
    let (handle, _thread) =
        EnforcerHandle::spawn(enforcer, mount.clone(), supervisor.watch("enforce"));
    let (events_tx, _) = broadcast::channel(4096);
    let daemon = Arc::new(Daemon {
        mount: mount.clone(),
        root: root.clone(),
        enforcer: handle.clone(),
        policies: Arc::clone(&policies),
        registry: Default::default(),
        events: events_tx.clone(),
        health: RwLock::new(Health::Starting),
        errors: Default::default(),
        configured_turn: AsyncMutex::new(()),
        gc: Notify::new(),
        identity,
        enrollments: super::Enrollments::new(&cfg.state_dir),
        audit: audit.clone(),
        audit_node_key,
        svids: Default::default(),
        workload_refusals: Default::default(),
        decision_buckets: Default::default(),
        decision_records: Default::default(),
        dns,
        names_stale: Default::default(),
        fleet: super::fleet::FleetState::new(
            bundle_keys,
            policies.bundle().map_or(0, |b| b.version),
        ),
        secrets: Default::default(),
        cfg,
    });
    // Drops counted before this daemon (pinned counters; a previous daemon may have reported
    // some): the baseline for the gap records, and stated in the start record.
    let dropped_at_start = handle
        .counters()
        .await
        .map(|c| c.events_dropped_per_cpu)
        .unwrap_or_default();
    audit.record(&crate::audit::schema::AuditRecord::DaemonStart {
        events_dropped_per_cpu_before_start: dropped_at_start.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        policy_dir: daemon.policies.source_label(),
        policy_dir_sha256: daemon.policies.source_hash(),
        pin_dir: daemon.cfg.pin_dir.display().to_string(),
    });

    // Secrets an earlier daemon kept in agents' directories are no longer leased: removed,
    // so that none outlives a revocation this daemon would not know to act on.
    daemon.withdraw_unleased_secret_files();

    // Events first, so that nothing the start-up triggers goes unreported.
    let names: Arc<dyn Resolve + Send + Sync> = Arc::new(Names(
        Arc::clone(&policies),
        daemon.enrollments.names(),
        Default::default(),
    ));
    let summary_names = Arc::clone(&names);
    // On a thread of its own: a burst of verdicts must not hold up the admin and enrollment
    // sockets, which the runtime's workers serve.
    let (reader_done, mut reader) = tokio::sync::oneshot::channel();
    let reader_audit = audit.clone();
    let baselines = daemon.cfg.state_dir.join(BASELINES);
    let detector = Arc::new(std::sync::Mutex::new(load_baselines(
        &daemon, &baselines, cfg_detect,
    )));
    let reader_detector = Arc::clone(&detector);
    std::thread::Builder::new()
        .name("agentwall-events".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| {
                    rt.block_on(events::read_ring(
                        ring,
                        names,
                        events_tx,
                        Some(reader_audit),
                        Some(reader_detector),
                    ))
                });
            let _ = reader_done.send(result);
        })
        .map_err(DaemonError::Events)?;
    if let Some(s) = &summarizer {
        let thread = events::summary::Summarizer::spawn(
            Arc::clone(s),
            Arc::clone(&summary_names),
            audit.clone(),
        )
        .map_err(DaemonError::Events)?;
        supervisor
            .adopt("summary", thread)
            .map_err(DaemonError::Events)?;
    }

    // The catalog's host names are asked for before the first generation, which holds their
    // addresses.
    daemon.resolve_names(&set).await;
    let compiled = daemon.compile_with_names(&set)?;
    let generation = daemon.install(compiled, set).await?;
    tracing::info!(generation, policy_dir = %daemon.cfg.policy_dir.display(), "policy in force");

    root.create()?;
    handle.attach(root.clone()).await?;
    for e in daemon.cfg.enforce.clone() {
        if !Cgroup::under(&mount, &e.cgroup)?.exists() {
            // A stopped unit: enforced by the watcher (or its `enforce-self`) when it starts.
            tracing::info!(cgroup = %e.cgroup, policy = %e.policy, "a configured cgroup is not there yet; it is enforced when it appears");
            continue;
        }
        match daemon.enforce_listed(&e, "daemon start").await {
            Ok(()) => {}
            // Stopped meanwhile: the watcher enforces its next start.
            Err(err) if !Cgroup::under(&mount, &e.cgroup)?.exists() => {
                tracing::info!(cgroup = %e.cgroup, error = %err, "a configured cgroup went away while it was enforced; it is enforced when it appears again");
            }
            Err(err) => return Err(err),
        }
    }
    daemon.reconcile().await?;

    if let Err(e) = probe::run(&root, &handle).await {
        if let Ok(mut h) = daemon.health.write() {
            *h = Health::Failed {
                reason: e.to_string(),
            };
        }
        return Err(e.into());
    }
    if let Ok(mut h) = daemon.health.write() {
        *h = Health::Healthy {
            probe_at: now_rfc3339(),
        };
    }
    audit.record(&crate::audit::schema::AuditRecord::Health {
        state: "healthy".into(),
        probe: "a connect from the probe cgroup was denied".into(),
    });

    // The ways in, once enforcement holds: the enrollment socket, then the frontends, the
    // admin socket last. Whoever sees the daemon healthy on the admin socket finds every
    // other socket bound (a test or a unit's ExecStartPost that connected at once found the
    // enrollment socket missing).
    let e = &daemon.cfg.enrollment;
    let enroll_listener =
        crate::unixsock::bind_unix(&e.socket, e.mode, e.owner.as_deref(), e.group.as_deref())?;
    super::identity::serve_enroll(enroll_listener, Arc::clone(&daemon)).map_err(|source| {
        DaemonError::EnrollSocket {
            path: e.socket.clone(),
            source,
        }
    })?;
    frontends(&daemon, &supervisor, limits.admin).map_err(DaemonError::Frontend)?;
    super::fleet::spawn(Arc::clone(&daemon), &supervisor);
    let renew_daemon = Arc::clone(&daemon);
    supervisor.spawn("renew", async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = renew_daemon.identity.config().renew_before;
            renew_daemon.renew_due(before).await;
        }
    });
    let leases_daemon = Arc::clone(&daemon);
    supervisor.spawn("secret-leases", async move {
        leases_daemon.sweep_stale_roles().await;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            leases_daemon.tend_secret_leases().await;
        }
    });
    let gc_daemon = Arc::clone(&daemon);
    supervisor.spawn("gc", async move {
        loop {
            tokio::select! {
                () = gc_daemon.gc.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            gc_daemon.collect().await;
            // Revocations that could not be made durable (out of descriptors or space) are
            // saved again until they are: none is lost with the next restart.
            let unsaved = gc_daemon.identity.unsaved_revocations();
            if unsaved > 0 {
                let identity = Arc::clone(&gc_daemon.identity);
                match tokio::task::spawn_blocking(move || identity.save_revocations()).await {
                    Ok(Ok(())) => {
                        tracing::warn!(unsaved, "revocations made durable on retry");
                        gc_daemon.count_error("revocation_saved_on_retry");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, unsaved, "revocations still not durable")
                    }
                    Err(e) => tracing::debug!(error = %e, "revocation save task"),
                }
            }
            // Revocations the kernel could not take yet (a failed map write) are retried.
            let (retried, _) = gc_daemon.enforce_revocations().await;
            if !retried.is_empty() {
                let sockets = gc_daemon
                    .destroy_sockets(retried.iter().copied().collect())
                    .await;
                gc_daemon.save_enrollments().await;
                tracing::warn!(cgroups = ?retried, sockets = sockets.sockets, "revocation applied on retry");
            }
        }
    });
    let windows_daemon = Arc::clone(&daemon);
    supervisor.spawn("windows", async move {
        // The spans are written again at each edge, and each second (to follow changes of the
        // wall clock and reloads): the kernel always holds the span in course and the next
        // one, and opens and closes by its own clock. An edge bumps the epoch, so that open
        // flows are judged again.
        loop {
            let due = match windows_daemon.enforcer.refresh_windows().await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the spans of time windows");
                    windows_daemon.count_error("window_refresh");
                    Some(Duration::from_secs(1))
                }
            };
            let wait = due
                .map_or(WINDOW_REFRESH, |d| d.min(WINDOW_REFRESH))
                .max(Duration::from_millis(1));
            tokio::time::sleep(wait).await;
        }
    });
    let names_daemon = Arc::clone(&daemon);
    supervisor.spawn("names", async move {
        // Host names are asked again before their answers expire, and the policy in force is
        // written again when an address comes or goes.
        loop {
            let wait = names_daemon.refresh_names().await;
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    });
    let losses = Arc::new(LossWatch {
        enforcer: handle.clone(),
        audit: audit.clone(),
        seen: AsyncMutex::new(dropped_at_start.clone()),
    });
    supervisor.spawn("losses", Arc::clone(&losses).run());
    {
        let (detector, path, d) = (
            Arc::clone(&detector),
            baselines.clone(),
            Arc::clone(&daemon),
        );
        supervisor.spawn("baselines", async move {
            loop {
                tokio::time::sleep(BASELINES_EVERY).await;
                let (detector, path, d) = (Arc::clone(&detector), path.clone(), Arc::clone(&d));
                let _ =
                    tokio::task::spawn_blocking(move || save_baselines(&d, &detector, &path)).await;
            }
        });
    }
    supervisor.spawn(
        "audit-health",
        watch_audit_health(handle.clone(), audit.clone(), daemon.cfg.audit.when_down),
    );
    super::units::spawn(
        Arc::clone(&daemon),
        tokio::runtime::Handle::current(),
        &supervisor,
    )
    .map_err(DaemonError::Watcher)?;
    // Changes to the policy directory are reloaded as they are made. Without the watch (no
    // inotify instance left, say) the daemon still enforces, and `reload` and SIGHUP still
    // reload: the failure is logged and counted, not fatal.
    if daemon.policies.uses_bundles() {
        tracing::info!(
            "policies come from the fleet's signed bundles; the policy directory is not read"
        );
    } else if let Err(e) = super::policy_watch::spawn(
        Arc::clone(&daemon),
        tokio::runtime::Handle::current(),
        &supervisor,
    ) {
        tracing::warn!(error = %e, dir = %daemon.cfg.policy_dir.display(), "cannot watch the policy directory; changes are reloaded by `agentwall reload` or SIGHUP only");
        daemon.count_error("policy_watch");
    }
    // What start-up parsed and compiled is freed; its pages go back.
    crate::memory::release_free();
    let _ = sd_notify("READY=1");
    tracing::info!(socket = %daemon.cfg.socket.display(), cgroup_root = %root.path().display(), "agentwall is enforcing");

    let failed = loop {
        tokio::select! {
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            // A rejected reload is logged, audited and counted where it is made.
            _ = hup.recv() => { let _ = daemon.reload().await; }
            Some(e) = ended.recv() => {
                // A part of the daemon is gone: stop, with an error, for the service manager
                // to start a whole one. The kernel keeps enforcing meanwhile.
                tracing::error!(task = e.name, panicked = e.panicked, "{e}; stopping the daemon (the kernel keeps enforcing through the pinned programs)");
                daemon.count_error("task_ended");
                break Some(e);
            }
            r = &mut reader => {
                // Without the reader verdicts would go unreported: stop, so that the service
                // manager restarts the daemon. The kernel keeps enforcing meanwhile.
                let _ = sd_notify("STOPPING=1");
                let _ = std::fs::remove_file(&daemon.cfg.socket);
                let message = match r {
                    Ok(Ok(())) => "ended".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(DaemonError::Events(std::io::Error::other(message)));
            }
        }
    };
    let _ = sd_notify("STOPPING=1");
    let code = if failed.is_some() { 1 } else { 0 };
    for step in STOP_ORDER {
        tracing::info!(step = step.name(), "stop step");
        match step {
            // Whatever the audit log is doing (a full file system keeps its writer retrying,
            // and a full queue blocks whoever records), the daemon is gone within
            // SHUTDOWN_LIMIT; what could not be written is noted for the next start. The
            // kernel keeps enforcing either way.
            StopStep::Limit => {
                arm_shutdown_limit(audit.clone(), unwritten_note(&daemon.cfg), code);
            }
            // No collection, renewal, retry or hold change runs while the daemon stops: what
            // they leave undone, the next start does (the kernel keeps enforcing).
            StopStep::Tasks => {
                let stopped = supervisor.stop_tasks(TASKS_STOP_LIMIT).await;
                if stopped.aborted > 0 {
                    tracing::warn!(
                        aborted = stopped.aborted,
                        "tasks that did not stop in time were aborted"
                    );
                }
            }
            // A revocation still not durable gets a last try; if that fails too, it is said
            // loudly. (The kernel keeps the revoked bindings flagged: the next start recovers
            // their serials.)
            StopStep::Revocations => {
                if daemon.identity.unsaved_revocations() > 0
                    && let Err(e) = daemon.identity.save_revocations()
                {
                    tracing::error!(error = %e, unsaved = daemon.identity.unsaved_revocations(), "stopping with revocations that are not durable; give them again after the restart");
                }
            }
            // The secret leases end with the daemon that holds them: the files it kept for
            // agents go, and their database roles are dropped (those it cannot drop in time
            // cannot log in past their end).
            StopStep::Leases => {
                daemon.end_all_leases("the daemon stopped");
                let _ = tokio::time::timeout(LEASES_STOP_LIMIT, daemon.drop_pending_roles()).await;
            }
            // The last summaries (the budgets stay in force in the pinned maps; the next
            // daemon reports what they count meanwhile).
            StopStep::Summaries => {
                if let Some(s) = &summarizer {
                    let (s, names, audit) =
                        (Arc::clone(s), Arc::clone(&summary_names), audit.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        s.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .close(names.as_ref(), &audit);
                    })
                    .await;
                }
            }
            // The reader takes what the ring holds (allowed verdicts wait for its poll, at the
            // latest after its longest pause), then
            // the last losses are counted: the log ends with every event accounted for.
            StopStep::Ring => {
                tokio::time::sleep(events::IDLE_POLL_INTERVAL + events::POLL_INTERVAL).await;
                losses.check().await;
            }
            StopStep::Issuance => {
                let d = Arc::clone(&daemon);
                let _ = tokio::task::spawn_blocking(move || record_issuance(&d)).await;
            }
            StopStep::Baselines => {
                let (detector, path, d) = (
                    Arc::clone(&detector),
                    baselines.clone(),
                    Arc::clone(&daemon),
                );
                let _ =
                    tokio::task::spawn_blocking(move || save_baselines(&d, &detector, &path)).await;
            }
            StopStep::StopRecord => {
                let reason = failed
                    .as_ref()
                    .map_or_else(|| "signal".to_string(), ToString::to_string);
                audit.record(&crate::audit::schema::AuditRecord::DaemonStop {
                    reason,
                    note: "the kernel keeps enforcing through the pinned programs".into(),
                });
            }
            // Durable and sealed with a checkpoint before the daemon goes.
            StopStep::Seal => {
                let flushing = audit.clone();
                let last = tokio::task::spawn_blocking(move || flushing.flush())
                    .await
                    .ok()
                    .flatten();
                tracing::info!(last_audit_seq = ?last, "audit log flushed and sealed");
            }
            // The sockets go; pins stay, so the kernel keeps enforcing until a daemon
            // returns.
            StopStep::Sockets => {
                let _ = std::fs::remove_file(&daemon.cfg.socket);
                let _ = std::fs::remove_file(&daemon.cfg.enrollment.socket);
                if daemon.cfg.workload.enabled {
                    let _ = std::fs::remove_file(&daemon.cfg.workload.socket);
                }
            }
        }
    }
    tracing::info!(
        "agentwall stopped; enforcement continues in the kernel through the pinned programs"
    );
    match failed {
        Some(e) => Err(DaemonError::TaskEnded(e)),
        None => Ok(()),
    }
}

/// The steps of an orderly stop (a signal, or a task that ended), in the order they run.
/// Nothing here touches the kernel's bindings or programs: they keep enforcing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopStep {
    /// The hard time limit of the whole stop is armed.
    Limit,
    /// The runtime's tasks get the stop signal and are waited for.
    Tasks,
    /// Revocations not yet durable get a last save.
    Revocations,
    /// The secret leases end; their files and database roles go.
    Leases,
    /// The event budgets' last summaries are written.
    Summaries,
    /// The ring buffer is read to its end and the last losses counted.
    Ring,
    /// Certificates issued meanwhile are copied into the audit log.
    Issuance,
    /// The detector's baselines are saved.
    Baselines,
    /// The `daemon_stop` record.
    StopRecord,
    /// The log is made durable and sealed by a checkpoint.
    Seal,
    /// The admin and enrollment socket files are removed.
    Sockets,
}

/// The longest the stop waits for database roles to be dropped (the steps after it must
/// fit in the hard limit too).
const LEASES_STOP_LIMIT: Duration = Duration::from_secs(1);

const STOP_ORDER: [StopStep; 11] = [
    StopStep::Limit,
    StopStep::Tasks,
    StopStep::Revocations,
    StopStep::Leases,
    StopStep::Summaries,
    StopStep::Ring,
    StopStep::Issuance,
    StopStep::Baselines,
    StopStep::StopRecord,
    StopStep::Seal,
    StopStep::Sockets,
];

impl StopStep {
    /// The name the daemon logs as it takes the step (`stop step step=...`).
    fn name(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::Tasks => "tasks",
            Self::Revocations => "revocations",
            Self::Leases => "leases",
            Self::Summaries => "summaries",
            Self::Ring => "ring",
            Self::Issuance => "issuance",
            Self::Baselines => "baselines",
            Self::StopRecord => "stop_record",
            Self::Seal => "seal",
            Self::Sockets => "sockets",
        }
    }
}

/// Longest the runtime's tasks may take to end once told to stop.
const TASKS_STOP_LIMIT: Duration = Duration::from_secs(1);

/// The event budgets' counts as last reported (`events::summary`), in the state directory.
const BUDGET_COUNTS: &str = "event-budgets.json";

/// Refuses to start when bindings a previous daemon left in the kernel name identity slots
/// that the slot table does not (it was lost, or restored from an older copy): a policy given
/// a new slot would take the place of another's in those bindings. The table only grows, so
/// every slot it names is the one the bindings meant.
fn check_slots_cover_bindings(
    pin_dir: &std::path::Path,
    slots: &SlotTable,
    slots_path: &std::path::Path,
) -> Result<(), DaemonError> {
    let mut unknown: Vec<u32> = crate::enforce::pinned_bindings(pin_dir)?
        .into_iter()
        .map(|(_, b)| b.slot)
        .filter(|s| *s != 0 && slots.name_of(*s).is_none())
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(DaemonError::SlotsBehindKernel {
        path: slots_path.to_path_buf(),
        slots: unknown,
        pin_dir: pin_dir.to_path_buf(),
    })
}

/// Holds an exclusive lock on `<state dir>/agentwall.lock` for the daemon's lifetime.
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("agentwall.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| DaemonError::StateDir {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::Locked(dir.to_path_buf()))
}

/// Tells systemd (Type=notify) about a state change, if it is listening.
fn sd_notify(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))?;
    }
    Ok(())
}
