//! What the daemon answers its operators: typed results and refusals. The admin socket's
//! server (`control::server`) turns them into replies; nothing here knows that wire.

use std::path::PathBuf;

use super::DaemonError;

/// Why an operator's request was refused; each says what to fix. The admin socket's server
/// (`control::server`) turns these, and the results beside them, into its replies.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("reload rejected, the policy in force is unchanged: {0}")]
    ReloadRejected(Box<DaemonError>),
    #[error("{0:?} is not a cgroup id")]
    NotACgroupId(String),
    #[error(transparent)]
    NoSuchCgroup(#[from] crate::cgroup::CgroupError),
    #[error("cgroup {spec} (id {id}) is not bound by agentwall")]
    NotBound { spec: String, id: u64 },
    #[error("{0}")]
    Kernel(String),
    #[error("cannot read the cgroup of process {0}")]
    PeerCgroup(i32),
    #[error(
        "cgroup /{0} is not listed under `enforce:` in the configuration; list it there (cgroup: {0}, policy: NAME) and restart or reload the daemon"
    )]
    NotConfigured(String),
    #[error("cannot enforce cgroup /{cgroup}: {error}")]
    Enforce {
        cgroup: String,
        error: Box<DaemonError>,
    },
    #[error(
        "the audit key comes from {0}: rotate it by setting a new key there and restarting the daemon (readers then need both keys)"
    )]
    KeyFromEnvironment(&'static str),
    #[error(transparent)]
    KeyFile(crate::audit::keys::KeyError),
    #[error(
        "{error}; {} already holds the new key first: the daemon writes under it from its next start",
        key_file.display()
    )]
    KeySwitch {
        error: crate::audit::sink::KeySwitchError,
        key_file: PathBuf,
    },
    #[error("audit key rotation: {0}")]
    KeyRotationTask(tokio::task::JoinError),
    #[error("{0}")]
    BadTarget(String),
    #[error("give a reason (--reason TEXT); it is recorded with the revocation")]
    NoReason,
    #[error(
        "{target} is on the revocation list, but the kernel could not be told for {} cgroup(s) yet (the daemon keeps trying every half second): {}",
        failed.len(),
        failed.join("; ")
    )]
    RevocationNotInKernel { target: String, failed: Vec<String> },
    #[error("no policy named {policy:?} is loaded (loaded: {})", loaded.join(", "))]
    UnknownPolicy { policy: String, loaded: Vec<String> },
    #[error("cannot prepare a cgroup for {what}: {error}")]
    ExecCgroup {
        what: String,
        error: Box<DaemonError>,
    },
    #[error("cannot launch under identity {id}: {error}")]
    ExecIdentity {
        id: String,
        error: Box<super::identity::ExecIdentityError>,
    },
    #[error("no PEM certificate given")]
    NoCertificate,
    #[error("renewed {renewed}; failed: {}", failed.join("; "))]
    Renewal { renewed: usize, failed: Vec<String> },
    #[error(transparent)]
    Secret(crate::secrets::SecretError),
    #[error("agentwall exec --secret: {0}")]
    ExecSecret(String),
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub target: String,
    /// False when the target was already on the list.
    pub new: bool,
    pub cgroups: Vec<u64>,
    pub sockets_destroyed: u32,
    /// Why the list could not be saved (the revocation holds until a restart).
    pub not_persisted: Option<String>,
}

/// Whether a certificate or token is valid here now, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub valid: bool,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    pub message: String,
}

/// A reload that put a new policy generation in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u32,
    pub policies: usize,
    pub rule_nodes: usize,
}

/// A quarantine set or lifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantined {
    pub cgroup_id: u64,
    pub lift: bool,
    pub sockets_destroyed: u32,
}

/// A configured cgroup enforced at its own request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfEnforced {
    /// Its path below the cgroup mount.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub policy: String,
}

/// Every launched agent's certificate renewed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub renewed: usize,
    /// Secret leases the daemon holds for agents (`agentwall exec --secret`) renewed.
    pub credentials: usize,
}

/// An audit key rotation: the ids of the retired and the new key, and the file holding both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotated {
    pub from: String,
    pub to: String,
    pub key_file: PathBuf,
}
