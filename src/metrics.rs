//! `pitr metrics`: the repository's state as Prometheus text exposition, for a textfile collector
//! (`pitr metrics > /var/lib/node_exporter/pitr.prom.tmp && mv … pitr.prom`) or any scraper.

use std::fmt::Write as _;

use crate::catalog::Catalog;
use crate::pg::PgTimestamp;
use crate::pg::{TimelineId, WalFileName};
use crate::storage::Repo;
use crate::storage::layout::{ObjectKey, Prefix};

fn secs(t: PgTimestamp) -> f64 {
    t.unix_secs_f64()
}

/// One gauge with its samples: (labels, value).
struct Gauge {
    name: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

fn gauge(name: &'static str, help: &'static str, samples: Vec<(String, f64)>) -> Gauge {
    Gauge {
        name,
        help,
        samples,
    }
}

fn one(name: &'static str, help: &'static str, value: f64) -> Gauge {
    gauge(name, help, vec![(String::new(), value)])
}

fn timeline_label(t: TimelineId) -> String {
    format!("{{timeline=\"{t}\"}}")
}

/// Render the metrics for `repo`, at Unix time `now`.
///
/// # Errors
/// The catalog cannot be read.
pub async fn render(repo: &Repo, now: f64) -> anyhow::Result<String> {
    render_catalog(repo, &Catalog::load(repo).await?, now).await
}

/// [`render`] from a catalog already read.
///
/// # Errors
/// The store cannot be read.
pub async fn render_catalog(repo: &Repo, c: &Catalog, now: f64) -> anyhow::Result<String> {
    let mut gauges = wal_gauges(c);
    gauges.extend(exposure_gauges(repo, c, now).await?);
    gauges.extend(window_gauges(c));
    gauges.extend(backup_gauges(c, now));
    gauges.extend(verify_gauges(repo).await);
    gauges.extend(receive_gauges(repo, now).await);
    Ok(text(gauges))
}

/// One configured repository as [`repository_gauges`] shows it.
#[derive(Debug)]
pub struct RepoState {
    /// Its name.
    pub name: String,
    /// Whether its catalog could be read.
    pub up: bool,
    /// How far it trails the most advanced repository (`None`: unreadable).
    pub lag: Option<crate::info::Lag>,
}

/// Each repository's state when several are configured, labelled `repository="NAME"`: whether it
/// answers and how far it trails the most advanced one.
pub fn repository_gauges(repos: &[RepoState]) -> String {
    let label = |name: &str| {
        let escaped = name
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        format!("{{repository=\"{escaped}\"}}")
    };
    text(vec![
        gauge(
            "pitr_repository_up",
            "1 when the repository's catalog could be read, 0 when it could not.",
            repos
                .iter()
                .map(|r| (label(&r.name), if r.up { 1.0 } else { 0.0 }))
                .collect(),
        ),
        gauge(
            "pitr_repository_lag_segments",
            "WAL segments of the newest timeline the most advanced repository holds and this one lacks.",
            repos
                .iter()
                .filter_map(|r| r.lag.map(|l| (label(&r.name), l.segments as f64)))
                .collect(),
        ),
        gauge(
            "pitr_repository_lag_seconds",
            "Seconds between the latest commit recoverable from the most advanced repository and from this one.",
            repos
                .iter()
                .filter_map(|r| r.lag.map(|l| (label(&r.name), l.seconds)))
                .collect(),
        ),
    ])
}

/// Gauges as Prometheus text exposition.
fn text(gauges: Vec<Gauge>) -> String {
    let mut o = String::new();
    for g in gauges {
        let _ = writeln!(o, "# HELP {} {}", g.name, g.help);
        let _ = writeln!(o, "# TYPE {} gauge", g.name);
        for (labels, v) in g.samples {
            let _ = writeln!(o, "{}{labels} {v}", g.name);
        }
    }
    o
}

/// Segments per timeline, the newest segment, the latest commit.
fn wal_gauges(c: &Catalog) -> Vec<Gauge> {
    let mut out = vec![
        gauge(
            "pitr_archived_segments",
            "WAL segments in the repository.",
            c.timelines
                .iter()
                .map(|(t, i)| (timeline_label(*t), i.segments.len() as f64))
                .collect(),
        ),
        gauge(
            "pitr_archive_newest_segment_number",
            "Segment number of the newest archived segment.",
            c.timelines
                .iter()
                .filter_map(|(t, i)| i.segments.last().map(|n| (timeline_label(*t), n.0 as f64)))
                .collect(),
        ),
    ];
    if let Some(x) = c.window().and_then(|w| w.latest) {
        out.push(one(
            "pitr_last_commit_timestamp_seconds",
            "Time of the latest commit/abort reachable through contiguous WAL.",
            secs(x.time),
        ));
    }
    out
}

/// Exposure is measured from what is known archived: the newest segment of the live timeline
/// reached the repository at its upload time, so everything written before that segment ended is
/// safe. (Measured from the last commit instead, it would grow without bound on a server that
/// archives with archive_timeout but commits nothing.)
async fn exposure_gauges(repo: &Repo, c: &Catalog, now: f64) -> anyhow::Result<Vec<Gauge>> {
    let Some(newest) = c.newest_timeline() else {
        return Ok(Vec::new());
    };
    // Only the newest segment's objects and what follows them (a later `.partial`): one short
    // listing, however many segments the timeline holds.
    let info = c.timelines.get(&newest);
    let before_newest = info
        .and_then(|t| t.segments.iter().chain(&t.partials).max().copied())
        .and_then(|n| n.0.checked_sub(1));
    let after = before_newest
        .and_then(|p| crate::rollup::last_key_of(newest, crate::pg::SegNo(p), c.seg_size()));
    let uploaded = repo
        .list_range(&Prefix::WalTimeline(newest), after.as_deref(), None)
        .await?
        .into_iter()
        .filter(|e| {
            matches!(
                e.object,
                Some(ObjectKey::Wal(
                    WalFileName::Segment(_) | WalFileName::Partial(_)
                ))
            )
        })
        .map(|e| e.modified_micros)
        .max();
    let Some(t) = uploaded else {
        return Ok(Vec::new());
    };
    let t = t as f64 / 1e6;
    Ok(vec![
        gauge(
            "pitr_archive_last_segment_timestamp_seconds",
            "When the newest segment of the live timeline reached the repository.",
            vec![(timeline_label(newest), t)],
        ),
        one(
            "pitr_rpo_exposure_seconds",
            "Seconds since the newest segment reached the repository: WAL written since then is not archived yet. Alert when it exceeds a few archive_timeout periods on a server that writes WAL.",
            (now - t).max(0.0),
        ),
    ])
}

/// The recoverable window's ends.
fn window_gauges(c: &Catalog) -> Vec<Gauge> {
    let Some(w) = c.window() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(e) = w.earliest {
        out.push(gauge(
            "pitr_window_start_timestamp_seconds",
            "Earliest time a restore can stop at.",
            vec![(timeline_label(w.latest_timeline), secs(e))],
        ));
    }
    if let Some(x) = w.latest {
        out.push(gauge(
            "pitr_window_end_timestamp_seconds",
            "Latest time a restore can reach.",
            vec![(timeline_label(w.latest_timeline), secs(x.time))],
        ));
    }
    out
}

/// Restorable and incomplete backups, the newest one's age and sizes, index problems.
fn backup_gauges(c: &Catalog, now: f64) -> Vec<Gauge> {
    let restorable = c.restorable_backups();
    let mut out = vec![
        one(
            "pitr_backups",
            "Restorable base backups.",
            restorable.len() as f64,
        ),
        one(
            "pitr_backups_incomplete",
            "Backups without a manifest (interrupted or running).",
            c.incomplete_backups.len() as f64,
        ),
    ];
    if let Some(b) = restorable.iter().max_by_key(|b| b.stop_time) {
        out.push(one(
            "pitr_backup_newest_age_seconds",
            "Age of the newest restorable backup.",
            now - secs(b.stop_time),
        ));
        out.push(one(
            "pitr_backup_newest_size_bytes",
            "Size of the newest restorable backup.",
            b.size_bytes as f64,
        ));
        out.push(one(
            "pitr_backup_newest_stored_bytes",
            "Stored size of the newest restorable backup.",
            b.stored_bytes as f64,
        ));
    }
    out.push(one(
        "pitr_index_problems",
        "Segments or summaries the WAL index could not read.",
        c.problems.len() as f64,
    ));
    out
}

/// The last `pitr verify`: when, and how many findings.
async fn verify_gauges(repo: &Repo) -> Vec<Gauge> {
    let status = match repo.get(&ObjectKey::VerifyStatus).await {
        Ok(Some(json)) => crate::format::decode::<crate::verify::VerifyStatus>(&json),
        _ => return Vec::new(),
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{}: {e}", ObjectKey::VerifyStatus.key());
            return Vec::new();
        }
    };
    vec![
        one(
            "pitr_verify_last_run_timestamp_seconds",
            "When pitr verify last finished.",
            secs(status.finished_at),
        ),
        one(
            "pitr_verify_last_findings",
            "Findings of the last pitr verify (0 = sound).",
            status.findings as f64,
        ),
    ]
}

