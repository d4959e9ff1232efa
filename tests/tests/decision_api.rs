//! The decision API with real agents: B serves over mTLS and asks the daemon about each
//! caller before serving; A is allowed, then refused for an attribute; C is refused for the
//! action; D cannot even connect. Every answer is in the audit log. Run as root, one at a time
//! (`cargo xtask test`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use agentwall_tests::{TestDaemon, free_port, lines, post, serial};

fn python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3");
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// The example agent, copied where any user can read it.
fn example(d: &TestDaemon) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/decision_agent.py");
    let dst = d.dir.join("decision_agent.py");
    fs::copy(&src, &dst).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
    dst
}

/// `agentwall exec --cert C --key K -- python3 decision_agent.py ARGS...`
fn agent(d: &TestDaemon, cert: &str, key: &str, args: &[&str]) -> Command {
    let mut c = Command::new(d.world_copy(&agentwall_tests::agentwall_bin()));
    c.arg("exec")
        .arg("--socket")
        .arg(&d.socket)
        .args(["--cert", cert, "--key", key, "--"])
        .arg(python())
        .arg(example(d))
        .args(args);
    c
}

fn json(o: &Output) -> Vec<serde_json::Value> {
    lines(o)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {o:?}")))
        .collect()
}

fn audit_records(d: &TestDaemon) -> Vec<serde_json::Value> {
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let out = d.cli(&["audit", "tail", &dir, "--key", &key, "-n", "10000"]);
    assert!(out.status.success(), "{out:?}");
    lines(&out)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect()
}

