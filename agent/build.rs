//! Builds the eBPF programs (ebpf/ambit-ebpf) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker; the agent embeds the resulting object.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/ambit-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambit-ebpf",
            root_dir: "../ebpf/ambit-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             fix: run `cargo xtask setup` (installs llvm-22-dev, nightly rust-src and bpf-linker)"
        )
    })
}
