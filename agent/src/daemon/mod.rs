//! `agentwall run`: start-up, the shared state behind the admin socket, and shutdown.
//!
//! Start-up order is chosen so that nothing is ever enforced by half: policies are validated
//! before anything touches the kernel; the new rule generation is in place before programs are
//! attached; programs are attached before a binding is written; and the daemon reports
//! healthy only after the probe saw a denial.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use agentwall_common::binding::{Binding, flags};
use tokio::sync::{Mutex as AsyncMutex, Notify, broadcast};

mod identity;
pub(crate) use identity::may_block_here;
mod run;
mod units;

pub use self::run::run;
use crate::{
    cgroup::{self, Cgroup},
    config::Config,
    control::{self, CgroupStatus, Health, PolicyStatus, Reply, Status},
    enforce::actor::EnforcerHandle,
    events::{EventRecord, Resolve},
    policy::{self, Compiled, Mode},
    probe,
    rootuid::RootUids,
    state::SlotTable,
};

/// Why an operator's request was refused; each says what to fix. The admin socket's server
/// (`control::server`) turns these, and the results beside them, into its replies.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("reload rejected, the policy in force is unchanged: {0}")]
    ReloadRejected(Box<DaemonError>),
    #[error("{0}")]
    NoSuchCgroup(String),
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
    #[error("{0}")]
    KeyRotation(String),
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
    #[error("no PEM certificate given")]
    NoCertificate,
    #[error("renewed {renewed}; failed: {}", failed.join("; "))]
    Renewal { renewed: usize, failed: Vec<String> },
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

/// An audit key rotation: the ids of the retired and the new key, and the file holding both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotated {
    pub from: String,
    pub to: String,
    pub key_file: PathBuf,
}

