//! The Kubernetes workload source's watches: how often they failed and how
//! often they had to start again.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Counters of one watch (`resource` label), handed to its watch loop.
#[derive(Clone)]
pub struct WatchMetrics {
    pub restarts: IntCounter,
    pub errors: IntCounter,
}

/// Registered on the agent's registry; one [`WatchMetrics`] per watched
/// resource.
pub struct KubernetesMetrics {
    restarts: IntCounterVec,
    errors: IntCounterVec,
}

impl KubernetesMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let restarts = IntCounterVec::new(
            Opts::new(
                "ambit_kubernetes_watch_restarts_total",
                "Kubernetes watches that started again: resumed after a failure, or re-listed.",
            ),
            &["resource"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "ambit_kubernetes_watch_errors_total",
                "Errors of Kubernetes watches (each followed by a retry with backoff).",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self { restarts, errors })
    }

    /// The counters of `resource` (a fixed name per watch), created at zero
    /// so they are exported before anything happens.
    pub fn watch(&self, resource: &str) -> WatchMetrics {
        WatchMetrics {
            restarts: self.restarts.with_label_values(&[resource]),
            errors: self.errors.with_label_values(&[resource]),
        }
    }
}
