//! The fleet task: revocations shared with the other nodes through etcd (`crate::fleet`).
//!
//! Connected, the task reads every revocation under the fleet's prefix, applies those this
//! node lacks, publishes the ones of this node that etcd lacks, then watches the prefix from
//! the revision it read. Cut off from etcd, the node goes on enforcing what it has (the kernel
//! holds it) and tries again; back, it catches up the same way, from a full read. Each new
//! revocation made here wakes the task to publish it.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use tokio::sync::Notify;

use super::{Daemon, status::FleetStatus};
use crate::{
    fleet::{FleetRevocation, revocation_key, revocations_prefix},
    identity::revoke::Target,
};

/// Keys a page of the full read takes.
const PAGE: i64 = 500;
/// How often a quiet watch asks etcd for word of its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A session this long starts the pauses between connects over.
const SETTLED: Duration = Duration::from_secs(10);
/// The most revocations this node's list takes from the fleet.
const MAX_LIST: usize = 100_000;
/// How long a connect or a unary call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first and the longest pause before connecting again.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The file the bundle in force is kept in, to be in force again after a restart.
const STORED_BUNDLE: &str = "fleet-bundle.json";

/// What the fleet task shares with the rest of the daemon.
#[derive(Debug, Default)]
pub struct FleetState {
    /// The public keys (hex) whose bundles are put in force; none: bundles are not read.
    bundle_keys: Vec<String>,
    bundles_refused: AtomicU64,
    bundle_error: std::sync::Mutex<Option<String>>,
    /// The version of the bundle in force (0: none); set once its reload succeeded.
    bundle_in_force: AtomicU64,
    /// Wakes the task: a revocation was made here.
    publish: Notify,
    connected: AtomicBool,
    /// The etcd revision this node has applied up to.
    revision: AtomicI64,
    applied: AtomicU64,
    published: AtomicU64,
    refused: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
enum FleetError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("etcd ended the watch: {0}")]
    WatchEnded(String),
}

impl FleetState {
    /// With the trusted keys and the version of the bundle the daemon started with.
    pub fn new(bundle_keys: Vec<String>, bundle_in_force: u64) -> Self {
        Self {
            bundle_keys,
            bundle_in_force: AtomicU64::new(bundle_in_force),
            ..Self::default()
        }
    }

    /// Asks the task to publish the revocations etcd lacks.
    pub fn wake(&self) {
        self.publish.notify_one();
    }
}

/// The trusted bundle keys of `fleet.policy_keys`, each file one Ed25519 public key in hex.
pub(super) fn bundle_keys(cfg: &crate::config::Config) -> Result<Vec<String>, super::DaemonError> {
    let mut keys = Vec::new();
    for path in &cfg.fleet.policy_keys {
        let bad = |message: String| super::DaemonError::FleetKey {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let key = text.trim().to_ascii_lowercase();
        if key.len() != 64 || crate::audit::unhex(&key).is_none() {
            return Err(bad(
                "must hold one Ed25519 public key as 64 hex digits (`agentwall fleet keygen` prints it)"
                    .into(),
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// The bundle this node had in force when it stopped, checked again; none if there is none
/// or it does not verify (then no policy is in force until etcd gives one: fail closed).
pub(super) fn stored_bundle(
    cfg: &crate::config::Config,
    keys: &[String],
) -> Option<std::sync::Arc<crate::fleet::BundlePayload>> {
    if keys.is_empty() {
        return None;
    }
    let path = cfg.state_dir.join(STORED_BUNDLE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "no fleet policy bundle yet: enforced cgroups are denied everything until etcd gives one"
            );
            return None;
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the stored policy bundle; denied everything until etcd gives one");
            return None;
        }
    };
    match crate::fleet::SignedBundle::verify(&bytes, keys, 0) {
        Ok(b) => {
            tracing::info!(
                version = b.version,
                "the stored fleet policy bundle is in force until etcd is read"
            );
            Some(std::sync::Arc::new(b))
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "the stored policy bundle does not verify; denied everything until etcd gives one");
            None
        }
    }
}

/// Starts the fleet task, if the configuration names an etcd.
pub(super) fn spawn(daemon: std::sync::Arc<Daemon>, supervisor: &crate::supervise::Supervisor) {
    if daemon.cfg.fleet.etcd.is_empty() {
        return;
    }
    supervisor.spawn("fleet", async move {
        let mut pause = RETRY_FIRST;
        loop {
            let began = std::time::Instant::now();
            let err = daemon.fleet_session().await;
            daemon.fleet.connected.store(false, Ordering::Relaxed);
            tracing::warn!(error = %err, "cut off from the fleet's etcd; enforcing what this node has, trying again");
            if let Ok(mut e) = daemon.fleet.last_error.lock() {
                *e = Some(err.to_string());
            }
            daemon.count_error("fleet_etcd");
            // A session that lasted starts the pauses over; one that keeps failing at once
            // (a full quota, say) is not tried again more than every RETRY_MAX.
            if began.elapsed() >= SETTLED {
                pause = RETRY_FIRST;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    });
}

/// Whether etcd's answer was larger than a reply may be.
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted))
}

async fn within<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| FleetError::Timeout)?
        .map_err(FleetError::Etcd)
}

