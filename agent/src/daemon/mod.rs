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

mod admin;
mod audit;
mod configured;
mod decisions;
mod dns;
mod enrollments;
mod exec;
pub mod fleet;
mod identity;
mod names;
mod policies;
mod policy_watch;
mod reconcile;
mod registry;
mod run;
mod secrets;
pub mod status;
mod units;

pub use self::admin::{
    AdminError, Checked, KeyRotated, Quarantined, Reloaded, Revoked, Rotated, SelfEnforced,
};
pub use self::audit::AuditStartError;
pub use self::decisions::{CallerRef, Decided};
pub use self::exec::{ExecEnroll, ExecReady, ExecWorkload, Protect};
pub use self::identity::ExecIdentityError;
pub(crate) use self::identity::{Caller, Entitled, Issue, WorkloadRefusal, X509Svid};
use self::names::Names;
use self::status::Health;
use self::{
    enrollments::Enrollments,
    policies::Policies,
    registry::{Kind, Managed, Registry},
};

pub use self::run::{Frontends, run};
pub use self::secrets::{
    ExecSecret, ExecSecrets, FetchRefused, Leased, SecretAsker, SecretKeyRotated, SecretStored,
};
use crate::{
    cgroup::{self, Cgroup},
    config::Config,
    enforce::actor::EnforcerHandle,
    events::{EventRecord, Resolve},
    policy::{self, Compiled, Mode},
    probe,
    rootuid::RootUids,
};

