//! The trust bundle in a ConfigMap (key `bundle.pem`): the CA publishes its
//! roots there, every agent follows it and swaps the roots its verifiers
//! use in place, so a rotation reaches running agents without a restart.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event, watcher},
    },
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::{
    ca_service::pem,
    identity::{TrustBundles, TrustDomain},
    workloads::kubernetes::watch_backoff,
};

/// The ConfigMap key holding the PEM roots.
pub const BUNDLE_KEY: &str = "bundle.pem";

/// Lost update races in a row before giving up.
const ATTEMPTS: usize = 5;

/// The PEM text of `roots`, in order.
pub fn bundle_pem<'a>(roots: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    roots
        .into_iter()
        .map(|root| pem::encode(pem::CERTIFICATE, root).to_string())
        .collect()
}

/// The bundle of `trust_domain` in `text`, or why it is unusable.
pub fn parse_bundle(trust_domain: &TrustDomain, text: &str) -> Result<TrustBundles, String> {
    let roots = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if roots.is_empty() {
        return Err("it holds no CERTIFICATE block".into());
    }
    let mut bundles = TrustBundles::new();
    for root in &roots {
        bundles
            .add_root(trust_domain.clone(), root)
            .map_err(|e| e.to_string())?;
    }
    Ok(bundles)
}

/// Whether [`publish`] replaces a different bundle or only fills in a
/// missing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    Replace,
    IfMissing,
}

/// Makes ConfigMap `name` hold `bundle` (created if missing; with
/// [`Publish::IfMissing`] a different bundle is left alone). Returns
/// whether it wrote. Updates carry the resourceVersion read, so a
/// concurrent writer is noticed and the write retried on fresh data.
pub async fn publish(
    api: &Api<ConfigMap>,
    name: &str,
    bundle: &str,
    mode: Publish,
) -> Result<bool, kube::Error> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let written = match api.get_opt(name).await? {
            Some(existing)
                if existing
                    .data
                    .as_ref()
                    .and_then(|data| data.get(BUNDLE_KEY))
                    .is_some_and(|current| current == bundle || mode == Publish::IfMissing) =>
            {
                return Ok(false);
            }
            Some(mut existing) => {
                existing
                    .data
                    .get_or_insert_default()
                    .insert(BUNDLE_KEY.into(), bundle.into());
                api.replace(name, &PostParams::default(), &existing)
                    .await
                    .map(drop)
            }
            None => {
                let config_map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        labels: Some([("app.kubernetes.io/name".into(), "ambit-ca".into())].into()),
                        ..Default::default()
                    },
                    data: Some([(BUNDLE_KEY.into(), bundle.into())].into()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &config_map)
                    .await
                    .map(drop)
            }
        };
        match written {
            Ok(()) => return Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                last = Some(kube::Error::Api(status));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("ATTEMPTS > 0"))
}

/// How often the CA checks that its bundle is still the published one.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(60);

/// Puts `bundle` back if the ConfigMap (or its key) was deleted, checked
/// every minute. A different bundle is left alone: during a rolling update
/// the old CA must not undo the bundle a new CA (a rotated root) published.
pub async fn keep_published(api: Api<ConfigMap>, name: String, bundle: String) {
    loop {
        tokio::time::sleep(REPUBLISH_INTERVAL).await;
        match publish(&api, &name, &bundle, Publish::IfMissing).await {
            Ok(false) => {}
            Ok(true) => tracing::warn!(configmap = %name,
                "the trust bundle ConfigMap was deleted; published the CA's bundle again"),
            Err(e) => tracing::warn!(configmap = %name, error = %e,
                "cannot check the trust bundle ConfigMap; retrying in a minute"),
        }
    }
}

