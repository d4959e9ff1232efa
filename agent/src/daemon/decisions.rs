//! Decisions for callees and gateways (the decision API, `crate::decision`): who the caller
//! is, which policy governs it, and what that policy says of the resource, the action and
//! the attributes; every decision is audited.
//!
//! The caller is named one of four ways. A certificate chain or a JWT-SVID is verified here
//! (trust bundle, expiry, revocation) and names its holder. A process id on this host is
//! placed by the kernel's account of its cgroup. A bare SPIFFE ID is taken as the asker
//! verified it (an mTLS peer it accepted); it is still refused if the identity is revoked.
//!
//! Rate limits of rules are counted here per asker, caller identity and rule, apart from the
//! kernel's buckets: a decision is one use. The asker is part of the key so that one asker
//! cannot spend the budget another asker's answers about the same caller draw on.

use std::{collections::HashMap, sync::Mutex};

use serde::Serialize;

use super::Daemon;
use crate::{
    audit::schema::{AuditRecord, Suppressed},
    cgroup::Cgroup,
    policy::{
        self,
        decide::{Answer, Query},
    },
    spiffe::SpiffeId,
};

/// Most (asker, caller, rule) buckets of the decision API's rate limits; past it, the
/// eighth that filled longest ago make room.
const MAX_BUCKETS: usize = 65_536;
/// Most buckets of one asker; past it, that asker's queries to rate-limited rules about new
/// callers are refused (it cannot push out the buckets of others).
const MAX_BUCKETS_PER_ASKER: usize = 4096;

/// How a query names its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerRef {
    SpiffeId(String),
    Certificate(String),
    Jwt { token: String, audience: String },
    Pid(i32),
}

/// A decision with the caller it was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decided {
    /// The caller's SPIFFE ID, when it has one.
    pub caller: Option<String>,
    /// The policy that governs it.
    pub policy: Option<String>,
    #[serde(flatten)]
    pub answer: Answer,
}

/// Rate-limit buckets of the decision API: (asker, caller, rule bucket) → theoretical
/// arrival time on the boot clock, and how many each asker holds.
#[derive(Debug, Default)]
pub(crate) struct DecisionBuckets(Mutex<BucketMap>);

#[derive(Debug, Default)]
struct BucketMap {
    tat: HashMap<(String, String, u32), u64>,
    per_asker: HashMap<String, usize>,
}

impl DecisionBuckets {
    fn take(&self, asker: &str, caller: &str, limit: &agentwall_common::rules::Limit) -> bool {
        let now = crate::clock::boot_ns();
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (asker.to_string(), caller.to_string(), limit.bucket);
        if !map.tat.contains_key(&key) {
            if map.per_asker.get(asker).copied().unwrap_or(0) >= MAX_BUCKETS_PER_ASKER {
                return false;
            }
            if map.tat.len() >= MAX_BUCKETS {
                map.evict_oldest();
            }
            *map.per_asker.entry(asker.to_string()).or_default() += 1;
        }
        let tat = map.tat.entry(key).or_insert(0);
        match limit.rate.take(*tat, now) {
            Some(next) => {
                *tat = next;
                true
            }
            None => false,
        }
    }
}

impl BucketMap {
    /// Removes the eighth of the buckets that filled up earliest (a bucket gone is a full one:
    /// the oldest are the nearest to full anyway).
    fn evict_oldest(&mut self) {
        let mut tats: Vec<u64> = self.tat.values().copied().collect();
        let cut = tats.len() / 8;
        let (_, pivot, _) = tats.select_nth_unstable(cut);
        let pivot = *pivot;
        let per_asker = &mut self.per_asker;
        self.tat.retain(|(asker, _, _), tat| {
            let keep = *tat > pivot;
            if !keep && let Some(n) = per_asker.get_mut(asker) {
                *n = n.saturating_sub(1);
            }
            keep
        });
        per_asker.retain(|_, n| *n > 0);
    }
}

