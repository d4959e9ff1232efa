//! Secrets benchmarks: an agent's fetch of a secret over mutual TLS, against a bare mTLS
//! round trip on the same connections in the same run; the issue of a short-lived
//! PostgreSQL credential; and the time from a revocation to the first refused database login.
//!
//! The baseline of the fetch is the same keep-alive connection, the same client certificate,
//! a request of the same size to a path the server does not serve (read, parsed, answered
//! 404): what is left is the fetch itself. Run with `cargo xtask bench --only secrets`
//! (root, a release daemon, Debian's PostgreSQL); it writes its section of
//! docs/benchmarks.md.
#![expect(clippy::print_stdout, reason = "a benchmark reports to the terminal")]
#![expect(
    clippy::unwrap_used,
    reason = "a benchmark aborts on any set-up failure"
)]

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use agentwall::control::client::Client;
use agentwall_tests::{
    TestDaemon, free_port,
    postgres::{ADMIN_PASSWORD, TestPostgres},
    process_cpu, quantile,
};
use base64::Engine as _;

fn arg(name: &str) -> Option<String> {
    let key = format!("--{name}=");
    std::env::args().find_map(|a| a.strip_prefix(&key).map(str::to_string))
}

/// Identities that fetch, each on a keep-alive connection of its own. Leases last a day, so
/// that none ends during the run (an ending lease is a record too): each identity must stay
/// under its 1,024 leases, which the request counts below keep it well under.
const FETCHERS: usize = 32;
/// Requests of the one-at-a-time rows, per block; blocks of the baseline and of fetches
/// take turns, so that a drift of the host is shared.
const BLOCK: usize = 2_000;
const BLOCKS: usize = 4;
/// Their pace: each identity asks 25 times a second, under its budget of 100.
const ONE_AT_A_TIME_RATE: u32 = 800;
/// The rows with clients at once: threads, each with its share of the connections, each
/// sending this many requests at this pace (each identity 50 a second).
const CLIENTS: usize = 4;
const PER_CLIENT: usize = 2_000;
const CLIENT_RATE: u32 = 400;
/// Credentials issued for the latency row, at 20 a second.
const CREDENTIALS: usize = 40;
/// Revocations, each of an identity of its own holding a credential.
const REVOCATIONS: usize = 10;

type Conn = agentwall_tests::http::Mtls;

/// A keep-alive mTLS connection to the decision API at `address` as the agent of `svid`.
fn connect(address: &str, svid: &(String, String)) -> Conn {
    agentwall_tests::http::mtls(address, svid).unwrap()
}

/// `n` requests over `conns` in turn, at `rate` a second: each one's round trip (µs).
fn paced(conns: &mut [Conn], path: &str, body: &str, want: u16, n: usize, rate: u32) -> Vec<f64> {
    let pace = Duration::from_secs(1) / rate;
    let mut v = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let due = start + pace * u32::try_from(i).unwrap();
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let c = &mut conns[i % conns.len()];
        let t = Instant::now();
        let (status, answer) = c.post(path, body);
        v.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(status, want, "{path}: {}", String::from_utf8_lossy(&answer));
    }
    v
}

/// The value of a fetch's answer.
fn value_of(answer: &[u8]) -> String {
    let a: serde_json::Value = serde_json::from_slice(answer).unwrap();
    let b = base64::engine::general_purpose::STANDARD
        .decode(a["value"].as_str().unwrap())
        .unwrap();
    String::from_utf8(b).unwrap()
}

/// Logs in with the credential `uri` and reads; the error if refused.
fn login(rt: &tokio::runtime::Runtime, uri: &str) -> Result<(), tokio_postgres::Error> {
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
        let running = tokio::spawn(connection);
        let read = client.simple_query("SELECT count(*) FROM events").await;
        drop(client);
        let _ = running.await;
        read.map(drop)
    })
}

