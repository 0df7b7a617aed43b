//! Idempotent machine setup. Every step checks first and says what it did.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::exec;

/// Debian packages, each with a file that proves it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    ("curl", "/usr/bin/curl"),
    ("socat", "/usr/bin/socat"),
    ("openssl", "/usr/bin/openssl"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("tshark", "/usr/bin/tshark"),
    ("iperf3", "/usr/bin/iperf3"),
    ("python3", "/usr/bin/python3"),
    ("util-linux", "/usr/bin/setpriv"),
    ("sslscan", "/usr/bin/sslscan"),
    // TLS scanners run against the tunnel port by tests/tests/tls_scanners.rs.
    ("testssl.sh", "/usr/bin/testssl"),
    ("nmap", "/usr/share/nmap/scripts/ssl-enum-ciphers.nse"),
    // The test control plane: kubectl drives it; unpacking and building
    // kube-apiserver needs dpkg-source, make and rsync.
    ("kubernetes-client", "/usr/bin/kubectl"),
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    ("make", "/usr/bin/make"),
    ("rsync", "/usr/bin/rsync"),
    // tests/tests/cni.rs chains ambit-cni after Debian's bridge + host-local.
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // Sidecar mode's capture rules (`ambit sidecar-init`).
    ("nftables", "/usr/sbin/nft"),
    // instr-bench counts the agents' instructions under callgrind.
    ("valgrind", "/usr/bin/valgrind"),
];

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("setup needs root (apt-get, mounting bpffs, loading eBPF): run it as root");
    }
    let mut did = Vec::new();
    install_packages(&mut did)?;
    crate::kube::ensure(&mut did)?;
    crate::helm::ensure(&mut did)?;
    rustup_components(&mut did)?;
    cargo_tools(&mut did)?;
    python_tools(&mut did)?;
    mount_bpffs(&mut did)?;
    if did.is_empty() {
        eprintln!("setup: nothing to do, the machine is ready");
    } else {
        eprintln!("setup: {}", did.join("; "));
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn install_packages(did: &mut Vec<String>) -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, proof)| !Path::new(proof).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    did.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup_components(did: &mut Vec<String>) -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly Rust toolchain: the eBPF programs need one (`rustup toolchain install \
             nightly --component rust-src`)"
        );
    }
    for (toolchain, component) in [
        ("nightly", "rust-src"),
        ("stable", "clippy"),
        ("stable", "rustfmt"),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))?;
        if !installed.lines().any(|l| l.starts_with(component)) {
            exec(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
            did.push(format!("added {component} to {toolchain}"));
        }
    }
    Ok(())
}

pub(crate) fn on_path(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Tools published on PyPI only: sslyze (a TLS scanner the tests run), and
/// the offline manifest checks `cargo xtask test` runs on deploy/
/// (kubernetes-validate ships the Kubernetes JSON schemas; yamllint).
/// Pinned, so every machine validates against the same schemas.
const PYTHON_TOOLS: &[(&str, &str, &str)] = &[
    ("sslyze", "sslyze", ""),
    ("kubernetes-validate", "kubernetes-validate", "1.37.0"),
    ("yamllint", "yamllint", "1.38.0"),
];

fn python_tools(did: &mut Vec<String>) -> Result<()> {
    for (package, binary, version) in PYTHON_TOOLS {
        let wanted = version.is_empty() || installed_version(binary).contains(version);
        if on_path(binary) && wanted {
            continue;
        }
        let spec = if version.is_empty() {
            (*package).to_string()
        } else {
            format!("{package}=={version}")
        };
        exec(Command::new("python3").args(["-m", "pip", "install", "-q", &spec]))?;
        did.push(format!("installed {spec}"));
    }
    Ok(())
}

/// What `BINARY --version` prints (empty if it does not run).
fn installed_version(binary: &str) -> String {
    output(Command::new(binary).arg("--version")).unwrap_or_default()
}

fn cargo_tools(did: &mut Vec<String>) -> Result<()> {
    if !on_path("bpf-linker") {
        // bpf-linker must link against the LLVM that nightly rustc uses.
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        exec(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
        )?;
        did.push("installed bpf-linker".into());
    }
    if !on_path("cargo-fuzz") {
        exec(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
        did.push("installed cargo-fuzz".into());
    }
    if !on_path("cargo-nextest") {
        exec(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
        did.push("installed cargo-nextest".into());
    }
    Ok(())
}

fn mount_bpffs(did: &mut Vec<String>) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf")?;
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    did.push("mounted bpffs at /sys/fs/bpf".into());
    Ok(())
}
