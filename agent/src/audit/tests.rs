use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{LazyLock, mpsc},
    time::{Duration, Instant},
};

use proptest::prelude::*;

use super::{
    chain::{self, ChainHead},
    writer::Sink,
    *,
};

fn sample(i: u64) -> AuditRecord {
    let mut rec = AuditRecord::new(
        if i.is_multiple_of(2) {
            Event::Decision
        } else {
            Event::Close
        },
        Direction::Inbound,
        Source {
            spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/frontend".to_owned()),
            address: "198.18.0.5:43210".parse().unwrap(),
        },
        Destination {
            workload: Some("shop/backend".to_owned()),
            spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/backend".to_owned()),
            address: "198.18.0.9".parse().unwrap(),
            port: 8080,
        },
        Decision::Allow,
        "matched ALLOW policy",
    );
    rec.policy = Some("shop/allow-frontend".to_owned());
    rec.rule = Some(0);
    rec.tls_version = Some("TLSv1.3".to_owned());
    rec.peer_cert_serial = Some("3a5f01".to_owned());
    if rec.event == Event::Close {
        rec.bytes_sent = Some(1000 + i);
        rec.bytes_received = Some(52_000 + i);
        rec.duration_ms = Some(17);
    }
    rec
}

fn write_log(path: &Path, max_bytes: u64, range: std::ops::Range<u64>) {
    let log = AuditLog::open_file(path, max_bytes, "node-a").unwrap();
    for i in range {
        log.record(sample(i));
    }
    log.close();
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn broken_at(result: Result<Summary, ChainError>) -> (u64, Problem) {
    match result {
        Err(ChainError::Broken { line, problem, .. }) => (line, problem),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

fn log_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    (dir, path)
}

#[test]
fn chain_of_records_verifies() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..10);
    let summary = verify_files(&[&path]).unwrap();
    assert_eq!(summary.records, 10);
    assert_eq!(summary.first_seq, Some(0));
    let last = lines(&path).pop().unwrap();
    assert_eq!(
        summary.last_line_hash.unwrap(),
        chain::sha256_hex(last.as_bytes())
    );
}

#[test]
fn writer_stamps_node_and_chain_fields() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let lines = lines(&path);
    let mut prev = GENESIS_HASH.to_owned();
    for (i, line) in lines.iter().enumerate() {
        let rec: AuditRecord = serde_json::from_str(line).unwrap();
        assert_eq!(rec.seq, i as u64);
        assert_eq!(rec.node, "node-a");
        assert_eq!(rec.prev_hash, prev);
        // The sealed line is the record's own serialization, hash last.
        assert_eq!(&serde_json::to_string(&rec).unwrap(), line);
        assert!(line.ends_with(&format!(",\"hash\":\"{}\"}}", rec.hash)));
        prev = chain::sha256_hex(line.as_bytes());
    }
}

#[test]
fn plaintext_source_has_no_spiffe_id_member() {
    let mut rec = sample(0);
    rec.source.spiffe_id = None;
    let line = chain::seal(&mut rec, &ChainHead::genesis());
    let text = String::from_utf8(line).unwrap();
    assert!(!text.contains("\"source\":{\"spiffe_id\""), "{text}");
    assert!(text.contains("\"source\":{\"address\":\"198.18.0.5:43210\"}"));
}

#[test]
fn editing_a_digit_is_detected_as_edited_at_that_line() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..6);
    let mut lines = lines(&path);
    // Line 4 is record 3, a close event with bytes_sent 1003.
    assert!(lines[3].contains("\"bytes_sent\":1003"));
    lines[3] = lines[3].replace("\"bytes_sent\":1003", "\"bytes_sent\":1008");
    write_lines(&path, &lines);
    assert_eq!(broken_at(verify_files(&[&path])), (4, Problem::Edited));
}

#[test]
fn editing_the_hash_itself_is_detected() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    let rec: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
    lines[1] = lines[1].replace(&rec.hash, &chain::sha256_hex(b"forged"));
    write_lines(&path, &lines);
    assert_eq!(broken_at(verify_files(&[&path])), (2, Problem::Edited));
}

#[test]
fn deleting_a_line_is_detected_as_removed() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..6);
    let mut lines = lines(&path);
    lines.remove(2);
    write_lines(&path, &lines);
    assert_eq!(
        broken_at(verify_files(&[&path])),
        (3, Problem::RemovedOrReordered)
    );
}

#[test]
fn deleting_the_first_line_shows_as_a_later_start() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    lines.remove(0);
    write_lines(&path, &lines);
    // A set may start mid-chain (old generations rotated away), so the
    // verifier cannot tell; what it reports is where the set starts.
    let summary = verify_files(&[&path]).unwrap();
    assert_eq!(summary.first_seq, Some(1));
}

#[test]
fn swapping_two_lines_is_detected_as_reordered() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..6);
    let mut lines = lines(&path);
    lines.swap(1, 2);
    write_lines(&path, &lines);
    assert_eq!(
        broken_at(verify_files(&[&path])),
        (2, Problem::RemovedOrReordered)
    );
}

#[test]
fn truncating_mid_line_is_detected_as_truncated() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..4);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
    assert_eq!(broken_at(verify_files(&[&path])), (4, Problem::Truncated));
}

#[test]
fn a_foreign_line_is_detected_as_not_json() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    lines.insert(1, "Jan 01 00:00:00 host something happened".to_owned());
    write_lines(&path, &lines);
    assert_eq!(broken_at(verify_files(&[&path])), (2, Problem::NotJson));
}

