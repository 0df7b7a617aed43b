//! Logging: `tracing` to stderr, human-readable or one JSON object per line.
//! aya-log records from the eBPF programs arrive through the `log` bridge
//! under the target `ambit_capture`.
//!
//! Lines are written in batches by a background thread ([`batched`]), so a
//! connection's log line costs its formatting and a buffer append on the
//! data path, not a write(2) or a thread wakeup.

mod batched;

use std::io::Stderr;

use batched::{BatchedWriter, BatchedWriterGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the subscriber. Keep the guard until exit: dropping it writes
/// what is still queued.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> std::io::Result<BatchedWriterGuard<Stderr>> {
    let filter = EnvFilter::try_from_env("AMBIT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = BatchedWriter::new(std::io::stderr())?;
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
    Ok(guard)
}
