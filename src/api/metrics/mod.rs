//! `GET /metrics`: Prometheus text, built at scrape time from snapshots.
//!
//! The data plane keeps plain counters; nothing on the packet path touches a label.
//! Each scrape asks every tunnel for a snapshot, one tunnel at a time under the
//! control lock, and writes the text from the snapshots on a blocking thread
//! ([`series`], in the layout of [`exposition`]), so removed peers disappear at
//! once. This module is the handler around that: one scrape at a time, the answer
//! gzip-compressed for clients that ask ([`gzip`]) and sent in pieces, and the
//! API's request counters.
//!
//! Left out: the counting of packets and events, which the engines, tunnel tasks and
//! event hub do in plain fields (read here through their snapshots), and whether a
//! scrape needs the token (`auth`).

mod exposition;
mod gzip;
mod series;

pub use gzip::accepts_gzip;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;

use self::series::{Taken, TunnelLabels};
use super::AppState;
use crate::control::Id;

/// API requests by (route, method, status). Touched once per API request.
#[derive(Default)]
pub struct ApiCounters(DashMap<(String, String, u16), AtomicU64>);

/// Scrapes run one at a time; the next waits for the one under way. A scrape
/// costs about 0.2 s of CPU and 54 MiB (and 13 MiB more while it is
/// compressed) at 100,000 peers, and `/metrics` needs no
/// token by default: concurrent ones could otherwise take the memory and the
/// control lock's turns that changes need.
/// The turn is held until the text is rendered, also when the client has gone
/// meanwhile (the render on its blocking thread cannot be stopped), and then
/// until the client has taken the answer or its connection ended: a client
/// that asks and never reads keeps one answer in memory, not one per request
/// (its connection ends after the API's write timeout).
pub struct OneScrape(Arc<tokio::sync::Semaphore>);

impl Default for OneScrape {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(1)))
    }
}

/// How long a scrape waits for the one under way before it is answered `503`.
const SCRAPE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The route that answered a request, carried out with its response to
/// [`count_requests`], which runs outside the routing.
#[derive(Clone)]
struct Routed(String);

/// Route layer: tells [`count_requests`] which route answered.
pub async fn tag_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| Routed(m.as_str().to_owned()));
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

/// Middleware around the whole API counting every request by the route that
/// answered it, or `unmatched`: a 404 or 405, or one refused before routing
/// (a body too large, `/metrics` without its token). Methods outside the
/// usual ones count as `other`, so that no client can add label values.
pub async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    use axum::http::Method;
    let method = match *request.method() {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<Routed>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    state
        .api_requests
        .0
        .entry((route, method.to_owned(), response.status().as_u16()))
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
    response
}

