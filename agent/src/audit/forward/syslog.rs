//! The syslog sink: RFC 5424 messages over TCP, with TLS (RFC 5425) unless turned off.

use super::*;

/// Syslog facilities a record may be filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    User,
    Daemon,
    Auth,
    Authpriv,
    /// "log audit" (13).
    Audit,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    fn code(self) -> u8 {
        match self {
            Self::User => 1,
            Self::Daemon => 3,
            Self::Auth => 4,
            Self::Authpriv => 10,
            Self::Audit => 13,
            Self::Local0 => 16,
            Self::Local1 => 17,
            Self::Local2 => 18,
            Self::Local3 => 19,
            Self::Local4 => 20,
            Self::Local5 => 21,
            Self::Local6 => 22,
            Self::Local7 => 23,
        }
    }
}

/// Config `audit.syslog`: a remote collector.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `host:port` (`[v6]:port` for an IPv6 address).
    pub address: String,
    /// TLS (RFC 5425), on unless set to false.
    #[serde(default = "yes")]
    pub tls: bool,
    /// CA certificates (PEM) that the collector's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for collectors that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name checked against the collector's certificate (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default = "default_facility")]
    pub facility: Facility,
    /// Records waiting to be sent at most; beyond that they are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn yes() -> bool {
    true
}

fn default_facility() -> Facility {
    Facility::Audit
}

fn default_queue() -> usize {
    16_384
}

/// A syslog `address` that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address: must be host:port (for example collector.example:6514)")]
    NoPort,
    #[error("address: port {0:?} is not a port number (1-65535)")]
    Port(String),
    #[error("address: host {0:?} is not a host name or address")]
    Host(String),
}

/// Why the syslog sink could not reach its collector this time (it tries again).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{0} has no address")]
    NoAddress(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(std::io::Error),
    #[error("server name {name:?}: {message}")]
    ServerName { name: String, message: String },
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("TLS handshake with {host}: {source}")]
    Handshake {
        host: String,
        source: std::io::Error,
    },
}

impl SyslogConfig {
    /// The host and port of `address`.
    pub fn host_port(&self) -> Result<(&str, u16), AddressError> {
        let (host, port) = self.address.rsplit_once(':').ok_or(AddressError::NoPort)?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| AddressError::Port(port.to_string()))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(AddressError::Host(host.to_string()));
        }
        Ok((host, port))
    }

    /// Checks what can be checked without the network; the message says what to fix.
    pub fn check(&self) -> Result<(), SinkError> {
        self.host_port()?;
        if self.tls && self.ca_file.is_none() {
            return Err(SinkError::NeedsCa);
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(SinkError::CertWithoutKey);
        }
        if !self.tls && (self.cert_file.is_some() || self.ca_file.is_some()) {
            // A CA file says the collector is to be verified: sending in plain text instead
            // would be a silent downgrade of what the operator wrote.
            return Err(SinkError::TlsOff);
        }
        if self.queue == 0 || self.queue > 1 << 20 {
            return Err(SinkError::Queue {
                max: 1 << 20,
                what: "records",
            });
        }
        Ok(())
    }

    fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, SinkError> {
        if !self.tls {
            return Ok(None);
        }
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| SinkError::Read {
                path: p.clone(),
                source,
            })
        };
        let ca = read(self.ca_file.as_ref().ok_or(SinkError::NeedsCa)?)?;
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                crate::identity::svid::check_key_file(k)?;
                Some((read(c)?, read(k)?))
            }
            _ => None,
        };
        Ok(Some(crate::identity::enroll::collector_client_config(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )?))
    }
}

/// A connection to the collector.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(bytes).and_then(|()| s.flush()),
            Self::Tls(s) => s.write_all(bytes).and_then(|()| s.flush()),
        }
    }
}

/// How long a connect or a write to the collector may take before the connection is given up.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages written to the collector at once at most.
const SEND_BATCH: usize = 512;

struct Syslog {
    cfg: SyslogConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    hostname: String,
    pid: u32,
}

