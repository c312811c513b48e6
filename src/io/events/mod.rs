//! Peer events for the platform: the engines' connect/disconnect/roam events, named
//! after their tenant and object, fanned out to SSE subscribers and webhooks.
//!
//! The hub never blocks a tunnel: engines hand events to a broadcast channel; the
//! hub resolves names under the control lock (events are rare) and hands them on.
//! It also has the control plane keep where each router was last authenticated,
//! so that a restarted appliance can reach its routers and gateways first.
//! Webhook delivery has its own bounded queue and retries; when the queue is full
//! the event is dropped for webhooks and counted, never waited for. When the hub
//! itself falls behind the tunnels, the events it lost are not recovered: it
//! tells subscribers and webhooks how many were lost (`lagged`), so that they
//! read the peers' state again.
//!
//! Its parts: `hub` (names, endpoints to keep, fan-out) and `webhooks`
//! (delivery, retries, a queue per URL).
//!
//! Left out: the events themselves (the engines'), and what the platform does
//! with them.

mod hub;
#[cfg(test)]
mod tests;
mod webhooks;

pub use hub::run_hub;
pub use webhooks::run_webhooks;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// An event as the platform sees it (SSE data and webhook body).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PeerEvent {
    /// `peer_connected`, `peer_disconnected` or `peer_roamed`.
    pub event: &'static str,
    pub tenant_id: String,
    /// `router` or `client`.
    pub kind: &'static str,
    pub id: String,
    pub public_key: String,
    /// Where the peer was heard (`address:port`): for a `peer_disconnected`,
    /// where its last `peer_connected` or `peer_roamed` said.
    pub endpoint: Option<String>,
    /// RFC 3339 UTC.
    pub at: String,
}

/// The hub, or a subscriber, fell behind and lost `missed` events (SSE data and
/// webhook body of a `lagged` event): whoever follows the events should read
/// the peers' state again, since events are not replayed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Lagged {
    /// Always `lagged`.
    pub event: &'static str,
    pub missed: u64,
    /// RFC 3339 UTC: when the loss was noticed.
    pub at: String,
}

impl Lagged {
    /// `missed` events lost, noticed now.
    pub fn now(missed: u64) -> Self {
        Lagged {
            event: "lagged",
            missed,
            at: crate::io::wall::rfc3339(std::time::SystemTime::now()),
        }
    }
}

/// What the hub hands on to SSE subscribers and webhooks; serialized as the
/// event itself (its `event` field names it).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Published {
    Peer(PeerEvent),
    Lagged(Lagged),
}

impl Published {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            Published::Peer(e) => e.event,
            Published::Lagged(l) => l.event,
        }
    }
}

/// The store refused to keep router endpoints (the implementation logs why);
/// the hub takes them from the tunnels again after [`STORE_RETRY`].
#[derive(Debug, thiserror::Error)]
#[error("router endpoints could not be stored")]
pub struct NotStored;

/// What the hub needs of the control plane.
pub trait Directory {
    /// Names a peer: (kind, id) of the object in `tenant` with this public key.
    fn resolve(
        &self,
        tenant: &str,
        key: &[u8; 32],
    ) -> impl std::future::Future<Output = Option<(&'static str, String)>> + Send;

    /// Routers were authenticated at these endpoints, oldest first: keep the
    /// last of each across restarts (stored in one transaction, and only where
    /// it changed).
    fn routers_heard_at(
        &self,
        heard: Vec<Heard>,
    ) -> impl std::future::Future<Output = Result<(), NotStored>> + Send;

    /// Events were lost, or endpoints could not be stored: keep every
    /// router's endpoint as the running tunnels know it now, as
    /// `routers_heard_at` does; and say which peers the tunnels it asked
    /// count as connected.
    fn reconcile_router_endpoints(
        &self,
    ) -> impl std::future::Future<Output = (Seen, Result<(), NotStored>)> + Send;
}

/// What a pass over the running tunnels saw: the tenants it asked (every
/// tenant there is), those whose tunnel answered, and their peers that are
/// connected.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub registered: std::collections::HashSet<Arc<str>>,
    pub tenants: std::collections::HashSet<Arc<str>>,
    pub connected: std::collections::HashSet<(Arc<str>, [u8; 32])>,
}

/// A router of `tenant`, by public key, was authenticated at `endpoint`.
#[derive(Debug, Clone)]
pub struct Heard {
    pub tenant: Arc<str>,
    pub key: [u8; 32],
    pub endpoint: SocketAddr,
}

/// Most router endpoints handed to the directory at once. The hub hands them
/// over as soon as no event is waiting, so a reconnect wave after a restart
/// costs a few transactions, not one per router.
const HEARD_BATCH: usize = 1024;

/// How long the hub waits before it tries again to store endpoints the store
/// refused (a full or failing disk): long enough not to hammer a broken disk
/// with a walk over every router, short enough that a restart soon after the
/// disk is mended still finds its routers.
pub const STORE_RETRY: Duration = Duration::from_secs(10);

/// After the hub fell behind, how long it waits before it takes every
/// router's endpoint from the tunnels: further lags meanwhile (a reconnect
/// wave) cost that one pass, not one each.
pub const LAG_SETTLE: Duration = Duration::from_secs(2);

/// Counters of the event path.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events published to subscribers.
    pub published: AtomicU64,
    /// Webhook deliveries that succeeded.
    pub webhook_delivered: AtomicU64,
    /// Webhook deliveries that failed after every retry.
    pub webhook_failed: AtomicU64,
    /// Events not queued for webhooks because the queue was full (the hub's,
    /// or one URL's).
    pub webhook_dropped: AtomicU64,
    /// Events SSE subscribers missed because they fell behind (each was sent a
    /// `lagged` event saying how many).
    pub subscriber_missed: AtomicU64,
    /// Engine events lost because the hub fell behind.
    pub lagged: AtomicU64,
}

/// An event for the webhooks, with how many events the hub's queue refused
/// just before it (lost for every URL).
#[derive(Debug)]
pub struct Queued {
    pub lost_before: u64,
    pub event: Published,
}

impl From<Published> for Queued {
    fn from(event: Published) -> Self {
        Queued {
            lost_before: 0,
            event,
        }
    }
}
