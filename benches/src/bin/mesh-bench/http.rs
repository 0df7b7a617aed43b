//! The benchmark's HTTP/1.1 traffic: every request is a POST carrying
//! 1 KiB and every response carries 1 KiB, on keep-alive connections, so
//! "1 KiB each way" holds for every figure measured with it.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Bytes in each request body and each response body.
pub const BODY: usize = 1024;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive client connection.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
    body: Vec<u8>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut request =
            format!("POST /bench HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {BODY}\r\n\r\n")
                .into_bytes();
        request.resize(request.len() + BODY, b'q');
        Ok(Self {
            reader: BufReader::with_capacity(4096, stream),
            request,
            body: vec![0; BODY],
        })
    }

    /// One request and its whole response.
    pub fn request(&mut self) -> io::Result<()> {
        self.reader.get_mut().write_all(&self.request)?;
        let length = read_head(&mut self.reader)?;
        if length != BODY {
            return Err(io::Error::other(format!(
                "response body of {length} bytes, expected {BODY}"
            )));
        }
        self.reader.read_exact(&mut self.body)
    }
}

/// Reads a message head up to the blank line; returns its Content-Length
/// (0 when absent). EOF before a head is an error.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<usize> {
    let mut length = 0;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            if first {
                continue;
            }
            return Ok(length);
        }
        first = false;
        if let Some((name, value)) = trimmed.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| io::Error::other("bad Content-Length"))?;
        }
    }
}

/// One connection + one request + close: what a new-connection figure times.
pub fn one_shot(addr: SocketAddr) -> io::Result<()> {
    HttpConn::connect(addr)?.request()
}

/// A keep-alive HTTP/1.1 server answering every request with 1 KiB, one
/// task per connection on a single-threaded runtime (so 10,000 idle
/// connections cost one buffer each, not a thread each).
pub fn serve(port: u16) -> anyhow::Result<()> {
    crate::load::raise_fd_limit()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("::", port)).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = serve_connection(stream).await;
            });
        }
    })
}

async fn serve_connection(stream: tokio::net::TcpStream) -> io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    stream.set_nodelay(true)?;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    response.resize(response.len() + BODY, b'r');
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut body = vec![0u8; BODY];
    loop {
        let mut length = 0usize;
        let mut seen = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                if seen {
                    break;
                }
                continue;
            }
            seen = true;
            if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body).await?;
        reader.get_mut().write_all(&response).await?;
    }
}
