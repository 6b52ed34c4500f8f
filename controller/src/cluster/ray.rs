//! Replicas as Ray actors. Each replica of a deployment version is a named actor (owned by the
//! job's driver, so it goes with it) that
//! hosts one `sluice replica` process (its own batcher and ONNX Runtime session) on whichever
//! node Ray places it, by the version's CPUs, GPUs, memory and custom resources. The controller
//! keeps every decision: how many replicas, when one is unhealthy (gRPC health checks every
//! `health_check_period_s`), when to replace one that exited, died with its node or never came
//! up. Requests go from this process straight to each replica's address.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use sluice_config::{HealthCheck, Placement};
use sluice_deployments::{Deployment, RemoteInfo};
use tokio::sync::{mpsc, watch};

use super::ReplicaSpec;
use super::bridge::{ActorOptions, Command, Commands, Event, Node};
use super::remote::GrpcReplica;

/// Replacements of a replica that keeps failing wait this long at most between tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The wait before trying again after `failures` in a row: 0.5 s, doubling, at most
/// [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250 * 2u64.pow(failures.min(7))).min(MAX_BACKOFF)
}

/// How long a replica that leaves routing stays up when proxies route too: twice their poll of
/// the route table (`sluice proxy --poll-s`, 0.5 s by default).
pub const PROXIES_FOLLOW: Duration = Duration::from_secs(1);

/// Frontends on every node that has replicas (`proxy_location: EveryNode`).
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The controller's admin port (proxies poll its route snapshot there, on the head).
    pub admin_port: u16,
    pub http_port: u16,
    /// None: gRPC disabled.
    pub grpc_port: Option<u16>,
    /// The admin token proxies present.
    pub token: Option<String>,
    /// The config's `worker_threads`, for each proxy's runtime (None: one per CPU of its node).
    pub worker_threads: Option<u32>,
    /// The config's `release_startup_memory` (false: `--keep-startup-memory`).
    pub release_startup_memory: bool,
    /// The config's frontend limits and timeouts, shutdown, logs and traces (`--settings`).
    pub settings: sluice_config::ProxySettings,
}

impl ProxyOptions {
    /// The command line of a proxy: `binary` (as the node sees it) following the controller at
    /// `head_ip`; `{node_ip}` is the bridge's placeholder for the node's address.
    fn argv(&self, binary: String, head_ip: &str) -> Vec<String> {
        let mut argv = vec![
            binary,
            "proxy".into(),
            "--controller".into(),
            // An IPv6 address goes in brackets in a URL.
            match head_ip.contains(':') {
                true => format!("http://[{head_ip}]:{}", self.admin_port),
                false => format!("http://{head_ip}:{}", self.admin_port),
            },
            "--host".into(),
            "{node_ip}".into(),
            "--http-port".into(),
            self.http_port.to_string(),
        ];
        match self.grpc_port {
            Some(port) => argv.extend(["--grpc-port".into(), port.to_string()]),
            None => argv.push("--no-grpc".into()),
        }
        if let Some(n) = self.worker_threads {
            argv.extend(["--worker-threads".into(), n.to_string()]);
        }
        if !self.release_startup_memory {
            argv.push(KEEP_STARTUP_MEMORY.into());
        }
        // Plain fields of a checked config: nothing that cannot be written as JSON.
        let settings = serde_json::to_string(&self.settings).unwrap_or_default();
        argv.extend(["--settings".into(), settings]);
        argv
    }
}

/// Rounds of replicas of a version lost in a row, none up, after which waiting for it to start
/// gives up (each round is a start after the backoff: three are a model that crashes on load,
/// not one node lost with several of its replicas).
const GIVE_UP_AFTER_FAILURES: u32 = 3;

/// Losses this close together are one round.
const ONE_ROUND: Duration = Duration::from_millis(250);

/// How long past its drain a process told to stop has to end before it is killed.
const KILL_MARGIN: Duration = Duration::from_secs(5);

/// The flag of `sluice replica` and `sluice proxy` for the config's
/// `release_startup_memory: false`.
const KEEP_STARTUP_MEMORY: &str = "--keep-startup-memory";

/// The command line of a replica serving `spec_json` (a [`ReplicaSpec`]) with `num_cpus` CPUs
/// reserved: its async runtime gets that many threads, rounded up (at least one), rather than
/// one per CPU of the node, which several replicas on one node would each start. It keeps its
/// start-up memory where the config's `release_startup_memory` is false, takes messages as
/// large as the server's frontends do, and drains as long as the server's grace (a replica
/// took 64 MiB and drained 30 s whatever the config said: a larger request the server took
/// failed at the replica, as a retryable 503).
fn replica_argv(binary: String, spec_json: &str, num_cpus: f64, options: &RayOptions) -> Vec<String> {
    // `max` before `min`: a NaN (which validation refuses) gives 1, not 0.
    let threads = num_cpus.ceil().max(1.0).min(f64::from(sluice_config::MAX_WORKER_THREADS)) as u32;
    let mut argv = vec![
        binary,
        "replica".into(),
        "--listen".into(),
        "{node_ip}:0".into(),
        "--worker-threads".into(),
        threads.to_string(),
        "--max-body-bytes".into(),
        options.max_body_bytes.to_string(),
        "--graceful-shutdown-timeout".into(),
        options.grace.as_secs_f64().to_string(),
    ];
    if !options.release_startup_memory {
        argv.push(KEEP_STARTUP_MEMORY.into());
    }
    argv.extend(super::spec_args(spec_json));
    argv
}

/// How this process runs replicas on Ray.
pub struct RayOptions {
    /// The `sluice` binary replicas run (made relative to the working dir when inside it, so
    /// that it resolves on every node).
    pub binary: PathBuf,
    /// The job's working dir (this process's cwd): paths under it are sent relative.
    pub working_dir: PathBuf,
    /// How long a replica told to stop may finish its requests.
    pub grace: Duration,
    /// How long a new replica may take to print its address.
    pub startup_timeout: Duration,
    /// Proxies on the other nodes with replicas; None: frontends on the head only.
    pub proxies: Option<ProxyOptions>,
    /// The config's `release_startup_memory`, for each replica's process.
    pub release_startup_memory: bool,
    /// The config's `http_options.max_body_bytes`: the largest message a replica takes.
    pub max_body_bytes: usize,
}

/// A proxy actor on one node.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub name: String,
    pub node_id: String,
    pub node_ip: String,
    /// Its REST address once it listens.
    pub addr: Option<String>,
}

