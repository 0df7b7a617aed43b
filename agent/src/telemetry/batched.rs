//! A log writer that batches lines for a background thread without waking
//! it for each one.
//!
//! A direct `write(2)` per line, or a channel whose receiver is woken per
//! line, each put a syscall or a context switch on the data path for every
//! connection's log lines. Here a line is appended to a shared buffer; the
//! writer thread is woken only by the first line after it went idle and
//! writes it at once, then sleeps [`BATCH_INTERVAL`] while lines gather and
//! writes them with one call. A line waits at most about that long. Nothing
//! is dropped: past [`MAX_PENDING`] the logging thread writes the batch
//! itself.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long lines gather after a write while they keep coming.
const BATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Bytes held before a logging thread writes them itself (back pressure
/// from a slow stderr instead of unbounded memory).
const MAX_PENDING: usize = 1024 * 1024;

struct Pending {
    lines: Vec<u8>,
    /// The writer thread is blocked waiting for a first line.
    idle: bool,
    closed: bool,
}

struct Shared<W> {
    pending: Mutex<Pending>,
    first_line: Condvar,
    /// Held while a batch is taken and written, so batches reach the sink
    /// in the order they were taken.
    sink: Mutex<W>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Both hold plain buffers, consistent after a panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write> Shared<W> {
    fn write_batch(&self) {
        let mut sink = lock(&self.sink);
        let batch = std::mem::take(&mut lock(&self.pending).lines);
        if !batch.is_empty() {
            // Nowhere left to report a failing stderr.
            let _ = sink.write_all(&batch);
            let _ = sink.flush();
        }
    }
}

/// The `MakeWriter` for tracing-subscriber; keep the returned guard until
/// exit (dropping it writes what is pending).
pub struct BatchedWriter<W> {
    shared: Arc<Shared<W>>,
}

pub struct BatchedWriterGuard<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
    thread: Option<JoinHandle<()>>,
}

impl<W: Write + Send + 'static> BatchedWriter<W> {
    pub fn new(sink: W) -> io::Result<(Self, BatchedWriterGuard<W>)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                lines: Vec::new(),
                idle: false,
                closed: false,
            }),
            first_line: Condvar::new(),
            sink: Mutex::new(sink),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ambit-log".to_owned())
            .spawn(move || run(&worker))?;
        Ok((
            Self {
                shared: Arc::clone(&shared),
            },
            BatchedWriterGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

fn run<W: Write>(shared: &Shared<W>) {
    loop {
        {
            let mut pending = lock(&shared.pending);
            while pending.lines.is_empty() && !pending.closed {
                pending.idle = true;
                pending = shared
                    .first_line
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        // The first line of a burst goes out at once; what follows gathers
        // while this thread sleeps (no one wakes it) and goes out in one
        // write.
        shared.write_batch();
        if lock(&shared.pending).closed {
            shared.write_batch();
            return;
        }
        std::thread::sleep(BATCH_INTERVAL);
    }
}

impl<W: Write + Send + 'static> Drop for BatchedWriterGuard<W> {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.first_line.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines logged after the thread ended.
        self.shared.write_batch();
    }
}

/// One event's writer: appends to the shared batch. Each `write` is kept
/// whole, so an event written in one call (tracing-subscriber formats
/// events into a buffer and writes it once) is never interleaved.
pub struct LineWriter<'a, W> {
    shared: &'a Shared<W>,
}

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let overflow = {
            let mut pending = lock(&self.shared.pending);
            pending.lines.extend_from_slice(data);
            if pending.idle {
                pending.idle = false;
                self.shared.first_line.notify_one();
            }
            pending.lines.len() > MAX_PENDING
        };
        if overflow {
            self.shared.write_batch();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for BatchedWriter<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches the sink and in how many writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let mut sink = lock(&self.0);
            sink.0.extend_from_slice(data);
            sink.1 += 1;
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_in_far_fewer_writes_and_the_guard_flushes() {
        let sink = Sink::default();
        let (writer, guard) = BatchedWriter::new(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = BatchedWriter {
                    shared: Arc::clone(&writer.shared),
                };
                std::thread::spawn(move || {
                    for i in 0..500 {
                        // One write per event, as tracing-subscriber's fmt
                        // layer does (it formats into a buffer first).
                        let line = format!("t{t} line {i}\n");
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        writeln!(writer.make_writer(), "last").unwrap();
        drop(guard);

        let (bytes, writes) = lock(&sink.0).clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2001, "lines were lost or duplicated");
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let expected: Vec<String> = (0..500).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(own, expected, "thread {t}'s lines are out of order");
        }
        assert_eq!(lines.last(), Some(&"last"));
        assert!(writes < 200, "{writes} writes for 2,001 lines: not batched");
    }

    #[test]
    fn a_lone_line_is_written_without_waiting_for_more() {
        let sink = Sink::default();
        let (writer, _guard) = BatchedWriter::new(sink.clone()).unwrap();
        writeln!(writer.make_writer(), "alone").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&sink.0).0.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line was never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lock(&sink.0).0, b"alone\n");
    }
}
