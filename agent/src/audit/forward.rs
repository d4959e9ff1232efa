//! Sinks beside the local store: copies of durable records for log shippers and collectors.
//!
//! A sink runs on its own thread behind a bounded queue. The writer hands it a record only
//! after the record is durable, never waits for it, and counts what a full queue turns away:
//! a slow or absent sink can cost copies, never enforcement or the local log (which keeps
//! everything; a collector can catch up from `agentwall audit query --since`).
//!
//! - `stdout`: one JSON line per record, `{"seq": N, "record": {...}}`.
//! - `syslog`: RFC 5424 messages over TCP, with TLS (RFC 5425) unless turned off, framed by
//!   octet counting (RFC 6587). Each message carries the record's kind as MSGID, its sequence
//!   number as structured data `[agentwall@32473 seq="N"]` and the record's JSON as MSG. A
//!   batch whose write failed is sent again after reconnecting, so a collector may see a
//!   record twice (never out of order); the sequence number tells duplicates apart.
//!
//! Size: both network sinks (syslog, webhook) use the queue, retry and TLS code kept here;
//! about 100 lines are tests.

use std::{
    borrow::Cow,
    io::Write,
    net::{TcpStream, ToSocketAddrs as _},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use serde::Deserialize;

/// A durable record, shared by every sink.
#[derive(Debug)]
pub struct Durable {
    pub seq: u64,
    pub kind: &'static str,
    /// The record's JSON.
    pub record: Vec<u8>,
}

/// What a sink did, for status.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub sent: AtomicU64,
    /// Records turned away because the sink's queue was full.
    pub dropped: AtomicU64,
    /// Failed connects and writes.
    pub errors: AtomicU64,
    pub connected: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl SinkStats {
    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
        let text = format!("{what}: {e}");
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(text);
        }
    }
}

/// One sink: its queue, its counters, and a way to wait for its thread at shutdown.
#[derive(Debug)]
pub struct Sink {
    pub name: &'static str,
    /// The record kinds it takes (all when None).
    kinds: Option<&'static [&'static str]>,
    tx: Option<mpsc::SyncSender<Arc<Durable>>>,
    pub stats: Arc<SinkStats>,
    done: mpsc::Receiver<()>,
}

impl Sink {
    fn spawn(
        name: &'static str,
        queue: usize,
        body: impl FnOnce(mpsc::Receiver<Arc<Durable>>, &SinkStats) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let (done_tx, done) = mpsc::channel::<()>();
        let stats = Arc::new(SinkStats::default());
        let s = Arc::clone(&stats);
        thread::Builder::new()
            .name(format!("agentwall-sink-{name}"))
            .spawn(move || {
                body(rx, &s);
                drop(done_tx);
            })?;
        Ok(Self {
            name,
            kinds: None,
            tx: Some(tx),
            stats,
            done,
        })
    }