/// Prefix of the cgroups `agentwall exec` creates below the managed root.
const EXEC_PREFIX: &str = "exec-";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Enforce(#[from] crate::enforce::EnforceError),
    #[error(transparent)]
    Call(#[from] crate::enforce::actor::CallError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("enforcement probe failed: {0}")]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Socket(#[from] control::server::ServerError),
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AgentDir(#[from] crate::agentdir::AgentDirError),
    #[error(
        "the kernel holds bindings to identity slots {slots:?} that {path} does not name (it is missing, or older than the bindings): their cgroups would be given other policies. Enforcement by the pins goes on. Restore {path} from a copy, or run `agentwall teardown --pin-dir {pin_dir}` (their cgroups are then no longer enforced: restart those agents) and start again", path = path.display(), pin_dir = pin_dir.display()
    )]
    SlotsBehindKernel {
        path: PathBuf,
        slots: Vec<u32>,
        pin_dir: PathBuf,
    },
    #[error(transparent)]
    RootUids(#[from] crate::rootuid::HostOverlap),
    #[error("another agentwall daemon is using the state directory {0} (lock held); stop it first")]
    Locked(PathBuf),
    #[error("{0}; the daemon stopped so that it can be started whole (the kernel keeps enforcing)")]
    TaskEnded(crate::supervise::Ended),
    #[error("watching for the cgroups listed under `enforce:`: {0}")]
    Watcher(#[source] std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the event reader stopped: {0}")]
    Events(#[source] std::io::Error),
    #[error(transparent)]
    Identity(#[from] crate::identity::service::ServiceError),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// Created by `agentwall exec` below the managed root.
    Exec,
    /// Named in the config's `enforce:` list.
    Configured,
    /// A cgroup elsewhere whose process enrolled.
    Enrolled,
}

#[derive(Debug, Clone)]
struct Managed {
    cgroup: Cgroup,
    policy: Option<String>,
    kind: Kind,
    leased: bool,
    quarantined: bool,
    /// The identity bound by enrollment.
    bound: Option<identity::Bound>,
    /// Files of an agent launched with `agentwall exec --cert` (renewed there).
    agent_dir: Option<PathBuf>,
    /// Audiences of the JWT-SVID kept in the agent's directory, and its expiry (Unix seconds).
    audience: Vec<String>,
    token_exp: u64,
    /// The host uid root of an exec cgroup's command is mapped to (see `rootuid`).
    root_uid: Option<u32>,
}

impl Managed {
    fn new(cgroup: Cgroup, policy: Option<String>, kind: Kind) -> Self {
        Self {
            cgroup,
            policy,
            kind,
            leased: false,
            quarantined: false,
            bound: None,
            agent_dir: None,
            audience: Vec::new(),
            token_exp: 0,
            root_uid: None,
        }
    }
}

/// The compiled policy in force and the one before it (events may still name its rules).
#[derive(Debug, Default)]
struct RuleBook {
    generation: u32,
    current: Arc<Compiled>,
    previous: Option<(u32, Arc<Compiled>)>,
}

/// Resolves names for events from the shared rule book and the enrolled identities.
struct Names(
    Arc<RwLock<RuleBook>>,
    Identities,
    crate::events::unix_names::UnixNames,
);

/// Cgroup id → SPIFFE ID of its enrollment, readable from the event reader's thread.
type Identities = Arc<RwLock<IdentityNames>>;

/// How long a cgroup that lost its binding (revoked, expired, gone) is still named by its
/// last identity: its events may still wait in the ring buffer.
const NAME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
pub(crate) struct IdentityNames {
    current: HashMap<u64, String>,
    departed: HashMap<u64, (String, std::time::Instant)>,
}

impl IdentityNames {
    /// The bound cgroups now; those that were bound and are no longer stay named for
    /// [`NAME_GRACE`].
    pub(crate) fn replace(&mut self, now_bound: HashMap<u64, String>) {
        let now = std::time::Instant::now();
        self.departed.retain(|id, (_, at)| {
            now.duration_since(*at) < NAME_GRACE && !now_bound.contains_key(id)
        });
        for (id, name) in self.current.drain() {
            if !now_bound.contains_key(&id) {
                self.departed.insert(id, (name, now));
            }
        }
        self.current = now_bound;
    }

    /// One cgroup's name now (`None`: no longer bound, named for [`NAME_GRACE`]).
    pub(crate) fn set(&mut self, cgroup_id: u64, name: Option<String>) {
        let now = std::time::Instant::now();
        self.departed
            .retain(|_, (_, at)| now.duration_since(*at) < NAME_GRACE);
        match name {
            Some(n) => {
                self.departed.remove(&cgroup_id);
                self.current.insert(cgroup_id, n);
            }
            None => {
                if let Some(old) = self.current.remove(&cgroup_id) {
                    self.departed.insert(cgroup_id, (old, now));
                }
            }
        }
    }

    fn get(&self, cgroup_id: u64) -> Option<&String> {
        self.current.get(&cgroup_id).or_else(|| {
            self.departed
                .get(&cgroup_id)
                .filter(|(_, at)| at.elapsed() < NAME_GRACE)
                .map(|(n, _)| n)
        })
    }
}

impl Resolve for Names {
    fn identity(&self, cgroup_id: u64) -> Option<String> {
        self.1.read().ok()?.get(cgroup_id).cloned()
    }

    fn learn_unix_name(&self, cgroup_id: u64, name: &[u8]) {
        self.2.learn(cgroup_id, name);
    }

    fn unix_name(&self, cgroup_id: u64, prefix: &[u8; 16], len: u16) -> String {
        self.2.name(cgroup_id, prefix, len)
    }

    fn policy(&self, slot: u32) -> Option<String> {
        let book = self.0.read().ok()?;
        book.current
            .policies
            .iter()
            .find(|(_, (s, _))| *s == slot)
            .map(|(n, _)| n.clone())
    }

    fn rule(&self, generation: u32, rule_id: u32) -> Option<String> {
        let book = self.0.read().ok()?;
        let compiled = if generation == book.generation {
            &book.current
        } else {
            &book.previous.as_ref().filter(|(g, _)| *g == generation)?.1
        };
        compiled.rule(rule_id).map(|r| r.source.to_string())
    }
}

/// Everything the admin socket and the background tasks share.
#[derive(Debug)]
pub struct Daemon {
    cfg: Config,
    mount: PathBuf,
    root: Cgroup,
    enforcer: EnforcerHandle,
    book: Arc<RwLock<RuleBook>>,
    slots: Mutex<SlotTable>,
    cgroups: AsyncMutex<BTreeMap<u64, Managed>>,
    events: broadcast::Sender<Arc<EventRecord>>,
    health: RwLock<Health>,
    errors: Mutex<BTreeMap<String, u64>>,
    reload_lock: AsyncMutex<()>,
    /// Taken by whoever enforces a cgroup listed under `enforce:` (the unit's `enforce-self`,
    /// the watcher of new cgroups, the start), so that one sees what the other did.
    configured_turn: AsyncMutex<()>,
    gc: Notify,
    identity: Arc<crate::identity::service::IdentityService>,
    /// The enrollment records as last written (see `save_enrollments`).
    persisted: AsyncMutex<crate::journal::Journaled>,
    /// Enrolled identities by cgroup id, for naming verdicts (kept by `save_enrollments` and
    /// `save_enrollments_of`, one of which runs after every change of an enrollment).
    identities: Identities,
    /// Cgroups enrolling agents were found in, by id (see `identity::CgroupNames`).
    cgroup_names: identity::CgroupNames,
    audit: crate::audit::sink::AuditHandle,
    /// Public key that verifies the audit checkpoints (hex).
    audit_node_key: String,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Names")
    }
}

/// Parses and compiles a policy directory, giving new policy names a slot (saved to
/// `slots_path` before anything refers to it).
pub(crate) fn compile_policies(
    dir: &std::path::Path,
    slots: &mut SlotTable,
    slots_path: &std::path::Path,
    (enroll_socket, admin_socket): (&std::path::Path, &std::path::Path),
) -> Result<Compiled, DaemonError> {
    let set = policy::load_dir(dir)?;
    let before = slots.clone();
    for p in &set.policies {
        slots.assign(&p.name)?;
    }
    if *slots != before {
        slots.save(slots_path)?;
    }
    let mut compiled = policy::compile(&set, |name| slots.get(name).unwrap_or(0))
        .map_err(|problems| policy::PolicyError { problems })?;
    // Agents renew their certificates and fetch tokens over the enrollment socket.
    compiled.allow_unix_everywhere(&enroll_socket.to_string_lossy(), "the enrollment socket");
    // A unit's `ExecStartPre=+agentwall enforce-self` asks from inside the unit's cgroup; the
    // admin socket answers only root and its admin group (peer credentials), as before.
    compiled.allow_unix_everywhere(&admin_socket.to_string_lossy(), "the admin socket");
    Ok(compiled)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Daemon {
    fn slots_path(&self) -> PathBuf {
        self.cfg.state_dir.join("slots.json")
    }

    pub fn count_error(&self, what: &str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(what.to_string()).or_default() += 1;
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.events.subscribe()
    }

    /// Parses and compiles the policy directory, assigning slots to new names.
    fn compile_dir(&self) -> Result<Compiled, DaemonError> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        compile_policies(
            &self.cfg.policy_dir,
            &mut slots,
            &self.slots_path(),
            (&self.cfg.enrollment.socket, &self.cfg.socket),
        )
    }

    /// Writes a compiled policy into the kernel and makes it the one in force.
    async fn install(&self, compiled: Compiled) -> Result<u32, DaemonError> {
        let compiled = Arc::new(compiled);
        let generation = self.enforcer.apply(Arc::clone(&compiled)).await?;
        {
            let mut book = self
                .book
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let old = std::mem::take(&mut *book);
            *book = RuleBook {
                generation,
                current: Arc::clone(&compiled),
                previous: Some((old.generation, old.current)),
            };
        }
        self.sync_modes(&compiled).await;
        Ok(generation)
    }

    /// Brings the audit flag of every binding in line with its policy's mode.
    async fn sync_modes(&self, compiled: &Compiled) {
        let Ok(bindings) = self.enforcer.bindings().await else {
            return;
        };
        let modes: Arc<HashMap<u32, Mode>> =
            Arc::new(compiled.policies.values().copied().collect());
        for (id, b) in bindings {
            // Each binding is changed as it is when the change lands, not as listed: a
            // revocation or an enrollment meanwhile stays (the listing is only which to visit).
            let m = Arc::clone(&modes);
            let r = self
                .enforcer
                .update(id, move |now| {
                    let audit = m.get(&now.slot) == Some(&Mode::Audit);
                    Binding {
                        flags: if audit {
                            now.flags | flags::AUDIT
                        } else {
                            now.flags & !flags::AUDIT
                        },
                        ..now
                    }
                })
                .await;
            if let Err(e) = r {
                tracing::error!(cgroup_id = id, error = %e, "cannot update a binding's mode");
                self.count_error("binding_update");
            }
            if b.slot != 0 && !modes.contains_key(&b.slot) {
                tracing::warn!(
                    cgroup_id = id,
                    slot = b.slot,
                    "a bound cgroup's policy no longer exists; it is denied everything"
                );
            }
        }
    }

    /// A fresh audit key: written first into the key file (the old ones stay below it), then
    /// used for every record from now on, in a new segment.
    pub async fn rotate_audit_key(self: &Arc<Self>) -> Result<KeyRotated, AdminError> {
        if std::env::var_os(crate::audit::keys::KEY_ENV).is_some() {
            return Err(AdminError::KeyFromEnvironment(crate::audit::keys::KEY_ENV));
        }
        let d = Arc::clone(self);
        let r = tokio::task::spawn_blocking(move || {
            let path = &d.cfg.audit.key_file;
            let key = crate::audit::keys::rotate_key_file(path).map_err(|e| e.to_string())?;
            d.audit.switch_key(key).map_err(|e| {
                format!(
                    "{e}; {} already holds the new key first: the daemon writes under it from \
                     its next start",
                    path.display()
                )
            })
        })
        .await;
        match r {
            Ok(Ok((from, to))) => Ok(KeyRotated {
                from,
                to,
                key_file: self.cfg.audit.key_file.clone(),
            }),
            Ok(Err(message)) => {
                self.count_error("audit_key_rotation");
                Err(AdminError::KeyRotation(message))
            }
            Err(e) => Err(AdminError::KeyRotation(format!("audit key rotation: {e}"))),
        }
    }

    pub async fn reload(&self) -> Result<Reloaded, AdminError> {
        let _guard = self.reload_lock.lock().await;
        let result = async {
            let compiled = self.compile_dir()?;
            let (policies, nodes) = (compiled.policies.len(), compiled.nodes.len());
            let generation = self.install(compiled).await?;
            Ok::<_, DaemonError>((generation, policies, nodes))
        }
        .await;
        match result {
            Ok((generation, policies, rule_nodes)) => {
                tracing::info!(generation, policies, rule_nodes, "policies reloaded");
                self.audit
                    .record(&crate::audit::schema::AuditRecord::PolicyLoaded {
                        generation,
                        policies,
                        dir: self.cfg.policy_dir.display().to_string(),
                        dir_sha256: policy::dir_hash(&self.cfg.policy_dir),
                    });
                Ok(Reloaded {
                    generation,
                    policies,
                    rule_nodes,
                })
            }
            Err(e) => {
                self.count_error("reload_rejected");
                tracing::error!(error = %e, "reload rejected; the policy in force is unchanged");
                self.audit
                    .record(&crate::audit::schema::AuditRecord::ReloadRejected {
                        error: e.to_string(),
                        dir: self.cfg.policy_dir.display().to_string(),
                        dir_sha256: policy::dir_hash(&self.cfg.policy_dir),
                    });
                Err(AdminError::ReloadRejected(Box::new(e)))
            }
        }
    }

    /// Attaches the programs to a cgroup the configuration lists under `enforce:` and binds it
    /// to its policy; a cgroup that held that path before (the unit's previous run) is let go.
    /// Returns its id, and whether it was not enforced before this call.
    pub(super) async fn enforce_configured(
        &self,
        e: &crate::config::EnforceEntry,
    ) -> Result<(u64, bool), DaemonError> {
        let _turn = self.configured_turn.lock().await;
        let cg = Cgroup::under(&self.mount, &e.cgroup)?;
        let Some(b) = self.binding_for(&e.policy) else {
            // Fail closed: with the programs attached and no binding, the cgroup is denied
            // everything until its policy is in force (the watcher tries again each second).
            if cg.exists() {
                self.enforcer.attach(cg.clone()).await?;
            }
            return Err(policy::PolicyError {
                problems: vec![policy::Problem {
                    file: PathBuf::from("config"),
                    line: None,
                    field: "enforce.policy".into(),
                    message: format!(
                        "no policy named {:?} for cgroup {}; it is denied everything until there is",
                        e.policy, e.cgroup
                    ),
                }],
            }
            .into());
        };
        // The id attached, not one read before: the unit may have restarted in between.
        let id = self.enforcer.attach(cg.clone()).await?;
        // Enforced already (its `enforce-self` and the watcher both came): nothing to change,
        // and above all its binding stays as it is (a quarantine on it holds).
        let (known, carried) = {
            let registry = self.cgroups.lock().await;
            let known = registry
                .get(&id)
                .is_some_and(|m| m.kind == Kind::Configured);
            // A quarantine of the unit's previous cgroup at this path holds for the new one:
            // a restart is no way out of it.
            let carried = registry.values().any(|m| {
                m.kind == Kind::Configured && m.cgroup.path() == cg.path() && m.quarantined
            });
            (known, carried)
        };
        if known {
            return Ok((id, false));
        }
        let hold = self
            .audit
            .state
            .failing
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.cfg.audit.when_down == crate::config::WhenDown::Deny;
        // What the kernel holds for this cgroup already (a quarantine, a revocation or a hold
        // a previous daemon set) stays, as at an enrollment.
        let quarantined = self
            .enforcer
            .rebind(id, move |old| Binding {
                flags: b.flags
                    | old.map_or(0, |o| {
                        o.flags & (flags::DENY_ALL | flags::AUDIT_HOLD | flags::REVOKED)
                    })
                    | if carried { flags::DENY_ALL } else { 0 }
                    | if hold { flags::AUDIT_HOLD } else { 0 },
                ..b
            })
            .await?
            .is_some_and(|o| o.flags & flags::DENY_ALL != 0)
            || carried;
        let earlier: Vec<u64> = {
            let mut registry = self.cgroups.lock().await;
            let earlier = registry
                .iter()
                .filter(|(old, m)| {
                    **old != id && m.kind == Kind::Configured && m.cgroup.path() == cg.path()
                })
                .map(|(old, _)| *old)
                .collect();
            let mut m = Managed::new(cg, Some(e.policy.clone()), Kind::Configured);
            m.quarantined = quarantined;
            registry.insert(id, m);
            for old in &earlier {
                registry.remove(old);
            }
            earlier
        };
        for old in earlier {
            // The old cgroup is gone with the unit's previous run; its programs and binding go.
            if self.enforcer.unbind(old).await.is_err() || self.enforcer.detach(old).await.is_err()
            {
                self.count_error("unbind");
            }
        }
        Ok((id, true))
    }

    /// Whether process `pid` runs in a cgroup agentwall confines (the managed subtree, or a
    /// configured `enforce:` cgroup or below): such a peer reaches the admin socket only for
    /// `enforce-self` (the Unix hooks let every enforced cgroup reach it, for units'
    /// `ExecStartPre=+`). Unreadable counts as confined.
    pub fn peer_confined(&self, pid: i32) -> bool {
        let Some(rel) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
        else {
            return true;
        };
        let own = self.mount.join(rel.trim_start_matches('/'));
        own.starts_with(self.root.path())
            || self
                .cfg
                .enforce
                .iter()
                .any(|e| own.starts_with(self.mount.join(e.cgroup.trim_start_matches('/'))))
    }

    /// `enforce_self`: enforces the cgroup of process `pid` (the caller) if the configuration
    /// lists it under `enforce:`.
    pub async fn enforce_self(&self, pid: i32) -> Result<SelfEnforced, AdminError> {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            });
        let Some(path) = own else {
            return Err(AdminError::PeerCgroup(pid));
        };
        let rel = path.trim_start_matches('/');
        let Some(e) = self
            .cfg
            .enforce
            .iter()
            .find(|e| e.cgroup.trim_start_matches('/') == rel)
            .cloned()
        else {
            return Err(AdminError::NotConfigured(rel.to_string()));
        };
        match self.enforce_configured(&e).await {
            Ok((id, _)) => {
                tracing::info!(cgroup = rel, cgroup_id = id, policy = %e.policy, "a configured cgroup enforced at its caller's request");
                Ok(SelfEnforced {
                    cgroup: rel.to_string(),
                    cgroup_id: id,
                    policy: e.policy,
                })
            }
            Err(error) => {
                self.count_error("enforce_self");
                Err(AdminError::Enforce {
                    cgroup: rel.to_string(),
                    error: Box::new(error),
                })
            }
        }
    }

    fn binding_for(&self, policy: &str) -> Option<Binding> {
        let book = self
            .book
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (slot, mode) = *book.current.policies.get(policy)?;
        let f = if mode == Mode::Audit { flags::AUDIT } else { 0 };
        Some(Binding {
            slot,
            flags: f,
            expires_boot_ns: 0,
        })
    }

    fn policy_names(&self) -> Vec<String> {
        let book = self
            .book
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        book.current.policies.keys().cloned().collect()
    }

    /// The daemon's files a root agent must not reach, and the host uid its root is mapped to
    /// (see `spawn::Confinement`).
    fn protect(&self, root_uid: Option<u32>) -> control::Protect {
        let show = |p: &std::path::Path| p.display().to_string();
        // What the agent needs stays visible: its own directory and the enrollment socket
        // (a configuration may put them under the state directory).
        let needed = [
            self.cfg.identity.agent_dir.as_path(),
            self.cfg.enrollment.socket.as_path(),
        ];
        let hide = [
            self.cfg.state_dir.clone(),
            self.cfg.pin_dir.clone(),
            self.cfg.audit_dir(),
        ];
        control::Protect {
            hide_dirs: hide
                .iter()
                .filter(|d| !needed.iter().any(|n| n.starts_with(d)))
                .map(|d| show(d))
                .collect(),
            hide_files: vec![show(&self.cfg.audit.key_file)],
            read_only: vec![show(&self.mount)],
            root_uid,
        }
    }

    /// Creates and binds a cgroup for `agentwall exec`. Returns the reply and, on success, the
    /// cgroup id whose lease the caller holds.
    pub async fn exec_begin(
        &self,
        policy: Option<&str>,
        audience: Vec<String>,
    ) -> (Reply, Option<u64>) {
        let binding = match policy {
            None => None,
            Some(policy) => match self.binding_for(policy) {
                Some(b) => Some(b),
                None => {
                    let known = self.policy_names().join(", ");
                    return (
                        Reply::Error {
                            message: format!(
                                "no policy named {policy:?} is loaded (loaded: {known})"
                            ),
                        },
                        None,
                    );
                }
            },
        };
        let seq = crate::clock::boot_ns();
        let cg = self.root.child(&format!("{EXEC_PREFIX}{seq:x}"));
        let result = async {
            cg.create()?;
            let id = cg.id()?;
            // Bound before the reply: the command's first instruction runs under its policy.
            // Without a policy the cgroup stays unbound, which denies everything, until a
            // process in it enrolls.
            if let Some(binding) = binding
                && let Err(e) = self.enforcer.bind(id, binding).await
            {
                let _ = cg.remove_tree();
                return Err(DaemonError::from(e));
            }
            let agent_dir = match binding {
                Some(_) => None,
                None => match self.identity_agent_dir(id) {
                    Ok(dir) => Some(dir),
                    Err(e) => {
                        let _ = cg.remove_tree();
                        return Err(e);
                    }
                },
            };
            Ok((id, agent_dir))
        }
        .await;
        match result {
            Ok((id, agent_dir)) => {
                let mut m = Managed::new(cg.clone(), policy.map(str::to_string), Kind::Exec);
                m.leased = true;
                m.agent_dir.clone_from(&agent_dir);
                m.audience = audience;
                let mut registry = self.cgroups.lock().await;
                let used = registry.values().filter_map(|m| m.root_uid).collect();
                m.root_uid = self.cfg.exec.root_uids.pick(&used, seq);
                if let Some(uid) = m.root_uid
                    && let Err(e) = RootUids::record(&cg, uid)
                {
                    // Unrecorded, a restarted daemon could hand the uid out twice: no root.
                    tracing::error!(cgroup = %cg.path().display(), error = %e, "cannot note the root uid on the exec cgroup; a command of this cgroup cannot run as root");
                    self.count_error("root_uid_note");
                    m.root_uid = None;
                } else if m.root_uid.is_none() {
                    // The command can still run, unless it runs as root: the launcher then
                    // refuses it (or runs it with `--keep-privileges`, if asked).
                    tracing::warn!(
                        count = self.cfg.exec.root_uids.count,
                        "every uid of exec.root_uids is in use; a command of this cgroup cannot run as root"
                    );
                    self.count_error("root_uids_exhausted");
                }
                let root_uid = m.root_uid;
                registry.insert(id, m);
                drop(registry);
                tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, policy, "exec cgroup ready");
                let enroll = agent_dir.map(|d| control::ExecEnroll {
                    agent_dir: d.display().to_string(),
                    bundle_pem: self.identity.bundle_pem().to_string(),
                    socket: self.cfg.enrollment.socket.display().to_string(),
                });
                (
                    Reply::ExecReady {
                        cgroup: cg.path().display().to_string(),
                        cgroup_id: id,
                        enroll,
                        protect: self.protect(root_uid),
                    },
                    Some(id),
                )
            }
            Err(e) => {
                self.count_error("exec_begin");
                (
                    Reply::Error {
                        message: format!(
                            "cannot prepare a cgroup for {}: {e}",
                            policy.map_or("enrollment".to_string(), |p| format!("policy {p:?}"))
                        ),
                    },
                    None,
                )
            }
        }
    }

    pub async fn exec_end(&self, id: u64) {
        if let Some(m) = self.cgroups.lock().await.get_mut(&id) {
            m.leased = false;
        }
        self.gc.notify_one();
    }

    /// Removes exec cgroups whose lease ended and that hold no process.
    async fn collect(&self) {
        let candidates: Vec<(u64, Cgroup)> = self
            .cgroups
            .lock()
            .await
            .iter()
            .filter(|(_, m)| m.kind == Kind::Exec && !m.leased)
            .map(|(id, m)| (*id, m.cgroup.clone()))
            .collect();
        for (id, cg) in candidates {
            if cg.exists() && cg.populated().unwrap_or(true) {
                continue;
            }
            if let Err(e) = cg.remove_tree() {
                tracing::debug!(cgroup = %cg.path().display(), error = %e, "exec cgroup not removable yet");
                continue;
            }
            if let Err(e) = self.enforcer.unbind(id).await {
                tracing::error!(cgroup_id = id, error = %e, "cannot remove the binding of a removed cgroup");
                self.count_error("unbind");
                continue;
            }
            let gone = self.cgroups.lock().await.remove(&id);
            if let Some(dir) = gone.and_then(|m| m.agent_dir) {
                let _ = std::fs::remove_dir_all(dir);
            }
            self.save_enrollments().await;
            tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, "exec cgroup removed");
        }
        // Enrolled cgroups elsewhere are not ours to remove; once their owner removed them,
        // their binding and links go (a new cgroup never reuses the id: it is the inode).
        let gone: Vec<u64> = self
            .cgroups
            .lock()
            .await
            .iter()
            .filter(|(_, m)| m.kind == Kind::Enrolled && !m.cgroup.exists())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let result = async {
                self.enforcer.unbind(id).await?;
                self.enforcer.detach(id).await?;
                Ok::<_, DaemonError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::error!(cgroup_id = id, error = %e, "cannot release a removed enrolled cgroup");
                self.count_error("unbind");
                continue;
            }
            self.cgroups.lock().await.remove(&id);
            self.save_enrollments().await;
            tracing::info!(cgroup_id = id, "enrolled cgroup removed; its binding ended");
        }
    }

    fn resolve_cgroup(&self, spec: &str) -> Result<u64, String> {
        if let Some(id) = spec
            .strip_prefix("id:")
            .or_else(|| spec.parse::<u64>().ok().map(|_| spec))
        {
            return id
                .parse()
                .map_err(|_| format!("{spec:?} is not a cgroup id"));
        }
        // An absolute path must lie below the mount; either way no `..` may lead out of it.
        let path = std::path::Path::new(spec);
        let rel = match path.strip_prefix(&self.mount) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => spec.to_string(),
        };
        let cg = Cgroup::under(&self.mount, &rel).map_err(|e| e.to_string())?;
        cg.id().map_err(|e| e.to_string())
    }

    pub async fn quarantine(&self, spec: &str, lift: bool) -> Result<Quarantined, AdminError> {
        let id = self
            .resolve_cgroup(spec)
            .map_err(AdminError::NoSuchCgroup)?;
        // The flag is set on the binding as it is when the change lands: a revocation or an
        // enrollment meanwhile stays.
        let changed = self
            .enforcer
            .update(id, move |now| Binding {
                flags: if lift {
                    now.flags & !flags::DENY_ALL
                } else {
                    now.flags | flags::DENY_ALL
                },
                ..now
            })
            .await;
        match changed {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(AdminError::NotBound {
                    spec: spec.to_string(),
                    id,
                });
            }
            Err(e) => {
                self.count_error("quarantine");
                return Err(AdminError::Kernel(e.to_string()));
            }
        }
        // In the kernel: the rest runs at normal priority (see `sched::step_down`).
        let _down = crate::sched::step_down();
        if let Some(m) = self.cgroups.lock().await.get_mut(&id) {
            m.quarantined = !lift;
        }
        let destroyed = if lift {
            None
        } else {
            Some(self.destroy_sockets([id].into()).await)
        };
        tracing::info!(cgroup_id = id, lift, ?destroyed, "quarantine changed");
        let sockets_destroyed = destroyed.map_or(0, |d| d.sockets);
        self.audit
            .record(&crate::audit::schema::AuditRecord::Quarantine {
                cgroup_id: id,
                lift,
                sockets_destroyed,
            });
        Ok(Quarantined {
            cgroup_id: id,
            lift,
            sockets_destroyed,
        })
    }

    pub async fn status(&self) -> Reply {
        let (generation, rule_nodes) = self.enforcer.rule_state().await.unwrap_or_default();
        let kernel_counters = self.enforcer.counters().await.unwrap_or_default();
        let mut protections = match self.enforcer.task_hooks().await {
            Ok(crate::enforce::TaskHooks::Active) => control::Protections {
                task_hooks: true,
                ..Default::default()
            },
            Ok(crate::enforce::TaskHooks::Missing(why)) => control::Protections {
                missing: vec![format!(
                    "task-scoped hooks: sockets made outside an enforced cgroup and used inside it are not judged: {why}"
                )],
                ..Default::default()
            },
            Err(e) => control::Protections {
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
        let policies = {
            let book = self
                .book
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            book.current
                .policies
                .iter()
                .map(|(name, (slot, mode))| PolicyStatus {
                    name: name.clone(),
                    slot: *slot,
                    mode: *mode,
                    rules: book
                        .current
                        .rules
                        .iter()
                        .filter(|r| &r.policy == name)
                        .count(),
                })
                .collect()
        };
        let cgroups = self
            .cgroups
            .lock()
            .await
            .iter()
            .map(|(id, m)| CgroupStatus {
                id: *id,
                path: m.cgroup.path().display().to_string(),
                policy: m.policy.clone(),
                kind: match m.kind {
                    Kind::Exec => "exec".into(),
                    Kind::Configured => "configured".into(),
                    Kind::Enrolled => "enrolled".into(),
                },
                quarantined: m.quarantined,
                leased: m.leased,
                spiffe_id: m.bound.as_ref().map(|b| b.spiffe_id.clone()),
                serial: m.bound.as_ref().map(|b| b.serial.clone()),
                expires_at: m.bound.as_ref().map(|b| b.expires_at()),
                revoked: m.bound.as_ref().is_some_and(|b| b.revoked),
            })
            .collect();
        Reply::Status(Box::new(Status {
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
            audit: {
                use std::sync::atomic::Ordering::Relaxed;
                let a = &self.audit.state;
                control::AuditStatus {
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
                    event_to_durable: control::LatencyStatus {
                        count: a.event_to_durable.count(),
                        p50_us: a.event_to_durable.quantile(0.5),
                        p99_us: a.event_to_durable.quantile(0.99),
                        max_us: a.event_to_durable.max(),
                    },
                    sinks: a
                        .sinks
                        .iter()
                        .map(|(n, s)| {
                            (
                                (*n).to_owned(),
                                control::SinkStatus {
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
        }))
    }

    /// Brings the registry in line with what the kernel and the cgroup tree hold after a
    /// restart: adopts exec cgroups of the previous daemon, drops bindings and link pins of
    /// cgroups that are gone.
    async fn reconcile(&self) -> Result<(), DaemonError> {
        let records = self.load_enrollments().await;
        let mut by_id: HashMap<u64, Cgroup> = HashMap::new();
        for child in self.root.children()? {
            let name = child
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with(EXEC_PREFIX)
                && let Ok(id) = child.id()
            {
                by_id.insert(id, child);
            }
        }
        let root_id = self.root.id()?;
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let bindings = self
            .enforcer
            .bindings()
            .await
            .map_err(crate::enforce::actor::CallError::from)?;
        let mut registry = self.cgroups.lock().await;
        let configured: Vec<u64> = registry.keys().copied().collect();
        // Identities revoked in the kernel or in their record: (SPIFFE ID, serial, cgroup).
        let mut revoked = Vec::new();
        for (id, b) in &bindings {
            if configured.contains(id) {
                continue;
            }
            let record = records.iter().find(|r| r.cgroup_id == *id);
            let enrolled = record
                .filter(|r| r.kind == Kind::Enrolled)
                .map(|r| Cgroup::at(PathBuf::from(&r.cgroup)))
                .filter(|cg| cg.id().ok() == Some(*id));
            match by_id.remove(id).or(enrolled) {
                Some(cg)
                    if b.expires_boot_ns != 0
                        && record.and_then(|r| r.bound.as_ref()).is_none() =>
                {
                    // Only an identity's binding expires. The previous daemon died between
                    // binding the cgroup and writing its record: an identity this daemon cannot
                    // name it could not revoke, so the binding goes (the cgroup denies
                    // everything) until the agent enrolls again.
                    tracing::error!(cgroup = %cg.path().display(), cgroup_id = id, "a cgroup is bound to an identity that no enrollment record names; its binding is removed until its agent enrolls again");
                    self.count_error("enrollment_unknown");
                    self.enforcer.unbind(*id).await?;
                    let kind = record.map_or(Kind::Exec, |r| r.kind);
                    let mut m = Managed::new(cg, None, kind);
                    if let Some(r) = record {
                        m.agent_dir.clone_from(&r.agent_dir);
                        m.audience.clone_from(&r.audience);
                    }
                    registry.insert(*id, m);
                }
                Some(cg) => {
                    tracing::info!(cgroup = %cg.path().display(), cgroup_id = id, "adopted a cgroup of the previous daemon");
                    let kind = record.map_or(Kind::Exec, |r| r.kind);
                    let mut m = Managed::new(cg, slots.name_of(b.slot).map(str::to_string), kind);
                    m.quarantined = b.flags & flags::DENY_ALL != 0;
                    if let Some(r) = record {
                        m.bound.clone_from(&r.bound);
                        m.agent_dir.clone_from(&r.agent_dir);
                        m.audience.clone_from(&r.audience);
                    }
                    if let Some(bound) = m.bound.as_mut() {
                        let flagged = b.flags & flags::REVOKED != 0;
                        if bound.revoked || flagged {
                            revoked.push((bound.spiffe_id.clone(), bound.serial.clone(), *id));
                        }
                        // What the kernel holds, not what the record says: a binding the list
                        // covers but the kernel does not flag is flagged again below.
                        bound.revoked = flagged;
                    }
                    registry.insert(*id, m);
                }
                None => {
                    tracing::info!(
                        cgroup_id = id,
                        "dropping the binding of a cgroup that no longer exists"
                    );
                    self.enforcer.unbind(*id).await?;
                }
            }
        }
        // Exec cgroups without a binding: nothing may run there (no binding means deny);
        // collect them once empty.
        for (id, cg) in by_id {
            let mut m = Managed::new(cg, None, Kind::Exec);
            m.agent_dir = records
                .iter()
                .find(|r| r.cgroup_id == id)
                .and_then(|r| r.agent_dir.clone());
            registry.insert(id, m);
        }
        // The uids the previous daemon gave root commands are taken until their cgroups go.
        for m in registry.values_mut().filter(|m| m.kind == Kind::Exec) {
            m.root_uid = self.cfg.exec.root_uids.handed_to(&m.cgroup);
        }
        let live: HashMap<u64, Cgroup> = registry
            .iter()
            .map(|(id, m)| (*id, m.cgroup.clone()))
            .collect();
        drop(registry);
        self.recover_revocations(revoked).await;
        self.save_enrollments().await;
        let _ = self.enforce_revocations().await;
        for id in self
            .enforcer
            .linked_cgroups()
            .await
            .map_err(crate::enforce::actor::CallError::from)?
        {
            match live.get(&id) {
                None if id != root_id => self.enforcer.detach(id).await?,
                None => {}
                // An adopted cgroup with links of its own runs the programs of the daemon that
                // attached them, which may lack some (the Unix hooks, say): this daemon's
                // replace them, pinned before the old ones go. Attached already: a no-op.
                // On failure the old links stay, and enforce what they did.
                Some(cg) => {
                    if let Err(e) = self.enforcer.attach(cg.clone()).await {
                        tracing::error!(cgroup = %cg.path().display(), error = %e, "cannot attach this daemon's programs to an adopted cgroup; the previous daemon's stay");
                        self.count_error("reattach");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod names_tests {
    use super::IdentityNames;
    use std::collections::HashMap;

    #[test]
    fn a_cgroup_that_loses_its_binding_stays_named_for_its_pending_events() {
        let mut n = IdentityNames::default();
        n.replace(HashMap::from([(7, "spiffe://d/a".to_string())]));
        assert_eq!(n.get(7).map(String::as_str), Some("spiffe://d/a"));
        n.replace(HashMap::new());
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/a"),
            "in grace"
        );
        n.replace(HashMap::from([(7, "spiffe://d/b".to_string())]));
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/b"),
            "bound again"
        );
        assert_eq!(n.get(8), None);
        // One cgroup at a time, as a save of one enrollment does.
        n.set(8, Some("spiffe://d/c".into()));
        n.set(7, None);
        assert_eq!(n.get(8).map(String::as_str), Some("spiffe://d/c"));
        assert_eq!(
            n.get(7).map(String::as_str),
            Some("spiffe://d/b"),
            "in grace after set(None)"
        );
        n.set(7, Some("spiffe://d/a".into()));
        assert_eq!(n.get(7).map(String::as_str), Some("spiffe://d/a"));
    }
}
