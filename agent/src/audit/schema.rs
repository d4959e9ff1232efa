//! Every kind of audit record, one variant each: the only way a record is made.
//!
//! A record is stored as `{"time", "kind", ...fields}` (see `sink::encode`): the variant gives
//! the kind ([`AuditRecord::kind`]) and its fields the rest. docs/audit.md documents every
//! kind and field; a test here checks the two against each other.

use serde::Serialize;

use crate::{
    audit::{detect::Alert, retention::Pruning},
    identity::{attest::Source, log::Entry},
    verdict::{EventRecord, VerdictSummary},
};

/// Decisions an asker made past its budget of records, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Suppressed {
    pub allowed: u64,
    pub denied: u64,
}

fn none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

/// One audit record's fields, by kind.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AuditRecord {
    /// The daemon started.
    DaemonStart {
        /// Kernel events dropped before this start, per CPU (pinned counters).
        events_dropped_per_cpu_before_start: Vec<u64>,
        version: String,
        pid: u32,
        policy_dir: String,
        policy_dir_sha256: String,
        pin_dir: String,
    },
    /// The daemon stopped; the kernel keeps enforcing.
    DaemonStop { reason: String, note: String },
    /// The start-up probe's connect was denied: enforcement works.
    Health { state: String, probe: String },
    /// A policy directory was compiled and put in force.
    PolicyLoaded {
        generation: u32,
        policies: usize,
        dir: String,
        dir_sha256: String,
    },
    /// A reload was refused; the policy in force stays.
    ReloadRejected {
        error: String,
        dir: String,
        dir_sha256: String,
    },
    /// A cgroup was quarantined (every flow denied) or released.
    Quarantine {
        cgroup_id: u64,
        lift: bool,
        sockets_destroyed: u32,
    },
    /// An identity or serial was revoked, by an operator or again at a restart.
    Revoked {
        /// `spiffe://...` or `serial HEX`.
        target: String,
        #[serde(skip_serializing_if = "none")]
        spiffe_id: Option<String>,
        reason: String,
        /// Who: `uid N` (an operator), or `agentwall at restart`.
        by: String,
        /// The operator's uid, when an operator revoked.
        #[serde(skip_serializing_if = "none")]
        by_uid: Option<u32>,
        /// Not on the list before.
        new: bool,
        cgroups: Vec<u64>,
        sockets_destroyed: u32,
        /// The list was made durable.
        persisted: bool,
    },
    /// An agent proved its identity and its cgroup was bound.
    Enrolled {
        spiffe_id: String,
        serial: String,
        policy: String,
        pid: i32,
        uid: u32,
        exe: String,
        cgroup: String,
        cgroup_id: u64,
        expires_at: String,
        peer_source: Source,
    },
    /// An enrollment was refused.
    EnrollRefused {
        reason: String,
        pid: Option<i32>,
        uid: Option<u32>,
        exe: Option<String>,
        cgroup: Option<String>,
    },
    /// `agentwall exec --identity` launched an agent: its cgroup bound to the identity's
    /// policy and an X509-SVID issued for it, its key kept in the daemon's memory.
    WorkloadLaunched {
        spiffe_id: String,
        serial: String,
        policy: String,
        cgroup: String,
        cgroup_id: u64,
        expires_at: String,
    },
    /// An X509-SVID and its private key went to a process over the Workload API.
    SvidDelivered {
        spiffe_id: String,
        serial: String,
        pid: i32,
        uid: u32,
        exe: String,
        cgroup_id: u64,
    },
    /// The Workload API gave a caller nothing.
    WorkloadRefused {
        rpc: String,
        reason: String,
        pid: i32,
        uid: u32,
        exe: String,
        cgroup: String,
        /// Refusals of the same uid not recorded since its last record (over its budget).
        #[serde(default, skip_serializing_if = "none")]
        suppressed: Option<u64>,
    },
    /// The decision API answered a callee or gateway about a caller.
    Decision {
        /// The caller's SPIFFE ID, when it has one.
        caller: String,
        /// How the query named the caller (never the token or the certificate itself).
        caller_given: String,
        policy: String,
        resource: String,
        action: String,
        attributes: std::collections::BTreeMap<String, String>,
        allow: bool,
        /// Allowed only because of audit mode: `reason` would have denied it.
        audit_only: bool,
        /// `file:line` of the deciding rule; empty when no rule named the resource.
        rule: String,
        reason: String,
        /// Who asked: a process on the decision socket, or the mTLS peer.
        asker: String,
        /// Decisions of the same asker not recorded one by one since its last record (over
        /// its budget of records): how many were allowed and how many denied.
        #[serde(default, skip_serializing_if = "none")]
        suppressed: Option<Suppressed>,
    },
    /// A JWT-SVID was handed out.
    TokenIssued {
        spiffe_id: String,
        expires_at: String,
    },
    /// An agent's certificate was renewed by the daemon.
    CertificateRenewed {
        spiffe_id: String,
        serial: String,
        previous_serial: String,
        not_after: String,
        sha256: String,
        cgroup_id: u64,
    },
    /// A certificate from the issuance log (every one the local CA signed).
    CertificateIssued(Entry),
    /// The issuance log is shorter than what was copied from it: it is read again whole.
    IssuanceLogShrunk {
        path: String,
        was_bytes: u64,
        now_bytes: u64,
    },
    /// A line of the issuance log could not be read.
    IssuanceLogUnreadable { error: String, line: String },
    /// Kernel events lost because the event ring was full: a gap, counted.
    EventsLost {
        cpu: usize,
        lost: u64,
        total_lost_on_cpu: u64,
        after_seq: u64,
        note: String,
    },
    /// The audit log is writable again; flows denied meanwhile (`audit.when_down: deny`).
    AuditHoldLifted { note: String },
    /// Records the previous stop could not make durable: a gap, counted (or of unknown size,
    /// with `note_error`).
    AuditUnwritten {
        records: Option<u64>,
        #[serde(skip_serializing_if = "none")]
        last_durable_seq: Option<u64>,
        #[serde(skip_serializing_if = "none")]
        stopped_at: Option<String>,
        #[serde(skip_serializing_if = "none")]
        note_error: Option<String>,
    },
    /// A cgroup listed under `enforce:` was enforced by the watcher after processes ran in it.
    ConfiguredCgroupEnforced {
        cgroup: String,
        cgroup_id: u64,
        policy: String,
        by: String,
        sockets_destroyed: u32,
        took_us: u64,
    },
    /// A torn tail left by a crash was cut from a segment.
    AuditTruncated {
        segment: String,
        from_bytes: u64,
        to_bytes: u64,
        reason: String,
        next_seq: u64,
    },
    /// Verdicts over an agent's event budget, counted rather than recorded one by one.
    VerdictSummary(VerdictSummary),
    /// A behavioral alert.
    Alert(Alert),
    /// Old segments about to be removed by retention.
    AuditRetention {
        segments: Vec<String>,
        first_seq: u64,
        last_seq: u64,
        bytes: u64,
        reason: String,
        limit_bytes: u64,
        #[serde(skip_serializing_if = "none")]
        archived_to: Option<String>,
    },
    /// Retention could not remove the segments it recorded.
    AuditRetentionFailed {
        segments: Vec<String>,
        error: String,
    },
    /// The audit key was rotated: the record ends the old key's segment.
    AuditKeyRotation { from_key: String, to_key: String },
    /// A rotation failed; the old key stays.
    AuditKeyRotationFailed {
        from_key: String,
        to_key: String,
        error: String,
    },
    /// A secret was stored (its path and new version; never its value).
    SecretStored {
        path: String,
        version: u32,
        by: String,
    },
    /// A secret was read.
    SecretRead {
        path: String,
        version: u32,
        by: String,
    },
    /// A secret was removed with all its versions.
    SecretRemoved { path: String, by: String },
    /// A secret operation was refused or failed.
    SecretRefused {
        path: String,
        op: String,
        by: String,
        error: String,
    },
    /// The secrets master key was rotated; `rewrapped` secrets moved to it (none yet when the
    /// rewrap failed: `error` says why; it is tried again at the next rotation).
    SecretKeyRotation {
        to_key: String,
        rewrapped: usize,
        by: String,
        #[serde(skip_serializing_if = "none")]
        error: Option<String>,
    },
    /// An agent fetched a secret, or renewed its lease: the version handed out (never the
    /// value) and the lease.
    SecretLeased {
        identity: String,
        path: String,
        version: u32,
        lease: String,
        expires: String,
        rule: String,
        renewal: bool,
        asker: String,
        /// For a lease on a database: the login role made for it.
        #[serde(skip_serializing_if = "none")]
        role: Option<String>,
        /// Requests of this identity refused since its last record for coming too fast.
        #[serde(skip_serializing_if = "none")]
        suppressed: Option<Suppressed>,
    },
    /// An agent's fetch or renewal was refused.
    SecretDenied {
        identity: String,
        path: String,
        reason: String,
        #[serde(skip_serializing_if = "none")]
        rule: Option<String>,
        asker: String,
        #[serde(skip_serializing_if = "none")]
        suppressed: Option<Suppressed>,
    },
    /// A lease ended before its holder let it go: its time was up, its identity was revoked,
    /// or its policy no longer grants it.
    SecretLeaseEnded {
        identity: String,
        path: String,
        version: u32,
        lease: String,
        #[serde(skip_serializing_if = "none")]
        role: Option<String>,
        reason: String,
    },
    /// A kernel verdict (stored compact, read back as this JSON: see `record`).
    Verdict(Box<EventRecord>),
}

