//! Stream accounting of one client connection: how many CONNECT streams
//! are open (or opening) on it, whether another fits under the peer's
//! limit, and whether it may still take new ones at all.

use std::sync::Arc;

use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    open: usize,
    /// Takes no new streams (idle-expired or closed).
    retired: bool,
}

/// Shared by the clones of one [`HboneClient`](super::HboneClient) and
/// its driver task. A `watch` rather than an atomic so the driver can wait
/// for the count to reach zero (idle expiry) without polling.
#[derive(Clone, Default)]
pub(crate) struct StreamCounter {
    usage: Arc<watch::Sender<Usage>>,
}

impl StreamCounter {
    /// A permit for one more stream if fewer than `limit` are open and the
    /// connection still takes streams.
    pub(crate) fn try_acquire(&self, limit: usize) -> Option<StreamPermit> {
        let acquired = self.usage.send_if_modified(|usage| {
            let fits = !usage.retired && usage.open < limit;
            if fits {
                usage.open += 1;
            }
            fits
        });
        acquired.then(|| self.permit())
    }

    /// A permit whatever the limit: past it, h2 itself queues the stream.
    pub(crate) fn acquire(&self) -> StreamPermit {
        self.usage.send_modify(|usage| usage.open += 1);
        self.permit()
    }

    fn permit(&self) -> StreamPermit {
        StreamPermit {
            usage: Arc::clone(&self.usage),
            released: None,
        }
    }

    pub(crate) fn open(&self) -> usize {
        self.usage.borrow().open
    }

    /// Retires the connection if no stream is open; `false` if one is, so
    /// a stream opened at the last moment is never cut.
    pub(crate) fn retire_if_idle(&self) -> bool {
        self.usage.send_if_modified(|usage| {
            let idle = usage.open == 0 && !usage.retired;
            usage.retired |= idle;
            idle
        })
    }

    /// No new streams from now on (the connection is closing).
    pub(crate) fn retire(&self) {
        self.usage.send_modify(|usage| usage.retired = true);
    }

    /// Resolves once no stream is open.
    pub(crate) async fn idle(&self) {
        let mut usage = self.usage.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = usage.wait_for(|usage| usage.open == 0).await;
    }

    /// Resolves once a stream is open.
    pub(crate) async fn busy(&self) {
        let mut usage = self.usage.subscribe();
        let _ = usage.wait_for(|usage| usage.open > 0).await;
    }
}

/// One open (or opening) stream on a connection; dropping it frees the
/// slot and wakes the callers waiting for one.
pub struct StreamPermit {
    usage: Arc<watch::Sender<Usage>>,
    /// Woken on release: the pool's waiters for a free stream slot.
    released: Option<Arc<Notify>>,
}

impl StreamPermit {
    pub(crate) fn notify_on_release(mut self, released: Arc<Notify>) -> Self {
        self.released = Some(released);
        self
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.usage.send_modify(|usage| usage.open -= 1);
        if let Some(released) = &self.released {
            released.notify_waiters();
        }
    }
}

impl std::fmt::Debug for StreamPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPermit").finish_non_exhaustive()
    }
}
