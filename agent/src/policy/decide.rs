//! Decisions the kernel cannot make: may this caller do this action on this resource, with
//! these attributes? Asked by callees and gateways through the decision API; answered from
//! the compiled policy in force, with the rule that decided.
//!
//! The answer follows the policy's rules in order. A rule answers for a query when it names
//! the resource, grants the action and its conditions hold for the attributes, and its time
//! window is open and its rate limit has a token for the caller. The first rule that answers
//! allows; when none does, the first reason a rule gave (or that no rule names the resource)
//! denies. A policy in audit mode, or a rule in audit mode that failed on its window or limit
//! only, lets the query through with the would-be denial as its reason.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use super::{Compiled, Mode, RateLimit, RuleInfo};

/// What a callee asks about a caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// As policies write it: `service:analytics-db`, `cidr:10.0.0.0/8`.
    pub resource: String,
    pub action: String,
    pub attributes: BTreeMap<String, String>,
}

/// The answer, with the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub allow: bool,
    /// The rule that allowed, or whose condition denied; `None` when no rule named the
    /// resource.
    pub rule_id: Option<u32>,
    /// `file:line` of that rule.
    pub rule: Option<String>,
    /// Why, in words: `granted`, or what did not hold.
    pub reason: String,
    /// The query passed only because of audit mode: `reason` is what would have denied it.
    pub audit: bool,
}

impl Answer {
    fn deny(rule: Option<&RuleInfo>, reason: String) -> Self {
        Self {
            allow: false,
            rule_id: rule.map(|r| r.id),
            rule: rule.map(|r| r.source.to_string()),
            reason,
            audit: false,
        }
    }
}

/// Whether `action` is one of `granted` (none means every action); a granted action ending
/// in `*` grants every action it begins (`write:*`).
fn action_granted(granted: &[String], action: &str) -> bool {
    granted.is_empty()
        || granted.iter().any(|g| match g.strip_suffix('*') {
            Some(prefix) => action.starts_with(prefix),
            None => g == action,
        })
}

