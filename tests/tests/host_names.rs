//! Host names of the services catalog: the daemon resolves them with their TTLs and follows
//! an address that changes, with no moment in which a still-valid address is denied or an
//! expired one allowed. A DNS server of the test's own, on loopback, answers; real connects
//! from a real cgroup to real listeners. Run as root, one at a time (`cargo xtask test`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on a broken precondition"
)]

use std::{
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agentwall_tests::{TestDaemon, serial};

/// A DNS server for one name: A queries get the current address with the current TTL,
/// anything else an empty answer (no such record). Answers until dropped.
struct Dns {
    port: u16,
    answer: Arc<Mutex<(Ipv4Addr, u32)>>,
    asked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Dns {
    fn start(addr: Ipv4Addr, ttl: u32) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new((addr, ttl)));
        let asked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, n, s) = (Arc::clone(&answer), Arc::clone(&asked), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let (ip, ttl) = *a.lock().unwrap();
                if let Some(reply) = reply(&buf[..len], ip, ttl) {
                    n.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        Self {
            port,
            answer,
            asked,
            stop,
        }
    }

    fn set(&self, addr: Ipv4Addr, ttl: u32) {
        *self.answer.lock().unwrap() = (addr, ttl);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The answer to a query of one question: its id and question echoed, with one A record
/// (for type A) or none.
fn reply(q: &[u8], ip: Ipv4Addr, ttl: u32) -> Option<Vec<u8>> {
    // The question's name ends at the zero label; type and class follow.
    let mut at = 12;
    while *q.get(at)? != 0 {
        at += 1 + usize::from(q[at]);
    }
    let end = at + 5;
    let qtype = u16::from_be_bytes([*q.get(at + 1)?, *q.get(at + 2)?]);
    let mut r = Vec::with_capacity(end + 16);
    r.extend_from_slice(&q[..2]);
    let a = qtype == 1;
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    r.extend_from_slice(q.get(12..end)?);
    if a {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// A catalog service at a host name moves from one address to another: the new address is
/// granted before the old one's answer expires (no gap), and the old one is refused from its
/// expiry on. The two addresses (192.0.2.31 and .32, which loopback aliasing would not tell
/// apart if they were 127.x) live on the loopback of a network namespace the test makes; the
/// agent joins it.
#[test]
fn a_host_name_whose_address_changes_is_followed() {
    let _s = serial();
    let port = 47_631;
    let (old_ip, new_ip) = (Ipv4Addr::new(192, 0, 2, 31), Ipv4Addr::new(192, 0, 2, 32));
    let dns = Dns::start(old_ip, 6);
    let catalog = format!(
        "kind: Service\nservice:\n  name: reports\n  endpoints:\n    - to: reports.example.test\n      protocol: tcp\n      ports: [{port}]\n"
    );
    let policy = "policy:\n  name: reader\n  rules:\n    - resource: service:reports\n";
    let config = format!(
        "names:\n  servers: [\"127.0.0.1:{}\"]\n  min_ttl: 1s\n  refresh_before: 4s\n",
        dns.port
    );
    let d = TestDaemon::start_with_config(
        &[("catalog.yaml", &catalog), ("reader.yaml", policy)],
        Some(&config),
    );
    // The hosts: a namespace with both addresses on its loopback, a listener on each.
    let mut host = agentwall_tests::Repl::spawn({
        let mut c = Command::new(agentwall_tests::netprobe_bin());
        c.arg("repl");
        c
    });
    assert_eq!(host.cmd("unshare-net"), "ok");
    let pid = host.cmd("pid");
    for ip in [old_ip, new_ip] {
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-n", "ip", "addr", "add"])
            .arg(format!("{ip}/32"))
            .args(["dev", "lo"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(host.cmd(&format!("listen {ip}:{port}")), "ok");
    }
    let mut agent = d.repl_under(&["--policy", "reader", "--keep-privileges"]);
    assert_eq!(agent.cmd(&format!("join-net /proc/{pid}/ns/net")), "ok");
    let mut try_both = || {
        (
            agent.cmd(&format!("tcp {old_ip}:{port}")) == "ok",
            agent.cmd(&format!("tcp {new_ip}:{port}")) == "ok",
        )
    };
    assert_eq!(try_both(), (true, false), "the name's address, and only it");
    assert!(dns.asked.load(Ordering::Relaxed) >= 1);

    // The name moves. Until the old answer expires (6 s after it was given) the old address
    // stays; the new one comes with the answer asked for 3 s before that (half the time to
    // live, under `refresh_before`: a margin that a loaded host keeps).
    dns.set(new_ip, 6);
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut both_at_once = false;
    loop {
        let now = try_both();
        seen.push(now);
        both_at_once |= now == (true, true);
        if now == (false, true) {
            break;
        }
        assert!(
            now.0,
            "the old address was refused before the new one came: {seen:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(15), "{seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(both_at_once, "no moment without a valid address: {seen:?}");
    // Expired is expired: the old address does not come back, the new one stays (asked
    // again before each expiry).
    for _ in 0..10 {
        assert_eq!(try_both(), (false, true), "{seen:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A name may not grant this host: an answer of 127.0.0.1 (which the kernel would read as the
/// whole loopback, every local service) grants nothing, and is counted.
#[test]
fn a_name_that_resolves_to_this_host_grants_nothing() {
    let _s = serial();
    let sink = agentwall_tests::TcpSink::new("127.0.0.1:0");
    let dns = Dns::start(Ipv4Addr::LOCALHOST, 30);
    let catalog = format!(
        "kind: Service\nservice:\n  name: local\n  endpoints:\n    - to: sneaky.example.test\n      protocol: tcp\n      ports: [{}]\n",
        sink.port()
    );
    let policy = "policy:\n  name: reader\n  rules:\n    - resource: service:local\n";
    let config = format!("names:\n  servers: [\"127.0.0.1:{}\"]\n", dns.port);
    let d = TestDaemon::start_with_config(
        &[("catalog.yaml", &catalog), ("reader.yaml", policy)],
        Some(&config),
    );
    let out = d.exec("reader", None, &[&format!("tcp 127.0.0.1:{}", sink.port())]);
    assert_eq!(agentwall_tests::lines(&out), ["err EPERM"]);
    assert_eq!(sink.accepted(), 0);
    assert!(dns.asked.load(Ordering::Relaxed) >= 1);
    assert!(
        d.status()
            .daemon_errors
            .get("dns_refused")
            .is_some_and(|n| *n >= 1),
        "{:?}",
        d.status().daemon_errors
    );
}
