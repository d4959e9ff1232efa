//! The daemon's long-lived tasks and threads, watched.
//!
//! Each one holds a [`Watch`] for as long as it runs. When it ends (it returned, or it
//! panicked and unwound), the watch reports that to the daemon's main loop, which stops the
//! daemon with an error: the pinned programs keep enforcing, and the service manager starts
//! a daemon that has all its parts again. None of these tasks is meant to end while the
//! daemon runs, so any end is a failure.
//!
//! The one exception is the stop: [`Supervisor::stop_tasks`] raises the stop signal, which
//! ends every task spawned here at its next await (and threads that look at
//! [`Supervisor::stopping`] at their next turn), then waits for them. What ends once the
//! stop is raised is not reported.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

/// Which task or thread ended, and whether it panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub name: &'static str,
    pub panicked: bool,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(f, "the daemon's {} task {how}", self.name)
    }
}

/// Hands out watches; the main loop holds the receiving end.
#[derive(Debug, Clone)]
pub struct Supervisor {
    tx: mpsc::UnboundedSender<Ended>,
    stop: Arc<watch::Sender<bool>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

/// Reports its task's end when dropped (on return, or while a panic unwinds), unless the
/// daemon is stopping.
#[derive(Debug)]
pub struct Watch {
    name: &'static str,
    tx: mpsc::UnboundedSender<Ended>,
    stop: watch::Receiver<bool>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if *self.stop.borrow() {
            return;
        }
        // The main loop may be gone already (an orderly stop drops every task).
        let _ = self.tx.send(Ended {
            name: self.name,
            panicked: std::thread::panicking(),
        });
    }
}

/// How many tasks a stop ended, and how many it had to abort at its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub ended: usize,
    pub aborted: usize,
}

impl Supervisor {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Ended>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, _) = watch::channel(false);
        (
            Self {
                tx,
                stop: Arc::new(stop),
                tasks: Arc::default(),
            },
            rx,
        )
    }

    /// A watch for a task or thread named `name`, to be moved into it.
    pub fn watch(&self, name: &'static str) -> Watch {
        Watch {
            name,
            tx: self.tx.clone(),
            stop: self.stop.subscribe(),
        }
    }

    /// Whether the stop signal is raised; threads look at it at each turn of their loop.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// A future that ends once the stop signal is raised, for threads that wait in a
    /// runtime of their own.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// Spawns `fut` on the runtime, watched; it ends at its next await once the stop signal is
    /// raised.
    pub fn spawn(&self, name: &'static str, fut: impl Future<Output = ()> + Send + 'static) {
        let watch = self.watch(name);
        let mut stop = self.stop.subscribe();
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spawn(async move {
                let _watch = watch;
                fault_point(name);
                tokio::select! {
                    () = fut => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
    }

    /// Raises the stop signal, then waits up to `within` for every task spawned here to end;
    /// those still running then are aborted.
    pub async fn stop_tasks(&self, within: Duration) -> Stopped {
        self.stop.send_replace(true);
        let mut tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut ended = 0;
        let all = async {
            while tasks.join_next().await.is_some() {
                ended += 1;
            }
        };
        let _ = tokio::time::timeout(within, all).await;
        // Whatever is left is stuck off an await (blocked in a system call, say): aborted, and
        // not waited for.
        let aborted = tasks.len();
        drop(tasks);
        Stopped { ended, aborted }
    }

    /// Starts `f` on a thread of its own named `agentwall-{name}`, watched.
    pub fn thread(
        &self,
        name: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let watch = self.watch(name);
        std::thread::Builder::new()
            .name(format!("agentwall-{name}"))
            .spawn(move || {
                let _watch = watch;
                fault_point(name);
                f();
            })
            .map(drop)
    }
}

impl Supervisor {
    /// Watches a thread started elsewhere, through its handle: a small thread of its own
    /// waits for it to end and reports how.
    pub fn adopt(
        &self,
        name: &'static str,
        thread: std::thread::JoinHandle<()>,
    ) -> std::io::Result<()> {
        let tx = self.tx.clone();
        let stop = self.stop.subscribe();
        std::thread::Builder::new()
            .name(format!("agentwall-watch-{name}"))
            .spawn(move || {
                let panicked = thread.join().is_err();
                if !*stop.borrow() {
                    let _ = tx.send(Ended { name, panicked });
                }
            })
            .map(drop)
    }
}

/// In debug builds only: panics if `AGENTWALL_TEST_FAULT` names this task, so that the
/// tests can show what a failing task does to the daemon. Release builds have no such point.
pub fn fault_point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("AGENTWALL_TEST_FAULT").is_ok_and(|v| v == name) {
        panic!("fault injected into the {name} task (AGENTWALL_TEST_FAULT)");
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_returns_or_panics_is_reported_with_its_name() {
        let (sup, mut rx) = Supervisor::new();
        sup.spawn("quiet", async {});
        assert_eq!(
            rx.recv().await,
            Some(Ended {
                name: "quiet",
                panicked: false
            })
        );
        sup.spawn("loud", async { panic!("boom") });
        assert_eq!(
            rx.recv().await,
            Some(Ended {
                name: "loud",
                panicked: true
            })
        );
        sup.thread("worker", || panic!("boom")).unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!((e.name, e.panicked), ("worker", true));
        assert_eq!(e.to_string(), "the daemon's worker task panicked");
        let elsewhere = std::thread::spawn(|| ());
        sup.adopt("elsewhere", elsewhere).unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Ended {
                name: "elsewhere",
                panicked: false
            })
        );
    }

    #[tokio::test]
    async fn a_stop_ends_every_task_quietly() {
        let (sup, mut rx) = Supervisor::new();
        sup.spawn("waits", std::future::pending());
        sup.spawn("loops", async {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(!sup.stopping());
        let stopped = sup.stop_tasks(Duration::from_secs(5)).await;
        assert_eq!(
            stopped,
            Stopped {
                ended: 2,
                aborted: 0
            }
        );
        assert!(sup.stopping());
        // A thread that ends once the stop is raised is not a failure either.
        sup.thread("worker", || ()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing reported after a stop");
    }
}