/// Where `pitr receive` stands, from its status object (nothing when it never ran here).
async fn receive_gauges(repo: &Repo, now: f64) -> Vec<Gauge> {
    let Some(s) = crate::receive::status(repo).await else {
        return Vec::new();
    };
    vec![
        one(
            "pitr_receive_last_update_timestamp_seconds",
            "When pitr receive last recorded where it stands (it does every --status-interval).",
            secs(s.updated_at),
        ),
        one(
            "pitr_receive_received_lsn_bytes",
            "WAL position pitr receive has received up to.",
            s.received_lsn.0 as f64,
        ),
        one(
            "pitr_receive_stored_lsn_bytes",
            "WAL position the repository holds everything before (through pitr receive).",
            s.stored_lsn.0 as f64,
        ),
        one(
            "pitr_receive_lag_bytes",
            "Bytes of WAL the server had that the repository did not, at the last update.",
            s.server_lsn.0.saturating_sub(s.stored_lsn.0) as f64,
        ),
        one(
            "pitr_receive_lag_seconds",
            "How long the repository had trailed the server's end of WAL at the last update (0: it did not).",
            s.behind_since
                .map_or(0.0, |t| (secs(s.updated_at) - secs(t)).max(0.0)),
        ),
        one(
            "pitr_receive_status_age_seconds",
            "Seconds since pitr receive last recorded where it stands (grows when it is not running).",
            (now - secs(s.updated_at)).max(0.0),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::{RepoState, repository_gauges};
    use crate::info::Lag;

    #[test]
    fn each_repository_is_labelled_by_its_name() {
        let state = |name: &str, up: bool, lag: Option<Lag>| RepoState {
            name: name.into(),
            up,
            lag,
        };
        let behind = Lag {
            segments: 3,
            seconds: 61.5,
        };
        let text = repository_gauges(&[
            state("nas", true, Some(Lag::default())),
            state("off\"site", true, Some(behind)),
            state("gone", false, None),
        ]);
        assert!(
            text.contains("pitr_repository_up{repository=\"gone\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("pitr_repository_lag_segments{repository=\"nas\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("pitr_repository_lag_seconds{repository=\"off\\\"site\"} 61.5"),
            "{text}"
        );
        assert!(
            !text.contains("lag_segments{repository=\"gone\"}"),
            "{text}"
        );
    }
}
