//! Request bodies: read whole before any answer, and a JSON extractor whose
//! errors name the offending field.
//!
//! Left out: path and query parameters (`params`) and what the decoded values mean,
//! which the registry checks.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

/// How much of a too-large body is still read, and thrown away, so that its
/// client gets the 413. Beyond this the connection is closed unanswered.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Reads each request's whole body (up to `MAX_BODY`) before routing. Refusals
/// that come before a handler reads the body (no such route, no token, a bad id
/// in the path) would otherwise be sent while the client is still sending: the
/// connection is then closed with unread bytes, the kernel resets it, and the
/// client loses the answer. Memory stays bounded: past `MAX_BODY` the rest is
/// read and dropped.
pub async fn read_first(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let mut chunks = body.into_data_stream();
    let mut kept: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let Ok(chunk) = chunk else {
                return Err(ApiError::bad_body("the request body could not be read"));
            };
            total = total.saturating_add(chunk.len());
            if total > DRAIN_LIMIT {
                break;
            }
            if total <= super::MAX_BODY {
                kept.extend_from_slice(&chunk);
            }
        }
        Ok(())
    };
    // A client that trickles its body holds a connection slot: not for long.
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return ApiError::body_too_slow(BODY_TIMEOUT).into_response(),
    }
    if total > super::MAX_BODY {
        return ApiError::too_large().into_response();
    }
    next.run(Request::from_parts(parts, Body::from(kept))).await
}

/// How long a request body may take to arrive, whole.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

use super::ApiError;

/// A JSON body; an empty body reads as `{}` so optional bodies may be omitted.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large()
            } else {
                ApiError::bad_body(e.body_text())
            }
        })?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// Decodes a request body the way every handler gets it: blank reads as `{}`,
/// an error names the field at fault, trailing bytes after the value are refused.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = e.inner().to_string();
        // Broken JSON is the body's fault, wherever the parser stopped.
        if e.inner().is_syntax() || e.inner().is_eof() {
            return ApiError::bad_body(message);
        }
        let path = e.path().to_string();
        match field_of(&path, &message) {
            Some(field) => ApiError::bad_field(field, message),
            // The body is no object at all: said without the Rust type's name.
            None if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') => {
                ApiError::bad_body("the body must be a JSON object")
            }
            None => ApiError::bad_body(message),
        }
    })?;
    // Trailing garbage after the JSON value.
    de.end().map_err(|e| ApiError::bad_body(e.to_string()))?;
    Ok(value)
}

/// The top-level field an error is about: from the path, or from serde's
/// "missing field `x`" / "unknown field `x`" messages.
pub(super) fn field_of(path: &str, message: &str) -> Option<String> {
    let top = path.split(['.', '[']).next().unwrap_or("");
    if !top.is_empty() && top != "?" {
        return Some(top.to_owned());
    }
    for prefix in ["missing field `", "unknown field `", "duplicate field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{decode_json, field_of};

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Named {
        name: Option<String>,
    }

    /// A body that never finishes is answered 408 once its time is up, and
    /// the handler never runs.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_forever_times_out() {
        use axum::body::Body;
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/", axum::routing::put(|| async { "handled" }))
            .layer(axum::middleware::from_fn(super::read_first));
        let forever = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        let request = axum::http::Request::put("/")
            .body(Body::from_stream(forever))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
    }

    #[test]
    fn broken_or_foreign_bodies_blame_the_body_without_rust_names() {
        for body in [&b"{\"name\":"[..], b"{\"name\": tru}", b"{,}"] {
            let e = decode_json::<Named>(body).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_body", None),
                "{e:?}"
            );
        }
        let e = decode_json::<Named>(b"[]").unwrap_err();
        assert_eq!(e.code, "invalid_body");
        assert!(!e.message.contains("Named"), "{}", e.message);
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = decode_json::<Named>(b"{\"name\": 7}").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_field", Some("name"))
        );
    }

    #[test]
    fn finds_fields() {
        assert_eq!(
            field_of("gateways[0]", "invalid type"),
            Some("gateways".into())
        );
        assert_eq!(
            field_of(".", "missing field `pool` at line 1"),
            Some("pool".into())
        );
        assert_eq!(
            field_of(".", "unknown field `x`, expected"),
            Some("x".into())
        );
        assert_eq!(field_of(".", "expected value"), None);
    }
}
