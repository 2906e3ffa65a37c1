//! Resolved settings: flags > environment > config file > defaults.
//!
//! Flags and environment variables are merged by the command line (the binary's `GlobalArgs`), which
//! hands them over as [`Overrides`]; this module adds the TOML file (`--config` / `PITR_CONFIG`)
//! underneath them and validates the result.
//!
//! ```toml
//! repo = "s3://bucket/prefix"
//! compress = "zstd"      # zstd | lz4 | none
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::compress::Compression;

/// The config file's contents. Unknown keys are refused so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Repository URL.
    pub repo: Option<String>,
    /// Compression for new objects.
    pub compress: Option<Compression>,
    /// Retention policy for `pitr expire` (`[expire]` with keep_full, keep_within = "30d", keep_daily, …).
    pub expire: Option<crate::expire::Policy>,
    /// A key file: the repository is encrypted (at least 32 bytes; `pitr key generate` makes one).
    pub encryption_key_file: Option<PathBuf>,
    /// A passphrase file: the repository is encrypted with a key derived by argon2id.
    pub encryption_passphrase_file: Option<PathBuf>,
}

/// Why settings could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No repository from any source.
    #[error("no repository configured")]
    NoRepo,
    /// The config file cannot be read.
    #[error("read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Both a key file and a passphrase file.
    #[error("both a key file ({key}) and a passphrase file ({passphrase}) are configured")]
    TwoKeys {
        /// The key file.
        key: String,
        /// The passphrase file.
        passphrase: String,
    },
    /// The config file is not valid.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, on one line.
        message: String,
    },
}

impl ConfigError {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ConfigError::NoRepo => {
                "pass --repo URL, set PITR_REPO, or put repo = \"URL\" in the file named by --config / PITR_CONFIG"
            }
            ConfigError::Read { .. } => {
                "check the path given by --config / PITR_CONFIG and its permissions"
            }
            ConfigError::TwoKeys { .. } => {
                "configure one of encryption_key_file and encryption_passphrase_file (a flag or environment variable replaces the file's setting of the same kind only)"
            }
            ConfigError::Parse { .. } => {
                "the file is TOML: strings are quoted (repo = \"file:///var/backups/pitr\", compress = \"zstd\"), and it takes repo, compress and an [expire] table"
            }
        }
    }
}

/// Settings every command uses.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Repository URL.
    pub repo: String,
    /// Compression for new objects.
    pub compress: Compression,
    /// The config file in use, if any (passed on to `restore_command`s pitr writes).
    pub config_path: Option<PathBuf>,
    /// Retention policy from the config file.
    pub expire: crate::expire::Policy,
    /// Where the repository's key comes from, when it is encrypted.
    pub encryption: Option<crate::storage::keys::KeySource>,
}

impl Settings {
    /// The global flags a pitr started by this one (a prefetcher, a `restore_command`) needs to
    /// read the same repository: `--repo`, `--config` and the key file, paths made absolute.
    pub fn passed_on(&self) -> Vec<String> {
        let abs = |p: &Path| {
            p.canonicalize()
                .unwrap_or_else(|_| p.to_path_buf())
                .to_string_lossy()
                .into_owned()
        };
        let mut out = vec!["--repo".to_string(), self.repo.clone()];
        if let Some(c) = &self.config_path {
            out.push("--config".into());
            out.push(abs(c));
        }
        if let Some(k) = &self.encryption {
            out.push(k.flag().into());
            out.push(abs(k.path()));
        }
        out
    }
}

/// Read a config file.
///
/// # Errors
/// `Read` or `Parse`.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        ConfigError::Parse {
            path: path.into(),
            message: match line {
                Some(n) => format!(
                    "line {n} ({:?}): {}",
                    text.lines().nth(n - 1).unwrap_or("").trim(),
                    e.message()
                ),
                None => e.message().to_string(),
            },
        }
    })
}

/// What the command line (flags, then environment) says, above the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--repo` / `PITR_REPO`.
    pub repo: Option<String>,
    /// `--config` / `PITR_CONFIG`.
    pub config: Option<PathBuf>,
    /// `--compress` / `PITR_COMPRESS`.
    pub compress: Option<Compression>,
    /// `--encryption-key-file` / `PITR_ENCRYPTION_KEY_FILE`.
    pub encryption_key_file: Option<PathBuf>,
    /// `--encryption-passphrase-file` / `PITR_ENCRYPTION_PASSPHRASE_FILE`.
    pub encryption_passphrase_file: Option<PathBuf>,
}