impl Daemon {
    /// The fleet's state for status; none without a fleet.
    pub fn fleet_status(&self) -> Option<FleetStatus> {
        if self.cfg.fleet.etcd.is_empty() {
            return None;
        }
        let f = &self.fleet;
        Some(FleetStatus {
            node: self.cfg.fleet.node_name(),
            endpoints: self.cfg.fleet.etcd.clone(),
            connected: f.connected.load(Ordering::Relaxed),
            revision: f.revision.load(Ordering::Relaxed),
            applied: f.applied.load(Ordering::Relaxed),
            published: f.published.load(Ordering::Relaxed),
            refused: f.refused.load(Ordering::Relaxed),
            last_error: f.last_error.lock().ok().and_then(|e| e.clone()),
            policy_bundle: Some(f.bundle_in_force.load(Ordering::Relaxed)).filter(|v| *v > 0),
            bundles_refused: f.bundles_refused.load(Ordering::Relaxed),
            bundle_error: f.bundle_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// One connection to etcd, from the full read to the end of the watch; returns why it
    /// ended.
    async fn fleet_session(&self) -> FleetError {
        match self.fleet_session_inner().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn fleet_session_inner(&self) -> Result<std::convert::Infallible, FleetError> {
        let cfg = &self.cfg.fleet;
        // The whole fleet prefix: revocations and the policy bundle.
        let prefix = format!("{}/", cfg.prefix.trim_end_matches('/'));
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others' majority answers nothing rather than stale.
            .with_require_leader(true);
        let mut client = within(Client::connect(&cfg.etcd, Some(options))).await?;
        let mut in_etcd = HashSet::new();
        let revision = self.read_all(&mut client, &prefix, &mut in_etcd).await?;
        self.fleet.revision.store(revision, Ordering::Relaxed);
        let mut watch = within(
            client.watch(
                prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_fragment()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        self.fleet.connected.store(true, Ordering::Relaxed);
        if let Ok(mut e) = self.fleet.last_error.lock() {
            *e = None;
        }
        tracing::info!(
            revision,
            revocations = in_etcd.len(),
            "in the fleet: watching etcd"
        );
        self.publish_missing(&mut client, &mut in_etcd).await?;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                msg = watch.message() => {
                    let Some(resp) = msg? else {
                        return Err(FleetError::WatchEnded("the stream closed".into()));
                    };
                    heard = tokio::time::Instant::now();
                    if resp.canceled() {
                        return Err(FleetError::WatchEnded(format!(
                            "canceled ({}; compacted to {})",
                            resp.cancel_reason(),
                            resp.compact_revision()
                        )));
                    }
                    let mut republish = false;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        self.fleet.revision.fetch_max(kv.mod_revision(), Ordering::Relaxed);
                        if kv.value().is_empty() {
                            // A delete lifts nothing (see `crate::fleet`); a revocation this
                            // node holds is put back, for the nodes that read etcd later.
                            if let Some(t) = crate::fleet::target_of_key(&cfg.prefix, kv.key())
                                && self.identity.is_revoked(&t)
                            {
                                in_etcd.remove(&t);
                                republish = true;
                            }
                            continue;
                        }
                        self.fleet_value(kv.key(), kv.value(), &mut in_etcd).await;
                    }
                    if republish {
                        self.publish_missing(&mut client, &mut in_etcd).await?;
                    }
                }
                () = self.fleet.publish.notified() => {
                    self.publish_missing(&mut client, &mut in_etcd).await?;
                }
                _ = progress.tick() => {
                    // A watch that hears nothing, not even the answer to a progress request,
                    // is a connection that died without saying so.
                    if heard.elapsed() > PROGRESS_EVERY * 3 {
                        return Err(FleetError::WatchEnded(format!(
                            "no word from etcd for {:?}",
                            heard.elapsed()
                        )));
                    }
                    watch.request_progress().await?;
                }
            }
        }
    }

    /// Reads every key under `prefix` at one revision, a page at a time, handing each to
    /// [`Self::fleet_value`]; returns that revision. A page too large for one reply is read
    /// again one key at a time, and a value too large for any reply is skipped and counted.
    async fn read_all(
        &self,
        client: &mut Client,
        prefix: &str,
        in_etcd: &mut HashSet<Target>,
    ) -> Result<i64, FleetError> {
        let end = crate::fleet::prefix_end(prefix);
        let head = within(client.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        ))
        .await?;
        let revision = head.header().map_or(0, |h| h.revision());
        let mut start = prefix.as_bytes().to_vec();
        let mut limit = PAGE;
        loop {
            let page = GetOptions::new()
                .with_range(end.clone())
                .with_limit(limit)
                .with_revision(revision);
            match within(client.get(start.clone(), Some(page))).await {
                Ok(page) => {
                    for kv in page.kvs() {
                        self.fleet_value(kv.key(), kv.value(), in_etcd).await;
                    }
                    match page.kvs().last() {
                        Some(last) if page.more() => start = crate::fleet::after(last.key()),
                        _ => break,
                    }
                    limit = PAGE;
                }
                Err(FleetError::Etcd(e)) if too_large(&e) => {
                    if limit > 1 {
                        limit = 1;
                        continue;
                    }
                    let key_only = GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(1)
                        .with_revision(revision)
                        .with_keys_only();
                    let k = within(client.get(start.clone(), Some(key_only))).await?;
                    let Some(kv) = k.kvs().first() else { break };
                    tracing::error!(key = %crate::fleet::key_text(kv.key()), "a value in the fleet's prefix is too large to read; skipped");
                    self.fleet.refused.fetch_add(1, Ordering::Relaxed);
                    self.count_error("fleet_value_refused");
                    start = crate::fleet::after(kv.key());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(revision)
    }

    /// A value under the fleet's prefix: a revocation, the policy bundle, or something else
    /// (left alone).
    async fn fleet_value(&self, key: &[u8], value: &[u8], in_etcd: &mut HashSet<Target>) {
        let prefix = &self.cfg.fleet.prefix;
        if key.starts_with(revocations_prefix(prefix).as_bytes()) {
            if let Some(t) = self.apply_fleet_value(prefix, key, value).await {
                in_etcd.insert(t);
            }
        } else if key == crate::fleet::bundle_key(prefix).as_bytes() {
            self.apply_bundle(value).await;
        }
    }

    /// Puts a policy bundle read from etcd in force, if it verifies against the trusted keys,
    /// is newer than the one in force and compiles; otherwise it is refused, logged, audited
    /// and counted, and the policy in force stays.
    async fn apply_bundle(&self, value: &[u8]) {
        let keys = &self.fleet.bundle_keys;
        if keys.is_empty() {
            tracing::debug!(
                "a policy bundle is in etcd; this node reads its policy directory (no fleet.policy_keys)"
            );
            return;
        }
        let have = self.policies.bundle().map_or(0, |b| b.version);
        let refuse = |error: String| {
            tracing::error!(%error, "a fleet policy bundle is refused; the policy in force stays");
            self.fleet.bundles_refused.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut e) = self.fleet.bundle_error.lock() {
                *e = Some(error.clone());
            }
            self.count_error("fleet_bundle_refused");
            self.audit
                .record(&crate::audit::schema::AuditRecord::ReloadRejected {
                    error,
                    dir: "fleet bundle".into(),
                    dir_sha256: crate::audit::hex(
                        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value).as_ref(),
                    ),
                });
        };
        let bundle = match crate::fleet::SignedBundle::verify(value, keys, have) {
            Ok(b) => std::sync::Arc::new(b),
            // The one in force, read again (at a reconnect): nothing to do.
            Err(crate::fleet::BundleError::Rollback { got, have }) if got == have => return,
            Err(e) => return refuse(e.to_string()),
        };
        let version = bundle.version;
        let before = self
            .policies
            .set_bundle(Some(std::sync::Arc::clone(&bundle)));
        if let Err(e) = self.reload().await {
            // `reload` logged, audited and counted it; the source goes back to what is in force.
            self.policies.set_bundle(before);
            return refuse(format!("version {version} does not compile: {e}"));
        }
        self.fleet.bundle_in_force.store(version, Ordering::Relaxed);
        if let Ok(mut e) = self.fleet.bundle_error.lock() {
            *e = None;
        }
        tracing::info!(version, "fleet policy bundle in force");
        let path = self.cfg.state_dir.join(STORED_BUNDLE);
        if let Err(e) = crate::state::write_atomic(&path, value, 0o600) {
            tracing::error!(path = %path.display(), error = %e, "cannot keep the policy bundle; after a restart the previous one is in force until etcd is read");
            self.count_error("fleet_bundle_store");
        }
    }

    /// Puts every revocation of this node's list that etcd lacks.
    async fn publish_missing(
        &self,
        client: &mut Client,
        in_etcd: &mut HashSet<Target>,
    ) -> Result<(), FleetError> {
        let node = self.cfg.fleet.node_name();
        for r in self.identity.revocations() {
            if in_etcd.contains(&r.target) {
                continue;
            }
            let value = FleetRevocation::of(&r, &node);
            let Ok(json) = serde_json::to_vec(&value) else {
                continue;
            };
            let key = revocation_key(&self.cfg.fleet.prefix, &r.target);
            within(client.put(key, json, None)).await?;
            self.fleet.published.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target = %r.target, "revocation published to the fleet");
            in_etcd.insert(r.target);
        }
        Ok(())
    }

    /// Applies the revocation at `key`, unless this node has it; returns its target, or none
    /// for a value refused (logged and counted).
    async fn apply_fleet_value(&self, prefix: &str, key: &[u8], value: &[u8]) -> Option<Target> {
        let r = match FleetRevocation::parse(prefix, key, value) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(key = %crate::fleet::key_text(key), error = %e, "a value in the fleet's revocations is refused");
                self.fleet.refused.fetch_add(1, Ordering::Relaxed);
                self.count_error("fleet_value_refused");
                return None;
            }
        };
        if self.identity.is_revoked(&r.target) {
            return Some(r.target);
        }
        if self.identity.revocation_count() >= MAX_LIST {
            tracing::error!(target = %r.target, max = MAX_LIST, "the revocation list is full; a revocation from the fleet is not applied (someone is filling etcd, or the list needs pruning)");
            self.fleet.refused.fetch_add(1, Ordering::Relaxed);
            self.count_error("fleet_list_full");
            return None;
        }
        let target = r.target.clone();
        match self
            .apply_revocation(r.target.clone(), &r.reason, &r.made_by(), None)
            .await
        {
            Ok(done) => {
                self.fleet.applied.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%target, node = %r.node, cgroups = ?done.cgroups, "revocation from the fleet applied");
            }
            Err(e) => {
                // The list holds it; the collector flags the cgroups the kernel missed.
                tracing::error!(%target, error = %e, "a revocation from the fleet is not in the kernel yet; retrying");
                self.count_error("fleet_apply");
            }
        }
        Some(target)
    }
}
