//! `ambit-cni` driven exactly as a container runtime drives a chain:
//! installed into a node's conf dir after Debian's bridge + host-local,
//! then ADD/DEL/VERSION exec'd with CNI_* variables and the network config
//! on stdin. Enrollment comes from the real test API server. The agent side
//! is not built yet: with no agent the plugin must pass non-mesh pods and
//! fail enrolled ones closed; the `protocol_*` tests check the plugin's
//! half of the agent protocol against a unix-socket server in the test (a
//! protocol test, not a test of the agent).

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpListener},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Duration,
};

use ambit_testbed::{
    ControlPlane, KubePod, Testbed,
    cni_chain::{CniChain, PluginRun, SUBNET, cni_binary, k8s_args},
    exec::host_cmd,
};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

/// A socket path where nothing listens: the agent is down.
fn absent_socket(tb: &Testbed) -> String {
    tb.dir.path().join("no-agent.sock").display().to_string()
}

/// A Pod object in `namespace`, Pending as the kubelet finds it before CNI ADD.
fn pod_object(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<String> {
    let mut pod = KubePod::new(name, "cni-node", "default", IpAddr::from([198, 18, 240, 1]));
    for (k, v) in labels {
        pod = pod.label(k, v);
    }
    cp.create_pod(namespace, &pod)
}

fn install(chain: &CniChain, socket: &str, kubeconfig: Option<&Path>) -> Result<()> {
    let mut args = vec!["--agent-socket", socket, "--timeout-ms", "5000"];
    let kubeconfig = kubeconfig.map(|k| k.display().to_string());
    if let Some(k) = &kubeconfig {
        args.extend(["--kubeconfig", k]);
    }
    let run = chain.install(&args)?;
    ensure!(run.status.success(), "install failed: {}", run.stderr);
    Ok(())
}

/// The chain's bridge result and ambit-cni's run, after checking both ran.
fn bridge_then_ambit(runs: &[PluginRun]) -> Result<(Value, &PluginRun)> {
    ensure!(
        runs.len() == 2,
        "expected bridge then ambit-cni, got {runs:#?}"
    );
    ensure!(runs[0].status.success(), "bridge ADD failed: {runs:#?}");
    let bridge = runs[0].json()?;
    let ip = bridge["ips"][0]["address"].as_str().unwrap_or_default();
    let prefix = SUBNET.trim_end_matches(".0/24");
    ensure!(
        ip.starts_with(prefix),
        "bridge gave no host-local address: {bridge}"
    );
    Ok((bridge, &runs[1]))
}

fn cni_error(run: &PluginRun) -> Result<(u64, String, String)> {
    ensure!(!run.status.success(), "ambit-cni succeeded: {run:#?}");
    let error = run.json()?;
    Ok((
        error["code"].as_u64().context("no code")?,
        error["msg"].as_str().context("no msg")?.to_string(),
        error["details"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn add_passes_a_pod_outside_the_mesh_through_without_an_agent() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("cni-plain")?;
    let uid = pod_object(cp, &ns, "plain", &[])?;
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    install(&chain, &absent_socket(&tb), Some(&cp.kubeconfig))?;

    let runs = chain.add("plain-sandbox", &k8s_args(&ns, "plain", &uid))?;
    let (bridge, ambit) = bridge_then_ambit(&runs)?;
    ensure!(
        ambit.status.success(),
        "ADD of a non-mesh pod failed: {ambit:#?}"
    );
    ensure!(
        ambit.json()? == bridge,
        "result is not the bridge's: {}",
        ambit.stdout
    );
    // The pod really has its address: the runtime can go on.
    let addrs = host_cmd(
        "ip",
        &["-n", &chain.pod_netns, "-4", "addr", "show", "eth0"],
    )?;
    let ip = bridge["ips"][0]["address"].as_str().unwrap_or_default();
    ensure!(addrs.contains(ip), "eth0 lacks {ip}: {addrs}");
    Ok(())
}

#[test]
fn add_fails_closed_for_an_enrolled_pod_without_an_agent() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("cni-mesh")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, "ambit.dev/mesh=enabled"])?;
    let uid = pod_object(cp, &ns, "meshed", &[])?;
    let opted_out_uid = pod_object(cp, &ns, "opted-out", &[("ambit.dev/mesh", "disabled")])?;
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    install(&chain, &absent_socket(&tb), Some(&cp.kubeconfig))?;

    let runs = chain.add("meshed-sandbox", &k8s_args(&ns, "meshed", &uid))?;
    let (_, ambit) = bridge_then_ambit(&runs)?;
    let (code, msg, details) = cni_error(ambit)?;
    ensure!(code >= 100, "code {code}");
    ensure!(
        msg.contains(&format!("pod {ns}/meshed is in the mesh"))
            && msg.contains("ambit agent is unreachable"),
        "message does not say why: {msg}"
    );
    ensure!(
        details.contains("no-agent.sock"),
        "details do not name the socket: {details}"
    );
    // The runtime cleans up the failed sandbox with a DEL through the chain.
    let dels = chain.del("meshed-sandbox", &k8s_args(&ns, "meshed", &uid))?;
    ensure!(
        dels.iter().all(|r| r.status.success()),
        "DEL failed: {dels:#?}"
    );

    // A pod that opts out of an enrolled namespace still starts.
    let runs = chain.add(
        "opted-out-sandbox",
        &k8s_args(&ns, "opted-out", &opted_out_uid),
    )?;
    let (bridge, ambit) = bridge_then_ambit(&runs)?;
    ensure!(ambit.status.success(), "opted-out pod failed: {ambit:#?}");
    ensure!(ambit.json()? == bridge, "result is not the bridge's");
    Ok(())
}

#[test]
fn add_fails_when_neither_agent_nor_api_server_can_tell() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("cni-unknown")?;
    let uid = pod_object(cp, &ns, "plain", &[])?;
    let tb = Testbed::new(1)?;
    // A kubeconfig naming a loopback port where nothing listens.
    let closed_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut kubeconfig: Value =
        serde_json::from_slice(&fs::read(cp.write_kubeconfig("cni", &cp.admin_token)?)?)?;
    kubeconfig["clusters"][0]["cluster"]["server"] =
        format!("https://127.0.0.1:{closed_port}").into();
    let dead_api = tb.dir.path().join("dead-api.kubeconfig");
    fs::write(&dead_api, serde_json::to_vec(&kubeconfig)?)?;

    for (label, kubeconfig) in [
        ("API down", Some(dead_api.as_path())),
        ("no kubeconfig", None),
    ] {
        let chain = CniChain::new(&tb)?;
        install(&chain, &absent_socket(&tb), kubeconfig)?;
        let runs = chain.add("sandbox", &k8s_args(&ns, "plain", &uid))?;
        let (_, ambit) = bridge_then_ambit(&runs)?;
        let (code, msg, _) = cni_error(ambit).with_context(|| label.to_string())?;
        ensure!(code >= 100, "{label}: code {code}");
        ensure!(
            msg.contains("cannot be told without it") && msg.contains("ambit agent"),
            "{label}: {msg}"
        );
    }
    Ok(())
}

