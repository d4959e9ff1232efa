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

/// The most revocations one read takes in.
const MAX_KEYS: i64 = 100_000;
/// How long a connect or a unary call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first and the longest pause before connecting again.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the fleet task shares with the rest of the daemon.
#[derive(Debug, Default)]
pub struct FleetState {
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
    /// Asks the task to publish the revocations etcd lacks.
    pub fn wake(&self) {
        self.publish.notify_one();
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
            let err = daemon.fleet_session(&mut pause).await;
            daemon.fleet.connected.store(false, Ordering::Relaxed);
            tracing::warn!(error = %err, "cut off from the fleet's etcd; enforcing what this node has, trying again");
            if let Ok(mut e) = daemon.fleet.last_error.lock() {
                *e = Some(err.to_string());
            }
            daemon.count_error("fleet_etcd");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    });
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
        })
    }

    /// One connection to etcd, from the full read to the end of the watch; returns why it
    /// ended. `pause` goes back to its first value once connected.
    async fn fleet_session(&self, pause: &mut Duration) -> FleetError {
        match self.fleet_session_inner(pause).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn fleet_session_inner(
        &self,
        pause: &mut Duration,
    ) -> Result<std::convert::Infallible, FleetError> {
        let cfg = &self.cfg.fleet;
        let prefix = revocations_prefix(&cfg.prefix);
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = within(Client::connect(&cfg.etcd, Some(options))).await?;
        let read = within(client.get(
            prefix.clone(),
            Some(GetOptions::new().with_prefix().with_limit(MAX_KEYS)),
        ))
        .await?;
        let revision = read.header().map_or(0, |h| h.revision());
        if read.more() {
            tracing::error!(
                max = MAX_KEYS,
                "the fleet holds more revocations than one read takes; the rest are applied as they change"
            );
            self.count_error("fleet_too_many");
        }
        let mut in_etcd = HashSet::new();
        for kv in read.kvs() {
            if let Some(t) = self
                .apply_fleet_value(&cfg.prefix, kv.key(), kv.value())
                .await
            {
                in_etcd.insert(t);
            }
        }
        self.fleet.revision.store(revision, Ordering::Relaxed);
        let mut watch = within(
            client.watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        self.fleet.connected.store(true, Ordering::Relaxed);
        if let Ok(mut e) = self.fleet.last_error.lock() {
            *e = None;
        }
        *pause = RETRY_FIRST;
        tracing::info!(
            revision,
            revocations = in_etcd.len(),
            "in the fleet: watching etcd"
        );
        self.publish_missing(&mut client, &mut in_etcd).await?;
        loop {
            tokio::select! {
                msg = watch.message() => {
                    let Some(resp) = msg? else {
                        return Err(FleetError::WatchEnded("the stream closed".into()));
                    };
                    if resp.canceled() {
                        return Err(FleetError::WatchEnded(format!(
                            "canceled ({}; compacted to {})",
                            resp.cancel_reason(),
                            resp.compact_revision()
                        )));
                    }
                    for ev in resp.events() {
                        // A delete carries no value: it lifts nothing (see `crate::fleet`).
                        let Some(kv) = ev.kv().filter(|kv| !kv.value().is_empty()) else {
                            continue;
                        };
                        if let Some(t) = self.apply_fleet_value(&cfg.prefix, kv.key(), kv.value()).await {
                            in_etcd.insert(t);
                        }
                        self.fleet.revision.fetch_max(kv.mod_revision(), Ordering::Relaxed);
                    }
                }
                () = self.fleet.publish.notified() => {
                    self.publish_missing(&mut client, &mut in_etcd).await?;
                }
            }
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
                tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "a value in the fleet's revocations is refused");
                self.fleet.refused.fetch_add(1, Ordering::Relaxed);
                self.count_error("fleet_value_refused");
                return None;
            }
        };
        if self.identity.is_revoked(&r.target) {
            return Some(r.target);
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
