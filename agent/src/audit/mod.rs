//! The tamper-evident audit log (docs/architecture.md, "Policy, audit, metrics").
//!
//! One JSON object per line ([`AuditRecord`]), written for every policy
//! decision and every connection close.
//!
//! # The chain
//!
//! Every line carries `seq` (0 for the first record of a chain, then +1),
//! `prev_hash` and `hash`:
//! - `hash` is the lower-case hex SHA-256 of the line's exact bytes with the
//!   trailing `,"hash":"…"` member removed, i.e. of the compact JSON object
//!   of every other member, in [`AuditRecord`]'s field order, ending in `}`.
//!   The writer always puts `hash` last, so the verifier recovers the hashed
//!   bytes textually: line minus the 75-byte suffix `,"hash":"<64 hex>"}`,
//!   plus `}`.
//! - `prev_hash` is the hex SHA-256 of the previous record's whole line
//!   (including its `hash` member, excluding the newline), or
//!   [`GENESIS_HASH`] for `seq` 0.
//!
//! Editing any byte of a record changes its hash; removing or reordering
//! records breaks `seq` or `prev_hash`; a cut in the middle of a record
//! leaves a line without a newline. A set that does not start at the
//! chain's first record fails verification unless a `rotated` note in the
//! set names its start (rotation deleted the oldest file) or the caller
//! passes the expected start ([`ExpectedStart`]). Whole records cut off the
//! end cannot be seen from the chain itself: compare
//! [`Summary::last_line_hash`] with a copy kept elsewhere.
//!
//! # What is not recorded one by one
//!
//! Records the writer loses (queue full, write failed) are counted into the
//! next record it writes (`dropped_before`). Refusals without a verified
//! source identity are rate-limited per source address ([`LimiterConfig`])
//! and the rest are counted into `suppressed` summaries.
//!
//! # Files
//!
//! [`AuditLog::open_file`] appends to one file and rotates it by size into
//! `FILE.1` … `FILE.5`; the chain runs across rotations, so
//! `ambit audit verify FILE.5 … FILE.1 FILE` checks the whole set. On
//! restart the writer continues the chain from the last line — unless that
//! line does not verify, in which case the file is rotated away untouched
//! and a new chain starts.

mod chain;
mod file_sink;
mod limiter;
mod record;
mod timestamp;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::{io, path::PathBuf};

pub use chain::GENESIS_HASH;
pub use file_sink::{GENERATIONS, generation};
pub use limiter::LimiterConfig;
pub use record::{AuditRecord, Decision, Destination, Direction, Event, Service, Source};
pub use timestamp::{format_rfc3339, now_rfc3339};
pub use verify::{
    ChainError, ExpectedStart, FileSummary, FirstRecord, Gap, Problem, Start, Summary, verify_files,
};
pub use writer::{AuditLog, DEFAULT_QUEUE_CAPACITY};

/// Why the audit log could not be opened.
///
/// The I/O error is in the message rather than a `#[source]`, so a `{:#}`
/// chain (as `main` prints) does not show it twice.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {}: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error("cannot read the audit log {} to continue its chain: {error}", path.display())]
    Resume { path: PathBuf, error: io::Error },
    #[error("cannot rotate the audit log {}: {error}", path.display())]
    Rotate { path: PathBuf, error: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(io::Error),
}
