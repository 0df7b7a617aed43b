//! The CA's root kept in a Secret (`root.pem`, `root-key.pem`), so every CA
//! start signs under the same root and the bundle agents hold stays valid.
//!
//! The first start creates the Secret; two CAs starting at once both try,
//! the API server lets one create win, and the loser reads the winner's
//! root, so a cluster never ends up with two. A Secret without the two keys
//! (the rotation procedure empties them) gets a new root, written with the
//! Secret's resourceVersion for the same reason. `trusted-roots.pem`, if
//! present, lists more roots to keep in the bundle (the old root during a
//! rotation, docs/operations.md).

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::{
    ca_service::{ROOT_CERT_FILE, ROOT_KEY_FILE},
    identity::{CaError, CertificateAuthority, RootPem, TrustDomain},
};

/// Optional key: more PEM roots to publish in the bundle.
pub const TRUSTED_ROOTS_KEY: &str = "trusted-roots.pem";

/// Create or update races lost in a row before giving up.
const ATTEMPTS: usize = 5;

#[derive(Debug, Error)]
pub enum RootSecretError {
    #[error("cannot {action} Secret {namespace}/{name}: {source} (the CA's RBAC must allow it)")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "Secret {namespace}/{name} has {present} but not {missing}: restore both from a backup, \
         or remove both to make a new root (see the root rotation procedure)"
    )]
    HalfPresent {
        namespace: String,
        name: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("Secret {namespace}/{name}: {reason}")]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("the root in Secret {namespace}/{name}: {source}")]
    Root {
        namespace: String,
        name: String,
        #[source]
        source: CaError,
    },
    #[error("Secret {namespace}/{name} kept changing while the CA tried to write its root")]
    Contended { namespace: String, name: String },
}

/// The CA under the kept root, the other roots to trust, and whether this
/// start made the root.
pub struct KeptRoot {
    pub ca: CertificateAuthority,
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub created: bool,
}

/// Reads the root from Secret `name` of `api`'s namespace, making (and
/// storing) it first if there is none.
pub async fn load_or_create(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    trust_domain: &TrustDomain,
) -> Result<KeptRoot, RootSecretError> {
    let api_error = |action, source| RootSecretError::Api {
        action,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    let root_error = |source| RootSecretError::Root {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(name).await.map_err(|e| api_error("read", e))?;
        let data = existing
            .as_ref()
            .and_then(|secret| secret.data.clone())
            .unwrap_or_default();
        let text = |key: &str| -> Result<Option<Zeroizing<String>>, RootSecretError> {
            data.get(key)
                .map(|bytes| {
                    String::from_utf8(bytes.0.clone())
                        .map(Zeroizing::new)
                        .map_err(|_| RootSecretError::Invalid {
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                            reason: format!("{key} is not UTF-8 PEM"),
                        })
                })
                .transpose()
        };
        let extra_roots = match text(TRUSTED_ROOTS_KEY)? {
            None => Vec::new(),
            Some(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RootSecretError::Invalid {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    reason: format!("{TRUSTED_ROOTS_KEY} is not PEM certificates: {e}"),
                })?,
        };
        match (text(ROOT_CERT_FILE)?, text(ROOT_KEY_FILE)?) {
            (Some(cert), Some(key)) => {
                let root = RootPem {
                    cert: cert.to_string(),
                    key,
                };
                let ca = CertificateAuthority::from_root(trust_domain.clone(), &root)
                    .map_err(root_error)?;
                return Ok(KeptRoot {
                    ca,
                    extra_roots,
                    created: false,
                });
            }
            (None, None) => {
                let root = CertificateAuthority::generate_root(trust_domain).map_err(root_error)?;
                let mut data = data;
                data.insert(
                    ROOT_CERT_FILE.into(),
                    ByteString(root.cert.as_bytes().to_vec()),
                );
                data.insert(
                    ROOT_KEY_FILE.into(),
                    ByteString(root.key.as_bytes().to_vec()),
                );
                let written = match existing {
                    None => api
                        .create(&PostParams::default(), &new_secret(name, data))
                        .await
                        .map(drop),
                    Some(mut secret) => {
                        // Keeps metadata.resourceVersion: a concurrent write
                        // makes this one fail with 409 instead of winning.
                        secret.data = Some(data);
                        api.replace(name, &PostParams::default(), &secret)
                            .await
                            .map(drop)
                    }
                };
                match written {
                    Ok(()) => {
                        let ca = CertificateAuthority::from_root(trust_domain.clone(), &root)
                            .map_err(root_error)?;
                        return Ok(KeptRoot {
                            ca,
                            extra_roots,
                            created: true,
                        });
                    }
                    // Another CA got there first: use its root.
                    Err(kube::Error::Api(status))
                        if status.is_already_exists() || status.is_conflict() =>
                    {
                        tracing::info!(
                            namespace,
                            name,
                            "another CA stored a root first; reading it"
                        );
                    }
                    Err(e) => return Err(api_error("write", e)),
                }
            }
            (Some(_), None) => {
                return Err(half(namespace, name, ROOT_CERT_FILE, ROOT_KEY_FILE));
            }
            (None, Some(_)) => {
                return Err(half(namespace, name, ROOT_KEY_FILE, ROOT_CERT_FILE));
            }
        }
    }
    Err(RootSecretError::Contended {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn half(
    namespace: &str,
    name: &str,
    present: &'static str,
    missing: &'static str,
) -> RootSecretError {
    RootSecretError::HalfPresent {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        present,
        missing,
    }
}

fn new_secret(name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([("app.kubernetes.io/name".into(), "ambit-ca".into())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}
