//! Prometheus metrics: `GET /metrics` on a TCP address (`metrics.listen`), in the OpenMetrics
//! text format, rendered from the same snapshot as `agentwall status`.
//!
//! The endpoint is read-only and holds no secret (counts, health, sequence numbers, no
//! identities): it may face a scraper on the node's network. Requests are read with a size
//! and time limit; anything but `GET /metrics` (or `/`) gets a plain error status.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{Health, Status};
use crate::daemon::Daemon;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a connection is held at most, request and answer.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str, values: &[(Labels, u64)]) {
    let f = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        f.get_or_create(labels).inc_by(*v);
    }
    reg.register(name, help, f);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

/// A latency distribution of the status as a Prometheus histogram, in seconds.
#[derive(Debug)]
struct LatencyHistogram(super::LatencyStatus);

impl prometheus_client::encoding::EncodeMetric for LatencyHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let l = &self.0;
        let bounds = &crate::daemon::status::LATENCY_BOUNDS_US;
        // A status without buckets (an older daemon's) puts its count above the last bound.
        let mut counts = l.buckets.clone();
        counts.resize(bounds.len() + 1, 0);
        if l.buckets.is_empty() {
            counts[bounds.len()] = l.count;
        }
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .map(|us| *us as f64 / 1e6)
            // The last bucket is everything above the last bound; the encoder writes
            // `+Inf` for f64::MAX.
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        // The count is the +Inf bucket, one number.
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            l.sum_us as f64 / 1e6,
            counts.iter().sum(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

fn label(k: &str, v: impl ToString) -> Labels {
    vec![(k.to_owned(), v.to_string())]
}

/// The metrics of a status snapshot, in the OpenMetrics text format.
pub fn render(s: &Status) -> String {
    let mut reg = Registry::with_prefix("agentwall");
    let healthy = matches!(s.health, Health::Healthy { .. });
    gauge(
        &mut reg,
        "healthy",
        "1 when the startup probe's connect was denied by the kernel and the daemon is serving",
        i64::from(healthy),
    );
    let protections = Family::<Labels, Gauge>::default();
    protections
        .get_or_create(&label("protection", "task_hooks"))
        .set(i64::from(s.protections.task_hooks));
    protections
        .get_or_create(&label("protection", "unix_sockets"))
        .set(i64::from(s.protections.unix_sockets));
    reg.register(
        "protection_active",
        "1 when a kernel protection is in force, 0 when it is missing (status says why)",
        protections,
    );
    if let Some(f) = &s.fleet {
        gauge(
            &mut reg,
            "fleet_connected",
            "1 while the node watches the fleet's etcd; 0 while it is cut off and enforces what it has",
            i64::from(f.connected),
        );
        gauge(
            &mut reg,
            "fleet_policy_bundle_version",
            "The version of the fleet's policy bundle in force (0: none, or policies from the directory)",
            i64::try_from(f.policy_bundle.unwrap_or(0)).unwrap_or(i64::MAX),
        );
        gauge(
            &mut reg,
            "fleet_revision",
            "The etcd revision of the fleet's revocations this node has applied up to",
            f.revision,
        );
        for (name, help, v) in [
            (
                "fleet_revocations_applied",
                "Revocations made on other nodes and applied here",
                f.applied,
            ),
            (
                "fleet_revocations_published",
                "Revocations made here and published to the fleet",
                f.published,
            ),
            (
                "fleet_values_refused",
                "Values under the fleet's revocations prefix refused as malformed",
                f.refused,
            ),
            (
                "fleet_bundles_refused",
                "Policy bundles refused: untrusted key, bad signature, rollback or not compiling",
                f.bundles_refused,
            ),
        ] {
            counter(&mut reg, name, help, v);
        }
    }
    let build = Family::<Labels, Gauge>::default();
    build.get_or_create(&label("version", &s.version)).set(1);
    reg.register("build_info", "The running agentwall version", build);
    gauge(
        &mut reg,
        "policy_generation",
        "Generation of the policy loaded into the kernel",
        i64::from(s.generation),
    );
    gauge(
        &mut reg,
        "rule_nodes",
        "Rule entries loaded into the kernel",
        i64::try_from(s.rule_nodes).unwrap_or(i64::MAX),
    );
    gauge(
        &mut reg,
        "policies",
        "Policies loaded",
        i64::try_from(s.policies.len()).unwrap_or(i64::MAX),
    );
    let count = |f: &dyn Fn(&super::CgroupStatus) -> bool| {
        i64::try_from(s.cgroups.iter().filter(|c| f(c)).count()).unwrap_or(i64::MAX)
    };
    let cgroups = Family::<Labels, Gauge>::default();
    for (state, n) in [
        ("enforced", count(&|_| true)),
        ("enrolled", count(&|c| c.spiffe_id.is_some())),
        ("revoked", count(&|c| c.revoked)),
        ("quarantined", count(&|c| c.quarantined)),
    ] {
        cgroups.get_or_create(&label("state", state)).set(n);
    }
    reg.register(
        "cgroups",
        "Cgroups under enforcement, and of those the enrolled, revoked and quarantined ones",
        cgroups,
    );
    // One metric per kernel counter. Ring buffer drops are per CPU, and only there: a
    // total beside them would count each drop twice in a sum over the series.
    for (i, name) in agentwall_common::counters::NAMES.iter().enumerate() {
        if i == agentwall_common::counters::EVENTS_DROPPED as usize {
            continue;
        }
        let v = s.kernel_counters.totals.get(*name).copied().unwrap_or(0);
        counter(
            &mut reg,
            &format!("kernel_{name}"),
            agentwall_common::counters::HELP[i],
            v,
        );
    }
    let dropped: Vec<(Labels, u64)> = s
        .kernel_counters
        .events_dropped_per_cpu
        .iter()
        .enumerate()
        .map(|(cpu, v)| (label("cpu", cpu), *v))
        .collect();
    counter_family(
        &mut reg,
        "kernel_events_dropped",
        "Events the kernel could not put in the ring buffer, per CPU (each in an audit gap record)",
        &dropped,
    );
    let errors: Vec<(Labels, u64)> = s
        .daemon_errors
        .iter()
        .map(|(k, v)| (label("error", k), *v))
        .collect();
    counter_family(
        &mut reg,
        "daemon_errors",
        "Errors of the daemon, by kind",
        &errors,
    );
    let a = &s.audit;
    counter(
        &mut reg,
        "audit_records",
        "Audit records made durable since the daemon started",
        a.committed,
    );
    gauge(
        &mut reg,
        "audit_last_seq",
        "Sequence number of the last durable audit record",
        i64::try_from(a.last_seq).unwrap_or(i64::MAX),
    );
    gauge(
        &mut reg,
        "audit_last_checkpoint_seq",
        "Sequence number the last signed checkpoint covers",
        i64::try_from(a.last_checkpoint_seq).unwrap_or(i64::MAX),
    );
    counter(
        &mut reg,
        "audit_write_errors",
        "Failed audit commits (the batch is kept and retried)",
        a.write_errors,
    );
    gauge(
        &mut reg,
        "audit_failing",
        "1 while the audit log cannot be written (an alarm: enforcement goes on as audit.when_down says)",
        i64::from(a.failing),
    );
    counter(
        &mut reg,
        "alerts",
        "Behavioral alerts raised (each is an alert record in the audit log)",
        a.alerts,
    );
    counter(
        &mut reg,
        "events_suppressed",
        "Kernel verdicts over their agent's event budget, counted in verdict_summary records instead of recorded one by one",
        a.events_suppressed,
    );
    counter(
        &mut reg,
        "event_summaries",
        "verdict_summary records written",
        a.event_summaries,
    );
    counter(
        &mut reg,
        "event_floods",
        "Agents found writing verdicts past their event budget (event_flood alerts)",
        a.event_floods,
    );
    gauge(
        &mut reg,
        "audit_free_bytes",
        "Free bytes of the audit log's file system (an alert below audit.space_warn_percent)",
        i64::try_from(a.free_bytes).unwrap_or(i64::MAX),
    );
    gauge(
        &mut reg,
        "audit_space_low",
        "1 while the audit file system is below its free-space watermark",
        i64::from(a.space_low),
    );
    counter(
        &mut reg,
        "audit_segments_removed",
        "Old audit segments removed by retention (after their removal was recorded and anchored)",
        a.segments_removed,
    );
    counter(
        &mut reg,
        "audit_retention_errors",
        "Retention runs that could not read or remove old segments",
        a.retention_errors,
    );
    let mut sinks = [
        (Vec::new(), "audit_sink_sent", "Records a sink delivered"),
        (
            Vec::new(),
            "audit_sink_dropped",
            "Records a sink's full queue turned away (the local log holds them)",
        ),
        (
            Vec::new(),
            "audit_sink_errors",
            "Failed connects and writes of a sink",
        ),
    ];
    let connected = Family::<Labels, Gauge>::default();
    for (name, st) in &a.sinks {
        let l = label("sink", name);
        sinks[0].0.push((l.clone(), st.sent));
        sinks[1].0.push((l.clone(), st.dropped));
        sinks[2].0.push((l.clone(), st.errors));
        connected.get_or_create(&l).set(i64::from(st.connected));
    }
    for (values, name, help) in &sinks {
        counter_family(&mut reg, name, help, values);
    }
    reg.register(
        "audit_sink_connected",
        "1 while a sink is connected to its collector",
        connected,
    );
    reg.register_with_unit(
        "audit_event_to_durable",
        "Time from a kernel event to its audit record being durable, since the daemon started",
        prometheus_client::registry::Unit::Seconds,
        LatencyHistogram(a.event_to_durable.clone()),
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        tracing::error!(error = %e, "cannot encode the metrics");
        out.clear();
        let _ = writeln!(out, "# EOF");
    }
    out
}

/// Binds the metrics address; a failure names the address and the config key.
pub fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, super::server::ServerError> {
    let err = |source| super::server::ServerError::Metrics { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(listener).map_err(err)
}

/// Serves scrapes until the process ends, at most [`crate::limits::METRICS_CONNECTIONS`] at
/// once: a connection beyond that is answered 503 and closed at once, so that clients holding
/// connections open cannot take the daemon's descriptors (see [`crate::limits`]).
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    let slots = crate::limits::Slots::new("metrics endpoint", crate::limits::METRICS_CONNECTIONS);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(slot) = slots.take() else {
                    daemon.count_error("metrics_busy_refused");
                    // Without waiting: a client that does not read loses the answer.
                    let _ = stream.try_write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    continue;
                };
                let d = Arc::clone(&daemon);
                tokio::spawn(async move {
                    // The answer too is bounded: a client that does not read it lets go.
                    match tokio::time::timeout(SERVE_TIMEOUT, handle(stream, &d)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request"),
                        Err(_) => tracing::debug!("metrics request: timed out"),
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a request head asks for: `Ok(path)` for a GET, or the error status to answer.
fn parse_request(head: &[u8]) -> Result<Option<String>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("400 Bad Request"),
    }
    if req.method != Some("GET") {
        return Err("405 Method Not Allowed");
    }
    Ok(Some(req.path.unwrap_or("/").to_owned()))
}

async fn handle(mut stream: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let asked = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(Err("400 Bad Request"));
            }
            head.extend_from_slice(&buf[..n]);
            match parse_request(&head) {
                Ok(Some(path)) => return Ok(Ok(path)),
                Ok(None) if head.len() < MAX_REQUEST => {}
                Ok(None) => return Ok(Err("431 Request Header Fields Too Large")),
                Err(status) => return Ok(Err(status)),
            }
        }
    })
    .await
    .unwrap_or(Ok(Err("408 Request Timeout")))?;
    let (status, content_type, body) = match asked {
        Ok(path) => match path.split('?').next().unwrap_or("") {
            "/metrics" => ("200 OK", CONTENT_TYPE, render(&daemon.status().await)),
            "/" => (
                "200 OK",
                "text/plain",
                "agentwall: metrics at /metrics\n".to_owned(),
            ),
            _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        },
        Err(status) => (status, "text/plain", format!("{status}\n")),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::control::{AuditStatus, CgroupStatus, LatencyStatus, SinkStatus};

    #[test]
    fn a_status_renders_as_openmetrics() {
        let mut s = Status {
            version: "0.1.0".into(),
            health: Health::Healthy {
                probe_at: "T".into(),
            },
            generation: 3,
            rule_nodes: 12,
            policy_dir: "/p".into(),
            pin_dir: "/b".into(),
            cgroup_root: "agentwall".into(),
            policies: vec![],
            cgroups: vec![CgroupStatus {
                id: 7,
                path: "/x".into(),
                policy: Some("web".into()),
                kind: "exec".into(),
                quarantined: false,
                leased: false,
                spiffe_id: Some("spiffe://a/b".into()),
                serial: None,
                expires_at: None,
                revoked: true,
                root_uid: None,
            }],
            kernel_counters: crate::enforce::Counters::default(),
            daemon_errors: [("map_update".to_owned(), 2)].into_iter().collect(),
            audit: AuditStatus {
                committed: 40,
                failing: true,
                ..AuditStatus::default()
            },
            protections: crate::control::Protections {
                task_hooks: false,
                unix_sockets: true,
                missing: vec!["task-scoped hooks: ...".into()],
            },
            fleet: Some(crate::control::FleetStatus {
                node: "n1".into(),
                endpoints: vec!["http://127.0.0.1:2379".into()],
                connected: true,
                revision: 12,
                applied: 3,
                published: 1,
                refused: 0,
                last_error: None,
                policy_bundle: Some(9),
                bundles_refused: 1,
                bundle_error: None,
            }),
        };
        s.kernel_counters.totals.insert("denied", 5);
        s.kernel_counters.events_dropped_per_cpu = vec![0, 9];
        s.audit.sinks.insert(
            "syslog".into(),
            SinkStatus {
                sent: 4,
                dropped: 1,
                connected: true,
                ..SinkStatus::default()
            },
        );
        // One event at most 255 µs, two more at most 1023 µs.
        s.audit.event_to_durable.count = 3;
        s.audit.event_to_durable.sum_us = 1800;
        s.audit.event_to_durable.buckets = vec![0, 0, 1, 0, 2];
        let text = render(&s);
        for line in [
            "agentwall_healthy 1",
            "agentwall_protection_active{protection=\"task_hooks\"} 0",
            "agentwall_protection_active{protection=\"unix_sockets\"} 1",
            "agentwall_policy_generation 3",
            "agentwall_cgroups{state=\"revoked\"} 1",
            "agentwall_cgroups{state=\"enrolled\"} 1",
            "agentwall_kernel_denied_total 5",
            "# HELP agentwall_kernel_denied Flows denied, for any reason.",
            "# TYPE agentwall_kernel_denied counter",
            "agentwall_kernel_rate_limited_total 0",
            "agentwall_kernel_events_dropped_total{cpu=\"1\"} 9",
            "agentwall_daemon_errors_total{error=\"map_update\"} 2",
            "agentwall_audit_records_total 40",
            "agentwall_audit_failing 1",
            "agentwall_audit_sink_dropped_total{sink=\"syslog\"} 1",
            "agentwall_audit_sink_connected{sink=\"syslog\"} 1",
            "# TYPE agentwall_audit_event_to_durable_seconds histogram",
            "agentwall_audit_event_to_durable_seconds_bucket{le=\"0.000127\"} 0",
            "agentwall_audit_event_to_durable_seconds_bucket{le=\"0.000255\"} 1",
            "agentwall_audit_event_to_durable_seconds_bucket{le=\"0.001023\"} 3",
            "agentwall_audit_event_to_durable_seconds_bucket{le=\"4.194303\"} 3",
            "agentwall_audit_event_to_durable_seconds_bucket{le=\"+Inf\"} 3",
            "agentwall_audit_event_to_durable_seconds_count 3",
            "agentwall_audit_event_to_durable_seconds_sum 0.0018",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // No identity leaves through the endpoint.
        assert!(!text.contains("spiffe"), "{text}");
        // Ring buffer drops only per CPU: no total to add to them twice.
        assert!(
            !text.contains("agentwall_kernel_events_dropped_total "),
            "{text}"
        );
        assert!(
            !text.contains("counter=\""),
            "no catch-all kernel metric: {text}"
        );
        assert!(!text.contains("quantile"), "{text}");
    }

    /// Read while events are added, a status's count may run ahead of its buckets: the
    /// histogram's count is always its +Inf bucket, as OpenMetrics requires.
    #[test]
    fn a_histogram_count_is_its_inf_bucket() {
        let racing = LatencyStatus {
            count: 5,
            sum_us: 900,
            buckets: vec![0, 0, 1, 0, 2],
            ..LatencyStatus::default()
        };
        let old = LatencyStatus {
            count: 4,
            ..LatencyStatus::default()
        };
        for (l, n) in [(racing, 3), (old, 4)] {
            let mut reg = Registry::default();
            reg.register("lat", "h", LatencyHistogram(l));
            let mut text = String::new();
            encode(&mut text, &reg).unwrap();
            for line in [
                format!("lat_count {n}"),
                format!("lat_bucket{{le=\"+Inf\"}} {n}"),
            ] {
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
    }

    #[test]
    fn requests_are_parsed_with_limits() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Some("/metrics".into()))
        );
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHo"), Ok(None));
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err("405 Method Not Allowed")
        );
        assert_eq!(
            parse_request(b"\x00\x01garbage\r\n\r\n"),
            Err("400 Bad Request")
        );
    }
}
