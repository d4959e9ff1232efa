//! The enrollment protocol: TLS with a client certificate over a Unix stream socket, then one
//! JSON request line and one JSON reply line. Documented for other languages in
//! docs/enrollment.md.
//!
//! TLS proves that the client holds the private key of the certificate it presents (the
//! handshake signature is checked against that certificate). Whether the certificate itself is
//! trusted is decided after the handshake by [`super::verify::Verifier`], so that a refused
//! agent receives the reason in plain words instead of a bare TLS alert. Nothing is granted
//! before that verification passed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use serde::{Deserialize, Serialize};

/// The host name the daemon's enrollment certificate carries (besides its SPIFFE ID), for TLS
/// clients that check servers by name.
pub const SERVER_NAME: &str = "agentwall";
/// Longest request or reply line.
pub const MAX_LINE: usize = 16 * 1024;
/// Time a client has for the handshake and its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a refusal the daemon sends before any TLS begins (too many enrollments of the user in
/// progress) starts: one plain line, which no TLS record can start with.
pub const BUSY_PREFIX: &str = "agentwall: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnrollRequest {
    /// Bind the caller's cgroup to the identity of its certificate.
    Enroll,
    /// A JWT-SVID for the identity of the certificate, for these audiences.
    Token { audience: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EnrollReply {
    Enrolled(Enrolled),
    Token {
        token: String,
        spiffe_id: String,
        /// RFC 3339.
        expires_at: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub spiffe_id: String,
    pub serial: String,
    pub policy: String,
    /// Cgroup path from the cgroup v2 root.
    pub cgroup: String,
    pub cgroup_id: u64,
    /// RFC 3339: the binding ends with the certificate.
    pub expires_at: String,
}

/// The TLS provider of every agentwall connection: aws-lc-rs (its P-256 and X25519 are
/// markedly faster than ring's on x86-64), its default key exchange groups (X25519 with
/// ML-KEM first), and AES-128-GCM with SHA-256 ahead of AES-256-GCM with SHA-384: SHA-256
/// runs on the CPU's SHA extensions where SHA-384 does not, which makes a full handshake
/// ~10% cheaper. Both suites are TLS 1.3's mandatory, AEAD-only ones.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> = std::sync::LazyLock::new(|| {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(p)
    });
    Arc::clone(&PROVIDER)
}

/// Requires a client certificate and checks the handshake signature made with its key; the
/// certificate's trust is judged after the handshake (see the module documentation).
#[derive(Debug)]
struct ProofOfPossession {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ProofOfPossession {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred: every enrollment runs `Verifier::verify_client` on the chain before it
        // does anything else.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Pem {
            what: what.into(),
            message: e.to_string(),
        })?;
    if v.is_empty() {
        return Err(TlsSetupError::Pem {
            what: what.into(),
            message: "holds no PEM certificate".into(),
        });
    }
    Ok(v)
}

fn key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsSetupError::Pem {
        what: what.into(),
        message: format!("no PEM private key: {e}"),
    })
}

/// The daemon's TLS configuration: its own certificate, client certificates required.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ProofOfPossession { provider }))
        .with_single_cert(
            certs("server certificate", cert_pem.as_bytes())?,
            key("server key", key_pem.as_bytes())?,
        )?;
    // Our suite order, not the client's (OpenSSL clients, Python's among them, list
    // AES-256-GCM-SHA384 first).
    cfg.ignore_client_order = true;
    // No resumption: every enrollment proves possession of its key afresh, and the daemon
    // neither stores sessions nor sends tickets nobody will use.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A client configuration that checks the server against the CA certificates in `pem`.
fn client_builder(
    what: &str,
    pem: &[u8],
) -> Result<
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    TlsSetupError,
> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(what, pem)? {
        roots.add(c)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}

/// An agent's TLS configuration: its SVID and key, the daemon checked against `bundle_pem`.
pub fn client_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut cfg = client_builder("trust bundle", bundle_pem)?
        .with_client_auth_cert(certs("certificate", cert_pem)?, key("key", key_pem)?)?;
    // The daemon never resumes sessions (see `server_config`).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// TLS to an audit collector: its certificate checked against `ca_pem`, with a client