/// The Ray cluster this controller runs replicas on.
pub struct RayCluster {
    commands: Commands,
    options: RayOptions,
    /// Distinguishes this controller's actors from an earlier one's.
    run: String,
    seq: AtomicU64,
    /// The replica set each live actor belongs to, by actor name.
    owners: Mutex<HashMap<String, Weak<RayReplicas>>>,
    nodes: Mutex<BTreeMap<String, Node>>,
    /// Lines for the controller's events, (deployment, message), until it takes them.
    notes: Mutex<Vec<(String, String)>>,
    /// Set once the driver has closed the bridge.
    closed: watch::Sender<bool>,
    /// The node this process (and the driver) runs on: the head.
    head: Mutex<(String, String)>,
    /// Where each replica that is up runs: actor name → node id.
    replica_nodes: Mutex<HashMap<String, String>>,
    /// Proxies by node id.
    proxies: Mutex<BTreeMap<String, Proxy>>,
    /// Nodes whose proxy failed, by node id: failures in a row, and when to try again.
    proxy_retry: Mutex<BTreeMap<String, (u32, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RayCluster {
    /// [`PROXIES_FOLLOW`] with proxies on the nodes; none without.
    pub(crate) fn proxies_follow(&self) -> Option<Duration> {
        self.options.proxies.is_some().then_some(PROXIES_FOLLOW)
    }

    /// Starts handling the driver's `events`.
    pub fn start(
        commands: Commands,
        mut events: mpsc::UnboundedReceiver<Event>,
        options: RayOptions,
    ) -> Arc<Self> {
        let run = format!("{:x}", std::process::id() as u64 ^ now_ms());
        let cluster = Arc::new(Self {
            commands,
            options,
            run,
            seq: AtomicU64::new(0),
            owners: Mutex::new(HashMap::new()),
            nodes: Mutex::new(BTreeMap::new()),
            notes: Mutex::new(Vec::new()),
            closed: watch::channel(false).0,
            head: Mutex::new((String::new(), String::new())),
            replica_nodes: Mutex::new(HashMap::new()),
            proxies: Mutex::new(BTreeMap::new()),
            proxy_retry: Mutex::new(BTreeMap::new()),
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(cluster) = weak.upgrade() else { return };
                cluster.handle(event);
            }
            if let Some(cluster) = weak.upgrade() {
                cluster.closed.send_replace(true);
            }
        });
        cluster
    }

    /// Resolves once the Ray driver has closed the bridge (the job is ending).
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    fn note(&self, deployment: &str, message: String) {
        lock(&self.notes).push((deployment.to_string(), message));
    }

    /// What happened to replicas since the last call: (deployment, message) lines.
    pub fn take_notes(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *lock(&self.notes))
    }

