//! A datagram from the tunnel's socket: demultiplexed by receiver index (or,
//! for an initiation, by endpoint hint or key), admitted, decrypted, then routed;
//! and the bookkeeping of authenticated sessions (liveness, roaming, events).
//!
//! Left out: the admission rules ([`crate::core::admission`]), the Noise work (`peer`),
//! the routing rules (`route`), and disconnects and delayed roam announcements, which
//! come from the timers ([`crate::core::engine::TunnelEngine::handle_timers`]) and, for
//! removed peers, from `changes`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use boringtun::x25519::{PublicKey, StaticSecret};

use super::peers::Peers;
use super::route::route;
use super::status::TunnelStats;
use super::strangers::Strangers;
use super::{trim_events, Event, Sink, TunnelEngine};
use crate::core::admission::Refusal;
use crate::core::netstack::LocalStack;
use crate::core::peer::{
    answerable, initiator_key, message_type, Decap, Message, Path, Peer, ROAM_ANNOUNCE_INTERVAL,
};
use crate::core::policy::{DropReason, Origin, PeerId};

impl TunnelEngine {
    /// Counts a datagram the driver did not hand over (a handshake initiation
    /// beyond what it holds for later turns), dropped for `reason`.
    pub fn refuse_datagram(&mut self, reason: DropReason) {
        self.stats.rx_datagrams += 1;
        self.stats.drop(reason);
    }

    /// Handles one datagram received on the tunnel's socket from `from`, the
    /// socket bound to one address ([`Self::handle_datagram_at`] with `None`).
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        sink: &mut impl Sink,
    ) {
        self.handle_datagram_at(from, None, datagram, now, sink);
    }

    /// Handles one datagram received on the tunnel's socket from `from`, sent
    /// to the tunnel's own address `at` (known where the socket is bound to a
    /// wildcard address): what answers it leaves from `at`.
    pub fn handle_datagram_at(
        &mut self,
        from: SocketAddr,
        at: Option<IpAddr>,
        datagram: &[u8],
        now: Instant,
        sink: &mut impl Sink,
    ) {
        self.stats.rx_datagrams += 1;
        let path = Path::arrived(from, at);
        let from = path.remote;
        // Before anything could answer it (a cookie reply, say).
        if !answerable(from) {
            return self.stats.drop(DropReason::UnanswerableSource);
        }
        let Some(message) = Message::classify(datagram) else {
            self.stats.drop(DropReason::InvalidDatagram);
            return;
        };
        if message.is_handshake() && !self.admit(path, datagram, now, sink) {
            return;
        }
        let Self {
            secret,
            public,
            peers,
            endpoints,
            routing,
            stats,
            events,
            rx,
            tx,
            local,
            icmp,
            strangers,
            ..
        } = self;
        // An initiation from an endpoint a peer was last seen at goes to that
        // peer's `Tunn` directly; only if it carries another key is the sender
        // found by decrypting its key (one Diffie-Hellman more).
        let hint = match message {
            Message::Initiation => endpoints.get(&from).copied(),
            _ => None,
        };
        let mut identify =
            |peers: &Peers| identify(secret, public, strangers, peers, from, datagram, now);
        let found = match (message.peer_index(), hint) {
            (None, Some(id)) => Ok(id),
            (None, None) => identify(peers),
            (Some(index), _) => peers
                .by_index
                .get(&index)
                .copied()
                .ok_or(DropReason::UnknownIndex),
        };
        let mut id = match found {
            Ok(id) => id,
            Err(reason) => return stats.drop(reason),
        };
        // A peer joins the active list only once this datagram authenticated:
        // an initiation that fails leaves it as it was.
        let mut list = false;
        let Some(mut peer) = peers.get_mut(id) else {
            return stats.drop(DropReason::UnknownIndex);
        };
        let mut decap = peer.decapsulate(from.ip(), datagram, rx);
        if matches!(decap, Decap::WrongPeer) && hint.is_some() {
            id = match identify(peers) {
                Ok(id) => id,
                Err(reason) => return stats.drop(reason),
            };
            let Some(found) = peers.get_mut(id) else {
                return stats.drop(DropReason::UnknownPeer);
            };
            peer = found;
            decap = peer.decapsulate(from.ip(), datagram, rx);
        }

        match decap {
            Decap::Reply(reply) => {
                let kind = message_type(reply);
                stats.tx_datagrams += 1;
                peer.stats.tx_bytes += reply.len() as u64;
                sink.send_from(from, path.local, reply);
                match (message, kind) {
                    // Our response (type 2) to an initiation: the initiator
                    // holds the key it claims, but the session is not usable
                    // (nor the peer live) until its first packet on it arrives.
                    // A replayed initiation is answered too once the peer's
                    // protocol state was dropped (see `Peer::stop_protocol`),
                    // so the endpoint, known or not, is set only by that
                    // packet: a replay from a forged source never becomes
                    // where keepalives and initiations go.
                    (Message::Initiation, 2) => {
                        list = true;
                        stats.handshake_responses += 1;
                        let index = reply
                            .get(4..8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u32::from_le_bytes);
                        peer.answered(index, now);
                        peer.stats.rx_bytes += datagram.len() as u64;
                    }
                    // Our keepalive (type 4) after a response to our initiation:
                    // the session is ours to use now.
                    (Message::Response { .. }, 4) => {
                        list = true;
                        authenticated(peer, id, endpoints, path, datagram.len(), now, events);
                        handshake_done(peer, now, stats, events);
                        send_queued(peer, from, tx, stats, sink);
                    }
                    _ => {}
                }
            }
            Decap::Packet(inner) => {
                list = true;
                authenticated(peer, id, endpoints, path, datagram.len(), now, events);
                // Queued packets go out before anything this one causes; they
                // live in `tx`, which `inner` (in `rx`) does not touch.
                if confirmed(peer, message, now, stats, events) {
                    send_queued(peer, from, tx, stats, sink);
                }
                peer.stats.rx_packets += 1;
                let len = inner.len();
                route(
                    peers,
                    routing,
                    stats,
                    tx,
                    icmp,
                    local.as_mut(),
                    Origin::Peer(id),
                    &mut rx[..len],
                    now,
                    sink,
                );
            }
            Decap::Nothing => {
                if matches!(message, Message::Data { .. }) {
                    list = true;
                    authenticated(peer, id, endpoints, path, datagram.len(), now, events);
                    if confirmed(peer, message, now, stats, events) {
                        send_queued(peer, from, tx, stats, sink);
                    }
                }
            }
            Decap::Drop(reason) => stats.drop(reason),
            Decap::WrongPeer => stats.drop(DropReason::HandshakeFailed),
        }
        if list {
            peers.list(id);
        }
        trim_events(events, stats);
        // The stack runs only when this datagram gave it something, or when its
        // timers are due: peer-to-peer transit never pays for a poll.
        let delivered = local.as_ref().is_some_and(LocalStack::has_input);
        if delivered || self.local_at.is_some_and(|at| now >= at) {
            self.flush_local(now, sink);
        }
    }
}

