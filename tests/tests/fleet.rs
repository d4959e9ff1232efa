//! The fleet: three daemons on one machine, each with its own cgroup subtree, pins, state and
//! CA, share revocations through an etcd of the test's own (Debian's etcd-server).

#![allow(
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::time::Duration;

use agentwall_tests::{Repl, TcpSink, TestDaemon, etcd::TestEtcd, serial, wait_for};

const READER: &str = "spiffe://agentwall.local/agent/reader/prod";
const WRITER: &str = "spiffe://agentwall.local/agent/writer/prod";

fn identity_policy(name: &str, port: u16) -> String {
    format!(
        "policy:\n  name: {name}\n  identity: agent/{name}/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    )
}

/// A node of the fleet named `name`, with policies for the reader and the writer agents.
fn node(name: &str, etcd: &TestEtcd, prefix: &str, port: u16) -> TestDaemon {
    let config = format!(
        "fleet:\n  etcd: [\"{}\"]\n  prefix: {prefix}\n  node: {name}\n",
        etcd.url()
    );
    TestDaemon::start_with_config(
        &[
            ("reader.yaml", &identity_policy("reader", port)),
            ("writer.yaml", &identity_policy("writer", port)),
        ],
        Some(&config),
    )
}

/// An agent of `d` with a certificate of `agent/<who>/prod` from `d`'s CA.
fn agent(d: &TestDaemon, who: &str) -> Repl {
    let (cert, key) = d.issue(&format!("agent/{who}/prod"), "10m");
    d.repl_under(&["--cert", &cert, "--key", &key])
}

fn fleet_of(d: &TestDaemon) -> agentwall::control::FleetStatus {
    d.status().fleet.expect("status shows the fleet")
}

fn revoke(d: &TestDaemon, target: &str, reason: &str) {
    let o = d.cli(&["revoke", target, "--reason", reason]);
    assert!(o.status.success(), "{o:?}");
}

/// Waits until `agent`'s connect to `to` is denied.
fn wait_denied(agent: &mut Repl, to: &str, what: &str) {
    wait_for(Duration::from_secs(20), what, || {
        (agent.cmd(to) == "err EPERM").then_some(())
    });
}

/// A revocation made on one node is enforced on the others (their agents' next connects are
/// denied); a node cut off from etcd goes on enforcing what it has, its own revocations take
/// effect at once there, and once etcd is back every node catches up. Values no node could
/// have published are refused and counted, and deleting keys lifts nothing.
#[test]
fn a_revocation_made_on_one_node_reaches_the_others_and_a_cut_off_node_catches_up() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let to = format!("tcp 127.0.0.1:{}", sink.port());
    let prefix = format!("/awt-{}-fleet", std::process::id());
    let mut etcd =
        TestEtcd::start(std::env::temp_dir().join(format!("awt-{}-etcd", std::process::id())));
    let nodes: Vec<TestDaemon> = ["a", "b", "c"]
        .iter()
        .map(|n| node(n, &etcd, &prefix, sink.port()))
        .collect();
    for d in &nodes {
        wait_for(Duration::from_secs(10), "every node to watch etcd", || {
            fleet_of(d).connected.then_some(())
        });
    }
    let mut readers: Vec<Repl> = nodes.iter().map(|d| agent(d, "reader")).collect();
    let mut writers: Vec<Repl> = nodes.iter().map(|d| agent(d, "writer")).collect();
    for r in readers.iter_mut().chain(writers.iter_mut()) {
        assert_eq!(r.cmd(&to), "ok");
    }

    // Revoked on a: denied on b and c, the writers untouched.
    revoke(&nodes[0], READER, "key leaked on a");
    assert_eq!(readers[0].cmd(&to), "err EPERM");
    for i in [1, 2] {
        wait_denied(
            &mut readers[i],
            &to,
            "the revocation to reach the other nodes",
        );
        assert_eq!(writers[i].cmd(&to), "ok");
    }
    assert_eq!(fleet_of(&nodes[0]).published, 1);
    let b = fleet_of(&nodes[1]);
    assert_eq!((b.applied, b.published, b.refused), (1, 0, 0), "{b:?}");
    let list = nodes[1].cli(&["revoke", "--list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("key leaked on a") && list.contains("uid 0 on node a (fleet)"),
        "{list}"
    );
    assert_eq!(
        etcd.keys(&prefix),
        vec![format!("{prefix}/revocations/{READER}")]
    );

    // etcd gone: every node enforces what it has; c's own revocation holds there at once.
    etcd.stop();
    for d in &nodes {
        wait_for(
            Duration::from_secs(20),
            "the nodes to see etcd gone",
            || (!fleet_of(d).connected).then_some(()),
        );
    }
    let text = String::from_utf8_lossy(&nodes[2].cli(&["status"]).stdout).into_owned();
    assert!(text.contains("CUT OFF"), "{text}");
    revoke(&nodes[2], WRITER, "c saw it misbehave");
    assert_eq!(writers[2].cmd(&to), "err EPERM");
    assert_eq!(writers[1].cmd(&to), "ok", "b has not heard of it yet");
    assert_eq!(readers[1].cmd(&to), "err EPERM", "b keeps what it had");

    // etcd back: c publishes what it made meanwhile, and a and b catch up.
    etcd.launch();
    for i in [0, 1] {
        wait_denied(
            &mut writers[i],
            &to,
            "the nodes to catch up once etcd is back",
        );
    }
    assert_eq!(fleet_of(&nodes[2]).published, 1);
    assert_eq!(fleet_of(&nodes[0]).applied, 1);

    // A value no node published (its key names another target) is refused and counted.
    let forged = format!(
        "{{\"target\":{{\"spiffe_id\":\"{WRITER}\"}},\"reason\":\"r\",\"at\":\"t\",\"by\":\"b\",\"node\":\"x\"}}"
    );
    etcd.put(
        &format!("{prefix}/revocations/spiffe://agentwall.local/agent/other/prod"),
        &forged,
    );
    wait_for(
        Duration::from_secs(10),
        "the forged value to be refused",
        || (fleet_of(&nodes[1]).refused == 1).then_some(()),
    );
    // Deleting the keys lifts nothing: after the deletes, a later revocation arrives (etcd
    // keeps the order), and the revoked agents are still denied.
    let o = etcd.ctl(&["del", "--prefix", &prefix]);
    assert!(o.status.success(), "{o:?}");
    revoke(
        &nodes[0],
        "spiffe://agentwall.local/agent/marker/prod",
        "marker",
    );
    wait_for(Duration::from_secs(10), "the marker revocation", || {
        (fleet_of(&nodes[1]).applied == 3).then_some(())
    });
    assert_eq!(readers[1].cmd(&to), "err EPERM");
    assert_eq!(writers[1].cmd(&to), "err EPERM");
    for r in readers.into_iter().chain(writers) {
        let _ = r.quit();
    }
}
