//! Whether a pod is in the mesh, decided from the API server: used only
//! when the agent (which normally decides) cannot be reached, so that a pod
//! outside the mesh still starts while an enrolled one fails closed.

use std::{collections::BTreeMap, path::Path, time::Duration};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::spec::PodRef;

/// The label on a namespace or pod that enrolls it; `disabled` on a pod opts out.
pub const MESH_LABEL: &str = "ambit.dev/mesh";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrollment {
    Enrolled,
    NotEnrolled,
    /// Why it could not be decided.
    Unknown(String),
}

/// The mesh rule: a pod's own label wins, else its namespace's label;
/// hostNetwork pods never (they do not reach CNI, but say so anyway).
pub fn decide(
    pod_labels: Option<&BTreeMap<String, String>>,
    host_network: bool,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Enrollment {
    if host_network {
        return Enrollment::NotEnrolled;
    }
    match (label(pod_labels), label(namespace_labels)) {
        (Some("enabled"), _) => Enrollment::Enrolled,
        (Some("disabled"), _) => Enrollment::NotEnrolled,
        (_, Some("enabled")) => Enrollment::Enrolled,
        _ => Enrollment::NotEnrolled,
    }
}

/// Asks the API server named by `kubeconfig` about the pod and its namespace,
/// all within `timeout`.
pub async fn lookup(kubeconfig: &Path, pod: &PodRef, timeout: Duration) -> Enrollment {
    match tokio::time::timeout(timeout, fetch(kubeconfig, pod)).await {
        Ok(Ok(enrollment)) => enrollment,
        Ok(Err(e)) => Enrollment::Unknown(format!("{e:#}")),
        Err(_) => Enrollment::Unknown(format!("the API server did not answer within {timeout:?}")),
    }
}

async fn fetch(kubeconfig: &Path, pod_ref: &PodRef) -> anyhow::Result<Enrollment> {
    use anyhow::Context;
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", kubeconfig.display()))?;
    let client = Client::try_from(config).context("building the API client")?;
    let pod = Api::<Pod>::namespaced(client.clone(), &pod_ref.namespace)
        .get(&pod_ref.name)
        .await
        .with_context(|| format!("getting pod {}/{}", pod_ref.namespace, pod_ref.name))?;
    let namespace = Api::<Namespace>::all(client)
        .get(&pod_ref.namespace)
        .await
        .with_context(|| format!("getting namespace {}", pod_ref.namespace))?;
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    Ok(decide(
        pod.metadata.labels.as_ref(),
        host_network,
        namespace.metadata.labels.as_ref(),
    ))
}

fn label(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels.and_then(|l| l.get(MESH_LABEL)).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(MESH_LABEL.to_string(), value.to_string())])
    }

    #[test]
    fn the_mesh_rule() {
        let on = labels("enabled");
        let off = labels("disabled");
        assert_eq!(decide(None, false, Some(&on)), Enrollment::Enrolled);
        assert_eq!(decide(Some(&on), false, None), Enrollment::Enrolled);
        assert_eq!(
            decide(Some(&off), false, Some(&on)),
            Enrollment::NotEnrolled
        );
        assert_eq!(decide(None, false, None), Enrollment::NotEnrolled);
        assert_eq!(decide(Some(&on), true, Some(&on)), Enrollment::NotEnrolled);
        assert_eq!(
            decide(None, false, Some(&labels("yes"))),
            Enrollment::NotEnrolled
        );
    }
}
