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
//!
//! or several repositories, each a `[[repo]]` table:
//!
//! ```toml
//! [[repo]]
//! name = "nas"
//! url = "file:///mnt/nas/pitr"
//! [[repo]]
//! name = "offsite"
//! url = "s3://backups-eu/pitr/db1"
//! encryption_key_file = "/etc/pitr/offsite.key"
//! required = false
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::compress::Compression;

/// The config file's contents. Unknown keys are refused so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Repository URL, or several `[[repo]]` tables.
    pub repo: Option<FileRepos>,
    /// Compression for new objects.
    pub compress: Option<Compression>,
    /// Retention policy for `pitr expire` (`[expire]` with keep_full, keep_within = "30d", keep_daily, …).
    pub expire: Option<crate::expire::Policy>,
    /// A key file: the repository is encrypted (at least 32 bytes; `pitr key generate` makes one).
    pub encryption_key_file: Option<PathBuf>,
    /// A passphrase file: the repository is encrypted with a key derived by argon2id.
    pub encryption_passphrase_file: Option<PathBuf>,
}

/// `repo` in the file: one URL, or `[[repo]]` tables.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileRepos {
    /// `repo = "URL"`.
    One(String),
    /// `[[repo]]` tables.
    Many(Vec<FileRepo>),
}

/// One `[[repo]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRepo {
    /// Its name (`--repo-name`, `pitr copy --from/--to`).
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Whether archive-push waits for it (default true).
    pub required: Option<bool>,
    /// Its compression.
    pub compress: Option<Compression>,
    /// Its key file.
    pub encryption_key_file: Option<PathBuf>,
    /// Its passphrase file.
    pub encryption_passphrase_file: Option<PathBuf>,
    /// Its retention policy.
    pub expire: Option<crate::expire::Policy>,
}

/// One repository as resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoSpec {
    /// Its name: from its `[[repo]]` table, else `repo1`, `repo2`, … in the order given.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Whether archive-push must store every file in it before answering success.
    pub required: bool,
    /// Compression for new objects.
    pub compress: Compression,
    /// Where its key comes from, when it is encrypted.
    pub encryption: Option<crate::storage::keys::KeySource>,
    /// Its retention policy.
    pub expire: crate::expire::Policy,
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
    /// A repository table that cannot be used (a duplicate name, no URL, an unknown `--repo-name`).
    #[error("{0}")]
    BadRepo(String),
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
            ConfigError::BadRepo(_) => {
                "each [[repo]] table has a name and a url, names are unique, and --repo-name / PITR_REPO_NAME names one of them (repo1, repo2, … for --repo flags)"
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
    /// Every repository, in order (the first is tried first).
    pub repos: Vec<RepoSpec>,
    /// Which of them a command that works on one uses: `--repo-name`, else the first.
    pub chosen: usize,
    /// Whether `--repo-name` chose it.
    pub named: bool,
    /// Whether the repositories came from flags or the environment (not the config file).
    pub repos_from_flags: bool,
    /// The chosen repository's URL.
    pub repo: String,
    /// The chosen repository's compression for new objects.
    pub compress: Compression,
    /// The config file in use, if any (passed on to `restore_command`s pitr writes).
    pub config_path: Option<PathBuf>,
    /// The chosen repository's retention policy from the config file.
    pub expire: crate::expire::Policy,
    /// Where the chosen repository's key comes from, when it is encrypted.
    pub encryption: Option<crate::storage::keys::KeySource>,
}

impl Settings {
    /// The global flags a pitr started by this one (a prefetcher, a `restore_command`) needs to
    /// read the same repositories: `--config` (which names them), or each `--repo` and the key
    /// file, paths made absolute.
    pub fn passed_on(&self) -> Vec<String> {
        let abs = |p: &Path| {
            p.canonicalize()
                .unwrap_or_else(|_| p.to_path_buf())
                .to_string_lossy()
                .into_owned()
        };
        let mut out = Vec::new();
        if let Some(c) = &self.config_path {
            out.push("--config".into());
            out.push(abs(c));
        }
        // `--repo-name` narrows every command to that repository: so does the command passed on.
        let repos: Vec<&RepoSpec> = if self.named {
            self.repos.get(self.chosen).into_iter().collect()
        } else {
            self.repos.iter().collect()
        };
        if self.repos_from_flags || self.config_path.is_none() {
            for r in &repos {
                out.push("--repo".into());
                out.push(r.url.clone());
            }
            if let Some(k) = repos.iter().find_map(|r| r.encryption.as_ref()) {
                out.push(k.flag().into());
                out.push(abs(k.path()));
            }
        } else if self.named
            && let Some(r) = repos.first()
        {
            out.push("--repo-name".into());
            out.push(r.name.clone());
        }
        out
    }

