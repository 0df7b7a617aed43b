//! The plugin <-> agent protocol: one JSON request line, one JSON response
//! line over the agent's unix socket (`agentSocket` in the plugin config).
//! A crate of its own so that the plugin and the agent share the types and
//! the codec without either pulling the other in.

use std::{path::Path, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

/// No request or response comes near this; a longer line is a broken peer.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Add,
    Del,
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    pub command: Command,
    pub container_id: String,
    /// The pod's netns path as the runtime gave it (`/proc/<pid>/ns/net` or
    /// `/var/run/netns/<name>`); empty on a DEL for an already gone netns.
    pub netns: String,
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The pod's addresses from the previous plugin's result, without prefix length.
    pub ips: Vec<String>,
    /// How long the plugin waits for the answer, in milliseconds: the agent
    /// answers (`error` if it must) before then. 0: the agent's default.
    #[serde(default)]
    pub timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// ADD: the pod's traffic is captured; its containers may start.
    Captured,
    /// ADD: the pod is not in the mesh; nothing was done.
    NotEnrolled,
    /// DEL: the agent forgot the pod (also when it never knew it).
    Released,
    /// CHECK: the pod is as the agent expects.
    Ok,
    /// Any command: the agent could not do it; `message` says why.
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentResponse {
    pub status: Status,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing answered: no socket, refused, the agent closed without a
    /// response, or the deadline passed. The plugin decides without it.
    #[error("the ambit agent at {socket} is unreachable: {reason}")]
    Unreachable { socket: String, reason: String },
    /// Something answered, but not with this protocol.
    #[error("the ambit agent at {socket} answered with something that is not a response: {reason}")]
    Protocol { socket: String, reason: String },
}

/// Sends one request and waits for its response, all within `timeout`.
pub async fn call(
    socket: &Path,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<AgentResponse, CallError> {
    let unreachable = |reason: String| CallError::Unreachable {
        socket: socket.display().to_string(),
        reason,
    };
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let mut lines = Framed::new(stream, codec());
        let line = serde_json::to_string(request).map_err(|e| unreachable(e.to_string()))?;
        lines
            .send(line)
            .await
            .map_err(|e| unreachable(format!("send: {e}")))?;
        match lines.next().await {
            None => Err(unreachable("closed without a response".into())),
            Some(Err(LinesCodecError::Io(e))) => Err(unreachable(format!("receive: {e}"))),
            Some(Err(e)) => Err(CallError::Protocol {
                socket: socket.display().to_string(),
                reason: e.to_string(),
            }),
            Some(Ok(line)) => serde_json::from_str(&line).map_err(|e| CallError::Protocol {
                socket: socket.display().to_string(),
                reason: format!("{e}: {line:?}"),
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no response within {timeout:?}"))))
}

/// The line framing both sides use.
pub fn codec() -> LinesCodec {
    LinesCodec::new_with_max_length(MAX_LINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_the_documented_one() {
        let request = AgentRequest {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            namespace: "ns".into(),
            pod: "p".into(),
            uid: "u".into(),
            ips: vec!["198.18.0.5".into()],
            timeout_ms: 30_000,
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"command":"add","containerId":"c1","netns":"/var/run/netns/x","namespace":"ns","pod":"p","uid":"u","ips":["198.18.0.5"],"timeoutMs":30000}"#
        );
        let response: AgentResponse =
            serde_json::from_str(r#"{"status":"not_enrolled","message":"m"}"#).unwrap();
        assert_eq!(response.status, Status::NotEnrolled);
        let bare: AgentResponse = serde_json::from_str(r#"{"status":"captured"}"#).unwrap();
        assert_eq!(bare.message, "");
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let request = AgentRequest {
            command: Command::Del,
            container_id: "c".into(),
            netns: String::new(),
            namespace: "n".into(),
            pod: "p".into(),
            uid: "u".into(),
            ips: vec![],
            timeout_ms: 0,
        };
        let err = call(
            &dir.path().join("none.sock"),
            &request,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CallError::Unreachable { .. }), "{err}");
    }
}
