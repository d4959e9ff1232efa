//! A connection to the Workload API and the process at its other end, as the kernel
//! reported it at accept: its pidfd, credentials and cgroup.
//!
//! The socket is open to every local process. Callers whose cgroup has an identity and
//! callers whose cgroup has none are bounded apart: the first per cgroup and in all, the
//! second per uid and in a small pool of their own, where they stay ten seconds at most. A
//! connection none of whose calls was found entitled within ten seconds is closed, and so is
//! one whose process is gone or in another cgroup, looked at every ten seconds. So no user, however many uids
//! it holds, keeps an agent from its identity, and an agent can use up only its own cgroup's
//! share. Beyond a bound a connection is closed at once.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
    sync::mpsc,
};

use super::authority::{READY_MAX, Rewriter};
use crate::{
    daemon::Caller,
    identity::attest::Peer,
    limits::{Slot, Slots},
};

/// Connections of one agent's cgroup at once.
pub(crate) const PER_CGROUP: usize = 16;
/// Connections at once of callers whose cgroup has no identity, and of one uid among them.
/// They get nothing but PermissionDenied, so they share a small pool of their own: a user
/// filling it keeps no agent from its identity.
pub(crate) const UNBOUND_PER_UID: usize = 4;
/// How long a connection may go before a call of it is found entitled, and how long a caller
/// without an identity may stay at all.
const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// How often an open connection's process is looked at again: gone, or in another cgroup
/// than the one it connected from, its connection ends and gives its place back.
const RECHECK: Duration = Duration::from_secs(10);

/// Open connections by a key (a cgroup id, or a uid).
#[derive(Debug, Default)]
pub(crate) struct PerKey(Mutex<HashMap<u64, usize>>);

/// A connection's place among those of its key, given back when it closes.
#[derive(Debug)]
pub(crate) struct Turn {
    owner: Arc<PerKey>,
    key: u64,
}

impl PerKey {
    fn take(self: &Arc<Self>, key: u64, max: usize) -> Option<Turn> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(key).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Turn {
            owner: Arc::clone(self),
            key,
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut m = self
            .owner
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// When a connection ends whatever it does.
#[derive(Debug)]
enum Deadline {
    /// Unless a call of it was found entitled by then.
    FirstRequest(Pin<Box<tokio::time::Sleep>>),
    /// In any case (a caller without an identity).
    Lifetime(Pin<Box<tokio::time::Sleep>>),
}

/// An accepted connection with its caller; its places in the bounds go with it.
#[derive(Debug)]
pub(crate) struct PeerStream {
    io: UnixStream,
    caller: Arc<Caller>,
    /// The client's bytes on their way to the HTTP/2 stack (see [`super::authority`]).
    rewrite: Rewriter,
    /// What was read from the socket, from `raw_at` to `raw_len` not fed to the rewriter yet.
    raw: Box<[u8]>,
    raw_at: usize,
    raw_len: usize,
    /// Rewritten bytes the stack has not read yet, from `taken` on. The rewriter stops
    /// adding at [`READY_MAX`]: a few bytes that decode to many cannot fill the memory.
    ready: Vec<u8>,
    taken: usize,
    deadline: Option<Deadline>,
    /// The next look at the process (see [`RECHECK`]).
    recheck: Pin<Box<tokio::time::Sleep>>,
    /// Looks in a row that found the process gone or elsewhere.
    strikes: u8,
    mount: Arc<std::path::Path>,
    _slot: Slot,
    _turn: Turn,
}

impl PeerStream {
    /// Whether the connection must end now. Asked on every read, write and flush, so that
    /// a client that stops reading (and so stops the stack from reading it) cannot outlive
    /// its deadline; each timer polled here wakes the connection's task when it fires.
    fn time_is_up(&mut self, cx: &mut Context<'_>) -> bool {
        if matches!(&self.deadline, Some(Deadline::FirstRequest(_)))
            && self
                .caller
                .entitled
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.deadline = None;
        }
        if let Some(Deadline::FirstRequest(sleep) | Deadline::Lifetime(sleep)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            return true;
        }
        while self.recheck.as_mut().poll(cx).is_ready() {
            let here = self.caller.peer.cgroup_id_now(&self.mount);
            if matches!(here, Ok(id) if id == self.caller.cgroup_id) {
                self.strikes = 0;
            } else {
                // Seen twice in a row: the refusals of calls in flight reach the client first.
                self.strikes += 1;
                if self.strikes >= 2 {
                    tracing::info!(
                        pid = self.caller.peer.pid,
                        cgroup_id = self.caller.cgroup_id,
                        "workload API: connection closed, its process left its cgroup or exited"
                    );
                    return true;
                }
            }
            self.recheck
                .as_mut()
                .reset(tokio::time::Instant::now() + RECHECK);
        }
        false
    }
}

fn time_up() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the Workload API connection's time is up, or its process left its cgroup",
    )
}

