//! Network actions for the integration tests, run inside enforced cgroups.
//!
//! Each argument is one command; `repl` reads commands from stdin instead. Every command
//! prints one line: `ok`, `err <ERRNO>`, or a value.
//!
//! Commands: `pid`, `cgroup`, `tcp ADDR [PAYLOAD]`, `udp-sendto ADDR PAYLOAD`,
//! `udp-connect ADDR PAYLOAD`, `raw4`, `raw6`, `join-cgroup DIR`, `stream ADDR`,
//! `stream-end MILLIS` (how the stream ended, waiting up to MILLIS), `watch ADDR MILLIS`,
//! `env NAME`, `exit CODE`, `sleep MILLIS`, `udp-flood ADDR N`, `udp-flood-for ADDR MILLIS`
//! (denied-send floods: a count, or a time), `raw-flood-for MILLIS` (raw socket creations), `udp-spray IP N` (a datagram to each of N
//! ports from 1024), `udp-flood-around ADDR MILLIS TCP_ADDR` (a flood
//! with a TCP connect from the same process halfway), `repl`; `unshare-net` (this thread, and threads it starts from
//! then on, move to a new network namespace with its loopback up), `join-net PATH` (the same,
//! into the namespace PATH names, such as /proc/PID/ns/net), `listen ADDR` (accepts and
//! drains connections in the background), `ping-allow` (lets every group open ping sockets in
//! the current network namespace: use it in one of its own), `ping IP` (one ICMP echo request
//! from a ping socket, `ok` once the reply came, `err timeout` after a second without),
//! `swap-links DIR TARGET NAME...` (swaps links to TARGET over DIR/NAME in a loop, in the
//! background), `swap-stop` (ends it; prints how many swaps were made), `read PATH`,
//! `take-fd PATH` (receives a socket over the Unix socket PATH and keeps it), then on that
//! socket `fd-connect ADDR`, `fd-send PAYLOAD`, `fd-write PAYLOAD`, `fd-sendto ADDR PAYLOAD`;
//! `fds` (the open descriptors above 2), `fd-connect-raw FD ADDR` (connects descriptor FD),
//! `ping-connect ADDR` (connects a ping socket, the port standing for the identifier),
//! `ping-via ADDR IP` (a ping socket connected to ADDR sends an echo request to IP),
//! `lo-alias IP` (adds an IPv4 address to loopback, in a namespace of the probe's own),
//! `udp-options ADDR PAYLOAD` (a connected UDP send whose packets carry IPv4 options),
//! `udp-pktinfo ADDR PAYLOAD` (a connected UDP send with a packet-info control message),
//! `hold-unix PATH N` (N connections to a Unix socket, each sent three bytes, then held),
//! `hold-h2 PATH N` (the same, each sent the HTTP/2 client preface only),
//! `packet` (a cooked AF_PACKET socket), `ls DIR` (`entries=N`), `size FILE` (`bytes=N`),
//! `signal PID` (signal 0: may this process signal PID), `create PATH` (a new file),
//! `remove PATH`, `unshare-user` (a user namespace, from a child process), `inotify-fill N`
//! (inotify instances until one is refused or N are open, kept: `n=K ERR`), `session`
//! (`own` for a session leader, else `shared`), `write-file PATH TEXT`,
//! `unix-flood NAME N` (N Unix stream connects to NAME: `eperm=… other=…`),
//! `tcp-race ADDR THREADS N` (THREADS threads released at once, each N TCP connects:
//! `ok=… eperm=… other=…`), `decide SOCKET JSON` (a query to the decision API: its answer),
//! `hold-tcp ADDR N SECS` (N TCP connections, each sent half an HTTP request, kept at N for
//! SECS by a thread that replaces those the server ended; answers once the first N are open),
//! `udp-unspec ADDR TO PAYLOAD` (a UDP socket connected to ADDR sends to TO given as AF_UNSPEC),
//! `unix-connect NAME PAYLOAD` (a Unix stream connect, then the payload), `unix-sendto NAME
//! PAYLOAD` (a Unix datagram sent to NAME), `unix-dgram-connect NAME PAYLOAD` (a Unix datagram
//! socket connected to NAME sends); NAME is a path, or @ and an abstract name;
//! `enroll-burst SOCKET CERT KEY BUNDLE THREADS N` (THREADS threads, each enrolling N times
//! one after another with the certificate CERT: `ok`, or the first refusal).