/// certificate when the collector asks for one.
pub fn collector_client_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let b = client_builder("collector CA file", ca_pem)?;
    let cfg = match client {
        Some((cert, k)) => b.with_client_auth_cert(
            certs("collector client certificate", cert)?,
            key("collector client key", k)?,
        )?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("connecting to the enrollment socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Setup(#[from] TlsSetupError),
    #[error("TLS with the daemon: {0}")]
    Tls(#[source] std::io::Error),
    #[error("the daemon sent no valid reply: {0}")]
    Reply(String),
    #[error("enrollment refused: {0}")]
    Refused(String),
}

/// Enrolls the calling process (its cgroup) with the certificate and key given (blocking).
pub fn enroll(
    socket: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<Enrolled, EnrollError> {
    match request(
        socket,
        cert_pem,
        key_pem,
        bundle_pem,
        &EnrollRequest::Enroll,
    )? {
        EnrollReply::Enrolled(e) => Ok(e),
        other => Err(EnrollError::Reply(format!("{other:?}"))),
    }
}

/// Asks for a JWT-SVID of the certificate's identity (blocking). Returns the token and its
/// expiry (RFC 3339).
pub fn token(
    socket: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
    audience: &[String],
) -> Result<(String, String), EnrollError> {
    let req = EnrollRequest::Token {
        audience: audience.to_vec(),
    };
    match request(socket, cert_pem, key_pem, bundle_pem, &req)? {
        EnrollReply::Token {
            token, expires_at, ..
        } => Ok((token, expires_at)),
        other => Err(EnrollError::Reply(format!("{other:?}"))),
    }
}

/// Reads from a Unix stream socket, waiting (at most `timeout`) with `poll` for something to
/// read rather than in a blocking read.
///
/// A thread asleep in a blocking read of an AF_UNIX stream socket is woken by every
/// write-space wakeup of that socket, and its peer causes one each time it reads (and so
/// frees) a message this side sent: a spurious wakeup, paid for by both sides (a cross-CPU
/// interrupt, two context switches). `poll` for readability ignores write-space wakeups, as
/// event loops (epoll) do. Data already waiting is read at once, in one system call.
pub(crate) fn read_when_readable(
    sock: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
    until: std::time::Instant,
    late: &'static str,
) -> std::io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::{AsFd as _, AsRawFd as _};
    loop {
        match recv(sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, late));
        }
        // Whole milliseconds, rounded up: less than one must still wait.
        let wait = nix::poll::PollTimeout::try_from(left.as_micros().div_ceil(1000))
            .unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, wait) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The client's end of the enrollment socket (see [`read_when_readable`]).
struct Readable {
    sock: std::os::unix::net::UnixStream,
    timeout: Duration,
    /// Whether a byte came yet: the first ones may be the daemon's plain refusal.
    started: bool,
}

impl std::io::Read for Readable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let until = std::time::Instant::now() + self.timeout;
        let n = read_when_readable(&self.sock, buf, until, "the daemon did not answer in time")?;
        if !self.started && n > 0 {
            self.started = true;
            let got = &buf[..n];
            if got.starts_with(BUSY_PREFIX.as_bytes()) {
                let line = String::from_utf8_lossy(got);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("the daemon refused: {}", line.trim_end()),
                ));
            }
        }
        Ok(n)
    }
}

impl std::io::Write for Readable {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request over a fresh TLS connection; a refusal becomes [`EnrollError::Refused`].
pub fn request(
    socket: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
    req: &EnrollRequest,
) -> Result<EnrollReply, EnrollError> {
    let cfg = client_config(cert_pem, key_pem, bundle_pem)?;
    let name = ServerName::try_from(SERVER_NAME)
        .map_err(|e| EnrollError::Tls(std::io::Error::other(e)))?;
    // The ClientHello (key share included) is made before connecting, so that it is in the
    // socket by the time the daemon has accepted and identified the peer: its thread reads
    // it without going to sleep and being woken again.
    let mut conn = rustls::ClientConnection::new(cfg, name)
        .map_err(|e| EnrollError::Tls(std::io::Error::other(e)))?;
    let mut line = serde_json::to_vec(req).map_err(|e| EnrollError::Reply(e.to_string()))?;
    line.push(b'\n');
    // Queued before the handshake: rustls sends it under the traffic keys in the same write
    // as the client's last handshake flight (one round trip fewer for the daemon).
    conn.writer().write_all(&line).map_err(EnrollError::Tls)?;
    let sock =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| EnrollError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let mut tls = rustls::StreamOwned::new(
        conn,
        Readable {
            sock,
            timeout: CLIENT_TIMEOUT * 2,
            started: false,
        },
    );
    tls.flush().map_err(EnrollError::Tls)?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(&mut tls, MAX_LINE as u64))
        .read_line(&mut reply)
        .map_err(EnrollError::Tls)?;
    match serde_json::from_str::<EnrollReply>(reply.trim_end()) {
        Ok(EnrollReply::Error { message }) => Err(EnrollError::Refused(message)),
        Ok(r) => Ok(r),
        Err(e) => Err(EnrollError::Reply(format!("{e} in {reply:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        time::SystemTime,
    };

    use super::*;
    use crate::identity::{
        spiffe::SpiffeId,
        svid::{DEFAULT_LIFETIME, KeyAlgorithm, LeafRequest, LocalCa},
    };

    /// One handshake over a socket pair; returns how the server saw it.
    fn handshake(
        server: &Arc<rustls::ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
    ) -> (
        Option<rustls::HandshakeKind>,
        Option<rustls::SupportedCipherSuite>,
    ) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = Arc::clone(server);
        let srv = std::thread::spawn(move || {
            let conn = rustls::ServerConnection::new(server).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, b);
            let mut buf = [0u8; 1];
            tls.read_exact(&mut buf).unwrap();
            tls.write_all(b"k").unwrap();
            (
                tls.conn.handshake_kind(),
                tls.conn.negotiated_cipher_suite(),
            )
        });
        let conn = rustls::ClientConnection::new(
            Arc::clone(client),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, a);
        tls.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).unwrap();
        srv.join().unwrap()
    }

