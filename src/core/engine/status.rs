//! What the engine tells the control plane: counters, peer status, and what it
//! would do with a packet (`explain`).
//!
//! Left out: names and wire formats (peers appear by key; the API names them), and
//! events, which [`crate::core::engine::TunnelEngine::poll_event`] drains. `explain`
//! sends and counts nothing.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::TunnelEngine;
use crate::core::peer::{Peer, PeerStats};
use crate::core::policy::{decide, DropReason, Origin, PeerId, Rule, Verdict};

/// Tunnel-wide counters, plain fields bumped inline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Datagrams received on the tunnel's socket.
    pub rx_datagrams: u64,
    /// Datagrams handed to the sink.
    pub tx_datagrams: u64,
    /// Packets forwarded from one peer to another.
    pub forwarded_peer: u64,
    /// Packets from peers delivered locally (rule 4).
    pub forwarded_local: u64,
    /// Packets from the host forwarded to a peer.
    pub forwarded_host: u64,
    /// Packets sent by the egress rule.
    pub egress_hits: u64,
    /// Packets waiting in a peer's queue for its handshake.
    pub queued: u64,
    /// Completed handshakes: as initiator, a response received; as responder,
    /// the initiator's first packet on the session we answered for.
    pub handshakes: u64,
    /// Initiations answered with a handshake response (whether or not the
    /// initiator then completed the handshake).
    pub handshake_responses: u64,
    /// Cookie replies sent under load.
    pub cookie_replies: u64,
    /// Handshake messages admitted to Diffie-Hellman work, answered or not.
    pub admitted_handshakes: u64,
    /// Events discarded because nobody drained them.
    pub events_lost: u64,
    /// ICMP errors sent to peers (time exceeded, host unreachable).
    pub icmp_errors: u64,
    /// Drops, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl TunnelStats {
    /// Count of drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
    #[inline]
    pub(super) fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }
}

/// A peer's state as seen by the control plane.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Public key.
    pub public_key: [u8; 32],
    /// Last authenticated source address.
    pub endpoint: Option<SocketAddr>,
    /// When the last handshake completed.
    pub last_handshake: Option<Instant>,
    /// Whether it has a live session now.
    pub live: bool,
    /// Whether it was reported connected and not yet disconnected (the
    /// events' view, which follows `live` at the next timer tick).
    pub connected: bool,
    /// Counters.
    pub stats: PeerStats,
}

/// What the data plane would do with a packet (for the explain endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The peer assumed to have sent it (owner of the source), if any.
    pub from: Option<[u8; 32]>,
    /// The verdict.
    pub verdict: ExplainVerdict,
}

/// A verdict with peers named by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainVerdict {
    /// Sent to this peer by this rule.
    Forward { peer: [u8; 32], rule: Rule },
    /// Delivered to the tunnel's own address.
    Local,
    /// Sent to the host device (a host prefix, TUN mode).
    Host,
    /// Dropped.
    Drop(DropReason),
}

impl TunnelEngine {
    /// Status of every peer.
    pub fn peer_statuses(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers.iter().map(|p| status_of(p, now)).collect()
    }

    /// One peer's status, by key.
    pub fn peer_status(&self, key: &[u8; 32], now: Instant) -> Option<PeerStatus> {
        let id = self.peers.by_key.get(key)?;
        self.peers.get(*id).map(|p| status_of(p, now))
    }

    /// What would happen to a packet from `src` to `dst`, as if sent by the peer that
    /// owns `src` (or, for an address no peer owns, by the gateway of the pool that
    /// holds `dst`: return traffic from the internet).
    pub fn explain(&self, src: IpAddr, dst: IpAddr, now: Instant) -> Explanation {
        let origin = match self.routing.routes.lookup(src) {
            Some(&p) => Some(Origin::Peer(p)),
            None if self.routing.local.contains(&src) => Some(Origin::Host),
            None => self
                .routing
                .egress
                .iter()
                .find(|e| e.pool.contains(&dst))
                .and_then(|e| e.gateways.first())
                .map(|&g| Origin::Peer(g)),
        };
        let key = |id: PeerId| {
            self.peers
                .get(id)
                .map(|p| *p.public_key().as_bytes())
                .unwrap_or_default()
        };
        let Some(origin) = origin else {
            return Explanation {
                from: None,
                verdict: ExplainVerdict::Drop(DropReason::SpoofedSource),
            };
        };
        let verdict = decide(
            &self.routing,
            origin,
            src,
            dst,
            |g| self.peers.get(g).is_some_and(|p| p.is_live(now)),
            |p| self.peers.get(p).is_some_and(|p| p.is_client()),
        );
        Explanation {
            from: match origin {
                Origin::Peer(p) => Some(key(p)),
                Origin::Host => None,
            },
            verdict: match verdict {
                Verdict::Forward { peer, rule } => ExplainVerdict::Forward {
                    peer: key(peer),
                    rule,
                },
                Verdict::Local => ExplainVerdict::Local,
                Verdict::Host => ExplainVerdict::Host,
                Verdict::Drop { reason, .. } => ExplainVerdict::Drop(reason),
            },
        }
    }
}

pub(super) fn status_of(p: &Peer, now: Instant) -> PeerStatus {
    PeerStatus {
        public_key: *p.public_key().as_bytes(),
        endpoint: p.endpoint,
        last_handshake: p.last_handshake,
        live: p.is_live(now),
        connected: p.connected,
        stats: p.stats,
    }
}
