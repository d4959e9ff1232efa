//! The daemon's audit writer: one thread owns the log, takes records from a bounded queue and
//! commits them in groups (one sync per batch), and seals the chain with a signed checkpoint
//! at a fixed interval and at shutdown.
//!
//! Nothing is dropped here: a full queue makes the sender wait. The kernel event reader is
//! such a sender, so when the log falls behind, the kernel's ring buffer fills and the kernel
//! counts what it could not deliver; the daemon turns those counts into gap records.
//!
//! Size: the writer is one loop (queue, batches, checkpoints, space watch, key switch) whose
//! parts share the state of its thread; split over files, that state would be harder to follow.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    forward::{Durable, Sink, SinkStats},
    keys::{AuditKey, NodeKey},
    schema::{AuditRecord, encode_record},
    store::{Rotation, StoreError, Writer},
};

/// Records waiting for the writer at most.
pub const QUEUE: usize = 65_536;
/// Records committed with one sync at most.
pub const BATCH: usize = 8_192;
/// Group commit: records that arrive within this long of the previous sync wait for each
/// other and share one sync. A record that follows a quiet spell is synced at once; under a
/// steady stream a record waits at most this long. A sync costs the daemon ~100 us of CPU
/// on a virtual disk (data, inode, cache flush) and every wake-up of this thread some more,
/// so at thousands of enrollments a second this cuts the audit's share of the CPU several
/// times, for at most 2 ms more before a record is durable.
const COMMIT_SPACING: Duration = Duration::from_millis(2);
/// How long the sinks get at shutdown to deliver their backlog.
const SINK_DRAIN: Duration = Duration::from_secs(2);
/// How often the writer looks at the audit space (retention, free-space watermark).
const SPACE_EVERY: Duration = Duration::from_secs(2);

