//! The testbed removes everything it made, even when a test fails.

use std::{panic::AssertUnwindSafe, path::PathBuf, time::Duration};

use ambit_testbed::{Testbed, WorkloadEntry, wait_until};
use anyhow::Result;

struct Made {
    id: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    pids: Vec<u32>,
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The host's named network namespaces, as `ip netns list` prints them.
fn netns_list() -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_failing_test_leaves_nothing_behind() -> Result<()> {
    let mut made = None;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut tb = Testbed::new(2).unwrap();
        let p = tb.add_pod(0, "p").unwrap();
        tb.add_pod(1, "q").unwrap();
        let sleeper = tb.spawn(&p, "sleeper", &["sleep", "600"]).unwrap();
        // An orphan the testbed never saw: only the cgroup knows about it.
        let out = tb.sh(&p, "sleep 600 >/dev/null 2>&1 & echo $!").unwrap();
        let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let agent = tb.start_agent(0, &[WorkloadEntry::enrolled(&p)]).unwrap();
        assert!(agent.bpf_pin_dir.exists());
        made = Some(Made {
            id: tb.id.clone(),
            cgroup: tb.cgroup().to_path_buf(),
            pin_dir: agent.bpf_pin_dir.clone(),
            pids: vec![sleeper, orphan, agent.pid],
        });
        panic!("a deliberate test failure");
    }));
    assert!(outcome.is_err(), "the closure must have failed");
    let made = made.expect("the testbed was built before the failure");

    let netns = netns_list()?;
    assert!(!netns.contains(&made.id), "namespaces left: {netns}");
    assert!(
        !made.cgroup.exists(),
        "cgroup left: {}",
        made.cgroup.display()
    );
    assert!(
        !made.pin_dir.exists(),
        "pins left: {}",
        made.pin_dir.display()
    );
    // The orphan is reaped by init, not by us: give it a moment.
    wait_until(Duration::from_secs(5), || {
        Ok(made.pids.iter().all(|p| !alive(*p)))
    })?;
    Ok(())
}

/// The gateway's MAC as `host` sees it: `br0`'s own on the node, the
/// neighbour entry for the gateway in a pod.
fn gateway_mac(tb: &Testbed, host: &dyn ambit_testbed::Host, args: &[&str]) -> Result<String> {
    let out = tb.run(host, args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether" && *w != "lladdr")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no MAC in {:?}: {text}", args))
}

#[test]
fn adding_pods_never_changes_the_gateway_a_running_pod_has_cached() -> Result<()> {
    let mut tb = Testbed::new(1)?;
    let first = tb.add_pod(0, "first")?;
    // The pod resolves its gateway, as any pod sending traffic does (the
    // node has no listener there: the connect is refused, after ARP).
    tb.sh(
        &first,
        "socat -u /dev/null TCP4:198.18.0.1:9,connect-timeout=2 || true",
    )?;
    let node = tb.node(0).clone();
    let bridge = ["ip", "link", "show", "br0"];
    let cached = ["ip", "neigh", "show", "198.18.0.1"];
    let before = gateway_mac(&tb, &node, &bridge)?;
    assert_eq!(gateway_mac(&tb, &first, &cached)?, before);
    // A bridge without an address of its own takes its lowest port's: with
    // 24 more random port MACs it would almost surely (24 in 25) move.
    for i in 0..24 {
        tb.add_pod(0, &format!("more{i}"))?;
    }
    assert_eq!(gateway_mac(&tb, &node, &bridge)?, before);
    assert_eq!(gateway_mac(&tb, &first, &cached)?, before);
    Ok(())
}

/// Set in the environment of the process that `a_killed_test_leaves_no_agent_running`
/// starts and kills.
const KILLED_OWNER: &str = "AMBIT_HARNESS_KILLED_OWNER";

/// Not a test on its own: the process the next test starts and kills. It
/// builds a testbed with an agent, says what it made, and waits to die.
#[test]
#[ignore = "run by a_killed_test_leaves_no_agent_running"]
fn killed_owner() -> Result<()> {
    if std::env::var_os(KILLED_OWNER).is_none() {
        return Ok(());
    }
    let mut tb = Testbed::new(1)?;
    let p = tb.add_pod(0, "p")?;
    let agent = tb.start_agent(0, &[WorkloadEntry::enrolled(&p)])?;
    println!(
        "made id={} agent={} pins={}",
        tb.id,
        agent.pid,
        agent.bpf_pin_dir.display()
    );
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

/// A test killed outright (nextest's timeout, Ctrl-C on a benchmark) runs
/// no destructor; its agent must still die with it, and the next testbed
/// sweeps up its namespaces and pins.
#[test]
fn a_killed_test_leaves_no_agent_running() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut owner = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "killed_owner", "--ignored", "--nocapture"])
        .env(KILLED_OWNER, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = owner.stdout.take().expect("piped");
    let made = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("made "));
    owner.kill()?;
    owner.wait()?;
    let made = made.ok_or_else(|| anyhow::anyhow!("the owner process never built its testbed"))?;
    let field = |key: &str| {
        made.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no {key} in {made:?}"))
    };
    let (id, agent, pins) = (
        field("id=")?,
        field("agent=")?.parse::<u32>()?,
        field("pins=")?,
    );

    wait_until(Duration::from_secs(5), || Ok(!alive(agent))).map_err(|e| {
        e.context(format!(
            "agent {agent} outlived the process that started it"
        ))
    })?;
    let _next = Testbed::new(1)?;
    let netns = netns_list()?;
    assert!(!netns.contains(&id), "namespaces left: {netns}");
    assert!(!std::path::Path::new(&pins).exists(), "pins left: {pins}");
    Ok(())
}
