//! The daemon side of the admin socket.

use std::{io, os::fd::AsRawFd as _, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
};

use super::{
    MAX_LINE, Reply, Request,
    waiting::{Class, Ready, Waiting},
};
use crate::daemon::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] crate::unixsock::ListenError),
    #[error("admin socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub gid: Option<u32>,
}

/// Binds the admin socket: 0600, or 0660 for a configured group.
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, Access), ServerError> {
    let gid = crate::unixsock::group_id(group)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let listener = crate::unixsock::bind_unix(path, mode, None, group)?;
    Ok((listener, Access { gid }))
}

/// Longest a client may take to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the admin socket from a thread of its own, at real-time priority when the daemon
/// may have it, so that a revocation is read and reaches the kernel at once even while agents
/// keep every CPU busy (a normal thread can wait a scheduler tick, 4 ms, before it runs). The
/// thread waits on every connection that has not sent its request line yet at once (see
/// [`super::waiting`]), handles a revocation or a quarantine itself, and sends every other
/// request with its connection to the async runtime at normal priority. Only root (or the
/// admin group) can connect at all (mode 0600 or 0660), so no agent can make this thread
/// run; a client that connects and sends nothing holds a place of its class (root, the admin
/// group, a confined unit's `enforce_self`) for at most [`REQUEST_TIMEOUT`], and no one
/// else's time.
///
/// Connections handed to the runtime hold a place in `slots` until they end (see
/// [`crate::limits`]); beyond its cap a request is refused with a message.
pub fn serve_on_thread(
    listener: UnixListener,
    access: Access,
    daemon: Arc<Daemon>,
    slots: Arc<crate::limits::Slots>,
    watch: crate::supervise::Watch,
) -> io::Result<()> {
    let rt = tokio::runtime::Handle::current();
    let listener = listener.into_std()?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("agentwall-admin".into())
        .spawn(move || {
            let _watch = watch;
            crate::supervise::fault_point("admin");
            if let Err(e) = crate::sched::set_realtime() {
                tracing::info!(error = %e, "admin socket: no real-time scheduling (CAP_SYS_NICE?); under load a revocation may wait for a CPU");
                crate::sched::latency_critical("agentwall-admin");
            }
            crate::sched::may_block_here();
            let mut waiting = Waiting::new(REQUEST_TIMEOUT, MAX_LINE);
            loop {
                let round = waiting.wait(&listener);
                if round.expired > 0 {
                    tracing::debug!(
                        connections = round.expired,
                        "admin connections ended without a request"
                    );
                }
                // Requests first: a revocation does not wait for the connections behind it.
                for ready in round.ready {
                    // A request that panics must not take the admin socket with it.
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        answer(ready, &daemon, &rt, &slots)
                    }));
                    match handled {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "admin connection ended with an error");
                        }
                        Err(_) => {
                            tracing::error!("admin request panicked; the admin socket goes on");
                            daemon.count_error("admin_panic");
                        }
                    }
                }
                if round.incoming {
                    accept_some(&listener, access, &daemon, &mut waiting, &rt, &slots);
                }
            }
        })?;
    Ok(())
}

/// Connections accepted at most before the lines that came are read again: a flood of
/// connections cannot keep the thread from answering.
const ACCEPT_BURST: usize = 16;