/// The socket is read in pieces of this size.
const READ_SIZE: usize = 8192;

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Arc<Caller>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Arc::clone(&self.caller)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready.clear();
                    this.ready.shrink_to(READY_MAX);
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.time_is_up(cx) {
                return Poll::Ready(Err(time_up()));
            }
            if this.raw_at < this.raw_len {
                let used = this
                    .rewrite
                    .feed(&this.raw[this.raw_at..this.raw_len], &mut this.ready)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                this.raw_at += used;
                continue;
            }
            let mut got = ReadBuf::new(&mut this.raw);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut got))?;
            let n = got.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            (this.raw_at, this.raw_len) = (0, n);
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.time_is_up(cx) {
            return Poll::Ready(Err(time_up()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.time_is_up(cx) {
            return Poll::Ready(Err(time_up()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.time_is_up(cx) {
            return Poll::Ready(Err(time_up()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The kernel's account of the peer of `io`; `None` (logged) when it has none.
fn identify(io: &UnixStream, mount: &std::path::Path) -> Option<Caller> {
    let cred = io.peer_cred().ok()?;
    let peer = Peer::of_socket(io.as_raw_fd(), cred.pid(), cred.uid(), cred.gid(), &|_| {
        None
    })
    .map_err(|e| tracing::debug!(error = %e, "workload API: cannot identify a caller"))
    .ok()?;
    let cgroup_id = peer
        .cgroup_id_now(mount)
        .map_err(|e| tracing::debug!(error = %e, "workload API: cannot place a caller"))
        .ok()?;
    Some(Caller {
        peer,
        cgroup_id,
        entitled: std::sync::atomic::AtomicBool::new(false),
    })
}

/// The bounds of the Workload API's connections.
#[derive(Debug)]
pub(crate) struct Pools {
    /// Callers whose cgroup has an identity: in all, and per cgroup.
    pub(crate) bound: Arc<Slots>,
    per_cgroup: Arc<PerKey>,
    /// Callers whose cgroup has none: in all, and per uid.
    pub(crate) unbound: Arc<Slots>,
    per_uid: Arc<PerKey>,
}

impl Pools {
    pub(crate) fn new(bound: Arc<Slots>, unbound: Arc<Slots>) -> Self {
        Self {
            bound,
            per_cgroup: Arc::default(),
            unbound,
            per_uid: Arc::default(),
        }
    }

    /// A place for `caller`, in the pool its cgroup's identity (or none) puts it in.
    fn admit(&self, caller: &Caller, has_identity: bool) -> Option<(Slot, Turn, Deadline)> {
        let (slots, per, key, max) = if has_identity {
            (&self.bound, &self.per_cgroup, caller.cgroup_id, PER_CGROUP)
        } else {
            (
                &self.unbound,
                &self.per_uid,
                u64::from(caller.peer.uid),
                UNBOUND_PER_UID,
            )
        };
        let Some(turn) = per.take(key, max) else {
            tracing::debug!(
                uid = caller.peer.uid,
                cgroup = %caller.peer.cgroup,
                has_identity,
                "workload API: connection refused, its share is taken"
            );
            return None;
        };
        let Some(slot) = slots.take() else {
            tracing::debug!("workload API: connection refused, {}", slots.refusal());
            return None;
        };
        let sleep = Box::pin(tokio::time::sleep(FIRST_REQUEST));
        let deadline = if has_identity {
            Deadline::FirstRequest(sleep)
        } else {
            Deadline::Lifetime(sleep)
        };
        Some((slot, turn, deadline))
    }
}

/// Accepts connections, identifies each peer and hands them to the server, within the
/// bounds. Ends only if the server is gone.
pub(crate) async fn accept(
    listener: tokio::net::UnixListener,
    daemon: Arc<crate::daemon::Daemon>,
    pools: Pools,
    to_server: mpsc::Sender<std::io::Result<PeerStream>>,
) {
    let mount: Arc<std::path::Path> = Arc::from(daemon.mount());
    loop {
        let io = match listener.accept().await {
            Ok((io, _)) => io,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "workload API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(caller) = identify(&io, &mount) else {
            continue;
        };
        let has_identity = daemon.workload_has_identity(caller.cgroup_id).await;
        let Some((slot, turn, deadline)) = pools.admit(&caller, has_identity) else {
            continue;
        };
        let stream = PeerStream {
            io,
            caller: Arc::new(caller),
            rewrite: Rewriter::default(),
            raw: vec![0; READ_SIZE].into_boxed_slice(),
            raw_at: 0,
            raw_len: 0,
            ready: Vec::new(),
            taken: 0,
            deadline: Some(deadline),
            recheck: Box::pin(tokio::time::sleep(RECHECK)),
            strikes: 0,
            mount: Arc::clone(&mount),
            _slot: slot,
            _turn: turn,
        };
        if to_server.send(Ok(stream)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_share_and_gets_it_back() {
        let p = Arc::new(PerKey::default());
        let held: Vec<_> = (0..PER_CGROUP)
            .map(|_| p.take(1000, PER_CGROUP).unwrap())
            .collect();
        assert!(p.take(1000, PER_CGROUP).is_none());
        assert!(
            p.take(1001, PER_CGROUP).is_some(),
            "another key is not held up"
        );
        drop(held);
        let again = p.take(1000, PER_CGROUP);
        assert!(again.is_some());
        drop(again);
        assert!(p.0.lock().unwrap().is_empty(), "no entry is left behind");
    }
}
