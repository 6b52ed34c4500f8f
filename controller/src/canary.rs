//! Canary operations: weights by hand, promote, rollback, and the automatic rollout step of
//! each control round (judged by [`crate::rollout::judge`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_deployments::Deployment;

use crate::rollout::{Verdict, judge};
use crate::state::{CanaryState, ControllerState};
use crate::{ControlError, Controller, pipelines};

impl Controller {
    /// Sets a canary's weight by hand (stops an automatic rollout).
    pub async fn set_weight(&self, deployment: &str, weight: u32) -> Result<(), ControlError> {
        if weight > 100 {
            return Err(ControlError::InvalidWeight(weight));
        }
        let mut st = self.lock();
        let c = canary(&mut st, deployment)?;
        c.weight = weight;
        c.rollout = None;
        st.events.push(deployment, format!("canary weight set to {weight}%"));
        self.publish(&mut st);
        Ok(())
    }

    /// Makes the canary the primary version; the old primary drains and stops.
    pub async fn promote(&self, deployment: &str) -> Result<(), ControlError> {
        self.promote_as(deployment, "promoted", None).await
    }

    /// [`Self::promote`], its event starting with `what`. `completed`: the canary whose rollout
    /// completed, promoted only if it is still the canary at 100 % once the changes before this
    /// one have run (a repository scan may have put a newer version in its place meanwhile, or an
    /// operator rolled it back): otherwise nothing is promoted.
    pub(crate) async fn promote_as(
        &self,
        deployment: &str,
        what: &str,
        completed: Option<Arc<Deployment>>,
    ) -> Result<(), ControlError> {
        let _changes = self.changes.lock().await;
        // Looked at again after the canary grows: a rollback or a weight set by hand takes no
        // turn (`changes`), and may come while it grows.
        let replaced = |st: &mut ControllerState| -> Result<bool, ControlError> {
            let Some(completed) = &completed else { return Ok(false) };
            let m = st.deployments.get(deployment).ok_or_else(|| unknown(deployment))?;
            let still = m
                .canary
                .as_ref()
                .is_some_and(|c| c.weight == 100 && Arc::ptr_eq(&c.version.deployment, completed));
            if !still {
                st.events.push(
                    deployment,
                    "the canary that completed its rollout was replaced or rolled back before its promotion: not promoted",
                );
            }
            Ok(!still)
        };
        if replaced(&mut self.lock())? {
            return Ok(());
        }
        // The canary is about to take all of the traffic: first it grows to the replicas the
        // primary has now (an autoscaled one's within its bounds), or one replica would take
        // what the autoscaler gave the primary eight for, while those drain.
        let grow = {
            let st = self.lock();
            let m = st.deployments.get(deployment).ok_or_else(|| unknown(deployment))?;
            let c = m.canary.as_ref().ok_or_else(|| ControlError::NoCanary(deployment.to_string()))?;
            let mut want = m.primary.replica_count();
            if let Some(s) = &m.scaling {
                want = s.config.bound(want);
            }
            (want > c.version.replica_count()).then(|| (c.version.clone(), want))
        };
        if let Some((canary, want)) = grow {
            let from = canary.replica_count();
            let message = match canary.scale_to(want).await {
                Ok(()) => format!(
                    "canary version {} grown from {from} to {want} replicas to be promoted",
                    canary.name()
                ),
                Err(e) => format!(
                    "canary version {} could not grow to {want} replicas to be promoted: {e}",
                    canary.name()
                ),
            };
            self.lock().events.push(deployment, message);
        }
        let old = {
            let mut st = self.lock();
            if replaced(&mut st)? {
                return Ok(());
            }
            let m = st.deployments.get(deployment).ok_or_else(|| unknown(deployment))?;
            let c = m.canary.as_ref().ok_or_else(|| ControlError::NoCanary(deployment.to_string()))?;
            // The pipelines whose steps ran on the old primary run on the new one: built again
            // over it (their tensors checked against its model) before anything changes, so a
            // canary a pipeline cannot use is refused here. Otherwise the pipelines would keep
            // the old version, which drains and stops.
            let promoted = c.version.deployment.clone();
            let pipelines = match &st.desired {
                Some(config) => Some(pipelines::build_over(
                    config,
                    &|name| {
                        if name == deployment {
                            Some(promoted.clone())
                        } else {
                            st.deployments.get(name).map(|m| m.primary.deployment.clone())
                        }
                    },
                    &st.pipelines,
                )?),
                None => None,
            };
            let policy = st
                .desired
                .as_ref()
                .and_then(|c| c.model_repository.as_ref())
                .map(|r| r.version_policy.clone());
            let m = st.deployments.get_mut(deployment).ok_or_else(|| unknown(deployment))?;
            let c = m.canary.take().ok_or_else(|| ControlError::NoCanary(deployment.to_string()))?;
            // The promoted version is judged on its own load and delays: the old primary's
            // window (a share of the load near none at the end of a rollout, a downscale delay
            // running) shrank it, taking all the traffic, at its first decision.
            if let Some(s) = &mut m.scaling {
                s.window = c.window;
            }
            let old = std::mem::replace(&mut m.primary, c.version);
            // A repository model's old primary that its version policy keeps (the latest 2, say)
            // stays served by its exact version, not dropped until the next scan loads it again
            // cold; the scan asked for below confirms it. One the policy does not keep drains.
            let kept = m.app == crate::repository::APPLICATION
                && match (old.key.version.parse::<u64>(), m.primary.key.version.parse::<u64>(), &policy) {
                    (Ok(o), Ok(n), Some(p)) => p.select(&[o.min(n), o.max(n)]).contains(&o),
                    _ => false,
                };
            if kept {
                m.others.push(old.clone());
            }
            m.config.model = m.primary.key.model.clone();
            m.config.version = m.primary.key.version.clone();
            m.config.canary = None;
            // The desired state too: every later reconcile (a repository change, a load) plans
            // from it, and would otherwise start the old version again as the primary and the
            // promoted one as a new canary.
            let promoted = m.config.clone();
            let message = format!("{what} version {} (was {})", m.primary.name(), old.name());
            let primary_version = m.primary.key.version.clone();
            let desired = st.desired.iter_mut().flat_map(|c| c.applications.iter_mut());
            if let Some(d) = desired.flat_map(|a| a.deployments.iter_mut()).find(|d| d.name == deployment) {
                d.model = promoted.model;
                d.version = promoted.version;
                d.canary = None;
            }
            // A repository canary rolled back, then promoted by hand: no longer refused (the
            // next scan would otherwise plan it away again).
            if let Ok(v) = primary_version.parse::<u64>() {
                st.repo.rejected.remove(&(deployment.to_string(), v));
            }
            st.events.push(deployment, message);
            if let Some(pipelines) = pipelines {
                st.pipelines = pipelines;
            }
            if kept {
                st.repo.force = true;
            }
            self.publish(&mut st);
            (!kept).then_some(old)
        };
        self.drain(old.into_iter().collect(), true);
        Ok(())
    }