/// Accepts the connections the listener holds, [`ACCEPT_BURST`] at most: refused at once if
/// the peer may not use the socket, else it waits for its request line among its class.
fn accept_some(
    listener: &std::os::unix::net::UnixListener,
    access: Access,
    daemon: &Arc<Daemon>,
    waiting: &mut Waiting<(u32, i32)>,
    rt: &tokio::runtime::Handle,
    slots: &Arc<crate::limits::Slots>,
) {
    for _ in 0..ACCEPT_BURST {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                daemon.count_error("admin_accept");
                std::thread::sleep(std::time::Duration::from_millis(10));
                return;
            }
        };
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let peer = match allowed_fd(stream.as_raw_fd(), access) {
            Ok(peer) => peer,
            Err(refused) => {
                tracing::warn!(message = %refused, "admin socket: peer refused");
                daemon.count_error("admin_refused");
                let _ = write_blocking(
                    &stream,
                    &Reply::Error {
                        message: refused.to_string(),
                    },
                );
                continue;
            }
        };
        let class = if daemon.peer_confined(peer.1) {
            Class::Confined
        } else if peer.0 == 0 {
            Class::Root
        } else {
            Class::Group
        };
        match waiting.add(stream, peer, class) {
            Ok(None) => {}
            Ok(Some(ready @ Ready::Line { .. })) => {
                if let Err(e) = answer(ready, daemon, rt, slots) {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            }
            Ok(Some(evicted)) => {
                daemon.count_error("admin_waiting_evicted");
                let _ = answer_without_line(evicted);
            }
            Err(e) => tracing::debug!(error = %e, "admin connection could not wait"),
        }
    }
}

/// The error reply of a connection that has no request to answer.
fn answer_without_line(ready: Ready<(u32, i32)>) -> io::Result<()> {
    let (stream, message) = match ready {
        Ready::TooLong { stream, max } => (stream, format!("request longer than {max} bytes")),
        Ready::Evicted { stream } => (
            stream,
            "too many admin connections of this kind of peer were waiting to send a request; \
             this one had waited longest. Send the request line right after connecting"
                .to_string(),
        ),
        Ready::Fragmented { stream } => (
            stream,
            "the request line came in too many pieces; send it in one write".to_string(),
        ),
        Ready::Line { .. } => return Ok(()),
    };
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write_blocking(&stream, &Reply::Error { message })
}

fn write_blocking(mut s: &std::os::unix::net::UnixStream, reply: &Reply) -> io::Result<()> {
    use std::io::Write as _;
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// A connection whose request line is complete, on the admin thread: the handling of a
/// revocation or quarantine here, or a hand-over to the runtime.
fn answer(
    ready: Ready<(u32, i32)>,
    daemon: &Arc<Daemon>,
    rt: &tokio::runtime::Handle,
    slots: &Arc<crate::limits::Slots>,
) -> io::Result<()> {
    let Ready::Line {
        stream,
        peer: (uid, pid),
        line,
    } = ready
    else {
        return answer_without_line(ready);
    };
    // The line may carry a secret's value: wiped once parsed.
    let line = zeroize::Zeroizing::new(line);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let req: Request = match serde_json::from_slice(line.trim_ascii_end()) {
        Ok(r) => r,
        Err(e) => {
            let message = format!(
                "bad request: {e}; send one JSON object per line, such as {{\"op\":\"status\"}}"
            );
            return write_blocking(&stream, &Reply::Error { message });
        }
    };
    tracing::debug!(?req, uid, "admin request");
    if !matches!(req, Request::EnforceSelf) && daemon.peer_confined(pid) {
        daemon.count_error("admin_refused");
        let message = "a process of a cgroup agentwall confines may only ask enforce_self here; \
                       run admin commands from outside the agents' cgroups"
            .to_string();
        tracing::warn!(pid, %message, "admin socket: peer refused");
        return write_blocking(&stream, &Reply::Error { message });
    }
    match req {
        Request::Revoke { target, reason } => {
            let reply = wire::reply(rt.block_on(daemon.revoke(&target, &reason, uid)));
            write_blocking(&stream, &reply)
        }
        Request::Quarantine { cgroup, lift } => {
            let reply = wire::reply(rt.block_on(daemon.quarantine(&cgroup, lift)));
            write_blocking(&stream, &reply)
        }
        // The peer's own cgroup, read while it waits for the answer.
        Request::EnforceSelf => {
            let reply = wire::reply(rt.block_on(daemon.enforce_self(pid)));
            write_blocking(&stream, &reply)
        }
        req => {
            let Some(slot) = slots.take() else {
                daemon.count_error("admin_busy_refused");
                tracing::warn!(
                    max = slots.max(),
                    "admin socket: a request refused, every connection place is taken"
                );
                let message = slots.refusal();
                return write_blocking(&stream, &Reply::Error { message });
            };
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
            stream.set_nonblocking(true)?;
            let _entered = rt.enter();
            let stream = UnixStream::from_std(stream)?;
            let daemon = Arc::clone(daemon);
            rt.spawn(async move {
                if let Err(e) = dispatch(stream, req, uid, daemon).await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
                drop(slot);
            });
            Ok(())
        }
    }
}

fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / size_of::<u32>());
    groups
}

