//! The data plane of one tenant tunnel, sans IO.
//!
//! A [`TunnelEngine`] owns the tunnel's static key, its peers (each with a boringtun
//! `Tunn` once it has spoken), its routing state and its counters. Inputs are
//! `handle_*` calls that carry `now`; datagrams to send and packets for the host
//! leave through a caller-provided [`Sink`]; connection events are drained with
//! [`TunnelEngine::poll_event`].
//!
//! Cost follows activity: datagrams are found by receiver index in O(1), a repeated
//! initiation by its endpoint, a new one by decrypting its key; initiations and
//! responses pass admission (cookie replies under load, the process-wide
//! [`HandshakeBudget`]; see [`super::admission`]) before any Diffie-Hellman;
//! timers visit only active peers (a handshake or session within its lifetime,
//! packets waiting, a keepalive to keep up).
//!
//! One engine serves exactly one tunnel, so no lookup can ever reach another tenant:
//! isolation holds by construction. The engine opens no socket, spawns nothing and
//! reads no clock (boringtun's internal protocol timers excepted, see `peer`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::admission::{Admission, Refusal};
use super::budget::HandshakeBudget;
use super::netstack::{ConnId, LocalStack, StackError};
use super::packet;
use super::peer::{
    initiator_key, message_type, Decap, Encap, Message, Peer, PeerConfig, PeerStats,
};
use super::policy::{decide, DropReason, Egress, Origin, PeerId, RoutingState, Rule, Verdict};
use super::table::PrefixTable;

/// Largest datagram or inner packet handled, plus room for WireGuard's overhead.
const BUF_LEN: usize = 65_536 + 256;

pub use super::admission::DEFAULT_HANDSHAKES_PER_SECOND;

/// Events kept for the control plane before the oldest are discarded. The driver
/// drains them after every batch, so this only bounds memory if nobody listens.
const MAX_EVENTS: usize = 4_096;

/// Where the engine's outputs go. Implemented by the IO driver and by tests.
pub trait Sink {
    /// Sends `datagram` from the tunnel's socket to `to`.
    fn send(&mut self, to: SocketAddr, datagram: &[u8]);
    /// Delivers a packet addressed to the tunnel's own address; false if nothing
    /// (host device or local stack) takes it.
    fn local(&mut self, packet: &[u8]) -> bool;
}

/// An egress policy as configured: gateways named by public key, primary first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// Client pool.
    pub pool: IpNet,
    /// Gateway peers' public keys, primary first.
    pub gateways: Vec<[u8; 32]>,
}

/// Something the control plane wants to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// First completed handshake after being disconnected.
    Connected {
        peer: [u8; 32],
        endpoint: Option<SocketAddr>,
    },
    /// The session expired or the peer went silent.
    Disconnected { peer: [u8; 32] },
    /// An authenticated datagram came from a new endpoint.
    Roamed {
        peer: [u8; 32],
        endpoint: SocketAddr,
    },
}

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
    /// Events discarded because nobody drained them.
    pub events_lost: u64,
    /// Drops, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl TunnelStats {
    /// Count of drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
    #[inline]
    fn drop(&mut self, reason: DropReason) {
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

/// Why a control change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Another peer of the tunnel already owns exactly this prefix.
    #[error("prefix {prefix} already belongs to another peer")]
    PrefixTaken { prefix: IpNet },
    /// The peer index is already used by another peer.
    #[error("receiver index {index} is already in use")]
    IndexTaken { index: u32 },
    /// The peer index is 0 or does not fit in 24 bits (boringtun shifts it
    /// left by 8).
    #[error("receiver index {index} is outside 1 to 2^24 - 1")]
    BadIndex { index: u32 },
}

/// Slot storage for peers with O(1) lookups by key and by receiver index.
#[derive(Default)]
struct Peers {
    slots: Vec<Option<Peer>>,
    free: Vec<PeerId>,
    by_key: HashMap<[u8; 32], PeerId>,
    by_index: HashMap<u32, PeerId>,
    /// Peers with timer work: a handshake completed or protocol work started
    /// within a session's lifetime, packets waiting, or a keepalive to keep up
    /// (see [`Peer::idle`]). The only ones [`TunnelEngine::handle_timers`] visits.
    active: Vec<PeerId>,
    /// Removed peers may still be on `active` (see [`Peers::prune_active`]).
    stale: bool,
    /// Passes over `active` that removals cost.
    #[cfg(test)]
    prunes: usize,
}

impl Peers {
    #[inline]
    fn get(&self, id: PeerId) -> Option<&Peer> {
        self.slots.get(id as usize)?.as_ref()
    }
    #[inline]
    fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.slots.get_mut(id as usize)?.as_mut()
    }
    /// Room for `n` more peers at once: a tunnel's start-up then allocates each
    /// table once instead of growing it step by step (whose freed steps stay in
    /// the process's memory, about 200 B per peer at 100 peers per tunnel).
    fn reserve(&mut self, n: usize) {
        let more = n.saturating_sub(self.free.len());
        self.slots.reserve(more);
        self.by_key.reserve(n);
        self.by_index.reserve(n);
    }
    fn insert(&mut self, peer: Peer) -> PeerId {
        // A reused slot must not inherit a removed peer's place on the list.
        self.prune_active();
        let key = *peer.public_key().as_bytes();
        let index = peer.index;
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(peer);
                id
            }
            None => {
                self.slots.push(Some(peer));
                (self.slots.len() - 1) as PeerId
            }
        };
        self.by_key.insert(key, id);
        self.by_index.insert(index, id);
        id
    }
    /// Removes peer `id`. Its place on the active list goes at the next
    /// [`Peers::prune_active`] (before any insert at the latest), so that k
    /// removals cost one pass over the list, not k.
    fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let peer = self.slots.get_mut(id as usize)?.take()?;
        self.by_key.remove(peer.public_key().as_bytes());
        self.by_index.remove(&peer.index);
        self.stale |= peer.listed;
        self.free.push(id);
        Some(peer)
    }
    /// Takes removed peers off the active list: one pass, if any is on it.
    fn prune_active(&mut self) {
        if std::mem::take(&mut self.stale) {
            let slots = &self.slots;
            self.active
                .retain(|&a| slots.get(a as usize).is_some_and(Option::is_some));
            #[cfg(test)]
            {
                self.prunes += 1;
            }
        }
    }
    /// Gives peer `id` protocol state (if it has none yet) and lists it among
    /// the active peers. Called before a handshake or a packet we send to it.
    #[inline]
    fn activate(&mut self, id: PeerId) {
        if let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) {
            if !peer.listed {
                peer.start_protocol();
                peer.listed = true;
                self.active.push(id);
            }
        }
    }
    /// Lists peer `id` among the active peers, once a datagram from it
    /// authenticated (its protocol state exists then).
    #[inline]
    fn list(&mut self, id: PeerId) {
        if let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) {
            if !peer.listed {
                peer.listed = true;
                self.active.push(id);
            }
        }
    }
    fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.slots.iter().flatten()
    }
}

