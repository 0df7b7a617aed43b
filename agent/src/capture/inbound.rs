//! Inbound capture: the sk_lookup program in each enrolled pod's netns, and
//! the maps that tell it which pod each local address belongs to and where
//! that pod's plaintext-capture listener is.
//!
//! The program is attached only to enrolled pods' namespaces, so every
//! lookup it sees is for an enrolled pod. What it cannot know by itself is
//! *which* pod (sk_lookup has no netns cookie), hence the address maps. The
//! agent lists every local address of the pod (link-local and secondary
//! ones too, read from the namespace itself), and the program refuses an
//! address it does not find: nothing reaches an application unseen.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs::{self, File},
    net::IpAddr,
    os::fd::RawFd,
    path::{Path, PathBuf},
};

use ambit_common::{IpWords, POD_ADDRESS_PERMISSIVE, PodAddress};
use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, SockHash},
    programs::{SkLookup, links::FdLink},
};

use super::programs::replace_pinned_link;

/// Pin file prefix of the per-pod sk_lookup links (suffix: netns cookie).
const LINK_PREFIX: &str = "link_inbound_";

pub struct InboundCapture {
    pub(super) addresses: BpfHashMap<MapData, IpWords, PodAddress>,
    pub(super) listeners: SockHash<MapData, IpWords>,
    pub(super) pin_dir: PathBuf,
    /// Which pods claim each address. The kernel maps hold an address only
    /// while exactly one pod claims it: two pods with one address (a
    /// hand-set link-local, say) get neither, so both refuse it.
    claims: HashMap<IpWords, BTreeSet<u64>>,
    pods: HashMap<u64, PodInbound>,
}

/// What one pod registered.
struct PodInbound {
    listener: RawFd,
    permissive: bool,
    addresses: HashSet<IpWords>,
}

pub fn ip_words(ip: IpAddr) -> IpWords {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    IpWords::from_octets(v6.octets())
}

impl InboundCapture {
    pub(super) fn new(
        addresses: BpfHashMap<MapData, IpWords, PodAddress>,
        listeners: SockHash<MapData, IpWords>,
        pin_dir: PathBuf,
    ) -> Self {
        Self {
            addresses,
            listeners,
            pin_dir,
            claims: HashMap::new(),
            pods: HashMap::new(),
        }
    }

