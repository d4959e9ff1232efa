//! Time windows of rules (`when:`): on which days and at which hours of a time zone a rule
//! grants. The daemon turns a window into the next spans it is open, in wall-clock time; the
//! kernel compares its own clock with those spans, so a window opens and closes at the
//! exact instant and not when the daemon gets to it.

use std::fmt;

use jiff::{Timestamp, civil::Date, tz::TimeZone};
use serde::Serialize;

/// Seconds in a day.
const DAY: u32 = 86_400;

/// When a rule grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Days on which a span starts: bit 0 Monday … bit 6 Sunday.
    pub days: u8,
    /// Seconds after local midnight at which the rule opens.
    pub from: u32,
    /// Seconds after local midnight at which it closes (exclusive); at or before `from` it
    /// closes on the next day. 86,400 is midnight at the day's end.
    pub until: u32,
    /// IANA time zone name (`UTC` if none was given).
    pub timezone: String,
}

/// Weekday names as policies write them, Monday first.
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    pub const ALL_DAYS: u8 = 0x7f;

    /// The open spans `[start, end)` that end after `now`, earliest first, merged where one
    /// ends as the next starts; at most `n`. Empty if the zone cannot be found.
    pub fn spans(&self, now: Timestamp, n: usize) -> Vec<(Timestamp, Timestamp)> {
        let Ok(tz) = TimeZone::get(&self.timezone) else {
            return Vec::new();
        };
        let today = now.to_zoned_datetime(tz.clone()).date();
        let mut spans: Vec<(Timestamp, Timestamp)> = Vec::new();
        // A span that started yesterday may still be open; eight days ahead always hold the
        // next two starts of a window open on at least one day.
        let mut day = today.yesterday().unwrap_or(today);
        for _ in 0..10 {
            let bit = 1u8 << day.weekday().to_monday_zero_offset();
            if self.days & bit != 0
                && let Some(span) = self.span_on(day, &tz)
                && span.1 > now
                && span.0 < span.1
            {
                match spans.last_mut() {
                    Some(last) if span.0 <= last.1 => last.1 = last.1.max(span.1),
                    _ => spans.push(span),
                }
            }
            match day.tomorrow() {
                Ok(d) => day = d,
                Err(_) => break,
            }
        }
        // Spans that run into one another merged above; the last may still grow with a day
        // beyond the horizon, which the next refresh sees.
        spans.truncate(n);
        spans
    }

    /// The span that starts on `day`.
    fn span_on(&self, day: Date, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
        let at = |d: Date, secs: u32| -> Option<Timestamp> {
            let (d, secs) = if secs >= DAY {
                (d.tomorrow().ok()?, secs - DAY)
            } else {
                (d, secs)
            };
            let h = i8::try_from(secs / 3600).ok()?;
            let m = i8::try_from(secs / 60 % 60).ok()?;
            let s = i8::try_from(secs % 60).ok()?;
            // A time the zone skips (a DST gap) is moved forward by the gap's length; one it
            // repeats is the first of the two (RFC 5545's reading).
            tz.to_timestamp(d.at(h, m, s, 0)).ok()
        };
        let start = at(day, self.from)?;
        let end = if self.until > self.from {
            at(day, self.until)?
        } else {
            at(day.tomorrow().ok()?, self.until)?
        };
        Some((start, end))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |s: u32| {
            if s.is_multiple_of(60) {
                format!("{:02}:{:02}", s / 3600, s / 60 % 60)
            } else {
                format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
            }
        };
        let days: Vec<&str> = DAYS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.days & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect();
        write!(
            f,
            "{} {}-{} {}",
            if self.days == Self::ALL_DAYS {
                "daily".to_string()
            } else {
                days.join(",")
            },
            hm(self.from),
            hm(self.until),
            self.timezone
        )
    }
}