/// The data plane of one tunnel.
pub struct TunnelEngine {
    secret: Arc<StaticSecret>,
    public: PublicKey,
    /// Which initiations get Diffie-Hellman work: cookies under load.
    admission: Admission,
    liveness_timeout: Duration,
    peers: Peers,
    /// The peer last authenticated at each endpoint: a hint that lets a repeated
    /// initiation skip the Diffie-Hellman that finds its sender. Stale entries are
    /// harmless (the hinted peer refuses a foreign key without changing state).
    endpoints: HashMap<SocketAddr, PeerId>,
    routing: RoutingState,
    egress: Vec<EgressConfig>,
    stats: TunnelStats,
    events: VecDeque<Event>,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    local: Option<LocalStack>,
    /// When the local stack next needs a poll for its timers, as of its last one.
    local_at: Option<Instant>,
}

impl TunnelEngine {
    /// An engine for a tunnel with this static key and these own addresses.
    pub fn new(secret: StaticSecret, local: Vec<IpAddr>) -> Self {
        let public = PublicKey::from(&secret);
        Self {
            admission: Admission::new(&public, DEFAULT_HANDSHAKES_PER_SECOND),
            secret: Arc::new(secret),
            public,
            liveness_timeout: super::peer::DEFAULT_LIVENESS_TIMEOUT,
            peers: Peers::default(),
            endpoints: HashMap::new(),
            routing: RoutingState {
                local,
                // Until a userspace stack is given, the sink (the host device)
                // serves the tunnel's own address.
                local_is_host: true,
                ..Default::default()
            },
            egress: Vec::new(),
            stats: TunnelStats::default(),
            events: VecDeque::new(),
            rx: vec![0; BUF_LEN].into_boxed_slice(),
            tx: vec![0; BUF_LEN].into_boxed_slice(),
            local: None,
            local_at: None,
        }
    }

    /// Serves the tunnel's own addresses with the userspace stack (ping, TCP to
    /// peers) instead of handing local packets to the sink: `address/prefix_len`,
    /// and the IPv6 address among the engine's own addresses, if there is one.
    #[must_use]
    pub fn with_local_stack(
        mut self,
        address: std::net::Ipv4Addr,
        prefix_len: u8,
        now: Instant,
    ) -> Self {
        let mut stack = LocalStack::new(address, prefix_len, now);
        if let Some(IpAddr::V6(v6)) = self.routing.local.iter().find(|a| a.is_ipv6()) {
            stack = stack.with_ipv6(*v6);
        }
        self.local = Some(stack);
        self.routing.local_is_host = false;
        self
    }

    /// Sets how long a peer may stay silent before it counts as gone (gateway
    /// failover, `peer_disconnected`). Applies to peers added afterwards.
    #[must_use]
    pub fn with_liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// Shares the process-wide handshake budget: when it runs dry, initiations
    /// get cookie replies or are dropped (`under_load`) before any
    /// Diffie-Hellman work (see [`super::admission`]).
    #[must_use]
    pub fn with_handshake_budget(mut self, budget: Arc<HandshakeBudget>) -> Self {
        self.admission.set_budget(budget);
        self
    }

    /// Sets how many handshake initiations per second the tunnel answers before
    /// it answers with cookie replies instead.
    #[must_use]
    pub fn with_handshake_limit(mut self, initiations_per_second: u32) -> Self {
        self.admission.set_per_second(initiations_per_second);
        self
    }

    // ---- getters ----

    /// True while some peer has protocol timers to run; an idle tunnel's driver
    /// may skip [`Self::handle_timers`] until this turns true again.
    pub fn needs_timers(&self) -> bool {
        !self.peers.active.is_empty()
    }

    /// Peers with timer work: a handshake or a session within its lifetime,
    /// packets waiting, or a keepalive to keep up. A peer that stays quiet for a
    /// session's lifetime leaves them (and comes back when it speaks again).
    pub fn active_peer_count(&self) -> usize {
        self.peers.active.len()
    }

