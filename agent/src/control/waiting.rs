//! Admin connections that have not sent their request line yet, waited on together.
//!
//! The admin thread answers one request at a time. Were it to wait for each connection's
//! line in turn, a client that connects and says nothing would hold every revocation behind
//! it until its deadline, and a few such clients in a row would hold them for as long as
//! they kept connecting. So the thread polls the listener and every waiting connection at
//! once, and takes whichever line is complete first. A silent connection costs a place in
//! the set until its deadline, never anyone else's time.
//!
//! Each connection's bytes are taken as they come, up to its newline and never past it:
//! what follows the line belongs to the exchange after it (the end of an exec lease).
//!
//! The thread may run at real-time priority, so no client may make it spin or work for it:
//! - Each class of peer (root, the admin group, processes of confined cgroups) has its own
//!   places ([`Class::places`]); a newcomer can only put out the oldest of its own class, so
//!   the admin group cannot push out root's revocation, nor a confined unit anyone's.
//! - Out-of-band data is read inline (`SO_OOBINLINE`): a lone urgent byte would otherwise
//!   keep the socket readable while a read finds nothing.
//! - A connection that polls readable and gives no byte is dropped, and one that sends its
//!   line in more than [`MAX_PIECES`] pieces is refused.

use std::{
    io::{self, Read as _},
    os::{fd::AsFd as _, unix::net::UnixStream},
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{MsgFlags, recv},
};

/// Who a waiting connection's peer is, for its share of the places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Class {
    Root,
    /// A member of the admin group.
    Group,
    /// A process of a cgroup agentwall confines (it may only ask `enforce_self`).
    Confined,
}

impl Class {
    /// Connections of this class waiting at once.
    pub(super) fn places(self) -> usize {
        match self {
            Class::Root | Class::Group => 30,
            Class::Confined => 4,
        }
    }
}

/// Pieces a request line may come in (a client writes it in one).
const MAX_PIECES: u32 = 32;

/// A connection's request line, complete; or why it has none.
#[derive(Debug)]
pub(super) enum Ready<P> {
    Line {
        stream: UnixStream,
        peer: P,
        line: Vec<u8>,
    },
    /// Longer than the limit with no newline: answered with an error, then closed.
    TooLong { stream: UnixStream, max: usize },
    /// Sent in more than [`MAX_PIECES`] pieces: answered, then closed.
    Fragmented { stream: UnixStream },
    /// Put out to make room for a newer one (the oldest goes): answered, then closed.
    Evicted { stream: UnixStream },
}

struct Conn<P> {
    stream: UnixStream,
    peer: P,
    class: Class,
    line: Vec<u8>,
    pieces: u32,
    deadline: Instant,
}

/// The connections waiting for their request line.
pub(super) struct Waiting<P> {
    conns: Vec<Conn<P>>,
    timeout: Duration,
    max_line: usize,
    /// Where peeked bytes land, kept from one read to the next.
    scratch: Vec<u8>,
}

/// What one round of [`Waiting::wait`] found.
pub(super) struct Round<P> {
    /// The listener has connections to accept.
    pub(super) incoming: bool,
    pub(super) ready: Vec<Ready<P>>,
    /// Connections dropped at their deadline, or closed by their peer before a line.
    pub(super) expired: usize,
}

impl<P> Waiting<P> {
    pub(super) fn new(timeout: Duration, max_line: usize) -> Self {
        Self {
            conns: Vec::new(),
            timeout,
            max_line,
            scratch: vec![0u8; max_line + 1],
        }
    }

