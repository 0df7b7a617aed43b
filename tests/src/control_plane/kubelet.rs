//! The testbed as kubelet and container runtime of its simulated nodes:
//! Pod objects bound to a node with the status a kubelet would report, and
//! the objects around them (service accounts, services, endpoints, tokens).

use std::net::IpAddr;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::ControlPlane;
use crate::{Node, Pod};

/// A Pod object as the testbed declares it for one of its netns pods.
#[derive(Clone, Debug)]
pub struct KubePod {
    pub name: String,
    /// `spec.nodeName`: the simulated node "running" it.
    pub node_name: String,
    pub labels: Vec<(String, String)>,
    pub service_account: String,
    /// `status.hostIP`: the node's address.
    pub host_ip: IpAddr,
    /// `status.podIPs`, first one is `status.podIP`.
    pub ips: Vec<IpAddr>,
    /// More fields of the pod's one container (ports, probes).
    pub container: serde_json::Map<String, Value>,
}

impl KubePod {
    /// A pod of `service_account` on `node_name` (whose address is
    /// `host_ip`) with no labels, addresses or container fields: set the
    /// ones a test needs.
    pub fn new(name: &str, node_name: &str, service_account: &str, host_ip: IpAddr) -> Self {
        Self {
            name: name.into(),
            node_name: node_name.into(),
            labels: Vec::new(),
            service_account: service_account.into(),
            host_ip,
            ips: Vec::new(),
            container: serde_json::Map::new(),
        }
    }

    /// A Pod object for a testbed pod on `node`: its name, both its
    /// addresses, and the node's network namespace name as `spec.nodeName`.
    pub fn for_pod(pod: &Pod, node: &Node, service_account: &str) -> Self {
        Self {
            ips: vec![pod.ipv4.into(), pod.ipv6.into()],
            ..Self::new(
                &pod.name,
                &node.netns,
                service_account,
                node.link_ipv4.into(),
            )
        }
    }

    /// Adds `fields` (an object: `ports`, `readinessProbe`, ...) to the
    /// pod's container.
    pub fn container(mut self, fields: Value) -> Self {
        if let Value::Object(fields) = fields {
            self.container.extend(fields);
        }
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    fn manifest(&self, namespace: &str) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let mut container = json!({"name": "app", "image": "ambit.invalid/app:test"});
        container
            .as_object_mut()
            .expect("an object")
            .extend(self.container.clone());
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": self.node_name,
                "serviceAccountName": self.service_account,
                "automountServiceAccountToken": false,
                // Never pulled: nothing runs containers here.
                "containers": [container],
            },
        })
    }
}

/// One port of a Service: its `name` (the Endpoints port of that name
/// carries the number on the pods), the `port` clients dial, and the
/// `target` on the pods: a number, or the name of a container port.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target: Value,
}

impl ServicePort {
    pub fn new(name: &str, port: u16, target: impl Into<Value>) -> Self {
        Self {
            name: name.into(),
            port,
            target: target.into(),
        }
    }
}

/// `api/v1/namespaces/<ns>/<resource>/<name>`
fn path(namespace: &str, resource: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/{resource}/{name}")
}

impl ControlPlane {
    /// Creates the Pod object (Pending, as a scheduler would leave it).
    /// Returns its uid.
    pub fn create_pod(&self, namespace: &str, pod: &KubePod) -> Result<String> {
        let created = self.create(&pod.manifest(namespace))?;
        uid_of(&created)
    }

    /// Writes the status a kubelet reports once the containers run: phase
    /// Running, Ready, and the pod's addresses. Returns the stored object.
    pub fn report_running(&self, namespace: &str, pod: &KubePod) -> Result<Value> {
        let status_path = format!("{}/status", path(namespace, "pods", &pod.name));
        let mut object = self
            .kubectl
            .json(&["get", "pod", &pod.name, "--namespace", namespace])?;
        let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
        let ready = |kind: &str| json!({"type": kind, "status": "True"});
        object["status"] = json!({
            "phase": "Running",
            "hostIP": pod.host_ip,
            "podIP": pod.ips.first().map(ToString::to_string),
            "podIPs": ips,
            "conditions": [
                ready("PodScheduled"),
                ready("Initialized"),
                ready("ContainersReady"),
                ready("Ready"),
            ],
        });
        self.put_raw(&status_path, &object)
            .with_context(|| format!("reporting pod {} running", pod.name))
    }

