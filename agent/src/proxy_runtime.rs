//! What every proxy process runs besides its listeners, whatever its shape
//! (`ambit run` for a whole node, `ambit sidecar` for one pod): the mesh
//! view, the SVID store, the policy engine, the audit log, the gate, the
//! admission limits and the admin server. Built once here so both modes
//! decide, audit and report alike.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::{
    admin::AdminServer,
    agent_state::AgentState,
    audit::AuditLog,
    ca_service::{BUNDLE_FILE, CaClient, NODE_CHAIN_FILE, NODE_KEY_FILE, NODES_DIR},
    config::{IdentityConfig, RunConfig, WorkloadSource},
    gate::Gate,
    identity::{CertificateAuthority, SpiffeId, TrustDomain},
    mesh::Mesh,
    metrics::{KubernetesMetrics, Metrics, TunnelMetrics},
    netns::Netns,
    pod::{DialSettings, PodContext, PodHandle, PodState},
    policy::{self, Engine, PolicySet},
    proxy::{limits::Limits, loop_guard::AgentPorts},
    services::ServiceTable,
    svids::{IdentitySource, SvidStore},
    tunnel::TunnelPool,
    workloads::{self, NodeWorkloads, Workload, directory::Directory},
};

pub struct ProxyRuntime {
    pub mesh: Arc<Mesh>,
    pub gate: Arc<Gate>,
    pub state: Arc<AgentState>,
    /// Who is where in the mesh; republished as the workloads change.
    pub directory: watch::Sender<Arc<Directory>>,
    pub limits: Arc<Limits>,
    pub dial: DialSettings,
    /// Keeps the policy set of a run without policy files open (watchers
    /// of a closed channel would see it as gone).
    _static_policies: Option<watch::Sender<Arc<PolicySet>>>,
}

/// What the workload source reported at start.
pub struct InitialView<'a> {
    pub workloads: &'a NodeWorkloads,
    pub services: watch::Receiver<Arc<ServiceTable>>,
    pub synced: watch::Receiver<bool>,
    /// The Kubernetes source's watch metrics (`None` for a file).
    pub watch_metrics: Option<&'a KubernetesMetrics>,
}

impl ProxyRuntime {
    /// Builds everything and starts the admin server. `ca_socket_mark`:
    /// the mark the process's connections to the CA carry (a sidecar's
    /// nftables rules let only marked connections out unredirected).
    pub async fn start(
        config: &RunConfig,
        metrics: Arc<Metrics>,
        view: InitialView<'_>,
        ca_socket_mark: Option<u32>,
    ) -> Result<Self> {
        let initial = view.workloads;
        let trust_domain = TrustDomain::new(&config.trust_domain)
            .with_context(|| format!("invalid --trust-domain {:?}", config.trust_domain))?;
        let tunnel_metrics = TunnelMetrics::register(metrics.registry())
            .context("registering the tunnel metrics")?;
        let pool = TunnelPool::with_observer(config.tunnel, Arc::new(tunnel_metrics));
        let on_rotate = {
            let pool = pool.clone();
            // New connections must handshake with the new certificate; pooled
            // tunnels are forgotten, not closed, so running streams continue.
            Arc::new(move |_: &SpiffeId| pool.evict_all())
        };
        let source = identity_source(config, &initial.node, &trust_domain, ca_socket_mark).await?;
        let svids = SvidStore::new(source, on_rotate)?;
        let (directory, directory_rx) =
            watch::channel(Arc::new(Directory::build(initial, &trust_domain)));
        let mesh = Arc::new(Mesh {
            bundles: svids.bundles(),
            svids: Arc::new(svids),
            trust_domain,
            directory: directory_rx,
            services: view.services,
            pool,
            metrics: Arc::clone(&metrics),
        });

        // A bad policy directory at start does not stop the agent: it denies
        // everything (not ready) until a valid set appears.
        let (policies, rejections, static_policies) = match &config.policy.dir {
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
        let policies = cluster_policies(config, policies, view.watch_metrics, &rejections).await?;
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
        state.workloads_synced = view.synced;
        let state = Arc::new(state);
        let admin = AdminServer::bind(config.admin_addr, Arc::clone(&state) as _).await?;
        tracing::info!(addr = %admin.local_addr(), "admin server listening");
        tokio::spawn(admin.run());

        tracing::info!(limits = ?config.limits, "admission limits");
        let limits = Limits::new(config.limits.clone(), Arc::clone(&mesh.metrics));
        Ok(Self {
            mesh,
            gate,
            state,
            directory,
            limits,
            _static_policies: static_policies,
            dial: DialSettings {
                socket_mark: config.capture.socket_mark,
                connect_timeout: config.connect_timeout,
                agent_ports: AgentPorts {
                    outbound: config.capture.outbound_port,
                },
            },
        })
    }

    /// Republishes who is where, if that changed.
    pub fn publish_directory(&self, desired: &NodeWorkloads) {
        self.directory.send_if_modified(|current| {
            let next = Directory::build(desired, &self.mesh.trust_domain);
            self.state.metrics.set_mesh_destinations(next.len());
            let changed = **current != next;
            *current = Arc::new(next);
            changed
        });
    }

    /// The proxy's view of one pod in `netns`, with its own connection
    /// budget. The SVID is fetched in the background; until it arrives the
    /// pod's connections are refused, never sent in clear.
    pub fn pod_context(
        &self,
        workload: &Workload,
        identity: &SpiffeId,
        netns: Arc<Netns>,
    ) -> (Arc<PodContext>, PodHandle) {
        PodContext::new(
            workload.id(),
            netns,
            self.pod_state(workload, identity),
            self.dial,
            self.limits.for_pod(),
        )
    }

    /// What a pod is now, as its connections should see it.
    pub fn pod_state(&self, workload: &Workload, identity: &SpiffeId) -> PodState {
        PodState {
            spec: Arc::new(workload.clone()),
            identity: identity.clone(),
            svid: self.mesh.svids.watch(identity),
        }
    }
}

/// The SPIFFE ID of a workload, with an error naming why it has none.
pub fn workload_identity(trust_domain: &TrustDomain, workload: &Workload) -> Result<SpiffeId> {
    SpiffeId::kubernetes(trust_domain, &workload.namespace, &workload.service_account)
        .context("the workload's namespace and service account do not form a SPIFFE ID")
}

async fn identity_source(
    config: &RunConfig,
    node: &str,
    td: &TrustDomain,
    ca_socket_mark: Option<u32>,
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
            )?
            .with_socket_mark(ca_socket_mark);
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
