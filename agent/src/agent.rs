//! The node agent's control loop: keep the set of captured pods equal to
//! the set of enrolled workloads on this node.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{net::TcpListener, signal::unix::SignalKind, task::JoinHandle};

use crate::{
    capture::Capture,
    config::RunConfig,
    netns::Netns,
    proxy::outbound::{self, OutboundContext},
    workloads::{self, NodeWorkloads, Workload},
};

/// How often pods that failed to enroll (e.g. their netns was not there yet)
/// are retried even if the workload set does not change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A pod whose traffic is being captured.
struct CapturedPod {
    spec: Workload,
    netns: Arc<Netns>,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for CapturedPod {
    fn drop(&mut self) {
        for listener in &self.listeners {
            listener.abort();
        }
    }
}

pub struct Agent {
    config: RunConfig,
    capture: Arc<Capture>,
    pods: BTreeMap<String, CapturedPod>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: RunConfig) -> Result<()> {
    // Missing privileges first (they also explain unreadable files), then a
    // bad workloads file, both before the kernel is touched.
    crate::preflight::check_capabilities()?;
    let mut workloads = workloads::file::watch(&config.workloads_file, config.reload_interval)?;
    let capture = Arc::new(Capture::start(&config.capture)?);
    let mut agent = Agent {
        config,
        capture,
        pods: BTreeMap::new(),
    };
    let initial = workloads.borrow_and_update().clone();
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
                Ok(pod) => {
                    tracing::info!(workload = %id, netns = %workload.netns.display(),
                        netns_cookie = pod.netns.cookie(), "workload enrolled");
                    self.pods.insert(id, pod);
                }
                Err(e) => tracing::error!(workload = %id, error = %format!("{e:#}"),
                    "cannot enroll workload; will retry"),
            }
        }
    }

    /// Opens the pod's listeners first and enrolls it last, so a captured
    /// connection always finds a listener.
    fn capture_pod(&self, workload: &Workload) -> Result<CapturedPod> {
        let netns = Arc::new(Netns::open(&workload.netns)?);
        let ctx = Arc::new(OutboundContext {
            workload: workload.id(),
            netns: Arc::clone(&netns),
            capture: Arc::clone(&self.capture),
            socket_mark: self.config.capture.socket_mark,
            connect_timeout: self.config.connect_timeout,
        });
        let port = self.config.capture.outbound_port;
        let mut listeners = Vec::new();
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let listener =
                netns.listen(SocketAddr::new(ip, port), self.config.capture.socket_mark)?;
            let listener = TcpListener::from_std(listener).context("registering listener")?;
            listeners.push(tokio::spawn(outbound::serve(listener, Arc::clone(&ctx))));
        }
        let pod = CapturedPod {
            spec: workload.clone(),
            netns,
            listeners,
        };
        self.capture.enroll(pod.netns.cookie())?;
        Ok(pod)
    }

    /// Unenrolls first, then closes the listeners; established connections
    /// run to completion.
    fn release(&self, id: &str, pod: CapturedPod) {
        if let Err(e) = self.capture.unenroll(pod.netns.cookie()) {
            tracing::error!(workload = %id, error = %format!("{e:#}"), "cannot unenroll workload");
        }
        tracing::info!(workload = %id, netns_cookie = pod.netns.cookie(), "workload unenrolled");
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