#[test]
fn add_passes_a_non_kubernetes_container_through() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    install(&chain, &absent_socket(&tb), None)?;
    let runs = chain.add("podman-like", "IgnoreUnknown=1")?;
    let (bridge, ambit) = bridge_then_ambit(&runs)?;
    ensure!(ambit.status.success(), "{ambit:#?}");
    ensure!(ambit.json()? == bridge);
    Ok(())
}

#[test]
fn del_succeeds_without_an_agent() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    install(&chain, &absent_socket(&tb), None)?;
    let args = k8s_args("default", "gone", "0000");
    // Twice: DEL is idempotent, also when the first one did the work.
    for round in 0..2 {
        let runs = chain.del("gone-sandbox", &args)?;
        let ambit = &runs[0];
        ensure!(ambit.plugin == "ambit-cni", "DEL order: {runs:#?}");
        ensure!(ambit.status.success(), "round {round}: {ambit:#?}");
        ensure!(ambit.stdout.is_empty(), "DEL printed {:?}", ambit.stdout);
    }
    Ok(())
}

#[test]
fn version_lists_the_supported_versions() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    install(&chain, &absent_socket(&tb), None)?;
    let run = chain.call(
        "VERSION",
        &json!({"cniVersion": "1.0.0", "name": "v"}),
        &json!({"type": "ambit-cni"}),
        None,
        "",
        "",
    )?;
    ensure!(run.status.success(), "{run:#?}");
    let version = run.json()?;
    ensure!(version["cniVersion"] == "1.0.0", "{version}");
    let supported: Vec<&str> = version["supportedVersions"]
        .as_array()
        .context("no supportedVersions")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for wanted in ["0.3.1", "0.4.0", "1.0.0"] {
        ensure!(
            supported.contains(&wanted),
            "{wanted} missing from {supported:?}"
        );
    }
    Ok(())
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        files.insert(path.clone(), fs::read(&path)?);
    }
    Ok(files)
}

