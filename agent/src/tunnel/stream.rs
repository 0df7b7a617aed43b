//! One tunnelled connection: an HTTP/2 CONNECT stream as a byte stream.

use std::{
    fmt, io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use super::usage::StreamPermit;

/// Largest chunk one `poll_write` or `poll_send` hands to h2. Bounds
/// `poll_write`'s copy into a `Bytes` and keeps one stream from claiming
/// the whole connection window in a single reservation.
const MAX_WRITE: usize = 64 * 1024;

/// An accepted HBONE stream, usable wherever a TCP stream is (for example
/// with `tokio::io::copy_bidirectional`).
///
/// - Reads return data as the peer sends it and end (`Ok(0)`) at the peer's
///   END_STREAM. Receive window is given back only as data is read, so a
///   slow reader slows the sender instead of buffering.
/// - Writes wait for send window, so nothing is buffered beyond it.
/// - `shutdown` sends END_STREAM: the peer reads EOF, and this side can
///   still read (TCP half-close).
/// - A reset stream or a failed connection is an `io::Error`:
///   `ConnectionReset` when reading, `BrokenPipe` when writing.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received data not yet read by the caller. Its window is still
    /// counted as used.
    unread: Bytes,
    /// END_STREAM was sent; later writes fail rather than wait on h2.
    write_closed: bool,
    /// The client connection's stream slot, freed when this is dropped.
    _permit: Option<StreamPermit>,
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            write_closed: false,
            _permit: None,
        }
    }

    /// Keeps `permit` (one of the connection's stream slots) until dropped.
    pub(crate) fn holding(mut self, permit: StreamPermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Why the send side can no longer be written, as a write error.
    fn send_closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("HBONE stream reset by peer ({reason})"),
            ),
            Poll::Ready(Err(e)) => write_error(e),
            // Closed for sending without a reset (both sides ended): there
            // is nothing to wait for.
            Poll::Pending => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream is closed for sending",
            ),
        }
    }
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &u32::from(self.send.stream_id()))
            .field("unread", &self.unread.len())
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let data = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = buf.remaining().min(data.len());
        buf.put_slice(&data[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

/// Lends received data as h2 holds it, so a relay writes it to its socket
/// without copying it first.
impl AsyncBufRead for HboneStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                // END_STREAM: EOF.
                None => return Poll::Ready(Ok(&[])),
                Some(Ok(data)) => this.unread = data,
                Some(Err(e)) => return Poll::Ready(read_error(e).map(|()| &[][..])),
            }
        }
        Poll::Ready(Ok(&this.unread))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.unread.advance(amt);
        // Give the window back only for what the caller consumed. This can
        // fail only if the stream is already gone, which the next read
        // reports, so the data in hand is still delivered.
        let _ = this.recv.flow_control().release_capacity(amt);
    }
}

impl HboneStream {
    /// Hands h2 as much of `data` as the send window allows (at least one
    /// byte, waiting for window if there is none), without copying it.
    /// Returns how much was taken; `data` keeps the rest.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_send_capacity(cx, data.len()))?;
        Poll::Ready(self.send_now(cx, data.split_to(n)))
    }

    /// Queues `chunk`, for which send window is already held.
    fn send_now(&mut self, cx: &mut Context<'_>, chunk: Bytes) -> io::Result<usize> {
        let n = chunk.len();
        match self.send.send_data(chunk, false) {
            Ok(()) => Ok(n),
            Err(_) => Err(self.send_closed_error(cx)),
        }
    }

    /// Waits for send window for up to `len` bytes (`len` > 0) and returns
    /// how many bytes may be sent now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after HBONE stream shutdown",
            )));
        }
        let want = len.min(MAX_WRITE);
        // Ask for exactly this write's window (h2 counts data it already
        // buffers on top), so h2 never holds more than the peer allowed.
        self.send.reserve_capacity(want);
        loop {
            // Capacity already assigned is used directly: `poll_capacity`
            // only reports increases and could wait on capacity we hold.
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity.min(want)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(write_error(e))),
                None => return Poll::Ready(Err(self.send_closed_error(cx))),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        // A borrowed slice must be copied; a relay uses `poll_send` instead.
        Poll::Ready(this.send_now(cx, Bytes::copy_from_slice(&buf[..n])))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task; there is no
        // stream-level buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        // An empty DATA frame with END_STREAM, queued behind the data
        // already written, closes only our direction.
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.write_closed = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => {
                // The peer already said it wants no more data: done.
                if let Poll::Ready(Ok(Reason::NO_ERROR)) = this.send.poll_reset(cx) {
                    this.write_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(this.send_closed_error(cx)))
            }
        }
    }
}

/// A receive-side failure. A reset with NO_ERROR is the peer finishing
/// early on purpose (RFC 9113 §8.1), so it reads as EOF; any other reset or
/// connection failure must not look like a clean end of data.
fn read_error(e: h2::Error) -> io::Result<()> {
    if e.is_reset() && e.reason() == Some(Reason::NO_ERROR) {
        return Ok(());
    }
    Err(stream_io_error(e, io::ErrorKind::ConnectionReset))
}

fn write_error(e: h2::Error) -> io::Error {
    stream_io_error(e, io::ErrorKind::BrokenPipe)
}

/// Keeps the kind of an underlying I/O error; h2 protocol errors (reset,
/// GOAWAY) get `kind`.
fn stream_io_error(e: h2::Error, kind: io::ErrorKind) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::new(kind, "HBONE connection I/O error"),
        }
    } else {
        io::Error::new(kind, e)
    }
}
