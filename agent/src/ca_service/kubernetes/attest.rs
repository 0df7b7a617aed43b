//! Node attestation: which node an agent runs on, proven by a projected
//! service-account token of its own pod. The API server vouches for the
//! token (TokenReview, for our audience only), the token must belong to the
//! agents' ServiceAccount, and it names the pod it is bound to; the node is
//! that pod's `spec.nodeName`, read from the API, never from the agent.

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use thiserror::Error;

/// `extra` keys the API server sets on a token bound to a pod.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Why an attestation was refused. The message goes to the agent and the
/// CA's log; it never repeats the token.
#[derive(Debug, Error)]
pub enum AttestError {
    #[error("the token review failed: {0}")]
    Review(#[source] kube::Error),
    #[error("the API server did not authenticate the token for audience {audience:?}: {reason}")]
    NotAuthenticated { audience: String, reason: String },
    #[error(
        "the token is of {got:?}, not of the agents' service account {want:?} \
         (the agent DaemonSet's pods must run as it)"
    )]
    WrongServiceAccount { got: String, want: String },
    #[error(
        "the token is not bound to a pod (no {POD_NAME_EXTRA}/{POD_UID_EXTRA}): \
         use a projected service-account token of the agent's pod"
    )]
    NotPodBound,
    #[error("cannot read pod {namespace}/{name}: {source}")]
    PodLookup {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("pod {namespace}/{name} (uid {uid}) the token is bound to no longer exists")]
    PodGone {
        namespace: String,
        name: String,
        uid: String,
    },
    #[error("pod {namespace}/{name} is terminating")]
    PodTerminating { namespace: String, name: String },
    #[error("pod {namespace}/{name} is not scheduled on a node yet")]
    NotScheduled { namespace: String, name: String },
}

/// A verified agent pod: where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// Checks agent tokens against the API server.
#[derive(Clone)]
pub struct Attestor {
    client: Client,
    /// The agents' (and the CA's) namespace.
    namespace: String,
    audience: String,
    agent_service_account: String,
}

impl Attestor {
    pub fn new(
        client: Client,
        namespace: String,
        audience: String,
        agent_service_account: String,
    ) -> Self {
        Self {
            client,
            namespace,
            audience,
            agent_service_account,
        }
    }

    /// The pod, and so the node, `token` proves.
    pub async fn attest(&self, token: &str) -> Result<AttestedPod, AttestError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AttestError::Review)?;
        let status = reviewed.status.unwrap_or_default();
        let not_authenticated = |reason: String| AttestError::NotAuthenticated {
            audience: self.audience.clone(),
            reason,
        };
        if status.authenticated != Some(true) {
            return Err(not_authenticated(
                status.error.unwrap_or_else(|| "no reason given".into()),
            ));
        }
        // An API server that ignores audiences would answer without them.
        if !status
            .audiences
            .as_deref()
            .is_some_and(|audiences| audiences.contains(&self.audience))
        {
            return Err(not_authenticated(format!(
                "the review confirmed audiences {:?} only",
                status.audiences.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let want = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.agent_service_account
        );
        let username = user.username.unwrap_or_default();
        if username != want {
            return Err(AttestError::WrongServiceAccount {
                got: username,
                want,
            });
        }
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
            Some([value]) if !value.is_empty() => Some(value.clone()),
            _ => None,
        };
        let (Some(name), Some(uid)) = (single(POD_NAME_EXTRA), single(POD_UID_EXTRA)) else {
            return Err(AttestError::NotPodBound);
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&name)
            .await
            .map_err(|source| AttestError::PodLookup {
                namespace: self.namespace.clone(),
                name: name.clone(),
                source,
            })?;
        // A pod of the same name but another uid is a later pod: the token
        // was bound to one that is gone.
        let Some(pod) = pod.filter(|pod| pod.metadata.uid.as_deref() == Some(uid.as_str())) else {
            return Err(AttestError::PodGone {
                namespace: self.namespace.clone(),
                name,
                uid,
            });
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(AttestError::PodTerminating {
                namespace: self.namespace.clone(),
                name,
            });
        }
        let node = pod
            .spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| AttestError::NotScheduled {
                namespace: self.namespace.clone(),
                name: name.clone(),
            })?;
        Ok(AttestedPod {
            namespace: self.namespace.clone(),
            name,
            node,
        })
    }
}
