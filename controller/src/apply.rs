//! Applying configs: the declarative apply, and the model repository (polling, `notify`, and
//! Triton's load and unload of one model). Every store call and model load runs without the
//! state lock; the `changes` lock serializes whole operations.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use sluice_config::{Config, ModelRepository, VersionPolicy};

use crate::repository::cache::Cache;
use crate::repository::scan::{self, Listing, MODEL_FILE};
use crate::repository::store::StoreError;
use crate::repository::{self, Origin, Signature};
use crate::{ControlError, Controller, apps, pipelines, reconcile};

/// A change's turn ([`Controller::take_turn`]): holds `changes`, and holds back the deploys
/// asked for after the change until it is dropped.
pub(crate) struct Turn<'a> {
    controller: &'a Controller,
    from: u64,
    /// Let go after the deploys are no longer held back (fields drop after `drop`): the next
    /// holder, on another thread at once, must not find them held back still.
    _changes: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut st = self.controller.lock();
        if let Some(i) = st.waiting.iter().position(|&g| g == self.from) {
            st.waiting.swap_remove(i);
        }
    }
}

impl Controller {
    /// Makes the running state match `config` (every application in it, and the models of
    /// its model repository as the application `repository`; applications not in it are
    /// removed). New versions are loaded and warmed first; if any fails, nothing already
    /// serving changes (a repository version that fails to load is rejected instead, and the
    /// rest applied). A repository that cannot be listed is an error naming its URL.
    ///
    /// While it runs, status shows its applications as deploying; when it fails, each says
    /// why (and what ran before keeps running). Returns its generation: deploys of lower ones
    /// ([`Controller::deploy`]) were applied before it, and replaced by it.
    pub async fn apply(&self, config: &Config) -> Result<u64, ControlError> {
        let generation = apps::reserve(&mut self.lock());
        let _turn = self.take_turn(generation + 1).await;
        // Background deploys asked for before this one go first; those asked for after it
        // wait (the last config sent is the one that stays).
        self.run_deploys(Some(generation)).await;
        apps::begin_as(&mut self.lock(), config, generation);
        self.apply_as(generation, config).await.map(|()| generation)
    }

    /// Waits for `changes` for a change asked for before the deploys of generation `from` on,
    /// which wait meanwhile, and until the returned turn goes.
    /// How many changes that take turns (applies, deletes; not background deploys) hold or
    /// wait for their turn: for tests that send a change once another waits.
    #[doc(hidden)]
    pub fn changes_in_line(&self) -> usize {
        self.lock().waiting.len()
    }

