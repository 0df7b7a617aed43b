//! A real Kubernetes control plane for the e2e tests: etcd and
//! kube-apiserver (built by `cargo xtask setup`, TOOLCHAIN.md) on free
//! loopback ports, RBAC on, an admin token, service-account signing keys
//! made at start, and a service CIDR inside 198.19.0.0/16.
//!
//! There is no controller-manager, scheduler or kubelet: the testbed plays
//! kubelet and container runtime for its simulated nodes ([`kubelet`]).
//! Because of that, namespaces never finish terminating, so every test takes
//! a fresh one ([`ControlPlane::namespace`]).
//!
//! [`ControlPlane::shared`] gives the tests of one test binary one control
//! plane; [`ControlPlane::start`] gives a test its own (for stopping and
//! restarting the API server). Processes are killed on drop and, through
//! `PR_SET_PDEATHSIG`, when the test process dies however it dies; data
//! directories of dead test processes are swept by the next start.

mod args;
pub mod kubectl;
pub mod kubelet;
mod spawn;

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

pub use kubectl::{Kubectl, Watch, WatchEvent};
pub use kubelet::{KubePod, ServicePort, endpoints_object};

use crate::exec::host_cmd;

/// Where `cargo xtask setup` caches the binaries (override with
/// `AMBIT_K8S_BIN_DIR`).
pub const DEFAULT_BIN_DIR: &str = "/var/cache/ambit-k8s/v1.20.2";
/// ClusterIPs come from here: dialled by test pods, so never a private range.
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// The API server's own service account token issuer.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";

/// kube-apiserver answers /readyz 6-8 s after start on an idle machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A start can lose a free port to another process; try again this often.
const START_ATTEMPTS: usize = 3;

static NEXT_NAMESPACE: AtomicU32 = AtomicU32::new(0);

pub struct ControlPlane {
    dir: PathBuf,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
    apiserver_args: Vec<String>,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    pub admin_token: String,
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    pub kubectl: Kubectl,
    next_file: AtomicU32,
}

