//! `GET /v1/events`: peer events as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use super::AppState;

/// Streams every peer event from now on. A subscriber that falls behind gets a
/// `lagged` event (data `{"missed": N}`), then continues: it should read the
/// peers' state again (`GET …/routers`, `…/clients`), since events are not
/// replayed. The stream ends when the appliance shuts down.
#[utoipa::path(get, path = "/events", tag = "events", responses((status = 200, description = "Server-Sent Events: peer_connected, peer_disconnected, peer_roamed (data: a PeerEvent); lagged (data: {\"missed\": N}) when the subscriber fell behind", content_type = "text/event-stream", body = crate::io::events::PeerEvent), (status = 401, description = "Missing or wrong token", body = super::views::ErrorBody)))]
pub async fn stream(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = BroadcastStream::new(state.events.subscribe()).map(|item| {
        Ok(match item {
            Ok(e) => Event::default()
                .event(e.event)
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unserializable event")),
            // An event, not a comment: EventSource clients drop comments.
            Err(BroadcastStreamRecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{{\"missed\":{n}}}")),
        })
    });
    let mut stopping = state.stopping.clone();
    let stop = async move {
        // No sender: nobody can stop the appliance, so the stream runs on.
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let events = futures_util::StreamExt::take_until(events, stop);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
