//! A keep-alive HTTP/1.1 client for the benchmarks: one request at a time on one connection,
//! over any stream (a Unix socket, or TLS on TCP), with the least work of its own.

use std::io::{BufRead as _, BufReader, Read, Write};

/// One connection; requests are written to it and answers read back in turn.
#[derive(Debug)]
pub struct KeepAlive<S: Read + Write> {
    s: BufReader<S>,
    line: String,
}

impl<S: Read + Write> KeepAlive<S> {
    pub fn new(stream: S) -> Self {
        Self {
            s: BufReader::new(stream),
            line: String::new(),
        }
    }

    /// Sends `POST path` with `body` and reads the whole answer: its status and body. Panics
    /// on a broken connection or an answer that is not HTTP (the benchmark aborts).
    pub fn post(&mut self, path: &str, body: &str) -> (u16, Vec<u8>) {
        self.try_post(path, body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// [`KeepAlive::post`], with the error of a broken connection or a garbled answer.
    pub fn try_post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let garbled = |what: &str| std::io::Error::other(format!("not HTTP: {what}"));
        let w = self.s.get_mut();
        write!(
            w,
            "POST {path} HTTP/1.1\r\nHost: agentwall\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        w.flush()?;
        self.line.clear();
        self.s.read_line(&mut self.line)?;
        let status: u16 = self
            .line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| garbled(&self.line))?;
        let mut len = 0;
        loop {
            self.line.clear();
            if self.s.read_line(&mut self.line)? == 0 {
                return Err(garbled("the answer broke off in its head"));
            }
            if self.line == "\r\n" {
                break;
            }
            if let Some(v) = self
                .line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
            {
                len = v.trim().parse().map_err(|_| garbled("Content-Length"))?;
            }
        }
        let mut b = vec![0; len];
        self.s.read_exact(&mut b)?;
        Ok((status, b))
    }
}

/// A keep-alive connection over mutual TLS, as an agent makes it.
pub type Mtls = KeepAlive<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>;

/// Connects to the decision API at `address` as the holder of the SVID (`cert`, `key`, with
/// its `bundle.pem` beside) and completes the TLS handshake; the handshake's error if the
/// server ended it.
pub fn mtls(address: &str, (cert, key): &(String, String)) -> std::io::Result<Mtls> {
    use agentwall::identity::enroll;
    let bundle = std::path::Path::new(cert).with_file_name("bundle.pem");
    let config = enroll::client_config(
        &std::fs::read(cert)?,
        &std::fs::read(key)?,
        &std::fs::read(bundle)?,
    )
    .map_err(std::io::Error::other)?;
    let mut tcp = std::net::TcpStream::connect(address)?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(enroll::SERVER_NAME)
        .map_err(std::io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    // The handshake now, to its end: the server gives each a few seconds.
    while conn.is_handshaking() || conn.wants_write() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(KeepAlive::new(rustls::StreamOwned::new(conn, tcp)))
}
