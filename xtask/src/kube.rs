//! The test control plane's binaries: kube-apiserver built from Debian
//! bookworm's `kubernetes` source package with Go 1.15 from bullseye, and
//! etcd from Debian's `etcd-server` (TOOLCHAIN.md, "A real Kubernetes API
//! server on this machine"). Nothing is installed system-wide: packages are
//! fetched through a scratch apt configuration and unpacked with `dpkg -x`,
//! and only the two binaries are kept, under [`CACHE_ROOT`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::exec;

/// The kube-apiserver release the source package holds.
pub const VERSION: &str = "v1.20.2";
/// Outside the repo: the binaries are large and never committed.
pub const CACHE_ROOT: &str = "/var/cache/ambit-k8s";

/// Go 1.19+ builds this tree too, but the result crashes (vendored
/// reflect2 1.0.1) on the first custom-resource write.
const GO_PACKAGES: &[&str] = &["golang-1.15-go", "golang-1.15-src"];
const GOROOT_IN_PACKAGE: &str = "usr/lib/go-1.15";

/// bullseye for Go 1.15, bookworm for etcd 3.4 and the Kubernetes source.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
";

pub fn cache_dir() -> PathBuf {
    Path::new(CACHE_ROOT).join(VERSION)
}

/// Makes sure `kube-apiserver` and `etcd` are in [`cache_dir`]; fetches and
/// builds only what is missing.
pub fn ensure(did: &mut Vec<String>) -> Result<()> {
    let cache = cache_dir();
    let apiserver = cache.join("kube-apiserver");
    let etcd = cache.join("etcd");
    if apiserver.exists() && etcd.exists() {
        return Ok(());
    }
    let started = Instant::now();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // A fresh scratch tree each time: a half-done earlier run leaves nothing
    // that could be mistaken for a finished step.
    let work = Path::new(CACHE_ROOT).join("work");
    remove_dir_if_present(&work)?;
    let apt = ScratchApt::new(&work.join("apt"))?;
    progress(
        started,
        "refreshing the scratch apt lists (bullseye, bookworm)",
    );
    exec(&mut apt.command(&["update", "-q"]))?;

    if !etcd.exists() {
        progress(started, "fetching etcd-server");
        let root = unpack_packages(&apt, &work, &["etcd-server"])?;
        install_binary(&root.join("usr/bin/etcd"), &etcd)?;
        did.push(format!("cached etcd in {}", cache.display()));
    }
    if !apiserver.exists() {
        progress(started, "fetching Go 1.15 (bullseye)");
        let go_root = unpack_packages(&apt, &work, GO_PACKAGES)?;
        progress(started, "fetching the kubernetes source package (bookworm)");
        let tree = fetch_kubernetes_source(&apt, &work)?;
        progress(
            started,
            "building kube-apiserver (about 6 minutes on 2 cores, 1.3 GB memory)",
        );
        let built = build_apiserver(&tree, &go_root.join(GOROOT_IN_PACKAGE), &work)?;
        install_binary(&built, &apiserver)?;
        did.push(format!(
            "built kube-apiserver {VERSION} into {}",
            cache.display()
        ));
    }
    progress(started, "done; removing the scratch tree");
    remove_dir_if_present(&work)?;
    Ok(())
}

fn progress(started: Instant, what: &str) {
    eprintln!(
        "setup: k8s control plane [{:>4}s] {what}",
        started.elapsed().as_secs()
    );
}

pub(crate) fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// apt-get with its own sources, lists, cache and (empty) dpkg status, so
/// the machine's apt state and sources stay as they are.
struct ScratchApt {
    dir: PathBuf,
}

impl ScratchApt {
    fn new(dir: &Path) -> Result<Self> {
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        fs::write(dir.join("sources.list"), SOURCES)?;
        fs::write(dir.join("status"), "")?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new("apt-get");
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::Etc::PreferencesParts", d("preferences.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            // The scratch dirs belong to root; apt's _apt sandbox user could
            // not write to them.
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.args(args);
        cmd
    }
}

/// Downloads binary packages into `work/debs` and unpacks them all into one
/// root, `work/root-<first package>`.
fn unpack_packages(apt: &ScratchApt, work: &Path, packages: &[&str]) -> Result<PathBuf> {
    let debs = work.join("debs");
    fs::create_dir_all(&debs)?;
    exec(
        apt.command(&["download", "-q"])
            .args(packages)
            .current_dir(&debs),
    )?;
    let root = work.join(format!("root-{}", packages[0]));
    fs::create_dir_all(&root)?;
    for package in packages {
        let deb = find_one(&debs, |name| {
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })?;
        exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    Ok(root)
}

/// Downloads and unpacks (patches applied) the `kubernetes` source package.
fn fetch_kubernetes_source(apt: &ScratchApt, work: &Path) -> Result<PathBuf> {
    let src = work.join("src");
    fs::create_dir_all(&src)?;
    exec(
        apt.command(&["source", "--download-only", "-q", "kubernetes/bookworm"])
            .current_dir(&src),
    )?;
    let dsc = find_one(&src, |name| {
        name.starts_with("kubernetes_") && name.ends_with(".dsc")
    })?;
    let tree = src.join("kubernetes");
    exec(
        Command::new("dpkg-source")
            .args(["--no-check", "-x"])
            .arg(&dsc)
            .arg(&tree),
    )?;
    Ok(tree)
}

pub(crate) fn find_one(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| matches(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("the expected file is not in {}", dir.display()),
        many => bail!("more than one candidate in {}: {many:?}", dir.display()),
    }
}

/// `make WHAT=cmd/kube-apiserver` offline from the vendored tree.
fn build_apiserver(tree: &Path, goroot: &Path, work: &Path) -> Result<PathBuf> {
    if !goroot.join("bin/go").exists() {
        bail!("Go 1.15 is not at {} after unpacking", goroot.display());
    }
    if !Path::new("/usr/bin/rsync").exists() {
        bail!("the Kubernetes build scripts need rsync (apt-get install rsync)");
    }
    let path = format!(
        "{}:{}",
        goroot.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new("make")
            .arg("WHAT=cmd/kube-apiserver")
            .current_dir(tree)
            .env("PATH", path)
            .env("GOROOT", goroot)
            .env("GOPATH", work.join("gopath"))
            .env("GOCACHE", work.join("gocache"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0")
            .env("KUBE_GIT_VERSION", VERSION)
            .env("KUBE_GIT_TREE_STATE", "clean"),
    )
    .with_context(|| {
        format!(
            "building kube-apiserver failed; the tree stays in {} until the next setup",
            tree.display()
        )
    })?;
    let built = tree.join("_output/bin/kube-apiserver");
    if !built.exists() {
        bail!("the build finished but {} is missing", built.display());
    }
    Ok(built)
}

/// Copies under a temporary name and renames, so an interrupted copy is
/// never taken for a cached binary.
pub(crate) fn install_binary(from: &Path, to: &Path) -> Result<()> {
    let partial = to.with_extension("partial");
    fs::copy(from, &partial)
        .with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
    fs::rename(&partial, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}
