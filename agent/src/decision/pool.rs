//! The decision API's serving threads.

use std::sync::Arc;

use crate::supervise::Supervisor;

/// The decision API's threads: each runs a runtime of its own, on which the connections
/// it was handed are served start to end. A request then costs its own work and the one
/// wake-up of its thread, not a hand-over between the daemon's shared workers; and the
/// daemon's background work does not stand in the askers' way. The listeners have a thread
/// of their own that serves no connection, so that no asker's requests can hold up the
/// accepting of others.
pub(super) struct Pool {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

/// Most threads serving the decision API (one per CPU up to this).
const MAX_THREADS: usize = 4;

impl Pool {
    /// Starts one serving thread per CPU (at most [`MAX_THREADS`]) and the accepting thread,
    /// which runs `accept` (made from the pool); all are watched by `supervisor`, and end
    /// when the daemon stops. `accept` ending ends its thread, which stops the daemon.
    pub(super) fn start<F, Fut>(supervisor: &Supervisor, accept: F) -> std::io::Result<()>
    where
        F: FnOnce(Arc<Pool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let n = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, MAX_THREADS);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        };
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            let rt = runtime()?;
            handles.push(rt.handle().clone());
            let stopped = supervisor.stopped();
            supervisor.thread("decision", move || rt.block_on(stopped))?;
        }
        let pool = Arc::new(Pool {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
        });
        let rt = runtime()?;
        let stopped = supervisor.stopped();
        supervisor.thread("decision-accept", move || {
            rt.block_on(async move {
                tokio::select! {
                    () = accept(pool) => {}
                    () = stopped => {}
                }
            });
        })
    }

    /// Runs `f` on the next serving thread in turn.
    pub(super) fn spawn<Fut>(&self, f: Fut)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.handles.len();
        drop(self.handles[i].spawn(f));
    }
}
