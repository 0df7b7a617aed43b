//! Loading, attaching and pinning the capture programs.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use ambit_common::{
    GLOBAL_AGENT_CGROUP, GLOBAL_INBOUND_CAPTURE_PORT, GLOBAL_NODE_NETNS, GLOBAL_OUTBOUND_PORT,
    GLOBAL_TUNNEL_PORT, INBOUND_CAPTURE_PORT, TUNNEL_PORT,
};
use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use tokio::task::JoinHandle;

use super::{log_pump, own_cgroup::own_cgroup_id};
use crate::{config::CaptureConfig, preflight};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-capture"));

/// Program function names in the object, and the file each one's cgroup link
/// is pinned under.
/// The inbound program, attached per pod netns rather than to the cgroup.
const INBOUND_PROGRAM: &str = "ambit_inbound";

const PROGRAMS: [(&str, &str); 3] = [
    ("ambit_connect4", "link_connect4"),
    ("ambit_connect6", "link_connect6"),
    ("ambit_sockops", "link_sockops"),
];

pub struct LoadedPrograms {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    log_pump: JoinHandle<()>,
}

impl LoadedPrograms {
    pub fn load_and_attach(config: &CaptureConfig) -> Result<Self> {
        preflight::check_capabilities()?;
        let cgroup_dir = preflight::cgroup_dir(config.cgroup_path.as_deref())?;
        preflight::check_bpffs(&config.bpf_pin_dir)?;
        let pin_dir = config.bpf_pin_dir.clone();
        fs::create_dir_all(&pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;

        let agent_cgroup = own_cgroup_id()?;
        let node_netns = own_netns_cookie()?;
        let log_level = log_pump::kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(GLOBAL_AGENT_CGROUP, &agent_cgroup, true)
            .override_global(GLOBAL_OUTBOUND_PORT, &config.outbound_port, true)
            .override_global(GLOBAL_INBOUND_CAPTURE_PORT, &INBOUND_CAPTURE_PORT, true)
            .override_global(GLOBAL_TUNNEL_PORT, &TUNNEL_PORT, true)
            .override_global(GLOBAL_NODE_NETNS, &node_netns, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF object with maps pinned in {dir}. If another Ambit \
                     version pinned incompatible maps there, stop it and remove {dir}",
                    dir = pin_dir.display()
                )
            })?;
        let log_pump = log_pump::spawn(&mut ebpf)?;

        let cgroup = File::open(&cgroup_dir)
            .with_context(|| format!("opening cgroup {}", cgroup_dir.display()))?;
        for (name, pin) in PROGRAMS {
            let link = attach(&mut ebpf, name, &cgroup).with_context(|| {
                format!(
                    "attaching eBPF program {name} to cgroup {}. The kernel needs \
                     CONFIG_CGROUP_BPF and BPF links on cgroups (Linux 5.7 or newer)",
                    cgroup_dir.display()
                )
            })?;
            replace_pinned_link(link, &pin_dir.join(pin))?;
        }
        let inbound: &mut SkLookup = ebpf
            .program_mut(INBOUND_PROGRAM)
            .context("eBPF object has no inbound program")?
            .try_into()?;
        inbound
            .load()
            .context("loading the inbound sk_lookup program (needs Linux 5.9 or newer)")?;
        tracing::info!(
            cgroup = %cgroup_dir.display(),
            pin_dir = %pin_dir.display(),
            agent_cgroup,
            "capture programs attached"
        );
        Ok(Self {
            ebpf,
            pin_dir,
            log_pump,
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The loaded (not attached) inbound program.
    pub fn inbound_program(&mut self) -> Result<&mut SkLookup> {
        Ok(self
            .ebpf
            .program_mut(INBOUND_PROGRAM)
            .context("eBPF object has no inbound program")?
            .try_into()?)
    }

    /// Detaches every program (by dropping the last reference to its link)
    /// and removes the pinned maps.
    pub fn remove_pins(self) -> Result<()> {
        self.log_pump.abort();
        for entry in fs::read_dir(&self.pin_dir)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        fs::remove_dir(&self.pin_dir)
            .with_context(|| format!("removing {}", self.pin_dir.display()))?;
        tracing::info!(pin_dir = %self.pin_dir.display(), "capture programs detached and unpinned");
        Ok(())
    }
}

/// The cookie of the agent's own network namespace: the node's, where the
/// kubelet runs (the agent runs with the host network).
fn own_netns_cookie() -> Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("opening a socket to read the node's network namespace cookie")?;
    crate::netns::netns_cookie(&socket)
        .context("reading the node's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+)")
}

fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> Result<FdLink> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF object has no program {name}"))?;
    // Links always coexist on a cgroup; AllowMultiple is rejected for links.
    let mode = CgroupAttachMode::Single;
    if let Ok(program) = <&mut CgroupSockAddr>::try_from(&mut *program) {
        program.load()?;
        let id = program.attach(cgroup, mode)?;
        Ok(program.take_link(id)?.try_into()?)
    } else {
        let program: &mut SockOps = program.try_into()?;
        program.load()?;
        let id = program.attach(cgroup, mode)?;
        Ok(program.take_link(id)?.try_into()?)
    }
}

/// Pins `link` at `path`, releasing a link a previous agent pinned there.
/// The new link is attached before the old one goes, so capture never lapses
/// (the programs are idempotent when both run).
pub(super) fn replace_pinned_link(link: FdLink, path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(pin = %path.display(), "replaced the link of a previous agent"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale pin {}", path.display())),
    }
    // The pin keeps the link attached after this handle is dropped.
    link.pin(path)
        .with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(())
}