/// Records of decisions per asker a second, in bursts of twice that; past it, decisions are
/// counted into the asker's next record.
const RECORDS_PER_ASKER: u32 = 100;
/// Attribute values are recorded up to this many bytes.
const RECORDED_VALUE: usize = 128;

/// The record budget of each asker: its bucket and what it held back since its last record.
#[derive(Debug, Default)]
pub(crate) struct RecordBudget(Mutex<HashMap<String, (u64, Suppressed)>>);

impl RecordBudget {
    /// Whether a decision of `asker` is recorded now, with what was held back before it; if
    /// not, it is counted.
    pub(super) fn admit(&self, asker: &str, allow: bool) -> Option<Option<Suppressed>> {
        let rate = agentwall_common::budget::Rate::new(RECORDS_PER_ASKER, 2 * RECORDS_PER_ASKER);
        let now = crate::clock::boot_ns();
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= 4096 && !m.contains_key(asker) {
            // Askers back to a full budget with nothing held back hold nothing worth keeping.
            m.retain(|_, (tat, held)| *tat > now || held.allowed + held.denied > 0);
        }
        let (tat, held) = m.entry(asker.to_string()).or_default();
        match rate.take(*tat, now) {
            Some(next) => {
                *tat = next;
                let before = std::mem::take(held);
                Some((before.allowed + before.denied > 0).then_some(before))
            }
            None => {
                if allow {
                    held.allowed += 1;
                } else {
                    held.denied += 1;
                }
                None
            }
        }
    }
}

/// Who the caller turned out to be: its identity (if any) and the policy governing it, or
/// why none.
type Resolved = Result<(Option<String>, String), String>;

