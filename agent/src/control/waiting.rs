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

use std::{
    io::{self, Read as _},
    os::{fd::AsFd as _, unix::net::UnixStream},
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{MsgFlags, recv},
};

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
    /// Put out to make room for a newer one (the oldest goes): answered, then closed.
    Evicted { stream: UnixStream },
}

struct Conn<P> {
    stream: UnixStream,
    peer: P,
    line: Vec<u8>,
    deadline: Instant,
}

/// The connections waiting for their request line, at most `max` of them.
pub(super) struct Waiting<P> {
    conns: Vec<Conn<P>>,
    max: usize,
    timeout: Duration,
    max_line: usize,
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
    pub(super) fn new(max: usize, timeout: Duration, max_line: usize) -> Self {
        Self {
            conns: Vec::new(),
            max,
            timeout,
            max_line,
        }
    }

    /// Adds an accepted connection; it must send its line within the timeout. When the set is
    /// full, the oldest connection makes room and is returned.
    pub(super) fn add(&mut self, stream: UnixStream, peer: P) -> io::Result<Option<Ready<P>>> {
        stream.set_nonblocking(true)?;
        let evicted = if self.conns.len() >= self.max.max(1) {
            let oldest = self.conns.remove(0);
            Some(Ready::Evicted {
                stream: oldest.stream,
            })
        } else {
            None
        };
        self.conns.push(Conn {
            stream,
            peer,
            line: Vec::new(),
            deadline: Instant::now() + self.timeout,
        });
        Ok(evicted)
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
                match take_line(&mut c, self.max_line) {
                    Ok(Step::More) => {}
                    Ok(Step::Line) => {
                        ready.push(Ready::Line {
                            stream: c.stream,
                            peer: c.peer,
                            line: c.line,
                        });
                        continue;
                    }
                    Ok(Step::TooLong) => {
                        ready.push(Ready::TooLong {
                            stream: c.stream,
                            max: self.max_line,
                        });
                        continue;
                    }
                    Ok(Step::Closed) | Err(_) => {
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
    Closed,
}

/// Takes what the connection has of its line: up to and with the newline, nothing after.
fn take_line<P>(c: &mut Conn<P>, max_line: usize) -> io::Result<Step> {
    let room = max_line + 1 - c.line.len().min(max_line);
    let mut buf = vec![0u8; room];
    let n = match recv(
        std::os::fd::AsRawFd::as_raw_fd(&c.stream),
        &mut buf,
        MsgFlags::MSG_PEEK,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => return Ok(Step::More),
        Err(e) => return Err(e.into()),
    };
    if n == 0 {
        return Ok(Step::Closed);
    }
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
        let mut w = Waiting::new(8, Duration::from_secs(60), 64);
        let (_silent_client, silent) = pair();
        let (mut client, server) = pair();
        assert!(w.add(silent, "silent").unwrap().is_none());
        assert!(w.add(server, "talker").unwrap().is_none());
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
    fn deadlines_limits_and_the_oldest_making_room() {
        let listener = listener("limits");
        let mut w = Waiting::new(2, Duration::from_millis(20), 8);
        let (_a_client, a) = pair();
        let (_b_client, b) = pair();
        let (mut c_client, c) = pair();
        w.add(a, 1).unwrap();
        w.add(b, 2).unwrap();
        let Some(Ready::Evicted { .. }) = w.add(c, 3).unwrap() else {
            panic!("the oldest makes room");
        };
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
        w.add(a, 4).unwrap();
        drop(a_client);
        assert_eq!(w.wait(&listener).expired, 1);
    }
}
