//! Harness for the root integration tests: a real daemon in its own pin directory and cgroup
//! subtree, real listeners on loopback, and guards that clean everything up even when a test
//! fails.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test harness: a failed set-up step fails the test, with its message"
)]

pub mod etcd;
pub mod http;
pub mod postgres;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use agentwall::{
    cgroup,
    control::{Reply, Request, Status, client::Client},
    events::EventRecord,
};

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Root integration tests share kernel state: one at a time, and only as root.
pub fn serial() -> MutexGuard<'static, ()> {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "the integration tests load kernel programs and create cgroups: run them as root (`cargo xtask test`)"
    );
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A binary built next to the running test executable (target/<profile>/).
fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    dir.join(name)
}

/// The agentwall binary under test.
pub fn agentwall_bin() -> PathBuf {
    let p =
        std::env::var_os("AGENTWALL_BIN").map_or_else(|| target_bin("agentwall"), PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p agentwall` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The previous release's agentwall, which `cargo xtask test` builds from its commit
/// (`AGENTWALL_PREVIOUS_BIN`). Missing, the test fails: it is never skipped.
pub fn previous_release_bin() -> PathBuf {
    let p = std::env::var_os("AGENTWALL_PREVIOUS_BIN").map_or_else(
        || {
            let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            top.join("target/previous-release/agentwall-0.1.0")
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask test` builds the previous release there",
        p.display()
    );
    p
}

/// The network helper binary of this package.
pub fn netprobe_bin() -> PathBuf {
    let p = target_bin("aw-netprobe");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p agentwall-tests --bins`",
        p.display()
    );
    p
}

pub fn cgroup_mount() -> PathBuf {
    cgroup::cgroup2_mount().expect("cgroup v2 mount")
}

/// Waits until `f` returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port free right now (bound, then let go).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP/1.1 request to `addr` with `method` and `path`: the status code and the body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// The value of the metric line `series` (name and labels, exactly as exposed).
/// One HTTP/1.1 request on a Unix socket (the decision API's): the status and the JSON body.
pub fn post(socket: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: agentwall\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    let status: u16 = reply[9..12].parse().expect("status");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A TCP listener on loopback that counts connections and bytes.
#[derive(Debug)]
pub struct TcpSink {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    /// Connections whose peer ended them (EOF or reset).
    ended: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpSink {
    /// Listens on `bind` (for example "127.0.0.1:0", or "[::]:0" for every loopback form).
    pub fn new(bind: &str) -> Self {
        let l = TcpListener::bind(bind).expect("bind tcp sink");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("local addr");
        let (accepted, bytes, ended, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (a, b, e, s) = (
            Arc::clone(&accepted),
            Arc::clone(&bytes),
            Arc::clone(&ended),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut conn, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let (b, e, s) = (Arc::clone(&b), Arc::clone(&e), Arc::clone(&s));
                        thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                            let mut buf = [0u8; 4096];
                            while !s.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => {
                                        e.fetch_add(1, Ordering::SeqCst);
                                        break;
                                    }
                                    Ok(n) => {
                                        b.fetch_add(n, Ordering::SeqCst);
                                    }
                                    Err(err)
                                        if matches!(
                                            err.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => {
                                        e.fetch_add(1, Ordering::SeqCst);
                                        break;
                                    }
                                }
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            accepted,
            bytes,
            ended,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the peer ended (EOF or reset), as the listener saw them.
    pub fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Waits until a stream has delivered a few chunks.
    pub fn wait_flowing(&self) {
        wait_for(Duration::from_secs(5), "the stream to flow", || {
            (self.bytes() > 640).then_some(())
        });
    }

    /// Asserts that nothing more arrives: after a settling pause, the byte count holds still
    /// for a second.
    pub fn assert_stopped(&self, why: &str) {
        thread::sleep(Duration::from_millis(300));
        let stopped_at = self.bytes();
        thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            self.bytes(),
            stopped_at,
            "the listener must stop receiving {why}"
        );
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A minimal HTTP server on 127.0.0.1: answers every request with `HttpSink::BODY`.
#[derive(Debug)]
pub struct HttpSink {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HttpSink {
    pub const BODY: &'static str = "hello from an allowed destination\n";

    pub fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind http sink");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = Self::BODY;
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { addr, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Default for HttpSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket on loopback that counts datagrams and bytes.
#[derive(Debug)]
pub struct UdpSink {
    pub addr: SocketAddr,
    datagrams: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    pub fn new(bind: &str) -> Self {
        let s = UdpSocket::bind(bind).expect("bind udp sink");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = s.local_addr().expect("local addr");
        let (datagrams, bytes, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, b, st) = (
            Arc::clone(&datagrams),
            Arc::clone(&bytes),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    d.fetch_add(1, Ordering::SeqCst);
                    b.fetch_add(n, Ordering::SeqCst);
                }
            }
        });
        Self {
            addr,
            datagrams,
            bytes,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn datagrams(&self) -> usize {
        self.datagrams.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A CA of another trust domain (its directory, its name), as a SPIRE server would export
/// its bundle; removed on drop.
#[derive(Debug)]
pub struct PartnerCa(PathBuf, String);

impl PartnerCa {
    pub fn new(trust_domain: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("awt-partner-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let o = Command::new(agentwall_bin())
            .args(["identity", "issue", "--state-dir"])
            .arg(dir.join("state"))
            .args([
                "--trust-domain",
                trust_domain,
                "--id",
                "agent/setup/prod",
                "--out",
            ])
            .arg(dir.join("setup"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        Self(dir, trust_domain.to_string())
    }

    pub fn state(&self) -> PathBuf {
        self.0.join("state")
    }

    pub fn bundle(&self) -> PathBuf {
        self.0.join("state/ca/ca.crt")
    }

    /// A daemon config that trusts this CA's trust domain (`identity.bundles`).
    pub fn trusted_config(&self) -> String {
        format!(
            "identity:\n  bundles:\n    - trust_domain: {}\n      file: {}\n",
            self.1,
            self.bundle().display()
        )
    }
}

impl Drop for PartnerCa {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The Python of the virtual environment with py-spiffe that `cargo xtask test` installs
/// (`AGENTWALL_PY_SPIFFE`, else where xtask puts it). Missing, the test fails: it is never
/// skipped.
pub fn py_spiffe() -> PathBuf {
    let p = std::env::var_os("AGENTWALL_PY_SPIFFE").map_or_else(
        || PathBuf::from("/opt/agentwall-tests/py-spiffe/bin/python3"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask test` installs py-spiffe there",
        p.display()
    );
    p
}