    /// Adds an accepted connection; it must send its line within the timeout. When its class
    /// has no place left, the oldest connection of the class makes room and is returned
    /// (answered, if its line came meanwhile).
    pub(super) fn add(
        &mut self,
        stream: UnixStream,
        peer: P,
        class: Class,
    ) -> io::Result<Option<Ready<P>>> {
        stream.set_nonblocking(true)?;
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::OobInline, &true)?;
        let same = self.conns.iter().filter(|c| c.class == class).count();
        let made_room = if same >= class.places() {
            let oldest = self
                .conns
                .iter()
                .position(|c| c.class == class)
                .map(|i| self.conns.remove(i));
            oldest.map(
                |mut c| match take_line(&mut c, &mut self.scratch, self.max_line) {
                    Ok(Step::Line) => Ready::Line {
                        stream: c.stream,
                        peer: c.peer,
                        line: c.line,
                    },
                    _ => Ready::Evicted { stream: c.stream },
                },
            )
        } else {
            None
        };
        self.conns.push(Conn {
            stream,
            peer,
            class,
            line: Vec::new(),
            pieces: 0,
            deadline: Instant::now() + self.timeout,
        });
        Ok(made_room)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }

    /// Waits until the listener or a waiting connection has something, or the next
    /// deadline passes.
    pub(super) fn wait(&mut self, listener: &std::os::unix::net::UnixListener) -> Round<P> {
        let now = Instant::now();
        let next = self.conns.iter().map(|c| c.deadline).min();
        let wait = next.map_or(PollTimeout::NONE, |d| {
            let ms = d.saturating_duration_since(now).as_millis().max(1);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        });
        let (incoming, readable) = {
            let mut fds: Vec<PollFd<'_>> = std::iter::once(listener.as_fd())
                .chain(self.conns.iter().map(|c| c.stream.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, wait) {
                Ok(_) => {}
                // Interrupted: the caller calls again. Any other failure (out of memory) is
                // not retried at once: this thread may run at real-time priority.
                Err(e) => {
                    if e != nix::errno::Errno::EINTR {
                        tracing::warn!(error = %e, "admin socket: poll failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    return Round {
                        incoming: false,
                        ready: Vec::new(),
                        expired: 0,
                    };
                }
            }
            let has = |f: &PollFd<'_>| {
                f.revents().is_some_and(|r| {
                    !(r & (PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)).is_empty()
                })
            };
            let readable: Vec<bool> = fds[1..].iter().map(has).collect();
            (has(&fds[0]), readable)
        };
        let mut ready = Vec::new();
        let mut expired = 0;
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.conns.len());
        for (mut c, readable) in std::mem::take(&mut self.conns).into_iter().zip(readable) {
            if readable {
                match take_line(&mut c, &mut self.scratch, self.max_line) {
                    Ok(Step::More) => {}
                    Ok(Step::Line) => {
                        ready.push((
                            c.class,
                            Ready::Line {
                                stream: c.stream,
                                peer: c.peer,
                                line: c.line,
                            },
                        ));
                        continue;
                    }
                    Ok(Step::TooLong) => {
                        ready.push((
                            c.class,
                            Ready::TooLong {
                                stream: c.stream,
                                max: self.max_line,
                            },
                        ));
                        continue;
                    }
                    Ok(Step::Fragmented) => {
                        ready.push((c.class, Ready::Fragmented { stream: c.stream }));
                        continue;
                    }
                    // Readable with nothing to read: it would wake this thread again at once.
                    Ok(Step::Closed | Step::Nothing) | Err(_) => {
                        expired += 1;
                        continue;
                    }
                }
            }
            if now >= c.deadline {
                expired += 1;
                continue;
            }
            kept.push(c);
        }
        self.conns = kept;
        // Root and the admin group before confined peers, each in the order they came.
        ready.sort_by_key(|(class, _)| *class);
        let ready = ready.into_iter().map(|(_, r)| r).collect();
        Round {
            incoming,
            ready,
            expired,
        }
    }
}

enum Step {
    More,
    Line,
    TooLong,
    Fragmented,
    Closed,
    /// Nothing there to read.
    Nothing,
}

