//! Audit records forwarded to a real remote collector: rsyslog (Debian's package, OpenSSL
//! driver) started on loopback by the test, receiving RFC 5424 over TCP with mutual TLS.
//! Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use agentwall_tests::{TcpSink, TestDaemon, lines, serial, tcp_policy, wait_for};

/// A CA, a collector certificate for 127.0.0.1 and a client certificate for the daemon.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "audit collector test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |cn: &str, eku: ExtendedKeyUsagePurpose, sans: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.subject_alt_names = sans;
        (p.signed_by(&key, &issuer).unwrap(), key)
    };
    let (server, server_key) = leaf(
        "collector",
        ExtendedKeyUsagePurpose::ServerAuth,
        vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
    );
    let (client, client_key) = leaf(
        "agentwall node",
        ExtendedKeyUsagePurpose::ClientAuth,
        vec![],
    );
    let write = |name: &str, text: String, mode: u32| {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem(), 0o644),
        server_cert: write("server.pem", server.pem(), 0o644),
        server_key: write("server.key", server_key.serialize_pem(), 0o600),
        client_cert: write("client.pem", client.pem(), 0o644),
        client_key: write("client.key", client_key.serialize_pem(), 0o600),
    }
}

/// rsyslogd in the foreground, listening on 127.0.0.1:`port` with TLS that requires a client
/// certificate from the test CA, writing what it receives (parsed as RFC 5424) to a file.
/// Killed on drop.
struct Rsyslog {
    child: Child,
    received: PathBuf,
}

impl Rsyslog {
    fn start(dir: &Path, pki: &Pki, port: u16) -> Self {
        let bin = Path::new("/usr/sbin/rsyslogd");
        assert!(
            bin.exists(),
            "the remote sink test needs rsyslog and rsyslog-openssl (Debian's packages; \
             `cargo xtask test` installs them)"
        );
        let work = dir.join("rsyslog-work");
        fs::create_dir_all(&work).unwrap();
        let received = dir.join("received.log");
        let conf = dir.join("rsyslog.conf");
        fs::write(
            &conf,
            format!(
                r#"global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="ossl"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="fields" type="string" string="%pri%|%app-name%|%msgid%|%structured-data%|%msg%\n")
action(type="omfile" file="{received}" template="fields")
"#,
                work = work.display(),
                ca = pki.ca.display(),
                cert = pki.server_cert.display(),
                key = pki.server_key.display(),
                received = received.display(),
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslog.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("rsyslog.err")).unwrap())
            .spawn()
            .expect("start rsyslogd");
        let mut r = Self { child, received };
        wait_for(Duration::from_secs(10), "rsyslogd listening", || {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!(
                    "rsyslogd exited ({st}): {}",
                    fs::read_to_string(dir.join("rsyslog.err")).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        r
    }

    /// Received messages: (pri, app-name, msgid, structured data, msg).
    fn messages(&self) -> Vec<[String; 5]> {
        fs::read_to_string(&self.received)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.splitn(5, '|').map(str::to_owned);
                Some([p.next()?, p.next()?, p.next()?, p.next()?, p.next()?])
            })
            .collect()
    }

    /// The verdict records received, by destination port.
    fn verdicts_to(&self, port: u16) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|m| m[2] == "verdict")
            .filter_map(|m| serde_json::from_str::<serde_json::Value>(m[4].trim()).ok())
            .filter(|v| v["port"] == port)
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory of the test, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A scratch directory, the test PKI in it, and a free loopback port for the collector.
fn collector_setup(name: &str) -> (Scratch, Pki, u16) {
    let base = Scratch(std::env::temp_dir().join(format!("awt-{name}-{}", std::process::id())));
    let pki = pki(&base.0.join("pki"));
    (base, pki, free_port())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn syslog_config(pki: &Pki, port: u16, queue: usize) -> String {
    format!(
        "audit:\n  syslog:\n    address: 127.0.0.1:{port}\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n    queue: {queue}\n",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
    )
}

#[test]
fn durable_records_reach_a_real_syslog_collector_over_mutual_tls() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let (base, pki, port) = collector_setup("syslog");
    let collector = Rsyslog::start(&base.0, &pki, port);
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some(&syslog_config(&pki, port, 1024)),
    );
    let to = format!("tcp 127.0.0.1:{}", denied.port());
    let out = d.exec("web", None, &[&to]);
    assert_eq!(lines(&out), ["err EPERM"]);
    let got = wait_for(
        Duration::from_secs(10),
        "the denial at the collector",
        || collector.verdicts_to(denied.port()).into_iter().next(),
    );
    assert_eq!(got["verdict"], "deny");
    assert_eq!(got["policy"], "web");
    // rsyslog parsed our framing and header as RFC 5424: facility audit (13), severity notice.
    let msg = collector
        .messages()
        .into_iter()
        .find(|m| m[2] == "verdict" && m[4].contains(&format!("\"port\":{}", denied.port())))
        .unwrap();
    assert_eq!(msg[0], "109", "{msg:?}");
    assert_eq!(msg[1], "agentwall");
    assert!(msg[3].starts_with("[agentwall@32473 seq=\""), "{msg:?}");
    // The sequence number is the record's place in the local log.
    let seq: u64 = msg[3]
        .trim_start_matches("[agentwall@32473 seq=\"")
        .trim_end_matches("\"]")
        .parse()
        .unwrap();
    let node = d.state_dir().join("audit-node.pub").display().to_string();
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let status = d.status().audit;
    let sink = &status.sinks["syslog"];
    assert!(
        sink.connected && sink.sent >= 1 && sink.dropped == 0,
        "{sink:?}"
    );
    d.stop_cleanly();
    let q = d.cli(&["audit", "query", &dir, "--key", &key, "--kind", "verdict"]);
    let local: Vec<serde_json::Value> = lines(&q)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let same = local
        .iter()
        .find(|l| l["seq"] == seq)
        .unwrap_or_else(|| panic!("seq {seq} in the local log: {local:?}"));
    assert_eq!(same["record"], got);
    let v = d.cli(&["audit", "verify", &dir, "--key", &key, "--node-key", &node]);
    assert!(v.status.success(), "{v:?}");
    drop(collector);
}

