//! The admin endpoints: one request in, one response out.

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use super::AdminState;
use crate::metrics::TEXT_CONTENT_TYPE;

pub type Body = Full<Bytes>;

const PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Answers `method path` (path without the query).
pub fn respond(method: &Method, path: &str, state: &dyn AdminState) -> Response<Body> {
    let known = matches!(
        path,
        "/metrics" | "/healthz" | "/readyz" | "/config_dump" | "/certs"
    );
    if !known {
        return reply(StatusCode::NOT_FOUND, PLAIN, "not found\n");
    }
    // Read-only by design: nothing on the admin port changes the agent.
    if method != Method::GET {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => reply(StatusCode::OK, TEXT_CONTENT_TYPE, state.metrics()),
        // Answering at all is the health signal: the process and its runtime
        // are alive.
        "/healthz" => reply(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => match state.ready() {
            Ok(()) => reply(StatusCode::OK, PLAIN, "ready\n"),
            Err(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {reason}\n"),
            ),
        },
        "/config_dump" => json(&state.config_dump()),
        "/certs" => json(&state.certs()),
        _ => unreachable!("checked above"),
    }
}

fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            reply(StatusCode::OK, JSON, body)
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
