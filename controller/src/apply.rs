//! Applying configs: the declarative apply, and the model repository (polling, and Triton's
//! load and unload of one model).

use std::time::Instant;

use sluice_config::{Config, VersionPolicy};

use crate::state::RepoScan;
use crate::{ControlError, Controller, pipelines, reconcile, repository};

impl Controller {
    /// Makes the running state match `config` (every application in it, and the models of
    /// its model repository as the application `repository`; applications not in it are
    /// removed). New versions are loaded and warmed first; if any fails, nothing already
    /// serving changes.
    pub async fn apply(&self, config: &Config) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let unloaded = self.lock().unloaded.clone();
        let (effective, signature) = repository::effective(config, &unloaded)?;
        self.reconcile(&effective).await?;
        let mut st = self.lock();
        st.desired = Some(config.clone());
        if let Some(signature) = signature {
            st.last_scan = Some(RepoScan { at: Instant::now(), signature });
        }
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Plans, starts and commits `config` (the caller holds `changes`).
    async fn reconcile(&self, config: &Config) -> Result<(), ControlError> {
        let mut plan = reconcile::plan(&self.lock(), config);
        reconcile::start(&mut plan, &self.cluster, &self.wake).await?;
        let commit = {
            let mut st = self.lock();
            let pipelines = pipelines::build_all(config, &plan, &st)?;
            let commit = reconcile::commit(&mut st, plan);
            st.pipelines = pipelines;
            st.refresh_aliases();
            self.publish(&st);
            commit
        };
        self.drain(commit.retired);
        self.rescale(commit.rescale, "scaled").await;
        Ok(())
    }

    /// Rescans the model repository when its poll interval has passed, and applies what
    /// changed (new versions swap in, removed ones drain). Skipped while an apply runs.
    pub(crate) async fn poll_repository(&self) {
        let Ok(_changes) = self.changes.try_lock() else { return };
        let (config, unloaded, before) = {
            let st = self.lock();
            let Some(config) = st.desired.clone() else { return };
            if !repository::due(&config, st.last_scan.as_ref(), Instant::now()) {
                return;
            }
            (config, st.unloaded.clone(), st.last_scan.as_ref().map(|s| s.signature.clone()))
        };
        let (effective, signature) = match repository::effective(&config, &unloaded) {
            Ok(found) => found,
            Err(e) => {
                let mut st = self.lock();
                st.events.push(repository::APPLICATION, format!("scanning the repository failed: {e}"));
                st.last_scan = Some(RepoScan { at: Instant::now(), signature: before.unwrap_or_default() });
                return;
            }
        };
        let changed = signature != before;
        if let Some(signature) = signature {
            self.lock().last_scan = Some(RepoScan { at: Instant::now(), signature });
        }
        if changed {
            self.lock().events.push(repository::APPLICATION, "model repository changed; applying");
            if let Err(e) = self.reconcile(&effective).await {
                self.lock()
                    .events
                    .push(repository::APPLICATION, format!("applying the repository failed: {e}"));
            }
        }
    }

    /// Loads (or reloads) a repository model now, undoing an unload.
    pub async fn load_model(&self, name: &str) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let (config, mut unloaded) = self.desired_and_unloaded()?;
        unloaded.remove(name);
        let (effective, _) = repository::effective(&config, &unloaded)?;
        if !effective.applications.iter().flat_map(|a| &a.deployments).any(|d| d.name == name) {
            return Err(ControlError::NotInRepository(name.to_string()));
        }
        self.reconcile(&effective).await?;
        self.lock().unloaded = unloaded;
        Ok(())
    }

    /// Stops serving a repository model until it is loaded again.
    pub async fn unload_model(&self, name: &str) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let (config, mut unloaded) = self.desired_and_unloaded()?;
        let in_repo = self.lock().deployments.get(name).is_some_and(|m| m.app == repository::APPLICATION);
        if !in_repo {
            return Err(ControlError::NotLoaded(name.to_string()));
        }
        unloaded.insert(name.to_string());
        let (effective, _) = repository::effective(&config, &unloaded)?;
        self.reconcile(&effective).await?;
        self.lock().unloaded = unloaded;
        Ok(())
    }

    /// Repository models unloaded through the API.
    pub fn unloaded(&self) -> Vec<String> {
        self.lock().unloaded.iter().cloned().collect()
    }

    /// The version policy that chose `model`'s versions, when the model repository serves it
    /// (what its Triton-style model configuration reports).
    pub fn repository_policy(&self, model: &str) -> Option<VersionPolicy> {
        let st = self.lock();
        let from_repository = st.deployments.get(model).is_some_and(|m| m.app == repository::APPLICATION);
        let repo = st.desired.as_ref()?.model_repository.as_ref().filter(|_| from_repository)?;
        Some(repo.version_policy.clone())
    }

    fn desired_and_unloaded(&self) -> Result<(Config, std::collections::BTreeSet<String>), ControlError> {
        let st = self.lock();
        let config = st.desired.clone().unwrap_or_default();
        if config.model_repository.is_none() {
            return Err(ControlError::NoRepository);
        }
        Ok((config, st.unloaded.clone()))
    }
}
