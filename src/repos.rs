//! Several repositories (3-2-1): the configured list, opened.
//!
//! Commands that work on one repository (backup, restore, replica, drill, check, key) use the one
//! `--repo-name` names, else the first. `archive-push` stores every file in each required
//! repository (and, best effort, in the others); `archive-get` asks them in order and answers "not
//! found" only when every one of them said so; `info` shows each.

use crate::catalog::Catalog;
use crate::config::{RepoSpec, Settings};
use crate::restore::plan::{self, Plan, Request};
use crate::storage::layout::Prefix;
use crate::storage::{Repo, RepoError};

/// Where a restore (or replica, or drill) reads from: the repository it planned on, falling back
/// object by object to the others, and the settings its `restore_command` is given.
#[derive(Debug)]
pub struct Source {
    /// The repository planned on, with the others that opened as its fallbacks.
    pub repo: Repo,
    /// Its name.
    pub name: String,
    /// The catalog the plan was made from.
    pub catalog: Catalog,
    /// The plan.
    pub plan: Plan,
    /// The settings to pass on: every repository when all of them answer (`archive-get` then
    /// falls back across them too), else only the one planned on, so that a repository that cannot
    /// be read does not fail recovery's every probe for a file that does not exist.
    pub settings: Settings,
    /// What the operator should know about the choice (a repository skipped, and why).
    pub notes: Vec<String>,
}

/// One configured repository, opened (or why it could not be).
#[derive(Debug)]
pub struct Member {
    /// Its settings.
    pub spec: RepoSpec,
    /// The repository, when it could be opened.
    pub repo: Result<Repo, RepoError>,
}

/// The configured repositories, in order.
#[derive(Debug)]
pub struct RepoSet {
    /// Each repository, in the configured order.
    pub members: Vec<Member>,
    /// The one a single-repository command uses.
    pub chosen: usize,
}

/// Open one repository as `spec` says (`create`: the commands that may bring one into being).
///
/// # Errors
/// An unusable URL, a missing local directory (unless `create`), an encryption problem.
pub async fn open_one(spec: &RepoSpec, create: bool) -> Result<Repo, RepoError> {
    let repo = if create {
        Repo::create(&spec.url)?
    } else {
        Repo::open(&spec.url)?
    };
    repo.with_encryption(spec.encryption.as_ref(), create).await
}

impl RepoSet {
    /// Open the repositories of `settings`: all of them when `all`, else only the chosen one.
    pub async fn open(settings: &Settings, create: bool, all: bool) -> RepoSet {
        let opened = futures::future::join_all(settings.repos.iter().enumerate().map(
            |(i, spec)| async move {
                if all || i == settings.chosen {
                    Some(open_one(spec, create).await)
                } else {
                    None
                }
            },
        ))
        .await;
        let members = settings
            .repos
            .iter()
            .zip(opened)
            .filter_map(|(spec, repo)| {
                repo.map(|repo| Member {
                    spec: spec.clone(),
                    repo,
                })
            })
            .collect::<Vec<_>>();
        let chosen = if all { settings.chosen } else { 0 };
        RepoSet { members, chosen }
    }

    /// A set of one repository (tests, and callers that have opened one themselves).
    pub fn single(name: &str, repo: Repo) -> RepoSet {
        RepoSet {
            members: vec![Member {
                spec: RepoSpec {
                    name: name.to_string(),
                    url: repo.location().to_string(),
                    required: true,
                    compress: crate::compress::Compression::default(),
                    encryption: None,
                    expire: crate::expire::Policy::default(),
                },
                repo: Ok(repo),
            }],
            chosen: 0,
        }
    }

    /// The chosen repository, or why it could not be opened (taken out: asked for once, by
    /// `main`, before a single-repository command runs).
    ///
    /// # Errors
    /// The error that opening it gave.
    pub fn take_chosen_error(&mut self) -> Result<(), RepoError> {
        let Some(m) = self.members.get_mut(self.chosen) else {
            return Ok(());
        };
        if m.repo.is_err() {
            let placeholder = Err(RepoError::NoRepository {
                repo: m.spec.url.clone(),
                reason: "it could not be opened".into(),
            });
            return std::mem::replace(&mut m.repo, placeholder).map(|_| ());
        }
        Ok(())
    }

