//! Noticing a peer that vanished without closing: an HTTP/2 PING on a
//! timer, and a deadline for its answer. TCP alone only notices after
//! minutes of retransmissions, and not at all while nothing is sent.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Pings every `interval` and resolves when a PING stays unanswered for
/// `timeout`. Never resolves while the peer answers, nor once the
/// connection fails for another reason (its driver reports that).
///
/// The pongs arrive through the connection, so whoever awaits this must
/// keep driving the connection at the same time.
pub(crate) async fn unanswered_ping(mut pings: PingPong, interval: Duration, timeout: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match tokio::time::timeout(timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection is gone: not a liveness verdict.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
