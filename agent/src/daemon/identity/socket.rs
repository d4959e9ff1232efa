//! The enrollment socket: a small pool of threads, each waiting on its own epoll instance,
//! that reads each request under a deadline and answers it.

use super::*;

/// Enrollments in progress at once (threads of the enrollment pool). Beyond that, new
/// connections wait in the socket's backlog; each enrollment is bounded by
/// [`enroll::CLIENT_TIMEOUT`], so a flood of idle connections delays enrollments but cannot
/// exhaust the daemon.
const MAX_ENROLL_THREADS: usize = crate::limits::ENROLL_THREADS;
/// Enrollments of one user (peer uid) in progress at once. The socket is open to every user:
/// one holding many connections idle or slow keeps at most this many threads, and the rest of
/// its connections are refused at once, so that others' enrollments go on.
pub(super) const MAX_ENROLLMENTS_PER_UID: usize = 16;
/// Enrollments from one cgroup in progress at once: agents often share a user, and one of
/// them holding connections must not keep the others of that user from enrolling. (A user
/// that can make cgroups of its own is still bounded by [`MAX_ENROLLMENTS_PER_UID`].)
pub(super) const MAX_ENROLLMENTS_PER_CGROUP: usize = 4;
/// Enrollment threads kept waiting in `accept` when there is nothing to do.
const SPARE_ENROLL_THREADS: usize = 2;
/// A thread beyond the spare ones that waited this long for a connection ends.
const ENROLL_THREAD_IDLE: Duration = Duration::from_secs(10);

/// The enrollment pool: threads that each accept a connection and handle it to the end. A
/// handshake is a short burst of computation between a few blocking reads and writes; doing
/// it on the thread that accepted it costs no hand-over.
///
/// Idle threads wait in epoll, each with its own instance, on the listener registered with
/// `EPOLLEXCLUSIVE`: the kernel wakes one thread per connection, the first in registration
/// order that is waiting at that moment. Agents enrolling one after another are so served by
/// the same thread, whose memory is still in the caches; threads waiting in `accept` itself
/// would take turns (the kernel queues them in the order they began waiting), and each
/// enrollment would start on the thread that had been idle longest.
struct EnrollPool {
    /// Non-blocking: a woken thread whose connection another thread took sees `WouldBlock`.
    listener: std::os::unix::net::UnixListener,
    daemon: Arc<Daemon>,
    rt: tokio::runtime::Handle,
    /// Threads in the pool, and those of them waiting for a connection.
    threads: std::sync::atomic::AtomicUsize,
    idle: std::sync::atomic::AtomicUsize,
    /// Enrollments in progress per peer uid and per peer cgroup.
    in_progress: std::sync::Mutex<InProgress>,
}

#[derive(Default)]
struct InProgress {
    per_uid: HashMap<u32, usize>,
    per_cgroup: HashMap<String, usize>,
}

fn give_back<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// A peer's place among the enrollments in progress; given back when dropped.
struct PeerTurn<'a> {
    pool: &'a EnrollPool,
    uid: u32,
    cgroup: String,
}

impl Drop for PeerTurn<'_> {
    fn drop(&mut self) {
        let mut p = self
            .pool
            .in_progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        give_back(&mut p.per_uid, &self.uid);
        give_back(&mut p.per_cgroup, &self.cgroup);
    }
}

/// Serves the enrollment socket from a pool of blocking threads (see [`EnrollPool`]).
pub(in crate::daemon) fn serve_enroll(
    listener: UnixListener,
    daemon: Arc<Daemon>,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    listener.set_nonblocking(true)?;
    let pool = Arc::new(EnrollPool {
        listener,
        daemon,
        rt: tokio::runtime::Handle::current(),
        threads: std::sync::atomic::AtomicUsize::new(0),
        idle: std::sync::atomic::AtomicUsize::new(0),
        in_progress: std::sync::Mutex::default(),
    });
    for _ in 0..SPARE_ENROLL_THREADS {
        EnrollPool::spawn(&pool)?;
    }
    Ok(())
}

