//! The bounded outcome label of `ambit_service_connections_total`.

use crate::services::NoEndpoint;

/// What became of a captured connection to a Service's ClusterIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceOutcome {
    /// Sent to a ready endpoint.
    Endpoint,
    /// Refused: the service port has no ready endpoint.
    NoReadyEndpoint,
    /// Refused: the ClusterIP has no such TCP port.
    NoSuchPort,
    /// Refused: the endpoint is loopback or one of the agent's own ports.
    Loop,
}

impl ServiceOutcome {
    pub const ALL: [ServiceOutcome; 4] = [
        ServiceOutcome::Endpoint,
        ServiceOutcome::NoReadyEndpoint,
        ServiceOutcome::NoSuchPort,
        ServiceOutcome::Loop,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceOutcome::Endpoint => "endpoint",
            ServiceOutcome::NoReadyEndpoint => "no_ready_endpoint",
            ServiceOutcome::NoSuchPort => "no_such_port",
            ServiceOutcome::Loop => "loop",
        }
    }
}

impl From<NoEndpoint> for ServiceOutcome {
    fn from(why: NoEndpoint) -> Self {
        match why {
            NoEndpoint::NoneReady => ServiceOutcome::NoReadyEndpoint,
            NoEndpoint::NoSuchPort => ServiceOutcome::NoSuchPort,
        }
    }
}