use std::{
    io::{self, BufRead as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

/// How the last `stream` ended (its write error), once it has.
static STREAM_END: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// `threads` threads, each enrolling `n` times in a row over `socket`: `ok`, or the first
/// refusal.
fn enroll_burst(
    socket: &str,
    (cert, key, bundle): (&str, &str, &str),
    threads: &str,
    n: &str,
) -> String {
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("err reading {p}: {e}"));
    let files = (|| Ok::<_, String>((read(cert)?, read(key)?, read(bundle)?)))();
    let ((cert, key, bundle), threads, n) =
        match (files, threads.parse::<usize>(), n.parse::<usize>()) {
            (Ok(f), Ok(t), Ok(n)) => (f, t, n),
            (Err(e), _, _) => return e,
            _ => return "err bad count".into(),
        };
    let socket = std::path::Path::new(socket);
    let first_error = std::sync::Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..n {
                    if let Err(e) =
                        agentwall::identity::enroll::enroll(socket, &cert, &key, &bundle)
                    {
                        let mut first = first_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        first.get_or_insert(format!("err {e}"));
                        return;
                    }
                }
            });
        }
    });
    first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .unwrap_or_else(|| "ok".into())
}

fn errno(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("err {:?}", nix::errno::Errno::from_raw(n)),
        None => format!("err {e}"),
    }
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("err bad address {s:?}"))
}

fn tcp(a: SocketAddr, payload: &str) -> String {
    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
        Ok(mut s) => match s.write_all(payload.as_bytes()) {
            Ok(()) => "ok".into(),
            Err(e) => errno(&e),
        },
        Err(e) => errno(&e),
    }
}

fn unspecified_for(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
}

/// A socket of `domain`, `ty` and `proto`: `ok` (closed again) or the errno.
fn raw_of(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> String {
    // SAFETY: socket(2) with plain arguments; the descriptor is closed at once.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return errno(&io::Error::last_os_error());
    }
    // SAFETY: closing the descriptor just made.
    unsafe { libc::close(fd) };
    "ok".into()
}

fn raw(domain: libc::c_int, proto: libc::c_int) -> String {
    raw_of(domain, libc::SOCK_RAW, proto)
}

/// A ping socket (`SOCK_DGRAM`, the kernel fills in the identifier and checksum) for `ip`'s
/// family, with a one-second read timeout.
fn ping_socket(ip: IpAddr) -> Result<UdpSocket, String> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};
    let (family, proto) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, proto)
        .map_err(|e| format!("err {e:?}"))?;
    // A datagram socket as far as sending and receiving go.
    let s = UdpSocket::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| errno(&e))?;
    Ok(s)
}

/// One ICMP echo request to `ip` on `s`, then up to a second for the reply.
fn echo(s: &UdpSocket, ip: IpAddr) -> String {
    let (request, reply) = if ip.is_ipv4() { (8, 0) } else { (128, 129) };
    // Type, code, checksum, identifier, sequence number 1.
    if let Err(e) = s.send_to(&[request, 0, 0, 0, 0, 0, 0, 1], SocketAddr::new(ip, 0)) {
        return errno(&e);
    }
    let mut buf = [0u8; 64];
    match s.recv(&mut buf) {
        Ok(n) if n >= 8 && buf[0] == reply => "ok".into(),
        Ok(_) => "err not an echo reply".into(),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => "err timeout".into(),
        Err(e) => errno(&e),
    }
}

/// One ICMP echo request to `ip` from a new ping socket.
fn ping(ip: IpAddr) -> String {
    ping_socket(ip).map_or_else(|e| e, |s| echo(&s, ip))
}

/// A ping socket connected to `to`, then an echo request sent to `ip` on it.
fn ping_via(to: SocketAddr, ip: IpAddr) -> String {
    let s = match ping_socket(ip) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Err(e) = s.connect(to) {
        return errno(&e);
    }
    echo(&s, ip)
}

