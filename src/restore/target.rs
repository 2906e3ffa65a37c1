//! Recovery targets. The `--to` time syntax is `pg::time`'s.

use std::fmt;

use crate::pg::Lsn;
use crate::pg::PgTimestamp;

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

pub use crate::pg::time::TimeParseError;

/// Parse a `--to` time (see [`crate::pg::time::parse_target_time`] for the forms).
///
/// # Errors
/// `TimeParseError` for anything but the accepted forms, or an impossible date.
pub fn parse_time(input: &str) -> Result<PgTimestamp, TimeParseError> {
    crate::pg::time::parse_target_time(input)
}

/// The value for `recovery_target_time`: UTC with an explicit offset.
pub fn postgres_time(t: PgTimestamp) -> String {
    t.postgres()
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
