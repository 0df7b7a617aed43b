//! Command lines of etcd and kube-apiserver for a test control plane
//! (flags verified in TOOLCHAIN.md).

use std::path::Path;

use super::{SERVICE_ACCOUNT_ISSUER, SERVICE_CIDR};

pub fn etcd(bin_dir: &Path, dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        bin_dir.join("etcd").display().to_string(),
        "--name=ambit-test".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=ambit-test={peer}"),
        // Test data need not survive a power cut; fsync would dominate.
        "--unsafe-no-fsync".into(),
    ]
}

pub fn apiserver(bin_dir: &Path, dir: &Path, etcd_port: u16, api_port: u16) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        bin_dir.join("kube-apiserver").display().to_string(),
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        // 1.20 still opens an unauthenticated port 8080 unless told not to.
        "--insecure-port=0".into(),
        format!("--cert-dir={}", file("certs")),
        format!("--token-auth-file={}", file("tokens.csv")),
        "--authorization-mode=RBAC".into(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", file("sa.pub")),
        format!("--service-account-signing-key-file={}", file("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--allow-privileged=true".into(),
        "--enable-admission-plugins=NamespaceLifecycle".into(),
        // No token controller or PV controller runs here.
        "--disable-admission-plugins=ServiceAccount,StorageObjectInUseProtection".into(),
        "--profiling=false".into(),
    ]
}
