//! The daemon's long-lived tasks and threads, watched.
//!
//! Each one holds a [`Watch`] for as long as it runs. When it ends (it returned, or it
//! panicked and unwound), the watch reports that to the daemon's main loop, which stops the
//! daemon with an error: the pinned programs keep enforcing, and the service manager starts
//! a daemon that has all its parts again. None of these tasks is meant to end while the
//! daemon runs, so any end is a failure.

use std::future::Future;

use tokio::sync::mpsc;

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
}

/// Reports its task's end when dropped (on return, or while a panic unwinds).
#[derive(Debug)]
pub struct Watch {
    name: &'static str,
    tx: mpsc::UnboundedSender<Ended>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The main loop may be gone already (an orderly stop drops every task).
        let _ = self.tx.send(Ended {
            name: self.name,
            panicked: std::thread::panicking(),
        });
    }
}

impl Supervisor {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Ended>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// A watch for a task or thread named `name`, to be moved into it.
    pub fn watch(&self, name: &'static str) -> Watch {
        Watch {
            name,
            tx: self.tx.clone(),
        }
    }

    /// Spawns `fut` on the runtime, watched.
    pub fn spawn(&self, name: &'static str, fut: impl Future<Output = ()> + Send + 'static) {
        let watch = self.watch(name);
        tokio::spawn(async move {
            let _watch = watch;
            fault_point(name);
            fut.await;
        });
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
        std::thread::Builder::new()
            .name(format!("agentwall-watch-{name}"))
            .spawn(move || {
                let panicked = thread.join().is_err();
                let _ = tx.send(Ended { name, panicked });
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
}