/// A datagram to `a` on a UDP socket connected there, sent with a packet-info control message
/// (`IP_PKTINFO`, `IPV6_PKTINFO`: no interface, no source chosen) and no address.
fn udp_pktinfo(a: SocketAddr, payload: &str) -> String {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd as _;
    let s = match UdpSocket::bind(unspecified_for(&a)) {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    if let Err(e) = s.connect(a) {
        return errno(&e);
    }
    let iov = [io::IoSlice::new(payload.as_bytes())];
    // SAFETY: plain C structs; all zeros means "no interface, no source address chosen".
    let (v4, v6): (libc::in_pktinfo, libc::in6_pktinfo) = unsafe { std::mem::zeroed() };
    let cmsg = if a.is_ipv4() {
        [ControlMessage::Ipv4PacketInfo(&v4)]
    } else {
        [ControlMessage::Ipv6PacketInfo(&v6)]
    };
    sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_or_else(|e| format!("err {e:?}"), |_| "ok".into())
}

/// Connections held open by `hold-unix`, until the probe ends.
static HELD: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Opens `n` connections to the Unix socket `path` (non-blocking: a full backlog counts as
/// `waiting`), sends each the first three bytes of a TLS record and nothing more, then, after
/// a moment, counts those the server answered with a plain refusal (`agentwall: ...`). The
/// connections stay open.
enum UnixHow {
    Stream,
    SendTo,
    DgramConnect,
}

/// Reaches the Unix socket `name` (a path, or `@name` for an abstract one) and sends
/// `payload`; `ok` or the errno of the step that failed.
fn unix_send(name: &str, payload: &str, how: UnixHow) -> String {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, send, sendto, socket,
    };
    use std::os::fd::AsRawFd as _;
    let addr = match name.strip_prefix('@') {
        Some(abs) => UnixAddr::new_abstract(abs.as_bytes()),
        None => UnixAddr::new(name),
    };
    let Ok(addr) = addr else {
        return "err bad name".into();
    };
    let ty = match how {
        UnixHow::Stream => SockType::Stream,
        UnixHow::SendTo | UnixHow::DgramConnect => SockType::Datagram,
    };
    let fd = match socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None) {
        Ok(fd) => fd,
        Err(e) => return format!("err {e:?}"),
    };
    let r = match how {
        UnixHow::SendTo => sendto(fd.as_raw_fd(), payload.as_bytes(), &addr, MsgFlags::empty()),
        UnixHow::Stream | UnixHow::DgramConnect => connect(fd.as_raw_fd(), &addr)
            .and_then(|()| send(fd.as_raw_fd(), payload.as_bytes(), MsgFlags::empty())),
    };
    r.map_or_else(|e| format!("err {e:?}"), |_| "ok".into())
}

/// `n` stream connects to the Unix socket `name` (a path, or `@name`): how many were refused
/// with EPERM, and how many were not.
/// `POST /v1/decide` with `body` on the decision API socket `socket`: the reply's body, or
/// `err …`.
fn decide(socket: &str, body: &str) -> String {
    use std::io::Read as _;
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "POST /v1/decide HTTP/1.1\r\nHost: agentwall\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return errno(&e);
    }
    let mut reply = String::new();
    if let Err(e) = s.read_to_string(&mut reply) {
        return errno(&e);
    }
    reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("err no body")
        .to_string()
}

/// THREADS threads released together, each making N TCP connects to `to` (each closed at
/// once): `ok=… eperm=… other=…`.
fn tcp_race(to: SocketAddr, threads: usize, n: usize) -> String {
    use std::sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    };
    let threads = threads.clamp(1, 64);
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (counts, start) = (Arc::clone(&counts), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..n.min(100_000) {
                    let i = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(_) => 0,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => 1,
                        Err(_) => 2,
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    format!(
        "ok={} eperm={} other={}",
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed)
    )
}

fn unix_flood(name: &str, n: u64) -> String {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd as _;
    let addr = match name.strip_prefix('@') {
        Some(abs) => UnixAddr::new_abstract(abs.as_bytes()),
        None => UnixAddr::new(name),
    };
    let Ok(addr) = addr else {
        return "err bad name".into();
    };
    let (mut eperm, mut other) = (0u64, 0u64);
    for _ in 0..n.min(1_000_000) {
        let Ok(fd) = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        ) else {
            other += 1;
            continue;
        };
        match connect(fd.as_raw_fd(), &addr) {
            Err(nix::errno::Errno::EPERM) => eperm += 1,
            _ => other += 1,
        }
    }
    format!("eperm={eperm} other={other}")
}

