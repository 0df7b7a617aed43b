//! Tunnel connection reuse: a few multiplexed connections per key.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{
    CloseReason, HboneClient, HboneStream, TunnelConfig, TunnelError,
    early::{Early, EarlySource, NoEarly},
    usage::StreamPermit,
};

/// Keeps live [`HboneClient`]s per key (in the agent: source identity and
/// destination address) and shares them between callers, so a new
/// application connection costs one CONNECT stream rather than a TLS
/// handshake.
///
/// A caller gets a stream slot on the least loaded connection below the
/// peer's concurrent stream limit. While the key has fewer than
/// [`TunnelConfig::parallel_connections_per_peer`] connections and every one
/// carries a stream, another is opened (spreading load over cores). When
/// every connection is full, another is opened, up to
/// [`TunnelConfig::max_connections_per_peer`]; past that, callers wait
/// (bounded) for a stream to end. Connections that die, go
/// idle or close leave the pool on their own.
///
/// Cloning is cheap; clones share the pool.
pub struct TunnelPool<K> {
    inner: Arc<Inner<K>>,
}

/// Told when pooled connections open and close (metrics).
pub trait PoolObserver: Send + Sync {
    fn connection_opened(&self);
    fn connection_closed(&self, reason: CloseReason);
}

struct Unobserved;

impl PoolObserver for Unobserved {
    fn connection_opened(&self) {}
    fn connection_closed(&self, _: CloseReason) {}
}

struct Inner<K> {
    slots: Mutex<HashMap<K, Arc<Slot>>>,
    opened: AtomicU64,
    config: TunnelConfig,
    observer: Arc<dyn PoolObserver>,
}

/// One key's connections. The async mutex is what makes concurrent callers
/// share a handshake: the one that finds every connection full connects
/// while holding it, the others wait on it and then use the new connection
/// (or its error).
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Connection attempts finished (success or failure). Read before
    /// waiting on `state`, it tells a waiter whether an attempt ended while
    /// it waited, whose outcome is then its own.
    attempts: AtomicU64,
    /// Woken whenever a stream on one of these connections ends, for the
    /// callers waiting at the connection cap.
    released: Arc<Notify>,
}

#[derive(Default)]
struct SlotState {
    clients: Vec<HboneClient>,
    /// The last attempt's error, for the callers that waited on it. It is
    /// never reused by later callers: they try again.
    last_error: Option<TunnelError>,
}

/// A stream slot reserved on a pooled connection: the caller's next
/// CONNECT. Dropping it unused gives the slot back.
#[derive(Debug)]
pub struct TunnelLease {
    client: HboneClient,
    permit: StreamPermit,
}

impl TunnelLease {
    /// Opens the CONNECT stream to `target` in the reserved slot; see
    /// [`HboneClient::connect`].
    pub async fn connect(self, target: SocketAddr) -> Result<HboneStream, TunnelError> {
        self.connect_with_early(target, &mut NoEarly, &mut Early::default())
            .await
    }

    /// [`connect`](Self::connect), sending what `source` writes meanwhile
    /// behind the request; see [`HboneClient::open`].
    pub async fn connect_with_early(
        self,
        target: SocketAddr,
        source: &mut impl EarlySource,
        early: &mut Early,
    ) -> Result<HboneStream, TunnelError> {
        self.client.open(self.permit, target, source, early).await
    }

    pub fn client(&self) -> &HboneClient {
        &self.client
    }
}