impl EnrollPool {
    fn spawn(pool: &Arc<Self>) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        pool.threads.fetch_add(1, SeqCst);
        let p = Arc::clone(pool);
        std::thread::Builder::new()
            .name("agentwall-enroll".into())
            .spawn(move || p.run())
            .map(drop)
            .inspect_err(|_| {
                pool.threads.fetch_sub(1, SeqCst);
            })
    }

    /// A turn for the peer of `stream`, unless its cgroup has [`MAX_ENROLLMENTS_PER_CGROUP`]
    /// or its user [`MAX_ENROLLMENTS_PER_UID`] enrollments in progress: that peer is told so
    /// in one plain line (before any TLS: `agentwall`'s client shows it as it is) and the
    /// connection is closed.
    fn turn_for(&self, stream: &std::os::unix::net::UnixStream) -> Option<PeerTurn<'_>> {
        use std::io::Write as _;
        // A peer whose credentials or cgroup cannot be read counts as one of its own kind.
        let cred =
            nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok();
        let uid = cred.map_or(u32::MAX, |c| c.uid());
        let cgroup = cred
            .and_then(|c| crate::identity::attest::cgroup_of(c.pid()).ok())
            .unwrap_or_else(|| "(unknown)".into());
        let refused = {
            let mut p = self
                .in_progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let by_uid = p.per_uid.get(&uid).copied().unwrap_or(0);
            let by_cgroup = p.per_cgroup.get(&cgroup).copied().unwrap_or(0);
            if by_cgroup >= MAX_ENROLLMENTS_PER_CGROUP {
                format!(
                    "{MAX_ENROLLMENTS_PER_CGROUP} enrollments from cgroup {cgroup} are in progress, the most one cgroup may have"
                )
            } else if by_uid >= MAX_ENROLLMENTS_PER_UID {
                format!(
                    "{MAX_ENROLLMENTS_PER_UID} enrollments of uid {uid} are in progress, the most one user may have"
                )
            } else {
                *p.per_uid.entry(uid).or_default() += 1;
                *p.per_cgroup.entry(cgroup.clone()).or_default() += 1;
                return Some(PeerTurn {
                    pool: self,
                    uid,
                    cgroup,
                });
            }
        };
        self.daemon.count_error("enroll_busy_refused");
        tracing::debug!(uid, %cgroup, "enrollment refused: too many in progress for this peer");
        let _ = stream.set_nonblocking(true);
        let _ = (&*stream).write_all(
            format!(
                "{}{refused}: try again once they are done\n",
                enroll::BUSY_PREFIX
            )
            .as_bytes(),
        );
        None
    }

    /// This thread's wait for connections (see [`EnrollPool`]).
    fn waiter(&self) -> nix::Result<nix::sys::epoll::Epoll> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            &self.listener,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, 0),
        )?;
        Ok(epoll)
    }

    fn run(self: Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        crate::sched::may_block_here();
        // Without its epoll instance (out of file descriptors) the thread cannot wait: it
        // tries again rather than end, so that the pool never runs out of threads.
        let waiter = loop {
            match self.waiter() {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, "an enrollment thread cannot wait for connections");
                    self.daemon.count_error("enroll_thread");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let idle_wait = nix::sys::epoll::EpollTimeout::try_from(ENROLL_THREAD_IDLE)
            .unwrap_or(nix::sys::epoll::EpollTimeout::MAX);
        loop {
            // A connection that came while every thread was busy is taken before waiting.
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.idle.fetch_add(1, SeqCst);
                    let mut events = [nix::sys::epoll::EpollEvent::empty()];
                    let woken = waiter.wait(&mut events, idle_wait);
                    self.idle.fetch_sub(1, SeqCst);
                    match woken {
                        Ok(0) => {
                            // Idle for ENROLL_THREAD_IDLE: a surplus thread ends.
                            let left = self.threads.fetch_sub(1, SeqCst) - 1;
                            if left >= SPARE_ENROLL_THREADS {
                                return;
                            }
                            self.threads.fetch_add(1, SeqCst);
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "waiting for enrollments failed");
                            self.daemon.count_error("enroll_accept");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "enrollment socket accept failed");
                    self.daemon.count_error("enroll_accept");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Some(turn) = self.turn_for(&stream) else {
                continue;
            };
            // No thread is left waiting: another one takes over the waiting.
            if self.idle.load(SeqCst) == 0 {
                if self.threads.load(SeqCst) < MAX_ENROLL_THREADS {
                    if let Err(e) = Self::spawn(&self) {
                        tracing::warn!(error = %e, "cannot start an enrollment thread");
                        self.daemon.count_error("enroll_thread");
                    }
                } else {
                    tracing::warn!(
                        "{MAX_ENROLL_THREADS} enrollments in progress; further ones wait their turn"
                    );
                    self.daemon.count_error("enroll_busy");
                }
            }
            // A connection that panics must not take the pool with it.
            let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                enroll_connection(stream, turn, &self.daemon, &self.rt)
            }));
            match handled {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "enrollment connection failed"),
                Err(_) => {
                    tracing::error!("an enrollment panicked; the enrollment socket goes on");
                    self.daemon.count_error("enroll_panic");
                }
            }
        }
    }
}

