//! Cgroups listed under `enforce:` that appear while the daemon runs.
//!
//! A systemd unit gets a new cgroup at each start. `ExecStartPre=+agentwall enforce-self`
//! has it enforced before the main process runs; a unit without that line would run
//! unenforced until the daemon restarted. The watcher closes that: it learns of each new
//! cgroup at a configured path from inotify on the parent directory (and, as a fallback for
//! a parent that did not exist yet or an overflowed queue, looks every second), enforces it,
//! and destroys the sockets its processes opened before, which no hook judged. What they
//! sent in those milliseconds is not undone; the log says so, and `enforce-self` is the way
//! to have the first connect judged.

use std::{
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

use super::Daemon;
use crate::cgroup::Cgroup;

/// How often the configured paths are looked at without an inotify event.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Starts the watcher thread, if the configuration lists any cgroup under `enforce:`.
pub(super) fn spawn(
    daemon: Arc<Daemon>,
    rt: tokio::runtime::Handle,
    supervisor: &crate::supervise::Supervisor,
) -> std::io::Result<()> {
    if daemon.cfg.enforce.is_empty() {
        return Ok(());
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let sup = supervisor.clone();
    supervisor.thread("units", move || {
        while !sup.stopping() {
            watch_parents(&daemon, &inotify);
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(LOOK_EVERY.as_millis()).unwrap_or(u16::MAX);
            let _ = poll(&mut fds, PollTimeout::from(ms));
            // Only the wakeup matters: every configured path is looked at anyway.
            while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
            rt.block_on(daemon.enforce_appeared());
        }
    })
}

/// Watches the directory each configured cgroup is made in (again: the same watch if it is
/// in place, a new one if the directory was made anew).
fn watch_parents(daemon: &Daemon, inotify: &Inotify) {
    for e in &daemon.cfg.enforce {
        if let Ok(cg) = Cgroup::under(&daemon.mount, &e.cgroup)
            && let Some(parent) = cg.path().parent()
        {
            let _ = inotify.add_watch(parent, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR);
        }
    }
}

impl Daemon {
    /// Enforces each configured cgroup that exists and is not enforced yet, and destroys the
    /// sockets its processes opened before; a failure is logged, counted, and tried again at
    /// the next look.
    pub(super) async fn enforce_appeared(&self) {
        for e in &self.cfg.enforce {
            if let Err(err) = self.enforce_listed(e, "watcher").await {
                tracing::error!(cgroup = %e.cgroup, error = %err, "a configured cgroup appeared and cannot be enforced; retrying");
                self.count_error("configured_enforce");
            }
        }
    }

    /// Enforces the configured cgroup of `e` if it exists and is not enforced yet. When
    /// processes ran in it before (the unit started with no `enforce-self`, or while no daemon
    /// ran), the sockets they opened, which no hook judged, are destroyed, and that is logged,
    /// audited (`configured_cgroup_enforced`, `by`) and counted.
    ///
    /// The whole of it, the cut (both passes) included, takes `configured_turn`: an `enforce-self` that
    /// comes while the watcher enforces the cgroup answers only once the cut is over, so the
    /// unit's first connects, judged by the hooks, are not cut as if they had come before.
    pub(super) async fn enforce_listed(
        &self,
        e: &crate::config::EnforceEntry,
        by: &str,
    ) -> Result<(), super::DaemonError> {
        let _turn = self.configured_turn.lock().await;
        let cg = Cgroup::under(&self.mount, &e.cgroup)?;
        let Ok(id) = cg.id() else {
            // Not there (yet): the unit is stopped.
            return Ok(());
        };
        let known = self.registry.kind_of(id).await == Some(super::Kind::Configured);
        if known {
            return Ok(());
        }
        let started = Instant::now();
        // Empty before it is enforced, and no socket to cut after: nothing ran unjudged
        // (systemd makes the cgroup before it starts the unit's first process in it).
        let empty_before = cg.populated().is_ok_and(|p| !p);
        let (id, newly) = self.enforce_configured_in_turn(e).await?;
        if !newly {
            // Its `enforce-self` came first.
            return Ok(());
        }
        // Both passes, before the turn goes: the second runs shortly after the first, and a
        // unit's connect after its `enforce-self` answered must not meet it.
        let (cut, second) = self.destroy_sockets_passes([id].into()).await;
        if let Some(second) = second {
            let _ = second.await;
        }
        if empty_before && cut.sockets == 0 {
            tracing::info!(cgroup = %e.cgroup, cgroup_id = id, policy = %e.policy, "a configured cgroup was enforced before a process ran in it");
            return Ok(());
        }
        tracing::warn!(
            cgroup = %e.cgroup,
            cgroup_id = id,
            policy = %e.policy,
            sockets_destroyed = cut.sockets,
            "a configured cgroup with processes in it is enforced now; what they sent before was not judged (give its unit ExecStartPre=+agentwall enforce-self)"
        );
        self.audit.record(
            &crate::audit::schema::AuditRecord::ConfiguredCgroupEnforced {
                cgroup: e.cgroup.clone(),
                cgroup_id: id,
                policy: e.policy.clone(),
                by: by.to_string(),
                sockets_destroyed: cut.sockets,
                took_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            },
        );
        self.count_error("configured_enforced_late");
        Ok(())
    }
}
