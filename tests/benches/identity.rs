//! Identity benchmarks: certificates issued per second, enrollments per second per core (full
//! mTLS handshakes with client certificates, verification, attestation, binding), and the
//! latency from `revoke` to the first EPERM of a workload that connects in a loop.
//!
//! Each figure has a baseline measured in the same run: Ed25519 key generation plus one
//! signature for issuance (the default key type); a bare rustls mTLS handshake (client certificate checked against
//! the same CA, nothing else) for enrollment; the admin socket's round trip for revocation.
//! Run with `cargo xtask bench` (root); it writes its section of docs/benchmarks.md.
//!
//! The same executable is the workload: run under `agentwall exec --self-enroll` with
//! `--worker ...`, it enrolls itself and measures from inside its enforced cgroup.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark reports to the terminal"
)]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use agentwall::{
    control::{Reply, Request, client::Client},
    identity::{
        self, enroll,
        spiffe::SpiffeId,
        svid::{KeyAlgorithm, LeafRequest, LocalCa},
    },
};
use agentwall_tests::{TestDaemon, process_cpu, quantile};

const ID: &str = "agent/bench/prod";

fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}=");
    std::env::args().find_map(|a| a.strip_prefix(&key).map(str::to_string))
}

/// One series of revocations: (p50, p99) of each measure, in µs.
struct Revokes {
    pace_us: u64,
    send: (f64, f64),
    /// From the request to the moment the denied connect was issued.
    issued: (f64, f64),
    ret: (f64, f64),
    rtt: (f64, f64),
    inside: (f64, f64),
    /// Of `send`, the time the workload was runnable but waiting for a CPU.
    waited: (f64, f64),
    /// The slowest revocation: its `send`, its `waited`, how often the workload slept
    /// meanwhile (voluntary context switches), its longest single connect, and how many of
    /// its connects the socket destruction aborted.
    slowest: (f64, f64, f64, f64, f64),
}

/// Times the calling thread has gone to sleep (voluntary context switches).
fn voluntary_switches() -> i64 {
    // SAFETY: getrusage(2) writes one `rusage` into the zeroed value it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &raw mut u) == 0 {
            u.ru_nvcsw
        } else {
            0
        }
    }
}

/// Nanoseconds the calling thread has spent runnable but waiting for a CPU (the second field
/// of its schedstat); 0 if unreadable.
fn run_delay_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds of the calling thread.
fn thread_cpu() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9
}

struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

