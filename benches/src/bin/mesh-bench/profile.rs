//! Optional profiles of the data plane during one phase of a round: with
//! `MESH_BENCH_PERF_DIR` set, `perf record -g` samples the mode's data-plane
//! processes for the phase and writes `<dir>/<phase>.<mode>.<n>.data`
//! (`perf report -i` reads it). `MESH_BENCH_PERF_ARGS` replaces the perf
//! subcommand and its options (`trace -s` counts system calls instead).
//! How the profiles in docs/benchmarks.md were taken; unset, nothing runs.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::modes::{Bench, Mode};

const DIR_VAR: &str = "MESH_BENCH_PERF_DIR";
const ARGS_VAR: &str = "MESH_BENCH_PERF_ARGS";
const DEFAULT_ARGS: &str = "record -F 1999 -g -e cpu-clock";

/// A running `perf record`; stopped (SIGINT, so it writes its file) on drop.
pub struct Profile {
    perf: Option<Child>,
}

impl Profile {
    /// Starts sampling `mode`'s data plane for `phase`, if profiles were
    /// asked for and the mode has a data plane.
    pub fn start(b: &Bench, mode: Mode, phase: &str) -> Result<Self> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let (Some(dir), pids) = (std::env::var_os(DIR_VAR), b.data_plane(mode)) else {
            return Ok(Self { perf: None });
        };
        if pids.is_empty() {
            return Ok(Self { perf: None });
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let out = PathBuf::from(dir).join(format!("{phase}.{}.{n}.data", mode.key()));
        let perf_args = std::env::var(ARGS_VAR).unwrap_or_else(|_| DEFAULT_ARGS.into());
        let perf = Command::new("perf")
            .args(perf_args.split_whitespace())
            .arg("-o")
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting perf {perf_args} (is linux-perf installed?)"))?;
        // perf attaches before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { perf: Some(perf) })
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut perf) = self.perf.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(perf.id() as libc::pid_t, libc::SIGINT) };
            let _ = perf.wait();
        }
    }
}