fn main() {
    let report = arg("report").map(PathBuf::from);
    let address = format!("127.0.0.1:{}", free_port());
    let mut d = TestDaemon::prepare(&[], Some(""));
    let pg = TestPostgres::start(&d.dir);
    for (db, sql) in [
        ("postgres", "CREATE DATABASE analytics"),
        (
            "analytics",
            "CREATE TABLE events (id int); CREATE TABLE sessions (id int); INSERT INTO events VALUES (1), (2), (3);",
        ),
    ] {
        let o = pg.admin(db, sql);
        assert!(o.status.success(), "{o:?}");
    }
    d.write_policy(
        "catalog.yaml",
        &format!(
            "service:\n  name: analytics-db\n  endpoints:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [{}]\n",
            pg.port
        ),
    );
    for i in 0..FETCHERS {
        d.write_policy(
            &format!("fetch-{i}.yaml"),
            &format!(
                "policy:\n  name: fetch-{i}\n  identity: agent/fetch-{i}/prod\n  rules:\n    - resource: secret:bench/*\n      lease: 24h\n"
            ),
        );
    }
    for i in 0..=REVOCATIONS {
        d.write_policy(
            &format!("db-{i}.yaml"),
            &format!(
                "policy:\n  name: db-{i}\n  identity: agent/db-{i}/prod\n  rules:\n    - resource: service:analytics-db\n      actions: [read]\n      conditions: {{ tables: [events, sessions] }}\n"
            ),
        );
    }
    d.write_secrets_config(&format!(
        "  databases:\n    - service: analytics-db\n      host: 127.0.0.1\n      port: {}\n      database: analytics\n      admin_user: postgres\n      admin_password_secret: agentwall/databases/analytics-db\n      ttl: 1h\ndecision:\n  listen: {address}\n",
        pg.port
    ));
    d.launch();
    d.wait_healthy();
    d.secret_put("agentwall/databases/analytics-db", ADMIN_PASSWORD);
    let planted = "aw-bench-value-0123456789abcdef";
    d.secret_put("bench/api-key", planted);
    let pid = d.pid().unwrap();

    let mut conns: Vec<Conn> = (0..FETCHERS)
        .map(|i| connect(&address, &d.issue(&format!("agent/fetch-{i}/prod"), "1h")))
        .collect();
    let fetch = r#"{"path":"bench/api-key"}"#;
    // The baseline's body has the fetch's size.
    let nothing = r#"{"path":"bench/nothing"}"#;
    // Each connection's first request (its handshake is done by then), and a check that the
    // fetch hands out the value.
    for c in &mut conns {
        let (status, answer) = c.post("/v1/secrets/fetch", fetch);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        assert_eq!(value_of(&answer), planted);
        assert_eq!(c.post("/v1/nothing", nothing).0, 404);
    }

    let mut out = String::from("## Secrets\n\n");
    let fetch_p50 = one_at_a_time(&mut conns, pid, fetch, nothing, &mut out);
    at_once(conns, pid, fetch, nothing, &mut out);
    credentials(&d, &pg, &address, fetch_p50, &mut out);
    method(&mut out);
    println!("{out}");
    if let Some(r) = report {
        agentwall_tests::write_report_section(&r, "secrets", &out);
    }
    d.stop_cleanly();
    drop(pg);
}

