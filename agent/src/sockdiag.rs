//! Destroying the open sockets of cgroups (sock_diag SOCK_DESTROY over netlink), and finding
//! the cgroup of the process that opened a TCP connection to the daemon ([`PeerCgroups`]).
//!
//! Changing a verdict stops new flows at once; flows already open are cut by destroying their
//! sockets: the local side gets ECONNABORTED, a TCP peer gets a reset. Sockets are found by
//! dumping every TCP and UDP socket of both families with their cgroup id
//! (INET_DIAG_CGROUP_ID, Linux 5.8), which is the cgroup of the process that created the socket.
//! Needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN.
//!
//! A TCP dump walks the whole established-socket hash table (262144 buckets on a small VM,
//! ~0.2 ms), whatever the number of sockets, and a dump per family walks it twice; the older
//! TCPDIAG_GETSOCK request dumps both families in one walk, so it is asked first (the
//! per-family dumps remain the fallback). UDP tables are small: one dump per family.
//!
//! A dump lists the sockets of one network namespace, the caller's. Agents in containers have
//! namespaces of their own: the namespaces the processes of the cgroups are in are found
//! through /proc/PID/ns/net and each is searched from a short-lived thread that joins it.

use std::{
    collections::HashSet,
    fs, io,
    ops::ControlFlow,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

use crate::cgroup::Walk;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The first inet_diag request: TCP sockets of every family (`struct inet_diag_req`).
const TCPDIAG_GETSOCK: u16 = 18;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_CGROUP_ID: u16 = 21;

const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_req`: family, source and destination prefix lengths, extensions, the
/// socket id, states, tables.
const REQ_V1_LEN: usize = 4 + SOCKID_LEN + 8;
/// Every state.
const ALL_STATES: u32 = u32::MAX;
/// TCP states whose sockets a process holds: not TIME_WAIT (6), which no process owns and
/// which carries no cgroup, nor NEW_SYN_RECV (12), a listener's half-open request. A host
/// that makes many short connections has thousands in TIME_WAIT; leaving them out of the
/// dump spares filling, sending and reading a message for each.
const TCP_HELD_STATES: u32 = !((1 << 6) | (1 << 12));
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// What a destruction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Destroyed {
    pub sockets: u32,
    /// Sockets that could not be destroyed (other than those already gone).
    pub failed: u32,
}

impl std::ops::Add for Destroyed {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            sockets: self.sockets.saturating_add(o.sockets),
            failed: self.failed.saturating_add(o.failed),
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        proto: u8,
        states: u32,
        id: &[u8; SOCKID_LEN],
    ) -> io::Result<u32> {
        let mut body = Vec::with_capacity(REQ_LEN);
        body.extend_from_slice(&[family, proto, 0, 0]);
        body.extend_from_slice(&states.to_ne_bytes());
        body.extend_from_slice(id);
        self.send_body(kind, flags, &body)
    }

    fn send_body(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is a valid buffer of the given length; the kernel is the destination
        // because the socket is unbound and netlink sends to pid 0 by default.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a buffer we own, of the given length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Family and socket id of the `family`/`proto` sockets that belong to one of `cgroups`.
    fn dump(
        &mut self,
        family: u8,
        proto: u8,
        cgroups: &HashSet<u64>,
    ) -> io::Result<Vec<(u8, [u8; SOCKID_LEN])>> {
        let states = if proto == libc::IPPROTO_TCP as u8 {
            TCP_HELD_STATES
        } else {
            ALL_STATES
        };
        let seq = self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            proto,
            states,
            &[0; SOCKID_LEN],
        )?;
        self.collect(seq, SOCK_DIAG_BY_FAMILY, cgroups)
    }

    /// Family and socket id of the TCP sockets of both families that belong to one of
    /// `cgroups`, in one walk of the hash tables (TCPDIAG_GETSOCK).
    fn dump_tcp(&mut self, cgroups: &HashSet<u64>) -> io::Result<Vec<(u8, [u8; SOCKID_LEN])>> {
        let mut body = Vec::with_capacity(REQ_V1_LEN);
        body.extend_from_slice(&[0, 0, 0, 0]);
        body.extend_from_slice(&[0; SOCKID_LEN]);
        body.extend_from_slice(&TCP_HELD_STATES.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        let seq = self.send_body(TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, &body)?;
        self.collect(seq, TCPDIAG_GETSOCK, cgroups)
    }

    /// Reads the replies of dump `seq` (messages of type `kind`) up to its end.
    fn collect(
        &mut self,
        seq: u32,
        kind_wanted: u16,
        cgroups: &HashSet<u64>,
    ) -> io::Result<Vec<(u8, [u8; SOCKID_LEN])>> {
        let mut found = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + NLMSG_HDR <= n {
                let h = &buf[off..];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let mseq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                if len < NLMSG_HDR || off + len > n {
                    return Err(io::Error::other("malformed sock_diag reply"));
                }
                if mseq == seq {
                    match kind {
                        NLMSG_DONE => return Ok(found),
                        NLMSG_ERROR => {
                            let code = i32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        k if k == kind_wanted && len >= NLMSG_HDR + MSG_LEN => {
                            let body = &h[NLMSG_HDR..len];
                            if socket_cgroup(body).is_some_and(|c| cgroups.contains(&c)) {
                                let mut id = [0u8; SOCKID_LEN];
                                id.copy_from_slice(&body[4..4 + SOCKID_LEN]);
                                found.push((body[0], id));
                            }
                        }
                        _ => {}
                    }
                }
                off += align4(len);
            }
        }
    }

    fn destroy(&mut self, family: u8, proto: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        let seq = self.send(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            proto,
            ALL_STATES,
            id,
        )?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.recv(&mut buf)?;
            if n < NLMSG_HDR + 4 {
                return Err(io::Error::other("short sock_diag ack"));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let mseq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if mseq != seq || kind != NLMSG_ERROR {
                continue;
            }
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            };
        }
    }
}

/// The INET_DIAG_CGROUP_ID attribute of one `inet_diag_msg` with its attributes.
fn socket_cgroup(body: &[u8]) -> Option<u64> {
    let mut off = MSG_LEN;
    while off + 4 <= body.len() {
        let len = u16::from_ne_bytes([body[off], body[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([body[off + 2], body[off + 3]]) & 0x3fff;
        if len < 4 || off + len > body.len() {
            return None;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            let v = &body[off + 4..off + 12];
            return Some(u64::from_ne_bytes(v.try_into().ok()?));
        }
        off += align4(len);
    }
    None
}

/// Destroys every TCP and UDP socket (IPv4 and IPv6) created in one of `cgroups`.
pub fn destroy_sockets(cgroups: &HashSet<u64>) -> io::Result<Destroyed> {
    let mut out = Destroyed::default();
    if cgroups.is_empty() {
        return Ok(out);
    }
    let mut nl = Netlink::open()?;
    let families = [libc::AF_INET as u8, libc::AF_INET6 as u8];
    let (tcp, udp) = (libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8);
    let mut targets: Vec<(u8, u8, [u8; SOCKID_LEN])> = Vec::new();
    match nl.dump_tcp(cgroups) {
        Ok(found) => targets.extend(found.into_iter().map(|(f, id)| (f, tcp, id))),
        Err(e) => {
            tracing::debug!(error = %e, "TCPDIAG_GETSOCK refused; dumping TCP per family");
            for family in families {
                targets.extend(
                    nl.dump(family, tcp, cgroups)?
                        .into_iter()
                        .map(|(f, id)| (f, tcp, id)),
                );
            }
        }
    }
    for family in families {
        targets.extend(
            nl.dump(family, udp, cgroups)?
                .into_iter()
                .map(|(f, id)| (f, udp, id)),
        );
    }
    for (family, proto, id) in targets {
        match nl.destroy(family, proto, &id) {
            Ok(()) => out.sockets += 1,
            // Closed meanwhile: nothing left to cut.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                tracing::warn!(error = %e, family, proto, "cannot destroy a socket");
                out.failed += 1;
            }
        }
    }
    Ok(out)
}

/// At most this many cgroup directories are read when looking for network namespaces (an
/// agent's cgroup and its descendants).
const MAX_CGROUP_DIRS: usize = 4096;
/// At most this many namespaces are searched (each search walks the whole TCP hash table): an
/// agent that makes thousands (user namespaces let it) cannot stall a revocation for long.
/// Sockets beyond them stay open, their packets dropped by the backstop.
const MAX_NAMESPACES: usize = 256;

/// The socket id (`struct inet_diag_sockid`) of the TCP socket bound to `local` and
/// connected to `remote`, with no cookie.
fn sockid(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> [u8; SOCKID_LEN] {
    fn addr(ip: std::net::IpAddr) -> [u8; 16] {
        let mut a = [0u8; 16];
        match ip {
            std::net::IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => a.copy_from_slice(&v6.octets()),
        }
        a
    }
    let mut id = [0u8; SOCKID_LEN];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    id[4..20].copy_from_slice(&addr(local.ip()));
    id[20..36].copy_from_slice(&addr(remote.ip()));
    // Interface 0 (any), and INET_DIAG_NOCOOKIE.
    id[40..48].copy_from_slice(&[0xff; 8]);
    id
}

/// Finds which cgroup opened the client end of a TCP connection accepted on this host: the
/// client socket is looked up by its addresses (one netlink round trip), and its
/// INET_DIAG_CGROUP_ID read.
#[derive(Debug)]
pub struct PeerCgroups(Netlink);

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

impl PeerCgroups {
    pub fn open() -> io::Result<Self> {
        Netlink::open().map(Self)
    }

    /// The cgroup id of the process that made the connection whose server end is bound to
    /// `local` and connected from `peer`; `None` if no socket of this network namespace has
    /// those addresses (the client is elsewhere) or it carries no cgroup.
    pub fn of(
        &mut self,
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> io::Result<Option<u64>> {
        let family = if peer.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        let nl = &mut self.0;
        let seq = nl.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            family,
            libc::IPPROTO_TCP as u8,
            ALL_STATES,
            &sockid(peer, local),
        )?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = nl.recv(&mut buf)?;
            let mut off = 0;
            while off + NLMSG_HDR <= n {
                let h = &buf[off..n];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let mseq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                if len < NLMSG_HDR || len > h.len() {
                    return Err(io::Error::other("malformed sock_diag reply"));
                }
                if mseq == seq {
                    match kind {
                        NLMSG_ERROR if len >= NLMSG_HDR + 4 => {
                            let code = i32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
                            return match -code {
                                0 | libc::ENOENT => Ok(None),
                                e => Err(io::Error::from_raw_os_error(e)),
                            };
                        }
                        SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_LEN => {
                            return Ok(socket_cgroup(&h[NLMSG_HDR..len]));
                        }
                        _ => return Err(io::Error::other("unexpected sock_diag reply")),
                    }
                }
                off += align4(len);
            }
        }
    }
}

/// The network namespaces, other than this thread's, that processes of the cgroups at `dirs`
/// or of their descendants are in: one handle each.
pub fn foreign_namespaces(dirs: &[PathBuf]) -> Vec<OwnedFd> {
    let Ok(own) = fs::metadata("/proc/thread-self/ns/net") else {
        return Vec::new();
    };
    let mut seen = HashSet::from([(own.dev(), own.ino())]);
    let mut out = Vec::new();
    let walk = crate::cgroup::for_each_process_below(dirs, MAX_CGROUP_DIRS, |pid| {
        // A process gone meanwhile has no socket left to cut.
        let Ok(f) = fs::File::open(format!("/proc/{pid}/ns/net")) else {
            return ControlFlow::Continue(());
        };
        if let Ok(m) = f.metadata()
            && seen.insert((m.dev(), m.ino()))
        {
            if out.len() == MAX_NAMESPACES {
                return ControlFlow::Break(());
            }
            out.push(OwnedFd::from(f));
        }
        ControlFlow::Continue(())
    });
    match walk {
        Walk::Done => {}
        Walk::Stopped => tracing::warn!(
            max = MAX_NAMESPACES,
            "too many network namespaces to search; their other sockets are left to the packet backstop"
        ),
        Walk::TooManyCgroups => tracing::warn!(
            max = MAX_CGROUP_DIRS,
            "too many cgroups to search for network namespaces; the rest are left to the packet backstop"
        ),
    }
    out
}

/// `destroy_sockets` in this thread's network namespace, then in each of `namespaces` from a
/// thread that joins it (the daemon's own threads stay where they are). A namespace that
/// cannot be searched counts as one failure; an error in this thread's own is returned after
/// the others were searched.
pub fn destroy_sockets_in(cgroups: &HashSet<u64>, namespaces: &[OwnedFd]) -> io::Result<Destroyed> {
    let own = destroy_sockets(cgroups);
    let mut total = own.as_ref().map_or_else(|_| Destroyed::default(), |d| *d);
    for ns in namespaces {
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                destroy_sockets(cgroups)
            })
            .join()
        });
        match got {
            Ok(Ok(d)) => {
                total.sockets += d.sockets;
                total.failed += d.failed;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot destroy sockets in an agent's network namespace");
                total.failed += 1;
            }
            Err(_) => total.failed += 1,
        }
    }
    own.map(|_| total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_attribute_is_found_among_others() {
        let mut body = vec![0u8; MSG_LEN];
        // An unrelated 5-byte attribute (padded to 8), then the cgroup id.
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&15u16.to_ne_bytes());
        body.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&4242u64.to_ne_bytes());
        assert_eq!(socket_cgroup(&body), Some(4242));
        assert_eq!(socket_cgroup(&body[..MSG_LEN + 8]), None);
        // A length running past the end is not trusted.
        let mut bad = vec![0u8; MSG_LEN];
        bad.extend_from_slice(&200u16.to_ne_bytes());
        bad.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        assert_eq!(socket_cgroup(&bad), None);
    }

    #[test]
    fn one_tcp_walk_finds_the_sockets_of_both_families() {
        use std::net::{TcpListener, TcpStream};
        // This process's cgroup, where its sockets are counted.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim_start_matches('/')
            .to_string();
        let mount = crate::cgroup::cgroup2_mount().unwrap();
        let id = crate::cgroup::Cgroup::under(&mount, &rel)
            .unwrap()
            .id()
            .unwrap();
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = TcpListener::bind("[::1]:0").unwrap();
        let c4 = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
        let c6 = TcpStream::connect(l6.local_addr().unwrap()).unwrap();
        let ports = [
            (libc::AF_INET as u8, c4.local_addr().unwrap().port()),
            (libc::AF_INET6 as u8, c6.local_addr().unwrap().port()),
        ];
        let cgroups = HashSet::from([id]);
        let mut nl = Netlink::open().unwrap();
        let sport = |id: &[u8; SOCKID_LEN]| u16::from_be_bytes([id[0], id[1]]);
        let one: Vec<(u8, u16)> = nl
            .dump_tcp(&cgroups)
            .unwrap()
            .iter()
            .map(|(f, id)| (*f, sport(id)))
            .collect();
        for want in ports {
            assert!(one.contains(&want), "{want:?} missing from {one:?}");
            let per_family: Vec<(u8, u16)> = nl
                .dump(want.0, libc::IPPROTO_TCP as u8, &cgroups)
                .unwrap()
                .iter()
                .map(|(f, id)| (*f, sport(id)))
                .collect();
            assert!(
                per_family.contains(&want),
                "{want:?} missing from {per_family:?}"
            );
        }
        // Another cgroup's filter finds neither.
        let none = nl.dump_tcp(&HashSet::from([u64::MAX])).unwrap();
        assert!(none.is_empty(), "{none:?}");
    }
}