/// Why a peer of the admin socket is turned away.
#[derive(Debug, thiserror::Error)]
enum PeerRefused {
    #[error("cannot read peer credentials: {0}")]
    Credentials(nix::errno::Errno),
    #[error("uid {0} may not use the admin socket (root or the configured admin group only)")]
    NotAllowed(u32),
}

/// The peer's uid and pid if it may use the admin socket: root, or a member of the admin
/// group.
fn allowed_fd(fd: std::os::fd::RawFd, access: Access) -> Result<(u32, i32), PeerRefused> {
    // SAFETY: `fd` is the accepted socket, open for the duration of this call.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(PeerRefused::Credentials)?;
    if cred.uid() == 0 {
        return Ok((0, cred.pid()));
    }
    if let Some(gid) = access.gid
        && (cred.gid() == gid || peer_groups(fd).contains(&gid))
    {
        return Ok((cred.uid(), cred.pid()));
    }
    Err(PeerRefused::NotAllowed(cred.uid()))
}

async fn write(w: &mut OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    // A reply may carry a secret's value: the line is wiped once sent.
    let mut line = zeroize::Zeroizing::new(serde_json::to_vec(reply).map_err(io::Error::other)?);
    line.push(b'\n');
    w.write_all(&line).await
}

/// Answers a request whose line the admin thread read; the connection stays for requests
/// that go on (an exec lease, the event stream).
async fn dispatch(
    stream: UnixStream,
    req: Request,
    uid: u32,
    daemon: Arc<Daemon>,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let reader = BufReader::new(r);
    match req {
        Request::Status => write(&mut w, &Reply::Status(Box::new(daemon.status().await))).await,
        Request::EnforceSelf => {
            write(
                &mut w,
                &Reply::Error {
                    message: "enforce_self is answered where the peer is known".into(),
                },
            )
            .await
        }
        Request::Reload => write(&mut w, &wire::reply(daemon.reload().await)).await,
        Request::Quarantine { cgroup, lift } => {
            let r = daemon.quarantine(&cgroup, lift).await;
            write(&mut w, &wire::reply(r)).await
        }
        Request::ExecBegin {
            policy,
            audience,
            identity,
            secrets,
        } => {
            let ready = daemon
                .exec_begin(policy.as_deref(), audience, identity.as_deref(), secrets)
                .await;
            let lease = ready.as_ref().ok().map(|r| r.cgroup_id);
            let written = write(&mut w, &wire::reply(ready)).await;
            if let Some(lease) = lease {
                // The lease lasts until the client closes the connection (or sends anything);
                // a client gone before the reply ends it at once.
                if written.is_ok() {
                    let mut rest = String::new();
                    let mut reader = reader;
                    let _ = reader.read_line(&mut rest).await;
                }
                daemon.exec_end(lease).await;
            }
            written
        }
        Request::Revoke { target, reason } => {
            let r = daemon.revoke(&target, &reason, uid).await;
            write(&mut w, &wire::reply(r)).await
        }
        Request::Revocations => {
            let entries = daemon.revocations();
            write(&mut w, &Reply::Revocations { entries }).await
        }
        Request::Check { pem } => write(&mut w, &wire::reply(daemon.check(&pem))).await,
        Request::Rotate => write(&mut w, &wire::reply(daemon.rotate().await)).await,
        Request::Jwks => {
            let jwks = daemon.jwks();
            write(&mut w, &Reply::Jwks { jwks }).await
        }
        Request::RotateAuditKey => {
            write(&mut w, &wire::reply(daemon.rotate_audit_key().await)).await
        }
        Request::SecretPut { path, value } => {
            use base64::Engine as _;
            let by = format!("uid {uid}");
            let r = match base64::engine::general_purpose::STANDARD.decode(&value.0) {
                Ok(bytes) => daemon.secret_put(&path, bytes, &by).await,
                Err(e) => Err(crate::daemon::AdminError::Secret(
                    crate::secrets::SecretError::BadValue(format!("the value is not base64: {e}")),
                )),
            };
            write(&mut w, &wire::reply(r)).await
        }
        Request::SecretGet { path, version } => {
            let r = daemon
                .secret_get(&path, version, &format!("uid {uid}"))
                .await;
            write(&mut w, &wire::reply(r)).await
        }
        Request::SecretList { prefix } => {
            let r = daemon.secret_list(&prefix, &format!("uid {uid}")).await;
            write(
                &mut w,
                &wire::reply(r.map(|entries| Reply::Secrets { entries })),
            )
            .await
        }
        Request::SecretRemove { path } => {
            let r = daemon.secret_remove(&path, &format!("uid {uid}")).await;
            let r = r.map(|existed| Reply::Done {
                message: if existed {
                    format!("removed {path} and every version of it")
                } else {
                    format!("no secret {path}; nothing removed")
                },
            });
            write(&mut w, &wire::reply(r)).await
        }
        Request::SecretLeases => {
            let leases = daemon.secret_leases();
            write(&mut w, &Reply::SecretLeases { leases }).await
        }
        Request::SecretRotateKey => {
            let r = daemon.secret_rotate_key(&format!("uid {uid}")).await;
            write(&mut w, &wire::reply(r)).await
        }
        Request::CheckToken { token, audience } => {
            let c = daemon.check_token(&token, &audience);
            write(&mut w, &Reply::from(c)).await
        }
        Request::Events => {
            let mut rx = daemon.subscribe();
            // Acknowledged once subscribed, so a client can act knowing it will see the verdicts.
            write(
                &mut w,
                &Reply::Done {
                    message: "subscribed".into(),
                },
            )
            .await?;
            // A subscriber that went away ends its stream at once, not at the next event: its
            // connection holds one of the admin socket's places (see `crate::limits`).
            let mut reader = reader;
            let mut rest = String::new();
            loop {
                let got = tokio::select! {
                    got = rx.recv() => got,
                    // End of stream, or anything sent: the subscriber is done.
                    _ = reader.read_line(&mut rest) => return Ok(()),
                };
                let reply = match got {
                    Ok(e) => Reply::Event(Box::new((*e).clone())),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        Reply::Lagged { missed }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                };
                write(&mut w, &reply).await?;
            }
        }
    }
}