impl Daemon {
    /// Answers `q` for `caller`. `asker` names who asked, stably (the rate-limit buckets the
    /// answer draws on are the asker's); `asker_detail` says it for the audit record.
    pub async fn decide(
        &self,
        caller: &CallerRef,
        q: &Query,
        asker: &str,
        asker_detail: &str,
    ) -> Decided {
        let resolved = self.resolve_caller(caller).await;
        let decided = match resolved {
            Err(reason) => Decided {
                caller: match caller {
                    CallerRef::SpiffeId(id) => Some(id.clone()),
                    _ => None,
                },
                policy: None,
                answer: Answer {
                    allow: false,
                    rule_id: None,
                    rule: None,
                    reason,
                    audit: false,
                },
            },
            Ok((id, policy)) => {
                let who = id.clone().unwrap_or_else(|| format!("policy:{policy}"));
                let answer = self.judge(&policy, q, asker, &who).0;
                Decided {
                    caller: id,
                    policy: Some(policy),
                    answer,
                }
            }
        };
        let Some(suppressed) = self.decision_records.admit(asker, decided.answer.allow) else {
            return decided;
        };
        let attributes = q
            .attributes
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                if v.len() > RECORDED_VALUE {
                    let mut cut = RECORDED_VALUE;
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    v.truncate(cut);
                    v.push('…');
                }
                (k.clone(), v)
            })
            .collect();
        self.audit.record(&AuditRecord::Decision {
            caller: decided.caller.clone().unwrap_or_default(),
            caller_given: describe(caller),
            policy: decided.policy.clone().unwrap_or_default(),
            resource: q.resource.clone(),
            action: q.action.clone(),
            attributes,
            allow: decided.answer.allow,
            audit_only: decided.answer.audit,
            rule: decided.answer.rule.clone().unwrap_or_default(),
            reason: decided.answer.reason.clone(),
            asker: asker_detail.to_string(),
            suppressed,
        });
        decided
    }

    /// What `policy` (in force now) answers to `q` for caller `who`, whose rate limits draw
    /// on `asker`'s buckets; with the deciding rule's lease, for a secret.
    pub(super) fn judge(
        &self,
        policy: &str,
        q: &Query,
        asker: &str,
        who: &str,
    ) -> (Answer, Option<u64>) {
        let compiled = self.policies.current();
        let answer =
            policy::decide::decide(&compiled, policy, q, jiff::Timestamp::now(), |rule, _| {
                compiled
                    .limits
                    .iter()
                    .find(|l| l.rule_id == rule.id)
                    .is_some_and(|l| self.decision_buckets.take(asker, who, &l.limit))
            });
        // Rule ids are their places in the list, from 1.
        let lease = answer
            .rule_id
            .filter(|_| answer.allow && q.resource.starts_with("secret:"))
            .and_then(|id| {
                compiled
                    .rules
                    .get(usize::try_from(id).ok()?.checked_sub(1)?)
            })
            .filter(|r| Some(r.id) == answer.rule_id)
            .and_then(|r| r.access.as_ref())
            .and_then(|a| a.lease);
        (answer, lease)
    }

    /// The identity and the governing policy of `caller`.
    pub(super) async fn resolve_caller(&self, caller: &CallerRef) -> Resolved {
        let td = self.identity.trust_domain().to_string();
        let governed = |id: String| -> Resolved {
            let parsed = SpiffeId::workload(&id).map_err(|e| format!("{id:?}: {e}"))?;
            let grant = self
                .policies
                .grant_for(&parsed, &td)
                .ok_or_else(|| format!("no policy governs {id}"))?;
            Ok((Some(id), grant.policy))
        };
        match caller {
            CallerRef::SpiffeId(id) => {
                if let Err(e) = self.identity.check_revoked(id, "") {
                    return Err(format!("{id} is revoked: {e}"));
                }
                governed(id.clone())
            }
            CallerRef::Certificate(pem) => match self.check(pem) {
                Ok(c) if c.valid => governed(c.spiffe_id.unwrap_or_default()),
                Ok(c) => Err(format!(
                    "the caller's certificate is not valid: {}",
                    c.message
                )),
                Err(e) => Err(format!("the caller's certificate: {e}")),
            },
            CallerRef::Jwt { token, audience } => {
                let c = self.check_token(token, audience);
                if c.valid {
                    governed(c.spiffe_id.unwrap_or_default())
                } else {
                    Err(format!("the caller's token is not valid: {}", c.message))
                }
            }
            CallerRef::Pid(pid) => {
                let path = crate::identity::attest::cgroup_of(*pid)
                    .map_err(|e| format!("process {pid}: {e}"))?;
                let cg = Cgroup::under(&self.mount, path.trim_start_matches('/'))
                    .map_err(|e| format!("process {pid}: {e}"))?;
                let id = cg.id().map_err(|e| format!("process {pid}: {e}"))?;
                let Some((policy, bound, quarantined)) = self.registry.caller(id).await else {
                    return Err(format!(
                        "process {pid} is in {path}, which agentwall does not manage"
                    ));
                };
                if quarantined {
                    return Err(format!("process {pid}'s cgroup {path} is quarantined"));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                match bound {
                    Some(b) if b.revoked || b.cut_by(&self.identity) => Err(format!(
                        "process {pid}'s identity {} is revoked",
                        b.spiffe_id
                    )),
                    Some(b) if b.not_after <= now => Err(format!(
                        "process {pid}'s certificate for {} has expired",
                        b.spiffe_id
                    )),
                    Some(b) => governed(b.spiffe_id),
                    None => policy
                        .map(|p| (None, p))
                        .ok_or_else(|| format!("process {pid} holds no identity and no policy")),
                }
            }
        }
    }
}

/// The caller as the query gave it, for the audit record (never a token or a whole
/// certificate).
fn describe(caller: &CallerRef) -> String {
    match caller {
        CallerRef::SpiffeId(id) => format!("spiffe_id {id}"),
        CallerRef::Certificate(_) => "certificate".into(),
        CallerRef::Jwt { audience, .. } => format!("jwt for {audience}"),
        CallerRef::Pid(pid) => format!("pid {pid}"),
    }
}
