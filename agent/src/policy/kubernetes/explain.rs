//! `ambit policy explain --kubeconfig`: one decision, from the cluster's
//! AuthorizationPolicies and the destination Pod's labels, as the agents
//! would make it.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams},
};

use super::{
    objects::{combine, from_list, id},
    resource,
};
use crate::policy::{ConnectionTarget, Destination, Peer, PolicySet, Request, explain};

/// The explanation, followed by the objects refused as invalid (the agents
/// serve their last valid version, which a single list cannot know).
/// `files` are policy files served next to the cluster's, if any.
pub async fn explain_in_cluster(
    client: Client,
    files: &PolicySet,
    from: &Peer,
    to: &ConnectionTarget,
) -> Result<String> {
    let list = Api::<DynamicObject>::all_with(client.clone(), &resource())
        .list(&ListParams::default())
        .await
        .context("listing AuthorizationPolicies (is the CRD installed?)")?;
    let objects = from_list(&list.items);
    let (set, _) = combine(files, &objects, files.settings());
    let pod = Api::<Pod>::namespaced(client, &to.namespace)
        .get_opt(&to.name)
        .await
        .with_context(|| format!("reading pod {}/{}", to.namespace, to.name))?
        .with_context(|| format!("no pod {}/{} in the cluster", to.namespace, to.name))?;
    let request = Request {
        source: from.id(),
        destination: Destination {
            namespace: &to.namespace,
            name: &to.name,
            labels: pod.labels(),
        },
        port: to.port,
    };
    let mut text = explain(&set, &request).to_string();
    for (key, stored) in objects.iter() {
        if let Some(problem) = &stored.problem {
            text.push_str(&format!(
                "invalid:    {} ({problem}); not counted here\n",
                id(key)
            ));
        }
    }
    Ok(text)
}