#[test]
fn install_then_uninstall_leaves_the_cni_config_byte_identical() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    // Debian's package ships no example config: this is the bridge +
    // host-local shape of the CNI project's own example, with its formatting.
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../cni/tests/fixtures/10-bridge.conflist");
    fs::copy(&fixture, chain.conf_dir.join("10-bridge.conflist"))?;
    let conf_before = snapshot(&chain.conf_dir)?;
    let bin_before = snapshot(&chain.bin_dir)?;

    install(&chain, &absent_socket(&tb), None)?;
    let active = chain.active_config()?;
    let types: Vec<&str> = active["plugins"]
        .as_array()
        .context("no plugins")?
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    ensure!(
        types == ["bridge", "ambit-cni"],
        "chain after install: {types:?}"
    );
    ensure!(
        fs::read(chain.bin_dir.join("ambit-cni"))? == fs::read(cni_binary()?)?,
        "the installed binary is not this build"
    );
    let installed = snapshot(&chain.conf_dir)?;
    install(&chain, &absent_socket(&tb), None)?;
    ensure!(
        snapshot(&chain.conf_dir)? == installed,
        "a second install changed the config"
    );

    let run = chain.uninstall()?;
    ensure!(run.status.success(), "uninstall failed: {}", run.stderr);
    ensure!(
        snapshot(&chain.conf_dir)? == conf_before,
        "the conf dir is not as before"
    );
    ensure!(
        snapshot(&chain.bin_dir)? == bin_before,
        "the bin dir is not as before"
    );
    Ok(())
}

/// A unix-socket server in the test that answers one request with `answer`
/// and hands back the request line it got.
fn one_shot_server(socket: &Path, answer: Value) -> Result<JoinHandle<Result<Value>>> {
    let listener = UnixListener::bind(socket)?;
    Ok(std::thread::spawn(move || {
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(format!("{answer}\n").as_bytes())?;
        Ok(serde_json::from_str(&line)?)
    }))
}

#[test]
fn protocol_add_sends_the_pod_and_succeeds_once_captured() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    let socket = tb.dir.path().join("protocol-captured.sock");
    install(&chain, &socket.display().to_string(), None)?;
    let server = one_shot_server(&socket, json!({"status": "captured"}))?;

    let runs = chain.add("sandbox-1", &k8s_args("shop", "web-0", "uid-1"))?;
    let request = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let (bridge, ambit) = bridge_then_ambit(&runs)?;
    ensure!(ambit.status.success(), "{ambit:#?}");
    ensure!(ambit.json()? == bridge, "result is not the bridge's");
    let ip = bridge["ips"][0]["address"].as_str().unwrap_or_default();
    let ip = ip.split('/').next().unwrap_or_default();
    let expected = json!({
        "command": "add",
        "containerId": "sandbox-1",
        "netns": chain.netns_path(),
        "namespace": "shop",
        "pod": "web-0",
        "uid": "uid-1",
        "ips": [ip],
        "timeoutMs": 5000,
    });
    ensure!(request == expected, "request {request} != {expected}");
    Ok(())
}

#[test]
fn protocol_add_fails_with_the_agents_error() -> Result<()> {
    let tb = Testbed::new(1)?;
    let chain = CniChain::new(&tb)?;
    let socket = tb.dir.path().join("protocol-error.sock");
    install(&chain, &socket.display().to_string(), None)?;
    let server = one_shot_server(
        &socket,
        json!({"status": "error", "message": "attaching the redirect failed"}),
    )?;
    let runs = chain.add("sandbox-2", &k8s_args("shop", "web-1", "uid-2"))?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let (_, ambit) = bridge_then_ambit(&runs)?;
    let (code, msg, _) = cni_error(ambit)?;
    ensure!(code == 100, "code {code}");
    ensure!(
        msg.contains("shop/web-1") && msg.contains("attaching the redirect failed"),
        "{msg}"
    );
    Ok(())
}
