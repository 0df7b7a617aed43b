//! The testbed as a container runtime calling a CNI chain: it reads a
//! conflist from a conf dir and execs each plugin from CNI_PATH with the
//! CNI_* environment and the network config (plus the previous plugin's
//! result) on stdin, as libcni does for containerd and CRI-O.
//!
//! The chain's network is Debian's `bridge` with `host-local` IPAM on a
//! bridge of a testbed node (never the machine's own netns), addresses from
//! 198.18.240.0/24, host-local's state in the chain's own directory.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Testbed, exec::host_cmd};

/// Where Debian's containernetworking-plugins installs the plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// The pod subnet of every chain (inside each test's own node netns).
pub const SUBNET: &str = "198.18.240.0/24";
/// A plugin call is bounded; an ADD waits at most for the plugin's own timeout.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The `ambit-cni` binary under test: $AMBIT_CNI_BIN, else the workspace's debug build.
pub fn cni_binary() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = match std::env::var_os("AMBIT_CNI_BIN") {
        Some(bin) => workspace.join(bin),
        None => workspace.join("target/debug/ambit-cni"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build -p ambit-cni` (or set AMBIT_CNI_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// CNI_ARGS as the kubelet's runtime passes them for a pod.
pub fn k8s_args(namespace: &str, pod: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};\
         K8S_POD_INFRA_CONTAINER_ID=sandbox;K8S_POD_UID={uid}"
    )
}

/// One plugin's exit, stdout and stderr.
#[derive(Debug)]
pub struct PluginRun {
    pub plugin: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From exec to exit.
    pub elapsed: Duration,
}

impl PluginRun {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("{} printed no JSON: {:?}", self.plugin, self.stdout))
    }
}

/// A runtime's view of one node: conf dir, bin dir and a pod netns.
pub struct CniChain {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The conflist as the cluster's network plugin left it (bridge + host-local).
    pub conflist: PathBuf,
    /// The node netns the bridge plugin runs in (the simulated host).
    pub node_netns: String,
    /// The pod's netns, made here as a runtime makes a sandbox's.
    pub pod_netns: String,
    pub bridge: String,
    dir: PathBuf,
    testbed_id: String,
}

/// Another pod sandbox's netns on the chain's node, deleted on drop.
pub struct SandboxNetns {
    pub name: String,
}

impl SandboxNetns {
    pub fn path(&self) -> String {
        crate::exec::netns_path(&self.name)
    }
}

impl Drop for SandboxNetns {
    fn drop(&mut self) {
        if let Err(e) = host_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("sandbox netns cleanup: {e:#}");
        }
    }
}

impl CniChain {
    /// A conf dir holding a bridge + host-local conflist for node 0 of `testbed`,
    /// an empty bin dir, and a fresh pod netns.
    pub fn new(testbed: &Testbed) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = testbed.dir.path().join(format!("cni{n}"));
        let conf_dir = dir.join("net.d");
        let bin_dir = dir.join("bin");
        fs::create_dir_all(&conf_dir)?;
        fs::create_dir_all(&bin_dir)?;
        let bridge = format!("acni{n}");
        let conflist = conf_dir.join("10-bridge.conflist");
        let config = json!({
            "cniVersion": "1.0.0",
            "name": format!("ambit-test-{n}"),
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }],
        });
        fs::write(&conflist, serde_json::to_vec_pretty(&config)?)?;
        // Named after the testbed, so a killed test's netns is swept with it.
        let pod_netns = format!("{}-cni{n}", testbed.id);
        host_cmd("ip", &["netns", "add", &pod_netns])?;
        Ok(Self {
            conf_dir,
            bin_dir,
            conflist,
            node_netns: testbed.node(0).netns.clone(),
            pod_netns,
            bridge,
            dir,
            testbed_id: testbed.id.clone(),
        })
    }

    /// A fresh netns for another pod on this node (named after the testbed,
    /// so a killed test's is swept with it).
    pub fn sandbox(&self) -> Result<SandboxNetns> {
        let name = format!(
            "{}-cnis{}",
            self.testbed_id,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        host_cmd("ip", &["netns", "add", &name])?;
        let sandbox = SandboxNetns { name };
        // As runtimes do before the chain (containerd's loopback network).
        host_cmd("ip", &["-n", &sandbox.name, "link", "set", "lo", "up"])?;
        Ok(sandbox)
    }

    pub fn netns_path(&self) -> String {
        crate::exec::netns_path(&self.pod_netns)
    }

    /// `ambit-cni install` into this node's dirs, as the DaemonSet's init container runs it.
    pub fn install(&self, extra: &[&str]) -> Result<PluginRun> {
        let mut cmd = Command::new(cni_binary()?);
        cmd.arg("install")
            .arg("--cni-conf-dir")
            .arg(&self.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&self.bin_dir)
            .args(extra);
        self.exec("ambit-cni install", cmd, None)
    }

    pub fn uninstall(&self) -> Result<PluginRun> {
        let mut cmd = Command::new(cni_binary()?);
        cmd.arg("uninstall")
            .arg("--cni-conf-dir")
            .arg(&self.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&self.bin_dir);
        self.exec("ambit-cni uninstall", cmd, None)
    }

    /// The active conflist (the lexically first), as a runtime loads it.
    pub fn active_config(&self) -> Result<Value> {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.conf_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
            })
            .collect();
        names.sort();
        let first = names.first().context("no network config")?;
        Ok(serde_json::from_slice(&fs::read(first)?)?)
    }

    /// ADD through the whole chain: each plugin gets the previous one's
    /// result; the first failure ends the chain. Returns every plugin's run.
    pub fn add(&self, container_id: &str, cni_args: &str) -> Result<Vec<PluginRun>> {
        self.add_in(&self.pod_netns, container_id, cni_args)
    }

    /// ADD for the pod whose netns is `netns` (a name under /var/run/netns).
    pub fn add_in(
        &self,
        netns: &str,
        container_id: &str,
        cni_args: &str,
    ) -> Result<Vec<PluginRun>> {
        let config = self.active_config()?;
        let mut runs = Vec::new();
        let mut prev: Option<Value> = None;
        for plugin in plugins(&config)? {
            let call = Call {
                command: "ADD",
                netns,
                container_id,
                cni_args,
            };
            let run = self.call_in(&call, &config, &plugin, prev.take())?;
            let ok = run.status.success();
            if ok {
                prev = Some(run.json()?);
            }
            runs.push(run);
            if !ok {
                break;
            }
        }
        Ok(runs)
    }

    /// DEL through the chain in reverse order, every plugin called whatever
    /// the others answered (as libcni does).
    pub fn del(&self, container_id: &str, cni_args: &str) -> Result<Vec<PluginRun>> {
        self.del_in(&self.pod_netns, container_id, cni_args)
    }

    /// CHECK for the pod whose netns is `netns`: every plugin in order,
    /// each with `result` (what ADD returned) as prevResult, as libcni does;
    /// the first failure ends it.
    pub fn check_in(
        &self,
        netns: &str,
        container_id: &str,
        cni_args: &str,
        result: &Value,
    ) -> Result<Vec<PluginRun>> {
        let config = self.active_config()?;
        let call = Call {
            command: "CHECK",
            netns,
            container_id,
            cni_args,
        };
        let mut runs = Vec::new();
        for plugin in plugins(&config)? {
            let run = self.call_in(&call, &config, &plugin, Some(result.clone()))?;
            let ok = run.status.success();
            runs.push(run);
            if !ok {
                break;
            }
        }
        Ok(runs)
    }

    /// DEL for the pod whose netns is `netns`.
    pub fn del_in(
        &self,
        netns: &str,
        container_id: &str,
        cni_args: &str,
    ) -> Result<Vec<PluginRun>> {
        let config = self.active_config()?;
        let call = Call {
            command: "DEL",
            netns,
            container_id,
            cni_args,
        };
        let mut runs = Vec::new();
        for plugin in plugins(&config)?.into_iter().rev() {
            runs.push(self.call_in(&call, &config, &plugin, None)?);
        }
        Ok(runs)
    }

    /// One plugin invocation with the network config built as libcni builds it.
    pub fn call(
        &self,
        command: &str,
        list: &Value,
        plugin: &Value,
        prev_result: Option<Value>,
        container_id: &str,
        cni_args: &str,
    ) -> Result<PluginRun> {
        let call = Call {
            command,
            netns: &self.pod_netns,
            container_id,
            cni_args,
        };
        self.call_in(&call, list, plugin, prev_result)
    }

    fn call_in(
        &self,
        call: &Call<'_>,
        list: &Value,
        plugin: &Value,
        prev_result: Option<Value>,
    ) -> Result<PluginRun> {
        let Call {
            command,
            netns,
            container_id,
            cni_args,
        } = *call;
        let kind = plugin["type"].as_str().context("plugin without type")?;
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev;
        }
        let binary = [&self.bin_dir, Path::new(DEBIAN_CNI_DIR)]
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("plugin {kind} not in CNI_PATH"))?;
        // The bridge and its veth belong on the simulated node. ambit-cni
        // stays in this netns: it only talks to a unix socket and to the test
        // API server on loopback (on a real node both are the host netns).
        let mut cmd = if kind == "ambit-cni" {
            Command::new(&binary)
        } else {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.node_netns]).arg(&binary);
            cmd
        };
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", crate::exec::netns_path(netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", cni_args)
            .env(
                "CNI_PATH",
                format!("{}:{DEBIAN_CNI_DIR}", self.bin_dir.display()),
            );
        self.exec(kind, cmd, Some(&serde_json::to_vec(&conf)?))
    }

    /// Runs `cmd` with `stdin`, output into files (never a full pipe), bounded.
    fn exec(&self, name: &str, mut cmd: Command, stdin: Option<&[u8]>) -> Result<PluginRun> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let [input, out, err] = ["in", "out", "err"].map(|s| self.dir.join(format!("{n}.{s}")));
        fs::write(&input, stdin.unwrap_or_default())?;
        cmd.stdin(File::open(&input)?)
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            // Poll fast at first: ADD latency is measured from here.
            if started.elapsed() < Duration::from_millis(50) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not finish within {PLUGIN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(PluginRun {
            plugin: name.into(),
            status,
            stdout: fs::read_to_string(&out)?,
            stderr: fs::read_to_string(&err)?,
            elapsed: started.elapsed(),
        })
    }
}

/// The per-call CNI_* values.
#[derive(Clone, Copy)]
struct Call<'a> {
    command: &'a str,
    netns: &'a str,
    container_id: &'a str,
    cni_args: &'a str,
}

fn plugins(config: &Value) -> Result<Vec<Value>> {
    config["plugins"]
        .as_array()
        .cloned()
        .context("the active config has no plugins list")
}

impl Drop for CniChain {
    fn drop(&mut self) {
        // The pod netns takes its veth end with it; the bridge goes with the
        // node netns when the testbed drops.
        if let Err(e) = host_cmd("ip", &["netns", "del", &self.pod_netns]) {
            eprintln!("cni chain cleanup: {e:#}");
        }
    }
}