    /// These settings with repository `index` chosen as `--repo-name` would choose it (what a
    /// `restore_command` is given when a restore reads one repository of several).
    #[must_use]
    pub fn narrowed_to(&self, index: usize) -> Settings {
        let mut s = self.clone();
        if let Some(r) = self.repos.get(index) {
            s.chosen = index;
            s.named = true;
            s.repo = r.url.clone();
            s.compress = r.compress;
            s.expire = r.expire.clone();
            s.encryption = r.encryption.clone();
        }
        s
    }

    /// The chosen repository.
    pub fn chosen_repo(&self) -> &RepoSpec {
        // `resolve` never returns an empty list or a chosen index out of it.
        &self.repos[self.chosen.min(self.repos.len().saturating_sub(1))]
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
    /// `--repo` (repeatable) / `PITR_REPO`.
    pub repo: Vec<String>,
    /// `--repo-name` / `PITR_REPO_NAME`.
    pub repo_name: Option<String>,
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
    use crate::storage::keys::KeySource;
    let key_of = |key: Option<PathBuf>, passphrase: Option<PathBuf>| {
        let key = key.filter(|p| !p.as_os_str().is_empty());
        let passphrase = passphrase.filter(|p| !p.as_os_str().is_empty());
        match (key, passphrase) {
            (Some(k), Some(p)) => Err(ConfigError::TwoKeys {
                key: k.display().to_string(),
                passphrase: p.display().to_string(),
            }),
            (Some(k), None) => Ok(Some(KeySource::File(k))),
            (None, Some(p)) => Ok(Some(KeySource::Passphrase(p))),
            (None, None) => Ok(None),
        }
    };
    // A key from the command line replaces the file's, whichever kind each is.
    let flag_key = key_of(
        args.encryption_key_file.clone(),
        args.encryption_passphrase_file.clone(),
    )?;
    let file_key = key_of(
        file.encryption_key_file.clone(),
        file.encryption_passphrase_file.clone(),
    )?;
    let top_key = flag_key.clone().or(file_key);
    let top_compress = args.compress.or(file.compress).unwrap_or_default();
    let top_expire = file.expire.clone().unwrap_or_default();
    let flag_urls: Vec<String> = args
        .repo
        .iter()
        .filter(|r| !r.is_empty())
        .cloned()
        .collect();
    let numbered = |urls: Vec<String>| -> Vec<RepoSpec> {
        urls.into_iter()
            .enumerate()
            .map(|(i, url)| RepoSpec {
                name: format!("repo{}", i + 1),
                url,
                required: true,
                compress: top_compress,
                encryption: top_key.clone(),
                expire: top_expire.clone(),
            })
            .collect()
    };
    let repos_from_flags = !flag_urls.is_empty();
    let repos = if repos_from_flags {
        numbered(flag_urls)
    } else {
        match file.repo {
            None => Vec::new(),
            Some(FileRepos::One(url)) if url.is_empty() => Vec::new(),
            Some(FileRepos::One(url)) => numbered(vec![url]),
            Some(FileRepos::Many(tables)) => {
                let mut out: Vec<RepoSpec> = Vec::new();
                for t in tables {
                    if t.name.is_empty() || t.url.is_empty() {
                        return Err(ConfigError::BadRepo(
                            "a [[repo]] table needs a name and a url".into(),
                        ));
                    }
                    if out.iter().any(|r| r.name == t.name) {
                        return Err(ConfigError::BadRepo(format!(
                            "two [[repo]] tables are named {:?}",
                            t.name
                        )));
                    }
                    let own_key = key_of(t.encryption_key_file, t.encryption_passphrase_file)?;
                    out.push(RepoSpec {
                        name: t.name,
                        url: t.url,
                        required: t.required.unwrap_or(true),
                        compress: args.compress.or(t.compress).unwrap_or(top_compress),
                        encryption: flag_key.clone().or(own_key).or(top_key.clone()),
                        expire: t.expire.unwrap_or_else(|| top_expire.clone()),
                    });
                }
                out
            }
        }
    };
    if repos.is_empty() {
        return Err(ConfigError::NoRepo);
    }
    let (chosen, named) = match args.repo_name.as_deref().filter(|n| !n.is_empty()) {
        None => (0, false),
        Some(n) => (
            repos.iter().position(|r| r.name == n).ok_or_else(|| {
                ConfigError::BadRepo(format!(
                    "no repository is named {n:?} (there are {})",
                    repos
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
            true,
        ),
    };
    let c = &repos[chosen];
    Ok(Settings {
        repo: c.url.clone(),
        compress: c.compress,
        expire: c.expire.clone(),
        encryption: c.encryption.clone(),
        chosen,
        named,
        repos_from_flags,
        config_path: args.config.clone(),
        repos,
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
            repo: repo.map(Into::into).into_iter().collect(),
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
    fn several_repositories_from_tables_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        std::fs::write(
            &path,
            "compress = \"lz4\"\nencryption_key_file = \"/top.key\"\n[[repo]]\nname = \"nas\"\nurl = \"file:///nas\"\n[[repo]]\nname = \"offsite\"\nurl = \"s3://b/p\"\nrequired = false\ncompress = \"zstd\"\nencryption_passphrase_file = \"/pass\"\n[repo.expire]\nkeep_full = 7\n",
        )
        .unwrap();
        let s = resolve(&args(None, None, Some(path.clone()))).unwrap();
        let names: Vec<&str> = s.repos.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["nas", "offsite"]);
        assert_eq!(
            (s.repo.as_str(), s.chosen, s.compress),
            ("file:///nas", 0, Compression::Lz4)
        );
        let off = &s.repos[1];
        assert!(!off.required && s.repos[0].required);
        assert_eq!(off.compress, Compression::Zstd);
        assert_eq!(
            off.encryption,
            Some(crate::storage::keys::KeySource::Passphrase("/pass".into()))
        );
        assert_eq!(
            s.repos[0].encryption,
            Some(crate::storage::keys::KeySource::File("/top.key".into()))
        );
        assert_eq!(off.expire.keep_full, Some(7));
        // The config file names them all for a restore_command.
        assert_eq!(s.passed_on()[0], "--config");
        assert!(!s.passed_on().contains(&"--repo".to_string()));
        let mut a = args(None, None, Some(path.clone()));
        a.repo_name = Some("offsite".into());
        let s = resolve(&a).unwrap();
        assert_eq!((s.chosen, s.repo.as_str()), (1, "s3://b/p"));
        assert_eq!(&s.passed_on()[2..], ["--repo-name", "offsite"]);
        a.repo_name = Some("tape".into());
        let err = resolve(&a).unwrap_err();
        assert!(err.to_string().contains("nas, offsite"), "{err}");
        // Flags replace the file's list: repo1, repo2, all required, in order.
        let mut a = args(None, None, None);
        a.repo = vec!["file:///a".into(), "file:///b".into()];
        let s = resolve(&a).unwrap();
        let got: Vec<(&str, &str, bool)> = s
            .repos
            .iter()
            .map(|r| (r.name.as_str(), r.url.as_str(), r.required))
            .collect();
        assert_eq!(
            got,
            [("repo1", "file:///a", true), ("repo2", "file:///b", true)]
        );
        assert_eq!(
            s.passed_on(),
            ["--repo", "file:///a", "--repo", "file:///b"]
        );
        std::fs::write(&path, "[[repo]]\nname = \"a\"\nurl = \"file:///a\"\n[[repo]]\nname = \"a\"\nurl = \"file:///b\"\n").unwrap();
        assert!(matches!(
            resolve(&args(None, None, Some(path))),
            Err(ConfigError::BadRepo(_))
        ));
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
        // A key from the command line replaces the file's; two from one place are refused.
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
        assert_eq!(
            resolve(&a).unwrap().encryption,
            Some(crate::storage::keys::KeySource::Passphrase("/p".into()))
        );
        a.encryption_key_file = Some("/k2".into());
        assert!(matches!(resolve(&a), Err(ConfigError::TwoKeys { .. })));
    }
}
