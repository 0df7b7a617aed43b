//! The agent's end of the CNI socket: the plugin's ADD is answered
//! `captured` only once the control loop has captured the pod in the netns
//! the runtime made (listeners, inbound steering, outbound redirection) and
//! its SVID is ready, so that no container of an enrolled pod starts
//! uncaptured; DEL releases; CHECK reports.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ambit_cni_protocol::{AgentRequest, AgentResponse, Command, Status};
use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
    time::Instant,
};
use tokio_util::codec::Framed;

use super::records::{PodNetwork, RecordStore, valid_uid};
use crate::{agent_state::AgentState, workloads::NodeWorkloads};

/// The answer deadline when the plugin names none (it waits 30 s by default).
const DEFAULT_BUDGET: Duration = Duration::from_secs(25);
/// Never wait longer than this, whatever the plugin says.
const MAX_BUDGET: Duration = Duration::from_secs(120);
/// How long a client may take to send its request line.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often ADD looks whether the control loop has captured the pod.
const CAPTURE_POLL: Duration = Duration::from_millis(5);

pub struct CniServer {
    records: Arc<RecordStore>,
    workloads: watch::Receiver<NodeWorkloads>,
    state: Arc<AgentState>,
}

/// Binds the socket: its directory is created 0700 if missing, the socket
/// is 0600 (root only: whoever may speak here may start pods uncaptured).
/// A socket left by a dead agent is replaced; a live one is an error.
pub async fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        anyhow::ensure!(
            UnixStream::connect(socket).await.is_err(),
            "another process (an ambit agent still running?) serves the CNI socket {}: stop it \
             or give this agent another --cni-socket",
            socket.display()
        );
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale CNI socket {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the CNI socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", socket.display()))?;
    Ok(listener)
}

impl CniServer {
    pub fn new(
        records: Arc<RecordStore>,
        workloads: watch::Receiver<NodeWorkloads>,
        state: Arc<AgentState>,
    ) -> Self {
        Self {
            records,
            workloads,
            state,
        }
    }

