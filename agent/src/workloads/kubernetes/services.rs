//! Services and their Endpoints, cluster-wide, reduced at once to what
//! ClusterIP resolution needs ([`crate::services`]): ClusterIPs and TCP
//! ports of each Service, ready addresses by port name of each Endpoints.
//! Both sets grow with the cluster, so nothing else of the objects is kept.
//!
//! core/v1 Endpoints rather than EndpointSlices: the oldest API servers the
//! agent supports (1.20, as in the e2e tests) serve EndpointSlice only as
//! `discovery.k8s.io/v1beta1`, while core/v1 Endpoints is served by every
//! version. Since Kubernetes 1.22 an Endpoints object is cut at 1000
//! addresses (slices are not): a larger service is spread over those 1000.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::watch;

use super::{Health, Watched, store::Reduced, watched};
use crate::{
    metrics::KubernetesMetrics,
    services::{EndpointsRecord, ServicePort, ServiceRecord, ServiceTable},
};

/// What the services watch hands the proxy: the current table, and whether
/// it is complete yet (both watches listed once).
pub struct ServiceFeed {
    pub table: watch::Receiver<Arc<ServiceTable>>,
    pub synced: watch::Receiver<bool>,
}

/// Starts the Service and Endpoints watches and returns at once; a table is
/// published from the first complete list of both on.
pub fn watch(client: &Client, metrics: &KubernetesMetrics) -> ServiceFeed {
    let (table_tx, table) = watch::channel(Arc::new(ServiceTable::default()));
    let (synced_tx, synced) = watch::channel(false);
    let streams = (
        watched(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
        watched(
            Api::<Endpoints>::all(client.clone()),
            watcher::Config::default(),
        ),
    );
    let health = [
        Health::new("services", metrics.watch("services")),
        Health::new("endpoints", metrics.watch("endpoints")),
    ];
    tokio::spawn(run(streams, health, table_tx, synced_tx));
    ServiceFeed { table, synced }
}

async fn run(
    (mut services, mut endpoints): (Watched<Service>, Watched<Endpoints>),
    [mut service_health, mut endpoints_health]: [Health; 2],
    table: watch::Sender<Arc<ServiceTable>>,
    synced: watch::Sender<bool>,
) {
    let mut service_records: Reduced<ServiceRecord> = Reduced::default();
    let mut endpoint_records: Reduced<EndpointsRecord> = Reduced::default();
    loop {
        let changed = tokio::select! {
            Some(item) = services.next() => service_health
                .observe(item)
                .is_some_and(|event| service_records.apply(event, reduce_service)),
            Some(item) = endpoints.next() => endpoints_health
                .observe(item)
                .is_some_and(|event| endpoint_records.apply(event, reduce_endpoints)),
            else => break,
        };
        if !(service_records.synced() && endpoint_records.synced()) {
            continue;
        }
        if changed {
            let previous = Arc::clone(&table.borrow());
            let next = ServiceTable::build(
                service_records.iter(),
                |key| endpoint_records.get(key),
                &previous,
            );
            table.send_replace(Arc::new(next));
        }
        if !*synced.borrow() {
            tracing::info!(
                services = service_records.len(),
                endpoints = endpoint_records.len(),
                service_ports = table.borrow().len(),
                "initial sync of services done"
            );
            synced.send_replace(true);
        }
        if table.is_closed() {
            break;
        }
    }
}

/// True once every one of `parts` is.
pub fn all_synced(parts: Vec<watch::Receiver<bool>>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        for mut part in parts {
            if part.wait_for(|synced| *synced).await.is_err() {
                // A source that stopped before its first sync: never ready.
                return;
            }
        }
        tx.send_replace(true);
        // Kept open so receivers can still wait on it.
        tx.closed().await;
    });
    rx
}

/// The agent captures TCP only; a port without a protocol is TCP.
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// `None` for services with nothing to resolve: headless ones (no
/// ClusterIP: their pods are dialled directly), ExternalName ones, and
/// those without a TCP port.
pub fn reduce_service(service: &Service) -> Option<ServiceRecord> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    // "None" (headless) and "" do not parse.
    let mut cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.as_ref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect();
    (!cluster_ips.is_empty() && !ports.is_empty()).then_some(ServiceRecord { cluster_ips, ports })
}

