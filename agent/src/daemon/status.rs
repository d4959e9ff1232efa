//! What `agentwall status` and the metrics endpoint report.

use serde::{Deserialize, Serialize};

use super::*;
use crate::enforce::Counters;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub health: Health,
    pub generation: u32,
    pub rule_nodes: usize,
    pub policy_dir: String,
    pub pin_dir: String,
    pub cgroup_root: String,
    pub policies: Vec<PolicyStatus>,
    pub cgroups: Vec<CgroupStatus>,
    pub kernel_counters: Counters,
    pub daemon_errors: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub audit: AuditStatus,
    #[serde(default)]
    pub protections: Protections,
    /// The fleet (etcd), when the configuration names one.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
}

/// This node in the fleet: its connection to etcd and the revocations it shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub node: String,
    pub endpoints: Vec<String>,
    /// Watching etcd now; when not, the node enforces what it has and tries again.
    pub connected: bool,
    /// The etcd revision this node has applied up to.
    pub revision: i64,
    /// Revocations from other nodes applied here, published from here, and refused values.
    pub applied: u64,
    pub published: u64,
    pub refused: u64,
    /// Why the last connection ended, while not connected.
    pub last_error: Option<String>,
    /// The version of the fleet's policy bundle in force (with `fleet.policy_keys`).
    #[serde(default)]
    pub policy_bundle: Option<u64>,
    /// Bundles refused (signature, rollback, compile), and why the last one was.
    #[serde(default)]
    pub bundles_refused: u64,
    #[serde(default)]
    pub bundle_error: Option<String>,
}

/// Kernel protections beyond the cgroup hooks, and for each one missing, why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protections {
    /// The task-scoped hooks (BPF LSM) are in force: a socket made outside an enforced cgroup
    /// and used inside is judged by the task that uses it.
    pub task_hooks: bool,
    /// The Unix socket hooks are in force: connects and sends to Unix sockets from enforced
    /// cgroups are judged against `unix:` rules.
    #[serde(default)]
    pub unix_sockets: bool,
    /// One line per missing protection: what is not judged, and what to do.
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub dir: String,
    /// Records made durable since the daemon started.
    pub committed: u64,
    pub last_seq: u64,
    pub last_checkpoint_seq: u64,
    pub write_errors: u64,
    /// The log cannot be written right now (enforcement goes on; records wait).
    pub failing: bool,
    /// Behavioral alerts raised (each is an `alert` record).
    #[serde(default)]
    pub alerts: u64,
    /// Kernel verdicts over their agent's event budget, counted in `verdict_summary`
    /// records rather than recorded one by one.
    #[serde(default)]
    pub events_suppressed: u64,
    #[serde(default)]
    pub event_summaries: u64,
    /// `event_flood` alerts raised (each also counted in `alerts`).
    #[serde(default)]
    pub event_floods: u64,
    /// Free and total bytes of the audit file system, as last looked at (every 2 s).
    #[serde(default)]
    pub free_bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
    /// Below the free-space watermark (`audit.space_warn_percent`).
    #[serde(default)]
    pub space_low: bool,
    /// Old segments removed by retention, and failed attempts.
    #[serde(default)]
    pub segments_removed: u64,
    #[serde(default)]
    pub retention_errors: u64,
    /// The sinks beside the store (stdout, syslog), by name.
    #[serde(default)]
    pub sinks: std::collections::BTreeMap<String, SinkStatus>,
    /// From a kernel event to its record being durable, since the daemon started.
    #[serde(default)]
    pub event_to_durable: LatencyStatus,
    /// Hex public key that verifies the checkpoints.
    pub node_key: String,
}

/// A latency distribution, in microseconds (each value within 12.5% above).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStatus {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The sum of all values, for a mean.
    #[serde(default)]
    pub sum_us: u64,
    /// How many values fall at or below each of [`LATENCY_BOUNDS_US`] and above the bound
    /// before it, then above the last: the buckets of a Prometheus histogram.
    #[serde(default)]
    pub buckets: Vec<u64>,
}

/// Upper bounds of the latency histograms' buckets, in microseconds: each the top of a
/// bucket of the daemon's own histograms (so the counts are exact), from 63 µs to 4.2 s.
pub const LATENCY_BOUNDS_US: [u64; 17] = [
    63, 127, 255, 511, 1023, 2047, 4095, 8191, 16_383, 32_767, 65_535, 131_071, 262_143, 524_287,
    1_048_575, 2_097_151, 4_194_303,
];

