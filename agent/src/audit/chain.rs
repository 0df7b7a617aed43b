//! The hash chain: sealing a record into a line and checking a line.
//!
//! A sealed line is `BODY` with its closing `}` replaced by
//! `,"hash":"<64 lower-case hex>"}`, where `BODY` is the compact JSON of the
//! record without its `hash` member and `hash = SHA-256(BODY)`. Checking is
//! textual: the verifier strips that exact suffix, puts the `}` back and
//! hashes the bytes as they are on disk, so it never depends on
//! re-serializing the record the same way (number formats, escapes, member
//! order of a future version).

use ring::digest::{Context, SHA256, digest};

use super::AuditRecord;

/// `prev_hash` of the first record of a chain (`seq` 0).
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const HASH_HEX_LEN: usize = 64;
const HASH_SUFFIX: &[u8] = b"\"}";

/// The link to the next record: its `seq` and `prev_hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev_hash: String,
}

impl ChainHead {
    /// The head of a new chain.
    pub fn genesis() -> Self {
        ChainHead {
            next_seq: 0,
            prev_hash: GENESIS_HASH.to_owned(),
        }
    }

    /// The head after `line` (without its newline) was written as `seq`.
    pub fn after(seq: u64, line: &[u8]) -> Self {
        Self::linked(seq, sha256_hex(line))
    }

    /// The head after the line numbered `seq` whose SHA-256 is `line_hash`.
    fn linked(seq: u64, line_hash: String) -> Self {
        ChainHead {
            // Saturating: `seq` comes from files being verified, which must not
            // be able to panic the verifier.
            next_seq: seq.saturating_add(1),
            prev_hash: line_hash,
        }
    }
}

/// Why a single line does not check, before any link to its neighbours is
/// considered.
#[derive(Debug)]
pub enum LineFault {
    /// Not valid UTF-8 JSON.
    NotJson(String),
    /// Valid JSON, but not a sealed audit record or its hash does not match.
    Edited(String),
}

/// Stamps `rec` with the chain position and returns the sealed line without
/// its newline, and the head after it (what [`ChainHead::after`] would
/// compute from the line). The record's hash covers `BODY` and the next
/// link covers the sealed line; both start with `BODY` without its closing
/// `}`, which is hashed once for the two.
pub fn seal(rec: &mut AuditRecord, head: &ChainHead) -> (Vec<u8>, ChainHead) {
    rec.seq = head.next_seq;
    rec.prev_hash.clone_from(&head.prev_hash);
    rec.hash.clear();
    // Serializing plain data with string keys cannot fail.
    let mut line = serde_json::to_vec(&*rec).expect("audit records serialize");
    line.pop(); // the closing '}'
    let mut common = Context::new(&SHA256);
    common.update(&line);
    let mut body = common.clone();
    body.update(b"}");
    let hash = hex_digest(body.finish());
    let start = line.len();
    line.extend_from_slice(HASH_PREFIX);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(HASH_SUFFIX);
    common.update(&line[start..]);
    let next = ChainHead::linked(rec.seq, hex_digest(common.finish()));
    rec.hash = hash;
    (line, next)
}

/// Parses one line (without its newline) and checks its own hash.
pub fn check_line(line: &[u8]) -> Result<AuditRecord, LineFault> {
    let rec: AuditRecord = match serde_json::from_slice(line) {
        Ok(rec) => rec,
        Err(e) if e.is_data() => {
            return Err(LineFault::Edited(format!("not an audit record: {e}")));
        }
        Err(e) => return Err(LineFault::NotJson(e.to_string())),
    };
    let (body_open, recorded) = split_hash(line).ok_or_else(|| {
        LineFault::Edited("the hash is not the last member in sealed form".to_owned())
    })?;
    let mut hasher = Context::new(&SHA256);
    hasher.update(body_open);
    hasher.update(b"}");
    let computed = hex_digest(hasher.finish());
    if computed.as_bytes() != recorded {
        return Err(LineFault::Edited(format!(
            "hash mismatch: recorded {}, computed {computed}",
            String::from_utf8_lossy(recorded)
        )));
    }
    Ok(rec)
}

/// Splits a sealed line into the body without its closing `}` and the hex
/// hash, if the line ends in exactly `,"hash":"<64 lower-case hex>"}`.
fn split_hash(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = line.strip_suffix(HASH_SUFFIX)?;
    let hex_start = rest.len().checked_sub(HASH_HEX_LEN)?;
    let (before, hash) = rest.split_at(hex_start);
    let body_open = before.strip_suffix(HASH_PREFIX)?;
    let lower_hex = hash
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    lower_hex.then_some((body_open, hash))
}

/// ring's SHA-256, not a portable one: it has SHA-NI, AVX and SSSE3 code,
/// for x86 CPUs without SHA-NI (and valgrind, which hides it), where a
/// portable implementation took 40% of the server agent's instructions per
/// connection.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_digest(digest(&SHA256, bytes))
}

/// Lower-case hex of a SHA-256 digest. `hex::encode` collects chars one by
/// one, which cost more per record than formatting the rest of it.
fn hex_digest(digest: ring::digest::Digest) -> String {
    let mut out = [0u8; HASH_HEX_LEN];
    hex::encode_to_slice(digest.as_ref(), &mut out).expect("a SHA-256 digest is 32 bytes");
    String::from_utf8_lossy(&out).into_owned()
}
