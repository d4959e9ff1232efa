//! The event budget maps of the loaded object (`agentwall_common::budget`): the daemon writes
//! the budgets before any program is attached, and takes the summaries of the verdicts held
//! back.

use agentwall_common::{
    budget::{self, Bucket, BudgetConfig, Summary, SummaryKey},
    maps,
};
use aya::maps::{Array, HashMap, MapData};

use super::{EnforceError, map_err};

/// The budget maps, out of the [`super::Enforcer`]: read by the event reader's thread, not the
/// enforcement thread, so that a long read never delays a revocation.
pub struct EventBudgets {
    config: Array<MapData, BudgetConfig>,
    buckets: HashMap<MapData, u64, Bucket>,
    summaries: HashMap<MapData, SummaryKey, Summary>,
    allowed: HashMap<MapData, SummaryKey, Summary>,
}

impl std::fmt::Debug for EventBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBudgets").finish_non_exhaustive()
    }
}

impl EventBudgets {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, EnforceError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EnforceError::Missing { kind: "map", name })
        };
        Ok(Self {
            config: Array::try_from(take(maps::BUDGET_CONFIG)?)
                .map_err(map_err(maps::BUDGET_CONFIG, "opening"))?,
            buckets: HashMap::try_from(take(maps::BUDGETS)?)
                .map_err(map_err(maps::BUDGETS, "opening"))?,
            summaries: HashMap::try_from(take(maps::SUMMARIES)?)
                .map_err(map_err(maps::SUMMARIES, "opening"))?,
            allowed: HashMap::try_from(take(maps::ALLOWED_SUMMARIES)?)
                .map_err(map_err(maps::ALLOWED_SUMMARIES, "opening"))?,
        })
    }

    /// Sets the budgets the programs apply from their next verdict on; all zero is none.
    pub fn set(&mut self, config: BudgetConfig) -> Result<(), EnforceError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(maps::BUDGET_CONFIG, "writing"))
    }

    /// Takes every summary: each is read and removed, so that the next read holds only what
    /// was counted after it. A verdict counted between the read and the removal of its entry
    /// is missing from the breakdown, not from the totals ([`Self::suppressed`]).
    pub fn take_summaries(&mut self) -> Vec<(SummaryKey, Summary)> {
        let mut out = Vec::new();
        for map in [&mut self.allowed, &mut self.summaries] {
            // The keys first, once each: a walk of a map that changes under it may restart.
            let keys: std::collections::HashSet<SummaryKey> =
                map.keys().filter_map(Result::ok).collect();
            for k in keys {
                if let Ok(v) = map.get(&k, 0) {
                    out.push((k, v));
                }
                let _ = map.remove(&k);
            }
        }
        out
    }

    /// The verdicts each bucket held back since it was made, by bucket key: the cgroup
    /// buckets and the unbound one (identity buckets count in their cgroups').
    pub fn suppressed(&self) -> Vec<(u64, u64)> {
        // By key: a walk of a map that changes under it (an eviction) restarts, and a key
        // seen twice must not count twice.
        let by_key: std::collections::HashMap<u64, u64> = self
            .buckets
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| *k == budget::UNBOUND_KEY || budget::cgroup_of_key(*k).is_some())
            .map(|(k, b)| (k, b.suppressed))
            .collect();
        by_key.into_iter().collect()
    }
}
