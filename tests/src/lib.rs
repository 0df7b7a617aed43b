//! A testbed of simulated Kubernetes nodes and pods on one machine
//! (docs/architecture.md), shared by the e2e tests, the demo and the benchmarks.
//!
//! * A **node** is a network namespace with a bridge for its pods (at a
//!   fixed MAC, so the pods' gateway never moves), IP forwarding on, and its
//!   own cgroup (the agent attaches its programs there and runs inside it).
//! * A **pod** is a network namespace with one veth on its node's bridge and a
//!   cgroup below its node's.
//! * Two nodes are joined by a veth link and route each other's pod ranges.
//!
//! Addresses come from 198.18.0.0/15 and fd00:a5b1::/48, inside namespaces
//! the testbed made. Everything is named after the creating process and a
//! counter, so tests run in parallel, and everything is removed on drop,
//! including while a failing test unwinds. A killed test process takes its
//! programs with it (they run with `PR_SET_PDEATHSIG`), and the next testbed
//! sweeps the namespaces, cgroups and pins it left.

pub mod agent;
pub mod chart;
mod cleanup;
pub mod cni_chain;
pub mod control_plane;
pub mod exec;
pub mod kube_ca;
pub mod kube_pods;
pub mod link_capture;
pub mod procfs;
pub mod sidecar;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub use agent::{Agent, WorkloadEntry};
pub use control_plane::{ControlPlane, KubePod};
pub use exec::Host;
use exec::host_cmd;

/// Prefix of every namespace, cgroup and pin directory a testbed creates.
pub const PREFIX: &str = "ambt";
/// The cgroup (under the cgroup v2 root) holding every testbed's cgroups.
const CGROUP_PARENT: &str = "ambit-testbed";
/// The bpffs directory holding every testbed agent's pins.
const PIN_PARENT: &str = "/sys/fs/bpf/ambit-testbed";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    /// This node's address on the inter-node link.
    pub link_ipv4: Ipv4Addr,
    pub link_ipv6: Ipv6Addr,
    pub bpf_pin_dir: PathBuf,
}

/// `Testbed::echo_server`'s program (argv[1]: the port).
const ECHO_SERVER: &str = r#"
import socket, sys, threading
def echo(conn):
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except OSError:
            return
server = socket.socket(socket.AF_INET6)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(1024)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"#;

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Host for Node {
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> &Path {
        &self.cgroup
    }
    fn label(&self) -> &str {
        &self.netns
    }
}

impl Host for Pod {
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> &Path {
        &self.cgroup
    }
    fn label(&self) -> &str {
        &self.name
    }
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        exec::netns_path(&self.netns).into()
    }
}

/// A set of simulated nodes and pods, torn down on drop.
pub struct Testbed {
    pub id: String,
    pub dir: tempfile::TempDir,
    cgroup: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    children: Arc<Mutex<Vec<Child>>>,
    ca: std::sync::OnceLock<agent::CaInfo>,
    /// `AMBIT_LOG` for the agents, CAs and sidecars this testbed starts
    /// (unless the caller's environment or the launch sets one).
    log_filter: String,
}

/// Tests read the per-connection opening lines, which are at debug level.
pub const TEST_LOG_FILTER: &str =
    "info,ambit::proxy::outbound=debug,ambit::proxy::inbound_tunnel=debug";

fn pod_ipv4(node: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node as u8, slot as u8)
}

fn pod_ipv6(node: usize, slot: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xa5b1, 0, node as u16, 0, 0, 0, slot as u16)
}

impl Testbed {
    /// Creates `nodes` simulated nodes (1 or 2).
    pub fn new(nodes: usize) -> Result<Self> {
        if !(1..=2).contains(&nodes) {
            bail!("a testbed has one or two nodes");
        }
        cleanup::sweep_stale();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = cleanup::cgroup2_root()?.join(CGROUP_PARENT).join(&id);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut testbed = Self {
            dir: tempfile::Builder::new()
                .prefix(&format!("{id}-"))
                .tempdir()?,
            id,
            cgroup,
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Arc::new(Mutex::new(Vec::new())),
            ca: std::sync::OnceLock::new(),
            log_filter: TEST_LOG_FILTER.to_owned(),
        };
        for index in 0..nodes {
            testbed.add_node(index)?;
        }
        if nodes == 2 {
            testbed.link_nodes()?;
        }
        Ok(testbed)
    }

