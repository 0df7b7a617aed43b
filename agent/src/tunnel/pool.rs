//! Tunnel connection reuse: one multiplexed connection per key.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{HboneClient, TunnelError};

/// Keeps one live [`HboneClient`] per key (in the agent: source identity and
/// destination address) and shares it between callers, so a new application
/// connection costs one CONNECT stream rather than a TLS handshake.
///
/// Cloning is cheap; clones share the pool.
pub struct TunnelPool<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    slots: Mutex<HashMap<K, Arc<Slot>>>,
    opened: AtomicU64,
}

/// One key's connection. The async mutex is what makes concurrent callers
/// share a handshake: the first one connects while holding it, the others
/// wait on it and then use its outcome.
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Connection attempts finished (success or failure). Read before
    /// waiting on `state`, it tells a waiter whether an attempt ended while
    /// it waited, whose outcome is then its own.
    attempts: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    client: Option<HboneClient>,
    /// The last attempt's error, for the callers that waited on it. It is
    /// never reused by later callers: they try again.
    last_error: Option<TunnelError>,
}

impl<K> TunnelPool<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                slots: Mutex::new(HashMap::new()),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// The pooled connection for `key`, or a new one from `connect` (which
    /// should dial, run TLS and call [`HboneClient::handshake`]).
    ///
    /// Concurrent callers for one key share a single `connect` run; if it
    /// fails they all get its error, and the next call tries again. A
    /// connection that has closed (or received GOAWAY) is replaced.
    pub async fn get_or_connect<F, Fut>(
        &self,
        key: K,
        connect: F,
    ) -> Result<HboneClient, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneClient, TunnelError>>,
    {
        let slot = self.slot(key);
        let seen = slot.attempts.load(Ordering::Acquire);
        let mut state = slot.state.lock().await;
        if let Some(client) = &state.client
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        // An attempt that ended while we waited and left no live client
        // failed: we were among its waiters, so its error is ours.
        if slot.attempts.load(Ordering::Acquire) != seen
            && let Some(e) = &state.last_error
        {
            return Err(e.clone());
        }
        state.client = None;
        // If this future is dropped while connecting, the lock is released
        // with no attempt counted, and the next waiter connects instead.
        let outcome = connect().await;
        match &outcome {
            Ok(client) => {
                self.inner.opened.fetch_add(1, Ordering::Relaxed);
                state.client = Some(client.clone());
                state.last_error = None;
            }
            Err(e) => state.last_error = Some(e.clone()),
        }
        slot.attempts.fetch_add(1, Ordering::Release);
        outcome
    }

    /// Forgets every pooled connection without closing it: streams already
    /// open keep running, and each connection ends once its last stream
    /// does. Later calls connect again, e.g. with a rotated certificate.
    pub fn evict_all(&self) {
        self.lock_slots().clear();
    }

    /// Successful connects so far (shows how well pooling works).
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// The slot for `key`, created if missing. Creating one first drops
    /// unused slots whose connection is gone, so keys for destinations no
    /// longer used do not accumulate.
    fn slot(&self, key: K) -> Arc<Slot> {
        let mut slots = self.lock_slots();
        if let Some(slot) = slots.get(&key) {
            return slot.clone();
        }
        slots.retain(|_, slot| !is_unused_and_dead(slot));
        slots.entry(key).or_default().clone()
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<Slot>>> {
        // The map is only ever inserted into or pruned, each in one step, so
        // it is consistent even if a holder panicked.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// No caller holds the slot (only the map does, and the map lock is held,
/// so none can take it meanwhile) and it has no live connection.
fn is_unused_and_dead(slot: &Arc<Slot>) -> bool {
    Arc::strong_count(slot) == 1
        && slot
            .state
            .try_lock()
            .is_ok_and(|state| state.client.as_ref().is_none_or(HboneClient::is_closed))
}

impl<K> Clone for TunnelPool<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K> Default for TunnelPool<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K> fmt::Debug for TunnelPool<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelPool")
            .field(
                "connections_opened",
                &self.inner.opened.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        task::AbortHandle,
    };

    use super::*;
    use crate::tunnel::test_support::{echo, spawn_server, within};

    const KEY: &str = "spiffe://cluster.local/ns/a/sa/a -> 10.0.0.2:15008";

    /// Connects to a fresh echo server, recording its task so a test can
    /// kill the connection from the server side. The pause widens the
    /// window in which concurrent callers could race into a second
    /// handshake.
    async fn dial(servers: Arc<Mutex<Vec<AbortHandle>>>) -> Result<HboneClient, TunnelError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (io, server) = spawn_server(echo);
        servers
            .lock()
            .expect("servers lock")
            .push(server.abort_handle());
        HboneClient::handshake(io).await
    }

    fn servers() -> Arc<Mutex<Vec<AbortHandle>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    /// Proves `client` still carries data end to end.
    async fn assert_works(client: &HboneClient) {
        let mut stream = client
            .connect("10.0.0.2:80".parse().expect("addr"))
            .await
            .expect("connect");
        stream.write_all(b"ok?").await.expect("write");
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ok?");
    }

    #[tokio::test]
    async fn sequential_gets_reuse_one_connection() {
        within(async {
            let pool = TunnelPool::new();
            let servers = servers();
            for _ in 0..20 {
                let client = pool
                    .get_or_connect(KEY, || dial(servers.clone()))
                    .await
                    .expect("get");
                assert_works(&client).await;
            }
            assert_eq!(pool.connections_opened(), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_gets_share_one_handshake() {
        within(async {
            let pool = TunnelPool::new();
            let servers = servers();
            let dials = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let (pool, servers, dials) = (pool.clone(), servers.clone(), dials.clone());
                    tokio::spawn(async move {
                        pool.get_or_connect(KEY, || {
                            dials.fetch_add(1, Ordering::SeqCst);
                            dial(servers)
                        })
                        .await
                    })
                })
                .collect();
            for task in tasks {
                let client = task.await.expect("task").expect("get");
                assert_works(&client).await;
            }
            assert_eq!(dials.load(Ordering::SeqCst), 1);
            assert_eq!(pool.connections_opened(), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn closed_connection_is_replaced() {
        within(async {
            let pool = TunnelPool::new();
            let servers = servers();
            let first = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get");
            for server in servers.lock().expect("servers lock").iter() {
                server.abort();
            }
            first.closed().await;

            let second = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get after close");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(&second).await;
        })
        .await;
    }

    #[tokio::test]
    async fn evict_all_keeps_open_streams_running() {
        within(async {
            let pool = TunnelPool::new();
            let servers = servers();
            let old = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get");
            let mut old_stream = old
                .connect("10.0.0.2:80".parse().expect("addr"))
                .await
                .expect("connect");
            drop(old);

            pool.evict_all();
            let new = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get after evict");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(&new).await;

            // The stream opened before eviction still carries data both ways.
            old_stream.write_all(b"still here").await.expect("write");
            old_stream.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            old_stream.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"still here");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failed_connect_reaches_every_waiter_then_retries() {
        within(async {
            let pool = TunnelPool::new();
            let dials = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..10)
                .map(|_| {
                    let (pool, dials) = (pool.clone(), dials.clone());
                    tokio::spawn(async move {
                        pool.get_or_connect(KEY, || async move {
                            dials.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Err(io::Error::from(io::ErrorKind::ConnectionRefused).into())
                        })
                        .await
                    })
                })
                .collect();
            for task in tasks {
                match task.await.expect("task") {
                    Err(TunnelError::Io(e)) => {
                        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused)
                    }
                    other => panic!("expected the shared dial error, got {other:?}"),
                }
            }
            assert_eq!(dials.load(Ordering::SeqCst), 1);
            assert_eq!(pool.connections_opened(), 0);

            // The failure is not cached: the next call dials again.
            let servers = servers();
            let client = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("retry");
            assert_eq!(pool.connections_opened(), 1);
            assert_works(&client).await;
        })
        .await;
    }

    #[tokio::test]
    async fn keys_get_separate_connections_and_dead_ones_are_pruned() {
        within(async {
            let pool = TunnelPool::new();
            let servers = servers();
            let a = pool
                .get_or_connect("a", || dial(servers.clone()))
                .await
                .expect("a");
            pool.get_or_connect("b", || dial(servers.clone()))
                .await
                .expect("b");
            assert_eq!(pool.connections_opened(), 2);
            assert_eq!(pool.lock_slots().len(), 2);

            servers.lock().expect("servers lock")[0].abort();
            a.closed().await;
            drop(a);
            // A new key sweeps out the dead one.
            pool.get_or_connect("c", || dial(servers.clone()))
                .await
                .expect("c");
            let mut keys: Vec<_> = pool.lock_slots().keys().copied().collect();
            keys.sort_unstable();
            assert_eq!(keys, ["b", "c"]);
        })
        .await;
    }
}
