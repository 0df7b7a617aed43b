//! The eBPF side of capture: loading and pinning the programs and maps,
//! attaching them to the cgroup, enrolling namespaces, and answering "where
//! was this accepted connection really going?".

mod inbound;
mod log_pump;
mod orig_dst;
mod own_cgroup;
mod probes;
mod programs;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::{Mutex, PoisonError},
};

use ambit_common::{
    AF_INET, ClientKey, IpWords, MAP_ENROLLED, MAP_INBOUND_LISTENERS, MAP_NODE_CONNECTIONS,
    MAP_ORIG_DST, MAP_POD_ADDRS, MAP_PROBE_PORTS, MAP_RELAYS, OriginalDst, RelayConnection,
};
use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, SockHash};
use inbound::InboundCapture;
use orig_dst::OriginalDsts;
use probes::ProbeCapture;

pub use programs::LoadedPrograms;

use crate::{
    config::CaptureConfig,
    proxy::dial::unmapped as dial_unmapped,
    workloads::probes::{ProbeKind, Probes},
};

/// The agent's live handle on the capture programs.
pub struct Capture {
    enrolled: Mutex<HashMap<MapData, u64, u32>>,
    orig_dst: OriginalDsts,
    /// The inbound maps and the programs (whose sk_lookup program is
    /// attached per pod), behind one lock.
    inbound: Mutex<(LoadedPrograms, InboundCapture)>,
    probes: Mutex<ProbeCapture>,
    relays: Mutex<HashMap<MapData, RelayConnection, u32>>,
}

/// Lets one transparent relay past inbound capture until dropped.
pub struct RelayPass<'a> {
    relays: &'a Mutex<HashMap<MapData, RelayConnection, u32>>,
    key: RelayConnection,
}

