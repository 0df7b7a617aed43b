//! This node's pods as the control loop gets them: the API server's view
//! merged with the CNI plugin's records. At ADD time the API has the pod
//! Pending without addresses (the kubelet writes them after the CNI chain
//! ran); the record supplies its netns and addresses so that it is captured
//! before its containers start.

use std::{net::IpAddr, path::PathBuf};

use super::store::PodRecord;
use crate::cni::records::CniPods;

/// The netns and addresses `pod` is published with, or `None` when it is
/// not to be published: DEL released it, or it has no addresses yet and
/// no record (it is still starting, or starting without the plugin).
/// `located`: the netns found through the locator, if any.
pub fn merge(
    cni: &CniPods,
    pod: &PodRecord,
    located: Option<&PathBuf>,
) -> Option<(PathBuf, Vec<IpAddr>)> {
    if cni.released.contains(&pod.uid) && !cni.pods.contains_key(&pod.uid) {
        return None;
    }
    let (netns, ips) = match cni.pods.get(&pod.uid) {
        Some(record) if !record.ips.is_empty() => (record.netns.clone(), record.ips.clone()),
        Some(record) => (record.netns.clone(), pod.ips.clone()),
        // Not found yet: the control loop fails to capture it and retries;
        // the next refresh publishes the path.
        None => (located.cloned().unwrap_or_default(), pod.ips.clone()),
    };
    (!ips.is_empty()).then_some((netns, ips))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{cni::records::PodNetwork, workloads::Labels};

    fn pod(uid: &str, ips: &[&str]) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            service_account: "sa".into(),
            node: "n0".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            labels: Labels::new(),
            probes: Default::default(),
        }
    }

    fn record(uid: &str, netns: &str, ips: &[&str]) -> PodNetwork {
        PodNetwork {
            uid: uid.into(),
            namespace: "ns".into(),
            name: "p".into(),
            netns: netns.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            container_id: "c".into(),
        }
    }

    #[test]
    fn records_supply_the_netns_and_addresses_of_starting_pods() {
        let mut cni = CniPods::default();
        let proc_found = PathBuf::from("/proc/9/ns/net");
        // Neither addresses nor a record: not yet.
        assert_eq!(merge(&cni, &pod("u", &[]), Some(&proc_found)), None);
        // Running without a record: the API's addresses, the located netns.
        let running = pod("u", &["198.18.0.5"]);
        let (netns, ips) = merge(&cni, &running, Some(&proc_found)).unwrap();
        assert_eq!((netns.as_path(), ips.len()), (proc_found.as_path(), 1));
        // A record wins, also while the API has no addresses yet.
        cni.pods
            .insert("u".into(), record("u", "/run/netns/a", &["198.18.240.7"]));
        for api in [pod("u", &[]), running.clone()] {
            let (netns, ips) = merge(&cni, &api, Some(&proc_found)).unwrap();
            assert_eq!(netns, Path::new("/run/netns/a"));
            assert_eq!(ips, ["198.18.240.7".parse::<IpAddr>().unwrap()]);
        }
        // Released by DEL: gone, even while the API still lists it.
        cni.pods.clear();
        cni.released.insert("u".into());
        assert_eq!(merge(&cni, &running, Some(&proc_found)), None);
    }
}