/// Renders every series, gzip-compressed when the client accepts it (as
/// Prometheus does).
///
/// Only what the series need is taken under the control lock, one tunnel at a
/// time (its snapshot and its peers' labels); writing the text, about 2 µs per
/// peer (0.2 s of CPU at 100,000 peers), and compressing it run on a blocking
/// thread, so that neither API changes nor the tunnels' worker threads wait for
/// a scrape.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()), responses((status = 200, description = "Prometheus text exposition, gzip-compressed when the request's Accept-Encoding takes gzip (as Prometheus sends it)", content_type = "text/plain", body = String, headers(("Content-Encoding" = String, description = "gzip when compressed, absent otherwise"), ("Vary" = String, description = "accept-encoding"))), (status = 503, description = "Another scrape was under way for more than 10 s", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    // Lossy: a line with a stray non-ASCII byte still says what it refuses.
    let values = headers.get_all(ACCEPT_ENCODING).iter();
    let values: Vec<_> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    let wants_gzip = gzip::accepts_gzip(values.iter().map(|v| v.as_ref()));
    // A scrape waits for the one under way, but not for ever: waiters would
    // pile up behind a slow one, each holding a connection.
    let semaphore = Arc::clone(&state.scraping.0);
    let turn = match tokio::time::timeout(SCRAPE_WAIT, semaphore.acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "5")],
                "another scrape is under way\n",
            )
                .into_response()
        }
    };
    let (ids, host_drops, host_up, store) = {
        let control = state.control.lock().await;
        let ids: Vec<Id> = control.registry.tenants().map(|t| t.id.clone()).collect();
        let runtime = &control.runtime;
        let host_up = runtime
            .tun_mode()
            .then(|| runtime.host_up() && runtime.host_reading());
        // A store poisoned by a panic mid-write refuses every write.
        let store = match control.store.lock() {
            Ok(store) => store.write_health(),
            Err(poisoned) => (poisoned.get_ref().write_health().0, true),
        };
        (ids, runtime.host_drops(), host_up, store)
    };
    // One tunnel per lock: a change waits for one tunnel's snapshot at most.
    let mut tunnels = Vec::with_capacity(ids.len());
    for id in ids {
        let control = state.control.lock().await;
        let Ok(t) = control.registry.tenant(&id) else {
            continue; // deleted meanwhile
        };
        let snapshot = control.runtime.snapshot(&id).await.ok();
        let mut labels = TunnelLabels::of(t, snapshot, state.metrics_per_peer);
        labels.failures = control.runtime.failures(&id);
        tunnels.push(labels);
    }
    let taken = Taken {
        tunnels,
        host_up,
        host_drops,
        store,
    };
    let rendered = tokio::task::spawn_blocking(move || {
        let text = series::render(&taken, &state, Instant::now(), SystemTime::now());
        let compressed = wants_gzip.then(|| gzip::compress(text.as_bytes()));
        match compressed {
            Some(Ok(compressed)) => (Bytes::from(compressed), true, turn),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "metrics could not be compressed; sent as they are");
                (Bytes::from(text), false, turn)
            }
            None => (Bytes::from(text), false, turn),
        }
    })
    .await;
    match rendered {
        Ok((body, compressed, turn)) => {
            let mut response = (
                [
                    (CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8"),
                    (VARY, "accept-encoding"),
                ],
                holding(body, turn),
            )
                .into_response();
            if compressed {
                let encoding = axum::http::HeaderValue::from_static("gzip");
                response.headers_mut().insert(CONTENT_ENCODING, encoding);
            }
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics could not be rendered");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The answer's body, in pieces of [`ANSWER_PIECE`] bytes that share the
/// text: `turn` is released once hyper has asked for the last (it asks for
/// the next only when it has written most of the previous) or dropped the
/// body (the connection ended).
fn holding(text: Bytes, turn: tokio::sync::OwnedSemaphorePermit) -> axum::body::Body {
    let pieces = (0..text.len()).step_by(ANSWER_PIECE).map(move |at| {
        let _turn = &turn;
        Ok::<_, std::convert::Infallible>(text.slice(at..text.len().min(at + ANSWER_PIECE)))
    });
    axum::body::Body::from_stream(futures_util::stream::iter(pieces))
}

/// See [`holding`].
const ANSWER_PIECE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_waits_for_the_one_under_way() {
        let f = crate::api::testing::fixture().await;
        let under_way = f.state.scraping.0.acquire().await.unwrap();
        let waiting = tokio::spawn(scrape(State(Arc::clone(&f.state)), HeaderMap::new()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "it did not wait");
        drop(under_way);
        let response = waiting.await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// The turn goes with the answer until it has been taken, or dropped
    /// with its connection: a client that asks and never reads holds one
    /// answer, and scrapes meanwhile wait for it.
    #[tokio::test]
    async fn the_answer_holds_the_turn_until_it_is_taken() {
        let f = crate::api::testing::fixture().await;
        let turns = || f.state.scraping.0.available_permits();
        let answer = scrape(State(Arc::clone(&f.state)), HeaderMap::new()).await;
        assert_eq!(answer.status(), axum::http::StatusCode::OK);
        assert_eq!(turns(), 0, "held by the answer");
        let text = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(text.starts_with(b"# HELP") || text.starts_with(b"# TYPE"));
        assert_eq!(turns(), 1, "taken: released");

        let unread = scrape(State(Arc::clone(&f.state)), HeaderMap::new()).await;
        assert_eq!(turns(), 0);
        drop(unread);
        assert_eq!(turns(), 1, "dropped: released");
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A tunnel task stuck by a bug holds neither the scrape nor the API:
    /// its snapshot is given up after `ANSWER_WAIT`, and the tunnel reads as
    /// down; a question or a change is given up too, and answered `503`.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_tunnel_holds_up_no_scrape() {
        use crate::io::runtime::{RuntimeError, ANSWER_WAIT, CHANGE_WAIT, PROBE_WAIT};
        let f = crate::api::testing::fixture().await;
        let (heard, queue) = f
            .state
            .control
            .lock()
            .await
            .runtime
            .wedge_task(&f.acme)
            .expect("acme's tunnel");
        let scraped = scrape(State(Arc::clone(&f.state)), HeaderMap::new());
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), scraped)
            .await
            .expect("answered within 10 s");
        let text = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains(r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 0"#),
            "{text}"
        );
        // The API is free again meanwhile.
        let control = f.state.control.try_lock();
        assert!(control.is_ok(), "the control lock is free");
        drop(control);
        let control = f.state.control.lock().await;
        let limit = std::time::Duration::from_secs(60);
        let asked = control.runtime.peer_status(&f.acme, [0; 32]);
        let e = tokio::time::timeout(limit, asked).await.expect("given up");
        assert!(
            matches!(e, Err(RuntimeError::NotAnswering { waited, .. }) if waited == ANSWER_WAIT),
            "{e:?}"
        );
        let tenant = control.registry.tenant(&f.acme).unwrap();
        let change = control.runtime.remove_peer(tenant, [0; 32]);
        let e = tokio::time::timeout(limit, change).await.expect("given up");
        let Err(e @ RuntimeError::NotAnswering { waited, .. }) = e else {
            panic!("{e:?}");
        };
        assert_eq!(waited, CHANGE_WAIT);
        let answer = crate::api::ApiError::from(e);
        assert_eq!(
            (answer.status.as_u16(), answer.code),
            (503, "tunnel_not_answering")
        );
        // The change may never have reached the task: once it answers again,
        // the supervisor's next pass gives it the whole stored peer set.
        assert_eq!(control.runtime.unsynced(), std::slice::from_ref(&f.acme));
        drop(control);
        let started = tokio::time::Instant::now();
        crate::api::supervisor::resync(&f.state).await;
        assert_eq!(
            started.elapsed(),
            PROBE_WAIT,
            "the pass waited for the deaf tunnel only as long as a probe"
        );
        let unsynced = || async { f.state.control.lock().await.runtime.unsynced() };
        assert_eq!(unsynced().await.len(), 1, "still deaf");
        f.state
            .control
            .lock()
            .await
            .runtime
            .unwedge_task(&f.acme, heard);
        crate::api::supervisor::resync(&f.state).await;
        assert!(unsynced().await.is_empty());
        drop(queue);
    }

    /// A client that takes gzip (Prometheus) gets the text compressed, and
    /// says so; one that does not, or refuses it, gets it as it is.
    #[tokio::test]
    async fn gzip_for_whoever_asks() {
        use std::io::Read;
        let f = crate::api::testing::fixture().await;
        let scraped = |accept: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(ACCEPT_ENCODING, accept.parse().unwrap());
            }
            let state = Arc::clone(&f.state);
            async move {
                let answer = scrape(State(state), headers).await;
                assert_eq!(answer.status(), axum::http::StatusCode::OK);
                assert_eq!(answer.headers()[VARY], "accept-encoding");
                let encoding = answer.headers().get(CONTENT_ENCODING).cloned();
                let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (encoding, body)
            }
        };
        let (encoding, plain) = scraped(None).await;
        assert_eq!(encoding, None);
        let plain = String::from_utf8(plain.to_vec()).unwrap();
        assert!(plain.contains(r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 1"#));
        let (encoding, refused) = scraped(Some("gzip;q=0, identity")).await;
        assert_eq!((encoding, refused.starts_with(b"# HELP")), (None, true));

        let (encoding, compressed) = scraped(Some("gzip")).await;
        assert_eq!(encoding.unwrap(), "gzip");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.contains(r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 1"#));
        // The same series as the plain answer (the start time and the
        // requests counted meanwhile aside).
        let families = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("# TYPE"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(families(&text), families(&plain));
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A long answer goes in pieces that add up to the text.
    #[tokio::test]
    async fn a_long_answer_arrives_whole() {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(1));
        let turn = Arc::clone(&semaphore).acquire_owned().await.unwrap();
        let text: String = (0..100_000).map(|n| format!("s{n} {n}\n")).collect();
        let body = holding(text.clone().into(), turn);
        let got = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(got, text.as_bytes());
        assert_eq!(semaphore.available_permits(), 1);
    }

    /// One that waits longer than SCRAPE_WAIT for the scrape under way is
    /// answered 503, not queued for ever.
    #[tokio::test]
    async fn a_scrape_that_waits_too_long_is_answered_503() {
        let f = crate::api::testing::fixture().await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        let _under_way = f.state.scraping.0.acquire().await.unwrap();
        tokio::time::pause();
        let response = scrape(State(Arc::clone(&f.state)), HeaderMap::new()).await;
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
