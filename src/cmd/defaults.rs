//! The config file as the command line's defaults: a key that names a long flag (`pgdata`, `jobs`,
//! `archive_timeout`) gives that flag's value when neither the command line nor the environment
//! gives one. Where a key is looked for, first match wins:
//!
//! 1. `[cluster.NAME.COMMAND]` (with `--cluster NAME`), 2. `[cluster.NAME]`, 3. `[COMMAND]`,
//! 4. the top level.
//!
//! A key applies to every command that has the flag; a key no command takes is an error naming
//! its line, as is a value the flag would refuse. The repository settings (`repo`, `compress`,
//! the key files, `[expire]`'s policy) are the library's (`pitr::config`), not flags.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, parser::ValueSource};

use pitr::config::{self, ConfigError, ConfigFile, same_key};

use super::cli::Cli;

/// Global flags the config file does not set as flags: it is the config, or the library reads the
/// same keys as settings.
const NOT_FLAGS: [&str; 8] = [
    "config",
    "cluster",
    "repo",
    "compress",
    "encryption_key_file",
    "encryption_passphrase_file",
    "help",
    "version",
];

/// The command line with the config file's defaults added, and the file.
pub(crate) struct Prepared {
    /// The arguments to parse.
    pub argv: Vec<OsString>,
    /// The config file in use.
    pub file: Option<ConfigFile>,
}

/// Which config file is in use: `--config`, `PITR_CONFIG`, else [`config::DEFAULT_PATH`] when it
/// exists. A named file must exist; the default need not.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut named = None;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        if a == "--config" {
            named = it.next().map(PathBuf::from);
        } else if let Some(v) = a.strip_prefix("--config=") {
            named = Some(PathBuf::from(v));
        }
    }
    named
        .or_else(|| {
            std::env::var_os("PITR_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            let p = Path::new(config::DEFAULT_PATH);
            p.exists().then(|| p.to_path_buf())
        })
}

/// Read the config file and add its defaults to `argv`.
///
/// # Errors
/// The file cannot be read or parsed, a key no command takes, or a value its flag refuses.
pub(crate) fn prepare(argv: Vec<OsString>) -> Result<Prepared, ConfigError> {
    let Some(path) = config_path(&argv) else {
        return Ok(Prepared { argv, file: None });
    };
    let file = ConfigFile::read(&path)?;
    let mut root = Cli::command();
    root.build();
    check_keys(&file, &root)?;
    // What the command line says, as far as it can be parsed (a usage error is reported by the
    // real parse, with the defaults in place).
    let Ok(matches) = root.clone().ignore_errors(true).try_get_matches_from(&argv) else {
        return Ok(Prepared {
            argv,
            file: Some(file),
        });
    };
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(Prepared {
            argv,
            file: Some(file),
        });
    };
    let mut leaf_matches = vec![&matches, sub];
    let mut leaf = root.find_subcommand(name);
    while let Some((n, m)) = leaf_matches.last().and_then(|m| m.subcommand()) {
        leaf = leaf.and_then(|c| c.find_subcommand(n));
        leaf_matches.push(m);
    }
    let Some(leaf) = leaf else {
        return Ok(Prepared {
            argv,
            file: Some(file),
        });
    };
    let cluster = leaf_matches
        .iter()
        .rev()
        .find_map(|m| m.try_get_one::<String>("cluster").ok().flatten())
        .cloned();
    let added = defaults_for(&file, cluster.as_deref(), name, leaf, &leaf_matches)?;
    let mut argv = argv;
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    argv.splice(at..at, added);
    Ok(Prepared {
        argv,
        file: Some(file),
    })
}

