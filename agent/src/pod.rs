//! One enrolled pod as the proxy serves it: where it lives (its network
//! namespace), what it currently is (spec, identity, SVID: read afresh for
//! every connection and stream, never cached from when a listener opened),
//! and the signal that it was released, which ends every connection the
//! agent holds for it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{
    capture::Capture,
    identity::SpiffeId,
    netns::Netns,
    proxy::{limits::PodLimits, loop_guard::AgentPorts},
    svids::SvidWatch,
    transparent::{self, TRANSPARENT_MARK},
    workloads::Workload,
};

/// What a pod is at one moment. Replaced whole when its spec changes.
pub struct PodState {
    pub spec: Arc<Workload>,
    pub identity: SpiffeId,
    pub svid: SvidWatch,
}

/// How the agent opens connections for every pod (from `ambit run`).
#[derive(Clone, Copy, Debug)]
pub struct DialSettings {
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub agent_ports: AgentPorts,
    /// Inbound relays come from the client's own address (the pod's netns
    /// was set up by [`transparent::prepare`]).
    pub transparent_source: bool,
}

pub struct PodContext {
    /// `namespace/name`, for logs.
    pub id: String,
    pub netns: Arc<Netns>,
    pub dial: DialSettings,
    /// The pod's own connection budget, shared by its listeners.
    pub limits: PodLimits,
    state: watch::Receiver<Arc<PodState>>,
    released: CancellationToken,
}

/// The control loop's handle on a pod's context: it publishes new states
/// and releases the pod.
pub struct PodHandle {
    state: watch::Sender<Arc<PodState>>,
    released: CancellationToken,
}

impl PodContext {
    pub fn new(
        id: String,
        netns: Arc<Netns>,
        state: PodState,
        dial: DialSettings,
        limits: PodLimits,
    ) -> (Arc<Self>, PodHandle) {
        let (tx, rx) = watch::channel(Arc::new(state));
        let released = CancellationToken::new();
        let ctx = Arc::new(Self {
            id,
            netns,
            dial,
            limits,
            state: rx,
            released: released.clone(),
        });
        (
            ctx,
            PodHandle {
                state: tx,
                released,
            },
        )
    }

    /// The pod as it is now.
    pub fn state(&self) -> Arc<PodState> {
        Arc::clone(&self.state.borrow())
    }

    /// Follows the pod's state, for re-checking running connections.
    pub fn watch_state(&self) -> watch::Receiver<Arc<PodState>> {
        self.state.clone()
    }

    /// Connects to `dst` from inside the pod's network namespace, as the
    /// agent (so capture lets it through), within the connect timeout.
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let settings = self.dial;
        crate::proxy::dial::dial(
            &self.netns,
            dst,
            settings.socket_mark,
            settings.connect_timeout,
        )
        .await
    }

    /// Connects to `dst` on behalf of `peer`: from the peer's own address
    /// if transparent relays are on and `capture` can let exactly this
    /// connection past the pod's inbound capture (so the application sees
    /// who connected), else as [`connect`](Self::connect).
    pub async fn connect_from(
        &self,
        peer: IpAddr,
        dst: SocketAddr,
        capture: Option<&Capture>,
    ) -> std::io::Result<TcpStream> {
        let settings = self.dial;
        let source = transparent::source_for(peer, dst.ip());
        let (Some(src), Some(capture), true) = (source, capture, settings.transparent_source)
        else {
            return self.connect(dst).await;
        };
        let connect = async {
            let socket = self.netns.transparent_socket(src, dst, TRANSPARENT_MARK)?;
            let _pass = capture.pass_relay(socket.local_addr()?, dst)?;
            Ok(socket.connect(dst).await?)
        };
        crate::proxy::dial::within(settings.connect_timeout, dst, connect).await
    }

    pub fn is_released(&self) -> bool {
        self.released.is_cancelled()
    }

    /// Resolves once the pod is released (unenrolled, or replaced by a new
    /// capture of another namespace).
    pub fn released(&self) -> WaitForCancellationFutureOwned {
        self.released.clone().cancelled_owned()
    }
}

impl PodHandle {
    /// Publishes the pod's new state; connections see it from now on.
    pub fn update(&self, state: PodState) {
        self.state.send_replace(Arc::new(state));
    }

    pub fn current(&self) -> Arc<PodState> {
        Arc::clone(&self.state.borrow())
    }

    /// Ends every connection of the pod.
    pub fn release(&self) {
        self.released.cancel();
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        self.released.cancel();
    }
}
