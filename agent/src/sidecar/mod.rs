//! Sidecar mode: the node agent's proxy as one process per pod, inside the
//! pod's network namespace, holding that pod's SVID only. Traffic reaches
//! it through nftables REDIRECT rules ([`rules`], installed by
//! `ambit sidecar-init`) instead of eBPF; everything after the accept
//! (HBONE, policy, audit, limits, admin) is the node agent's code.
//!
//! Fail closed: the rules outlive the sidecar, so while it is down the
//! application's connections meet closed ports and are refused, never sent
//! in clear.

pub mod init;
pub mod rules;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::{signal::unix::SignalKind, sync::watch};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    agent_state::lock,
    config::{RunConfig, WorkloadSource},
    identity::SpiffeId,
    metrics::Metrics,
    netns::Netns,
    pod::PodHandle,
    proxy::{interception::Interception, listeners::PodListeners},
    proxy_runtime::{InitialView, ProxyRuntime, workload_identity},
    workloads::{self, NodeWorkloads, Workload},
};

/// Settings of `ambit sidecar`.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// The proxy's settings, as `ambit run` takes them; the workloads must
    /// come from a file.
    pub run: RunConfig,
    /// `NAMESPACE/NAME` of the one workload served.
    pub workload: String,
    /// The node the pod runs on (whose bootstrap credential the SVID is
    /// requested with); `None`: the workloads file's `node`.
    pub node_name: Option<String>,
}

