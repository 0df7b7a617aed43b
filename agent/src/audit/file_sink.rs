//! The audit file: append with mode 0600, continue the chain of an existing
//! file, rotate by size.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::{
    AuditError,
    chain::{self, ChainHead, LineFault},
    writer::{Anchor, Sink},
};

/// Rotated generations kept besides the live file: `path.1` (newest) to
/// `path.5` (oldest); the next rotation deletes `path.5`.
pub const GENERATIONS: u32 = 5;

/// How far back from the end to look for the last line when resuming.
/// Records are well under a kilobyte; a longer last line is not ours.
const TAIL_MAX: u64 = 1 << 20;

/// Writes sealed lines to `path`, rotating before a line would take the file
/// past `max_bytes`. Rotation does not touch the chain: the first line of the
/// new file links to the last line of `path.1`, so the generations verify in
/// order as one chain. When rotation deletes the oldest generation,
/// [`Sink::make_room`] returns where the retained files now start, which the
/// writer seals into the chain as a `rotated` note.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    out: BufWriter<File>,
    size: u64,
}

impl FileSink {
    /// Opens `path` for appending and returns where the chain continues.
    pub fn open(path: &Path, max_bytes: u64) -> Result<(Self, ChainHead), AuditError> {
        let resume_err = |error| AuditError::Resume {
            path: path.to_owned(),
            error,
        };
        let head = match resume_point(path).map_err(resume_err)? {
            Resume::Continue(head) => head,
            Resume::Fresh => ChainHead::genesis(),
            Resume::Broken(why) => {
                // Appending would bury the damage in the middle of a file that
                // could then never verify past it; moving the file aside
                // keeps the evidence as is and starts a clean chain.
                tracing::warn!(
                    path = %path.display(),
                    reason = %why,
                    "the audit log's last record does not verify; rotating it away and starting a new chain"
                );
                rotate_files(path).map_err(|error| AuditError::Rotate {
                    path: path.to_owned(),
                    error,
                })?;
                ChainHead::genesis()
            }
        };
        let open_err = |error| AuditError::Open {
            path: path.to_owned(),
            error,
        };
        let file = open_append(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let sink = FileSink {
            path: path.to_owned(),
            max_bytes,
            out: BufWriter::new(file),
            size,
        };
        Ok((sink, head))
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        rotate_files(&self.path)?;
        let file = open_append(&self.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

impl Sink for FileSink {
    fn make_room(&mut self, len: u64) -> io::Result<Option<Anchor>> {
        // A record larger than max_bytes still gets written, alone in its
        // file, rather than dropped.
        if self.size == 0 || self.size.saturating_add(len) <= self.max_bytes {
            return Ok(None);
        }
        let oldest = generation(&self.path, GENERATIONS);
        // Renaming `path.(N-1)` over `path.N` is what deletes the oldest.
        let deletes =
            oldest.exists() && generation(&self.path, GENERATIONS.saturating_sub(1)).exists();
        self.rotate()?;
        Ok(if deletes { first_anchor(&oldest) } else { None })
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        let len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        self.size = self.size.saturating_add(len).saturating_add(1);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The `seq` and `prev_hash` of the first record in `path`; `None` (and a
/// warning) when it cannot be read or does not verify, in which case verify
/// reports the set's start as unexplained, as it should.
fn first_anchor(path: &Path) -> Option<Anchor> {
    let read = || -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        BufReader::new(File::open(path)?)
            .take(TAIL_MAX)
            .read_until(b'\n', &mut line)?;
        Ok(line)
    };
    let line = match read() {
        Ok(line) => line,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot read the oldest audit generation to note where it starts");
            return None;
        }
    };
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    match chain::check_line(line) {
        Ok(rec) => Some(Anchor {
            seq: rec.seq,
            prev_hash: rec.prev_hash,
        }),
        Err(_) => {
            tracing::warn!(path = %path.display(),
                "the oldest audit generation's first record does not verify; not noting its start");
            None
        }
    }
}

/// `path.N`.
pub fn generation(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Shifts `path.4` → `path.5`, …, `path` → `path.1`.
fn rotate_files(path: &Path) -> io::Result<()> {
    for n in (1..GENERATIONS).rev() {
        rename_if_exists(&generation(path, n), &generation(path, n + 1))?;
    }
    rename_if_exists(path, &generation(path, 1))
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // O_APPEND so a second writer (or an operator's `>>`) cannot make us
    // overwrite; 0600 because records name workloads and peers. The mode only
    // applies on creation: an existing file keeps the mode its owner chose.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

enum Resume {
    /// No previous record anywhere: start a new chain.
    Fresh,
    Continue(ChainHead),
    /// The live file's last record does not verify.
    Broken(String),
}

fn resume_point(path: &Path) -> io::Result<Resume> {
    match last_line(path)? {
        LastLine::Complete(line) => Ok(match check(&line) {
            Ok(head) => Resume::Continue(head),
            Err(why) => Resume::Broken(why),
        }),
        LastLine::Partial => Ok(Resume::Broken(
            "the file ends in the middle of a record".to_owned(),
        )),
        LastLine::TooLong => Ok(Resume::Broken(format!(
            "the last line is longer than {TAIL_MAX} bytes"
        ))),
        // An empty live file: a crash right after rotation. Continue from
        // the newest generation so the set stays one chain.
        LastLine::Missing => {
            let previous = generation(path, 1);
            match last_line(&previous)? {
                LastLine::Missing => Ok(Resume::Fresh),
                LastLine::Complete(line) => match check(&line) {
                    Ok(head) => Ok(Resume::Continue(head)),
                    Err(why) => Ok(fresh_after_bad(&previous, &why)),
                },
                LastLine::Partial => Ok(fresh_after_bad(&previous, "ends mid-record")),
                LastLine::TooLong => Ok(fresh_after_bad(&previous, "last line too long")),
            }
        }
    }
}

fn fresh_after_bad(previous: &Path, why: &str) -> Resume {
    tracing::warn!(
        path = %previous.display(),
        reason = why,
        "the previous audit generation's last record does not verify; starting a new chain"
    );
    Resume::Fresh
}

fn check(line: &[u8]) -> Result<ChainHead, String> {
    match chain::check_line(line) {
        Ok(rec) => Ok(ChainHead::after(rec.seq, line)),
        Err(LineFault::NotJson(d)) => Err(format!("not JSON: {d}")),
        Err(LineFault::Edited(d)) => Err(format!("edited: {d}")),
    }
}

enum LastLine {
    /// No file or an empty one.
    Missing,
    /// The last line, without its newline.
    Complete(Vec<u8>),
    /// The file does not end with a newline.
    Partial,
    TooLong,
}

fn last_line(path: &Path) -> io::Result<LastLine> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LastLine::Missing),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(LastLine::Missing);
    }
    let start = len.saturating_sub(TAIL_MAX);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let Some(body) = tail.strip_suffix(b"\n") else {
        return Ok(LastLine::Partial);
    };
    Ok(match body.iter().rposition(|&b| b == b'\n') {
        Some(nl) => LastLine::Complete(body[nl + 1..].to_vec()),
        None if start == 0 => LastLine::Complete(body.to_vec()),
        None => LastLine::TooLong,
    })
}
