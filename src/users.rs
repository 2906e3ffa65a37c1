//! Unix users: looking one up by name (reentrant, safe on the multi-threaded runtime) and giving a
//! tree of files to it.

use anyhow::{Context, bail};

/// Whether pitr runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of user `name`, or `None` when there is no such user.
///
/// # Errors
/// The user database cannot be read.
pub fn lookup(name: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let c_name = std::ffi::CString::new(name).context("a user name cannot contain NUL")?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: `passwd` is plain data that getpwnam_r fills in; `buf` outlives the call and its
        // length is passed; `result` is written before we read it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            bail!(
                "look up user {name}: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// Give `path` and everything under it (not following symbolic links) to `uid:gid`.
///
/// # Errors
/// Names the file that could not be changed.
pub fn chown_tree(path: &std::path::Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("give {} to uid {uid}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("read {}", path.display()))? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nonsense_does_not() {
        assert_eq!(lookup("root").unwrap(), Some((0, 0)));
        assert_eq!(lookup("no-such-user-pitr").unwrap(), None);
        assert!(lookup("a\0b").is_err());
    }
}
