//! What the CNI spec fixes for a plugin: the network config on stdin, the
//! CNI_* environment, the error object and the VERSION answer.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Versions whose result format this plugin passes through. 0.3.x results
/// look like 0.4.0 ones (flannel and Calico conflists still say 0.3.1).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// Error codes of the spec (1-99) and ours (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE_FAILED: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// The agent answered `error`: it could not capture the pod.
    pub const AGENT_FAILED: u32 = 100;
    /// The agent answered outside the protocol.
    pub const AGENT_PROTOCOL: u32 = 101;
    /// The pod is enrolled and the agent is unreachable.
    pub const ENROLLED_AGENT_DOWN: u32 = 102;
    /// The agent is unreachable and enrollment cannot be decided without it.
    pub const ENROLLMENT_UNKNOWN: u32 = 103;
}

/// The plugin's entry in the conflist, as the runtime hands it over.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_socket")]
    pub agent_socket: String,
    #[serde(default)]
    pub kubeconfig: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> String {
    DEFAULT_AGENT_SOCKET.into()
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl NetConf {
    /// The addresses of the previous result, without their prefix lengths.
    pub fn previous_ips(&self) -> Vec<String> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .map(|cidr| cidr.split('/').next().unwrap_or(cidr).to_string())
            .collect()
    }
}

/// The pod a Kubernetes runtime names in CNI_ARGS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// CNI_ARGS is `K=V;K=V`. Returns the pod when the caller is Kubernetes
/// (both namespace and name present); other callers get `None`.
pub fn pod_from_args(cni_args: &str) -> Option<PodRef> {
    let args: HashMap<&str, &str> = cni_args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let namespace = args.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())?;
    let name = args.get("K8S_POD_NAME").filter(|v| !v.is_empty())?;
    Some(PodRef {
        namespace: (*namespace).into(),
        name: (*name).into(),
        uid: args.get("K8S_POD_UID").copied().unwrap_or_default().into(),
    })
}

/// The spec's error result, printed on stdout with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(cni_version: &str, code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: cni_version.into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// The VERSION answer.
pub fn version_info(cni_version: &str) -> Value {
    serde_json::json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_args_name_the_pod() {
        let pod = pod_from_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234",
        )
        .unwrap();
        assert_eq!(
            pod,
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "1234".into()
            }
        );
    }

    #[test]
    fn other_callers_name_no_pod() {
        assert_eq!(pod_from_args(""), None);
        assert_eq!(pod_from_args("IgnoreUnknown=1"), None);
        assert_eq!(pod_from_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME="), None);
    }

    #[test]
    fn config_defaults_and_previous_ips() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"net","type":"ambit-cni",
                "prevResult":{"cniVersion":"1.0.0","ips":[
                    {"address":"198.18.240.5/24","gateway":"198.18.240.1"},
                    {"address":"fd00:a5b1::5/64"}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket, DEFAULT_AGENT_SOCKET);
        assert_eq!(conf.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(conf.kubeconfig, None);
        assert_eq!(conf.previous_ips(), ["198.18.240.5", "fd00:a5b1::5"]);
    }
}
