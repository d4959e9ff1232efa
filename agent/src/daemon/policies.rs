//! The policies service: the rule book in force (and the one before it, whose rules events
//! may still name), the slot table that gives each policy name its identity slot, and the
//! turn a reload takes. It owns that state; the rest of the daemon asks it by name or slot.
//!
//! Writing a compiled book into the kernel is the daemon's (`Daemon::install`): this service
//! only compiles, and swaps the book once the kernel holds it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use agentwall_common::binding::{Binding, flags};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard};

use crate::{
    config::Config,
    daemon::status::PolicyStatus,
    policy::{self, Compiled, Grant, Mode},
    spiffe::SpiffeId,
    state::{SlotTable, StateError},
};

/// Why a policy directory did not compile; nothing of it is in force.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Slots(#[from] StateError),
}

/// The compiled policy in force and the one before it.
#[derive(Debug, Default)]
struct RuleBook {
    generation: u32,
    current: Arc<Compiled>,
    /// The policy set `current` was compiled from (compiled again as host names change).
    set: Option<Arc<policy::PolicySet>>,
    previous: Option<(u32, Arc<Compiled>)>,
}

/// Where the policies come from.
#[derive(Debug)]
enum Source {
    /// The policy directory.
    Dir,
    /// The fleet's signed bundle in force (none yet: no policy, every enforced cgroup denied).
    Bundle(Mutex<Option<Arc<crate::fleet::BundlePayload>>>),
}

#[derive(Debug)]
pub(crate) struct Policies {
    dir: PathBuf,
    source: Source,
    slots_path: PathBuf,
    /// The enrollment, the admin, the Workload API and the decision API socket, which every
    /// policy may reach.
    sockets: (PathBuf, PathBuf, Option<PathBuf>, Option<PathBuf>),
    book: RwLock<RuleBook>,
    slots: Mutex<SlotTable>,
    reload: AsyncMutex<()>,
    /// The hash of the policy files as the last load or reload read them, in force or
    /// rejected: the watcher reloads only files that differ.
    attempted: Mutex<String>,
}

impl Policies {
    /// The service for `cfg`, with the slot table as loaded from the state directory.
    pub(crate) fn new(cfg: &Config, slots: SlotTable) -> Self {
        Self {
            dir: cfg.policy_dir.clone(),
            source: if cfg.fleet.policy_keys.is_empty() {
                Source::Dir
            } else {
                Source::Bundle(Mutex::new(None))
            },
            slots_path: slots_path(&cfg.state_dir),
            sockets: (
                cfg.enrollment.socket.clone(),
                cfg.socket.clone(),
                cfg.workload.enabled.then(|| cfg.workload.socket.clone()),
                cfg.decision.enabled.then(|| cfg.decision.socket.clone()),
            ),
            book: RwLock::default(),
            slots: Mutex::new(slots),
            reload: AsyncMutex::new(()),
            attempted: Mutex::new(String::new()),
        }
    }

    fn book(&self) -> std::sync::RwLockReadGuard<'_, RuleBook> {
        self.book
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads and checks the policy directory, or the fleet's bundle. The book in force is not
    /// touched.
    pub(crate) fn load(&self) -> Result<policy::PolicySet, CompileError> {
        *self
            .attempted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = self.source_hash();
        match &self.source {
            Source::Dir => Ok(policy::load_dir(&self.dir)?),
            Source::Bundle(b) => {
                let texts = self.bundle_of(b).map(|b| b.texts()).unwrap_or_default();
                Ok(policy::parse_texts(&texts)?)
            }
        }
    }

    fn bundle_of(
        &self,
        b: &Mutex<Option<Arc<crate::fleet::BundlePayload>>>,
    ) -> Option<Arc<crate::fleet::BundlePayload>> {
        b.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the policies come from the fleet's bundles rather than the directory.
    pub(crate) fn uses_bundles(&self) -> bool {
        matches!(self.source, Source::Bundle(_))
    }

    /// The bundle the next load reads (none without bundles, or before the first).
    pub(crate) fn bundle(&self) -> Option<Arc<crate::fleet::BundlePayload>> {
        match &self.source {
            Source::Dir => None,
            Source::Bundle(b) => self.bundle_of(b),
        }
    }

    /// Makes `new` the bundle the next load reads; returns the one before.
    pub(crate) fn set_bundle(
        &self,
        new: Option<Arc<crate::fleet::BundlePayload>>,
    ) -> Option<Arc<crate::fleet::BundlePayload>> {
        match &self.source {
            Source::Dir => None,
            Source::Bundle(b) => std::mem::replace(
                &mut *b.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                new,
            ),
        }
    }

    /// Where the policies come from, in words (for the audit log and the logs).
    pub(crate) fn source_label(&self) -> String {
        match &self.source {
            Source::Dir => self.dir.display().to_string(),
            Source::Bundle(_) => match self.bundle() {
                Some(b) => format!("fleet bundle version {}", b.version),
                None => "fleet bundle (none yet)".into(),
            },
        }
    }

    /// The hash of what the next load reads: the directory's files, or the bundle's.
    pub(crate) fn source_hash(&self) -> String {
        match &self.source {
            Source::Dir => policy::dir_hash(&self.dir),
            Source::Bundle(_) => {
                let bytes = self
                    .bundle()
                    .and_then(|b| serde_json::to_vec(&*b).ok())
                    .unwrap_or_default();
                crate::audit::hex(
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
                )
            }
        }
    }

    /// Compiles `set` with the addresses its host names resolved to, giving new policy names a
    /// slot (saved before anything refers to it). The book in force is not touched.
    pub(crate) fn compile(
        &self,
        set: &policy::PolicySet,
        resolved: &policy::compile::Resolved,
    ) -> Result<Compiled, CompileError> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = slots.clone();
        for p in &set.policies {
            slots.assign(&p.name)?;
        }
        if *slots != before {
            slots.save(&self.slots_path)?;
        }
        let mut compiled =
            policy::compile::compile_resolved(set, |name| slots.get(name).unwrap_or(0), resolved)
                .map_err(|problems| policy::PolicyError { problems })?;
        let (enroll, admin, workload, decision) = &self.sockets;
        // Agents renew their certificates and fetch tokens over the enrollment socket.
        compiled.allow_unix_everywhere(&enroll.to_string_lossy(), "the enrollment socket");
        // A unit's `ExecStartPre=+agentwall enforce-self` asks from inside the unit's cgroup;
        // the admin socket answers only root and its admin group (peer credentials).
        compiled.allow_unix_everywhere(&admin.to_string_lossy(), "the admin socket");
        // Agents get their identity there; the kernel's account of the caller decides what.
        if let Some(w) = workload {
            compiled.allow_unix_everywhere(&w.to_string_lossy(), "the Workload API socket");
        }
        // Callees ask there whether their callers may act.
        if let Some(d) = decision {
            compiled.allow_unix_everywhere(&d.to_string_lossy(), "the decision API socket");
        }
        Ok(compiled)
    }