impl<K> TunnelPool<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub fn new(config: TunnelConfig) -> Self {
        Self::with_observer(config, Arc::new(Unobserved))
    }

    pub fn with_observer(config: TunnelConfig, observer: Arc<dyn PoolObserver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                slots: Mutex::new(HashMap::new()),
                opened: AtomicU64::new(0),
                config,
                observer,
            }),
        }
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.inner.config
    }

    /// A stream slot on a pooled connection for `key`, on a new one from
    /// `connect` (which should dial, run TLS and call
    /// [`HboneClient::handshake`]) if every pooled one is full.
    ///
    /// Concurrent callers for one key share a single `connect` run; if it
    /// fails they all get its error, and the next call tries again. At the
    /// connection cap, waits up to the stream-open timeout for a slot and
    /// then fails with [`TunnelError::Saturated`].
    pub async fn get_or_connect<F, Fut>(
        &self,
        key: K,
        connect: F,
    ) -> Result<TunnelLease, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneClient, TunnelError>>,
    {
        let config = self.inner.config;
        let deadline = Instant::now() + config.stream_open_timeout;
        let mut connect = Some(connect);
        loop {
            let slot = self.slot(key.clone());
            // Registered before looking, so a release in between is seen.
            let notify = Arc::clone(&slot.released);
            let released = notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let seen = slot.attempts.load(Ordering::Acquire);
            let mut state = slot.state.lock().await;
            state.clients.retain(|client| !client.is_closed());
            // Below the parallel target, a caller that finds every
            // connection busy opens another rather than queue behind them:
            // each connection is driven by one task, so concurrent streams
            // on separate connections use separate cores.
            let spread = connect.is_some()
                && state.clients.len() < config.parallel_connections_per_peer
                && state.clients.iter().all(|client| client.open_streams() > 0);
            if !spread && let Some(lease) = reserve_least_loaded(&state.clients, &slot.released) {
                return Ok(lease);
            }
            // An attempt that ended while we waited and left no free slot
            // failed: we were among its waiters, so its error is ours.
            if slot.attempts.load(Ordering::Acquire) != seen
                && let Some(e) = &state.last_error
            {
                return reserve_least_loaded(&state.clients, &slot.released)
                    .ok_or_else(|| e.clone());
            }
            if state.clients.len() < config.max_connections_per_peer
                && let Some(connect) = connect.take()
            {
                // If this future is dropped while connecting, the lock is
                // released with no attempt counted, and the next waiter
                // connects instead.
                let outcome = connect().await;
                slot.attempts.fetch_add(1, Ordering::Release);
                let client = match outcome {
                    Ok(client) => client,
                    Err(e) => {
                        state.last_error = Some(e.clone());
                        // A failed extra connection still leaves the ones
                        // that work.
                        return reserve_least_loaded(&state.clients, &slot.released).ok_or(e);
                    }
                };
                state.last_error = None;
                self.adopt(key, &client);
                state.clients.push(client.clone());
                return reserve_least_loaded(std::slice::from_ref(&client), &slot.released)
                    .ok_or_else(|| TunnelError::Saturated {
                        peer: client.peer().clone(),
                        connections: state.clients.len(),
                        waited: Duration::ZERO,
                    });
            }
            if let Some(lease) = reserve_least_loaded(&state.clients, &slot.released) {
                return Ok(lease);
            }
            let peer = state.clients.first().map(|c| c.peer().clone());
            let connections = state.clients.len();
            drop(state);
            drop(slot);
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(TunnelError::Saturated {
                    peer: peer.unwrap_or_else(|| "the peer".into()),
                    connections,
                    waited: config.stream_open_timeout,
                });
            }
        }
    }

    /// Counts a new connection and, once it ends, uncounts it and drops it
    /// (and its key, if that was the last) from the pool.
    fn adopt(&self, key: K, client: &HboneClient) {
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let observer = Arc::clone(&self.inner.observer);
        observer.connection_opened();
        let closed = client.close_watch();
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let reason = closed.await;
            observer.connection_closed(reason);
            if let Some(inner) = Weak::upgrade(&pool) {
                inner.forget_closed(&key);
            }
        });
    }

    /// Forgets every pooled connection without closing it: streams already
    /// open keep running, and each connection ends once its last stream
    /// does. Later calls connect again, e.g. with a rotated certificate.
    pub fn evict_all(&self) {
        self.inner.lock_slots().clear();
    }

    /// Successful connects so far (shows how well pooling works).
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Live pooled connections for `key`.
    #[cfg(test)]
    fn pooled(&self, key: &K) -> usize {
        let slot = self.inner.lock_slots().get(key).cloned();
        slot.map_or(0, |slot| {
            let state = slot.state.try_lock().expect("slot not in use");
            state.clients.iter().filter(|c| !c.is_closed()).count()
        })
    }

    /// The slot for `key`, created if missing. Creating one first drops
    /// unused slots whose connections are gone, so keys for destinations no
    /// longer used do not accumulate.
    fn slot(&self, key: K) -> Arc<Slot> {
        let mut slots = self.inner.lock_slots();
        if let Some(slot) = slots.get(&key) {
            return slot.clone();
        }
        slots.retain(|_, slot| !is_unused_and_dead(slot));
        slots.entry(key).or_default().clone()
    }

    #[cfg(test)]
    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<Slot>>> {
        self.inner.lock_slots()
    }
}

