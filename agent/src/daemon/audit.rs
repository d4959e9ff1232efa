//! The daemon's side of the audit log: opening it, what a stop could not write, the
//! certificates issued meanwhile, the detector's baselines, events the kernel lost, and the
//! `audit.when_down` hold.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::Mutex as AsyncMutex;

use super::Daemon;
use crate::{config::Config, enforce::actor::EnforcerHandle};

/// Longest an orderly stop may take once signalled.
pub(super) const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// Where a stop that could not make every audit record durable says so for the next start: in
/// the runtime directory (the admin socket's), not beside the log, whose file system may be
/// the full one.
pub(super) fn unwritten_note(cfg: &Config) -> PathBuf {
    cfg.socket
        .parent()
        .unwrap_or(std::path::Path::new("/run"))
        .join("audit-unwritten.json")
}

/// What a stop could not write, for the next start's `audit_unwritten` record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Unwritten {
    /// Records handed to the audit writer that were not durable when the daemon stopped.
    records: u64,
    /// The last durable record then.
    last_durable_seq: u64,
    stopped_at: String,
}

/// Ends the process `SHUTDOWN_LIMIT` after now unless it ended by itself, noting first how
/// many audit records were not durable.
pub(super) fn arm_shutdown_limit(audit: crate::audit::sink::AuditHandle, note: PathBuf, code: i32) {
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
pub(super) fn record_unwritten(cfg: &Config, audit: &crate::audit::sink::AuditHandle) {
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
pub(super) const ISSUANCE_CURSOR: &str = "issuance.audited";

/// Copies certificates issued since the last look (by this daemon or by `agentwall identity
/// issue`, which may run while no daemon does) from the issuance log into the audit log as
/// `certificate_issued` records. The cursor moves only once those records are durable.
pub(super) fn record_issuance(daemon: &Daemon) {
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
pub(super) const BASELINES: &str = "baselines.json";
/// How often the baselines are saved (and at a clean stop).
pub(super) const BASELINES_EVERY: Duration = Duration::from_secs(60);

/// The detector, going on from the saved baselines. An unreadable file is set aside (never
/// deleted) and learning starts again, loudly.
pub(super) fn load_baselines(
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

pub(super) fn save_baselines(
    daemon: &Daemon,
    detector: &std::sync::Mutex<crate::audit::detect::Detector>,
    path: &std::path::Path,
) {
    let saved = match detector.lock() {
        Ok(d) => d.save(),
        Err(p) => p.into_inner().save(),
    };
    let written = match saved {
        Ok(bytes) => crate::state::write_atomic(path, &bytes, 0o600),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the behavioral baselines");
            daemon.count_error("baselines_save");
            return;
        }
    };
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "cannot save the behavioral baselines");
        daemon.count_error("baselines_save");
    }
}

/// Why the audit log could not be opened at start.
#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    #[error(transparent)]
    Key(crate::audit::keys::KeyError),
    #[error(transparent)]
    NodePublic(std::io::Error),
    #[error("audit stdout sink: {0}")]
    Stdout(std::io::Error),
    #[error("audit.syslog: {0}")]
    Syslog(crate::audit::forward::SinkError),
    #[error("detect.webhook: {0}")]
    Webhook(crate::audit::forward::SinkError),
    #[error(transparent)]
    Store(crate::audit::store::StoreError),
    #[error("watching the audit writer: {0}")]
    Watch(std::io::Error),
}

/// Opens the audit log: key (created on first start), the node's checkpoint key, the writer.
pub(super) fn start_audit(
    cfg: &Config,
) -> Result<
    (
        crate::audit::sink::AuditHandle,
        String,
        std::thread::JoinHandle<()>,
    ),
    AuditStartError,
> {
    use crate::audit::{keys::NodeKey, sink, store::Rotation};
    let key = sink::load_or_create_key(&cfg.audit.key_file).map_err(AuditStartError::Key)?;
    let node = NodeKey::load_or_create(&cfg.state_dir.join("audit-node.key"))
        .map_err(AuditStartError::Key)?;
    let public = node.public_hex();
    crate::state::write_atomic(
        &cfg.state_dir.join("audit-node.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
    .map_err(AuditStartError::NodePublic)?;
    let rotation = Rotation {
        max_bytes: cfg.audit.rotate_bytes,
        max_age: cfg.audit.rotate_age,
    };
    let mut sinks = Vec::new();
    if cfg.audit.stdout {
        sinks.push(crate::audit::forward::stdout().map_err(AuditStartError::Stdout)?);
    }
    if let Some(s) = &cfg.audit.syslog {
        sinks.push(crate::audit::forward::syslog(s).map_err(AuditStartError::Syslog)?);
    }
    if let Some(w) = cfg.detect.webhook.as_ref().filter(|_| cfg.detect.enabled) {
        sinks.push(crate::audit::forward::webhook(w).map_err(AuditStartError::Webhook)?);
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
    .map_err(AuditStartError::Store)?;
    Ok((handle, public, join))
}

/// Reports events the kernel could not deliver because the ring buffer was full: loss is
/// counted per CPU in the kernel, said out loud here, and written to the audit log as a gap.
pub(super) struct LossWatch {
    pub(super) enforcer: EnforcerHandle,
    pub(super) audit: crate::audit::sink::AuditHandle,
    /// Drops per CPU already reported.
    pub(super) seen: AsyncMutex<Vec<u64>>,
}

impl LossWatch {
    /// Records a gap for every CPU whose drop counter moved since the last look.
    pub(super) async fn check(&self) {
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

    pub(super) async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.check().await;
        }
    }
}

/// Applies `audit.when_down`: while the audit log cannot be written and the rule is `deny`,
/// every binding carries the hold flag (the kernel then denies everything in enforced
/// cgroups, open flows' packets included); once the log is writable again the flag goes.
pub(super) async fn watch_audit_health(
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
