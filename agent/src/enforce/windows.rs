//! Time windows in the kernel's terms: the next open spans of a rule's window
//! (`crate::policy::window`), moved from the wall clock to the boot clock the programs read.
//!
//! The wall clock is the system's, moved by an offset that tests set to play a chosen time
//! (`agentwall run --test-wall-clock`); the daemon never changes it otherwise.

use std::time::Duration;

use agentwall_common::rules::WindowSpans;
use jiff::{SignedDuration, Timestamp};

use crate::policy::window::Window;

/// The wall clock the windows are judged by.
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock {
    /// Added to the system's time.
    offset: SignedDuration,
}

impl WallClock {
    /// A clock that reads `at` now and runs on from there.
    pub fn starting_at(at: Timestamp) -> Self {
        Self {
            offset: at.duration_since(Timestamp::now()),
        }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.offset)
            .unwrap_or(Timestamp::MAX)
    }
}

/// One reading of both clocks, taken together.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub wall: Timestamp,
    pub boot_ns: u64,
}

impl Now {
    pub fn read(clock: &WallClock) -> Self {
        Self {
            wall: clock.now(),
            boot_ns: crate::clock::boot_ns(),
        }
    }

    /// The boot clock's reading at wall instant `t` (0 for one before boot).
    fn boot_at(&self, t: Timestamp) -> u64 {
        let delta = t.duration_since(self.wall).as_nanos();
        let v = i128::from(self.boot_ns) + delta;
        u64::try_from(v.max(0)).unwrap_or(u64::MAX)
    }
}

/// The kernel's spans of `w` at `now`, and how long until the first of them starts or ends
/// (when the spans must be written again); `None` for a window that never opens.
pub fn spans(w: &Window, now: &Now) -> (WindowSpans, Option<Duration>) {
    let open = w.spans(now.wall, 2);
    let mut out = WindowSpans::default();
    for (slot, (start, end)) in out.spans.iter_mut().zip(&open) {
        *slot = [now.boot_at(*start), now.boot_at(*end)];
    }
    let next_edge = open.first().map(|(start, end)| {
        let edge = if *start > now.wall { *start } else { *end };
        Duration::try_from(edge.duration_since(now.wall)).unwrap_or_default()
    });
    (out, next_edge)
}

/// The spans of `entry` as of `now`: its window's (always open without one), closed for good
/// from its expiry on; with how long until its next edge, if it has one.
pub fn entry_spans(
    entry: &crate::policy::compile::WindowEntry,
    now: &Now,
) -> (WindowSpans, Option<Duration>) {
    let (mut out, mut edge) = match &entry.window {
        Some(w) => spans(w, now),
        None => (
            WindowSpans {
                spans: [[0, u64::MAX], [0, 0]],
            },
            None,
        ),
    };
    if let Some(until) = entry.until_boot_ns {
        for span in &mut out.spans {
            span[1] = span[1].min(until);
            if span[0] >= span[1] {
                *span = [0, 0];
            }
        }
        if until > now.boot_ns {
            let left = Duration::from_nanos(until - now.boot_ns);
            edge = Some(edge.map_or(left, |e| e.min(left)));
        }
    }
    (out, edge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_move_to_the_boot_clock_with_the_edge_due() {
        let w = Window {
            days: Window::ALL_DAYS,
            from: 9 * 3600,
            until: 17 * 3600,
            timezone: "UTC".into(),
        };
        let now = Now {
            wall: "2026-12-07T08:59:58Z".parse().unwrap(),
            boot_ns: 1_000_000_000_000,
        };
        let (s, edge) = spans(&w, &now);
        // Opens in 2 s, closes 8 h later; then the next day's.
        assert_eq!(
            s.spans[0],
            [
                1_002_000_000_000,
                1_002_000_000_000 + 8 * 3600 * 1_000_000_000
            ]
        );
        assert_eq!(s.spans[1][0], 1_002_000_000_000 + 24 * 3600 * 1_000_000_000);
        assert_eq!(edge, Some(Duration::from_secs(2)));
        assert!(!s.open(now.boot_ns));
        assert!(s.open(1_002_000_000_000));
        // Inside the span, the edge due is its end.
        let inside = Now {
            wall: "2026-12-07T16:00:00Z".parse().unwrap(),
            boot_ns: 5_000_000_000_000,
        };
        let (s, edge) = spans(&w, &inside);
        assert!(s.open(inside.boot_ns));
        assert_eq!(edge, Some(Duration::from_secs(3600)));
        // A span that began before boot starts at 0.
        let early = Now {
            wall: "2026-12-07T10:00:00Z".parse().unwrap(),
            boot_ns: 1_000_000_000,
        };
        assert_eq!(spans(&w, &early).0.spans[0][0], 0);
    }

    #[test]
    fn a_clock_set_to_a_time_reads_it_and_runs_on() {
        let at: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let c = WallClock::starting_at(at);
        let read = c.now();
        assert!(read >= at && read.duration_since(at) < SignedDuration::from_secs(5));
    }

    #[test]
    fn an_expiry_closes_a_span_for_good_and_is_an_edge() {
        let now = Now {
            wall: "2026-12-07T08:00:00Z".parse().unwrap(),
            boot_ns: 1_000_000_000_000,
        };
        let until = now.boot_ns + 3_000_000_000;
        let entry = crate::policy::compile::WindowEntry {
            rule_id: 1,
            window: None,
            until_boot_ns: Some(until),
        };
        let (s, edge) = entry_spans(&entry, &now);
        assert_eq!(s.spans, [[0, until], [0, 0]]);
        assert_eq!(edge, Some(Duration::from_secs(3)));
        assert!(s.open(until - 1) && !s.open(until));
        // Within a window: the window's span, cut at the expiry.
        let windowed = crate::policy::compile::WindowEntry {
            window: Some(Window {
                days: Window::ALL_DAYS,
                from: 7 * 3600,
                until: 17 * 3600,
                timezone: "UTC".into(),
            }),
            ..entry.clone()
        };
        let (s, edge) = entry_spans(&windowed, &now);
        assert_eq!(s.spans[0][1], until);
        assert_eq!(s.spans[1], [0, 0], "the next day's span is past the expiry");
        assert_eq!(edge, Some(Duration::from_secs(3)));
        // Expired: closed, no edge left.
        let past = crate::policy::compile::WindowEntry {
            until_boot_ns: Some(now.boot_ns - 1),
            ..entry
        };
        let (s, edge) = entry_spans(&past, &now);
        assert!(!s.open(now.boot_ns));
        assert_eq!(edge, None);
    }
}