/// A stream whose reads and writes give up at a deadline: the whole exchange is bounded, not
/// each operation (a client trickling bytes cannot hold a thread for long). Reads wait in
/// `poll` until the deadline (see [`enroll::read_when_readable`]); the socket's send timeout
/// is set again only when the time left has shrunk by a quarter, which keeps the bound
/// within 4/3 of the deadline at a fraction of the system calls.
struct Deadline {
    sock: std::os::unix::net::UnixStream,
    until: std::time::Instant,
    write_timeout: Option<Duration>,
}

impl Deadline {
    fn new(sock: std::os::unix::net::UnixStream, within: Duration) -> Self {
        Self {
            sock,
            until: std::time::Instant::now() + within,
            write_timeout: None,
        }
    }

    /// The time left, and whether a timeout set earlier must shrink to it.
    fn left(&self, set: Option<Duration>) -> std::io::Result<Option<Duration>> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the enrollment took too long",
            ));
        }
        Ok(match set {
            Some(t) if left * 4 >= t * 3 => None,
            _ => Some(left),
        })
    }
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        enroll::read_when_readable(&self.sock, buf, self.until, "the enrollment took too long")
    }
}

impl std::io::Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(t) = self.left(self.write_timeout)? {
            self.sock.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.sock.write(buf)
    }

    // rustls hands over a flight as several records: one writev, one wake-up of the client.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        if let Some(t) = self.left(self.write_timeout)? {
            self.sock.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// Serves one connection. `turn` is its place among the enrollments in progress: given back
/// once the answer is known, before it is written, so that a client that connects again as
/// soon as it reads the answer finds it free.
fn enroll_connection(
    stream: std::os::unix::net::UnixStream,
    turn: PeerTurn<'_>,
    daemon: &Daemon,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    use std::io::{BufRead as _, Read as _, Write as _};
    // The peer is identified from the socket before any byte is read.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)
        .and_then(|cred| {
            Peer::of_socket(
                stream.as_raw_fd(),
                Some(cred.pid()),
                cred.uid(),
                cred.gid(),
                &|id| daemon.enrollments.cgroup_path(&daemon.mount, id),
            )
            .map_err(std::io::Error::other)
        });
    let tls_config = daemon
        .identity
        .server_tls()
        .map_err(std::io::Error::other)?;
    let conn = rustls::ServerConnection::new(tls_config).map_err(std::io::Error::other)?;
    let sock = Deadline::new(stream, enroll::CLIENT_TIMEOUT);
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut line = String::new();
    std::io::BufReader::new((&mut tls).take(enroll::MAX_LINE as u64)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<EnrollRequest>(line.trim_end()) {
        Err(e) => refuse(format!(
            "bad request: {e}; send one JSON line such as {{\"op\":\"enroll\"}}"
        )),
        Ok(req) => match &peer {
            Err(e) => refuse(format!("cannot identify the enrolling process: {e}")),
            Ok(peer) => {
                let chain: Vec<CertificateDer<'static>> = tls
                    .conn
                    .peer_certificates()
                    .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                    .unwrap_or_default();
                match req {
                    EnrollRequest::Enroll => rt.block_on(daemon.enroll(peer, &chain)),
                    EnrollRequest::Token { audience } => daemon.token(peer, &chain, &audience),
                }
            }
        },
    };
    match &reply {
        EnrollReply::Error { message } => {
            tracing::warn!(%message, pid = peer.as_ref().map(|p| p.pid).unwrap_or(0), "enrollment refused");
            daemon.count_error("enroll_refused");
            daemon
                .audit
                .record(&crate::audit::schema::AuditRecord::EnrollRefused {
                    reason: message.clone(),
                    pid: peer.as_ref().map(|p| p.pid).ok(),
                    uid: peer.as_ref().map(|p| p.uid).ok(),
                    exe: peer.as_ref().map(|p| p.exe.display().to_string()).ok(),
                    cgroup: peer.as_ref().map(|p| p.cgroup.clone()).ok(),
                });
        }
        EnrollReply::Token {
            spiffe_id,
            expires_at,
            ..
        } => daemon
            .audit
            .record(&crate::audit::schema::AuditRecord::TokenIssued {
                spiffe_id: spiffe_id.clone(),
                expires_at: expires_at.clone(),
            }),
        EnrollReply::Enrolled(_) => {}
    }
    // The answer is known: the enrollment is no longer in progress. What is left is one
    // write of a small reply, which the socket's buffer takes at once (and the deadline
    // bounds), so the turn does not protect the pool any longer.
    drop(turn);
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    // The reply and the close_notify leave in one write.
    tls.conn.writer().write_all(&out)?;
    tls.conn.send_close_notify();
    tls.flush()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn a_silent_client_is_dropped_at_the_deadline() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut d = Deadline::new(a, Duration::from_millis(50));
        let t = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let e = d.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        // Past the deadline nothing is even tried.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            d.read(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
    }
}