/// Reads `days` as policies write them: names (`mon`, `tuesday`), ranges (`mon-fri`,
/// `fri-mon` wraps), `weekdays`, `weekends`, `daily`.
pub(super) fn parse_days(items: &[String]) -> Result<u8, String> {
    let one = |s: &str| -> Option<u8> {
        let s = s.trim().to_ascii_lowercase();
        DAYS.iter()
            .position(|d| s.len() >= 3 && (s == *d || full_name(d).starts_with(&s)))
            .map(|i| i as u8)
    };
    let mut mask = 0u8;
    for item in items {
        let t = item.trim().to_ascii_lowercase();
        let bits = match t.as_str() {
            "daily" | "all" => Window::ALL_DAYS,
            "weekdays" => 0x1f,
            "weekends" => 0x60,
            _ => match t.split_once('-') {
                Some((a, b)) => {
                    let (Some(a), Some(b)) = (one(a), one(b)) else {
                        return Err(bad_day(item));
                    };
                    let mut m = 0u8;
                    let mut d = a;
                    loop {
                        m |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                    m
                }
                None => 1 << one(&t).ok_or_else(|| bad_day(item))?,
            },
        };
        mask |= bits;
    }
    Ok(mask)
}

fn full_name(short: &str) -> &'static str {
    match short {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

fn bad_day(s: &str) -> String {
    format!(
        "{s:?} is not a day: write mon … sun (or the full name), a range such as mon-fri, weekdays, weekends or daily"
    )
}

/// Reads `HH:MM[:SS]-HH:MM[:SS]` (local time; the end exclusive, `24:00` for midnight at the
/// day's end; an end at or before the start closes the next day).
pub(super) fn parse_hours(s: &str) -> Result<(u32, u32), String> {
    let bad = || {
        format!(
            "{s:?} is not a span of hours: write HH:MM-HH:MM such as 09:00-17:00 (22:00-06:00 runs past midnight, 00:00-24:00 is the whole day)"
        )
    };
    let time = |t: &str, end: bool| -> Option<u32> {
        let parts: Vec<&str> = t.trim().split(':').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
            return None;
        }
        let n: Vec<u32> = parts
            .iter()
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        let secs = n[0] * 3600 + n[1] * 60 + n.get(2).copied().unwrap_or(0);
        let ok =
            (n[0] < 24 && n[1] < 60 && n.get(2).is_none_or(|s| *s < 60)) || (end && secs == DAY);
        ok.then_some(secs)
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let from = time(a, false).ok_or_else(bad)?;
    let until = time(b, true).ok_or_else(bad)?;
    if from == until {
        return Err(format!(
            "{s:?} opens and closes at the same time; write 00:00-24:00 for the whole day"
        ));
    }
    Ok((from, until))
}

/// Checks a time zone name against the zone database.
pub(super) fn check_timezone(name: &str) -> Result<(), String> {
    TimeZone::get(name).map(|_| ()).map_err(|e| {
        format!(
            "{name:?} is not a time zone of the zone database (such as UTC or Europe/Berlin): {e}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn window(days: &[&str], hours: &str, tz: &str) -> Window {
        let days: Vec<String> = days.iter().map(|s| s.to_string()).collect();
        let (from, until) = parse_hours(hours).unwrap();
        Window {
            days: parse_days(&days).unwrap(),
            from,
            until,
            timezone: tz.into(),
        }
    }

    #[test]
    fn business_hours_in_a_zone() {
        let w = window(&["mon-fri"], "09:00-17:00", "Europe/Berlin");
        // Friday 2026-12-04, 15:00 UTC = 16:00 in Berlin: open until 16:00 UTC.
        let spans = w.spans(ts("2026-12-04T15:00:00Z"), 2);
        assert_eq!(
            spans,
            [
                (ts("2026-12-04T08:00:00Z"), ts("2026-12-04T16:00:00Z")),
                // The next opens on Monday.
                (ts("2026-12-07T08:00:00Z"), ts("2026-12-07T16:00:00Z")),
            ]
        );
        // The edge belongs to the next state: at 16:00 UTC exactly, the first span is over.
        let at_edge = w.spans(ts("2026-12-04T16:00:00Z"), 1);
        assert_eq!(at_edge[0].0, ts("2026-12-07T08:00:00Z"));
        assert_eq!(
            w.to_string(),
            "mon,tue,wed,thu,fri 09:00-17:00 Europe/Berlin"
        );
    }

    #[test]
    fn spans_past_midnight_and_whole_days_merge_without_a_gap() {
        let night = window(&["daily"], "22:00-06:00", "UTC");
        let spans = night.spans(ts("2026-12-06T03:00:00Z"), 2);
        assert_eq!(
            spans,
            [
                (ts("2026-12-05T22:00:00Z"), ts("2026-12-06T06:00:00Z")),
                (ts("2026-12-06T22:00:00Z"), ts("2026-12-07T06:00:00Z")),
            ]
        );
        // Whole days in a row are one span: no instant at midnight is closed.
        let weekend = window(&["sat", "sun"], "00:00-24:00", "UTC");
        let spans = weekend.spans(ts("2026-12-06T12:00:00Z"), 2);
        // (Saturday's span is over; Sunday's, in course, ends at Monday's midnight.)
        assert_eq!(
            spans[0],
            (ts("2026-12-06T00:00:00Z"), ts("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            spans[1],
            (ts("2026-12-12T00:00:00Z"), ts("2026-12-14T00:00:00Z"))
        );
        let always = window(&["daily"], "00:00-24:00", "UTC");
        let spans = always.spans(ts("2026-12-06T12:00:00Z"), 2);
        assert_eq!(spans.len(), 1);
        assert!(spans[0].1 >= ts("2026-12-13T00:00:00Z"), "{spans:?}");
    }

    #[test]
    fn daylight_saving_changes_move_the_span_in_utc() {
        let w = window(&["daily"], "09:00-10:00", "Europe/Berlin");
        // Before and after the change of 2027-03-28 (UTC+1 to UTC+2).
        assert_eq!(
            w.spans(ts("2027-03-27T00:00:00Z"), 2),
            [
                (ts("2027-03-27T08:00:00Z"), ts("2027-03-27T09:00:00Z")),
                (ts("2027-03-28T07:00:00Z"), ts("2027-03-28T08:00:00Z")),
            ]
        );
        // 02:30 does not exist that day: it is read an hour later, 03:30 CEST.
        let gap = window(&["daily"], "02:30-04:00", "Europe/Berlin");
        let s = gap.spans(ts("2027-03-28T00:00:00Z"), 1);
        assert_eq!(
            s[0],
            (ts("2027-03-28T01:30:00Z"), ts("2027-03-28T02:00:00Z"))
        );
    }

    #[test]
    fn bad_days_hours_and_zones_are_refused() {
        for d in ["mo", "funday", "mon-xyz", ""] {
            assert!(parse_days(&[d.to_string()]).is_err(), "{d}");
        }
        assert_eq!(parse_days(&["fri-mon".into()]), Ok(0b111_0001));
        assert_eq!(parse_days(&["Tuesday".into(), "wed".into()]), Ok(0b110));
        assert_eq!(parse_days(&["weekends".into()]), Ok(0x60));
        for h in [
            "9-17",
            "09:00",
            "25:00-26:00",
            "09:60-10:00",
            "09:00-09:00",
            "24:00-01:00",
        ] {
            assert!(parse_hours(h).is_err(), "{h}");
        }
        assert_eq!(parse_hours("00:00-24:00"), Ok((0, DAY)));
        assert_eq!(parse_hours("09:00:05-09:00:10"), Ok((32_405, 32_410)));
        assert!(check_timezone("Europe/Berlin").is_ok());
        assert!(check_timezone("Mars/Olympus").is_err());
    }
}
