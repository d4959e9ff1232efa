//! Leases judged again between renewals: a lease lasts up to a day, and what stood when it
//! was granted may not stand an hour later. Each second the daemon ends
//! - the leases kept in an agent's directory whose cgroup is quarantined, or holds a revoked
//!   or another identity: the file goes with the lease;
//! - after the policy in force changed (a reload, a fleet bundle), every lease its policy no
//!   longer grants, and every database lease whose grants changed: the role is dropped.
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
        let generation = self.policies.generation();
        let judged = self
            .secrets
            .judged_generation
            .swap(generation, std::sync::atomic::Ordering::AcqRel);
        if judged != generation {
            ended += self.end_leases_no_longer_granted().await;
        }
        ended
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
        for l in self.secrets.leases.list() {
            let who = SecretAsker {
                spiffe_id: l.identity.clone(),
                serial: l.serial.clone(),
                detail: String::new(),
            };
            let standing = match self.database_of(&l.path) {
                Some(db) => {
                    let held = self.database_role_grants(&l.id);
                    match self.database_grants(&who, &db).await {
                        Ok((grants, _)) if Some(&grants) == held.as_ref() => Ok(()),
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
