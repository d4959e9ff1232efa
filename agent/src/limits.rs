//! File descriptors: how the daemon keeps enough for its own work whatever its clients do.
//!
//! At start the daemon raises its soft `RLIMIT_NOFILE` to the hard limit. It then sets a
//! [`RESERVED`] share aside for its own work (the kernel objects, the audit segments, the
//! revocation journal, the `/proc` and cgroup files of enrollments) and gives every listener a
//! fixed cap on the connections it holds at once; the caps add up to at most what is left.
//! A connection beyond its listener's cap is refused at once, so that no local user holding
//! connections open can take the descriptors a revocation or an enrollment needs.
//!
//! Every listener the daemon has takes its connections through [`Slots`]: the metrics
//! endpoint ([`METRICS_CONNECTIONS`]), the enrollment pool ([`ENROLL_DESCRIPTORS`], bounded by
//! its threads), the Workload API ([`WORKLOAD_DESCRIPTORS`]) and the admin socket (the rest,
//! [`Limits::admin`]).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Descriptors kept for the daemon's own work.
pub const RESERVED: u64 = 256;
/// Scrapes of the metrics endpoint served at once.
pub const METRICS_CONNECTIONS: usize = 16;
/// Threads of the enrollment pool, each serving one connection.
pub const ENROLL_THREADS: usize = 128;
/// What the enrollment pool can hold at most: per thread its epoll instance, the connection,
/// the peer's pidfd and a file of `/proc` or of the cgroup tree being read.
pub const ENROLL_DESCRIPTORS: u64 = ENROLL_THREADS as u64 * 4;
/// Connections to the Workload API at once of callers whose cgroup has an identity (see
/// `workload::conn`, which also bounds those of one cgroup).
pub const WORKLOAD_CONNECTIONS: usize = 256;
/// Connections at once of callers whose cgroup has no identity (see `workload::conn`).
pub const WORKLOAD_UNBOUND_CONNECTIONS: usize = 32;
/// What they hold: per connection the socket and the caller's pidfd.
pub const WORKLOAD_DESCRIPTORS: u64 =
    (WORKLOAD_CONNECTIONS + WORKLOAD_UNBOUND_CONNECTIONS) as u64 * 2;
/// Calls (streams) of one Workload API connection at once.
pub const WORKLOAD_CALLS_PER_CONNECTION: usize = 16;
/// The decoded header fields of one Workload API request, at most (HTTP/2's measure: each
/// name and value, and 32 per field).
pub const WORKLOAD_HEADER_LIST: usize = 16 * 1024;
/// Connections to the decision API at once, on its socket and on its TCP address each.
pub const DECISION_CONNECTIONS: usize = 64;
/// What they hold: the socket of each.
pub const DECISION_DESCRIPTORS: u64 = DECISION_CONNECTIONS as u64 * 2;
/// Admin connections waiting for their request line at once (see `control::waiting`).
pub const ADMIN_WAITING: usize = 64;
/// Admin connections at once however low the limit (root and the admin group only).
const MIN_ADMIN: usize = 32;

/// The descriptor limit the daemon runs with and the admin socket's share of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The soft `RLIMIT_NOFILE` after raising it.
    pub nofile: u64,
    /// Admin connections held at once (exec leases, event streams, slow requests).
    pub admin: usize,
}

impl Limits {
    /// The shares of `nofile` descriptors.
    pub fn of(nofile: u64) -> Self {
        let left = nofile
            .saturating_sub(RESERVED)
            .saturating_sub(ENROLL_DESCRIPTORS)
            .saturating_sub(METRICS_CONNECTIONS as u64)
            .saturating_sub(WORKLOAD_DESCRIPTORS)
            .saturating_sub(DECISION_DESCRIPTORS)
            .saturating_sub(ADMIN_WAITING as u64);
        Self {
            nofile,
            admin: usize::try_from(left).unwrap_or(usize::MAX).max(MIN_ADMIN),
        }
    }

    /// Raises the soft descriptor limit to the hard one and divides it. A limit too low for
    /// the shares is logged; the caps still hold.
    pub fn raise() -> Self {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
                    soft
                }
            },
            Ok((soft, _)) => soft,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open files limit; assuming 1024");
                1024
            }
        };
        let limits = Self::of(nofile);
        let needed = RESERVED
            + ENROLL_DESCRIPTORS
            + METRICS_CONNECTIONS as u64
            + WORKLOAD_DESCRIPTORS
            + MIN_ADMIN as u64;
        if nofile < needed {
            tracing::warn!(
                nofile,
                needed,
                "the open files limit is below what the daemon's shares add up to; raise it \
                 (LimitNOFILE= in the unit)"
            );
        }
        limits
    }
}

/// A listener's connections held at once, at most `max`.
#[derive(Debug)]
pub struct Slots {
    what: &'static str,
    max: usize,
    used: AtomicUsize,
}

/// One connection's place in its [`Slots`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(what: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection, or `None` if `max` are held.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Why a connection was refused, for the client.
    pub fn refusal(&self) -> String {
        format!(
            "{} connections to the {} are open, the most it holds at once; try again once \
             some have ended",
            self.max, self.what
        )
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn slots_hold_at_most_their_cap_and_come_back_when_dropped() {
        let s = Slots::new("test socket", 2);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert!(s.take().is_none());
        assert_eq!(s.in_use(), 2);
        drop(a);
        let c = s.take().unwrap();
        assert!(s.take().is_none());
        drop((b, c));
        assert_eq!(s.in_use(), 0);
        assert!(s.refusal().contains("2 connections to the test socket"));
    }

    #[test]
    fn the_shares_fit_the_limit() {
        let l = Limits::of(2048);
        assert_eq!(
            RESERVED
                + ENROLL_DESCRIPTORS
                + METRICS_CONNECTIONS as u64
                + WORKLOAD_DESCRIPTORS
                + DECISION_DESCRIPTORS
                + ADMIN_WAITING as u64
                + l.admin as u64,
            2048
        );
        assert_eq!(Limits::of(100).admin, MIN_ADMIN);
        assert!(Limits::of(524_288).admin > 500_000);
    }
}
