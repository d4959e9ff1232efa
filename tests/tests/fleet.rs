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
    let mut nodes: Vec<TestDaemon> = ["a", "b", "c"]
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
    // Counted once etcd confirmed the put, which may come after the others applied it.
    wait_for(
        Duration::from_secs(10),
        "a to count its publication",
        || (fleet_of(&nodes[0]).published == 1).then_some(()),
    );
    // Counted once applied in full (the kernel's flags come first, then the list is saved).
    wait_for(
        Duration::from_secs(10),
        "b to count what it applied",
        || (fleet_of(&nodes[1]).applied == 1).then_some(()),
    );
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
    // c put it there (a put etcd confirmed too late for c to count it is not counted, and
    // not put twice: c reads it back at its next connect).
    assert!(
        etcd.keys(&prefix)
            .contains(&format!("{prefix}/revocations/{WRITER}")),
        "{:?}",
        etcd.keys(&prefix)
    );
    assert!(fleet_of(&nodes[2]).published <= 1);
    // Counted once applied in full, which may come just after the kernel denies.
    wait_for(
        Duration::from_secs(10),
        "a to count what it applied",
        || (fleet_of(&nodes[0]).applied == 1).then_some(()),
    );

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
    // The nodes that hold them put the deleted revocations back, for nodes that read later.
    wait_for(
        Duration::from_secs(10),
        "the deleted keys to be put back",
        || {
            let keys = etcd.keys(&prefix);
            [READER, WRITER]
                .iter()
                .all(|t| keys.contains(&format!("{prefix}/revocations/{t}")))
                .then_some(())
        },
    );

    // Values too large for one reply of the full read (1.4 MiB each, sorted first) do not
    // keep a node from reading the rest: c, restarted, skips them and catches up.
    let mut c = nodes.pop().expect("node c");
    c.stop();
    for n in 0..4 {
        etcd.put_large(
            &format!("{prefix}/revocations/0-junk-{n}"),
            &vec![b'x'; 1400 << 10],
        );
    }
    revoke(
        &nodes[0],
        "spiffe://agentwall.local/agent/late/prod",
        "made while c was down",
    );
    c.launch();
    c.wait_healthy();
    wait_for(
        Duration::from_secs(20),
        "c to read past the large values",
        || {
            let f = fleet_of(&c);
            (f.connected && f.refused >= 4).then_some(())
        },
    );
    let list = String::from_utf8_lossy(&c.cli(&["revoke", "--list"]).stdout).into_owned();
    assert!(list.contains("made while c was down"), "{list}");
    for r in readers.into_iter().chain(writers) {
        let _ = r.quit();
    }
}