#[test]
fn rotation_keeps_one_verifiable_chain_across_files() {
    let (_dir, path) = log_path();
    let sealed_len = |i| {
        let mut rec = sample(i);
        rec.node = "node-a".to_owned();
        chain::seal(&mut rec, &ChainHead::genesis()).len() as u64 + 1
    };
    let (decision, close) = (sealed_len(0), sealed_len(1));
    // Records alternate decision/close; close lines are longer. Three lines
    // fit (at most two closes), four do not: 4 files for 12 records.
    write_log(&path, 2 * close + decision + 8, 0..12);
    let files: Vec<PathBuf> = [3, 2, 1]
        .map(|n| generation(&path, n))
        .into_iter()
        .chain([path.clone()])
        .collect();
    for file in &files {
        assert_eq!(lines(file).len(), 3, "{}", file.display());
    }
    assert!(!generation(&path, 4).exists());
    let summary = verify_files(&files).unwrap();
    assert_eq!(summary.records, 12);
    assert_eq!(summary.first_seq, Some(0));
    // Out of order, the links break at the first line of the second file.
    let swapped = [files[1].clone(), files[0].clone()];
    assert_eq!(
        broken_at(verify_files(&swapped)),
        (1, Problem::RemovedOrReordered)
    );
}

#[test]
fn rotation_keeps_five_generations() {
    let (_dir, path) = log_path();
    // Every record gets its own file.
    write_log(&path, 1, 0..9);
    assert!(generation(&path, GENERATIONS).exists());
    assert!(!generation(&path, GENERATIONS + 1).exists());
    let files: Vec<PathBuf> = (1..=GENERATIONS)
        .rev()
        .map(|n| generation(&path, n))
        .chain([path.clone()])
        .collect();
    let summary = verify_files(&files).unwrap();
    assert_eq!(summary.records, 6);
    assert_eq!(summary.first_seq, Some(3));
}

#[test]
fn reopening_an_existing_file_continues_the_chain() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    write_log(&path, u64::MAX, 3..5);
    let summary = verify_files(&[&path]).unwrap();
    assert_eq!(summary.records, 5);
    let last: AuditRecord = serde_json::from_str(&lines(&path)[4]).unwrap();
    assert_eq!(last.seq, 4);
}

#[test]
fn reopening_an_empty_live_file_continues_from_the_previous_generation() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    // A crash right after rotation leaves an empty live file.
    fs::rename(&path, generation(&path, 1)).unwrap();
    fs::write(&path, b"").unwrap();
    write_log(&path, u64::MAX, 3..4);
    let summary = verify_files(&[generation(&path, 1), path.clone()]).unwrap();
    assert_eq!(summary.records, 4);
}

#[test]
fn reopening_a_torn_file_rotates_it_away_and_starts_a_new_chain() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let torn = {
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":3,\"prev_ha");
        fs::write(&path, &bytes).unwrap();
        bytes
    };
    write_log(&path, u64::MAX, 3..5);
    // The damaged file is kept byte for byte as evidence.
    assert_eq!(fs::read(generation(&path, 1)).unwrap(), torn);
    assert_eq!(
        broken_at(verify_files(&[generation(&path, 1)])),
        (4, Problem::Truncated)
    );
    let summary = verify_files(&[&path]).unwrap();
    assert_eq!((summary.records, summary.first_seq), (2, Some(0)));
}

#[test]
fn reopening_a_file_with_an_edited_last_line_starts_a_new_chain() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    lines[2] = lines[2].replace("node-a", "node-b");
    write_lines(&path, &lines);
    write_log(&path, u64::MAX, 3..4);
    assert!(generation(&path, 1).exists());
    assert_eq!(verify_files(&[&path]).unwrap().first_seq, Some(0));
}

#[test]
fn files_are_created_with_mode_0600() {
    let (_dir, path) = log_path();
    write_log(&path, 1, 0..3);
    for file in [path.clone(), generation(&path, 1), generation(&path, 2)] {
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
}

/// A sink that blocks in every write until the test lets it go.
struct StuckSink {
    release: mpsc::Receiver<()>,
}

impl Sink for StuckSink {
    fn write_line(&mut self, _line: &[u8]) -> std::io::Result<()> {
        let _ = self.release.recv();
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_full_queue_drops_and_counts_without_blocking() {
    let (release_tx, release) = mpsc::channel();
    let log = AuditLog::spawn(
        StuckSink { release },
        ChainHead::genesis(),
        "node-a".to_owned(),
        2,
    )
    .unwrap();
    let start = Instant::now();
    for i in 0..10 {
        log.record(sample(i));
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    // Two fit in the queue, and the writer may already hold a third.
    assert!((7..=8).contains(&log.dropped()), "{}", log.dropped());
    drop(release_tx); // every write returns at once from now on
    log.close();
}

#[test]
fn verify_reports_unreadable_files() {
    let (_dir, path) = log_path();
    assert!(matches!(verify_files(&[&path]), Err(ChainError::Io { .. })));
}

/// A valid four-record log, built without the writer thread.
static VALID_LOG: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut head = ChainHead::genesis();
    let mut out = Vec::new();
    for i in 0..4 {
        let mut rec = sample(i);
        rec.node = "node-a".to_owned();
        let line = chain::seal(&mut rec, &head);
        head = ChainHead::after(rec.seq, &line);
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    out
});

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_single_byte_change_is_detected(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut bytes = VALID_LOG.clone();
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        prop_assert!(verify_files(&[file.path()]).is_err(), "byte {i} ^ {flip:#x} went unnoticed");
    }
}

#[test]
fn the_unchanged_proptest_log_verifies() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&VALID_LOG).unwrap();
    assert_eq!(verify_files(&[file.path()]).unwrap().records, 4);
}
