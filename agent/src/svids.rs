//! The SVIDs of this node's workloads: fetched from the identity source
//! when a pod is enrolled, renewed at half life, shared by every pod with
//! the same service account.
//!
//! Handlers see `None` until the first SVID arrives and must deny until
//! then (fail closed): a pod is captured before its identity is ready.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{sync::watch, task::AbortHandle};

use crate::{
    ca_service::{CaClient, CaClientError},
    identity::{CertificateAuthority, SpiffeId, Svid, TrustBundles},
};

/// Where SVIDs come from. Both sources only ever issue for
/// workloads on this node: the embedded CA because it only serves this
/// agent, the remote CA because it checks the node credential.
pub enum IdentitySource {
    /// Local mode: a CA inside the agent.
    Embedded {
        ca: Box<CertificateAuthority>,
        ttl: Option<Duration>,
    },
    /// Cluster mode: `ambit ca`, reached with the node's bootstrap credential.
    Remote(Box<CaClient>),
}

impl IdentitySource {
    pub fn bundles(&self) -> Result<Arc<TrustBundles>> {
        match self {
            Self::Embedded { ca, .. } => {
                let mut bundles = TrustBundles::new();
                bundles.add_root(ca.trust_domain().clone(), ca.root_certificate())?;
                Ok(Arc::new(bundles))
            }
            Self::Remote(client) => Ok(client.bundles()),
        }
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<Svid, FetchError> {
        match self {
            Self::Embedded { ca, ttl } => ca
                .issue_svid(id, *ttl)
                .map_err(|e| FetchError::Failed(e.into())),
            Self::Remote(client) => client.request_svid(id, None).await.map_err(|e| match e {
                CaClientError::Refused(_) => FetchError::Refused(e),
                other => FetchError::Failed(other.into()),
            }),
        }
    }
}

/// Why a fetch failed, as far as the retry schedule cares.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// The CA answered and said no.
    #[error(transparent)]
    Refused(CaClientError),
    /// Anything else: the CA is unreachable, slow or broken, or the embedded
    /// CA could not issue.
    #[error(transparent)]
    Failed(anyhow::Error),
}

impl FetchError {
    /// The retry delay after `previous`, before jitter.
    fn next_retry(&self, previous: Duration) -> Duration {
        let cap = match self {
            Self::Refused(_) => RETRY_MAX_REFUSED,
            Self::Failed(_) => RETRY_MAX_FAILED,
        };
        (previous * 2).min(cap)
    }
}

pub type SvidWatch = watch::Receiver<Option<Arc<Svid>>>;

/// Called after every renewal (the tunnel pool forgets its connections so
/// that new ones handshake with the new certificate).
pub type OnRotate = Arc<dyn Fn(&SpiffeId) + Send + Sync>;

pub struct SvidStore {
    source: Arc<IdentitySource>,
    bundles: Arc<TrustBundles>,
    on_rotate: OnRotate,
    watches: Mutex<HashMap<SpiffeId, Held>>,
}

/// One identity's SVID and the task that keeps it fresh.
struct Held {
    svid: SvidWatch,
    renewal: AbortHandle,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Retry delays after a failed fetch, doubling up to a cap.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Cap while the CA cannot be reached (or fails otherwise): it may be down
/// or overloaded, and every agent of the cluster is retrying.
const RETRY_MAX_FAILED: Duration = Duration::from_secs(10);
/// Cap while the CA answers with a refusal. At pod start that is the usual
/// case for a moment (the CA's pod cache has not yet seen the pod the
/// agent's has), and the pod cannot serve until its SVID arrives, so the
/// agent asks again soon; a refusal costs the CA one cache lookup.
const RETRY_MAX_REFUSED: Duration = Duration::from_secs(2);

impl SvidStore {
    pub fn new(source: IdentitySource, on_rotate: OnRotate) -> Result<Self> {
        let bundles = source.bundles().context("loading the trust bundle")?;
        Ok(Self {
            source: Arc::new(source),
            bundles,
            on_rotate,
            watches: Mutex::new(HashMap::new()),
        })
    }

