//! Several repositories (3-2-1): the configured list, opened.
//!
//! Commands that work on one repository (backup, restore, replica, drill, check, key) use the one
//! `--repo-name` names, else the first. `archive-push` stores every file in each required
//! repository (and, best effort, in the others); `archive-get` asks them in order and answers "not
//! found" only when every one of them said so; `info` shows each.

use crate::config::{RepoSpec, Settings};
use crate::storage::{Repo, RepoError};

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

    /// The member named `name`.
    pub fn named(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.spec.name == name)
    }
}
