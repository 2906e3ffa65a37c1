//! Error policy.
//!
//! * Library modules return typed errors (thiserror) whose variants carry the object key, WAL file
//!   name or LSN they concern, and which callers can branch on (`RepoError::is_store_failure`).
//! * Commands use `anyhow` and add context with a present-tense verb naming the thing
//!   (`.with_context(|| format!("archive {name}"))`).
//! * An error is reported once, by `main`, as one line: the context chain, then a hint for the
//!   operator taken from the first typed error in the chain that has one.
//! * No `unwrap()` on anything read from disk, the network or the user; `expect` only where a
//!   failure is a bug, with the reason.

use crate::config::ConfigError;
use crate::pg::segment::SegmentError;
use crate::pg::timeline::HistoryError;
use crate::pg::walname::NameError;
use crate::storage::RepoError;

/// A value given on the command line (or in the config file) that cannot be used: exit 2, as for
/// any other bad usage.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A failure that carries its own operator hint.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Hinted {
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: &'static str,
}

/// A [`Hinted`] error.
pub fn with_hint(message: String, hint: &'static str) -> Hinted {
    Hinted { message, hint }
}

/// Whether `err` is bad usage.
pub fn is_usage(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<UsageError>())
}

/// The operator hint for `err`, from the first error in its chain that has one.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| {
        if let Some(e) = e.downcast_ref::<RepoError>() {
            return e.hint().map(str::to_string);
        }
        if let Some(e) = e.downcast_ref::<Hinted>() {
            return Some(e.hint.to_string());
        }
        if let Some(e) = e.downcast_ref::<ConfigError>() {
            return Some(e.hint().to_string());
        }
        if e.downcast_ref::<NameError>().is_some() {
            return Some("archive_command must pass %p, the path of a file PostgreSQL asks to archive".into());
        }
        if let Some(e) = e.downcast_ref::<SegmentError>() {
            return Some(match e {
                SegmentError::SizeMismatch { .. } => {
                    "the file is truncated or padded; PostgreSQL only archives whole segments".into()
                }
                _ => "this file is not WAL written by PostgreSQL 13–18 under this name; nothing was stored".into(),
            });
        }
        if e.downcast_ref::<HistoryError>().is_some() {
            return Some("a timeline history file must be the text PostgreSQL wrote; nothing was stored".into());
        }
        None
    })
}

/// Render `err` (and its hint) as one line for stderr, which PostgreSQL copies into its log. A cause
/// whose text its wrapper already shows (typed errors often print their source) is not repeated.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let text = e.to_string();
        if parts.last().is_some_and(|p| p.contains(text.as_str())) {
            continue;
        }
        parts.push(text);
    }
    let mut line = parts.join(": ");
    if let Some(h) = hint(err) {
        line.push_str(" (hint: ");
        line.push_str(&h);
        line.push(')');
    }
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let text = io.to_string();
        let err = anyhow::Error::new(io)
            .context(format!("read config /etc/x.toml: {text}"))
            .context("load settings");
        let line = one_line(&err);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("load settings: read config /etc/x.toml"),
            "{line}"
        );
    }
}
