//! `pitr metrics`: Prometheus text on stdout: the chosen repository's state, and with several
//! repositories, whether each answers and how far it trails.

use pitr::catalog::Catalog;
use pitr::exit;
use pitr::metrics::RepoState;
use pitr::repos::RepoSet;

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(repos: &RepoSet) -> anyhow::Result<u8> {
    let now = pitr::pg::PgTimestamp::now().unix_secs_f64();
    let chosen = repos.chosen()?;
    if !repos.is_several() {
        crate::out!("{}", pitr::metrics::render(chosen, now).await?);
        return Ok(exit::SUCCESS);
    }
    let loaded = repos.catalogs().await;
    let catalog = match loaded.get(repos.chosen) {
        Some(Ok(c)) => c,
        _ => &Catalog::load(chosen).await?,
    };
    let mut text = pitr::metrics::render_catalog(chosen, catalog, now).await?;
    let states: Vec<RepoState> = repos
        .members
        .iter()
        .zip(&loaded)
        .zip(RepoSet::lags(&loaded))
        .map(|((m, l), lag)| RepoState {
            name: m.spec.name.clone(),
            up: l.is_ok(),
            lag,
        })
        .collect();
    text.push_str(&pitr::metrics::repository_gauges(&states));
    crate::out!("{text}");
    Ok(exit::SUCCESS)
}