/// The daemon's typed results, as the admin socket's replies: one `From` per result, and
/// [`wire::reply`] for a result or its error.
mod wire {
    use super::Reply;
    use crate::daemon::{
        AdminError, Checked, ExecReady, KeyRotated, Quarantined, Reloaded, Revoked, Rotated,
        SelfEnforced,
    };

    /// The reply to a request the daemon answered with `r`.
    pub(super) fn reply<T: Into<Reply>>(r: Result<T, AdminError>) -> Reply {
        match r {
            Ok(t) => t.into(),
            Err(e) => Reply::Error {
                message: e.to_string(),
            },
        }
    }

    fn done(message: String) -> Reply {
        Reply::Done { message }
    }

    impl From<crate::secrets::Secret> for Reply {
        fn from(s: crate::secrets::Secret) -> Self {
            use base64::Engine as _;
            Reply::Secret {
                path: s.path.to_string(),
                version: s.version,
                created: s.created,
                value: crate::control::SecretText(
                    base64::engine::general_purpose::STANDARD.encode(s.value.expose()),
                ),
            }
        }
    }

    impl From<crate::daemon::SecretStored> for Reply {
        fn from(s: crate::daemon::SecretStored) -> Self {
            Reply::SecretStored {
                path: s.path,
                version: s.version,
            }
        }
    }