enum Msg {
    /// Kind, JSON, and for a kernel event its CLOCK_BOOTTIME nanoseconds (else 0).
    Record(&'static str, Vec<u8>, u64),
    /// Answered once everything sent before it is durable and sealed by a checkpoint.
    Flush(mpsc::Sender<u64>),
    /// Write under this key from now on (in a new segment); answered with the old and new
    /// key ids (hex).
    SwitchKey(
        Box<AuditKey>,
        mpsc::Sender<Result<(String, String), KeySwitchError>>,
    ),
}

/// Why the audit key was not switched; the old key stays.
#[derive(Debug, thiserror::Error)]
pub enum KeySwitchError {
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the new key is the current key")]
    SameKey,
    #[error("cannot encode the record")]
    Encode,
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
}

/// Health of the audit log, for status and metrics.
#[derive(Debug, Default)]
pub struct AuditState {
    /// Records handed to the writer (queued or durable).
    pub submitted: AtomicU64,
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
    /// Kernel verdicts held back by the event budgets and counted in summary records.
    pub events_suppressed: AtomicU64,
    /// Summary records written.
    pub event_summaries: AtomicU64,
    /// `event_flood` alerts raised (also counted in `alerts`).
    pub event_floods: AtomicU64,
    /// Free and total bytes of the audit file system, as last looked at.
    pub free_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
    /// Below the free-space watermark (an `audit_space_low` alert was raised).
    pub space_low: AtomicBool,
    /// Segments removed by retention, and failed attempts.
    pub segments_removed: AtomicU64,
    pub retention_errors: AtomicU64,
    /// The sinks beside the store, by name.
    pub sinks: Vec<(&'static str, Arc<SinkStats>)>,
    /// From a kernel event to its record being durable, in microseconds.
    pub event_to_durable: Histogram,
}

use crate::clock::boot_ns;

/// Buckets of a [`Histogram`]: exact below 16, then 8 per power of two (within 12.5%).
const HIST_BUCKETS: usize = 16 + 8 * 60;

/// A histogram of non-negative values (log-linear buckets), written by one thread and read
/// by any.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
    sum: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()); // >= 4
        let sub = (v >> (e - 3)) & 7;
        (16 + (e - 4) * 8 + sub) as usize
    }

    /// The largest value that falls into bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let e = (i - 16) / 8 + 4;
        let sub = ((i - 16) % 8) as u64;
        ((8 + sub + 1) << (e - 3)) - 1
    }

    pub fn add(&self, v: u64) {
        let i = Self::bucket(v).min(HIST_BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// The sum of every value added.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// How many values fall at or below each of `bounds` (ascending) and above the one
    /// before, then how many lie above the last: one more count than bounds. Exact when each
    /// bound is the top of a bucket of its own (such as `2^k - 1` from 15 on).
    pub fn counts_at(&self, bounds: &[u64]) -> Vec<u64> {
        let mut out = vec![0; bounds.len() + 1];
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let top = Self::upper(i);
            let at = bounds.partition_point(|bound| *bound < top);
            out[at] += n;
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The value at quantile `q` (0..=1), rounded up to its bucket's top; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max());
            }
        }
        self.max()
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct AuditHandle {
    tx: mpsc::SyncSender<Msg>,
    pub state: Arc<AuditState>,
}

impl AuditHandle {
    /// Opens the log (cutting a torn tail, which is then recorded) and starts the writer.
    pub fn start(
        dir: &Path,
        key: AuditKey,
        node: NodeKey,
        rotation: Rotation,
        checkpoint_every: Duration,
        retention: super::retention::Retention,
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
            handle.record(&AuditRecord::AuditTruncated {
                segment: t.segment.clone(),
                from_bytes: t.from_bytes,
                to_bytes: t.to_bytes,
                reason: t.reason.clone(),
                next_seq: t.next_seq,
            });
        }
        let join = thread::Builder::new()
            .name("agentwall-audit".into())
            .spawn(move || {
                let mut space = Space {
                    retention,
                    last: None,
                };
                run(
                    &mut writer,
                    &rx,
                    &node,
                    &state,
                    checkpoint_every,
                    &sinks,
                    &mut space,
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
    pub fn record(&self, r: &AuditRecord) {
        if let Some(b) = encode_record(r) {
            self.state.submitted.fetch_add(1, Ordering::Relaxed);
            // The writer is gone only when the daemon stops.
            let _ = self.tx.send(Msg::Record(r.kind(), b, 0));
        }
    }

    /// Records handed to the writer that are not durable yet.
    pub fn unwritten(&self) -> u64 {
        self.state
            .submitted
            .load(Ordering::Relaxed)
            .saturating_sub(self.state.committed.load(Ordering::Relaxed))
    }

    /// Queues a record already encoded (see [`super::record`]) for a kernel event born at
    /// `born_boot_ns` (CLOCK_BOOTTIME): the time from the event to its record being durable is
    /// measured.
    pub fn record_verdict(&self, body: Vec<u8>, born_boot_ns: u64) {
        self.state.submitted.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Record("verdict", body, born_boot_ns));
    }

    /// Makes `key` the key of every record from now on: the records queued before are
    /// committed under the old key, a record of the rotation ends the old key's segment, and
    /// a new segment starts under the new key. Returns the old and new key ids.
    pub fn switch_key(&self, key: AuditKey) -> Result<(String, String), KeySwitchError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::SwitchKey(Box::new(key), tx))
            .map_err(|_| KeySwitchError::Stopped)?;
        rx.recv().map_err(|_| KeySwitchError::Stopped)?
    }

    /// Waits until every record queued before this call is durable and sealed by a
    /// checkpoint; returns the last sequence number written, or None if the writer stopped.
    pub fn flush(&self) -> Option<u64> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Flush(tx)).ok()?;
        rx.recv().ok()
    }
}

/// The writer's watch over its file system.
struct Space {
    retention: super::retention::Retention,
    last: Option<Instant>,
}

