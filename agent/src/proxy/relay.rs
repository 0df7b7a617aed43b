//! Byte relay between two established streams.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};

/// 64 KiB buffers, one each way: large enough to keep a loopback stream
/// busy, but 128 KiB per connection on each agent is not small for
/// thousands of idle connections (buffers that start small and grow are the
/// performance issue's).
const BUFFER: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Bytes from the connection's initiator to its destination.
    pub sent: u64,
    /// Bytes from the destination back to the initiator.
    pub received: u64,
    pub duration: Duration,
}

/// Copies both ways until both directions are closed, propagating half-closes.
pub async fn relay<A, B>(downstream: &mut A, upstream: &mut B) -> (RelayStats, std::io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let started = Instant::now();
    match copy_bidirectional_with_sizes(downstream, upstream, BUFFER, BUFFER).await {
        Ok((sent, received)) => (
            RelayStats {
                sent,
                received,
                duration: started.elapsed(),
            },
            Ok(()),
        ),
        Err(e) => (
            RelayStats {
                duration: started.elapsed(),
                ..RelayStats::default()
            },
            Err(e),
        ),
    }
}