impl ControlPlane {
    /// One control plane for all the tests of this test binary (process),
    /// started by the first caller. A failed start is reported to every
    /// caller.
    pub fn shared() -> Result<&'static ControlPlane> {
        SHARED
            .get_or_init(|| {
                let started = Self::start().map_err(|e| format!("{e:#}"));
                if started.is_ok() {
                    // Statics are never dropped; exit() still runs atexit
                    // handlers, also after failed tests.
                    // SAFETY: registering a plain extern "C" function.
                    unsafe { libc::atexit(clean_up_shared) };
                }
                started
            })
            .as_ref()
            .map_err(|e| anyhow!("the shared control plane did not start: {e}"))
    }

    /// A control plane of one's own, stopped and removed on drop.
    pub fn start() -> Result<Self> {
        let bin_dir = std::env::var_os("AMBIT_K8S_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR));
        for binary in ["etcd", "kube-apiserver"] {
            if !bin_dir.join(binary).exists() {
                bail!(
                    "{} is missing: run `cargo xtask setup` (it builds the test control plane)",
                    bin_dir.join(binary).display()
                );
            }
        }
        let tmp = std::env::temp_dir();
        spawn::sweep_stale_dirs(&tmp);
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix(&format!("{}{}-", spawn::DIR_PREFIX, std::process::id()))
                .tempdir_in(&tmp)
                .context("creating the control plane's directory")?
                .keep();
            match Self::start_in(&bin_dir, dir) {
                Ok(cp) => return Ok(cp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no start attempt ran")))
    }

    fn start_in(bin_dir: &Path, dir: PathBuf) -> Result<Self> {
        let etcd_port = spawn::free_port()?;
        let peer_port = spawn::free_port()?;
        let api_port = spawn::free_port()?;
        let admin_token = random_hex(16)?;
        fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},admin,admin,\"system:masters\"\n"),
        )?;
        host_cmd(
            "openssl",
            &[
                "genrsa",
                "-out",
                &dir.join("sa.key").display().to_string(),
                "2048",
            ],
        )?;
        host_cmd(
            "openssl",
            &[
                "rsa",
                "-in",
                &dir.join("sa.key").display().to_string(),
                "-pubout",
                "-out",
                &dir.join("sa.pub").display().to_string(),
            ],
        )?;
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        let cp = Self {
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            apiserver_args: args::apiserver(bin_dir, &dir, etcd_port, api_port),
            server,
            admin_token,
            kubectl: Kubectl::new(&kubeconfig),
            kubeconfig,
            next_file: AtomicU32::new(0),
            dir,
        };
        // From here on, dropping `cp` cleans up whatever started.
        let etcd = cp.spawn_logged("etcd", &args::etcd(bin_dir, &cp.dir, etcd_port, peer_port))?;
        *cp.etcd.lock().unwrap_or_else(|e| e.into_inner()) = Some(etcd);
        cp.start_api_server()?;
        Ok(cp)
    }

    fn spawn_logged(&self, name: &str, argv: &[String]) -> Result<Child> {
        let log = File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::exec::spawn_tied_to_process(cmd)
    }

    /// Starts kube-apiserver (again) on the same port, certificates and etcd
    /// data, and waits until /readyz answers ok.
    pub fn start_api_server(&self) -> Result<()> {
        let mut slot = self.apiserver.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            bail!("the API server is already running");
        }
        *slot = Some(self.spawn_logged("kube-apiserver", &self.apiserver_args)?);
        drop(slot);
        self.wait_ready()
    }

    /// Process ids of etcd and kube-apiserver (whichever run).
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver]
            .iter()
            .filter_map(|slot| {
                let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.as_ref().map(Child::id)
            })
            .collect()
    }

    /// Kills kube-apiserver (etcd keeps running, with the data).
    pub fn stop_api_server(&self) -> Result<()> {
        let child = self
            .apiserver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut child = child.context("the API server is not running")?;
        child.kill().context("killing kube-apiserver")?;
        child.wait().context("reaping kube-apiserver")?;
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ca = self.ca_file();
        loop {
            self.check_alive()?;
            if ca.exists() {
                if !self.kubeconfig.exists() {
                    self.write_kubeconfig_file(&self.kubeconfig, "admin", &self.admin_token)?;
                }
                let out = self.kubectl.output(&["get", "--raw", "/readyz"])?;
                if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Fails with the log of whichever process exited.
    fn check_alive(&self) -> Result<()> {
        for (name, slot) in [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)] {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(child) = slot.as_mut()
                && let Some(status) = child.try_wait()?
            {
                slot.take();
                bail!(
                    "{name} exited ({status}); its log ends:\n{}",
                    self.log_tail(name)
                );
            }
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The API server's self-signed serving certificate (written at first
    /// start into its cert dir, reused on restart).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("certs/apiserver.crt")
    }

    /// Writes a kubeconfig for a bearer token (e.g. a service account's from
    /// [`ControlPlane::request_token`]) and returns its path.
    pub fn write_kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf> {
        let path = self.scratch_file(&format!("{user}.kubeconfig"));
        self.write_kubeconfig_file(&path, user, token)?;
        Ok(path)
    }

    fn write_kubeconfig_file(&self, path: &Path, user: &str, token: &str) -> Result<()> {
        // kubectl reads JSON kubeconfigs as well as YAML ones.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "ambit-test", "cluster": {
                "server": self.server,
                "certificate-authority": self.ca_file(),
            }}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "ambit-test", "context": {
                "cluster": "ambit-test", "user": user,
            }}],
            "current-context": "ambit-test",
        });
        fs::write(path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Creates a fresh namespace named after `prefix` and returns its name.
    pub fn namespace(&self, prefix: &str) -> Result<String> {
        let clean: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!(
            "{}-{}-{}",
            clean.trim_matches('-'),
            std::process::id(),
            NEXT_NAMESPACE.fetch_add(1, Ordering::Relaxed)
        );
        self.kubectl.run(&["create", "namespace", &name])?;
        Ok(name)
    }

    /// A new file name in this control plane's directory.
    pub(crate) fn scratch_file(&self, name: &str) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n}-{name}"))
    }

    /// `kubectl create -f` of one object; returns what the server stored.
    /// The server alone validates (kubectl's own schema check is off), as
    /// it would for any other client.
    pub fn create(&self, object: &Value) -> Result<Value> {
        self.submit("create", object)
    }

    /// `kubectl replace -f` of one object (an unconditional update for
    /// kinds that allow it, such as Endpoints); returns what was stored.
    pub fn replace(&self, object: &Value) -> Result<Value> {
        self.submit("replace", object)
    }

    fn submit(&self, verb: &str, object: &Value) -> Result<Value> {
        let file = self.scratch_file("object.json");
        fs::write(&file, serde_json::to_vec(object)?)?;
        self.kubectl
            .json(&[verb, "--validate=false", "-f", &file.display().to_string()])
            .with_context(|| {
                format!(
                    "{verb} {} {}",
                    object["kind"],
                    object["metadata"]["name"].as_str().unwrap_or("")
                )
            })
    }

    /// POST `body` to an API path (for subresources such as
    /// serviceaccounts/token); returns the answer.
    pub fn post_raw(&self, path: &str, body: &Value) -> Result<Value> {
        self.send_raw("create", path, body)
    }

    /// PUT `body` to an API path (for the status subresource).
    pub fn put_raw(&self, path: &str, body: &Value) -> Result<Value> {
        self.send_raw("replace", path, body)
    }

    fn send_raw(&self, verb: &str, path: &str, body: &Value) -> Result<Value> {
        let file = self.scratch_file("body.json");
        fs::write(&file, serde_json::to_vec(body)?)?;
        let text = self
            .kubectl
            .run(&[verb, "--raw", path, "-f", &file.display().to_string()])?;
        serde_json::from_str(&text).with_context(|| format!("{verb} {path}: answer is not JSON"))
    }
}

static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();

extern "C" fn clean_up_shared() {
    if let Some(Ok(cp)) = SHARED.get() {
        cp.clean_up();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.clean_up();
    }
}

impl ControlPlane {
    /// Kills the processes, then removes the data; safe to repeat.
    fn clean_up(&self) {
        for slot in [&self.apiserver, &self.etcd] {
            if let Some(mut child) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("control plane cleanup: {}: {e}", self.dir.display());
            }
            _ => {}
        }
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes) {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
