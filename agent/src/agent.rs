//! The node agent's control loop: keep the set of captured pods equal to
//! the set of enrolled workloads on this node.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use ambit_common::{INBOUND_CAPTURE_PORT, TUNNEL_PORT};
use anyhow::{Context, Result};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch, task::JoinHandle};

use crate::{
    admin::AdminServer,
    agent_state::AgentState,
    audit::AuditLog,
    ca_service::{BUNDLE_FILE, CaClient, NODE_CHAIN_FILE, NODE_KEY_FILE, NODES_DIR},
    capture::Capture,
    cni::{Cni, records::RecordedNetnsLocator},
    config::{IdentityConfig, RunConfig, WorkloadSource},
    gate::Gate,
    identity::{CertificateAuthority, SpiffeId, TrustDomain},
    mesh::Mesh,
    metrics::{KubernetesMetrics, Metrics, TunnelMetrics},
    netns::Netns,
    pod::{DialSettings, PodContext, PodHandle, PodState},
    policy::{self, Engine, PolicySet},
    proxy::{
        inbound_plain::{self, PlaintextContext},
        inbound_tunnel::{self, TunnelContext},
        limits::Limits,
        loop_guard::AgentPorts,
        outbound::{self, OutboundContext},
    },
    svids::{IdentitySource, SvidStore},
    tunnel::TunnelPool,
    workloads::{
        self, NodeWorkloads, Workload, WorkloadFeed,
        directory::Directory,
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
    mesh: Arc<Mesh>,
    gate: Arc<Gate>,
    state: Arc<AgentState>,
    directory: watch::Sender<Arc<Directory>>,
    pods: BTreeMap<String, CapturedPod>,
    limits: Arc<Limits>,
}

async fn identity_source(
    config: &RunConfig,
    node: &str,
    td: &TrustDomain,
) -> Result<IdentitySource> {
    Ok(match &config.identity {
        IdentityConfig::Embedded { svid_ttl } => IdentitySource::Embedded {
            ca: Box::new(CertificateAuthority::new(td.clone())?),
            ttl: *svid_ttl,
        },
        IdentityConfig::Remote {
            addr,
            bootstrap_dir,
        } => {
            let node_dir = bootstrap_dir.join(NODES_DIR).join(node);
            let client = CaClient::new(
                addr,
                node_dir.join(NODE_CHAIN_FILE),
                node_dir.join(NODE_KEY_FILE),
                bootstrap_dir.join(BUNDLE_FILE),
            )?;
            anyhow::ensure!(
                client.trust_domain() == td,
                "the CA's trust domain is {}, but this agent was started with --trust-domain {td}",
                client.trust_domain()
            );
            IdentitySource::Remote(Box::new(client))
        }
        IdentityConfig::Attested(ca) => {
            let kubeconfig = match &config.workloads {
                WorkloadSource::Kubernetes(kubernetes) => kubernetes.kubeconfig.as_deref(),
                WorkloadSource::File(_) => None,
            };
            IdentitySource::Remote(Box::new(
                crate::ca_service::kubernetes::agent_client(ca, kubeconfig, node, td).await?,
            ))
        }
    })
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

/// With the Kubernetes source, AuthorizationPolicy objects of the cluster
/// join the policy files' set (policy::kubernetes); otherwise `files` is
/// the set.
async fn cluster_policies(
    config: &RunConfig,
    files: watch::Receiver<Arc<PolicySet>>,
    watch_metrics: Option<&KubernetesMetrics>,
    rejections: &policy::Rejections,
) -> Result<watch::Receiver<Arc<PolicySet>>> {
    let (WorkloadSource::Kubernetes(kubernetes), Some(watch_metrics)) =
        (&config.workloads, watch_metrics)
    else {
        return Ok(files);
    };
    let client = workloads::kubernetes::client_for(kubernetes.kubeconfig.as_deref()).await?;
    let health = workloads::kubernetes::Health::new(
        "authorizationpolicies",
        watch_metrics.watch("authorizationpolicies"),
    );
    Ok(policy::kubernetes::watch(
        client,
        config.policy.dir.is_some().then_some(files),
        config.policy.settings.clone(),
        health,
        rejections.clone(),
    ))
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
    let trust_domain = TrustDomain::new(&config.trust_domain)
        .with_context(|| format!("invalid --trust-domain {:?}", config.trust_domain))?;
    let tunnel_metrics =
        TunnelMetrics::register(metrics.registry()).context("registering the tunnel metrics")?;
    let pool = TunnelPool::with_observer(config.tunnel, Arc::new(tunnel_metrics));
    let on_rotate = {
        let pool = pool.clone();
        // New connections must handshake with the new certificate; pooled
        // tunnels are forgotten, not closed, so running streams continue.
        Arc::new(move |_: &SpiffeId| pool.evict_all())
    };
    let svids = SvidStore::new(
        identity_source(&config, &initial.node, &trust_domain).await?,
        on_rotate,
    )?;
    let (directory, directory_rx) =
        watch::channel(Arc::new(Directory::build(&initial, &trust_domain)));
    let mesh = Arc::new(Mesh {
        bundles: svids.bundles(),
        svids: Arc::new(svids),
        trust_domain,
        directory: directory_rx,
        services,
        pool,
        metrics: Arc::clone(&metrics),
    });

    // A bad policy directory at start does not stop the agent: it denies
    // everything (not ready) until a valid set appears.
    let (policies, rejections, _static_policies) = match &config.policy.dir {
        Some(dir) => {
            let watched =
                policy::watch_dir(dir, config.policy.settings.clone(), config.reload_interval);
            (watched.sets, watched.rejections, None)
        }
        None => {
            let empty = PolicySet::new(Vec::new(), config.policy.settings.clone())
                .context("building the empty policy set")?;
            let (tx, rx) = watch::channel(Arc::new(empty));
            (rx, policy::Rejections::default(), Some(tx))
        }
    };
    let policies = cluster_policies(&config, policies, watch_metrics.as_ref(), &rejections).await?;
    let engine = Arc::new(Engine::new(Arc::clone(&policies.borrow())));
    engine.follow(policies.clone());
    let audit = Arc::new(match &config.audit_log {
        Some(path) => AuditLog::open_file(
            path,
            config.audit_max_bytes,
            initial.node.clone(),
            config.audit_limits.clone(),
        )
        .with_context(|| format!("opening audit log {}", path.display()))?,
        None => AuditLog::stdout(initial.node.clone(), config.audit_limits.clone())?,
    });
    let gate = Arc::new(Gate {
        engine: Arc::clone(&engine),
        sets: policies.clone(),
        audit: Arc::clone(&audit),
        metrics: Arc::clone(&metrics),
        close_on_policy_change: config.policy.close_on_change,
    });
    let mut state = AgentState::new(
        metrics,
        Arc::clone(&mesh.svids),
        policies,
        engine,
        rejections,
        audit,
        initial.node.clone(),
    );
    state.workloads_synced = synced.clone();
    let state = Arc::new(state);
    let admin = AdminServer::bind(config.admin_addr, Arc::clone(&state) as _).await?;
    tracing::info!(addr = %admin.local_addr(), "admin server listening");
    tokio::spawn(admin.run());

    let capture = Arc::new(Capture::start(&config.capture)?);
    // Once capture runs: an ADD now waits for the sync and the control loop.
    if let Some(cni) = &cni {
        cni.serve(workloads.clone(), Arc::clone(&state)).await?;
    }
    tracing::info!(limits = ?config.limits, "admission limits");
    let limits = Limits::new(config.limits.clone(), Arc::clone(&mesh.metrics));
    let mut agent = Agent {
        config,
        capture,
        mesh,
        gate,
        state,
        directory,
        pods: BTreeMap::new(),
        limits,
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
        self.directory.send_if_modified(|current| {
            let next = Directory::build(desired, &self.mesh.trust_domain);
            self.state.metrics.set_mesh_destinations(next.len());
            let changed = **current != next;
            *current = Arc::new(next);
            changed
        });
        let wanted: BTreeMap<String, &Workload> = desired.enrolled().map(|w| (w.id(), w)).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(pod) = self.pods.remove(&id) {
                lock(&self.state.enrolled).remove(&id);
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
        *lock(&self.state.not_captured) = failed;
        let in_use: HashSet<SpiffeId> = lock(&self.state.enrolled)
            .values()
            .map(|(_, id)| id.clone())
            .collect();
        self.mesh.svids.retain(&in_use);
    }

    /// Brings one wanted pod to its desired state: captured as `workload`
    /// says, with every local address of its namespace steered.
    fn converge(&mut self, id: &str, workload: &Workload) -> Result<()> {
        let spiffe_id = SpiffeId::kubernetes(
            &self.mesh.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .context("the workload's namespace and service account do not form a SPIFFE ID")?;
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
            lock(&self.state.enrolled).insert(id.to_owned(), (workload.clone(), spiffe_id));
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
            pod.handle.update(PodState {
                spec: Arc::new(workload.clone()),
                svid: self.mesh.svids.watch(&spiffe_id),
                identity: spiffe_id.clone(),
            });
            if pod.spec != *workload {
                tracing::info!(workload = %id, identity_changed, "workload updated in place");
            }
            if pod.addresses != addresses {
                tracing::info!(workload = %id, addresses = ?addresses, "workload addresses updated");
            }
            pod.spec = workload.clone();
            pod.addresses = addresses;
            lock(&self.state.enrolled).insert(id.to_owned(), (workload.clone(), spiffe_id));
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
        let transparent_source = self.config.capture.transparent_source;
        if transparent_source {
            crate::transparent::prepare(&netns, addresses.iter().any(IpAddr::is_ipv6))
                .with_context(|| {
                    format!(
                        "setting up transparent relays in {} \
                         (or run the agent with --transparent-source=false)",
                        workload.netns.display()
                    )
                })?;
        }
        let dial = DialSettings {
            socket_mark: self.config.capture.socket_mark,
            connect_timeout: self.config.connect_timeout,
            agent_ports: AgentPorts {
                outbound: self.config.capture.outbound_port,
            },
            transparent_source,
        };
        let (ctx, handle) = PodContext::new(
            workload.id(),
            Arc::clone(&netns),
            PodState {
                spec: Arc::new(workload.clone()),
                identity: spiffe_id.clone(),
                svid: self.mesh.svids.watch(spiffe_id),
            },
            dial,
            // One budget per pod, shared by its listeners (and replaced
            // with the pod's capture, like them).
            self.limits.for_pod(),
        );
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
        let mark = dial.socket_mark;
        let listen = |addr: SocketAddr| -> Result<TcpListener> {
            TcpListener::from_std(netns.listen(addr, mark)?).context("registering listener")
        };
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

        let tunnel_listener = listen(SocketAddr::new(any, TUNNEL_PORT))?;
        pod.tasks.push(tokio::spawn(inbound_tunnel::serve(
            tunnel_listener,
            Arc::new(TunnelContext {
                pod: Arc::clone(&ctx),
                gate: Arc::clone(&self.gate),
                bundles: Arc::clone(&self.mesh.bundles),
                capture: Some(Arc::clone(&self.capture)),
                tunnel: *self.mesh.pool.config(),
            }),
        )));

        let plaintext_listener = listen(SocketAddr::new(any, INBOUND_CAPTURE_PORT))?;
        pod.inbound_attached = true;
        self.capture.capture_inbound(
            &workload.netns,
            netns.cookie(),
            &pod.addresses,
            workload.permissive(),
            &plaintext_listener,
        )?;
        self.capture.set_probes(netns.cookie(), &workload.probes)?;
        pod.tasks.push(tokio::spawn(inbound_plain::serve(
            plaintext_listener,
            Arc::new(PlaintextContext {
                pod: Arc::clone(&ctx),
                gate: Arc::clone(&self.gate),
                capture: Arc::clone(&self.capture),
            }),
        )));

        let outbound_ctx = Arc::new(OutboundContext {
            pod: Arc::clone(&ctx),
            capture: Arc::clone(&self.capture),
            mesh: Arc::clone(&self.mesh),
            audit: Arc::clone(&self.gate.audit),
        });
        let port = self.config.capture.outbound_port;
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let listener = listen(SocketAddr::new(ip, port))?;
            pod.tasks.push(tokio::spawn(outbound::serve(
                listener,
                Arc::clone(&outbound_ctx),
            )));
        }
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
