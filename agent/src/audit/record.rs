//! One audit record: the schema of a line of the audit log (DESIGN §3).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::timestamp;

/// What happened: a policy decision on a new connection, or its close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Decision,
    Close,
}

/// Which side of the node the connection belongs to: `inbound` is towards a
/// workload on this node, `outbound` leaves a workload on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    /// The lower-case name used in audit records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The policy verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    pub const ALL: [Decision; 2] = [Decision::Allow, Decision::Deny];

    /// The lower-case name used in audit records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// The client side of the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The verified peer SPIFFE ID; absent for plaintext clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Client IP and port.
    pub address: SocketAddr,
}

/// The server side of the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// `namespace/name` of the destination workload when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    pub address: IpAddr,
    pub port: u16,
}

/// One line of the audit log.
///
/// Field order is the order of the JSON members on disk and is part of the
/// hashed bytes: do not reorder fields without a format version bump.
/// `seq`, `prev_hash`, `hash` and `node` are owned by the writer
/// ([`super::AuditLog`]) and overwritten when the record is written, so
/// callers leave them at their defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, 0 for the first record of a new chain.
    pub seq: u64,
    /// Hex SHA-256 of the previous record's line (without its newline), or
    /// [`super::GENESIS_HASH`] for `seq` 0.
    pub prev_hash: String,
    /// RFC 3339 UTC with microseconds, taken when the event happened.
    pub time: String,
    pub node: String,
    pub event: Event,
    pub direction: Direction,
    pub source: Source,
    pub destination: Destination,
    pub decision: Decision,
    /// `namespace/name` of the policy that decided, if any (absent when the
    /// mesh-wide default decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Index of the matching rule inside `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    pub reason: String,
    /// Bytes from client to server (close events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// Bytes from server to client (close events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// Connection lifetime (close events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// e.g. `TLSv1.3`; absent for plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    /// Serial number of the peer certificate, lower-case hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_cert_serial: Option<String>,
    /// Hex SHA-256 of this line without this member (see [`super`] docs).
    /// Empty until sealed; an empty hash is not serialized, which is how the
    /// hashed bytes are produced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditRecord {
    /// A record stamped with the current time; optional fields empty and
    /// chain fields left for the writer.
    pub fn new(
        event: Event,
        direction: Direction,
        source: Source,
        destination: Destination,
        decision: Decision,
        reason: impl Into<String>,
    ) -> Self {
        AuditRecord {
            seq: 0,
            prev_hash: String::new(),
            time: timestamp::now_rfc3339(),
            node: String::new(),
            event,
            direction,
            source,
            destination,
            decision,
            policy: None,
            rule: None,
            reason: reason.into(),
            bytes_sent: None,
            bytes_received: None,
            duration_ms: None,
            tls_version: None,
            peer_cert_serial: None,
            hash: String::new(),
        }
    }
}
