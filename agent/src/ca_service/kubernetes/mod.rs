//! `ambit ca --kubernetes`: the root in a Secret, the trust bundle in a
//! ConfigMap, the directory from the API, and node attestation with the
//! agents' projected service-account tokens (docs/operations.md, "`ambit
//! ca` in the cluster"; docs/threat-model.md, "Node attestation").

pub mod attest;
pub mod root_secret;
pub mod trust_bundle;

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use self::attest::Attestor;
use crate::{
    identity::{CertificateAuthority, TrustDomain},
    metrics::KubernetesMetrics,
    workloads::{
        NodeWorkloads,
        kubernetes::{client_for, cluster_directory},
    },
};

/// Where the CA keeps and publishes its state in the cluster, and whom it
/// accepts as an agent.
#[derive(Clone, Debug)]
pub struct KubernetesCaConfig {
    /// `None`: the in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// The release namespace: the CA's Secret and ConfigMap, and the agents'
    /// pods and ServiceAccount.
    pub namespace: String,
    pub root_secret: String,
    pub bundle_configmap: String,
    /// Audience agent tokens must be issued for.
    pub token_audience: String,
    pub agent_service_account: String,
}

/// The CA's state once started in the cluster.
pub struct KubernetesCa {
    pub ca: CertificateAuthority,
    /// The roots to publish: the CA's own first.
    pub roots: Vec<CertificateDer<'static>>,
    pub directory: watch::Receiver<NodeWorkloads>,
    pub attestor: Attestor,
}

/// Loads (or makes) the root, publishes the bundle, and waits for the
/// first full list of pods and namespaces (before it, every request
/// would be refused).
pub async fn start(
    config: &KubernetesCaConfig,
    trust_domain: &TrustDomain,
) -> Result<KubernetesCa> {
    let client = client_for(config.kubeconfig.as_deref()).await?;
    let namespace = &config.namespace;
    let kept = root_secret::load_or_create(
        &Api::<Secret>::namespaced(client.clone(), namespace),
        namespace,
        &config.root_secret,
        trust_domain,
    )
    .await?;
    tracing::info!(
        secret = %format!("{namespace}/{}", config.root_secret),
        created = kept.created,
        extra_roots = kept.extra_roots.len(),
        "CA root kept in a Secret"
    );
    let mut roots = vec![kept.ca.root_certificate().clone()];
    roots.extend(kept.extra_roots);
    let bundle = trust_bundle::bundle_pem(&roots);
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let updated = trust_bundle::publish(
        &config_maps,
        &config.bundle_configmap,
        &bundle,
        trust_bundle::Publish::Replace,
    )
    .await
    .with_context(|| {
        format!(
            "publishing the trust bundle to ConfigMap {namespace}/{} (the CA's RBAC must allow \
             get, create and update on it)",
            config.bundle_configmap
        )
    })?;
    tracing::info!(
        configmap = %format!("{namespace}/{}", config.bundle_configmap),
        roots = roots.len(),
        updated,
        "trust bundle published"
    );
    tokio::spawn(trust_bundle::keep_published(
        config_maps,
        config.bundle_configmap.clone(),
        bundle,
    ));
    // The CA has no admin server: its watch counters are only logged.
    let metrics = KubernetesMetrics::register(&prometheus::Registry::new())
        .context("registering the Kubernetes metrics")?;
    let feed = cluster_directory::watch(client.clone(), &metrics);
    let mut synced = feed.synced;
    tracing::info!("waiting for the first list of pods and namespaces");
    synced
        .wait_for(|synced| *synced)
        .await
        .context("the Kubernetes watches stopped before their first list")?;
    Ok(KubernetesCa {
        ca: kept.ca,
        roots,
        directory: feed.workloads,
        attestor: Attestor::new(
            client,
            namespace.clone(),
            config.token_audience.clone(),
            config.agent_service_account.clone(),
        ),
    })
}

/// How an agent in the cluster reaches the CA (`ambit run --kubernetes
/// --ca-addr ... --ca-token-file ...`).
#[derive(Clone, Debug)]
pub struct AgentCaConfig {
    /// `HOST:PORT`, resolved at each connection.
    pub addr: String,
    /// The projected service-account token (audience of the CA's
    /// `--token-audience`), re-read at each attestation.
    pub token_file: PathBuf,
    /// The release namespace, holding the bundle ConfigMap.
    pub namespace: String,
    pub bundle_configmap: String,
}

/// The agent's CA client: it trusts the bundle in the ConfigMap (waiting
/// for it, then following its changes) and attests with its pod's token.
pub async fn agent_client(
    config: &AgentCaConfig,
    kubeconfig: Option<&std::path::Path>,
    node: &str,
    trust_domain: &TrustDomain,
) -> Result<crate::ca_service::CaClient> {
    let client = client_for(kubeconfig).await?;
    tracing::info!(
        configmap = %format!("{}/{}", config.namespace, config.bundle_configmap),
        "loading the trust bundle"
    );
    let bundles = trust_bundle::follow(
        Api::<ConfigMap>::namespaced(client, &config.namespace),
        config.bundle_configmap.clone(),
        trust_domain.clone(),
    )
    .await;
    Ok(crate::ca_service::CaClient::attested(
        &config.addr,
        &config.token_file,
        node,
        trust_domain.clone(),
        bundles,
    )?)
}
