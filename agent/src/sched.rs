//! Scheduling of the daemon's latency-critical threads.
//!
//! A revocation must reach the kernel within a millisecond even while the agents keep every
//! CPU busy. Under EEVDF (Linux 6.12 and later) a thread that asks for a short slice gets an
//! earlier deadline, so when it wakes it preempts a CPU-bound task at once instead of waiting
//! for that task's slice (about 1.5 ms on two CPUs) to run out; its share of CPU time stays
//! what its weight gives. Raising priority instead (nice, real time) would also hand the
//! daemon more CPU, which starves the agents and, through the event reader preempting them
//! at every wakeup, makes the audit pipeline lose events.

use std::time::Duration;

/// The slice asked for by the threads that answer the admin and enrollment sockets and write
/// the kernel maps. The kernel clamps it to 0.1 ms..100 ms.
pub const LATENCY_SLICE: Duration = Duration::from_micros(100);

/// Asks the scheduler for `slice` as the calling thread's time slice, keeping its policy and
/// nice value. Kernels before 6.12 ignore the request for normal threads.
pub fn set_thread_slice(slice: Duration) -> std::io::Result<()> {
    let size = std::mem::size_of::<libc::sched_attr>();
    // SAFETY: all-zero is a valid `sched_attr` (plain integers).
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getattr(2) on the calling thread (tid 0) writes at most `size` bytes into
    // `attr`, which is that large.
    let got = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &raw mut attr,
            size as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        // Real-time or deadline threads have no slice to shorten.
        return Ok(());
    }
    attr.size = size as u32;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr(2) on the calling thread reads `attr.size` bytes from `attr`.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &raw const attr,
            0 as libc::c_uint,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`set_thread_slice`] with [`LATENCY_SLICE`]; a failure is logged (the thread runs on with
/// the default slice).
pub fn latency_critical(thread: &str) {
    if let Err(e) = set_thread_slice(LATENCY_SLICE) {
        tracing::debug!(thread, error = %e, "cannot shorten the thread's time slice");
    }
}

/// Makes the calling thread real-time (SCHED_FIFO, the lowest priority): it runs as soon as
/// it wakes, ahead of every normal thread. Only for a thread that sleeps almost always and
/// does little when it wakes: the admin socket's (see `control::server::serve_on_thread`).
/// The kernel's real-time throttling still leaves normal threads 5% of each CPU. Fails
/// without CAP_SYS_NICE.
pub fn set_realtime() -> std::io::Result<()> {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler(2) on the calling thread with a valid parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const p) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// While alive, the calling thread runs as a normal thread (with the short slice) if it was
/// real-time; dropping it makes the thread real-time again. For the admin thread once a
/// revocation is in the kernel: the rest (the synced list, socket destruction, records) is
/// ordinary work, which should share the CPU with the agents, not take it from them.
#[derive(Debug)]
#[must_use = "the thread is real-time again when this drops"]
pub struct SteppedDown {
    was_realtime: bool,
}

/// See [`SteppedDown`].
pub fn step_down() -> SteppedDown {
    // SAFETY: sched_getscheduler(2) on the calling thread.
    let was_realtime = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_FIFO;
    if was_realtime {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler(2) on the calling thread with a valid parameter block.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &raw const p) } == 0 {
            latency_critical("stepped down");
        } else {
            return SteppedDown {
                was_realtime: false,
            };
        }
    }
    SteppedDown { was_realtime }
}

impl Drop for SteppedDown {
    fn drop(&mut self) {
        if self.was_realtime
            && let Err(e) = set_realtime()
        {
            tracing::warn!(error = %e, "cannot make the thread real-time again");
        }
    }
}

thread_local! {
    /// Set on threads that may block on disk I/O inside async code they drive with
    /// `Handle::block_on` (the enrollment pool, the admin thread), where a hand-over to the
    /// blocking pool would only add a wake-up, of a thread that may then take the CPU of an
    /// agent.
    static MAY_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one that may block on disk and socket I/O itself (see
/// `MAY_BLOCK`).
pub fn may_block_here() {
    MAY_BLOCK.set(true);
}

/// Runs `f` on this thread if it may block, else on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if MAY_BLOCK.get() {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_its_slice_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: setpriority/getpriority on the calling thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
            set_thread_slice(Duration::from_micros(300)).unwrap();
            // SAFETY: all-zero is a valid `sched_attr`.
            let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::sched_attr>() as libc::c_uint;
            // SAFETY: as in set_thread_slice.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    0,
                    &raw mut attr,
                    size,
                    0 as libc::c_uint,
                )
            };
            assert_eq!(r, 0);
            assert_eq!(attr.sched_nice, 5);
            assert_eq!(attr.sched_runtime, 300_000);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_real_time_thread_steps_down_and_back() {
        std::thread::spawn(|| {
            if set_realtime().is_err() {
                // Not root: nothing to step down from; the guard changes nothing.
                drop(step_down());
                // SAFETY: sched_getscheduler(2) on the calling thread.
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
                return;
            }
            {
                let _down = step_down();
                // SAFETY: as above.
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            }
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_goes_real_time() {
        std::thread::spawn(|| match set_realtime() {
            // SAFETY: sched_getscheduler(2) on the calling thread.
            Ok(()) => assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO),
            // Without CAP_SYS_NICE (tests run as a normal user) the kernel refuses, and says so.
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert_ne!(nix::unistd::geteuid().as_raw(), 0, "root was refused");
            }
        })
        .join()
        .unwrap();
    }
}