    impl From<crate::daemon::SecretKeyRotated> for Reply {
        fn from(r: crate::daemon::SecretKeyRotated) -> Self {
            done(format!(
                "the secret store's master key is now {}; {} secret(s) rewrapped under it, each under a fresh data key. The retired keys stay below it in the key file, and are trusted while they are there: remove them once no older backup of the store matters, and at once after a suspected compromise",
                r.key_id, r.rewrapped
            ))
        }
    }

    impl From<ExecReady> for Reply {
        fn from(r: ExecReady) -> Self {
            Reply::ExecReady {
                cgroup: r.cgroup,
                cgroup_id: r.cgroup_id,
                enroll: r.enroll,
                workload: r.workload,
                protect: r.protect,
                secrets_dir: r.secrets_dir,
            }
        }
    }

    impl From<Revoked> for Reply {
        fn from(r: Revoked) -> Self {
            Reply::Revoked {
                target: r.target,
                new: r.new,
                cgroups: r.cgroups,
                sockets_destroyed: r.sockets_destroyed,
                not_persisted: r.not_persisted,
            }
        }
    }

    impl From<Checked> for Reply {
        fn from(c: Checked) -> Self {
            Reply::Checked {
                valid: c.valid,
                spiffe_id: c.spiffe_id,
                serial: c.serial,
                not_after: c.not_after,
                message: c.message,
            }
        }
    }

    impl From<Reloaded> for Reply {
        fn from(r: Reloaded) -> Self {
            Reply::Reloaded {
                generation: r.generation,
                policies: r.policies,
                rule_nodes: r.rule_nodes,
            }
        }
    }

    impl From<Rotated> for Reply {
        fn from(r: Rotated) -> Self {
            done(format!(
                "renewed {} agent certificates and {} secret leases",
                r.renewed, r.credentials
            ))
        }
    }

    impl From<Quarantined> for Reply {
        fn from(q: Quarantined) -> Self {
            let what = if q.lift {
                "released"
            } else {
                "quarantined: every flow denied"
            };
            done(format!("cgroup {} {what}", q.cgroup_id))
        }
    }

    impl From<SelfEnforced> for Reply {
        fn from(s: SelfEnforced) -> Self {
            done(format!(
                "cgroup /{} (id {}) is enforced under policy {}",
                s.cgroup, s.cgroup_id, s.policy
            ))
        }
    }

    impl From<KeyRotated> for Reply {
        fn from(k: KeyRotated) -> Self {
            done(format!(
                "audit key {} retired, {} in use from the next record on (a new segment); {} \
                 holds both: keep it (or a copy off the host) to read the log",
                k.from,
                k.to,
                k.key_file.display()
            ))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_result_becomes_its_reply_and_an_error_its_message() {
            let ok = reply(Ok(Rotated {
                renewed: 2,
                credentials: 1,
            }));
            assert!(
                matches!(ok, Reply::Done { message } if message == "renewed 2 agent certificates and 1 secret leases")
            );
            let err = reply::<Rotated>(Err(AdminError::NoReason));
            let Reply::Error { message } = err else {
                panic!("an error reply");
            };
            assert_eq!(message, AdminError::NoReason.to_string());
            let q = reply(Ok(Quarantined {
                cgroup_id: 9,
                lift: false,
                sockets_destroyed: 1,
            }));
            assert!(
                matches!(q, Reply::Done { message } if message == "cgroup 9 quarantined: every flow denied")
            );
        }
    }
}
