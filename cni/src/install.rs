//! Installing the plugin on a node and removing it again: the binary into
//! the CNI bin dir, an entry at the end of the active network config's
//! plugin chain. Every write is a temp file renamed into place, so the
//! runtime never reads half a file. The original config is kept beside it
//! (`<file>.ambit-cni-orig`, an extension runtimes do not load) and put
//! back on uninstall, so the host's config ends byte-identical.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde_json::{json, value::RawValue};

use crate::conflist::{Ordered, plugin_type};

/// The plugin's `type`, which is also its binary's name.
pub const PLUGIN_TYPE: &str = "ambit-cni";
/// Suffix of the kept original beside a config this installer changed.
pub const BACKUP_SUFFIX: &str = ".ambit-cni-orig";
const TEMP_SUFFIX: &str = ".ambit-cni-tmp";
/// What libcni (containerd, CRI-O) loads from the conf dir.
const CONFIG_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// The plugin's entry in the chain.
#[derive(Clone, Debug)]
pub struct Entry {
    pub agent_socket: String,
    pub kubeconfig: Option<String>,
    pub timeout_ms: u64,
}

impl Entry {
    fn to_raw(&self) -> Result<Box<RawValue>> {
        let mut entry = json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "timeoutMs": self.timeout_ms,
        });
        if let Some(kubeconfig) = &self.kubeconfig {
            entry["kubeconfig"] = kubeconfig.clone().into();
        }
        Ok(serde_json::value::to_raw_value(&entry)?)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The entry was added to this file.
    Added(PathBuf),
    /// A single-plugin `.conf` became this `.conflist` (the `.conf` is kept as the backup).
    Converted { from: PathBuf, to: PathBuf },
    /// The file already had the entry; nothing was written.
    AlreadyPresent(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Uninstalled {
    /// The kept original was put back as it was.
    Restored(PathBuf),
    /// The file changed since install: only the entry was taken out.
    EntryRemoved(PathBuf),
    /// No config carries the entry.
    NothingToRemove,
}

/// The config the runtime uses: `name` if given, else the lexically first
/// `*.conf`, `*.conflist` or `*.json` in `conf_dir` (as libcni picks it).
pub fn active_config(conf_dir: &Path, name: Option<&str>) -> Result<Option<PathBuf>> {
    if let Some(name) = name {
        let path = conf_dir.join(name);
        // After a .conf conversion the chain lives in the .conflist beside it.
        if !path.exists() && has_extension(&path, "conf") {
            return Ok(Some(path.with_extension("conflist")));
        }
        return Ok(Some(path));
    }
    let mut configs: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("reading CNI conf dir {}", conf_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .filter(|path| CONFIG_EXTENSIONS.iter().any(|ext| has_extension(path, ext)))
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    name: Option<&str>,
    entry: &Entry,
    binary: &Path,
) -> Result<Installed> {
    // The binary first: a config naming a missing plugin fails every pod.
    install_binary(binary, bin_dir)?;
    let Some(target) = active_config(conf_dir, name)? else {
        bail!(
            "no CNI network config in {} yet: install the cluster's network plugin first \
             (ambit-cni chains after it)",
            conf_dir.display()
        );
    };
    let original = fs::read(&target).with_context(|| format!("reading {}", target.display()))?;
    let mut conf = Ordered::parse(&original)
        .with_context(|| format!("parsing CNI config {}", target.display()))?;
    if has_entry(&conf)? {
        return Ok(Installed::AlreadyPresent(target));
    }
    if conf.is_list() {
        let mut plugins = conf.plugins()?;
        plugins.push(entry.to_raw()?);
        conf.set_plugins(&plugins)?;
        write_atomic(&backup_of(&target), &original)?;
        write_atomic(&target, &conf.to_pretty()?)?;
        return Ok(Installed::Added(target));
    }
    // A single-plugin .conf cannot chain: the same network as a .conflist
    // with the plugin first and ours after it.
    let list_path = target.with_extension("conflist");
    if list_path.exists() {
        bail!(
            "{} is a single-plugin config and {} already exists: name the config to chain into \
             with --conflist",
            target.display(),
            list_path.display()
        );
    }
    let mut list = Ordered(Vec::new());
    for key in ["cniVersion", "name"] {
        let value = conf.string(key).unwrap_or_default();
        list.0
            .push((key.into(), serde_json::value::to_raw_value(&value)?));
    }
    let single = serde_json::value::to_raw_value(&conf)?;
    list.set_plugins(&[single, entry.to_raw()?])?;
    write_atomic(&list_path, &list.to_pretty()?)?;
    // Until this rename the .conf sorts first and stays the active one.
    fs::rename(&target, backup_of(&target))
        .with_context(|| format!("moving {} aside", target.display()))?;
    Ok(Installed::Converted {
        from: target,
        to: list_path,
    })
}

pub fn uninstall(conf_dir: &Path, bin_dir: &Path, name: Option<&str>) -> Result<Uninstalled> {
    let result = remove_entry(conf_dir, name)?;
    remove_binary(bin_dir)?;
    Ok(result)
}

fn remove_entry(conf_dir: &Path, name: Option<&str>) -> Result<Uninstalled> {
    let Some(target) = active_config(conf_dir, name)?.filter(|p| p.exists()) else {
        return Ok(Uninstalled::NothingToRemove);
    };
    let current = fs::read(&target).with_context(|| format!("reading {}", target.display()))?;
    let mut conf = Ordered::parse(&current)
        .with_context(|| format!("parsing CNI config {}", target.display()))?;
    let same_backup = backup_of(&target);
    let conf_backup = backup_of(&target.with_extension("conf"));
    if !has_entry(&conf)? {
        // Rewritten by someone else since (the primary plugin's agent, say):
        // the kept original is stale.
        remove_if_present(&same_backup)?;
        return Ok(Uninstalled::NothingToRemove);
    }
    let plugins: Vec<Box<RawValue>> = conf
        .plugins()?
        .into_iter()
        .filter(|p| plugin_type(p).as_deref() != Some(PLUGIN_TYPE))
        .collect();
    conf.set_plugins(&plugins)?;
    let stripped = conf.to_value()?;

    if let Some(original) = read_if_present(&same_backup)? {
        if Ordered::parse(&original)?.to_value()? == stripped {
            fs::rename(&same_backup, &target)
                .with_context(|| format!("restoring {}", target.display()))?;
            return Ok(Uninstalled::Restored(target));
        }
    } else if let Some(original) = read_if_present(&conf_backup)? {
        let single = Ordered::parse(&original)?.to_value()?;
        let only_it = plugins.len() == 1
            && serde_json::from_str::<serde_json::Value>(plugins[0].get())? == single;
        if only_it {
            let conf_path = target.with_extension("conf");
            // The .conf sorts first, so it is active again before the list goes.
            fs::rename(&conf_backup, &conf_path)
                .with_context(|| format!("restoring {}", conf_path.display()))?;
            remove_if_present(&target)?;
            return Ok(Uninstalled::Restored(conf_path));
        }
    }
    write_atomic(&target, &conf.to_pretty()?)?;
    remove_if_present(&same_backup)?;
    remove_if_present(&conf_backup)?;
    Ok(Uninstalled::EntryRemoved(target))
}

fn has_entry(conf: &Ordered) -> Result<bool> {
    Ok(conf
        .plugins()?
        .iter()
        .any(|p| plugin_type(p).as_deref() == Some(PLUGIN_TYPE)))
}

fn install_binary(binary: &Path, bin_dir: &Path) -> Result<()> {
    let dest = bin_dir.join(PLUGIN_TYPE);
    if fs::canonicalize(binary).ok() == fs::canonicalize(&dest).ok() && dest.exists() {
        return Ok(());
    }
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    write_atomic(&dest, &bytes)?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", dest.display()))
}

fn remove_binary(bin_dir: &Path) -> Result<()> {
    remove_if_present(&bin_dir.join(PLUGIN_TYPE))
}

/// Temp file beside the target (same filesystem), synced, then renamed over it.
/// The temp name ends in a suffix runtimes do not load.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(TEMP_SUFFIX);
    let temp = PathBuf::from(temp);
    let mut file =
        fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    if let Ok(meta) = fs::metadata(path) {
        fs::set_permissions(&temp, meta.permissions())?;
    }
    fs::rename(&temp, path).with_context(|| format!("renaming {} into place", path.display()))
}

fn backup_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
}
