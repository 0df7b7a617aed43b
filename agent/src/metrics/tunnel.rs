//! Pooled tunnel connections: how many are open, and how many ended
//! because the peer went silent or they sat idle.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::tunnel::{CloseReason, PoolObserver};

/// Registered on the agent's registry and handed to the tunnel pool, which
/// reports every connection it opens and closes.
pub struct TunnelMetrics {
    connections: IntGauge,
    /// `[closed, dead, idle]`, in [`REASONS`] order.
    closed: [IntCounter; 3],
}

const REASONS: [CloseReason; 3] = [CloseReason::Closed, CloseReason::Dead, CloseReason::Idle];

fn label(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::Closed => "closed",
        CloseReason::Dead => "dead",
        CloseReason::Idle => "idle",
    }
}

impl TunnelMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let connections = IntGauge::new(
            "ambit_tunnel_connections",
            "Outbound tunnel (HBONE) connections opened by the pool and still open.",
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "ambit_tunnel_connections_closed_total",
                "Pooled tunnel connections ended: dead = the peer stopped answering PINGs, \
                 idle = no stream for the idle timeout, closed = anything else.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(Self {
            connections,
            closed: REASONS.map(|reason| closed.with_label_values(&[label(reason)])),
        })
    }
}

impl PoolObserver for TunnelMetrics {
    fn connection_opened(&self) {
        self.connections.inc();
    }

    fn connection_closed(&self, reason: CloseReason) {
        self.connections.dec();
        let index = REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        self.closed[index].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, test_support::value};

    #[test]
    fn gauge_follows_connections_and_closes_count_by_reason() {
        let metrics = Metrics::new();
        let tunnel = TunnelMetrics::register(metrics.registry()).expect("register");
        tunnel.connection_opened();
        tunnel.connection_opened();
        tunnel.connection_closed(CloseReason::Dead);
        tunnel.connection_opened();
        tunnel.connection_closed(CloseReason::Idle);
        let text = metrics.encode();
        assert_eq!(value(&text, "ambit_tunnel_connections", &[]), Some(1.0));
        for (reason, expected) in [("dead", 1.0), ("idle", 1.0), ("closed", 0.0)] {
            assert_eq!(
                value(
                    &text,
                    "ambit_tunnel_connections_closed_total",
                    &[("reason", reason)]
                ),
                Some(expected),
                "{reason}"
            );
        }
    }
}