/// Prefix of the cgroups `agentwall exec` creates below the managed root.
const EXEC_PREFIX: &str = "exec-";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Compile(#[from] policies::CompileError),
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
    Listen(#[from] crate::unixsock::ListenError),
    #[error("enrollment socket {}: {source}", path.display())]
    EnrollSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Frontend(Box<dyn std::error::Error + Send + Sync>),
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
    Audit(#[from] AuditStartError),
    #[error("fleet.policy_keys: {path}: {message}")]
    FleetKey { path: PathBuf, message: String },
}

/// Everything the admin socket and the background tasks share.
#[derive(Debug)]
pub struct Daemon {
    cfg: Config,
    mount: PathBuf,
    root: Cgroup,
    enforcer: EnforcerHandle,
    policies: Arc<Policies>,
    /// The cgroups the daemon manages.
    registry: Registry,
    events: broadcast::Sender<Arc<EventRecord>>,
    health: RwLock<Health>,
    errors: ErrorCounts,
    /// Taken by whoever enforces a cgroup listed under `enforce:` (the unit's `enforce-self`,
    /// the watcher of new cgroups, the start), so that one sees what the other did.
    configured_turn: AsyncMutex<()>,
    gc: Notify,
    identity: Arc<crate::identity::service::IdentityService>,
    /// The enrollment records and the names verdicts get from them.
    enrollments: Enrollments,
    audit: crate::audit::sink::AuditHandle,
    /// Public key that verifies the audit checkpoints (hex).
    audit_node_key: String,
    /// The X509-SVIDs the Workload API hands out, keys in memory only.
    svids: identity::Svids,
    /// Refusals of the Workload API recorded per uid.
    workload_refusals: identity::RefusalBudget,
    /// Rate-limit buckets of the decision API, per caller and rule.
    decision_buckets: decisions::DecisionBuckets,
    /// Budgets of the decision API's audit records, per asker.
    decision_records: decisions::RecordBudget,
    /// The addresses of the catalog's host names.
    dns: Arc<dns::Dns>,
    /// The kernel holds older answers than the DNS service: write them again.
    names_stale: std::sync::atomic::AtomicBool,
    /// Revocations shared with the fleet (`fleet`).
    fleet: fleet::FleetState,
    /// The secret store, opened on first use (`secrets`).
    secrets: secrets::Secrets,
}

/// The daemon's error counters by name, shown in status and metrics. Shared with work that
/// outlives the call that started it (see `Daemon::destroy_sockets`).
type ErrorCounts = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(errors: &ErrorCounts, what: &str) {
    if let Ok(mut e) = errors.lock() {
        *e.entry(what.to_string()).or_default() += 1;
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Daemon {
    /// Where the cgroup v2 file system is mounted.
    pub fn mount(&self) -> &std::path::Path {
        &self.mount
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn count_error(&self, what: &str) {
        count(&self.errors, what);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.events.subscribe()
    }

    /// Writes a compiled policy into the kernel and makes it the one in force.
    async fn install(
        &self,
        compiled: Compiled,
        set: Arc<policy::PolicySet>,
    ) -> Result<u32, DaemonError> {
        let compiled = Arc::new(compiled);
        let generation = self.enforcer.apply(Arc::clone(&compiled)).await?;
        self.policies
            .put_in_force(generation, Arc::clone(&compiled), set);
        self.sync_modes(&compiled).await;
        Ok(generation)
    }

    /// Asks, all at once, for the host names of `set` that are due (all of them, the first
    /// time); a name that cannot be resolved is logged and counted, and grants nothing once
    /// its last answer expires. Whether an answer brought a new address or a later expiry.
    async fn resolve_names(&self, set: &policy::PolicySet) -> bool {
        let wanted = policy::host_names(set);
        let mut lookups = tokio::task::JoinSet::new();
        for name in self.dns.due(&wanted) {
            let dns = Arc::clone(&self.dns);
            lookups.spawn(async move { dns.resolve(&name).await });
        }
        let mut changed = false;
        while let Some(r) = lookups.join_next().await {
            match r {
                Ok(Ok(c)) => changed |= c,
                Ok(Err(e)) => {
                    if let dns::DnsError::Refused { changed: c, .. } = &e {
                        changed |= c;
                        self.count_error("dns_refused");
                    } else {
                        self.count_error("dns_lookup");
                    }
                    tracing::warn!(error = %e, "a host name of the services catalog did not resolve to what it may grant; its last answer stands until it expires");
                }
                Err(e) => {
                    self.count_error("dns_lookup");
                    tracing::error!(error = %e, "a DNS lookup task failed");
                }
            }
        }
        changed
    }

    /// Compiles `set` with the host names' answers in force; if the answers make it fail
    /// (a node with too many entries), without them: the names then grant nothing, and the
    /// failure is counted. Content of DNS never stops a valid directory from loading.
    fn compile_with_names(&self, set: &policy::PolicySet) -> Result<Compiled, DaemonError> {
        let (resolved, _) = self.dns.resolved();
        match self.policies.compile(set, &resolved) {
            Ok(c) => Ok(c),
            Err(e) if resolved.values().any(|a| !a.is_empty()) => {
                self.count_error("dns_apply");
                tracing::error!(error = %e, "the addresses of host names do not fit the policy; the names grant nothing until they do");
                Ok(self
                    .policies
                    .compile(set, &policy::compile::Resolved::new())?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Asks again for the names due, and writes the policy in force again when an answer
    /// brought a new address or a later expiry, or an address expired; returns how long until
    /// the next such event.
    pub(crate) async fn refresh_names(&self) -> std::time::Duration {
        const MOST: std::time::Duration = std::time::Duration::from_secs(30);
        const RETRY: std::time::Duration = std::time::Duration::from_secs(1);
        let Some(set) = self.policies.set_in_force() else {
            return MOST;
        };
        if policy::host_names(&set).is_empty() {
            return MOST;
        }
        let changed = self.resolve_names(&set).await;
        let (_, expired) = self.dns.resolved();
        if changed || expired || self.names_stale.load(std::sync::atomic::Ordering::Relaxed) {
            // Under the reload turn, with the set in force then and the answers known then:
            // a reload in between installed its own, maybe older, answers.
            let _turn = self.policies.reload_turn().await;
            let Some(set) = self.policies.set_in_force() else {
                return MOST;
            };
            self.dns.retain(&policy::host_names(&set));
            let r = async {
                let compiled = self.compile_with_names(&set)?;
                self.install(compiled, Arc::clone(&set)).await
            }
            .await;
            match r {
                Ok(generation) => {
                    self.names_stale
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(generation, "host names followed: new addresses in force");
                }
                Err(e) => {
                    // Tried again soon; meanwhile the kernel closes old answers at their
                    // expiry.
                    self.names_stale
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.count_error("dns_apply");
                    tracing::error!(error = %e, "cannot write the addresses of host names");
                    return RETRY;
                }
            }
        }
        self.dns.next_event(MOST)
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
            let key = crate::audit::keys::rotate_key_file(path).map_err(AdminError::KeyFile)?;
            d.audit
                .switch_key(key)
                .map_err(|error| AdminError::KeySwitch {
                    error,
                    key_file: path.clone(),
                })
        })
        .await;
        match r {
            Ok(Ok((from, to))) => Ok(KeyRotated {
                from,
                to,
                key_file: self.cfg.audit.key_file.clone(),
            }),
            Ok(Err(e)) => {
                self.count_error("audit_key_rotation");
                Err(e)
            }
            Err(e) => Err(AdminError::KeyRotationTask(e)),
        }
    }

    pub async fn reload(&self) -> Result<Reloaded, AdminError> {
        let _turn = self.policies.reload_turn().await;
        let result = async {
            let set = Arc::new(self.policies.load()?);
            self.resolve_names(&set).await;
            let compiled = self.compile_with_names(&set)?;
            let (policies, nodes) = (compiled.policies.len(), compiled.nodes.len());
            let generation = self.install(compiled, set).await?;
            Ok::<_, DaemonError>((generation, policies, nodes))
        }
        .await;
        // The parse trees of the directory are gone either way: their pages go back.
        tokio::task::spawn_blocking(crate::memory::release_free);
        match result {
            Ok((generation, policies, rule_nodes)) => {
                tracing::info!(generation, policies, rule_nodes, "policies reloaded");
                self.audit
                    .record(&crate::audit::schema::AuditRecord::PolicyLoaded {
                        generation,
                        policies,
                        dir: self.policies.source_label(),
                        dir_sha256: self.policies.source_hash(),
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
                        dir: self.policies.source_label(),
                        dir_sha256: self.policies.source_hash(),
                    });
                Err(AdminError::ReloadRejected(Box::new(e)))
            }
        }
    }

    /// The cgroup an operator names: `id:N`, a bare id, or a path below the cgroup mount.
    fn resolve_cgroup(&self, spec: &str) -> Result<u64, AdminError> {
        if let Some(id) = spec
            .strip_prefix("id:")
            .or_else(|| spec.parse::<u64>().ok().map(|_| spec))
        {
            return id
                .parse()
                .map_err(|_| AdminError::NotACgroupId(spec.to_string()));
        }
        // An absolute path must lie below the mount; either way no `..` may lead out of it.
        let path = std::path::Path::new(spec);
        let rel = match path.strip_prefix(&self.mount) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => spec.to_string(),
        };
        let cg = Cgroup::under(&self.mount, &rel)?;
        Ok(cg.id()?)
    }

    pub async fn quarantine(&self, spec: &str, lift: bool) -> Result<Quarantined, AdminError> {
        let id = self.resolve_cgroup(spec)?;
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
        self.registry.set_quarantined(id, !lift).await;
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
}
