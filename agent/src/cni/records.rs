//! The agent's record of CNI ADDs: for each pod the plugin announced, its
//! network namespace and addresses, kept as one file per pod under
//! `<state dir>/pods/` so that a restarted agent finds the pods it captured
//! (and those added while it was down, once the kubelet's retry reached it)
//! without waiting for the API server to report them Running.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::workloads::kubernetes::netns_locator::{NetnsLocator, ProcNetnsLocator};

/// What the plugin told the agent about one pod on ADD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetwork {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The netns path as the runtime gave it.
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub container_id: String,
}

/// Every recorded pod by uid, and the uids DEL released since (so that a pod
/// the API still lists while it terminates is not captured again).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniPods {
    pub pods: BTreeMap<String, PodNetwork>,
    pub released: BTreeSet<String>,
}

/// How many released uids are remembered; the oldest are forgotten first
/// (by then the API server has long deleted those pods).
const RELEASED_KEPT: usize = 4096;

/// The records on disk and their in-memory copy, published to the
/// Kubernetes workload source on every change.
pub struct RecordStore {
    dir: PathBuf,
    pods: watch::Sender<Arc<CniPods>>,
    /// Release order, for forgetting the oldest.
    released_order: Mutex<Vec<String>>,
}

/// A uid names a file: only what Kubernetes uids are made of.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl RecordStore {
    /// Opens (creating, mode 0700) `dir` and loads its records, dropping
    /// those whose network namespace is gone (the pod died while the agent
    /// was down) and any that cannot be read.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the CNI record directory {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to root", dir.display()))?;
        let mut pods = BTreeMap::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            match load(&path) {
                Ok(Some(record)) if record.netns.exists() => {
                    pods.insert(record.uid.clone(), record);
                }
                Ok(Some(record)) => {
                    tracing::info!(pod = %format!("{}/{}", record.namespace, record.name),
                        netns = %record.netns.display(), "dropping the CNI record of a pod whose netns is gone");
                    remove_file(&path);
                }
                Ok(None) => remove_file(&path),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %format!("{e:#}"),
                        "dropping an unreadable CNI record");
                    remove_file(&path);
                }
            }
        }
        tracing::info!(dir = %dir.display(), records = pods.len(), "CNI records loaded");
        let (tx, _) = watch::channel(Arc::new(CniPods {
            pods,
            released: BTreeSet::new(),
        }));
        Ok(Self {
            dir: dir.to_path_buf(),
            pods: tx,
            released_order: Mutex::new(Vec::new()),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<CniPods>> {
        self.pods.subscribe()
    }

    pub fn get(&self, uid: &str) -> Option<PodNetwork> {
        self.pods.borrow().pods.get(uid).cloned()
    }

    /// Persists `record` (temp file, fsync, rename: a crash leaves the old
    /// record or the new one), then publishes it.
    pub fn add(&self, record: PodNetwork) -> Result<()> {
        anyhow::ensure!(valid_uid(&record.uid), "invalid pod uid {:?}", record.uid);
        let path = self.file(&record.uid);
        let tmp = self.dir.join(format!(".{}.tmp", record.uid));
        let bytes = serde_json::to_vec(&record)?;
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing the CNI record {}", path.display()))?;
        self.pods.send_modify(|current| {
            let next = Arc::make_mut(current);
            next.released.remove(&record.uid);
            next.pods.insert(record.uid.clone(), record);
        });
        Ok(())
    }

    /// Forgets the pod (idempotent) and returns what was recorded.
    pub fn remove(&self, uid: &str) -> Result<Option<PodNetwork>> {
        if valid_uid(uid) {
            match fs::remove_file(self.file(uid)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing the CNI record of {uid}"));
                }
            }
        }
        let mut order = self
            .released_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut removed = None;
        self.pods.send_modify(|current| {
            let next = Arc::make_mut(current);
            removed = next.pods.remove(uid);
            if next.released.insert(uid.to_string()) {
                order.push(uid.to_string());
                if order.len() > RELEASED_KEPT {
                    let oldest = order.remove(0);
                    next.released.remove(&oldest);
                }
            }
        });
        Ok(removed)
    }

    fn file(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }
}

