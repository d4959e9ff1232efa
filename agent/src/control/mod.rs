//! The admin socket: a Unix stream socket carrying one JSON object per line.
//!
//! Access is checked twice: by the socket file's mode (0600, or 0660 with a configured group)
//! and, per connection, by the kernel's account of the peer (SO_PEERCRED, SO_PEERGROUPS): root,
//! or a member of the configured group.

pub mod client;
pub mod metrics;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::{enforce::Counters, events::EventRecord, policy::Mode};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Health, policies, cgroups and counters.
    Status,
    /// Create an enforced cgroup for a command about to start, bound to `policy`, or (with
    /// `policy: null`) left unbound, so that everything is denied until a process in it
    /// enrolls with a certificate. The connection is the cgroup's lease: the cgroup is removed
    /// once the lease ends and no process is left in it.
    ExecBegin {
        policy: Option<String>,
        /// Audiences of a JWT-SVID kept fresh in the agent's directory (identity launches).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        audience: Vec<String>,
    },
    /// Reload the policy directory.
    Reload,
    /// Deny every flow of a bound cgroup (or lift that), open flows included.
    Quarantine { cgroup: String, lift: bool },
    /// Enforce the caller's own cgroup, which the configuration lists under `enforce:`: a
    /// systemd unit's `ExecStartPre=+agentwall enforce-self` runs in the unit's new cgroup
    /// before its main process, so that a restarted unit's first connect is enforced.
    EnforceSelf,
    /// Stream verdicts until the client goes away. The first reply, `done`, confirms the
    /// subscription.
    Events,
    /// Revoke a SPIFFE ID or a certificate serial: its cgroups are denied everything and their
    /// open sockets destroyed; enrolling with it is refused from now on.
    Revoke { target: String, reason: String },
    /// The revocation list.
    Revocations,
    /// Whether a certificate (PEM chain, leaf first) is valid here now.
    Check { pem: String },
    /// Renew the certificates of every agent launched with `agentwall exec --cert` now.
    Rotate,
    /// The public keys that verify JWT-SVIDs (a JWKS).
    Jwks,
    /// Whether a JWT-SVID is valid for `audience` here now (signature, expiry, revocation).
    CheckToken { token: String, audience: String },
    /// Rotate the audit key: a fresh key in the key file, used from the next record on.
    RotateAuditKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    ExecReady {
        cgroup: String,
        cgroup_id: u64,
        /// For a cgroup that waits for enrollment: where its agent's files go (renewals
        /// replace them there), the CA bundle to check the daemon with, the enrollment socket.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enroll: Option<ExecEnroll>,
        /// What a command that runs as root must not reach (see `spawn::Confinement`).
        #[serde(default)]
        protect: Protect,
    },
    Revoked {
        target: String,
        /// False when the target was already revoked.
        new: bool,
        cgroups: Vec<u64>,
        sockets_destroyed: u32,
        /// Why the revocation list could not be saved (the revocation holds until restart).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_persisted: Option<String>,
    },
    Revocations {
        entries: Vec<crate::identity::revoke::Revocation>,
    },
    Jwks {
        jwks: serde_json::Value,
    },
    Checked {
        valid: bool,
        spiffe_id: Option<String>,
        serial: Option<String>,
        not_after: Option<String>,
        message: String,
    },
    Reloaded {
        generation: u32,
        policies: usize,
        rule_nodes: usize,
    },
    Done {
        message: String,
    },
    Event(Box<EventRecord>),
    /// Events were lost because this subscriber read too slowly.
    Lagged {
        missed: u64,
    },
    Error {
        message: String,
    },
}

/// The daemon's files a root agent's mount namespace hides or makes read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protect {
    /// Directories covered by an empty read-only file system: the state directory, the pin
    /// directory, the audit log.
    pub hide_dirs: Vec<String>,
    /// Files covered by an empty one: the audit key.
    pub hide_files: Vec<String>,
    /// Mounts made read-only: the cgroup file system.
    pub read_only: Vec<String>,
    /// The host uid (and gid) root of the command's user namespace is mapped to; none from
    /// a daemon that hands out none (the launcher then refuses to run a command as root
    /// without `--keep-privileges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_uid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnroll {
    pub agent_dir: String,
    pub bundle_pem: String,
    pub socket: String,
}

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStatus {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

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
}

// `Counters` holds `&'static str` keys for the kernel counter names; owned deserialization is
// only needed by clients, which read them back as strings.
impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            totals: std::collections::BTreeMap<String, u64>,
            events_dropped_per_cpu: Vec<u64>,
        }
        let raw = Raw::deserialize(d)?;
        let mut totals = std::collections::BTreeMap::new();
        for (k, v) in raw.totals {
            if let Some(name) = agentwall_common::counters::NAMES.iter().find(|n| **n == k) {
                totals.insert(*name, v);
            }
        }
        Ok(Counters {
            totals,
            events_dropped_per_cpu: raw.events_dropped_per_cpu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"exec_begin","policy":"web"}"#).unwrap();
        assert_eq!(
            r,
            Request::ExecBegin {
                policy: Some("web".into()),
                audience: vec![],
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        let e = serde_json::from_str::<Request>(r#"{"op":"exec_begin","policy":"web","x":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }
}
