//! The node agent's control loop: keep the set of captured pods equal to
//! the set of enrolled workloads on this node.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ambit_common::{INBOUND_CAPTURE_PORT, TUNNEL_PORT};
use anyhow::{Context, Result};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch, task::JoinHandle};

use crate::{
    admin::AdminServer,
    admin_state::AgentState,
    audit::AuditLog,
    ca_service::{BUNDLE_FILE, CaClient, NODE_CHAIN_FILE, NODE_KEY_FILE, NODES_DIR},
    capture::Capture,
    config::{IdentityConfig, RunConfig},
    gate::Gate,
    identity::{CertificateAuthority, SpiffeId, TrustDomain},
    mesh::Mesh,
    metrics::Metrics,
    netns::Netns,
    policy::{self, Engine, PolicySet},
    proxy::{
        inbound_plain::{self, PlaintextContext},
        inbound_tunnel::{self, TunnelContext},
        outbound::{self, OutboundContext},
    },
    svids::{IdentitySource, SvidStore},
    tunnel::TunnelPool,
    workloads::{self, NodeWorkloads, Workload, directory::Directory},
};

/// How often pods that failed to enroll (e.g. their netns was not there yet)
/// are retried even if the workload set does not change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A pod whose traffic is being captured.
struct CapturedPod {
    spec: Workload,
    netns: Arc<Netns>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for CapturedPod {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
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
}

fn identity_source(config: &RunConfig, node: &str, td: &TrustDomain) -> Result<IdentitySource> {
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
                *addr,
                node_dir.join(NODE_CHAIN_FILE),
                node_dir.join(NODE_KEY_FILE),
                bootstrap_dir.join(BUNDLE_FILE),
            )?;
            anyhow::ensure!(
                client.trust_domain() == td,
                "the CA's trust domain is {}, but this agent was started with --trust-domain {td}",
                client.trust_domain()
            );
            IdentitySource::Remote(client)
        }
    })
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: RunConfig) -> Result<()> {
    // Missing privileges first (they also explain unreadable files), then a
    // bad workloads file or identity setup, all before the kernel is touched.
    crate::preflight::check_capabilities()?;
    let mut workloads = workloads::file::watch(&config.workloads_file, config.reload_interval)?;
    let initial = workloads.borrow_and_update().clone();
    let trust_domain = TrustDomain::new(&config.trust_domain)
        .with_context(|| format!("invalid --trust-domain {:?}", config.trust_domain))?;
    let pool = TunnelPool::new();
    let on_rotate = {
        let pool = pool.clone();
        // New connections must handshake with the new certificate; pooled
        // tunnels are forgotten, not closed, so running streams continue.
        Arc::new(move |_: &SpiffeId| pool.evict_all())
    };
    let svids = SvidStore::new(
        identity_source(&config, &initial.node, &trust_domain)?,
        on_rotate,
    )?;
    let (directory, directory_rx) =
        watch::channel(Arc::new(Directory::build(&initial, &trust_domain)));
    let metrics = Arc::new(Metrics::new());
    let mesh = Arc::new(Mesh {
        bundles: svids.bundles(),
        svids: Arc::new(svids),
        trust_domain,
        directory: directory_rx,
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
    let state = Arc::new(AgentState::new(
        metrics,
        Arc::clone(&mesh.svids),
        policies,
        engine,
        rejections,
        audit,
        initial.node.clone(),
    ));
    let admin = AdminServer::bind(config.admin_addr, Arc::clone(&state) as _).await?;
    tracing::info!(addr = %admin.local_addr(), "admin server listening");
    tokio::spawn(admin.run());

    let capture = Arc::new(Capture::start(&config.capture)?);
    let mut agent = Agent {
        config,
        capture,
        mesh,
        gate,
        state,
        directory,
        pods: BTreeMap::new(),
    };
    agent.reconcile(&initial);
    agent.forget_stale_enrollments();
    tracing::info!(enrolled = agent.pods.len(), "agent ready");

    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
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

impl Agent {
    fn reconcile(&mut self, desired: &NodeWorkloads) {
        self.directory.send_if_modified(|current| {
            let next = Directory::build(desired, &self.mesh.trust_domain);
            let changed = **current != next;
            *current = Arc::new(next);
            changed
        });
        let wanted: BTreeMap<String, &Workload> = desired.enrolled().map(|w| (w.id(), w)).collect();
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(id, pod)| wanted.get(*id) != Some(&&pod.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(pod) = self.pods.remove(&id) {
                self.release(&id, pod);
            }
        }
        for (id, workload) in wanted {
            if self.pods.contains_key(&id) {
                continue;
            }
            match self.capture_pod(workload) {
                Ok((pod, spiffe_id)) => {
                    tracing::info!(workload = %id, netns = %workload.netns.display(),
                        netns_cookie = pod.netns.cookie(), "workload enrolled");
                    self.state
                        .enrolled
                        .lock()
                        .expect("enrolled lock")
                        .insert(id.clone(), (workload.clone(), spiffe_id));
                    self.pods.insert(id, pod);
                }
                Err(e) => tracing::error!(workload = %id, error = %format!("{e:#}"),
                    "cannot enroll workload; will retry"),
            }
        }
    }

    /// Opens the pod's listeners first, then steers inbound connections to
    /// them, and enrolls outbound capture last, so a captured connection
    /// always finds a listener. The pod's SVID is fetched in the background;
    /// until it arrives its connections are refused, never sent in clear.
    fn capture_pod(&self, workload: &Workload) -> Result<(CapturedPod, SpiffeId)> {
        let spiffe_id = SpiffeId::kubernetes(
            &self.mesh.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .context("the workload's namespace and service account do not form a SPIFFE ID")?;
        let netns = Arc::new(Netns::open(&workload.netns)?);
        let svid = self.mesh.svids.watch(&spiffe_id);
        let mark = self.config.capture.socket_mark;
        let connect_timeout = self.config.connect_timeout;
        let listen = |addr: SocketAddr| -> Result<TcpListener> {
            TcpListener::from_std(netns.listen(addr, mark)?).context("registering listener")
        };
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let mut tasks = Vec::new();

        let spec = Arc::new(workload.clone());
        let tunnel_ctx = Arc::new(TunnelContext {
            workload: workload.id(),
            spec: Arc::clone(&spec),
            identity: spiffe_id.clone(),
            gate: Arc::clone(&self.gate),
            ips: workload.ips.clone(),
            svid: svid.clone(),
            bundles: Arc::clone(&self.mesh.bundles),
            netns: Arc::clone(&netns),
            socket_mark: mark,
            connect_timeout,
        });
        let tunnel_listener = listen(SocketAddr::new(any, TUNNEL_PORT))?;
        tasks.push(tokio::spawn(inbound_tunnel::serve(
            tunnel_listener,
            tunnel_ctx,
        )));

        let plaintext_ctx = Arc::new(PlaintextContext {
            workload: workload.id(),
            spec,
            identity: spiffe_id.clone(),
            gate: Arc::clone(&self.gate),
            netns: Arc::clone(&netns),
            socket_mark: mark,
            connect_timeout,
            permissive: workload.permissive(),
        });
        let plaintext_listener = listen(SocketAddr::new(any, INBOUND_CAPTURE_PORT))?;
        self.capture.capture_inbound(
            &workload.netns,
            netns.cookie(),
            &workload.ips,
            &plaintext_listener,
        )?;
        tasks.push(tokio::spawn(inbound_plain::serve(
            plaintext_listener,
            plaintext_ctx,
        )));

        let outbound_ctx = Arc::new(OutboundContext {
            workload: workload.id(),
            identity: spiffe_id.clone(),
            svid,
            netns: Arc::clone(&netns),
            capture: Arc::clone(&self.capture),
            mesh: Arc::clone(&self.mesh),
            socket_mark: mark,
            connect_timeout,
        });
        let port = self.config.capture.outbound_port;
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let listener = listen(SocketAddr::new(ip, port))?;
            tasks.push(tokio::spawn(outbound::serve(
                listener,
                Arc::clone(&outbound_ctx),
            )));
        }
        let pod = CapturedPod {
            spec: workload.clone(),
            netns,
            tasks,
        };
        self.capture.enroll(pod.netns.cookie())?;
        Ok((pod, spiffe_id))
    }

    /// Unenrolls first, then closes the listeners; established connections
    /// run to completion.
    fn release(&self, id: &str, pod: CapturedPod) {
        self.state
            .enrolled
            .lock()
            .expect("enrolled lock")
            .remove(id);
        let cookie = pod.netns.cookie();
        if let Err(e) = self.capture.unenroll(cookie) {
            tracing::error!(workload = %id, error = %format!("{e:#}"), "cannot unenroll workload");
        }
        if let Err(e) = self.capture.release_inbound(cookie, &pod.spec.ips) {
            tracing::error!(workload = %id, error = %format!("{e:#}"), "cannot release inbound capture");
        }
        tracing::info!(workload = %id, netns_cookie = cookie, "workload unenrolled");
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
        let live_ips: Vec<IpAddr> = self
            .pods
            .values()
            .flat_map(|p| p.spec.ips.iter().copied())
            .collect();
        self.capture.forget_stale_inbound(&live, &live_ips);
    }

    fn shutdown(mut self) -> Result<()> {
        if !self.config.cleanup_on_exit {
            // Enrolled pods keep being redirected to listeners that are about
            // to close: they fail closed until the next agent takes over.
            tracing::info!("agent stopping; capture stays pinned (fail closed)");
            return Ok(());
        }
        for (id, pod) in std::mem::take(&mut self.pods) {
            self.release(&id, pod);
        }
        let capture = Arc::try_unwrap(self.capture)
            .map_err(|_| anyhow::anyhow!("capture still in use at shutdown"))?;
        capture.remove_pins()
    }
}