    /// The chosen repository.
    ///
    /// # Errors
    /// It could not be opened.
    pub fn chosen(&self) -> anyhow::Result<&Repo> {
        match self.members.get(self.chosen).map(|m| &m.repo) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
            None => Err(anyhow::anyhow!("no repository configured")),
        }
    }

    /// The chosen repository's settings.
    pub fn chosen_spec(&self) -> Option<&RepoSpec> {
        self.members.get(self.chosen).map(|m| &m.spec)
    }

    /// Whether more than one repository is configured.
    pub fn is_several(&self) -> bool {
        self.members.len() > 1
    }

    /// Plan `request` on the repository that can serve it: the chosen one (`--repo-name`, else the
    /// first) when it can, else the next in order holding a restorable chain for the target.
    ///
    /// # Errors
    /// No repository can serve it: the chosen repository's own error (a target outside its
    /// window, say), the others' in the log.
    pub async fn source_for(
        &self,
        settings: &Settings,
        request: &Request,
    ) -> anyhow::Result<Source> {
        let order: Vec<usize> = std::iter::once(self.chosen)
            .chain((0..self.members.len()).filter(|&i| i != self.chosen))
            .collect();
        let mut first_err: Option<anyhow::Error> = None;
        let mut notes = Vec::new();
        let mut found = None;
        for &i in &order {
            let Some(m) = self.members.get(i) else {
                continue;
            };
            let repo = match &m.repo {
                Ok(r) => r,
                Err(e) => {
                    notes.push(format!(
                        "repository {} could not be opened: {e}",
                        m.spec.name
                    ));
                    if first_err.is_none() {
                        first_err = Some(anyhow::anyhow!("{e}"));
                    }
                    continue;
                }
            };
            let planned = match Catalog::load(repo).await {
                Ok(catalog) => plan::plan(&catalog, request)
                    .map(|p| (catalog, p))
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match planned {
                Ok((catalog, p)) => {
                    found = Some((i, catalog, p));
                    break;
                }
                Err(e) => {
                    notes.push(format!(
                        "repository {} cannot serve this restore: {}",
                        m.spec.name,
                        crate::error::one_line(&e)
                    ));
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        let Some((i, catalog, plan)) = found else {
            for n in notes.iter().skip(1) {
                tracing::warn!("{n}");
            }
            return Err(first_err.unwrap_or_else(|| anyhow::anyhow!("no repository configured")));
        };
        let m = &self.members[i];
        let Ok(repo) = &m.repo else {
            return Err(anyhow::anyhow!(
                "internal: planned on a repository that did not open"
            ));
        };
        // The others, checked to answer: they back every read up, and archive-get may ask them.
        let mut fallbacks = Vec::new();
        let mut all_answer = true;
        for (j, other) in self.members.iter().enumerate() {
            if j == i {
                continue;
            }
            match &other.repo {
                Ok(r) => match r.any_under(&Prefix::Wal).await {
                    Ok(_) => fallbacks.push((other.spec.name.clone(), r.clone())),
                    Err(e) => {
                        all_answer = false;
                        notes.push(format!(
                            "repository {} does not answer ({}): recovery reads WAL from {} alone",
                            other.spec.name,
                            crate::error::one_line(&anyhow::Error::from(e)),
                            m.spec.name
                        ));
                    }
                },
                Err(e) => {
                    all_answer = false;
                    let noted = format!("repository {} could not be opened", other.spec.name);
                    if !notes.iter().any(|n| n.starts_with(&noted)) {
                        notes.push(format!("{noted}: {e}"));
                    }
                }
            }
        }
        let settings = if all_answer && !settings.named {
            settings.clone()
        } else {
            settings.narrowed_to(i)
        };
        Ok(Source {
            repo: repo.clone().with_fallbacks(fallbacks),
            name: m.spec.name.clone(),
            catalog,
            plan,
            settings,
            notes,
        })
    }

    /// Every repository's catalog, read at once (`Err`: why it could not be, in one line).
    pub async fn catalogs(&self) -> Vec<Result<Catalog, String>> {
        futures::future::join_all(self.members.iter().map(|m| async move {
            match &m.repo {
                Ok(r) => Catalog::load(r)
                    .await
                    .map_err(|e| crate::error::one_line(&e)),
                Err(e) => Err(e.to_string()),
            }
        }))
        .await
    }

    /// Each repository's lag behind the most advanced one, from [`RepoSet::catalogs`].
    pub fn lags(loaded: &[Result<Catalog, String>]) -> Vec<Option<crate::info::Lag>> {
        let cats: Vec<Option<&Catalog>> = loaded.iter().map(|l| l.as_ref().ok()).collect();
        crate::info::lags(&cats)
    }

    /// The member named `name`.
    pub fn named(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.spec.name == name)
    }
}