    /// The nodes known alive now.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.nodes).values().filter(|n| n.alive).cloned().collect()
    }

    fn owner(&self, actor: &str) -> Option<Arc<RayReplicas>> {
        lock(&self.owners).get(actor).and_then(Weak::upgrade)
    }

    fn handle(&self, event: Event) {
        match event {
            Event::Hello { protocol, ray_version, namespace, node_id, node_ip } => {
                *lock(&self.head) = (node_id, node_ip);
                if protocol != super::bridge::PROTOCOL {
                    tracing::error!(
                        "the Ray driver speaks protocol {protocol}, this controller {}",
                        super::bridge::PROTOCOL
                    );
                }
                tracing::info!("on Ray {ray_version}, namespace `{namespace}`");
                // Whatever an earlier controller left behind under our prefix goes.
                self.commands.send(Command::List { id: "startup".into(), prefix: "sluice".into() });
            }
            Event::Actors { id, actors } if id.as_deref() == Some("startup") => {
                for a in actors.into_iter().filter(|a| !a.name.contains(&format!(":{}-", self.run))) {
                    tracing::info!("stopping `{}` left by an earlier controller", a.name);
                    self.kill(&a.name);
                }
            }
            Event::NodeAdded(node) => {
                tracing::info!(node = %node.node_ip, "node joined");
                lock(&self.nodes).insert(node.node_id.clone(), node);
            }
            Event::NodeRemoved { node_id, node_ip } => {
                tracing::warn!(node = %node_ip, "node left the cluster");
                if let Some(n) = lock(&self.nodes).get_mut(&node_id) {
                    n.alive = false;
                }
            }
            Event::Ready { name, node_id, node_ip, addr, .. } if name.starts_with(PROXY_PREFIX) => {
                let mut proxies = lock(&self.proxies);
                match proxies.values_mut().find(|p| p.name == name) {
                    Some(p) => {
                        tracing::info!(node = %node_ip, "proxy up at {addr}");
                        lock(&self.proxy_retry).remove(&p.node_id);
                        // Placed on its node when created: kept where it could not say.
                        if !node_id.is_empty() {
                            p.node_id = node_id;
                        }
                        (p.node_ip, p.addr) = (node_ip, Some(addr));
                    }
                    // One this controller no longer wants (replaced, or its kill came while Ray
                    // still created it): it would hold the node's proxy port for good.
                    None => {
                        self.commands.send(Command::Kill { name, grace_s: 0.0 });
                    }
                }
            }
            Event::Killed { name } if name.starts_with(PROXY_PREFIX) => {
                lock(&self.proxies).retain(|_, p| p.name != name);
            }
            Event::Failed { ref name, .. }
            | Event::Exited { ref name, .. }
            | Event::Died { ref name, .. }
                if name.starts_with(PROXY_PREFIX) =>
            {
                self.proxy_lost(name, &event);
            }
            Event::Pending { name, kind, reason } => {
                if let Some(r) = self.owner(&name) {
                    r.pending(&name, &kind, reason);
                }
            }
            Event::Ready { name, node_id, node_ip, pid, addr } => match self.owner(&name) {
                Some(r) => {
                    lock(&self.replica_nodes).insert(name.clone(), node_id.clone());
                    r.ready(RemoteInfo { name, node_id, node_ip, pid, addr });
                }
                None => {
                    self.commands.send(Command::Kill { name, grace_s: 0.0 });
                }
            },
            Event::Failed { name, node_ip, message, log_tail } => {
                let on = node_ip.map(|ip| format!(" on node {ip}")).unwrap_or_default();
                self.gone(&name, format!("failed to start{on}: {message}{}", tail(&log_tail)));
            }
            Event::Exited { name, code, node_ip, log_tail } => {
                let code = code.map_or("?".into(), |c| c.to_string());
                let on = node_ip.map(|ip| format!(" on node {ip}")).unwrap_or_default();
                self.gone(&name, format!("exited with code {code}{on}{}", tail(&log_tail)));
            }
            Event::Died { name, node_ip, message } => {
                let on = node_ip.map(|ip| format!(" on node {ip}")).unwrap_or_default();
                self.gone(&name, format!("died{on}: {message}"));
            }
            Event::Killed { name } => {
                lock(&self.owners).remove(&name);
                lock(&self.replica_nodes).remove(&name);
            }
            Event::Error { op, name, message } => {
                tracing::error!("the Ray driver refused {}: {message}", op.as_deref().unwrap_or_default());
                // A proxy's create the driver refused (Ray's control store away, say): tried
                // again after the proxies' backoff, not at every control round.
                if let Some(name) = name.as_ref().filter(|n| n.starts_with(PROXY_PREFIX))
                    && op.as_deref() != Some("kill")
                {
                    self.kill(name);
                    let event = Event::Failed {
                        name: name.clone(),
                        node_ip: None,
                        message: format!("refused by Ray: {message}"),
                        log_tail: String::new(),
                    };
                    self.proxy_lost(name, &event);
                    return;
                }
                if let Some(name) = name {
                    // A create that failed part-way may have left the actor (and its process)
                    // up: killed, as the replacement does not take its place.
                    if op.as_deref() != Some("kill") {
                        self.kill(&name);
                    }
                    self.gone(&name, format!("refused by Ray: {message}"));
                }
            }
            Event::Actors { .. } | Event::Other => {}
        }
    }

    fn gone(&self, actor: &str, why: String) {
        lock(&self.replica_nodes).remove(actor);
        let owner = lock(&self.owners).remove(actor).and_then(|w| w.upgrade());
        if let Some(r) = owner {
            r.lost(actor, why);
        }
    }

    fn create(self: &Arc<Self>, owner: &Arc<RayReplicas>) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{ACTOR_PREFIX}{}:{}:{}-{n}", owner.spec.deployment, owner.spec.version, self.run);
        lock(&self.owners).insert(name.clone(), Arc::downgrade(owner));
        // Counted before the driver hears of it: an answer handled first (a refusal) found
        // nothing to remove, and the entry put after it counted a replica that never came.
        lock(&owner.state).actors.insert(name.clone(), Actor::Starting { since: Instant::now() });
        let p = &owner.placement;
        let argv =
            replica_argv(self.relative(&self.options.binary), &owner.spec_json, p.num_cpus, &self.options);
        self.commands.send(Command::Create {
            name: name.clone(),
            argv,
            env: BTreeMap::new(),
            options: ActorOptions {
                num_cpus: p.num_cpus,
                num_gpus: p.num_gpus,
                memory: p.memory,
                resources: p.resources.clone(),
                accelerator_type: p.accelerator_type.clone(),
                max_replicas_per_node: p.max_replicas_per_node,
                group: format!("{}:{}", owner.spec.deployment, owner.spec.version),
                ..ActorOptions::default()
            },
            startup_timeout_s: self.options.startup_timeout.as_secs_f64(),
        });
        name
    }

    /// Makes proxies match the nodes that have replicas up (the head serves itself): starts one
    /// pinned to each such node, stops those on nodes left without replicas. Called by the
    /// controller every round.
    pub fn reconcile_proxies(&self) {
        let Some(options) = &self.options.proxies else { return };
        let (head, head_ip) = lock(&self.head).clone();
        if head_ip.is_empty() {
            return;
        }
        let alive: std::collections::BTreeSet<String> =
            lock(&self.nodes).values().filter(|n| n.alive).map(|n| n.node_id.clone()).collect();
        let wanted: std::collections::BTreeSet<String> = lock(&self.replica_nodes)
            .values()
            .filter(|n| **n != head && alive.contains(*n))
            .cloned()
            .collect();
        let mut proxies = lock(&self.proxies);
        for (node, p) in proxies.iter() {
            if !wanted.contains(node) {
                tracing::info!(node = %p.node_ip, "no replica left on the node; stopping its proxy");
                self.kill(&p.name);
            }
        }
        proxies.retain(|node, _| wanted.contains(node));
        let now = Instant::now();
        let mut retry = lock(&self.proxy_retry);
        retry.retain(|node, _| wanted.contains(node));
        for node in wanted {
            if proxies.contains_key(&node) || retry.get(&node).is_some_and(|&(_, at)| now < at) {
                continue;
            }
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let name = format!("{PROXY_PREFIX}{}-{n}", self.run);
            let argv = options.argv(self.relative(&self.options.binary), &head_ip);
            let env = options.token.iter().map(|t| ("SLUICE_ADMIN_TOKEN".to_string(), t.clone())).collect();
            self.commands.send(Command::Create {
                name: name.clone(),
                argv,
                env,
                options: ActorOptions {
                    num_cpus: 0.0,
                    group: "proxy".into(),
                    node_id: Some(node.clone()),
                    soft: Some(false),
                    ..ActorOptions::default()
                },
                startup_timeout_s: self.options.startup_timeout.as_secs_f64(),
            });
            proxies.insert(node.clone(), Proxy { name, node_id: node, node_ip: String::new(), addr: None });
        }
    }

    /// A proxy that failed, exited or died: gone from the list, and its node's proxy is
    /// started again after a backoff that doubles while they keep failing (reset when one
    /// comes up), not at every control round.
    fn proxy_lost(&self, name: &str, event: &Event) {
        let Some(p) = ({
            let mut proxies = lock(&self.proxies);
            let node = proxies.iter().find(|(_, p)| p.name == name).map(|(node, _)| node.clone());
            node.and_then(|node| proxies.remove(&node))
        }) else {
            return;
        };
        // What it printed says why (a port in use, say); "exited before LISTEN" does not.
        let why = match event {
            Event::Failed { message, log_tail, .. } => format!("{message}{}", tail(log_tail)),
            Event::Died { message, .. } => message.clone(),
            Event::Exited { code, log_tail, .. } => {
                format!("exited with code {}{}", code.map_or("?".into(), |c| c.to_string()), tail(log_tail))
            }
            _ => String::new(),
        };
        // A proxy that never came up has no address yet: its node's, from the node list.
        let node_ip = match p.node_ip.as_str() {
            "" => lock(&self.nodes).get(&p.node_id).map(|n| n.node_ip.clone()).unwrap_or_default(),
            ip => ip.to_string(),
        };
        let mut retry = lock(&self.proxy_retry);
        let failures = retry.get(&p.node_id).map_or(0, |&(f, _)| f) + 1;
        let wait = backoff(failures);
        retry.insert(p.node_id.clone(), (failures, Instant::now() + wait));
        drop(retry);
        tracing::warn!(node = %node_ip, node_id = %p.node_id, "proxy {name} lost ({why}); failure {failures} in a row, next try in {wait:?}");
        self.note(PROXIES, format!("the proxy on node {node_ip} was lost ({why}); next try in {wait:?}"));
    }

    /// The proxies on other nodes than the head.
    pub fn proxies(&self) -> Vec<Proxy> {
        lock(&self.proxies).values().cloned().collect()
    }

    fn kill(&self, actor: &str) {
        let grace_s = self.kill_grace(actor).as_secs_f64();
        self.commands.send(Command::Kill { name: actor.to_string(), grace_s });
    }

    /// How long `actor`, told to stop, has before it is killed: its drain
    /// (`graceful_shutdown_timeout_s`) and a margin for the process to end after it; a proxy
    /// first keeps serving for `shutdown_delay_s` (it was killed in that delay, its requests
    /// in flight cut).
    fn kill_grace(&self, actor: &str) -> Duration {
        let delay = match &self.options.proxies {
            Some(p) if actor.starts_with(PROXY_PREFIX) => {
                Duration::from_secs_f64(p.settings.shutdown_delay_s)
            }
            _ => Duration::ZERO,
        };
        self.options.grace + delay + KILL_MARGIN
    }

    /// `path` relative to the working dir when it is inside it (so it resolves on every node,
    /// where Ray unpacks the working dir elsewhere), else as it is.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.options.working_dir).unwrap_or(path).display().to_string()
    }

    /// Starts replicas of a deployment version: `deployment` (made with
    /// [`Deployment::start_remote`]) takes each replica as it comes up.
    pub fn replicas(
        self: &Arc<Self>,
        mut spec: ReplicaSpec,
        deployment: Arc<Deployment>,
        target: usize,
    ) -> Arc<RayReplicas> {
        spec.relative_to(&self.options.working_dir);
        let placement = spec.settings.placement.clone();
        let health = spec.settings.health_check.clone();
        let spec_json = serde_json::to_string(&spec).unwrap_or_default();
        let (changed, _) = watch::channel(());
        let r = Arc::new(RayReplicas {
            cluster: self.clone(),
            deployment,
            spec,
            spec_json,
            placement,
            health,
            state: Mutex::new(State::new(target)),
            changed,
        });
        r.ensure();
        r
    }
}