/// The one-at-a-time rows; the fetch's p50 (µs).
fn one_at_a_time(
    conns: &mut [Conn],
    pid: u32,
    fetch: &str,
    nothing: &str,
    out: &mut String,
) -> f64 {
    let (mut b, mut f) = (Vec::new(), Vec::new());
    let (mut bcpu, mut fcpu) = (0.0, 0.0);
    for _ in 0..BLOCKS {
        let cpu0 = process_cpu(pid);
        b.extend(paced(
            conns,
            "/v1/nothing",
            nothing,
            404,
            BLOCK,
            ONE_AT_A_TIME_RATE,
        ));
        let cpu1 = process_cpu(pid);
        f.extend(paced(
            conns,
            "/v1/secrets/fetch",
            fetch,
            200,
            BLOCK,
            ONE_AT_A_TIME_RATE,
        ));
        bcpu += cpu1 - cpu0;
        fcpu += process_cpu(pid) - cpu1;
    }
    let n = (BLOCK * BLOCKS) as f64;
    let (b50, b99) = (quantile(&mut b, 0.5), quantile(&mut b, 0.99));
    let (f50, f99) = (quantile(&mut f, 0.5), quantile(&mut f, 0.99));
    let (bcore, fcore) = (n / bcpu, n / fcpu);
    let _ = write!(
        out,
        "One request at a time ({} on {FETCHERS} keep-alive mTLS connections, {ONE_AT_A_TIME_RATE} a second):\n\n\
         | request | p50 (µs) | p99 (µs) | per daemon core (/s) | vs bare round trip (per core) |\n|---|---|---|---|---|\n\
         | bare mTLS round trip (404), the baseline | {b50:.0} | {b99:.0} | {bcore:.0} | 1.00x |\n\
         | secret fetch (a new lease, audited) | {f50:.0} | {f99:.0} | {fcore:.0} | {:.2}x |\n\n",
        BLOCK * BLOCKS,
        fcore / bcore
    );
    f50
}

/// The rows with [`CLIENTS`] threads at once, each on its share of the connections.
fn at_once(conns: Vec<Conn>, pid: u32, fetch: &str, nothing: &str, out: &mut String) {
    let mut groups: Vec<Vec<Conn>> = (0..CLIENTS).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        groups[i % CLIENTS].push(c);
    }
    let _ = write!(
        out,
        "{CLIENTS} clients at once, each a thread with {} of the connections, {PER_CLIENT} requests each at {CLIENT_RATE} a second:\n\n\
         | request | answered | per second (wall) | per daemon core (/s) | vs bare round trip (per core) |\n|---|---|---|---|---|\n",
        FETCHERS / CLIENTS
    );
    let mut base_core = 0.0;
    for (what, path, body, want) in [
        (
            "bare mTLS round trip (404), the baseline",
            "/v1/nothing",
            nothing,
            404,
        ),
        (
            "secret fetch (a new lease, audited)",
            "/v1/secrets/fetch",
            fetch,
            200,
        ),
    ] {
        let cpu0 = process_cpu(pid);
        let start = Instant::now();
        std::thread::scope(|s| {
            for g in &mut groups {
                s.spawn(move || paced(g, path, body, want, PER_CLIENT, CLIENT_RATE));
            }
        });
        let wall = start.elapsed().as_secs_f64();
        let cpu = process_cpu(pid) - cpu0;
        let n = (CLIENTS * PER_CLIENT) as f64;
        let core = n / cpu;
        if want == 404 {
            base_core = core;
        }
        let _ = writeln!(
            out,
            "| {what} | {n:.0} | {:.0} | {core:.0} | {:.2}x |",
            n / wall,
            core / base_core
        );
    }
    out.push('\n');
}

