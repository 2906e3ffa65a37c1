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
//!
//! Several clusters on one host, each a `[cluster.NAME]` table chosen by `--cluster NAME`: its own
//! `repo` (or the top-level one with `/NAME` appended), compression, keys and `[cluster.NAME.expire]`.
//! Keys that name a command's flag (`pgdata`, `jobs`, …) and `[COMMAND]` tables are the command
//! line's defaults: the binary applies them (it knows the flags) and checks every key.

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
    /// A key of the config file with a value that cannot be used, or a key nothing takes.
    #[error("`{key}` {message}: {}", where_in(.path, *.line))]
    Key {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`cluster.main.jobs`).
        key: String,
        /// Its line, when known.
        line: Option<usize>,
        /// What is wrong with it ("must be a string").
        message: String,
    },
    /// `--cluster NAME` that the config file does not define (or no config file).
    #[error("{0}")]
    NoCluster(String),
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
                "pass --repo URL, set PITR_REPO, or put repo = \"URL\" in the config file (--config / PITR_CONFIG, else /etc/pitr/pitr.toml)"
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
            ConfigError::Key { .. } => {
                "strings are quoted (repo = \"file:///var/backups/pitr\"), numbers are not (jobs = 4), switches are true or false; keys are the long flags without -- (dashes or underscores), in [COMMAND] or [cluster.NAME] tables or at the top"
            }
            ConfigError::NoCluster(_) => {
                "define the cluster as a [cluster.NAME] table in the config file (--config / PITR_CONFIG, else /etc/pitr/pitr.toml), or leave out --cluster / PITR_CLUSTER"
            }
            ConfigError::Parse { .. } => {
                "the file is TOML: strings are quoted (repo = \"file:///var/backups/pitr\", compress = \"zstd\"), and it takes repo, compress and an [expire] table"
            }
        }
    }
}

fn where_in(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(n) => format!("line {n} of {}", path.display()),
        None => format!("in {}", path.display()),
    }
}

/// Where the config file is looked for when neither `--config` nor `PITR_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/pitr/pitr.toml";

/// The keys the settings of a repository come from (at the top and in a `[cluster.NAME]` table);
/// the binary turns every other key into a flag's default.
pub const SETTING_KEYS: [&str; 5] = [
    "repo",
    "compress",
    "expire",
    "encryption_key_file",
    "encryption_passphrase_file",
];

/// Whether a key of the file spells `name` (dashes and underscores are the same).
pub fn same_key(key: &str, name: &str) -> bool {
    key.len() == name.len()
        && key
            .bytes()
            .zip(name.bytes())
            .all(|(a, b)| a == b || (a == b'-' && b == b'_') || (a == b'_' && b == b'-'))
}

/// A config file read and parsed: its values, and its text to find the line of a key.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    text: String,
    /// Its values.
    pub table: toml::Table,
}

