//! Behavioral detection, first version: per-identity baselines learned from the verdict stream,
//! and alerts when an identity departs from its own: a destination never seen after the
//! learning period, a burst of new flows over N times its usual rate, activity in an hour of
//! the day it was never active in, repeated denials.
//!
//! The detector is a pure function of the events it is fed (time comes from the events), so
//! tests drive it with synthetic streams.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Thresholds (config `detect:`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub enabled: bool,
    /// How long an identity is watched before its baseline counts (no alerts meanwhile,
    /// except repeated denials).
    #[serde(with = "crate::clock::duration_text")]
    pub learn_for: Duration,
    /// A minute with more than `burst_factor` times the identity's usual flows per minute
    /// (and at least `burst_min` flows) is a burst.
    pub burst_factor: f64,
    pub burst_min: u64,
    /// `denials` denials within `denial_window` raise an alert.
    pub denials: usize,
    #[serde(with = "crate::clock::duration_text")]
    pub denial_window: Duration,
    /// Alert on activity in an hour of the day (UTC) in which the identity was not active
    /// while it was learned.
    pub off_hours: bool,
    /// Also POST each alert to this endpoint once it is durable.
    pub webhook: Option<super::forward::WebhookConfig>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            learn_for: Duration::from_secs(600),
            burst_factor: 10.0,
            burst_min: 100,
            denials: 20,
            denial_window: Duration::from_secs(60),
            off_hours: true,
            webhook: None,
        }
    }
}

/// What the detector needs of a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The identity (the policy name of the cgroup's binding).
    pub identity: String,
    pub at: SystemTime,
    pub dst: Option<IpAddr>,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
