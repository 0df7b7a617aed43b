//! Logging: `tracing` to stderr, human-readable or one JSON object per line.
//! aya-log records from the eBPF programs arrive through the `log` bridge
//! under the target `ambit_capture`.
//!
//! Lines are written by a background thread (tracing-appender's
//! non-blocking writer), so a connection's log line costs its formatting
//! and a queue push on the data path, not a write(2) to stderr.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Lines queued for the writer thread before the data path blocks on it:
/// a slow stderr slows the agent rather than losing lines.
const QUEUED_LINES: usize = 64 * 1024;

/// Installs the subscriber. Keep the guard until exit: dropping it writes
/// what is still queued.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_env("AMBIT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(false)
        .thread_name("ambit-log")
        .finish(std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(writer)).init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .init(),
    }
    guard
}
