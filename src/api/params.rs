//! Path and query extractors whose errors are the API's JSON errors, naming the
//! parameter at fault (axum's own extractors answer in plain text).
//!
//! They only decode: what a value must look like (an id, an address) is checked
//! by the handlers, which name the field too.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::body::field_of;
use super::ApiError;

/// The path's parameters, like `axum::extract::Path`.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let message = e.body_text();
                Err(match e.into_kind() {
                    ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::DeserializeError { key, .. } => ApiError::bad_field(key, message),
                    _ => ApiError::bad_body(message),
                })
            }
            Err(other) => Err(ApiError {
                status: other.status(),
                code: "invalid_path",
                message: other.body_text(),
                field: None,
            }),
        }
    }
}

/// The query string, like `axum::extract::Query`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        decode_query(parts.uri.query().unwrap_or_default()).map(Query)
    }
}

/// Decodes a query string the way handlers get it; an error names the parameter.
pub fn decode_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query).map_err(|e| {
        let message = e.to_string();
        match field_of("", &message) {
            Some(field) => ApiError::bad_field(field, message),
            None => ApiError::bad_body(message),
        }
    })
}
