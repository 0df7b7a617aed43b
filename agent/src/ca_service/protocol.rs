//! The wire format: one JSON object per line, both ways.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// A request for an SVID.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    pub spiffe_id: String,
    /// Base64 (standard alphabet, padded) DER PKCS#10.
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Node attestation (Kubernetes mode), the only request an unauthenticated
/// connection may send: the agent's projected service-account token and a
/// CSR for the node credential's key, which the agent generated.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AttestRequest {
    pub token: String,
    /// Base64 (standard alphabet, padded) DER PKCS#10.
    pub csr: String,
}

/// The answer: a chain (leaf first, base64 DER) or an error message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn chain(chain: Vec<String>) -> Self {
        Self {
            chain: Some(chain),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            chain: None,
            error: Some(message.into()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// `buf` holds one line without its newline.
    Complete,
    /// The peer closed the stream (a partial last line is discarded).
    Eof,
    /// More than `max` bytes arrived without a newline; the stream is no
    /// longer at a line boundary and must be closed.
    TooLong,
}

/// Reads one line into `buf` (cleared first), never buffering more than
/// `max` bytes of it.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Line::Complete);
        }
    }
}

/// Writes `message` as one JSON line and flushes.
pub(super) async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    async fn lines(input: &[u8], max: usize, capacity: usize) -> Vec<(Line, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(capacity, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let line = read_line(&mut reader, &mut buf, max).await.unwrap();
            let stop = line != Line::Complete;
            out.push((line, buf.clone()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_lines_and_stops_at_the_cap() {
        for capacity in [1, 3, 64] {
            let got = lines(b"ab\n\ncdef\nxy", 4, capacity).await;
            assert_eq!(
                got,
                [
                    (Line::Complete, b"ab".to_vec()),
                    (Line::Complete, b"".to_vec()),
                    (Line::Complete, b"cdef".to_vec()),
                    (Line::Eof, b"xy".to_vec()),
                ],
                "capacity {capacity}"
            );
            let got = lines(b"abcd\nabcde\nab\n", 4, capacity).await;
            assert_eq!(got[0], (Line::Complete, b"abcd".to_vec()));
            assert_eq!(got[1].0, Line::TooLong, "capacity {capacity}");
            assert!(got[1].1.len() <= 4);
        }
    }

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"spiffe_id":"x","csr":"y"}"#).unwrap();
        assert_eq!((r.spiffe_id.as_str(), r.ttl_secs), ("x", None));
        assert!(serde_json::from_str::<Request>(r#"{"spiffe_id":"x","csr":"y","z":1}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Response::error("no")).unwrap(),
            r#"{"error":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::chain(vec!["a".into()])).unwrap(),
            r#"{"chain":["a"]}"#
        );
    }
}
