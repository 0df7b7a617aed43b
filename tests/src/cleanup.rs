//! Removing what a testbed created, on drop and after a killed test process.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{CGROUP_PARENT, PIN_PARENT, PREFIX, exec::host_cmd};

pub struct Leftovers {
    pub cgroup: PathBuf,
    pub netns: Vec<String>,
    pub pin_dirs: Vec<PathBuf>,
    pub children: Vec<Child>,
}

/// Best effort, in dependency order: processes, cgroups, namespaces, pins.
/// Each failure is reported and the rest still runs.
pub fn remove(mut leftovers: Leftovers) {
    // cgroup.kill SIGKILLs every process in the subtree, including ones our
    // children started and orphaned.
    if leftovers.cgroup.exists()
        && let Err(e) = fs::write(leftovers.cgroup.join("cgroup.kill"), "1")
    {
        eprintln!(
            "testbed cleanup: cgroup.kill {}: {e}",
            leftovers.cgroup.display()
        );
    }
    for child in &mut leftovers.children {
        let _ = child.kill();
        let _ = child.wait();
    }
    report(remove_cgroup_tree(&leftovers.cgroup));
    for netns in &leftovers.netns {
        report(host_cmd("ip", &["netns", "del", netns]).map(drop));
    }
    for dir in &leftovers.pin_dirs {
        if dir.exists() {
            report(fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display())));
        }
    }
}

fn report(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("testbed cleanup: {e:#}");
    }
}

/// Removes a cgroup and its descendants, waiting for killed processes to leave.
fn remove_cgroup_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match remove_depth_first(root) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", root.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn remove_depth_first(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_depth_first(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 mount in /proc/self/mountinfo")
}

/// The creating pid in a name like `ambt1234x0-n0p10`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes what testbeds of dead processes left behind (a test killed by
/// a timeout cannot run its destructors).
pub fn sweep_stale() {
    let mut netns = Vec::new();
    if let Ok(list) = host_cmd("ip", &["netns", "list"]) {
        netns = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| is_stale(n))
            .map(String::from)
            .collect();
    }
    let stale_dirs = |parent: &Path| -> Vec<PathBuf> {
        fs::read_dir(parent)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| is_stale(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let cgroups = cgroup2_root()
        .map(|root| stale_dirs(&root.join(CGROUP_PARENT)))
        .unwrap_or_default();
    let pin_dirs = stale_dirs(Path::new(PIN_PARENT));
    for cgroup in cgroups {
        remove(Leftovers {
            cgroup,
            netns: Vec::new(),
            pin_dirs: Vec::new(),
            children: Vec::new(),
        });
    }
    remove(Leftovers {
        cgroup: PathBuf::new(),
        netns,
        pin_dirs,
        children: Vec::new(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_read_from_names() {
        assert_eq!(owner_pid("ambt1234x0-n0p10"), Some(1234));
        assert_eq!(owner_pid("ambt77x3"), Some(77));
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("ambtZx1"), None);
    }
}
