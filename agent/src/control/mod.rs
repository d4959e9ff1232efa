//! The admin socket: a Unix stream socket carrying one JSON object per line.
//!
//! Access is checked twice: by the socket file's mode (0600, or 0660 with a configured group)
//! and, per connection, by the kernel's account of the peer (SO_PEERCRED, SO_PEERGROUPS): root,
//! or a member of the configured group.

pub mod client;
pub mod metrics;
pub mod server;
mod waiting;

use serde::{Deserialize, Serialize};

pub use crate::daemon::{
    ExecEnroll, ExecWorkload, Protect,
    status::{
        AuditStatus, CgroupStatus, FleetStatus, Health, LatencyStatus, PolicyStatus, Protections,
        SinkStatus, Status,
    },
};
use crate::{enforce::Counters, events::EventRecord};

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
        /// Launch under this identity (a SPIFFE ID, or a path in the local trust domain):
        /// its policy is bound and the daemon issues its X509-SVID for the Workload API.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<String>,
        /// Secrets the daemon keeps in the agent's directory, as its identity's policy
        /// grants them (`agentwall exec --secret`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secrets: Option<crate::daemon::ExecSecrets>,
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
    /// Store a secret's value (base64) as the next version of its path.
    SecretPut { path: String, value: SecretText },
    /// A secret's newest version, or the one named.
    SecretGet {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
    /// The secrets whose paths start with `prefix`, without their values.
    SecretList {
        #[serde(default)]
        prefix: String,
    },
    /// Remove a secret with every version.
    SecretRemove { path: String },
    /// A fresh master key for the secret store; the secrets are rewrapped under it.
    SecretRotateKey,
    /// The leases agents hold on secrets (never a value).
    SecretLeases,
}

/// A secret's value on the wire (base64): never shown by `Debug` (the admin server logs
/// requests at debug level).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(..)")
    }
}

impl Drop for SecretText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
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
        /// For a cgroup launched under an identity: its ID and the Workload API socket.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<ExecWorkload>,
        /// What a command that runs as root must not reach (see `spawn::Confinement`).
        #[serde(default)]
        protect: Protect,
        /// Where the secrets asked for are kept (`agentwall exec --secret`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secrets_dir: Option<String>,
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
    /// A secret's value (base64), with its version.
    Secret {
        path: String,
        version: u32,
        created: String,
        value: SecretText,
    },
    /// A put's new version.
    SecretStored {
        path: String,
        version: u32,
    },
    /// Secrets, without their values.
    Secrets {
        entries: Vec<crate::secrets::SecretInfo>,
    },
    /// Leases on secrets, soonest to end first.
    SecretLeases {
        leases: Vec<crate::secrets::lease::Lease>,
    },
    /// Events were lost because this subscriber read too slowly.
    Lagged {
        missed: u64,
    },
    Error {
        message: String,
    },
}

/// Serves the daemon to its operators: the admin socket on a thread of its own and, when the
/// configuration asks for it, the metrics endpoint. `agentwall run` hands this to
/// `daemon::run`, which calls it once enforcement holds (see [`crate::daemon::Frontends`]).
pub fn start(
    daemon: &std::sync::Arc<crate::daemon::Daemon>,
    supervisor: &crate::supervise::Supervisor,
    admin_connections: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cfg = daemon.config();
    // Metrics first: the admin socket answering means everything else is up.
    if let Some(addr) = cfg.metrics.listen {
        let listener = metrics::bind(addr)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        supervisor.spawn(
            "metrics",
            metrics::serve(listener, std::sync::Arc::clone(daemon)),
        );
    }
    let (listener, access) = server::bind(&cfg.socket, cfg.socket_group.as_deref())?;
    let slots = crate::limits::Slots::new("admin socket", admin_connections);
    server::serve_on_thread(
        listener,
        access,
        std::sync::Arc::clone(daemon),
        slots,
        supervisor.watch("admin"),
    )
    .map_err(|source| server::ServerError::Io {
        path: cfg.socket.display().to_string(),
        source,
    })?;
    Ok(())
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
                identity: None,
                secrets: None,
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