    #[test]
    fn every_enrollment_is_a_full_handshake_in_the_daemons_suite_order() {
        for keys in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            full_handshakes_with(keys);
        }
    }

    /// Agents' keys and the CA's of type `keys` (the server's is always Ed25519).
    fn full_handshakes_with(keys: KeyAlgorithm) {
        let now = SystemTime::now();
        let ca = LocalCa::create_with("example.org", keys, now).unwrap();
        let leaf = |id: &str| LeafRequest {
            id: SpiffeId::workload(id).unwrap(),
            lifetime: DEFAULT_LIFETIME,
            capabilities: Vec::new(),
        };
        let server_id = ca
            .issue_server(
                &leaf("spiffe://example.org/agentwall/d"),
                &[SERVER_NAME],
                now,
            )
            .unwrap();
        let agent = ca
            .issue(&leaf("spiffe://example.org/agent/a/p"), now)
            .unwrap();
        let server = server_config(&server_id.cert_pem, &server_id.key_pem).unwrap();
        // A client that would resume if the server let it (rustls' default configuration),
        // offering AES-256-GCM-SHA384 first as OpenSSL does.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(p))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    certs("c", agent.cert_pem.as_bytes()).unwrap(),
                    key("k", agent.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        );
        for _ in 0..3 {
            let (kind, suite) = handshake(&server, &client);
            assert_eq!(kind, Some(rustls::HandshakeKind::Full));
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
        // The agent's own configuration asks for no resumption either.
        let own = client_config(
            agent.cert_pem.as_bytes(),
            agent.key_pem.as_bytes(),
            ca.cert_pem().as_bytes(),
        )
        .unwrap();
        for _ in 0..2 {
            assert_eq!(
                handshake(&server, &own).0,
                Some(rustls::HandshakeKind::Full)
            );
        }
    }

    #[test]
    fn a_read_waits_for_data_through_the_peers_reads_and_gives_up_at_the_deadline() {
        use std::io::Write as _;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        // Nothing comes: the read ends at the deadline with the caller's words.
        let t = std::time::Instant::now();
        let e = read_when_readable(&a, &mut buf, t + Duration::from_millis(30), "too late")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "too late");
        assert!(t.elapsed() >= Duration::from_millis(30));
        // The peer reads what this side sent (a write-space wakeup here), then answers later:
        // the read returns the answer, not early with nothing.
        (&a).write_all(b"hello").unwrap();
        let peer = std::thread::spawn(move || {
            let mut got = [0u8; 5];
            std::io::Read::read_exact(&mut b, &mut got).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"ok").unwrap();
            b
        });
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let n = read_when_readable(&a, &mut buf, until, "too late").unwrap();
        assert_eq!(&buf[..n], b"ok");
        // Data already waiting is read at once; a closed peer reads as the end.
        let mut b = peer.join().unwrap();
        b.write_all(b"more").unwrap();
        drop(b);
        let n = read_when_readable(&a, &mut buf, until, "too late").unwrap();
        assert_eq!(&buf[..n], b"more");
        assert_eq!(
            read_when_readable(&a, &mut buf, until, "too late").unwrap(),
            0
        );
    }
}
