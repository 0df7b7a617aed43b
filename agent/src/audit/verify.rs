//! `ambit audit verify`: recompute every hash and link of a set of files,
//! check where the set starts, and add up what the chain says was lost
//! (`dropped_before`) or summarised (`suppressed`).

use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use super::{
    Event,
    chain::{self, ChainHead, GENESIS_HASH, LineFault},
};

/// Where the caller expects the set to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpectedStart {
    /// At the chain's first record (`seq` 0, genesis `prev_hash`), or where
    /// a `rotated` note inside the set says rotation left it.
    #[default]
    Beginning,
    /// At a record whose `prev_hash` is this hash: the last line hash that
    /// `verify` printed for files since archived and removed.
    Anchor(String),
    /// At a record with this `seq`.
    Seq(u64),
}

/// Why the start of a verified set is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first record of the chain.
    Genesis,
    /// Rotation deleted older files, as the `rotated` note at `noted_at`
    /// says.
    AfterRotation { noted_at: u64 },
    /// The caller's anchor or `seq`.
    AsExpected,
}

/// The first record of a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstRecord {
    pub seq: u64,
    pub prev_hash: String,
    /// The record's own `hash` member.
    pub hash: String,
    pub start: Start,
}

/// A record that says records were lost just before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub path: PathBuf,
    /// 1-based within `path`.
    pub line: u64,
    pub seq: u64,
    pub dropped: u64,
}

/// One file of a verified set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSummary {
    pub path: PathBuf,
    pub records: u64,
    /// `seq` of its first and last record, `None` when it is empty.
    pub seqs: Option<(u64, u64)>,
    /// Hash of its last line: the `--anchor` for the files after it once
    /// this one (and those before it) are archived and removed.
    pub last_line_hash: Option<String>,
}

/// The result of a successful verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// `seq` of the first record, `None` when there are no records.
    pub first_seq: Option<u64>,
    pub first: Option<FirstRecord>,
    /// Hash of the last line; keeping it elsewhere lets a later check notice
    /// whole records cut off the end, which the chain alone cannot show, and
    /// it is the `--anchor` of the files that follow these.
    pub last_line_hash: Option<String>,
    /// Records the writer lost (`dropped_before`, added up).
    pub dropped: u64,
    pub gaps: Vec<Gap>,
    /// Refusals counted in `suppressed` summaries, and how many summaries.
    pub suppressed: u64,
    pub summaries: u64,
    pub files: Vec<FileSummary>,
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
    #[error(
        "{}:1: chain starts at seq {seq}, not at the beginning: records before it are missing; \
         pass --anchor HASH (or --from-seq N) if this is expected",
        path.display()
    )]
    // `prev_hash` is left out of the message on purpose: the anchor to pass
    // is the one saved earlier, not whatever the files now say.
    StartsMidChain {
        path: PathBuf,
        seq: u64,
        prev_hash: String,
    },
    #[error(
        "{}:1: chain starts at seq {seq} with prev_hash {prev_hash}, not at the expected {expected}",
        path.display()
    )]
    UnexpectedStart {
        path: PathBuf,
        seq: u64,
        prev_hash: String,
        expected: String,
    },
}

