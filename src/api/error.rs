//! API errors and their JSON shape: status, a stable `code`, a message and
//! the field at fault. Left out: deciding what is wrong (the control plane's
//! [`ControlError`] and the runtime's [`RuntimeError`] say that; here they are
//! only mapped to a status and a code).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::control::ControlError;
use crate::io::RuntimeError;

/// An error answer: status, code, message and the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    /// 400 for one field.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message: message.into(),
            field: Some(field.into()),
        }
    }
    /// 400 for the body as a whole.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_body",
            message: message.into(),
            field: None,
        }
    }
    /// 401.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token".into(),
            field: None,
        }
    }
    /// 404 for a path that names nothing.
    pub fn no_route() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such path".into(),
            field: None,
        }
    }
    /// 503: the tenant's tunnel is down (`e` says why); the supervisor tries
    /// it again.
    pub fn tunnel_down(e: &RuntimeError) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "tunnel_down",
            message: format!(
                "{e}; the tunnel is down and tried again every {} s",
                super::supervisor::RETRY.as_secs()
            ),
            field: None,
        }
    }
    /// 413.
    pub fn too_large() -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "body_too_large",
            message: format!("request body is larger than {} bytes", super::MAX_BODY),
            field: None,
        }
    }
    /// 408: the body did not come in time.
    pub fn body_too_slow(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "body_timeout",
            message: format!(
                "the request body did not arrive within {} s",
                limit.as_secs()
            ),
            field: None,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "state could not be written; the change was undone");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "storage_failed",
            message: "the change could not be made durable and was undone".into(),
            field: None,
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::InvalidField { .. } => StatusCode::BAD_REQUEST,
            ControlError::NoTenant(_)
            | ControlError::NoRouter(_)
            | ControlError::NoClient(_)
            | ControlError::NoForward(_) => StatusCode::NOT_FOUND,
            ControlError::NoEgress => StatusCode::CONFLICT,
            ControlError::Inconsistent { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        };
        Self {
            status,
            code: e.code(),
            field: e.field_name().map(str::to_owned),
            message: e.to_string(),
        }
    }
}

/// The code of a change the tunnel took while the host lacks a pool's route.
pub(crate) const HOST_ROUTE_MISSING: &str = "host_route_missing";

/// The code of a tunnel task that did not answer in time (a change stored,
/// perhaps not taken yet).
pub(crate) const TUNNEL_NOT_ANSWERING: &str = "tunnel_not_answering";

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let (status, code, field) = match &e {
            RuntimeError::Bind { .. } => (
                StatusCode::CONFLICT,
                "port_unavailable",
                Some("listen_port"),
            ),
            RuntimeError::Tun(_) => (StatusCode::SERVICE_UNAVAILABLE, "host_device_failed", None),
            RuntimeError::PoolRoute(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, HOST_ROUTE_MISSING, None)
            }
            RuntimeError::Listen { .. } => {
                (StatusCode::CONFLICT, "listen_unavailable", Some("listen"))
            }
            RuntimeError::Engine(_) => (StatusCode::CONFLICT, "conflict", None),
            RuntimeError::TaskGone(_) => (StatusCode::SERVICE_UNAVAILABLE, "tunnel_down", None),
            RuntimeError::NotAnswering { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, TUNNEL_NOT_ANSWERING, None)
            }
            RuntimeError::NoStack => (StatusCode::CONFLICT, "tun_mode", None),
        };
        Self {
            status,
            code,
            message: e.to_string(),
            field: field.map(str::to_owned),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = json!(field);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}