    /// Sends no more traffic to the canary (weight 0) and stops its rollout.
    pub async fn rollback(&self, deployment: &str, why: &str) -> Result<(), ControlError> {
        let mut st = self.lock();
        rollback(&mut st, deployment, why)?;
        self.publish(&mut st);
        Ok(())
    }

    /// Judges every rollout whose interval has ended; returns when the next one ends, and the
    /// deployments whose canary completed a rollout that promotes by itself, with that canary.
    /// A deployment `busy` with a change of its own (running, or decided this round) is
    /// judged as any, but a rollout that completes and promotes by itself is left to be judged
    /// again once that change is done (the control loop comes back within a second): its
    /// promotion could not run now, and the rollout would be gone.
    pub(crate) fn step_rollouts(
        &self,
        st: &mut ControllerState,
        now: Instant,
        busy: &std::collections::HashSet<String>,
    ) -> (Option<Instant>, Vec<(String, Arc<Deployment>)>) {
        let mut changed = false;
        let mut rollbacks = Vec::new();
        let mut promote = Vec::new();
        let mut next: Option<Instant> = None;
        for (name, m) in st.deployments.iter_mut() {
            let Some(c) = &mut m.canary else { continue };
            let Some(r) = &mut c.rollout else { continue };
            if now >= r.next_step {
                let counters = r.counters(&c.version, &self.remote);
                let verdict = judge(&r.config, c.weight, &r.baseline, &counters);
                // A completion that promotes waits, judged again, until the deployment's own
                // change is done (its promotion could not run now); steps and rollbacks apply.
                if verdict == Verdict::Complete && r.auto_promote && busy.contains(name) {
                    continue;
                }
                r.next_step = now + Duration::from_secs_f64(r.config.interval_s);
                match verdict {
                    Verdict::Hold => r.baseline.adopt_new_copies(&counters),
                    _ => {
                        let before = std::mem::replace(&mut r.baseline, counters);
                        r.baseline.carry_lapsed(&before);
                    }
                }
                match verdict {
                    Verdict::Hold => {}
                    Verdict::Step(weight) => {
                        c.weight = weight;
                        changed = true;
                        st.events.push(name, format!("rollout: canary at {weight}%"));
                    }
                    Verdict::Complete => {
                        c.weight = 100;
                        changed = true;
                        if r.auto_promote {
                            promote.push((name.clone(), c.version.deployment.clone()));
                        } else {
                            st.events.push(
                                name,
                                "rollout complete: canary takes all traffic; promote it to retire the old version",
                            );
                        }
                        c.rollout = None;
                        continue;
                    }
                    Verdict::Rollback(why) => {
                        rollbacks.push((name.clone(), why));
                        continue;
                    }
                }
            }
            next = Some(next.map_or(r.next_step, |n| n.min(r.next_step)));
        }
        for (name, why) in rollbacks {
            changed |= rollback(st, &name, &why).is_ok();
        }
        if changed {
            self.publish(st);
        }
        (next, promote)
    }
}