/// What a sink did since the daemon started; the store holds every record regardless.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStatus {
    pub sent: u64,
    /// Records its full queue turned away.
    pub dropped: u64,
    /// Failed connects and writes.
    pub errors: u64,
    pub connected: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Starting,
    /// The probe's connect was denied by the kernel at `probe_at`.
    Healthy {
        probe_at: String,
    },
    Failed {
        reason: String,
    },
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Starting => f.write_str("starting"),
            Self::Healthy { probe_at } => write!(f, "healthy (probe denied at {probe_at})"),
            Self::Failed { reason } => write!(f, "FAILED: {reason}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    pub slot: u32,
    pub mode: Mode,
    pub rules: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStatus {
    pub id: u64,
    pub path: String,
    pub policy: Option<String>,
    pub kind: String,
    pub quarantined: bool,
    pub leased: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// RFC 3339: when the binding dies with its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked: bool,
    /// The host uid root of an exec cgroup's command runs as (see `rootuid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_uid: Option<u32>,
}

impl Daemon {
    /// The daemon's state now: health, policies, cgroups, kernel and audit counters.
    pub async fn status(&self) -> Status {
        let (generation, rule_nodes) = self.enforcer.rule_state().await.unwrap_or_default();
        let kernel_counters = self.enforcer.counters().await.unwrap_or_default();
        let mut protections = match self.enforcer.task_hooks().await {
            Ok(crate::enforce::TaskHooks::Active) => Protections {
                task_hooks: true,
                ..Default::default()
            },
            Ok(crate::enforce::TaskHooks::Missing(why)) => Protections {
                missing: vec![format!(
                    "task-scoped hooks: sockets made outside an enforced cgroup and used inside it are not judged: {why}"
                )],
                ..Default::default()
            },
            Err(e) => Protections {
                missing: vec![e.to_string()],
                ..Default::default()
            },
        };
        match self.enforcer.unix_hooks_missing().await {
            Ok(None) => protections.unix_sockets = true,
            Ok(Some(why)) => protections.missing.push(format!(
                "Unix socket hooks: connects and sends to Unix sockets from enforced cgroups are not judged (Linux 6.7 or later is needed): {why}"
            )),
            Err(e) => protections.missing.push(e.to_string()),
        }
        let policies = self.policies.summaries();
        let cgroups = self
            .registry
            .snapshot()
            .await
            .into_iter()
            .map(|(id, m)| CgroupStatus {
                id,
                path: m.cgroup.path().display().to_string(),
                kind: m.kind.as_str().into(),
                policy: m.policy,
                quarantined: m.quarantined,
                leased: m.leased,
                spiffe_id: m.bound.as_ref().map(|b| b.spiffe_id.clone()),
                serial: m.bound.as_ref().map(|b| b.serial.clone()),
                expires_at: m.bound.as_ref().map(|b| b.expires_at()),
                revoked: m.bound.as_ref().is_some_and(|b| b.revoked),
                root_uid: m.root_uid,
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            health: self
                .health
                .read()
                .map(|h| h.clone())
                .unwrap_or(Health::Starting),
            generation,
            rule_nodes,
            policy_dir: self.cfg.policy_dir.display().to_string(),
            pin_dir: self.cfg.pin_dir.display().to_string(),
            cgroup_root: self.root.path().display().to_string(),
            policies,
            cgroups,
            kernel_counters,
            daemon_errors: self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
            fleet: self.fleet_status(),
            audit: {
                use std::sync::atomic::Ordering::Relaxed;
                let a = &self.audit.state;
                AuditStatus {
                    dir: self.cfg.audit_dir().display().to_string(),
                    committed: a.committed.load(Relaxed),
                    last_seq: a.last_seq.load(Relaxed),
                    last_checkpoint_seq: a.last_checkpoint_seq.load(Relaxed),
                    write_errors: a.write_errors.load(Relaxed),
                    failing: a.failing.load(Relaxed),
                    alerts: a.alerts.load(Relaxed),
                    events_suppressed: a.events_suppressed.load(Relaxed),
                    event_summaries: a.event_summaries.load(Relaxed),
                    event_floods: a.event_floods.load(Relaxed),
                    free_bytes: a.free_bytes.load(Relaxed),
                    total_bytes: a.total_bytes.load(Relaxed),
                    space_low: a.space_low.load(Relaxed),
                    segments_removed: a.segments_removed.load(Relaxed),
                    retention_errors: a.retention_errors.load(Relaxed),
                    event_to_durable: {
                        // The count is the buckets' sum, read once: a scrape must never see
                        // a count other than its +Inf bucket while events are added.
                        let h = &a.event_to_durable;
                        let buckets = h.counts_at(&LATENCY_BOUNDS_US);
                        LatencyStatus {
                            count: buckets.iter().sum(),
                            p50_us: h.quantile(0.5),
                            p99_us: h.quantile(0.99),
                            max_us: h.max(),
                            sum_us: h.sum(),
                            buckets,
                        }
                    },
                    sinks: a
                        .sinks
                        .iter()
                        .map(|(n, s)| {
                            (
                                (*n).to_owned(),
                                SinkStatus {
                                    sent: s.sent.load(Relaxed),
                                    dropped: s.dropped.load(Relaxed),
                                    errors: s.errors.load(Relaxed),
                                    connected: s.connected.load(Relaxed),
                                    last_error: s.last_error.lock().ok().and_then(|l| l.clone()),
                                },
                            )
                        })
                        .collect(),
                    node_key: self.audit_node_key.clone(),
                }
            },
            protections,
        }
    }
}