#[test]
fn agent_b_asks_the_decision_api_about_each_caller_over_mtls() {
    let _s = serial();
    let port = free_port();
    let catalog = format!(
        "service:\n  name: report-api\n  endpoints:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{port}]\n"
    );
    // B answers its callers on the connections they opened; until ingress rules exist, its
    // policy grants the replies as egress to loopback.
    let b = "policy:\n  name: report-api\n  identity: agent/report-api/prod\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n";
    let a = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: service:report-api\n      actions: [read]\n      conditions: { table: [events, sessions] }\n";
    let c = "policy:\n  name: writer\n  identity: agent/writer/prod\n  rules:\n    - resource: service:report-api\n      actions: [write]\n";
    let outsider = "policy:\n  name: outsider\n  identity: agent/outsider/prod\n";
    let mut d = TestDaemon::start(&[
        ("catalog.yaml", &catalog),
        ("b.yaml", b),
        ("a.yaml", a),
        ("c.yaml", c),
        ("outsider.yaml", outsider),
    ]);
    let (bc, bk) = d.issue("agent/report-api/prod", "10m");
    let decision = d.decision_socket.display().to_string();
    let mut server = agent(
        &d,
        &bc,
        &bk,
        &[
            "serve",
            "--port",
            &port.to_string(),
            "--resource",
            "service:report-api",
            "--count",
            "3",
            "--decision-socket",
            &decision,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "B: {first:?}");

    let expect_b = "spiffe://agentwall.local/agent/report-api/prod";
    let to = format!("127.0.0.1:{port}");
    let call = |id: &str, action: &str, attrs: &[&str]| {
        let (cert, key) = d.issue(id, "10m");
        let mut args = vec![
            "call", "--to", &to, "--expect", expect_b, "--action", action,
        ];
        for a in attrs {
            args.extend(["--attr", a]);
        }
        let o = agent(&d, &cert, &key, &args).output().unwrap();
        assert!(o.status.success(), "{o:?}");
        json(&o).remove(0)
    };
    let allowed = call("agent/reader/prod", "read", &["table=events"]);
    assert_eq!(allowed, serde_json::json!({"ok": true, "served": "read"}));
    let wrong_table = call("agent/reader/prod", "read", &["table=users"]);
    assert_eq!(wrong_table["ok"], false);
    assert_eq!(
        wrong_table["refused"],
        "table \"users\" is not one of \"events\", \"sessions\""
    );
    let wrong_action = call("agent/writer/prod", "read", &[]);
    assert_eq!(
        wrong_action["refused"],
        "the rule grants write on service:report-api, not \"read\""
    );
    // The outsider's policy does not reach B: the kernel refuses the connect.
    let outsider = call("agent/outsider/prod", "read", &["table=events"]);
    assert_eq!(outsider, serde_json::json!({"ok": false, "error": "EPERM"}));

    let served = server.wait_with_output().unwrap();
    let mut b_lines: Vec<serde_json::Value> = Vec::new();
    for l in out.lines() {
        b_lines.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    assert!(served.status.success(), "{served:?} {b_lines:?}");
    let seen: Vec<(String, bool)> = b_lines
        .iter()
        .map(|l| {
            (
                l["caller"].as_str().unwrap_or_default().to_string(),
                l["allow"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "spiffe://agentwall.local/agent/reader/prod".to_string(),
                true
            ),
            (
                "spiffe://agentwall.local/agent/reader/prod".to_string(),
                false
            ),
            (
                "spiffe://agentwall.local/agent/writer/prod".to_string(),
                false
            ),
        ]
    );
    let names_rule = |v: &serde_json::Value| v.as_str().is_some_and(|r| r.ends_with("/a.yaml:5"));
    assert!(
        names_rule(&b_lines[0]["rule"]),
        "the answer names the rule: {b_lines:?}"
    );

    d.stop_cleanly();
    let records = audit_records(&d);
    let decisions: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["kind"] == "decision").collect();
    assert_eq!(decisions.len(), 3, "{decisions:#?}");
    assert_eq!(decisions[0]["allow"], true);
    assert_eq!(decisions[0]["policy"], "reader");
    assert_eq!(decisions[0]["resource"], "service:report-api");
    assert_eq!(decisions[0]["action"], "read");
    assert_eq!(decisions[0]["attributes"]["table"], "events");
    assert!(names_rule(&decisions[0]["rule"]), "{decisions:#?}");
    assert!(
        decisions[0]["asker"].as_str().unwrap().starts_with("pid "),
        "{decisions:#?}"
    );
    assert_eq!(decisions[1]["allow"], false);
    assert_eq!(decisions[2]["allow"], false);
    assert_eq!(
        decisions[2]["caller"],
        "spiffe://agentwall.local/agent/writer/prod"
    );
    // The kernel's refusal of the outsider is in the log too.
    assert!(
        records.iter().any(|r| r["kind"] == "verdict"
            && r["verdict"] == "deny"
            && r["port"] == port
            && r["spiffe_id"] == "spiffe://agentwall.local/agent/outsider/prod"),
        "no verdict for the outsider"
    );
}

fn decide(
    d: &TestDaemon,
    caller: serde_json::Value,
    action: &str,
    attrs: serde_json::Value,
) -> serde_json::Value {
    let body = serde_json::json!({
        "caller": caller,
        "resource": "service:report-api",
        "action": action,
        "attributes": attrs,
    });
    let (status, answer) = post(&d.decision_socket, "POST", "/v1/decide", &body.to_string());
    assert_eq!(status, 200, "{answer}");
    answer
}

const CATALOG: &str = "service:\n  name: report-api\n  endpoints:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [9]\n";

/// A caller named by its process on this host gets its cgroup's identity; a certificate is
/// checked, revocation included, and so is a bare SPIFFE ID; rate limits count per caller.
#[test]
fn callers_by_process_certificate_and_id_and_their_rate_limits() {
    let _s = serial();
    let reader = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: service:report-api\n      actions: [read]\n      rateLimit: 3 per hour\n";
    let local = "policy:\n  name: local\n  rules:\n    - resource: service:report-api\n      actions: [\"*\"]\n";
    let d = TestDaemon::start(&[
        ("catalog.yaml", CATALOG),
        ("reader.yaml", reader),
        ("local.yaml", local),
    ]);
    let (cert, key) = d.issue("agent/reader/prod", "10m");
    // An enrolled agent, asked about by its pid.
    let mut agent = d.repl_under(&["--cert", &cert, "--key", &key]);
    let pid: i32 = agent.cmd("pid").parse().unwrap();
    let a = decide(
        &d,
        serde_json::json!({"pid": pid}),
        "read",
        serde_json::json!({}),
    );
    assert_eq!(a["allow"], true, "{a}");
    assert_eq!(a["caller"], "spiffe://agentwall.local/agent/reader/prod");
    assert_eq!(a["policy"], "reader");
    // By its certificate: the same caller, the same bucket (3 per hour) for this asker.
    let pem = fs::read_to_string(&cert).unwrap();
    let by_cert = serde_json::json!({"certificate": pem});
    for _ in 0..2 {
        let a = decide(&d, by_cert.clone(), "read", serde_json::json!({}));
        assert_eq!(a["allow"], true, "{a}");
    }
    let fourth = decide(&d, by_cert.clone(), "read", serde_json::json!({}));
    assert_eq!(fourth["allow"], false);
    assert_eq!(fourth["reason"], "over the rule's rate limit (3 per hour)");
    // Another asker (the agent itself, in its own cgroup) has buckets of its own: it cannot
    // spend this asker's budget for the caller, nor this one its.
    let query = serde_json::json!({"caller": {"pid": pid}, "resource": "service:report-api", "action": "read"});
    let asked = agent.cmd(&format!("decide {} {query}", d.decision_socket.display()));
    assert!(
        asked.contains("\"allow\":true"),
        "the agent's own bucket: {asked}"
    );
    // A bare SPIFFE ID is not taken on the socket: anyone could name anyone.
    let by_id = serde_json::json!({"caller": {"spiffe_id": "spiffe://agentwall.local/agent/reader/prod"}, "resource": "service:report-api", "action": "read"});
    let (status, refused) = post(&d.decision_socket, "POST", "/v1/decide", &by_id.to_string());
    assert_eq!(status, 400);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("a bare `spiffe_id` is taken only from an mTLS client"),
        "{refused}"
    );
    // A process of an exec cgroup without identity is judged by its policy.
    let mut plain = d.repl("local");
    let ppid: i32 = plain.cmd("pid").parse().unwrap();
    let a = decide(
        &d,
        serde_json::json!({"pid": ppid}),
        "delete",
        serde_json::json!({}),
    );
    assert_eq!(
        (a["allow"].clone(), a["policy"].clone()),
        (true.into(), "local".into()),
        "{a}"
    );
    assert_eq!(a["caller"], serde_json::Value::Null);
    // A process outside agentwall's cgroups is nobody.
    let own = decide(
        &d,
        serde_json::json!({"pid": std::process::id()}),
        "read",
        serde_json::json!({}),
    );
    assert_eq!(own["allow"], false);
    assert!(
        own["reason"]
            .as_str()
            .unwrap()
            .contains("which agentwall does not manage"),
        "{own}"
    );

    // Validity: the certificate now, then revoked.
    let (status, v) = post(
        &d.decision_socket,
        "POST",
        "/v1/validate",
        &serde_json::json!({"certificate": pem}).to_string(),
    );
    assert_eq!((status, v["valid"].clone()), (200, true.into()), "{v}");
    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "test",
    ]);
    assert!(r.status.success(), "{r:?}");
    let (_, v) = post(
        &d.decision_socket,
        "POST",
        "/v1/validate",
        &serde_json::json!({"certificate": pem}).to_string(),
    );
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    let a = decide(
        &d,
        serde_json::json!({"certificate": pem}),
        "read",
        serde_json::json!({}),
    );
    assert_eq!(a["allow"], false);
    assert!(a["reason"].as_str().unwrap().contains("revoked"), "{a}");
    let a = decide(
        &d,
        serde_json::json!({"pid": pid}),
        "read",
        serde_json::json!({}),
    );
    assert!(a["reason"].as_str().unwrap().contains("revoked"), "{a}");
    let _ = agent.quit();
    let _ = plain.quit();
}

