//! [`AuditLog`]: the non-blocking front of the audit log and its writer
//! thread.

use std::{
    io::{self, BufWriter, Stdout, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
};

use super::{
    AuditError, AuditRecord,
    chain::{self, ChainHead},
    file_sink::FileSink,
};

/// Records queued for the writer before [`AuditLog::record`] starts
/// dropping.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// Where sealed lines go.
pub trait Sink: Send + 'static {
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
/// turn a full disk into a mesh outage. Drops leave no gap in the chain
/// (the chain links written records), so they are visible only through the
/// counter (`ambit_audit_records_dropped_total`).
///
/// [`record`]: AuditLog::record
/// [`dropped`]: AuditLog::dropped
pub struct AuditLog {
    tx: Option<SyncSender<AuditRecord>>,
    dropped: Arc<AtomicU64>,
    worker: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Appends to `path`, continuing its chain, and rotates it when a record
    /// would take it past `max_bytes` (see [`super::GENERATIONS`]).
    pub fn open_file(
        path: impl AsRef<Path>,
        max_bytes: u64,
        node: impl Into<String>,
    ) -> Result<Self, AuditError> {
        let (sink, head) = FileSink::open(path.as_ref(), max_bytes)?;
        Self::spawn(sink, head, node.into(), DEFAULT_QUEUE_CAPACITY)
    }

    /// Writes to standard output (for a log collector). Each process starts
    /// a new chain at `seq` 0, as there is no previous line to read back.
    pub fn stdout(node: impl Into<String>) -> Result<Self, AuditError> {
        let sink = StdoutSink(BufWriter::new(io::stdout()));
        Self::spawn(
            sink,
            ChainHead::genesis(),
            node.into(),
            DEFAULT_QUEUE_CAPACITY,
        )
    }

    pub(crate) fn spawn(
        sink: impl Sink,
        head: ChainHead,
        node: String,
        capacity: usize,
    ) -> Result<Self, AuditError> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            sink,
            head,
            node,
            dropped: dropped.clone(),
        };
        // A plain thread, not a tokio task: file writes block, and this keeps
        // them off the runtime's workers without needing spawn_blocking.
        let worker = std::thread::Builder::new()
            .name("ambit-audit".to_owned())
            .spawn(move || worker.run(rx))
            .map_err(AuditError::Spawn)?;
        Ok(AuditLog {
            tx: Some(tx),
            dropped,
            worker: Some(worker),
        })
    }

    /// Queues `rec` without blocking. The writer sets `node`, `seq`,
    /// `prev_hash` and `hash`.
    pub fn record(&self, rec: AuditRecord) {
        let Some(tx) = &self.tx else { return };
        let why = match tx.try_send(rec) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "the audit queue is full",
            Err(TrySendError::Disconnected(_)) => "the audit writer has stopped",
        };
        count_drop(&self.dropped, why);
    }

    /// Records dropped so far: queue full, writer gone, or write failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued, flushes and stops the writer.
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

/// Logs the first drop and then at each power of two, so a stuck disk shows
/// up in the logs without the log itself becoming the next bottleneck.
fn count_drop(dropped: &AtomicU64, why: &str) {
    let total = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    if total.is_power_of_two() {
        tracing::warn!(
            dropped_total = total,
            "{why}: audit record dropped (the connection's decision is not affected)"
        );
    }
}

struct Worker<S> {
    sink: S,
    head: ChainHead,
    node: String,
    dropped: Arc<AtomicU64>,
}

impl<S: Sink> Worker<S> {
    fn run(mut self, rx: Receiver<AuditRecord>) {
        while let Ok(rec) = rx.recv() {
            self.write(rec);
            // Batch whatever else is already queued, then flush once: one
            // flush per burst rather than per record, and nothing sits in
            // the buffer while the queue is idle.
            while let Ok(rec) = rx.try_recv() {
                self.write(rec);
            }
            if let Err(e) = self.sink.flush() {
                tracing::error!(error = %e, "cannot flush the audit log");
            }
        }
    }

    fn write(&mut self, mut rec: AuditRecord) {
        rec.node.clone_from(&self.node);
        let line = chain::seal(&mut rec, &self.head);
        match self.sink.write_line(&line) {
            Ok(()) => self.head = ChainHead::after(rec.seq, &line),
            Err(e) => {
                // The chain stays at the last record written. If part of the
                // line reached the file, `verify` reports it at that line: a
                // failed write must stay visible.
                tracing::error!(error = %e, seq = rec.seq, "cannot write an audit record");
                count_drop(&self.dropped, "write failed");
            }
        }
    }
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