/// The settings: `args` over the config file it names, over the defaults.
///
/// # Errors
/// No repository anywhere, or a config file that cannot be read or parsed.
pub fn resolve(args: &Overrides) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => read_file(p)?,
        None => FileConfig::default(),
    };
    let repo = args
        .repo
        .clone()
        .or(file.repo)
        .filter(|r| !r.is_empty())
        .ok_or(ConfigError::NoRepo)?;
    let compress = args.compress.or(file.compress).unwrap_or_default();
    let key = args
        .encryption_key_file
        .clone()
        .or(file.encryption_key_file)
        .filter(|p| !p.as_os_str().is_empty());
    let passphrase = args
        .encryption_passphrase_file
        .clone()
        .or(file.encryption_passphrase_file)
        .filter(|p| !p.as_os_str().is_empty());
    use crate::storage::keys::KeySource;
    let encryption = match (key, passphrase) {
        (Some(k), Some(p)) => {
            return Err(ConfigError::TwoKeys {
                key: k.display().to_string(),
                passphrase: p.display().to_string(),
            });
        }
        (Some(k), None) => Some(KeySource::File(k)),
        (None, Some(p)) => Some(KeySource::Passphrase(p)),
        (None, None) => None,
    };
    Ok(Settings {
        repo,
        compress,
        config_path: args.config.clone(),
        expire: file.expire.unwrap_or_default(),
        encryption,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
        repo: Option<&str>,
        compress: Option<Compression>,
        config: Option<PathBuf>,
    ) -> Overrides {
        Overrides {
            repo: repo.map(Into::into),
            compress,
            config,
            ..Overrides::default()
        }
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        std::fs::write(&path, "repo = \"file:///from/file\"\ncompress = \"lz4\"\n[expire]\nkeep_full = 2\nkeep_within = \"7d\"\n").unwrap();
        let s = resolve(&args(None, None, Some(path.clone()))).unwrap();
        assert_eq!(
            (s.repo.as_str(), s.compress),
            ("file:///from/file", Compression::Lz4)
        );
        assert_eq!(s.expire.keep_full, Some(2));
        assert_eq!(
            s.expire.keep_within,
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        let s = resolve(&args(Some("s3://b/p"), Some(Compression::None), Some(path))).unwrap();
        assert_eq!(
            (s.repo.as_str(), s.compress),
            ("s3://b/p", Compression::None)
        );
        let s = resolve(&args(Some("file:///x"), None, None)).unwrap();
        assert_eq!(s.compress, Compression::Zstd);
    }

    #[test]
    fn bad_configs_are_named() {
        assert!(matches!(
            resolve(&args(None, None, None)),
            Err(ConfigError::NoRepo)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        std::fs::write(&path, "repository = \"typo\"\n").unwrap();
        let err = resolve(&args(None, None, Some(path.clone()))).unwrap_err();
        assert!(
            matches!(err, ConfigError::Parse { .. }) && err.to_string().contains("pitr.toml"),
            "{err}"
        );
        // An unquoted URL: the line and its text are named.
        std::fs::write(&path, "compress = \"zstd\"\nrepo = file:///x\n").unwrap();
        let err = resolve(&args(None, None, Some(path.clone()))).unwrap_err();
        assert!(
            err.to_string().contains("line 2 (\"repo = file:///x\")"),
            "{err}"
        );
        assert!(err.hint().contains("strings are quoted"));
        std::fs::write(&path, "compress = \"brotli\"\n").unwrap();
        assert!(matches!(
            resolve(&args(None, None, Some(path.clone()))),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            resolve(&args(None, None, Some(dir.path().join("missing.toml")))),
            Err(ConfigError::Read { .. })
        ));
        // A key file and a passphrase file: refused, whichever source each came from.
        std::fs::write(
            &path,
            "repo = \"file:///x\"\nencryption_key_file = \"/k\"\n",
        )
        .unwrap();
        let mut a = args(None, None, Some(path.clone()));
        assert_eq!(
            resolve(&a).unwrap().encryption,
            Some(crate::storage::keys::KeySource::File("/k".into()))
        );
        a.encryption_passphrase_file = Some("/p".into());
        assert!(matches!(resolve(&a), Err(ConfigError::TwoKeys { .. })));
    }
}
