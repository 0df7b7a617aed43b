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
    limiter,
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
    let log = AuditLog::open_file(path, max_bytes, "node-a", LimiterConfig::default()).unwrap();
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

/// Verifies `paths` expecting the set to start at the beginning.
fn verify<P: AsRef<Path>>(paths: &[P]) -> Result<Summary, ChainError> {
    verify_files(paths, &ExpectedStart::Beginning)
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
    let summary = verify(&[&path]).unwrap();
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
fn sealing_links_the_next_record_as_a_hash_of_the_whole_line_would() {
    let head = ChainHead::after(6, b"an earlier line");
    let (line, next) = chain::seal(&mut sample(0), &head);
    assert_eq!(next, ChainHead::after(7, &line));
    let rec = chain::check_line(&line).expect("the record's own hash checks");
    assert_eq!((rec.seq, rec.prev_hash), (7, head.prev_hash));
}

#[test]
fn plaintext_source_has_no_spiffe_id_member() {
    let mut rec = sample(0);
    rec.source.as_mut().unwrap().spiffe_id = None;
    let line = chain::seal(&mut rec, &ChainHead::genesis()).0;
    let text = String::from_utf8(line).unwrap();
    assert!(!text.contains("\"source\":{\"spiffe_id\""), "{text}");
    assert!(text.contains("\"source\":{\"address\":\"198.18.0.5:43210\"}"));
}

#[test]
fn the_service_dialled_follows_the_destination_and_is_absent_otherwise() {
    let mut rec = sample(0);
    let without =
        String::from_utf8(chain::seal(&mut rec.clone(), &ChainHead::genesis()).0).unwrap();
    assert!(!without.contains("\"service\""), "{without}");
    rec.service = Some(Service {
        name: "shop/backend".to_owned(),
        address: "198.19.0.10".parse().unwrap(),
        port: 80,
    });
    let text = String::from_utf8(chain::seal(&mut rec, &ChainHead::genesis()).0).unwrap();
    assert!(
        text.contains(
            "\"port\":8080},\"service\":{\"name\":\"shop/backend\",\"address\":\"198.19.0.10\",\"port\":80},\"decision\""
        ),
        "{text}"
    );
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
    assert_eq!(broken_at(verify(&[&path])), (4, Problem::Edited));
}

#[test]
fn editing_the_hash_itself_is_detected() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    let rec: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
    lines[1] = lines[1].replace(&rec.hash, &chain::sha256_hex(b"forged"));
    write_lines(&path, &lines);
    assert_eq!(broken_at(verify(&[&path])), (2, Problem::Edited));
}

#[test]
fn deleting_a_line_is_detected_as_removed() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..6);
    let mut lines = lines(&path);
    lines.remove(2);
    write_lines(&path, &lines);
    assert_eq!(
        broken_at(verify(&[&path])),
        (3, Problem::RemovedOrReordered)
    );
}

#[test]
fn a_set_missing_its_first_records_fails_unless_told_its_anchor() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..4);
    let mut lines = lines(&path);
    let removed = lines.remove(0);
    lines.remove(0);
    write_lines(&path, &lines);
    match verify(&[&path]) {
        Err(e @ ChainError::StartsMidChain { seq: 2, .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("chain starts at seq 2, not at the beginning"),
                "{text}"
            );
        }
        other => panic!("expected a mid-chain start, got {other:?}"),
    }
    // The anchor is the hash of the last line removed (what verify printed
    // as "last record hash" for it).
    let kept: AuditRecord = serde_json::from_str(&lines[0]).unwrap();
    let right = ExpectedStart::Anchor(kept.prev_hash.clone());
    let summary = verify_files(&[&path], &right).unwrap();
    assert_eq!((summary.records, summary.first_seq), (2, Some(2)));
    assert_eq!(summary.first.unwrap().start, Start::AsExpected);
    let wrong = ExpectedStart::Anchor(chain::sha256_hex(removed.as_bytes()));
    assert!(matches!(
        verify_files(&[&path], &wrong),
        Err(ChainError::UnexpectedStart { seq: 2, .. })
    ));
    assert!(verify_files(&[&path], &ExpectedStart::Seq(2)).is_ok());
    assert!(verify_files(&[&path], &ExpectedStart::Seq(1)).is_err());
}

