//! The engine the proxy asks: the current policy set, swapped atomically
//! on reload, and a decision cache that never outlives the set it came
//! from.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{sync::watch, task::JoinHandle};

use super::{Decision, PolicySet, Request};
use crate::{identity::SpiffeId, workloads::Labels};

/// Cached decisions per set; past this the cache is emptied and refilled
/// (cheap, and bounds memory whatever peers and ports show up).
pub const DEFAULT_CACHE_CAPACITY: usize = 65_536;

pub struct Engine {
    current: RwLock<Arc<Snapshot>>,
    capacity: usize,
    hasher: RandomState,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A set with its own cache: replacing the snapshot drops the cache with
/// it, so a decision computed from an old set can never be stored where
/// the new set's lookups would find it, however evaluation and reload
/// interleave.
struct Snapshot {
    set: Arc<PolicySet>,
    generation: u64,
    cache: RwLock<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Keyed by a hash of the request so a lookup allocates nothing;
    /// entries are compared in full.
    buckets: HashMap<u64, Vec<Entry>>,
    len: usize,
}

struct Entry {
    source: Option<SpiffeId>,
    namespace: String,
    name: String,
    /// Part of the key because a workload's labels can change (workloads
    /// file reload) while its name stays: policies select by label.
    labels: Labels,
    port: u16,
    decision: Arc<Decision>,
}

impl Entry {
    fn is_for(&self, request: &Request<'_>) -> bool {
        let d = &request.destination;
        self.port == request.port
            && self.source.as_ref() == request.source
            && self.name == d.name
            && self.namespace == d.namespace
            && self.labels == *d.labels
    }
}

/// Counters of the decision cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Decisions cached for the current set.
    pub entries: usize,
}

impl Engine {
    pub fn new(set: Arc<PolicySet>) -> Self {
        Self::with_cache_capacity(set, DEFAULT_CACHE_CAPACITY)
    }

    /// `capacity` 0 disables caching.
    pub fn with_cache_capacity(set: Arc<PolicySet>, capacity: usize) -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::new(set, 0))),
            capacity,
            hasher: RandomState::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Serves `set` from now on and empties the cache. Returns the new
    /// generation (0 is the set the engine was created with).
    pub fn replace(&self, set: Arc<PolicySet>) -> u64 {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let generation = current.generation + 1;
        *current = Arc::new(Snapshot::new(set, generation));
        generation
    }

    pub fn current(&self) -> Arc<PolicySet> {
        Arc::clone(&self.snapshot().set)
    }

    /// How many times the set was replaced.
    pub fn generation(&self) -> u64 {
        self.snapshot().generation
    }

    pub fn decide(&self, request: &Request<'_>) -> Arc<Decision> {
        let snapshot = self.snapshot();
        let hash = self.hash(request);
        if let Some(decision) = snapshot.lookup(hash, request) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return decision;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let decision = Arc::new(snapshot.set.evaluate(request));
        if self.capacity > 0 {
            snapshot.insert(hash, request, Arc::clone(&decision), self.capacity);
        }
        decision
    }

    pub fn cache_stats(&self) -> CacheStats {
        let snapshot = self.snapshot();
        let cache = snapshot
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: cache.len,
        }
    }

    /// Forgets cached decisions, e.g. after the workloads changed in a way
    /// the cache key does not capture.
    pub fn clear_cache(&self) {
        let snapshot = self.snapshot();
        *snapshot
            .cache
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Cache::default();
    }

    /// Serves every set `sets` publishes (the current one first) until the
    /// sender is dropped. Must be called within a Tokio runtime.
    pub fn follow(self: &Arc<Self>, mut sets: watch::Receiver<Arc<PolicySet>>) -> JoinHandle<()> {
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let set = Arc::clone(&sets.borrow_and_update());
                let generation = engine.replace(set);
                tracing::debug!(generation, "policy set replaced");
                if sets.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn hash(&self, request: &Request<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        request.source.map(SpiffeId::as_str).hash(&mut h);
        request.destination.namespace.hash(&mut h);
        request.destination.name.hash(&mut h);
        request.port.hash(&mut h);
        h.finish()
    }
}

impl Snapshot {
    fn new(set: Arc<PolicySet>, generation: u64) -> Self {
        Self {
            set,
            generation,
            cache: RwLock::default(),
        }
    }

    fn lookup(&self, hash: u64, request: &Request<'_>) -> Option<Arc<Decision>> {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        cache
            .buckets
            .get(&hash)?
            .iter()
            .find(|e| e.is_for(request))
            .map(|e| Arc::clone(&e.decision))
    }

    fn insert(&self, hash: u64, request: &Request<'_>, decision: Arc<Decision>, capacity: usize) {
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let bucket = cache.buckets.get(&hash);
        // Another thread may have decided the same request meanwhile.
        if bucket.is_some_and(|b| b.iter().any(|e| e.is_for(request))) {
            return;
        }
        if cache.len >= capacity {
            *cache = Cache::default();
        }
        let d = &request.destination;
        cache.buckets.entry(hash).or_default().push(Entry {
            source: request.source.cloned(),
            namespace: d.namespace.to_owned(),
            name: d.name.to_owned(),
            labels: d.labels.clone(),
            port: request.port,
            decision,
        });
        cache.len += 1;
    }
}
