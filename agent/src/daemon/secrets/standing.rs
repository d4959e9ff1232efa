//! Leases judged again between renewals: a lease lasts up to a day, and what stood when it
//! was granted may not stand an hour later. Each second the daemon ends
//! - the leases kept in an agent's directory whose cgroup is quarantined, or holds a revoked
//!   or another identity: the file goes with the lease;
//! - after the policy in force changed (a reload, a fleet bundle), every lease its policy no
//!   longer grants, and every database lease whose grants changed: the role is dropped. A
//!   fetch or renewal judged under the old policy and granted after the change makes the next
//!   pass judge every lease again.
//!
//! Rate limits are not drawn on here: they meter fetches, not grants that stand.

use std::collections::BTreeMap;

use super::SecretAsker;
use crate::{daemon::Daemon, policy::decide::Query};

impl Daemon {
    /// Ends the leases that no longer stand (see the module's text); how many. The roles of
    /// database leases ended here are dropped by the caller's next step.
    pub(in crate::daemon) async fn end_leases_no_longer_held(&self) -> usize {
        let mut ended = self.end_leases_of_cgroups_that_lost_them().await;
        // The policy set in force, not the generation: the addresses of host names make new
        // generations of the same set, which grant the same secrets. The set judged last is
        // held, so that its address is not a new set's.
        let changed = {
            let in_force = self.policies.set_in_force();
            let mut judged = self
                .secrets
                .judged_set
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let same = match (&*judged, &in_force) {
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            *judged = in_force;
            !same
        };
        let again = self
            .secrets
            .judge_again
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        if changed || again {
            ended += self.end_leases_no_longer_granted().await;
        }
        ended
    }

    /// After a fetch or renewal judged under policy `generation`: if another came into force
    /// meanwhile, the new lease may have missed its judgement (the pass may have run before
    /// it was in the table), and every lease is judged again at the next pass.
    pub(super) fn leased_under<T, E>(&self, generation: u32, r: &Result<T, E>) {
        if r.is_ok() && self.policies.generation() != generation {
            self.secrets
                .judge_again
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    async fn end_leases_of_cgroups_that_lost_them(&self) -> usize {
        let delivered: Vec<(String, u64)> = self
            .delivered()
            .iter()
            .map(|(id, d)| (id.clone(), d.cgroup_id))
            .collect();
        let mut ended = 0;
        for (id, cgroup) in delivered {
            let Some(l) = self.secrets.leases.find(&id) else {
                continue;
            };
            // A cgroup not bound yet (an agent launched with --cert enrolls itself after the
            // launch) keeps its files until their renewal asks; one gone is the collector's.
            let lost = match self.registry.caller(cgroup).await {
                Some((_, _, true)) => Some("the agent's cgroup is quarantined"),
                Some((_, Some(b), false)) if b.revoked || b.cut_by(&self.identity) => {
                    Some("the agent's cgroup holds a revoked identity")
                }
                Some((_, Some(b), false)) if b.spiffe_id != l.identity => {
                    Some("the agent's cgroup holds another identity")
                }
                _ => None,
            };
            if let Some(why) = lost {
                self.secret_end(&id, why);
                ended += 1;
            }
        }
        ended
    }

    async fn end_leases_no_longer_granted(&self) -> usize {
        let mut ended = 0;
        for (i, l) in self.secrets.leases.list().into_iter().enumerate() {
            // Up to 65,536 leases: the other tasks of the runtime get their turns.
            if i % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
            let who = SecretAsker {
                spiffe_id: l.identity.clone(),
                serial: l.serial.clone(),
                detail: String::new(),
            };
            let standing = match self.database_of(&l.path) {
                Some(db) => {
                    // A fetch in flight lists its role after its lease; if a policy came
                    // into force meanwhile, that fetch asks for the next pass.
                    let Some(held) = self.database_role_grants(&l.id) else {
                        continue;
                    };
                    match self.database_grants(&who, &db).await {
                        Ok((grants, _)) if grants == held => Ok(()),
                        Ok(_) => Err("the policy's grants on the database changed".to_owned()),
                        Err((why, _)) => Err(why),
                    }
                }
                None => self.secret_granted(&who, &l.path).await,
            };
            if let Err(why) = standing {
                self.secret_end(&l.id, &format!("no longer granted: {why}"));
                ended += 1;
            }
        }
        ended
    }

    /// Whether the policy in force grants `who` read on secret `path` now, without drawing on
    /// rate limits.
    async fn secret_granted(&self, who: &SecretAsker, path: &str) -> Result<(), String> {
        let policy = self.standing_policy(who).await.map_err(|(why, _)| why)?;
        let compiled = self.policies.current();
        let q = Query {
            resource: format!("secret:{path}"),
            action: "read".into(),
            attributes: BTreeMap::new(),
        };
        let answer = crate::policy::decide::decide(
            &compiled,
            &policy,
            &q,
            jiff::Timestamp::now(),
            |_, _| true,
        );
        if answer.allow {
            Ok(())
        } else {
            Err(answer.reason)
        }
    }
}