fn files(cert: &str, key: &str, bundle: &str) -> Files {
    Files {
        cert: fs::read(cert).unwrap(),
        key: fs::read(key).unwrap(),
        bundle: fs::read(bundle).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------
// Worker side (inside the enforced cgroup).

/// Enrolls `n` times in a row from `clients` threads; prints the wall time and the CPU time
/// the daemon (`daemon`, a pid) used meanwhile. With one pair in `pairs` every enrollment
/// presents that certificate; with `n` pairs each presents its own (pair i for enrollment i).
fn worker_enroll(
    warm: &(Vec<u8>, Vec<u8>),
    pairs: &[(Vec<u8>, Vec<u8>)],
    bundle: &[u8],
    socket: &Path,
    (n, clients): (usize, usize),
    daemon: u32,
) {
    // The first enrollment binds the cgroup; the timed ones are full enrollments of a bound
    // cgroup (handshake, verification, attestation, binding written to the kernel).
    enroll::enroll(socket, &warm.0, &warm.1, bundle).unwrap();
    let cpu = process_cpu(daemon);
    let t = Instant::now();
    thread::scope(|s| {
        for c in 0..clients {
            s.spawn(move || {
                for i in (c..n).step_by(clients) {
                    let (cert, key) = &pairs[i % pairs.len()];
                    enroll::enroll(socket, cert, key, bundle).unwrap();
                }
            });
        }
    });
    let wall = t.elapsed().as_secs_f64();
    println!(
        "enroll_wall={wall} daemon_cpu={}",
        process_cpu(daemon) - cpu
    );
}

/// A Workload API connection: HTTP/2 over the socket, as every gRPC client opens it.
async fn workload_connect(socket: &Path) -> h2::client::SendRequest<bytes::Bytes> {
    let io = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

/// One gRPC call with the security header: the first message of the answer, decoded. The
/// stream ends (cancelled) when it is dropped after that.
async fn workload_call<M: prost::Message + Default>(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    rpc: &str,
    request: &impl prost::Message,
) -> M {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost/SpiffeWorkloadAPI/{rpc}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("workload.spiffe.io", "true")
        .body(())
        .unwrap();
    let body = request.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&body);
    let (answer, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(framed.into(), true).unwrap();
    let answer = answer.await.unwrap();
    let refused = answer.headers().get("grpc-message").cloned();
    let mut body = answer.into_body();
    let mut got: Vec<u8> = Vec::new();
    loop {
        if got.len() >= 5 {
            let len = u32::from_be_bytes(got[1..5].try_into().unwrap()) as usize;
            if got.len() >= 5 + len {
                return M::decode(&got[5..5 + len]).unwrap();
            }
        }
        let chunk = body
            .data()
            .await
            .unwrap_or_else(|| panic!("{rpc}: no message ({refused:?})"))
            .unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
}

/// Calls the Workload API `n` times per case from inside the agent's cgroup, one call at a
/// time; prints each case's latencies (µs) and the CPU time the daemon used meanwhile.
fn worker_workload(socket: &Path, n: usize, daemon: u32) {
    use agentwall::workload::pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let x509 = |mut send: h2::client::SendRequest<bytes::Bytes>| async move {
            let r: pb::X509svidResponse =
                workload_call(&mut send, "FetchX509SVID", &pb::X509svidRequest {}).await;
            assert!(!r.svids[0].x509_svid_key.is_empty());
            send
        };
        let jwt = |mut send: h2::client::SendRequest<bytes::Bytes>| async move {
            let r: pb::JwtsvidResponse = workload_call(
                &mut send,
                "FetchJWTSVID",
                &pb::JwtsvidRequest {
                    audience: vec!["bench".into()],
                    spiffe_id: String::new(),
                },
            )
            .await;
            assert!(!r.svids[0].svid.is_empty());
            send
        };
        // Warm-up: the daemon's first connection, stream and token.
        let open = jwt(x509(workload_connect(socket).await).await).await;
        let mut out = String::new();
        for case in ["x509_new", "x509_open", "jwt_open"] {
            let mut lat = Vec::with_capacity(n);
            let mut send = open.clone();
            let cpu = process_cpu(daemon);
            for _ in 0..n {
                let t = Instant::now();
                send = match case {
                    "x509_new" => {
                        drop(x509(workload_connect(socket).await).await);
                        send
                    }
                    "x509_open" => x509(send).await,
                    _ => jwt(send).await,
                };
                lat.push(format!("{:.1}", t.elapsed().as_secs_f64() * 1e6));
            }
            let cpu = process_cpu(daemon) - cpu;
            let _ = writeln!(out, "{case}_cpu={cpu} {case}_us={}", lat.join(","));
        }
        print!("{out}");
    });
}

fn read_pair(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        fs::read(dir.join("svid.pem")).unwrap(),
        fs::read(dir.join("svid.key")).unwrap(),
    )
}

/// Per round: enroll with a fresh certificate, connect in a loop, send `revoke` for that
/// certificate's serial without waiting, and keep connecting until the first EPERM. The time
/// runs from the moment the request was written until that EPERM.
///
/// The admin socket answers no process in an enforced cgroup but for `enforce-self`, so each
/// round's request goes over a connection the bench makes outside when asked (its peer is the
/// bench, as an operator's is): the worker asks over descriptor [`ASK_FD`], reads the
/// connection's descriptor number in the bench from [`GOT_FD`] and takes a copy of it with
/// pidfd_getfd(2).
fn worker_revoke(
    certs_dir: &Path,
    bundle: &[u8],
    socket: &Path,
    bench_pid: i32,
    target: SocketAddr,
    rounds: (usize, usize),
    pace: Duration,
) {
    let connect = || match TcpStream::connect(target) {
        Ok(c) => {
            // Closed with a reset: no TIME_WAIT sockets pile up.
            let _ = nix::sys::socket::setsockopt(
                &c,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            Ok(())
        }
        Err(e) => Err(e.raw_os_error()),
    };
    let paced = || {
        if !pace.is_zero() {
            thread::sleep(pace);
        }
    };
    for i in rounds.0..rounds.1 {
        let dir = certs_dir.join(format!("c{i}"));
        let (cert, key) = (
            fs::read(dir.join("svid.pem")).unwrap(),
            fs::read(dir.join("svid.key")).unwrap(),
        );
        let e = enroll::enroll(socket, &cert, &key, bundle).unwrap();
        let warm = Instant::now();
        let mut ok = 0u64;
        while warm.elapsed() < Duration::from_millis(20) {
            connect().unwrap();
            ok += 1;
            paced();
        }
        let mut admin_conn = Client::from_stream(admin_connection(bench_pid)).unwrap();
        let (delay0, sleeps0) = (run_delay_ns(), voluntary_switches());
        let t0 = Instant::now();
        admin_conn
            .send(&Request::Revoke {
                target: e.serial.clone(),
                reason: "benchmark".into(),
            })
            .unwrap();
        // The longest single connect of the loop, allowed ones included.
        let mut longest = Duration::ZERO;
        let mut aborted = 0u32;
        let (t_issued, t_eperm) = loop {
            let t_try = Instant::now();
            let result = connect();
            longest = longest.max(t_try.elapsed());
            match result {
                Ok(()) => ok += 1,
                Err(Some(libc::EPERM)) => break (t_try, Instant::now()),
                // A connect in flight when the sockets were destroyed.
                Err(Some(libc::ECONNABORTED)) => aborted += 1,
                Err(other) => panic!("unexpected connect error {other:?}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no EPERM 5 s after revoke"
            );
            paced();
        };
        let waited = run_delay_ns().saturating_sub(delay0) as f64 / 1e3;
        let slept = voluntary_switches().saturating_sub(sleeps0);
        let reply = admin_conn.recv().unwrap();
        let t1 = Instant::now();
        assert!(matches!(reply, Reply::Revoked { .. }), "{reply:?}");
        assert!(ok > 0, "the loop connected before the revocation");
        let us = |a: Instant, b: Instant| a.saturating_duration_since(b).as_secs_f64() * 1e6;
        println!(
            "revoke from_send_us={} issued_us={} from_return_us={} rtt_us={} waited_us={waited} slept={slept} longest_connect_us={} aborted={aborted}",
            us(t_eperm, t0),
            us(t_issued, t0),
            us(t_eperm, t1),
            us(t1, t0),
            longest.as_secs_f64() * 1e6
        );
    }
}

// ---------------------------------------------------------------------------------------
// Baselines and in-process measurements.

/// Issuance: `n` leaf certificates from a local CA (Ed25519, the default), against key
/// generation plus one Ed25519 signature (the cryptography an issuance cannot avoid). Also issuance with the durable log
/// append. Returns (issue/s, issue+log/s, baseline/s).
fn issuance(n: usize, dir: &Path) -> (f64, f64, f64) {
    let now = SystemTime::now();
    let ca = LocalCa::create("bench.local", now).unwrap();
    let req = LeafRequest {
        id: SpiffeId::workload("spiffe://bench.local/agent/bench/prod").unwrap(),
        lifetime: Duration::from_secs(3600),
        capabilities: vec!["read:analytics".into()],
    };
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(ca.issue(&req, now).unwrap());
    }
    let issue = n as f64 / t.elapsed().as_secs_f64();
    let log = dir.join("issuance.log");
    let t = Instant::now();
    for _ in 0..n {
        let issued = ca.issue(&req, now).unwrap();
        identity::log::append(&log, &identity::log::Entry::of(&issued, "bench", now)).unwrap();
    }
    let logged = n as f64 / t.elapsed().as_secs_f64();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let t = Instant::now();
    for _ in 0..n {
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        std::hint::black_box(kp.sign(&[7u8; 400]));
    }
    let base = n as f64 / t.elapsed().as_secs_f64();
    (issue, logged, base)
}

/// Bare mTLS handshakes over a Unix socket pair with rustls: server CPU seconds per handshake
/// (client certificate verified against the same CA with webpki, nothing else).
fn bare_handshake_cpu(f: &Files, server_cert: &str, server_key: &str, n: usize) -> f64 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    // The same provider and suite order as the daemon.
    let provider = enroll::provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&f.bundle) {
        roots.add(c.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_file_iter(server_cert)
                .unwrap()
                .map(Result::unwrap)
                .collect(),
            PrivateKeyDer::from_pem_file(server_key).unwrap(),
        )
        .unwrap();
    // As the daemon: our suite order, no session storage, no tickets.
    server.ignore_client_order = true;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let server = Arc::new(server);
    // The agent's configuration, as `enroll::enroll` builds it.
    let client = enroll::client_config(&f.cert, &f.key, &f.bundle).unwrap();
    let (tx, rx) = mpsc::channel::<UnixStream>();
    let srv = thread::spawn(move || {
        let start = thread_cpu();
        for sock in rx {
            let conn = rustls::ServerConnection::new(Arc::clone(&server)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).unwrap();
            tls.write_all(b"k").unwrap();
        }
        thread_cpu() - start
    });
    for _ in 0..n {
        let (a, b) = UnixStream::pair().unwrap();
        tx.send(b).unwrap();
        let conn = rustls::ClientConnection::new(
            Arc::clone(&client),
            ServerName::try_from("agentwall").unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, a);
        tls.write_all(b"x").unwrap();
        let mut r = [0u8; 1];
        tls.read_exact(&mut r).unwrap();
    }
    drop(tx);
    srv.join().unwrap() / n as f64
}

/// The revocation worker's descriptors: it asks for an admin connection on the first, and
/// reads the number of the bench's descriptor of it from the second.
const ASK_FD: i32 = 3;
const GOT_FD: i32 = 4;

/// A connection to the admin socket made by the bench (`bench_pid`) on request, copied into
/// this process with pidfd_getfd(2).
fn admin_connection(bench_pid: i32) -> UnixStream {
    use std::os::fd::FromRawFd as _;
    // SAFETY: descriptors ASK_FD and GOT_FD are the pipes the bench passed (`--preserve-fds`),
    // used by nothing else; borrowed for this call, not closed.
    let (mut ask, mut got) = unsafe {
        (
            std::mem::ManuallyDrop::new(fs::File::from_raw_fd(ASK_FD)),
            std::mem::ManuallyDrop::new(fs::File::from_raw_fd(GOT_FD)),
        )
    };
    ask.write_all(b"c").unwrap();
    let mut n = [0u8; 4];
    got.read_exact(&mut n).unwrap();
    let remote = i32::from_le_bytes(n);
    // SAFETY: pidfd_open(2) and pidfd_getfd(2) with integer arguments; each result is checked
    // and then owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, bench_pid, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, remote, 0);
        let err = std::io::Error::last_os_error();
        libc::close(pidfd as i32);
        assert!(fd >= 0, "pidfd_getfd: {err}");
        UnixStream::from_raw_fd(fd as i32)
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    if let Some(mode) = arg("worker") {
        let socket = PathBuf::from(arg("socket").unwrap());
        match mode.as_str() {
            "enroll" => {
                let n: usize = arg("n").unwrap().parse().unwrap();
                let known = (
                    fs::read(arg("cert").unwrap()).unwrap(),
                    fs::read(arg("key").unwrap()).unwrap(),
                );
                let pairs: Vec<_> = match arg("certs") {
                    Some(dir) => {
                        let from: usize = arg("from").unwrap().parse().unwrap();
                        (from..from + n)
                            .map(|i| read_pair(&Path::new(&dir).join(format!("c{i}"))))
                            .collect()
                    }
                    None => vec![known.clone()],
                };
                worker_enroll(
                    &known,
                    &pairs,
                    &fs::read(arg("bundle").unwrap()).unwrap(),
                    &socket,
                    (n, arg("clients").unwrap().parse().unwrap()),
                    arg("daemon").unwrap().parse().unwrap(),
                );
            }
            "revoke" => worker_revoke(
                Path::new(&arg("certs").unwrap()),
                &fs::read(arg("bundle").unwrap()).unwrap(),
                &socket,
                arg("bench-pid").unwrap().parse().unwrap(),
                arg("target").unwrap().parse().unwrap(),
                (
                    arg("first").unwrap().parse().unwrap(),
                    arg("end").unwrap().parse().unwrap(),
                ),
                Duration::from_micros(arg("pace-us").unwrap().parse().unwrap()),
            ),
            "workload" => worker_workload(
                &socket,
                arg("n").unwrap().parse().unwrap(),
                arg("daemon").unwrap().parse().unwrap(),
            ),
            other => panic!("unknown worker {other}"),
        }
        return;
    }
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "run as root (cargo xtask bench)"
    );
    let n_enroll: usize = arg("enrollments").map_or(4000, |v| v.parse().unwrap());
    let rounds: usize = arg("revokes").map_or(200, |v| v.parse().unwrap());
    let n_issue: usize = arg("issues").map_or(2000, |v| v.parse().unwrap());

    // A workload connecting flat out outpaces an accept queue of 128 (std's backlog) while
    // this thread waits for a CPU: connects then stall for a SYN retransmit (1 s). Listening
    // again on a listening socket sets its backlog.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket this function owns.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0);
    let target = listener.local_addr().unwrap();
    thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let policy = format!(
        "policy:\n  name: bench\n  identity: {ID}\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        target.port()
    );
    let d = TestDaemon::start(&[("bench.yaml", &policy)]);
    let me = d.world_copy(&std::env::current_exe().unwrap());
    let (cert, key) = d.issue(ID, "1h");
    let bundle = d.state_dir().join("ca/ca.crt").display().to_string();
    let exec = |worker_args: &[String]| {
        let o = Command::new(agentwall_tests::agentwall_bin())
            .args(["exec", "--socket"])
            .arg(&d.socket)
            .arg("--self-enroll")
            // The worker reads the certificates and keys `issue` wrote for root (0600): it
            // runs as root as it was, not as a confined root mapped to a uid of its own.
            .arg("--keep-privileges")
            .arg("--")
            .arg(&me)
            .args(worker_args)
            .output()
            .unwrap();
        assert!(o.status.success(), "worker: {o:?}");
        String::from_utf8(o.stdout).unwrap()
    };

    // Issuance.
    let (issue, logged, issue_base) = issuance(n_issue, &d.dir);
    eprintln!("issuance: {issue:.0}/s, with durable log {logged:.0}/s, baseline {issue_base:.0}/s");

    // Enrollments: the daemon's CPU time over full enrollments, from one client and from four
    // at once; presenting one certificate over and over (an agent that enrolls again or
    // fetches tokens), or a certificate never seen before each time (each case has certificates
    // of its own: the daemon remembers chains that passed). In interleaved rounds, each with
    // its bare-handshake baseline, so that a change of the host's speed during the run hits
    // every case and its baseline alike; medians over the rounds.
    let enroll_rounds: usize = arg("enroll-rounds").map_or(5, |v| v.parse().unwrap());
    let per_round = n_enroll.div_ceil(enroll_rounds);
    // `--cases=known1,new1` runs some of them only (for profiling one).
    let wanted = arg("cases").unwrap_or_else(|| "known1,known4,new1,new4".into());
    let cases: Vec<(bool, usize)> = [(false, 1usize), (false, 4), (true, 1), (true, 4)]
        .into_iter()
        .filter(|(distinct, clients)| {
            let case = format!("{}{clients}", if *distinct { "new" } else { "known" });
            wanted.split(',').any(|c| c == case)
        })
        .collect();
    let fresh = d.dir.join("enroll-certs");
    issue_many(&d, &fresh, 2 * per_round * (enroll_rounds + 1));
    let pid = d.pid().unwrap();
    let server = d.dir.join("server");
    fs::create_dir_all(&server).unwrap();
    let server_cert = server_with_dns(&d, &server);
    let f = files(&cert, &key, &bundle);
    // Per case: (daemon CPU per enrollment, wall time per enrollment) of each round.
    let mut enroll_runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    let mut base_runs = Vec::new();
    // Round 0 warms up (pool threads started, their first allocations and random generator
    // seeding) and is not counted.
    for round in 0..=enroll_rounds {
        for (i, (distinct, clients)) in cases.iter().enumerate() {
            let mut args = vec![
                "--worker=enroll".into(),
                format!("--socket={}", d.enroll_socket.display()),
                format!("--cert={cert}"),
                format!("--key={key}"),
                format!("--bundle={bundle}"),
                format!("--n={per_round}"),
                format!("--clients={clients}"),
                format!("--daemon={pid}"),
            ];
            if *distinct {
                let block = if *clients == 1 { 0 } else { enroll_rounds + 1 };
                args.push(format!("--certs={}", fresh.display()));
                args.push(format!("--from={}", (block + round) * per_round));
            }
            let out = exec(&args);
            let field = |name: &str| -> f64 {
                out.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            if round == 0 {
                continue;
            }
            enroll_runs[i].push((
                field("daemon_cpu") / per_round as f64,
                field("enroll_wall") / per_round as f64,
            ));
        }
        // Baseline: a bare rustls handshake with the same certificates.
        let base = bare_handshake_cpu(
            &f,
            &server_cert,
            server.join("svid.key").to_str().unwrap(),
            per_round.min(1000),
        );
        if round > 0 {
            base_runs.push(base);
        }
    }
    let median = |v: &[f64]| quantile(&mut v.to_vec(), 0.5);
    let base_cpu = median(&base_runs);
    // (distinct, clients, per core: median, min, max; wall rate; CPU against the baseline).
    let enroll_rows: Vec<(bool, usize, [f64; 3], f64, f64)> = cases
        .iter()
        .zip(&enroll_runs)
        .map(|((distinct, clients), runs)| {
            let rates: Vec<f64> = runs.iter().map(|(cpu, _)| 1.0 / cpu).collect();
            let walls: Vec<f64> = runs.iter().map(|(_, w)| 1.0 / w).collect();
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&base_runs)
                .map(|((cpu, _), base)| cpu / base)
                .collect();
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            (
                *distinct,
                *clients,
                [median(&rates), lo, hi],
                median(&walls),
                median(&ratios),
            )
        })
        .collect();
    for (distinct, clients, [rate, lo, hi], wall_rate, ratio) in &enroll_rows {
        let certs = if *distinct {
            "a new certificate each"
        } else {
            "one certificate"
        };
        eprintln!(
            "enrollment: {rate:.0}/s per daemon core [{lo:.0}, {hi:.0}] ({wall_rate:.0}/s wall, {clients} clients, {certs}), {ratio:.2}x the bare handshake's CPU ({:.0}/s per core)",
            1.0 / base_cpu
        );
    }
    for (i, runs) in enroll_runs.iter().enumerate() {
        let rates: Vec<String> = runs
            .iter()
            .map(|(c, _)| format!("{:.0}", 1.0 / c))
            .collect();
        eprintln!("  rounds, case {i}: {}", rates.join(" "));
    }
    {
        let rates: Vec<String> = base_runs
            .iter()
            .map(|c| format!("{:.0}", 1.0 / c))
            .collect();
        eprintln!("  rounds, bare handshake: {}", rates.join(" "));
    }

    // The Workload API, called from inside a cgroup of `exec --identity`; against the
    // enrollment of this run by one client presenting one certificate.
    let n_fetch: usize = arg("fetches").map_or(2000, |v| v.parse().unwrap());
    let o = Command::new(agentwall_tests::agentwall_bin())
        .args(["exec", "--socket"])
        .arg(&d.socket)
        .args(["--identity", ID, "--keep-privileges", "--"])
        .arg(&me)
        .arg("--worker=workload")
        .arg(format!("--socket={}", d.workload_socket.display()))
        .arg(format!("--n={n_fetch}"))
        .arg(format!("--daemon={pid}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "workload worker: {o:?}");
    let out = String::from_utf8(o.stdout).unwrap();
    let field = |name: &str| -> String {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap()
            .to_string()
    };
    // (what, p50 µs, p99 µs, calls per daemon core).
    let workload_rows: Vec<(&str, f64, f64, f64)> = [
        (
            "x509_new",
            "FetchX509SVID on a new connection (connect, HTTP/2 handshake, the first message)",
        ),
        (
            "x509_open",
            "FetchX509SVID on an open connection (a new stream, the first message)",
        ),
        ("jwt_open", "FetchJWTSVID on an open connection"),
    ]
    .into_iter()
    .map(|(case, what)| {
        let mut lat: Vec<f64> = field(&format!("{case}_us"))
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect();
        let cpu: f64 = field(&format!("{case}_cpu")).parse().unwrap();
        (
            what,
            quantile(&mut lat, 0.5),
            quantile(&mut lat, 0.99),
            n_fetch as f64 / cpu,
        )
    })
    .collect();
    // The enrollment of one client presenting one certificate: per core, and its mean time.
    let enroll_known = enroll_rows
        .iter()
        .find(|(distinct, clients, ..)| !*distinct && *clients == 1)
        .map(|(_, _, [rate, ..], wall, _)| (*rate, 1e6 / *wall));
    for (what, p50, p99, per_core) in &workload_rows {
        eprintln!(
            "workload API: {what}: p50 {p50:.0} µs, p99 {p99:.0} µs, {per_core:.0}/s per daemon core"
        );
    }

    // The revocation worker runs in an enforced cgroup, where the admin socket refuses it:
    // it asks this process for a connection each round (see `worker_revoke`).
    let exec_with_admin = |worker_args: &[String]| {
        let (ask_r, ask_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (got_r, got_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let admin = d.socket.clone();
        let connector = thread::spawn(move || {
            let (mut ask, mut got) = (fs::File::from(ask_r), fs::File::from(got_w));
            let mut held = Vec::new();
            let mut b = [0u8; 1];
            while ask.read_exact(&mut b).is_ok() {
                let c = UnixStream::connect(&admin).unwrap();
                if got.write_all(&c.as_raw_fd().to_le_bytes()).is_err() {
                    break;
                }
                held.push(c);
            }
        });
        let (ask_fd, got_fd) = (ask_w.as_raw_fd(), got_r.as_raw_fd());
        let mut c = Command::new(agentwall_tests::agentwall_bin());
        c.args(["exec", "--socket"])
            .arg(&d.socket)
            .arg("--self-enroll")
            .arg("--keep-privileges")
            .arg("--preserve-fds=2")
            .arg("--")
            .arg(&me)
            .args(worker_args);
        // SAFETY: between fork and exec only fcntl and dup2 (async-signal-safe), on descriptors
        // this process holds open until the child has started.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                // Out of the way first: either pipe may hold the number the other goes to.
                let high = [
                    libc::fcntl(ask_fd, libc::F_DUPFD_CLOEXEC, 100),
                    libc::fcntl(got_fd, libc::F_DUPFD_CLOEXEC, 100),
                ];
                for (from, to) in high.into_iter().zip([ASK_FD, GOT_FD]) {
                    if from < 0 || libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let o = c.output().unwrap();
        drop((ask_w, got_r));
        connector.join().unwrap();
        assert!(o.status.success(), "worker: {o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    // Revocation latency.
    // Three workloads connecting as fast as they can (it and the listener keep both CPUs
    // busy), one at a time, then one pacing its connects 200 µs apart.
    let plan = [(0, 0), (rounds, 0), (2 * rounds, 0), (3 * rounds, 200)];
    let certs = d.dir.join("revoke-certs");
    issue_many(&d, &certs, plan.len() * rounds);
    let mut series = Vec::new();
    for (first, pace_us) in plan {
        let log_before = d.log_text().lines().count();
        // One worker, in a cgroup of its own, per round: a cgroup a revocation cut stays
        // denied whatever certificate enrolls from it later.
        let out: String = (first..first + rounds)
            .map(|i| {
                exec_with_admin(&[
                    "--worker=revoke".into(),
                    format!("--socket={}", d.enroll_socket.display()),
                    format!("--bench-pid={}", std::process::id()),
                    format!("--certs={}", certs.display()),
                    format!("--bundle={bundle}"),
                    format!("--target={target}"),
                    format!("--first={i}"),
                    format!("--end={}", i + 1),
                    format!("--pace-us={pace_us}"),
                ])
            })
            .collect();
        let mut aborted = Vec::new();
        let (mut send, mut issued, mut ret, mut rtt, mut waited, mut slept, mut longest) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for l in out.lines().filter(|l| l.starts_with("revoke ")) {
            for kv in l["revoke ".len()..].split(' ') {
                let (k, v) = kv.split_once('=').unwrap();
                let v: f64 = v.parse().unwrap();
                match k {
                    "from_send_us" => send.push(v),
                    "issued_us" => issued.push(v),
                    "from_return_us" => ret.push(v),
                    "rtt_us" => rtt.push(v),
                    "waited_us" => waited.push(v),
                    "slept" => slept.push(v),
                    "longest_connect_us" => longest.push(v),
                    "aborted" => aborted.push(v),
                    _ => {}
                }
            }
        }
        assert_eq!(send.len(), rounds, "{out}");
        assert_eq!(waited.len(), rounds, "{out}");
        assert_eq!(slept.len(), rounds, "{out}");
        assert_eq!(longest.len(), rounds, "{out}");
        assert_eq!(aborted.len(), rounds, "{out}");
        let slowest = (0..rounds)
            .max_by(|a, b| send[*a].total_cmp(&send[*b]))
            .map_or((0.0, 0.0, 0.0, 0.0, 0.0), |i| {
                (send[i], waited[i], slept[i], longest[i], aborted[i])
            });
        // The daemon logs how long each revocation took from its request to the kernel flag.
        let mut inside: Vec<f64> = d
            .log_text()
            .lines()
            .skip(log_before)
            .filter(|l| l.contains("identity revoked"))
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["in_kernel_us"].as_str()?.parse().ok()
            })
            .collect();
        assert_eq!(inside.len(), rounds, "one log line per revocation");
        let q = |v: &mut Vec<f64>| (quantile(v, 0.5), quantile(v, 0.99));
        let r = Revokes {
            pace_us,
            send: q(&mut send),
            issued: q(&mut issued),
            ret: q(&mut ret),
            rtt: q(&mut rtt),
            inside: q(&mut inside),
            waited: q(&mut waited),
            slowest,
        };
        eprintln!(
            "revoke -> EPERM (pace {pace_us} µs): p50 {:.0} p99 {:.0} µs; denied connect issued p50 {:.0} p99 {:.0}; after the reply p99 {:.0}; round trip p50 {:.0} p99 {:.0}; in the daemon p50 {:.0} p99 {:.0}; workload waiting for a CPU p50 {:.0} p99 {:.0}; slowest {:.0} µs, of which waiting for a CPU {:.0}, the workload asleep {} times, its longest connect {:.0} µs, connects aborted {}",
            r.send.0,
            r.send.1,
            r.issued.0,
            r.issued.1,
            r.ret.1,
            r.rtt.0,
            r.rtt.1,
            r.inside.0,
            r.inside.1,
            r.waited.0,
            r.waited.1,
            r.slowest.0,
            r.slowest.1,
            r.slowest.2,
            r.slowest.3,
            r.slowest.4
        );
        series.push(r);
    }

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut md = String::new();
    let _ = writeln!(md, "## Identity\n");
    let _ = writeln!(
        md,
        "Produced by `cargo xtask bench` (tests/benches/identity.rs) with the release daemon. \
         Linux {}, {cpus} CPUs; the daemon, its clients and the workload share them.\n",
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "| measure | agentwall | baseline (same run) | ratio | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    for (distinct, clients, [rate, lo, hi], wall_rate, ratio) in &enroll_rows {
        let who = match (*clients, *distinct) {
            (1, false) => "one client presenting one certificate".to_string(),
            (c, false) => format!("{c} clients at once presenting one certificate"),
            (1, true) => "one client, a certificate never seen before each time".to_string(),
            (c, true) => format!("{c} clients at once, a certificate never seen before each time"),
        };
        let _ = writeln!(
            md,
            "| enrollments per second per daemon core ({who}; median of {enroll_rounds} rounds of {per_round} full mTLS enrollments, [min, max]) | {rate:.0}/s [{lo:.0}, {hi:.0}] | bare rustls mTLS handshake, median of the same rounds: {:.0}/s | {ratio:.2}x the handshake's CPU | ≥ 4000/s: {} |",
            1.0 / base_cpu,
            met(*rate >= 4000.0)
        );
        let _ = writeln!(
            md,
            "| enrollments per second, wall clock, {who} | {wall_rate:.0}/s | - | - | - |"
        );
    }
    for (what, p50, p99, per_core) in &workload_rows {
        let (base_lat, ratio_lat, base_rate, ratio_rate) = match enroll_known {
            Some((rate, us)) => (
                format!("enrollment, one client presenting one certificate, mean: {us:.0} µs"),
                format!("{:.2}x (p50)", p50 / us),
                format!("enrollments per daemon core, the same client: {rate:.0}/s"),
                format!("{:.2}x", per_core / rate),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| Workload API: {what}, one call at a time, {n_fetch} calls | p50 {p50:.0} µs, p99 {p99:.0} µs | {base_lat} | {ratio_lat} | - |"
        );
        let _ = writeln!(
            md,
            "| Workload API: {what}, calls per second per daemon core | {per_core:.0}/s | {base_rate} | {ratio_rate} | - |"
        );
    }
    let flat_p99: Vec<f64> = series
        .iter()
        .filter(|r| r.pace_us == 0)
        .map(|r| r.send.1)
        .collect();
    let flat_waited: Vec<String> = series
        .iter()
        .filter(|r| r.pace_us == 0)
        .map(|r| format!("{:.0} µs", r.waited.1))
        .collect();
    for (i, r) in series.iter().enumerate() {
        if r.pace_us == 0 && i > 0 {
            continue;
        }
        if r.pace_us != 0 {
            let _ = writeln!(
                md,
                "| revoke → first EPERM p99, workload connecting as fast as it can, each of {} runs of {rounds} | {} | the workload waiting for a CPU meanwhile, p99 of each run: {} | - | p99 ≤ 1 ms in every run: {} |",
                flat_p99.len(),
                flat_p99
                    .iter()
                    .map(|v| format!("{v:.0} µs"))
                    .collect::<Vec<_>>()
                    .join(", "),
                flat_waited.join(", "),
                met(flat_p99.iter().all(|v| *v <= 1000.0))
            );
        }
        let workload = if r.pace_us == 0 {
            "connecting as fast as it can".to_string()
        } else {
            format!("connecting every {} µs", r.pace_us)
        };
        let _ = writeln!(
            md,
            "| revoke → first EPERM, from sending the request ({rounds} revocations, workload {workload}) | p50 {:.0} µs, p99 {:.0} µs | admin socket round trip of the same revocations: p50 {:.0} µs, p99 {:.0} µs | - | p99 ≤ 1 ms: {} |",
            r.send.0,
            r.send.1,
            r.rtt.0,
            r.rtt.1,
            met(r.send.1 <= 1000.0)
        );
        let _ = writeln!(
            md,
            "| … until the workload issued the connect that was denied (the rest is the workload waiting for its CPU and its own connect) | p50 {:.0} µs, p99 {:.0} µs | - | - | - |",
            r.issued.0, r.issued.1
        );
        let _ = writeln!(
            md,
            "| … of which inside the daemon (request read → kernel binding flagged) | p50 {:.0} µs, p99 {:.0} µs | - | - | - |",
            r.inside.0, r.inside.1
        );
        let _ = writeln!(
            md,
            "| … of which the workload was runnable, waiting for a CPU (its schedstat run delay) | p50 {:.0} µs, p99 {:.0} µs; the slowest revocation: {:.0} µs, of which {:.0} µs waiting | - | - | - |",
            r.waited.0, r.waited.1, r.slowest.0, r.slowest.1
        );
        let _ = writeln!(
            md,
            "| … first EPERM after the command returned | p50 {:.0} µs, p99 {:.0} µs | - | - | - |",
            r.ret.0, r.ret.1
        );
    }
    let _ = writeln!(
        md,
        "| certificates issued per second (Ed25519 key + signed leaf) | {issue:.0}/s | key generation + one Ed25519 signature: {issue_base:.0}/s | {:.2}x | - |",
        issue_base / issue
    );
    let _ = writeln!(
        md,
        "| certificates issued per second, each appended to the issuance log and synced | {logged:.0}/s | - | - | - |"
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n\
         A Workload API call is measured from inside a cgroup of `agentwall exec --identity`, \
         by a client that speaks gRPC over HTTP/2 as the SPIFFE libraries do. Each call covers \
         the attestation of the caller (its cgroup now, the identity bound to it, the \
         policy's selectors) and an audit record; a JWT-SVID also an ES256 signature. The \
         X509-SVID is the one the daemon holds in memory: no certificate is made per call. \
         The enrollment it is set against proves a certificate the agent holds; the calls \
         hand out one the daemon made.\n\n\
         An enrollment here is what an agent pays to prove itself. It covers a TLS 1.3 handshake \
         with its client certificate (aws-lc-rs; the daemon prefers AES-128-GCM-SHA256). It \
         covers the SVID checks (chain, SPIFFE ID, key usage, validity, revocation) and \
         attestation of the peer process through its pidfd. It also covers the binding written \
         to the kernel map, the enrollment record written when it changed, and an audit \
         record.\n\n\
         An agent presenting the same certificate again (enrolling again, fetching tokens) has \
         its chain's signature checked once. The verdict is remembered until a certificate of \
         the chain expires.\n\n\
         A certificate never seen before costs one more signature verification. It also \
         changes the serial recorded for the cgroup. So one line is appended to the enrollment \
         journal before the agent gets its answer.\n\n\
         That line is not synced. The records describe kernel state that ends with the \
         machine, so they must outlive the daemon, and the page cache does that.\n\n\
         \"Per daemon core\" is enrollments divided by the CPU time the daemon used meanwhile, \
         over all its threads (the audit writer's too). The workload reads that time to the \
         nanosecond from their schedstat, around its timed enrollments.\n\n\
         The cases and the baseline run in interleaved rounds, so that a change of the host's \
         speed during the run affects all of them. The ratio is the median of each round's \
         against that round's baseline.\n\n\
         The daemon serves enrollments from a pool of threads waiting in epoll with \
         EPOLLEXCLUSIVE. One thread serves agents that enroll one after another.\n\n\
         The daemon's enrollment server certificate has an Ed25519 key, and so does the \
         baseline's server.\n\n\
         The CA and the agents' certificates have Ed25519 keys, the default \
         `identity.key_algorithm`. A new certificate's enrollment needs two verifications: the \
         CA's signature over it and the agent's over the handshake. Each costs ~25 µs here, \
         against ~36 µs with `ecdsa-p256`.\n\n\
         The last report with `ecdsa-p256` (bb05232, before Ed25519 became the default) \
         measured 3412/s and 3708/s per core for a new certificate from one and four clients. \
         For a known one it measured 4733/s and 5138/s.\n\n\
         The revocation is measured inside the workload, which connects to an allowed listener \
         in a loop. It writes `revoke` for its own certificate's serial to the admin socket and \
         keeps connecting. The time runs from the write until the first EPERM.\n\n\
         The admin socket answers no process in an enforced cgroup but for `enforce-self`. So \
         the bench, outside, connects when the workload asks, before its warm-up, and the \
         workload takes a copy of that connection with pidfd_getfd(2). The request then takes \
         the same path as an operator's.\n\n\
         Each revocation runs in a new workload and cgroup: a cgroup a revocation cut stays \
         denied whatever certificate enrolls from it later.\n\n\
         The EPERM always came before the reply. The kernel is flagged first; the reply waits \
         for the socket destruction and the synced revocation list.\n\n\
         A workload connecting as fast as it can keeps both CPUs of this machine busy, together \
         with its listener.\n\n\
         A real-time thread reads the admin socket and handles the revocation itself. A normal \
         thread had waited up to a 4 ms scheduler tick for a CPU there.\n\n\
         Once the kernel has the revocation, that thread steps down to normal priority. It does \
         the rest itself: socket destruction, then the synced list. It wakes no other thread \
         that could take the revoked agent's CPU.\n\n\
         What remains of the time is the daemon's own work, the locks it shares with other work \
         in the daemon, and the workload's own scheduling. The row on when the denied connect \
         was issued shows how much.\n\n\
         The workload reads its own schedstat and rusage around each revocation and times each \
         of its connects. The time it was runnable but waiting for a CPU is reported. For the \
         slowest revocation of each run, how often it slept and its longest connect are \
         reported too.\n\n\
         The slowest revocations had not waited for a CPU but slept in one connect. That \
         connect was allowed just before the revocation, and the egress program then dropped \
         its SYN. It waits until the daemon destroys the socket (ECONNABORTED).\n\n\
         The daemon therefore cuts the sockets before it syncs the revocation list. That wait \
         was ~1.2 ms when the sync came first; it is ~0.4 ms now."
    );
    print!("{md}");
    if let Some(path) = arg("report") {
        agentwall_tests::write_report_section(Path::new(&path), "identity", &md);
        eprintln!("wrote {path}");
    }
}

/// `n` certificates of the bench's identity from the daemon's CA, in `dir/c0` .. `dir/c{n-1}`.
fn issue_many(d: &TestDaemon, dir: &Path, n: usize) {
    let req = LeafRequest {
        id: SpiffeId::workload(&format!("spiffe://agentwall.local/{ID}")).unwrap(),
        lifetime: Duration::from_secs(3600),
        capabilities: Vec::new(),
    };
    for i in 0..n {
        identity::issue_into(
            &d.state_dir(),
            ("agentwall.local", KeyAlgorithm::default()),
            &req,
            "bench",
            &dir.join(format!("c{i}")),
        )
        .unwrap();
    }
}

/// A server certificate for the bare handshake, named `agentwall` like the daemon's.
fn server_with_dns(d: &TestDaemon, dir: &Path) -> String {
    let ca = LocalCa::load_or_create(
        &d.state_dir().join("ca"),
        "agentwall.local",
        KeyAlgorithm::default(),
        SystemTime::now(),
    )
    .unwrap();
    let req = LeafRequest {
        id: SpiffeId::workload("spiffe://agentwall.local/agentwall/bench-server").unwrap(),
        lifetime: Duration::from_secs(3600),
        capabilities: Vec::new(),
    };
    let issued = ca
        .issue_server(&req, &["agentwall"], SystemTime::now())
        .unwrap();
    let (c, k) = (dir.join("server.pem"), dir.join("svid.key"));
    fs::write(&c, issued.cert_pem).unwrap();
    fs::write(k, issued.key_pem).unwrap();
    c.display().to_string()
}