/// The bundle in ConfigMap `name` once it exists and is valid (waiting
/// for it, since the CA may start after the agents), kept current from
/// then on: a later valid version replaces the roots in place, an invalid
/// one or a deletion is logged and the last good roots keep serving.
pub async fn follow(
    api: Api<ConfigMap>,
    name: String,
    trust_domain: TrustDomain,
) -> Arc<TrustBundles> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).backoff(watch_backoff()).boxed();
    let mut follower = Follower {
        name,
        trust_domain,
        last_pem: None,
        bundles: Arc::new(TrustBundles::new()),
    };
    let mut waiting_since = tokio::time::Instant::now();
    while follower.last_pem.is_none() {
        match events.next().await {
            Some(Ok(event)) => follower.apply(event),
            Some(Err(e)) => tracing::warn!(configmap = %follower.name, error = %e,
                "cannot read the trust bundle ConfigMap; retrying"),
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
        if follower.last_pem.is_none() && waiting_since.elapsed() > Duration::from_secs(10) {
            tracing::warn!(configmap = %follower.name,
                "still waiting for the trust bundle ConfigMap (ambit ca publishes it when it starts)");
            waiting_since = tokio::time::Instant::now();
        }
    }
    let bundles = Arc::clone(&follower.bundles);
    tokio::spawn(async move {
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => follower.apply(event),
                Err(e) => tracing::warn!(configmap = %follower.name, error = %e,
                    "trust bundle watch failed; retrying, the last good bundle serves"),
            }
        }
    });
    bundles
}

struct Follower {
    name: String,
    trust_domain: TrustDomain,
    /// The PEM text now in force; `None` until the first valid one.
    last_pem: Option<String>,
    bundles: Arc<TrustBundles>,
}

impl Follower {
    fn apply(&mut self, event: Event<ConfigMap>) {
        let config_map = match event {
            Event::Apply(config_map) | Event::InitApply(config_map) => config_map,
            Event::Delete(_) => {
                tracing::warn!(configmap = %self.name,
                    "the trust bundle ConfigMap was deleted; the last good bundle serves");
                return;
            }
            Event::Init | Event::InitDone => return,
        };
        let Some(text) = config_map.data.and_then(|mut data| data.remove(BUNDLE_KEY)) else {
            tracing::warn!(configmap = %self.name, key = BUNDLE_KEY,
                "the trust bundle ConfigMap has no bundle; the last good one serves");
            return;
        };
        if self.last_pem.as_deref() == Some(text.as_str()) {
            return;
        }
        match parse_bundle(&self.trust_domain, &text) {
            Ok(next) => {
                let roots = next.root_count(self.trust_domain.as_str());
                self.bundles.replace(next);
                let first = self.last_pem.replace(text).is_none();
                tracing::info!(configmap = %self.name, roots,
                    "{}", if first { "trust bundle loaded" } else { "trust bundle updated" });
            }
            Err(reason) => tracing::warn!(configmap = %self.name, %reason,
                "the trust bundle ConfigMap holds no usable bundle; the last good one serves"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::UnixTime;

    use super::*;
    use crate::identity::{CertificateAuthority, PeerRole, SpiffeId, verify_svid};

    fn config_map(bundle: &str) -> ConfigMap {
        ConfigMap {
            data: Some([(BUNDLE_KEY.to_string(), bundle.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_bundle_replaces_the_shared_roots_in_place_and_a_bad_one_is_ignored() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let old = CertificateAuthority::new(td.clone()).unwrap();
        let new = CertificateAuthority::new(td.clone()).unwrap();
        let id = SpiffeId::kubernetes(&td, "ns", "sa").unwrap();
        let under_new = new.issue_svid(&id, None).unwrap();
        let mut follower = Follower {
            name: "ambit-trust-bundle".into(),
            trust_domain: td.clone(),
            last_pem: None,
            bundles: Arc::new(TrustBundles::new()),
        };
        // What a verifier built earlier holds.
        let shared = Arc::clone(&follower.bundles);
        let verifies = || {
            verify_svid(
                under_new.chain(),
                &shared,
                UnixTime::now(),
                PeerRole::Client,
            )
        };

        follower.apply(Event::InitApply(config_map(&bundle_pem([
            old.root_certificate()
        ]))));
        assert_eq!(shared.root_count("cluster.local"), 1);
        assert!(verifies().is_err());

        // Garbage and a deletion leave the last good bundle in force.
        follower.apply(Event::Apply(config_map("not a bundle")));
        follower.apply(Event::Delete(ConfigMap::default()));
        assert_eq!(shared.root_count("cluster.local"), 1);

        // A rotation: new and old root.
        let both = bundle_pem([new.root_certificate(), old.root_certificate()]);
        follower.apply(Event::Apply(config_map(&both)));
        assert_eq!(shared.root_count("cluster.local"), 2);
        assert_eq!(verifies().unwrap(), id);
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let td = TrustDomain::new("cluster.local").unwrap();
        assert!(
            parse_bundle(&td, "")
                .unwrap_err()
                .contains("no CERTIFICATE")
        );
    }
}
