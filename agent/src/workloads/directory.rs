//! Who is at a destination address: the mesh workloads of every node, by
//! IP, with the SPIFFE ID the tunnel must find in the peer's certificate.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::NodeWorkloads;
use crate::identity::{SpiffeId, TrustDomain};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `namespace/name`.
    pub workload: String,
    pub spiffe_id: SpiffeId,
    pub node: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directory {
    by_ip: HashMap<IpAddr, Arc<Destination>>,
}

impl Directory {
    /// Workloads whose names do not form a valid SPIFFE ID are left out (and
    /// logged): traffic to them is not tunnelled, and the CA would refuse
    /// them an SVID anyway.
    pub fn build(workloads: &NodeWorkloads, trust_domain: &TrustDomain) -> Self {
        let mut by_ip = HashMap::new();
        for w in workloads.in_mesh() {
            let spiffe_id = match SpiffeId::kubernetes(
                trust_domain,
                &w.namespace,
                &w.service_account,
            ) {
                Ok(id) => id,
                Err(e) => {
                    tracing::error!(workload = %w.id(), error = %e,
                            "workload has no valid SPIFFE ID; it is left out of the mesh directory");
                    continue;
                }
            };
            let destination = Arc::new(Destination {
                workload: w.id(),
                spiffe_id,
                node: w.node.clone(),
            });
            for ip in &w.ips {
                by_ip.insert(*ip, Arc::clone(&destination));
            }
        }
        Self { by_ip }
    }

    /// How many addresses it knows.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Destination>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.by_ip.get(&ip).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::file::parse;

    #[test]
    fn maps_every_address_of_mesh_workloads_on_all_nodes() {
        let text = r#"
node: n1
workloads:
  - { name: a, namespace: ns, serviceAccount: sa-a, netns: /x, node: n1,
      labels: { ambit.dev/mesh: enabled }, ips: [198.18.0.10, "fd00:a5b1::a"] }
  - { name: b, namespace: ns, serviceAccount: sa-b, netns: /y, node: n2,
      labels: { ambit.dev/mesh: enabled }, ips: [198.18.1.10] }
  - { name: c, namespace: ns, serviceAccount: sa-c, netns: /z, node: n1,
      labels: { ambit.dev/mesh: disabled }, ips: [198.18.0.12] }
"#;
        let td = TrustDomain::new("cluster.local").unwrap();
        let dir = Directory::build(&parse(text).unwrap(), &td);
        let b = dir.lookup("198.18.1.10".parse().unwrap()).unwrap();
        assert_eq!(b.spiffe_id.as_str(), "spiffe://cluster.local/ns/ns/sa/sa-b");
        assert_eq!(b.node.as_deref(), Some("n2"));
        let a6 = dir.lookup("fd00:a5b1::a".parse().unwrap()).unwrap();
        assert_eq!(a6.workload, "ns/a");
        let mapped = dir.lookup("::ffff:198.18.0.10".parse().unwrap()).unwrap();
        assert_eq!(mapped.workload, "ns/a");
        assert!(
            dir.lookup("198.18.0.12".parse().unwrap()).is_none(),
            "not in the mesh"
        );
    }
}
