//! The [`Enforcer`] behind a lock, with one thread of its own; tasks reach it through
//! [`EnforcerHandle`]. Long jobs (a 100k-rule generation, attaching programs) are sent to
//! that thread over a channel and awaited, so they stay off the async runtime. Short ones (one
//! binding read or written: an enrollment, a revocation) run on the caller's thread when the
//! enforcer is free, which spares two thread wakeups on the path a revocation takes to the
//! kernel; when a long job holds it, they queue behind it like the rest. Every job runs under
//! the one lock, so jobs never interleave either way.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, TryLockError},
    thread,
};

use agentwall_common::binding::Binding;
use tokio::sync::{mpsc, oneshot};

use super::{Counters, EnforceError, Enforcer};
use crate::{cgroup::Cgroup, policy::Compiled};

type Job = Box<dyn FnOnce(&mut Enforcer) + Send>;

#[derive(Debug, thiserror::Error)]
#[error("the enforcement thread has stopped")]
pub struct Stopped;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// A cheap, cloneable way to the enforcement thread.
#[derive(Debug, Clone)]
pub struct EnforcerHandle {
    tx: mpsc::Sender<Job>,
    mount: Arc<PathBuf>,
    enforcer: Arc<Mutex<Enforcer>>,
}

impl EnforcerHandle {
    /// Moves `enforcer` onto its own thread. `mount` is the cgroup v2 mount.
    pub fn spawn(
        enforcer: Enforcer,
        mount: PathBuf,
        watch: crate::supervise::Watch,
    ) -> (Self, thread::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Job>(64);
        let enforcer = Arc::new(Mutex::new(enforcer));
        let owned = Arc::clone(&enforcer);
        let join = thread::Builder::new()
            .name("agentwall-enforce".into())
            .spawn(move || {
                // Reports the thread's end, a job's panic included, to the daemon.
                let _watch = watch;
                crate::sched::latency_critical("agentwall-enforce");
                while let Some(job) = rx.blocking_recv() {
                    // A job that panicked left the enforcer in an unknown state: stop, and
                    // every later call fails (the kernel keeps the last state it was given).
                    let Ok(mut e) = owned.lock() else { break };
                    job(&mut e);
                }
            })
            .unwrap_or_else(|e| {
                // Without the thread nothing can be enforced; the daemon cannot go on.
                tracing::error!(error = %e, "cannot start the enforcement thread");
                std::process::exit(1)
            });
        (
            Self {
                tx,
                mount: Arc::new(mount),
                enforcer,
            },
            join,
        )
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Enforcer) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |e| {
                let _ = reply.send(f(e));
            }))
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Runs a short job on this thread if the enforcer is free, else queues it (see the
    /// module's documentation).
    async fn quick<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Enforcer) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let f = match self.enforcer.try_lock() {
            Ok(mut e) => return Ok(f(&mut e)),
            Err(TryLockError::Poisoned(_)) => return Err(Stopped),
            Err(TryLockError::WouldBlock) => f,
        };
        self.call(f).await
    }

    pub async fn attach(&self, cgroup: Cgroup) -> Result<u64, CallError> {
        let mount = Arc::clone(&self.mount);
        Ok(self.call(move |e| e.attach(&cgroup, &mount)).await??)
    }

    pub async fn detach(&self, cgroup_id: u64) -> Result<(), CallError> {
        Ok(self.call(move |e| e.detach(cgroup_id)).await??)
    }

    pub async fn apply(&self, compiled: Arc<Compiled>) -> Result<u32, CallError> {
        Ok(self.call(move |e| e.apply(&compiled)).await??)
    }

    /// See [`Enforcer::refresh_windows`].
    pub async fn refresh_windows(&self) -> Result<Option<std::time::Duration>, CallError> {
        Ok(self.call(Enforcer::refresh_windows).await??)
    }

    pub async fn bind(&self, cgroup_id: u64, binding: Binding) -> Result<(), CallError> {
        Ok(self.quick(move |e| e.bind(cgroup_id, binding)).await??)
    }

    /// Reads a cgroup's binding and writes the one `f` makes of it, in one call (no other
    /// command runs in between); an unchanged binding is not written again (nor the policy
    /// epoch bumped: no permission changed). Returns the binding before.
    pub async fn rebind(
        &self,
        cgroup_id: u64,
        f: impl FnOnce(Option<Binding>) -> Binding + Send + 'static,
    ) -> Result<Option<Binding>, CallError> {
        Ok(self
            .quick(move |e| {
                let old = e.binding(cgroup_id)?;
                let new = f(old);
                if old != Some(new) {
                    e.bind(cgroup_id, new)?;
                }
                Ok::<_, crate::enforce::EnforceError>(old)
            })
            .await??)
    }

    /// Changes the binding of `cgroup_id`, if it has one, in one step with reading it: a
    /// change made meanwhile by another caller (a revocation, a quarantine, an enrollment)
    /// is what `f` sees, never overwritten with an older copy. Returns the binding as it was.
    pub async fn update(
        &self,
        cgroup_id: u64,
        f: impl FnOnce(Binding) -> Binding + Send + 'static,
    ) -> Result<Option<Binding>, CallError> {
        Ok(self
            .quick(move |e| {
                let old = e.binding(cgroup_id)?;
                if let Some(old) = old {
                    let new = f(old);
                    if new != old {
                        e.bind(cgroup_id, new)?;
                    }
                }
                Ok::<_, crate::enforce::EnforceError>(old)
            })
            .await??)
    }

    pub async fn unbind(&self, cgroup_id: u64) -> Result<(), CallError> {
        Ok(self.quick(move |e| e.unbind(cgroup_id)).await??)
    }

    pub async fn binding(&self, cgroup_id: u64) -> Result<Option<Binding>, CallError> {
        Ok(self.quick(move |e| e.binding(cgroup_id)).await??)
    }

    pub async fn bindings(&self) -> Result<Vec<(u64, Binding)>, Stopped> {
        self.call(|e| e.bindings()).await
    }

    pub async fn counters(&self) -> Result<Counters, CallError> {
        Ok(self.quick(|e| e.counters()).await??)
    }

    pub async fn task_hooks(&self) -> Result<super::TaskHooks, Stopped> {
        self.quick(|e| e.task_hooks().clone()).await
    }

    /// Why the Unix socket programs are missing, if they are.
    pub async fn unix_hooks_missing(&self) -> Result<Option<String>, Stopped> {
        self.quick(|e| e.unix_hooks_missing().map(ToString::to_string))
            .await
    }

    /// (active generation, rule nodes in the trie)
    pub async fn rule_state(&self) -> Result<(u32, usize), Stopped> {
        self.call(|e| (e.generation(), e.rule_nodes())).await
    }

    /// Cgroup ids with pinned links.
    pub async fn linked_cgroups(&self) -> Result<Vec<u64>, Stopped> {
        self.call(|e| e.layout().linked_cgroups()).await
    }
}
