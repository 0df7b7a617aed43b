//! Hot reload: poll a policy directory and publish each valid new set.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ring::digest::{Context, SHA256};
use tokio::sync::watch;

use super::{LoadErrors, PolicySet, Settings, load};

/// How many candidate sets were rejected; shared with the watcher task so
/// metrics can export it (`ambit_policy_reload_rejections_total`, say).
#[derive(Clone, Debug, Default)]
pub struct Rejections(Arc<AtomicU64>);

impl Rejections {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one rejected candidate whose errors were logged elsewhere
    /// (an invalid AuthorizationPolicy object).
    pub(super) fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one rejected set and logs each of its errors, saying what
    /// is served instead (`consequence`).
    fn record(&self, errors: &LoadErrors, consequence: &str) {
        self.0.fetch_add(1, Ordering::Relaxed);
        for error in &errors.0 {
            tracing::error!(
                file = %error.file.display(),
                line = error.line(),
                column = error.column(),
                reason = %error.reason,
                "invalid policy: {error}; {consequence}"
            );
        }
    }
}

pub struct PolicyWatch {
    /// The first load: on error the receiver holds a fail-closed set
    /// (denies everything) until a valid set appears.
    pub initial: Result<(), LoadErrors>,
    pub sets: watch::Receiver<Arc<PolicySet>>,
    pub rejections: Rejections,
}

/// Loads `dir` now and then polls it every `interval`, comparing a hash of
/// the file names and contents (as `workloads::file::watch` does: no
/// inotify, which misses ConfigMap symlink swaps and network filesystems).
/// Only valid sets are published; each rejected one is logged at ERROR
/// with file:line:column and counted. Must be called within a Tokio
/// runtime; the task ends when every receiver is dropped.
pub fn watch_dir(dir: &Path, settings: Settings, interval: Duration) -> PolicyWatch {
    let paths = vec![dir.to_path_buf()];
    let rejections = Rejections::default();
    let (sources, fingerprint) = read(&paths);
    let (initial_set, initial) = match sources.and_then(|s| load::build(&s, settings.clone())) {
        Ok(set) => {
            tracing::info!(
                dir = %dir.display(),
                policies = set.len(),
                files = set.files().len(),
                "policy set loaded"
            );
            (set, Ok(()))
        }
        Err(errors) => {
            rejections.record(&errors, "denying every connection until it is fixed");
            (PolicySet::fail_closed(settings.clone()), Err(errors))
        }
    };
    let (tx, rx) = watch::channel(Arc::new(initial_set));
    let task_rejections = rejections.clone();
    let mut serving_good_set = initial.is_ok();
    tokio::spawn(async move {
        let mut last = fingerprint;
        // tokio panics on a zero period.
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let paths = paths.clone();
            let settings = settings.clone();
            let Ok((changed, fingerprint)) = tokio::task::spawn_blocking(move || {
                let (sources, fingerprint) = read(&paths);
                let changed =
                    (fingerprint != last).then(|| sources.and_then(|s| load::build(&s, settings)));
                (changed, fingerprint)
            })
            .await
            else {
                continue;
            };
            last = fingerprint;
            match changed {
                None => {}
                Some(Ok(set)) => {
                    tracing::info!(
                        policies = set.len(),
                        files = set.files().len(),
                        "policy files changed; new policy set in force"
                    );
                    if tx.send(Arc::new(set)).is_err() {
                        return;
                    }
                    serving_good_set = true;
                }
                Some(Err(errors)) => task_rejections.record(
                    &errors,
                    if serving_good_set {
                        "keeping the last good policy set"
                    } else {
                        "still denying every connection (no valid policy set yet)"
                    },
                ),
            }
        }
    });
    PolicyWatch {
        initial,
        sets: rx,
        rejections,
    }
}

type Sources = Result<Vec<(PathBuf, String)>, LoadErrors>;

/// The policy files and a fingerprint of what was read (an unreadable
/// directory has one too, so a lasting error is logged once).
fn read(paths: &[PathBuf]) -> (Sources, [u8; 32]) {
    let sources = load::read_sources(paths);
    let mut hash = Context::new(&SHA256);
    match &sources {
        Ok(files) => {
            for (path, text) in files {
                // Lengths first, so ("a", "bc") and ("ab", "c") differ.
                let path = path.as_os_str().as_encoded_bytes();
                hash.update(&(path.len() as u64).to_le_bytes());
                hash.update(path);
                hash.update(&(text.len() as u64).to_le_bytes());
                hash.update(text.as_bytes());
            }
        }
        Err(errors) => {
            hash.update(b"error");
            hash.update(errors.to_string().as_bytes());
        }
    }
    let fingerprint = hash
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes");
    (sources, fingerprint)
}
