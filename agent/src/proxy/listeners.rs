//! The four listeners the proxy keeps inside a pod's network namespace
//! (tunnel 15008, inbound plaintext 15006, outbound on 127.0.0.1 and ::1)
//! and the tasks serving them, the same in node and sidecar mode.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ambit_common::{INBOUND_CAPTURE_PORT, TUNNEL_PORT};
use anyhow::{Context, Result};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    inbound_plain::{self, PlaintextContext},
    inbound_tunnel::{self, TunnelContext},
    interception::Interception,
    outbound::{self, OutboundContext},
};
use crate::{netns::Netns, pod::PodContext, proxy_runtime::ProxyRuntime};

pub struct PodListeners {
    tunnel: TcpListener,
    plaintext: TcpListener,
    outbound: Vec<TcpListener>,
}

impl PodListeners {
    /// Binds all four in `netns`, marked with `mark` like every socket of
    /// the proxy. Nothing is accepted until [`serve`](Self::serve).
    pub fn open(netns: &Netns, mark: u32, outbound_port: u16) -> Result<Self> {
        let listen = |addr: SocketAddr| -> Result<TcpListener> {
            TcpListener::from_std(netns.listen(addr, mark)?).context("registering listener")
        };
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        Ok(Self {
            tunnel: listen(SocketAddr::new(any, TUNNEL_PORT))?,
            plaintext: listen(SocketAddr::new(any, INBOUND_CAPTURE_PORT))?,
            outbound: [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]
            .into_iter()
            .map(|ip| listen(SocketAddr::new(ip, outbound_port)))
            .collect::<Result<_>>()?,
        })
    }

    /// The inbound plaintext listener (sk_lookup steers to its socket).
    pub fn plaintext(&self) -> &TcpListener {
        &self.plaintext
    }

    /// Serves `pod` on every listener until the returned tasks are aborted.
    pub fn serve(
        self,
        pod: &Arc<PodContext>,
        runtime: &ProxyRuntime,
        interception: &Interception,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(inbound_tunnel::serve(
                self.tunnel,
                Arc::new(TunnelContext {
                    pod: Arc::clone(pod),
                    gate: Arc::clone(&runtime.gate),
                    bundles: Arc::clone(&runtime.mesh.bundles),
                    tunnel: *runtime.mesh.pool.config(),
                }),
            )),
            tokio::spawn(inbound_plain::serve(
                self.plaintext,
                Arc::new(PlaintextContext {
                    pod: Arc::clone(pod),
                    gate: Arc::clone(&runtime.gate),
                    interception: interception.clone(),
                }),
            )),
        ];
        let outbound_ctx = Arc::new(OutboundContext {
            pod: Arc::clone(pod),
            interception: interception.clone(),
            mesh: Arc::clone(&runtime.mesh),
            audit: Arc::clone(&runtime.gate.audit),
        });
        for listener in self.outbound {
            tasks.push(tokio::spawn(outbound::serve(
                listener,
                Arc::clone(&outbound_ctx),
            )));
        }
        tasks
    }
}
