//! Event budgets: how many verdict records a cgroup (and an identity) may write to the ring
//! per second. Verdicts are never affected; past its budget, a cgroup's verdicts are counted
//! into summaries ([`SummaryKey`], [`Summary`]) instead of written one by one, so that one
//! agent's flood cannot crowd out the records of the others.
//!
//! Each budget is a token bucket kept in the generic cell rate form: one timestamp per
//! bucket, the theoretical arrival time of the next record. A record conforms when that time
//! is at most `tolerance` ahead of now; it then moves on by `interval` (the cost of one
//! record). A bucket is updated without a lock, so two CPUs writing at once may each let a
//! record through that one of them should have held back: the budget is exact to within a
//! record per CPU, which is all a record stream needs.

use crate::{
    addr::Addr16,
    event::{Hook, Reason, Verdict},
};

/// The bucket of verdicts without a binding (no policy, no binding): one for all such
/// cgroups, so that cgroups nobody bound (a subtree an agent made for itself) cannot each
/// bring a budget of their own.
pub const UNBOUND_KEY: u64 = u64::MAX;

/// Whether a verdict for `reason` goes to the [`UNBOUND_KEY`] bucket: only when the cgroup
/// has no binding to answer for it. Every other verdict, also those judged without a policy
/// slot (a raw socket, IP options, an address family, agentwall's own Unix sockets), is its
/// cgroup's: a bound agent cannot spend the budget that the unbound share.
#[inline(always)]
pub fn unbound(reason: Reason) -> bool {
    reason == Reason::NO_BINDING || reason == Reason::NO_POLICY
}
/// Set in the key of an identity's bucket, whose low bits are the policy slot.
pub const IDENTITY_KEY: u64 = 1 << 63;
/// Set in the key of a bucket of allowed verdicts. Allowed and denied verdicts have buckets
/// of their own, so that an agent cannot flood denials to have what it did reach summarized.
pub const ALLOWED_KEY: u64 = 1 << 62;

/// The key of a cgroup's bucket for verdicts that `allowed` or not.
#[inline(always)]
pub const fn cgroup_key(cgroup_id: u64, allowed: bool) -> u64 {
    if allowed {
        cgroup_id | ALLOWED_KEY
    } else {
        cgroup_id
    }
}

/// The key of the identity (policy slot) bucket for verdicts that `allowed` or not.
#[inline(always)]
pub const fn identity_key(slot: u32, allowed: bool) -> u64 {
    cgroup_key(IDENTITY_KEY | slot as u64, allowed)
}

/// The cgroup a cgroup bucket's key names, `None` for identity buckets and the unbound one.
pub const fn cgroup_of_key(key: u64) -> Option<u64> {
    if key & IDENTITY_KEY != 0 {
        None
    } else {
        Some(key & !ALLOWED_KEY)
    }
}

/// One rate: a record costs `interval_ns`; a burst of `tolerance_ns / interval_ns + 1`
/// records passes at once. `interval_ns == 0` means no budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}

impl Rate {
    /// `per_second` records a second, in bursts of up to `burst`; 0 for no budget.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        if per_second == 0 {
            return Self {
                interval_ns: 0,
                tolerance_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / per_second as u64;
        let burst = if burst == 0 { 1 } else { burst as u64 };
        Self {
            interval_ns,
            tolerance_ns: interval_ns * (burst - 1),
        }
    }

    /// The bucket's next arrival time if a record at `now` conforms, `None` if it is over
    /// budget. `tat` is the bucket's arrival time (0 for a new bucket).
    #[inline(always)]
    pub fn take(&self, tat: u64, now: u64) -> Option<u64> {
        if self.interval_ns == 0 {
            return Some(tat);
        }
        let start = if tat > now { tat } else { now };
        if start - now > self.tolerance_ns {
            return None;
        }
        Some(start + self.interval_ns)
    }
}

impl Rate {
    /// Whether a bucket whose arrival time is `tat` after a record at `now` has used at most
    /// half of its burst: such a cgroup is quiet, and its records are not charged to its
    /// identity's budget, so that busy cgroups of the same policy cannot spend it for it.
    #[inline(always)]
    pub fn quiet(&self, tat: u64, now: u64) -> bool {
        tat.saturating_sub(now) <= self.tolerance_ns / 2 + self.interval_ns
    }
}

