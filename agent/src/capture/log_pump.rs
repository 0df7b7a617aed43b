//! Forwards aya-log records from the programs' ring buffer into `tracing`.

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, task::JoinHandle};

/// Level numbers of aya-log (Error = 1 … Trace = 5).
const AYA_LOG_WARN: u8 = 2;
const AYA_LOG_DEBUG: u8 = 4;

/// The log target of records from the programs (aya-log uses the eBPF
/// crate's module path), e.g. `AMBIT_LOG=info,ambit_capture=debug`.
pub const EBPF_LOG_TARGET: &str = "ambit_capture";

/// The most verbose record the programs should emit: per-connection debug
/// records only when the agent would print them anyway.
pub fn kernel_log_level() -> u8 {
    if tracing::enabled!(target: EBPF_LOG_TARGET, tracing::Level::DEBUG) {
        AYA_LOG_DEBUG
    } else {
        AYA_LOG_WARN
    }
}

/// Must be called after the object is loaded and before any program is:
/// the logger owns the log map the programs write to.
pub fn spawn(ebpf: &mut Ebpf) -> Result<JoinHandle<()>> {
    let logger = EbpfLogger::init(ebpf).context("opening the eBPF log buffer")?;
    // SAFETY: the logger owns the ring buffer's fd for as long as it lives.
    let mut logger = unsafe { AsyncFd::register(logger) }
        .map_err(|e| anyhow::anyhow!("registering the eBPF log buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                tracing::warn!("eBPF log buffer closed; kernel-side log records are lost");
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}