#[test]
fn an_absent_collector_costs_copies_never_enforcement_and_is_caught_up_with() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let (base, pki, port) = collector_setup("syslog-absent");
    // No collector yet, and room for 4 records in the sink's queue.
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some(&syslog_config(&pki, port, 4)),
    );
    let to = format!("tcp 127.0.0.1:{}", denied.port());
    let many = vec![to.as_str(); 200];
    let out = d.exec("web", None, &many);
    assert_eq!(lines(&out), vec!["err EPERM"; 200]);
    let status = wait_for(Duration::from_secs(10), "drops counted", || {
        let s = d.status().audit;
        (s.sinks["syslog"].dropped > 0).then_some(s)
    });
    let sink = &status.sinks["syslog"];
    assert!(!sink.connected && sink.errors > 0, "{sink:?}");
    assert!(
        sink.last_error
            .as_deref()
            .is_some_and(|e| e.contains("connect")),
        "{sink:?}"
    );
    assert!(!status.failing, "the store is not affected");
    // The collector comes up: the sink reconnects and new records flow again.
    let collector = Rsyslog::start(&base.0, &pki, port);
    let later = TcpSink::new("127.0.0.1:0");
    let to_later = format!("tcp 127.0.0.1:{}", later.port());
    wait_for(Duration::from_secs(20), "the sink reconnected", || {
        let out = d.exec("web", None, &[&to_later]);
        assert_eq!(lines(&out), ["err EPERM"]);
        (!collector.verdicts_to(later.port()).is_empty()).then_some(())
    });
    assert!(d.status().audit.sinks["syslog"].connected);
    d.stop_cleanly();
    // The local log has every one of the 200 denials, whatever the sink dropped.
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let q = d.cli(&["audit", "query", &dir, "--key", &key, "--kind", "verdict"]);
    let local = lines(&q)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["record"]["port"] == denied.port())
        .count();
    assert_eq!(local, 200);
    drop(collector);
}

/// Python's http.server on loopback (a web server that is not ours): each POST is written as a
/// JSON line `{"path", "content_type", "body"}`; answers 204. Killed on drop.
struct WebhookReceiver {
    child: Child,
    port: u16,
    file: PathBuf,
}

