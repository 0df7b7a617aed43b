//! The fuzz targets (fuzz/, cargo-fuzz with libFuzzer) run briefly on every
//! test run, starting from the committed seed corpora; a crash, panic or
//! leak fails the test with libFuzzer's report.

use std::{path::Path, process::Command};

use anyhow::{Result, ensure};

/// Seconds each target runs for (after its sanitizer build).
const SECONDS_PER_TARGET: u64 = 15;

/// Where the sanitizer build goes: outside the clone, like the other
/// caches setup fills, so a fresh clone on the same machine rebuilds only
/// what changed. In the clone's `fuzz/target` it was a full build of the
/// agent (kube included) every CI run, 20-25 of the test's 30 minutes
/// under a busy host.
const TARGET_DIR: &str = "/var/cache/ambit-fuzz/target";

#[test]
fn fuzz_targets_run_clean_from_the_committed_corpus() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for target in ["policy_parser", "hbone_request"] {
        let corpus = root.join("fuzz/corpus").join(target);
        ensure!(
            std::fs::read_dir(&corpus)?.count() > 0,
            "no seed corpus for {target} at {}",
            corpus.display()
        );
        // New inputs go to a scratch directory so the committed corpus stays small.
        let scratch = tempfile::tempdir()?;
        let out = Command::new("cargo")
            .current_dir(&root)
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--target-dir",
                TARGET_DIR,
                target,
            ])
            .arg(scratch.path())
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
            .output()?;
        let report = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "fuzz target {target} failed:\n{}",
            report
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let runs = report
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("");
        println!("{target}: {runs}");
    }
    Ok(())
}