    /// Sets the `AMBIT_LOG` of processes started from now on (a benchmark
    /// runs them as deployed: `info`).
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = filter.to_owned();
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The cgroup holding every process of this testbed.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    fn add_node(&mut self, index: usize) -> Result<()> {
        let netns = format!("{}-n{index}", self.id);
        let cgroup = self.cgroup.join(format!("node{index}"));
        std::fs::create_dir_all(&cgroup)?;
        host_cmd("ip", &["netns", "add", &netns])?;
        let node = Node {
            index,
            netns: netns.clone(),
            cgroup,
            link_ipv4: Ipv4Addr::new(198, 19, 255, index as u8 + 1),
            link_ipv6: Ipv6Addr::new(0xfd00, 0xa5b1, 0xffff, 0, 0, 0, 0, index as u16 + 1),
            bpf_pin_dir: Path::new(PIN_PARENT).join(format!("{}-n{index}", self.id)),
        };
        self.nodes.push(node);
        let gw4 = format!("{}/24", pod_ipv4(index, 1));
        let gw6 = format!("{}/64", pod_ipv6(index, 1));
        // A bridge without an address of its own takes the lowest of its
        // ports', so adding a pod could change the gateway's MAC under the
        // other pods' neighbour entries: their packets would be dropped as
        // not for this host until those entries were probed again (seconds
        // to half a minute). A set address stays.
        let bridge_mac = format!("02:a5:b1:00:00:{:02x}", index + 1);
        ip_batch(
            &netns,
            &[
                "link set lo up",
                &format!("link add br0 address {bridge_mac} type bridge"),
                &format!("addr add {gw4} dev br0"),
                &format!("addr add {gw6} dev br0 nodad"),
                "link set br0 up",
            ],
        )?;
        // Nodes route between their pods and the other node.
        self.sysctl(&self.nodes[index], "net.ipv4.ip_forward", "1")?;
        self.sysctl(&self.nodes[index], "net.ipv6.conf.all.forwarding", "1")
    }

    fn link_nodes(&mut self) -> Result<()> {
        let (a, b) = (self.nodes[0].clone(), self.nodes[1].clone());
        host_cmd(
            "ip",
            &[
                "-n", &a.netns, "link", "add", "ln0", "type", "veth", "peer", "name", "ln0",
                "netns", &b.netns,
            ],
        )?;
        for (me, other) in [(&a, &b), (&b, &a)] {
            ip_batch(
                &me.netns,
                &[
                    &format!("addr add {}/24 dev ln0", me.link_ipv4),
                    &format!("addr add {}/64 dev ln0 nodad", me.link_ipv6),
                    "link set ln0 up",
                    &format!(
                        "route add 198.18.{}.0/24 via {}",
                        other.index, other.link_ipv4
                    ),
                    &format!(
                        "route add {}/64 via {}",
                        pod_ipv6(other.index, 0),
                        other.link_ipv6
                    ),
                ],
            )?;
        }
        Ok(())
    }

    /// Adds a pod to `node`, with the next free addresses there.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        let slot = 10 + self.pods.iter().filter(|p| p.node == node).count();
        let netns = format!("{}-n{node}p{}", self.id, slot);
        let cgroup = self.nodes[node].cgroup.join(format!("pod-{name}"));
        std::fs::create_dir_all(&cgroup)?;
        host_cmd("ip", &["netns", "add", &netns])?;
        let pod = Pod {
            name: name.to_string(),
            node,
            netns: netns.clone(),
            cgroup,
            ipv4: pod_ipv4(node, slot),
            ipv6: pod_ipv6(node, slot),
        };
        self.pods.push(pod.clone());
        let node_ns = self.nodes[node].netns.clone();
        let veth = format!("vp{slot}");
        host_cmd(
            "ip",
            &[
                "-n", &node_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        )?;
        ip_batch(&node_ns, &[&format!("link set {veth} master br0 up")])?;
        ip_batch(
            &netns,
            &[
                "link set lo up",
                &format!("addr add {}/24 dev eth0", pod.ipv4),
                &format!("addr add {}/64 dev eth0 nodad", pod.ipv6),
                "link set eth0 up",
                &format!("route add default via {}", pod_ipv4(node, 1)),
                &format!("route add default via {}", pod_ipv6(node, 1)),
            ],
        )?;
        Ok(pod)
    }

