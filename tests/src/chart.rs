//! The Helm chart (deploy/chart) as the e2e tests install it: rendered by
//! helm with its default values, and its ServiceAccounts, RBAC and CRDs
//! applied to a test API server. Tests then act with tokens of the chart's
//! service accounts, so the RBAC shipped is the RBAC tested.

use std::{collections::HashSet, fs, path::PathBuf, process::Command, sync::Mutex};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::control_plane::{ControlPlane, SERVICE_ACCOUNT_ISSUER};

/// The release namespace of the docs and the tests.
pub const RELEASE_NAMESPACE: &str = "ambit-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "ambit-agent";
pub const CA_SERVICE_ACCOUNT: &str = "ambit-ca";
/// Where `cargo xtask setup` caches helm (override with `AMBIT_HELM`).
pub const DEFAULT_HELM: &str = "/var/cache/ambit-tools/helm-v4.1.4/helm";

/// What the tests install: who the components are and what they may do.
/// The workloads (DaemonSet, Deployment, Service) need a kubelet and
/// controllers the test control plane does not have.
const ACCESS_KINDS: &[&str] = &[
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

pub fn chart_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chart"))
}

fn helm() -> PathBuf {
    std::env::var_os("AMBIT_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HELM))
}

/// `helm template` of the chart (default values, CRDs included) into
/// release `namespace`, one JSON value per object.
pub fn render(namespace: &str) -> Result<Vec<Value>> {
    let helm = helm();
    if !helm.exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it caches helm)",
            helm.display()
        );
    }
    let out = Command::new(&helm)
        .args(["template", "ambit"])
        .arg(chart_dir())
        .args(["--namespace", namespace, "--include-crds"])
        .output()
        .with_context(|| format!("cannot start {}", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout).context("helm printed non-UTF-8")?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).context("helm printed invalid YAML")?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

/// Control planes (by admin kubeconfig, in a directory of their own) the
/// chart's access objects are in.
static INSTALLED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

impl ControlPlane {
    /// Installs the chart's CRDs, ServiceAccounts and RBAC into
    /// [`RELEASE_NAMESPACE`] (made if missing), once per control plane, and
    /// waits until the CRDs are served.
    pub fn install_chart_access(&self) -> Result<()> {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        let installed = installed.get_or_insert_with(HashSet::new);
        if installed.contains(&self.kubeconfig) {
            return Ok(());
        }
        let mut items = vec![json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": RELEASE_NAMESPACE},
        })];
        let objects = render(RELEASE_NAMESPACE)?;
        let crds: Vec<String> = objects
            .iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
            .collect();
        items.extend(
            objects
                .into_iter()
                .filter(|o| ACCESS_KINDS.iter().any(|kind| o["kind"] == *kind)),
        );
        let list = self.scratch_file("chart-access.json");
        fs::write(
            &list,
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?,
        )?;
        self.kubectl
            .run(&["apply", "-f", &list.display().to_string()])
            .context("applying the chart's ServiceAccounts, RBAC and CRDs")?;
        for crd in crds {
            self.kubectl.run(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                &format!("customresourcedefinition/{crd}"),
            ])?;
        }
        installed.insert(self.kubeconfig.clone());
        Ok(())
    }

    /// A kubeconfig holding an API token of the chart's `service_account`
    /// (after [`Self::install_chart_access`]), as its pod would have.
    pub fn chart_kubeconfig(&self, service_account: &str) -> Result<PathBuf> {
        self.install_chart_access()?;
        let token = self.request_token(
            RELEASE_NAMESPACE,
            service_account,
            SERVICE_ACCOUNT_ISSUER,
            None,
        )?;
        self.write_kubeconfig(service_account, &token)
    }
}