#[test]
fn a_whole_set_starts_at_genesis() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..2);
    let first = verify(&[&path]).unwrap().first.unwrap();
    assert_eq!((first.seq, first.start), (0, Start::Genesis));
    assert_eq!(first.prev_hash, GENESIS_HASH);
    // An anchor that is not the genesis hash is not met by a whole chain.
    let other = ExpectedStart::Anchor(chain::sha256_hex(b"elsewhere"));
    assert!(verify_files(&[&path], &other).is_err());
}

#[test]
fn swapping_two_lines_is_detected_as_reordered() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..6);
    let mut lines = lines(&path);
    lines.swap(1, 2);
    write_lines(&path, &lines);
    assert_eq!(
        broken_at(verify(&[&path])),
        (2, Problem::RemovedOrReordered)
    );
}

#[test]
fn truncating_mid_line_is_detected_as_truncated() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..4);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
    assert_eq!(broken_at(verify(&[&path])), (4, Problem::Truncated));
}

#[test]
fn a_foreign_line_is_detected_as_not_json() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    let mut lines = lines(&path);
    lines.insert(1, "Jan 01 00:00:00 host something happened".to_owned());
    write_lines(&path, &lines);
    assert_eq!(broken_at(verify(&[&path])), (2, Problem::NotJson));
}

#[test]
fn rotation_keeps_one_verifiable_chain_across_files() {
    let (_dir, path) = log_path();
    let sealed_len = |i| {
        let mut rec = sample(i);
        rec.node = "node-a".to_owned();
        chain::seal(&mut rec, &ChainHead::genesis()).0.len() as u64 + 1
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
    let summary = verify(&files).unwrap();
    assert_eq!(summary.records, 12);
    assert_eq!(summary.first_seq, Some(0));
    // Out of order, the links break at the first line of the second file.
    let swapped = [files[1].clone(), files[0].clone()];
    assert_eq!(
        broken_at(verify(&swapped)),
        (1, Problem::RemovedOrReordered)
    );
}

#[test]
fn rotation_keeps_five_generations_and_notes_each_deletion_in_the_chain() {
    let (_dir, path) = log_path();
    // Every record gets its own file, except that a rotation which deletes
    // the oldest generation puts its note first in the new file.
    write_log(&path, 1, 0..9);
    assert!(generation(&path, GENERATIONS).exists());
    assert!(!generation(&path, GENERATIONS + 1).exists());
    let files: Vec<PathBuf> = (1..=GENERATIONS)
        .rev()
        .map(|n| generation(&path, n))
        .chain([path.clone()])
        .collect();
    // Records 0..2 were deleted with the three oldest generations; the set
    // keeps 6 records and the 3 notes (seq 6, 8, 10), the last of which
    // names where it starts.
    let summary = verify(&files).unwrap();
    assert_eq!(summary.records, 9);
    assert_eq!(summary.first_seq, Some(3));
    assert_eq!(
        summary.first.unwrap().start,
        Start::AfterRotation { noted_at: 10 }
    );
    let note: AuditRecord = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(note.event, Event::Rotated);
    assert_eq!(note.anchor_seq, Some(3));
    // Per file: what an operator keeps before archiving it.
    let oldest_last_line = lines(&files[0]).pop().unwrap();
    let oldest = &summary.files[0];
    assert_eq!((oldest.records, oldest.seqs), (1, Some((3, 3))));
    let anchor_hash = chain::sha256_hex(oldest_last_line.as_bytes());
    assert_eq!(oldest.last_line_hash.as_ref(), Some(&anchor_hash));
    assert_eq!(summary.files[5].seqs, Some((10, 11)));

    // Deleting the oldest file by hand is not rotation: no note names the
    // new start.
    fs::remove_file(&files[0]).unwrap();
    assert!(matches!(
        verify(&files[1..]),
        Err(ChainError::StartsMidChain { seq: 4, .. })
    ));
    let anchor = ExpectedStart::Anchor(anchor_hash);
    assert_eq!(verify_files(&files[1..], &anchor).unwrap().records, 8);
}

#[test]
fn reopening_an_existing_file_continues_the_chain() {
    let (_dir, path) = log_path();
    write_log(&path, u64::MAX, 0..3);
    write_log(&path, u64::MAX, 3..5);
    let summary = verify(&[&path]).unwrap();
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
    let summary = verify(&[generation(&path, 1), path.clone()]).unwrap();
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
        broken_at(verify(&[generation(&path, 1)])),
        (4, Problem::Truncated)
    );
    let summary = verify(&[&path]).unwrap();
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
    assert_eq!(verify(&[&path]).unwrap().first_seq, Some(0));
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
        LimiterConfig::default(),
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
    assert!(matches!(verify(&[&path]), Err(ChainError::Io { .. })));
}