impl Syslog {
    fn connect(&self) -> Result<Conn, ConnectError> {
        let (host, port) = self.cfg.host_port()?;
        let addrs = (host, port)
            .to_socket_addrs()
            .map_err(|source| ConnectError::Resolve {
                host: host.to_string(),
                source,
            })?;
        let mut last = ConnectError::NoAddress(host.to_string());
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(source) => last = ConnectError::Connect { addr: a, source },
            }
        }
        let mut sock = sock.ok_or(last)?;
        let setup = |s: &TcpStream| {
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)
        };
        setup(&sock).map_err(ConnectError::Setup)?;
        let Some(tls) = &self.tls else {
            return Ok(Conn::Plain(sock));
        };
        let name = self.cfg.server_name.as_deref().unwrap_or(host);
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).map_err(|e| {
            ConnectError::ServerName {
                name: name.to_string(),
                message: e.to_string(),
            }
        })?;
        let mut conn =
            rustls::ClientConnection::new(Arc::clone(tls), name).map_err(ConnectError::Tls)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|source| ConnectError::Handshake {
                    host: host.to_string(),
                    source,
                })?;
        }
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
    }

    /// One octet-counted RFC 5424 message.
    fn frame(&self, d: &Durable, out: &mut Vec<u8>) {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow, default)]
            time: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            verdict: Option<Cow<'a, str>>,
        }
        let head = serde_json::from_slice::<Head<'_>>(&d.record).unwrap_or(Head {
            time: None,
            kind: None,
            verdict: None,
        });
        let kind = head.kind.as_deref().unwrap_or("record");
        let severity = severity(kind, head.verdict.as_deref());
        let pri = u16::from(self.cfg.facility.code()) * 8 + u16::from(severity);
        let msg = format!(
            "<{pri}>1 {} {} agentwall {} {} [agentwall@32473 seq=\"{}\"] ",
            head.time.as_deref().filter(|t| printable(t)).unwrap_or("-"),
            self.hostname,
            self.pid,
            msgid(kind),
            d.seq,
        );
        let len = msg.len() + d.record.len();
        out.extend_from_slice(format!("{len} ").as_bytes());
        out.extend_from_slice(msg.as_bytes());
        out.extend_from_slice(&d.record);
    }

    fn run(&self, rx: &mpsc::Receiver<Arc<Durable>>, stats: &SinkStats) {
        let mut conn: Option<Conn> = None;
        let mut batch = Vec::new();
        let mut count = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            if batch.is_empty() {
                let Ok(first) = rx.recv() else { return };
                self.frame(&first, &mut batch);
                count = 1;
                while count < SEND_BATCH as u64 {
                    let Ok(d) = rx.try_recv() else { break };
                    self.frame(&d, &mut batch);
                    count += 1;
                }
            }
            if conn.is_none() {
                match self.connect() {
                    Ok(c) => {
                        tracing::info!(address = %self.cfg.address, "audit syslog sink connected");
                        stats.connected.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(100);
                        conn = Some(c);
                    }
                    Err(e) => {
                        if stats.errors.load(Ordering::Relaxed) == 0 || backoff.as_secs() >= 5 {
                            tracing::warn!(address = %self.cfg.address, error = %e, "audit syslog sink cannot reach its collector; records queue, then are dropped and counted");
                        }
                        stats.failed("connect", &e);
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            if let Some(c) = conn.as_mut() {
                match c.write_all(&batch) {
                    Ok(()) => {
                        stats.sent.fetch_add(count, Ordering::Relaxed);
                        batch.clear();
                    }
                    Err(e) => {
                        tracing::warn!(address = %self.cfg.address, error = %e, "audit syslog sink lost its collector; reconnecting");
                        stats.failed("write", &e);
                        conn = None;
                    }
                }
            }
        }
    }
}

/// Severity by record: behavioral alerts and losses warn, denials are notices.
fn severity(kind: &str, verdict: Option<&str>) -> u8 {
    match (kind, verdict) {
        ("alert" | "events_lost" | "audit_truncated" | "quarantine" | "reload_rejected", _) => 4,
        ("verdict", Some("deny")) | ("revoked" | "enroll_refused" | "health", _) => 5,
        _ => 6,
    }
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b))
}

/// RFC 5424 MSGID: 1-32 printable US-ASCII characters.
fn msgid(kind: &str) -> Cow<'_, str> {
    if printable(kind) && kind.len() <= 32 {
        Cow::Borrowed(kind)
    } else {
        let s: String = kind
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        Cow::Owned(if s.is_empty() { "-".into() } else { s })
    }
}

fn hostname() -> String {
    let h = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h: String = h
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() { "-".into() } else { h }
}

/// Starts the syslog sink; a bad CA, certificate or key file is an error now, not later.
pub fn syslog(cfg: &SyslogConfig) -> Result<Sink, SinkError> {
    cfg.check()?;
    let s = Syslog {
        tls: cfg.tls_config()?,
        cfg: cfg.clone(),
        hostname: hostname(),
        pid: std::process::id(),
    };
    Ok(Sink::spawn("syslog", cfg.queue, move |rx, stats| {
        s.run(&rx, stats);
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(address: &str) -> SyslogConfig {
        serde_norway::from_str(&format!("address: \"{address}\"\ntls: false\n")).unwrap()
    }

    #[test]
    fn addresses_are_checked() {
        assert_eq!(cfg("[::1]:6514").host_port().unwrap(), ("::1", 6514));
        assert_eq!(
            cfg("logs.example:514").host_port().unwrap(),
            ("logs.example", 514)
        );
        for bad in [
            "logs.example",
            "logs.example:0",
            ":514",
            "x:99999",
            "[::1:5",
        ] {
            assert!(cfg(bad).check().is_err(), "{bad}");
        }
        let tls: SyslogConfig = serde_norway::from_str("address: a:1\n").unwrap();
        assert!(tls.check().unwrap_err().to_string().contains("ca_file"));
        // A CA file with TLS off would send in plain text what the operator meant to verify.
        let plain: SyslogConfig =
            serde_norway::from_str("address: a:1\ntls: false\nca_file: /ca.pem\n").unwrap();
        let e = plain.check().unwrap_err().to_string();
        assert!(e.contains("tls: true") && e.contains("plain"), "{e}");
    }

    #[test]
    fn messages_are_octet_counted_rfc5424() {
        let s = Syslog {
            cfg: cfg("a:1"),
            tls: None,
            hostname: "node1".into(),
            pid: 42,
        };
        let record =
            br#"{"verdict":"deny","port":80,"time":"2026-11-25T21:00:00.000Z","kind":"verdict"}"#;
        let mut out = Vec::new();
        s.frame(
            &Durable {
                seq: 7,
                kind: "verdict",
                record: record.to_vec(),
            },
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        // audit (13) * 8 + notice (5)
        assert!(
            msg.starts_with(
                "<109>1 2026-11-25T21:00:00.000Z node1 agentwall 42 verdict [agentwall@32473 seq=\"7\"] {"
            ),
            "{msg}"
        );
        assert!(msg.ends_with(std::str::from_utf8(record).unwrap()));
        assert_eq!(msgid("a b"), "ab");
        assert_eq!(msgid(&"k".repeat(40)).len(), 32);
    }
}