/// `None` for files that are not records (a temp file left by a crash).
fn load(path: &Path) -> Result<Option<PodNetwork>> {
    if path.extension().is_none_or(|e| e != "json") {
        return Ok(None);
    }
    let record: PodNetwork = serde_json::from_slice(&fs::read(path)?)?;
    let named = path.file_stem().and_then(|s| s.to_str()) == Some(record.uid.as_str());
    anyhow::ensure!(named, "the record's uid is not its file name");
    Ok(Some(record))
}

fn remove_file(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(file = %path.display(), error = %e, "cannot remove a stale CNI record");
    }
}

/// Records first (every pod added through CNI), then /proc for pods that
/// predate the plugin's installation; a pod DEL released is not looked for.
pub struct RecordedNetnsLocator {
    records: watch::Receiver<Arc<CniPods>>,
    fallback: ProcNetnsLocator,
}

impl RecordedNetnsLocator {
    pub fn new(records: watch::Receiver<Arc<CniPods>>, fallback: ProcNetnsLocator) -> Self {
        Self { records, fallback }
    }
}

impl NetnsLocator for RecordedNetnsLocator {
    fn locate(&self, pod_uid: &str) -> Option<PathBuf> {
        {
            let records = self.records.borrow();
            if let Some(record) = records.pods.get(pod_uid) {
                return Some(record.netns.clone());
            }
            if records.released.contains(pod_uid) {
                return None;
            }
        }
        self.fallback.locate(pod_uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str, netns: &Path) -> PodNetwork {
        PodNetwork {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("pod-{uid}"),
            netns: netns.to_path_buf(),
            ips: vec!["198.18.240.5".parse().unwrap()],
            container_id: "c".into(),
        }
    }

    #[test]
    fn records_survive_a_restart_unless_their_netns_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let live = dir.path().join("netns-live");
        fs::write(&live, "").unwrap();
        let gone = dir.path().join("netns-gone");
        let store = RecordStore::open(&pods).unwrap();
        store.add(record("u-live", &live)).unwrap();
        store.add(record("u-gone", &gone)).unwrap();
        store.add(record("u-del", &live)).unwrap();
        assert_eq!(store.remove("u-del").unwrap().unwrap().uid, "u-del");
        assert_eq!(store.remove("u-del").unwrap(), None, "DEL is idempotent");
        fs::write(pods.join("garbage.json"), "{").unwrap();
        fs::write(pods.join(".u-x.tmp"), "partial").unwrap();
        let mode = fs::metadata(&pods).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(store);

        let store = RecordStore::open(&pods).unwrap();
        let loaded = store.subscribe().borrow().clone();
        assert_eq!(loaded.pods.keys().collect::<Vec<_>>(), ["u-live"]);
        assert_eq!(loaded.pods["u-live"], record("u-live", &live));
        let left: Vec<_> = fs::read_dir(&pods)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["u-live.json"]);
    }

    #[test]
    fn the_locator_prefers_records_and_skips_released_pods() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(&dir.path().join("pods")).unwrap();
        let proc = dir.path().join("proc");
        fs::create_dir_all(proc.join("7")).unwrap();
        fs::write(proc.join("7/cgroup"), "0::/kubepods/podu-proc\n").unwrap();
        let locator = RecordedNetnsLocator::new(store.subscribe(), ProcNetnsLocator::new(&proc));
        store
            .add(record("u-rec", Path::new("/run/netns/x")))
            .unwrap();
        assert_eq!(locator.locate("u-rec"), Some(PathBuf::from("/run/netns/x")));
        assert_eq!(locator.locate("u-proc"), Some(proc.join("7/ns/net")));
        store.remove("u-proc").unwrap();
        assert_eq!(locator.locate("u-proc"), None);
        store
            .add(record("u-proc", Path::new("/run/netns/y")))
            .unwrap();
        assert_eq!(
            locator.locate("u-proc"),
            Some(PathBuf::from("/run/netns/y"))
        );
    }

    #[test]
    fn uids_that_are_not_file_names_are_refused() {
        assert!(valid_uid("0f9a1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b"));
        for bad in ["", "../x", "a/b", "a.json", &"x".repeat(200)] {
            assert!(!valid_uid(bad), "{bad}");
        }
    }
}