    /// Makes `compiled` (of `set`), which the kernel holds as `generation`, the book in force.
    pub(crate) fn put_in_force(
        &self,
        generation: u32,
        compiled: Arc<Compiled>,
        set: Arc<policy::PolicySet>,
    ) {
        let mut book = self
            .book
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = std::mem::take(&mut *book);
        *book = RuleBook {
            generation,
            current: compiled,
            set: Some(set),
            previous: Some((old.generation, old.current)),
        };
    }

    /// The policy set in force.
    pub(crate) fn set_in_force(&self) -> Option<Arc<policy::PolicySet>> {
        self.book().set.clone()
    }

    /// The hash of the policy files the last load or reload read (see [`policy::dir_hash`]).
    pub(crate) fn attempted(&self) -> String {
        self.attempted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The generation of the book in force (the kernel's number for it).
    pub(crate) fn generation(&self) -> u32 {
        self.book().generation
    }

    /// The compiled book in force.
    pub(crate) fn current(&self) -> Arc<Compiled> {
        Arc::clone(&self.book().current)
    }

    /// Held for the whole of a reload: one at a time.
    pub(crate) async fn reload_turn(&self) -> MutexGuard<'_, ()> {
        self.reload.lock().await
    }

    /// Slot and mode of the policy named `name`, if it is in force.
    pub(crate) fn slot_mode(&self, name: &str) -> Option<(u32, Mode)> {
        self.book().current.policies.get(name).copied()
    }

    /// The binding that puts a cgroup under the policy named `name`.
    pub(crate) fn binding_for(&self, name: &str) -> Option<Binding> {
        let (slot, mode) = self.slot_mode(name)?;
        Some(Binding {
            slot,
            flags: if mode == Mode::Audit { flags::AUDIT } else { 0 },
            expires_boot_ns: 0,
        })
    }

    /// The mode of the policy in force at `slot`.
    pub(crate) fn mode_of_slot(&self, slot: u32) -> Option<Mode> {
        self.book()
            .current
            .policies
            .values()
            .find(|(s, _)| *s == slot)
            .map(|(_, m)| *m)
    }

    /// The name of the policy in force at `slot`.
    pub(crate) fn name_of_slot(&self, slot: u32) -> Option<String> {
        self.book()
            .current
            .policies
            .iter()
            .find(|(_, (s, _))| *s == slot)
            .map(|(n, _)| n.clone())
    }

    /// Names of the policies in force.
    pub(crate) fn names(&self) -> Vec<String> {
        self.book().current.policies.keys().cloned().collect()
    }

    /// `file:line` of rule `rule_id` of generation `generation`, while that generation is in
    /// force or the one before it.
    pub(crate) fn rule(&self, generation: u32, rule_id: u32) -> Option<String> {
        let book = self.book();
        let compiled = if generation == book.generation {
            &book.current
        } else {
            &book.previous.as_ref().filter(|(g, _)| *g == generation)?.1
        };
        compiled.rule(rule_id).map(|r| r.source.to_string())
    }

    /// The grant of the policy that governs `id` in the book in force.
    pub(crate) fn grant_for(&self, id: &SpiffeId, trust_domain: &str) -> Option<Grant> {
        crate::identity::service::grant_for(&self.book().current.identities, id, trust_domain)
            .cloned()
    }

    /// Each policy in force, for status.
    pub(crate) fn summaries(&self) -> Vec<PolicyStatus> {
        let book = self.book();
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
    }

    /// The slot table as it is now.
    pub(crate) fn slots(&self) -> SlotTable {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Where the slot table lives in the state directory.
pub(crate) fn slots_path(state_dir: &Path) -> PathBuf {
    state_dir.join("slots.json")
}
