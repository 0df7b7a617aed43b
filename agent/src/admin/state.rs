//! What the admin server shows: a trait the agent implements, and a simple
//! settable implementation.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::Metrics;

/// The agent as the admin endpoints see it. Methods are called on the
/// runtime for each request, so they should only read prepared state.
pub trait AdminState: Send + Sync + 'static {
    /// The `/metrics` body in the Prometheus text format. An implementation
    /// can refresh pulled values (e.g. [`Metrics::sync_audit_dropped`])
    /// before encoding.
    fn metrics(&self) -> String;

    /// `Ok` once the identities and the policy are loaded; otherwise why not,
    /// for the `/readyz` body.
    fn ready(&self) -> Result<(), String>;

    /// The `/config_dump` document: workloads, policies and certificates —
    /// never private keys.
    fn config_dump(&self) -> Value;

    /// The certificates (SVIDs) this node holds, for `/certs`.
    fn certs(&self) -> Vec<CertInfo>;
}

/// One entry of `/certs`. Only public certificate fields exist here, so a
/// key cannot end up in the output by accident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub spiffe_id: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// RFC 3339 UTC.
    pub not_before: String,
    /// RFC 3339 UTC.
    pub not_after: String,
}

/// An [`AdminState`] whose answers are set from outside: for tests, and for
/// wiring the admin server before the agent has its own implementation.
/// Starts not ready.
pub struct StaticState {
    metrics: Arc<Metrics>,
    readiness: Mutex<Result<(), String>>,
    config: Mutex<Value>,
    certs: Mutex<Vec<CertInfo>>,
}

impl StaticState {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        StaticState {
            metrics,
            readiness: Mutex::new(Err("starting".to_owned())),
            config: Mutex::new(Value::Object(Default::default())),
            certs: Mutex::default(),
        }
    }

    pub fn set_ready(&self) {
        *lock(&self.readiness) = Ok(());
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *lock(&self.readiness) = Err(reason.into());
    }

    pub fn set_config_dump(&self, config: Value) {
        *lock(&self.config) = config;
    }

    pub fn set_certs(&self, certs: Vec<CertInfo>) {
        *lock(&self.certs) = certs;
    }
}

impl AdminState for StaticState {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn ready(&self) -> Result<(), String> {
        lock(&self.readiness).clone()
    }

    fn config_dump(&self) -> Value {
        lock(&self.config).clone()
    }

    fn certs(&self) -> Vec<CertInfo> {
        lock(&self.certs).clone()
    }
}

/// The values are replaced whole, so one left by a panicking writer is
/// still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
