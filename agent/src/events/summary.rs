//! Summaries of the verdicts the event budgets held back (`agentwall_common::budget`): once
//! per interval, one `verdict_summary` record per agent over its budget, with its busiest
//! flows and an exact total, and an `event_flood` alert for each such agent.
//!
//! The total comes from the agent's bucket, a counter the kernel only adds to, so it is exact
//! even when the per-flow breakdown is not complete (the kernel's table of flows full, or a
//! verdict counted while its flow was being read): the difference is stated, never lost.
//! The totals are read before the flows, and the kernel counts a verdict in its flow before
//! its total, so a window's flows hold every verdict of its total that was kept.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use agentwall_common::{
    budget::{self, Summary, SummaryKey},
    event::Verdict,
};

use super::{BootClock, Resolve, code_name, display_addr, family_name, is_unix, proto_name};
pub use crate::verdict::{SummaryFlow, VerdictSummary};
use crate::{
    audit::{detect::Alert, sink::AuditHandle},
    config::EventsConfig,
    enforce::budgets::EventBudgets,
};

/// Denied flows listed in one summary record, the busiest first; the rest are counted
/// together.
pub const MAX_DENIED_FLOWS: usize = 16;
/// Allowed flows listed in one summary record, in the order they began. Each is a
/// destination the agent reached, so all are listed: past this many, in further records.
pub const MAX_ALLOWED_FLOWS: usize = 256;

/// Reads the budget maps and writes the summaries; owned by the event reader.
pub struct Summarizer {
    budgets: EventBudgets,
    cfg: EventsConfig,
    /// Each bucket's count of held-back verdicts as last reported, kept in `seen_file` after
    /// every window: the buckets are pinned, and the next daemon reports from there.
    seen: HashMap<u64, u64>,
    seen_file: std::path::PathBuf,
    /// When each bucket last raised a flood alert.
    alerted: HashMap<u64, SystemTime>,
    window_start: SystemTime,
}

impl std::fmt::Debug for Summarizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summarizer")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock(s: &Mutex<Summarizer>) -> std::sync::MutexGuard<'_, Summarizer> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

impl Summarizer {
    /// Applies the budgets of `cfg` to the programs (before any is attached).
    ///
    /// `seen_file` holds what an earlier daemon reported of the pinned buckets' counts; what
    /// they counted since (while no daemon ran, or after a crash) is reported in the first
    /// window. Without the file (a first start, or a lost file) every count is reported: a
    /// window may then repeat counts an earlier daemon reported, never miss any.
    pub fn start(
        mut budgets: EventBudgets,
        cfg: EventsConfig,
        seen_file: std::path::PathBuf,
    ) -> Result<Self, crate::enforce::EnforceError> {
        budgets.set(cfg.kernel())?;
        let seen = match std::fs::read(&seen_file) {
            Ok(bytes) => serde_json::from_slice::<HashMap<String, u64>>(&bytes)
                .map(|m| {
                    m.into_iter()
                        .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
                        .collect()
                })
                .unwrap_or_else(|e| {
                    tracing::warn!(path = %seen_file.display(), error = %e, "unreadable record of the event budgets' counts; every count left by the last daemon is reported again");
                    HashMap::new()
                }),
            Err(_) => HashMap::new(),
        };
        Ok(Self {
            budgets,
            cfg,
            seen,
            seen_file,
            alerted: HashMap::new(),
            window_start: SystemTime::now(),
        })
    }