impl Space {
    /// Applies retention and checks the free-space watermark, at most every [`SPACE_EVERY`].
    fn check(&mut self, writer: &mut Writer, node: &NodeKey, state: &AuditState, sinks: &[Sink]) {
        use super::retention;
        if self.last.is_some_and(|t| t.elapsed() < SPACE_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        match retention::plan_for(writer, &self.retention) {
            Ok(None) => {}
            Ok(Some(p)) => {
                // The removal is in the chain, durable and sealed, before anything goes.
                if let Some(rec) = encode_record(&AuditRecord::from(&p)) {
                    commit_and_offer(
                        writer,
                        state,
                        sinks,
                        vec!["audit_retention"],
                        vec![rec],
                        &[],
                    );
                }
                checkpoint(writer, node, state);
                match retention::execute(&p, writer.dir(), node) {
                    Ok(()) => {
                        tracing::info!(
                            segments = p.segments.len(),
                            first_seq = p.first_seq,
                            last_seq = p.last_seq,
                            reason = p.reason,
                            "audit retention removed old segments"
                        );
                        state
                            .segments_removed
                            .fetch_add(p.segments.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        state.retention_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "audit retention could not remove old segments");
                        let fields = AuditRecord::AuditRetentionFailed {
                            segments: p.segments.clone(),
                            error: e.to_string(),
                        };
                        if let Some(rec) = encode_record(&fields) {
                            commit_and_offer(
                                writer,
                                state,
                                sinks,
                                vec!["audit_retention_failed"],
                                vec![rec],
                                &[],
                            );
                        }
                    }
                }
            }
            Err(e) => {
                state.retention_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "audit retention cannot read the log's segments");
            }
        }
        let Some((free, total)) = retention::space(writer.dir()) else {
            return;
        };
        state.free_bytes.store(free, Ordering::Relaxed);
        state.total_bytes.store(total, Ordering::Relaxed);
        let warn = u128::from(self.retention.warn_free_percent);
        let (free, total128) = (u128::from(free), u128::from(total));
        let was_low = state.space_low.load(Ordering::Relaxed);
        if !was_low && free * 100 < total128 * warn {
            state.space_low.store(true, Ordering::Relaxed);
            state.alerts.fetch_add(1, Ordering::Relaxed);
            let alert = super::detect::Alert::AuditSpaceLow {
                free_bytes: free as u64,
                total_bytes: total,
                warn_free_percent: self.retention.warn_free_percent,
            };
            tracing::warn!(?alert, "behavioral alert");
            if let Some(rec) = encode_record(&AuditRecord::Alert(alert)) {
                commit_and_offer(writer, state, sinks, vec!["alert"], vec![rec], &[]);
            }
        } else if was_low && free * 100 >= total128 * (warn + 5) {
            // Five points above the mark: a log hovering at it raises one alert, not many.
            state.space_low.store(false, Ordering::Relaxed);
            tracing::info!(free_bytes = free as u64, "audit file system has room again");
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
    space: &mut Space,
) {
    let mut last_cp = Instant::now();
    let mut last_sync: Option<Instant> = None;
    let mut dirty = false;
    loop {
        let first = match rx.recv_timeout(every.min(Duration::from_secs(1))) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(first) = first {
            // Group commit: a record that comes soon after the previous sync waits for
            // company. The thread sleeps meanwhile, so the records that arrive cost their
            // senders no wake-up.
            if matches!(first, Msg::Record(..))
                && let Some(wait) = last_sync
                    .map(|t| t + COMMIT_SPACING)
                    .and_then(|u| u.checked_duration_since(Instant::now()))
            {
                std::thread::sleep(wait);
            }
            let mut records = Vec::new();
            let mut kinds = Vec::new();
            let mut borns = Vec::new();
            let mut flushes = Vec::new();
            let mut switch = None;
            let mut next = Some(first);
            while let Some(m) = next {
                match m {
                    Msg::Record(k, b, born) => {
                        kinds.push(k);
                        records.push(b);
                        if born != 0 {
                            borns.push(born);
                        }
                    }
                    Msg::Flush(t) => flushes.push(t),
                    // Records after it belong under the new key: the batch ends here.
                    Msg::SwitchKey(key, reply) => switch = Some((key, reply)),
                }
                next = if records.len() < BATCH && switch.is_none() {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            dirty |= !records.is_empty();
            if !records.is_empty() {
                // A full batch means more are queued: the next one does not wait for company.
                let full = records.len() >= BATCH;
                commit_and_offer(writer, state, sinks, kinds, records, &borns);
                last_sync = (!full).then(Instant::now);
            }
            if let Some((key, reply)) = switch {
                let _ = reply.send(switch_key(writer, state, sinks, *key));
                dirty = true;
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
        space.check(writer, node, state, sinks);
    }
    if dirty {
        checkpoint(writer, node, state);
    }
}

/// Commits a batch, then hands it to the sinks (which see durable records only, with their
/// sequence numbers).
fn commit_and_offer(
    writer: &mut Writer,
    state: &AuditState,
    sinks: &[Sink],
    kinds: Vec<&'static str>,
    records: Vec<Vec<u8>>,
    borns: &[u64],
) {
    if records.is_empty() {
        return;
    }
    let first = commit(writer, &records, state);
    if !borns.is_empty() {
        let now = boot_ns();
        for b in borns {
            state.event_to_durable.add(now.saturating_sub(*b) / 1000);
        }
    }
    if !sinks.is_empty() {
        for (seq, (kind, body)) in (first..).zip(kinds.into_iter().zip(records)) {
            // Sinks get JSON; compact verdicts are turned back into it here, off the path
            // that makes records durable.
            let record = match super::record::json(&body) {
                Ok(std::borrow::Cow::Owned(j)) => j,
                Ok(std::borrow::Cow::Borrowed(_)) => body,
                Err(e) => {
                    // Durable in the log all the same; the sinks count it as dropped.
                    tracing::error!(seq, error = %e, "an audit record the sinks cannot read");
                    for s in sinks {
                        s.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            };
            let d = Arc::new(Durable { seq, kind, record });
            for s in sinks {
                s.offer(&d);
            }
        }
    }
}

/// Ends the current key's segment with a record of the rotation (under the old key), then
/// starts a new segment under `key`. A failure is recorded too; the old key stays.
fn switch_key(
    writer: &mut Writer,
    state: &AuditState,
    sinks: &[Sink],
    key: AuditKey,
) -> Result<(String, String), KeySwitchError> {
    let ids = (super::hex(&writer.key_id()), super::hex(&key.id()));
    if ids.0 == ids.1 {
        return Err(KeySwitchError::SameKey);
    }
    let fields = AuditRecord::AuditKeyRotation {
        from_key: ids.0.clone(),
        to_key: ids.1.clone(),
    };
    let rec = encode_record(&fields).ok_or(KeySwitchError::Encode)?;
    commit_and_offer(
        writer,
        state,
        sinks,
        vec!["audit_key_rotation"],
        vec![rec],
        &[],
    );
    match writer.switch_key(key) {
        Ok(()) => {
            tracing::warn!(from = %ids.0, to = %ids.1, segment = %writer.segment_name(), "audit key rotated; keep the retired key to read older segments");
            Ok(ids)
        }
        Err(e) => {
            tracing::error!(error = %e, "audit key rotation failed; the old key stays");
            let fields = AuditRecord::AuditKeyRotationFailed {
                from_key: ids.0.clone(),
                to_key: ids.1.clone(),
                error: e.to_string(),
            };
            if let Some(rec) = encode_record(&fields) {
                commit_and_offer(
                    writer,
                    state,
                    sinks,
                    vec!["audit_key_rotation_failed"],
                    vec![rec],
                    &[],
                );
            }
            Err(e.into())
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::Histogram;
    use crate::audit::schema::encode;

    #[test]
    fn records_get_their_kind_and_keep_an_event_time() {
        let v = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        let event = v(encode("verdict", &serde_json::json!({"time": "T", "port": 1})).unwrap());
        assert_eq!(
            event,
            serde_json::json!({"time": "T", "kind": "verdict", "port": 1})
        );
        let other = v(encode("health", &serde_json::json!({"state": "ok"})).unwrap());
        assert_eq!(other["kind"], "health");
        assert!(other["time"].as_str().unwrap().ends_with('Z'), "{other}");
        let empty = v(encode("x", &serde_json::json!({})).unwrap());
        assert_eq!(empty.as_object().unwrap().len(), 2, "{empty}");
        let scalar = v(encode("x", &7).unwrap());
        assert_eq!(scalar["value"], 7);
    }

    #[test]
    fn histogram_buckets_cover_every_value_within_an_eighth() {
        for v in (0..100_000u64).chain([1 << 40, u64::MAX / 4]) {
            let i = Histogram::bucket(v);
            assert!(Histogram::upper(i) >= v, "{v}");
            assert!(i == 0 || Histogram::upper(i - 1) < v, "{v}");
            assert!(Histogram::upper(i) - v <= v / 8 + 1, "{v}");
        }
        let h = Histogram::default();
        for v in 1..=1000 {
            h.add(v);
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5);
        assert!((500..=563).contains(&p50), "{p50}");
        assert_eq!(h.quantile(1.0), 1000);
        assert!(h.quantile(0.99) >= 990);
    }
}
