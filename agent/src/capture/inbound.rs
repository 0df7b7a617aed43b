//! Inbound capture: the sk_lookup program in each enrolled pod's netns, and
//! the maps that tell it the pod's addresses and the agent's listener.

use std::{
    collections::HashSet,
    fs::{self, File},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use ambit_common::IpWords;
use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{SkLookup, links::FdLink},
};

use super::programs::replace_pinned_link;

/// Pin file prefix of the per-pod sk_lookup links (suffix: netns cookie).
const LINK_PREFIX: &str = "link_inbound_";

pub struct InboundCapture {
    pub(super) ips: HashMap<MapData, IpWords, u32>,
    pub(super) listeners: SockHash<MapData, IpWords>,
    pub(super) pin_dir: PathBuf,
}

pub fn ip_words(ip: IpAddr) -> IpWords {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    IpWords::from_octets(v6.octets())
}

impl InboundCapture {
    fn link_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("{LINK_PREFIX}{netns_cookie}"))
    }

    /// Steers connections for `ips` (in the pod's netns) to `listener`. The
    /// listener goes in first, the addresses next, the program last: every
    /// step leaves the pod either uncaptured or fully captured.
    pub fn attach(
        &mut self,
        program: &mut SkLookup,
        netns_path: &Path,
        netns_cookie: u64,
        ips: &[IpAddr],
        listener: &impl AsRawFd,
    ) -> Result<()> {
        for ip in ips {
            self.listeners
                .insert(ip_words(*ip), listener.as_raw_fd(), 0)
                .with_context(|| format!("registering the inbound listener for {ip}"))?;
            self.ips
                .insert(ip_words(*ip), 1, 0)
                .with_context(|| format!("capturing inbound connections to {ip}"))?;
        }
        let netns = File::open(netns_path)
            .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
        let id = program
            .attach(&netns)
            .context("attaching the inbound sk_lookup program (needs Linux 5.9 or newer)")?;
        let link: FdLink = program.take_link(id)?.into();
        replace_pinned_link(link, &self.link_pin(netns_cookie))
    }

    /// Stops steering: the program goes first, then the addresses.
    pub fn detach(&mut self, netns_cookie: u64, ips: &[IpAddr]) -> Result<()> {
        let pin = self.link_pin(netns_cookie);
        match fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("unpinning {}", pin.display()));
            }
            _ => {}
        }
        for ip in ips {
            let _ = self.ips.remove(&ip_words(*ip));
            let _ = self.listeners.remove(&ip_words(*ip));
        }
        Ok(())
    }

    /// Removes what a previous agent left for pods that are no longer
    /// enrolled: their sk_lookup links and their addresses.
    pub fn forget_stale(&mut self, live_cookies: &HashSet<u64>, live_ips: &HashSet<IpWords>) {
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
            .ips
            .keys()
            .filter_map(Result::ok)
            .filter(|ip| !live_ips.contains(ip))
            .collect();
        for ip in stale {
            let _ = self.ips.remove(&ip);
            let _ = self.listeners.remove(&ip);
        }
    }
}