    /// Keeps what was reported, for the next daemon.
    fn save_seen(&self) {
        let m: HashMap<String, u64> = self.seen.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let r = serde_json::to_vec(&m)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::state::write_atomic(&self.seen_file, &b, 0o600));
        if let Err(e) = r {
            tracing::warn!(path = %self.seen_file.display(), error = %e, "cannot keep the event budgets' reported counts");
        }
    }

    pub fn every(&self) -> Duration {
        self.cfg.summary_every
    }

    /// Writes a window's summaries every [`Self::every`], on a thread of its own: reading
    /// and emptying the tables takes a syscall per entry, which must not hold up the reader
    /// of the event ring. The daemon's last window is its [`Self::close`].
    pub fn spawn(
        this: Arc<Mutex<Self>>,
        names: Arc<dyn Resolve + Send + Sync>,
        audit: AuditHandle,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let every = lock(&this).every();
        std::thread::Builder::new()
            .name("agentwall-summary".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    lock(&this).run(names.as_ref(), &audit);
                }
            })
    }

    /// Writes the summaries of the window that ends now, and the flood alerts.
    pub fn run(&mut self, names: &dyn Resolve, audit: &AuditHandle) {
        // Totals first: see the module's documentation.
        let totals = self.budgets.suppressed();
        let entries = self.budgets.take_summaries();
        let now = SystemTime::now();
        let summaries = build(
            entries,
            &totals,
            &mut self.seen,
            names,
            BootClock::now(),
            (self.window_start, now),
        );
        let window_secs = now
            .duration_since(self.window_start)
            .map_or(0, |d| d.as_secs().max(1));
        self.window_start = now;
        self.save_seen();
        let quiet = self.cfg.flood_alert_every;
        self.alerted
            .retain(|_, at| now.duration_since(*at).is_ok_and(|d| d < quiet));
        for s in summaries {
            audit.state.event_summaries.fetch_add(1, Ordering::Relaxed);
            audit
                .state
                .events_suppressed
                .fetch_add(s.suppressed, Ordering::Relaxed);
            let key = s.cgroup_id.unwrap_or(budget::UNBOUND_KEY);
            let alert =
                (s.suppressed > 0 && !self.alerted.contains_key(&key)).then(|| Alert::EventFlood {
                    identity: s
                        .spiffe_id
                        .clone()
                        .or_else(|| s.policy.clone())
                        .unwrap_or_else(|| "cgroups without a binding".into()),
                    cgroup_id: s.cgroup_id,
                    suppressed: s.suppressed,
                    window_secs,
                    budget_per_second: self.cfg.cgroup_rate,
                });
            audit.record(&crate::audit::schema::AuditRecord::VerdictSummary(s));
            if let Some(alert) = alert {
                tracing::warn!(?alert, "behavioral alert");
                self.alerted.insert(key, now);
                audit.state.alerts.fetch_add(1, Ordering::Relaxed);
                audit.state.event_floods.fetch_add(1, Ordering::Relaxed);
                audit.record(&crate::audit::schema::AuditRecord::Alert(alert));
            }
        }
    }

    /// At shutdown: the last summaries. The budgets stay in force in the pinned maps; what
    /// the programs hold back until the next daemon takes over is counted there, and that
    /// daemon reports it.
    pub fn close(&mut self, names: &dyn Resolve, audit: &AuditHandle) {
        self.run(names, audit);
    }
}

/// The summaries of one window: `entries` as taken from the kernel, `totals` each bucket's
/// running count of verdicts held back, `seen` those counts as of the last window (updated).
fn build(
    entries: Vec<(SummaryKey, Summary)>,
    totals: &[(u64, u64)],
    seen: &mut HashMap<u64, u64>,
    names: &dyn Resolve,
    clock: BootClock,
    (start, end): (SystemTime, SystemTime),
) -> Vec<VerdictSummary> {
    // Held back in this window, by bucket, then by cgroup (its allowed and denied buckets
    // together). A bucket the kernel evicted and made again counts from zero: its count is
    // then all new.
    let mut delta: HashMap<u64, u64> = HashMap::new();
    let mut live = HashMap::with_capacity(totals.len());
    for &(key, n) in totals {
        let before = seen.get(&key).copied().unwrap_or(0);
        let d = if n >= before { n - before } else { n };
        let group = if key == budget::UNBOUND_KEY {
            Some(key)
        } else {
            budget::cgroup_of_key(key)
        };
        if let (true, Some(group)) = (d > 0, group) {
            *delta.entry(group).or_default() += d;
        }
        live.insert(key, n);
    }
    *seen = live;
    let mut flows: HashMap<u64, Vec<(SummaryKey, Summary)>> = HashMap::new();
    for (k, v) in entries {
        let key = if budget::unbound(k.reason) {
            budget::UNBOUND_KEY
        } else {
            k.cgroup_id
        };
        flows.entry(key).or_default().push((k, v));
    }
    let mut keys: Vec<u64> = delta.keys().chain(flows.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let (mut allowed, mut denied): (Vec<_>, Vec<_>) = flows
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .partition(|(k, _)| k.verdict == Verdict::ALLOW);
        allowed.sort_by_key(|(_, v)| v.first_ns);
        denied.sort_by_key(|(_, v)| std::cmp::Reverse(v.count));
        let counted: u64 = allowed.iter().chain(&denied).map(|(_, v)| v.count).sum();
        // The bucket's count is exact; the flows' may be off at the window's edges (a
        // verdict's two counts are not taken in one step), so it is not the total.
        let suppressed = delta.get(&key).copied().unwrap_or(0);
        let slot = allowed
            .iter()
            .chain(&denied)
            .map(|(k, _)| k.slot)
            .find(|s| *s != 0);
        let bound = key != budget::UNBOUND_KEY;
        let d = denied.len().min(MAX_DENIED_FLOWS);
        let rest = &denied[d..];
        // Every allowed flow is listed: past MAX_ALLOWED_FLOWS in further records of the
        // same window, which carry flows only (the totals are the first record's).
        let mut chunks = allowed.chunks(MAX_ALLOWED_FLOWS);
        let first: Vec<SummaryFlow> = chunks
            .next()
            .unwrap_or_default()
            .iter()
            .chain(&denied[..d])
            .map(|(k, v)| flow(k, v, clock, names))
            .collect();
        let record = |part: u32, flows: Vec<SummaryFlow>| VerdictSummary {
            time: rfc3339(end),
            window_start: rfc3339(start),
            cgroup_id: bound.then_some(key),
            policy: slot.and_then(|s| names.policy(s)),
            spiffe_id: bound.then(|| names.identity(key)).flatten(),
            part,
            suppressed: 0,
            other_flows: 0,
            other_count: 0,
            unattributed: 0,
            flows,
        };
        out.push(VerdictSummary {
            suppressed,
            other_flows: rest.len() as u64,
            other_count: rest.iter().map(|(_, v)| v.count).sum(),
            unattributed: suppressed.saturating_sub(counted),
            ..record(0, first)
        });
        for (i, chunk) in chunks.enumerate() {
            let flows = chunk
                .iter()
                .map(|(k, v)| flow(k, v, clock, names))
                .collect();
            out.push(record(u32::try_from(i + 1).unwrap_or(u32::MAX), flows));
        }
    }
    out
}

