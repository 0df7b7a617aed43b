//! The agent's own cgroup v2 id: the capture programs let connects from it
//! through uncaptured. A pod cannot forge it (unlike a socket mark, which
//! CAP_NET_RAW suffices to set), since joining a cgroup needs write access
//! to the cgroup filesystem, which pods do not have.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::preflight;

/// The id the kernel's `bpf_get_current_cgroup_id()` reports for this
/// process: the inode number of its cgroup v2 directory.
pub fn own_cgroup_id() -> Result<u64> {
    let dir = own_cgroup_dir()?;
    let id = fs::metadata(&dir)
        .with_context(|| format!("reading the agent's cgroup directory {}", dir.display()))?
        .ino();
    tracing::debug!(cgroup = %dir.display(), id, "agent cgroup");
    Ok(id)
}

fn own_cgroup_dir() -> Result<PathBuf> {
    let mount = preflight::cgroup2_mount_and_root()?.context(
        "no cgroup v2 filesystem is mounted, so the agent cannot tell its own sockets \
         from a pod's; mount cgroup2 (see `ambit run --help`)",
    )?;
    let membership =
        fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let own =
        unified_path(&membership).context("/proc/self/cgroup has no cgroup v2 (\"0::\") entry")?;
    match own.strip_prefix(&mount.root) {
        Ok(relative) => Ok(mount.mount_point.join(relative)),
        Err(_) => bail!(
            "the agent's cgroup {} is outside the cgroup2 mount at {} (whose root is {}); \
             mount the cgroup2 hierarchy that contains the agent",
            own.display(),
            mount.mount_point.display(),
            mount.root.display()
        ),
    }
}

/// The cgroup v2 path in `/proc/self/cgroup` text (the `0::PATH` line).
fn unified_path(membership: &str) -> Option<&Path> {
    membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(Path::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_entry_among_v1_controllers() {
        let hybrid = "12:cpu,cpuacct:/x\n0::/ambit-testbed/n0/agent\n1:name=systemd:/y\n";
        assert_eq!(
            unified_path(hybrid),
            Some(Path::new("/ambit-testbed/n0/agent"))
        );
        assert_eq!(unified_path("3:memory:/z\n"), None);
    }

    #[test]
    fn this_process_has_a_cgroup_id_matching_its_directory() {
        let id = own_cgroup_id().expect("own cgroup id");
        let dir = own_cgroup_dir().unwrap();
        assert!(dir.is_dir(), "{}", dir.display());
        assert_eq!(fs::metadata(dir).unwrap().ino(), id);
    }
}
