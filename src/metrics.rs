//! `pitr metrics`: the repository's state as Prometheus text exposition, for a textfile collector
//! (`pitr metrics > /var/lib/node_exporter/pitr.prom.tmp && mv … pitr.prom`) or any scraper.

use std::fmt::Write as _;

use crate::catalog::Catalog;
use crate::pg::PgTimestamp;
use crate::pg::WalFileName;
use crate::storage::Repo;
use crate::storage::layout::{ObjectKey, Prefix};

fn secs(t: PgTimestamp) -> f64 {
    t.unix_micros() as f64 / 1e6
}

fn metric(o: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

/// Render the metrics for `repo`, at Unix time `now`.
///
/// # Errors
/// The catalog cannot be read.
pub async fn render(repo: &Repo, now: f64) -> anyhow::Result<String> {
    let c = Catalog::load(repo).await?;
    let mut o = String::new();
    let tl = |t: &crate::pg::TimelineId| format!("{{timeline=\"{t}\"}}");
    metric(
        &mut o,
        "pitr_archived_segments",
        "WAL segments in the repository.",
        &c.timelines
            .iter()
            .map(|(t, i)| (tl(t), i.segments.len() as f64))
            .collect::<Vec<_>>(),
    );
    metric(
        &mut o,
        "pitr_archive_newest_segment_number",
        "Segment number of the newest archived segment.",
        &c.timelines
            .iter()
            .filter_map(|(t, i)| i.segments.last().map(|n| (tl(t), n.0 as f64)))
            .collect::<Vec<_>>(),
    );
    let window = c.window();
    let latest = window.as_ref().and_then(|w| w.latest);
    if let Some(x) = latest {
        metric(
            &mut o,
            "pitr_last_commit_timestamp_seconds",
            "Time of the latest commit/abort reachable through contiguous WAL.",
            &[(String::new(), secs(x.time))],
        );
    }
    // Exposure is measured from what is known archived: the newest segment of the live timeline
    // reached the repository at its upload time, so everything written before that segment ended
    // is safe. (Measured from the last commit instead, it would grow without bound on a server that
    // archives with archive_timeout but commits nothing.)
    if let Some(newest) = c.newest_timeline() {
        let uploaded = repo
            .list(&Prefix::WalTimeline(newest))
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
            .map(|e| e.modified_micros as f64 / 1e6)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });
        if let Some(t) = uploaded {
            metric(
                &mut o,
                "pitr_archive_last_segment_timestamp_seconds",
                "When the newest segment of the live timeline reached the repository.",
                &[(tl(&newest), t)],
            );
            metric(
                &mut o,
                "pitr_rpo_exposure_seconds",
                "Seconds since the newest segment reached the repository: WAL written since then is not archived yet. Alert when it exceeds a few archive_timeout periods on a server that writes WAL.",
                &[(String::new(), (now - t).max(0.0))],
            );
        }
    }
    if let Some(w) = &window {
        if let Some(e) = w.earliest {
            metric(
                &mut o,
                "pitr_window_start_timestamp_seconds",
                "Earliest time a restore can stop at.",
                &[(tl(&w.latest_timeline), secs(e))],
            );
        }
        if let Some(x) = w.latest {
            metric(
                &mut o,
                "pitr_window_end_timestamp_seconds",
                "Latest time a restore can reach.",
                &[(tl(&w.latest_timeline), secs(x.time))],
            );
        }
    }
    let restorable: Vec<_> = c.restorable_backups();
    metric(
        &mut o,
        "pitr_backups",
        "Restorable base backups.",
        &[(String::new(), restorable.len() as f64)],
    );
    metric(
        &mut o,
        "pitr_backups_incomplete",
        "Backups without a manifest (interrupted or running).",
        &[(String::new(), c.incomplete_backups.len() as f64)],
    );
    if let Some(b) = restorable.iter().max_by_key(|b| b.stop_time) {
        metric(
            &mut o,
            "pitr_backup_newest_age_seconds",
            "Age of the newest restorable backup.",
            &[(String::new(), now - secs(b.stop_time))],
        );
        metric(
            &mut o,
            "pitr_backup_newest_size_bytes",
            "Size of the newest restorable backup.",
            &[(String::new(), b.size_bytes as f64)],
        );
        metric(
            &mut o,
            "pitr_backup_newest_stored_bytes",
            "Stored size of the newest restorable backup.",
            &[(String::new(), b.stored_bytes as f64)],
        );
    }
    metric(
        &mut o,
        "pitr_index_problems",
        "Segments or summaries the WAL index could not read.",
        &[(String::new(), c.problems.len() as f64)],
    );
    if let Ok(Some(json)) = repo.get(&ObjectKey::VerifyStatus).await
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
    {
        if let Some(t) = v["finished_at"]
            .as_str()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
        {
            let ts = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metric(
                &mut o,
                "pitr_verify_last_run_timestamp_seconds",
                "When pitr verify last finished.",
                &[(String::new(), ts)],
            );
        }
        if let Some(n) = v["findings"].as_u64() {
            metric(
                &mut o,
                "pitr_verify_last_findings",
                "Findings of the last pitr verify (0 = sound).",
                &[(String::new(), n as f64)],
            );
        }
    }
    Ok(o)
}
