//! Kernel events: decoding ring buffer records and delivering them to logs and subscribers.

use std::sync::Arc;

use agentwall_common::event::Event;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::broadcast};

pub mod summary;
pub use crate::verdict::unix_names;

pub use crate::verdict::{
    BootClock, EventRecord, Resolve, SummaryFlow, VerdictSummary, display_addr,
};
pub(crate) use crate::verdict::{code_name, family_name, is_unix, proto_name};

/// Reads the ring buffer until the process ends, logging every record and sending it to
/// subscribers. A subscriber that falls behind loses records (counted by broadcast), never
/// the reader.
pub async fn read_ring(
    ring: RingBuf<MapData>,
    names: Arc<dyn Resolve + Send + Sync>,
    tx: broadcast::Sender<Arc<EventRecord>>,
    audit: Option<crate::audit::sink::AuditHandle>,
    detector: Option<Arc<std::sync::Mutex<crate::audit::detect::Detector>>>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, open and unchanged until the AsyncFd drops it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Allowed verdicts are written without waking the reader (see ebpf/src/emit.rs): poll,
    // every POLL_INTERVAL while records come, and less often the longer none come (an idle
    // host's daemon would otherwise wake 200 times a second for nothing).
    let mut pause = POLL_INTERVAL;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), names.as_ref(), &tx, audit.as_ref(), detector.as_deref());
                guard.clear_ready();
                pause = POLL_INTERVAL;
            }
            () = tokio::time::sleep(pause) => {
                let n = drain(fd.get_mut(), names.as_ref(), &tx, audit.as_ref(), detector.as_deref());
                pause = next_pause(pause, n);
            }
        }
    }
}

/// How often the reader looks for records written without a wakeup while they come. Short, so
/// that a drain stays short: a denial wakes the reader, often on the CPU of the agent that was
/// denied, and that agent waits while the reader drains every verdict written since its last
/// look (at 50 ms, with an agent connecting flat out, up to ~1 ms: a revocation's first EPERM
/// came that late).
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// The longest pause between looks, after a while without records. The first look after an
/// idle spell may drain up to this much of an agent's allowed verdicts, once.
pub const IDLE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The pause after a look that found `records`: back to the shortest when any came, else
/// twice as long, up to [`IDLE_POLL_INTERVAL`].
fn next_pause(pause: std::time::Duration, records: usize) -> std::time::Duration {
    if records > 0 {
        POLL_INTERVAL
    } else {
        (pause * 2).min(IDLE_POLL_INTERVAL)
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    names: &dyn Resolve,
    tx: &broadcast::Sender<Arc<EventRecord>>,
    audit: Option<&crate::audit::sink::AuditHandle>,
    detector: Option<&std::sync::Mutex<crate::audit::detect::Detector>>,
) -> usize {
    let clock = BootClock::now();
    let mut records = 0;
    // Held for the batch; the baselines are saved between batches.
    let mut detector =
        detector.map(|d| d.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    while let Some(item) = ring.next() {
        records += 1;
        let Some(raw) = Event::from_bytes(&item) else {
            tracing::warn!(len = item.len(), "short record in the event ring; skipped");
            continue;
        };
        let at = clock.wall(raw.ts_boot_ns);
        let mut rec = EventRecord::decode_at(&raw, names, at);
        if is_unix(raw.hook) {
            let name = agentwall_common::unix::UnixEvent::name_from_bytes(&item);
            if let Some(n) = &name {
                names.learn_unix_name(raw.cgroup_id, n.0);
            }
            rec.unix = Some(name.map_or_else(
                || "(name missing from a short record)".into(),
                |n| n.to_string(),
            ));
        }
        let rec = Arc::new(rec);
        log(&rec);
        // Waits while the audit queue is full: the kernel ring then fills and counts the loss.
        if let Some(a) = audit {
            a.record_verdict(
                crate::audit::record::verdict(&raw, &rec, at),
                raw.ts_boot_ns,
            );
            if let (Some(d), Some(identity)) = (
                detector.as_deref_mut(),
                rec.spiffe_id.clone().or_else(|| rec.policy.clone()),
            ) {
                let obs = crate::audit::detect::Observation {
                    identity,
                    at,
                    dst: rec.dst,
                    port: rec.port,
                    protocol: rec.protocol.clone(),
                    allowed: rec.verdict == "allow",
                };
                for alert in d.observe(&obs) {
                    tracing::warn!(?alert, "behavioral alert");
                    a.state
                        .alerts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    a.record(&crate::audit::schema::AuditRecord::Alert(alert));
                }
            }
        }
        let _ = tx.send(rec);
    }
    records
}

/// Every verdict goes to the audit log; the daemon's own log shows them at debug level
/// (`RUST_LOG=agentwall::verdict=debug`), so that a flood of denials costs no log formatting.
fn log(r: &EventRecord) {
    if !tracing::enabled!(target: "agentwall::verdict", tracing::Level::DEBUG) {
        return;
    }
    let dst = r
        .dst
        .map(|a| a.to_string())
        .or_else(|| r.unix.clone())
        .unwrap_or_default();
    tracing::debug!(target: "agentwall::verdict", hook = %r.hook, verdict = %r.verdict, reason = %r.reason,
        cgroup_id = r.cgroup_id, pid = r.tgid, comm = %r.comm, protocol = %r.protocol, dst = %dst,
        port = r.port, rule_id = r.rule_id, rule = r.rule.as_deref().unwrap_or(""),
        policy = r.policy.as_deref().unwrap_or(""), "verdict");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_looks_less_often_while_idle_and_at_once_again_when_busy() {
        let mut p = POLL_INTERVAL;
        for _ in 0..10 {
            p = next_pause(p, 0);
        }
        assert_eq!(p, IDLE_POLL_INTERVAL);
        assert_eq!(next_pause(p, 3), POLL_INTERVAL);
        assert_eq!(next_pause(POLL_INTERVAL, 0), POLL_INTERVAL * 2);
    }
}
