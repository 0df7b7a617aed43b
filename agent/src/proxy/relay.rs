//! Byte relay between two established streams.
//!
//! Each direction reads into its worker thread's scratch buffer and writes
//! straight from it. Only bytes the writer cannot take at once are kept, in
//! a buffer of the connection's own, and that buffer is freed as soon as
//! the reader has nothing more to give. An idle connection therefore holds
//! no relay buffer at all (tokio's `copy_bidirectional` keeps one per
//! direction for the connection's whole life: 10,000 idle connections with
//! 64 KiB buffers were 1.3 GiB per agent), while a busy, back-pressured
//! stream keeps its buffer and reads into it directly.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read: enough to keep a loopback stream busy.
const CHUNK: usize = 64 * 1024;

thread_local! {
    /// Shared by every relay on this worker thread; only ever borrowed
    /// within one poll, never across an await.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Bytes from the connection's initiator to its destination.
    pub sent: u64,
    /// Bytes from the destination back to the initiator.
    pub received: u64,
    pub duration: Duration,
}

/// Copies both ways until both directions are closed, propagating
/// half-closes. On an error the bytes already relayed are still counted.
pub async fn relay<A, B>(downstream: &mut A, upstream: &mut B) -> (RelayStats, io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let started = Instant::now();
    let mut sending = Pump::default();
    let mut receiving = Pump::default();
    let result = poll_fn(|cx| {
        let sent = sending.poll_until_done(cx, &mut *downstream, &mut *upstream)?;
        let received = receiving.poll_until_done(cx, &mut *upstream, &mut *downstream)?;
        match (sent, received) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let stats = RelayStats {
        sent: sending.bytes,
        received: receiving.bytes,
        duration: started.elapsed(),
    };
    (stats, result)
}

/// One direction of a relay.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written, at `held[start..end]`. Allocated
    /// only while the writer falls behind.
    held: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    read_eof: bool,
    done: bool,
    /// Something was written since the last flush.
    unflushed: bool,
    bytes: u64,
}

/// What one read from the reader gave.
enum Read {
    Data,
    Eof,
    Idle,
}

impl Pump {
    fn poll_until_done<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_transfer(cx, reader, writer))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }

    fn poll_transfer<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            ready!(self.poll_write_held(cx, writer))?;
            if self.read_eof {
                // Shutdown flushes first, then half-closes the writer.
                return Pin::new(writer).poll_shutdown(cx);
            }
            let read = match self.held.as_mut() {
                Some(held) => {
                    let mut buf = ReadBuf::new(held);
                    match Pin::new(&mut *reader).poll_read(cx, &mut buf)? {
                        Poll::Pending => Read::Idle,
                        Poll::Ready(()) if buf.filled().is_empty() => Read::Eof,
                        Poll::Ready(()) => {
                            (self.start, self.end) = (0, buf.filled().len());
                            Read::Data
                        }
                    }
                }
                None => self.read_through_scratch(cx, reader, writer)?,
            };
            match read {
                Read::Data => {}
                Read::Eof => self.read_eof = true,
                Read::Idle => {
                    // Nothing to read: the connection is idle, so it keeps
                    // no buffer, and what was written is pushed out.
                    self.held = None;
                    if self.unflushed {
                        ready!(Pin::new(writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Writes what is held; ready once nothing is.
    fn poll_write_held<W>(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        while self.start < self.end {
            let held = self.held.as_ref().expect("bytes are held only in a buffer");
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, &held[self.start..self.end]))?;
            self.wrote(n)?;
            self.start += n;
        }
        (self.start, self.end) = (0, 0);
        Poll::Ready(Ok(()))
    }

    /// Reads into the thread's scratch buffer and writes from it at once;
    /// what the writer does not take is copied into a buffer of our own.
    fn read_through_scratch<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> io::Result<Read>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            if Pin::new(&mut *reader).poll_read(cx, &mut buf)?.is_pending() {
                return Ok(Read::Idle);
            }
            let read = buf.filled().len();
            if read == 0 {
                return Ok(Read::Eof);
            }
            let mut written = 0;
            while written < read {
                match Pin::new(&mut *writer).poll_write(cx, &scratch[written..read])? {
                    Poll::Ready(n) => {
                        self.wrote(n)?;
                        written += n;
                    }
                    Poll::Pending => break,
                }
            }
            if written < read {
                let mut held = vec![0; CHUNK].into_boxed_slice();
                held[..read - written].copy_from_slice(&scratch[written..read]);
                self.held = Some(held);
                (self.start, self.end) = (0, read - written);
            }
            Ok(Read::Data)
        })
    }

    fn wrote(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.bytes += n as u64;
        self.unflushed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        let (mut client, mut downstream) = duplex(1024);
        let (mut upstream, mut server) = duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut downstream, &mut upstream).await });

        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"hello");
        // The other direction still works after the first one closed.
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"world!");

        let (stats, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!((stats.sent, stats.received), (5, 6));
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        // Pipes far smaller than a read keep the writer behind all along.
        let (mut client, mut downstream) = duplex(512);
        let (mut upstream, mut server) = duplex(700);
        let relay = tokio::spawn(async move { relay(&mut downstream, &mut upstream).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "relayed bytes differ from the sent ones");
        drop(server);
        drop(writer.await.unwrap());
        let (stats, _) = relay.await.unwrap();
        assert_eq!(stats.sent, data.len() as u64);
    }

    #[test]
    fn a_buffer_is_held_only_while_the_writer_is_behind() {
        let mut cx = Context::from_waker(Waker::noop());
        let (mut source, mut reader) = duplex(CHUNK);
        let (mut writer, mut sink) = duplex(1000);
        let mut pump = Pump::default();
        // The sink takes 1,000 of 5,000 bytes: the rest is held.
        let wrote = Pin::new(&mut source).poll_write(&mut cx, &[7; 5000]);
        assert!(matches!(wrote, Poll::Ready(Ok(5000))));
        assert!(
            pump.poll_transfer(&mut cx, &mut reader, &mut writer)
                .is_pending()
        );
        assert!(pump.held.is_some());
        assert_eq!(pump.end - pump.start, 4000);

        // Drained, with nothing more to read: the buffer is gone.
        let mut drained = 0;
        while drained < 5000 {
            let mut buf = [0u8; 4096];
            let mut read = ReadBuf::new(&mut buf);
            if let Poll::Ready(Ok(())) = Pin::new(&mut sink).poll_read(&mut cx, &mut read) {
                drained += read.filled().len();
            }
            let _ = pump.poll_transfer(&mut cx, &mut reader, &mut writer);
        }
        assert!(pump.held.is_none(), "an idle direction kept its buffer");
        assert_eq!(pump.bytes, 5000);
    }
}
