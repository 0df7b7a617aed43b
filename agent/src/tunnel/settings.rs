//! HTTP/2 settings for tunnel connections, shared by both ends.
//!
//! h2's defaults (64 KiB windows) suit request/response traffic. A tunnel
//! carries bulk TCP streams over links with real latency, where a 64 KiB
//! window caps one stream at 64 KiB per round trip.

/// Per-stream receive window: enough for one stream to fill a fast link
/// with some latency (4 MiB per RTT is 3.2 Gbit/s at 10 ms). Memory is
/// bounded because [`HboneStream`](super::HboneStream) releases window only
/// as the application reads.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Connection receive window: four full stream windows, so a few streams run
/// at full speed at once. Four readers that stop draining can hold all of it
/// and stall the connection's other streams.
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Streams a server accepts at once on one connection. h2 advertises no
/// limit by default, leaving per-connection state unbounded; every
/// application connection between two pods is one stream, so the limit must
/// still be generous. Past it, the client queues new streams until one ends.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Largest DATA frame we accept: a whole relay write (64 KiB) in one frame
/// instead of four, with a frame header and a wakeup each. TLS still cuts
/// records at 16 KiB underneath.
pub(crate) const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// Largest header block accepted. CONNECT headers are tiny; this only bounds
/// what a misbehaving (authenticated) peer can make us buffer.
pub(crate) const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Data h2 may hold per stream before it reaches the socket. Writes wait for
/// capacity below this, so a stream never buffers more than this much.
pub(crate) const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Client side of a tunnel connection.
pub(crate) fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        // A tunnel server never pushes; refuse it outright.
        .enable_push(false);
    b
}

/// Server side of a tunnel connection.
pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    b
}