impl<K: Hash + Eq> Inner<K> {
    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<Slot>>> {
        // The map is only ever inserted into or pruned, each in one step, so
        // it is consistent even if a holder panicked.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops `key`'s closed connections, and the key itself if none is
    /// left and no caller is using it. A slot busy with a caller is left
    /// alone: that caller prunes it.
    fn forget_closed(&self, key: &K) {
        let mut slots = self.lock_slots();
        let Some(slot) = slots.get(key) else { return };
        if let Ok(mut state) = slot.state.try_lock() {
            state.clients.retain(|client| !client.is_closed());
        }
        if is_unused_and_dead(slot) {
            slots.remove(key);
        }
    }
}

/// A slot on the connection with the fewest open streams that has room,
/// which spreads streams over the connections the pool already has.
fn reserve_least_loaded(clients: &[HboneClient], released: &Arc<Notify>) -> Option<TunnelLease> {
    let mut by_load: Vec<&HboneClient> = clients.iter().collect();
    by_load.sort_by_key(|client| client.open_streams());
    by_load.into_iter().find_map(|client| {
        let permit = client.try_reserve()?;
        Some(TunnelLease {
            client: client.clone(),
            permit: permit.notify_on_release(Arc::clone(released)),
        })
    })
}

/// No caller holds the slot (only the map does, and the map lock is held,
/// so none can take it meanwhile) and it has no live connection.
fn is_unused_and_dead(slot: &Arc<Slot>) -> bool {
    Arc::strong_count(slot) == 1
        && slot
            .state
            .try_lock()
            .is_ok_and(|state| state.clients.iter().all(HboneClient::is_closed))
}

impl<K> Clone for TunnelPool<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for TunnelPool<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelPool")
            .field("config", &self.inner.config)
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
    use crate::tunnel::test_support::{
        Freezable, PEER, echo, spawn_limited_server, spawn_server, within,
    };

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
        HboneClient::handshake(io, PEER, &TunnelConfig::default()).await
    }

    fn servers() -> Arc<Mutex<Vec<AbortHandle>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    /// Proves the leased connection still carries data end to end.
    async fn assert_works(lease: TunnelLease) {
        let mut stream = lease
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
            let pool = TunnelPool::new(TunnelConfig::default());
            let servers = servers();
            for _ in 0..20 {
                let client = pool
                    .get_or_connect(KEY, || dial(servers.clone()))
                    .await
                    .expect("get");
                assert_works(client).await;
            }
            assert_eq!(pool.connections_opened(), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_gets_share_one_handshake() {
        within(async {
            let pool = TunnelPool::new(TunnelConfig::default());
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
                assert_works(client).await;
            }
            assert_eq!(dials.load(Ordering::SeqCst), 1);
            assert_eq!(pool.connections_opened(), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn busy_connections_are_spread_up_to_the_parallel_target() {
        within(async {
            let pool = TunnelPool::new(TunnelConfig {
                parallel_connections_per_peer: 2,
                ..TunnelConfig::default()
            });
            let servers = servers();
            let get = || pool.get_or_connect(KEY, || dial(servers.clone()));
            let first = get().await.expect("first");
            // The first connection carries a stream: the next one gets its own.
            let second = get().await.expect("second");
            assert_eq!(pool.connections_opened(), 2);
            // One stream each: two connections, not one carrying both.
            assert_eq!(first.client().open_streams(), 1);
            assert_eq!(second.client().open_streams(), 1);
            // At the target, streams share the least loaded connection.
            let third = get().await.expect("third");
            assert_eq!(pool.connections_opened(), 2);
            for lease in [first, second, third] {
                assert_works(lease).await;
            }
            // Idle connections are reused, not multiplied.
            assert_works(get().await.expect("fourth")).await;
            assert_eq!(pool.connections_opened(), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn closed_connection_is_replaced() {
        within(async {
            let pool = TunnelPool::new(TunnelConfig::default());
            let servers = servers();
            let first = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get");
            for server in servers.lock().expect("servers lock").iter() {
                server.abort();
            }
            first.client().closed().await;

            let second = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get after close");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(second).await;
        })
        .await;
    }

    #[tokio::test]
    async fn evict_all_keeps_open_streams_running() {
        within(async {
            let pool = TunnelPool::new(TunnelConfig::default());
            let servers = servers();
            let old = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get");
            let mut old_stream = old
                .connect("10.0.0.2:80".parse().expect("addr"))
                .await
                .expect("connect");

            pool.evict_all();
            let new = pool
                .get_or_connect(KEY, || dial(servers.clone()))
                .await
                .expect("get after evict");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(new).await;

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
            let pool = TunnelPool::new(TunnelConfig::default());
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
            assert_works(client).await;
        })
        .await;
    }

    #[tokio::test]
    async fn keys_get_separate_connections_and_dead_ones_are_pruned() {
        within(async {
            let pool = TunnelPool::new(TunnelConfig::default());
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
            a.client().closed().await;
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

    const TARGET: &str = "10.0.0.2:80";

    fn target() -> SocketAddr {
        TARGET.parse().expect("addr")
    }

    /// Connects to a server allowing `limit` concurrent streams, counting
    /// dials.
    async fn dial_limited(
        limit: u32,
        dials: Arc<AtomicUsize>,
        config: TunnelConfig,
    ) -> Result<HboneClient, TunnelError> {
        dials.fetch_add(1, Ordering::SeqCst);
        HboneClient::handshake(spawn_limited_server(limit), PEER, &config).await
    }

    /// What the pool reported to its observer.
    #[derive(Default)]
    struct Events {
        opened: AtomicUsize,
        closed: Mutex<Vec<CloseReason>>,
    }

    impl PoolObserver for Events {
        fn connection_opened(&self) {
            self.opened.fetch_add(1, Ordering::SeqCst);
        }
        fn connection_closed(&self, reason: CloseReason) {
            self.closed.lock().expect("events lock").push(reason);
        }
    }

    impl Events {
        fn closed(&self) -> Vec<CloseReason> {
            self.closed.lock().expect("events lock").clone()
        }
    }

    /// Polls `check` every 10 ms for up to 5 s.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_at_its_stream_limit_gets_a_second_one_beside_it() {
        within(async {
            let config = TunnelConfig::default();
            let pool = TunnelPool::new(config);
            let dials = Arc::new(AtomicUsize::new(0));
            let mut streams = Vec::new();
            for _ in 0..2 {
                let lease = pool
                    .get_or_connect(KEY, || dial_limited(2, dials.clone(), config))
                    .await
                    .expect("get");
                streams.push(lease.connect(target()).await.expect("connect"));
            }
            assert_eq!(pool.connections_opened(), 1);

            // The first connection is full. Two callers at once share one
            // new connection (one handshake), and neither is queued behind
            // the full one.
            let callers: Vec<_> = (0..2)
                .map(|_| {
                    let (pool, dials) = (pool.clone(), dials.clone());
                    tokio::spawn(async move {
                        let lease = pool
                            .get_or_connect(KEY, || dial_limited(2, dials, config))
                            .await?;
                        lease.connect(target()).await
                    })
                })
                .collect();
            for caller in callers {
                let opened = tokio::time::timeout(Duration::from_secs(2), caller)
                    .await
                    .expect("a stream beyond the first connection's limit was queued");
                streams.push(opened.expect("task").expect("connect"));
            }
            assert_eq!(dials.load(Ordering::SeqCst), 2);
            assert_eq!(pool.connections_opened(), 2);
            assert_eq!(pool.pooled(&KEY), 2);

            // A slot freed on a pooled connection is reused: no third dial.
            streams.remove(0);
            let lease = pool
                .get_or_connect(KEY, || dial_limited(2, dials.clone(), config))
                .await
                .expect("get");
            streams.push(lease.connect(target()).await.expect("connect"));
            assert_eq!(dials.load(Ordering::SeqCst), 2);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_connection_cap_callers_wait_for_a_slot_then_fail_clearly() {
        within(async {
            let config = TunnelConfig {
                max_connections_per_peer: 1,
                stream_open_timeout: Duration::from_millis(300),
                ..TunnelConfig::default()
            };
            let pool = TunnelPool::new(config);
            let dials = Arc::new(AtomicUsize::new(0));
            let mut streams = Vec::new();
            for _ in 0..2 {
                let lease = pool
                    .get_or_connect(KEY, || dial_limited(2, dials.clone(), config))
                    .await
                    .expect("get");
                streams.push(lease.connect(target()).await.expect("connect"));
            }

            let err = pool
                .get_or_connect(KEY, || dial_limited(2, dials.clone(), config))
                .await
                .expect_err("the only allowed connection is full");
            assert!(matches!(err, TunnelError::Saturated { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                "all 1 tunnel connections to test-peer are at their stream limit \
                 (waited 300ms for a free stream)"
            );

            // A caller that is waiting gets the slot a finished stream frees.
            let waiter = {
                let (pool, dials) = (pool.clone(), dials.clone());
                tokio::spawn(async move {
                    pool.get_or_connect(KEY, || dial_limited(2, dials, config))
                        .await?
                        .connect(target())
                        .await
                })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            streams.pop();
            let stream = waiter.await.expect("task").expect("slot freed in time");
            drop(stream);
            assert_eq!(dials.load(Ordering::SeqCst), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connection_is_closed_and_leaves_the_pool() {
        within(async {
            let config = TunnelConfig {
                idle_timeout: Duration::from_millis(200),
                ..TunnelConfig::default()
            };
            let events = Arc::new(Events::default());
            let pool = TunnelPool::with_observer(config, events.clone());
            let servers = servers();
            let dial = || async {
                let (io, server) = spawn_server(echo);
                servers
                    .lock()
                    .expect("servers lock")
                    .push(server.abort_handle());
                HboneClient::handshake(io, PEER, &config).await
            };
            let lease = pool.get_or_connect(KEY, dial).await.expect("get");
            let client = lease.client().clone();
            let mut stream = lease.connect(target()).await.expect("connect");

            // An open stream, even a quiet one, keeps the connection.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!client.is_closed(), "closed under an open stream");
            stream.write_all(b"still?").await.expect("write");
            let mut buf = [0u8; 6];
            stream.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"still?");

            drop(stream);
            assert_eq!(client.closed().await, CloseReason::Idle);
            drop(client);
            eventually("the idle connection leaves the pool", || {
                pool.lock_slots().is_empty()
            })
            .await;
            assert_eq!(events.opened.load(Ordering::SeqCst), 1);
            assert_eq!(events.closed(), [CloseReason::Idle]);

            // The next caller gets a fresh connection.
            let lease = pool.get_or_connect(KEY, dial).await.expect("get again");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(lease).await;
        })
        .await;
    }

    #[tokio::test]
    async fn silent_peer_is_declared_dead_and_replaced() {
        within(async {
            let config = TunnelConfig {
                ping_interval: Duration::from_millis(100),
                ping_timeout: Duration::from_millis(200),
                ..TunnelConfig::default()
            };
            let events = Arc::new(Events::default());
            let pool = TunnelPool::with_observer(config, events.clone());
            let freezes = Arc::new(Mutex::new(Vec::new()));
            let dial = || async {
                let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                let (server_io, frozen) = Freezable::new(server_io);
                freezes.lock().expect("freezes lock").push(frozen);
                tokio::spawn(async move {
                    crate::tunnel::serve(server_io, &TunnelConfig::default(), |request| {
                        tokio::spawn(echo(request));
                    })
                    .await
                });
                HboneClient::handshake(client_io, PEER, &config).await
            };
            let lease = pool.get_or_connect(KEY, dial).await.expect("get");
            let client = lease.client().clone();
            let mut stream = lease.connect(target()).await.expect("connect");
            // Several PING intervals pass on a live peer without a verdict.
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(!client.is_closed(), "a live peer was declared dead");

            // The peer's host vanishes: nothing answers, nothing closes.
            freezes.lock().expect("freezes lock")[0].store(true, Ordering::SeqCst);
            let reason = tokio::time::timeout(Duration::from_secs(3), client.closed())
                .await
                .expect("a silent peer was not noticed");
            assert_eq!(reason, CloseReason::Dead);
            let mut buf = [0u8; 1];
            assert!(
                stream.read(&mut buf).await.is_err(),
                "a stream on a dead connection must fail, not end cleanly"
            );
            drop((stream, client));
            eventually("the dead connection leaves the pool", || {
                pool.lock_slots().is_empty()
            })
            .await;
            assert_eq!(events.closed(), [CloseReason::Dead]);

            let lease = pool.get_or_connect(KEY, dial).await.expect("replaced");
            assert_eq!(pool.connections_opened(), 2);
            assert_works(lease).await;
        })
        .await;
    }
}