    /// Sets `key` in `host`'s network namespace (or on the host itself).
    pub fn sysctl(&self, host: &dyn Host, key: &str, value: &str) -> Result<()> {
        let out = self.run(host, &["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        if !out.status.success() {
            bail!("sysctl {key} in {}: {}", host.label(), stderr(&out));
        }
        Ok(())
    }

    /// Runs a program on `host` to completion (killed after 60 s).
    pub fn run(&self, host: &dyn Host, args: &[&str]) -> Result<Output> {
        self.run_within(host, args, Duration::from_secs(60))
    }

    pub fn run_within(&self, host: &dyn Host, args: &[&str], timeout: Duration) -> Result<Output> {
        exec::output_within(exec::command(host, args[0], &args[1..]), timeout)
    }

    /// Runs a shell snippet on `host`.
    pub fn sh(&self, host: &dyn Host, script: &str) -> Result<Output> {
        self.run(host, &["sh", "-c", script])
    }

    /// Starts a long-running program on `host`; its output goes to
    /// `<dir>/<name>.out` and `.err`. Killed when the testbed drops.
    pub fn spawn(&self, host: &dyn Host, name: &str, args: &[&str]) -> Result<u32> {
        let cmd = exec::command(host, args[0], &args[1..]);
        self.spawn_command(cmd, name)
    }

    /// Starts `cmd` as one of the testbed's programs: killed when the
    /// testbed drops, and with this process if it dies first (a test killed
    /// by a timeout, a benchmark stopped with Ctrl-C), so no agent outlives
    /// the run that started it.
    pub fn spawn_command(&self, mut cmd: Command, name: &str) -> Result<u32> {
        let out = std::fs::File::create(self.dir.path().join(format!("{name}.out")))?;
        let err = std::fs::File::create(self.dir.path().join(format!("{name}.err")))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = exec::spawn_tied_to_process(cmd).with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Reads what a spawned program wrote to stderr so far.
    pub fn stderr_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.err"))).unwrap_or_default()
    }

    pub fn stdout_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.out"))).unwrap_or_default()
    }

    /// Waits until something listens on TCP `port` in `host`.
    pub fn wait_for_listener(&self, host: &dyn Host, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        wait_until(Duration::from_secs(20), || {
            let out = self.run(host, &["ss", "-Hltn", &filter])?;
            Ok(!out.stdout.is_empty())
        })
        .with_context(|| format!("nothing listens on port {port} in {}", host.label()))
    }

    /// An HTTP server (python's http.server, dual stack) on `port` in `pod`,
    /// serving `body` at `/index.txt`. Its access log is `<name>.err`.
    pub fn http_server(&self, pod: &Pod, name: &str, port: u16, body: &str) -> Result<u32> {
        let root = self.dir.path().join(format!("{name}-www"));
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.txt"), body)?;
        let port_text = port.to_string();
        let pid = self.spawn(
            pod,
            name,
            &[
                "python3",
                "-u",
                "-m",
                "http.server",
                "--bind",
                "::",
                "--directory",
                root.to_str().unwrap(),
                &port_text,
            ],
        )?;
        self.wait_for_listener(pod, port)?;
        Ok(pid)
    }

    /// A TCP echo server on `port` in `pod`, both IPv4 and IPv6: a thread
    /// per connection sends back what it reads, and half-closes at the
    /// client's EOF. Not `socat PIPE`: socat reads the socket into a pipe
    /// and the pipe back into the socket in one thread with blocking
    /// writes, so under bulk traffic it can block writing to its own full
    /// pipe and stop echoing for good (3 of 24 concurrent 16 MiB echoes
    /// over plain loopback did).
    pub fn echo_server(&self, pod: &Pod, name: &str, port: u16) -> Result<u32> {
        let pid = self.spawn(
            pod,
            name,
            &["python3", "-c", ECHO_SERVER, &port.to_string()],
        )?;
        self.wait_for_listener(pod, port)?;
        Ok(pid)
    }

    /// `curl` from `host`; returns (exit code, body).
    pub fn curl(&self, host: &dyn Host, url: &str) -> Result<(i32, String)> {
        let out = self.run(host, &["curl", "-sS", "--max-time", "10", url])?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

impl Testbed {
    /// A self-signed certificate and key (PEM files in the testbed's
    /// directory) carrying `uri` as its only URI SAN: a well-formed SVID
    /// from a CA nobody in the mesh trusts.
    pub fn foreign_certificate(&self, name: &str, uri: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}-key.pem"));
        host_cmd(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
                "-days",
                "1",
                "-subj",
                "/O=foreign",
                "-addext",
                &format!("subjectAltName=URI:{uri}"),
            ],
        )?;
        Ok((cert, key))
    }
}

/// `ip -n NETNS -batch -` with one command a line.
fn ip_batch(netns: &str, lines: &[&str]) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -n {netns}: {}", stderr(&out));
    }
    Ok(())
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        cleanup::remove(cleanup::Leftovers {
            cgroup: self.cgroup.clone(),
            netns: self
                .pods
                .iter()
                .map(|p| p.netns.clone())
                .chain(self.nodes.iter().map(|n| n.netns.clone()))
                .collect(),
            pin_dirs: self.nodes.iter().map(|n| n.bpf_pin_dir.clone()).collect(),
            children,
        });
    }
}
