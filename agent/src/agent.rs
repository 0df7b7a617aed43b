//! The node agent's control loop: keep the set of captured pods equal to
//! the set of enrolled workloads on this node.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{signal::unix::SignalKind, sync::watch, task::JoinHandle};

use crate::{
    capture::Capture,
    cni::{Cni, records::RecordedNetnsLocator},
    config::{RunConfig, WorkloadSource},
    identity::SpiffeId,
    metrics::{KubernetesMetrics, Metrics},
    netns::Netns,
    pod::PodHandle,
    proxy::{interception::Interception, listeners::PodListeners},
    proxy_runtime::{InitialView, ProxyRuntime, workload_identity},
    workloads::{
        self, NodeWorkloads, Workload, WorkloadFeed,
        kubernetes::netns_locator::{NetnsLocator, ProcNetnsLocator},
    },
};

/// How often pods that failed to enroll (e.g. their netns was not there yet)
/// are retried even if the workload set does not change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A pod whose traffic is being captured. Dropping it undoes whatever of
/// its capture was set up (a half-done capture leaves nothing attached),
/// unless `keep_capture` is set, as at shutdown (fail closed until the
/// next agent).
struct CapturedPod {
    spec: Workload,
    netns: Arc<Netns>,
    handle: PodHandle,
    /// Local addresses registered for inbound capture.
    addresses: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
    capture: Arc<Capture>,
    inbound_attached: bool,
    enrolled: bool,
    keep_capture: bool,
}

impl Drop for CapturedPod {
    fn drop(&mut self) {
        self.handle.release();
        for task in &self.tasks {
            task.abort();
        }
        if self.keep_capture {
            return;
        }
        let cookie = self.netns.cookie();
        // Outbound capture first, so no new connection meets a closed listener.
        if self.enrolled
            && let Err(e) = self.capture.unenroll(cookie)
        {
            tracing::error!(netns_cookie = cookie, error = %format!("{e:#}"), "cannot unenroll workload");
        }
        if self.inbound_attached
            && let Err(e) = self.capture.release_inbound(cookie)
        {
            tracing::error!(netns_cookie = cookie, error = %format!("{e:#}"), "cannot release inbound capture");
        }
    }
}

pub struct Agent {
    config: RunConfig,
    capture: Arc<Capture>,
    runtime: ProxyRuntime,
    pods: BTreeMap<String, CapturedPod>,
}

/// The addresses inbound capture must cover: every address in the pod's
/// namespace, and the ones the workload source reports (so a reported
/// address is steered even before it is configured).
fn pod_addresses(netns: &Netns, workload: &Workload) -> Result<Vec<IpAddr>> {
    let mut addresses = netns.local_addresses()?;
    for ip in &workload.ips {
        if !addresses.contains(ip) {
            addresses.push(*ip);
        }
    }
    addresses.sort();
    Ok(addresses)
}

/// The CNI records and server, in Kubernetes mode with a CNI socket.
fn open_cni(config: &RunConfig) -> Result<Option<Cni>> {
    match &config.workloads {
        WorkloadSource::Kubernetes(kubernetes) => {
            kubernetes.cni.as_ref().map(Cni::open).transpose()
        }
        WorkloadSource::File(_) => Ok(None),
    }
}

