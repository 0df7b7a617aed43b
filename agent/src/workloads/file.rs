//! The local workload source: a YAML file, re-read when it changes.
//!
//! ```yaml
//! node: node-1
//! namespaces:
//!   - name: default
//!     labels: { ambit.dev/mesh: enabled }
//! workloads:
//!   - name: client
//!     namespace: default
//!     serviceAccount: client
//!     labels: { app: client }
//!     netns: /var/run/netns/client
//!     ips: [198.18.0.10, "fd00:a5b1::10"]
//!     probes:   # the kubelet's, let in from the node (see probes.rs)
//!       httpGet: [{port: 8080, path: /ready}]
//!       tcpSocket: [9000]
//! ```

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::sync::watch;

use super::{Namespace, NodeWorkloads, Workload};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    node: String,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    workloads: Vec<Workload>,
}

pub fn parse(text: &str) -> Result<NodeWorkloads, serde_yaml::Error> {
    let file: WorkloadFile = serde_yaml::from_str(text)?;
    Ok(NodeWorkloads {
        node: file.node,
        namespaces: file.namespaces,
        workloads: file.workloads,
    })
}

pub fn load(path: &Path) -> Result<NodeWorkloads> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading workloads file {}", path.display()))?;
    parse(&text).with_context(|| format!("invalid workloads file {}", path.display()))
}

/// Loads the file now (failing if it is unusable) and then publishes every
/// valid change. An invalid edit is logged and ignored: the last good set
/// keeps serving.
pub fn watch(path: &Path, interval: Duration) -> Result<watch::Receiver<NodeWorkloads>> {
    let initial = load(path)?;
    let (tx, rx) = watch::channel(initial);
    let path = path.to_path_buf();
    tokio::spawn(async move {
        let mut last_text = std::fs::read_to_string(&path).ok();
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(text) => text,
                Err(e) => {
                    if last_text.take().is_some() {
                        tracing::error!(file = %path.display(), error = %e,
                            "cannot read workloads file; keeping the last good workloads");
                    }
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            last_text = Some(text.clone());
            match parse(&text) {
                Ok(workloads) => {
                    tracing::info!(file = %path.display(), "workloads file changed");
                    if tx.send(workloads).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(file = %path.display(), error = %e,
                    "invalid workloads file; keeping the last good workloads"),
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = include_str!("file.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```yaml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.node, "node-1");
        let enrolled: Vec<_> = parsed.enrolled().map(Workload::id).collect();
        assert_eq!(enrolled, ["default/client"]);
        assert_eq!(parsed.workloads[0].ips.len(), 2);
        let probes = &parsed.workloads[0].probes;
        assert!(probes.is_http_probe(8080, "/ready"));
        assert_eq!(probes.tcp_socket, [9000]);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let err = parse("node: n\nworkloads:\n  - name: a\n    namespace: b\n    bogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }
}
