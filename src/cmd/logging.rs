//! Where messages go: stderr always (PostgreSQL copies it into its server log under
//! `archive_command` and `restore_command`), and with `--log-file` a file that every call appends
//! one line per event to, ending with a record of the call itself (command, WAL name, exit code,
//! duration, error), so archive-push and archive-get have a history of their own.
//!
//! `--log-format text` (the default) or `json` (one object per line: `time`, `level`, `command`,
//! `pid`, `message`, and the event's fields such as `wal`, `key`, `lsn`).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The target of the record of a call: in the log file only, never on stderr.
pub(crate) const CALL: &str = "pitr::call";

/// `--log-level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// What each command does (the default).
    Info,
    /// Each step (as -v).
    Debug,
    /// Everything, libraries' debug messages too (as -vv).
    Trace,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// `TIME LEVEL COMMAND[PID]: message key=value …`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How to log, from the global flags.
pub(crate) struct Logging<'a> {
    pub verbose: u8,
    pub quiet: bool,
    pub level: Option<LogLevel>,
    pub file: Option<&'a Path>,
    pub format: LogFormat,
    pub command: &'static str,
}

impl Logging<'_> {
    fn level(&self) -> LogLevel {
        self.level.unwrap_or(match (self.quiet, self.verbose) {
            (true, _) => LogLevel::Error,
            (false, 0) => LogLevel::Info,
            (false, 1) => LogLevel::Debug,
            (false, _) => LogLevel::Trace,
        })
    }

    /// Install the subscriber.
    ///
    /// # Errors
    /// The log file cannot be opened for appending.
    pub(crate) fn init(&self) -> Result<(), std::io::Error> {
        let level = match self.level() {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        // Our own messages at `level`; libraries only when they warn, unless asked for more.
        let lib = if self.level() == LogLevel::Trace {
            "debug"
        } else {
            "warn"
        };
        let filter = |call: &str| {
            tracing_subscriber::EnvFilter::new(format!("{lib},pitr={level},{CALL}={call}"))
        };
        let file = match self.file {
            Some(path) => Some(open_append(path)?),
            None => None,
        };
        let lines = Lines {
            json: self.format == LogFormat::Json,
            command: self.command,
            pid: std::process::id(),
        };
        let stderr: Box<dyn Layer<_> + Send + Sync> = if self.format == LogFormat::Json {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(lines)
                    .with_filter(filter("off")),
            )
        } else {
            // stderr goes to PostgreSQL's server log: no colours there, and no time (it adds its own).
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false)
                    .without_time()
                    .with_filter(filter("off")),
            )
        };
        let file_layer = file.map(|f| {
            tracing_subscriber::fmt::layer()
                .with_writer(Mutex::new(f))
                .with_ansi(false)
                .event_format(lines)
                .with_filter(filter("info"))
        });
        tracing_subscriber::registry()
            .with(stderr)
            .with(file_layer)
            .init();
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, std::io::Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("open log file {}: {e}", path.display()))
        })
}

/// One line per event, as text or JSON.
#[derive(Clone, Copy)]
struct Lines {
    json: bool,
    command: &'static str,
    pid: u32,
}

/// An event's fields, in order, the message apart.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, serde_json::Value::String(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, serde_json::Value::String(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        let level = event.metadata().level().as_str();
        let time = pitr::pg::PgTimestamp::now().rfc3339();
        if self.json {
            let mut o = serde_json::Map::new();
            o.insert("time".into(), time.into());
            o.insert("level".into(), level.to_lowercase().into());
            o.insert("command".into(), self.command.into());
            o.insert("pid".into(), self.pid.into());
            o.insert("message".into(), f.message.into());
            for (k, v) in f.fields {
                o.insert(k.into(), v);
            }
            writeln!(writer, "{}", serde_json::Value::Object(o))
        } else {
            let mut line = format!(
                "{time} {level:<5} {}[{}]: {}",
                self.command, self.pid, f.message
            );
            for (k, v) in f.fields {
                match v {
                    serde_json::Value::String(s) if !s.contains([' ', '"', '=']) => {
                        let _ = write!(line, " {k}={s}");
                    }
                    v => {
                        let _ = write!(line, " {k}={v}");
                    }
                }
            }
            writeln!(writer, "{}", line.replace(['\n', '\r'], " "))
        }
    }
}