pub enum Alert {
    NewDestination {
        identity: String,
        dst: String,
        port: u16,
        protocol: String,
    },
    Burst {
        identity: String,
        flows_last_minute: u64,
        usual_per_minute: f64,
    },
    OffHours {
        identity: String,
        hour_utc: u8,
    },
    RepeatedDenials {
        identity: String,
        denials: usize,
        window_secs: u64,
    },
    /// An agent wrote verdicts faster than its event budget: the excess was summarized. A
    /// flood of denials is how an agent would hide what another one does in its noise.
    EventFlood {
        identity: String,
        /// The cgroup, or none for the verdicts of cgroups without a binding (which share
        /// one budget).
        cgroup_id: Option<u64>,
        /// Verdicts summarized rather than recorded in `window_secs`.
        suppressed: u64,
        window_secs: u64,
        /// The budget, records a second.
        budget_per_second: u32,
    },
    /// The audit log's file system has less free space than the watermark: act before it is
    /// full (records then wait, and with `when_down: deny` every flow is denied).
    AuditSpaceLow {
        free_bytes: u64,
        total_bytes: u64,
        warn_free_percent: u8,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Profile {
    since: Option<SystemTime>,
    destinations: HashSet<(Option<IpAddr>, u16, String)>,
    /// Hours of the day (UTC) the identity was active in while it was learned.
    hours: [bool; 24],
    /// Flows per completed minute, smoothed.
    usual_per_minute: Option<f64>,
    minute: u64,
    this_minute: u64,
    burst_alerted_minute: Option<u64>,
    denials: VecDeque<SystemTime>,
    /// No new repeated-denials alert before this time (one per window, not one per N).
    #[serde(default)]
    denials_quiet_until: Option<SystemTime>,
    hours_alerted: [bool; 24],
}

#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    profiles: BTreeMap<String, Profile>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The file form of the baselines.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    profiles: BTreeMap<String, Profile>,
}

const SAVED_VERSION: u32 = 1;

/// Why saved baselines cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("baselines of format version {0} (this agentwall reads {SAVED_VERSION})")]
    Version(u32),
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            cfg,
            profiles: BTreeMap::new(),
        }
    }

    /// The learned baselines, to be restored by [`Detector::restore`] after a restart.
    pub fn save(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct SavedRef<'a> {
            version: u32,
            profiles: &'a BTreeMap<String, Profile>,
        }
        serde_json::to_vec(&SavedRef {
            version: SAVED_VERSION,
            profiles: &self.profiles,
        })
    }

    /// A detector that goes on from saved baselines.
    pub fn restore(cfg: DetectConfig, bytes: &[u8]) -> Result<Self, RestoreError> {
        let saved: Saved = serde_json::from_slice(bytes)?;
        if saved.version != SAVED_VERSION {
            return Err(RestoreError::Version(saved.version));
        }
        Ok(Self {
            cfg,
            profiles: saved.profiles,
        })
    }

    /// Identities with a baseline.
    pub fn identities(&self) -> usize {
        self.profiles.len()
    }

    /// Feeds one verdict; returns the alerts it raises.
    pub fn observe(&mut self, o: &Observation) -> Vec<Alert> {
        let mut alerts = Vec::new();
        if !self.cfg.enabled {
            return alerts;
        }
        let cfg = &self.cfg;
        let p = self.profiles.entry(o.identity.clone()).or_default();
        let since = *p.since.get_or_insert(o.at);
        let learning = o.at.duration_since(since).unwrap_or_default() < cfg.learn_for;
        let secs = unix_secs(o.at);
        let hour = ((secs / 3600) % 24) as usize;

        if !o.allowed {
            p.denials.push_back(o.at);
            while p
                .denials
                .front()
                .is_some_and(|t| o.at.duration_since(*t).unwrap_or_default() > cfg.denial_window)
            {
                p.denials.pop_front();
            }
            if p.denials.len() >= cfg.denials && p.denials_quiet_until.is_none_or(|q| o.at >= q) {
                alerts.push(Alert::RepeatedDenials {
                    identity: o.identity.clone(),
                    denials: p.denials.len(),
                    window_secs: cfg.denial_window.as_secs(),
                });
                // At most one alert per window, however fast the denials come.
                p.denials_quiet_until = Some(o.at + cfg.denial_window);
                p.denials.clear();
            }
            return alerts;
        }

        // Flow rate per minute.
        let minute = secs / 60;
        if minute != p.minute {
            if p.minute != 0 && learning {
                let done = p.this_minute as f64;
                p.usual_per_minute = Some(match p.usual_per_minute {
                    None => done,
                    Some(u) => 0.8 * u + 0.2 * done,
                });
            }
            // Idle minutes in between count as zero flows while learning.
            p.minute = minute;
            p.this_minute = 0;
        }
        p.this_minute += 1;

        let key = (o.dst, o.port, o.protocol.clone());
        if learning {
            p.destinations.insert(key);
            p.hours[hour] = true;
            return alerts;
        }
        if p.destinations.insert(key) {
            alerts.push(Alert::NewDestination {
                identity: o.identity.clone(),
                dst: o.dst.map(|a| a.to_string()).unwrap_or_default(),
                port: o.port,
                protocol: o.protocol.clone(),
            });
        }
        let usual = p.usual_per_minute.unwrap_or(0.0).max(1.0);
        if p.this_minute >= cfg.burst_min
            && p.this_minute as f64 > cfg.burst_factor * usual
            && p.burst_alerted_minute != Some(minute)
        {
            p.burst_alerted_minute = Some(minute);
            alerts.push(Alert::Burst {
                identity: o.identity.clone(),
                flows_last_minute: p.this_minute,
                usual_per_minute: usual,
            });
        }
        if cfg.off_hours && !p.hours[hour] && !p.hours_alerted[hour] {
            p.hours_alerted[hour] = true;
            alerts.push(Alert::OffHours {
                identity: o.identity.clone(),
                hour_utc: hour as u8,
            });
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_764_000_000; // a fixed instant; its hour of day is what it is

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn flow(secs: u64, last_octet: u8, port: u16) -> Observation {
        Observation {
            identity: "reader".into(),
            at: at(secs),
            dst: Some(IpAddr::from([10, 0, 0, last_octet])),
            port,
            protocol: "tcp".into(),
            allowed: true,
        }
    }

    fn cfg() -> DetectConfig {
        DetectConfig {
            learn_for: Duration::from_secs(600),
            burst_factor: 10.0,
            burst_min: 50,
            denials: 5,
            denial_window: Duration::from_secs(60),
            ..DetectConfig::default()
        }
    }

    /// Ten minutes of learning: 3 flows a minute to two destinations.
    fn learned() -> Detector {
        let mut d = Detector::new(cfg());
        for m in 0..10 {
            for i in 0..3u64 {
                let a = d.observe(&flow(m * 60 + i * 10, 1 + (i % 2) as u8, 5432));
                assert!(a.is_empty(), "no alert while learning: {a:?}");
            }
        }
        d
    }

    #[test]
    fn a_new_destination_after_learning_is_reported_once() {
        let mut d = learned();
        assert!(d.observe(&flow(700, 1, 5432)).is_empty());
        let a = d.observe(&flow(701, 9, 443));
        assert_eq!(
            a,
            vec![Alert::NewDestination {
                identity: "reader".into(),
                dst: "10.0.0.9".into(),
                port: 443,
                protocol: "tcp".into()
            }]
        );
        assert!(d.observe(&flow(702, 9, 443)).is_empty());
    }

    #[test]
    fn a_burst_over_the_usual_rate_is_reported_once_a_minute() {
        let mut d = learned();
        let mut bursts = 0;
        for i in 0..120u64 {
            for a in d.observe(&flow(720 + i / 4, 1, 5432)) {
                if let Alert::Burst {
                    flows_last_minute,
                    usual_per_minute,
                    ..
                } = a
                {
                    assert!(flows_last_minute as f64 > 10.0 * usual_per_minute);
                    bursts += 1;
                }
            }
        }
        assert_eq!(bursts, 1, "one alert for the burst minute");
    }

    #[test]
    fn activity_in_a_new_hour_and_repeated_denials_are_reported() {
        let mut d = learned();
        let later = flow(5 * 3600, 1, 5432);
        let a = d.observe(&later);
        assert!(
            a.iter().any(|x| matches!(x, Alert::OffHours { .. })),
            "{a:?}"
        );
        assert!(
            d.observe(&flow(5 * 3600 + 1, 1, 5432)).is_empty(),
            "once per hour"
        );
        let mut denied = flow(800, 7, 22);
        denied.allowed = false;
        let mut raised = Vec::new();
        for i in 0..5 {
            denied.at = at(800 + i);
            raised.extend(d.observe(&denied));
        }
        assert_eq!(
            raised,
            vec![Alert::RepeatedDenials {
                identity: "reader".into(),
                denials: 5,
                window_secs: 60
            }]
        );
        // Denials spread wider than the window do not add up.
        let mut d = learned();
        let mut raised = Vec::new();
        for i in 0..10 {
            denied.at = at(1000 + i * 61);
            raised.extend(d.observe(&denied));
        }
        assert!(raised.is_empty(), "{raised:?}");
        // A flood of denials raises one alert per window, not one per threshold reached.
        let mut d = learned();
        let mut raised = 0;
        for i in 0..10_000u64 {
            denied.at = at(2000) + Duration::from_millis(i);
            raised += d.observe(&denied).len();
        }
        assert_eq!(raised, 1, "10000 denials in 10 s");
        denied.at = at(2000 + 61);
        let mut again = Vec::new();
        for _ in 0..5 {
            again.extend(d.observe(&denied));
        }
        assert_eq!(again.len(), 1, "the next window alerts again: {again:?}");
    }

    #[test]
    fn baselines_survive_a_save_and_restore() {
        let d = learned();
        let mut back = Detector::restore(d.cfg.clone(), &d.save().unwrap()).unwrap();
        assert_eq!(back.identities(), 1);
        assert!(
            back.observe(&flow(700, 1, 5432)).is_empty(),
            "known destination"
        );
        let a = back.observe(&flow(701, 9, 443));
        assert!(
            a.iter().any(|x| matches!(x, Alert::NewDestination { .. })),
            "still past learning, new destination: {a:?}"
        );
        assert!(Detector::restore(d.cfg.clone(), b"{}").is_err());
        assert!(Detector::restore(d.cfg, br#"{"version":9,"profiles":{}}"#).is_err());
    }

    #[test]
    fn identities_have_their_own_baselines() {
        let mut d = learned();
        let mut other = flow(700, 1, 5432);
        other.identity = "writer".into();
        assert!(
            d.observe(&other).is_empty(),
            "a new identity starts learning"
        );
    }
}
