//! Output for people and scripts on stdout.
//!
//! Every line goes through [`out!`](crate::out)/[`outln!`](crate::outln) (the command's data:
//! tables, JSON, reports) or [`say!`](crate::say)/[`sayln!`](crate::sayln) (plans and summaries,
//! which `-q` silences). A closed stdout (`pitr info | head -3`) is not an error: the command
//! returns [`ClosedStdout`] at once, and `main` ends quietly with success, as other Unix tools do.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silence plans and summaries (`-q`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whoever reads our stdout has gone away (a closed pipe).
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct ClosedStdout;

/// Write `args` to stdout.
///
/// # Errors
/// [`ClosedStdout`] for a closed pipe; other write failures as they are.
pub fn write(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedStdout.into()),
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

/// Whether `err` is only a closed stdout.
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<ClosedStdout>())
}

/// Print the command's data; returns from the enclosing function on a closed stdout.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write(format_args!($($t)*))? };
}

/// [`out!`] with a newline.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($t)*)))? };
}

/// Print a plan or summary line, unless `-q`.
#[macro_export]
macro_rules! sayln {
    ($($t:tt)*) => {
        if !$crate::output::quiet() {
            $crate::outln!($($t)*)
        }
    };
}
