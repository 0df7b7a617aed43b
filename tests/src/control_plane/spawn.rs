//! Picking free loopback ports for control-plane processes and sweeping
//! the data directories of dead ones.

use std::{fs, net::TcpListener, path::Path};

use anyhow::{Context, Result};

/// A loopback port nothing listens on right now. Another process may take
/// it before ours binds; callers retry a failed start.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// Prefix of control-plane data directories, followed by the owner's pid.
pub const DIR_PREFIX: &str = "ambit-cp-";

/// Removes data directories whose owning process is gone (a shared control
/// plane's directory is never dropped).
pub fn sweep_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            eprintln!(
                "control plane: removing stale {}: {e}",
                entry.path().display()
            );
        }
    }
}
