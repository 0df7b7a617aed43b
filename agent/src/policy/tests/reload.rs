//! `watch_dir`: valid changes are published, a bad file never is.

use std::{path::Path, sync::Arc, time::Duration};

use super::doc;
use crate::policy::{PolicySet, Settings, watch_dir};

const INTERVAL: Duration = Duration::from_millis(10);

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write policy file");
}

async fn next_set(rx: &mut tokio::sync::watch::Receiver<Arc<PolicySet>>) -> Arc<PolicySet> {
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a new set within 5 s")
        .expect("watcher alive");
    Arc::clone(&rx.borrow_and_update())
}

async fn wait_for_rejections(rejections: &crate::policy::Rejections, want: u64) {
    for _ in 0..500 {
        if rejections.count() >= want {
            return;
        }
        tokio::time::sleep(INTERVAL).await;
    }
    panic!("rejections stayed at {}", rejections.count());
}

#[tokio::test]
async fn reload_keeps_the_last_good_set_on_a_bad_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.yaml", &doc("default", "a", "  rules: [{}]"));
    write(dir.path(), "ignored.txt", "not a policy");
    let mut watch = watch_dir(dir.path(), Settings::default(), INTERVAL);
    assert_eq!(watch.initial, Ok(()));
    let first = Arc::clone(&watch.sets.borrow_and_update());
    assert_eq!(first.len(), 1);
    assert!(first.is_loaded());

    // A bad second file rejects the whole new set; the old one stays.
    write(dir.path(), "b.yaml", &doc("default", "b", "  acton: DENY"));
    wait_for_rejections(&watch.rejections, 1).await;
    assert!(!watch.sets.has_changed().expect("watcher alive"));
    assert!(Arc::ptr_eq(&first, &watch.sets.borrow()));
    // The same bad content is not rejected (or logged) again.
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(watch.rejections.count(), 1);

    // Fixing it publishes both files' policies.
    write(
        dir.path(),
        "b.yaml",
        &doc("default", "b", "  action: DENY\n  rules: [{}]"),
    );
    let fixed = next_set(&mut watch.sets).await;
    let ids: Vec<_> = fixed.policies().iter().map(|p| p.id()).collect();
    assert_eq!(ids, ["default/a", "default/b"]);

    // Removing a file is a change too.
    std::fs::remove_file(dir.path().join("a.yaml")).expect("remove");
    assert_eq!(next_set(&mut watch.sets).await.len(), 1);
    assert_eq!(watch.rejections.count(), 1);
}

#[tokio::test]
async fn a_bad_initial_load_fails_closed_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.yml", "apiVersion: nope\n");
    let mut watch = watch_dir(dir.path(), Settings::default(), INTERVAL);
    let errors = watch.initial.clone().expect_err("invalid");
    assert_eq!(errors.0[0].line(), Some(1));
    assert_eq!(watch.rejections.count(), 1);
    assert!(!watch.sets.borrow_and_update().is_loaded());

    write(dir.path(), "a.yml", &doc("default", "a", "  rules: [{}]"));
    let set = next_set(&mut watch.sets).await;
    assert!(set.is_loaded());
    assert_eq!(set.len(), 1);
}

#[tokio::test]
async fn a_missing_directory_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let watch = watch_dir(&missing, Settings::default(), INTERVAL);
    let errors = watch.initial.expect_err("missing dir");
    assert!(errors.to_string().contains("cannot read"), "{errors}");
    assert!(!watch.sets.borrow().is_loaded());
}
