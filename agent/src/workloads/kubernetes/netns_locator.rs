//! Where a pod's network namespace is. Kubernetes does not say; the
//! container runtime made it. Until the CNI plugin reports it on ADD, the
//! agent finds it through /proc: a process in the pod's cgroup lives in the
//! pod's network namespace.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Finds the network namespace of a pod running on this node.
pub trait NetnsLocator: Send + Sync {
    /// A path that opens the pod's network namespace, or `None` if it is not
    /// found (yet): the caller retries later.
    fn locate(&self, pod_uid: &str) -> Option<PathBuf>;
}

/// Scans /proc for a process whose cgroup is the pod's, named the way
/// kubelet names pod cgroups: `pod<uid>` (cgroupfs driver, e.g.
/// `/kubepods/burstable/pod<uid>/<container>`) or with `_` for `-`
/// (systemd driver, e.g. `kubepods-burstable-pod<uid_>.slice`).
pub struct ProcNetnsLocator {
    proc_root: PathBuf,
}

impl Default for ProcNetnsLocator {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcNetnsLocator {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }
}

impl NetnsLocator for ProcNetnsLocator {
    fn locate(&self, pod_uid: &str) -> Option<PathBuf> {
        let entries = match fs::read_dir(&self.proc_root) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(proc = %self.proc_root.display(), error = %e, "cannot list processes");
                return None;
            }
        };
        // The lowest pid is the pod's oldest process (its sandbox) as a
        // rule, so the choice stays the same while it lives.
        let mut pids: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.into_iter()
            .map(|pid| self.proc_root.join(pid.to_string()))
            .find(|dir| in_pod_cgroup(dir, pod_uid))
            .map(|dir| dir.join("ns/net"))
    }
}

/// Whether the process at `/proc/<pid>` is in the cgroup of pod `uid`. A
/// process that exits while we look is simply not a match.
fn in_pod_cgroup(proc_dir: &Path, uid: &str) -> bool {
    fs::read_to_string(proc_dir.join("cgroup")).is_ok_and(|text| cgroup_names_pod(&text, uid))
}

/// Whether a /proc/PID/cgroup text puts the process below pod `uid`'s
/// cgroup (any hierarchy line, any path component).
pub fn cgroup_names_pod(cgroup_file: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    cgroup_file
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .any(|component| component == cgroupfs || component.ends_with(&systemd))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f9a1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b";

    #[test]
    fn recognises_both_cgroup_drivers_and_nothing_else() {
        let cases = [
            (format!("0::/kubepods/burstable/pod{UID}/abc123\n"), true),
            (format!("0::/kubepods/pod{UID}\n"), true),
            (
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n",
                    UID.replace('-', "_")
                ),
                true,
            ),
            // Another pod whose uid starts the same.
            (format!("0::/kubepods/pod{UID}0/x\n"), false),
            (format!("0::/kubepods/burstable/{UID}/x\n"), false),
            ("0::/system.slice/sshd.service\n".to_string(), false),
        ];
        for (text, want) in cases {
            assert_eq!(cgroup_names_pod(&text, UID), want, "{text}");
        }
        assert!(!cgroup_names_pod("0::/kubepods/pod/x\n", ""));
    }

    #[test]
    fn finds_the_lowest_pid_in_the_pods_cgroup() {
        let proc = tempfile::tempdir().unwrap();
        let write = |pid: &str, cgroup: &str| {
            let dir = proc.path().join(pid);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
        };
        write("12", "0::/system.slice/init.scope\n");
        write("300", &format!("0::/kubepods/pod{UID}/app\n"));
        write("45", &format!("0::/kubepods/pod{UID}/pause\n"));
        fs::create_dir_all(proc.path().join("self")).unwrap();
        let locator = ProcNetnsLocator::new(proc.path());
        assert_eq!(
            locator.locate(UID),
            Some(proc.path().join("45").join("ns/net"))
        );
        assert_eq!(locator.locate("11111111-2222-3333-4444-555555555555"), None);
    }
}
