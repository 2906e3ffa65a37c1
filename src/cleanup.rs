//! Files to remove if the process is told to stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT) while it is
//! writing them: temp files beside `%p` and staging files in a local repository. Their owners
//! register them while they exist; `main` removes whatever is still registered before it exits.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Paths registered for removal.
#[derive(Debug, Default)]
struct Registry {
    paths: Mutex<Vec<(u64, PathBuf)>>,
}

impl Registry {
    const fn new() -> Registry {
        Registry {
            paths: Mutex::new(Vec::new()),
        }
    }

    fn add(&self, id: u64, path: PathBuf) {
        if let Ok(mut p) = self.paths.lock() {
            p.push((id, path));
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.paths.lock() {
            p.retain(|(i, _)| *i != id);
        }
    }

    fn remove_all(&self) -> usize {
        let paths: Vec<PathBuf> = match self.paths.lock() {
            Ok(mut p) => p.drain(..).map(|(_, path)| path).collect(),
            Err(_) => return 0,
        };
        paths
            .iter()
            .filter(|p| std::fs::remove_file(p).is_ok())
            .count()
    }
}

static REGISTRY: Registry = Registry::new();
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A registered path; dropping it unregisters the path (its owner renamed or removed it).
#[derive(Debug)]
pub struct Registered(u64);

/// Remember `path` for removal on a stop signal, until the returned guard is dropped.
pub fn register(path: PathBuf) -> Registered {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    REGISTRY.add(id, path);
    Registered(id)
}

impl Drop for Registered {
    fn drop(&mut self) {
        REGISTRY.forget(self.0);
    }
}

/// Remove every registered file (the process is stopping). Returns how many were removed.
pub fn remove_all() -> usize {
    REGISTRY.remove_all()
}

/// The process was told to stop.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {name}; files being written were removed")]
pub struct Interrupted {
    /// SIGTERM, SIGINT, …
    pub name: &'static str,
}

const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

fn set_stop_signals_blocked(block: bool) {
    // SAFETY: a signal set built with sigemptyset/sigaddset and handed to pthread_sigmask, which
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Hold stop signals back until [`stop_signal`] handles them: called first thing in `main`, so a
/// signal that arrives while the process starts is kept pending instead of killing it (which
/// archive_command must never do). Threads started later inherit the mask; child processes do not
/// (the standard library resets it before exec).
pub fn hold_stop_signals() {
    set_stop_signals_blocked(true);
}

/// Wait for a stop signal. Its handlers are installed, then the signals held back by
/// [`hold_stop_signals`] are let through on this thread. Where the handlers cannot be installed it
/// never returns: the signals then stay held back and the command runs to its end.
pub async fn stop_signal() -> Interrupted {
    match installed().await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("stop signals cannot be handled: {e}");
            std::future::pending().await
        }
    }
}

async fn installed() -> std::io::Result<Interrupted> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    set_stop_signals_blocked(false);
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
        _ = quit.recv() => "SIGQUIT",
    };
    Ok(Interrupted { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_files_are_removed_and_released_ones_kept() {
        // Its own registry: the process-wide one holds other tests' files.
        let registry = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        registry.add(1, a.clone());
        registry.add(2, b.clone());
        registry.forget(2);
        assert_eq!(registry.remove_all(), 1);
        assert!(!a.exists());
        assert!(b.exists());
        assert_eq!(registry.remove_all(), 0);
    }
}
