use std::collections::BTreeSet;

use super::*;

fn key(name: &str) -> (String, String) {
    ("shop".into(), name.into())
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn service(ips: &[&str], ports: &[(&str, u16)]) -> ServiceRecord {
    ServiceRecord {
        cluster_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        ports: ports
            .iter()
            .map(|(name, port)| ServicePort {
                name: (*name).into(),
                port: *port,
            })
            .collect(),
    }
}

fn endpoints(ports: &[(&str, &[&str])]) -> EndpointsRecord {
    EndpointsRecord {
        ready: ports
            .iter()
            .map(|(name, addrs)| ((*name).into(), addrs.iter().map(|a| addr(a)).collect()))
            .collect(),
    }
}

struct Cluster {
    services: BTreeMap<(String, String), ServiceRecord>,
    endpoints: BTreeMap<(String, String), EndpointsRecord>,
}

impl Cluster {
    fn table(&self, previous: &ServiceTable) -> ServiceTable {
        ServiceTable::build(&self.services, |k| self.endpoints.get(k), previous)
    }
}

fn web() -> Cluster {
    Cluster {
        services: [(
            key("web"),
            service(
                &["198.19.0.10", "fd00:a5b1:ffff::10"],
                &[("http", 80), ("metrics", 81)],
            ),
        )]
        .into(),
        // The named target port "http" resolved by the endpoints
        // controller to 9000 on the pods, under the service port's name.
        endpoints: [(
            key("web"),
            endpoints(&[
                ("metrics", &["198.18.1.10:9001", "198.18.1.11:9001"]),
                ("http", &["198.18.1.10:9000", "198.18.1.11:9000"]),
            ]),
        )]
        .into(),
    }
}

#[test]
fn a_service_port_maps_to_the_endpoint_port_of_the_same_name() {
    let table = web().table(&ServiceTable::default());
    let resolved = table.resolve(addr("198.19.0.10:80")).unwrap();
    assert_eq!(&*resolved.service, "shop/web");
    assert_eq!(resolved.cluster_addr, addr("198.19.0.10:80"));
    assert_eq!(resolved.endpoint.unwrap().port(), 9000);
    let metrics = table.resolve(addr("198.19.0.10:81")).unwrap();
    assert_eq!(metrics.endpoint.unwrap().port(), 9001);
    // Every ClusterIP of the service, and an IPv4 one seen through a
    // dual-stack socket.
    for dialled in ["[fd00:a5b1:ffff::10]:80", "[::ffff:198.19.0.10]:80"] {
        let resolved = table.resolve(addr(dialled)).unwrap();
        assert_eq!(resolved.endpoint.unwrap().port(), 9000, "{dialled}");
    }
    assert_eq!(
        table
            .resolve(addr("[::ffff:198.19.0.10]:80"))
            .unwrap()
            .cluster_addr,
        addr("198.19.0.10:80")
    );
    assert_eq!(table.len(), 4);
}

#[test]
fn connections_take_the_ready_endpoints_in_turn() {
    let table = web().table(&ServiceTable::default());
    let picks: Vec<SocketAddr> = (0..6)
        .map(|_| {
            table
                .resolve(addr("198.19.0.10:80"))
                .unwrap()
                .endpoint
                .unwrap()
        })
        .collect();
    let distinct: BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 2, "{picks:?}");
    for pair in picks.windows(2) {
        assert_ne!(pair[0], pair[1], "round-robin alternates: {picks:?}");
    }
}

#[test]
fn a_rebuild_continues_the_turn_instead_of_starting_over() {
    let cluster = web();
    let mut table = cluster.table(&ServiceTable::default());
    let mut picks = Vec::new();
    for _ in 0..10 {
        picks.push(table.resolve(addr("198.19.0.10:80")).unwrap().endpoint);
        table = cluster.table(&table);
    }
    // Starting afresh at a random endpoint each time would repeat one.
    for pair in picks.windows(2) {
        assert_ne!(pair[0], pair[1], "{picks:?}");
    }
}

#[test]
fn no_ready_endpoint_and_a_missing_port_are_told_apart() {
    let mut cluster = web();
    cluster
        .services
        .insert(key("empty"), service(&["198.19.0.11"], &[("", 80)]));
    cluster
        .services
        .insert(key("gone"), service(&["198.19.0.12"], &[("", 80)]));
    // Endpoints exist but list no port of that name (e.g. only not-ready
    // addresses, which are never kept).
    cluster
        .endpoints
        .insert(key("empty"), EndpointsRecord::default());
    let table = cluster.table(&ServiceTable::default());
    for (dialled, service, why) in [
        ("198.19.0.11:80", "shop/empty", NoEndpoint::NoneReady),
        ("198.19.0.12:80", "shop/gone", NoEndpoint::NoneReady),
        ("198.19.0.10:8080", "shop/web", NoEndpoint::NoSuchPort),
    ] {
        let resolved = table.resolve(addr(dialled)).unwrap();
        assert_eq!(&*resolved.service, service);
        assert_eq!(resolved.endpoint, Err(why), "{dialled}");
    }
}

#[test]
fn addresses_that_are_not_cluster_ips_are_not_services() {
    let table = web().table(&ServiceTable::default());
    for dialled in ["198.18.1.10:9000", "198.19.0.99:80", "[fd00:a5b1::10]:80"] {
        assert_eq!(table.resolve(addr(dialled)), None, "{dialled}");
    }
    assert!(ServiceTable::default().is_empty());
}