/// Verifies `paths` as one chain, oldest file first (e.g. `audit.log.2`,
/// `audit.log.1`, `audit.log`), and returns the first problem. The set must
/// start where `expected` says.
pub fn verify_files<P: AsRef<Path>>(
    paths: &[P],
    expected: &ExpectedStart,
) -> Result<Summary, ChainError> {
    let mut state = Verifier::default();
    for path in paths {
        let path = path.as_ref();
        let io_err = |error| ChainError::Io {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(io_err)?;
        let before = state.summary.records;
        let first_seq = state.expected.as_ref().map(|h| h.next_seq);
        state
            .read(path, BufReader::new(file))
            .map_err(|e| match e {
                ReadError::Io(error) => io_err(error),
                ReadError::Broken(line, problem, detail) => ChainError::Broken {
                    path: path.to_owned(),
                    line,
                    problem,
                    detail,
                },
            })?;
        let records = state.summary.records - before;
        let last_seq = state
            .expected
            .as_ref()
            .map(|h| h.next_seq.saturating_sub(1));
        let first_seq = first_seq.or(state.summary.first_seq);
        state.summary.files.push(FileSummary {
            path: path.to_owned(),
            records,
            seqs: first_seq.zip(last_seq).filter(|_| records > 0),
            last_line_hash: state.summary.last_line_hash.clone().filter(|_| records > 0),
        });
    }
    state.judge_start(expected)?;
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
    /// The file the first record is in.
    first_path: Option<PathBuf>,
    /// `(anchor_seq, anchor, seq of the note)` of every `rotated` note.
    rotations: Vec<(u64, String, u64)>,
    summary: Summary,
}

impl Verifier {
    fn read(&mut self, path: &Path, mut reader: impl BufRead) -> Result<(), ReadError> {
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
            self.check(path, line_no, line)
                .map_err(|(problem, detail)| ReadError::Broken(line_no, problem, detail))?;
        }
    }

    fn check(&mut self, path: &Path, line_no: u64, line: &[u8]) -> Result<(), (Problem, String)> {
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
        if let Some(dropped) = rec.dropped_before.filter(|&n| n > 0) {
            self.summary.dropped = self.summary.dropped.saturating_add(dropped);
            self.summary.gaps.push(Gap {
                path: path.to_owned(),
                line: line_no,
                seq: rec.seq,
                dropped,
            });
        }
        if rec.event == Event::Suppressed {
            let count = rec.suppressed.unwrap_or(0);
            self.summary.suppressed = self.summary.suppressed.saturating_add(count);
            self.summary.summaries += 1;
        }
        if let (Event::Rotated, Some(seq), Some(anchor)) = (rec.event, rec.anchor_seq, &rec.anchor)
        {
            self.rotations.push((seq, anchor.clone(), rec.seq));
        }
        let head = ChainHead::after(rec.seq, line);
        self.summary.records += 1;
        if self.summary.first.is_none() {
            self.first_path = Some(path.to_owned());
            self.summary.first_seq = Some(rec.seq);
            self.summary.first = Some(FirstRecord {
                seq: rec.seq,
                prev_hash: rec.prev_hash,
                hash: rec.hash,
                // Judged once the whole set has been read.
                start: Start::Genesis,
            });
        }
        self.summary.last_line_hash = Some(head.prev_hash.clone());
        self.expected = Some(head);
        Ok(())
    }

    /// Accepts the set's start, or says why records before it are missing.
    fn judge_start(&mut self, expected: &ExpectedStart) -> Result<(), ChainError> {
        let (Some(first), Some(path)) = (&mut self.summary.first, &self.first_path) else {
            return Ok(());
        };
        let unexpected = |what: String| ChainError::UnexpectedStart {
            path: path.clone(),
            seq: first.seq,
            prev_hash: first.prev_hash.clone(),
            expected: what,
        };
        first.start = match expected {
            ExpectedStart::Anchor(anchor) if first.prev_hash == *anchor => Start::AsExpected,
            ExpectedStart::Anchor(anchor) => return Err(unexpected(format!("anchor {anchor}"))),
            ExpectedStart::Seq(seq) if first.seq == *seq => Start::AsExpected,
            ExpectedStart::Seq(seq) => return Err(unexpected(format!("seq {seq}"))),
            ExpectedStart::Beginning if first.seq == 0 && first.prev_hash == GENESIS_HASH => {
                Start::Genesis
            }
            ExpectedStart::Beginning => {
                // Only a note that names this very record explains the start:
                // the notes of earlier rotations name files deleted since.
                let note = self
                    .rotations
                    .iter()
                    .find(|(seq, anchor, _)| *seq == first.seq && *anchor == first.prev_hash);
                match note {
                    Some(&(_, _, noted_at)) => Start::AfterRotation { noted_at },
                    None => {
                        return Err(ChainError::StartsMidChain {
                            path: path.clone(),
                            seq: first.seq,
                            prev_hash: first.prev_hash.clone(),
                        });
                    }
                }
            }
        };
        Ok(())
    }
}
