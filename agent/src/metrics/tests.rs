use super::{test_support::value, *};

#[test]
fn every_metric_is_registered_with_the_ambit_prefix() {
    let text = Metrics::new().encode();
    for name in [
        "ambit_connections_opened_total",
        "ambit_connections_active",
        "ambit_bytes_total",
        "ambit_policy_denials_total",
        "ambit_tls_handshake_failures_total",
        "ambit_enrolled_workloads",
        "ambit_mesh_destinations",
        "ambit_policy_reload_rejections_total",
        "ambit_policy_decision_cache_hits_total",
        "ambit_policy_decision_cache_misses_total",
        "ambit_audit_records_dropped_total",
        "ambit_audit_records_suppressed_total",
        "ambit_service_connections_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    for sample in test_support::parse(&text) {
        assert!(sample.name.starts_with("ambit_"), "{}", sample.name);
    }
}

#[test]
fn bounded_series_start_at_zero() {
    let text = Metrics::new().encode();
    for dir in Direction::ALL {
        for dec in Decision::ALL {
            let labels = [("direction", dir.as_str()), ("decision", dec.as_str())];
            assert_eq!(
                value(&text, "ambit_connections_opened_total", &labels),
                Some(0.0)
            );
        }
    }
    for reason in HandshakeFailure::ALL {
        let labels = [("reason", reason.as_str())];
        assert_eq!(
            value(&text, "ambit_tls_handshake_failures_total", &labels),
            Some(0.0)
        );
    }
}

#[test]
fn enum_discriminants_index_the_label_arrays() {
    for (i, dir) in Direction::ALL.into_iter().enumerate() {
        assert_eq!(dir as usize, i);
    }
    for (i, dec) in Decision::ALL.into_iter().enumerate() {
        assert_eq!(dec as usize, i);
    }
    for (i, reason) in HandshakeFailure::ALL.into_iter().enumerate() {
        assert_eq!(reason as usize, i);
    }
    for (i, reason) in Rejection::ALL.into_iter().enumerate() {
        assert_eq!(reason as usize, i);
    }
    for (i, outcome) in ServiceOutcome::ALL.into_iter().enumerate() {
        assert_eq!(outcome as usize, i);
    }
}

#[test]
fn counters_count_under_their_labels() {
    let m = Metrics::new();
    m.connection_opened(Direction::Inbound, Decision::Deny);
    m.connection_opened(Direction::Inbound, Decision::Deny);
    m.connection_opened(Direction::Outbound, Decision::Allow);
    m.policy_denied();
    m.add_bytes(100, 2000);
    m.add_bytes(1, 2);
    m.tls_handshake_failed(HandshakeFailure::Untrusted);
    m.policy_reload_rejected();
    m.decision_cache_hit();
    m.decision_cache_hit();
    m.decision_cache_miss();
    m.set_enrolled_workloads(7);
    m.set_mesh_destinations(1100);
    let text = m.encode();
    let opened = |dir, dec| {
        value(
            &text,
            "ambit_connections_opened_total",
            &[("direction", dir), ("decision", dec)],
        )
    };
    assert_eq!(opened("inbound", "deny"), Some(2.0));
    assert_eq!(opened("outbound", "allow"), Some(1.0));
    assert_eq!(opened("inbound", "allow"), Some(0.0));
    assert_eq!(value(&text, "ambit_policy_denials_total", &[]), Some(1.0));
    let bytes = |dir| value(&text, "ambit_bytes_total", &[("direction", dir)]);
    assert_eq!(bytes("sent"), Some(101.0));
    assert_eq!(bytes("received"), Some(2002.0));
    assert_eq!(
        value(
            &text,
            "ambit_tls_handshake_failures_total",
            &[("reason", "untrusted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "ambit_policy_reload_rejections_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "ambit_policy_decision_cache_hits_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "ambit_policy_decision_cache_misses_total", &[]),
        Some(1.0)
    );
    assert_eq!(value(&text, "ambit_enrolled_workloads", &[]), Some(7.0));
    assert_eq!(value(&text, "ambit_mesh_destinations", &[]), Some(1100.0));
}

#[test]
fn active_guard_counts_while_alive() {
    let m = Metrics::new();
    let active = |m: &Metrics| {
        value(
            &m.encode(),
            "ambit_connections_active",
            &[("direction", "outbound")],
        )
    };
    let first = m.connection_active(Direction::Outbound);
    let second = m.connection_active(Direction::Outbound);
    assert_eq!(active(&m), Some(2.0));
    drop(first);
    assert_eq!(active(&m), Some(1.0));
    drop(second);
    assert_eq!(active(&m), Some(0.0));
}

#[test]
fn svid_expiry_series_follow_the_current_identities() {
    let m = Metrics::new();
    let a = "spiffe://cluster.local/ns/shop/sa/frontend";
    let b = "spiffe://cluster.local/ns/shop/sa/backend";
    let expiry = |m: &Metrics, id| {
        value(
            &m.encode(),
            "ambit_svid_expiry_timestamp_seconds",
            &[("spiffe_id", id)],
        )
    };
    m.set_svid_expiries([(a, 1_700_000_000), (b, 1_700_000_600)]);
    assert_eq!(expiry(&m, a), Some(1_700_000_000.0));
    m.set_svid_expiries([(b, 1_700_003_600)]);
    assert_eq!(expiry(&m, a), None);
    assert_eq!(expiry(&m, b), Some(1_700_003_600.0));
}

#[test]
fn audit_drops_sync_forward_only() {
    let m = Metrics::new();
    let dropped = |m: &Metrics| value(&m.encode(), "ambit_audit_records_dropped_total", &[]);
    m.sync_audit_dropped(5);
    assert_eq!(dropped(&m), Some(5.0));
    m.sync_audit_dropped(3);
    assert_eq!(dropped(&m), Some(5.0));
    m.sync_audit_dropped(9);
    assert_eq!(dropped(&m), Some(9.0));
}

#[test]
fn instances_do_not_share_counters() {
    let a = Metrics::new();
    let b = Metrics::new();
    a.policy_denied();
    assert_eq!(
        value(&b.encode(), "ambit_policy_denials_total", &[]),
        Some(0.0)
    );
}