/// The configured workload source, started; `watch_metrics` are given
/// for the Kubernetes source.
async fn workload_feed(
    config: &RunConfig,
    watch_metrics: Option<&KubernetesMetrics>,
    cni: Option<&Cni>,
) -> Result<WorkloadFeed> {
    Ok(match (&config.workloads, watch_metrics) {
        (WorkloadSource::Kubernetes(kubernetes), Some(watch_metrics)) => {
            let locator: Arc<dyn NetnsLocator> = match cni {
                Some(cni) => Arc::new(RecordedNetnsLocator::new(
                    cni.pods(),
                    ProcNetnsLocator::default(),
                )),
                None => Arc::new(ProcNetnsLocator::default()),
            };
            workloads::kubernetes::watch(kubernetes, watch_metrics, locator, cni.map(Cni::pods))
                .await?
        }
        (WorkloadSource::Kubernetes(_), None) => {
            anyhow::bail!("the Kubernetes workload source needs its metrics")
        }
        (WorkloadSource::File(path), _) => WorkloadFeed {
            workloads: workloads::file::watch(path, config.reload_interval)?,
            synced: watch::channel(true).1,
            services: watch::channel(Arc::default()).1,
        },
    })
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: RunConfig) -> Result<()> {
    // Missing privileges first (they also explain unreadable files), then a
    // bad workloads file or identity setup, all before the kernel is touched.
    crate::preflight::check_capabilities()?;
    let metrics = Arc::new(Metrics::new());
    let watch_metrics = match &config.workloads {
        WorkloadSource::Kubernetes(_) => Some(
            KubernetesMetrics::register(metrics.registry())
                .context("registering the Kubernetes metrics")?,
        ),
        WorkloadSource::File(_) => None,
    };
    let cni = open_cni(&config)?;
    let WorkloadFeed {
        mut workloads,
        mut synced,
        services,
    } = workload_feed(&config, watch_metrics.as_ref(), cni.as_ref()).await?;
    // Before the first sync of Kubernetes this has only the node name.
    let initial = workloads.borrow_and_update().clone();
    let runtime = ProxyRuntime::start(
        &config,
        metrics,
        InitialView {
            workloads: &initial,
            services,
            synced: synced.clone(),
            watch_metrics: watch_metrics.as_ref(),
        },
        None,
    )
    .await?;

    let capture = Arc::new(Capture::start(&config.capture)?);
    // Once capture runs: an ADD now waits for the sync and the control loop.
    if let Some(cni) = &cni {
        cni.serve(workloads.clone(), Arc::clone(&runtime.state))
            .await?;
    }
    let mut agent = Agent {
        config,
        capture,
        runtime,
        pods: BTreeMap::new(),
    };
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    // Enrollments a previous agent left are only judged against a complete
    // view; until then /readyz says what is awaited.
    if !*synced.borrow() {
        tracing::info!("waiting for the initial Kubernetes sync");
        tokio::select! {
            done = synced.wait_for(|synced| *synced) => {
                done.context("the workload source stopped before its first sync")?;
            }
            _ = terminate.recv() => return agent.shutdown(),
            _ = interrupt.recv() => return agent.shutdown(),
        }
    }
    let current = workloads.borrow_and_update().clone();
    agent.reconcile(&current);
    agent.forget_stale_enrollments();
    tracing::info!(enrolled = agent.pods.len(), "agent ready");

    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    loop {
        tokio::select! {
            changed = workloads.changed() => {
                if changed.is_err() { break; }
                let current = workloads.borrow_and_update().clone();
                agent.reconcile(&current);
            }
            _ = resync.tick() => {
                let current = workloads.borrow().clone();
                agent.reconcile(&current);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    agent.shutdown()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The control loop replaces entries whole: consistent after a panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Agent {
    fn reconcile(&mut self, desired: &NodeWorkloads) {
        self.runtime.publish_directory(desired);
        let wanted: BTreeMap<String, &Workload> = desired.enrolled().map(|w| (w.id(), w)).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(pod) = self.pods.remove(&id) {
                lock(&self.runtime.state.enrolled).remove(&id);
                drop(pod);
                tracing::info!(workload = %id, "workload unenrolled");
            }
        }
        let mut failed = BTreeMap::new();
        for (id, workload) in wanted {
            if let Err(e) = self.converge(&id, workload) {
                tracing::error!(workload = %id, error = %format!("{e:#}"),
                    "cannot capture workload; will retry");
                failed.insert(id, format!("{e:#}"));
            }
        }
        *lock(&self.runtime.state.not_captured) = failed;
        let in_use: HashSet<SpiffeId> = lock(&self.runtime.state.enrolled)
            .values()
            .map(|(_, id)| id.clone())
            .collect();
        self.runtime.mesh.svids.retain(&in_use);
    }

    /// Brings one wanted pod to its desired state: captured as `workload`
    /// says, with every local address of its namespace steered.
    fn converge(&mut self, id: &str, workload: &Workload) -> Result<()> {
        let spiffe_id = workload_identity(&self.runtime.mesh.trust_domain, workload)?;
        let same_netns = self
            .pods
            .get(id)
            .is_some_and(|pod| pod.spec.netns == workload.netns);
        if !same_netns {
            // A new namespace (a new pod, or the pod recreated): capture it
            // completely before the old capture, if any, goes.
            let pod = self.capture_pod(workload, &spiffe_id)?;
            tracing::info!(workload = %id, netns = %workload.netns.display(),
                netns_cookie = pod.netns.cookie(), addresses = ?pod.addresses, "workload enrolled");
            if let Some(old) = self.pods.insert(id.to_owned(), pod) {
                drop(old);
                tracing::info!(workload = %id, "previous capture of the workload released");
            }
            lock(&self.runtime.state.enrolled).insert(id.to_owned(), (workload.clone(), spiffe_id));
            return Ok(());
        }
        let pod = self.pods.get_mut(id).expect("checked above");
        // The same namespace: update in place, so the pod is never
        // uncaptured, not even for a moment.
        let addresses = pod_addresses(&pod.netns, workload)?;
        if pod.spec != *workload || pod.addresses != addresses {
            self.capture
                .update_inbound(pod.netns.cookie(), &addresses, workload.permissive())?;
            self.capture
                .set_probes(pod.netns.cookie(), &workload.probes)?;
            let identity_changed = pod.handle.current().identity != spiffe_id;
            pod.handle
                .update(self.runtime.pod_state(workload, &spiffe_id));
            if pod.spec != *workload {
                tracing::info!(workload = %id, identity_changed, "workload updated in place");
            }
            if pod.addresses != addresses {
                tracing::info!(workload = %id, addresses = ?addresses, "workload addresses updated");
            }
            pod.spec = workload.clone();
            pod.addresses = addresses;
            lock(&self.runtime.state.enrolled).insert(id.to_owned(), (workload.clone(), spiffe_id));
        }
        Ok(())
    }

    /// Opens the pod's listeners first, then steers inbound connections to
    /// them, and enrolls outbound capture last, so a captured connection
    /// always finds a listener. If a step fails, the returned error drops
    /// what was built, which undoes it. The pod's SVID is fetched in the
    /// background; until it arrives its connections are refused, never
    /// sent in clear.
    fn capture_pod(&self, workload: &Workload, spiffe_id: &SpiffeId) -> Result<CapturedPod> {
        anyhow::ensure!(
            !workload.netns.as_os_str().is_empty(),
            "the pod's network namespace is not found yet"
        );
        let netns = Arc::new(Netns::open(&workload.netns)?);
        let addresses = pod_addresses(&netns, workload)?;
        // One budget per pod, shared by its listeners (and replaced with
        // the pod's capture, like them).
        let (ctx, handle) = self
            .runtime
            .pod_context(workload, spiffe_id, Arc::clone(&netns));
        let mut pod = CapturedPod {
            spec: workload.clone(),
            netns: Arc::clone(&netns),
            handle,
            addresses,
            tasks: Vec::new(),
            capture: Arc::clone(&self.capture),
            inbound_attached: false,
            enrolled: false,
            keep_capture: false,
        };
        let listeners = PodListeners::open(
            &netns,
            self.runtime.dial.socket_mark,
            self.config.capture.outbound_port,
        )?;
        pod.inbound_attached = true;
        self.capture.capture_inbound(
            &workload.netns,
            netns.cookie(),
            &pod.addresses,
            workload.permissive(),
            listeners.plaintext(),
        )?;
        self.capture.set_probes(netns.cookie(), &workload.probes)?;
        pod.tasks = listeners.serve(
            &ctx,
            &self.runtime,
            &Interception::Ebpf(Arc::clone(&self.capture)),
        );
        pod.enrolled = true;
        self.capture.enroll(netns.cookie())?;
        Ok(pod)
    }

    /// Namespaces a previous agent enrolled that are no longer wanted.
    fn forget_stale_enrollments(&self) {
        let live: HashSet<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
        for cookie in self.capture.enrolled_cookies() {
            if !live.contains(&cookie) {
                tracing::info!(netns_cookie = cookie, "removing stale enrollment");
                let _ = self.capture.unenroll(cookie);
            }
        }
        self.capture.forget_stale_inbound(&live);
    }

    fn shutdown(mut self) -> Result<()> {
        if !self.config.cleanup_on_exit {
            // Enrolled pods keep being redirected to listeners that are about
            // to close: they fail closed until the next agent takes over.
            for pod in self.pods.values_mut() {
                pod.keep_capture = true;
            }
            tracing::info!("agent stopping; capture stays pinned (fail closed)");
            return Ok(());
        }
        for (id, pod) in std::mem::take(&mut self.pods) {
            drop(pod);
            tracing::info!(workload = %id, "workload unenrolled");
        }
        let capture = Arc::try_unwrap(self.capture)
            .map_err(|_| anyhow::anyhow!("capture still in use at shutdown"))?;
        capture.remove_pins()
    }
}
