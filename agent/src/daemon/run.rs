//! Start-up, the signal loop and shutdown of `agentwall run`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::sync::{Mutex as AsyncMutex, Notify, broadcast};

use super::{Daemon, DaemonError, Names, RuleBook, compile_policies, now_rfc3339, status::Health};
use crate::{
    cgroup::{self, Cgroup},
    config::Config,
    enforce::{Enforcer, actor::EnforcerHandle},
    events::{self, Resolve},
    identity::service::IdentityService,
    policy, probe,
    state::SlotTable,
};

/// Starts what serves the daemon to its operators (the admin socket and the metrics endpoint,
/// in `control`) once enforcement holds; a failure stops the start. Given by the caller, so
/// that the daemon does not know the wire of its clients.
pub type Frontends = fn(
    &Arc<Daemon>,
    &crate::supervise::Supervisor,
    usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Runs the daemon until SIGTERM or SIGINT. Returns an error (and the process exits non-zero)
/// whenever enforcement cannot be established.
pub async fn run(cfg: Config, frontends: Frontends) -> Result<(), DaemonError> {
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
    let slots_path = cfg.state_dir.join("slots.json");
    let mut slots = SlotTable::load(&slots_path)?;
    check_slots_cover_bindings(&cfg.pin_dir, &slots, &slots_path)?;
    // Policies are validated before anything touches the kernel: a bad directory loads nothing.
    let compiled = compile_policies(
        &cfg.policy_dir,
        &mut slots,
        &slots_path,
        (&cfg.enrollment.socket, &cfg.socket),
    )?;
    let identity = Arc::new(IdentityService::start(&cfg.state_dir, &cfg.identity)?);
    // Every long-lived task and thread from here on is watched: one that ends stops the
    // daemon (see `crate::supervise`).
    let (supervisor, mut ended) = crate::supervise::Supervisor::new();
    let (audit, audit_node_key, audit_thread) = start_audit(&cfg)?;
    supervisor
        .adopt("audit", audit_thread)
        .map_err(|e| DaemonError::Audit(format!("watching the audit writer: {e}")))?;
    record_unwritten(&cfg, &audit);
    let cfg_detect = cfg.detect.clone();

    let (mut enforcer, ring) = Enforcer::load(&cfg.pin_dir, &cfg.limits)?;
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
    let book = Arc::new(RwLock::new(RuleBook::default()));
    let (events_tx, _) = broadcast::channel(4096);
    let daemon = Arc::new(Daemon {
        mount: mount.clone(),
        root: root.clone(),
        enforcer: handle.clone(),
        book: Arc::clone(&book),
        slots: Mutex::new(slots),
        cgroups: AsyncMutex::new(BTreeMap::new()),
        events: events_tx.clone(),
        health: RwLock::new(Health::Starting),
        errors: Mutex::new(BTreeMap::new()),
        reload_lock: AsyncMutex::new(()),
        configured_turn: AsyncMutex::new(()),
        gc: Notify::new(),
        identity,
        persisted: AsyncMutex::new(super::identity::enrollment_store(&cfg.state_dir)),
        identities: Arc::default(),
        cgroup_names: super::identity::CgroupNames::default(),
        audit: audit.clone(),
        audit_node_key,
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
        policy_dir: daemon.cfg.policy_dir.display().to_string(),
        policy_dir_sha256: policy::dir_hash(&daemon.cfg.policy_dir),
        pin_dir: daemon.cfg.pin_dir.display().to_string(),
    });

    // Events first, so that nothing the start-up triggers goes unreported.
    let names: Arc<dyn Resolve + Send + Sync> = Arc::new(Names(
        Arc::clone(&book),
        Arc::clone(&daemon.identities),
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

    let generation = daemon.install(compiled).await?;
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

    // The operators' ways in (the admin socket, the metrics endpoint), once enforcement holds.
    frontends(&daemon, &supervisor, limits.admin).map_err(DaemonError::Frontend)?;
    let e = &daemon.cfg.enrollment;
    let enroll_listener =
        crate::unixsock::bind_unix(&e.socket, e.mode, e.owner.as_deref(), e.group.as_deref())?;
    super::identity::serve_enroll(enroll_listener, Arc::clone(&daemon)).map_err(|source| {
        DaemonError::EnrollSocket {
            path: e.socket.clone(),
            source,
        }
    })?;
    let renew_daemon = Arc::clone(&daemon);
    supervisor.spawn("renew", async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = renew_daemon.identity.config().renew_before;
            renew_daemon.renew_due(before).await;
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
    let _ = sd_notify("READY=1");
    tracing::info!(socket = %daemon.cfg.socket.display(), cgroup_root = %root.path().display(), "agentwall is enforcing");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
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
    // A revocation still not durable gets a last try; if that fails too, it is said loudly.
    // (The kernel keeps the revoked bindings flagged: the next start recovers their serials.)
    if daemon.identity.unsaved_revocations() > 0
        && let Err(e) = daemon.identity.save_revocations()
    {
        tracing::error!(error = %e, unsaved = daemon.identity.unsaved_revocations(), "stopping with revocations that are not durable; give them again after the restart");
    }
    // Whatever the audit log is doing (a full file system keeps its writer retrying, and a
    // full queue blocks whoever records), the daemon is gone within SHUTDOWN_LIMIT; what could
    // not be written is noted for the next start. The kernel keeps enforcing either way.
    arm_shutdown_limit(
        audit.clone(),
        unwritten_note(&daemon.cfg),
        if failed.is_some() { 1 } else { 0 },
    );
    // The last summaries (the budgets stay in force in the pinned maps; the next daemon
    // reports what they count meanwhile). The reader takes what the ring holds
    // (allowed verdicts wait for its poll), then the last losses are counted: the log ends
    // with every event accounted for.
    if let Some(s) = &summarizer {
        let (s, names, audit) = (Arc::clone(s), Arc::clone(&summary_names), audit.clone());
        let _ = tokio::task::spawn_blocking(move || {
            s.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .close(names.as_ref(), &audit);
        })
        .await;
    }
    tokio::time::sleep(events::POLL_INTERVAL * 2).await;
    losses.check().await;
    {
        let d = Arc::clone(&daemon);
        let _ = tokio::task::spawn_blocking(move || record_issuance(&d)).await;
    }
    {
        let (detector, path, d) = (
            Arc::clone(&detector),
            baselines.clone(),
            Arc::clone(&daemon),
        );
        let _ = tokio::task::spawn_blocking(move || save_baselines(&d, &detector, &path)).await;
    }
    let reason = failed
        .as_ref()
        .map_or_else(|| "signal".to_string(), ToString::to_string);
    audit.record(&crate::audit::schema::AuditRecord::DaemonStop {
        reason,
        note: "the kernel keeps enforcing through the pinned programs".into(),
    });
    // Durable and sealed with a checkpoint before the daemon goes.
    let flushing = audit.clone();
    let last = tokio::task::spawn_blocking(move || flushing.flush())
        .await
        .ok()
        .flatten();
    tracing::info!(last_audit_seq = ?last, "audit log flushed and sealed");
    // The socket goes; pins stay, so the kernel keeps enforcing until a daemon returns.
    let _ = std::fs::remove_file(&daemon.cfg.socket);
    let _ = std::fs::remove_file(&daemon.cfg.enrollment.socket);
    tracing::info!(
        "agentwall stopped; enforcement continues in the kernel through the pinned programs"
    );
    match failed {
        Some(e) => Err(DaemonError::TaskEnded(e)),
        None => Ok(()),
    }
}

/// The event budgets' counts as last reported (`events::summary`), in the state directory.
const BUDGET_COUNTS: &str = "event-budgets.json";

/// Longest an orderly stop may take once signalled.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// Where a stop that could not make every audit record durable says so for the next start: in
/// the runtime directory (the admin socket's), not beside the log, whose file system may be
/// the full one.
fn unwritten_note(cfg: &Config) -> PathBuf {
    cfg.socket
        .parent()
        .unwrap_or(std::path::Path::new("/run"))
        .join("audit-unwritten.json")
}

/// What a stop could not write, for the next start's `audit_unwritten` record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Unwritten {
    /// Records handed to the audit writer that were not durable when the daemon stopped.
    records: u64,
    /// The last durable record then.
    last_durable_seq: u64,
    stopped_at: String,
}

/// Ends the process `SHUTDOWN_LIMIT` after now unless it ended by itself, noting first how
/// many audit records were not durable.
fn arm_shutdown_limit(audit: crate::audit::sink::AuditHandle, note: PathBuf, code: i32) {
    let spawned = std::thread::Builder::new()
        .name("agentwall-stop".into())
        .spawn(move || {
            std::thread::sleep(SHUTDOWN_LIMIT);
            let u = Unwritten {
                records: audit.unwritten(),
                last_durable_seq: audit
                    .state
                    .last_seq
                    .load(std::sync::atomic::Ordering::Relaxed),
                stopped_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
            };
            let written = serde_json::to_vec(&u)
                .map_err(std::io::Error::other)
                .and_then(|b| crate::state::write_atomic(&note, &b, 0o600));
            tracing::error!(
                unwritten = u.records,
                last_durable_seq = u.last_durable_seq,
                note = %note.display(),
                noted = written.is_ok(),
                "the audit log could not be made durable within {SHUTDOWN_LIMIT:?} of the stop signal (a full file system?); stopping anyway: the next start records what was lost. The kernel keeps enforcing"
            );
            std::process::exit(code);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot bound the stop: it waits for the audit log");
    }
}

/// Records what the previous daemon's stop could not write, if it noted anything.
fn record_unwritten(cfg: &Config, audit: &crate::audit::sink::AuditHandle) {
    let note = unwritten_note(cfg);
    let Ok(bytes) = std::fs::read(&note) else {
        return;
    };
    match serde_json::from_slice::<Unwritten>(&bytes) {
        Ok(u) => {
            tracing::warn!(
                records = u.records,
                last_durable_seq = u.last_durable_seq,
                "the previous daemon stopped with audit records it could not write; recorded as a gap"
            );
            audit.record(&crate::audit::schema::AuditRecord::AuditUnwritten {
                records: Some(u.records),
                last_durable_seq: Some(u.last_durable_seq),
                stopped_at: Some(u.stopped_at),
                note_error: None,
            });
        }
        Err(e) => {
            tracing::error!(note = %note.display(), error = %e, "an unreadable note of unwritten audit records; recorded as a gap of unknown size");
            audit.record(&crate::audit::schema::AuditRecord::AuditUnwritten {
                records: None,
                last_durable_seq: None,
                stopped_at: None,
                note_error: Some(e.to_string()),
            });
        }
    }
    let _ = std::fs::remove_file(&note);
}

/// How far the issuance log has been copied into the audit log (a byte offset), in the state
/// directory.
const ISSUANCE_CURSOR: &str = "issuance.audited";

/// Copies certificates issued since the last look (by this daemon or by `agentwall identity
/// issue`, which may run while no daemon does) from the issuance log into the audit log as
/// `certificate_issued` records. The cursor moves only once those records are durable.
fn record_issuance(daemon: &Daemon) {
    use std::io::{Read as _, Seek as _};
    let state = &daemon.cfg.state_dir;
    let log = crate::identity::log_path(state);
    let cursor_path = state.join(ISSUANCE_CURSOR);
    let Ok(len) = std::fs::metadata(&log).map(|m| m.len()) else {
        return;
    };
    let mut offset: u64 = std::fs::read_to_string(&cursor_path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    if len < offset {
        tracing::error!(log = %log.display(), was = offset, now = len, "the issuance log shrank; it is append-only");
        daemon.count_error("issuance_log_shrunk");
        daemon
            .audit
            .record(&crate::audit::schema::AuditRecord::IssuanceLogShrunk {
                path: log.display().to_string(),
                was_bytes: offset,
                now_bytes: len,
            });
        offset = 0;
    }
    if len == offset {
        return;
    }
    let mut text = Vec::new();
    let read = std::fs::File::open(&log).and_then(|mut f| {
        f.seek(std::io::SeekFrom::Start(offset))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        tracing::error!(log = %log.display(), error = %e, "cannot read the issuance log");
        daemon.count_error("issuance_log_read");
        return;
    }
    // Complete lines only; a line being written is taken next time.
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    for line in text[..complete]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
    {
        match serde_json::from_slice::<crate::identity::log::Entry>(line) {
            Ok(e) => daemon
                .audit
                .record(&crate::audit::schema::AuditRecord::CertificateIssued(e)),
            Err(e) => {
                daemon.count_error("issuance_log_corrupt");
                daemon
                    .audit
                    .record(&crate::audit::schema::AuditRecord::IssuanceLogUnreadable {
                        error: e.to_string(),
                        line: String::from_utf8_lossy(line).into_owned(),
                    });
            }
        }
    }
    if complete == 0 {
        return;
    }
    // Durable first, then the cursor: a crash in between records them again, never loses them.
    if daemon.audit.flush().is_none() {
        return;
    }
    let next = offset + complete as u64;
    if let Err(e) = crate::state::write_atomic(&cursor_path, format!("{next}\n").as_bytes(), 0o600)
    {
        tracing::error!(path = %cursor_path.display(), error = %e, "cannot save the issuance cursor");
        daemon.count_error("issuance_cursor");
    }
}

/// The behavioral baselines, in the state directory.
const BASELINES: &str = "baselines.json";
/// How often the baselines are saved (and at a clean stop).
const BASELINES_EVERY: Duration = Duration::from_secs(60);

/// The detector, going on from the saved baselines. An unreadable file is set aside (never
/// deleted) and learning starts again, loudly.
fn load_baselines(
    daemon: &Daemon,
    path: &std::path::Path,
    cfg: crate::audit::detect::DetectConfig,
) -> crate::audit::detect::Detector {
    use crate::audit::detect::Detector;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Detector::new(cfg),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the behavioral baselines; learning again");
            daemon.count_error("baselines_read");
            return Detector::new(cfg);
        }
    };
    match Detector::restore(cfg.clone(), &bytes) {
        Ok(d) => {
            tracing::info!(path = %path.display(), identities = d.identities(), "behavioral baselines restored");
            d
        }
        Err(e) => {
            let aside = path.with_extension(format!(
                "json.unreadable-{}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            ));
            let _ = std::fs::rename(path, &aside);
            tracing::error!(path = %path.display(), set_aside = %aside.display(), error = %e, "the behavioral baselines cannot be read; kept aside, learning again");
            daemon.count_error("baselines_unreadable");
            Detector::new(cfg)
        }
    }
}

fn save_baselines(
    daemon: &Daemon,
    detector: &std::sync::Mutex<crate::audit::detect::Detector>,
    path: &std::path::Path,
) {
    let bytes = match detector.lock() {
        Ok(d) => d.save(),
        Err(p) => p.into_inner().save(),
    };
    let r =
        bytes.and_then(|b| crate::state::write_atomic(path, &b, 0o600).map_err(|e| e.to_string()));
    if let Err(e) = r {
        tracing::error!(path = %path.display(), error = %e, "cannot save the behavioral baselines");
        daemon.count_error("baselines_save");
    }
}

/// Opens the audit log: key (created on first start), the node's checkpoint key, the writer.
fn start_audit(
    cfg: &Config,
) -> Result<
    (
        crate::audit::sink::AuditHandle,
        String,
        std::thread::JoinHandle<()>,
    ),
    DaemonError,
> {
    use crate::audit::{keys::NodeKey, sink, store::Rotation};
    let err = |e: String| DaemonError::Audit(e);
    let key = sink::load_or_create_key(&cfg.audit.key_file).map_err(|e| err(e.to_string()))?;
    let node = NodeKey::load_or_create(&cfg.state_dir.join("audit-node.key"))
        .map_err(|e| err(e.to_string()))?;
    let public = node.public_hex();
    crate::state::write_atomic(
        &cfg.state_dir.join("audit-node.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
    .map_err(|e| err(e.to_string()))?;
    let rotation = Rotation {
        max_bytes: cfg.audit.rotate_bytes,
        max_age: cfg.audit.rotate_age,
    };
    let mut sinks = Vec::new();
    if cfg.audit.stdout {
        sinks.push(
            crate::audit::forward::stdout().map_err(|e| err(format!("audit stdout sink: {e}")))?,
        );
    }
    if let Some(s) = &cfg.audit.syslog {
        sinks
            .push(crate::audit::forward::syslog(s).map_err(|e| err(format!("audit.syslog: {e}")))?);
    }
    if let Some(w) = cfg.detect.webhook.as_ref().filter(|_| cfg.detect.enabled) {
        sinks.push(
            crate::audit::forward::webhook(w).map_err(|e| err(format!("detect.webhook: {e}")))?,
        );
    }
    let (handle, join) = sink::AuditHandle::start(
        &cfg.audit_dir(),
        key,
        node,
        rotation,
        cfg.audit.checkpoint_every,
        cfg.audit.retention(),
        sinks,
    )
    .map_err(|e| err(e.to_string()))?;
    Ok((handle, public, join))
}

/// Reports events the kernel could not deliver because the ring buffer was full: loss is
/// counted per CPU in the kernel, said out loud here, and written to the audit log as a gap.
struct LossWatch {
    enforcer: EnforcerHandle,
    audit: crate::audit::sink::AuditHandle,
    /// Drops per CPU already reported.
    seen: AsyncMutex<Vec<u64>>,
}

impl LossWatch {
    /// Records a gap for every CPU whose drop counter moved since the last look.
    async fn check(&self) {
        let Ok(c) = self.enforcer.counters().await else {
            return;
        };
        let mut seen = self.seen.lock().await;
        for (cpu, now) in c.events_dropped_per_cpu.iter().enumerate() {
            let before = seen.get(cpu).copied().unwrap_or(*now);
            if *now > before {
                tracing::warn!(
                    cpu,
                    lost = now - before,
                    total = now,
                    "events lost: the kernel event ring was full"
                );
                let after = self
                    .audit
                    .state
                    .last_seq
                    .load(std::sync::atomic::Ordering::Relaxed);
                self.audit.record(&crate::audit::schema::AuditRecord::EventsLost {
                    cpu,
                    lost: now - before,
                    total_lost_on_cpu: *now,
                    after_seq: after,
                    note: format!(
                        "{} kernel events lost on CPU {cpu} between record {after} and this one",
                        now - before
                    ),
                });
            }
        }
        *seen = c.events_dropped_per_cpu;
    }

    async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.check().await;
        }
    }
}

/// Applies `audit.when_down`: while the audit log cannot be written and the rule is `deny`,
/// every binding carries the hold flag (the kernel then denies everything in enforced
/// cgroups, open flows' packets included); once the log is writable again the flag goes.
async fn watch_audit_health(
    enforcer: EnforcerHandle,
    audit: crate::audit::sink::AuditHandle,
    rule: crate::config::WhenDown,
) {
    use agentwall_common::binding::{Binding, flags};
    let mut held = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let failing = audit
            .state
            .failing
            .load(std::sync::atomic::Ordering::Relaxed);
        let hold = failing && rule == crate::config::WhenDown::Deny;
        if !hold && !held {
            continue;
        }
        let Ok(bindings) = enforcer.bindings().await else {
            continue;
        };
        for (id, b) in bindings {
            if (b.flags & flags::AUDIT_HOLD != 0) == hold {
                continue;
            }
            // Changed as it is when the change lands (see `Daemon::sync_modes`).
            let r = enforcer
                .update(id, move |now| Binding {
                    flags: if hold {
                        now.flags | flags::AUDIT_HOLD
                    } else {
                        now.flags & !flags::AUDIT_HOLD
                    },
                    ..now
                })
                .await;
            if let Err(e) = r {
                tracing::error!(cgroup_id = id, error = %e, "cannot change the audit hold of a binding");
            }
        }
        if hold != held {
            if hold {
                tracing::error!(
                    "audit log down: every flow of enforced cgroups is denied until it is writable again (audit.when_down: deny)"
                );
            } else {
                tracing::warn!("audit log writable again: the hold on enforced cgroups is lifted");
                audit.record(&crate::audit::schema::AuditRecord::AuditHoldLifted {
                    note: "flows were denied while the log could not be written".into(),
                });
            }
            held = hold;
        }
    }
}

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