/// Whether the command line or the environment gave `id`.
fn given(matches: &[&ArgMatches], id: &str) -> bool {
    matches.iter().any(|m| {
        matches!(
            m.try_contains_id(id).ok().and_then(|_| m.value_source(id)),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    })
}

/// The flags a command takes from the config file.
fn flags(c: &Command) -> impl Iterator<Item = &Arg> {
    c.get_arguments().filter(|a| {
        !a.is_positional() && !NOT_FLAGS.contains(&a.get_id().as_str()) && a.get_long().is_some()
    })
}

/// Whether `key` is a flag of `c` or of one of its subcommands.
fn is_flag_of(c: &Command, key: &str) -> bool {
    flags(c).any(|a| a.get_long().is_some_and(|l| same_key(key, l)))
        || c.get_subcommands().any(|s| is_flag_of(s, key))
}

fn table_of<'a>(t: &'a toml::Table, name: &str) -> Option<(&'a String, &'a toml::Value)> {
    t.iter().find(|(k, _)| same_key(k, name))
}

/// Every key of the file is taken by something: a setting, a cluster, a command's table, or a
/// flag of some command.
fn check_keys(file: &ConfigFile, root: &Command) -> Result<(), ConfigError> {
    let commands: Vec<&Command> = root
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .collect();
    let level = |prefix: &[&str], t: &toml::Table, top: bool| -> Result<(), ConfigError> {
        for (k, v) in t {
            let at = |extra: Option<&str>| -> Vec<String> {
                let mut keys: Vec<String> = prefix.iter().map(|p| p.to_string()).collect();
                keys.push(k.clone());
                keys.extend(extra.map(str::to_string));
                keys
            };
            let err = |extra: Option<&str>, message: String| {
                let keys = at(extra);
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                file.error(&keys, message)
            };
            if config::SETTING_KEYS.iter().any(|s| same_key(k, s)) && !same_key(k, "expire") {
                continue;
            }
            if top && k == "cluster" {
                let Some(clusters) = v.as_table() else {
                    return Err(err(None, "must be [cluster.NAME] tables".into()));
                };
                for name in clusters.keys() {
                    file.cluster(name)?;
                }
                continue;
            }
            if let Some(c) = commands.iter().find(|c| same_key(k, c.get_name())) {
                let Some(t) = v.as_table() else {
                    return Err(err(
                        None,
                        format!("must be a table ([{}]) of {} flags", k, c.get_name()),
                    ));
                };
                for key in t.keys() {
                    let policy = c.get_name() == "expire" && key.starts_with("keep");
                    if !policy && !is_flag_of(c, key) {
                        return Err(err(
                            Some(key),
                            format!("is not a flag of pitr {}", c.get_name()),
                        ));
                    }
                }
                continue;
            }
            if !commands.iter().any(|c| is_flag_of(c, k)) {
                return Err(err(
                    None,
                    "is not a setting or a flag of any command (see pitr COMMAND --help)".into(),
                ));
            }
        }
        Ok(())
    };
    level(&[], &file.table, true)?;
    for name in file.cluster_names() {
        let t = file.cluster(&name)?;
        if let Some((k, _)) = table_of(t, "cluster") {
            return Err(file.error(&["cluster", &name, k], "clusters do not nest"));
        }
        level(&["cluster", &name], t, false)?;
    }
    Ok(())
}