/// A fixture file of `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// A daemon of its own: pin directory, cgroup subtree, state and socket unique to the test.
#[derive(Debug)]
pub struct TestDaemon {
    pub name: String,
    pub dir: PathBuf,
    pub policies: PathBuf,
    pub socket: PathBuf,
    pub enroll_socket: PathBuf,
    pub workload_socket: PathBuf,
    pub decision_socket: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup_root: String,
    pub config: Option<PathBuf>,
    /// A systemd unit whose sandbox the daemon runs under (see [`TestDaemon::daemon_command`]).
    pub unit: Option<PathBuf>,
    child: Option<Child>,
    log: PathBuf,
}

impl TestDaemon {
    /// Starts a daemon with `policies` (file name, YAML text) and waits until it is healthy.
    pub fn start(policies: &[(&str, &str)]) -> Self {
        Self::start_with_config(policies, None)
    }

    pub fn start_with_config(policies: &[(&str, &str)], config: Option<&str>) -> Self {
        let mut d = Self::prepare(policies, config);
        d.launch();
        d.wait_healthy();
        d
    }

    /// [`TestDaemon::prepare`] with a secret store: the configuration names its master key
    /// (`keys/secrets.key`, made on first use), then has the lines `extra` (more of the
    /// `secrets:` mapping, indented, or other top-level keys).
    pub fn prepare_with_secrets(policies: &[(&str, &str)], extra: &str) -> Self {
        let d = Self::prepare(policies, Some(""));
        d.write_secrets_config(extra);
        d
    }

    /// Writes the configuration of [`TestDaemon::prepare_with_secrets`] (before the launch).
    pub fn write_secrets_config(&self, extra: &str) {
        fs::write(
            self.dir.join("agentwall.yaml"),
            format!(
                "secrets:\n  key_file: {}\n{extra}",
                self.secrets_key().display()
            ),
        )
        .expect("config");
    }

