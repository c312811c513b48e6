//! Webhook delivery: every URL has a worker and a bounded queue of its own,
//! each event is retried a few times, and a URL that missed events is told how
//! many, at the gap.
//!
//! Left out: what goes into the queue (`hub`), and any delivery guarantee
//! beyond the retries: a receiver that needs every event reads the peers'
//! state again after a `lagged`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{EventStats, Lagged, Published, Queued};

/// Delivery attempts per event and URL, and the pause before each retry.
pub(super) const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(8),
];

/// Posts every queued event to every URL, with retries, in order. Each URL has
/// a worker and a queue of its own (as deep as `queue`): a URL that is down
/// holds up only its own deliveries, and an event that finds its queue full is
/// dropped for that URL and counted. Once its queue is half empty again,
/// the URL is first sent a `lagged` event saying how many it missed (as an
/// SSE subscriber is: at the gap), and that is logged (at most every 10 s per
/// URL). Half, not one slot: a receiver that stays slower than the events
/// would otherwise get a `lagged` event for every one it takes, and resync as
/// often.
pub async fn run_webhooks(
    mut queue: mpsc::Receiver<Queued>,
    urls: Vec<String>,
    timeout: Duration,
    stats: Arc<EventStats>,
) {
    // A receiver's redirect is not followed: the URL the operator configured
    // is the only place events go.
    let client = match reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks disabled: no HTTP client");
            // Disabled, not ended: the appliance takes a task that ends for a
            // bug and stops; events are still counted as dropped upstream.
            return std::future::pending().await;
        }
    };
    let room = queue.max_capacity().div_ceil(2);
    let mut workers: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (tx, rx) = mpsc::channel(queue.max_capacity());
            let name = redacted(&url);
            tokio::spawn(deliver(rx, url, client.clone(), Arc::clone(&stats)));
            UrlQueue {
                tx,
                missed: 0,
                name,
                warned: None,
            }
        })
        .collect();
    while let Some(Queued { lost_before, event }) = queue.recv().await {
        for url in &mut workers {
            url.missed += lost_before;
            if url.missed != 0 && url.tx.capacity() >= room {
                let lagged = Published::Lagged(Lagged::now(url.missed));
                if url.tx.try_send(lagged).is_ok() {
                    url.told();
                }
            }
            if url.missed != 0 || url.tx.try_send(event.clone()).is_err() {
                url.missed += 1;
                stats.webhook_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One URL's queue, seen from the fan-out.
pub(super) struct UrlQueue {
    tx: mpsc::Sender<Published>,
    /// Events it missed since it was last told.
    missed: u64,
    /// The URL as logs show it.
    name: String,
    /// When a loss was last logged.
    warned: Option<std::time::Instant>,
}

impl UrlQueue {
    /// The URL was just sent a `lagged` event for what it missed.
    fn told(&mut self) {
        let now = std::time::Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.warned = Some(now);
            tracing::warn!(url = %self.name, missed = self.missed,
                "webhook receiver fell behind: events were dropped for it, a lagged event says how many");
        }
        self.missed = 0;
    }
}

/// `url` as logs show it: credentials and query (where a receiver's token may
/// be) left out.
pub(super) fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(port) => format!("{}://{host}:{port}{}", u.scheme(), u.path()),
                None => format!("{}://{host}{}", u.scheme(), u.path()),
            }
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Posts the events of `queue` to `url`, one at a time, each retried after
/// [`RETRY_DELAYS`].
pub(super) async fn deliver(
    mut queue: mpsc::Receiver<Published>,
    url: String,
    client: reqwest::Client,
    stats: Arc<EventStats>,
) {
    let shown = redacted(&url);
    while let Some(event) = queue.recv().await {
        let mut delivered = false;
        for attempt in 0..=RETRY_DELAYS.len() {
            match client.post(&url).json(&event).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => {
                    tracing::warn!(url = %shown, status = %r.status(), attempt, "webhook refused")
                }
                Err(e) => {
                    tracing::warn!(url = %shown, error = %e.without_url(), attempt, "webhook failed")
                }
            }
            if let Some(delay) = RETRY_DELAYS.get(attempt) {
                tokio::time::sleep(*delay).await;
            }
        }
        let counter = if delivered {
            &stats.webhook_delivered
        } else {
            &stats.webhook_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