/// Takes what the connection has of its line: up to and with the newline, nothing after.
fn take_line<P>(c: &mut Conn<P>, scratch: &mut [u8], max_line: usize) -> io::Result<Step> {
    let room = max_line + 1 - c.line.len().min(max_line);
    let buf = &mut scratch[..room];
    let n = match recv(
        std::os::fd::AsRawFd::as_raw_fd(&c.stream),
        buf,
        MsgFlags::MSG_PEEK,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => return Ok(Step::Nothing),
        Err(e) => return Err(e.into()),
    };
    if n == 0 {
        return Ok(Step::Closed);
    }
    c.pieces += 1;
    let (take, done) = match buf[..n].iter().position(|b| *b == b'\n') {
        Some(i) => (i + 1, true),
        None => (n, false),
    };
    let start = c.line.len();
    c.line.resize(start + take, 0);
    c.stream.read_exact(&mut c.line[start..])?;
    if done {
        return Ok(Step::Line);
    }
    if c.line.len() > max_line {
        return Ok(Step::TooLong);
    }
    if c.pieces >= MAX_PIECES {
        return Ok(Step::Fragmented);
    }
    Ok(Step::More)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// A listener no one connects to, in the abstract namespace (no file to clean up).
    fn listener(name: &str) -> std::os::unix::net::UnixListener {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("agentwall-test-{}-{name}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    }

    #[test]
    fn a_line_is_taken_while_a_silent_connection_waits_and_nothing_after_it() {
        let listener = listener("line");
        let mut w = Waiting::new(Duration::from_secs(60), 64);
        let (_silent_client, silent) = pair();
        let (mut client, server) = pair();
        assert!(w.add(silent, "silent", Class::Root).unwrap().is_none());
        assert!(w.add(server, "talker", Class::Root).unwrap().is_none());
        // In two pieces, and more after the newline.
        client.write_all(b"{\"op\":").unwrap();
        let r = w.wait(&listener);
        assert!(r.ready.is_empty() && w.len() == 2);
        client.write_all(b"\"status\"}\nnext").unwrap();
        let r = w.wait(&listener);
        let [
            Ready::Line {
                peer,
                line,
                mut stream,
            },
        ] = <[_; 1]>::try_from(r.ready).ok().unwrap()
        else {
            panic!("one line");
        };
        assert_eq!(
            (peer, line.as_slice()),
            ("talker", &b"{\"op\":\"status\"}\n"[..])
        );
        // What came after the line is still in the socket.
        stream.set_nonblocking(false).unwrap();
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"next");
        assert_eq!(w.len(), 1, "the silent one still waits");
    }

    #[test]
    fn deadlines_limits_and_closed_peers() {
        let listener = listener("limits");
        let mut w = Waiting::new(Duration::from_millis(20), 8);
        let (_a_client, a) = pair();
        let (mut c_client, c) = pair();
        w.add(a, 1, Class::Root).unwrap();
        w.add(c, 3, Class::Root).unwrap();
        c_client.write_all(b"0123456789").unwrap();
        let r = w.wait(&listener);
        assert!(matches!(
            r.ready.as_slice(),
            [Ready::TooLong { max: 8, .. }]
        ));
        // The other one says nothing and is dropped at its deadline.
        let mut expired = 0;
        for _ in 0..50 {
            expired += w.wait(&listener).expired;
            if w.len() == 0 {
                break;
            }
        }
        assert_eq!((expired, w.len()), (1, 0));
        // A connection closed before its line is dropped at once.
        let (a_client, a) = pair();
        w.add(a, 4, Class::Root).unwrap();
        drop(a_client);
        assert_eq!(w.wait(&listener).expired, 1);
    }

    #[test]
    fn a_class_makes_room_only_among_its_own() {
        let listener = listener("classes");
        let mut w = Waiting::new(Duration::from_secs(60), 64);
        let mut clients = Vec::new();
        // Root's revocation is waiting; the admin group fills all its places and more.
        let (mut root_client, root) = pair();
        w.add(root, "root", Class::Root).unwrap();
        for i in 0..Class::Group.places() {
            let (c, s) = pair();
            clients.push(c);
            assert!(
                w.add(s, "group", Class::Group).unwrap().is_none(),
                "place {i}"
            );
        }
        let (_c, s) = pair();
        let Some(Ready::Evicted { .. }) = w.add(s, "group", Class::Group).unwrap() else {
            panic!("the oldest of the group makes room");
        };
        // Confined peers have few places, and take none of the others'.
        for _ in 0..Class::Confined.places() {
            let (c, s) = pair();
            clients.push(c);
            assert!(w.add(s, "confined", Class::Confined).unwrap().is_none());
        }
        let (_c, s) = pair();
        assert!(matches!(
            w.add(s, "confined", Class::Confined).unwrap(),
            Some(Ready::Evicted { .. })
        ));
        root_client.write_all(b"{}\n").unwrap();
        let r = w.wait(&listener);
        assert!(matches!(
            r.ready.as_slice(),
            [Ready::Line { peer: "root", .. }]
        ));
        // The oldest of a class whose line already came is answered, not put out.
        let (mut first, s) = pair();
        w.add(s, "first", Class::Confined).unwrap();
        first.write_all(b"{}\n").unwrap();
        let made_room = (0..Class::Confined.places())
            .filter_map(|_| {
                let (c, s) = pair();
                clients.push(c);
                w.add(s, "later", Class::Confined).unwrap()
            })
            .collect::<Vec<_>>();
        assert!(
            made_room
                .iter()
                .any(|r| matches!(r, Ready::Line { peer: "first", .. })),
            "answered"
        );
        assert_eq!(
            Class::Root.places() + Class::Group.places() + Class::Confined.places(),
            crate::limits::ADMIN_WAITING
        );
    }

    #[test]
    fn urgent_bytes_and_a_trickle_do_not_keep_the_thread_busy() {
        let listener = listener("urgent");
        let mut w = Waiting::new(Duration::from_secs(60), 64);
        let (oob_client, s) = pair();
        w.add(s, 1, Class::Root).unwrap();
        // SAFETY: send(2) of one byte from a live buffer on a socket this test owns.
        let sent = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&oob_client),
                b"x".as_ptr().cast(),
                1,
                libc::MSG_OOB,
            )
        };
        assert_eq!(sent, 1, "{}", io::Error::last_os_error());
        // Read inline as part of the line: the socket is not readable again.
        let r = w.wait(&listener);
        assert!(r.ready.is_empty() && r.expired == 0 && w.len() == 1);
        // A line in many small pieces is refused.
        let (mut trickle, s) = pair();
        w.add(s, 2, Class::Root).unwrap();
        let mut refused = false;
        for _ in 0..MAX_PIECES {
            trickle.write_all(b"{").unwrap();
            let r = w.wait(&listener);
            if matches!(r.ready.as_slice(), [Ready::Fragmented { .. }]) {
                refused = true;
                break;
            }
        }
        assert!(refused, "refused after {MAX_PIECES} pieces");
    }
}
