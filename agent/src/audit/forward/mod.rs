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
//! The sink's thread, queue and counters are here; each network sink has a module of its
//! own (`syslog`, `webhook`).

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

mod syslog;
mod webhook;

pub use self::{
    syslog::{AddressError, ConnectError, Facility, SyslogConfig, syslog},
    webhook::{WebhookConfig, webhook},
};

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