impl WebhookReceiver {
    const SCRIPT: &'static str = r#"
import http.server, json, sys
out = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                "body": json.loads(body)}) + "\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
print(srv.server_port, flush=True)
srv.serve_forever()
"#;

    fn start(dir: &Path) -> Self {
        use std::io::BufRead as _;
        fs::create_dir_all(dir).unwrap();
        let file = dir.join("webhook.jsonl");
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(Self::SCRIPT)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3 http.server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the receiver's port");
        Self { child, port, file }
    }

    fn posts(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn behavioral_alerts_are_posted_to_the_webhook_once_durable() {
    let _s = serial();
    let denied = TcpSink::new("127.0.0.1:0");
    let base = Scratch(std::env::temp_dir().join(format!("awt-webhook-{}", std::process::id())));
    let receiver = WebhookReceiver::start(&base.0);
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some(&format!(
            // `space_warn_percent: 1`: the alert awaited is the detector's, not one of a host
            // disk that happens to be over 80% full.
            "detect:\n  denials: 3\n  denial_window: 1m\n  webhook:\n    url: http://127.0.0.1:{}/agentwall/alerts\n    timeout: 2s\naudit:\n  space_warn_percent: 1\n",
            receiver.port
        )),
    );
    let to = format!("tcp 127.0.0.1:{}", denied.port());
    let out = d.exec("web", None, &[&to, &to, &to]);
    assert_eq!(lines(&out), ["err EPERM"; 3]);
    let post = wait_for(Duration::from_secs(10), "the alert at the webhook", || {
        receiver.posts().into_iter().next()
    });
    assert_eq!(post["path"], "/agentwall/alerts");
    assert_eq!(post["content_type"], "application/json");
    assert_eq!(post["body"]["record"]["kind"], "alert");
    assert_eq!(post["body"]["record"]["alert"], "repeated_denials");
    assert_eq!(post["body"]["record"]["identity"], "web");
    // Only alerts go to the webhook, never verdicts.
    assert!(
        receiver
            .posts()
            .iter()
            .all(|p| p["body"]["record"]["kind"] == "alert"),
        "{:?}",
        receiver.posts()
    );
    let sink = d.status().audit.sinks["webhook"].clone();
    assert!(
        sink.sent >= 1 && sink.errors == 0 && sink.dropped == 0,
        "{sink:?}"
    );
    d.stop_cleanly();
    // The alert posted is the one in the local log, at the same sequence number.
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let q = d.cli(&["audit", "query", &dir, "--key", &key, "--kind", "alert"]);
    let local: serde_json::Value = serde_json::from_str(&lines(&q)[0]).unwrap();
    assert_eq!(local, post["body"]);
    drop(receiver);
}

#[test]
fn a_stalled_collector_costs_copies_never_the_store_or_enforcement() {
    let _s = serial();
    let (base, pki, port) = collector_setup("syslog-stalled");
    let collector = Rsyslog::start(&base.0, &pki, port);
    // Without event budgets: every one of the flood's verdicts is a record to ship, so that
    // the sink's queue surely fills.
    let mut d = TestDaemon::start_with_config(
        &[("p.yaml", &tcp_policy("web", &[1]))],
        Some(&format!(
            "{}events:\n  cgroup_rate: 0\n",
            syslog_config(&pki, port, 16)
        )),
    );
    wait_for(Duration::from_secs(10), "the sink connected", || {
        d.status().audit.sinks["syslog"].connected.then_some(())
    });
    // The collector stops reading: its socket buffers fill, the sink's writes block.
    let pid = nix::unistd::Pid::from_raw(collector.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = target.local_addr().unwrap().port();
    let n = 60_000;
    let out = d.exec(
        "web",
        None,
        &[&format!("udp-flood 127.0.0.1:{udp_port} {n}")],
    );
    assert_eq!(
        lines(&out),
        [format!("eperm={n} other=0")],
        "every send denied"
    );
    let status = wait_for(Duration::from_secs(20), "the sink dropping copies", || {
        let s = d.status().audit;
        (s.sinks["syslog"].dropped > 0).then_some(s)
    });
    assert!(!status.failing, "the store is not held up");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    d.stop_cleanly();
    // The local log accounts for every send: a verdict record, or a gap record when the
    // kernel ring overflowed during the flood.
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let q = d.cli(&["audit", "query", &dir, "--key", &key]);
    let (mut verdicts, mut lost) = (0u64, 0u64);
    for l in lines(&q) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        let r = &v["record"];
        if r["kind"] == "verdict" && r["port"] == udp_port {
            verdicts += 1;
        } else if r["kind"] == "events_lost" {
            lost += r["lost"].as_u64().unwrap();
        }
    }
    assert_eq!(verdicts + lost, n, "verdicts {verdicts} + lost {lost}");
    drop(collector);
}
