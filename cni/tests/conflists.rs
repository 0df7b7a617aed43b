//! Install and uninstall against conflists shaped as the common network
//! plugins write them: the plugin chains last, install is idempotent, and
//! uninstall leaves the directory byte-identical to before.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use ambit_cni::install::{self, Entry, Installed, Uninstalled};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn entry() -> Entry {
    Entry {
        agent_socket: "/var/run/ambit/cni.sock".into(),
        kubeconfig: Some("/etc/cni/net.d/ambit-cni.kubeconfig".into()),
        timeout_ms: 30_000,
    }
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&p).unwrap())
        })
        .collect()
}

struct Node {
    _root: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    binary: PathBuf,
}

fn node_with(fixtures: &[&str]) -> Node {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("net.d");
    let bin = root.path().join("bin");
    fs::create_dir_all(&conf).unwrap();
    fs::create_dir_all(&bin).unwrap();
    for name in fixtures {
        fs::copy(Path::new(FIXTURES).join(name), conf.join(name)).unwrap();
    }
    let binary = root.path().join("ambit-cni-build");
    fs::write(&binary, b"\x7fELF stand-in for the plugin binary").unwrap();
    Node {
        conf,
        bin,
        binary,
        _root: root,
    }
}

fn plugin_types(path: &Path) -> Vec<String> {
    let conf: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn round_trip(fixture: &str, expected_chain: &[&str]) {
    let node = node_with(&[fixture]);
    let before = snapshot(&node.conf);
    let target = node.conf.join(fixture);

    let first = install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    assert_eq!(first, Installed::Added(target.clone()));
    assert_eq!(plugin_types(&target), expected_chain);
    let installed: Value = serde_json::from_slice(&fs::read(&target).unwrap()).unwrap();
    let ours = installed["plugins"].as_array().unwrap().last().unwrap();
    assert_eq!(ours["agentSocket"], "/var/run/ambit/cni.sock");
    assert_eq!(ours["timeoutMs"], 30_000);
    assert_eq!(ours["kubeconfig"], "/etc/cni/net.d/ambit-cni.kubeconfig");
    // Everything else in the file means what it meant.
    let original: Value = serde_json::from_slice(&before[fixture]).unwrap();
    for key in ["cniVersion", "name"] {
        assert_eq!(installed[key], original[key]);
    }
    assert_eq!(
        installed["plugins"].as_array().unwrap()[..expected_chain.len() - 1],
        original["plugins"].as_array().unwrap()[..]
    );
    assert_eq!(
        fs::read(node.bin.join("ambit-cni")).unwrap(),
        fs::read(&node.binary).unwrap()
    );

    let after_first = snapshot(&node.conf);
    let again = install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    assert_eq!(again, Installed::AlreadyPresent(target.clone()));
    assert_eq!(
        snapshot(&node.conf),
        after_first,
        "a second install changed files"
    );

    let removed = install::uninstall(&node.conf, &node.bin, None).unwrap();
    assert_eq!(removed, Uninstalled::Restored(target));
    assert_eq!(
        snapshot(&node.conf),
        before,
        "uninstall did not restore the bytes"
    );
    assert!(!node.bin.join("ambit-cni").exists());
}

#[test]
fn bridge_host_local_round_trip_is_byte_identical() {
    round_trip("10-bridge.conflist", &["bridge", "ambit-cni"]);
}

#[test]
fn cilium_round_trip_is_byte_identical() {
    round_trip("05-cilium.conflist", &["cilium-cni", "ambit-cni"]);
}

#[test]
fn calico_round_trip_is_byte_identical() {
    round_trip(
        "10-calico.conflist",
        &["calico", "portmap", "bandwidth", "ambit-cni"],
    );
}

#[test]
fn flannel_round_trip_is_byte_identical() {
    round_trip("10-flannel.conflist", &["flannel", "portmap", "ambit-cni"]);
}

#[test]
fn the_lexically_first_config_is_the_one_chained() {
    let node = node_with(&["10-calico.conflist", "05-cilium.conflist"]);
    let calico_before = fs::read(node.conf.join("10-calico.conflist")).unwrap();
    install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    assert_eq!(
        plugin_types(&node.conf.join("05-cilium.conflist")),
        ["cilium-cni", "ambit-cni"]
    );
    assert_eq!(
        fs::read(node.conf.join("10-calico.conflist")).unwrap(),
        calico_before
    );
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_comes_back() {
    let node = node_with(&["10-single.conf"]);
    let before = snapshot(&node.conf);
    let done = install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    let list = node.conf.join("10-single.conflist");
    assert_eq!(
        done,
        Installed::Converted {
            from: node.conf.join("10-single.conf"),
            to: list.clone()
        }
    );
    assert_eq!(plugin_types(&list), ["bridge", "ambit-cni"]);
    // The runtime now finds the list first: the .conf is no longer loadable.
    assert_eq!(
        install::active_config(&node.conf, None).unwrap(),
        Some(list.clone())
    );
    let conf: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(conf["cniVersion"], "0.4.0");
    assert_eq!(conf["name"], "single");

    install::uninstall(&node.conf, &node.bin, None).unwrap();
    assert_eq!(snapshot(&node.conf), before);
}

#[test]
fn a_config_changed_after_install_loses_only_our_entry() {
    let node = node_with(&["10-flannel.conflist"]);
    let target = node.conf.join("10-flannel.conflist");
    install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    // Another chained plugin (Istio CNI, say) appends itself after ours.
    let mut conf: Value = serde_json::from_slice(&fs::read(&target).unwrap()).unwrap();
    conf["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "istio-cni"}));
    fs::write(&target, serde_json::to_vec(&conf).unwrap()).unwrap();

    let removed = install::uninstall(&node.conf, &node.bin, None).unwrap();
    assert_eq!(removed, Uninstalled::EntryRemoved(target.clone()));
    assert_eq!(plugin_types(&target), ["flannel", "portmap", "istio-cni"]);
    let names: Vec<String> = snapshot(&node.conf).into_keys().collect();
    assert_eq!(names, ["10-flannel.conflist"], "the stale backup stayed");
}

#[test]
fn a_config_rewritten_by_the_primary_plugin_is_left_alone() {
    let node = node_with(&["05-cilium.conflist"]);
    let target = node.conf.join("05-cilium.conflist");
    install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    // Cilium's agent rewrites its config at restart, without our entry.
    let rewritten =
        b"{\"cniVersion\":\"0.3.1\",\"name\":\"cilium\",\"plugins\":[{\"type\":\"cilium-cni\"}]}";
    fs::write(&target, rewritten).unwrap();
    assert_eq!(
        install::uninstall(&node.conf, &node.bin, None).unwrap(),
        Uninstalled::NothingToRemove
    );
    assert_eq!(fs::read(&target).unwrap(), rewritten);
    assert_eq!(snapshot(&node.conf).len(), 1, "the stale backup stayed");
    // And a fresh install chains in again.
    install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap();
    assert_eq!(plugin_types(&target), ["cilium-cni", "ambit-cni"]);
}

#[test]
fn no_config_yet_is_an_error_naming_the_fix() {
    let node = node_with(&[]);
    let err = install::install(&node.conf, &node.bin, None, &entry(), &node.binary).unwrap_err();
    assert!(
        format!("{err:#}").contains("install the cluster's network plugin first"),
        "{err:#}"
    );
}