    /// The secret store's master key file of [`TestDaemon::prepare_with_secrets`].
    pub fn secrets_key(&self) -> PathBuf {
        self.dir.join("keys").join("secrets.key")
    }

    /// Creates the directories and files without starting the daemon.
    pub fn prepare(policies: &[(&str, &str)], config: Option<&str>) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("awt-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("policies")).expect("test dir");
        // Where the audit key goes: made by the test as systemd makes the unit's
        // configuration directory (0755), so that the daemon's umask does not decide its mode.
        fs::create_dir_all(dir.join("keys")).expect("keys dir");
        fs::set_permissions(dir.join("keys"), fs::Permissions::from_mode(0o755)).expect("chmod");
        // World-readable: commands run as an unprivileged user execute binaries copied here.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let config_path = config.map(|text| {
            let p = dir.join("agentwall.yaml");
            fs::write(&p, text).expect("config");
            p
        });
        let d = Self {
            policies: dir.join("policies"),
            socket: dir.join("admin.sock"),
            enroll_socket: dir.join("enroll.sock"),
            workload_socket: dir.join("workload.sock"),
            decision_socket: dir.join("decision.sock"),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            cgroup_root: name.clone(),
            config: config_path,
            unit: None,
            log: dir.join("daemon.log"),
            child: None,
            name,
            dir,
        };
        let mut d = d;
        if let Some(unit) = std::env::var_os("AGENTWALL_UNDER_UNIT") {
            d.set_unit(PathBuf::from(unit));
        }
        for (file, text) in policies {
            d.write_policy(file, text);
        }
        d
    }

    /// No unit's sandbox for this daemon, even when `AGENTWALL_UNDER_UNIT` is set: for a
    /// test that starts a daemon of its own making (the installed package's, or one run as
    /// an unprivileged user), where the sandbox would not be what is under test.
    pub fn without_unit(&mut self) {
        self.unit = None;
        self.cgroup_root = self.name.clone();
    }

    /// Nothing is pinned: the pin directory is missing, or empty (under the systemd unit,
    /// whose ExecStartPre makes it before the daemon starts).
    pub fn nothing_pinned(&self) -> bool {
        fs::read_dir(&self.pin_dir).map_or(true, |mut d| d.next().is_none())
    }

    /// Runs this daemon under the sandbox of the systemd unit `unit` (before it is
    /// launched). As under systemd, its cgroup root is `agents` below the unit's own cgroup,
    /// which the sandbox makes as systemd would.
    pub fn set_unit(&mut self, unit: PathBuf) {
        self.cgroup_root = format!("{}/agents", self.unit_cgroup_name());
        self.unit = Some(unit);
    }

    /// The stand-in for the unit's cgroup (`system.slice/agentwall.service`).
    fn unit_cgroup_name(&self) -> String {
        format!("{}-unit", self.name)
    }

    pub fn write_policy(&self, file: &str, text: &str) {
        fs::write(self.policies.join(file), text).expect("write policy");
    }

    /// The `agentwall run` command line of this daemon.
    pub fn run_command(&self) -> Command {
        self.run_command_of(&agentwall_bin())
    }

    /// The same, with another copy of the binary (for example one an unprivileged user can
    /// execute: see [`TestDaemon::world_copy`]).
    pub fn run_command_of(&self, bin: &Path) -> Command {
        self.run_command_logging(bin, "json")
    }

    /// The same, with logs in `format` (`text` or `json`).
    pub fn run_command_logging(&self, bin: &Path, format: &str) -> Command {
        let mut c = self.daemon_command(bin);
        die_with_parent(&mut c);
        c.arg("run")
            .arg("--policies")
            .arg(&self.policies)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--enroll-socket")
            .arg(&self.enroll_socket)
            .arg("--workload-socket")
            .arg(&self.workload_socket)
            .arg("--decision-socket")
            .arg(&self.decision_socket)
            .arg("--agent-dir")
            .arg(self.dir.join("agents"))
            .arg("--audit-key")
            .arg(self.audit_key())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--log-format")
            .arg(format);
        match &self.config {
            Some(p) => c.arg("--config").arg(p),
            None => c.arg("--config").arg("/dev/null"),
        };
        c.env("RUST_LOG", "info");
        c
    }

    /// `bin`, or with a [`TestDaemon::unit`] (`AGENTWALL_UNDER_UNIT=FILE` sets it for every
    /// daemon), `bin` under the sandbox of that systemd unit (`aw-unit-sandbox`): the unit's
    /// delegated cgroup is this daemon's cgroup root, its directories this daemon's directory
    /// and the test's others in the temporary directory (an audit file system of its own, a
    /// partner's CA), which stand in for what a unit's drop-in would name.
    pub fn daemon_command(&self, bin: &Path) -> Command {
        let Some(unit) = &self.unit else {
            return Command::new(bin);
        };
        let mut c = Command::new(target_bin("aw-unit-sandbox"));
        c.arg("--unit")
            .arg(unit)
            .arg("--cgroup")
            .arg(cgroup_mount().join(self.unit_cgroup_name()))
            .arg("--pins")
            .arg(&self.pin_dir)
            .arg("--rw")
            .arg(&self.dir);
        let tmp = std::env::temp_dir();
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let p = e.path();
            let ours = e.file_name().to_string_lossy().starts_with("awt-");
            if ours && p != self.dir && p.is_dir() {
                c.arg("--rw").arg(p);
            }
        }
        c.arg("--").arg(bin);
        c
    }

    /// Runs the daemon when it must refuse to start: one that does not exit within 10 s is
    /// killed (and the caller sees a failure, not a hang).
    pub fn run_refused(&self) -> Output {
        self.run_refused_command(self.run_command())
    }

    /// [`TestDaemon::run_refused`] for `c`, a command that ends in this daemon's `agentwall
    /// run` (a wrapper's, say).
    pub fn run_refused_command(&self, mut c: Command) -> Output {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let end = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait_with_output().expect("daemon output")
    }

    pub fn launch(&mut self) {
        let c = self.run_command();
        self.launch_command(c);
    }

    /// Starts `c`, a command that ends in this daemon's `agentwall run` (a wrapper's, say).
    pub fn launch_command(&mut self, mut c: Command) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.jsonl"))
            .expect("stdout file");
        die_with_parent(&mut c);
        let child = c
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("start agentwall run");
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                panic!(
                    "agentwall run exited ({st}) before it was healthy:\n{}",
                    self.log_text()
                );
            }
            if self.is_healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not healthy after 30 s:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the daemon answers its admin socket as healthy right now.
    pub fn is_healthy(&self) -> bool {
        matches!(
            Client::call(&self.socket, &Request::Status),
            Ok(Reply::Status(s)) if matches!(s.health, agentwall::control::Health::Healthy { .. })
        )
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pid of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait for an orderly exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().expect("wait daemon")
    }

    /// SIGTERM, and asserts an orderly exit; the daemon's log says why if it was not.
    pub fn stop_cleanly(&mut self) {
        let st = self.stop();
        assert!(
            st.success(),
            "the daemon stopped with {st}; its log:\n{}",
            self.log_text()
        );
    }

    pub fn status(&self) -> Status {
        match Client::call(&self.socket, &Request::Status).expect("status") {
            Reply::Status(s) => *s,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// An `agentwall` CLI command aimed at this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agentwall_bin())
            .args(args)
            .env("AGENTWALL_SOCKET", &self.socket)
            .output()
            .expect("run agentwall")
    }

    /// `agentwall exec --policy P [--user U] -- aw-netprobe CMDS...`, waited for.
    pub fn exec(&self, policy: &str, user: Option<&str>, cmds: &[&str]) -> Output {
        self.exec_command(policy, user, cmds)
            .output()
            .expect("agentwall exec")
    }

    /// [`TestDaemon::exec`] as root with `--keep-privileges`: for commands that need root's
    /// capabilities (a network namespace of their own, raw sockets), which a confined root
    /// agent has not.
    pub fn exec_privileged(&self, policy: &str, cmds: &[&str]) -> Output {
        self.exec_under(&["--policy", policy, "--keep-privileges"], None, cmds)
            .output()
            .expect("agentwall exec")
    }

    fn exec_command(&self, policy: &str, user: Option<&str>, cmds: &[&str]) -> Command {
        self.exec_under(&["--policy", policy], user, cmds)
    }

    /// `agentwall exec UNDER... [--user U] -- aw-netprobe CMDS...`, where UNDER is `--policy P`,
    /// `--cert C --key K` or `--self-enroll`.
    ///
    /// Both binaries are copies every user can reach: a command run as another user, or as
    /// root confined to a mapped uid of its own, cannot reach into a build tree under a 0700
    /// directory (a fresh clone's), and `exec --cert` starts its enrollment step from the
    /// launcher's own binary inside the confinement.
    pub fn exec_under(&self, under: &[&str], user: Option<&str>, cmds: &[&str]) -> Command {
        let mut c = Command::new(self.world_copy(&agentwall_bin()));
        c.arg("exec").arg("--socket").arg(&self.socket).args(under);
        if let Some(u) = user {
            c.arg("--user").arg(u);
        }
        c.arg("--").arg(self.world_netprobe()).args(cmds);
        c
    }

    /// A netprobe running as `uid` (outside any enforced cgroup) that holds `n` idle
    /// connections to the enrollment socket, and its report (`held=… refused=… waiting=…`).
    pub fn hold_enroll_connections(&self, uid: u32, n: usize) -> (Repl, String) {
        self.hold_unix_connections("hold-unix", &self.enroll_socket, uid, n)
    }

    /// The same for any Unix socket of the daemon's, with netprobe's `how` (`hold-unix`,
    /// `hold-h2`).
    pub fn hold_unix_connections(
        &self,
        how: &str,
        socket: &Path,
        uid: u32,
        n: usize,
    ) -> (Repl, String) {
        let probe = self.world_copy(&netprobe_bin());
        let mut c = Command::new(probe);
        std::os::unix::process::CommandExt::uid(&mut c, uid);
        std::os::unix::process::CommandExt::gid(&mut c, uid);
        c.arg("repl");
        let mut holder = Repl::spawn(c);
        let held = holder.cmd(&format!("{how} {} {n}", socket.display()));
        (holder, held)
    }

    /// A copy of the netprobe an unprivileged user can execute.
    fn world_netprobe(&self) -> PathBuf {
        self.world_copy(&netprobe_bin())
    }

    /// A copy of `bin` in the test directory, which every user can reach (the build tree, in a
    /// fresh clone under a 0700 temporary directory, may not be).
    pub fn world_copy(&self, bin: &Path) -> PathBuf {
        let p = self.dir.join(bin.file_name().expect("binary name"));
        if !p.exists() {
            fs::copy(bin, &p).expect("copy binary");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        }
        p
    }

    /// A long-running netprobe REPL under `policy`.
    pub fn repl(&self, policy: &str) -> Repl {
        self.repl_under(&["--policy", policy])
    }

    /// A long-running netprobe REPL under `agentwall exec UNDER...`.
    pub fn repl_under(&self, under: &[&str]) -> Repl {
        Repl::spawn(self.exec_under(under, None, &["repl"]))
    }

    /// Subscribes to the daemon's verdict stream.
    pub fn events(&self) -> Events {
        let mut c = Client::connect(&self.socket).expect("connect events");
        c.send(&Request::Events).expect("events request");
        match c.recv().expect("subscription") {
            Reply::Done { .. } => {}
            other => panic!("unexpected reply {other:?}"),
        }
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            while let Ok(Reply::Event(e)) = c.recv() {
                if tx.send(*e).is_err() {
                    break;
                }
            }
        });
        Events { rx }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The audit log's directory and key file (kept apart, as the daemon requires).
    pub fn audit_dir(&self) -> PathBuf {
        self.state_dir().join("audit")
    }

    /// The records of `kind` in the audit log, oldest first.
    pub fn audit_records(&self, kind: &str) -> Vec<serde_json::Value> {
        let key = self.audit_key().display().to_string();
        let dir = self.audit_dir().display().to_string();
        let o = self.cli(&["audit", "query", &dir, "--key", &key, "--kind", kind]);
        assert!(o.status.success(), "{o:?}");
        lines(&o)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("a record")["record"].clone()
            })
            .collect()
    }

    pub fn audit_key(&self) -> PathBuf {
        self.dir.join("keys").join("audit.key")
    }

    /// Issues an SVID for `id` (a path in the local trust domain) from the daemon's CA with
    /// the CLI; returns the certificate and key paths.
    pub fn issue(&self, id: &str, lifetime: &str) -> (String, String) {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let out = self.dir.join(format!("svid-{n}"));
        let o = Command::new(agentwall_bin())
            .args(["identity", "issue", "--state-dir"])
            .arg(self.state_dir())
            .args(["--id", id, "--lifetime", lifetime, "--out"])
            .arg(&out)
            .output()
            .expect("agentwall identity issue");
        assert!(o.status.success(), "identity issue: {o:?}");
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).expect("chmod");
        (
            out.join("svid.pem").display().to_string(),
            out.join("svid.key").display().to_string(),
        )
    }

    /// `agentwall secret put PATH` of `value` (on its standard input); panics if refused.
    pub fn secret_put(&self, path: &str, value: &str) {
        let mut child = Command::new(agentwall_bin())
            .args(["secret", "put", path])
            .env("AGENTWALL_SOCKET", &self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agentwall secret put");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(value.as_bytes())
                .expect("the secret's value");
        }
        let o = child.wait_with_output().expect("agentwall secret put");
        assert!(o.status.success(), "secret put {path}: {o:?}");
    }

    /// The cgroup directory of the managed root.
    pub fn root_cgroup(&self) -> PathBuf {
        cgroup_mount().join(&self.cgroup_root)
    }

    /// Asserts that status lists the cgroup at `path` (as an agent's `cgroup` prints it)
    /// under policy `policy`.
    pub fn assert_under_policy(&self, path: &str, policy: &str) {
        let status = self.status();
        assert!(
            status
                .cgroups
                .iter()
                .any(|c| c.path.ends_with(path) && c.policy.as_deref() == Some(policy)),
            "{path} under {policy}: {status:#?}"
        );
    }

    /// The link pins of the daemon's cgroup root (one per program), sorted.
    pub fn root_links(&self) -> Vec<String> {
        let root_id = agentwall::cgroup::Cgroup::at(self.root_cgroup())
            .id()
            .expect("the cgroup root's id");
        let mut v: Vec<String> = fs::read_dir(self.pin_dir.join("links").join(root_id.to_string()))
            .expect("the cgroup root's link pins")
            .map(|e| {
                e.expect("a link pin")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    }

    /// Counter value from status.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()
            .kernel_counters
            .totals
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        let root = cgroup::Cgroup::at(self.root_cgroup());
        if root.exists() {
            let _ = root.kill_all();
        }
        let out = Command::new(agentwall_bin())
            .arg("teardown")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--kill")
            .output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        if !ok {
            // Last resort, so that nothing is left behind even if teardown itself failed.
            let _ = wait_removed(&root);
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        if self.unit.is_some() {
            let _ = fs::remove_dir(cgroup_mount().join(self.unit_cgroup_name()));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A test daemon dies with the test that started it, even when the test run itself is killed
/// (what it leaves is swept by the next `cargo xtask test`).
fn die_with_parent(c: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(c, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

fn wait_removed(root: &cgroup::Cgroup) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if root.remove_tree().is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process, killed and reaped when dropped: a test that fails leaves none behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cgroup of the test's own outside the managed subtree, killed and removed on drop.
#[derive(Debug)]
pub struct CgroupGuard(pub cgroup::Cgroup);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = self.0.kill_all();
        for _ in 0..250 {
            if self.0.remove_tree().is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A netprobe REPL running under `agentwall exec`.
#[derive(Debug)]
pub struct Repl {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Repl {
    /// Starts `c`, a command that ends in `aw-netprobe repl`.
    pub fn spawn(mut c: Command) -> Self {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a netprobe repl");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut r = Self {
            child,
            stdin,
            stdout,
        };
        // The first answer proves the command runs (its cgroup is ready).
        assert!(r.cmd("pid").parse::<u32>().is_ok());
        r
    }

    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to repl");
        self.stdin.flush().expect("flush repl");
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("read repl");
        out.trim().to_string()
    }

    /// Ends the REPL; returns the exit code `agentwall exec` reported.
    pub fn quit(mut self) -> Option<i32> {
        let _ = writeln!(self.stdin, "quit");
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verdicts streamed from the daemon.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<EventRecord>,
}

impl Events {
    /// Every event received until `quiet` passes without one (bounded by 10 s in all).
    pub fn drain(&self, quiet: Duration) -> Vec<EventRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match self.rx.recv_timeout(quiet) {
                Ok(e) => out.push(e),
                Err(_) => break,
            }
        }
        out
    }
}

/// The parameters of a proper X509-SVID leaf for `spiffe_id`, valid from a few seconds ago
/// for `lifetime`, for tests to sign (and to spoil).
pub fn svid_params(spiffe_id: &str, lifetime: Duration) -> rcgen::CertificateParams {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both purposes, as the X509-SVID standard asks of a leaf that has the extension.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::seconds(5);
    p.not_after = now + time::Duration::try_from(lifetime).unwrap();
    p
}

/// Signs an X509-SVID for `spiffe_id` with the CA of a daemon's state directory, valid from
/// now for `lifetime` (shorter than `agentwall identity issue` allows: for expiry tests).
/// Returns (certificate path, key path), written into `out`.
pub fn sign_svid(
    state_dir: &Path,
    spiffe_id: &str,
    lifetime: Duration,
    out: &Path,
) -> (PathBuf, PathBuf) {
    use rcgen::{Issuer, KeyPair};
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(state_dir.join("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = fs::read_to_string(state_dir.join("ca/ca.crt")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let p = svid_params(spiffe_id, lifetime);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    fs::create_dir_all(out).unwrap();
    fs::set_permissions(out, fs::Permissions::from_mode(0o755)).unwrap();
    let (c, k) = (out.join("svid.pem"), out.join("svid.key"));
    fs::write(&c, cert.pem()).unwrap();
    fs::write(&k, key.serialize_pem()).unwrap();
    fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
    (c, k)
}

/// Lines of a command's stdout.
pub fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A policy file allowing TCP to the given loopback ports (and nothing else).
/// The count of a netprobe flood's report (`eperm=N other=0`) when every attempt was refused
/// with EPERM; `None` otherwise.
pub fn all_denied(report: &str) -> Option<u64> {
    report
        .trim()
        .strip_prefix("eperm=")
        .and_then(|r| r.strip_suffix(" other=0"))
        .and_then(|n| n.parse().ok())
}

pub fn tcp_policy(name: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "policy:\n  name: {name}\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        ports.join(", ")
    )
}

/// The `q` quantile of `v` (sorted in place), nearest rank: for the benchmarks.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// CPU seconds the threads of process `pid` have run, to the nanosecond (the first field of
/// each thread's schedstat). A thread that ends is no longer counted: measure across spans
/// in which the process's threads live on.
pub fn process_cpu(pid: u32) -> f64 {
    let mut ns = 0u64;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 * 1e-9
}

/// Replaces the section `name` of a benchmark report (between `<!-- begin NAME -->` and
/// `<!-- end NAME -->`), or appends it, leaving the other benchmarks' sections as they were.
pub fn write_report_section(path: &Path, name: &str, body: &str) {
    let (begin, end) = (
        format!("<!-- begin {name} -->"),
        format!("<!-- end {name} -->"),
    );
    let old = fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    fs::write(path, new).expect("write the benchmark report");
}

/// Hands a descriptor made outside every enforced cgroup to whoever connects to a Unix socket
/// at `path` (`SCM_RIGHTS`), once, in the background: a socket an agent did not create.
#[derive(Debug)]
pub struct FdPasser {
    path: PathBuf,
    thread: Option<thread::JoinHandle<()>>,
}

impl FdPasser {
    pub fn new(path: &Path, fd: std::os::fd::OwnedFd) -> Self {
        use std::os::fd::AsRawFd as _;
        let _ = fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).expect("bind the passing socket");
        fs::set_permissions(path, fs::Permissions::from_mode(0o777)).expect("chmod");
        let thread = thread::spawn(move || {
            if let Ok((c, _)) = l.accept() {
                let fds = [fd.as_raw_fd()];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let _ = nix::sys::socket::sendmsg::<()>(
                    c.as_raw_fd(),
                    &[std::io::IoSlice::new(b"x")],
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                );
            }
        });
        Self {
            path: path.to_path_buf(),
            thread: Some(thread),
        }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }

    /// Waits until the descriptor was handed over.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FdPasser {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A size-limited tmpfs of the test's own, unmounted on drop; its mount point goes too, and
/// the directory holding it if nothing else is left there.
#[derive(Debug)]
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn new(path: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let o = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {o:?}");
        Self(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
