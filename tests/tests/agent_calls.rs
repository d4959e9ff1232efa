//! Agent-to-agent calls on one host, in the kernel: an `agent:` rule of the caller grants its
//! egress to the callee's endpoints, and the callee's ingress admits that caller by who it is
//! (its cgroup's policy, as the caller's own SYN recorded it), not by its address. Real
//! processes in real cgroups, real listeners. Run as root, one at a time (`cargo xtask test`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on a broken precondition"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use agentwall_tests::{TestDaemon, serial};

/// The agents catalog entry of the callee, its policy, and three callers: `caller-a` calls it
/// by an `agent:` rule, `caller-c` may only reach its address (a `cidr:` rule), `bystander`
/// has no rule for it at all.
fn policies(port: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "agents.yaml",
            format!(
                "apiVersion: agentwall.dev/v1\nkind: Agent\nagent:\n  name: report-api/prod\n  endpoints:\n    - to: 127.0.0.1\n      ports: [{port}]\n"
            ),
        ),
        (
            "report-api.yaml",
            "policy:\n  name: report-api\n  identity: agent/report-api/prod\n".to_string(),
        ),
        (
            "caller-a.yaml",
            "policy:\n  name: caller-a\n  rules:\n    - resource: agent:report-api/prod\n      actions: [read]\n".to_string(),
        ),
        (
            "caller-c.yaml",
            format!(
                "policy:\n  name: caller-c\n  rules:\n    - resource: cidr:127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
            ),
        ),
    ]
}

/// `agentwall exec --policy POLICY -- python3 -c SCRIPT ARGS...` against `d`.
fn python_under(d: &TestDaemon, policy: &str, script: &str, args: &[String]) -> Command {
    let mut c = Command::new(d.world_copy(&agentwall_tests::agentwall_bin()));
    c.arg("exec")
        .arg("--socket")
        .arg(&d.socket)
        .args(["--policy", policy, "--", "/usr/bin/python3", "-c", script])
        .args(args);
    c
}

