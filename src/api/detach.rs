//! Changes run to completion even when their client goes away.
//!
//! hyper drops a request's future when the client disconnects. A handler that
//! had changed the registry and was awaiting a tunnel or the store would stop
//! half-way, leaving memory, the running tunnels and `state.db` out of step. So
//! every request that may change something (any method but `GET` and `HEAD`)
//! runs in a task of its own; the connection only waits for its answer. Reads stay
//! inline: dropping them loses nothing.
//!
//! Such tasks outlive their connections, so the connection cap does not bound
//! them: a client that gives up and tries again while the control plane is busy
//! leaves one behind each time. At most [`MAX_DETACHED`] run; beyond that a
//! change is refused with `503 busy` before it starts. Every change is logged
//! here with its method, path and answer, by the task that finishes it. Left
//! out: which changes they are (the handlers) and the order they run in (the
//! control lock's).

use axum::extract::Request;
use axum::http::header::RETRY_AFTER;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::ApiError;

/// Changes under way at most, in tasks of their own.
pub const MAX_DETACHED: usize = 256;

static DETACHED: Semaphore = Semaphore::const_new(MAX_DETACHED);

/// Runs a changing request in its own task, which finishes whatever the client does.
pub async fn run_to_completion(request: Request, next: Next) -> Response {
    detached(&DETACHED, request, next).await
}

async fn detached(slots: &'static Semaphore, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    // Logged here, in the task that finishes the change, so that a change
    // whose client went away is logged all the same.
    let method = request.method().clone();
    // The path as the client sent it (a nested router sees it without `/v1`).
    let path = request
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| request.uri().path(), |o| o.path())
        .to_owned();
    let Ok(slot) = slots.try_acquire() else {
        tracing::info!(%method, %path, status = 503, "change refused: too many under way");
        let busy = ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "busy",
            message: format!("{MAX_DETACHED} changes are under way; try again later"),
            field: None,
        };
        return ([(RETRY_AFTER, "5")], busy).into_response();
    };
    let task = async move {
        let _slot = slot;
        let response = next.run(request).await;
        let status = response.status().as_u16();
        tracing::info!(%method, %path, status, "change");
        response
    };
    match tokio::spawn(task).await {
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
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Body;
    use axum::routing::put;
    use axum::Router;
    use tokio::sync::{oneshot, Notify};
    use tower::ServiceExt;

    use super::*;

    /// The client goes away while the handler is in the middle of its work (what
    /// hyper does on a disconnect: the request's future is dropped). With the
    /// middleware the handler still finishes; without it, it is cut off.
    #[tokio::test]
    async fn a_change_finishes_after_its_client_has_gone() {
        for detached in [true, false] {
            let started = Arc::new(Notify::new());
            let (release, released) = oneshot::channel::<()>();
            let (finished, finish) = oneshot::channel::<()>();
            let slots = Arc::new(Mutex::new(Some((released, finished))));
            let handler_started = Arc::clone(&started);
            let mut app = Router::new().route(
                "/x",
                put(move || {
                    let slots = slots.lock().expect("lock").take();
                    let started = Arc::clone(&handler_started);
                    async move {
                        let (released, finished) = slots.expect("one request");
                        started.notify_one();
                        let _ = released.await;
                        let _ = finished.send(());
                    }
                }),
            );
            if detached {
                app = app.layer(axum::middleware::from_fn(run_to_completion));
            }
            let request = Request::put("/x").body(Body::empty()).expect("request");
            let answer = app.oneshot(request);
            tokio::select! {
                _ = answer => panic!("answered before the handler was released"),
                _ = started.notified() => {}
            }
            // The request future is gone now; let the handler go on.
            let _ = release.send(());
            let outcome = tokio::time::timeout(Duration::from_secs(30), finish)
                .await
                .expect("the handler ended one way or the other");
            assert_eq!(outcome.is_ok(), detached, "detached: {detached}");
        }
    }

    /// Past the limit a change is refused before it starts; reads still pass,
    /// and a freed slot takes the next change.
    #[tokio::test]
    async fn past_the_limit_a_change_is_refused_with_busy() {
        static SLOTS: Semaphore = Semaphore::const_new(1);
        let held = SLOTS.try_acquire().expect("the one slot");
        let app = Router::new()
            .route("/x", put(|| async { "changed" }).get(|| async { "read" }))
            .layer(axum::middleware::from_fn(|r, n| detached(&SLOTS, r, n)));
        let send = |method: &str| {
            let request = Request::builder().method(method).uri("/x");
            app.clone()
                .oneshot(request.body(Body::empty()).expect("request"))
        };
        let refused = send("PUT").await.expect("an answer");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(refused.into_body(), 4096)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["error"]["code"], "busy", "{body}");
        assert_eq!(
            send("GET").await.expect("an answer").status(),
            StatusCode::OK
        );
        drop(held);
        assert_eq!(
            send("PUT").await.expect("an answer").status(),
            StatusCode::OK
        );
        assert_eq!(SLOTS.available_permits(), 1, "the slot is given back");
    }
}