    /// Serves the plugin's requests, each on its own task.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, path: PathBuf) {
        tracing::info!(socket = %path.display(), "CNI server listening");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(Arc::clone(&self).connection(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let mut lines = Framed::new(stream, ambit_cni_protocol::codec());
        let response = match tokio::time::timeout(REQUEST_READ_TIMEOUT, lines.next()).await {
            Ok(Some(Ok(line))) => match serde_json::from_str::<AgentRequest>(&line) {
                Ok(request) => self.handle(request).await,
                Err(e) => error(format!("not a CNI request: {e}")),
            },
            Ok(Some(Err(e))) => error(format!("reading the request: {e}")),
            Ok(None) | Err(_) => return,
        };
        let Ok(line) = serde_json::to_string(&response) else {
            return;
        };
        if let Err(e) = lines.send(line).await {
            tracing::warn!(error = %e, "the CNI plugin left before the answer");
        }
    }

    pub async fn handle(&self, request: AgentRequest) -> AgentResponse {
        let started = std::time::Instant::now();
        let id = format!("{}/{}", request.namespace, request.pod);
        let deadline = Instant::now() + budget(request.timeout_ms);
        let command = request.command;
        let response = match command {
            Command::Add => self.add(request, deadline).await,
            Command::Del => self.del(&request, deadline).await,
            Command::Check => self.check(&request),
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if response.status == Status::Error {
            tracing::warn!(pod = %id, ?command, message = %response.message,
                elapsed_ms, "CNI request failed");
        } else {
            tracing::info!(pod = %id, ?command, status = ?response.status,
                elapsed_ms, "CNI request done");
        }
        response
    }

    async fn add(&self, request: AgentRequest, deadline: Instant) -> AgentResponse {
        let record = match record_of(&request) {
            Ok(record) => record,
            Err(message) => return error(message),
        };
        let id = format!("{}/{}", record.namespace, record.name);
        if let Err(e) = self.records.add(record.clone()) {
            return error(format!("{e:#}"));
        }
        // The pod as the agent's view has it once its API object is known
        // (the watch may lag the kubelet) and merged with this record.
        let mut workloads = self.workloads.clone();
        let seen = tokio::time::timeout_at(deadline, async {
            let view = workloads
                .wait_for(|view| view_of(view, &record).is_some())
                .await?;
            Ok::<_, watch::error::RecvError>(view_of(&view, &record).unwrap_or(false))
        })
        .await;
        let enrolled = match seen {
            Ok(Ok(enrolled)) => enrolled,
            Ok(Err(_)) => return error("the agent's workload source stopped".into()),
            Err(_) => {
                return error(format!(
                    "pod {id} (uid {}) is not among this node's pods in the agent's view of the \
                     API server yet (is the agent's --node-name this node's name, and is the API \
                     server reachable?)",
                    record.uid
                ));
            }
        };
        if !enrolled {
            return response(Status::NotEnrolled, "");
        }
        let mut poll = tokio::time::interval(CAPTURE_POLL);
        loop {
            if self.captured(&id, &record.netns) {
                return response(Status::Captured, "");
            }
            if Instant::now() >= deadline {
                let why = crate::agent_state::lock(&self.state.not_captured)
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "capture or its SVID is not ready yet".into());
                return error(format!("pod {id} is not captured in time: {why}"));
            }
            poll.tick().await;
        }
    }

    /// Whether the control loop captured pod `id` in `netns` and its SVID is
    /// there (until then its connections would be refused, not tunnelled).
    fn captured(&self, id: &str, netns: &Path) -> bool {
        let enrolled = crate::agent_state::lock(&self.state.enrolled);
        enrolled.get(id).is_some_and(|(workload, identity)| {
            workload.netns == netns && self.state.svids.has(identity)
        })
    }

    async fn del(&self, request: &AgentRequest, deadline: Instant) -> AgentResponse {
        let removed = match self.records.remove(&request.uid) {
            Ok(removed) => removed,
            Err(e) => return error(format!("{e:#}")),
        };
        // Answer once the control loop let go of the pod, but DEL must
        // succeed: past a short wait it completes in the background.
        if let Some(record) = removed {
            let id = format!("{}/{}", record.namespace, record.name);
            let until = deadline.min(Instant::now() + Duration::from_secs(5));
            let mut poll = tokio::time::interval(CAPTURE_POLL);
            while Instant::now() < until && self.captured_in(&id, &record.netns) {
                poll.tick().await;
            }
        }
        response(Status::Released, "")
    }

    fn captured_in(&self, id: &str, netns: &Path) -> bool {
        crate::agent_state::lock(&self.state.enrolled)
            .get(id)
            .is_some_and(|(workload, _)| workload.netns == netns)
    }

    /// `error` only for a pod of the mesh that is not captured: CHECK must
    /// not fail pods outside it, nor pods the agent cannot judge.
    fn check(&self, request: &AgentRequest) -> AgentResponse {
        let id = format!("{}/{}", request.namespace, request.pod);
        let view = self.workloads.borrow();
        let is_it = |w: &&crate::workloads::Workload| {
            w.namespace == request.namespace && w.name == request.pod
        };
        let Some(enrolled) = view.enrolled().find(is_it) else {
            return response(Status::Ok, "not enrolled, or not known to the agent");
        };
        let netns = self
            .records
            .get(&request.uid)
            .map_or_else(|| enrolled.netns.clone(), |record| record.netns);
        if self.captured(&id, &netns) {
            response(Status::Ok, "captured")
        } else {
            error(format!("pod {id} is enrolled but not captured"))
        }
    }
}

/// `Some(enrolled)` once the agent's view has the pod with `record`'s netns
/// (the uid matched, or the source would not have merged the record).
fn view_of(view: &NodeWorkloads, record: &PodNetwork) -> Option<bool> {
    let is_it = |w: &crate::workloads::Workload| {
        w.namespace == record.namespace && w.name == record.name && w.netns == record.netns
    };
    let local = view
        .workloads
        .iter()
        .filter(|w| w.node.as_deref().is_none_or(|n| n == view.node));
    if !local.into_iter().any(is_it) {
        return None;
    }
    Some(view.enrolled().any(is_it))
}

fn record_of(request: &AgentRequest) -> Result<PodNetwork, String> {
    if !valid_uid(&request.uid) {
        return Err(format!(
            "pod {}/{}: K8S_POD_UID {:?} is missing or not a uid (the runtime must pass it in \
             CNI_ARGS)",
            request.namespace, request.pod, request.uid
        ));
    }
    if request.namespace.is_empty() || request.pod.is_empty() {
        return Err("the request names no pod".into());
    }
    let netns = PathBuf::from(&request.netns);
    if !netns.is_absolute() || !netns.exists() {
        return Err(format!(
            "the pod's netns {:?} does not exist",
            request.netns
        ));
    }
    let ips = request
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|e| format!("pod address {ip:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PodNetwork {
        uid: request.uid.clone(),
        namespace: request.namespace.clone(),
        name: request.pod.clone(),
        netns,
        ips,
        container_id: request.container_id.clone(),
    })
}