/// Runs the sidecar until SIGTERM or SIGINT.
pub async fn run(config: SidecarConfig) -> Result<()> {
    check_can_mark(config.run.capture.socket_mark)?;
    let WorkloadSource::File(path) = &config.run.workloads else {
        bail!("a sidecar reads its workloads from a file (--workloads)");
    };
    let mut feed = workloads::file::watch(path, config.run.reload_interval)?;
    let initial = with_node(feed.borrow_and_update().clone(), &config);
    let own = find_own(&initial, &config.workload)
        .with_context(|| format!("in workloads file {}", path.display()))?
        .clone();

    let mark = config.run.capture.socket_mark;
    let runtime = ProxyRuntime::start(
        &config.run,
        Arc::new(Metrics::new()),
        InitialView {
            workloads: &initial,
            services: watch::channel(Arc::default()).1,
            synced: watch::channel(true).1,
            watch_metrics: None,
        },
        (mark != 0).then_some(mark),
    )
    .await?;
    runtime.publish_directory(&initial);
    let mut served = Served::start(&runtime, own)?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;

    // Ready means serving: listeners open and the SVID in hand, so a first
    // connection is carried rather than refused.
    let mut svid = runtime.mesh.svids.watch(&served.identity);
    tokio::select! {
        got = svid.wait_for(Option::is_some) => {
            got.context("the SVID store stopped")?;
        }
        _ = terminate.recv() => return Ok(()),
        _ = interrupt.recv() => return Ok(()),
    }
    tracing::info!(workload = %config.workload, spiffe_id = %served.identity, "sidecar ready");

    loop {
        tokio::select! {
            changed = feed.changed() => {
                if changed.is_err() { break; }
                let current = with_node(feed.borrow_and_update().clone(), &config);
                runtime.publish_directory(&current);
                match find_own(&current, &config.workload) {
                    Ok(own) => served.update(&runtime, own)?,
                    Err(e) => tracing::error!(error = %format!("{e:#}"),
                        "keeping the workload's last good definition"),
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("sidecar stopping; the redirect rules stay (fail closed)");
    Ok(())
}

/// The served pod: its listeners' tasks and the handle publishing its state.
struct Served {
    spec: Workload,
    identity: SpiffeId,
    handle: PodHandle,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Served {
    fn start(runtime: &ProxyRuntime, spec: Workload) -> Result<Self> {
        let identity = workload_identity(&runtime.mesh.trust_domain, &spec)?;
        let netns = Arc::new(Netns::current()?);
        let listeners = PodListeners::open(
            &netns,
            runtime.dial.socket_mark,
            runtime.dial.agent_ports.outbound,
        )?;
        let (ctx, handle) = runtime.pod_context(&spec, &identity, netns);
        let tasks = listeners.serve(&ctx, runtime, &Interception::Redirect);
        lock(&runtime.state.enrolled).insert(spec.id(), (spec.clone(), identity.clone()));
        tracing::info!(workload = %spec.id(), %identity, "sidecar listening");
        Ok(Self {
            spec,
            identity,
            handle,
            _tasks: tasks.into_iter().map(AbortOnDropHandle::new).collect(),
        })
    }

    /// Applies a changed definition (labels, addresses, service account)
    /// to the next connections and streams.
    fn update(&mut self, runtime: &ProxyRuntime, spec: &Workload) -> Result<()> {
        if *spec == self.spec {
            return Ok(());
        }
        let identity = workload_identity(&runtime.mesh.trust_domain, spec)?;
        self.handle.update(runtime.pod_state(spec, &identity));
        if identity != self.identity {
            runtime
                .mesh
                .svids
                .retain(&std::iter::once(identity.clone()).collect());
        }
        lock(&runtime.state.enrolled).insert(spec.id(), (spec.clone(), identity.clone()));
        tracing::info!(workload = %spec.id(), %identity, "workload updated in place");
        self.spec = spec.clone();
        self.identity = identity;
        Ok(())
    }
}

/// The file's view with the node name the sidecar was given, if any.
fn with_node(mut view: NodeWorkloads, config: &SidecarConfig) -> NodeWorkloads {
    if let Some(node) = &config.node_name {
        view.node.clone_from(node);
    }
    view
}

/// The sidecar's own workload, which must be listed, in the mesh, on this
/// node and marked as served by a sidecar (or the node agent would
/// capture it too).
fn find_own<'a>(view: &'a NodeWorkloads, id: &str) -> Result<&'a Workload> {
    let Some(own) = view.workloads.iter().find(|w| w.id() == id) else {
        bail!(
            "workload {id} is not listed. fix: add it (with `sidecar: true`) or correct --workload"
        );
    };
    if !own.sidecar {
        bail!(
            "workload {id} is not marked `sidecar: true`, so the node agent would capture it too. \
             fix: add `sidecar: true` to its entry"
        );
    }
    if !view.in_mesh().any(|w| w.id() == id) {
        bail!(
            "workload {id} is not enrolled in the mesh (label ambit.dev/mesh). fix: label it \
             `ambit.dev/mesh: enabled` or its namespace"
        );
    }
    if let Some(node) = own.node.as_deref().filter(|n| *n != view.node) {
        bail!(
            "workload {id} runs on node {node}, not {}. fix: pass --node-name {node}",
            view.node
        );
    }
    Ok(own)
}

/// The sidecar marks its sockets, which needs CAP_NET_ADMIN; with mark 0
/// (exemption by uid) it needs no capability at all.
fn check_can_mark(mark: u32) -> Result<()> {
    if mark == 0 {
        return Ok(());
    }
    let effective = crate::preflight::effective_capabilities()?;
    if effective & (1u64 << crate::preflight::CAP_NET_ADMIN) == 0 {
        bail!(
            "missing CAP_NET_ADMIN: the sidecar marks its own sockets (--socket-mark {mark:#x}) \
             so its nftables rules let them out unredirected.\n\
             fix: grant NET_ADMIN to the sidecar container, or run it as a user of its own \
             exempted with `ambit sidecar-init --proxy-uid UID` and pass --socket-mark 0"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::file::parse;

    const FILE: &str = r#"
node: n1
workloads:
  - {name: side, namespace: default, serviceAccount: side, netns: /x, node: n1, sidecar: true,
     labels: {ambit.dev/mesh: enabled}}
  - {name: plain, namespace: default, serviceAccount: plain, netns: /y, node: n1,
     labels: {ambit.dev/mesh: enabled}}
  - {name: away, namespace: default, serviceAccount: away, netns: /z, node: n2, sidecar: true,
     labels: {ambit.dev/mesh: enabled}}
  - {name: out, namespace: default, serviceAccount: out, netns: /w, node: n1, sidecar: true}
"#;

    #[test]
    fn serves_only_a_listed_enrolled_sidecar_workload_of_its_node() {
        let view = parse(FILE).unwrap();
        assert_eq!(find_own(&view, "default/side").unwrap().name, "side");
        for (id, why) in [
            ("default/missing", "is not listed"),
            ("default/plain", "sidecar: true"),
            ("default/away", "--node-name n2"),
            ("default/out", "not enrolled"),
        ] {
            let err = find_own(&view, id).unwrap_err().to_string();
            assert!(err.contains(why), "{id}: {err}");
        }
    }

    #[test]
    fn the_node_agent_leaves_sidecar_workloads_alone_but_tunnels_to_them() {
        let view = parse(FILE).unwrap();
        let captured: Vec<_> = view.enrolled().map(Workload::id).collect();
        assert_eq!(captured, ["default/plain"]);
        let destinations: Vec<_> = view.in_mesh().map(Workload::id).collect();
        assert!(destinations.contains(&"default/side".to_owned()));
    }
}