/// Every bad request gets a status and a message that says what to fix; none stops the
/// server.
#[test]
fn bad_requests_are_refused_with_what_to_fix() {
    let _s = serial();
    let d = TestDaemon::start(&[("catalog.yaml", CATALOG)]);
    let s = &d.decision_socket;
    let cases: [(&str, &str, String, u16, &str); 8] = [
        ("GET", "/v1/decide", String::new(), 405, "use POST"),
        ("POST", "/v2/x", "{}".into(), 404, "use POST /v1/decide"),
        (
            "POST",
            "/v1/decide",
            "{not json".into(),
            400,
            "the request:",
        ),
        (
            "POST",
            "/v1/decide",
            r#"{"caller":{"pid":1},"resource":"r","action":"a","extra":1}"#.into(),
            400,
            "unknown field `extra`",
        ),
        (
            "POST",
            "/v1/decide",
            r#"{"caller":{},"resource":"r","action":"a"}"#.into(),
            400,
            "name the caller one way",
        ),
        // Who may read which secret is no asker's business: an agent fetches its own.
        (
            "POST",
            "/v1/decide",
            r#"{"caller":{"pid":1},"resource":"secret:agent/reader/db","action":"read"}"#.into(),
            400,
            "an agent fetches its own secrets with POST /v1/secrets/fetch",
        ),
        (
            "POST",
            "/v1/validate",
            r#"{"jwt":"x"}"#.into(),
            400,
            "give `certificate`",
        ),
        (
            "POST",
            "/v1/decide",
            format!(
                r#"{{"caller":{{"pid":1}},"resource":"{}","action":"a"}}"#,
                "x".repeat(70_000)
            ),
            413,
            "over 65536 bytes",
        ),
    ];
    for (method, path, body, status, says) in cases {
        let (got, answer) = post(s, method, path, &body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "{method} {path}: {answer}"
        );
    }
    // Still serving.
    let a = decide(
        &d,
        serde_json::json!({"jwt": "not.a.token", "audience": "b"}),
        "read",
        serde_json::json!({}),
    );
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .starts_with("the caller's token is not valid"),
        "{a}"
    );
    // Oversized queries.
    let many: serde_json::Map<String, serde_json::Value> =
        (0..33).map(|i| (format!("a{i}"), "v".into())).collect();
    let body = serde_json::json!({"caller": {"pid": 1}, "resource": "r", "action": "a", "attributes": many});
    let (status, answer) = post(s, "POST", "/v1/decide", &body.to_string());
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("more than 32 attributes"))
    );
}

