//! One audit record: the schema of a line of the audit log (docs/architecture.md, "Policy, audit, metrics").

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::timestamp;

/// What happened: a policy decision on a new connection, its close, a
/// summary of unauthenticated failures not recorded one by one, or a note
/// that rotation deleted the oldest audit file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Decision,
    Close,
    /// `suppressed` records this many sourceless refusals from one source
    /// (see [`super::LimiterConfig`]).
    Suppressed,
    /// Rotation deleted the oldest generation; `anchor_seq` and `anchor`
    /// name where the retained set now starts.
    Rotated,
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

/// The Kubernetes Service an outbound connection was made to: what the
/// application dialled, before the agent picked an endpoint (the record's
/// `destination`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// `namespace/name`.
    pub name: String,
    /// The ClusterIP and service port dialled.
    pub address: IpAddr,
    pub port: u16,
}

/// One line of the audit log.
///
/// Field order is the order of the JSON members on disk and is part of the
/// hashed bytes: do not reorder fields without a format version bump.
/// `seq`, `prev_hash`, `hash`, `node` and `dropped_before` are owned by the
/// writer ([`super::AuditLog`]) and overwritten when the record is written,
/// so callers leave them at their defaults.
///
/// Members added after the first release are optional and skipped when
/// absent, so lines written before them keep their exact bytes and hashes
/// (connection members are absent only on `rotated` notes).
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// Connections to a Service ClusterIP: the service dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
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
    /// Records lost between the previous line and this one (the writer's
    /// queue was full or a write failed): the gap shows in the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_before: Option<u64>,
    /// Sourceless refusals from this source that were counted instead of
    /// recorded one by one (`suppressed` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// Time of the first and the last of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<String>,
    /// `rotated` notes: `seq` of the first record rotation kept, and that
    /// record's `prev_hash` (the hash of the last line deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
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
            direction: Some(direction),
            source: Some(source),
            destination: Some(destination),
            decision: Some(decision),
            ..Self::bare(event, reason.into())
        }
    }

    /// A note that rotation deleted the oldest generation and the retained
    /// set starts at `anchor_seq`, whose `prev_hash` is `anchor`.
    pub fn rotated(anchor_seq: u64, anchor: String) -> Self {
        let reason = format!(
            "rotation deleted the oldest audit file; the retained files start at seq {anchor_seq}"
        );
        AuditRecord {
            anchor_seq: Some(anchor_seq),
            anchor: Some(anchor),
            ..Self::bare(Event::Rotated, reason)
        }
    }

    /// `event` now, every other member absent.
    fn bare(event: Event, reason: String) -> Self {
        AuditRecord {
            seq: 0,
            prev_hash: String::new(),
            time: timestamp::now_rfc3339(),
            node: String::new(),
            event,
            direction: None,
            source: None,
            destination: None,
            service: None,
            decision: None,
            policy: None,
            rule: None,
            reason,
            bytes_sent: None,
            bytes_received: None,
            duration_ms: None,
            tls_version: None,
            peer_cert_serial: None,
            dropped_before: None,
            suppressed: None,
            first_time: None,
            last_time: None,
            anchor_seq: None,
            anchor: None,
            hash: String::new(),
        }
    }
}