impl ConfigFile {
    /// Read and parse the file at `path`.
    ///
    /// # Errors
    /// `Read`, or `Parse` for text that is not TOML.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let table = toml::from_str::<toml::Table>(&text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: path.into(),
                message: match line {
                    Some(n) => format!(
                        "line {n} ({:?}): {}",
                        text.lines().nth(n - 1).unwrap_or("").trim(),
                        e.message().trim()
                    ),
                    None => e.message().trim().to_string(),
                },
            }
        })?;
        Ok(ConfigFile {
            path: path.into(),
            text,
            table,
        })
    }

    /// The line of the key at `keys` (table names, then the key; an index into an array of
    /// tables as its number).
    pub fn line_of(&self, keys: &[&str]) -> Option<usize> {
        use toml::de::{DeTable, DeValue};
        let doc = DeTable::parse(&self.text).ok()?;
        let mut table: &DeTable = doc.get_ref();
        let mut start = None;
        let mut rest = keys;
        while let Some((first, tail)) = rest.split_first() {
            let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *first)?;
            start = Some(k.span().start);
            let mut value = v;
            rest = tail;
            // `[[repo]]` tables: the next key is an index.
            if let DeValue::Array(items) = value.get_ref()
                && let Some((i, tail)) = rest.split_first()
                && let Ok(i) = i.parse::<usize>()
            {
                value = items.get(i)?;
                start = Some(value.span().start);
                rest = tail;
            }
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ if rest.is_empty() => {}
                _ => return None,
            }
        }
        let start = start?.min(self.text.len());
        Some(self.text[..start].matches('\n').count() + 1)
    }

    /// An error about the key at `keys`.
    pub fn error(&self, keys: &[&str], message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: self.path.clone(),
            key: keys.join("."),
            line: self.line_of(keys),
            message: message.into(),
        }
    }

    /// The names of its `[cluster.NAME]` tables.
    pub fn cluster_names(&self) -> Vec<String> {
        match self.table.get("cluster") {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The `[cluster.NAME]` table.
    ///
    /// # Errors
    /// `NoCluster` when the file defines no such cluster; `Key` when it is not a table.
    pub fn cluster(&self, name: &str) -> Result<&toml::Table, ConfigError> {
        match self.table.get("cluster") {
            None => {}
            Some(toml::Value::Table(t)) => match t.get(name) {
                Some(toml::Value::Table(c)) => return Ok(c),
                Some(_) => {
                    return Err(self.error(&["cluster", name], "must be a table ([cluster.NAME])"));
                }
                None => {}
            },
            Some(_) => return Err(self.error(&["cluster"], "must be [cluster.NAME] tables")),
        }
        let names = self.cluster_names();
        Err(ConfigError::NoCluster(if names.is_empty() {
            format!(
                "no cluster is named {name:?}: {} defines none",
                self.path.display()
            )
        } else {
            format!(
                "no cluster is named {name:?} in {} (it defines {})",
                self.path.display(),
                names.join(", ")
            )
        }))
    }

    /// The repository settings of `table` (the top level, or a cluster's at `prefix`), each key
    /// checked on its own so an error names it.
    ///
    /// # Errors
    /// `Key` for a value of the wrong type or an unknown field in `[[repo]]` or `[expire]`.
    pub fn settings(
        &self,
        prefix: &[&str],
        table: &toml::Table,
    ) -> Result<FileConfig, ConfigError> {
        fn at<'a>(prefix: &[&'a str], key: &'a str) -> Vec<&'a str> {
            let mut k = prefix.to_vec();
            k.push(key);
            k
        }
        let get = |name: &str| table.iter().find(|(k, _)| same_key(k, name));
        let mut out = FileConfig::default();
        if let Some((k, v)) = get("repo") {
            out.repo = Some(match v {
                toml::Value::String(s) => FileRepos::One(s.clone()),
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    let mut repos = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let index = i.to_string();
                        let mut keys = at(prefix, k);
                        keys.push(&index);
                        repos.push(item.clone().try_into::<FileRepo>().map_err(|e| {
                            self.error(
                                &keys,
                                format!("(repository {}): {}", i + 1, e.message().trim()),
                            )
                        })?);
                    }
                    FileRepos::Many(repos)
                }
                _ => {
                    return Err(self.error(
                        &at(prefix, k),
                        "must be a string (the repository URL) or [[repo]] tables",
                    ));
                }
            });
        }
        if let Some((k, v)) = get("compress") {
            out.compress = Some(match v.as_str() {
                Some(s) => v.clone().try_into::<Compression>().map_err(|_| {
                    self.error(
                        &at(prefix, k),
                        format!("must be zstd, lz4 or none, not {s:?}"),
                    )
                })?,
                None => {
                    return Err(self.error(&at(prefix, k), "must be a string (zstd, lz4 or none)"));
                }
            });
        }
        if let Some((k, v)) = get("expire") {
            let Some(t) = v.as_table() else {
                return Err(self.error(
                    &at(prefix, k),
                    "must be a table ([expire] with keep_full, keep_within, …)",
                ));
            };
            // Its other keys are `pitr expire`'s flags (dry_run, max_delete), for the binary.
            let policy: toml::Table = t
                .iter()
                .filter(|(k, _)| k.starts_with("keep"))
                .map(|(k, v)| (k.replace('-', "_"), v.clone()))
                .collect();
            out.expire = Some(toml::Value::Table(policy).try_into().map_err(|e| {
                self.error(
                    &at(prefix, k),
                    format!("(the retention policy): {}", e.message().trim()),
                )
            })?);
        }
        for (name, slot) in [
            ("encryption_key_file", &mut out.encryption_key_file),
            (
                "encryption_passphrase_file",
                &mut out.encryption_passphrase_file,
            ),
        ] {
            if let Some((k, v)) = get(name) {
                match v.as_str() {
                    Some(s) => *slot = Some(PathBuf::from(s)),
                    None => {
                        return Err(self.error(&at(prefix, k), "must be a string (a file path)"));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The settings of cluster `name`: its own keys over the top level's, where a cluster without
    /// a `repo` of its own uses the top level's with `/NAME` appended (one cluster per repository).
    ///
    /// # Errors
    /// As [`ConfigFile::cluster`] and [`ConfigFile::settings`].
    pub fn cluster_settings(&self, name: &str) -> Result<FileConfig, ConfigError> {
        let top = self.settings(&[], &self.table)?;
        let own = self.settings(&["cluster", name], self.cluster(name)?)?;
        let under = |url: String| format!("{}/{name}", url.trim_end_matches('/'));
        let repo = own.repo.or(top.repo.map(|r| match r {
            FileRepos::One(url) => FileRepos::One(under(url)),
            FileRepos::Many(tables) => FileRepos::Many(
                tables
                    .into_iter()
                    .map(|t| FileRepo {
                        url: under(t.url),
                        ..t
                    })
                    .collect(),
            ),
        }));
        let own_key = own.encryption_key_file.is_some() || own.encryption_passphrase_file.is_some();
        Ok(FileConfig {
            repo,
            compress: own.compress.or(top.compress),
            expire: own.expire.or(top.expire),
            encryption_key_file: if own_key {
                own.encryption_key_file
            } else {
                top.encryption_key_file
            },
            encryption_passphrase_file: if own_key {
                own.encryption_passphrase_file
            } else {
                top.encryption_passphrase_file
            },
        })
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
    /// The `[cluster.NAME]` of the config file in use (`--cluster`).
    pub cluster: Option<String>,
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
            if let Some(name) = &self.cluster {
                out.push("--cluster".into());
                out.push(name.clone());
            }
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

/// What the command line (flags, then environment) says, above the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--repo` (repeatable) / `PITR_REPO`.
    pub repo: Vec<String>,
    /// `--repo-name` / `PITR_REPO_NAME`.
    pub repo_name: Option<String>,
    /// `--cluster` / `PITR_CLUSTER`: a `[cluster.NAME]` of the config file.
    pub cluster: Option<String>,
    /// `--compress` / `PITR_COMPRESS`.
    pub compress: Option<Compression>,
    /// `--encryption-key-file` / `PITR_ENCRYPTION_KEY_FILE`.
    pub encryption_key_file: Option<PathBuf>,
    /// `--encryption-passphrase-file` / `PITR_ENCRYPTION_PASSPHRASE_FILE`.
    pub encryption_passphrase_file: Option<PathBuf>,
}

/// The settings: `args` over the config file (its `[cluster.NAME]` when `args.cluster` names
/// one), over the defaults.
///
/// # Errors
/// No repository anywhere, an unknown cluster, or a config value that cannot be used.
pub fn resolve(args: &Overrides, config: Option<&ConfigFile>) -> Result<Settings, ConfigError> {
    let cluster = args.cluster.clone().filter(|c| !c.is_empty());
    let file = match (config, &cluster) {
        (Some(f), Some(name)) => f.cluster_settings(name)?,
        (Some(f), None) => f.settings(&[], &f.table)?,
        (None, Some(name)) => {
            return Err(ConfigError::NoCluster(format!(
                "--cluster {name} needs a config file that defines [cluster.{name}], and none was found"
            )));
        }
        (None, None) => FileConfig::default(),
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
        if let (Some(f), None) = (config, &cluster) {
            let names = f.cluster_names();
            if !names.is_empty() {
                return Err(ConfigError::NoCluster(format!(
                    "no repository configured outside the clusters of {} ({}): name one with --cluster",
                    f.path.display(),
                    names.join(", ")
                )));
            }
        }
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
        config_path: config.map(|f| f.path.clone()),
        cluster,
        repos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line's overrides and the config file it names.
    struct Args {
        o: Overrides,
        config: Option<PathBuf>,
    }

    impl std::ops::Deref for Args {
        type Target = Overrides;
        fn deref(&self) -> &Overrides {
            &self.o
        }
    }

    impl std::ops::DerefMut for Args {
        fn deref_mut(&mut self) -> &mut Overrides {
            &mut self.o
        }
    }

    fn args(repo: Option<&str>, compress: Option<Compression>, config: Option<PathBuf>) -> Args {
        Args {
            o: Overrides {
                repo: repo.map(Into::into).into_iter().collect(),
                compress,
                ..Overrides::default()
            },
            config,
        }
    }

    fn resolve(a: &Args) -> Result<Settings, ConfigError> {
        let file = a.config.as_deref().map(ConfigFile::read).transpose()?;
        super::resolve(&a.o, file.as_ref())
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
        // Keys that are not settings are the binary's (flags' defaults, checked there).
        std::fs::write(&path, "repository = \"typo\"\n").unwrap();
        let err = resolve(&args(None, None, Some(path.clone()))).unwrap_err();
        assert!(matches!(err, ConfigError::NoRepo), "{err}");
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
            Err(ConfigError::Key { .. })
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

    #[test]
    fn clusters_have_their_own_settings_or_the_top_levels_under_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        std::fs::write(
            &path,
            "repo = \"file:///var/backups/pitr/\"\ncompress = \"lz4\"\n[expire]\nkeep_full = 3\ndry_run = true\n\n[cluster.main]\npgdata = \"/srv/main\"\n\n[cluster.reports]\nrepo = \"s3://b/reports\"\ncompress = \"none\"\n[cluster.reports.expire]\nkeep_within = \"7d\"\n",
        )
        .unwrap();
        let mut a = args(None, None, Some(path.clone()));
        let s = resolve(&a).unwrap();
        assert_eq!(
            (s.repo.as_str(), s.cluster.as_deref()),
            ("file:///var/backups/pitr/", None)
        );
        // The policy leaves expire's flags (dry_run) to the command line.
        assert_eq!(s.expire.keep_full, Some(3));
        a.cluster = Some("main".into());
        let s = resolve(&a).unwrap();
        assert_eq!(
            (s.repo.as_str(), s.compress, s.expire.keep_full),
            ("file:///var/backups/pitr/main", Compression::Lz4, Some(3))
        );
        let passed = s.passed_on();
        assert_eq!(&passed[2..], ["--cluster", "main"], "{passed:?}");
        a.cluster = Some("reports".into());
        let s = resolve(&a).unwrap();
        assert_eq!(
            (s.repo.as_str(), s.compress, s.expire.keep_full),
            ("s3://b/reports", Compression::None, None)
        );
        a.cluster = Some("nightly".into());
        let err = resolve(&a).unwrap_err().to_string();
        assert!(
            err.contains("\"nightly\"") && err.contains("main, reports"),
            "{err}"
        );
        // A cluster needs a config file.
        let mut a = args(Some("file:///x"), None, None);
        a.cluster = Some("main".into());
        assert!(matches!(resolve(&a), Err(ConfigError::NoCluster(_))));
        // Clusters only: a command without --cluster is told to name one.
        std::fs::write(&path, "[cluster.a]\nrepo = \"file:///a\"\n").unwrap();
        let err = resolve(&args(None, None, Some(path)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cluster") && err.contains("(a)"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_key_line_and_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        let check = |text: &str, want: &str| {
            std::fs::write(&path, text).unwrap();
            let err = resolve(&args(None, None, Some(path.clone()))).unwrap_err();
            let line = err.to_string();
            assert!(line.contains(want), "{line}");
            assert!(line.ends_with(&format!("of {}", path.display())), "{line}");
            assert!(matches!(err, ConfigError::Key { .. }), "{line}");
        };
        check(
            "# pitr\n\nrepo = 5\n",
            "`repo` must be a string (the repository URL) or [[repo]] tables: line 3",
        );
        check(
            "repo = \"file:///x\"\ncompress = \"brotli\"\n",
            "`compress` must be zstd, lz4 or none, not \"brotli\": line 2",
        );
        check(
            "[[repo]]\nname = \"a\"\nurl = \"file:///a\"\n[[repo]]\nname = \"b\"\nurl = \"file:///b\"\nrequird = false\n",
            "`repo.1` (repository 2): unknown field `requird`",
        );
        check(
            "repo = \"file:///x\"\n[expire]\nkeep_full = \"two\"\n",
            "`expire` (the retention policy)",
        );
        // In a cluster the key is named with its table.
        std::fs::write(
            &path,
            "repo = \"file:///x\"\n[cluster.main]\ncompress = 1\n",
        )
        .unwrap();
        let mut a = args(None, None, Some(path.clone()));
        a.cluster = Some("main".into());
        let line = resolve(&a).unwrap_err().to_string();
        assert_eq!(
            line,
            format!(
                "`cluster.main.compress` must be a string (zstd, lz4 or none): line 3 of {}",
                path.display()
            )
        );
    }
}