    /// [`Self::create_pod`] then [`Self::report_running`]; returns the uid.
    pub fn run_pod(&self, namespace: &str, pod: &KubePod) -> Result<String> {
        let uid = self.create_pod(namespace, pod)?;
        self.report_running(namespace, pod)?;
        Ok(uid)
    }

    /// Deletes at once: without a kubelet, only grace period 0 removes the
    /// object (and produces DELETED for watchers).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl.run(&[
            "delete",
            "pod",
            name,
            "--namespace",
            namespace,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])?;
        Ok(())
    }

    pub fn create_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl
            .run(&["create", "serviceaccount", name, "--namespace", namespace])?;
        Ok(())
    }

    /// A ClusterIP Service selecting `selector`, with TCP `ports`. Returns
    /// the ClusterIP (inside [`super::SERVICE_CIDR`]).
    pub fn create_service(
        &self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[ServicePort],
    ) -> Result<IpAddr> {
        let selector: serde_json::Map<String, Value> = selector
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| {
                json!({"name": p.name, "protocol": "TCP", "port": p.port, "targetPort": p.target})
            })
            .collect();
        let created = self.create(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "selector": selector, "ports": ports},
        }))?;
        created["spec"]["clusterIP"]
            .as_str()
            .with_context(|| format!("service {name} has no clusterIP"))?
            .parse()
            .with_context(|| format!("service {name}: clusterIP is not an address"))
    }

    /// The Endpoints an endpoints controller would write for a service:
    /// `ready` and `not_ready` addresses on TCP `ports`, each named as the
    /// service port it serves, with the number on the pods (a named
    /// `targetPort` resolved).
    pub fn create_endpoints(
        &self,
        namespace: &str,
        name: &str,
        ready: &[IpAddr],
        not_ready: &[IpAddr],
        ports: &[(&str, u16)],
    ) -> Result<Value> {
        self.create(&endpoints_object(namespace, name, ready, not_ready, ports))
    }

    /// A TokenRequest for a service account, bound to a pod when given
    /// (name, uid), as a kubelet asks for projected tokens. Returns the token.
    pub fn request_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let mut spec = json!({"audiences": [audience], "expirationSeconds": 3600});
        if let Some((name, uid)) = bound_pod {
            spec["boundObjectRef"] =
                json!({"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid});
        }
        let answer = self.post_raw(
            &format!(
                "{}/token",
                path(namespace, "serviceaccounts", service_account)
            ),
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": spec}),
        )?;
        answer["status"]["token"]
            .as_str()
            .map(String::from)
            .context("TokenRequest answer has no status.token")
    }

    /// A TokenReview of `token` for `audience`; returns its `status`.
    pub fn review_token(&self, token: &str, audience: &str) -> Result<Value> {
        let answer = self.create(&json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"name": "review"},
            "spec": {"token": token, "audiences": [audience]},
        }))?;
        Ok(answer["status"].clone())
    }
}

/// An Endpoints object (see [`ControlPlane::create_endpoints`]); with
/// [`ControlPlane::replace`], the endpoints controller's next word.
pub fn endpoints_object(
    namespace: &str,
    name: &str,
    ready: &[IpAddr],
    not_ready: &[IpAddr],
    ports: &[(&str, u16)],
) -> Value {
    let addresses =
        |ips: &[IpAddr]| -> Vec<Value> { ips.iter().map(|ip| json!({"ip": ip})).collect() };
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "protocol": "TCP", "port": port}))
        .collect();
    // A subset needs an address of either kind.
    let subsets = if ready.is_empty() && not_ready.is_empty() {
        json!([])
    } else {
        json!([{
            "addresses": addresses(ready),
            "notReadyAddresses": addresses(not_ready),
            "ports": ports,
        }])
    };
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": subsets,
    })
}

fn uid_of(object: &Value) -> Result<String> {
    object["metadata"]["uid"]
        .as_str()
        .map(String::from)
        .context("object has no metadata.uid")
}
