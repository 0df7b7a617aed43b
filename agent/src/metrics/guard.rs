//! RAII accounting of `ambit_connections_active`.

use prometheus::IntGauge;

/// Counts one connection in `ambit_connections_active` for as long as it
/// lives, so every exit path of a connection task (error, panic unwinding,
/// cancellation) gives the slot back.
#[must_use = "the connection is counted only while the guard is alive"]
#[derive(Debug)]
pub struct ActiveConnection {
    gauge: IntGauge,
}

impl ActiveConnection {
    pub(super) fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        ActiveConnection { gauge }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
