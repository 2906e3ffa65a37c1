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

/// The operator hint for `err`, from the first error in its chain that has one.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| {
        if let Some(e) = e.downcast_ref::<RepoError>() {
            return e.hint().map(str::to_string);
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

/// Render `err` (and its hint) as one line for stderr, which PostgreSQL copies into its log.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = format!("{err:#}");
    if let Some(h) = hint(err) {
        line.push_str(" (hint: ");
        line.push_str(&h);
        line.push(')');
    }
    line.replace(['\n', '\r'], " ")
}
