//! The nftables ruleset `ambit sidecar-init` installs in a pod's network
//! namespace, as text for `nft -f -` (one transaction: the pod is never
//! half captured).
//!
//! * output: TCP the pod opens goes to the sidecar's outbound listener,
//!   except the sidecar's own (by socket mark or uid) and loopback.
//! * prerouting: TCP arriving for any port goes to the inbound plaintext
//!   listener, except the tunnel port (mTLS from the mesh lands on the
//!   sidecar directly) and ports the operator excludes.
//!
//! Only NEW connections meet NAT rules, so replies and the sidecar's own
//! connections to the application (which loop back through prerouting)
//! are never redirected again. Conntrack keeps each original destination,
//! which the sidecar reads back with SO_ORIGINAL_DST.

use std::fmt::Write as _;

use ambit_common::{INBOUND_CAPTURE_PORT, TUNNEL_PORT};

/// The table, in family `inet` (IPv4 and IPv6 alike).
pub const TABLE: &str = "ambit_sidecar";

/// How the sidecar's own connections are told apart from the application's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyExemption {
    /// SO_MARK on every socket of the sidecar (it needs CAP_NET_ADMIN).
    Mark(u32),
    /// The uid the sidecar runs as (and the application never does).
    Uid(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectRules {
    pub exemption: ProxyExemption,
    pub outbound_port: u16,
    /// Inbound ports left alone (besides the tunnel port).
    pub exclude_inbound_ports: Vec<u16>,
}

impl RedirectRules {
    /// The script that replaces any previous table with these rules.
    pub fn install_script(&self) -> String {
        let exempt = match self.exemption {
            ProxyExemption::Mark(mark) => format!("meta mark {mark:#x} return"),
            ProxyExemption::Uid(uid) => format!("meta skuid {uid} return"),
        };
        let mut inbound_exempt = vec![TUNNEL_PORT];
        inbound_exempt.extend(&self.exclude_inbound_ports);
        inbound_exempt.sort_unstable();
        inbound_exempt.dedup();
        let inbound_exempt = inbound_exempt
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let mut script = remove_script();
        let _ = write!(
            script,
            "table inet {TABLE} {{\n\
             \tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\t{exempt}\n\
             \t\tip daddr 127.0.0.0/8 return\n\
             \t\tip6 daddr ::1 return\n\
             \t\tmeta l4proto tcp redirect to :{outbound}\n\
             \t}}\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\ttcp dport {{ {inbound_exempt} }} return\n\
             \t\tmeta l4proto tcp redirect to :{inbound}\n\
             \t}}\n\
             }}\n",
            outbound = self.outbound_port,
            inbound = INBOUND_CAPTURE_PORT,
        );
        script
    }
}

/// Deletes the table, whether or not it exists (declaring it first makes
/// the delete valid either way).
pub fn remove_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(exemption: ProxyExemption, exclude: &[u16]) -> RedirectRules {
        RedirectRules {
            exemption,
            outbound_port: 15001,
            exclude_inbound_ports: exclude.to_vec(),
        }
    }

    /// The chains' rule lines, trimmed.
    fn chain<'a>(script: &'a str, name: &str) -> Vec<&'a str> {
        script
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != format!("chain {name} {{"))
            .skip(1)
            .take_while(|l| *l != "}")
            .collect()
    }

    #[test]
    fn outbound_exempts_the_proxy_by_mark_and_loopback_then_redirects() {
        let script = rules(ProxyExemption::Mark(0x0a3b), &[]).install_script();
        assert_eq!(
            chain(&script, "output"),
            [
                "type nat hook output priority -100; policy accept;",
                "meta mark 0xa3b return",
                "ip daddr 127.0.0.0/8 return",
                "ip6 daddr ::1 return",
                "meta l4proto tcp redirect to :15001",
            ]
        );
    }

    #[test]
    fn a_uid_exemption_replaces_the_mark() {
        let script = rules(ProxyExemption::Uid(1337), &[]).install_script();
        let output = chain(&script, "output");
        assert!(output.contains(&"meta skuid 1337 return"), "{output:?}");
        assert!(!script.contains("meta mark"), "{script}");
    }

    #[test]
    fn inbound_leaves_the_tunnel_and_excluded_ports_alone() {
        let script = rules(ProxyExemption::Mark(1), &[9090, 15008, 22]).install_script();
        assert_eq!(
            chain(&script, "prerouting"),
            [
                "type nat hook prerouting priority -100; policy accept;",
                "tcp dport { 22, 9090, 15008 } return",
                "meta l4proto tcp redirect to :15006",
            ]
        );
    }

    #[test]
    fn install_replaces_a_previous_table_in_the_same_transaction() {
        let script = rules(ProxyExemption::Mark(1), &[]).install_script();
        assert!(
            script.starts_with(
                "table inet ambit_sidecar\ndelete table inet ambit_sidecar\ntable inet ambit_sidecar {"
            ),
            "{script}"
        );
        assert_eq!(script.matches("redirect").count(), 2);
    }
}