impl TunnelEngine {
    /// Lets a handshake message on to the Diffie-Hellman work, or answers it
    /// with a cookie reply under load, or drops it beyond the process-wide
    /// budget. A response costs boringtun two Diffie-Hellmans before its AEAD
    /// check, so responses pass here too (as in kernel WireGuard), not only
    /// initiations. False when the datagram is dealt with.
    fn admit(&mut self, path: Path, datagram: &[u8], now: Instant, sink: &mut impl Sink) -> bool {
        let stats = &mut self.stats;
        match self
            .admission
            .admit(path.remote.ip(), datagram, now, &mut self.tx)
        {
            Ok(()) => {
                stats.admitted_handshakes += 1;
                true
            }
            Err(Refusal::Cookie(cookie)) => {
                stats.cookie_replies += 1;
                stats.tx_datagrams += 1;
                sink.send_from(path.remote, path.local, cookie);
                false
            }
            Err(Refusal::Drop(reason)) => {
                stats.drop(reason);
                false
            }
        }
    }
}

/// The peer whose key sent the initiation `datagram` (one Diffie-Hellman to
/// decrypt it). A key that is no peer is remembered (`strangers`) for the
/// operator.
fn identify(
    secret: &StaticSecret,
    public: &PublicKey,
    strangers: &mut Strangers,
    peers: &Peers,
    from: SocketAddr,
    datagram: &[u8],
    now: Instant,
) -> Result<PeerId, DropReason> {
    let key = initiator_key(secret, public, datagram)?;
    let found = peers.by_key.get(&key).copied();
    if found.is_none() {
        strangers.knocked(key, from, now);
    }
    found.ok_or(DropReason::UnknownPeer)
}

