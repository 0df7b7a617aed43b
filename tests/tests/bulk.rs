//! Bulk traffic both ways at once through the tunnel, on two simulated
//! nodes with real agents and `ambit ca`: every byte arrives, in order,
//! and no connection stalls while the sockets on both sides are full
//! (four connections from one pod share the pool's tunnel connections,
//! each moving 16 MiB up and 16 MiB back at the same time).

use std::time::Duration;

use ambit_testbed::{Host, Pod, Testbed, WorkloadEntry, agent::Agent, wait_until};
use anyhow::{Context, Result, ensure};

const ECHO: u16 = 9000;
const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";

/// Connects to argv[1] port argv[2], sends argv[3] random bytes while
/// reading the echo, and prints whether it came back intact.
const CLIENT: &str = r#"
import os, socket, sys, threading
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((addr, port), timeout=60)
payload = os.urandom(size)
sender = threading.Thread(target=s.sendall, args=(payload,))
sender.start()
got = bytearray()
while len(got) < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    got += chunk
sender.join()
print("echoed", "intact" if bytes(got) == payload else "corrupt", len(got), flush=True)
"#;

struct Scene {
    tb: Testbed,
    a: Pod,
    b: Pod,
    _ca: Agent,
    _agent0: Agent,
    agent1: Agent,
}

fn scene() -> Result<Scene> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(1, "b")?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    let entries = [
        WorkloadEntry::enrolled(&a).with_service_account("frontend"),
        WorkloadEntry::enrolled(&b),
    ];
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [&[], &[]])?;
    Ok(Scene {
        tb,
        a,
        b,
        _ca: ca,
        _agent0: agent0,
        agent1,
    })
}

/// Every TCP socket of `host` with its queues and memory, for a failure
/// report.
fn sockets(tb: &Testbed, host: &dyn Host) -> String {
    tb.run(host, &["ss", "-tinmpa"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn concurrent_bulk_echoes_both_ways_all_complete_intact() -> Result<()> {
    const CLIENTS: usize = 4;
    const SIZE: usize = 16 << 20;
    let s = scene()?;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("client-{i}")).collect();
    for name in &names {
        s.tb.spawn(
            &s.a,
            name,
            &[
                "python3",
                "-c",
                CLIENT,
                &s.b.ipv4.to_string(),
                &ECHO.to_string(),
                &SIZE.to_string(),
            ],
        )?;
    }
    let finished = |name: &String| s.tb.stdout_of(name).contains("echoed");
    wait_until(Duration::from_secs(90), || Ok(names.iter().all(finished))).with_context(|| {
        // What diagnosed the last stall: which socket holds the bytes.
        let unfinished: Vec<_> = names.iter().filter(|n| !finished(n)).collect();
        format!(
            "{unfinished:?} stalled. Pod a's sockets:\n{}\nPod b's sockets:\n{}",
            sockets(&s.tb, &s.a),
            sockets(&s.tb, &s.b),
        )
    })?;
    for name in &names {
        let out = s.tb.stdout_of(name);
        ensure!(
            out.contains(&format!("echoed intact {SIZE}")),
            "{name}: {out} {}",
            s.tb.stderr_of(name)
        );
    }
    // Each went through the tunnel (b is strict: plaintext is refused).
    let closed = s.agent1.wait_for_records(
        "inbound connection closed",
        CLIENTS,
        Duration::from_secs(10),
    )?;
    assert!(
        closed.iter().all(|r| r["peer_spiffe_id"] == FRONTEND),
        "{closed:?}"
    );
    Ok(())
}
