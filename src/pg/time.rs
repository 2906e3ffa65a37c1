//! Time: PostgreSQL's `TimestampTz`, and every parse and format of a time pitr does (RFC 3339 in
//! stored objects and reports, `--to`, `recovery_target_time`, backup ids, calendar days for
//! retention). The calendar arithmetic is chrono's, which object_store already builds on; durations
//! (`30s`, `7d`) are humantime's and are not times.
//!
//! `--to` accepts `YYYY-MM-DD HH:MM`, `YYYY-MM-DD HH:MM:SS`, fractional seconds (up to microseconds),
//! a `T` instead of the space, and an optional offset: `Z`, `+02`, `+02:00`, `-0530`. Without an offset
//! the time is UTC. Resolved instants are shown in UTC and written into `recovery_target_time` with an
//! explicit `+00` offset, so PostgreSQL's own time zone never matters.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDateTime, TimeZone, Utc};

/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// The first second RFC 3339 cannot write (year 10000).
const YEAR_10000_UNIX_SECS: i64 = 253_402_300_800;

/// Microseconds since 2000-01-01 00:00:00 UTC (`TimestampTz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000)
    }

    /// From microseconds since the Unix epoch.
    pub fn from_unix_micros(us: i64) -> PgTimestamp {
        PgTimestamp(us.saturating_sub(PG_EPOCH_UNIX_SECS * 1_000_000))
    }

    /// The current time of this machine's clock.
    pub fn now() -> PgTimestamp {
        PgTimestamp::from_unix_micros(Utc::now().timestamp_micros())
    }

    /// A file time (or any `SystemTime`).
    pub fn from_system_time(t: std::time::SystemTime) -> PgTimestamp {
        PgTimestamp::from_unix_micros(DateTime::<Utc>::from(t).timestamp_micros())
    }

    /// Seconds since the Unix epoch, with the fraction (for metrics).
    pub fn unix_secs_f64(self) -> f64 {
        self.unix_micros() as f64 / 1e6
    }

    fn utc(self) -> Option<DateTime<Utc>> {
        let us = self.unix_micros();
        if !(0..YEAR_10000_UNIX_SECS * 1_000_000).contains(&us) {
            return None;
        }
        DateTime::from_timestamp_micros(us)
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-21T10:13:04.919520Z`. Times before 1970 or
    /// after 9999, which no WAL holds, print as a count of microseconds.
    pub fn rfc3339(self) -> String {
        match self.utc() {
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            None if self.unix_micros() < 0 => format!("{}us-before-1970", self.unix_micros()),
            None => format!("{}us-after-1970", self.unix_micros()),
        }
    }

    /// Parse RFC 3339 (any offset).
    ///
    /// # Errors
    /// Not RFC 3339, or outside what a `TimestampTz` holds.
    pub fn parse_rfc3339(s: &str) -> Result<PgTimestamp, String> {
        let t = DateTime::parse_from_rfc3339(s).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(PgTimestamp::from_unix_micros(t.timestamp_micros()))
    }

    /// The value for `recovery_target_time`: UTC with an explicit offset.
    pub fn postgres(self) -> String {
        match self.utc() {
            Some(t) => t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            None => self.rfc3339(),
        }
    }

    /// `YYYYMMDDTHHMMSSZ`: the second, as a key-safe backup id (seconds since 1970 and `Z` for
    /// a time chrono's calendar does not reach).
    pub fn compact_utc(self) -> String {
        match DateTime::from_timestamp_micros(self.unix_micros()) {
            Some(t) => t.format("%Y%m%dT%H%M%SZ").to_string(),
            None => format!("{}Z", self.unix_micros().div_euclid(1_000_000)),
        }
    }

    /// Its calendar place in UTC, for retention by day, ISO week, month and year.
    pub fn calendar(self) -> Calendar {
        let t = DateTime::from_timestamp_micros(self.unix_micros()).unwrap_or_default();
        let week = t.iso_week();
        Calendar {
            year: t.year(),
            month: (t.year(), t.month()),
            iso_week: (week.year(), week.week()),
            day: (t.year(), t.ordinal()),
        }
    }
}

/// Calendar buckets of a time (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calendar {
    /// The year.
    pub year: i32,
    /// (year, month).
    pub month: (i32, u32),
    /// (ISO year, ISO week).
    pub iso_week: (i32, u32),
    /// (year, day of the year).
    pub day: (i32, u32),
}

impl serde::Serialize for PgTimestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> serde::Deserialize<'de> for PgTimestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        PgTimestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// The time was not in an accepted form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a time pitr understands: use YYYY-MM-DD HH:MM[:SS[.ffffff]] with an optional offset (Z, +02, +02:00, -0530); without one it is UTC"
)]
pub struct TimeParseError(pub String);

/// Each character's class, to check a form's exact shape before chrono reads its values
/// (chrono's own parser also takes `2024-5-1` or `+2`, which `--to` refuses as ambiguous).
fn shape(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect()
}

/// Parse a `--to` time.
///
/// # Errors
/// `TimeParseError` for anything but the accepted forms, or an impossible date.
pub fn parse_target_time(input: &str) -> Result<PgTimestamp, TimeParseError> {
    let err = || TimeParseError(input.to_string());
    let s = input.trim();
    // The offset: `Z`, or a sign and 2 or 4 digits (with or without a colon), maybe after a space.
    let (clock_end, offset_secs) = match s.rfind(['Z', 'z', '+', '-']) {
        Some(i) if i > 10 => {
            let (head, off) = s.split_at(i);
            let secs = match (shape(off).as_str(), off.get(1..)) {
                ("Z" | "z", _) => 0,
                ("+99" | "-99", Some(h)) => offset(off, h, "00").ok_or_else(err)?,
                ("+9999" | "-9999", Some(hm)) => {
                    let (h, m) = hm.split_at(2);
                    offset(off, h, m).ok_or_else(err)?
                }
                ("+99:99" | "-99:99", Some(hm)) => {
                    let (h, m) = hm.split_once(':').ok_or_else(err)?;
                    offset(off, h, m).ok_or_else(err)?
                }
                _ => return Err(err()),
            };
            (head.trim_end(), secs)
        }
        _ => (s, 0),
    };
    let format = match shape(clock_end).as_str() {
        "9999-99-99 99:99" | "9999-99-99T99:99" => "%Y-%m-%d#%H:%M",
        "9999-99-99 99:99:99" | "9999-99-99T99:99:99" => "%Y-%m-%d#%H:%M:%S",
        f if fractional(f) => "%Y-%m-%d#%H:%M:%S%.f",
        _ => return Err(err()),
    };
    let normalized: String = clock_end
        .chars()
        .enumerate()
        .map(|(i, c)| if i == 10 { '#' } else { c })
        .collect();
    let local = NaiveDateTime::parse_from_str(&normalized, format).map_err(|_| err())?;
    if local.and_utc().timestamp_subsec_nanos() >= 1_000_000_000 {
        return Err(err()); // a leap second: PostgreSQL has none
    }
    let zone = FixedOffset::east_opt(offset_secs).ok_or_else(err)?;
    let t = zone.from_local_datetime(&local).single().ok_or_else(err)?;
    let us = t.timestamp_micros();
    // PostgreSQL's WAL and RFC 3339 both live between 1970 and 9999 here.
    if !(0..YEAR_10000_UNIX_SECS * 1_000_000).contains(&us) {
        return Err(err());
    }
    Ok(PgTimestamp::from_unix_micros(us))
}

/// `9999-99-99 99:99:99.` followed by 1 to 6 digits.
fn fractional(shape: &str) -> bool {
    let Some(frac) = shape
        .strip_prefix("9999-99-99 99:99:99.")
        .or_else(|| shape.strip_prefix("9999-99-99T99:99:99."))
    else {
        return false;
    };
    (1..=6).contains(&frac.len()) && frac.bytes().all(|b| b == b'9')
}

/// The offset `sign hours:minutes` in seconds east; up to ±15:59, as PostgreSQL accepts.
fn offset(text: &str, hours: &str, minutes: &str) -> Option<i32> {
    let (h, m): (i32, i32) = (hours.parse().ok()?, minutes.parse().ok()?);
    if h > 15 || m > 59 {
        return None;
    }
    let sign = if text.starts_with('-') { -1 } else { 1 };
    Some(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let t = PgTimestamp::parse_rfc3339("2026-11-21T10:13:04.919520Z").unwrap();
        assert_eq!(t.rfc3339(), "2026-11-21T10:13:04.919520Z");
        assert_eq!(t.postgres(), "2026-11-21 10:13:04.919520+00");
        assert_eq!(t.compact_utc(), "20261121T101304Z");
        assert_eq!(
            PgTimestamp::parse_rfc3339("2026-11-21T12:13:04+02:00").unwrap(),
            PgTimestamp::parse_rfc3339("2026-11-21T10:13:04Z").unwrap()
        );
        assert_eq!(PgTimestamp(0).rfc3339(), "2000-01-01T00:00:00.000000Z");
        assert!(PgTimestamp(i64::MIN).rfc3339().ends_with("us-before-1970"));
        assert!(PgTimestamp(i64::MAX).rfc3339().ends_with("us-after-1970"));
        let c = PgTimestamp::parse_rfc3339("2021-01-03T12:00:00Z")
            .unwrap()
            .calendar();
        // 2021-01-03 is a Sunday in ISO week 53 of 2020.
        assert_eq!(
            (c.year, c.month, c.iso_week, c.day),
            (2021, (2021, 1), (2020, 53), (2021, 3))
        );
    }
}