/// `None` when no address is ready on any TCP port.
pub fn reduce_endpoints(endpoints: &Endpoints) -> Option<EndpointsRecord> {
    let mut ready: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for subset in endpoints.subsets.iter().flatten() {
        // `notReadyAddresses` are left out: they get no traffic.
        let addresses: Vec<IpAddr> = subset
            .addresses
            .iter()
            .flatten()
            .filter_map(|a| a.ip.parse().ok())
            .collect();
        for port in subset.ports.iter().flatten() {
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            if !is_tcp(port.protocol.as_deref()) || addresses.is_empty() {
                continue;
            }
            ready
                .entry(port.name.clone().unwrap_or_default())
                .or_default()
                .extend(addresses.iter().map(|ip| SocketAddr::new(*ip, number)));
        }
    }
    let ready: BTreeMap<String, Arc<[SocketAddr]>> = ready
        .into_iter()
        .map(|(name, mut addrs)| {
            // Sorted, so the turn order does not change when the API
            // server lists the same addresses in another order.
            addrs.sort();
            addrs.dedup();
            (name, addrs.into())
        })
        .collect();
    (!ready.is_empty()).then_some(EndpointsRecord { ready })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            EndpointAddress, EndpointPort, EndpointSubset, ServicePort as K8sServicePort,
            ServiceSpec,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::*;

    fn service(type_: &str, cluster_ip: &str, ports: &[(&str, i32, &str)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: Some(cluster_ip.into()),
                cluster_ips: Some(vec![cluster_ip.into(), "fd00:a5b1:ffff::10".into()]),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, protocol)| K8sServicePort {
                            name: Some((*name).into()),
                            port: *port,
                            protocol: Some((*protocol).into()),
                            target_port: Some(IntOrString::String("http".into())),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn services_keep_their_cluster_ips_and_tcp_ports_only() {
        let record = reduce_service(&service(
            "ClusterIP",
            "198.19.0.10",
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ))
        .unwrap();
        assert_eq!(
            record.cluster_ips,
            [
                "198.19.0.10".parse::<IpAddr>().unwrap(),
                "fd00:a5b1:ffff::10".parse().unwrap()
            ]
        );
        assert_eq!(
            record.ports,
            [ServicePort {
                name: "http".into(),
                port: 80
            }]
        );
        // NodePort and LoadBalancer services have a ClusterIP too.
        assert!(reduce_service(&service("NodePort", "198.19.0.11", &[("", 80, "TCP")])).is_some());
        let mut headless = service("ClusterIP", "None", &[("http", 80, "TCP")]);
        headless.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        for skipped in [
            headless,
            service("ExternalName", "", &[("http", 80, "TCP")]),
            service("ClusterIP", "198.19.0.12", &[("dns", 53, "UDP")]),
        ] {
            assert_eq!(reduce_service(&skipped), None, "{skipped:?}");
        }
    }

    fn subset(ready: &[&str], not_ready: &[&str], ports: &[(&str, i32, &str)]) -> EndpointSubset {
        let addresses = |ips: &[&str]| {
            Some(
                ips.iter()
                    .map(|ip| EndpointAddress {
                        ip: (*ip).into(),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        EndpointSubset {
            addresses: addresses(ready),
            not_ready_addresses: addresses(not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name: Some((*name).into()),
                        port: *port,
                        protocol: Some((*protocol).into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    #[tokio::test]
    async fn synced_only_once_every_part_is() {
        let (pods, pods_rx) = watch::channel(false);
        let (services, services_rx) = watch::channel(false);
        let mut all = all_synced(vec![pods_rx, services_rx]);
        services.send_replace(true);
        tokio::task::yield_now().await;
        assert!(!*all.borrow());
        pods.send_replace(true);
        all.wait_for(|synced| *synced).await.unwrap();
    }

    #[test]
    fn endpoints_keep_ready_addresses_by_port_name() {
        let endpoints = Endpoints {
            subsets: Some(vec![
                subset(
                    &["198.18.1.11", "198.18.1.10"],
                    &["198.18.1.12"],
                    &[("http", 9000, "TCP"), ("dns", 53, "UDP")],
                ),
                // Another subset (other pods whose named port resolved to
                // another number) adds to the same name.
                subset(&["198.18.0.10"], &[], &[("http", 9080, "TCP")]),
            ]),
            ..Default::default()
        };
        let record = reduce_endpoints(&endpoints).unwrap();
        let http: Vec<String> = record.ready["http"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            http,
            ["198.18.0.10:9080", "198.18.1.10:9000", "198.18.1.11:9000"]
        );
        assert_eq!(record.ready.len(), 1, "UDP is not kept: {record:?}");

        let none_ready = Endpoints {
            subsets: Some(vec![subset(
                &[],
                &["198.18.1.12"],
                &[("http", 9000, "TCP")],
            )]),
            ..Default::default()
        };
        assert_eq!(reduce_endpoints(&none_ready), None);
    }
}
