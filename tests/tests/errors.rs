//! Bad environments get an error that names the problem and the fix.

use std::process::{Command, Output};

use ambit_testbed::agent::agent_binary;
use anyhow::Result;

fn ambit(args: &[&str], wrapper: &[&str]) -> Result<Output> {
    let binary = agent_binary()?;
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&binary);
            c
        }
        None => Command::new(&binary),
    };
    Ok(cmd.args(args).output()?)
}

fn workloads_file(dir: &tempfile::TempDir) -> Result<String> {
    let path = dir.path().join("workloads.yaml");
    std::fs::write(&path, "node: n\nworkloads: []\n")?;
    Ok(path.to_string_lossy().into_owned())
}

fn failure_text(out: &Output) -> String {
    assert!(!out.status.success(), "ambit should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn without_root_the_agent_names_the_missing_capabilities_and_the_fix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = workloads_file(&dir)?;
    let err = failure_text(&ambit(&["run", "--workloads", &file], &NOBODY)?);
    for needle in [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "run `ambit` as root",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    Ok(())
}

#[test]
fn a_directory_that_is_not_cgroup_v2_is_rejected_with_the_fix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = workloads_file(&dir)?;
    let not_cgroup = dir.path().to_string_lossy().into_owned();
    let err = failure_text(&ambit(
        &["run", "--workloads", &file, "--cgroup-path", &not_cgroup],
        &[],
    )?);
    assert!(
        err.contains(&format!("{not_cgroup} is not a cgroup v2 directory")),
        "{err}"
    );
    assert!(err.contains("fix: pass --cgroup-path"), "{err}");
    Ok(())
}

#[test]
fn a_pin_directory_outside_bpffs_is_rejected_with_the_fix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = workloads_file(&dir)?;
    let pins = dir.path().join("pins").to_string_lossy().into_owned();
    let err = failure_text(&ambit(
        &["run", "--workloads", &file, "--bpf-pin-dir", &pins],
        &[],
    )?);
    assert!(
        err.contains(&format!("{pins} is not on a bpf filesystem")),
        "{err}"
    );
    assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
    Ok(())
}

#[test]
fn a_malformed_workloads_file_is_reported_with_its_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("workloads.yaml");
    std::fs::write(
        &path,
        "node: n\nworkloads:\n  - name: a\n    nmespace: typo\n",
    )?;
    let err = failure_text(&ambit(
        &["run", "--workloads", path.to_str().unwrap()],
        &[],
    )?);
    assert!(err.contains("invalid workloads file"), "{err}");
    assert!(err.contains("nmespace") && err.contains("line 4"), "{err}");
    Ok(())
}

/// setpriv arguments that run a program as nobody without capabilities.
const NOBODY: [&str; 6] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

#[test]
fn sidecar_init_names_the_fix_when_nft_is_missing_or_refuses_the_rules() -> Result<()> {
    let err = failure_text(&ambit(&["sidecar-init"], &["env", "PATH=/nonexistent"])?);
    assert!(err.contains("`nft` is not on PATH"), "{err}");
    assert!(err.contains("fix: install nftables"), "{err}");
    // Without privileges (in the host's namespace, which it cannot change).
    let err = failure_text(&ambit(&["sidecar-init"], &NOBODY)?);
    assert!(err.contains("nft refused them"), "{err}");
    assert!(
        err.contains("fix: run `ambit sidecar-init` as root"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_sidecar_asks_only_for_what_it_needs_and_for_the_cluster_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = workloads_file(&dir)?;
    let base = ["sidecar", "--workloads", &file, "--workload", "default/s"];
    let err = failure_text(&ambit(&base, &[])?);
    assert!(err.contains("--ca-addr and --ca-bootstrap-dir"), "{err}");

    let with_ca = [
        &base[..],
        &[
            "--ca-addr",
            "127.0.0.1:1",
            "--ca-bootstrap-dir",
            "/nonexistent",
        ],
    ]
    .concat();
    let err = failure_text(&ambit(&with_ca, &NOBODY)?);
    assert!(err.contains("missing CAP_NET_ADMIN"), "{err}");
    assert!(err.contains("--proxy-uid"), "{err}");
    // No eBPF, so none of the node agent's other capabilities.
    assert!(
        !err.contains("CAP_BPF") && !err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
    Ok(())
}