/// Every replica actor this controller makes is named `sluice:<deployment>:<version>:<run>-<n>`.
pub const ACTOR_PREFIX: &str = "sluice:";

/// Proxy actors are named `sluice-proxy:<run>-<n>`.
pub const PROXY_PREFIX: &str = "sluice-proxy:";
/// What the events of the nodes' proxies are filed under (no deployment's name can hold `:`).
pub const PROXIES: &str = "proxies:";

/// The last lines of a replica's output, for an event.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.trim().lines().collect();
    let last = &lines[lines.len().saturating_sub(8)..];
    if last.is_empty() { String::new() } else { format!("; last output:\n{}", last.join("\n")) }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What one actor of a replica set is doing.
enum Actor {
    /// Created; not yet placed or not yet listening.
    Starting { since: Instant },
    /// Ray cannot place it yet, and says why.
    Pending { why: String },
    /// Listening and added to the deployment (ready once its first health check passes).
    Up { id: usize, info: RemoteInfo, checks: tokio::task::JoinHandle<()> },
}

struct State {
    target: usize,
    actors: BTreeMap<String, Actor>,
    /// Replicas lost in a row (reset when one comes up): the backoff before the next try.
    failures: u32,
    /// Why the last one was lost.
    last_failure: String,
    /// Rounds of losses in a row, none up since (losses within [`ONE_ROUND`] of each other are
    /// one: several replicas of a node that died, or of one create): after
    /// [`GIVE_UP_AFTER_FAILURES`] a version being started is given up.
    failed_rounds: u32,
    /// When the last loss was.
    last_loss: Option<Instant>,
    /// The version is retired ([`RayReplicas::stop`]): no count but 0 is taken from then on.
    retired: bool,
}

impl State {
    /// `target` replicas wanted, none yet.
    fn new(target: usize) -> Self {
        Self {
            target,
            actors: BTreeMap::new(),
            failures: 0,
            last_failure: String::new(),
            failed_rounds: 0,
            last_loss: None,
            retired: false,
        }
    }

    /// Sets the wanted count: 0 once retired, so a rescale decided before a promote and
    /// applied after the old version stopped cannot start its actors again (nothing would
    /// stop them).
    fn aim(&mut self, n: usize) {
        self.target = if self.retired { 0 } else { n };
    }
}

/// The replicas of one deployment version on Ray.
pub struct RayReplicas {
    cluster: Arc<RayCluster>,
    deployment: Arc<Deployment>,
    spec: ReplicaSpec,
    spec_json: String,
    placement: Placement,
    health: HealthCheck,
    state: Mutex<State>,
    /// Bumped on every change of state (apply waits on it).
    changed: watch::Sender<()>,
}

impl RayReplicas {
    fn label(&self) -> &str {
        &self.spec.deployment
    }

    /// Actors wanted or alive: pending and starting ones count (autoscaling must not ask for
    /// more while Ray places the ones it has).
    pub fn count(&self) -> usize {
        lock(&self.state).actors.len()
    }

    /// Why replicas wait, one line per waiting replica.
    pub fn waiting(&self) -> Vec<String> {
        lock(&self.state)
            .actors
            .iter()
            .filter_map(|(name, a)| match a {
                Actor::Pending { why } => Some(format!("{name} waits for a node: {why}")),
                Actor::Starting { since } if since.elapsed() > Duration::from_secs(10) => {
                    Some(format!("{name} starting for {} s", since.elapsed().as_secs()))
                }
                _ => None,
            })
            .collect()
    }

