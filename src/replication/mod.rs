//! PostgreSQL's streaming replication protocol: a physical replication connection
//! (`replication=true`), its commands (`IDENTIFY_SYSTEM`, `SHOW`, `TIMELINE_HISTORY`,
//! `CREATE_REPLICATION_SLOT`, `READ_REPLICATION_SLOT`, `START_REPLICATION`) and the CopyBoth
//! stream of WAL. No other module knows the wire: `receive` asks this one for WAL.
//!
//! tokio-postgres speaks no replication mode, so the connection is made here: startup,
//! authentication as libpq does it (trust, password, md5, SCRAM-SHA-256), simple queries, and the
//! copy sub-protocol. postgres-protocol encodes the frontend messages and computes md5 and SCRAM;
//! `wire` parses what the server sends.

mod tls;
pub mod wire;

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{Host, SslMode};

use crate::pg::{Lsn, TimelineId};
use wire::{Frame, StreamMessage};

/// How long connecting (up to the first `ReadyForQuery`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection's transport.
enum Transport {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    Unix(tokio::net::UnixStream),
}

impl Transport {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read_buf(buf).await,
            Transport::Tls(s) => s.read_buf(buf).await,
            Transport::Unix(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(data).await,
            Transport::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Unix(s) => s.write_all(data).await,
        }
    }
}

/// What `IDENTIFY_SYSTEM` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// Its current WAL flush position.
    pub xlogpos: Lsn,
}

/// What the stream brings next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// WAL bytes.
    Wal {
        /// Where they start.
        start: Lsn,
        /// The server's end of WAL.
        server_end: Lsn,
        /// The bytes.
        data: Bytes,
    },
    /// A keepalive.
    Keepalive {
        /// The server's end of WAL.
        server_end: Lsn,
        /// Whether it wants a status update now.
        reply: bool,
    },
    /// The server ended the stream (the timeline ended: it was promoted, or follows another).
    /// Call [`ReplConn::end_of_timeline`] next, outside any `select!`, for where the next
    /// timeline starts.
    StreamEnded,
}

/// A physical replication connection.
pub struct ReplConn {
    io: Transport,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// `server_version` as the server reported it at startup (`18.1`, `15.14 (Debian …)`).
    pub server_version: String,
    /// Where it connects, for messages (never the password).
    pub describe: String,
    streaming: bool,
    /// A `BASE_BACKUP` being read.
    backup: Option<BackupState>,
}

/// The server's major version from `server_version` (`15.14 (Debian …)` → 15).
pub fn major_of(server_version: &str) -> Option<u32> {
    server_version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
}

