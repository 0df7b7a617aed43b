//! Checks run before touching the kernel, so that a missing privilege or
//! kernel feature is reported with its fix instead of as a raw errno.

use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// CAP_NET_ADMIN's bit number (linux/capability.h).
pub(crate) const CAP_NET_ADMIN: u32 = 12;

/// The capabilities the agent needs, by bit number (linux/capability.h).
const REQUIRED_CAPS: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "load eBPF programs and maps"),
    (
        CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        "mark sockets and attach network programs",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "enter pod network namespaces and attach to cgroups",
    ),
];

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "missing capabilities: {missing}. The agent needs them to {why}.\n\
         fix: run `ambit` as root, or grant the capabilities (Kubernetes: \
         securityContext.capabilities.add: [BPF, NET_ADMIN, SYS_ADMIN])"
    )]
    MissingCapabilities { missing: String, why: String },
    #[error(
        "no cgroup v2 filesystem is mounted (none in /proc/self/mountinfo).\n\
         fix: mount one (`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none \
         /sys/fs/cgroup/unified`) or pass --cgroup-path DIR on a cgroup v2 mount"
    )]
    NoCgroup2,
    #[error(
        "{0} is not a cgroup v2 directory, so the capture programs cannot attach there.\n\
         fix: pass --cgroup-path with a directory on a cgroup2 mount (see `grep cgroup2 \
         /proc/self/mountinfo`), or leave it unset to use the cgroup v2 root"
    )]
    NotCgroup2(PathBuf),
    #[error(
        "{0} is not on a bpf filesystem, so maps and links cannot be pinned there \
         (pins keep enrolled pods failing closed across agent restarts).\n\
         fix: `mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf`, or pass \
         --bpf-pin-dir with a directory under a bpffs mount"
    )]
    NotBpffs(PathBuf),
    #[error("cannot inspect {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Effective capability mask of this process, from /proc/self/status.
pub(crate) fn effective_capabilities() -> Result<u64, PreflightError> {
    let path = Path::new("/proc/self/status");
    let status = fs::read_to_string(path).map_err(|source| PreflightError::Io {
        path: path.into(),
        source,
    })?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0))
}

pub fn check_capabilities() -> Result<(), PreflightError> {
    let effective = effective_capabilities()?;
    let missing: Vec<_> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _, _)| effective & (1u64 << bit) == 0)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PreflightError::MissingCapabilities {
        missing: missing.iter().map(|c| c.1).collect::<Vec<_>>().join(", "),
        why: missing.iter().map(|c| c.2).collect::<Vec<_>>().join("; "),
    })
}

fn fs_magic(path: &Path) -> Result<i64, PreflightError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| PreflightError::Io {
        path: path.into(),
        source: e.into(),
    })?;
    Ok(stat.filesystem_type().0)
}

/// The cgroup v2 directory to attach to: the given one (verified), or the
/// first cgroup2 mount point (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup_dir(explicit: Option<&Path>) -> Result<PathBuf, PreflightError> {
    let dir = match explicit {
        Some(dir) => dir.to_path_buf(),
        None => cgroup2_mount()?.ok_or(PreflightError::NoCgroup2)?,
    };
    if fs_magic(&dir)? != CGROUP2_SUPER_MAGIC {
        return Err(PreflightError::NotCgroup2(dir));
    }
    Ok(dir)
}

/// First cgroup2 mount point listed in /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<Option<PathBuf>, PreflightError> {
    Ok(cgroup2_mount_and_root()?.map(|m| m.mount_point))
}

/// A cgroup2 mount: where it is, and which cgroup its root directory is
/// (as a path in this process's cgroup namespace).
#[derive(Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    pub root: PathBuf,
}

/// First cgroup2 mount listed in /proc/self/mountinfo.
pub fn cgroup2_mount_and_root() -> Result<Option<Cgroup2Mount>, PreflightError> {
    let path = Path::new("/proc/self/mountinfo");
    let info = fs::read_to_string(path).map_err(|source| PreflightError::Io {
        path: path.into(),
        source,
    })?;
    Ok(info.lines().find_map(parse_cgroup2_mountinfo_line))
}

/// The mount of a mountinfo line whose filesystem type is cgroup2.
fn parse_cgroup2_mountinfo_line(line: &str) -> Option<Cgroup2Mount> {
    // Fields: id parent major:minor root mountpoint opts [optional...] - fstype source superopts
    let (left, right) = line.split_once(" - ")?;
    let fstype = right.split_whitespace().next()?;
    if fstype != "cgroup2" {
        return None;
    }
    let mut fields = left.split_whitespace().skip(3);
    let root = PathBuf::from(fields.next()?);
    let mount_point = PathBuf::from(fields.next()?);
    Some(Cgroup2Mount { mount_point, root })
}

/// Verifies that the pin directory is (or will be, once created) on bpffs.
pub fn check_bpffs(pin_dir: &Path) -> Result<(), PreflightError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing)? != BPF_FS_MAGIC {
        return Err(PreflightError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_in_hybrid_layout() {
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        let v2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let tagged = "41 31 0:38 / /mnt/cg rw shared:9 master:2 - cgroup2 none rw";
        let mount = |point: &str, root: &str| {
            Some(Cgroup2Mount {
                mount_point: point.into(),
                root: root.into(),
            })
        };
        assert_eq!(parse_cgroup2_mountinfo_line(v1), None);
        assert_eq!(
            parse_cgroup2_mountinfo_line(v2),
            mount("/sys/fs/cgroup/unified", "/")
        );
        assert_eq!(parse_cgroup2_mountinfo_line(tagged), mount("/mnt/cg", "/"));
        let container = "41 31 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_cgroup2_mountinfo_line(container),
            mount("/sys/fs/cgroup", "/kubepods/pod1")
        );
    }

    #[test]
    fn a_plain_directory_is_neither_cgroup2_nor_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        let err = cgroup_dir(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("is not a cgroup v2 directory"), "{err}");
        assert!(err.contains("--cgroup-path"), "{err}");
        let err = check_bpffs(&dir.path().join("pins"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
    }
}
