//! The event hub: names each engine event after its tenant and object, keeps
//! the routers' endpoints on their way to the store, and fans events out to
//! SSE subscribers and the webhooks' queue.
//!
//! Left out: delivery to URLs (`webhooks`), and the SSE streams (`api::events`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::core::engine::Event;
use crate::io::runtime::TunnelEvent;
use crate::io::tunnel::News;

use super::{
    Directory, EventStats, Heard, Lagged, NotStored, PeerEvent, Published, Queued, Seen,
    HEARD_BATCH, LAG_SETTLE, STORE_RETRY,
};

/// Turns an engine event of `tenant`'s tunnel, seen `at`, into a platform
/// event about `peer`, as it was announced (a disconnect carries the endpoint
/// the peer was last announced at).
pub(super) fn describe(
    tenant: &str,
    at: std::time::SystemTime,
    e: &Event,
    peer: Announced,
) -> PeerEvent {
    let event = match e {
        Event::Connected { .. } => "peer_connected",
        Event::Disconnected { .. } => "peer_disconnected",
        Event::Roamed { .. } => "peer_roamed",
    };
    let Announced {
        name: (kind, id),
        endpoint,
    } = peer;
    PeerEvent {
        event,
        tenant_id: tenant.to_owned(),
        kind,
        id,
        public_key: crate::keys::encode(peer_key(e)),
        endpoint: endpoint.map(|a| a.to_string()),
        at: crate::io::wall::rfc3339(at),
    }
}

/// Where `e` heard its peer: none for a disconnect.
fn heard_at(e: &Event) -> Option<SocketAddr> {
    match *e {
        Event::Connected { endpoint, .. } => endpoint,
        Event::Roamed { endpoint, .. } => Some(endpoint),
        Event::Disconnected { .. } => None,
    }
}

pub(super) fn peer_key(e: &Event) -> &[u8; 32] {
    match e {
        Event::Connected { peer, .. }
        | Event::Disconnected { peer }
        | Event::Roamed { peer, .. } => peer,
    }
}

/// The peers the platform was told are connected, named as they were then: a
/// peer deleted, or given a new key, is still named in its `peer_disconnected`
/// as in its `peer_connected`, and that event carries the endpoint it was last
/// announced at.
#[derive(Default)]
pub(super) struct Names(HashMap<PeerAt, Announced>);

/// A peer as the platform was told of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Announced {
    pub(super) name: Name,
    /// The endpoint its last `peer_connected` or `peer_roamed` gave.
    pub(super) endpoint: Option<SocketAddr>,
}

/// A peer: its tenant and public key.
type PeerAt = (Arc<str>, [u8; 32]);

