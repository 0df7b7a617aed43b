//! [`AuditLog`]: the non-blocking front of the audit log and its writer
//! thread.

use std::{
    io::{self, BufWriter, Stdout, Write},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    AuditError, AuditRecord,
    chain::{self, ChainHead},
    file_sink::FileSink,
    limiter::{Limiter, LimiterConfig},
};

/// Records queued for the writer before [`AuditLog::record`] starts
/// dropping.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// The longest the writer sleeps between looks at due summaries.
const SUMMARY_TICK: Duration = Duration::from_secs(1);

/// While records keep coming, how long the writer lets them gather before
/// it takes them; at the default queue capacity that is room for 800,000
/// records a second.
const BATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Where the retained records start after rotation deleted older ones: the
/// first kept record's `seq` and `prev_hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub prev_hash: String,
}

/// Where sealed lines go.
pub trait Sink: Send + 'static {
    /// Makes room for a line of `len` bytes (with its newline), e.g. by
    /// rotating. Returns where the retained records start if that deleted
    /// older records, so the writer can note it in the chain.
    fn make_room(&mut self, _len: u64) -> io::Result<Option<Anchor>> {
        Ok(None)
    }
    /// Writes one line; the sink adds the newline.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// The audit log. Cheap to call from the data path: [`record`] only queues.
///
/// Fail-safe choice: audit backpressure never changes a connection's
/// decision. When the writer falls behind (slow disk) and the queue is full,
/// the record is dropped, counted in [`dropped`] and logged at WARN; the
/// connection proceeds with the decision policy made. The alternative —
/// denying traffic or blocking the proxy until the disk catches up — would
/// turn a full disk into a mesh outage. Drops do show in the chain: the next
/// record written carries `dropped_before` with the number lost since the
/// previous one, and `ambit audit verify` adds them up.
///
/// Records without a verified source identity go through
/// [`record_unauthenticated`], which rate-limits them per source address and
/// writes summaries of what it held back (see [`LimiterConfig`]).
///
/// [`record`]: AuditLog::record
/// [`record_unauthenticated`]: AuditLog::record_unauthenticated
/// [`dropped`]: AuditLog::dropped
pub struct AuditLog {
    tx: Option<SyncSender<AuditRecord>>,
    drops: Arc<Drops>,
    limiter: Arc<Mutex<Limiter>>,
    worker: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Appends to `path`, continuing its chain, and rotates it when a record
    /// would take it past `max_bytes` (see [`super::GENERATIONS`]).
    pub fn open_file(
        path: impl AsRef<Path>,
        max_bytes: u64,
        node: impl Into<String>,
        limits: LimiterConfig,
    ) -> Result<Self, AuditError> {
        let (sink, head) = FileSink::open(path.as_ref(), max_bytes)?;
        Self::spawn(sink, head, node.into(), DEFAULT_QUEUE_CAPACITY, limits)
    }

    /// Writes to standard output (for a log collector). Each process starts
    /// a new chain at `seq` 0, as there is no previous line to read back.
    pub fn stdout(node: impl Into<String>, limits: LimiterConfig) -> Result<Self, AuditError> {
        let sink = StdoutSink(BufWriter::new(io::stdout()));
        Self::spawn(
            sink,
            ChainHead::genesis(),
            node.into(),
            DEFAULT_QUEUE_CAPACITY,
            limits,
        )
    }

