//! Writing the bootstrap files: the trust bundle and the node credentials.
//!
//! Every file is written to a fresh temporary file in the same directory,
//! created with its final mode (so a key file is 0600 from its first byte,
//! whatever the umask), synced, and renamed over the old one: a reader
//! sees either the old or the new file, never a partial one.
//!
//! The node key written here is the only private key the CA service ever
//! writes (see the module comment of `ca_service`): it stands in for a
//! projected service-account token. Workload keys never exist outside the
//! agent that generated them.

use std::{
    fs::{self, DirBuilder, File, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rustls_pki_types::CertificateDer;

use super::pem;
use crate::identity::Svid;

/// `DIR/bundle.pem`: the trust domain's root certificate.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// `DIR/nodes/<NODE>/`: one node's bootstrap credential.
pub const NODES_DIR: &str = "nodes";
/// The node credential's chain, leaf first.
pub const NODE_CHAIN_FILE: &str = "node.pem";
/// The node credential's PKCS#8 private key, mode 0600.
pub const NODE_KEY_FILE: &str = "node-key.pem";

pub(super) const PUBLIC_MODE: u32 = 0o644;
pub(super) const SECRET_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o755;

pub(super) fn bundle_path(dir: &Path) -> PathBuf {
    dir.join(BUNDLE_FILE)
}

pub(super) fn node_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join(NODES_DIR).join(node)
}

pub(super) fn write_bundle(dir: &Path, root: &CertificateDer<'_>) -> io::Result<PathBuf> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let path = bundle_path(dir);
    let pem = pem::encode(pem::CERTIFICATE, root);
    write_atomic(&path, pem.as_bytes(), PUBLIC_MODE)?;
    Ok(path)
}

/// Writes `svid` as `node`'s credential. The key goes first: a reader that
/// catches the chain and key of different generations sees a mismatch and
/// reads again (the client checks the key against the leaf).
pub(super) fn write_node_credential(dir: &Path, node: &str, svid: &Svid) -> io::Result<()> {
    let node_dir = node_dir(dir, node);
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(&node_dir)?;
    let key = pem::encode(pem::PRIVATE_KEY, svid.key().private_key_der().secret_der());
    write_atomic(&node_dir.join(NODE_KEY_FILE), key.as_bytes(), SECRET_MODE)?;
    let mut chain = String::new();
    for cert in svid.chain() {
        chain.push_str(&pem::encode(pem::CERTIFICATE, cert));
    }
    write_atomic(
        &node_dir.join(NODE_CHAIN_FILE),
        chain.as_bytes(),
        PUBLIC_MODE,
    )
}

pub(super) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        // create_new: never reuse (or follow a symlink planted at) the name;
        // mode: the file is created 0600/0644, the umask can only narrow it.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // Exactly `mode`, whatever the umask (never wider than at creation).
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename durable; a failure here does not undo the write.
    if let Some(parent) = path.parent()
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}