/// The flags the config file adds to command `command` (its leaf `leaf`, matched as `matches`).
fn defaults_for(
    file: &ConfigFile,
    cluster: Option<&str>,
    command: &str,
    leaf: &Command,
    matches: &[&ArgMatches],
) -> Result<Vec<OsString>, ConfigError> {
    // The tables a key is looked for in, first match wins, each with its key path.
    let mut tables: Vec<(Vec<String>, &toml::Table)> = Vec::new();
    if let Some(name) = cluster {
        let c = file.cluster(name)?;
        if let Some((k, toml::Value::Table(t))) = table_of(c, command) {
            tables.push((vec!["cluster".into(), name.into(), k.clone()], t));
        }
        tables.push((vec!["cluster".into(), name.into()], c));
    }
    if let Some((k, toml::Value::Table(t))) = table_of(&file.table, command) {
        tables.push((vec![k.clone()], t));
    }
    tables.push((Vec::new(), &file.table));
    let mut out = Vec::new();
    for arg in flags(leaf) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if given(matches, id) {
            continue;
        }
        // A flag that conflicts with one given is left to the command line.
        if leaf
            .get_arg_conflicts_with(arg)
            .iter()
            .any(|c| given(matches, c.get_id().as_str()))
        {
            continue;
        }
        let found = tables.iter().find_map(|(prefix, t)| {
            let (k, v) = table_of(t, long)?;
            // At the top and a cluster's level a table is a command's or a cluster's.
            let level = prefix.is_empty() || (prefix.len() == 2 && prefix[0] == "cluster");
            if level && v.is_table() {
                return None;
            }
            // `[expire]`'s keep_* are the retention policy, read as settings.
            let policy =
                prefix.last().is_some_and(|p| same_key(p, "expire")) && k.starts_with("keep");
            // A setting key at a cluster's or the top level is not a flag.
            let setting = config::SETTING_KEYS.iter().any(|s| same_key(k, s));
            (!policy && !setting).then(|| {
                let mut keys: Vec<&str> = prefix.iter().map(String::as_str).collect();
                keys.push(k);
                (keys, v)
            })
        });
        if let Some((keys, value)) = found {
            out.extend(as_flags(file, &keys, arg, long, value)?);
        }
    }
    Ok(out)
}

/// A config value as the flags that say it, checked by the flag's own parser.
fn as_flags(
    file: &ConfigFile,
    keys: &[&str],
    arg: &Arg,
    long: &str,
    value: &toml::Value,
) -> Result<Vec<OsString>, ConfigError> {
    let scalar = |v: &toml::Value| -> Option<String> {
        match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => None,
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            toml::Value::Boolean(b) => {
                let on = *b == matches!(arg.get_action(), ArgAction::SetTrue);
                Ok(if on {
                    vec![format!("--{long}").into()]
                } else {
                    Vec::new()
                })
            }
            _ => Err(file.error(keys, "is a switch: it must be true or false")),
        },
        ArgAction::Count => match value.as_integer() {
            Some(n) if (0..=8).contains(&n) => {
                Ok((0..n).map(|_| format!("--{long}").into()).collect())
            }
            _ => Err(file.error(keys, "must be a number from 0 to 8")),
        },
        action => {
            let many = matches!(action, ArgAction::Append);
            let values: Vec<String> = match value {
                toml::Value::Array(items) if many => items
                    .iter()
                    .map(scalar)
                    .collect::<Option<_>>()
                    .ok_or_else(|| file.error(keys, "must be a list of strings or numbers"))?,
                v => vec![scalar(v).ok_or_else(|| {
                    file.error(
                        keys,
                        if many {
                            "must be a string, a number, or a list of them"
                        } else {
                            "must be a string or a number"
                        },
                    )
                })?],
            };
            let mut out = Vec::new();
            for v in values {
                check_value(arg, long, &v).map_err(|m| file.error(keys, m))?;
                out.push(format!("--{long}={v}").into());
            }
            Ok(out)
        }
    }
}

