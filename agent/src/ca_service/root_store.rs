//! The CA's root kept on disk (in Kubernetes, a Secret mounted as a
//! directory), so a restarted `ambit ca` signs under the same root and the
//! bundle every agent holds stays valid. Without it the CA makes a fresh
//! root each start, and every agent must restart with the new bundle.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

use super::bootstrap::{PUBLIC_MODE, SECRET_MODE, write_atomic};
use crate::identity::{CaError, CertificateAuthority, RootPem, TrustDomain};

/// `DIR/root.pem`: the root certificate.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// `DIR/root-key.pem`: its private key, mode 0600.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum RootStoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{present} exists but {missing} does not: restore both from the same backup, or remove \
         the directory to start a new root (every agent then needs the new bundle)"
    )]
    HalfPresent { present: PathBuf, missing: PathBuf },
    #[error("the root in {dir}: {source}")]
    Root { dir: PathBuf, source: CaError },
}

/// The CA under the root kept in `dir`, made (and written) first if `dir`
/// holds none. Returns the CA and whether the root is new.
pub fn load_or_create(
    dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<(CertificateAuthority, bool), RootStoreError> {
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let root_error = |source| RootStoreError::Root {
        dir: dir.to_path_buf(),
        source,
    };
    match (read(&cert_path)?, read(&key_path)?) {
        (Some(cert), Some(key)) => {
            let root = RootPem {
                cert: cert.to_string(),
                key,
            };
            let ca =
                CertificateAuthority::from_root(trust_domain.clone(), &root).map_err(root_error)?;
            Ok((ca, false))
        }
        (None, None) => {
            let root = CertificateAuthority::generate_root(trust_domain).map_err(root_error)?;
            fs::create_dir_all(dir).map_err(|source| RootStoreError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
            // The key first: a crash in between leaves a key without a
            // certificate, which the next start reports rather than using.
            write_atomic(&key_path, root.key.as_bytes(), SECRET_MODE).map_err(|source| {
                RootStoreError::Write {
                    path: key_path.clone(),
                    source,
                }
            })?;
            write_atomic(&cert_path, root.cert.as_bytes(), PUBLIC_MODE).map_err(|source| {
                RootStoreError::Write {
                    path: cert_path.clone(),
                    source,
                }
            })?;
            let ca =
                CertificateAuthority::from_root(trust_domain.clone(), &root).map_err(root_error)?;
            Ok((ca, true))
        }
        (Some(_), None) => Err(RootStoreError::HalfPresent {
            present: cert_path,
            missing: key_path,
        }),
        (None, Some(_)) => Err(RootStoreError::HalfPresent {
            present: key_path,
            missing: cert_path,
        }),
    }
}

fn read(path: &Path) -> Result<Option<Zeroizing<String>>, RootStoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(Zeroizing::new(text))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RootStoreError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn the_first_start_writes_the_root_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = load_or_create(dir.path(), &td()).unwrap();
        assert!(created);
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = load_or_create(dir.path(), &td()).unwrap();
        assert!(!created);
        assert_eq!(first.root_certificate(), second.root_certificate());
    }

    #[test]
    fn half_a_root_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), &td()).unwrap();
        let cert = fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
        fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = load_or_create(dir.path(), &td()).unwrap_err().to_string();
        assert!(err.contains("root-key.pem does not"), "{err}");
        assert_eq!(fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap(), cert);
    }
}