/// An echo server under `policy`: it echoes on every connection it accepts, one at a time,
/// until the caller closes it, and says when it first answered one.
fn serve(d: &TestDaemon, policy: &str, port: u16) -> (Child, BufReader<ChildStdout>) {
    let script = "import socket,sys\n\
p=int(sys.argv[1])\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', p)); s.listen(8)\n\
print('listening', flush=True)\n\
s.settimeout(20)\n\
while True:\n    try:\n        c,_=s.accept()\n    except OSError as e:\n        print('accept', type(e).__name__, flush=True); break\n    c.settimeout(10); said=False\n    try:\n        while True:\n            b=c.recv(100)\n            if not b: break\n            c.sendall(b)\n            if not said: print('served', flush=True); said=True\n    except OSError as e:\n        print('echo', type(e).__name__, flush=True)\n    c.close()\n";
    let mut child = python_under(d, policy, script, &[port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    (child, out)
}

/// A call from a process under `policy`: what it got back, or the error it saw.
fn call_as(d: &TestDaemon, policy: &str, port: u16) -> String {
    let script = "import socket,sys\n\
try:\n    s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2); s.settimeout(3); s.sendall(b'ping'); print(s.recv(100).decode(), flush=True)\n\
except OSError as e:\n    print(type(e).__name__, e.errno, flush=True)\n";
    let out = python_under(d, policy, script, &[port.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A call from this (unenforced) process.
fn call_unenforced(port: u16) -> std::io::Result<String> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The caller an `agent:` rule names is admitted and answered (with no ingress or egress rule
/// of the callee's own); a caller that may reach the address but is not named, and a process
/// outside any enforced cgroup, get no connection at all; each verdict names its rule.
#[test]
fn an_agent_rule_admits_its_caller_and_the_callee_refuses_everyone_else() {
    let _s = serial();
    let port = agentwall_tests::free_port();
    let files = policies(port);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let d = TestDaemon::start(&refs);
    let events = d.events();
    let (mut server, mut out) = serve(&d, "report-api", port);

    assert_eq!(call_as(&d, "caller-a", port), "ping", "the named caller");
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "served");

    // Its egress reaches the address; the callee's ingress does not admit it: the SYN is
    // dropped, the connect times out.
    assert_eq!(call_as(&d, "caller-c", port), "TimeoutError None");
    let refused = call_unenforced(port);
    assert!(
        refused.is_err(),
        "a process in no enforced cgroup: {refused:?}"
    );

    // The named caller again, after the refusals: the server saw only its connections.
    assert_eq!(call_as(&d, "caller-a", port), "ping");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "served", "no other connection was accepted");
    let _ = server.kill();
    let _ = server.wait();

    assert!(d.counter("ingress_denied") >= 2);
    // `policy explain --from` reads the compiled rules as the kernel does: it agrees.
    let set = agentwall::policy::load_dir(&d.policies).unwrap();
    let slots: std::collections::HashMap<String, u32> = set
        .policies
        .iter()
        .zip(1..)
        .map(|(p, s)| (p.name.clone(), s))
        .collect();
    let compiled = agentwall::policy::compile(&set, |n| slots[n]).unwrap();
    let explain = |caller: &str| {
        agentwall::policy::explain::ingress(
            &compiled,
            "report-api",
            &agentwall::policy::explain::Peer::Local(caller.into()),
            port,
        )
    };
    let a = explain("caller-a");
    assert!(
        a.allow
            && a.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("caller-a.yaml:4"))
    );
    assert!(!explain("caller-c").allow);
    let outside = agentwall::policy::explain::ingress(
        &compiled,
        "report-api",
        &agentwall::policy::explain::Peer::Address("127.0.0.1".parse().unwrap()),
        port,
    );
    assert!(!outside.allow);
    let evs = events.drain(Duration::from_millis(500));
    assert!(
        evs.iter().any(|e| e.hook == "ingress"
            && e.verdict == "allow"
            && e.port == port
            && e.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("caller-a.yaml:4"))),
        "the admission names the caller's agent: rule: {evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e.hook == "ingress" && e.verdict == "deny" && e.port == port),
        "{evs:#?}"
    );
}

/// The callee's replies on an accepted connection are judged by the caller's `agent:` rule as
/// it is now: when a reload takes the rule away, the callee's answers stop on the open
/// connection, even though the caller may still send to the address by another rule.
#[test]
fn a_reload_that_drops_the_agent_rule_stops_the_callees_replies_on_an_open_connection() {
    let _s = serial();
    let port = agentwall_tests::free_port();
    let mut files = policies(port);
    let both = format!(
        "policy:\n  name: caller-a\n  rules:\n    - resource: agent:report-api/prod\n    - resource: cidr:127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    );
    files[2].1.clone_from(&both);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let d = TestDaemon::start(&refs);
    let script = "import socket,sys\n\
s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2); s.settimeout(2)\n\
for _ in sys.stdin:\n    try:\n        s.sendall(b'ping'); print(s.recv(100).decode(), flush=True)\n    except OSError as e:\n        print(type(e).__name__, flush=True)\n";
    let (mut server, _out) = serve(&d, "report-api", port);
    let mut caller = python_under(&d, "caller-a", script, &[port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut input = caller.stdin.take().unwrap();
    let mut replies = BufReader::new(caller.stdout.take().unwrap());
    let mut ask = || {
        input.write_all(b"go\n").unwrap();
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(), "ping");
    assert_eq!(ask(), "ping");

    d.write_policy(
        "caller-a.yaml",
        &format!(
            "policy:\n  name: caller-a\n  rules:\n    - resource: cidr:127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
        ),
    );
    assert!(d.cli(&["reload"]).status.success());
    assert_eq!(ask(), "TimeoutError", "the callee's answer is dropped");

    // Given back, the same connection answers again (the retransmitted echo, then this one).
    d.write_policy("caller-a.yaml", &both);
    assert!(d.cli(&["reload"]).status.success());
    let again = ask();
    assert!(again.starts_with("ping"), "{again:?}");
    let _ = caller.kill();
    let _ = caller.wait();
    let _ = server.kill();
    let _ = server.wait();
}

/// A caller's record vouches for its own SYN only: a process outside every enforced cgroup
/// (whose SYNs are not recorded) that reuses the addresses and ports of a caller's connect
/// that went unanswered, while the caller lives on, is not admitted as that caller.
#[test]
fn a_process_reusing_a_callers_unanswered_connect_is_not_admitted_as_it() {
    let _s = serial();
    let port = agentwall_tests::free_port();
    let source = agentwall_tests::free_port();
    let files = policies(port);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let d = TestDaemon::start(&refs);
    // The caller connects from a fixed port while nothing listens: refused, its SYN recorded.
    // It lives on (its binding with it).
    let script = "import socket,sys,time\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[2])))\n\
try:\n    s.connect(('127.0.0.1', int(sys.argv[1]))); print('connected', flush=True)\nexcept OSError as e:\n    print(type(e).__name__, flush=True)\n\
s.close(); time.sleep(20)\n";
    let mut caller = python_under(
        &d,
        "caller-a",
        script,
        &[port.to_string(), source.to_string()],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut said = String::new();
    BufReader::new(caller.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(said.trim(), "ConnectionRefusedError");
    let (server, _out) = serve(&d, "report-api", port);
    // At once, from the same address and port, outside any enforced cgroup.
    let reuse = {
        let script = "import socket,sys\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[2]))); s.settimeout(2)\n\
try:\n    s.connect(('127.0.0.1', int(sys.argv[1]))); s.sendall(b'ping'); print(s.recv(100).decode(), flush=True)\nexcept OSError as e:\n    print(type(e).__name__, flush=True)\n";
        let out = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(port.to_string())
            .arg(source.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(reuse, "TimeoutError", "not admitted as the caller");
    // The caller itself still is.
    assert_eq!(call_as(&d, "caller-a", port), "ping");
    for mut child in [server, caller] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
