//! The CI smoke run of the mesh benchmark: `mesh-bench --quick` on the
//! real two-node testbed (root, agents, eBPF), then checks that every mode
//! carried traffic without errors and that results.json holds every figure
//! and the report and plots were written. No timing assertions: the
//! numbers themselves are the benchmark's business.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_run_carries_traffic_in_every_mode_and_reports_every_figure() {
    let out_dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["--quick", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    // What mesh-bench printed, including the first error of any load that
    // had failures: shown with every failed check below.
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "mesh-bench --quick failed:\n{printed}"
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("results.json")).unwrap(),
    )
    .unwrap();
    let figures = results["figures"].as_object().expect("figures");
    let value = |key: &str| -> f64 {
        figures
            .get(key)
            .and_then(|f| f["value"].as_f64())
            .unwrap_or_else(|| panic!("results.json lacks {key}"))
    };
    for (key, figure) in figures {
        assert!(
            figure["value"].as_f64().is_some_and(f64::is_finite),
            "{key} is not a number: {figure}"
        );
    }
    let modes: Vec<&str> = results["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        modes.contains(&"plaintext") && modes.contains(&"node"),
        "{modes:?}"
    );
    // Every load of every mode: requests answered, none failed.
    let mut loads = vec!["churn.conns".to_string(), "idle.node".to_string()];
    for mode in &modes {
        for rate in ["100rps", "1000rps", "high"] {
            loads.push(format!("latency.{rate}.{mode}"));
        }
        loads.push(format!("conn_rate.{mode}"));
        loads.push(format!("conn_cost.{mode}"));
        if *mode != "plaintext" {
            for step in [2, 4] {
                loads.push(format!("scale.{step}.{mode}"));
            }
        }
    }
    for load in &loads {
        assert!(
            value(&format!("{load}.requests")) > 0.0,
            "{load} carried no requests"
        );
        assert_eq!(
            value(&format!("{load}.errors")),
            0.0,
            "{load} had failures; mesh-bench printed:\n{printed}"
        );
    }
    // Every other figure the report shows is present.
    let mut keys = vec![
        "latency.high.rate".to_string(),
        "scale.node.slope_kib_per_pod".into(),
        "churn.cycles".into(),
        "idle.node.client_agent.rss_mib".into(),
        "idle.node.server_agent.rss_mib".into(),
        "host.rounds.steal_pct".into(),
        "host.rounds.iowait_pct".into(),
    ];
    for stage in ["baseline", "peak", "end"] {
        keys.push(format!("churn.rss_mib.{stage}"));
        keys.push(format!("churn.fds.{stage}"));
    }
    for mode in &modes {
        for rate in ["100rps", "1000rps", "high"] {
            for q in ["p50", "p90", "p99", "p999", "achieved_rps"] {
                keys.push(format!("latency.{rate}.{mode}.{q}"));
            }
            keys.push(format!("cpu.{rate}.{mode}.cores_per_1k_rps"));
        }
        for streams in [1, 4] {
            keys.push(format!("iperf.{streams}.{mode}.gbps"));
            assert!(value(&format!("iperf.{streams}.{mode}.gbps")) > 0.0);
        }
        keys.push(format!("conn_rate.{mode}.per_s"));
        keys.push(format!("conn_rate.{mode}.cpu_us_per_conn"));
        keys.push(format!("conn_cost.{mode}.p50"));
        keys.push(format!("conn_cost.{mode}.p99"));
        if *mode != "plaintext" {
            for step in [2, 4] {
                for figure in ["memory_mib", "cpu_s_per_1k", "first_served_ms", "processes"] {
                    keys.push(format!("scale.{step}.{mode}.{figure}"));
                }
            }
            // Its traffic went through its data plane.
            assert!(value(&format!("conn_rate.{mode}.cpu_us_per_conn")) > 0.0);
            assert!(value(&format!("scale.4.{mode}.memory_mib")) > 0.0);
            // Its threads slept and woke for it.
            assert!(value(&format!("conn_rate.{mode}.switches_per_conn")) > 0.0);
            assert!(value(&format!("cpu.1000rps.{mode}.switches_per_req")) > 0.0);
        }
    }
    for key in &keys {
        value(key);
    }
    assert!(value("churn.cycles") >= 20.0);
    assert!(!results["churn_samples"].as_array().unwrap().is_empty());
    for field in ["cpu_model", "kernel", "date", "git_commit"] {
        assert!(
            results["machine"][field]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "machine.{field} missing"
        );
    }
    for file in [
        "latency.svg",
        "scale.svg",
        "churn.svg",
        "benchmarks-section.md",
    ] {
        let text = std::fs::read_to_string(out_dir.path().join(file)).unwrap();
        assert!(text.len() > 500, "{file} is nearly empty");
    }
    let section = std::fs::read_to_string(out_dir.path().join("benchmarks-section.md")).unwrap();
    assert!(
        section.starts_with("<!-- mesh-bench:begin -->")
            && section.contains("<!-- mesh-bench:end -->")
    );
    // The reader learns how busy the host was while the rounds ran.
    assert!(
        section.contains("during the rounds the host stole"),
        "{section}"
    );
}