/// Bookkeeping for an authenticated datagram of a session: counters, liveness
/// and roaming. A peer that went quiet and was reported disconnected, then
/// speaks again on a session still current, is connected again.
#[inline]
pub(super) fn authenticated(
    peer: &mut Peer,
    id: PeerId,
    endpoints: &mut HashMap<SocketAddr, PeerId>,
    path: Path,
    len: usize,
    now: Instant,
    events: &mut VecDeque<Event>,
) {
    peer.stats.rx_bytes += len as u64;
    peer.last_rx = Some(now);
    set_endpoint(peer, id, endpoints, path, now, events);
    if !peer.connected && peer.is_live(now) {
        peer.connected = true;
        peer.told = peer.endpoint;
        events.push_back(Event::Connected {
            peer: *peer.public_key().as_bytes(),
            endpoint: peer.endpoint,
        });
    }
}

/// A transport message on the session we answered for completes the handshake
/// (kernel WireGuard counts it there too). True when it did.
#[inline]
pub(super) fn confirmed(
    peer: &mut Peer,
    message: Message,
    now: Instant,
    stats: &mut TunnelStats,
    events: &mut VecDeque<Event>,
) -> bool {
    match message {
        Message::Data { receiver } if peer.answered != 0 && receiver == peer.answered => {
            peer.answered = 0;
            handshake_done(peer, now, stats, events);
            true
        }
        _ => false,
    }
}

/// Sends what boringtun queued for the peer while it had no session.
pub(super) fn send_queued(
    peer: &mut Peer,
    to: SocketAddr,
    tx: &mut [u8],
    stats: &mut TunnelStats,
    sink: &mut impl Sink,
) {
    // Counted as forwarded (`queued`) when they were queued; here they are
    // only datagrams and the peer's packets.
    while let Some(queued) = peer.poll_queued(tx) {
        stats.tx_datagrams += 1;
        peer.stats.tx_bytes += queued.len() as u64;
        peer.stats.tx_packets += 1;
        sink.send_from(to, peer.local, queued);
    }
}

/// The peer's endpoint is `path.remote` now (roaming), with the index that
/// finds it, and replies leave from `path.local`.
/// The roam is announced (`Roamed`) if none was in the last
/// [`ROAM_ANNOUNCE_INTERVAL`]; otherwise the timers announce where the peer is
/// once the interval is over ([`announce_roam`]).
#[inline]
pub(super) fn set_endpoint(
    peer: &mut Peer,
    id: PeerId,
    endpoints: &mut HashMap<SocketAddr, PeerId>,
    path: Path,
    now: Instant,
    events: &mut VecDeque<Event>,
) {
    peer.local = path.local;
    let from = path.remote;
    if peer.endpoint != Some(from) {
        let previous = peer.endpoint.replace(from);
        if let Some(old) = previous {
            if endpoints.get(&old) == Some(&id) {
                endpoints.remove(&old);
            }
        }
        endpoints.insert(from, id);
        // A roam is news only about a connected peer: one that connects from
        // a new address says where in its `Connected`.
        if previous.is_some() {
            announce_roam(peer, now, events);
        }
    }
}

/// Announces where a connected peer is when that is not where its last event
/// said, unless a roam was announced less than [`ROAM_ANNOUNCE_INTERVAL`] ago.
#[inline]
pub(super) fn announce_roam(peer: &mut Peer, now: Instant, events: &mut VecDeque<Event>) {
    let Some(endpoint) = peer.endpoint else {
        return;
    };
    if !peer.connected || peer.told == Some(endpoint) {
        return;
    }
    let due = peer
        .roam_announced
        .is_none_or(|at| now.saturating_duration_since(at) >= ROAM_ANNOUNCE_INTERVAL);
    if due {
        peer.roam_announced = Some(now);
        peer.told = Some(endpoint);
        events.push_back(Event::Roamed {
            peer: *peer.public_key().as_bytes(),
            endpoint,
        });
    }
}

pub(super) fn handshake_done(
    peer: &mut Peer,
    now: Instant,
    stats: &mut TunnelStats,
    events: &mut VecDeque<Event>,
) {
    peer.handshake_completed(now);
    peer.stats.handshakes += 1;
    stats.handshakes += 1;
    if !peer.connected {
        peer.connected = true;
        peer.told = peer.endpoint;
        events.push_back(Event::Connected {
            peer: *peer.public_key().as_bytes(),
            endpoint: peer.endpoint,
        });
    }
}
