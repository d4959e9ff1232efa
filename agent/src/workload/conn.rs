//! A connection to the Workload API and the process at its other end, as the kernel
//! reported it at accept: its pidfd, credentials and cgroup.
//!
//! The socket is open to every local process. Connections are bounded per peer uid and in
//! all, so that a user holding many open (or never speaking) cannot keep other agents
//! from their identity; beyond a bound a connection is closed at once.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
    sync::mpsc,
};

use super::authority::Rewriter;
use crate::{
    daemon::Caller,
    identity::attest::Peer,
    limits::{Slot, Slots},
};

/// Connections of one peer uid at once.
pub(crate) const PER_UID: usize = 32;

/// Open connections by peer uid.
#[derive(Debug, Default)]
pub(crate) struct PerUid(Mutex<HashMap<u32, usize>>);

/// A connection's place among those of its uid, given back when it closes.
#[derive(Debug)]
pub(crate) struct UidTurn {
    owner: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32) -> Option<UidTurn> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(uid).or_default();
        if *n >= PER_UID {
            return None;
        }
        *n += 1;
        Some(UidTurn {
            owner: Arc::clone(self),
            uid,
        })
    }
}

impl Drop for UidTurn {
    fn drop(&mut self) {
        let mut m = self
            .owner
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection with its caller; its places in the bounds go with it.
#[derive(Debug)]
pub(crate) struct PeerStream {
    io: UnixStream,
    /// The client's bytes on their way to the HTTP/2 stack (see [`super::authority`]).
    rewrite: Rewriter,
    /// Rewritten bytes the stack has not read yet, from `taken` on.
    ready: Vec<u8>,
    taken: usize,
    caller: Arc<Caller>,
    _slot: Slot,
    _turn: UidTurn,
}

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
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut got = ReadBuf::new(&mut raw);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut got))?;
            if got.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewrite
                .feed(got.filled(), &mut this.ready)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
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
    Some(Caller { peer, cgroup_id })
}

/// Accepts connections, identifies each peer and hands them to the server, within the
/// bounds. Ends only if the server is gone.
pub(crate) async fn accept(
    listener: tokio::net::UnixListener,
    mount: PathBuf,
    slots: Arc<Slots>,
    to_server: mpsc::Sender<std::io::Result<PeerStream>>,
) {
    let per_uid = Arc::new(PerUid::default());
    loop {
        let io = match listener.accept().await {
            Ok((io, _)) => io,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "workload API: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = slots.take() else {
            tracing::debug!("workload API: connection refused, {}", slots.refusal());
            continue;
        };
        let Ok(cred) = io.peer_cred() else { continue };
        let Some(turn) = per_uid.take(cred.uid()) else {
            tracing::debug!(
                uid = cred.uid(),
                "workload API: connection refused, the uid holds {PER_UID} already"
            );
            continue;
        };
        let Some(caller) = identify(&io, &mount) else {
            continue;
        };
        let stream = PeerStream {
            io,
            rewrite: Rewriter::default(),
            ready: Vec::new(),
            taken: 0,
            caller: Arc::new(caller),
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
    fn a_uid_holds_at_most_its_share_and_gets_it_back() {
        let p = Arc::new(PerUid::default());
        let held: Vec<_> = (0..PER_UID).map(|_| p.take(1000).unwrap()).collect();
        assert!(p.take(1000).is_none());
        assert!(p.take(1001).is_some(), "another uid is not held up");
        drop(held);
        let again = p.take(1000);
        assert!(again.is_some());
        drop(again);
        assert!(p.0.lock().unwrap().is_empty(), "no entry is left behind");
    }
}