    /// Offers a record; a full queue drops it (counted).
    pub fn offer(&self, d: &Arc<Durable>) {
        if self.kinds.is_some_and(|k| !k.contains(&d.kind)) {
            return;
        }
        if let Some(tx) = &self.tx
            && tx.try_send(Arc::clone(d)).is_err()
        {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the queue and gives the thread until `deadline` to deliver what it holds.
    pub fn finish(mut self, wait: Duration) {
        self.tx = None;
        if self.done.recv_timeout(wait) == Err(mpsc::RecvTimeoutError::Timeout) {
            tracing::warn!(
                sink = self.name,
                "audit sink still busy at shutdown; its backlog is left to the local log"
            );
        }
    }
}

/// Records waiting for the stdout sink at most.
pub const STDOUT_QUEUE: usize = 16_384;

/// JSON lines on stdout, for log shippers (Fluent Bit, Vector and the like).
pub fn stdout() -> std::io::Result<Sink> {
    Sink::spawn("stdout", STDOUT_QUEUE, |rx, stats| {
        let out = std::io::stdout();
        for d in rx {
            let mut o = out.lock();
            let r = o
                .write_all(format!("{{\"seq\":{},\"record\":", d.seq).as_bytes())
                .and_then(|()| o.write_all(&d.record))
                .and_then(|()| o.write_all(b"}\n"))
                .and_then(|()| o.flush());
            if let Err(e) = r {
                // A closed stdout: nothing to ship to any more.
                stats.failed("stdout", &e);
                return;
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
        }
    })
}

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

/// What keeps a sink from starting; each says what to fix in its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error(
        "tls needs ca_file: the CA certificates (PEM) of the collector, or set tls: false for a collector on a trusted network"
    )]
    NeedsCa,
    #[error("cert_file and key_file go together")]
    CertWithoutKey,
    #[error(
        "ca_file, cert_file and key_file need tls: true (records would go in plain text); remove them, or remove tls: false"
    )]
    TlsOff,
    #[error("queue must be between 1 and {max} {what}")]
    Queue { max: usize, what: &'static str },
    #[error("url must start with https:// or http://")]
    UrlScheme,
    #[error("url has no host")]
    UrlHost,
    #[error("ca_file needs an https:// url")]
    CaNeedsHttps,
    #[error("timeout must be between 1ms and 60s")]
    Timeout,
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error(transparent)]
    Key(#[from] crate::identity::svid::CaError),
    #[error(transparent)]
    Tls(#[from] crate::identity::enroll::TlsSetupError),
    #[error("starting its thread: {0}")]
    Spawn(#[from] std::io::Error),
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

/// Config `detect.webhook`: alerts are also POSTed (JSON, `{"seq": N, "record": {...}}`) to a
/// URL, once each is durable in the local log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://...` (or `http://...`).
    pub url: String,
    /// CA certificates (PEM) for the endpoint's certificate; default: the Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time one delivery may take.
    #[serde(
        default = "default_webhook_timeout",
        with = "crate::clock::duration_text"
    )]
    pub timeout: Duration,
    /// Alerts waiting for delivery at most; beyond that they are dropped and counted.
    #[serde(default = "default_webhook_queue")]
    pub queue: usize,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_webhook_queue() -> usize {
    1024
}

/// Deliveries tried per alert before it is given up (counted as dropped).
const WEBHOOK_ATTEMPTS: u32 = 3;

impl WebhookConfig {
    /// The URL as logs show it: scheme and host only, because paths and queries of webhooks
    /// often carry the secret that authorizes the caller.
    pub fn shown_url(&self) -> String {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("", &self.url));
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        // Credentials before the host are secret too.
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        format!("{scheme}://{host}/…")
    }

    pub fn check(&self) -> Result<(), SinkError> {
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or(SinkError::UrlScheme)?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(SinkError::UrlHost);
        }
        if self.url.starts_with("http://") && self.ca_file.is_some() {
            return Err(SinkError::CaNeedsHttps);
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(SinkError::Timeout);
        }
        if self.queue == 0 || self.queue > 1 << 16 {
            return Err(SinkError::Queue {
                max: 1 << 16,
                what: "alerts",
            });
        }
        Ok(())
    }

    fn agent(&self) -> Result<ureq::Agent, SinkError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let mut tls = TlsConfig::builder();
        if let Some(p) = &self.ca_file {
            let pem = std::fs::read(p).map_err(|source| SinkError::Read {
                path: p.clone(),
                source,
            })?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| SinkError::Pem {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(SinkError::NoCertificate(p.clone()));
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
        }
        Ok(ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(true)
            .max_redirects(0)
            .user_agent(concat!("agentwall/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into())
    }
}

/// Starts the alert webhook; a bad CA file is an error now.
pub fn webhook(cfg: &WebhookConfig) -> Result<Sink, SinkError> {
    cfg.check()?;
    let agent = cfg.agent()?;
    let url = cfg.url.clone();
    let shown = cfg.shown_url();
    let mut sink = Sink::spawn("webhook", cfg.queue, move |rx, stats| {
        for d in rx {
            let mut body = format!("{{\"seq\":{},\"record\":", d.seq).into_bytes();
            body.extend_from_slice(&d.record);
            body.push(b'}');
            let mut delay = Duration::from_millis(200);
            let mut delivered = false;
            for attempt in 1..=WEBHOOK_ATTEMPTS {
                match agent
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send(&body[..])
                {
                    Ok(_) => {
                        stats.connected.store(true, Ordering::Relaxed);
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        delivered = true;
                        break;
                    }
                    Err(e) => {
                        // An error may quote the URL (a bad URI does): never the whole of it.
                        stats.failed("POST", &e.to_string().replace(&url, &shown));
                        if attempt < WEBHOOK_ATTEMPTS {
                            thread::sleep(delay);
                            delay *= 4;
                        }
                    }
                }
            }
            if !delivered {
                tracing::warn!(url = %shown, seq = d.seq, "alert webhook: delivery given up (the alert is in the audit log)");
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    })?;
    sink.kinds = Some(&["alert"]);
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(address: &str) -> SyslogConfig {
        serde_yaml::from_str(&format!("address: \"{address}\"\ntls: false\n")).unwrap()
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
        let tls: SyslogConfig = serde_yaml::from_str("address: a:1\n").unwrap();
        assert!(tls.check().unwrap_err().to_string().contains("ca_file"));
        // A CA file with TLS off would send in plain text what the operator meant to verify.
        let plain: SyslogConfig =
            serde_yaml::from_str("address: a:1\ntls: false\nca_file: /ca.pem\n").unwrap();
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

    #[test]
    fn webhook_settings_are_checked() {
        let w = |yaml: &str| serde_yaml::from_str::<WebhookConfig>(yaml).unwrap().check();
        assert!(w("url: https://alerts.example/hook\n").is_ok());
        assert!(w("url: http://127.0.0.1:9/x\ntimeout: 2s\n").is_ok());
        assert!(
            w("url: ftp://x/\n")
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
        assert!(
            w("url: https:///x\n")
                .unwrap_err()
                .to_string()
                .contains("host")
        );
        assert!(
            w("url: http://x/\nca_file: /ca.pem\n")
                .unwrap_err()
                .to_string()
                .contains("https")
        );
        assert!(
            w("url: https://x/\ntimeout: 5m\n")
                .unwrap_err()
                .to_string()
                .contains("timeout")
        );
        assert!(serde_yaml::from_str::<WebhookConfig>("url: https://x/\nheaders: {}\n").is_err());
    }

    #[test]
    fn webhook_urls_are_logged_without_path_query_or_credentials() {
        let shown = |url: &str| {
            serde_yaml::from_str::<WebhookConfig>(&format!("url: \"{url}\"\n"))
                .unwrap()
                .shown_url()
        };
        assert_eq!(
            shown("https://hooks.example/services/T0/B0/s3cret?token=x"),
            "https://hooks.example/…"
        );
        assert_eq!(
            shown("https://user:pw@h.example:8443/x"),
            "https://h.example:8443/…"
        );
        assert_eq!(shown("http://10.0.0.1?k=v"), "http://10.0.0.1/…");
    }
}
