//! The CI smoke run of instr-bench: a few connections and requests through
//! both node agents under callgrind, then checks that every figure was
//! counted and each window named the functions it spent them in. The
//! counts themselves are the benchmark's business.

use std::process::Command;

use serde_json::Value;

#[test]
fn counts_both_agents_instructions_per_connection_and_per_request() {
    let out_dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_instr-bench"))
        .args(["--connections", "10", "--requests", "20", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "instr-bench failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(out_dir.path().join("instructions.json")).unwrap();
    let result: Value = serde_json::from_str(&text).unwrap();
    for window in ["per_connection", "per_request"] {
        for role in ["client_agent", "server_agent", "total"] {
            let n = result[window][role].as_f64().unwrap_or(0.0);
            assert!(n > 0.0, "{window}.{role} is {n}:\n{text}");
        }
    }
    for window in ["connections", "requests"] {
        for role in ["client_agent", "server_agent"] {
            let top = result["top_functions"][window][role].as_array().unwrap();
            assert!(!top.is_empty(), "no functions for {window}.{role}:\n{text}");
        }
    }
}