fn unknown(deployment: &str) -> ControlError {
    ControlError::UnknownDeployment(deployment.to_string())
}

fn canary<'s>(st: &'s mut ControllerState, deployment: &str) -> Result<&'s mut CanaryState, ControlError> {
    let m = st.deployments.get_mut(deployment).ok_or_else(|| unknown(deployment))?;
    m.canary.as_mut().ok_or_else(|| ControlError::NoCanary(deployment.to_string()))
}

/// Sends the canary no more traffic. A repository model's canary is also rejected: the next
/// scan retires it, and that version is not tried again until its files change.
fn rollback(st: &mut ControllerState, deployment: &str, why: &str) -> Result<(), ControlError> {
    let c = canary(st, deployment)?;
    // A canary at 0 with no rollout takes no traffic already: rolled back again, it is not
    // counted again (the rollback alert fired anew) nor said again in the events.
    let changes = c.weight != 0 || c.rollout.is_some();
    c.weight = 0;
    c.rollout = None;
    let version = c.version.name().to_string();
    if changes {
        metrics::counter!(sluice_deployments::metrics::ROLLBACKS, "model" => deployment.to_string())
            .increment(1);
        st.events.push(deployment, format!("rolled back canary version {version}: {why}"));
    }
    let in_repository =
        st.deployments.get(deployment).is_some_and(|m| m.app == crate::repository::APPLICATION);
    if in_repository && let Ok(v) = version.parse::<u64>() {
        st.repo.reject(deployment, v, format!("canary rolled back: {why}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sluice_config::Rollout;
    use sluice_deployments::{DataType, InferRequest, NamedTensor, Tensor};
    use sluice_router::{RouteTable, Router};

    use super::*;
    use crate::state::RolloutState;
    use crate::{Cluster, rollout::Counters};

    /// A controller running `softmax` (a built-in step), with its primary version added again
    /// as a canary at 50 % whose rollout completes (and promotes by itself, as a repository
    /// rollout does) at its first judgement, which is due now.
    async fn completing_rollout() -> Arc<Controller> {
        let routes = Arc::new(Router::new(RouteTable::default()));
        let c = Controller::new(routes, Duration::from_secs(1), Cluster::Local, Default::default());
        let yaml =
            "applications:\n  - name: a\n    deployments:\n      - {name: soft, builtin: {softmax: {}}}\n";
        let config = sluice_config::parse(yaml, std::path::Path::new("/nowhere/c.yaml")).unwrap();
        c.apply(&config).await.unwrap();
        let version = c.lock().deployments["soft"].primary.clone();
        let x = Tensor::new(DataType::Fp32, vec![1, 2], bytes::Bytes::from(vec![0u8; 8])).unwrap();
        let request = InferRequest {
            id: None,
            inputs: vec![NamedTensor { name: "x".into(), tensor: x }],
            outputs: None,
            timeout: None,
            model_id: None,
        };
        let started = Instant::now();
        version.deployment.infer(request).await.unwrap();
        // Counted as the frontend counts an answered request.
        let protocol = sluice_deployments::metrics::Protocol::Rest;
        version.deployment.metrics().request(protocol, Ok(()), started.elapsed());
        let rollout = Rollout { step_percent: 50, interval_s: 30.0, min_requests: 1, ..Rollout::default() };
        let mut st = c.lock();
        let m = st.deployments.get_mut("soft").unwrap();
        m.canary = Some(CanaryState {
            version: version.clone(),
            weight: 50,
            config_weight: 50,
            config_rollout: None,
            rollout: Some(RolloutState {
                config: rollout,
                next_step: Instant::now(),
                baseline: Counters::default(),
                auto_promote: true,
                mirror: None,
            }),
            window: Default::default(),
            scale_failure: None,
        });
        drop(st);
        c
    }

    /// A rollout that completes while its deployment is busy with a change of its own waits,
    /// judged again once the change is done, and then promotes: its promotion could not run
    /// beside the change, and the rollout (with its promotion) was dropped for good.
    #[tokio::test]
    async fn a_completion_that_promotes_waits_while_its_deployment_is_busy() {
        let c = completing_rollout().await;
        let busy: HashSet<String> = ["soft".to_string()].into();
        let (_, promote) = c.step_rollouts(&mut c.lock(), Instant::now(), &busy);
        assert!(promote.is_empty());
        let st = c.lock();
        let canary = st.deployments["soft"].canary.as_ref().unwrap();
        assert_eq!(canary.weight, 50, "a completion applied while the deployment was busy");
        assert!(canary.rollout.is_some(), "the rollout was dropped while its deployment was busy");
        drop(st);
        let (_, promote) = c.step_rollouts(&mut c.lock(), Instant::now(), &HashSet::new());
        assert_eq!(promote.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["soft"]);
        let st = c.lock();
        let canary = st.deployments["soft"].canary.as_ref().unwrap();
        assert_eq!((canary.weight, canary.rollout.is_none()), (100, true));
    }

    /// A canary whose requests come through proxies on other nodes (`proxy_location:
    /// EveryNode`) is judged on them too, by what the proxies' reports say their copies
    /// answered: with every request entering the cluster at a worker's proxy, the head saw
    /// none and the rollout held at its weight for good. Failures reported there roll it back.
    #[tokio::test]
    async fn a_rollout_judges_what_proxies_sent_its_canary() {
        let c = completing_rollout().await;
        let version = c.lock().deployments["soft"].primary.clone();
        let (name, v) = (version.deployment.name().to_string(), version.deployment.version().to_string());
        let ready = |c: &Controller, min_requests: u64| {
            let mut st = c.lock();
            let canary = st.deployments.get_mut("soft").unwrap().canary.as_mut().unwrap();
            let r = canary.rollout.as_mut().unwrap();
            r.config.min_requests = min_requests;
            r.auto_promote = false;
            r.baseline = r.counters(&canary.version, &c.remote);
            r.next_step = Instant::now();
        };
        let report = |proxy: &str, success: u64, failed: u64| crate::demand::DemandReport {
            proxy: proxy.into(),
            versions: vec![],
            ttl_s: None,
            applied: Some(1),
            served: vec![crate::demand::VersionServed {
                model: name.clone(),
                version: v.clone(),
                copy: 1,
                age_ms: 3_600_000,
                success,
                failed,
                latencies: vec![(40, success + failed)],
            }],
        };
        let weight = |c: &Controller| c.lock().deployments["soft"].canary.as_ref().unwrap().weight;
        // Two proxies' copies (started an hour ago) answered 10 and 4 before the baseline.
        c.report_demand(report("a:8000", 10, 0));
        c.report_demand(report("b:8000", 4, 0));
        ready(&c, 3);
        c.step_rollouts(&mut c.lock(), Instant::now(), &HashSet::new());
        assert_eq!(weight(&c), 50, "no request since the baseline: held");
        // Then 2 and 1 more.
        c.report_demand(report("a:8000", 12, 0));
        c.report_demand(report("b:8000", 5, 0));
        c.lock()
            .deployments
            .get_mut("soft")
            .unwrap()
            .canary
            .as_mut()
            .unwrap()
            .rollout
            .as_mut()
            .unwrap()
            .next_step = Instant::now();
        c.step_rollouts(&mut c.lock(), Instant::now(), &HashSet::new());
        assert_eq!(weight(&c), 100, "3 requests through the proxies: stepped up to the end");

        // Again, from 50 %: a failure a proxy saw since rolls the canary back (1 of 3 > 1 %).
        let c = completing_rollout().await;
        c.report_demand(report("a:8000", 10, 0));
        ready(&c, 3);
        c.report_demand(report("a:8000", 12, 1));
        c.step_rollouts(&mut c.lock(), Instant::now(), &HashSet::new());
        let st = c.lock();
        let canary = st.deployments["soft"].canary.as_ref().unwrap();
        assert_eq!((canary.weight, canary.rollout.is_none()), (0, true), "rolled back");
    }

    /// A step whose replicas' loads wait for a message on a channel while `HOLD` is set.
    struct Echo(sluice_deployments::ModelMetadata);

    impl sluice_deployments::Backend for Echo {
        fn metadata(&self) -> &sluice_deployments::ModelMetadata {
            &self.0
        }

        fn infer(
            &mut self,
            inputs: Vec<NamedTensor>,
            _: &[String],
        ) -> Result<Vec<NamedTensor>, sluice_deployments::InferError> {
            Ok(inputs)
        }
    }

    /// A completed rollout's canary rolled back while it grows to the primary's replicas for
    /// its promotion is not promoted (the rollback takes no turn of the controller's changes,
    /// so it can come while the canary loads; the promotion went on over it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_canary_rolled_back_while_it_grows_for_its_promotion_is_not_promoted() {
        use std::sync::Mutex as StdMutex;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc;
        static HOLD: AtomicBool = AtomicBool::new(false);
        let (started_tx, started) = mpsc::channel::<()>();
        let (release, gate) = mpsc::channel::<()>();
        let hooks = Arc::new(StdMutex::new((started_tx, gate)));
        sluice_deployments::register_step(
            "grows_for_promotion",
            Arc::new(move || {
                if HOLD.load(Ordering::SeqCst) {
                    let hooks = hooks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = hooks.0.send(());
                    // Bounded, so a test that never releases fails instead of hanging.
                    let _ = hooks.1.recv_timeout(Duration::from_secs(60));
                }
                let spec = |name: &str| sluice_deployments::TensorSpec {
                    name: name.into(),
                    dtype: DataType::Fp32,
                    shape: vec![-1],
                };
                let meta = sluice_deployments::ModelMetadata {
                    platform: "custom".into(),
                    inputs: vec![spec("x")],
                    outputs: vec![spec("x")],
                };
                Ok(Box::new(Echo(meta)) as Box<dyn sluice_deployments::Backend>)
            }),
        );
        let routes = Arc::new(Router::new(RouteTable::default()));
        let c = Controller::new(routes, Duration::from_secs(1), Cluster::Local, Default::default());
        let step = "builtin: {custom: {name: grows_for_promotion}}, num_cpus: 0.25";
        let yaml = format!(
            "applications:\n  - name: a\n    deployments:\n      - {{name: big, {step}, num_replicas: 2}}\n      - {{name: small, {step}, num_replicas: 1}}\n"
        );
        let config = sluice_config::parse(&yaml, std::path::Path::new("/nowhere/c.yaml")).unwrap();
        c.apply(&config).await.unwrap();
        // `small`'s version as `big`'s canary, its rollout completed (at 100 %).
        let canary = c.lock().deployments["small"].primary.clone();
        let completed = canary.deployment.clone();
        c.lock().deployments.get_mut("big").unwrap().canary = Some(CanaryState {
            version: canary.clone(),
            weight: 100,
            config_weight: 100,
            config_rollout: None,
            rollout: None,
            window: Default::default(),
            scale_failure: None,
        });
        HOLD.store(true, Ordering::SeqCst);
        let promoting = {
            let c = c.clone();
            tokio::spawn(
                async move { c.promote_as("big", "rollout complete: promoted", Some(completed)).await },
            )
        };
        tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the canary's growth started");
        c.rollback("big", "by the test").await.unwrap();
        HOLD.store(false, Ordering::SeqCst);
        release.send(()).unwrap();
        promoting.await.unwrap().unwrap();
        let st = c.lock();
        let big = &st.deployments["big"];
        assert!(
            !Arc::ptr_eq(&big.primary.deployment, &canary.deployment),
            "the rolled-back canary was promoted: {:?}",
            st.events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        assert_eq!(big.canary.as_ref().map(|c| c.weight), Some(0));
    }

    /// A controller running `n` autoscaled deployments `soft{i}` of `step` (bounds 1..8, a
    /// target of 1, a 600 s upscale delay, and `scaling`'s fields), each with the version of a
    /// fixed `other{i}` made its canary at 50 %, and its primary's load at 6 on average, sampled
    /// at `now`. Returns it, the canaries and the primaries.
    async fn canaries_at_half(
        n: usize,
        step: &str,
        scaling: &str,
        now: Instant,
    ) -> (Arc<Controller>, Vec<crate::state::Version>, Vec<crate::state::Version>) {
        let routes = Arc::new(Router::new(RouteTable::default()));
        let c = Controller::new(routes, Duration::from_secs(1), Cluster::Local, Default::default());
        let scaling = format!(
            "autoscaling_config: {{min_replicas: 1, max_replicas: 8, target_ongoing_requests: 1, upscale_delay_s: 600, {scaling}}}"
        );
        let mut yaml = "applications:\n  - name: a\n    deployments:\n".to_string();
        for i in 0..n {
            yaml += &format!(
                "      - {{name: soft{i}, {step}, {scaling}}}\n      - {{name: other{i}, {step}, num_replicas: 1}}\n"
            );
        }
        let config = sluice_config::parse(&yaml, std::path::Path::new("/nowhere/c.yaml")).unwrap();
        c.apply(&config).await.unwrap();
        let (mut canaries, mut primaries) = (Vec::new(), Vec::new());
        for i in 0..n {
            let mut st = c.lock();
            let canary = st.deployments[&format!("other{i}")].primary.clone();
            let m = st.deployments.get_mut(&format!("soft{i}")).unwrap();
            m.canary = Some(CanaryState {
                version: canary.clone(),
                weight: 50,
                config_weight: 50,
                config_rollout: None,
                rollout: None,
                window: Default::default(),
                scale_failure: None,
            });
            // Not sampled again until its interval passes.
            let s = m.scaling.as_mut().unwrap();
            s.window.sample(now, 6.0, Duration::from_secs(30));
            s.last_decision = now;
            canaries.push(canary);
            primaries.push(m.primary.clone());
        }
        (c, canaries, primaries)
    }

    /// A promoted canary is judged on its own load from then on: it took the old primary's
    /// window (at the end of a rollout a share of the load near none, a downscale delay
    /// running), and its first decision shrank it while it took all the traffic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_promoted_canary_keeps_its_own_load_samples() {
        let now = Instant::now();
        let step = "builtin: {softmax: {}}, num_cpus: 0.01";
        let (c, _, _) = canaries_at_half(1, step, "downscale_delay_s: 0", now).await;
        {
            let mut st = c.lock();
            let m = st.deployments.get_mut("soft0").unwrap();
            m.scaling.as_mut().unwrap().window = Default::default();
            m.scaling.as_mut().unwrap().window.sample(now, 0.5, Duration::from_secs(30));
            m.canary.as_mut().unwrap().window.sample(now, 8.0, Duration::from_secs(30));
        }
        c.promote("soft0").await.unwrap();
        let st = c.lock();
        assert_eq!(st.deployments["soft0"].scaling.as_ref().unwrap().window.average(), 8.0);
    }

    /// An autoscaled deployment's canary grows, without waiting for the upscale delay, to the
    /// replicas its share of the deployment's load asks for (it kept the count it started with
    /// while a rollout moved traffic to it): the share over the target, not the scaling factor's
    /// step. Once rolled back it shrinks at once to what its own load asks for. A
    /// canary whose last change failed waits for its retry time, and a job decided for the
    /// canary changes nothing once its target is not the canary (gone, or promoted). Nor is a
    /// canary judged while a change (a deploy, a promotion) runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_autoscaled_canary_grows_at_once_for_its_share_of_the_load() {
        let now = Instant::now();
        let step = "builtin: {softmax: {}}, num_cpus: 0.01";
        let (c, canaries, primaries) = canaries_at_half(1, step, "upscaling_factor: 2", now).await;
        let (canary, primary) = (canaries[0].clone(), primaries[0].clone());
        let step =
            |at: Instant| crate::autoscale::step(&mut c.lock(), at, Some(2.0), &HashSet::new(), true).0;
        let canary_jobs = |jobs: &[crate::reconcile::Rescale]| -> Vec<(bool, usize)> {
            jobs.iter()
                .map(|j| (j.canary && Arc::ptr_eq(&j.target.deployment, &canary.deployment), j.to))
                .collect()
        };
        let changing = crate::autoscale::step(&mut c.lock(), now, Some(2.0), &HashSet::new(), false).0;
        assert!(changing.is_empty(), "a canary judged while a change ran");
        let jobs = step(now);
        assert_eq!(
            canary_jobs(&jobs),
            [(true, 3)],
            "half of a load of 6 at a target of 1 asks for 3 canary replicas"
        );
        c.rescale(jobs, "autoscaled").await;
        assert_eq!(canary.replica_count(), 3);
        let events = || c.lock().events.iter().map(|e| e.message.clone()).collect::<Vec<_>>();
        assert!(
            events().iter().any(|e| e.starts_with("canary version") && e.contains("from 1 to 3")),
            "{:?}",
            events()
        );
        // Rolled back to 0: down to what its own load asks for at once (none here: one
        // replica), not after the downscale delay.
        let set_canary = |f: &dyn Fn(&mut CanaryState)| {
            f(c.lock().deployments.get_mut("soft0").unwrap().canary.as_mut().unwrap())
        };
        set_canary(&|c| c.weight = 0);
        assert_eq!(canary_jobs(&step(now)), [(true, 1)]);
        // Its last change failed: at 100 % it would grow to 6 (the primary's load, no new
        // sample), but not before the failure's retry time; it may still shrink.
        let failed = |c: &mut CanaryState| {
            c.scale_failure = Some(crate::state::ScaleFailure { message: "no".into(), at: now, failures: 1 })
        };
        set_canary(&|c| c.weight = 100);
        assert_eq!(canary_jobs(&step(now)), [(true, 6)]);
        set_canary(&failed);
        assert!(step(now).is_empty(), "a failed canary change was tried again at once");
        set_canary(&|c| c.weight = 0);
        assert_eq!(canary_jobs(&step(now)), [(true, 1)], "a failed canary's shrink waited");
        // A job decided for the canary changes nothing once its target is not the canary.
        let promoted = crate::reconcile::Rescale {
            deployment: "soft0".into(),
            target: primary.clone(),
            to: 5,
            canary: true,
        };
        c.rescale(vec![promoted], "autoscaled").await;
        assert_eq!(primary.replica_count(), 1, "a canary's job resized the primary");
        let gone = crate::reconcile::Rescale {
            deployment: "soft0".into(),
            target: canary.clone(),
            to: 5,
            canary: true,
        };
        c.lock().deployments.get_mut("soft0").unwrap().canary = None;
        c.rescale(vec![gone], "autoscaled").await;
        assert_eq!(canary.replica_count(), 3);
    }

    /// The control round's wiring: no canary is resized while another change holds the turn
    /// (a deploy, a promotion); once free, every canary that needs it grows in the same round
    /// (each job used to take the turn for itself, and all but the first were dropped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn canaries_grow_together_and_only_when_no_other_change_runs() {
        // Replicas that take 300 ms to load: both canaries' jobs are still running (their
        // deployments busy) right after the round that started them.
        sluice_deployments::register_step(
            "slow_to_load",
            Arc::new(|| {
                std::thread::sleep(Duration::from_millis(300));
                let spec = sluice_deployments::TensorSpec {
                    name: "x".into(),
                    dtype: DataType::Fp32,
                    shape: vec![-1],
                };
                let meta = sluice_deployments::ModelMetadata {
                    platform: "custom".into(),
                    inputs: vec![spec.clone()],
                    outputs: vec![spec],
                };
                Ok(Box::new(Echo(meta)) as Box<dyn sluice_deployments::Backend>)
            }),
        );
        let step = "builtin: {custom: {name: slow_to_load}}, num_cpus: 0.01";
        // The primaries' load sampled a moment ahead: the slow loads above outlast the sampling
        // period, and a sample of the idle test load taken meanwhile would halve the average.
        let ahead = Instant::now() + Duration::from_secs(30);
        let (c, canaries, _) = canaries_at_half(2, step, "metrics_interval_s: 600", ahead).await;
        let held = c.changes.clone().lock_owned().await;
        c.tick();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            canaries.iter().map(|v| v.replica_count()).collect::<Vec<_>>(),
            [1, 1],
            "resized during a change"
        );
        drop(held);
        c.tick();
        let busy = c.busy.lock().unwrap().clone();
        assert_eq!(
            busy,
            ["soft0".to_string(), "soft1".to_string()].into(),
            "not every canary grew in the round"
        );
        let until = Instant::now() + Duration::from_secs(30);
        while canaries.iter().any(|v| v.replica_count() != 3) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(canaries.iter().map(|v| v.replica_count()).collect::<Vec<_>>(), [3, 3]);
    }

    /// A busy deployment's rollout is judged as any other whose verdict is not a promotion:
    /// a step applies at once (a bad canary was left unjudged while its primary grew).
    #[tokio::test]
    async fn a_busy_deployments_rollout_still_steps() {
        let c = completing_rollout().await;
        if let Some(r) =
            c.lock().deployments.get_mut("soft").unwrap().canary.as_mut().unwrap().rollout.as_mut()
        {
            r.config.step_percent = 10;
        }
        let busy: HashSet<String> = ["soft".to_string()].into();
        let (next, promote) = c.step_rollouts(&mut c.lock(), Instant::now(), &busy);
        assert!(promote.is_empty());
        assert!(
            next.is_some_and(|n| n > Instant::now() + Duration::from_secs(20)),
            "the next interval did not start"
        );
        assert_eq!(c.lock().deployments["soft"].canary.as_ref().unwrap().weight, 60);
    }
}