    pub(crate) fn spawn(
        sink: impl Sink,
        head: ChainHead,
        node: String,
        capacity: usize,
        limits: LimiterConfig,
    ) -> Result<Self, AuditError> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let drops = Arc::new(Drops::default());
        let tick = SUMMARY_TICK.min(limits.summary_interval);
        let limiter = Arc::new(Mutex::new(Limiter::new(limits, Instant::now())));
        let worker = Worker {
            sink,
            head,
            node,
            drops: Arc::clone(&drops),
            limiter: Arc::clone(&limiter),
            tick: tick.max(Duration::from_millis(10)),
        };
        // A plain thread, not a tokio task: file writes block, and this keeps
        // them off the runtime's workers without needing spawn_blocking.
        let worker = std::thread::Builder::new()
            .name("ambit-audit".to_owned())
            .spawn(move || worker.run(rx))
            .map_err(AuditError::Spawn)?;
        Ok(AuditLog {
            tx: Some(tx),
            drops,
            limiter,
            worker: Some(worker),
        })
    }

    /// Queues `rec` without blocking. The writer sets `node`, `seq`,
    /// `prev_hash`, `hash` and `dropped_before`.
    pub fn record(&self, rec: AuditRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.drops.lost(1, 1, "the audit queue is full"),
            // Nothing will be written after this, so there is no next
            // record to carry the count.
            Err(TrySendError::Disconnected(_)) => {
                self.drops.lost(1, 0, "the audit writer has stopped");
            }
        }
    }

    /// Queues a refusal that no verified identity stands behind (a failed
    /// TLS handshake, plaintext refused), unless its source is over its rate
    /// limit: then it is counted into that source's next `suppressed`
    /// summary instead.
    pub fn record_unauthenticated(&self, rec: AuditRecord) {
        let admitted = lock(&self.limiter).admit(rec, Instant::now());
        if let Some(rec) = admitted {
            self.record(rec);
        }
    }

    /// Records dropped so far: queue full, writer gone, or write failed.
    pub fn dropped(&self) -> u64 {
        self.drops.total.load(Ordering::Relaxed)
    }

    /// Unauthenticated refusals counted into summaries instead of recorded.
    pub fn suppressed(&self) -> u64 {
        lock(&self.limiter).suppressed()
    }

    /// Writes what is queued and every pending summary, flushes and stops
    /// the writer.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Closing the channel ends the worker's loop once it is drained.
        self.tx = None;
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(limiter: &Mutex<Limiter>) -> MutexGuard<'_, Limiter> {
    // The limiter's state is counters and buckets: a panic elsewhere while it
    // was held leaves nothing worth refusing to go on with.
    limiter.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records lost: in total, and since the last record written (which the
/// next one written carries as `dropped_before`).
#[derive(Default)]
struct Drops {
    total: AtomicU64,
    unsealed: AtomicU64,
}

impl Drops {
    /// Counts `records` more lost and `unsealed` more for the next record's
    /// `dropped_before`. Logs the first loss and then at each power of two,
    /// so a stuck disk shows up in the logs without the log itself becoming
    /// the next bottleneck.
    fn lost(&self, records: u64, unsealed: u64, why: &str) {
        self.unsealed.fetch_add(unsealed, Ordering::Relaxed);
        let total = self.total.fetch_add(records, Ordering::Relaxed) + records;
        if total.is_power_of_two() {
            tracing::warn!(
                dropped_total = total,
                "{why}: audit record dropped (the connection's decision is not affected)"
            );
        }
    }
}

struct Worker<S> {
    sink: S,
    head: ChainHead,
    node: String,
    drops: Arc<Drops>,
    limiter: Arc<Mutex<Limiter>>,
    tick: Duration,
}

impl<S: Sink> Worker<S> {
    fn run(mut self, rx: Receiver<AuditRecord>) {
        // Idle, the thread blocks on the queue, so the first record of a
        // burst wakes it. Busy, it sleeps a batch interval and takes what
        // came meanwhile: a sender then never wakes it (a thread wakeup per
        // record cost more than writing the record), and a record waits at
        // most one interval.
        let mut busy = false;
        loop {
            let first = if busy {
                std::thread::sleep(BATCH_INTERVAL);
                None
            } else {
                match rx.recv_timeout(self.tick) {
                    Ok(rec) => Some(rec),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            busy = first.is_some();
            if let Some(rec) = first {
                self.write(rec);
            }
            let disconnected = loop {
                match rx.try_recv() {
                    Ok(rec) => {
                        self.write(rec);
                        busy = true;
                    }
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            let due = lock(&self.limiter).due(Instant::now());
            for summary in due {
                self.write(summary);
            }
            // One flush per batch, and nothing sits in the buffer while the
            // queue is idle.
            self.flush();
            if disconnected {
                break;
            }
        }
        // Counts held back must not vanish with the process.
        let pending = lock(&self.limiter).drain();
        for summary in pending {
            self.write(summary);
        }
        self.flush();
    }

    fn flush(&mut self) {
        if let Err(e) = self.sink.flush() {
            tracing::error!(error = %e, "cannot flush the audit log");
        }
    }

    fn write(&mut self, mut rec: AuditRecord) {
        let unsealed = self.drops.unsealed.swap(0, Ordering::Relaxed);
        rec.dropped_before = (unsealed > 0).then_some(unsealed);
        if let Err(e) = self.seal_and_write(&mut rec) {
            // The chain stays at the last record written. If part of the
            // line reached the file, `verify` reports it at that line: a
            // failed write must stay visible. The count this record carried
            // moves on to the next one, with this record added.
            tracing::error!(error = %e, seq = rec.seq, "cannot write an audit record");
            self.drops.lost(1, unsealed + 1, "write failed");
        }
    }

    fn seal_and_write(&mut self, rec: &mut AuditRecord) -> io::Result<()> {
        rec.node.clone_from(&self.node);
        let (mut line, mut next) = chain::seal(rec, &self.head);
        if let Some(anchor) = self.sink.make_room(line_len(&line))? {
            // The note goes first in the new file, so the chain itself says
            // where the retained records start and verify can tell rotation
            // from records cut off the head.
            let mut note = AuditRecord::rotated(anchor.seq, anchor.prev_hash);
            note.node.clone_from(&self.node);
            let (note_line, after_note) = chain::seal(&mut note, &self.head);
            self.sink.write_line(&note_line)?;
            self.head = after_note;
            (line, next) = chain::seal(rec, &self.head);
        }
        self.sink.write_line(&line)?;
        self.head = next;
        Ok(())
    }
}

/// Bytes `line` takes on disk, with its newline.
fn line_len(line: &[u8]) -> u64 {
    u64::try_from(line.len())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

struct StdoutSink(BufWriter<Stdout>);

impl Sink for StdoutSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.0.write_all(line)?;
        self.0.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
