//! The daemon's admin verbs: status, reload, revoke, quarantine, enforce-self, events.

use std::{path::Path, process::ExitCode};

use anyhow::bail;

use crate::control::{
    Health, Request, Status,
    client::{Client, Revoked, Streamed},
};

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn revoke(
    socket: &Path,
    target: Option<String>,
    reason: Option<String>,
    list: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if list {
        for e in Client::revocations(socket)? {
            if json {
                let mut v = serde_json::to_value(&e)?;
                v["covers"] = e.target.covers().into();
                println!("{v}");
            } else {
                println!(
                    "{} {} by {}: {} (covers {})",
                    e.at,
                    e.target,
                    e.by,
                    e.reason,
                    e.target.covers()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(target), Some(reason)) = (target, reason) else {
        bail!("give what to revoke (a SPIFFE ID or a serial) and --reason TEXT, or --list");
    };
    let Revoked {
        target,
        new,
        cgroups,
        sockets_destroyed,
        not_persisted,
    } = Client::revoke(socket, target, reason)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"target": target, "new": new, "cgroups": cgroups,
                "sockets_destroyed": sockets_destroyed, "not_persisted": not_persisted})
        );
    } else {
        // Scripts read `--json`; this is for people.
        println!(
            "revoked {target}{}: {} denied everything, {} destroyed",
            if new { "" } else { " (already revoked)" },
            count(cgroups.len(), "cgroup"),
            count(sockets_destroyed, "socket")
        );
    }
    if let Some(e) = not_persisted {
        bail!(
            "the revocation holds now but is NOT saved yet: {e}; the daemon tries \
             again every half second (its log says when it is durable); a \
             restart before then would lose it"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn status(socket: &Path, json: bool, check: bool) -> anyhow::Result<ExitCode> {
    let s = Client::status(socket)?;
    if check {
        return Ok(match &s.health {
            Health::Healthy { probe_at } => {
                println!("healthy: enforcing (probe denied at {probe_at})");
                ExitCode::SUCCESS
            }
            Health::Starting => {
                println!("starting: not enforcing yet");
                ExitCode::FAILURE
            }
            Health::Failed { reason } => {
                println!("failed: {reason}");
                ExitCode::FAILURE
            }
        });
    }
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn reload(socket: &Path) -> anyhow::Result<ExitCode> {
    let r = Client::reload(socket)?;
    println!(
        "reloaded: generation {}, {}, {}",
        r.generation,
        count_plural(r.policies, "policy", "policies"),
        count(r.rule_nodes, "rule node")
    );
    Ok(ExitCode::SUCCESS)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn quarantine(socket: &Path, cgroup: String, lift: bool) -> anyhow::Result<ExitCode> {
    println!(
        "{}",
        Client::done(socket, &Request::Quarantine { cgroup, lift })?
    );
    Ok(ExitCode::SUCCESS)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn enforce_self(socket: &Path) -> anyhow::Result<ExitCode> {
    println!("{}", Client::done(socket, &Request::EnforceSelf)?);
    Ok(ExitCode::SUCCESS)
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn events(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = Client::events(socket)?;
    loop {
        match c.next_event()? {
            Streamed::Event(e) if json => println!("{}", serde_json::to_string(&e)?),
            Streamed::Event(e) => println!(
                "{} {:5} {:11} {}[{}] -> {}:{} {} {} {} {}",
                e.time,
                e.verdict,
                e.hook,
                e.comm,
                e.tgid,
                e.dst.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                e.port,
                e.protocol,
                e.reason,
                e.policy.as_deref().unwrap_or("-"),
                e.rule.as_deref().unwrap_or("-"),
            ),
            // In JSON, a line of its own kind: every line of the stream stays a JSON object.
            Streamed::Lagged(missed) if json => println!(
                "{}",
                serde_json::json!({ "missed": missed, "why": "reading too slowly" })
            ),
            Streamed::Lagged(missed) => println!("# {missed} events missed: reading too slowly"),
        }
    }
}

/// `1 rule`, `2 rules`.
pub(super) fn count(n: impl TryInto<u64>, one: &str) -> String {
    count_plural(n, one, &format!("{one}s"))
}

pub(super) fn count_plural(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n: u64 = n.try_into().unwrap_or(u64::MAX);
    format!("{n} {}", if n == 1 { one } else { many })
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn print_status(s: &Status) {
    println!("agentwall {}: {}", s.version, s.health);
    for m in &s.protections.missing {
        println!("  MISSING: {m}");
    }
    println!(
        "policy generation {} ({}) from {}",
        s.generation,
        count(s.rule_nodes, "rule node"),
        s.policy_dir
    );
    for p in &s.policies {
        println!(
            "  policy {:<24} slot {:<4} {}, {}",
            p.name,
            p.slot,
            p.mode,
            count(p.rules, "rule")
        );
    }
    println!("cgroups under {}:", s.cgroup_root);
    for c in &s.cgroups {
        println!(
            "  {} id {} policy {} ({}{}{}{}{})",
            c.path,
            c.id,
            c.policy.as_deref().unwrap_or("-"),
            c.kind,
            if c.leased { ", running" } else { "" },
            c.root_uid
                .map(|u| format!(", root runs as host uid {u}"))
                .unwrap_or_default(),
            if c.quarantined { ", QUARANTINED" } else { "" },
            if c.revoked { ", REVOKED" } else { "" }
        );
        if let Some(id) = &c.spiffe_id {
            println!(
                "      identity {id} serial {} until {}",
                c.serial.as_deref().unwrap_or("-"),
                c.expires_at.as_deref().unwrap_or("-")
            );
        }
    }
    let counters: Vec<String> = s
        .kernel_counters
        .totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("kernel counters: {}", counters.join(" "));
    if !s.daemon_errors.is_empty() {
        let errors: Vec<String> = s
            .daemon_errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("daemon errors: {}", errors.join(" "));
    }
    if let Some(f) = &s.fleet {
        println!(
            "fleet node {} via {}: {}, revision {}; {} applied, {} published, {} refused",
            f.node,
            f.endpoints.join(","),
            if f.connected {
                "connected".to_string()
            } else {
                format!(
                    "CUT OFF ({}), enforcing what it has",
                    f.last_error.as_deref().unwrap_or("not connected yet")
                )
            },
            f.revision,
            count(f.applied, "revocation"),
            f.published,
            f.refused,
        );
        if let Some(v) = f.policy_bundle {
            println!("  policies from fleet bundle version {v}");
        }
        if f.bundles_refused > 0 {
            println!(
                "  {} refused{}",
                count(f.bundles_refused, "bundle"),
                f.bundle_error
                    .as_deref()
                    .map(|e| format!(", the last: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    let a = &s.audit;
    println!(
        "audit {}: {} durable (last {}, checkpoint {}){}; {}; {}",
        a.dir,
        count(a.committed, "record"),
        a.last_seq,
        a.last_checkpoint_seq,
        if a.failing { ", FAILING" } else { "" },
        count(a.write_errors, "write error"),
        count(a.alerts, "alert"),
    );
    let l = &a.event_to_durable;
    if l.count > 0 {
        println!(
            "  kernel event to durable record: p50 {} us, p99 {} us, max {} us over {}",
            l.p50_us,
            l.p99_us,
            l.max_us,
            count(l.count, "event")
        );
    }
    for (name, k) in &a.sinks {
        println!(
            "  sink {name}: {} sent, {} dropped, {}{}{}",
            k.sent,
            k.dropped,
            count(k.errors, "error"),
            if k.connected { ", connected" } else { "" },
            k.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
}