impl From<&Pruning> for AuditRecord {
    fn from(p: &Pruning) -> Self {
        Self::AuditRetention {
            segments: p.segments.clone(),
            first_seq: p.first_seq,
            last_seq: p.last_seq,
            bytes: p.bytes,
            reason: p.reason.to_string(),
            limit_bytes: p.limit_bytes,
            archived_to: p.archived_to.clone(),
        }
    }
}

impl AuditRecord {
    /// The record's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DaemonStart { .. } => "daemon_start",
            Self::DaemonStop { .. } => "daemon_stop",
            Self::Health { .. } => "health",
            Self::PolicyLoaded { .. } => "policy_loaded",
            Self::ReloadRejected { .. } => "reload_rejected",
            Self::Quarantine { .. } => "quarantine",
            Self::Revoked { .. } => "revoked",
            Self::Enrolled { .. } => "enrolled",
            Self::EnrollRefused { .. } => "enroll_refused",
            Self::WorkloadLaunched { .. } => "workload_launched",
            Self::SvidDelivered { .. } => "svid_delivered",
            Self::WorkloadRefused { .. } => "workload_refused",
            Self::Decision { .. } => "decision",
            Self::TokenIssued { .. } => "token_issued",
            Self::CertificateRenewed { .. } => "certificate_renewed",
            Self::CertificateIssued(_) => "certificate_issued",
            Self::IssuanceLogShrunk { .. } => "issuance_log_shrunk",
            Self::IssuanceLogUnreadable { .. } => "issuance_log_unreadable",
            Self::EventsLost { .. } => "events_lost",
            Self::AuditHoldLifted { .. } => "audit_hold_lifted",
            Self::AuditUnwritten { .. } => "audit_unwritten",
            Self::ConfiguredCgroupEnforced { .. } => "configured_cgroup_enforced",
            Self::AuditTruncated { .. } => "audit_truncated",
            Self::VerdictSummary(_) => "verdict_summary",
            Self::Alert(_) => "alert",
            Self::AuditRetention { .. } => "audit_retention",
            Self::AuditRetentionFailed { .. } => "audit_retention_failed",
            Self::AuditKeyRotation { .. } => "audit_key_rotation",
            Self::AuditKeyRotationFailed { .. } => "audit_key_rotation_failed",
            Self::SecretStored { .. } => "secret_stored",
            Self::SecretRead { .. } => "secret_read",
            Self::SecretRemoved { .. } => "secret_removed",
            Self::SecretRefused { .. } => "secret_refused",
            Self::SecretKeyRotation { .. } => "secret_key_rotation",
            Self::SecretLeased { .. } => "secret_leased",
            Self::SecretDenied { .. } => "secret_denied",
            Self::SecretLeaseEnded { .. } => "secret_lease_ended",
            Self::Verdict(_) => "verdict",
        }
    }
}