    /// Starts or stops actors until `n` exist. Stopping takes those not yet up first; one that
    /// is up leaves routing at once and gets the grace period to finish its requests. With
    /// proxies on the nodes, one that was up is told to stop only after [`PROXIES_FOLLOW`]: a
    /// proxy routes to it until its next look at the route table, and a replica that stops
    /// takes no new request.
    pub fn scale_to(self: &Arc<Self>, n: usize) {
        let victims = {
            let mut st = lock(&self.state);
            st.aim(n);
            let excess = st.actors.len().saturating_sub(st.target);
            let mut order: Vec<(bool, String)> =
                st.actors.iter().map(|(name, a)| (matches!(a, Actor::Up { .. }), name.clone())).collect();
            order.sort();
            let victims: Vec<(bool, String)> = order.into_iter().take(excess).collect();
            for (_, name) in &victims {
                if let Some(Actor::Up { id, checks, .. }) = st.actors.remove(name) {
                    checks.abort();
                    self.deployment.remove_replica(id);
                }
            }
            victims
        };
        let followed = self.cluster.proxies_follow().is_some();
        for (up, name) in victims {
            lock(&self.cluster.owners).remove(&name);
            if up && followed {
                let cluster = self.cluster.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(PROXIES_FOLLOW).await;
                    cluster.kill(&name);
                });
            } else {
                self.cluster.kill(&name);
            }
        }
        self.ensure();
        self.changed.send_replace(());
    }

    /// Stops every actor (the version is retired).
    pub fn stop(self: &Arc<Self>) {
        lock(&self.state).retired = true;
        self.scale_to(0);
    }

    /// How long one replica may take to start (`cluster.ray.replica_start_timeout_s`).
    pub fn startup_timeout(&self) -> Duration {
        self.cluster.options.startup_timeout
    }

    /// Waits until every wanted replica is up, or until the ones that are not all wait for a
    /// node that can take them (Ray said so) and at least `min_up` are up; false on timeout.
    pub async fn settled(&self, min_up: usize, timeout: Duration) -> bool {
        let mut changes = self.changed.subscribe();
        let check = |st: &State| {
            let up = st.actors.values().filter(|a| matches!(a, Actor::Up { .. })).count();
            let pending = st.actors.values().filter(|a| matches!(a, Actor::Pending { .. })).count();
            let ready = self.deployment.ready_replicas();
            let settled = (ready >= st.target && up >= st.target)
                || (ready >= min_up && up + pending >= st.target && ready == up);
            // Replicas that keep failing to start, none up: not waited for further (a model
            // that crashes on load held the controller for the whole wait, a start timeout
            // that may be half an hour).
            let failing = up == 0 && ready == 0 && st.failed_rounds >= GIVE_UP_AFTER_FAILURES;
            (settled || failing).then_some(settled)
        };
        let wait = async {
            loop {
                if let Some(settled) = check(&lock(&self.state)) {
                    return settled;
                }
                if changes.changed().await.is_err() {
                    return true;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Rounds of replicas lost in a row, none up, and the last one's why, once they reach
    /// [`GIVE_UP_AFTER_FAILURES`].
    pub fn failing(&self) -> Option<(u32, String)> {
        let st = lock(&self.state);
        (st.failed_rounds >= GIVE_UP_AFTER_FAILURES).then(|| (st.failed_rounds, st.last_failure.clone()))
    }

    /// Creates actors until the target is reached (after a backoff when replicas keep
    /// failing).
    fn ensure(self: &Arc<Self>) {
        let (missing, failures) = {
            let st = lock(&self.state);
            (st.target.saturating_sub(st.actors.len()), st.failures)
        };
        if missing == 0 {
            return;
        }
        if failures == 0 {
            self.create(missing);
            return;
        }
        let delay = backoff(failures);
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(me) = me.upgrade() {
                let missing = {
                    let st = lock(&me.state);
                    st.target.saturating_sub(st.actors.len())
                };
                me.create(missing);
            }
        });
    }

    fn create(self: &Arc<Self>, n: usize) {
        for _ in 0..n {
            self.cluster.create(self);
        }
        self.changed.send_replace(());
    }

    /// Ray says why `actor` has not started: `kind` `infeasible` or `resources`, it waits for a
    /// node that can take it; any other (`starting`: resources are free and its worker or
    /// runtime_env is coming up) is a replica starting, not waiting for a node (taken for one,
    /// a deploy or swap went on without it, as if Ray could not place it).
    fn pending(&self, actor: &str, kind: &str, reason: String) {
        let waits_for_a_node = matches!(kind, "infeasible" | "resources");
        let mut st = lock(&self.state);
        if let Some(a) = st.actors.get_mut(actor)
            && !matches!(a, Actor::Up { .. })
        {
            let why = format!("{kind}: {reason}");
            match (waits_for_a_node, &*a) {
                (true, Actor::Pending { .. }) => *a = Actor::Pending { why },
                (true, _) => {
                    self.cluster.note(self.label(), format!("replica {actor} waits for a node: {why}"));
                    *a = Actor::Pending { why };
                }
                // Placed since it waited: starting.
                (false, Actor::Pending { .. }) => *a = Actor::Starting { since: Instant::now() },
                (false, _) => {}
            }
        }
        drop(st);
        self.changed.send_replace(());
    }

    /// An actor is listening: route to it once its first health check passes.
    fn ready(self: &Arc<Self>, info: RemoteInfo) {
        let replica = match GrpcReplica::new(info.clone(), &self.spec.deployment, &self.spec.version) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // Listening, but not reachable from here: stopped, as a failed health check
                // stops it, before the replacement starts.
                self.cluster.kill(&info.name);
                self.lost(&info.name, format!("cannot reach {}: {e}", info.addr));
                return;
            }
        };
        let mut st = lock(&self.state);
        if !st.actors.contains_key(&info.name) {
            drop(st);
            self.cluster.kill(&info.name);
            return;
        }
        let id = self.deployment.add_remote(replica.clone());
        let checks = tokio::spawn(health_checks(Arc::downgrade(self), id, info.name.clone(), replica));
        self.cluster.note(
            self.label(),
            format!("replica {} up on node {} (pid {}, {})", info.name, info.node_ip, info.pid, info.addr),
        );
        // Failures in a row are forgiven at the first passing health check, not here: a replica
        // the head cannot reach (or one that crashes right after it listens) would otherwise be
        // replaced every cycle at the first backoff.
        st.actors.insert(info.name.clone(), Actor::Up { id, info, checks });
        drop(st);
        self.changed.send_replace(());
    }

    /// An actor is gone or unusable: out of routing at once, replaced.
    fn lost(self: &Arc<Self>, actor: &str, why: String) {
        let removed = {
            let mut st = lock(&self.state);
            let removed = st.actors.remove(actor);
            if removed.is_some() {
                st.failures += 1;
                st.last_failure = why.clone();
                let now = Instant::now();
                if st.last_loss.is_none_or(|at| now.duration_since(at) >= ONE_ROUND) {
                    st.failed_rounds += 1;
                }
                st.last_loss = Some(now);
            }
            removed
        };
        let Some(removed) = removed else { return };
        self.deployment.count_restart();
        if let Actor::Up { id, checks, .. } = removed {
            checks.abort();
            self.deployment.remove_replica(id);
        }
        self.cluster.note(self.label(), format!("replica {actor} {why}; replacing it"));
        self.ensure();
        self.changed.send_replace(());
    }

    /// Where each replica that is up runs, and whether it takes requests.
    pub fn placed(&self) -> Vec<(RemoteInfo, bool)> {
        let ready: HashMap<usize, bool> =
            self.deployment.remote_replicas().into_iter().map(|(id, ready, _)| (id, ready)).collect();
        lock(&self.state)
            .actors
            .values()
            .filter_map(|a| match a {
                Actor::Up { id, info, .. } => Some((info.clone(), ready.get(id).copied().unwrap_or(false))),
                _ => None,
            })
            .collect()
    }
}

