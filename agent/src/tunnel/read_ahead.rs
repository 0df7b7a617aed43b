//! Large reads under TLS.
//!
//! rustls reads its socket in steps of at most 4 KiB (its deframer grows
//! by that much per `read_tls`), so one 16 KiB record costs four `read`
//! syscalls and a bulk stream spends much of its time entering the kernel.
//! [`ReadAhead`] sits between the socket and rustls: a small read is served
//! from one large read of the socket, and the buffer exists only while
//! there is unread data, so an idle tunnel holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// One socket read's worth: room for four full TLS records.
const READ_AHEAD: usize = 64 * 1024;

/// A byte stream whose small reads are served from large ones. Writes pass
/// straight through.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    /// Read from `io`, not yet read by the caller. Empty when idle.
    ahead: BytesMut,
}

impl<IO> ReadAhead<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            ahead: BytesMut::new(),
        }
    }

    /// Bytes held for the caller (for tests).
    #[cfg(test)]
    fn held_capacity(&self) -> usize {
        self.ahead.capacity()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            // A caller asking for as much as we would read gains nothing
            // from a copy in between.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.ahead.reserve(READ_AHEAD);
            match poll_read_buf(Pin::new(&mut this.io), cx, &mut this.ahead) {
                Poll::Pending => {
                    // Idle: give the buffer back.
                    this.ahead = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.ahead = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                // EOF reads as an empty fill, as it came.
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.ahead.len());
        out.put_slice(&this.ahead[..n]);
        // Once drained, the next `reserve` reuses the buffer from its start.
        this.ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Counts the reads that reach the inner stream.
    struct CountingReads<IO> {
        io: IO,
        reads: usize,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for CountingReads<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let polled = Pin::new(&mut self.io).poll_read(cx, buf);
            if polled.is_ready() {
                self.reads += 1;
            }
            polled
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_in_order() {
        let (mut peer, io) = duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        peer.write_all(&data).await.unwrap();
        drop(peer);
        let mut reader = ReadAhead::new(CountingReads { io, reads: 0 });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes differ after read-ahead");
        // 200,000 bytes in 4 KiB reads would be 49 reads of the socket;
        // in 64 KiB ones it is 4, plus the one that sees EOF.
        assert!(
            reader.io.reads <= 5,
            "{} reads reached the socket",
            reader.io.reads
        );
    }

    #[test]
    fn an_idle_stream_holds_no_buffer() {
        let mut cx = Context::from_waker(Waker::noop());
        let (mut peer, io) = duplex(1024);
        let mut reader = ReadAhead::new(io);
        let mut out = [0u8; 100];
        // Nothing to read: pending, and nothing kept.
        let mut buf = ReadBuf::new(&mut out);
        assert!(
            Pin::new(&mut reader)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert_eq!(reader.held_capacity(), 0);
        // 300 bytes arrive and are read in 100-byte steps.
        assert!(matches!(
            Pin::new(&mut peer).poll_write(&mut cx, &[9; 300]),
            Poll::Ready(Ok(300))
        ));
        for _ in 0..3 {
            let mut buf = ReadBuf::new(&mut out);
            assert!(matches!(
                Pin::new(&mut reader).poll_read(&mut cx, &mut buf),
                Poll::Ready(Ok(()))
            ));
            assert_eq!(buf.filled(), &[9; 100]);
        }
        // Drained and idle again: the buffer is gone.
        let mut buf = ReadBuf::new(&mut out);
        assert!(
            Pin::new(&mut reader)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert_eq!(reader.held_capacity(), 0);
    }
}