/// On TCP, the decision API speaks mutual TLS: a client with a valid SVID gets answers; one
/// without a certificate, or with a revoked one, gets no connection.
#[test]
fn the_tcp_listener_requires_a_valid_client_svid() {
    let _s = serial();
    let port = free_port();
    let mut d = TestDaemon::start_with_config(
        &[("catalog.yaml", CATALOG)],
        Some(&format!("decision:\n  listen: 127.0.0.1:{port}\n")),
    );
    let (cert, key) = d.issue("agent/gateway/prod", "10m");
    let bundle = Path::new(&cert).with_file_name("bundle.pem");
    let script = r#"
import http.client, json, ssl, sys
port, cert, key, bundle = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile=bundle)
ctx.check_hostname = False
if cert != "-":
    ctx.load_cert_chain(cert, key)
try:
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    c.request("POST", "/v1/decide", json.dumps({"caller": {"spiffe_id": "spiffe://agentwall.local/agent/x/y"}, "resource": "service:report-api", "action": "read"}))
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except (OSError, ssl.SSLError, http.client.HTTPException) as e:
    print(json.dumps({"error": type(e).__name__}))
"#;
    let run = |cert: &str, key: &str| {
        let o = Command::new(python())
            .args(["-c", script, &port.to_string(), cert, key])
            .arg(&bundle)
            .output()
            .unwrap();
        json(&o).remove(0)
    };
    let ok = run(&cert, &key);
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(
        ok["body"]["reason"],
        "no policy governs spiffe://agentwall.local/agent/x/y"
    );
    let anonymous = run("-", "-");
    assert!(
        anonymous.get("error").is_some(),
        "no client certificate: {anonymous}"
    );
    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/gateway/prod",
        "--reason",
        "test",
    ]);
    assert!(r.status.success());
    let revoked = run(&cert, &key);
    assert!(
        revoked.get("error").is_some(),
        "a revoked client: {revoked}"
    );
    // The answer given is audited with the gateway as the asker.
    d.stop_cleanly();
    let asked: Vec<serde_json::Value> = audit_records(&d)
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    assert_eq!(asked.len(), 1, "{asked:#?}");
    assert_eq!(
        asked[0]["asker"],
        "spiffe://agentwall.local/agent/gateway/prod"
    );
    assert_eq!(
        asked[0]["caller_given"],
        "spiffe_id spiffe://agentwall.local/agent/x/y"
    );
}

/// An asker that floods the decision API cannot flood the audit log: past its budget of
/// records its decisions are counted into its next record, and every decision is accounted
/// for.
#[test]
fn a_flood_of_decisions_is_counted_not_recorded_one_by_one() {
    let _s = serial();
    let mut d = TestDaemon::start(&[("catalog.yaml", CATALOG)]);
    let body = serde_json::json!({
        "caller": {"pid": 1},
        "resource": "service:report-api",
        "action": "read",
        "attributes": {"note": "x".repeat(1000)},
    })
    .to_string();
    let n = 600;
    for _ in 0..n {
        let (status, _) = post(&d.decision_socket, "POST", "/v1/decide", &body);
        assert_eq!(status, 200);
    }
    // One more once a token is back: it carries the count of those held back.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (status, _) = post(&d.decision_socket, "POST", "/v1/decide", &body);
    assert_eq!(status, 200);
    d.stop_cleanly();
    let decisions: Vec<serde_json::Value> = audit_records(&d)
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    let held: u64 = decisions
        .iter()
        .map(|r| r["suppressed"]["denied"].as_u64().unwrap_or(0))
        .sum();
    assert!(decisions.len() < 400, "{} records", decisions.len());
    assert_eq!(
        decisions.len() as u64 + held,
        n + 1,
        "every decision accounted for"
    );
    let note = decisions[0]["attributes"]["note"].as_str().unwrap();
    assert_eq!(
        note.len(),
        128 + '…'.len_utf8(),
        "values are kept to 128 bytes"
    );
}