impl Drop for RelayPass<'_> {
    fn drop(&mut self) {
        let _ = lock(self.relays).remove(&self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each map operation is a single syscall: nothing is left half-done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Capture {
    /// Loads the programs (reusing maps pinned by a previous agent), attaches
    /// them to the cgroup, and replaces any links a previous agent pinned.
    pub fn start(config: &CaptureConfig) -> Result<Self> {
        let mut programs = LoadedPrograms::load_and_attach(config)?;
        let ebpf = programs.ebpf_mut();
        let enrolled = HashMap::try_from(
            ebpf.take_map(MAP_ENROLLED)
                .context("eBPF object has no enrollment map")?,
        )?;
        let orig_dst = OriginalDsts::new(
            ebpf.take_map(MAP_ORIG_DST)
                .context("eBPF object has no original-destination map")?,
        )?;
        let probes = ProbeCapture::new(
            HashMap::try_from(
                ebpf.take_map(MAP_PROBE_PORTS)
                    .context("eBPF object has no probe port map")?,
            )?,
            HashMap::try_from(
                ebpf.take_map(MAP_NODE_CONNECTIONS)
                    .context("eBPF object has no node connection map")?,
            )?,
        );
        let relays = HashMap::try_from(
            ebpf.take_map(MAP_RELAYS)
                .context("eBPF object has no relay map")?,
        )?;
        let inbound = InboundCapture::new(
            HashMap::try_from(
                ebpf.take_map(MAP_POD_ADDRS)
                    .context("eBPF object has no pod address map")?,
            )?,
            SockHash::try_from(
                ebpf.take_map(MAP_INBOUND_LISTENERS)
                    .context("eBPF object has no inbound listener map")?,
            )?,
            programs.pin_dir().to_path_buf(),
        );
        Ok(Self {
            enrolled: Mutex::new(enrolled),
            orig_dst,
            inbound: Mutex::new((programs, inbound)),
            probes: Mutex::new(probes),
            relays: Mutex::new(relays),
        })
    }

    /// Steers inbound connections to the pod's local `addresses` (every one
    /// but loopback) to `listener`, its plaintext-capture listener, which
    /// must stay open until [`release_inbound`](Self::release_inbound).
    pub fn capture_inbound(
        &self,
        netns_path: &Path,
        netns_cookie: u64,
        addresses: &[IpAddr],
        permissive: bool,
        listener: &impl AsRawFd,
    ) -> Result<()> {
        let mut guard = self.lock_inbound();
        let (programs, inbound) = &mut *guard;
        inbound.attach(
            programs.inbound_program()?,
            netns_path,
            netns_cookie,
            addresses,
            permissive,
            listener.as_raw_fd(),
        )
    }

    /// Updates a captured pod's addresses and mode in place.
    pub fn update_inbound(
        &self,
        netns_cookie: u64,
        addresses: &[IpAddr],
        permissive: bool,
    ) -> Result<()> {
        self.lock_inbound()
            .1
            .update(netns_cookie, addresses, permissive)
    }

    /// Stops steering, then forgets the pod's probe ports.
    pub fn release_inbound(&self, netns_cookie: u64) -> Result<()> {
        self.lock_inbound().1.detach(netns_cookie)?;
        self.lock_probes().remove(netns_cookie);
        Ok(())
    }

    /// Lets the kubelet's probes of a captured pod through (see
    /// [`probes`]): exactly the ports `probes` names, from connections
    /// opened in the node's own network namespace.
    pub fn set_probes(&self, netns_cookie: u64, probes: &Probes) -> Result<()> {
        self.lock_probes().set(netns_cookie, probes.ports())
    }

    /// The probe kind if the connection from `peer` to `local` (an accepted
    /// inbound connection) was opened in the node's own network namespace
    /// to a probe port.
    pub fn opened_by_node(&self, peer: SocketAddr, local: SocketAddr) -> Option<ProbeKind> {
        self.lock_probes().opened_by_node(peer, local)
    }

    fn lock_probes(&self) -> std::sync::MutexGuard<'_, ProbeCapture> {
        // Each update leaves the map and its record of it consistent.
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_inbound(&self) -> std::sync::MutexGuard<'_, (LoadedPrograms, InboundCapture)> {
        // Every update leaves the maps consistent with the claims it
        // recorded, so a holder's panic leaves nothing half-done.
        self.inbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn enroll(&self, netns_cookie: u64) -> Result<()> {
        self.enrolled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(netns_cookie, 1, 0)
            .context("adding a namespace to the enrollment map")
    }

    pub fn unenroll(&self, netns_cookie: u64) -> Result<()> {
        match self
            .enrolled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&netns_cookie)
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing a namespace from the enrollment map"),
        }
    }

    /// Cookies currently in the (possibly inherited) enrollment map.
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        let map = self.enrolled.lock().unwrap_or_else(PoisonError::into_inner);
        map.keys().filter_map(Result::ok).collect()
    }

    /// Takes the original destination of a connection accepted on the
    /// outbound listener of the namespace `netns_cookie` from `client`.
    pub fn take_original_dst(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = client_key(netns_cookie, client);
        self.orig_dst.take(&key).map(|dst| socket_addr(&dst))
    }

    /// Lets the agent's transparent relay from `client` (bound, not yet
    /// connected) to `pod` (an address of an enrolled pod) past the pod's
    /// inbound capture until the returned pass is dropped: keep it until
    /// the connect has completed.
    pub fn pass_relay(&self, client: SocketAddr, pod: SocketAddr) -> Result<RelayPass<'_>> {
        let (client, pod) = (dial_unmapped(client), dial_unmapped(pod));
        let key = RelayConnection {
            client_addr: inbound::ip_words(client.ip()),
            pod_addr: inbound::ip_words(pod.ip()),
            client_port: client.port(),
            pod_port: pod.port(),
        };
        lock(&self.relays)
            .insert(key, 1, 0)
            .context("registering a transparent relay")?;
        Ok(RelayPass {
            relays: &self.relays,
            key,
        })
    }

    /// Removes inbound capture a previous agent left for pods that are gone.
    pub fn forget_stale_inbound(&self, live_cookies: &HashSet<u64>) {
        self.lock_inbound().1.forget_stale(live_cookies);
        self.lock_probes().forget_stale(live_cookies);
    }

    /// Detaches the programs and removes every pin (for `--cleanup-on-exit`).
    pub fn remove_pins(self) -> Result<()> {
        let (programs, _) = self
            .inbound
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        programs.remove_pins()
    }
}

fn client_key(netns_cookie: u64, client: SocketAddr) -> ClientKey {
    let v6 = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ClientKey {
        netns_cookie,
        addr: IpWords::from_octets(v6.octets()),
        port: client.port(),
        _pad: [0; 6],
    }
}

fn socket_addr(dst: &OriginalDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(dst.addr.octets());
    let ip = match (dst.family, v6.to_ipv4_mapped()) {
        (AF_INET, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, dst.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_use_the_ipv4_mapped_form_the_kernel_reports() {
        let key = client_key(7, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(
            Ipv6Addr::from(key.addr.octets()),
            "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!((key.netns_cookie, key.port), (7, 40000));
    }

    #[test]
    fn original_destinations_round_trip_both_families() {
        for text in ["198.18.0.11:8080", "[fd00:a5b1::11]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            let key = client_key(1, addr);
            let dst = OriginalDst {
                addr: key.addr,
                port: addr.port(),
                family: if addr.is_ipv4() {
                    AF_INET
                } else {
                    ambit_common::AF_INET6
                },
            };
            assert_eq!(socket_addr(&dst), addr);
        }
    }
}