/// Checks one replica every `health_check_period_s`, and at once when a request to it failed on
/// the hop: the first passing check opens it to requests; a failing one takes it out of routing
/// at once, kills it and starts another. Before its first pass a replica has
/// `health_check_timeout_s` to answer.
async fn health_checks(owner: Weak<RayReplicas>, id: usize, actor: String, replica: Arc<GrpcReplica>) {
    let Some(health) = owner.upgrade().map(|o| o.health.clone()) else { return };
    let timeout = Duration::from_secs_f64(health.timeout_s);
    let period = Duration::from_secs_f64(health.period_s);
    let started = Instant::now();
    let mut up = false;
    loop {
        let result = replica.healthy(timeout).await;
        let Some(owner) = owner.upgrade() else { return };
        match result {
            Ok(()) if !up => {
                owner.deployment.set_replica_ready(id, true);
                {
                    let mut st = lock(&owner.state);
                    st.failures = 0;
                    st.failed_rounds = 0;
                }
                owner.changed.send_replace(());
                up = true;
            }
            Ok(()) => {}
            Err(_) if !up && started.elapsed() < timeout => {}
            Err(why) => {
                owner.cluster.kill(&actor);
                lock(&owner.cluster.owners).remove(&actor);
                owner.lost(&actor, format!("failed its health check: {why}"));
                return;
            }
        }
        drop(owner);
        if up {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = replica.suspect.notified() => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::sync::mpsc;

    use super::super::bridge::{self, Event, Node};
    use super::{
        PROXIES, PROXY_PREFIX, ProxyOptions, RayCluster, RayOptions, RayReplicas, State, lock, replica_argv,
    };

    /// The default ports, no gRPC, no token, no thread count.
    fn proxy_options() -> ProxyOptions {
        ProxyOptions {
            admin_port: 8266,
            http_port: 8000,
            grpc_port: None,
            token: None,
            worker_threads: None,
            release_startup_memory: true,
            settings: sluice_config::ProxySettings::of(&sluice_config::Config::default()),
        }
    }

    /// The ends a test cluster's bridge needs kept open.
    type Kept = (tokio::io::DuplexStream, mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>);

    /// A cluster with proxies on its nodes (the default ports) whose bridge is a pipe: what it
    /// sends the driver is read from the returned stream, one JSON command a line.
    fn with_proxies() -> (std::sync::Arc<RayCluster>, tokio::io::DuplexStream, Kept) {
        cluster_with(Duration::from_secs(1), proxy_options())
    }

    /// [`with_proxies`] with this drain time and these proxies.
    fn cluster_with(
        grace: Duration,
        proxies: ProxyOptions,
    ) -> (std::sync::Arc<RayCluster>, tokio::io::DuplexStream, Kept) {
        let (driver_out, ours_in) = tokio::io::duplex(1 << 16);
        let (ours_out, driver_in) = tokio::io::duplex(1 << 16);
        let (commands, bridge_events) = bridge::over(ours_in, ours_out);
        let (tx, events) = mpsc::unbounded_channel();
        let options = RayOptions {
            binary: "/job/sluice".into(),
            working_dir: "/job".into(),
            grace,
            startup_timeout: Duration::from_secs(10),
            proxies: Some(proxies),
            release_startup_memory: true,
            max_body_bytes: 1 << 20,
        };
        (RayCluster::start(commands, events, options), driver_in, (driver_out, tx, bridge_events))
    }

    /// With proxies on the nodes, a replica scaled away leaves the head's routing at once but
    /// is told to stop only after `PROXIES_FOLLOW` (the proxies' next look at the routes): it
    /// was killed at once, and requests a proxy sent it meanwhile were refused.
    #[tokio::test]
    async fn a_replica_scaled_away_stops_once_proxies_have_let_go() {
        let (cluster, driver_in, _kept) = with_proxies();
        let (replicas, deployment, name, mut lines) = one_replica(&cluster, driver_in).await;
        let mut next = async |within: Duration| {
            let line = tokio::time::timeout(within, lines.next_line()).await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&line.unwrap().unwrap()).unwrap();
            Some((v["op"].as_str().unwrap().to_string(), v["name"].as_str().unwrap_or("").to_string()))
        };
        cluster.handle(Event::Ready {
            name: name.clone(),
            node_id: "w".into(),
            node_ip: "10.0.0.2".into(),
            pid: 7,
            addr: "10.0.0.2:9".into(),
        });
        assert_eq!(deployment.replica_count(), 1);

        replicas.scale_to(0);
        assert_eq!(deployment.replica_count(), 0, "out of the head's routing at once");
        assert_eq!(
            next(Duration::from_millis(600)).await,
            None,
            "not stopped while proxies may still route to it"
        );
        assert_eq!(next(Duration::from_secs(2)).await, Some(("kill".into(), name)));
    }

    /// What the driver is sent, a line at a time.
    type DriverLines = tokio::io::Lines<BufReader<tokio::io::DuplexStream>>;

    /// One replica of model `m` (its deployment at zero, up to 2) on a cluster whose bridge is
    /// a pipe: its replicas, its deployment, its actor's name, and what the driver is sent next.
    async fn one_replica(
        cluster: &std::sync::Arc<RayCluster>,
        driver_in: tokio::io::DuplexStream,
    ) -> (std::sync::Arc<RayReplicas>, std::sync::Arc<sluice_deployments::Deployment>, String, DriverLines)
    {
        use sluice_deployments::{DataType, Deployment, DeploymentSpec, ModelMetadata, TensorSpec};
        let settings = sluice_config::ReplicaSettings::default();
        let mut spec = DeploymentSpec::new("m");
        (spec.version, spec.num_replicas, spec.max_replicas) = ("1".into(), 0, 2);
        let tensor = TensorSpec { name: "x".into(), dtype: DataType::Fp32, shape: vec![-1, 4] };
        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".into(),
            inputs: vec![tensor.clone()],
            outputs: vec![tensor],
        };
        let deployment = std::sync::Arc::new(Deployment::start_remote(spec, metadata).unwrap());
        let replica = super::super::ReplicaSpec {
            deployment: "m".into(),
            version: "1".into(),
            model: sluice_config::Model::Onnx("/job/m.onnx".into()),
            settings,
            fetch: None,
        };
        let replicas = cluster.replicas(replica, deployment.clone(), 1);
        let mut lines = BufReader::new(driver_in).lines();
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line.unwrap().unwrap()).unwrap();
        assert_eq!(v["op"], "create", "a replica created");
        (replicas, deployment, v["name"].as_str().unwrap().to_string(), lines)
    }

    /// A version whose replicas keep failing to start (a model that crashes on load), none up,
    /// is not waited for further after three in a row: it held the controller for the whole
    /// start timeout (half an hour where `replica_start_timeout_s` was raised for a big model).
    #[tokio::test]
    async fn a_version_whose_replicas_keep_failing_is_not_waited_for() {
        let (cluster, driver_in, _kept) = with_proxies();
        let (replicas, _, first, mut lines) = one_replica(&cluster, driver_in).await;
        let settling = {
            let r = replicas.clone();
            tokio::spawn(async move { r.settled(1, Duration::from_secs(600)).await })
        };
        let fail = |name: String| Event::Failed {
            name,
            node_ip: None,
            message: "process exited before LISTEN (code 1)".into(),
            log_tail: "error: model.onnx: invalid protobuf".into(),
        };
        cluster.handle(fail(first));
        for _ in 0..2 {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line.unwrap().unwrap()).unwrap();
            assert_eq!(v["op"], "create", "replaced after its backoff");
            cluster.handle(fail(v["name"].as_str().unwrap().to_string()));
        }
        let settled = tokio::time::timeout(Duration::from_secs(5), settling).await;
        assert!(!settled.expect("given up, not waited for the start timeout").unwrap());
        let (failures, why) = replicas.failing().unwrap();
        assert_eq!(failures, 3);
        assert!(why.contains("invalid protobuf"), "{why}");
    }

    /// Replicas lost together (a node that died with several of them) are one round, not three
    /// failed starts: the version is not given up (it was, and a repository version rejected).
    #[tokio::test]
    async fn replicas_lost_together_are_one_failed_round() {
        let (cluster, driver_in, _kept) = with_proxies();
        let (replicas, _, first, mut lines) = one_replica(&cluster, driver_in).await;
        replicas.scale_to(3);
        let mut names = vec![first];
        while names.len() < 3 {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line.unwrap().unwrap()).unwrap();
            assert_eq!(v["op"], "create");
            names.push(v["name"].as_str().unwrap().to_string());
        }
        for name in names {
            cluster.handle(Event::Died {
                name,
                node_ip: Some("10.0.0.2".into()),
                message: "node lost".into(),
            });
        }
        assert!(replicas.failing().is_none(), "one node lost is one round");
        assert!(!replicas.settled(1, Duration::from_millis(300)).await, "still waited for");
    }

    /// A replica Ray has placed whose worker is still starting (`starting`) is starting, not
    /// waiting for a node: a deploy waits for it. Only `infeasible` and `resources` are
    /// waiting for a node (a deploy may go on without it), and a replica placed since is
    /// starting again.
    #[tokio::test]
    async fn a_replica_whose_worker_is_starting_does_not_wait_for_a_node() {
        let (cluster, driver_in, _kept) = with_proxies();
        let (replicas, _, name, _lines) = one_replica(&cluster, driver_in).await;
        let pending =
            |kind: &str| Event::Pending { name: name.clone(), kind: kind.into(), reason: "r".into() };
        let settles = || replicas.settled(0, Duration::from_millis(100));
        assert!(!settles().await, "starting");
        cluster.handle(pending("starting"));
        assert!(!settles().await, "its worker starts: still starting, not waiting for a node");
        cluster.handle(pending("resources"));
        assert!(settles().await, "waiting for a node: a deploy goes on without it");
        cluster.handle(pending("starting"));
        assert!(!settles().await, "placed since: starting again");
    }

    /// A proxy that keeps failing is started again after a backoff (0.5 s, then doubling), not
    /// at every control round; one that comes up resets it.
    #[tokio::test]
    async fn a_failing_proxy_is_started_again_after_a_backoff() {
        let (cluster, driver_in, _kept) = with_proxies();
        *lock(&cluster.head) = ("head".into(), "10.0.0.1".into());
        let worker = Node { node_id: "w".into(), node_ip: "10.0.0.2".into(), alive: true, is_head: false };
        lock(&cluster.nodes).insert("w".into(), worker);
        lock(&cluster.replica_nodes).insert("sluice:m:1:r-0".into(), "w".into());
        let mut lines = BufReader::new(driver_in).lines();
        // The proxies killed, in order (a refused create is killed: it may have left a process).
        let killed = std::cell::RefCell::new(Vec::new());
        let mut next_create = async || loop {
            let line = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&line.unwrap().unwrap()).unwrap();
            let name = v["name"].as_str().unwrap().to_string();
            if v["op"] == "kill" {
                killed.borrow_mut().push(name);
                continue;
            }
            assert_eq!(v["op"], "create");
            return Some(name);
        };
        let fail = |name: &str| Event::Failed {
            name: name.into(),
            node_ip: None,
            message: "process exited before LISTEN (code 1)".into(),
            log_tail: "error: cannot listen on 10.0.0.2:8000: Address already in use (os error 98)".into(),
        };

        // A create the driver refused (an `error`, not a `failed`) waits out the backoff too.
        cluster.reconcile_proxies();
        let refused = next_create().await.expect("a proxy for the worker node");
        cluster.handle(Event::Error {
            op: Some("create".into()),
            name: Some(refused.clone()),
            message: "GCS unavailable".into(),
        });
        cluster.reconcile_proxies();
        assert_eq!(next_create().await, None, "not again at once after a refusal");
        assert_eq!(*killed.borrow(), [refused]);
        lock(&cluster.proxy_retry).clear();
        cluster.reconcile_proxies();
        let first = next_create().await.expect("a proxy for the worker node");
        cluster.handle(fail(&first));
        // Why, with the node, in the events status shows.
        let notes = cluster.take_notes();
        assert!(
            notes
                .iter()
                .any(|(d, m)| d == PROXIES && m.contains("10.0.0.2") && m.contains("Address already in use")),
            "{notes:?}"
        );
        cluster.reconcile_proxies();
        assert_eq!(next_create().await, None, "not again within the backoff");
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.reconcile_proxies();
        let second = next_create().await.expect("again after 0.5 s");
        assert_ne!(second, first);
        cluster.handle(fail(&second));
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.reconcile_proxies();
        assert_eq!(next_create().await, None, "the second wait is 1 s");
        tokio::time::sleep(Duration::from_millis(600)).await;
        cluster.reconcile_proxies();
        let third = next_create().await.expect("again after 1 s");
        cluster.handle(Event::Ready {
            name: third,
            node_id: "w".into(),
            node_ip: "10.0.0.2".into(),
            pid: 7,
            addr: "10.0.0.2:8000".into(),
        });
        assert!(lock(&cluster.proxy_retry).is_empty(), "a proxy that comes up resets the backoff");
        // A proxy that comes up under a name no longer wanted is stopped.
        cluster.handle(Event::Ready {
            name: format!("{PROXY_PREFIX}stray-9"),
            node_id: "w".into(),
            node_ip: "10.0.0.2".into(),
            pid: 8,
            addr: "10.0.0.2:8000".into(),
        });
        let line = tokio::time::timeout(Duration::from_millis(200), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["name"].as_str()),
            (Some("kill"), Some(format!("{PROXY_PREFIX}stray-9").as_str()))
        );
    }

    /// A process told to stop has its drain and a margin before it is killed; a proxy its
    /// `shutdown_delay_s` too (it is still serving in that delay).
    #[tokio::test]
    async fn a_stopped_process_has_its_drain_and_a_proxy_its_delay_too() {
        let mut proxies = proxy_options();
        proxies.settings.shutdown_delay_s = 10.0;
        let (cluster, _driver_in, _kept) = cluster_with(Duration::from_secs(30), proxies);
        assert_eq!(cluster.kill_grace("sluice:m:1:r-0"), Duration::from_secs(35));
        assert_eq!(cluster.kill_grace(&format!("{PROXY_PREFIX}w-1")), Duration::from_secs(45));
    }

    /// A retired version takes no count but 0: a rescale that raced a promote cannot bring
    /// back the actors its stop killed.
    #[test]
    fn a_retired_version_stays_at_zero() {
        let mut st = State::new(2);
        st.aim(3);
        assert_eq!(st.target, 3);
        st.retired = true;
        st.aim(0);
        st.aim(4);
        assert_eq!(st.target, 0);
    }

    /// A replica's runtime gets the CPUs it reserves, rounded up, never fewer than one.
    #[test]
    fn replica_argv_sizes_the_runtime_by_the_reserved_cpus() {
        let options = |release_startup_memory| RayOptions {
            binary: "sluice".into(),
            working_dir: "/job".into(),
            grace: Duration::from_secs_f64(2.5),
            startup_timeout: Duration::from_secs(10),
            proxies: None,
            release_startup_memory,
            max_body_bytes: 1 << 27,
        };
        let threads = |cpus: f64| {
            let argv = replica_argv("sluice".into(), "{}", cpus, &options(true));
            assert_eq!(argv[..5], ["sluice", "replica", "--listen", "{node_ip}:0", "--worker-threads"]);
            assert_eq!(
                argv[6..],
                ["--max-body-bytes", "134217728", "--graceful-shutdown-timeout", "2.5", "--spec={}"]
            );
            argv[5].clone()
        };
        assert_eq!(threads(1.0), "1");
        assert_eq!(threads(0.5), "1");
        assert_eq!(threads(0.0), "1");
        assert_eq!(threads(2.5), "3");
        assert_eq!(threads(8.0), "8");
        assert_eq!(threads(1e9), "1024");
        assert_eq!(threads(f64::NAN), "1");
        // `release_startup_memory: false` in the config.
        let kept = replica_argv("sluice".into(), "{}", 1.0, &options(false));
        assert_eq!(kept[kept.len() - 2..], ["--keep-startup-memory", "--spec={}"]);
    }

    /// A proxy's command line carries the ports, gRPC's absence, `worker_threads` when set,
    /// `release_startup_memory` when false, and the frontends' limits, shutdown, logs and traces
    /// (a proxy served with the defaults whatever the config said).
    #[test]
    fn proxy_argv_carries_the_settings() {
        let mut options = proxy_options();
        options.settings.max_body_bytes = 1000;
        options.settings.log_format = sluice_config::LogFormat::Json;
        let argv = options.argv("sluice".into(), "10.0.0.1");
        assert_eq!(
            argv[..9],
            [
                "sluice",
                "proxy",
                "--controller",
                "http://10.0.0.1:8266",
                "--host",
                "{node_ip}",
                "--http-port",
                "8000",
                "--no-grpc"
            ]
        );
        assert_eq!(argv[9], "--settings");
        let settings: sluice_config::ProxySettings = serde_json::from_str(&argv[10]).unwrap();
        assert_eq!(settings, options.settings);
        assert_eq!(argv.len(), 11);
        options.grpc_port = Some(8001);
        options.worker_threads = Some(3);
        options.release_startup_memory = false;
        let argv = options.argv("sluice".into(), "10.0.0.1");
        assert_eq!(argv[8..13], ["--grpc-port", "8001", "--worker-threads", "3", "--keep-startup-memory"]);
        // A head on IPv6: its address in brackets.
        let argv = options.argv("sluice".into(), "fd00::1");
        assert_eq!(argv[3], "http://[fd00::1]:8266");
    }
}
