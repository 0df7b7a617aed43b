//! kubectl against one kubeconfig: one-shot commands and streamed watches.

use std::{
    io::BufReader,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{exec::output_within, stderr};

/// Generous: the machine is shared, and a request that takes this long is a
/// hang, not slowness.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Kubectl {
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn new(kubeconfig: &Path) -> Self {
        Self {
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// kubectl with this kubeconfig and a bounded request time.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.unbounded();
        cmd.arg("--request-timeout=20s").args(args);
        cmd
    }

    fn unbounded(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        // Discovery cache next to the kubeconfig: removed with it, and never
        // mixed with another control plane that reused the port.
        if let Some(dir) = self.kubeconfig.parent() {
            cmd.arg("--cache-dir").arg(dir.join("kubectl-cache"));
        }
        cmd
    }

    /// Runs kubectl whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        output_within(self.command(args), REQUEST_TIMEOUT)
    }

    /// Runs kubectl and returns its stdout; a non-zero exit is an error
    /// carrying kubectl's stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), stderr(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `-o json` appended and parses the answer.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {}: not JSON", all.join(" ")))
    }

    /// `kubectl get --watch` with label and field selectors; the first
    /// events list what already exists, as ADDED.
    pub fn watch(
        &self,
        namespace: &str,
        resource: &str,
        label_selector: &str,
        field_selector: &str,
    ) -> Result<Watch> {
        let mut cmd = self.unbounded();
        cmd.args([
            "get",
            resource,
            "--namespace",
            namespace,
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ]);
        if !label_selector.is_empty() {
            cmd.args(["--selector", label_selector]);
        }
        if !field_selector.is_empty() {
            cmd.args(["--field-selector", field_selector]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("cannot start kubectl --watch")?;
        let stdout = child
            .stdout
            .take()
            .context("kubectl --watch has no stdout")?;
        let (send, events) = mpsc::channel();
        std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout));
            for value in stream.into_iter::<Value>() {
                let event = value
                    .map_err(anyhow::Error::from)
                    .and_then(WatchEvent::from_json);
                if send.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(Watch { child, events })
    }
}

#[derive(Debug)]
pub struct WatchEvent {
    /// ADDED, MODIFIED or DELETED.
    pub kind: String,
    pub object: Value,
}

impl WatchEvent {
    fn from_json(value: Value) -> Result<Self> {
        let kind = value["type"]
            .as_str()
            .with_context(|| format!("watch event without a type: {value}"))?
            .to_string();
        Ok(Self {
            kind,
            object: value["object"].clone(),
        })
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// A running watch; dropping it stops kubectl.
pub struct Watch {
    child: Child,
    events: mpsc::Receiver<Result<WatchEvent>>,
}

impl Watch {
    /// The next event, or an error when none comes within `timeout` or the
    /// watch ended.
    pub fn next(&self, timeout: Duration) -> Result<WatchEvent> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(anyhow!("no watch event within {timeout:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(anyhow!("the watch ended")),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