/// Credential issue latency, and the time from a revocation to a refused login.
fn credentials(d: &TestDaemon, pg: &TestPostgres, address: &str, fetch_p50: f64, out: &mut String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = r#"{"path":"database/analytics-db"}"#;
    let mut c = connect(
        address,
        &d.issue(&format!("agent/db-{REVOCATIONS}/prod"), "1h"),
    );
    let (status, answer) = c.post("/v1/secrets/fetch", body);
    assert_eq!(
        status,
        200,
        "{} {}",
        String::from_utf8_lossy(&answer),
        pg.log()
    );
    // The credential is real: it logs in and reads what the policy grants.
    login(&rt, &value_of(&answer)).unwrap();
    let mut issue = paced(
        std::slice::from_mut(&mut c),
        "/v1/secrets/fetch",
        body,
        200,
        CREDENTIALS,
        20,
    );
    for v in &mut issue {
        *v /= 1000.0;
    }
    let (i50, i90) = (quantile(&mut issue, 0.5), quantile(&mut issue, 0.9));
    let imax = issue.iter().copied().fold(0.0, f64::max);

    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    let mut attempts = 0usize;
    for r in 0..REVOCATIONS {
        let id = format!("agent/db-{r}/prod");
        let mut c = connect(address, &d.issue(&id, "1h"));
        let (status, answer) = c.post("/v1/secrets/fetch", body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let uri = value_of(&answer);
        login(&rt, &uri).unwrap();
        let t0 = Instant::now();
        Client::revoke(
            &d.socket,
            format!("spiffe://agentwall.local/{id}"),
            "benchmark".into(),
        )
        .unwrap();
        answered.push(t0.elapsed().as_secs_f64() * 1e3);
        let deadline = t0 + Duration::from_secs(10);
        loop {
            attempts += 1;
            if login(&rt, &uri).is_err() {
                refused.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a revoked identity's credential still logs in after 10 s"
            );
        }
    }
    let (a50, amax) = (
        quantile(&mut answered, 0.5),
        answered.iter().copied().fold(0.0, f64::max),
    );
    let (r50, rmax) = (
        quantile(&mut refused, 0.5),
        refused.iter().copied().fold(0.0, f64::max),
    );
    let _ = write!(
        out,
        "PostgreSQL credentials ({CREDENTIALS} issued one after another; {REVOCATIONS} revocations, each of an identity holding one):\n\n\
         | what | p50 (ms) | p90 (ms) | max (ms) |\n|---|---|---|---|\n\
         | credential issue: a fetch of `database/analytics-db` (a new login role, its password, its grants) | {i50:.1} | {i90:.1} | {imax:.1} |\n\
         | secret fetch, the same round trip for a stored secret (p50 above) | {:.2} | - | - |\n\
         | revocation answered on the admin socket (the role dropped by then) | {a50:.1} | - | {amax:.1} |\n\
         | revocation asked → first refused login of its credential | {r50:.1} | - | {rmax:.1} |\n\n\
         Logins tried after the revocations: {attempts} in all, of which {} succeeded (each round stops at the first refusal).\n\n",
        fetch_p50 / 1000.0,
        attempts - REVOCATIONS
    );
}

fn method(out: &mut String) {
    out.push_str(
        "### Method\n\n\
         The daemon is a release build with a store of its own, its decision API on a loopback address, and a PostgreSQL of Debian's on loopback. The clients are threads of the benchmark; each identity has its certificate, its policy (a `secret:bench/*` rule, leases of a day) and one keep-alive mTLS connection, made as an agent makes it (`enroll::client_config`, TLS 1.3).\n\n\
         The baseline is a bare mTLS round trip: the same connection posts a body of the same size to a path the server does not serve, which reads it and answers 404. Against it, a fetch judges the identity and its certificate (revocation, expiry), the policy's rule, reads and decrypts the secret (its data key unwrapped by the master key), adds a lease, writes an audit record and answers the value in a buffer wiped on drop.\n\n\
         One at a time: four blocks of each, taking turns, every request paced so that each identity stays under its budget of 100 requests a second. Latency is the client's round trip; per core is requests over the daemon's CPU seconds (schedstat of all its threads) during the blocks.\n\n\
         The daemon's CPU seconds include its audit writer's: each fetch is one record, encrypted and appended, with an fdatasync for each batch of records. The baseline's requests make none.\n\n\
         At once: the connections split among threads that send at the same time; per core is all their answers over the daemon's CPU seconds meanwhile.\n\n\
         No lease ends during the run (a lease's end is a record too, and would fall into the baseline's blocks).\n\n\
         Credential issue: one identity fetches `database/analytics-db` one request after another, 20 a second; each fetch creates a login role with `VALID UNTIL`, a password (a SCRAM verifier), and SELECT on the two tables of its rule, over the daemon's administrator connection. The first credential is used to log in and read before the timing.\n\n\
         Revocation: an identity fetches a credential and logs in with it; then the revocation of its SPIFFE ID is sent on the admin socket, and the benchmark logs in with the credential again and again until it is refused. Each login is a new connection (TCP, SCRAM, a query).\n",
    );
}
