//! Output for people and scripts on stdout.
//!
//! Every line goes through [`out!`](crate::out)/[`outln!`](crate::outln) (the command's data:
//! tables, JSON, reports) or [`say!`](crate::say)/[`sayln!`](crate::sayln) (plans and summaries,
//! which `-q` silences). A closed stdout (`pitr info | head -3`) is not an error: nothing more is
//! printed, and the command goes on to its own end and exit code (a restore whose plan nobody reads
//! still restores; a verify with findings still exits 1).

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

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Write `args` to stdout; once stdout is found closed, nothing more is written.
///
/// # Errors
/// Write failures other than a closed pipe (a full disk under a redirect, say).
pub fn write(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

/// Print the command's data.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::cmd::output::write(format_args!($($t)*))? };
}

/// [`out!`] with a newline.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::cmd::output::write(format_args!("{}\n", format_args!($($t)*)))? };
}

/// Print a plan or summary line, unless `-q`.
#[macro_export]
macro_rules! sayln {
    ($($t:tt)*) => {
        if !$crate::cmd::output::quiet() {
            $crate::outln!($($t)*)
        }
    };
}
