//! Changes run to completion even when their client goes away.
//!
//! hyper drops a request's future when the client disconnects. A handler that
//! had changed the registry and was awaiting a tunnel or the store would stop
//! half-way, leaving memory, the running tunnels and `state.db` out of step. So
//! every request that may change something (any method but `GET` and `HEAD`)
//! runs in a task of its own; the connection only waits for its answer. Reads stay
//! inline: dropping them loses nothing.

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Runs a changing request in its own task, which finishes whatever the client does.
pub async fn run_to_completion(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "API handler failed");
            ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "internal",
                message: "the request failed inside the appliance".into(),
                field: None,
            }
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::routing::put;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// A handler that takes a while: with the middleware, dropping the request
    /// future (what hyper does when the client disconnects) does not stop it.
    #[tokio::test]
    async fn a_change_finishes_after_its_client_has_gone() {
        for (detached, expect) in [(true, true), (false, false)] {
            let done = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&done);
            let mut app = Router::new().route(
                "/x",
                put(move || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    flag.store(true, Ordering::SeqCst);
                }),
            );
            if detached {
                app = app.layer(axum::middleware::from_fn(run_to_completion));
            }
            let request = Request::put("/x").body(Body::empty()).expect("request");
            // The client gives up after 5 ms.
            let answer = tokio::time::timeout(Duration::from_millis(5), app.oneshot(request)).await;
            assert!(answer.is_err(), "the handler is still running");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(done.load(Ordering::SeqCst), expect, "detached: {detached}");
        }
    }
}
