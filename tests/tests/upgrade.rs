//! Upgrades: a new daemon binary takes over the pins the previous release's daemon left, with
//! no moment in which an enforced cgroup is open, and refuses pins it cannot read with an
//! error that says what to do, while the pinned programs go on enforcing.

use std::{fs, thread, time::Duration};

use agentwall_tests::{TcpSink, TestDaemon, previous_release_bin, serial, tcp_policy};

/// The eperm count of a netprobe `watch` line (`ok=N eperm=N other=N`).
fn eperm_of(watched: &str) -> u64 {
    watched
        .split_whitespace()
        .find_map(|f| f.strip_prefix("eperm="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a watch line: {watched}"))
}

/// The package manager's upgrade, as systemd does it: the previous release's daemon runs and
/// enforces; it is stopped (SIGTERM, which leaves the kernel enforcing) and the new binary
/// starts on the same pins, state and configuration. An agent connects to a denied port in a
/// loop the whole time and keeps an allowed connection streaming: not one denied connect gets
/// through, the stream never stops, and the new daemon's programs replace the old ones.
#[test]
fn an_upgrade_from_the_previous_release_takes_over_without_a_gap() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let (a, x) = (allowed.port(), denied.port());
    let mut d = TestDaemon::prepare(&[("p.yaml", &tcp_policy("web", &[a]))], None);
    let old = d.run_command_of(&previous_release_bin());
    d.launch_command(old);
    d.wait_healthy();
    // The previous release pins its maps without a layout marker (layout 1).
    assert!(d.pin_dir.join("maps/AW_BINDINGS").exists());
    assert!(
        !d.pin_dir.join("layout-v2").exists(),
        "the previous release knows no layout marker"
    );
    let mut repl = d.repl("web");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.cmd(&format!("stream 127.0.0.1:{a}")), "ok");
    allowed.wait_flowing();
    let links_before = d.root_links();

    let watcher = thread::spawn(move || {
        let r = repl.cmd(&format!("watch 127.0.0.1:{x} 4000"));
        (repl, r)
    });
    thread::sleep(Duration::from_millis(300));
    let st = d.stop();
    assert!(st.success(), "the previous release stopped with {st}");
    d.launch();
    d.wait_healthy();
    let (mut repl, watched) = watcher.join().expect("the watching thread");
    assert!(
        watched.starts_with("ok=0 "),
        "a denied connect got through during the upgrade: {watched}"
    );
    assert!(
        eperm_of(&watched) > 100,
        "the agent must have been connecting throughout: {watched}"
    );
    assert_eq!(denied.accepted(), 0);
    // The long-lived allowed connection is still streaming.
    assert_eq!(repl.cmd("stream-end 500"), "running");
    allowed.wait_flowing();

    // The new daemon's programs in place of the old ones, the pins marked as its layout.
    let links_after = d.root_links();
    assert_eq!(links_after.len(), links_before.len(), "{links_after:?}");
    assert!(
        links_after.iter().all(|l| !links_before.contains(l)),
        "the old links must be replaced: {links_before:?} {links_after:?}"
    );
    assert!(d.pin_dir.join("layout-v2").is_dir());
    assert!(
        d.log_text()
            .contains("took over the pins of an earlier agentwall"),
        "{}",
        d.log_text()
    );
    // The agent the old daemon started is the new one's, with its policy.
    let cgroup = repl.cmd("cgroup");
    d.assert_under_policy(&cgroup, "web");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{a}")), "ok");
    assert_eq!(repl.quit(), Some(0));
}

/// Pins of a newer layout (a downgrade, or a newer daemon that ran on this host) are refused:
/// this daemon cannot know what their maps mean. It says which layout it found and what to do,
/// starts nothing, and the pinned programs go on enforcing.
#[test]
fn pins_of_a_newer_layout_are_refused_and_keep_enforcing() {
    let _s = serial();
    let allowed = TcpSink::new("127.0.0.1:0");
    let denied = TcpSink::new("127.0.0.1:0");
    let (a, x) = (allowed.port(), denied.port());
    let mut d = TestDaemon::start(&[("p.yaml", &tcp_policy("web", &[a]))]);
    let mut repl = d.repl("web");
    assert!(d.pin_dir.join("layout-v2").is_dir());
    let st = d.stop();
    assert!(st.success(), "{st}");
    // What a newer agentwall would leave: its marker in place of this one's.
    fs::remove_dir(d.pin_dir.join("layout-v2")).expect("remove the marker");
    fs::create_dir(d.pin_dir.join("layout-v3")).expect("make a newer marker");
    let out = d.run_refused();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layout 3, left by a newer agentwall")
            && err.contains("knows layouts up to 2")
            && err.contains("agentwall teardown"),
        "{err}"
    );
    // Refused, and nothing changed in the kernel: the agent keeps exactly its policy.
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{a}")), "ok");
    assert!(d.pin_dir.join("layout-v3").is_dir());
    assert_eq!(denied.accepted(), 0);
    // Its own marker back, the daemon starts and adopts the agent.
    fs::remove_dir(d.pin_dir.join("layout-v3")).expect("remove the newer marker");
    fs::create_dir(d.pin_dir.join("layout-v2")).expect("put the marker back");
    d.launch();
    d.wait_healthy();
    assert_eq!(repl.cmd(&format!("tcp 127.0.0.1:{x}")), "err EPERM");
    assert_eq!(repl.quit(), Some(0));
}