    pub fn bundles(&self) -> Arc<TrustBundles> {
        Arc::clone(&self.bundles)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SpiffeId, Held>> {
        // Entries are inserted and removed whole: consistent after a panic.
        self.watches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every SVID currently held (for /certs and the expiry gauge).
    pub fn current(&self) -> Vec<Arc<Svid>> {
        self.lock()
            .values()
            .filter_map(|held| held.svid.borrow().clone())
            .collect()
    }

    /// Whether `id` has an SVID yet.
    pub fn has(&self, id: &SpiffeId) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|held| held.svid.borrow().is_some())
    }

    /// The live SVID of `id`, starting its fetch-and-renew task on first use.
    pub fn watch(&self, id: &SpiffeId) -> SvidWatch {
        let mut watches = self.lock();
        if let Some(existing) = watches.get(id) {
            return existing.svid.clone();
        }
        let (tx, rx) = watch::channel(None);
        let renewal = tokio::spawn(keep_fresh(
            Arc::clone(&self.source),
            id.clone(),
            tx,
            Arc::clone(&self.on_rotate),
        ))
        .abort_handle();
        watches.insert(
            id.clone(),
            Held {
                svid: rx.clone(),
                renewal,
            },
        );
        rx
    }

    /// Forgets every identity not in `in_use` (no enrolled pod has it any
    /// more): its SVID is dropped (the key zeroized) and its renewal stops.
    /// Returns the identities released.
    pub fn retain(&self, in_use: &HashSet<SpiffeId>) -> Vec<SpiffeId> {
        let mut released = Vec::new();
        self.lock().retain(|id, _| {
            let keep = in_use.contains(id);
            if !keep {
                released.push(id.clone());
            }
            keep
        });
        for id in &released {
            tracing::info!(spiffe_id = %id, "svid released: no enrolled workload uses it");
        }
        released
    }
}

/// Fetches `id`'s SVID, then renews it at every half life, forever. A
/// failed renewal is retried with backoff; the old SVID keeps serving until
/// it expires.
async fn keep_fresh(
    source: Arc<IdentitySource>,
    id: SpiffeId,
    tx: watch::Sender<Option<Arc<Svid>>>,
    on_rotate: OnRotate,
) {
    let mut retry = RETRY_MIN;
    loop {
        match source.fetch(&id).await {
            Ok(svid) => {
                retry = RETRY_MIN;
                let renew_in = svid
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let rotated = tx.borrow().is_some();
                tracing::info!(
                    spiffe_id = %id,
                    serial = %hex::encode(svid.serial()),
                    renew_in_secs = renew_in.as_secs(),
                    "{}", if rotated { "svid rotated" } else { "svid issued" }
                );
                tx.send_replace(Some(Arc::new(svid)));
                if rotated {
                    on_rotate(&id);
                }
                tokio::time::sleep(renew_in).await;
            }
            Err(e) => {
                // Jittered, so the agents of a cluster that all lost the CA
                // at once do not come back to it in lockstep.
                let delay = jittered(retry);
                tracing::warn!(spiffe_id = %id, error = %format!("{e:#}"),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "cannot obtain svid");
                tokio::time::sleep(delay).await;
                retry = e.next_retry(retry);
            }
        }
    }
}

/// A delay drawn uniformly from [delay / 2, delay].
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full_delay_and_varies() {
        let base = Duration::from_secs(8);
        let delays: Vec<Duration> = (0..200).map(|_| jittered(base)).collect();
        assert!(delays.iter().all(|d| *d >= base / 2 && *d <= base));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "{} distinct delays", distinct.len());
    }

    /// The delays a run of identical failures produces, from the first.
    fn schedule(error: &FetchError, failures: usize) -> Vec<Duration> {
        std::iter::successors(Some(RETRY_MIN), |d| Some(error.next_retry(*d)))
            .take(failures)
            .collect()
    }

    #[test]
    fn a_refusal_is_retried_sooner_than_an_unreachable_ca() {
        let refused = FetchError::Refused(CaClientError::Refused("pod not on node".into()));
        let unreachable = FetchError::Failed(anyhow::anyhow!("connection refused"));
        let ms = |d: Vec<Duration>| d.iter().map(Duration::as_millis).collect::<Vec<_>>();
        assert_eq!(
            ms(schedule(&refused, 8)),
            [200, 400, 800, 1600, 2000, 2000, 2000, 2000]
        );
        assert_eq!(
            ms(schedule(&unreachable, 8)),
            [200, 400, 800, 1600, 3200, 6400, 10000, 10000]
        );
    }
}
