//! The policy directory, watched: a change to it (a file written, renamed or removed, a
//! Kubernetes ConfigMap's `..data` link swapped) reloads the policies as `agentwall reload`
//! does. All or nothing: a directory with a problem leaves the policy in force, and the
//! rejection is logged, audited and counted where reloads are made.
//!
//! Changes are taken together: the reload waits until the directory has been quiet for a
//! moment, and is skipped when the policy files are what the last load or reload read (an
//! editor's swap file, a touched file, a change `agentwall reload` already took).

use std::{os::fd::AsFd as _, path::PathBuf, sync::Arc, time::Duration};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

use super::Daemon;

/// Quiet time after a change before the reload.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the watch is checked without an event (a directory made anew needs a new
/// watch).
const LOOK_EVERY: Duration = Duration::from_secs(1);

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Starts the watcher thread.
pub(super) fn spawn(
    daemon: Arc<Daemon>,
    rt: tokio::runtime::Handle,
    supervisor: &crate::supervise::Supervisor,
) -> std::io::Result<()> {
    let dir: PathBuf = daemon.cfg.policy_dir.clone();
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(&dir, flags())?;
    let sup = supervisor.clone();
    supervisor.thread("policy-watch", move || {
        while !sup.stopping() {
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(LOOK_EVERY.as_millis()).unwrap_or(u16::MAX);
            let _ = poll(&mut fds, PollTimeout::from(ms));
            let changed = drain(&inotify);
            // Again each turn: the directory may have been made anew (the same watch if not).
            let _ = inotify.add_watch(&dir, flags());
            if !changed {
                continue;
            }
            // Until quiet: an editor or `kubectl` writes several files in a row.
            loop {
                std::thread::sleep(SETTLE);
                if !drain(&inotify) {
                    break;
                }
            }
            // Files a reload (this watcher's, `agentwall reload`'s, SIGHUP's) read already are
            // not read again.
            if crate::policy::dir_hash(&dir) == daemon.policies.attempted() {
                continue;
            }
            tracing::info!(dir = %dir.display(), "the policy directory changed; reloading");
            // A rejected reload is logged, audited and counted by `reload`; the next change
            // tries again.
            let _ = rt.block_on(daemon.reload());
        }
    })
}

/// Reads every pending event; whether there was any.
fn drain(inotify: &Inotify) -> bool {
    let mut any = false;
    while let Ok(events) = inotify.read_events() {
        if events.is_empty() {
            break;
        }
        any = true;
    }
    any
}
