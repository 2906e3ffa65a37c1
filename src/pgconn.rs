//! Connecting to the PostgreSQL server pitr works with.
//!
//! `--dbname` takes a libpq connection string (`host=/var/run/postgresql user=postgres`) or a
//! `postgresql://` URI. What it leaves out comes from PGHOST, PGPORT, PGUSER, PGDATABASE and
//! PGPASSWORD, then, when the data directory is known, from its `postmaster.pid` (the socket
//! directory and port the running server uses), then libpq's defaults.

use std::path::Path;

use anyhow::{Context, bail};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::pg::PgMajor;

/// Socket directory and port from `postmaster.pid` (lines 4 and 5), if the server is running.
pub fn postmaster_socket(pgdata: &Path) -> Option<(String, u16)> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let port = lines.get(3)?.trim().parse().ok()?;
    let dir = lines.get(4)?.trim();
    (!dir.is_empty()).then(|| (dir.to_string(), port))
}

/// Build the connection settings.
///
/// # Errors
/// An unparsable connection string.
pub fn config(dbname: Option<&str>, pgdata: Option<&Path>) -> anyhow::Result<Config> {
    let mut cfg: Config = match dbname {
        Some(s) => s
            .parse()
            .with_context(|| format!("parse connection string {s:?}"))?,
        None => Config::new(),
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let from_pid = pgdata.and_then(postmaster_socket);
    if cfg.get_hosts().is_empty() {
        match (env("PGHOST"), &from_pid) {
            (Some(h), _) => {
                for h in h.split(',') {
                    if h.starts_with('/') {
                        cfg.host_path(h)
                    } else {
                        cfg.host(h)
                    };
                }
            }
            (None, Some((dir, _))) => {
                cfg.host_path(dir);
            }
            (None, None) => {
                cfg.host_path("/var/run/postgresql");
                cfg.host_path("/tmp");
            }
        }
    }
    if cfg.get_ports().is_empty() {
        let port = env("PGPORT")
            .and_then(|p| p.parse().ok())
            .or(from_pid.map(|(_, p)| p))
            .unwrap_or(5432);
        cfg.port(port);
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        cfg.user(&user);
    }
    if cfg.get_dbname().is_none() {
        cfg.dbname(env("PGDATABASE").unwrap_or_else(|| "postgres".into()));
    }
    if cfg.get_password().is_none()
        && let Some(p) = env("PGPASSWORD")
    {
        cfg.password(p);
    }
    if cfg.get_password().is_none()
        && let Some(p) = password_for(&cfg, cfg.get_dbname().unwrap_or("postgres"))
    {
        cfg.password(p);
    }
    cfg.application_name("pitr");
    Ok(cfg)
}

/// The password the password file (`PGPASSFILE`, else `~/.pgpass`) holds for `cfg`'s first host,
/// port and user and database `dbname` (`replication` for a physical replication connection), as
/// libpq reads it: `host:port:database:user:password` lines, `*` matching anything, `\:` and
/// `\\` escaped; a Unix socket matches `localhost` or its directory. A file that others can read
/// is ignored, as libpq ignores it.
pub fn password_for(cfg: &Config, dbname: &str) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignored (chmod 0600 it)",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let hosts: Vec<String> = match cfg.get_hosts().first()? {
        Host::Tcp(h) => vec![h.clone()],
        Host::Unix(p) => vec!["localhost".into(), p.display().to_string()],
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = cfg.get_user().unwrap_or("");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = pgpass_fields(line)?;
            let [h, p, d, u, pw] = <[String; 5]>::try_from(fields).ok()?;
            let any = |f: &str, v: &str| f == "*" || f == v;
            (hosts.iter().any(|x| any(&h, x)) && any(&p, &port) && any(&d, dbname) && any(&u, user))
                .then_some(pw)
        })
}

/// A password file line's fields, unescaped; `None` unless there are five.
fn pgpass_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut()?.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

/// A short description of where `cfg` connects, for messages (never the password).
pub fn describe(cfg: &Config) -> String {
    let host = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "host={host} port={port} user={} dbname={}",
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

/// Connect; the connection task runs in the background until the client is dropped.
///
/// # Errors
/// The server cannot be reached or refuses the login.
pub async fn connect(cfg: &Config) -> anyhow::Result<Client> {
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .with_context(|| format!("connect to PostgreSQL ({})", describe(cfg)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection closed: {e}");
        }
    });
    Ok(client)
}

/// The server's major version.
///
/// # Errors
/// A query failure or an unsupported version.
pub async fn server_major(client: &Client) -> anyhow::Result<PgMajor> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    let num: i32 = row.get(0);
    let major = u32::try_from(num / 10000).unwrap_or(0);
    match PgMajor::from_number(major) {
        Some(m) => Ok(m),
        None => bail!("PostgreSQL {major} is not supported (pitr supports 13–18)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines() {
        assert_eq!(
            pgpass_fields("db1:5432:*:rep:se\\:cret").unwrap(),
            ["db1", "5432", "*", "rep", "se:cret"]
        );
        assert_eq!(pgpass_fields("a:b:c:d:e:f").unwrap()[4], "e:f");
        assert!(pgpass_fields("a:b:c").is_none());
    }

    #[test]
    fn conninfo_forms_and_postmaster_pid() {
        let c = config(Some("host=/run/pg port=5433 user=alice dbname=app"), None).unwrap();
        assert_eq!(describe(&c), "host=/run/pg port=5433 user=alice dbname=app");
        let c = config(Some("postgresql://bob@db1:6000/sales"), None).unwrap();
        assert_eq!(describe(&c), "host=db1 port=6000 user=bob dbname=sales");
        assert!(config(Some("host='unterminated"), None).is_err());

        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postmaster.pid"),
            "4242\n/data\n1700000000\n5544\n/tmp/sock\n*\n",
        )
        .unwrap();
        assert_eq!(
            postmaster_socket(d.path()),
            Some(("/tmp/sock".into(), 5544))
        );
        let c = config(Some("user=postgres"), Some(d.path())).unwrap();
        if std::env::var_os("PGHOST").is_none() && std::env::var_os("PGPORT").is_none() {
            assert!(
                describe(&c).starts_with("host=/tmp/sock port=5544 user=postgres"),
                "{}",
                describe(&c)
            );
        }
    }
}