/// The time to answer in: a little less than the plugin waits, so that it
/// gets the agent's reason rather than a timeout.
fn budget(timeout_ms: u64) -> Duration {
    if timeout_ms == 0 {
        return DEFAULT_BUDGET;
    }
    let timeout = Duration::from_millis(timeout_ms);
    let margin = (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(3));
    timeout.saturating_sub(margin).min(MAX_BUDGET)
}

fn response(status: Status, message: &str) -> AgentResponse {
    AgentResponse {
        status,
        message: message.into(),
    }
}

fn error(message: String) -> AgentResponse {
    AgentResponse {
        status: Status::Error,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::{Labels, MESH_LABEL, Namespace, Workload};

    #[test]
    fn the_answer_comes_before_the_plugin_gives_up() {
        assert_eq!(budget(0), DEFAULT_BUDGET);
        assert_eq!(budget(30_000), Duration::from_secs(27));
        assert_eq!(budget(1_000), Duration::from_millis(800));
        assert_eq!(budget(100), Duration::ZERO);
        assert_eq!(budget(10_000_000), MAX_BUDGET);
    }

    fn request(uid: &str, netns: &str, ips: &[&str]) -> AgentRequest {
        AgentRequest {
            command: Command::Add,
            container_id: "c".into(),
            netns: netns.into(),
            namespace: "ns".into(),
            pod: "p".into(),
            uid: uid.into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 0,
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let cases = [
            (request("", "/proc/self/ns/net", &[]), "K8S_POD_UID"),
            (request("../etc", "/proc/self/ns/net", &[]), "not a uid"),
            (request("u", "/nonexistent/ns", &[]), "does not exist"),
            (request("u", "relative", &[]), "does not exist"),
            (request("u", "/proc/self/ns/net", &["nope"]), "\"nope\""),
        ];
        for (request, want) in cases {
            let err = record_of(&request).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let ok = record_of(&request("u-1", "/proc/self/ns/net", &["198.18.240.3"])).unwrap();
        assert_eq!(ok.ips, ["198.18.240.3".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn the_view_says_whether_the_recorded_pod_is_known_and_enrolled() {
        let record = record_of(&request("u", "/proc/self/ns/net", &[])).unwrap();
        let workload = |netns: &str, node: &str| Workload {
            name: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            labels: Labels::new(),
            netns: netns.into(),
            ips: vec![],
            node: Some(node.into()),
            probes: Default::default(),
            sidecar: false,
        };
        let mut view = NodeWorkloads {
            node: "n0".into(),
            namespaces: vec![],
            workloads: vec![workload("/proc/1/ns/net", "n0")],
        };
        assert_eq!(view_of(&view, &record), None, "another sandbox of the pod");
        view.workloads = vec![workload("/proc/self/ns/net", "n1")];
        assert_eq!(view_of(&view, &record), None, "another node's pod");
        view.workloads = vec![workload("/proc/self/ns/net", "n0")];
        assert_eq!(view_of(&view, &record), Some(false));
        view.namespaces = vec![Namespace {
            name: "ns".into(),
            labels: [(MESH_LABEL.to_string(), "enabled".to_string())].into(),
        }];
        assert_eq!(view_of(&view, &record), Some(true));
    }
}
