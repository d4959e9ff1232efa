//! Short-lived database credentials against a real PostgreSQL on loopback: an agent's lease
//! on `database/analytics-db` is a login role of its own with SELECT on the tables its policy
//! lists; it reads them, cannot write or read others, and cannot log in once its identity is
//! revoked or its lease ran out. Root, one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failed step fails the test with its message"
)]

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use agentwall_tests::{
    TestDaemon, agentwall_bin, free_port, lines,
    postgres::{ADMIN_PASSWORD, TestPostgres},
    serial, wait_for,
};

/// The audit records of `kind`.
fn records(d: &TestDaemon, kind: &str) -> Vec<serde_json::Value> {
    d.audit_records(kind)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fetches `database/analytics-db` with the example client as `svid` (a plain process):
/// the credential, as the client hands it to what uses it (a listener here), and the lease.
fn fetch_credential(
    d: &TestDaemon,
    svid: &(String, String),
    address: &str,
) -> (String, serde_json::Value) {
    let script = d.dir.join("secret_agent.py");
    if !script.exists() {
        fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/secret_agent.py"),
            &script,
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let used = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        got
    });
    let o = Command::new("python3")
        .arg(&script)
        .args(["--address", address, "database/analytics-db", "--send", &to])
        .env("AGENTWALL_SVID", &svid.0)
        .env("AGENTWALL_SVID_KEY", &svid.1)
        .env(
            "AGENTWALL_BUNDLE",
            Path::new(&svid.0).with_file_name("bundle.pem"),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let said: serde_json::Value = serde_json::from_str(lines(&o).first().unwrap()).unwrap();
    (used.join().unwrap(), said)
}

/// The role a credential logs in as (`postgresql://ROLE:PASSWORD@...`).
fn role_of(uri: &str) -> String {
    uri.split("://")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap()
        .to_owned()
}

/// A daemon and a PostgreSQL with database `analytics` (its tables made by `tables`), the
/// catalog service `analytics-db` on it, `policies` and the configuration's `extra` lines;
/// the administrator's password put in the store.
fn daemon_with_database(
    tables: &str,
    policies: &[(&str, &str)],
    extra: &str,
) -> (TestDaemon, TestPostgres) {
    let mut d = TestDaemon::prepare(&[], Some(""));
    let pg = TestPostgres::start(&d.dir);
    let o = pg.admin("postgres", "CREATE DATABASE analytics");
    assert!(o.status.success(), "{o:?}");
    let o = pg.admin("analytics", tables);
    assert!(o.status.success(), "{o:?}");
    let catalog = format!(
        "service:\n  name: analytics-db\n  endpoints:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
        pg.port
    );
    d.write_policy("catalog.yaml", &catalog);
    for (f, t) in policies {
        d.write_policy(f, t);
    }
    d.write_secrets_config(&format!(
        "  databases:\n    - service: analytics-db\n      host: 127.0.0.1\n      port: {}\n      database: analytics\n      admin_user: postgres\n      admin_password_secret: agentwall/databases/analytics-db\n{extra}",
        pg.port
    ));
    d.launch();
    d.wait_healthy();
    d.secret_put("agentwall/databases/analytics-db", ADMIN_PASSWORD);
    (d, pg)
}

#[test]
fn agents_get_short_lived_database_roles_with_their_policys_grants() {
    let _s = serial();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let reader = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: service:analytics-db\n      actions: [read]\n      conditions: { tables: [events, sessions] }\n    - resource: service:analytics-db\n      actions: [write]\n      conditions: { tables: [scratch] }\n";
    let outsider = "policy:\n  name: outsider\n  identity: agent/outsider/prod\n";
    let (mut d, pg) = daemon_with_database(
        "CREATE TABLE events (id int); CREATE TABLE sessions (id int); CREATE TABLE users (id int, secret text); CREATE TABLE scratch (id int); \
         INSERT INTO events VALUES (1), (2), (3); INSERT INTO sessions VALUES (7); INSERT INTO users VALUES (1, 'x');",
        &[("reader.yaml", reader), ("outsider.yaml", outsider)],
        &format!("      ttl: 10s\ndecision:\n  listen: {address}\n"),
    );
    let reader_svid = d.issue("agent/reader/prod", "10m");
    let outsider_svid = d.issue("agent/outsider/prod", "10m");

    // The agent, confined under its identity, gets a role of its own as a file and uses it:
    // it reads the tables its policy lists, and nothing else.
    let exec = |script: &str| {
        Command::new(d.world_copy(&agentwall_bin()))
            .arg("exec")
            .arg("--socket")
            .arg(&d.socket)
            .args([
                "--identity",
                "agent/reader/prod",
                "--secret",
                "db=database/analytics-db",
                "--",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    };
    let psql = "psql -X -q -t -A -v ON_ERROR_STOP=1 \"$(cat \"$AGENTWALL_SECRETS_DIR/db\")\"";
    let o = exec(&format!(
        "{psql} -c 'SELECT count(*) FROM events' && {psql} -c 'SELECT count(*) FROM sessions'"
    ));
    assert!(o.status.success(), "{o:?} {}", pg.log());
    assert_eq!(stdout(&o), "3\n1");
    let o = exec(&format!("{psql} -c 'SELECT * FROM users'"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("permission denied for table users"),
        "{o:?}"
    );
    let o = exec(&format!("{psql} -c 'INSERT INTO events VALUES (4)'"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("permission denied for table events"),
        "{o:?}"
    );
    // Each rule's privileges on its own tables: writes to scratch, not to what it reads.
    let o = exec(&format!("{psql} -c 'INSERT INTO scratch VALUES (1)'"));
    assert!(o.status.success(), "{o:?}");
    let o = exec(&format!("{psql} -c 'DELETE FROM events'"));
    assert!(
        stderr(&o).contains("permission denied for table events"),
        "{o:?}"
    );
    let o = exec(&format!("{psql} -c 'SELECT * FROM scratch'"));
    assert!(
        stderr(&o).contains("permission denied for table scratch"),
        "{o:?}"
    );

    // An identity whose policy names no tables of the database gets nothing.
    let script = d.dir.join("secret_agent.py");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/secret_agent.py"),
        &script,
    )
    .unwrap();
    let o = Command::new("python3")
        .arg(&script)
        .args(["--address", &address, "database/analytics-db"])
        .env("AGENTWALL_SVID", &outsider_svid.0)
        .env("AGENTWALL_SVID_KEY", &outsider_svid.1)
        .env(
            "AGENTWALL_BUNDLE",
            Path::new(&outsider_svid.0).with_file_name("bundle.pem"),
        )
        .output()
        .unwrap();
    let said: serde_json::Value = serde_json::from_str(lines(&o).first().unwrap()).unwrap();
    assert_eq!(said["status"], 403, "{said}");
    assert!(
        said["error"].as_str().unwrap().starts_with(
            "no rule of policy \"outsider\" grants read or write on tables of service:analytics-db"
        ),
        "{said}"
    );

    // A role ends with its lease: not renewed, it is dropped within a second of its end.
    let (uri, said) = fetch_credential(&d, &reader_svid, &address);
    assert_eq!(said["lease"]["ttl_seconds"], 10, "{said}");
    let role = role_of(&uri);
    assert!(role.starts_with("aw_"), "{role}");
    let o = pg.psql(&uri, "SELECT count(*) FROM events");
    assert_eq!(stdout(&o), "3", "{o:?}");
    wait_for(Duration::from_secs(20), "the role to be dropped", || {
        let o = pg.admin(
            "analytics",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
        );
        (stdout(&o) == "0").then_some(())
    });
    let o = pg.psql(&uri, "SELECT 1");
    assert!(!o.status.success(), "an expired role logs in: {o:?}");

    // A daemon that died holding a lease: the next one drops its role as it starts.
    let (uri, _) = fetch_credential(&d, &reader_svid, &address);
    let role = role_of(&uri);
    d.kill9();
    d.launch();
    d.wait_healthy();
    wait_for(
        Duration::from_secs(20),
        "the earlier daemon's role to be dropped",
        || {
            let o = pg.admin(
                "analytics",
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
            );
            (stdout(&o) == "0").then_some(())
        },
    );

    // Revoked: the role is dropped, and its open session ended, before the command returns,
    // even while that session holds a lock on the role (it altered its own password in a
    // transaction it keeps open).
    let (uri, _) = fetch_credential(&d, &reader_svid, &address);
    let role = role_of(&uri);
    let mut session = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut session_in = session.stdin.take().unwrap();
    writeln!(
        session_in,
        "BEGIN; ALTER ROLE \"{role}\" PASSWORD 'mine'; SELECT 'connected';"
    )
    .unwrap();
    wait_for(Duration::from_secs(10), "the session to connect", || {
        let o = pg.admin(
            "analytics",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND state = 'idle in transaction'"),
        );
        (stdout(&o) == "1").then_some(())
    });
    let r = d.cli(&[
        "revoke",
        "spiffe://agentwall.local/agent/reader/prod",
        "--reason",
        "test",
    ]);
    assert!(r.status.success(), "{r:?}");
    let o = pg.psql(&uri, "SELECT 1");
    assert!(!o.status.success(), "a revoked agent's role logs in: {o:?}");
    let o = pg.admin(
        "analytics",
        &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
    );
    assert_eq!(stdout(&o), "0", "the role is dropped");
    writeln!(session_in, "SELECT 'still here';").unwrap();
    drop(session_in);
    let out = session.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("still here"),
        "the revoked role's session went on: {out:?}"
    );
    d.stop_cleanly();

    let leased = records(&d, "secret_leased");
    assert!(
        leased.iter().all(|r| r["path"] == "database/analytics-db"
            && r["role"].as_str().is_some_and(|n| n.starts_with("aw_"))),
        "{leased:#?}"
    );
    let ended = records(&d, "secret_lease_ended");
    assert!(ended.iter().any(|r| r["reason"] == "expired"), "{ended:#?}");
    assert!(
        ended
            .iter()
            .any(|r| r["role"] == role.as_str()
                && r["reason"].as_str().unwrap().starts_with("revoked")),
        "{ended:#?}"
    );
    // Neither the administrator's password nor a role's is in the daemon's output or the
    // audit log.
    let password = uri
        .rsplit(':')
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .to_owned();
    let key = d.audit_key().display().to_string();
    let dir = d.audit_dir().display().to_string();
    let all_audit = d.cli(&["audit", "query", &dir, "--key", &key]);
    for (what, text) in [
        ("daemon log", d.log_text()),
        (
            "daemon output",
            fs::read_to_string(d.dir.join("stdout.jsonl")).unwrap_or_default(),
        ),
        (
            "audit log",
            String::from_utf8_lossy(&all_audit.stdout).into_owned(),
        ),
        ("postgres log", pg.log()),
    ] {
        assert!(
            !text.contains(ADMIN_PASSWORD),
            "the admin password is in the {what}"
        );
        assert!(
            !text.contains(&password),
            "a role's password is in the {what}"
        );
    }
}

/// `agentwall launch FILE`: from an agent's description to the agent running under its
/// identity, with a role for its database and its other secrets as files; `agentwall
/// identity rotate` renews them with the certificates. Every step is audited.
#[test]
fn launch_issues_identity_and_credentials_and_rotate_renews_them() {
    let _s = serial();
    let pipeline = "policy:\n  name: pipeline\n  identity: agent/data-pipeline-agent/prod\n  rules:\n    - resource: service:analytics-db\n      actions: [read]\n      conditions: { tables: [events] }\n    - resource: secret:agent/data-pipeline-agent/*\n";
    let (mut d, pg) = daemon_with_database(
        "CREATE TABLE events (id int); INSERT INTO events VALUES (1), (2);",
        &[("pipeline.yaml", pipeline)],
        "",
    );
    let api_key = format!("aw-planted-api-{}", std::process::id());
    d.secret_put("agent/data-pipeline-agent/api-key", &api_key);

    let description = d.dir.join("pipeline-agent.yaml");
    fs::write(
        &description,
        "launch:\n  agent: data-pipeline-agent/prod\n  user: nobody\n  databases: [analytics-db]\n  secrets:\n    api-key: agent/data-pipeline-agent/api-key\n  command: [sh, -c, 'psql -X -q -t -A \"$(cat \"$AGENTWALL_SECRETS_DIR/analytics-db\")\" -c \"SELECT count(*) FROM events\"; echo \"$AGENTWALL_SPIFFE_ID\"; read -r _; wc -c < \"$AGENTWALL_SECRETS_DIR/api-key\"']\n",
    )
    .unwrap();
    let mut agent = Command::new(d.world_copy(&agentwall_bin()))
        .arg("launch")
        .arg("--socket")
        .arg(&d.socket)
        .arg(&description)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(agent.stdout.take().unwrap());
    let mut line = || {
        use std::io::BufRead as _;
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_owned()
    };
    assert_eq!(line(), "2", "the launched agent reads its table");
    assert_eq!(
        line(),
        "spiffe://agentwall.local/agent/data-pipeline-agent/prod"
    );
    // While it runs, a rotation renews its certificate and both its credentials.
    let r = d.cli(&["identity", "rotate"]);
    assert!(r.status.success(), "{r:?}");
    let said = stdout(&r);
    assert!(said.ends_with("and 2 secret leases"), "{said}");
    writeln!(agent.stdin.take().unwrap()).unwrap();
    assert_eq!(line(), api_key.len().to_string());
    assert!(agent.wait().unwrap().success());
    wait_for(Duration::from_secs(10), "the agent's leases to end", || {
        let o = d.cli(&["secret", "leases", "--json"]);
        stdout(&o).is_empty().then_some(())
    });
    d.stop_cleanly();

    let launched = records(&d, "workload_launched");
    assert_eq!(launched.len(), 1, "{launched:#?}");
    let leased = records(&d, "secret_leased");
    let paths = |renewal: bool| {
        let mut p: Vec<String> = leased
            .iter()
            .filter(|r| r["renewal"] == renewal)
            .map(|r| r["path"].as_str().unwrap().to_owned())
            .collect();
        p.sort();
        p
    };
    let both = ["agent/data-pipeline-agent/api-key", "database/analytics-db"];
    assert_eq!(paths(false), both, "{leased:#?}");
    assert_eq!(paths(true), both, "{leased:#?}");
    let ended = records(&d, "secret_lease_ended");
    assert_eq!(
        ended
            .iter()
            .filter(|r| r["reason"] == "the agent's command ended")
            .count(),
        2,
        "{ended:#?}"
    );
    let o = pg.admin(
        "analytics",
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'aw\\_%'",
    );
    assert_eq!(stdout(&o), "0", "the role is dropped when the agent ends");
}

/// A reload that changes what the policy grants on the database ends the leases whose grants
/// changed: their roles are dropped within seconds (they lasted until the renewal, a third of
/// the lease before its end: 20 minutes here).
#[test]
fn a_reload_that_changes_the_grants_drops_the_role() {
    let _s = serial();
    let address = format!("127.0.0.1:{}", free_port());
    let both = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: service:analytics-db\n      actions: [read]\n      conditions: { tables: [events, sessions] }\n";
    let narrowed = "policy:\n  name: reader\n  identity: agent/reader/prod\n  rules:\n    - resource: service:analytics-db\n      actions: [read]\n      conditions: { tables: [events] }\n";
    let (d, pg) = daemon_with_database(
        "CREATE TABLE events (id int); CREATE TABLE sessions (id int); INSERT INTO sessions VALUES (7);",
        &[("reader.yaml", both)],
        &format!("      ttl: 1h\ndecision:\n  listen: {address}\n"),
    );
    let svid = d.issue("agent/reader/prod", "10m");
    let (uri, _) = fetch_credential(&d, &svid, &address);
    let role = role_of(&uri);
    let o = pg.psql(&uri, "SELECT count(*) FROM sessions");
    assert_eq!(stdout(&o), "1", "{o:?}");
    d.write_policy("reader.yaml", narrowed);
    let o = d.cli(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    wait_for(Duration::from_secs(10), "the role to be dropped", || {
        let o = pg.admin(
            "analytics",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
        );
        (stdout(&o) == "0").then_some(())
    });
    let o = pg.psql(&uri, "SELECT count(*) FROM events");
    assert!(
        !o.status.success(),
        "a role the policy no longer grants logs in: {o:?}"
    );
    let ended = records(&d, "secret_lease_ended");
    assert!(
        ended.iter().any(|r| r["role"] == role.as_str()
            && r["reason"] == "no longer granted: the policy's grants on the database changed"),
        "{ended:#?}"
    );
}