/// Opens one connection to `a` that sends the first line of an HTTP request and no more.
fn half_request(a: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\n").ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// See `hold-tcp` in the module documentation: `held=N` once N are open (or as many as could
/// be within ten seconds).
fn hold_tcp(a: SocketAddr, n: usize, secs: u64) -> String {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let fill = move |held: &mut Vec<TcpStream>, until: Instant| {
        while held.len() < n && Instant::now() < until {
            if let Some(s) = half_request(a) {
                held.push(s);
            }
        }
    };
    let mut held = Vec::with_capacity(n);
    fill(&mut held, Instant::now() + Duration::from_secs(10));
    let opened = held.len();
    let end = Instant::now() + Duration::from_secs(secs.min(120));
    std::thread::spawn(move || {
        while Instant::now() < end {
            // Those the server answered or closed are replaced.
            held.retain(|s| {
                let mut b = [0u8; 64];
                matches!(s.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            });
            fill(&mut held, end);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    format!("held={opened}")
}

fn hold_unix(path: &str, n: usize, greeting: &[u8]) -> String {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, socket,
    };
    use std::os::fd::AsRawFd as _;
    // Raised to the hard limit: thousands of descriptors.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let Ok(addr) = UnixAddr::new(path) else {
        return "err bad path".into();
    };
    let (mut open, mut waiting) = (Vec::new(), 0usize);
    for _ in 0..n {
        let fd = match socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => return format!("err {e:?}"),
        };
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let _ = send(fd.as_raw_fd(), greeting, MsgFlags::empty());
                open.push(fd);
            }
            Err(nix::errno::Errno::EAGAIN) => waiting += 1,
            Err(e) => return format!("err {e:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = 0usize;
    for fd in &open {
        let mut buf = [0u8; 64];
        if let Ok(k) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
            && buf[..k].starts_with(b"agentwall: ")
        {
            refused += 1;
        }
    }
    let held = open.len();
    if let Ok(mut g) = HELD.lock() {
        g.extend(open);
    }
    format!("held={held} refused={refused} waiting={waiting}")
}

/// A UDP socket connected to `to` sends `payload` to `a` given with family AF_UNSPEC (IPv4's
/// udp_sendmsg sends to such an address as if it were AF_INET).
fn udp_unspec(to: SocketAddr, a: std::net::SocketAddrV4, payload: &str) -> String {
    use std::os::fd::AsRawFd as _;
    let s = match UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    if let Err(e) = s.connect(to) {
        return errno(&e);
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_UNSPEC as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto with a buffer and a `sockaddr_in` of the lengths given.
    let r = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        errno(&io::Error::last_os_error())
    } else {
        "ok".into()
    }
}

/// Adds the IPv4 address `ip` to loopback as an alias (`lo:1`): an address of the current
/// network namespace that is not loopback's own.
fn lo_alias(ip: std::net::Ipv4Addr) -> String {
    // SAFETY: a socket only to carry the ioctl; closed when `s` drops.
    let s = match UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    // SAFETY: `ifreq` is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo:1\0") {
        *dst = *src as libc::c_char;
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` fits in the `sockaddr` of the union (both 16 bytes).
    unsafe {
        std::ptr::write(
            (&raw mut req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
            sin,
        );
    }
    use std::os::fd::AsRawFd as _;
    // SAFETY: SIOCSIFADDR with a valid, initialised `ifreq`.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &raw mut req) } != 0 {
        return errno(&io::Error::last_os_error());
    }
    "ok".into()
}

/// A UDP datagram to `a` from a socket connected there that carries IPv4 options (no-ops:
/// harmless in themselves, but the header may then hold a source route).
fn udp_options(a: SocketAddr, payload: &str) -> String {
    let s = match UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    if let Err(e) = s.connect(a) {
        return errno(&e);
    }
    use std::os::fd::AsRawFd as _;
    // NOP, NOP, NOP, end of options: one 4-byte word of options.
    let opts = [1u8, 1, 1, 0];
    // SAFETY: setsockopt with a buffer of the length given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return errno(&io::Error::last_os_error());
    }
    s.send(payload.as_bytes())
        .map_or_else(|e| errno(&e), |_| "ok".into())
}

/// A new network namespace for this thread (and threads it starts later), loopback up.
/// A new user namespace, made in a child process (unshare refuses it to a process with
/// threads): `ok` or the child's errno.
fn unshare_user() -> String {
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return errno(&io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let r = libc::unshare(libc::CLONE_NEWUSER);
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => "ok".into(),
        e => format!("err {:?}", nix::errno::Errno::from_raw(e)),
    }
}

/// Inotify instances made by `inotify-fill`, kept open until the probe ends.
static INOTIFY: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Makes inotify instances until one is refused or `n` are open: `n=K ERR`.
fn inotify_fill(n: usize) -> String {
    let mut kept = INOTIFY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut last = "ok".to_string();
    for _ in 0..n {
        // SAFETY: inotify_init1 takes only flags; a new descriptor is ours alone.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            last = errno(&io::Error::last_os_error());
            break;
        }
        // SAFETY: just created, owned by nothing else.
        kept.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
    }
    format!("n={} {last}", kept.len())
}

fn unshare_net() -> String {
    // SAFETY: unshare(2) with a flag; affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return errno(&io::Error::last_os_error());
    }
    // SAFETY: a datagram socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return errno(&io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; the name fits with its NUL; the ioctls read and write only
    // the ifreq passed; the fd is closed once.
    let r = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *c as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r == 0 { Ok(()) } else { Err(e) }
    };
    r.map_or_else(|e| errno(&e), |()| "ok".into())
}

/// Swaps a symbolic link to `target` over each of `names` in `dir`, in a loop in the
/// background for at most 60 seconds or until `swap-stop`: an agent racing the daemon's
/// writes into its directory. `ok` once the first swap worked, else its error.
fn swap_links(dir: &str, target: &str, names: &[&str]) -> String {
    let dir = std::path::PathBuf::from(dir);
    let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
    let swap = {
        let (dir, target) = (dir.clone(), target.to_string());
        move |name: &str| -> io::Result<()> {
            let link = dir.join(format!(".swap-{name}"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)?;
            std::fs::rename(&link, dir.join(name))
        }
    };
    if let Err(e) = names.iter().try_for_each(|n| swap(n)) {
        return errno(&e);
    }
    SWAPS.store(0, std::sync::atomic::Ordering::SeqCst);
    SWAPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while SWAPPING.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
            for n in &names {
                if swap(n).is_ok() {
                    SWAPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    "ok".into()
}

/// A socket received from outside (`take-fd`).
static TAKEN: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// Connects to the Unix socket `path` and keeps the descriptor sent over it (`SCM_RIGHTS`).
fn take_fd(path: &str) -> String {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = match recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
        Ok(m) => m,
        Err(e) => return format!("err {e:?}"),
    };
    let Ok(mut cmsgs) = msg.cmsgs() else {
        return "err no control message".into();
    };
    match cmsgs.next() {
        Some(ControlMessageOwned::ScmRights(fds)) if !fds.is_empty() => {
            // SAFETY: the kernel installed this descriptor for this process just now.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
            if let Ok(mut g) = TAKEN.lock() {
                *g = Some(fd);
            }
            "ok".into()
        }
        _ => "err no descriptor".into(),
    }
}

/// Runs `f` on the socket taken with `take-fd`.
fn with_taken(f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> nix::Result<()>) -> String {
    use std::os::fd::AsFd as _;
    let Ok(g) = TAKEN.lock() else {
        return "err lock".into();
    };
    match g.as_ref() {
        None => "err no descriptor taken".into(),
        Some(fd) => f(fd.as_fd()).map_or_else(|e| format!("err {e:?}"), |()| "ok".into()),
    }
}

fn sockaddr(a: SocketAddr) -> nix::sys::socket::SockaddrStorage {
    match a {
        SocketAddr::V4(v4) => v4.into(),
        SocketAddr::V6(v6) => v6.into(),
    }
}

static SWAPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SWAPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Accepts connections on `a` and reads each until it ends, in the background.
fn listen(a: SocketAddr) -> String {
    let l = match std::net::TcpListener::bind(a) {
        Ok(l) => l,
        Err(e) => return errno(&e),
    };
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(io::Read::read(&mut c, &mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    "ok".into()
}

fn run(line: &str) -> String {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let r: Result<String, String> =
        (|| match (cmd, args.as_slice()) {
            ("pid", []) => Ok(std::process::id().to_string()),
            ("enroll-burst", [socket, cert, key, bundle, threads, n]) => {
                Ok(enroll_burst(socket, (cert, key, bundle), threads, n))
            }
            ("sleep", [ms]) => {
                std::thread::sleep(millis(ms)?.min(Duration::from_secs(60)));
                Ok("ok".into())
            }
            ("cgroup", []) => Ok(own_cgroup()),
            ("tcp", [a]) => Ok(tcp(addr(a)?, "hello\n")),
            ("tcp", [a, p]) => Ok(tcp(addr(a)?, p)),
            ("udp-sendto", [a, p]) => {
                let a = addr(a)?;
                let s = UdpSocket::bind(unspecified_for(&a)).map_err(|e| errno(&e))?;
                Ok(s.send_to(p.as_bytes(), a)
                    .map_or_else(|e| errno(&e), |_| "ok".into()))
            }
            ("udp-connect", [a, p]) => {
                let a = addr(a)?;
                let s = UdpSocket::bind(unspecified_for(&a)).map_err(|e| errno(&e))?;
                s.connect(a).map_err(|e| errno(&e))?;
                Ok(s.send(p.as_bytes())
                    .map_or_else(|e| errno(&e), |_| "ok".into()))
            }
            ("raw4", []) => Ok(raw(libc::AF_INET, libc::IPPROTO_ICMP)),
            // A packet socket (cooked): it bypasses the IP layer, so only capabilities stop it.
            ("packet", []) => Ok(raw_of(libc::AF_PACKET, libc::SOCK_DGRAM, 0)),
            ("ls", [dir]) => Ok(std::fs::read_dir(dir)
                .map_or_else(|e| errno(&e), |d| format!("entries={}", d.count()))),
            // Signal 0: whether this process may signal PID at all.
            ("signal", [pid]) => Ok(nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.parse().map_err(|_| "err bad pid".to_string())?),
                None,
            )
            .map_or_else(|e| format!("err {e:?}"), |()| "ok".into())),
            // `own` when this process leads a session of its own (no controlling terminal
            // it shares with whoever started it), else `shared`.
            ("session", []) => Ok(
                if nix::unistd::getsid(None).ok() == Some(nix::unistd::getpid()) {
                    "own".into()
                } else {
                    "shared".into()
                },
            ),
            ("inotify-fill", [n]) => Ok(inotify_fill(
                n.parse().map_err(|_| "err bad count".to_string())?,
            )),
            ("write-file", [path, text]) => {
                Ok(std::fs::write(path, text).map_or_else(|e| errno(&e), |()| "ok".into()))
            }
            ("remove", [path]) => {
                Ok(std::fs::remove_file(path).map_or_else(|e| errno(&e), |()| "ok".into()))
            }
            ("create", [path]) => Ok(std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_or_else(|e| errno(&e), |_| "ok".into())),
            ("size", [path]) => Ok(
                std::fs::read(path).map_or_else(|e| errno(&e), |b| format!("bytes={}", b.len()))
            ),
            ("raw6", []) => Ok(raw(libc::AF_INET6, libc::IPPROTO_ICMPV6)),
            ("udp-spray", [ip, n]) => {
                // One datagram to each of N ports from 1024 up (N distinct destinations).
                let ip: IpAddr = ip.parse().map_err(|_| format!("err bad address {ip:?}"))?;
                let n: u16 = n.parse().map_err(|_| "err bad count".to_string())?;
                let s = UdpSocket::bind(unspecified_for(&SocketAddr::new(ip, 0)))
                    .map_err(|e| errno(&e))?;
                let (mut eperm, mut other) = (0u64, 0u64);
                for port in 1024..1024u16.saturating_add(n) {
                    match s.send_to(b"x", SocketAddr::new(ip, port)) {
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                        _ => other += 1,
                    }
                }
                Ok(format!("eperm={eperm} other={other}"))
            }
            ("raw-flood-for", [ms]) => {
                // Raw socket creations for MS (at most a minute): how many were refused.
                let end = Instant::now() + millis(ms)?.min(Duration::from_secs(60));
                let (mut eperm, mut other) = (0u64, 0u64);
                while Instant::now() < end {
                    for _ in 0..100 {
                        match raw(libc::AF_INET, libc::IPPROTO_ICMP).as_str() {
                            "err EPERM" => eperm += 1,
                            _ => other += 1,
                        }
                    }
                }
                Ok(format!("eperm={eperm} other={other}"))
            }
            ("join-cgroup", [dir]) => {
                let path = std::path::Path::new(dir).join("cgroup.procs");
                Ok(std::fs::write(path, std::process::id().to_string())
                    .map_or_else(|e| errno(&e), |()| "ok".into()))
            }
            ("stream", [a]) => {
                let mut s = TcpStream::connect_timeout(&addr(a)?, Duration::from_secs(2))
                    .map_err(|e| errno(&e))?;
                std::thread::spawn(move || {
                    let chunk = [b'x'; 64];
                    let end = loop {
                        if let Err(e) = s.write_all(&chunk) {
                            break errno(&e);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    };
                    if let Ok(mut g) = STREAM_END.lock() {
                        *g = Some(end);
                    }
                });
                Ok("ok".into())
            }
            ("stream-end", [ms]) => {
                let ms: u64 = ms.parse().map_err(|_| "err bad millis".to_string())?;
                let end = Instant::now() + Duration::from_millis(ms);
                loop {
                    if let Some(e) = STREAM_END.lock().ok().and_then(|g| g.clone()) {
                        return Ok(e);
                    }
                    if Instant::now() > end {
                        return Ok("running".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            ("watch", [a, ms]) => {
                let a = addr(a)?;
                let ms: u64 = ms.parse().map_err(|_| "err bad millis".to_string())?;
                let end = Instant::now() + Duration::from_millis(ms);
                let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
                while Instant::now() < end {
                    match TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
                        Ok(_) => ok += 1,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                        Err(_) => other += 1,
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(format!("ok={ok} eperm={eperm} other={other}"))
            }
            ("connect-flood-for", [a, ms, threads]) => {
                // Connects and lets go, as fast as it can from `threads` threads, for `ms`:
                // how many connected.
                let a = addr(a)?;
                let ms: u64 = ms.parse().map_err(|_| "err bad millis".to_string())?;
                let threads: usize = threads.parse().map_err(|_| "err bad threads".to_string())?;
                let end = Instant::now() + Duration::from_millis(ms);
                let n: u64 = std::thread::scope(|s| {
                    let each: Vec<_> = (0..threads.clamp(1, 16))
                        .map(|_| {
                            s.spawn(move || {
                                let mut n = 0u64;
                                while Instant::now() < end {
                                    if TcpStream::connect_timeout(&a, Duration::from_millis(500))
                                        .is_ok()
                                    {
                                        n += 1;
                                    }
                                }
                                n
                            })
                        })
                        .collect();
                    each.into_iter().map(|t| t.join().unwrap_or(0)).sum()
                });
                Ok(format!("ok={n}"))
            }
            ("udp-flood", [a, n]) => {
                let a = addr(a)?;
                let n: u64 = n.parse().map_err(|_| "err bad count".to_string())?;
                let s = std::net::UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                    .map_err(|e| errno(&e))?;
                let (mut eperm, mut other) = (0u64, 0u64);
                for _ in 0..n {
                    match s.send_to(b"x", a) {
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                        _ => other += 1,
                    }
                }
                Ok(format!("eperm={eperm} other={other}"))
            }
            ("udp-flood-for", [a, ms]) => {
                let (eperm, other) = udp_flood_for(addr(a)?, millis(ms)?)?;
                Ok(format!("eperm={eperm} other={other}"))
            }
            ("udp-flood-around", [a, ms, tcp_to]) => {
                // A flood for MS, with a TCP connect to TCP_TO from the same process halfway.
                let (a, ms, to) = (addr(a)?, millis(ms)?, addr(tcp_to)?);
                let flood = std::thread::spawn(move || udp_flood_for(a, ms));
                std::thread::sleep(ms / 2);
                let connected = tcp(to, "hello\n");
                let (eperm, other) = flood
                    .join()
                    .map_err(|_| "err flood thread panicked".to_string())??;
                Ok(format!("tcp={connected} eperm={eperm} other={other}"))
            }
            ("unshare-net", []) => Ok(unshare_net()),
            ("unshare-user", []) => Ok(unshare_user()),
            ("join-net", [path]) => {
                let f = std::fs::File::open(path).map_err(|e| errno(&e))?;
                Ok(nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_or_else(|e| format!("err {e:?}"), |()| "ok".into()))
            }
            ("listen", [a]) => Ok(listen(addr(a)?)),
            ("ping-allow", []) => Ok(std::fs::write(
                "/proc/sys/net/ipv4/ping_group_range",
                "0 2147483647",
            )
            .map_or_else(|e| errno(&e), |()| "ok".into())),
            ("ping", [ip]) => Ok(ping(
                ip.parse().map_err(|_| format!("err bad address {ip:?}"))?,
            )),
            ("swap-links", [dir, target, names @ ..]) if !names.is_empty() => {
                Ok(swap_links(dir, target, names))
            }
            ("take-fd", [path]) => Ok(take_fd(path)),
            ("fds", []) => {
                // Listing /proc/self/fd opens one descriptor itself; it is gone once listed.
                let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
                    .map_err(|e| errno(&e))?
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|fd| *fd > 2)
                    .collect();
                fds.retain(|fd| {
                    // SAFETY: F_GETFD only reads the flags of a descriptor number.
                    (unsafe { libc::fcntl(*fd, libc::F_GETFD) }) >= 0
                });
                fds.sort_unstable();
                Ok(format!("{fds:?}"))
            }
            ("fd-connect-raw", [fd, a]) => {
                let fd: i32 = fd.parse().map_err(|_| "err bad descriptor".to_string())?;
                let a = sockaddr(addr(a)?);
                Ok(nix::sys::socket::connect(fd, &a)
                    .map_or_else(|e| format!("err {e:?}"), |()| "ok".into()))
            }
            ("fd-connect", [a]) => {
                let a = sockaddr(addr(a)?);
                Ok(with_taken(|fd| {
                    use std::os::fd::AsRawFd as _;
                    nix::sys::socket::connect(fd.as_raw_fd(), &a)
                }))
            }
            ("fd-send", [p]) => Ok(with_taken(|fd| {
                use std::os::fd::AsRawFd as _;
                nix::sys::socket::send(
                    fd.as_raw_fd(),
                    p.as_bytes(),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map(drop)
            })),
            ("fd-write", [p]) => Ok(with_taken(|fd| {
                nix::unistd::write(fd, p.as_bytes()).map(drop)
            })),
            ("fd-sendto", [a, p]) => {
                let a = sockaddr(addr(a)?);
                Ok(with_taken(|fd| {
                    use std::os::fd::AsRawFd as _;
                    nix::sys::socket::sendto(
                        fd.as_raw_fd(),
                        p.as_bytes(),
                        &a,
                        nix::sys::socket::MsgFlags::empty(),
                    )
                    .map(drop)
                }))
            }
            ("read", [path]) => Ok(std::fs::read(path).map_or_else(|e| errno(&e), |_| "ok".into())),
            ("swap-stop", []) => {
                SWAPPING.store(false, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                Ok(SWAPS.load(std::sync::atomic::Ordering::SeqCst).to_string())
            }
            ("ping-connect", [a]) => {
                let a = addr(a)?;
                let s = ping_socket(a.ip())?;
                Ok(s.connect(a).map_or_else(|e| errno(&e), |()| "ok".into()))
            }
            ("ping-via", [to, ip]) => Ok(ping_via(
                addr(to)?,
                ip.parse().map_err(|_| format!("err bad address {ip:?}"))?,
            )),
            ("lo-alias", [ip]) => Ok(lo_alias(
                ip.parse().map_err(|_| format!("err bad address {ip:?}"))?,
            )),
            ("udp-options", [a, p]) => Ok(udp_options(addr(a)?, p)),
            ("udp-pktinfo", [a, p]) => Ok(udp_pktinfo(addr(a)?, p)),
            ("udp-unspec", [to, a, p]) => Ok(udp_unspec(
                addr(to)?,
                a.parse()
                    .map_err(|_| format!("err bad IPv4 address {a:?}"))?,
                p,
            )),
            ("hold-tcp", [a, n, secs]) => Ok(hold_tcp(
                addr(a)?,
                n.parse().map_err(|_| "err bad count".to_string())?,
                secs.parse().map_err(|_| "err bad seconds".to_string())?,
            )),
            ("hold-unix", [path, n]) => Ok(hold_unix(
                path,
                n.parse().map_err(|_| "err bad count".to_string())?,
                &[0x16, 0x03, 0x01],
            )),
            ("hold-h2", [path, n]) => Ok(hold_unix(
                path,
                n.parse().map_err(|_| "err bad count".to_string())?,
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            )),
            ("decide", [socket, body]) => Ok(decide(socket, body)),
            ("tcp-race", [a, threads, n]) => Ok(tcp_race(
                addr(a)?,
                threads.parse().map_err(|_| "err bad count".to_string())?,
                n.parse().map_err(|_| "err bad count".to_string())?,
            )),
            ("unix-flood", [name, n]) => Ok(unix_flood(
                name,
                n.parse().map_err(|_| "err bad count".to_string())?,
            )),
            ("unix-connect", [name, payload]) => Ok(unix_send(name, payload, UnixHow::Stream)),
            ("unix-sendto", [name, payload]) => Ok(unix_send(name, payload, UnixHow::SendTo)),
            ("unix-dgram-connect", [name, payload]) => {
                Ok(unix_send(name, payload, UnixHow::DgramConnect))
            }
            ("env", [name]) => Ok(std::env::var(name).unwrap_or_default()),
            ("exit", [code]) => std::process::exit(code.parse().unwrap_or(1)),
            _ => Err(format!("err unknown command {line:?}")),
        })();
    r.unwrap_or_else(|e| e)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = io::stdout().lock();
    if args.first().map(String::as_str) == Some("repl") {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "quit" {
                break;
            }
            let _ = writeln!(out, "{}", run(line.trim()));
            let _ = out.flush();
        }
        return;
    }
    for a in args {
        let _ = writeln!(out, "{}", run(&a));
    }
}

/// The process's cgroup as the host names it (relative to the cgroup mount). A process in a
/// cgroup namespace (a confined root agent) sees its own cgroup as `/`: then the cgroup
/// `agentwall exec` started it in (AGENTWALL_CGROUP, an absolute path) is given, relative to
/// the cgroup2 mount point.
fn own_cgroup() -> String {
    let seen = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string();
    let Some(launched) = std::env::var_os("AGENTWALL_CGROUP") else {
        return seen;
    };
    if seen != "/" {
        return seen;
    }
    let launched = std::path::PathBuf::from(launched);
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (point, fs) = (f.nth(1)?, f.next()?);
            (fs == "cgroup2").then(|| launched.strip_prefix(point).ok())?
        })
        .next()
        .map_or(seen, |rel| format!("/{}", rel.display()))
}

fn millis(ms: &str) -> Result<Duration, String> {
    ms.parse()
        .map(Duration::from_millis)
        .map_err(|_| format!("err bad millis {ms:?}"))
}

/// Sends datagrams to `a` for `d` (at most a minute): how many were refused with EPERM, and
/// how many were not.
fn udp_flood_for(a: SocketAddr, d: Duration) -> Result<(u64, u64), String> {
    let end = Instant::now() + d.min(Duration::from_secs(60));
    let s = UdpSocket::bind(unspecified_for(&a)).map_err(|e| errno(&e))?;
    let (mut eperm, mut other) = (0u64, 0u64);
    while Instant::now() < end {
        for _ in 0..1000 {
            match s.send_to(b"x", a) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                _ => other += 1,
            }
        }
    }
    Ok((eperm, other))
}