/// A valid four-record log, built without the writer thread.
static VALID_LOG: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut head = ChainHead::genesis();
    let mut out = Vec::new();
    for i in 0..4 {
        let mut rec = sample(i);
        rec.node = "node-a".to_owned();
        // The next head from the line itself, not from seal's own.
        let (line, _) = chain::seal(&mut rec, &head);
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
        prop_assert!(verify(&[file.path()]).is_err(), "byte {i} ^ {flip:#x} went unnoticed");
    }
}

#[test]
fn the_unchanged_proptest_log_verifies() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&VALID_LOG).unwrap();
    assert_eq!(verify(&[file.path()]).unwrap().records, 4);
}

/// A sink that keeps lines in memory and blocks in its first write until the
/// test lets it go, telling the test when it got there.
struct GateSink {
    entered: Option<mpsc::Sender<()>>,
    release: Option<mpsc::Receiver<()>>,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Sink for GateSink {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if let (Some(entered), Some(release)) = (self.entered.take(), self.release.take()) {
            let _ = entered.send(());
            let _ = release.recv();
        }
        let mut out = self.out.lock().unwrap();
        out.extend_from_slice(line);
        out.push(b'\n');
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn drops_are_sealed_into_the_next_record_and_counted_by_verify() {
    let (entered_tx, entered) = mpsc::channel();
    let (release_tx, release) = mpsc::channel();
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = GateSink {
        entered: Some(entered_tx),
        release: Some(release),
        out: out.clone(),
    };
    let log = AuditLog::spawn(
        sink,
        ChainHead::genesis(),
        "node-a".to_owned(),
        2,
        LimiterConfig::default(),
    )
    .unwrap();
    log.record(sample(0));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    // The writer is stuck in record 0's write: two fit in the queue, seven
    // are dropped.
    for i in 1..10 {
        log.record(sample(i));
    }
    assert_eq!(log.dropped(), 7);
    release_tx.send(()).unwrap();
    log.close();

    let bytes = out.lock().unwrap().clone();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let records: Vec<AuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let marks: Vec<Option<u64>> = records.iter().map(|r| r.dropped_before).collect();
    assert_eq!(marks, [None, Some(7), None]);

    let (_dir, path) = log_path();
    fs::write(&path, &bytes).unwrap();
    let summary = verify(&[&path]).unwrap();
    assert_eq!(summary.dropped, 7);
    assert_eq!(
        summary.gaps,
        [Gap {
            path: path.clone(),
            line: 2,
            seq: 1,
            dropped: 7
        }]
    );
    // The count is part of the hashed bytes: removing it is an edit.
    let forged = text.replacen(",\"dropped_before\":7", "", 1);
    fs::write(&path, forged).unwrap();
    assert_eq!(broken_at(verify(&[&path])), (2, Problem::Edited));
}

fn refusal(ip: [u8; 4], port: u16) -> AuditRecord {
    let mut rec = sample(0);
    let source = rec.source.as_mut().unwrap();
    source.spiffe_id = None;
    source.address = std::net::SocketAddr::from((ip, port));
    rec.decision = Some(Decision::Deny);
    rec.reason = "plaintext from outside the mesh to a strict mTLS workload".to_owned();
    rec.policy = None;
    rec.rule = None;
    rec
}

fn limits(burst: u32, per_sec: f64, total_per_sec: f64, max_sources: usize) -> LimiterConfig {
    LimiterConfig {
        burst,
        per_sec,
        total_per_sec,
        max_sources,
        summary_interval: Duration::from_secs(10),
    }
}

#[test]
fn a_source_gets_its_burst_then_one_summary_per_window() {
    let t0 = Instant::now();
    let mut limiter = limiter::Limiter::new(limits(3, 1.0, 1000.0, 16), t0);
    let refusals: Vec<AuditRecord> = (0..10)
        .map(|i| refusal([198, 18, 0, 12], 40000 + i))
        .collect();
    let admitted = refusals
        .iter()
        .filter(|r| limiter.admit((*r).clone(), t0).is_some())
        .count();
    assert_eq!((admitted, limiter.suppressed()), (3, 7));
    // Another source has its own bucket.
    assert!(limiter.admit(refusal([198, 18, 0, 13], 1), t0).is_some());
    assert!(limiter.due(t0 + Duration::from_secs(5)).is_empty());
    let due = limiter.due(t0 + Duration::from_secs(10));
    assert_eq!(due.len(), 1);
    let summary = &due[0];
    assert_eq!(summary.event, Event::Suppressed);
    assert_eq!(summary.suppressed, Some(7));
    assert_eq!(summary.first_time.as_ref(), Some(&refusals[3].time));
    assert_eq!(summary.last_time.as_ref(), Some(&refusals[9].time));
    assert_eq!(summary.source, refusals[9].source);
    assert_eq!(summary.decision, Some(Decision::Deny));
    assert!(
        summary.reason.contains("the last: plaintext"),
        "{}",
        summary.reason
    );
    // Ten seconds refilled the bucket to its burst of three, no more.
    let later = t0 + Duration::from_secs(10);
    let again = (0..5)
        .filter(|i| {
            limiter
                .admit(refusal([198, 18, 0, 12], *i), later)
                .is_some()
        })
        .count();
    assert_eq!(again, 3);
}

#[test]
fn the_limiter_tracks_a_bounded_number_of_sources_and_loses_no_count() {
    let t0 = Instant::now();
    let mut limiter = limiter::Limiter::new(limits(1, 1.0, 1e9, 4), t0);
    for host in 0..100u8 {
        for port in 0..3 {
            limiter.admit(refusal([198, 18, 1, host], port), t0);
            assert!(limiter.tracked() <= 4);
        }
    }
    assert_eq!(limiter.suppressed(), 200);
    let summaries = limiter.drain();
    let total: u64 = summaries.iter().filter_map(|s| s.suppressed).sum();
    assert_eq!(total, 200);
    // Four sources still tracked, one overflow summary for the 96 forgotten.
    assert_eq!(summaries.len(), 5);
    assert!(
        summaries
            .iter()
            .any(|s| s.reason.contains("from 96 sources forgotten")),
        "{summaries:?}"
    );
    // Idle sources are forgotten once their bucket is full again.
    assert!(limiter.due(t0 + Duration::from_secs(60)).is_empty());
    assert_eq!(limiter.tracked(), 0);
}

#[test]
fn all_sources_together_share_one_more_bucket() {
    let t0 = Instant::now();
    let mut limiter = limiter::Limiter::new(limits(100, 100.0, 5.0, 1000), t0);
    let admitted = (0..50u8)
        .filter(|host| limiter.admit(refusal([198, 18, 2, *host], 1), t0).is_some())
        .count();
    assert_eq!(admitted, 5);
    assert_eq!(limiter.suppressed(), 45);
}

#[test]
fn the_log_writes_suppression_summaries_that_verify_adds_up() {
    let (_dir, path) = log_path();
    let log = AuditLog::open_file(&path, u64::MAX, "node-a", limits(2, 0.001, 1000.0, 16)).unwrap();
    for port in 0..50 {
        log.record_unauthenticated(refusal([198, 18, 0, 12], port));
    }
    // An authenticated decision goes through `record`, never limited.
    log.record(sample(0));
    assert_eq!(log.suppressed(), 48);
    log.close();
    let records: Vec<AuditRecord> = lines(&path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<Event> = records.iter().map(|r| r.event).collect();
    assert_eq!(
        events,
        [
            Event::Decision,
            Event::Decision,
            Event::Decision,
            Event::Suppressed
        ]
    );
    let summary = verify(&[&path]).unwrap();
    assert_eq!((summary.suppressed, summary.summaries), (48, 1));
}
