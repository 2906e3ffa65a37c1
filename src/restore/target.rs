//! Recovery targets and the `--to` time syntax.
//!
//! `--to` accepts `YYYY-MM-DD HH:MM`, `YYYY-MM-DD HH:MM:SS`, fractional seconds (up to microseconds),
//! a `T` instead of the space, and an optional offset: `Z`, `+02`, `+02:00`, `-0530`. Without an offset
//! the time is UTC. The resolved instant is always shown in UTC and written into
//! `recovery_target_time` with an explicit `+00` offset, so PostgreSQL's own time zone never matters.

use std::fmt;

use crate::pg::Lsn;
use crate::pg::xlogrecord::PgTimestamp;

/// Where recovery should stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Before the first commit/abort after this time (`recovery_target_time`).
    Time(PgTimestamp),
    /// At this WAL position (`recovery_target_lsn`).
    Lsn(Lsn),
    /// At the commit/abort of this transaction (`recovery_target_xid`).
    Xid(u32),
    /// At this restore point (`recovery_target_name`).
    Name(String),
    /// As soon as the backup is consistent (`recovery_target = 'immediate'`).
    Immediate,
    /// Through all archived WAL, following the newest timeline.
    Latest,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", t.rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point \"{n}\""),
            Target::Immediate => write!(f, "the end of the backup (immediate)"),
            Target::Latest => write!(f, "the end of the archived WAL (latest)"),
        }
    }
}

/// The time was not in an accepted form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a time pitr understands: use YYYY-MM-DD HH:MM[:SS[.ffffff]] with an optional offset (Z, +02, +02:00, -0530); without one it is UTC"
)]
pub struct TimeParseError(pub String);

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parse a `--to` time.
///
/// # Errors
/// `TimeParseError` for anything but the accepted forms, or an impossible date.
pub fn parse_time(input: &str) -> Result<PgTimestamp, TimeParseError> {
    let err = || TimeParseError(input.to_string());
    let s = input.trim();
    // Every accepted form is ASCII; checking first keeps the slicing below on char boundaries.
    if !s.is_ascii() {
        return Err(err());
    }
    let num = |t: &str| -> Result<i64, TimeParseError> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        t.parse().map_err(|_| err())
    };
    if s.len() < 16 {
        return Err(err());
    }
    let (date, rest) = s.split_at(10);
    let rest = rest.strip_prefix([' ', 'T']).ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    if d.len() != 3 || d[0].len() != 4 || d[1].len() != 2 || d[2].len() != 2 {
        return Err(err());
    }
    let (y, mo, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    if !(1..=12).contains(&mo) || day < 1 || day > days_in_month(y, mo) {
        return Err(err());
    }
    // Split the clock from the offset.
    let (clock, offset) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let clock = clock.trim_end();
    let (hms, frac) = match clock.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (clock, None),
    };
    let t: Vec<&str> = hms.split(':').collect();
    if !(2..=3).contains(&t.len()) || t.iter().any(|p| p.len() != 2) {
        return Err(err());
    }
    let (h, mi) = (num(t[0])?, num(t[1])?);
    let sec = if t.len() == 3 { num(t[2])? } else { 0 };
    if h > 23 || mi > 59 || sec > 59 || (frac.is_some() && t.len() != 3) {
        return Err(err());
    }
    let micros = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 6 => num(f)? * 10i64.pow(6 - f.len() as u32),
        Some(_) => return Err(err()),
    };
    let offset_secs = match offset {
        "" | "Z" | "z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let body = &o[1..];
            let (oh, om) = match body.len() {
                2 => (num(body)?, 0),
                4 => (num(&body[..2])?, num(&body[2..])?),
                5 if body.as_bytes()[2] == b':' => (num(&body[..2])?, num(&body[3..])?),
                _ => return Err(err()),
            };
            if oh > 15 || om > 59 {
                return Err(err());
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let unix = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    // PostgreSQL's WAL and RFC 3339 both live between 1970 and 9999 here.
    if !(0..253_402_300_800).contains(&unix) {
        return Err(err());
    }
    Ok(PgTimestamp::from_unix_micros(unix * 1_000_000 + micros))
}

/// The value for `recovery_target_time`: UTC with an explicit offset.
pub fn postgres_time(t: PgTimestamp) -> String {
    let r = t.rfc3339(); // 2026-11-21T10:13:04.919520Z
    format!("{} {}+00", &r[..10], &r[11..r.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No input makes the parser panic; what it accepts prints and parses back to itself.
        #[test]
        fn any_input_is_answered_without_a_panic(s in "\\PC{0,40}") {
            if let Ok(t) = parse_time(&s) {
                prop_assert_eq!(parse_time(&t.rfc3339()), Ok(t));
            }
        }

        #[test]
        fn near_misses_are_answered_without_a_panic(s in "[0-9é:+. TZ-]{10,30}") {
            let _ = parse_time(&s);
        }
    }

    fn at(s: &str) -> String {
        parse_time(s).unwrap().rfc3339()
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(at("2024-05-01 10:00"), "2024-05-01T10:00:00.000000Z");
        assert_eq!(at("2024-05-01 10:00:05"), "2024-05-01T10:00:05.000000Z");
        assert_eq!(at("2024-05-01T10:00:05.5"), "2024-05-01T10:00:05.500000Z");
        assert_eq!(
            at("2024-05-01 10:00:05.123456"),
            "2024-05-01T10:00:05.123456Z"
        );
        assert_eq!(at("2024-05-01 10:00:05Z"), "2024-05-01T10:00:05.000000Z");
        assert_eq!(at("2024-05-01 12:00+02"), "2024-05-01T10:00:00.000000Z");
        assert_eq!(
            at("2024-05-01 12:00:00+02:00"),
            "2024-05-01T10:00:00.000000Z"
        );
        assert_eq!(at("2024-05-01 04:30-0530"), "2024-05-01T10:00:00.000000Z");
        assert_eq!(
            at("2024-05-01 10:00:00.25 +01"),
            "2024-05-01T09:00:00.250000Z"
        );
        assert_eq!(at("2024-03-01 00:30+01"), "2024-02-29T23:30:00.000000Z"); // leap day
        assert_eq!(
            at("1999-12-31 23:59:59.999999"),
            "1999-12-31T23:59:59.999999Z"
        );
        assert_eq!(
            postgres_time(parse_time("2024-05-01 12:00:00.5+02").unwrap()),
            "2024-05-01 10:00:00.500000+00"
        );
    }

    #[test]
    fn rejected_forms() {
        for bad in [
            "",
            "yesterday",
            "2024-05-01",
            "2024-05-01 10",
            "2024-5-1 10:00",
            "2024-02-30 10:00",
            "2023-02-29 10:00",
            "2024-13-01 10:00",
            "2024-05-01 24:00",
            "2024-05-01 10:60",
            "2024-05-01 10:00:61",
            "2024-05-01 10:00.5",
            "2024-05-01 10:00:00.1234567",
            "2024-05-01 10:00:00.",
            "2024-05-01 10:00 CEST",
            "2024-05-01 10:00+2",
            "2024-05-01 10:00+02:0",
            "2024-05-01 10:00+99",
            "2024-05-01 10:00:00 +02:00 x",
            "2024-05-0é 10:00",
            "2024-05-01 10:00+1é1",
            "2024-05-01 10:00:00.é",
            "é",
            "2024-05-01 10:0é",
            "9999-12-31 23:59-01",
            "1969-12-31 23:59",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
