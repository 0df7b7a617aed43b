//! A client's first bytes, sent behind its CONNECT before the peer answers.
//!
//! Waiting for the peer's answer before relaying anything costs a client
//! that speaks first (HTTP, a TLS ClientHello) a round trip through both
//! agents on every new connection. RFC 9113 §8.5 lets a CONNECT's DATA
//! follow its HEADERS at once, so while the answer is awaited, what the
//! client writes is sent as it comes, up to [`EARLY_MAX`]; what was already
//! written when the stream opened leaves in the same write as the request.
//! The bytes reach only the authenticated peer, whose policy decides before
//! any of them is relayed; a refused stream discards them, as a refused
//! connection would.

use std::{
    io,
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::SendStream;

/// Most bytes sent before the peer answers: a client's first flight fits;
/// the rest follows once the stream is open.
pub const EARLY_MAX: usize = 16 * 1024;

/// Where a client's early bytes come from (the application's socket).
pub trait EarlySource {
    /// Ready with at most `max` (> 0) bytes the client wrote, or with none
    /// at its EOF; pending while it has written nothing new.
    fn poll_early(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>>;
}

/// A source that never has early bytes: the stream waits for the answer.
pub(crate) struct NoEarly;

impl EarlySource for NoEarly {
    fn poll_early(&mut self, _: &mut Context<'_>, _: usize) -> Poll<io::Result<Bytes>> {
        // The response future registers the waker; this never wakes.
        Poll::Pending
    }
}

/// What happened to a client's early bytes: the relay starts from here.
#[derive(Debug, Default)]
pub struct Early {
    /// Handed to the stream: counted as relayed.
    pub sent: u64,
    /// Reading from the client failed; the connection should end with it.
    pub error: Option<io::Error>,
    /// The client's EOF was read (the relay reads it again).
    eof: bool,
}

impl Early {
    /// Reads what `source` has and hands it to the stream, until the source
    /// has nothing new, [`EARLY_MAX`] bytes went, or the source ended or
    /// failed. Never waits.
    ///
    /// h2 holds the bytes until the stream opens (its connection task opens
    /// it, and sends its HEADERS, when it next runs) and the peer's window
    /// takes them: at most [`EARLY_MAX`], where a relay waits for window
    /// before it reads more.
    pub(crate) fn pump(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut impl EarlySource,
        send: &mut SendStream<Bytes>,
    ) -> Result<(), h2::Error> {
        while !self.eof && self.error.is_none() && self.sent < EARLY_MAX as u64 {
            let max = EARLY_MAX - usize::try_from(self.sent).unwrap_or(EARLY_MAX);
            match source.poll_early(cx, max) {
                Poll::Pending => break,
                Poll::Ready(Ok(bytes)) if bytes.is_empty() => self.eof = true,
                Poll::Ready(Ok(bytes)) => {
                    self.sent += bytes.len() as u64;
                    send.send_data(bytes, false)?;
                }
                Poll::Ready(Err(e)) => self.error = Some(e),
            }
        }
        Ok(())
    }
}
