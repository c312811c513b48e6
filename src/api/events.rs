//! `GET /v1/events`: peer events as Server-Sent Events.
//!
//! Left out: making and naming the events, and webhooks ([`crate::io::events`]).
//! Nothing is replayed: a subscriber gets only what comes after it connected.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use super::AppState;
use crate::io::events::{Lagged, Published};

/// Streams every peer event from now on. When events were lost, because this
/// subscriber or the event hub fell behind, a `lagged` event (data
/// `{"event": "lagged", "missed": N, "at": …}`) says so, and the stream goes on:
/// the subscriber should read the peers' state again (`GET …/routers`,
/// `…/clients`), since events are not replayed. The stream ends when the
/// appliance shuts down, and when the API token is replaced (SIGHUP): a
/// follower connects again with the new one.
#[utoipa::path(get, path = "/events", tag = "events", responses((status = 200, description = "Server-Sent Events: peer_connected, peer_disconnected, peer_roamed (data: a PeerEvent); lagged (data: {\"event\": \"lagged\", \"missed\": N, \"at\": RFC 3339}) when events were lost", content_type = "text/event-stream", body = crate::io::events::PeerEvent), (status = 401, description = "Missing or wrong token", body = super::views::ErrorBody)))]
pub async fn stream(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stats = Arc::clone(&state.event_stats);
    let events = BroadcastStream::new(state.events.subscribe()).map(move |item| {
        let event = match item {
            Ok(e) => e,
            // An event, not a comment: EventSource clients drop comments.
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                stats
                    .subscriber_missed
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Published::Lagged(Lagged::now(n))
            }
        };
        Ok(Event::default()
            .event(event.name())
            .json_data(&event)
            .unwrap_or_else(|_| Event::default().comment("unserializable event")))
    });
    let mut stopping = state.stopping.clone();
    let mut replaced = state.token.replacements();
    let stop = async move {
        // No sender: nobody can stop the appliance, so the stream runs on.
        let stopped = async {
            if stopping.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        // A stream opened with a token that was replaced (a SIGHUP) ends: the
        // old token must not keep a door open.
        let token_replaced = async {
            if replaced.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stopped => {}
            () = token_replaced => {}
        }
    };
    let events = futures_util::StreamExt::take_until(events, stop);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::events::PeerEvent;
    use axum::response::IntoResponse;

    fn connected(n: u16) -> Published {
        Published::Peer(PeerEvent {
            event: "peer_connected",
            tenant_id: "acme".into(),
            kind: "router",
            id: format!("r{n}"),
            public_key: String::new(),
            endpoint: None,
            at: String::new(),
        })
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_how_many_it_missed() {
        // The fixture's channel holds 8: of 12 events sent before the
        // subscriber reads, it misses the first 4.
        let f = crate::api::testing::fixture().await;
        let body = stream(State(Arc::clone(&f.state)))
            .await
            .into_response()
            .into_body();
        for n in 0..12 {
            f.state.events.send(connected(n)).unwrap();
        }
        let mut chunks = body.into_data_stream();
        let mut text = String::new();
        while text.matches("\n\n").count() < 9 {
            let chunk = tokio::time::timeout(Duration::from_secs(5), chunks.next())
                .await
                .expect("the stream goes on")
                .expect("not ended")
                .unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert!(
            events[0].starts_with("event: lagged\ndata: {\"event\":\"lagged\",\"missed\":4,"),
            "{text}"
        );
        for (e, n) in events[1..].iter().zip(4..) {
            assert!(e.starts_with("event: peer_connected\n"), "{e}");
            assert!(e.contains(&format!("\"id\":\"r{n}\"")), "{e}");
        }
        let missed = &f.state.event_stats.subscriber_missed;
        assert_eq!(missed.load(std::sync::atomic::Ordering::Relaxed), 4);
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }
}