/// A record's JSON: `{"time", "kind", ...fields}`; `time` is now unless the fields carry their
/// own (a kernel event's time).
pub(crate) fn encode_record(r: &AuditRecord) -> Option<Vec<u8>> {
    encode(r.kind(), r)
}

pub(super) fn encode<T: Serialize>(kind: &str, fields: &T) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(512);
    if let Err(e) = serde_json::to_writer(&mut body, fields) {
        tracing::error!(error = %e, kind, "cannot encode an audit record");
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 64);
    let has_time = body.starts_with(b"{\"time\":");
    out.push(b'{');
    if !has_time {
        out.extend_from_slice(b"\"time\":\"");
        out.extend_from_slice(now_rfc3339().as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(b"\"kind\":");
    serde_json::to_writer(&mut out, kind).ok()?;
    match body.as_slice() {
        [b'{', b'}'] => out.push(b'}'),
        [b'{', rest @ ..] => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        // Not an object: kept whole under "value".
        _ => {
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(&body);
            out.push(b'}');
        }
    }
    Some(out)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn s(v: &str) -> String {
        v.to_string()
    }

    /// One record of every kind (two where a kind has shapes of its own), every optional
    /// field given.
    fn samples() -> Vec<AuditRecord> {
        use AuditRecord as R;
        let entry = Entry {
            issued_at: s("t"),
            serial: s("01"),
            spiffe_id: s("spiffe://d/a"),
            not_before: s("t"),
            not_after: s("t"),
            sha256: s("h"),
            requester: s("uid 0"),
        };
        let verdict: EventRecord = serde_json::from_value(serde_json::json!({
            "time": "t", "cgroup_id": 1, "pid": 2, "tgid": 2, "comm": "c", "hook": "connect4",
            "verdict": "deny", "reason": "no_rule", "family": "ipv4", "protocol": "tcp",
            "dst": "127.0.0.1", "dst_given": "127.0.0.1", "port": 9, "rule_id": 0, "rule": "f:1",
            "slot": 1, "generation": 1, "policy": "p", "spiffe_id": "spiffe://d/a",
            "unix": "/run/x"
        }))
        .unwrap();
        vec![
            R::DaemonStart {
                events_dropped_per_cpu_before_start: vec![0],
                version: s("v"),
                pid: 1,
                policy_dir: s("d"),
                policy_dir_sha256: s("h"),
                pin_dir: s("p"),
            },
            R::DaemonStop {
                reason: s("signal"),
                note: s("n"),
            },
            R::Health {
                state: s("healthy"),
                probe: s("p"),
            },
            R::PolicyLoaded {
                generation: 1,
                policies: 1,
                dir: s("d"),
                dir_sha256: s("h"),
            },
            R::ReloadRejected {
                error: s("e"),
                dir: s("d"),
                dir_sha256: s("h"),
            },
            R::Quarantine {
                cgroup_id: 1,
                lift: false,
                sockets_destroyed: 0,
            },
            R::Revoked {
                target: s("serial 01"),
                spiffe_id: Some(s("spiffe://d/a")),
                reason: s("r"),
                by: s("uid 0"),
                by_uid: Some(0),
                new: true,
                cgroups: vec![1],
                sockets_destroyed: 0,
                persisted: true,
            },
            R::Enrolled {
                spiffe_id: s("spiffe://d/a"),
                serial: s("01"),
                policy: s("p"),
                pid: 1,
                uid: 0,
                exe: s("/bin/x"),
                cgroup: s("/a"),
                cgroup_id: 1,
                expires_at: s("t"),
                peer_source: Source::Pidfd,
            },
            R::EnrollRefused {
                reason: s("r"),
                pid: Some(1),
                uid: Some(0),
                exe: Some(s("/bin/x")),
                cgroup: Some(s("/a")),
            },
            R::WorkloadLaunched {
                spiffe_id: s("spiffe://d/a"),
                serial: s("01"),
                policy: s("p"),
                cgroup: s("/a"),
                cgroup_id: 1,
                expires_at: s("t"),
            },
            R::SvidDelivered {
                spiffe_id: s("spiffe://d/a"),
                serial: s("01"),
                pid: 1,
                uid: 0,
                exe: s("/bin/x"),
                cgroup_id: 1,
            },
            R::WorkloadRefused {
                rpc: s("FetchX509SVID"),
                reason: s("r"),
                pid: 1,
                uid: 0,
                exe: s("/bin/x"),
                cgroup: s("/a"),
                suppressed: Some(3),
            },
            R::Decision {
                caller: s("spiffe://d/a"),
                caller_given: s("pid 7"),
                policy: s("p"),
                resource: s("service:db"),
                action: s("read"),
                attributes: [(s("tables"), s("events"))].into(),
                allow: true,
                audit_only: false,
                rule: s("p.yaml:4"),
                reason: s("granted"),
                asker: s("pid 8"),
                suppressed: Some(Suppressed {
                    allowed: 3,
                    denied: 1,
                }),
            },
            R::TokenIssued {
                spiffe_id: s("spiffe://d/a"),
                expires_at: s("t"),
            },
            R::CertificateRenewed {
                spiffe_id: s("spiffe://d/a"),
                serial: s("02"),
                previous_serial: s("01"),
                not_after: s("t"),
                sha256: s("h"),
                cgroup_id: 1,
            },
            R::CertificateIssued(entry),
            R::IssuanceLogShrunk {
                path: s("p"),
                was_bytes: 2,
                now_bytes: 1,
            },
            R::IssuanceLogUnreadable {
                error: s("e"),
                line: s("l"),
            },
            R::EventsLost {
                cpu: 0,
                lost: 1,
                total_lost_on_cpu: 1,
                after_seq: 1,
                note: s("n"),
            },
            R::AuditHoldLifted { note: s("n") },
            R::AuditUnwritten {
                records: Some(1),
                last_durable_seq: Some(1),
                stopped_at: Some(s("t")),
                note_error: None,
            },
            R::AuditUnwritten {
                records: None,
                last_durable_seq: None,
                stopped_at: None,
                note_error: Some(s("e")),
            },
            R::ConfiguredCgroupEnforced {
                cgroup: s("a"),
                cgroup_id: 1,
                policy: s("p"),
                by: s("watcher"),
                sockets_destroyed: 0,
                took_us: 1,
            },
            R::AuditTruncated {
                segment: s("seg"),
                from_bytes: 2,
                to_bytes: 1,
                reason: s("r"),
                next_seq: 1,
            },
            R::VerdictSummary(VerdictSummary {
                time: s("t"),
                window_start: s("t"),
                cgroup_id: Some(1),
                policy: Some(s("p")),
                spiffe_id: Some(s("spiffe://d/a")),
                part: 1,
                suppressed: 1,
                flows: vec![],
                other_flows: 0,
                other_count: 0,
                unattributed: 0,
            }),
            R::Alert(Alert::AuditSpaceLow {
                free_bytes: 1,
                total_bytes: 2,
                warn_free_percent: 10,
            }),
            R::AuditRetention {
                segments: vec![s("seg")],
                first_seq: 1,
                last_seq: 2,
                bytes: 3,
                reason: s("size"),
                limit_bytes: 4,
                archived_to: Some(s("/archive")),
            },
            R::AuditRetentionFailed {
                segments: vec![s("seg")],
                error: s("e"),
            },
            R::AuditKeyRotation {
                from_key: s("a"),
                to_key: s("b"),
            },
            R::AuditKeyRotationFailed {
                from_key: s("a"),
                to_key: s("b"),
                error: s("e"),
            },
            R::SecretStored {
                path: s("a/b"),
                version: 1,
                by: s("admin"),
            },
            R::SecretRead {
                path: s("a/b"),
                version: 1,
                by: s("admin"),
            },
            R::SecretRemoved {
                path: s("a/b"),
                by: s("admin"),
            },
            R::SecretRefused {
                path: s("a/b"),
                op: s("get"),
                by: s("admin"),
                error: s("e"),
            },
            R::SecretKeyRotation {
                to_key: s("k"),
                rewrapped: 1,
                by: s("admin"),
                error: Some(s("e")),
            },
            R::SecretLeased {
                identity: s("spiffe://d/a"),
                path: s("a/b"),
                version: 1,
                lease: s("00ff"),
                expires: s("2026-12-07T12:00:00Z"),
                rule: s("p.yaml:4"),
                renewal: false,
                asker: s("spiffe://d/a"),
                role: Some(s("aw_00ff")),
                suppressed: Some(Suppressed {
                    allowed: 0,
                    denied: 1,
                }),
            },
            R::SecretDenied {
                identity: s("spiffe://d/a"),
                path: s("a/b"),
                reason: s("no rule"),
                rule: Some(s("p.yaml:4")),
                asker: s("spiffe://d/a"),
                suppressed: Some(Suppressed {
                    allowed: 0,
                    denied: 2,
                }),
            },
            R::SecretLeaseEnded {
                identity: s("spiffe://d/a"),
                path: s("a/b"),
                version: 1,
                lease: s("00ff"),
                role: Some(s("aw_00ff")),
                reason: s("expired"),
            },
            R::Verdict(Box::new(verdict)),
        ]
    }

    /// The variants declared in this file, counted from its source: a variant without a
    /// sample fails the documentation check.
    fn variants_declared() -> usize {
        let src = include_str!("schema.rs");
        let body = &src[src.find("pub enum AuditRecord {").unwrap()..];
        let body = &body[..body.find("\n}\n").unwrap()];
        body.lines()
            .filter(|l| {
                let t = l.strip_prefix("    ").unwrap_or("");
                t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            })
            .count()
    }

    /// Fields by kind, from docs/audit.md: the `| field |` rows of the table under each
    /// `### kind` heading.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let text = include_str!("../../../docs/audit.md");
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut kind = None;
        for line in text.lines() {
            if let Some(k) = line.strip_prefix("### ") {
                let k = k.trim().trim_matches('`').to_string();
                out.entry(k.clone()).or_default();
                kind = Some(k);
            } else if line.starts_with("## ") {
                kind = None;
            } else if let (Some(k), Some(row)) = (&kind, line.strip_prefix("| `"))
                && let Some(field) = row.split('`').next()
            {
                out.get_mut(k).unwrap().insert(field.to_string());
            }
        }
        out
    }

    #[test]
    fn every_kind_and_field_is_documented_and_nothing_else() {
        let samples = samples();
        let kinds: BTreeSet<&str> = samples.iter().map(AuditRecord::kind).collect();
        assert_eq!(
            kinds.len(),
            variants_declared(),
            "every variant needs a sample here"
        );
        let mut fields: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in &samples {
            let v = serde_json::to_value(r).unwrap();
            let keys = v.as_object().unwrap().keys().cloned();
            let f = fields.entry(r.kind().to_string()).or_default();
            f.extend(keys);
            // Every record has these two (see `sink::encode`).
            f.extend(["time".to_string(), "kind".to_string()]);
            if r.kind() == "alert" {
                // The alert's own fields vary with the alert: docs list them by alert.
                f.retain(|k| ["time", "kind", "alert"].contains(&k.as_str()));
            }
        }
        let docs = documented();
        for (kind, want) in &fields {
            let Some(got) = docs.get(kind) else {
                panic!("docs/audit.md has no `### {kind}` section");
            };
            assert_eq!(got, want, "the fields of `{kind}` in docs/audit.md");
        }
        let extra: Vec<_> = docs.keys().filter(|k| !fields.contains_key(*k)).collect();
        assert!(
            extra.is_empty(),
            "docs/audit.md documents unknown kinds: {extra:?}"
        );
    }
}
