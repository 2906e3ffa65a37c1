//! Files to remove if the process is told to stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT) while it is
//! writing them: temp files beside `%p` and staging files in a local repository. Their owners
//! register them while they exist; `main` removes whatever is still registered before it exits.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

static PATHS: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A registered path; dropping it unregisters the path (its owner renamed or removed it).
#[derive(Debug)]
pub struct Registered(u64);

/// Remember `path` for removal on a stop signal, until the returned guard is dropped.
pub fn register(path: PathBuf) -> Registered {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut p) = PATHS.lock() {
        p.push((id, path));
    }
    Registered(id)
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut p) = PATHS.lock() {
            p.retain(|(id, _)| *id != self.0);
        }
    }
}

/// Remove every registered file (the process is stopping). Returns how many were removed.
pub fn remove_all() -> usize {
    let paths: Vec<PathBuf> = match PATHS.lock() {
        Ok(mut p) => p.drain(..).map(|(_, path)| path).collect(),
        Err(_) => return 0,
    };
    paths
        .iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// The process was told to stop.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {name}; files being written were removed")]
pub struct Interrupted {
    /// SIGTERM, SIGINT, …
    pub name: &'static str,
}

/// Wait for a stop signal.
///
/// # Errors
/// The signal handlers cannot be installed.
pub async fn stop_signal() -> std::io::Result<Interrupted> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
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
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        let _ga = register(a.clone());
        let gb = register(b.clone());
        drop(gb);
        assert!(remove_all() >= 1);
        assert!(!a.exists());
        assert!(b.exists());
    }
}