/// `agentwall fleet keygen --key PATH`: the public key it prints, written to PATH.pub.
fn keygen(d: &TestDaemon, path: &std::path::Path) -> std::path::PathBuf {
    let o = d.cli(&["fleet", "keygen", "--key", &path.display().to_string()]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let public = out
        .lines()
        .last()
        .expect("the public key")
        .trim()
        .to_string();
    assert_eq!(public.len(), 64, "{out}");
    let pub_path = path.with_extension("pub");
    std::fs::write(&pub_path, format!("{public}\n")).expect("write the public key");
    pub_path
}

/// `agentwall fleet publish` of a directory with policy `web` allowing `ports`.
fn publish(
    d: &TestDaemon,
    etcd: &TestEtcd,
    prefix: &str,
    key: &std::path::Path,
    version: u64,
    ports: &[u16],
) {
    let dir = d.dir.join(format!(
        "bundle-{version}-{}",
        key.display().to_string().len()
    ));
    std::fs::create_dir_all(&dir).expect("the bundle's directory");
    std::fs::write(
        dir.join("web.yaml"),
        agentwall_tests::tcp_policy("web", ports),
    )
    .expect("the bundle's policy");
    let o = d.cli(&[
        "fleet",
        "publish",
        "--policies",
        &dir.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--etcd",
        &etcd.url(),
        "--prefix",
        prefix,
        "--version",
        &version.to_string(),
    ]);
    assert!(o.status.success(), "{o:?}");
}

/// Policies through etcd: a directory signed with the fleet's key (`agentwall fleet publish`)
/// is put in force by every node that trusts the key, in place of its policy directory. A
/// bundle signed by another key, one whose payload was swapped under a trusted signature and
/// an older one are refused and reported, and the policy in force stays. A node restarted
/// while etcd is gone enforces the last bundle it had.
#[test]
fn signed_policy_bundles_reach_every_node_and_others_are_refused() {
    let _s = serial();
    let (first, second) = (TcpSink::new("127.0.0.1:0"), TcpSink::new("127.0.0.1:0"));
    let (p1, p2) = (first.port(), second.port());
    let prefix = format!("/awt-{}-bundles", std::process::id());
    let mut etcd =
        TestEtcd::start(std::env::temp_dir().join(format!("awt-{}-etcd", std::process::id())));
    let keys = std::env::temp_dir().join(format!("awt-{}-fleet-keys", std::process::id()));
    let _ = std::fs::remove_dir_all(&keys);
    std::fs::create_dir_all(&keys).expect("the keys' directory");
    let scratch = TestDaemon::prepare(&[], None);
    let (key, other) = (keys.join("fleet.key"), keys.join("other.key"));
    let trusted = keygen(&scratch, &key);
    keygen(&scratch, &other);
    let mut nodes: Vec<TestDaemon> = ["a", "b"]
        .iter()
        .map(|n| {
            let config = format!(
                "fleet:\n  etcd: [\"{}\"]\n  prefix: {prefix}\n  node: {n}\n  policy_keys: [\"{}\"]\n",
                etcd.url(),
                trusted.display()
            );
            // The directory grants both ports: with bundles it is not read.
            TestDaemon::start_with_config(
                &[("web.yaml", &agentwall_tests::tcp_policy("web", &[p1, p2]))],
                Some(&config),
            )
        })
        .collect();
    for d in &nodes {
        assert_eq!(fleet_of(d).policy_bundle, None);
        let o = d
            .exec_under(&["--policy", "web"], None, &["tcp 127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "no bundle yet, no policy web: {o:?}");
    }

    publish(&scratch, &etcd, &prefix, &key, 1, &[p1]);
    for d in &nodes {
        wait_for(Duration::from_secs(10), "bundle 1 on every node", || {
            (fleet_of(d).policy_bundle == Some(1)).then_some(())
        });
    }
    let mut agents: Vec<Repl> = nodes.iter().map(|d| d.repl("web")).collect();
    for a in &mut agents {
        assert_eq!(a.cmd(&format!("tcp 127.0.0.1:{p1}")), "ok");
        assert_eq!(a.cmd(&format!("tcp 127.0.0.1:{p2}")), "err EPERM");
    }

    // Signed by a key the nodes do not trust: refused, reported, nothing changes.
    publish(&scratch, &etcd, &prefix, &other, 5, &[p1, p2]);
    let bundle_key = format!("{prefix}/policies/bundle");
    let untrusted = etcd.ctl(&["get", &bundle_key, "--print-value-only"]);
    wait_for(
        Duration::from_secs(10),
        "the untrusted bundle to be refused",
        || (fleet_of(&nodes[1]).bundles_refused == 1).then_some(()),
    );
    let b = fleet_of(&nodes[1]);
    assert!(
        b.bundle_error
            .as_deref()
            .is_some_and(|e| e.contains("does not trust")),
        "{b:?}"
    );
    assert_eq!(b.policy_bundle, Some(1));
    assert_eq!(agents[1].cmd(&format!("tcp 127.0.0.1:{p2}")), "err EPERM");

    // The trusted key's name and signature over the untrusted payload: refused.
    publish(&scratch, &etcd, &prefix, &key, 3, &[p1, p2]);
    for d in &nodes {
        wait_for(Duration::from_secs(10), "bundle 3 on every node", || {
            (fleet_of(d).policy_bundle == Some(3)).then_some(())
        });
    }
    assert_eq!(agents[0].cmd(&format!("tcp 127.0.0.1:{p2}")), "ok");
    let good = etcd.ctl(&["get", &bundle_key, "--print-value-only"]);
    let mut forged: serde_json::Value =
        serde_json::from_slice(&good.stdout).expect("the trusted bundle");
    let untrusted: serde_json::Value =
        serde_json::from_slice(&untrusted.stdout).expect("the untrusted bundle");
    forged["payload"] = untrusted["payload"].clone();
    etcd.put(&bundle_key, &forged.to_string());
    wait_for(
        Duration::from_secs(10),
        "the forged bundle to be refused",
        || (fleet_of(&nodes[1]).bundles_refused == 2).then_some(()),
    );
    assert!(
        fleet_of(&nodes[1])
            .bundle_error
            .is_some_and(|e| e.contains("signature does not verify")),
    );
    // An older bundle, properly signed: a rollback, refused.
    publish(&scratch, &etcd, &prefix, &key, 2, &[p1]);
    wait_for(
        Duration::from_secs(10),
        "the rollback to be refused",
        || (fleet_of(&nodes[1]).bundles_refused == 3).then_some(()),
    );
    assert!(
        fleet_of(&nodes[1])
            .bundle_error
            .is_some_and(|e| e.contains("rollback")),
    );
    assert_eq!(agents[1].cmd(&format!("tcp 127.0.0.1:{p2}")), "ok");

    // etcd gone, b restarts: its last bundle is in force again at once.
    etcd.stop();
    nodes[1].stop();
    nodes[1].launch();
    nodes[1].wait_healthy();
    assert_eq!(fleet_of(&nodes[1]).policy_bundle, Some(3));
    assert_eq!(agents[1].cmd(&format!("tcp 127.0.0.1:{p2}")), "ok");
    let fresh = nodes[1].repl("web");
    drop(fresh);
    for a in agents {
        let _ = a.quit();
    }
    drop(scratch);
    let _ = std::fs::remove_dir_all(&keys);
}