    fn link_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("{LINK_PREFIX}{netns_cookie}"))
    }

    /// Steers connections to the pod's `addresses` to `listener` (its
    /// plaintext-capture listener, which must stay open until [`detach`]),
    /// then attaches the program to its namespace. Addresses first, program
    /// last: each step leaves the pod either uncaptured or fully captured.
    ///
    /// [`detach`]: Self::detach
    pub fn attach(
        &mut self,
        program: &mut SkLookup,
        netns_path: &Path,
        netns_cookie: u64,
        addresses: &[IpAddr],
        permissive: bool,
        listener: RawFd,
    ) -> Result<()> {
        self.pods.insert(
            netns_cookie,
            PodInbound {
                listener,
                permissive,
                addresses: HashSet::new(),
            },
        );
        self.update(netns_cookie, addresses, permissive)?;
        let netns = File::open(netns_path)
            .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
        let id = program
            .attach(&netns)
            .context("attaching the inbound sk_lookup program (needs Linux 5.9 or newer)")?;
        let link: FdLink = program.take_link(id)?.into();
        replace_pinned_link(link, &self.link_pin(netns_cookie))
    }

    /// Brings the pod's registered addresses and mode up to date in place:
    /// new addresses are steered before old ones are dropped, and addresses
    /// that stay are never touched.
    pub fn update(
        &mut self,
        netns_cookie: u64,
        addresses: &[IpAddr],
        permissive: bool,
    ) -> Result<()> {
        let wanted: HashSet<IpWords> = addresses.iter().map(|ip| ip_words(*ip)).collect();
        let Some(pod) = self.pods.get_mut(&netns_cookie) else {
            anyhow::bail!("netns {netns_cookie} has no inbound capture to update");
        };
        let mode_changed = pod.permissive != permissive;
        pod.permissive = permissive;
        let added: Vec<IpWords> = wanted.difference(&pod.addresses).copied().collect();
        let removed: Vec<IpWords> = pod.addresses.difference(&wanted).copied().collect();
        pod.addresses = wanted;
        let kept: Vec<IpWords> = if mode_changed {
            pod.addresses.iter().copied().collect()
        } else {
            added.clone()
        };
        for ip in &added {
            self.claims.entry(*ip).or_default().insert(netns_cookie);
        }
        for ip in &kept {
            self.sync(*ip)?;
        }
        for ip in removed {
            self.release_claim(ip, netns_cookie);
        }
        Ok(())
    }

    /// Makes the kernel's entry for `ip` match its claims.
    fn sync(&mut self, ip: IpWords) -> Result<()> {
        let claimants = self.claims.get(&ip).cloned().unwrap_or_default();
        let mut only = claimants.iter();
        match (only.next(), only.next()) {
            (Some(cookie), None) => {
                let pod = &self.pods[cookie];
                let flags = if pod.permissive {
                    POD_ADDRESS_PERMISSIVE
                } else {
                    0
                };
                self.listeners
                    .insert(ip, pod.listener, 0)
                    .with_context(|| format!("registering the inbound listener for {ip:?}"))?;
                self.addresses
                    .insert(
                        ip,
                        PodAddress {
                            netns_cookie: *cookie,
                            flags,
                            _pad: 0,
                        },
                        0,
                    )
                    .with_context(|| format!("capturing inbound connections to {ip:?}"))?;
            }
            (Some(_), Some(_)) => {
                tracing::error!(address = %as_ipv6(ip), pods = ?claimants,
                    "two enrolled pods on this node have this address: connections to it are refused");
                self.forget(ip);
            }
            (None, _) => self.forget(ip),
        }
        Ok(())
    }

    fn release_claim(&mut self, ip: IpWords, netns_cookie: u64) {
        if let Some(claimants) = self.claims.get_mut(&ip) {
            claimants.remove(&netns_cookie);
            if claimants.is_empty() {
                self.claims.remove(&ip);
            }
        }
        // A conflict this pod was part of may now be resolved.
        if let Err(e) = self.sync(ip) {
            tracing::error!(address = %as_ipv6(ip), error = %format!("{e:#}"), "cannot update inbound capture");
        }
    }

    fn forget(&mut self, ip: IpWords) {
        let _ = self.addresses.remove(&ip);
        let _ = self.listeners.remove(&ip);
    }

    /// Stops steering: the program goes first, then the addresses.
    pub fn detach(&mut self, netns_cookie: u64) -> Result<()> {
        let pin = self.link_pin(netns_cookie);
        match fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("unpinning {}", pin.display()));
            }
            _ => {}
        }
        if let Some(pod) = self.pods.remove(&netns_cookie) {
            for ip in pod.addresses {
                self.release_claim(ip, netns_cookie);
            }
        }
        Ok(())
    }

    /// Removes what a previous agent left for pods that are no longer
    /// enrolled: their sk_lookup links and their addresses.
    pub fn forget_stale(&mut self, live_cookies: &HashSet<u64>) {
        if let Ok(dir) = fs::read_dir(&self.pin_dir) {
            for entry in dir.filter_map(Result::ok) {
                let name = entry.file_name();
                let Some(cookie) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(LINK_PREFIX))
                    .and_then(|c| c.parse::<u64>().ok())
                else {
                    continue;
                };
                if !live_cookies.contains(&cookie) {
                    tracing::info!(netns_cookie = cookie, "removing stale inbound capture");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let stale: Vec<IpWords> = self
            .addresses
            .keys()
            .filter_map(Result::ok)
            .filter(|ip| !self.claims.contains_key(ip))
            .collect();
        for ip in stale {
            self.forget(ip);
        }
    }
}

fn as_ipv6(ip: IpWords) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(ip.octets())
}