/// A peer's kind (`router`, `client`) and id.
pub(super) type Name = (&'static str, String);

impl Names {
    /// `e`'s peer as it is to be announced: for a disconnect as it was last
    /// announced, and none for a peer whose connect was not published (a
    /// second report of the same disconnect, say: every `peer_connected` gets
    /// one `peer_disconnected`); otherwise named by the registry and heard
    /// where `e` says (remembered for the disconnect).
    async fn name(
        &mut self,
        directory: &impl Directory,
        tenant: &Arc<str>,
        e: &Event,
    ) -> Option<Announced> {
        let at = (Arc::clone(tenant), *peer_key(e));
        if let Event::Disconnected { .. } = e {
            return self.0.remove(&at);
        }
        let name = directory.resolve(tenant, &at.1).await?;
        let peer = Announced {
            name,
            endpoint: heard_at(e),
        };
        self.0.insert(at, peer.clone());
        Some(peer)
    }

    /// `tenant`'s tunnel stopped: its peers that were announced connected,
    /// forgotten now (each gets its `peer_disconnected`).
    fn stopped(&mut self, tenant: &str) -> Vec<([u8; 32], Announced)> {
        self.take(|(t, _)| &**t == tenant)
            .into_iter()
            .map(|((_, key), name)| (key, name))
            .collect()
    }

    /// After a pass over the tunnels: takes out, and returns, the peers that
    /// `seen`'s tunnels no longer count as connected, and those of tenants
    /// that are gone (deleted while the `Stopped` of their tunnel was lost);
    /// those of tunnels that did not answer stay. Their `peer_disconnected`
    /// was lost with the events, or is still on its way (then it finds no
    /// name and is moot): announced now, each connect still gets one
    /// disconnect, not one long after, when the tunnel stops, or never.
    fn keep_seen(&mut self, seen: &Seen) -> Vec<(Arc<str>, [u8; 32], Announced)> {
        self.take(|at| {
            !seen.registered.contains(&at.0)
                || (seen.tenants.contains(&at.0) && !seen.connected.contains(at))
        })
        .into_iter()
        .map(|((tenant, key), name)| (tenant, key, name))
        .collect()
    }

    /// Takes out the peers `which` picks, with their names.
    fn take(&mut self, which: impl Fn(&PeerAt) -> bool) -> Vec<(PeerAt, Announced)> {
        let picked: Vec<_> = self.0.keys().filter(|at| which(at)).cloned().collect();
        picked
            .into_iter()
            .filter_map(|at| self.0.remove(&at).map(|name| (at, name)))
            .collect()
    }
}

/// Router endpoints on their way to the store.
#[derive(Default)]
pub(super) struct Keeping {
    /// Heard since the last hand-over, oldest first.
    heard: Vec<Heard>,
    /// Set while the store has refused endpoints: when to take every router's
    /// endpoint from the tunnels again.
    retry_at: Option<tokio::time::Instant>,
}

impl Keeping {
    /// Hands what was heard to the directory; a refusal schedules a retry.
    async fn hand_over(&mut self, directory: &impl Directory) {
        let heard = std::mem::take(&mut self.heard);
        if directory.routers_heard_at(heard).await.is_err() && self.retry_at.is_none() {
            self.retry_at = Some(tokio::time::Instant::now() + STORE_RETRY);
        }
    }

    /// Events were lost: every router's endpoint is taken from the tunnels
    /// within [`LAG_SETTLE`] (or sooner, if a pass was due already).
    fn reconcile_soon(&mut self) {
        let at = tokio::time::Instant::now() + LAG_SETTLE;
        self.retry_at = Some(self.retry_at.map_or(at, |due| due.min(at)));
    }

    /// Has every router's endpoint taken from the tunnels, which covers
    /// whatever was heard, lost or refused before; returns what the pass saw.
    async fn reconcile(&mut self, directory: &impl Directory) -> Seen {
        self.heard.clear();
        let (seen, stored) = directory.reconcile_router_endpoints().await;
        self.retry_at = match stored {
            Ok(()) => None,
            Err(NotStored) => Some(tokio::time::Instant::now() + STORE_RETRY),
        };
        seen
    }
}

/// A pass over the tunnels ([`Keeping::reconcile`]): returns the peers they
/// no longer count as connected whose disconnect was not announced yet.
async fn pass(
    keeping: &mut Keeping,
    names: &mut Names,
    directory: &impl Directory,
) -> Vec<(Arc<str>, [u8; 32], Announced)> {
    let seen = keeping.reconcile(directory).await;
    names.keep_seen(&seen)
}

/// Runs the hub until the engines' channel closes.
pub async fn run_hub(
    mut engines: broadcast::Receiver<TunnelEvent>,
    directory: impl Directory,
    subscribers: broadcast::Sender<Published>,
    webhooks: Option<mpsc::Sender<Queued>>,
    stats: Arc<EventStats>,
) {
    let mut lost = 0u64;
    let mut publish = |event: Published| {
        if let Published::Peer(e) = &event {
            tracing::info!(event = e.event, tenant = %e.tenant_id, id = %e.id, "peer event");
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
        let _ = subscribers.send(event.clone());
        if let Some(queue) = &webhooks {
            // What the queue refused is lost for every URL: the next event
            // that fits carries the count, so that each URL is told at the
            // gap, after the events that came before it.
            let queued = Queued {
                lost_before: lost,
                event,
            };
            match queue.try_send(queued) {
                Ok(()) => lost = 0,
                Err(_) => {
                    lost += 1;
                    stats.webhook_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let gone = |tenant: &Arc<str>, key: [u8; 32], peer: Announced| {
        let at = std::time::SystemTime::now();
        describe(tenant, at, &Event::Disconnected { peer: key }, peer)
    };
    let mut keeping = Keeping::default();
    let mut names = Names::default();
    loop {
        let next = if !keeping.heard.is_empty() {
            match engines.try_recv() {
                Ok(e) => Ok(e),
                Err(broadcast::error::TryRecvError::Empty) => {
                    keeping.hand_over(&directory).await;
                    continue;
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
            }
        } else if let Some(at) = keeping.retry_at {
            tokio::select! {
                next = engines.recv() => next,
                () = tokio::time::sleep_until(at) => {
                    for (tenant, peer, name) in pass(&mut keeping, &mut names, &directory).await {
                        publish(Published::Peer(gone(&tenant, peer, name)));
                    }
                    continue;
                }
            }
        } else {
            engines.recv().await
        };
        let e = match next {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                stats.lagged.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(lost = n, "event hub fell behind");
                publish(Published::Lagged(Lagged::now(n)));
                // What was lost may have moved a router: the tunnels know
                // where each one is now, which also covers what is pending.
                keeping.reconcile_soon();
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        let news = match &e.event {
            News::Peer(news) => news,
            News::Stopped => {
                for (key, peer) in names.stopped(&e.tenant) {
                    let gone = Event::Disconnected { peer: key };
                    publish(Published::Peer(describe(&e.tenant, e.at, &gone, peer)));
                }
                continue;
            }
        };
        let key = peer_key(news);
        let Some(peer) = names.name(&directory, &e.tenant, news).await else {
            // Never connected, and deleted meanwhile: its event is moot.
            continue;
        };
        // Routers are where the appliance may have to reach out first (a
        // gateway to wake, a router the backend talks to): their endpoint is
        // kept. Clients always dial in, from wherever their network puts them.
        if let (Some(endpoint), "router") = (heard_at(news), peer.name.0) {
            keeping.heard.push(Heard {
                tenant: Arc::clone(&e.tenant),
                key: *key,
                endpoint,
            });
        }
        publish(Published::Peer(describe(&e.tenant, e.at, news, peer)));
        if keeping.heard.len() >= HEARD_BATCH {
            keeping.hand_over(&directory).await;
        }
    }
    if !keeping.heard.is_empty() {
        keeping.hand_over(&directory).await;
    }
    // A pass that was due (after a lag, or the store's refusal) is not skipped.
    if keeping.retry_at.is_some() {
        for (tenant, peer, name) in pass(&mut keeping, &mut names, &directory).await {
            publish(Published::Peer(gone(&tenant, peer, name)));
        }
    }
}
