//! The daemon's audit writer: one thread owns the log, takes records from a bounded queue and
//! commits them in groups (one sync per batch), and seals the chain with a signed checkpoint
//! at a fixed interval and at shutdown.
//!
//! Nothing is dropped here: a full queue makes the sender wait. The kernel event reader is
//! such a sender, so when the log falls behind, the kernel's ring buffer fills and the kernel
//! counts what it could not deliver; the daemon turns those counts into gap records.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::{
    forward::{Durable, Sink, SinkStats},
    keys::{AuditKey, NodeKey},
    store::{Rotation, StoreError, Truncation, Writer},
};

/// Records waiting for the writer at most.
pub const QUEUE: usize = 65_536;
/// Records committed with one sync at most.
pub const BATCH: usize = 8_192;
/// How long the sinks get at shutdown to deliver their backlog.
const SINK_DRAIN: Duration = Duration::from_secs(2);

enum Msg {
    Record(&'static str, Vec<u8>),
    /// Answered once everything sent before it is durable and sealed by a checkpoint.
    Flush(mpsc::Sender<u64>),
}

/// Health of the audit log, for status and metrics.
#[derive(Debug, Default)]
pub struct AuditState {
    /// Records acknowledged (durable).
    pub committed: AtomicU64,
    /// Sequence number of the last durable record.
    pub last_seq: AtomicU64,
    /// Failed commits (the batch is kept and retried).
    pub write_errors: AtomicU64,
    /// The store cannot write right now.
    pub failing: AtomicBool,
    pub last_checkpoint_seq: AtomicU64,
    /// Behavioral alerts raised.
    pub alerts: AtomicU64,
    /// The sinks beside the store, by name.
    pub sinks: Vec<(&'static str, Arc<SinkStats>)>,
}

#[derive(Debug, Clone)]
pub struct AuditHandle {
    tx: mpsc::SyncSender<Msg>,
    pub state: Arc<AuditState>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl AuditHandle {
    /// Opens the log (cutting a torn tail, which is then recorded) and starts the writer.
    pub fn start(
        dir: &Path,
        key: AuditKey,
        node: NodeKey,
        rotation: Rotation,
        checkpoint_every: Duration,
        sinks: Vec<Sink>,
    ) -> Result<(Self, thread::JoinHandle<()>), StoreError> {
        let (mut writer, truncation) = Writer::open(dir, key, rotation)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let state = Arc::new(AuditState {
            sinks: sinks
                .iter()
                .map(|s| (s.name, Arc::clone(&s.stats)))
                .collect(),
            ..AuditState::default()
        });
        state
            .last_seq
            .store(writer.next_seq().saturating_sub(1), Ordering::Relaxed);
        let handle = Self {
            tx,
            state: Arc::clone(&state),
        };
        if let Some(t) = &truncation {
            tracing::warn!(segment = %t.segment, from = t.from_bytes, to = t.to_bytes, reason = %t.reason, "audit log: cut a torn tail left by a crash");
            handle.record("audit_truncated", &TruncatedRecord::from(t));
        }
        let join = thread::Builder::new()
            .name("agentwall-audit".into())
            .spawn(move || {
                run(
                    &mut writer,
                    &rx,
                    &node,
                    &state,
                    checkpoint_every,
                    &sinks,
                );
                for s in sinks {
                    s.finish(SINK_DRAIN);
                }
            })
            .map_err(|e| StoreError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?;
        Ok((handle, join))
    }

    /// Queues a record `{"time", "kind", ...fields}`; waits while the queue is full.
    pub fn record<T: Serialize>(&self, kind: &'static str, fields: &T) {
        let mut v = serde_json::to_value(fields)
            .unwrap_or_else(|e| serde_json::json!({"encode_error": e.to_string()}));
        if let Some(obj) = v.as_object_mut() {
            obj.insert("time".into(), now_rfc3339().into());
            obj.insert("kind".into(), kind.into());
        } else {
            v = serde_json::json!({"time": now_rfc3339(), "kind": kind, "value": v});
        }
        match serde_json::to_vec(&v) {
            Ok(b) => {
                // The writer is gone only when the daemon stops.
                let _ = self.tx.send(Msg::Record(kind, b));
            }
            Err(e) => tracing::error!(error = %e, kind, "cannot encode an audit record"),
        }
    }

    /// Waits until every record queued before this call is durable and sealed by a
    /// checkpoint; returns the last sequence number written, or None if the writer stopped.
    pub fn flush(&self) -> Option<u64> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Flush(tx)).ok()?;
        rx.recv().ok()
    }
}

#[derive(Serialize)]
struct TruncatedRecord {
    segment: String,
    from_bytes: u64,
    to_bytes: u64,
    reason: String,
    next_seq: u64,
}

impl From<&Truncation> for TruncatedRecord {
    fn from(t: &Truncation) -> Self {
        Self {
            segment: t.segment.clone(),
            from_bytes: t.from_bytes,
            to_bytes: t.to_bytes,
            reason: t.reason.clone(),
            next_seq: t.next_seq,
        }
    }
}

fn run(
    writer: &mut Writer,
    rx: &mpsc::Receiver<Msg>,
    node: &NodeKey,
    state: &AuditState,
    every: Duration,
    sinks: &[Sink],
) {
    let mut last_cp = Instant::now();
    let mut dirty = false;
    loop {
        let first = match rx.recv_timeout(every.min(Duration::from_secs(1))) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(first) = first {
            let mut records = Vec::new();
            let mut kinds = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next {
                match m {
                    Msg::Record(k, b) => {
                        kinds.push(k);
                        records.push(b);
                    }
                    Msg::Flush(t) => flushes.push(t),
                }
                next = if records.len() < BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            let first = commit(writer, &records, state);
            dirty |= !records.is_empty();
            // Sinks see durable records only, with their sequence numbers.
            if !sinks.is_empty() {
                for (seq, (kind, record)) in (first..).zip(kinds.into_iter().zip(records)) {
                    let d = Arc::new(Durable { seq, kind, record });
                    for s in sinks {
                        s.offer(&d);
                    }
                }
            }
            if !flushes.is_empty() && dirty {
                checkpoint(writer, node, state);
                last_cp = Instant::now();
                dirty = false;
            }
            let last = writer.next_seq().saturating_sub(1);
            for f in flushes {
                let _ = f.send(last);
            }
        }
        if dirty && last_cp.elapsed() >= every {
            checkpoint(writer, node, state);
            last_cp = Instant::now();
            dirty = false;
        }
    }
    if dirty {
        checkpoint(writer, node, state);
    }
}

/// Commits a batch, retrying until it is durable: a record that entered the queue is never
/// given up. Meanwhile the queue fills and senders wait (the kernel side then counts drops).
fn commit(writer: &mut Writer, records: &[Vec<u8>], state: &AuditState) -> u64 {
    let mut delay = Duration::from_millis(100);
    loop {
        match writer.append(records) {
            Ok(first) => {
                if state.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!("audit log writable again");
                }
                state
                    .committed
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                state
                    .last_seq
                    .store(writer.next_seq().saturating_sub(1), Ordering::Relaxed);
                return first;
            }
            Err(e) => {
                state.write_errors.fetch_add(1, Ordering::Relaxed);
                if !state.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "audit log cannot be written; enforcement goes on, records wait");
                }
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn checkpoint(writer: &Writer, node: &NodeKey, state: &AuditState) {
    match writer.checkpoint(node) {
        Ok(cp) => state.last_checkpoint_seq.store(cp.seq, Ordering::Relaxed),
        Err(e) => {
            state.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot write an audit checkpoint");
        }
    }
}

/// Loads the audit key: from AGENTWALL_AUDIT_KEY if set, else from `path`, which is created
/// (0600, a fresh random key) on first start. A key file others can read is refused.
pub fn load_or_create_key(path: &Path) -> Result<AuditKey, super::keys::KeyError> {
    if std::env::var_os(super::keys::KEY_ENV).is_some() {
        return AuditKey::from_file_or_env(None);
    }
    if !path.exists() {
        let hex = AuditKey::generate_hex()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| super::keys::KeyError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        crate::state::write_atomic(path, format!("{hex}\n").as_bytes(), 0o600).map_err(
            |source| super::keys::KeyError::Read {
                path: path.to_path_buf(),
                source,
            },
        )?;
        tracing::warn!(path = %path.display(), "created a new audit key; keep a copy off this host: without it the audit log cannot be read");
    }
    crate::identity::svid::check_key_file(path).map_err(|e| super::keys::KeyError::Bad {
        source_name: path.display().to_string(),
        message: e.to_string(),
    })?;
    AuditKey::from_file(path)
}
