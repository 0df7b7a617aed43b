//! `ambit audit verify`: recompute every hash and link of a set of files.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use super::chain::{self, ChainHead, GENESIS_HASH, LineFault};

/// The result of a successful verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// `seq` of the first record, `None` when there are no records. Greater
    /// than 0 when older generations were rotated away: records before it
    /// cannot be checked.
    pub first_seq: Option<u64>,
    /// Hash of the last line; keeping it elsewhere lets a later check notice
    /// whole records cut off the end, which the chain alone cannot show.
    pub last_line_hash: Option<String>,
}

/// The kind of the first problem found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The record's bytes do not match its hash.
    Edited,
    /// `seq` or `prev_hash` does not follow the previous record.
    RemovedOrReordered,
    /// The file ends in the middle of a record.
    Truncated,
    /// The line is not JSON at all.
    NotJson,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::Edited => "edited",
            Problem::RemovedOrReordered => "removed or reordered",
            Problem::Truncated => "truncated",
            Problem::NotJson => "not JSON",
        })
    }
}

/// Why a set of audit files does not verify.
///
/// The I/O error is in the message rather than a `#[source]`, so a `{:#}`
/// chain (as `main` prints) does not show it twice.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    /// `line` is 1-based within `path`.
    #[error("{}:{line}: {problem}: {detail}", path.display())]
    Broken {
        path: PathBuf,
        line: u64,
        problem: Problem,
        detail: String,
    },
}

/// Verifies `paths` as one chain, oldest file first (e.g. `audit.log.2`,
/// `audit.log.1`, `audit.log`), and returns the first problem.
pub fn verify_files<P: AsRef<Path>>(paths: &[P]) -> Result<Summary, ChainError> {
    let mut state = Verifier::default();
    for path in paths {
        let path = path.as_ref();
        let io_err = |error| ChainError::Io {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(io_err)?;
        state.read(BufReader::new(file)).map_err(|e| match e {
            ReadError::Io(error) => io_err(error),
            ReadError::Broken(line, problem, detail) => ChainError::Broken {
                path: path.to_owned(),
                line,
                problem,
                detail,
            },
        })?;
    }
    Ok(state.summary)
}

enum ReadError {
    Io(io::Error),
    Broken(u64, Problem, String),
}

#[derive(Default)]
struct Verifier {
    /// `None` until the first record: the set may start mid-chain.
    expected: Option<ChainHead>,
    summary: Summary,
}

impl Verifier {
    fn read(&mut self, mut reader: impl BufRead) -> Result<(), ReadError> {
        let mut buf = Vec::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(ReadError::Io)? == 0 {
                return Ok(());
            }
            line_no += 1;
            let Some(line) = buf.strip_suffix(b"\n") else {
                // The writer emits whole lines, so a missing newline means
                // the last write was cut short or the file was cut.
                return Err(ReadError::Broken(
                    line_no,
                    Problem::Truncated,
                    "the file ends in the middle of a record".to_owned(),
                ));
            };
            self.check(line)
                .map_err(|(problem, detail)| ReadError::Broken(line_no, problem, detail))?;
        }
    }

    fn check(&mut self, line: &[u8]) -> Result<(), (Problem, String)> {
        let rec = chain::check_line(line).map_err(|fault| match fault {
            LineFault::NotJson(d) => (Problem::NotJson, d),
            LineFault::Edited(d) => (Problem::Edited, d),
        })?;
        match &self.expected {
            Some(head) if rec.seq != head.next_seq => {
                return Err((
                    Problem::RemovedOrReordered,
                    format!("seq {} where {} was expected", rec.seq, head.next_seq),
                ));
            }
            Some(head) if rec.prev_hash != head.prev_hash => {
                return Err((
                    Problem::RemovedOrReordered,
                    format!(
                        "prev_hash {} is not the hash of the previous line ({})",
                        rec.prev_hash, head.prev_hash
                    ),
                ));
            }
            None if rec.seq == 0 && rec.prev_hash != GENESIS_HASH => {
                return Err((
                    Problem::RemovedOrReordered,
                    format!("seq 0 with prev_hash {} instead of genesis", rec.prev_hash),
                ));
            }
            _ => {}
        }
        let head = ChainHead::after(rec.seq, line);
        self.summary.records += 1;
        self.summary.first_seq.get_or_insert(rec.seq);
        self.summary.last_line_hash = Some(head.prev_hash.clone());
        self.expected = Some(head);
        Ok(())
    }
}
