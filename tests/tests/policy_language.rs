//! The agent policy language in the kernel: rules that name catalog services, and their rate
//! limits, taken per identity by real connects to real listeners. Run as root, one at a time
//! (`cargo xtask test`).

use std::time::Duration;

use agentwall_tests::{TcpSink, TestDaemon, UdpSink, lines, serial};

/// A catalog with one service on loopback, at `port`.
fn catalog(name: &str, protocol: &str, port: u16) -> String {
    format!(
        "kind: Service\nservice:\n  name: {name}\n  endpoints:\n    - to: 127.0.0.1\n      protocol: {protocol}\n      ports: [{port}]\n"
    )
}

#[test]
fn the_eleventh_connect_within_a_minute_to_a_ten_per_minute_service_gets_eperm() {
    let _s = serial();
    let slack = TcpSink::new("127.0.0.1:0");
    let policy = "\
kind: Policy
policy:
  name: pipeline
  rules:
    - resource: service:slack
      actions: [write:message]
      conditions: { channels: [\"#alerts\"] }
      rateLimit: 10 per minute
";
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("slack", "tcp", slack.port())),
        ("pipeline.yaml", policy),
    ]);
    let events = d.events();
    let to = format!("tcp 127.0.0.1:{}", slack.port());
    let out = d.exec("pipeline", None, &[to.as_str(); 11]);
    assert!(out.status.success(), "{out:?}");
    let got = lines(&out);
    assert_eq!(got[..10], ["ok"; 10], "the first ten: {got:?}");
    assert_eq!(got[10], "err EPERM", "the eleventh: {got:?}");
    agentwall_tests::wait_for(
        Duration::from_secs(5),
        "the listener to accept the ten",
        || (slack.accepted() == 10).then_some(()),
    );
    // The bucket is the identity's, not the process's: another process of the same policy
    // finds it empty too.
    let again = d.exec("pipeline", None, &[&to]);
    assert_eq!(lines(&again), ["err EPERM"]);
    assert_eq!(
        slack.accepted(),
        10,
        "nothing past the limit reached the listener"
    );
    // Each refusal names the rule, which leads to its line.
    let evs = events.drain(Duration::from_millis(500));
    let refused: Vec<_> = evs
        .iter()
        .filter(|e| e.hook == "connect4" && e.verdict == "deny")
        .collect();
    assert_eq!(refused.len(), 2, "{evs:#?}");
    for e in &refused {
        assert_eq!(e.reason, "rate_limited");
        assert!(
            e.rule
                .as_deref()
                .is_some_and(|r| r.ends_with("pipeline.yaml:5")),
            "{e:?}"
        );
    }
    assert_eq!(d.counter("rate_limited"), 2);
    assert_eq!(d.counter("rate_errors"), 0);

    // A reload that keeps the rule keeps its bucket (and its rule id may change).
    d.write_policy(
        "pipeline.yaml",
        &format!("{policy}    - resource: cidr:127.0.0.2\n      protocol: tcp\n      ports: [9]\n"),
    );
    assert!(d.cli(&["reload"]).status.success());
    let after = d.exec("pipeline", None, &[&to]);
    assert_eq!(lines(&after), ["err EPERM"], "a reload does not refill");
    // One that changes the rate starts a new bucket.
    d.write_policy(
        "pipeline.yaml",
        &policy.replace("10 per minute", "2 per hour"),
    );
    assert!(d.cli(&["reload"]).status.success());
    let fresh = d.exec("pipeline", None, &[&to, &to, &to]);
    assert_eq!(lines(&fresh), ["ok", "ok", "err EPERM"]);
}

#[test]
fn a_rate_limited_rule_in_audit_mode_lets_the_excess_through_and_reports_it() {
    let _s = serial();
    let db = TcpSink::new("127.0.0.1:0");
    let dns = UdpSink::new("127.0.0.1:0");
    let policy = format!(
        "\
policy:
  name: pipeline
  rules:
    - resource: service:analytics-db
      rateLimit: 2 per hour
      mode: audit
    - resource: cidr:127.0.0.1
      protocol: udp
      ports: [{}]
      rateLimit: 1 per hour
",
        dns.port()
    );
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("analytics-db", "tcp", db.port())),
        ("pipeline.yaml", &policy),
    ]);
    let events = d.events();
    let tcp = format!("tcp 127.0.0.1:{}", db.port());
    let udp = format!("udp-sendto 127.0.0.1:{} x", dns.port());
    let out = d.exec("pipeline", None, &[&tcp, &tcp, &tcp, &udp, &udp]);
    // Audit mode passes the third connect; the enforced UDP limit refuses the second send.
    assert_eq!(lines(&out), ["ok", "ok", "ok", "ok", "err EPERM"]);
    agentwall_tests::wait_for(
        Duration::from_secs(5),
        "three connects and one datagram",
        || (db.accepted() == 3 && dns.datagrams() == 1).then_some(()),
    );
    let evs = events.drain(Duration::from_millis(500));
    let audited: Vec<_> = evs.iter().filter(|e| e.reason == "rate_audit").collect();
    assert_eq!(audited.len(), 1, "{evs:#?}");
    assert_eq!(audited[0].verdict, "allow");
    assert_eq!(audited[0].port, db.port());
    assert!(d.counter("audit_passed") >= 1);
    assert!(
        evs.iter()
            .any(|e| e.reason == "rate_limited" && e.port == dns.port() && e.protocol == "udp"),
        "{evs:#?}"
    );
}

/// Threads on every CPU connect at once to one rate-limited service: exactly the limit gets
/// through. (The window in which two CPUs could both take the last token is too short for
/// connects to hit it reliably; `Limit::take`'s unit test plays that interleaving.)
#[test]
fn racing_threads_on_every_cpu_get_no_more_than_the_limit() {
    let _s = serial();
    let sink = TcpSink::new("127.0.0.1:0");
    let policy = "\
policy:
  name: racer
  rules:
    - resource: service:api
      rateLimit: 200 per hour
";
    let d = TestDaemon::start(&[
        ("catalog.yaml", &catalog("api", "tcp", sink.port())),
        ("racer.yaml", policy),
    ]);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    let race = format!("tcp-race 127.0.0.1:{} {threads} 200", sink.port());
    let out = d.exec("racer", None, &[&race]);
    let got = lines(&out);
    let total = threads * 200;
    assert_eq!(
        got,
        [format!("ok=200 eperm={} other=0", total - 200)],
        "{out:?}"
    );
    assert_eq!(d.counter("rate_errors"), 0, "no bucket stayed contended");
}