impl ReplConn {
    /// Connect to the server `cfg` names (the first host that answers), in replication mode.
    ///
    /// # Errors
    /// No host can be reached, the login is refused (the server's message, one line), the server
    /// asks for TLS or an authentication pitr does not speak.
    pub async fn connect(cfg: &tokio_postgres::Config) -> anyhow::Result<ReplConn> {
        let describe = crate::pgconn::describe(cfg);
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let mut last = None;
        for host in cfg.get_hosts() {
            let io = match host {
                Host::Tcp(h) => match tokio::net::TcpStream::connect((h.as_str(), port)).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        match cfg.get_ssl_mode() {
                            SslMode::Disable => Ok(Transport::Tcp(s)),
                            mode => tls::negotiate(s, h, mode == SslMode::Require)
                                .await
                                .with_context(|| format!("connect to PostgreSQL ({describe})"))?,
                        }
                    }
                    Err(e) => Err(e),
                },
                Host::Unix(dir) => {
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                        .await
                        .map(Transport::Unix)
                }
            };
            match io {
                Ok(io) => {
                    let mut conn = ReplConn {
                        io,
                        rbuf: BytesMut::with_capacity(64 << 10),
                        wbuf: BytesMut::new(),
                        server_version: String::new(),
                        describe: describe.clone(),
                        streaming: false,
                        backup: None,
                    };
                    tokio::time::timeout(CONNECT_TIMEOUT, conn.startup(cfg))
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "connect to PostgreSQL ({describe}): no answer within {} s",
                                CONNECT_TIMEOUT.as_secs()
                            )
                        })??;
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(anyhow::Error::new(e).context(format!(
                "connect to PostgreSQL ({describe}) for replication"
            ))),
            None => bail!("connect to PostgreSQL ({describe}): no host to connect to"),
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let out = self.wbuf.split();
        self.io
            .write_all(&out)
            .await
            .with_context(|| format!("write to PostgreSQL ({})", self.describe))
    }

    /// The next message from the server.
    async fn read(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = wire::take_frame(&mut self.rbuf)
                .map_err(|e| anyhow::anyhow!("PostgreSQL ({}): {e}", self.describe))?
            {
                return Ok(f);
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .with_context(|| format!("read from PostgreSQL ({})", self.describe))?;
            if n == 0 {
                bail!(
                    "PostgreSQL ({}) closed the replication connection",
                    self.describe
                );
            }
        }
    }

    /// Whether a whole message from the server is already here (read, not yet handed out).
    pub fn has_message(&self) -> bool {
        self.rbuf.len() >= 5
            && self.rbuf.len()
                > u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                    as usize
    }

    /// The server refused `cmd` with error `body`: read up to the ReadyForQuery that follows, so
    /// the connection can take another command, and return the error.
    async fn failed(&mut self, body: Bytes, cmd: &str) -> anyhow::Error {
        let e = self.server_error(body);
        loop {
            match self.read().await {
                Ok(f) if f.tag == b'Z' => break,
                Ok(_) => {}
                Err(read) => return e.context(format!("run {cmd} (then: {read})")),
            }
        }
        e.context(format!("run {cmd}"))
    }

    /// A server error as this connection's error.
    fn server_error(&self, body: Bytes) -> anyhow::Error {
        anyhow::Error::new(ServerError {
            code: wire::error_code(body.clone()),
            text: wire::error_text(body),
        })
        .context(format!("PostgreSQL ({})", self.describe))
    }

    async fn startup(&mut self, cfg: &tokio_postgres::Config) -> anyhow::Result<()> {
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let app = cfg.get_application_name().unwrap_or("pitr").to_string();
        let params = [
            ("user", user.as_str()),
            ("replication", "true"),
            ("application_name", app.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let describe = self.describe.clone();
        // A physical replication connection's database, for the password file, is `replication`.
        let password = || -> anyhow::Result<Vec<u8>> {
            cfg.get_password()
                .map(<[u8]>::to_vec)
                .or_else(|| crate::pgconn::password_for(cfg, "replication").map(String::into_bytes))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "PostgreSQL ({describe}) asks for a password: give it in the connection string, PGPASSWORD or the password file (~/.pgpass, PGPASSFILE)"
                    )
                })
        };
        let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'R' => {
                    let mut b = wire::Body::new(f.body, "authentication");
                    match b.i32().map_err(anyhow::Error::msg)? {
                        0 => {}
                        3 => {
                            let mut pw = password()?;
                            pw.push(0);
                            frontend::password_message(&pw, &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        5 => {
                            let salt = b.bytes(4).map_err(anyhow::Error::msg)?;
                            let salt = [salt[0], salt[1], salt[2], salt[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                &password()?,
                                salt,
                            );
                            let mut pw = hash.into_bytes();
                            pw.push(0);
                            frontend::password_message(&pw, &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mut mechanisms = Vec::new();
                            while let Ok(m) = b.cstr() {
                                if m.is_empty() {
                                    break;
                                }
                                mechanisms.push(m);
                            }
                            if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                                bail!(
                                    "PostgreSQL ({}) offers only {} (pitr speaks SCRAM-SHA-256, md5 and password)",
                                    self.describe,
                                    mechanisms.join(", ")
                                );
                            }
                            let s = postgres_protocol::authentication::sasl::ScramSha256::new(
                                &password()?,
                                postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().context("SCRAM continue before start")?;
                            s.update(&b.rest()).with_context(|| {
                                format!("SCRAM authentication with {}", self.describe)
                            })?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().context("SCRAM final before start")?;
                            s.finish(&b.rest()).with_context(|| {
                                format!(
                                    "SCRAM authentication with {}: the server's proof is wrong",
                                    self.describe
                                )
                            })?;
                        }
                        other => bail!(
                            "PostgreSQL ({}) asks for authentication method {other}, which pitr does not speak (trust, password, md5 and SCRAM-SHA-256 it does)",
                            self.describe
                        ),
                    }
                }
                b'S' => {
                    let mut b = wire::Body::new(f.body, "ParameterStatus");
                    if let (Ok(k), Ok(v)) = (b.cstr(), b.cstr())
                        && k == "server_version"
                    {
                        self.server_version = v;
                    }
                }
                b'K' | b'N' => {}
                b'E' => return Err(self.server_error(f.body)),
                b'Z' => return Ok(()),
                other => bail!(
                    "PostgreSQL ({}) sent message {:?} during startup",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// Run a replication command and collect the rows of its result (each column as text).
    ///
    /// # Errors
    /// The server refuses the command (its message), or the connection fails.
    pub async fn query(&mut self, command: &str) -> anyhow::Result<Vec<Vec<Option<Bytes>>>> {
        frontend::query(command, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'T' | b'C' | b'N' | b'I' | b'S' => {}
                b'D' => rows.push(wire::data_row(f.body).map_err(anyhow::Error::msg)?),
                b'E' => failed = Some(self.server_error(f.body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e.context(format!("run {command}"))),
                        None => Ok(rows),
                    };
                }
                other => bail!(
                    "PostgreSQL ({}) answered {command} with message {:?}",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// The command fails or its answer is malformed.
    pub async fn identify_system(&mut self) -> anyhow::Result<SystemInfo> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().context("IDENTIFY_SYSTEM returned no row")?;
        let col = |i: usize| -> anyhow::Result<String> {
            row.get(i)
                .and_then(|c| c.as_ref())
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .with_context(|| format!("IDENTIFY_SYSTEM returned no column {i}"))
        };
        let system_identifier = col(0)?
            .parse()
            .context("IDENTIFY_SYSTEM: systemid is not a number")?;
        let timeline = col(1)?
            .parse::<u32>()
            .ok()
            .and_then(TimelineId::new)
            .context("IDENTIFY_SYSTEM: timeline is not a timeline")?;
        let xlogpos = col(2)?
            .parse::<Lsn>()
            .map_err(|e| anyhow::anyhow!("IDENTIFY_SYSTEM: xlogpos: {e}"))?;
        Ok(SystemInfo {
            system_identifier,
            timeline,
            xlogpos,
        })
    }

    /// `SHOW name`, as text.
    ///
    /// # Errors
    /// The command fails.
    pub async fn show(&mut self, name: &str) -> anyhow::Result<String> {
        let rows = self.query(&format!("SHOW {name}")).await?;
        rows.first()
            .and_then(|r| r.first())
            .and_then(|c| c.as_ref())
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .with_context(|| format!("SHOW {name} returned nothing"))
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    ///
    /// # Errors
    /// The server has no such file, or the connection fails.
    pub async fn timeline_history(&mut self, tli: TimelineId) -> anyhow::Result<(String, Bytes)> {
        let rows = self
            .query(&format!("TIMELINE_HISTORY {}", tli.get()))
            .await?;
        let row = rows.first().context("TIMELINE_HISTORY returned no row")?;
        let name = row
            .first()
            .and_then(|c| c.as_ref())
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .context("TIMELINE_HISTORY returned no file name")?;
        let content = row
            .get(1)
            .and_then(|c| c.clone())
            .context("TIMELINE_HISTORY returned no content")?;
        Ok((name, content))
    }

    /// The physical slot's restart position and timeline (`READ_REPLICATION_SLOT`, PostgreSQL
    /// 15+); `Ok(None)` when there is no such slot or it holds no position.
    ///
    /// # Errors
    /// The command fails (on PostgreSQL 14 and older it does not exist).
    pub async fn read_slot(&mut self, slot: &str) -> anyhow::Result<Option<(Lsn, TimelineId)>> {
        let rows = self
            .query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let text = |i: usize| {
            row.get(i)
                .and_then(|c| c.as_ref())
                .map(|c| String::from_utf8_lossy(c).into_owned())
        };
        let (Some(lsn), Some(tli)) = (text(1), text(2)) else {
            return Ok(None);
        };
        let lsn = lsn
            .parse::<Lsn>()
            .map_err(|e| anyhow::anyhow!("READ_REPLICATION_SLOT: {e}"))?;
        let tli = tli
            .parse::<u32>()
            .ok()
            .and_then(TimelineId::new)
            .context("READ_REPLICATION_SLOT: not a timeline")?;
        Ok(Some((lsn, tli)))
    }

    /// Create a physical slot that reserves WAL at once, in the syntax of server `major`.
    ///
    /// # Errors
    /// The slot exists, or the server refuses.
    pub async fn create_slot(&mut self, slot: &str, major: u32) -> anyhow::Result<()> {
        let cmd = if major >= 15 {
            format!(
                "CREATE_REPLICATION_SLOT {} PHYSICAL (RESERVE_WAL)",
                quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
                quote_ident(slot)
            )
        };
        self.query(&cmd).await.map(|_| ())
    }

    /// `START_REPLICATION [SLOT s] PHYSICAL start TIMELINE tli`: from here on the connection
    /// carries the stream ([`ReplConn::next_event`], [`ReplConn::send_status`]).
    ///
    /// # Errors
    /// The server refuses (the position is gone, the slot is in use, …).
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        tli: TimelineId,
    ) -> anyhow::Result<()> {
        let slot = slot
            .map(|s| format!("SLOT {} ", quote_ident(s)))
            .unwrap_or_default();
        let cmd = format!(
            "START_REPLICATION {slot}PHYSICAL {start} TIMELINE {}",
            tli.get()
        );
        frontend::query(&cmd, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'W' => {
                    self.streaming = true;
                    return Ok(());
                }
                b'N' | b'S' => {}
                b'E' => return Err(self.failed(f.body, &cmd).await),
                other => bail!(
                    "PostgreSQL ({}) answered {cmd} with message {:?}",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// The next thing the stream brings. Cancel-safe: a message is either handed out whole or
    /// left in the read buffer (so it may be raced against timers in a `select!`).
    ///
    /// # Errors
    /// The connection fails, the server reports an error, or sends something that is not the
    /// protocol.
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        if !self.streaming {
            bail!("internal: next_event without START_REPLICATION");
        }
        loop {
            let f = self.read().await?;
            match f.tag {
                b'd' => {
                    return Ok(
                        match wire::stream_message(f.body).map_err(anyhow::Error::msg)? {
                            StreamMessage::XLogData {
                                start, end, data, ..
                            } => Event::Wal {
                                start: Lsn(start),
                                server_end: Lsn(end),
                                data,
                            },
                            StreamMessage::Keepalive { end, reply, .. } => Event::Keepalive {
                                server_end: Lsn(end),
                                reply,
                            },
                        },
                    );
                }
                // Nothing more is awaited here, so that a caller's select! that drops this future
                // cannot lose the rest of the exchange (next_event is cancel-safe).
                b'c' => {
                    self.streaming = false;
                    return Ok(Event::StreamEnded);
                }
                b'N' | b'S' => {}
                b'E' => return Err(self.server_error(f.body)),
                other => bail!(
                    "PostgreSQL ({}) sent message {:?} in the replication stream",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// After [`Event::StreamEnded`]: answer with CopyDone and read which timeline comes next and
    /// where it starts. The connection is then ready for another `START_REPLICATION`.
    ///
    /// # Errors
    /// The server ended without naming a next timeline (it was shut down), or the connection
    /// fails.
    pub async fn end_of_timeline(&mut self) -> anyhow::Result<(TimelineId, Lsn)> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let mut next = None;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'D' => {
                    let cols = wire::data_row(f.body).map_err(anyhow::Error::msg)?;
                    let text = |i: usize| {
                        cols.get(i)
                            .and_then(|c| c.as_ref())
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                    };
                    let tli = text(0)
                        .and_then(|t| t.parse::<u32>().ok())
                        .and_then(TimelineId::new)
                        .context("end of timeline: no next timeline")?;
                    let start = text(1)
                        .context("end of timeline: no start position")?
                        .parse::<Lsn>()
                        .map_err(|e| anyhow::anyhow!("end of timeline: {e}"))?;
                    next = Some((tli, start));
                }
                b'T' | b'C' | b'N' | b'S' | b'd' => {}
                b'E' => return Err(self.server_error(f.body)),
                b'Z' => {
                    return match next {
                        Some((next, start)) => Ok((next, start)),
                        None => bail!(
                            "PostgreSQL ({}) ended the replication stream without naming the next timeline (was the server shut down?)",
                            self.describe
                        ),
                    };
                }
                other => bail!(
                    "PostgreSQL ({}) sent message {:?} after the end of the stream",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// Tell the server what is written, flushed (here: durably in the repository) and applied.
    ///
    /// # Errors
    /// The connection fails.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    ) -> anyhow::Result<()> {
        let now = crate::pg::PgTimestamp::now().0;
        let msg = wire::status_update(write.0, flush.0, apply.0, now, reply);
        frontend::CopyData::new(&msg[..])?.write(&mut self.wbuf);
        self.flush().await
    }
}

/// Where `BASE_BACKUP` starts: its start position and timeline, and the tablespaces it sends
/// (`None`: the main data directory), each as (oid, location).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStart {
    /// The start position (the backup's checkpoint redo point).
    pub lsn: Lsn,
    /// Its timeline.
    pub tli: TimelineId,
    /// The tablespaces, in the order the server lists them.
    pub tablespaces: Vec<(Option<u32>, Option<String>)>,
}

/// What `BASE_BACKUP` sends next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// A new archive begins: the main data directory (`None`) or tablespace `oid`.
    Archive(Option<u32>),
    /// Bytes of the current archive (a tar stream without its end-of-archive blocks).
    Data(Bytes),
    /// The backup ended at this position, on this timeline.
    End {
        /// The end position.
        lsn: Lsn,
        /// Its timeline.
        tli: TimelineId,
    },
}

/// The state of a `BASE_BACKUP` being read.
#[derive(Debug, Default)]
struct BackupState {
    major: u32,
    /// PostgreSQL 13 and 14 send one CopyOut per tablespace, in the listed order.
    archives: Vec<Option<u32>>,
    next_archive: usize,
    end: Option<(Lsn, TimelineId)>,
}

impl ReplConn {
    /// Start `BASE_BACKUP` (a fast checkpoint, no WAL, no server manifest, a tablespace map, not
    /// waiting for archiving: pitr waits for the WAL itself) in the syntax of server `major`, and
    /// read its start. The archives follow through [`ReplConn::backup_event`].
    ///
    /// # Errors
    /// The server refuses (a backup already running on 13, not a replication role, …).
    pub async fn base_backup(&mut self, label: &str, major: u32) -> anyhow::Result<BackupStart> {
        let label = label.replace('\'', "''");
        let cmd = if major >= 15 {
            format!(
                "BASE_BACKUP (LABEL '{label}', CHECKPOINT 'fast', WAIT false, MANIFEST 'no', TABLESPACE_MAP true)"
            )
        } else {
            format!("BASE_BACKUP LABEL '{label}' FAST NOWAIT TABLESPACE_MAP MANIFEST 'no'")
        };
        frontend::query(&cmd, &mut self.wbuf)?;
        self.flush().await?;
        let start = self.result_set(&cmd).await?;
        let first = start
            .first()
            .context("BASE_BACKUP sent no start position")?;
        let text = |row: &Vec<Option<Bytes>>, i: usize| {
            row.get(i)
                .and_then(|c| c.as_ref())
                .map(|c| String::from_utf8_lossy(c).into_owned())
        };
        let lsn = text(first, 0)
            .context("BASE_BACKUP: no start position")?
            .parse::<Lsn>()
            .map_err(|e| anyhow::anyhow!("BASE_BACKUP start: {e}"))?;
        let tli = text(first, 1)
            .and_then(|t| t.parse::<u32>().ok())
            .and_then(TimelineId::new)
            .context("BASE_BACKUP: no start timeline")?;
        let rows = self.result_set(&cmd).await?;
        let tablespaces: Vec<(Option<u32>, Option<String>)> = rows
            .iter()
            .map(|r| (text(r, 0).and_then(|o| o.parse().ok()), text(r, 1)))
            .collect();
        self.backup = Some(BackupState {
            major,
            archives: tablespaces.iter().map(|(oid, _)| *oid).collect(),
            ..BackupState::default()
        });
        Ok(BackupStart {
            lsn,
            tli,
            tablespaces,
        })
    }

    /// The rows of one result set (up to its CommandComplete).
    async fn result_set(&mut self, cmd: &str) -> anyhow::Result<Vec<Vec<Option<Bytes>>>> {
        let mut rows = Vec::new();
        loop {
            let f = self.read().await?;
            match f.tag {
                b'T' | b'S' => {}
                b'N' => tracing::warn!("{}", wire::error_text(f.body)),
                b'D' => rows.push(wire::data_row(f.body).map_err(anyhow::Error::msg)?),
                b'C' => return Ok(rows),
                b'E' => return Err(self.failed(f.body, cmd).await),
                other => bail!(
                    "PostgreSQL ({}) answered {cmd} with message {:?}",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }

    /// What `BASE_BACKUP` sends next. The server's warnings (a page that fails its checksum) are
    /// logged.
    ///
    /// # Errors
    /// The server reports an error, or sends something that is not the protocol.
    pub async fn backup_event(&mut self) -> anyhow::Result<BackupEvent> {
        let Some(mut st) = self.backup.take() else {
            bail!("internal: backup_event without BASE_BACKUP");
        };
        let event = self.next_backup_event(&mut st).await;
        if !matches!(event, Ok(BackupEvent::End { .. }) | Err(_)) {
            self.backup = Some(st);
        }
        event
    }

    async fn next_backup_event(&mut self, st: &mut BackupState) -> anyhow::Result<BackupEvent> {
        loop {
            let f = self.read().await?;
            match f.tag {
                b'H' if st.major < 15 => {
                    let oid = st.archives.get(st.next_archive).copied().flatten();
                    st.next_archive += 1;
                    return Ok(BackupEvent::Archive(oid));
                }
                b'H' | b'c' | b'T' | b'C' | b'S' => {}
                b'N' => tracing::warn!(
                    "PostgreSQL ({}): {}",
                    self.describe,
                    wire::error_text(f.body)
                ),
                b'd' if st.major < 15 => return Ok(BackupEvent::Data(f.body)),
                b'd' => {
                    let mut b = wire::Body::new(f.body, "BASE_BACKUP");
                    match b.u8().map_err(anyhow::Error::msg)? {
                        b'n' => {
                            let name = b.cstr().map_err(anyhow::Error::msg)?;
                            let oid = name.strip_suffix(".tar").and_then(|n| n.parse().ok());
                            return Ok(BackupEvent::Archive(oid));
                        }
                        b'd' => return Ok(BackupEvent::Data(b.rest())),
                        // Progress, and a server manifest (not asked for).
                        b'p' | b'm' => {}
                        other => bail!(
                            "PostgreSQL ({}) sent BASE_BACKUP message {:?}",
                            self.describe,
                            char::from(other)
                        ),
                    }
                }
                b'D' => {
                    let cols = wire::data_row(f.body).map_err(anyhow::Error::msg)?;
                    let text = |i: usize| {
                        cols.get(i)
                            .and_then(|c| c.as_ref())
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                    };
                    let lsn = text(0)
                        .context("BASE_BACKUP: no end position")?
                        .parse::<Lsn>()
                        .map_err(|e| anyhow::anyhow!("BASE_BACKUP end: {e}"))?;
                    let tli = text(1)
                        .and_then(|t| t.parse::<u32>().ok())
                        .and_then(TimelineId::new)
                        .context("BASE_BACKUP: no end timeline")?;
                    st.end = Some((lsn, tli));
                }
                b'E' => return Err(self.server_error(f.body).context("BASE_BACKUP")),
                b'Z' => {
                    let (lsn, tli) = st
                        .end
                        .context("BASE_BACKUP ended without its end position")?;
                    return Ok(BackupEvent::End { lsn, tli });
                }
                other => bail!(
                    "PostgreSQL ({}) sent message {:?} during BASE_BACKUP",
                    self.describe,
                    char::from(other)
                ),
            }
        }
    }
}

/// A replication identifier quoted as PostgreSQL's grammar wants it.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An error the server reported.
#[derive(Debug)]
pub struct ServerError {
    /// Its SQLSTATE.
    pub code: Option<String>,
    /// Its text, one line.
    pub text: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ServerError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn row(cols: &[&[u8]]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            b.extend_from_slice(&(c.len() as i32).to_be_bytes());
            b.extend_from_slice(c);
        }
        msg(b'D', &b)
    }

    /// A recorded exchange: START_REPLICATION, WAL, a keepalive, the end of the timeline and the
    /// next one's start, fed to the client over a socket pair.
    #[tokio::test]
    async fn a_stream_to_the_end_of_its_timeline() {
        let (client, mut server) = tokio::net::UnixStream::pair().unwrap();
        let mut conn = ReplConn {
            io: Transport::Unix(client),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            server_version: "18.1".into(),
            describe: "test".into(),
            streaming: false,
            backup: None,
        };
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0300_0000u64.to_be_bytes());
        w.extend_from_slice(&0x0300_0010u64.to_be_bytes());
        w.extend_from_slice(&0u64.to_be_bytes());
        w.extend_from_slice(&[7u8; 16]);
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x0300_0010u64.to_be_bytes());
        k.extend_from_slice(&0u64.to_be_bytes());
        k.push(1);
        let mut recorded = msg(b'W', &[0, 0, 0]);
        recorded.extend(msg(b'd', &w));
        recorded.extend(msg(b'd', &k));
        recorded.extend(msg(b'c', b""));
        recorded.extend(msg(b'T', &[0, 2]));
        recorded.extend(row(&[b"2", b"0/3000010"]));
        recorded.extend(msg(b'C', b"START_STREAMING\0"));
        recorded.extend(msg(b'C', b"START_REPLICATION\0"));
        recorded.extend(msg(b'Z', b"I"));
        // Byte by byte, as a slow network would deliver it.
        let feeder = tokio::spawn(async move {
            for b in recorded {
                server.write_all(&[b]).await.unwrap();
            }
            let mut sent = vec![0u8; 256];
            let mut got = Vec::new();
            while !got.ends_with(&[b'c', 0, 0, 0, 4]) {
                let n = server.read(&mut sent).await.unwrap();
                assert!(n > 0, "the client closed before its CopyDone");
                got.extend_from_slice(&sent[..n]);
            }
            got
        });
        conn.start_replication(Some("s"), Lsn(0x0300_0000), TimelineId::ONE)
            .await
            .unwrap();
        assert_eq!(
            conn.next_event().await.unwrap(),
            Event::Wal {
                start: Lsn(0x0300_0000),
                server_end: Lsn(0x0300_0010),
                data: Bytes::from(vec![7u8; 16]),
            }
        );
        assert_eq!(
            conn.next_event().await.unwrap(),
            Event::Keepalive {
                server_end: Lsn(0x0300_0010),
                reply: true
            }
        );
        conn.send_status(Lsn(0x0300_0010), Lsn(0x0300_0000), Lsn::INVALID, false)
            .await
            .unwrap();
        assert_eq!(conn.next_event().await.unwrap(), Event::StreamEnded);
        let (next, start) = conn.end_of_timeline().await.unwrap();
        assert_eq!(next.get(), 2);
        assert_eq!(start, Lsn(0x0300_0010));
        let sent = feeder.await.unwrap();
        // The client's messages: the query, a status update (CopyData 'r'), its CopyDone.
        assert_eq!(sent[0], b'Q');
        let query = String::from_utf8_lossy(&sent[5..]);
        assert!(
            query.starts_with("START_REPLICATION SLOT \"s\" PHYSICAL 0/3000000 TIMELINE 1"),
            "{query}"
        );
        assert!(sent.windows(2).any(|w| w == [b'd', 0]), "no status update");
    }

    #[test]
    fn major_versions_and_identifiers() {
        assert_eq!(major_of("18.1"), Some(18));
        assert_eq!(major_of("15.14 (Debian 15.14-0+deb12u1)"), Some(15));
        assert_eq!(major_of("13beta2"), Some(13));
        assert_eq!(major_of(""), None);
        assert_eq!(quote_ident("pitr"), "\"pitr\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