fn flow(k: &SummaryKey, v: &Summary, clock: BootClock, names: &dyn Resolve) -> SummaryFlow {
    let unix = is_unix(k.hook);
    let has_addr = !unix
        && k.hook != agentwall_common::event::Hook::SOCK_CREATE
        && k.reason != agentwall_common::event::Reason::UNPARSED;
    SummaryFlow {
        cgroup_id: k.cgroup_id,
        hook: code_name(k.hook.name(), k.hook.0),
        verdict: code_name(k.verdict.name(), k.verdict.0),
        reason: code_name(k.reason.name(), k.reason.0),
        protocol: proto_name(k.proto),
        family: family_name(k.family),
        dst: has_addr.then(|| display_addr(&k.addr)),
        port: if unix { 0 } else { k.port },
        socket: unix.then(|| names.unix_name(k.cgroup_id, &k.addr, k.port)),
        count: v.count,
        first: rfc3339(clock.wall(v.first_ns)),
        last: rfc3339(clock.wall(v.last_ns)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentwall_common::event::{Hook, Reason, Verdict};

    struct Names;
    impl Resolve for Names {
        fn policy(&self, slot: u32) -> Option<String> {
            (slot == 3).then(|| "web".into())
        }
        fn rule(&self, _: u32, _: u32) -> Option<String> {
            None
        }
        fn identity(&self, cgroup_id: u64) -> Option<String> {
            (cgroup_id == 42).then(|| "spiffe://example.org/web".into())
        }
    }

    fn key(cgroup_id: u64, slot: u32, port: u16) -> SummaryKey {
        SummaryKey {
            cgroup_id,
            addr: agentwall_common::addr::from_v4([127, 0, 0, 1]),
            port,
            hook: Hook::CONNECT4,
            proto: 6,
            verdict: Verdict::DENY,
            reason: if slot == 0 {
                Reason::NO_BINDING
            } else {
                Reason::NO_RULE
            },
            family: 2,
            slot,
            ..Default::default()
        }
    }

    fn count(n: u64) -> Summary {
        Summary {
            count: n,
            first_ns: 1,
            last_ns: 2,
        }
    }

    fn window() -> (SystemTime, SystemTime) {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        (t, t + Duration::from_secs(10))
    }

    #[test]
    fn totals_come_from_the_buckets_and_the_gap_is_stated() {
        let mut seen = HashMap::from([(42, 100)]);
        let out = build(
            vec![(key(42, 3, 80), count(30)), (key(42, 3, 81), count(50))],
            &[(42, 200)],
            &mut seen,
            &Names,
            BootClock::now(),
            window(),
        );
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.cgroup_id, Some(42));
        assert_eq!(s.policy.as_deref(), Some("web"));
        assert_eq!(s.spiffe_id.as_deref(), Some("spiffe://example.org/web"));
        assert_eq!(
            s.suppressed, 100,
            "the bucket's count since the last window"
        );
        assert_eq!(s.unattributed, 20);
        assert_eq!(s.flows[0].port, 81, "the busiest flow first");
        assert_eq!(s.flows[0].dst, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(seen[&42], 200);
    }

    #[test]
    fn flows_past_the_limit_are_counted_together() {
        let entries: Vec<_> = (0..(MAX_DENIED_FLOWS as u16 + 4))
            .map(|p| (key(7, 3, 1000 + p), count(u64::from(p) + 1)))
            .collect();
        let total: u64 = entries.iter().map(|(_, v)| v.count).sum();
        let out = build(
            entries,
            &[(7, total)],
            &mut HashMap::new(),
            &Names,
            BootClock::now(),
            window(),
        );
        let s = &out[0];
        assert_eq!(s.flows.len(), MAX_DENIED_FLOWS);
        assert_eq!(s.other_flows, 4);
        assert_eq!(s.other_count, 1 + 2 + 3 + 4);
        assert_eq!(s.suppressed, total);
        assert_eq!(s.unattributed, 0);
    }

    #[test]
    fn unbound_cgroups_share_one_summary_and_a_remade_bucket_counts_from_zero() {
        let mut seen = HashMap::from([(budget::UNBOUND_KEY, 500), (9, 4)]);
        let out = build(
            vec![(key(5, 0, 80), count(2)), (key(6, 0, 80), count(3))],
            &[(budget::UNBOUND_KEY, 5)],
            &mut seen,
            &Names,
            BootClock::now(),
            window(),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cgroup_id, None);
        assert_eq!(out[0].suppressed, 5);
        assert_eq!(out[0].flows.len(), 2);
        assert!(!seen.contains_key(&9), "gone buckets are forgotten");
    }

    #[test]
    fn every_allowed_flow_is_listed_however_busy_the_denied_ones() {
        // An agent floods many denied destinations to bury the one it reached.
        let mut entries: Vec<_> = (0..200u16)
            .map(|p| (key(7, 3, 2000 + p), count(1000)))
            .collect();
        let mut reached = key(7, 3, 443);
        reached.verdict = Verdict::ALLOW;
        reached.reason = Reason::RULE;
        entries.push((reached, count(1)));
        let out = build(
            entries,
            &[
                (budget::cgroup_key(7, false), 200_000),
                (budget::cgroup_key(7, true), 1),
            ],
            &mut HashMap::new(),
            &Names,
            BootClock::now(),
            window(),
        );
        assert_eq!(out.len(), 1, "one record per cgroup, both buckets together");
        let s = &out[0];
        assert_eq!(s.suppressed, 200_001);
        assert!(
            s.flows
                .iter()
                .any(|f| f.port == 443 && f.verdict == "allow" && f.count == 1),
            "{s:?}"
        );
        assert_eq!(s.other_flows, 200 - MAX_DENIED_FLOWS as u64);
    }

    #[test]
    fn allowed_flows_past_one_record_go_on_in_further_records() {
        let n = MAX_ALLOWED_FLOWS as u16 * 2 + 3;
        let entries: Vec<_> = (0..n)
            .map(|p| {
                let mut k = key(7, 3, 3000 + p);
                k.verdict = Verdict::ALLOW;
                k.reason = Reason::RULE;
                (k, count(1))
            })
            .collect();
        let out = build(
            entries,
            &[(budget::cgroup_key(7, true), u64::from(n))],
            &mut HashMap::new(),
            &Names,
            BootClock::now(),
            window(),
        );
        assert_eq!(out.len(), 3);
        assert_eq!(
            out.iter().map(|s| s.flows.len()).sum::<usize>(),
            usize::from(n),
            "every allowed flow listed"
        );
        assert_eq!((out[0].part, out[2].part), (0, 2));
        assert_eq!(out.iter().map(|s| s.suppressed).sum::<u64>(), u64::from(n));
        assert_eq!(out[0].unattributed, 0);
    }

    #[test]
    fn a_quiet_window_writes_nothing() {
        let mut seen = HashMap::from([(42, 10)]);
        let out = build(
            vec![],
            &[(42, 10)],
            &mut seen,
            &Names,
            BootClock::now(),
            window(),
        );
        assert!(out.is_empty());
    }
}