/// The first condition of `conditions` the attributes do not meet, in words.
fn unmet(
    conditions: &BTreeMap<String, Vec<String>>,
    attributes: &BTreeMap<String, String>,
) -> Option<String> {
    conditions
        .iter()
        .find_map(|(k, allowed)| match attributes.get(k) {
            None => Some(format!("the query gives no {k:?}, which the rule requires")),
            Some(v) if allowed.iter().any(|a| a == v) => None,
            Some(v) => Some(format!(
                "{k} {v:?} is not one of {}",
                allowed
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
}

/// Answers `q` for a caller governed by policy `policy`. `take(rule, limit)` takes a token
/// from the caller's bucket for a rate-limited rule; it is called only for a rule that
/// answers otherwise.
pub fn decide(
    compiled: &Compiled,
    policy: &str,
    q: &Query,
    now: Timestamp,
    mut take: impl FnMut(&RuleInfo, RateLimit) -> bool,
) -> Answer {
    let Some((_, mode)) = compiled.policies.get(policy) else {
        return Answer::deny(None, format!("no policy named {policy:?} is in force"));
    };
    let mut first: Option<(Answer, bool)> = None;
    for r in compiled.rules.iter().filter(|r| r.policy == policy) {
        let Some(access) = r
            .access
            .as_ref()
            .filter(|a| names(&a.resource, &q.resource))
        else {
            continue;
        };
        // (reason, whether a rule in audit mode lets it pass)
        let failed: Option<(String, bool)> = if !action_granted(&access.actions, &q.action) {
            Some((
                format!(
                    "the rule grants {} on {}, not {:?}",
                    access.actions.join(", "),
                    q.resource,
                    q.action
                ),
                false,
            ))
        } else if let Some(why) = unmet(&access.conditions, &q.attributes) {
            Some((why, false))
        } else if let Some(w) = r.window.as_ref().filter(|w| {
            w.spans(now, 1)
                .first()
                .is_none_or(|(start, _)| *start > now)
        }) {
            Some((format!("outside the rule's window ({w})"), true))
        } else {
            r.rate
                .filter(|rate| !take(r, *rate))
                .map(|rate| (format!("over the rule's rate limit ({rate})"), true))
        };
        match failed {
            None => {
                return Answer {
                    allow: true,
                    rule_id: Some(r.id),
                    rule: Some(r.source.to_string()),
                    reason: "granted".into(),
                    audit: false,
                };
            }
            Some((reason, conditional)) => {
                if first.is_none() {
                    let audit = conditional && r.mode == Some(Mode::Audit);
                    first = Some((Answer::deny(Some(r), reason), audit));
                }
            }
        }
    }
    let (mut answer, rule_audit) = first.unwrap_or_else(|| {
        (
            Answer::deny(
                None,
                format!("no rule of policy {policy:?} names {}", q.resource),
            ),
            false,
        )
    });
    // A secret is never handed out on a would-be grant: audit mode reports, it does not
    // reveal.
    if (rule_audit || *mode == Mode::Audit) && !q.resource.starts_with(SECRET) {
        answer.allow = true;
        answer.audit = true;
    }
    answer
}

/// The prefix of a secret's resource.
const SECRET: &str = "secret:";

/// Whether a rule's `resource` names the queried one: the same text, or for a secret a path
/// the rule's pattern names.
fn names(rule: &str, queried: &str) -> bool {
    match (rule.strip_prefix(SECRET), queried.strip_prefix(SECRET)) {
        (Some(pattern), Some(path)) => {
            super::secret::SecretPattern::parse(pattern).is_ok_and(|p| p.matches(path.trim()))
        }
        _ => rule == queried,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{compile, parse_texts};

    fn compiled() -> Compiled {
        let text = "\
service:
  name: analytics-db
  endpoints:
    - to: 127.0.0.10
      protocol: tcp
      ports: [5432]
---
service:
  name: slack
  endpoints:
    - to: 127.0.0.11
      protocol: tcp
      ports: [443]
---
policy:
  name: pipeline
  rules:
    - resource: service:analytics-db
      actions: [read]
      conditions: { tables: [events, sessions] }
    - resource: service:slack
      actions: [\"write:*\"]
      conditions: { channels: [\"#alerts\"] }
      rateLimit: 2 per minute
    - resource: service:analytics-db
      actions: [write]
      when: { hours: \"09:00-17:00\" }
---
policy:
  name: learner
  mode: audit
";
        let set = parse_texts(&[(PathBuf::from("p.yaml"), text.to_string())]).unwrap();
        compile(&set, |_| 1).unwrap()
    }

    fn q(resource: &str, action: &str, attrs: &[(&str, &str)]) -> Query {
        Query {
            resource: resource.into(),
            action: action.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn noon() -> Timestamp {
        "2026-12-07T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn actions_and_conditions_decide_with_the_rule() {
        let c = compiled();
        let ask = |query: &Query| decide(&c, "pipeline", query, noon(), |_, _| true);
        let a = ask(&q("service:analytics-db", "read", &[("tables", "events")]));
        assert!(a.allow && !a.audit, "{a:?}");
        assert_eq!(a.rule.as_deref(), Some("p.yaml:18"));
        let a = ask(&q("service:analytics-db", "read", &[("tables", "users")]));
        assert!(!a.allow);
        assert_eq!(a.rule_id, Some(1));
        assert_eq!(
            a.reason,
            "tables \"users\" is not one of \"events\", \"sessions\""
        );
        let a = ask(&q("service:analytics-db", "read", &[]));
        assert_eq!(
            a.reason,
            "the query gives no \"tables\", which the rule requires"
        );
        // The second rule for the database grants writes, in its window.
        let a = ask(&q("service:analytics-db", "write", &[]));
        assert!(a.allow, "{a:?}");
        assert_eq!(a.rule_id, Some(3));
        let night: Timestamp = "2026-12-07T20:00:00Z".parse().unwrap();
        let a = decide(
            &c,
            "pipeline",
            &q("service:analytics-db", "write", &[]),
            night,
            |_, _| true,
        );
        assert!(!a.allow);
        // The first failure is reported: rule 1 does not grant writes.
        assert_eq!(a.rule_id, Some(1));
        assert!(
            a.reason
                .starts_with("the rule grants read on service:analytics-db, not \"write\""),
            "{a:?}"
        );
        let a = ask(&q(
            "service:slack",
            "write:message",
            &[("channels", "#alerts")],
        ));
        assert!(a.allow, "a granted prefix");
        let a = ask(&q("service:slack", "read", &[("channels", "#alerts")]));
        assert!(!a.allow);
        let a = ask(&q("service:audit-log", "write", &[]));
        assert_eq!(
            (a.allow, a.rule_id, a.reason.as_str()),
            (
                false,
                None,
                "no rule of policy \"pipeline\" names service:audit-log"
            )
        );
        let a = decide(&c, "nope", &q("service:slack", "x", &[]), noon(), |_, _| {
            true
        });
        assert!(!a.allow && a.reason.contains("no policy named"));
    }

    #[test]
    fn rate_limits_take_from_the_callers_bucket_and_audit_mode_passes() {
        let c = compiled();
        let mut tokens = 2;
        let mut ask = || {
            decide(
                &c,
                "pipeline",
                &q("service:slack", "write:message", &[("channels", "#alerts")]),
                noon(),
                |r, rate| {
                    assert_eq!((r.id, rate.count), (2, 2));
                    if tokens == 0 {
                        return false;
                    }
                    tokens -= 1;
                    true
                },
            )
        };
        assert!(ask().allow);
        assert!(ask().allow);
        let third = ask();
        assert!(!third.allow);
        assert_eq!(third.reason, "over the rule's rate limit (2 per minute)");
        // No token is taken for a query another condition refuses.
        let a = decide(
            &c,
            "pipeline",
            &q(
                "service:slack",
                "write:message",
                &[("channels", "#general")],
            ),
            noon(),
            |_, _| panic!("no token for a refused query"),
        );
        assert!(!a.allow);
        let a = decide(
            &c,
            "learner",
            &q("service:slack", "write", &[]),
            noon(),
            |_, _| true,
        );
        assert!(a.allow && a.audit, "audit mode: {a:?}");
        assert!(a.reason.starts_with("no rule of policy \"learner\""));
    }

    /// `secret:` rules name paths by pattern, grant read only, and audit mode never hands
    /// out a secret that no rule grants.
    #[test]
    fn secrets_are_granted_by_pattern_and_never_in_audit_mode() {
        let text = "\
policy:
  name: pipe
  rules:
    - resource: secret:agent/pipe/*
      lease: 2m
    - resource: secret:shared/*/api-key
      when: { hours: \"08:00-18:00\" }
---
policy:
  name: learner
  mode: audit
  rules:
    - resource: secret:learner/key
";
        let set = parse_texts(&[(PathBuf::from("p.yaml"), text.to_string())]).unwrap();
        let c = compile(&set, |_| 1).unwrap();
        let ask = |policy: &str, query: &Query| decide(&c, policy, query, noon(), |_, _| true);
        let a = ask("pipe", &q("secret:agent/pipe/db/password", "read", &[]));
        assert!(a.allow && a.rule_id == Some(1), "{a:?}");
        assert_eq!(c.rules[0].access.as_ref().unwrap().lease, Some(120));
        assert_eq!(c.rules[0].access.as_ref().unwrap().actions, ["read"]);
        assert!(!ask("pipe", &q("secret:agent/pipeline/db", "read", &[])).allow);
        assert!(!ask("pipe", &q("secret:agent/pipe/db", "write", &[])).allow);
        let a = ask("pipe", &q("secret:shared/x/api-key", "read", &[]));
        assert!(a.allow, "{a:?}");
        let night: Timestamp = "2026-12-07T20:00:00Z".parse().unwrap();
        let a = decide(
            &c,
            "pipe",
            &q("secret:shared/x/api-key", "read", &[]),
            night,
            |_, _| true,
        );
        assert!(
            !a.allow && a.reason.starts_with("outside the rule's window"),
            "{a:?}"
        );
        // The audit-mode policy is told what would be denied, and gets nothing.
        let a = ask("learner", &q("secret:other/key", "read", &[]));
        assert!(!a.allow && !a.audit, "{a:?}");
        assert!(ask("learner", &q("secret:learner/key", "read", &[])).allow);
        assert!(ask("learner", &q("service:x", "read", &[])).allow);
    }

    #[test]
    fn bad_secret_rules_say_what_to_fix() {
        for (rule, field, why) in [
            ("secret:a/*x", "resource", "write secret:PATH"),
            (
                "secret:a\n      actions: [write]",
                "actions",
                "grants read only",
            ),
            ("secret:a\n      mode: audit", "mode", "takes no mode"),
            (
                "secret:a\n      conditions: { purpose: [x] }",
                "conditions",
                "takes no conditions",
            ),
            (
                "secret:a\n      lease: 2s",
                "lease",
                "a lease lasts from 10s to 1day",
            ),
            ("secret:a\n      lease: soon", "lease", "is not a duration"),
            (
                "secret:a\n      ports: [80]",
                "rules[0]",
                "not reached over the network",
            ),
            (
                "cidr:10.0.0.1\n      lease: 5m",
                "lease",
                "only a secret: rule takes a lease",
            ),
        ] {
            let text = format!("policy:\n  name: p\n  rules:\n    - resource: {rule}\n");
            let e = parse_texts(&[(PathBuf::from("p.yaml"), text)]).unwrap_err();
            assert!(
                e.problems
                    .iter()
                    .any(|p| p.field.contains(field) && p.message.contains(why)),
                "{rule}: {e:?}"
            );
        }
    }
}