    /// The tunnel's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Tunnel-wide counters.
    pub fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.by_key.len()
    }

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
        let verdict = decide(&self.routing, origin, src, dst, |g| {
            self.peers.get(g).is_some_and(|p| p.is_live(now))
        });
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

    // ---- mutators (control plane) ----

    /// Adds a peer, or updates the prefixes and kind of an existing one without
    /// touching its session (its keepalive is fixed once its protocol state
    /// exists: boringtun has no setter). A configured endpoint is where to reach
    /// a peer that has not spoken yet: it never replaces one the peer was
    /// authenticated from. `index` is used only when the peer is new, and must
    /// then be in 1 to 2^24 - 1.
    pub fn upsert_peer(&mut self, config: PeerConfig, index: u32) -> Result<(), EngineError> {
        let key = *config.public_key.as_bytes();
        let existing = self.peers.by_key.get(&key).copied();
        for prefix in &config.allowed {
            match self.routing.routes.get_exact(*prefix) {
                Some(&owner) if Some(owner) != existing => {
                    return Err(EngineError::PrefixTaken { prefix: *prefix })
                }
                _ => {}
            }
        }
        let id = match existing {
            Some(id) => {
                self.reach_at(id, config.endpoint);
                let Some(peer) = self.peers.get_mut(id) else {
                    return Ok(());
                };
                peer.config.kind = config.kind;
                if peer.config.allowed == config.allowed {
                    return Ok(());
                }
                for old in std::mem::take(&mut peer.config.allowed) {
                    if self.routing.routes.get_exact(old) == Some(&id) {
                        self.routing.routes.remove(old);
                    }
                }
                peer.config.allowed.clone_from(&config.allowed);
                id
            }
            None => {
                if index == 0 || index >= super::alloc::INDEX_SPACE {
                    return Err(EngineError::BadIndex { index });
                }
                if self.peers.by_index.contains_key(&index) {
                    return Err(EngineError::IndexTaken { index });
                }
                let peer = Peer::new(
                    Arc::clone(&self.secret),
                    config.clone(),
                    index,
                    self.admission.macs(),
                    self.liveness_timeout,
                );
                let id = self.peers.insert(peer);
                self.reach_at(id, config.endpoint);
                id
            }
        };
        for prefix in config.allowed {
            self.routing.routes.insert(prefix, id);
        }
        self.resolve_egress();
        Ok(())
    }

    /// A configured endpoint for peer `id`: where to reach it while it has not
    /// spoken (a peer heard from elsewhere keeps that). A peer kept up by our
    /// keepalive is reached out to now, as after a restart, not when it next
    /// speaks.
    fn reach_at(&mut self, id: PeerId, endpoint: Option<SocketAddr>) {
        let Some(endpoint) = endpoint else {
            return;
        };
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if peer.endpoint.is_some_and(|heard| heard != endpoint) {
            return;
        }
        peer.endpoint = Some(endpoint);
        self.endpoints.entry(endpoint).or_insert(id);
        if peer.config.keepalive.is_some() {
            self.peers.activate(id);
        }
    }

    /// Removes a peer and its routes; returns its receiver index for reuse.
    pub fn remove_peer(&mut self, key: &[u8; 32]) -> Option<u32> {
        let index = self.unlink_peer(key)?;
        self.peers.prune_active();
        self.resolve_egress();
        Some(index)
    }

    /// [`Self::remove_peer`] but for the active list and the egress policies,
    /// which the caller brings up to date.
    fn unlink_peer(&mut self, key: &[u8; 32]) -> Option<u32> {
        let id = self.peers.by_key.get(key).copied()?;
        let peer = self.peers.remove(id)?;
        if let Some(endpoint) = peer.endpoint {
            if self.endpoints.get(&endpoint) == Some(&id) {
                self.endpoints.remove(&endpoint);
            }
        }
        for prefix in &peer.config.allowed {
            if self.routing.routes.get_exact(*prefix) == Some(&id) {
                self.routing.routes.remove(*prefix);
            }
        }
        Some(peer.index)
    }

    /// Makes the peer set exactly `peers` (by key): removes the others, upserts these.
    /// Sessions of peers whose key stays are untouched. Returns the receiver indices
    /// of removed peers.
    pub fn sync_peers(&mut self, peers: Vec<(PeerConfig, u32)>) -> Result<Vec<u32>, EngineError> {
        let keep: std::collections::HashSet<[u8; 32]> = peers
            .iter()
            .map(|(c, _)| *c.public_key.as_bytes())
            .collect();
        let gone: Vec<[u8; 32]> = self
            .peers
            .by_key
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        let freed = gone.iter().filter_map(|k| self.unlink_peer(k)).collect();
        self.peers.prune_active();
        self.resolve_egress();
        let new = peers
            .iter()
            .filter(|(c, _)| !self.peers.by_key.contains_key(c.public_key.as_bytes()))
            .count();
        self.peers.reserve(new);
        // First every kept peer gives up the prefixes it no longer has, so that
        // a prefix moving from one kept peer to another is free whichever of
        // them is listed first.
        for (config, _) in &peers {
            let Some(&id) = self.peers.by_key.get(config.public_key.as_bytes()) else {
                continue;
            };
            let Some(peer) = self.peers.get_mut(id) else {
                continue;
            };
            let routes = &mut self.routing.routes;
            peer.config.allowed.retain(|prefix| {
                let kept = config.allowed.contains(prefix);
                if !kept && routes.get_exact(*prefix) == Some(&id) {
                    routes.remove(*prefix);
                }
                kept
            });
        }
        // Every peer that can be added is: one the engine refuses (its prefix
        // is another's) must not take the tenant's other peers down with it.
        let mut refused = None;
        for (config, index) in peers {
            if let Err(e) = self.upsert_peer(config, index) {
                refused.get_or_insert(e);
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// Replaces the host prefixes (TUN mode).
    pub fn set_host_prefixes(&mut self, prefixes: &[IpNet]) {
        self.routing.host = PrefixTable::new();
        for p in prefixes {
            self.routing.host.insert(*p, ());
        }
    }

    /// TUN mode: the sources the host routes back into this tunnel (the
    /// tenant's subnet). Packets for the host device, to a host prefix or to the
    /// server address, are accepted only from these.
    pub fn set_host_sources(&mut self, sources: &[IpNet]) {
        self.routing.host_sources = PrefixTable::new();
        for p in sources {
            self.routing.host_sources.insert(*p, ());
        }
    }

    /// Replaces the egress policies.
    pub fn set_egress(&mut self, egress: Vec<EgressConfig>) {
        self.egress = egress;
        self.resolve_egress();
    }

    fn resolve_egress(&mut self) {
        self.routing.egress = self
            .egress
            .iter()
            .map(|e| Egress {
                pool: e.pool,
                gateways: e
                    .gateways
                    .iter()
                    .filter_map(|k| self.peers.by_key.get(k).copied())
                    .collect(),
            })
            .collect();
    }

    // ---- inputs ----

    /// Handles one datagram received on the tunnel's socket from `from`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        sink: &mut impl Sink,
    ) {
        self.stats.rx_datagrams += 1;
        let Some(message) = Message::classify(datagram) else {
            self.stats.drop(DropReason::InvalidDatagram);
            return;
        };
        let Self {
            secret,
            public,
            admission,
            peers,
            endpoints,
            routing,
            stats,
            events,
            rx,
            tx,
            local,
            ..
        } = self;

        if matches!(message, Message::Initiation | Message::Response { .. }) {
            // Cookie replies under load, and the process-wide budget, before
            // any Diffie-Hellman work: a response costs boringtun two before
            // its AEAD check, so responses pass here too (as in kernel
            // WireGuard), not only initiations.
            match admission.admit(from.ip(), datagram, now, tx) {
                Ok(()) => {}
                Err(Refusal::Cookie(cookie)) => {
                    stats.cookie_replies += 1;
                    stats.tx_datagrams += 1;
                    return sink.send(from, cookie);
                }
                Err(Refusal::Drop(reason)) => return stats.drop(reason),
            }
        }
        // An initiation from an endpoint a peer was last seen at goes to that
        // peer's `Tunn` directly; only if it carries another key is the sender
        // found by decrypting its key (one Diffie-Hellman more).
        let hint = match message {
            Message::Initiation => endpoints.get(&from).copied(),
            _ => None,
        };
        let identify = |peers: &Peers| -> Result<PeerId, DropReason> {
            let key = initiator_key(secret, public, datagram)?;
            peers
                .by_key
                .get(&key)
                .copied()
                .ok_or(DropReason::UnknownPeer)
        };
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
                sink.send(from, reply);
                match (message, kind) {
                    // Our response (type 2) to an initiation: the initiator is who
                    // it claims to be, but the session is not usable (nor the peer
                    // live) until its first packet on it arrives.
                    (Message::Initiation, 2) => {
                        list = true;
                        peer.last_work = Some(now);
                        stats.handshake_responses += 1;
                        peer.answered = reply
                            .get(4..8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u32::from_le_bytes);
                        peer.stats.rx_bytes += datagram.len() as u64;
                        // A replayed initiation is answered too once the peer's
                        // protocol state was dropped (see `Peer::stop_protocol`),
                        // so a known endpoint moves only with the first packet
                        // on the session.
                        if peer.endpoint.is_none() {
                            set_endpoint(peer, id, endpoints, from, events);
                        }
                    }
                    // Our keepalive (type 4) after a response to our initiation:
                    // the session is ours to use now.
                    (Message::Response { .. }, 4) => {
                        list = true;
                        authenticated(peer, id, endpoints, from, datagram.len(), now, events);
                        handshake_done(peer, now, stats, events);
                        send_queued(peer, from, tx, stats, sink);
                    }
                    _ => {}
                }
            }
            Decap::Packet(inner) => {
                list = true;
                authenticated(peer, id, endpoints, from, datagram.len(), now, events);
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
                    local.as_mut(),
                    Origin::Peer(id),
                    &rx[..len],
                    now,
                    sink,
                );
            }
            Decap::Nothing => {
                if matches!(message, Message::Data { .. }) {
                    list = true;
                    authenticated(peer, id, endpoints, from, datagram.len(), now, events);
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

    /// Runs the local stack and routes what it sends, as packets from the host.
    fn flush_local(&mut self, now: Instant, sink: &mut impl Sink) {
        let Self {
            peers,
            routing,
            stats,
            tx,
            local,
            local_at,
            ..
        } = self;
        let Some(stack) = local else { return };
        stack.poll(now);
        // Bounded: the stack sends at most what its sockets and input allow; the
        // cap only guards against a bug turning this into a busy loop.
        for _ in 0..4096 {
            let Some(packet) = stack.poll_transmit() else {
                break;
            };
            route(
                peers,
                routing,
                stats,
                tx,
                None,
                Origin::Host,
                &packet,
                now,
                sink,
            );
            stack.recycle(packet);
        }
        *local_at = stack.poll_at(now);
    }

    /// Handles a packet from the host side (TUN device or local stack), routed by
    /// destination only.
    pub fn handle_host_packet(&mut self, packet: &[u8], now: Instant, sink: &mut impl Sink) {
        let Self {
            peers,
            routing,
            stats,
            tx,
            ..
        } = self;
        route(
            peers,
            routing,
            stats,
            tx,
            None,
            Origin::Host,
            packet,
            now,
            sink,
        );
    }

    /// Runs every peer's protocol timers. Call at least every 250 ms.
    pub fn handle_timers(&mut self, now: Instant, sink: &mut impl Sink) {
        let Self {
            peers,
            stats,
            events,
            tx,
            ..
        } = self;
        // Only active peers have timer work: at scale most provisioned peers
        // are quiet, so this follows the ones that are not. A peer with none
        // left leaves the list (it rejoins when it speaks or is spoken to).
        let mut i = 0;
        while i < peers.active.len() {
            let Some(peer) = peers.get_mut(peers.active[i]) else {
                peers.active.swap_remove(i);
                continue;
            };
            // Without an endpoint there is nowhere to send to.
            if peer.endpoint.is_some() {
                let (out, expired) = peer.update_timers(tx);
                if let (Some(datagram), Some(to)) = (out, peer.endpoint) {
                    if message_type(datagram) == 1 {
                        peer.last_work = Some(now);
                    }
                    stats.tx_datagrams += 1;
                    peer.stats.tx_bytes += datagram.len() as u64;
                    sink.send(to, datagram);
                }
                if peer.connected && (expired || !peer.is_live(now)) {
                    peer.connected = false;
                    events.push_back(Event::Disconnected {
                        peer: *peer.public_key().as_bytes(),
                    });
                }
            }
            if peer.idle(now) {
                peer.listed = false;
                peer.stop_protocol();
                peers.active.swap_remove(i);
            } else {
                i += 1;
            }
        }
        trim_events(events, stats);
        self.flush_local(now, sink);
    }

    // ---- the local stack's TCP connections (management forwarding) ----

    /// Opens a TCP connection from the tunnel's own address to `remote`.
    pub fn tcp_connect(
        &mut self,
        remote: std::net::SocketAddrV4,
        now: Instant,
        sink: &mut impl Sink,
    ) -> Result<ConnId, StackError> {
        let stack = self.local.as_mut().ok_or(StackError::NoConnection)?;
        let id = stack.connect(remote, now)?;
        self.flush_local(now, sink);
        Ok(id)
    }

    /// The local stack, for reading and writing its connections. Call
    /// [`TunnelEngine::handle_local`] afterwards so that what they queued goes out.
    pub fn local_stack(&mut self) -> Option<&mut LocalStack> {
        self.local.as_mut()
    }

    /// Sends what the local stack has queued.
    pub fn handle_local(&mut self, now: Instant, sink: &mut impl Sink) {
        self.flush_local(now, sink);
    }

    /// Connections the local stack carries, closing ones included.
    pub fn local_connections(&self) -> usize {
        self.local.as_ref().map_or(0, LocalStack::connections)
    }

    /// When the local stack next needs [`TunnelEngine::handle_local`] for its
    /// timers (as of its last poll; the engine polls it whenever it hands it a
    /// packet).
    pub fn local_deadline(&self) -> Option<Instant> {
        self.local_at
    }

    // ---- outputs ----

    /// Next connection event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn trim_events(events: &mut VecDeque<Event>, stats: &mut TunnelStats) {
    while events.len() > MAX_EVENTS {
        events.pop_front();
        stats.events_lost += 1;
    }
}

fn status_of(p: &Peer, now: Instant) -> PeerStatus {
    PeerStatus {
        public_key: *p.public_key().as_bytes(),
        endpoint: p.endpoint,
        last_handshake: p.last_handshake,
        live: p.is_live(now),
        stats: p.stats,
    }
}

/// Bookkeeping for an authenticated datagram of a session: counters, liveness
/// and roaming. A peer that went quiet and was reported disconnected, then
/// speaks again on a session still current, is connected again.
#[inline]
fn authenticated(
    peer: &mut Peer,
    id: PeerId,
    endpoints: &mut HashMap<SocketAddr, PeerId>,
    from: SocketAddr,
    len: usize,
    now: Instant,
    events: &mut VecDeque<Event>,
) {
    peer.stats.rx_bytes += len as u64;
    peer.last_rx = Some(now);
    set_endpoint(peer, id, endpoints, from, events);
    if !peer.connected && peer.is_live(now) {
        peer.connected = true;
        events.push_back(Event::Connected {
            peer: *peer.public_key().as_bytes(),
            endpoint: peer.endpoint,
        });
    }
}

/// A transport message on the session we answered for completes the handshake
/// (kernel WireGuard counts it there too). True when it did.
#[inline]
fn confirmed(
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
fn send_queued(
    peer: &mut Peer,
    to: SocketAddr,
    tx: &mut [u8],
    stats: &mut TunnelStats,
    sink: &mut impl Sink,
) {
    while let Some(queued) = peer.poll_queued(tx) {
        stats.tx_datagrams += 1;
        peer.stats.tx_bytes += queued.len() as u64;
        sink.send(to, queued);
    }
}

/// The peer's endpoint is `from` now (roaming), with the index that finds it.
#[inline]
fn set_endpoint(
    peer: &mut Peer,
    id: PeerId,
    endpoints: &mut HashMap<SocketAddr, PeerId>,
    from: SocketAddr,
    events: &mut VecDeque<Event>,
) {
    if peer.endpoint != Some(from) {
        let previous = peer.endpoint.replace(from);
        if let Some(old) = previous {
            if endpoints.get(&old) == Some(&id) {
                endpoints.remove(&old);
            }
        }
        endpoints.insert(from, id);
        if previous.is_some() {
            events.push_back(Event::Roamed {
                peer: *peer.public_key().as_bytes(),
                endpoint: from,
            });
        }
    }
}

fn handshake_done(
    peer: &mut Peer,
    now: Instant,
    stats: &mut TunnelStats,
    events: &mut VecDeque<Event>,
) {
    peer.last_handshake = Some(now);
    peer.stats.handshakes += 1;
    stats.handshakes += 1;
    if !peer.connected {
        peer.connected = true;
        events.push_back(Event::Connected {
            peer: *peer.public_key().as_bytes(),
            endpoint: peer.endpoint,
        });
    }
}

/// Routing rules 1 to 6 for one packet, then encryption for the next hop.
#[allow(clippy::too_many_arguments)]
#[inline]
fn route(
    peers: &mut Peers,
    routing: &RoutingState,
    stats: &mut TunnelStats,
    tx: &mut [u8],
    local: Option<&mut LocalStack>,
    origin: Origin,
    packet: &[u8],
    now: Instant,
    sink: &mut impl Sink,
) {
    // Rule 1: parse.
    let header = match packet::parse(packet) {
        Ok(h) => h,
        Err(_) => return stats.drop(DropReason::Malformed),
    };
    let packet = &packet[..header.len];
    let verdict = decide(routing, origin, header.src, header.dst, |g| {
        peers.get(g).is_some_and(|p| p.is_live(now))
    });
    match verdict {
        Verdict::Forward { peer, rule } => {
            let Some((endpoint, listed)) = peers.get(peer).map(|p| (p.endpoint, p.listed)) else {
                return stats.drop(DropReason::NoRoute);
            };
            let Some(to) = endpoint else {
                return stats.drop(DropReason::NoEndpoint);
            };
            if !listed {
                peers.activate(peer);
            }
            let Some(next) = peers.get_mut(peer) else {
                return stats.drop(DropReason::NoRoute);
            };
            match next.encapsulate(packet, tx) {
                Encap::Send(datagram) => {
                    next.stats.tx_bytes += datagram.len() as u64;
                    next.stats.tx_packets += 1;
                    stats.tx_datagrams += 1;
                    if matches!(rule, Rule::Egress { .. }) {
                        stats.egress_hits += 1;
                    }
                    match origin {
                        Origin::Peer(_) => stats.forwarded_peer += 1,
                        Origin::Host => stats.forwarded_host += 1,
                    }
                    sink.send(to, datagram);
                }
                Encap::Waiting { queued, initiation } => {
                    next.last_work = Some(now);
                    if queued {
                        stats.queued += 1;
                    } else {
                        stats.drop(DropReason::QueueFull);
                    }
                    if let Some(init) = initiation {
                        next.stats.tx_bytes += init.len() as u64;
                        stats.tx_datagrams += 1;
                        sink.send(to, init);
                    }
                }
                Encap::Drop(reason) => stats.drop(reason),
            }
        }
        Verdict::Host => {
            if sink.local(packet) {
                stats.forwarded_local += 1;
            } else {
                stats.drop(DropReason::LocalUnavailable);
            }
        }
        Verdict::Local => {
            let refused = match local {
                Some(stack) => (!stack.receive(packet)).then_some(DropReason::LocalQueueFull),
                None => (!sink.local(packet)).then_some(DropReason::LocalUnavailable),
            };
            match refused {
                None => stats.forwarded_local += 1,
                Some(reason) => stats.drop(reason),
            }
        }
        Verdict::Drop { reason, wake } => {
            stats.drop(reason);
            // Wake the gateways, each where it was last heard from: the packet is
            // gone, but the next ones find a session with whichever answers
            // first, in failover order. Nothing but a handshake initiation goes
            // to them, and boringtun starts one only if none is under way.
            let gateways = wake.and_then(|i| routing.egress.get(i));
            for &g in gateways.map(|e| e.gateways.as_slice()).unwrap_or_default() {
                let Some(to) = peers.get(g).and_then(|p| p.endpoint) else {
                    continue;
                };
                peers.activate(g);
                let Some(gateway) = peers.get_mut(g) else {
                    continue;
                };
                gateway.last_work = Some(now);
                if let Some(init) = gateway.initiate(tx) {
                    stats.tx_datagrams += 1;
                    sink.send(to, init);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::PublicKey;

    fn peer(allowed: &str) -> PeerConfig {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        PeerConfig {
            public_key: PublicKey::from(&secret),
            allowed: vec![allowed.parse().unwrap()],
            keepalive: None,
            kind: super::super::peer::PeerKind::Router,
            endpoint: None,
        }
    }

    /// An engine with its local stack at 10.100.0.1, and router `n` (10.100.1.n)
    /// handshaken with it.
    fn engine_with_stack_and_routers(
        now: Instant,
        routers: &[u8],
    ) -> (TunnelEngine, Vec<crate::core::harness::MemoryClient>) {
        use crate::core::harness::MemoryClient;
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        let server = std::net::Ipv4Addr::new(10, 100, 0, 1);
        let mut engine =
            TunnelEngine::new(secret, vec![IpAddr::V4(server)]).with_local_stack(server, 16, now);
        let clients = routers
            .iter()
            .map(|&n| {
                let mut r = MemoryClient::new(
                    &public,
                    u32::from(n),
                    SocketAddr::from(([192, 0, 2, n], u16::from(n))),
                );
                r.register(
                    &mut engine,
                    &[IpNet::from(IpAddr::from([10, 100, 1, n]))],
                    u32::from(n),
                );
                assert!(r.handshake(&mut engine, now));
                r
            })
            .collect();
        (engine, clients)
    }

    /// Transit between peers leaves the local stack alone; a packet for the
    /// stack runs it at once, and its answer leaves in the same call.
    #[test]
    fn only_packets_for_the_stack_run_it() {
        use crate::core::harness::Collect;
        use crate::core::packet::build::ip_packet;

        let now = Instant::now();
        let server = IpAddr::from([10, 100, 0, 1]);
        let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1, 2]);
        let r1 = &mut routers[0];
        let polls = |e: &mut TunnelEngine| e.local_stack().map_or(0, |s| s.polls());
        let before = polls(&mut engine);

        let transit = ip_packet([10, 100, 1, 1].into(), [10, 100, 1, 2].into(), 100);
        let mut out = Collect::default();
        for _ in 0..100 {
            let datagram = r1.encrypt(&transit).unwrap();
            engine.handle_datagram(r1.addr, &datagram, now, &mut out);
        }
        assert_eq!(engine.stats().forwarded_peer, 100);
        assert_eq!(polls(&mut engine), before, "transit polled the stack");

        // Protocol 253 to the stack: it answers (ICMP protocol unreachable).
        let local = ip_packet([10, 100, 1, 1].into(), server, 8);
        let datagram = r1.encrypt(&local).unwrap();
        let mut out = Collect::default();
        engine.handle_datagram(r1.addr, &datagram, now, &mut out);
        assert_eq!(engine.stats().forwarded_local, 1);
        assert_eq!(polls(&mut engine), before + 1);
        assert!(out.sent.iter().any(|(to, _)| *to == r1.addr), "answered");
    }

    /// A packet the stack's full input queue refuses is a drop of its own,
    /// not a local delivery.
    #[test]
    fn a_full_stack_queue_is_counted_as_a_drop() {
        use crate::core::harness::Collect;
        use crate::core::packet::build::ip_packet;

        let now = Instant::now();
        let server = IpAddr::from([10, 100, 0, 1]);
        let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1]);
        let r1 = &mut routers[0];
        let packet = ip_packet([10, 100, 1, 1].into(), server, 8);
        if let Some(stack) = engine.local_stack() {
            while stack.receive(&packet) {}
        }
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
        assert_eq!(engine.stats().dropped(DropReason::LocalQueueFull), 1);
        assert_eq!(engine.stats().forwarded_local, 0);
        // The stack ran and took the queue in: the next packet is delivered.
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
        assert_eq!(engine.stats().forwarded_local, 1);
    }

    /// A tunnel whose peer `g` has a configured endpoint, with an initiation
    /// of the engine's to `g` under way: the engine, `g`, and that initiation.
    fn initiating_to_a_peer(
        now: Instant,
    ) -> (TunnelEngine, crate::core::harness::MemoryClient, Vec<u8>) {
        use crate::core::harness::{Collect, MemoryClient};
        use crate::core::packet::build::ip_packet;

        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let g = MemoryClient::new(&public, 7, SocketAddr::from(([192, 0, 2, 7], 7)));
        let mut config = peer("10.100.1.7/32");
        config.public_key = g.public_key;
        config.endpoint = Some(g.addr);
        engine.upsert_peer(config, 7).unwrap();
        let packet = ip_packet([10, 100, 0, 1].into(), [10, 100, 1, 7].into(), 8);
        let mut out = Collect::default();
        engine.handle_host_packet(&packet, now, &mut out);
        let (to, initiation) = out.sent.pop().unwrap();
        assert_eq!((to, message_type(&initiation)), (g.addr, 1));
        (engine, g, initiation)
    }

    /// The response of `g` to `initiation`.
    fn response_of(g: &mut crate::core::harness::MemoryClient, initiation: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; 256];
        match g.tunn.decapsulate(None, initiation, &mut buf) {
            boringtun::noise::TunnResult::WriteToNetwork(r) => r.to_vec(),
            _ => panic!("no response"),
        }
    }

    #[test]
    fn calm_a_response_completes_our_handshake() {
        use crate::core::harness::Collect;
        let now = Instant::now();
        let (mut engine, mut g, initiation) = initiating_to_a_peer(now);
        let response = response_of(&mut g, &initiation);
        let mut out = Collect::default();
        engine.handle_datagram(g.addr, &response, now, &mut out);
        assert_eq!(engine.stats().handshakes, 1);
        assert_eq!(engine.stats().cookie_replies, 0);
        // The waiting packet, then nothing else.
        assert!(out
            .sent
            .iter()
            .all(|(to, d)| *to == g.addr && message_type(d) == 4));
    }

    /// Under load a response without a valid mac2 gets a cookie reply and no
    /// Diffie-Hellman (boringtun never sees it: our handshake stays open); once
    /// the load is over the same response completes the handshake.
    #[test]
    fn under_load_a_response_gets_a_cookie_reply_before_any_diffie_hellman() {
        use crate::core::harness::{Collect, MemoryClient};
        let now = Instant::now();
        let (engine, mut g, initiation) = initiating_to_a_peer(now);
        let mut engine = engine.with_handshake_limit(1);
        let public = *engine.public_key();
        // Another peer's initiations put the tunnel over its limit of one.
        let mut c = MemoryClient::new(&public, 8, SocketAddr::from(([192, 0, 2, 8], 8)));
        c.register(
            &mut engine,
            &[IpNet::from(IpAddr::from([10, 100, 1, 8]))],
            8,
        );
        assert!(c.handshake(&mut engine, now));
        c.handshake(&mut engine, now);
        assert_eq!(engine.stats().cookie_replies, 1);
        let (handshakes, cookies) = (engine.stats().handshakes, engine.stats().cookie_replies);

        let response = response_of(&mut g, &initiation);
        let mut out = Collect::default();
        engine.handle_datagram(g.addr, &response, now, &mut out);
        assert_eq!(engine.stats().cookie_replies, cookies + 1);
        assert_eq!(engine.stats().handshakes, handshakes);
        let (to, reply) = out.sent.pop().unwrap();
        assert_eq!((to, message_type(&reply)), (g.addr, 3));
        let mut buf = vec![0; 256];
        assert!(matches!(
            g.tunn.decapsulate(None, &reply, &mut buf),
            boringtun::noise::TunnResult::Done
        ));

        // A second later the tunnel is calm and the response goes through.
        let later = now + Duration::from_secs(2);
        engine.handle_datagram(g.addr, &response, later, &mut Collect::default());
        assert_eq!(engine.stats().handshakes, handshakes + 1);
    }

    /// An engine at 10.100.0.1 with one registered client at 10.100.1.1.
    fn one_client() -> (TunnelEngine, crate::core::harness::MemoryClient) {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let r1 = crate::core::harness::MemoryClient::new(
            &public,
            1,
            SocketAddr::from(([192, 0, 2, 1], 1)),
        );
        r1.register(
            &mut engine,
            &[IpNet::from(IpAddr::from([10, 100, 1, 1]))],
            1,
        );
        (engine, r1)
    }

    #[test]
    fn a_quiet_peer_leaves_the_active_list_and_comes_back_when_it_speaks() {
        use crate::core::harness::Collect;
        use crate::core::packet::build::ip_packet;
        use crate::core::peer::SESSION_LIFETIME;

        let now = Instant::now();
        let (mut engine, mut r1) = one_client();
        assert!(r1.handshake(&mut engine, now));
        assert_eq!(engine.active_peer_count(), 1);
        engine.handle_timers(now + Duration::from_secs(60), &mut Collect::default());
        assert_eq!(
            engine.active_peer_count(),
            1,
            "its session is still current"
        );
        engine.handle_timers(now + SESSION_LIFETIME, &mut Collect::default());
        assert_eq!(engine.active_peer_count(), 0);
        assert!(!engine.needs_timers());
        let id = engine.peers.by_key[r1.public_key.as_bytes()];
        assert!(
            !engine.peers.get(id).unwrap().is_active(),
            "its Tunn is gone"
        );
        let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
        assert!(events.contains(&Event::Disconnected {
            peer: *r1.public_key.as_bytes()
        }));

        // It speaks again: listed, and its packets arrive.
        let later = now + Duration::from_secs(300);
        assert!(r1.handshake(&mut engine, later));
        assert_eq!(engine.active_peer_count(), 1);
        let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, later, &mut Collect::default());
        let status = engine.peer_status(r1.public_key.as_bytes(), later).unwrap();
        assert_eq!(status.stats.rx_packets, 1);
        engine.handle_timers(later + Duration::from_secs(1), &mut Collect::default());
        assert_eq!(engine.active_peer_count(), 1);
    }

    /// A quiet peer's protocol state is gone, so a replay of its last
    /// initiation is answered; the replay does not move its endpoint.
    #[test]
    fn a_replayed_initiation_does_not_move_a_quiet_peers_endpoint() {
        use crate::core::harness::Collect;
        use crate::core::peer::SESSION_LIFETIME;

        let now = Instant::now();
        let (mut engine, mut r1) = one_client();
        let mut buf = vec![0; 256];
        let initiation = r1.initiation().expect("an initiation");
        let mut out = Collect::default();
        engine.handle_datagram(r1.addr, &initiation, now, &mut out);
        let (_, response) = out.sent.pop().unwrap();
        let keepalive = match r1.tunn.decapsulate(None, &response, &mut buf) {
            boringtun::noise::TunnResult::WriteToNetwork(k) => k.to_vec(),
            _ => panic!("no keepalive"),
        };
        engine.handle_datagram(r1.addr, &keepalive, now, &mut Collect::default());
        assert_eq!(engine.stats().handshakes, 1);
        engine.handle_timers(now + SESSION_LIFETIME, &mut Collect::default());
        assert_eq!(engine.active_peer_count(), 0);

        let elsewhere = SocketAddr::from(([203, 0, 113, 9], 9));
        let later = now + Duration::from_secs(200);
        let mut out = Collect::default();
        engine.handle_datagram(elsewhere, &initiation, later, &mut out);
        assert_eq!(engine.stats().handshake_responses, 2);
        let status = engine.peer_status(r1.public_key.as_bytes(), later).unwrap();
        assert_eq!(status.endpoint, Some(r1.addr));
        assert_eq!(engine.endpoints.get(&elsewhere), None);
    }

    /// `initiation` with its encrypted timestamp changed and a valid mac1 for
    /// `server`: it passes admission and names its peer, but does not
    /// authenticate.
    fn forged(initiation: &[u8], server: &PublicKey) -> Vec<u8> {
        use blake2::digest::{consts::U16, FixedOutput, KeyInit, Update};
        use blake2::{Blake2s256, Blake2sMac, Digest};
        let mut forged = initiation.to_vec();
        forged[100] ^= 1;
        let key: [u8; 32] = Blake2s256::new()
            .chain_update(b"mac1----")
            .chain_update(server.as_bytes())
            .finalize()
            .into();
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&key).unwrap();
        Update::update(&mut mac, &forged[..116]);
        forged[116..132].copy_from_slice(&mac.finalize_fixed());
        forged
    }

    #[test]
    fn an_initiation_that_fails_authentication_lists_no_peer() {
        use crate::core::harness::Collect;

        let now = Instant::now();
        let (mut engine, mut r1) = one_client();
        let initiation = r1.initiation().expect("an initiation");
        let forged = forged(&initiation, engine.public_key());
        let mut out = Collect::default();
        engine.handle_datagram(r1.addr, &forged, now, &mut out);
        assert!(out.sent.is_empty());
        assert_eq!(engine.stats().dropped(DropReason::DecryptFailed), 1);
        assert_eq!(engine.active_peer_count(), 0);
        assert!(!engine.needs_timers());
        let id = engine.peers.by_key[r1.public_key.as_bytes()];
        assert!(!engine.peers.get(id).unwrap().is_active(), "no Tunn kept");
        // The genuine one still works.
        assert!(r1.handshake(&mut engine, now));
        assert_eq!(engine.active_peer_count(), 1);
    }

    #[test]
    fn a_new_peer_needs_a_24_bit_nonzero_index() {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        for index in [0, 1 << 24, u32::MAX] {
            assert_eq!(
                engine.upsert_peer(peer("10.100.1.1/32"), index),
                Err(EngineError::BadIndex { index })
            );
        }
        assert_eq!(engine.peer_count(), 0);
        assert_eq!(
            engine.upsert_peer(peer("10.100.1.1/32"), (1 << 24) - 1),
            Ok(())
        );
    }

    /// With our keepalive on, a peer restored with its endpoint is reached at
    /// once (its first keepalive starts a handshake), not when it next speaks;
    /// without keepalive it stays off the active list until there is traffic.
    #[test]
    fn a_restored_peer_we_keep_alive_is_reached_without_waiting_for_it() {
        use crate::core::harness::Collect;
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let at = SocketAddr::from(([192, 0, 2, 7], 7));
        let mut kept = peer("10.100.1.1/32");
        kept.keepalive = Some(1);
        kept.endpoint = Some(at);
        let mut quiet = peer("10.100.1.2/32");
        quiet.endpoint = Some(SocketAddr::from(([192, 0, 2, 8], 8)));
        engine.upsert_peer(kept, 1).unwrap();
        engine.upsert_peer(quiet, 2).unwrap();
        assert_eq!(engine.peers.active.len(), 1, "only the kept-alive peer");

        // boringtun's keepalive runs on the real clock.
        std::thread::sleep(Duration::from_millis(1100));
        let mut out = Collect::default();
        engine.handle_timers(Instant::now(), &mut out);
        assert_eq!(out.sent.len(), 1, "{:?}", out.sent);
        assert_eq!(out.sent[0].0, at);
        assert_eq!(message_type(&out.sent[0].1), 1, "a handshake initiation");
    }

    #[test]
    fn a_configured_endpoint_reaches_a_silent_peer_and_never_replaces_a_heard_one() {
        let now = Instant::now();
        let (mut engine, mut r1) = one_client();
        // Restored from the state: where the router was last heard from.
        let remembered = SocketAddr::from(([192, 0, 2, 99], 99));
        let mut config = peer("10.100.1.1/32");
        config.public_key = r1.public_key;
        config.endpoint = Some(remembered);
        engine.upsert_peer(config.clone(), 1).unwrap();
        let id = engine.peers.by_key[r1.public_key.as_bytes()];
        let status = engine.peer_status(r1.public_key.as_bytes(), now).unwrap();
        assert_eq!(status.endpoint, Some(remembered));
        assert_eq!(engine.endpoints.get(&remembered), Some(&id));

        // The router speaks from elsewhere: that is where it is now, and the
        // same configuration applied again does not move it back.
        assert!(r1.handshake(&mut engine, now));
        assert_eq!(engine.endpoints.get(&r1.addr), Some(&id));
        assert_eq!(engine.endpoints.get(&remembered), None);
        engine.upsert_peer(config, 1).unwrap();
        let status = engine.peer_status(r1.public_key.as_bytes(), now).unwrap();
        assert_eq!(status.endpoint, Some(r1.addr));
        assert_eq!(engine.endpoints.get(&remembered), None);
    }

    #[test]
    fn a_prefix_moves_between_kept_peers_whatever_their_order() {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let x = peer("10.100.1.1/32");
        let mut y = peer("10.100.1.2/32");
        let moving: IpNet = "10.100.9.0/24".parse().unwrap();
        y.allowed.push(moving);
        engine
            .sync_peers(vec![(x.clone(), 1), (y.clone(), 2)])
            .unwrap();
        // The /24 moves from Y to X, X listed first.
        let mut x2 = x.clone();
        x2.allowed.push(moving);
        let mut y2 = y.clone();
        y2.allowed.retain(|p| *p != moving);
        assert_eq!(engine.sync_peers(vec![(x2, 1), (y2, 2)]), Ok(Vec::new()));
        let owner =
            |e: &TunnelEngine, ip: [u8; 4]| e.routing.routes.lookup(IpAddr::from(ip)).copied();
        let x_id = engine.peers.by_key[x.public_key.as_bytes()];
        let y_id = engine.peers.by_key[y.public_key.as_bytes()];
        assert_eq!(owner(&engine, [10, 100, 9, 5]), Some(x_id));
        assert_eq!(owner(&engine, [10, 100, 1, 2]), Some(y_id));
        // And back, Y listed first this time.
        assert_eq!(engine.sync_peers(vec![(y, 2), (x, 1)]), Ok(Vec::new()));
        assert_eq!(owner(&engine, [10, 100, 9, 5]), Some(y_id));
        assert_eq!(owner(&engine, [10, 100, 1, 1]), Some(x_id));
    }

    /// Removing k listed peers in one sync costs one pass over the active
    /// list, and leaves exactly the kept ones on it.
    #[test]
    fn a_sync_that_removes_many_active_peers_prunes_the_list_once() {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let configs: Vec<_> = (0..1_000u32)
            .map(|i| {
                let ip = IpAddr::from([10, 101, (i >> 8) as u8, i as u8]);
                let mut config = peer("10.100.1.1/32");
                config.allowed = vec![IpNet::from(ip)];
                (config, i + 1)
            })
            .collect();
        engine.sync_peers(configs.clone()).unwrap();
        // Every peer on the active list (no protocol state needed to remove one).
        for id in 0..1_000 {
            engine.peers.list(id);
        }
        let kept: Vec<_> = configs.iter().step_by(10).cloned().collect();
        let before = engine.peers.prunes;
        assert_eq!(engine.sync_peers(kept.clone()).map(|f| f.len()), Ok(900));
        assert_eq!(engine.peers.prunes, before + 1);
        assert_eq!(engine.active_peer_count(), 100);
        let mut listed: Vec<_> = engine.peers.active.clone();
        listed.sort_unstable();
        let mut expected: Vec<_> = kept
            .iter()
            .map(|(c, _)| engine.peers.by_key[c.public_key.as_bytes()])
            .collect();
        expected.sort_unstable();
        assert_eq!(listed, expected);
        // A new peer in a freed slot is not listed.
        engine.upsert_peer(peer("10.102.0.1/32"), 5_000).unwrap();
        assert_eq!(engine.active_peer_count(), 100);
        let key = *kept[0].0.public_key.as_bytes();
        assert!(engine.remove_peer(&key).is_some());
        assert_eq!(engine.active_peer_count(), 99);
    }

    #[test]
    fn a_refused_peer_does_not_keep_the_others_out() {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
        let peers = vec![
            (peer("10.100.1.1/32"), 1),
            (peer("10.100.1.1/32"), 2), // the same address: refused
            (peer("10.100.1.3/32"), 3),
        ];
        assert!(matches!(
            engine.sync_peers(peers),
            Err(EngineError::PrefixTaken { .. })
        ));
        assert_eq!(engine.peer_count(), 2);
    }
}