    pub(crate) async fn take_turn(&self, from: u64) -> Turn<'_> {
        self.lock().waiting.push(from);
        let mut turn = Turn { controller: self, from, _changes: None };
        turn._changes = Some(self.changes.lock().await);
        turn
    }

    /// Applies `config` as the deploy `generation` (the caller holds `changes`); on failure its
    /// applications say why.
    async fn apply_as(&self, generation: u64, config: &Config) -> Result<(), ControlError> {
        self.lock().applying = Some(generation);
        let result = self.apply_held(config).await;
        let mut st = self.lock();
        st.applying = None;
        if let Err(e) = &result {
            apps::failed(&mut st, config, generation, &e.to_string());
        }
        result
    }

    /// [`Controller::apply`] in the background, the way Ray Serve deploys: the config's
    /// applications show as deploying at once, and status tells how the deploy went.
    /// Deploys are applied in the order they were asked for, and a delete waits for those
    /// asked for before it (or, deleting everything, drops them).
    ///
    /// Returns the deploy's generation (see [`Controller::apply`], [`Controller::delete`]).
    pub fn deploy(self: &Arc<Self>, config: Config) -> u64 {
        let generation = apps::begin(&mut self.lock(), &config);
        self.deploys.lock().unwrap_or_else(|e| e.into_inner()).push_back((generation, config));
        let this = self.clone();
        tokio::spawn(async move {
            let _changes = this.changes.lock().await;
            this.run_deploys(None).await;
        });
        generation
    }

    /// Applies the queued background deploys, oldest first, below generation `before` and
    /// below those of changes still waiting for their turn ([`Controller::take_turn`]; the
    /// caller holds `changes`).
    pub(crate) async fn run_deploys(&self, before: Option<u64>) {
        loop {
            let next = {
                let limit = self.lock().waiting.iter().copied().chain(before).min();
                let mut queue = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
                match queue.front() {
                    Some((g, _)) if limit.is_none_or(|l| *g < l) => queue.pop_front(),
                    _ => None,
                }
            };
            let Some((generation, config)) = next else { return };
            if let Err(e) = self.apply_as(generation, &config).await {
                tracing::warn!("deploying {} failed: {e}", config.source.display());
            }
        }
    }

    /// Drops the queued background deploys below generation `before` (a delete of everything
    /// came after them; those asked for after it stay, for their own turn).
    pub(crate) fn abandon_deploys(&self, before: u64) {
        self.deploys.lock().unwrap_or_else(|e| e.into_inner()).retain(|(g, _)| *g >= before);
    }

    /// The config last applied (without the repository's models), if any.
    pub fn desired(&self) -> Option<Config> {
        self.lock().desired.clone()
    }

    /// [`Controller::apply`] once `changes` is held.
    async fn apply_held(&self, config: &Config) -> Result<(), ControlError> {
        let signature = match &config.model_repository {
            None => {
                self.reconcile(config).await?;
                None
            }
            Some(repo) => {
                let listing = self.list(repo).await?;
                Some(self.apply_repository(config, &listing, None).await?)
            }
        };
        let mut st = self.lock();
        st.desired = Some(config.clone());
        st.repo.applied = signature;
        st.repo.failed = None;
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Plans, starts and commits `config` (the caller holds `changes`).
    async fn reconcile(&self, config: &Config) -> Result<(), ControlError> {
        let (plan, origins) = {
            let st = self.lock();
            (reconcile::plan(&st, config), st.repo.origins.clone())
        };
        // Until committed, what the plan starts is stopped if this returns early (or its
        // caller goes away while replicas load).
        let mut plan = reconcile::Uncommitted::new(plan);
        reconcile::start(plan.plan(), &self.cluster, &self.wake, &origins).await?;
        // A new primary takes all of the old one's traffic at commit: first it grows to the
        // replicas the old one runs now (the autoscaler may have grown it while the new one
        // loaded), within its bounds, or a few replicas would take what the old one had many
        // for while the rest loaded one by one.
        let grow = reconcile::growth(plan.plan(), &self.lock());
        for (version, want) in grow {
            if let Err(e) = version.scale_to(want).await {
                let message = format!(
                    "version {} could not grow to {want} replicas before the swap: {e}",
                    version.name()
                );
                self.lock().events.push(version.deployment.name(), message);
            }
        }
        let commit = {
            let mut st = self.lock();
            // On an error the lock is let go first, then the plan's versions are stopped.
            let pipelines = pipelines::build_all(config, plan.plan(), &st)?;
            let commit = reconcile::commit(&mut st, plan.commit());
            st.pipelines = pipelines;
            st.refresh_aliases();
            apps::applied(&mut st, config);
            self.publish(&mut st);
            commit
        };
        self.drain(commit.retired, true);
        self.rescale(commit.rescale, "scaled").await;
        Ok(())
    }

    /// Lists the repository and records the outcome (health, metrics, an event when it changes).
    async fn list(&self, repo: &ModelRepository) -> Result<Listing, ControlError> {
        let store = self.lock().repo.store(repo, &self.store_env)?;
        let listed = store.list("").await;
        let mut st = self.lock();
        match listed {
            Ok(files) => {
                let listing = Listing::parse(&files, &repo.ready_marker);
                if st.repo.reachable(store.url(), listing.clone()) {
                    st.events.push(
                        repository::APPLICATION,
                        format!("model repository `{}` answers again", store.url()),
                    );
                }
                Ok(listing)
            }
            Err(e) => {
                if st.repo.unreachable(store.url(), &e) {
                    st.events
                        .push(repository::APPLICATION, format!("{e}; the versions serving keep serving"));
                }
                Err(e.into())
            }
        }
    }

    /// Stages and reconciles `config` with its repository's `listing`. A repository version
    /// that cannot serve is rejected (reported; never retried until its files change) and the
    /// rest applied without it: one that fails to load, and one above `max_version_bytes`. One
    /// whose files cannot be fetched now is left out too, and tried again at the next poll. A
    /// repository model named like a deployment of the config is not loaded while the config
    /// has that deployment (an event says so). Returns what now serves.
    async fn apply_repository(
        &self,
        config: &Config,
        listing: &Listing,
        skip: Option<&BTreeSet<String>>,
    ) -> Result<Signature, ControlError> {
        let Some(repo) = &config.model_repository else { return Err(ControlError::NoRepository) };
        let named = repository::named_in_config(config, listing);
        if !named.is_empty() {
            let mut st = self.lock();
            for m in &named {
                let why = ControlError::InBoth(m.clone());
                st.events.push(
                    m,
                    format!(
                        "{why}: the config's deployment or pipeline serves, the repository's is not loaded"
                    ),
                );
            }
        }
        // Versions whose files could not be fetched this time (the store refused a file, the
        // connection broke, the cache could not write): planned without, and tried again at the
        // next poll, since the signature this returns leaves them out. One such version holds
        // back no other model.
        let mut held_back: std::collections::BTreeMap<(String, u64), String> = Default::default();
        loop {
            let (plans, rejected, store) = {
                let mut st = self.lock();
                let mut rejected = st.repo.rejected_keys(listing);
                rejected.extend(held_back.keys().cloned());
                let serving = repository::serving(&st.deployments);
                let skip = repository::skipped(skip.unwrap_or(&st.unloaded), &named);
                let plans = scan::select(repo, listing, &skip, &rejected, &serving);
                (plans, rejected, st.repo.store(repo, &self.store_env)?)
            };
            // Versions refused before any load, and why.
            let mut refused: Vec<(String, u64, ControlError)> = Vec::new();
            let mut not_fetched: Vec<(String, u64, StoreError)> = Vec::new();
            let cache = Cache::new(&repo.cache_dir);
            let mut origins = std::collections::BTreeMap::new();
            let mut dirs = std::collections::BTreeMap::new();
            for p in &plans {
                for v in repository::versions_of(p) {
                    // A rejected version planned is the one serving, whose new files were
                    // refused: its copy loaded before keeps serving (see `scan::select`), and
                    // its files are not fetched again.
                    let files = &listing.models[&p.model][&v];
                    if rejected.contains(&(p.model.clone(), v)) {
                        let running = repository::running_dirs(&self.lock().deployments, Some((&p.model, v)));
                        let dir = running
                            .into_iter()
                            .next()
                            .unwrap_or_else(|| cache.files_dir(&store, &p.model, &v.to_string(), files));
                        dirs.insert((p.model.clone(), v), dir);
                        continue;
                    }
                    let fetched = match cache
                        .fetch(&store, &p.model, &v.to_string(), files, repo.max_version_bytes)
                        .await
                    {
                        Ok(fetched) => fetched,
                        Err(e @ StoreError::TooBig { .. }) => {
                            refused.push((p.model.clone(), v, e.into()));
                            continue;
                        }
                        Err(e) => {
                            not_fetched.push((p.model.clone(), v, e));
                            continue;
                        }
                    };
                    if fetched.downloaded > 0 {
                        let mut st = self.lock();
                        st.repo.downloaded_bytes += fetched.downloaded;
                        let message = format!(
                            "fetched version {v}: {} bytes in {} file(s) from {}",
                            fetched.downloaded,
                            fetched.files_downloaded,
                            store.url()
                        );
                        st.events.push(&p.model, message);
                    }
                    if store.local_root().is_none() {
                        let origin = Origin {
                            url: store.url().to_string(),
                            model: p.model.clone(),
                            version: v.to_string(),
                            files: files.clone(),
                            cache_dir: repo.cache_dir.clone(),
                            max_version_bytes: repo.max_version_bytes,
                            store_timeout_s: repo.store_timeout_s,
                        };
                        origins.insert(fetched.dir.join(MODEL_FILE), origin);
                    }
                    dirs.insert((p.model.clone(), v), fetched.dir);
                }
            }
            if !not_fetched.is_empty() {
                let mut st = self.lock();
                for (model, version, e) in not_fetched {
                    st.events.push(
                        &model,
                        format!("version {version} not fetched: {e}; tried again at the next poll"),
                    );
                    held_back.insert((model, version), e.to_string());
                }
                drop(st);
                // Planned again without them; the refusals are recorded on that pass.
                continue;
            }
            if let Some((_, _, first)) = refused.first() {
                let mut st = self.lock();
                let mut new = false;
                for (model, version, e) in &refused {
                    if st.repo.reject(model, *version, e.to_string()) {
                        new = true;
                        st.events.push(model, format!("version {version} never takes traffic: {e}"));
                    }
                }
                // Planned again without them (a rejection the plan did not heed would loop).
                if new {
                    continue;
                }
                return Err(ControlError::Refused(first.to_string()));
            }
            let models =
                repository::deployments(repo, &plans, |m, v| dirs[&(m.to_string(), v)].join(MODEL_FILE));
            let effective = repository::effective(config, models)?;
            self.lock().repo.origins.extend(origins);
            match self.reconcile(&effective).await {
                Ok(()) => {
                    // The contents a version was loaded from before its files were rewritten
                    // in place, once the new ones serve: kept until the apply after, for the
                    // retired version's replicas that drain meanwhile.
                    let keep = {
                        let mut st = self.lock();
                        st.repo.not_fetched = held_back;
                        let in_use = repository::running_dirs(&st.deployments, None);
                        let before = std::mem::replace(&mut st.repo.in_use, in_use.clone());
                        let keep: BTreeSet<_> = in_use.into_iter().chain(before).collect();
                        // Where each version came from, for the versions kept (one entry
                        // per version ever fetched piled up, each cloned at every apply).
                        st.repo.origins.retain(|file, _| file.parent().is_some_and(|dir| keep.contains(dir)));
                        keep
                    };
                    if store.local_root().is_none() {
                        cache.prune(&store, &keep).await;
                    }
                    return Ok(repository::signature(&plans, listing));
                }
                Err(e) => {
                    let Some((model, version)) = failed_version(&e, &plans) else { return Err(e) };
                    let mut st = self.lock();
                    let why = format!("failed to load: {e}");
                    // Planned again without it. Each pass rejects a version not rejected
                    // before, so the passes end (at most one per version listed) with every
                    // version that loads served, however many do not (eight failures gave the
                    // whole apply up: at start, the server did not start). A rejection the
                    // plan did not heed would loop: given up instead.
                    if !st.repo.reject(&model, version, why) {
                        return Err(e);
                    }
                    st.events.push(&model, format!("version {version} never takes traffic: {e}"));
                }
            }
        }
    }

    /// Rescans the model repository when its poll interval has passed (or a scan was asked
    /// for), and applies what changed. Skipped while another change runs.
    pub(crate) async fn poll_repository(&self) {
        /// How often the folders in use are checked for a mark of use between polls.
        const MARKS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
        let Ok(_changes) = self.changes.try_lock() else { return };
        // Checked and cleared under one lock: a scan asked for in between is not lost.
        let (config, due) = {
            let mut st = self.lock();
            let Some(config) = st.desired.clone() else { return };
            if config.model_repository.is_none() {
                // Its series leave `/metrics` (an `up` of 0 would page for good).
                st.repo.series = None;
            }
            let due = repository::due(&config, &st.repo, Instant::now());
            if due {
                st.repo.force = false;
            }
            (config, due)
        };
        if due {
            let _ = self.rescan(&config).await;
            return;
        }
        // Between polls (none at all with `poll_interval_s: 0`), what serves is still marked
        // used: another server sharing the cache prunes what no one marked for an hour, and a
        // replica started later would find its files gone.
        let Some(repo) = &config.model_repository else { return };
        let in_use = {
            let mut st = self.lock();
            if st.repo.marks_checked_at.is_some_and(|at| at.elapsed() < MARKS_CHECK) {
                return;
            }
            st.repo.marks_checked_at = Some(Instant::now());
            st.repo.in_use.clone()
        };
        Cache::new(&repo.cache_dir).touch_stale(&in_use).await;
    }

    /// Lists the repository and applies it when what should serve changed.
    async fn rescan(&self, config: &Config) -> Result<(), ControlError> {
        let Some(repo) = &config.model_repository else { return Err(ControlError::NoRepository) };
        // What serves is marked used at each poll: another server sharing the cache prunes
        // only what no one has used for an hour.
        let in_use = self.lock().repo.in_use.clone();
        Cache::new(&repo.cache_dir).touch(&in_use).await;
        let listing = self.list(repo).await?;
        let wanted = {
            let mut st = self.lock();
            let serving = st.deployments.values().filter(|m| m.app == repository::APPLICATION).count();
            let unconfirmed = listing.models.is_empty() && serving > 0 && !st.repo.empty_unconfirmed;
            st.repo.empty_unconfirmed = unconfirmed;
            if unconfirmed {
                st.events.push(
                    repository::APPLICATION,
                    format!(
                        "model repository `{}` lists no models; the {serving} serving keep serving unless the next \
                         listing finds none either",
                        repo.location
                    ),
                );
                return Ok(());
            }
            let rejected = st.repo.rejected_keys(&listing);
            let serving = repository::serving(&st.deployments);
            let skip = repository::skipped(&st.unloaded, &repository::named_in_config(config, &listing));
            let plans = scan::select(repo, &listing, &skip, &rejected, &serving);
            let wanted = repository::signature(&plans, &listing);
            // Versions the last apply could not fetch are tried again at every poll (a serving
            // version whose new files failed leaves the plan, and so the signature, unchanged).
            if (st.repo.applied.as_ref() == Some(&wanted) || st.repo.failed.as_ref() == Some(&wanted))
                && st.repo.not_fetched.is_empty()
            {
                return Ok(());
            }
            wanted
        };
        match self.apply_repository(config, &listing, None).await {
            Ok(signature) => {
                let mut st = self.lock();
                st.repo.applied = Some(signature);
                st.repo.failed = None;
                if let Some(r) = st.apps.get_mut(repository::APPLICATION) {
                    r.deployed_at = apps::now_s();
                }
                Ok(())
            }
            Err(e) => {
                let mut st = self.lock();
                st.events.push(repository::APPLICATION, format!("applying the repository failed: {e}"));
                st.repo.failed = Some(wanted);
                Err(e)
            }
        }
    }

    /// Scans the repository now (a training job wrote a version of `model`) and applies what
    /// changed. An error when the model has no complete version in the repository.
    pub async fn notify_repository(&self, model: &str) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let (config, _) = self.desired_and_unloaded()?;
        let Some(repo) = &config.model_repository else { return Err(ControlError::NoRepository) };
        let listing = self.list(repo).await?;
        if !listing.models.contains_key(model) {
            let waiting = listing.incomplete.iter().any(|(m, _)| m == model);
            return Err(if waiting {
                ControlError::Incomplete(model.to_string(), repo.ready_marker.clone())
            } else {
                ControlError::NotInRepository(model.to_string())
            });
        }
        self.lock().events.push(model, "repository notified; scanning now");
        self.lock().repo.failed = None;
        self.rescan(&config).await?;
        // The scan went; the version the notice was about may not have.
        let newest = listing.models[model].keys().next_back().copied();
        if let Some(e) = newest.and_then(|v| self.not_fetched(model, v)) {
            return Err(e);
        }
        match newest.and_then(|v| self.rejection(model, v)) {
            Some(why) => Err(ControlError::Refused(why)),
            None => Ok(()),
        }
    }

    /// Why version `version` of repository model `model` could not be fetched by the last
    /// apply, if it could not.
    fn not_fetched(&self, model: &str, version: u64) -> Option<ControlError> {
        let st = self.lock();
        let why = st.repo.not_fetched.get(&(model.to_string(), version))?;
        Some(ControlError::NotFetched(format!(
            "version {version} of `{model}` could not be fetched: {why}; tried again at the next poll"
        )))
    }

    /// Why version `version` of repository model `model` was rejected, if it was.
    fn rejection(&self, model: &str, version: u64) -> Option<String> {
        let st = self.lock();
        let r = st.repo.rejected.get(&(model.to_string(), version))?;
        Some(format!("version {version} of `{model}` was rejected: {}", r.why))
    }

    /// Loads (or reloads) a repository model now, undoing an unload.
    pub async fn load_model(&self, name: &str) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let (config, mut unloaded) = self.desired_and_unloaded()?;
        let Some(repo) = &config.model_repository else { return Err(ControlError::NoRepository) };
        let listing = self.list(repo).await?;
        if !listing.models.contains_key(name) {
            return Err(ControlError::NotInRepository(name.to_string()));
        }
        unloaded.remove(name);
        let signature = self.apply_repository(&config, &listing, Some(&unloaded)).await?;
        let mut st = self.lock();
        st.unloaded = unloaded;
        st.repo.applied = Some(signature);
        if st.deployments.get(name).is_some_and(|m| m.app == repository::APPLICATION) {
            return Ok(());
        }
        drop(st);
        // Its newest version could not be fetched, or every version of it was rejected (this
        // time or before, its files unchanged).
        let newest = listing.models[name].keys().next_back().copied();
        if let Some(e) = newest.and_then(|v| self.not_fetched(name, v)) {
            return Err(e);
        }
        let why = newest.and_then(|v| self.rejection(name, v));
        Err(ControlError::Refused(why.unwrap_or_else(|| format!("model `{name}` did not load"))))
    }

    /// Stops serving a repository model until it is loaded again.
    pub async fn unload_model(&self, name: &str) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        let (config, mut unloaded) = self.desired_and_unloaded()?;
        let (in_repo, listing) = {
            let st = self.lock();
            let in_repo = st.deployments.get(name).is_some_and(|m| m.app == repository::APPLICATION);
            (in_repo, st.repo.listing.clone().unwrap_or_default())
        };
        if !in_repo {
            // Unloaded already: done (an unload asked twice, or retried, succeeds).
            if unloaded.contains(name) {
                return Ok(());
            }
            return Err(ControlError::NotLoaded(name.to_string()));
        }
        unloaded.insert(name.to_string());
        let signature = self.apply_repository(&config, &listing, Some(&unloaded)).await?;
        let mut st = self.lock();
        st.unloaded = unloaded;
        st.repo.applied = Some(signature);
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

    fn desired_and_unloaded(&self) -> Result<(Config, BTreeSet<String>), ControlError> {
        let st = self.lock();
        let config = st.desired.clone().unwrap_or_default();
        if config.model_repository.is_none() {
            return Err(ControlError::NoRepository);
        }
        Ok((config, st.unloaded.clone()))
    }
}

/// The repository version an apply failed on, when it failed loading one.
fn failed_version(e: &ControlError, plans: &[scan::ModelPlan]) -> Option<(String, u64)> {
    let (deployment, version) = match e {
        ControlError::Load { deployment, version, .. }
        | ControlError::NotReady { deployment, version, .. }
        | ControlError::StartFailing { deployment, version, .. } => (deployment, version),
        _ => return None,
    };
    let v: u64 = version.parse().ok()?;
    plans
        .iter()
        .any(|p| &p.model == deployment && repository::versions_of(p).any(|x| x == v))
        .then(|| (deployment.clone(), v))
}