/// Whether flag `arg` takes `value`: its own parser in a command that has nothing else.
fn check_value(arg: &Arg, long: &str, value: &str) -> Result<(), String> {
    let probe = Command::new("pitr").no_binary_name(true).arg(
        Arg::new("v")
            .long(long.to_string())
            .value_parser(arg.get_value_parser().clone())
            .value_name(
                arg.get_value_names()
                    .and_then(|n| n.first())
                    .map_or("VALUE".to_string(), ToString::to_string),
            )
            .action(ArgAction::Set),
    );
    let flag = format!("--{long}={value}");
    probe
        .try_get_matches_from([OsStr::new(&flag)])
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim();
            first.trim_start_matches("error: ").to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(text: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv: Vec<OsString> = vec!["pitr".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        match prepare(argv) {
            Ok(p) => Ok(p.argv[3..]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()),
            Err(e) => Err(e.to_string().replace(&path.display().to_string(), "FILE")),
        }
    }

    #[test]
    fn keys_become_flags_first_match_wins() {
        let text = "repo = \"file:///r\"\njobs = 2\npgdata = \"/top\"\n[backup]\njobs = 3\n[cluster.main]\npgdata = \"/srv/main\"\n[cluster.main.backup]\ntype = \"incr\"\n[restore]\njobs = 8\n";
        assert_eq!(
            prepared(text, &["backup"]).unwrap(),
            ["backup", "--pgdata=/top", "--jobs=3"]
        );
        let got = prepared(text, &["--cluster", "main", "backup"]).unwrap();
        assert!(got.contains(&"--pgdata=/srv/main".into()), "{got:?}");
        assert!(
            got.contains(&"--type=incr".into()) && got.contains(&"--jobs=3".into()),
            "{got:?}"
        );
        // The command line wins; a flag the command lacks is not added.
        let got = prepared(text, &["restore", "--jobs", "1", "--target-dir", "/t"]).unwrap();
        assert!(
            !got.iter()
                .any(|a| a.starts_with("--jobs=") || a.starts_with("--pgdata")),
            "{got:?}"
        );
        // Switches: true adds the flag, false nothing.
        let got = prepared("[info]\njson = true\n", &["info"]).unwrap();
        assert_eq!(got, ["info", "--json"]);
        assert_eq!(
            prepared("[info]\njson = false\n", &["info"]).unwrap(),
            ["info"]
        );
    }

    #[test]
    fn the_example_config_file_is_valid_once_uncommented() {
        let example = include_str!("../../packaging/pitr.toml");
        // As installed, every line is a comment: it changes nothing.
        assert!(example.lines().all(|l| l.is_empty() || l.starts_with('#')));
        assert_eq!(prepared(example, &["info"]).unwrap(), ["info"]);
        // With every setting uncommented (prose is `##`), each key is one a command takes, with
        // a value its flag accepts.
        let all: String = example
            .lines()
            .filter(|l| !l.starts_with("##"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.strip_prefix("# ").or(l.strip_prefix('#')).unwrap_or(l)
                )
            })
            .collect();
        for args in [
            &["--cluster", "main", "backup"][..],
            &["--cluster", "reports", "backup"],
            &["archive-get", "000000010000000000000001", "x"],
            &["archive-push", "x"],
            &["drill"],
            &["verify"],
            &["expire"],
        ] {
            let got = prepared(&all, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(got.len() > args.len(), "{args:?}: nothing added: {got:?}");
        }
        let got = prepared(&all, &["--cluster", "main", "backup"]).unwrap();
        for want in [
            "--type=incr",
            "--jobs=2",
            "--pgdata=/var/lib/postgresql/15/main",
            "--log-format=text",
        ] {
            assert!(got.contains(&want.to_string()), "{want}: {got:?}");
        }
    }

    #[test]
    fn bad_keys_and_values_name_file_and_line() {
        assert_eq!(
            prepared("repo = \"file:///r\"\n\njbos = 2\n", &["info"]).unwrap_err(),
            "`jbos` is not a setting or a flag of any command (see pitr COMMAND --help): line 3 of FILE"
        );
        assert_eq!(
            prepared("[backup]\njobs = \"many\"\n", &["backup"]).unwrap_err(),
            "`backup.jobs` invalid value 'many' for '--jobs <N>': invalid digit found in string: line 2 of FILE"
        );
        assert_eq!(
            prepared("[restore]\npgdata = \"/x\"\n", &["info"]).unwrap_err(),
            "`restore.pgdata` is not a flag of pitr restore: line 2 of FILE"
        );
        assert_eq!(
            prepared("[info]\njson = \"yes\"\n", &["info"]).unwrap_err(),
            "`info.json` is a switch: it must be true or false: line 2 of FILE"
        );
        assert_eq!(
            prepared(
                "[cluster.main]\njobs = [1]\n",
                &["--cluster", "main", "backup"]
            )
            .unwrap_err(),
            "`cluster.main.jobs` must be a string or a number: line 2 of FILE"
        );
        assert!(
            prepared(
                "repo = \"x\"\n",
                &["--config", "/nonexistent/pitr.toml", "info"]
            )
            .unwrap_err()
            .contains("/nonexistent/pitr.toml")
        );
    }
}