/// The budgets, as the daemon writes them (one entry of `AW_BUDGET_CFG`). All zero (the
/// state before the daemon writes it) means no budget: every record is written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetConfig {
    pub cgroup: Rate,
    pub identity: Rate,
}
const _: () = assert!(core::mem::size_of::<BudgetConfig>() == 32);

/// A bucket in `AW_BUDGETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time of the next record, boot clock ns.
    pub tat_ns: u64,
    /// Verdicts of this cgroup that were summarized rather than recorded, since the bucket
    /// was made (on a cgroup's bucket; unused on an identity's). Added to atomically.
    pub suppressed: u64,
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 16);

/// What the summary of suppressed verdicts is kept by: the cgroup, the destination as judged
/// (zero on the Unix hooks, whose names are not kept here), and the verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SummaryKey {
    pub cgroup_id: u64,
    /// The destination; on the Unix hooks the first 16 bytes of the socket name.
    pub addr: Addr16,
    /// The destination port; on the Unix hooks the length of the socket name.
    pub port: u16,
    pub hook: Hook,
    pub proto: u8,
    pub verdict: Verdict,
    pub reason: Reason,
    pub family: u8,
    pub _pad: u8,
    /// The policy slot of the binding that judged, 0 for none.
    pub slot: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SummaryKey>() == 40);

/// The count of a [`SummaryKey`] since the daemon last took it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Added to atomically.
    pub count: u64,
    /// Boot clock ns of the first and the last verdict counted.
    pub first_ns: u64,
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Summary>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let r = Rate::new(10, 3); // 100 ms a record, three at once
        let now = 5_000_000_000;
        let mut tat = 0;
        for _ in 0..3 {
            tat = r.take(tat, now).expect("within the burst");
        }
        assert_eq!(r.take(tat, now), None, "the fourth at once is over budget");
        assert_eq!(r.take(tat, now + 99_000_000), None);
        assert!(
            r.take(tat, now + 100_000_000).is_some(),
            "one interval later"
        );
    }

    #[test]
    fn an_idle_bucket_refills_to_its_burst_and_no_further() {
        let r = Rate::new(1000, 5);
        let mut tat = r.take(0, 1).unwrap();
        let later = 10_000_000_000;
        let mut passed = 0;
        while let Some(t) = r.take(tat, later) {
            tat = t;
            passed += 1;
        }
        assert_eq!(passed, 5);
    }

    #[test]
    fn zero_means_no_budget() {
        let r = Rate::new(0, 100);
        assert_eq!(r.take(7, 1), Some(7));
        assert_eq!(BudgetConfig::default().cgroup.take(0, 0), Some(0));
    }

    #[test]
    fn bucket_keys_keep_cgroups_identities_and_verdicts_apart() {
        assert_eq!(cgroup_of_key(cgroup_key(42, true)), Some(42));
        assert_eq!(cgroup_of_key(cgroup_key(42, false)), Some(42));
        assert_ne!(cgroup_key(42, true), cgroup_key(42, false));
        assert_eq!(cgroup_of_key(identity_key(3, true)), None);
        assert_eq!(cgroup_of_key(UNBOUND_KEY), None);
        assert_ne!(identity_key(3, true), identity_key(3, false));
    }

    #[test]
    fn a_cgroup_is_quiet_until_it_used_half_its_burst() {
        let r = Rate::new(10, 11); // 100 ms a record, a tolerance of one second
        let now = 1_000_000_000;
        let mut tat = 0;
        let mut quiet = 0;
        while let Some(t) = r.take(tat, now) {
            tat = t;
            if r.quiet(tat, now) {
                quiet += 1;
            }
        }
        assert_eq!(quiet, 6, "half the burst, and the record that reaches it");
    }

    #[test]
    fn burst_of_one_and_zero_are_one() {
        assert_eq!(Rate::new(4, 0), Rate::new(4, 1));
        assert_eq!(Rate::new(4, 1).tolerance_ns, 0);
    }
}
