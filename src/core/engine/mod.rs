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
//!
//! The engine's parts: `receive` (datagrams from the socket, sessions' bookkeeping),
//! `route` (one inner packet to its next hop), `changes` (the control plane's
//! peers, prefixes and egress), `peers` (the peer slots), `status` (counters,
//! peer status, `explain`), `strangers` (keys of initiations from no peer).
//! Timers, the local stack's connections and events are here.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::admission::Admission;
use super::budget::HandshakeBudget;
use super::icmp::ErrorBudget;
use super::netstack::{ConnId, LocalStack, StackError};
use super::peer::message_type;
use super::policy::{DropReason, PeerId, RoutingState};

mod changes;
mod peers;
mod receive;
mod route;
mod status;
mod strangers;
#[cfg(test)]
mod tests;

use peers::Peers;
pub use status::{ExplainVerdict, Explanation, PeerStatus, TunnelStats};
pub use strangers::{Stranger, STRANGERS};

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
    /// Sends `datagram` to `to` from the tunnel's own address `local`, the one
    /// the peer last reached the tunnel at (a socket bound to a wildcard
    /// address on a host with several); `None` lets the kernel pick, as
    /// [`Sink::send`] does. Sinks that stand for no such socket need not care.
    #[inline]
    fn send_from(&mut self, to: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
        let _ = local;
        self.send(to, datagram);
    }
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
    /// Bytes the peers hold while they wait for handshakes, all together
    /// (bounded by [`super::peer::TUNNEL_QUEUE_BYTES`]).
    held: Arc<std::sync::atomic::AtomicU64>,
    events: VecDeque<Event>,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    local: Option<LocalStack>,
    /// When the local stack next needs a poll for its timers, as of its last one.
    local_at: Option<Instant>,
    /// ICMP errors the tunnel may still send ([`crate::core::icmp`]).
    icmp: ErrorBudget,
    /// The last keys initiations carried that are no peer.
    strangers: strangers::Strangers,
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
            held: Arc::default(),
            events: VecDeque::new(),
            rx: vec![0; BUF_LEN].into_boxed_slice(),
            tx: vec![0; BUF_LEN].into_boxed_slice(),
            local: None,
            local_at: None,
            icmp: ErrorBudget::default(),
            strangers: strangers::Strangers::default(),
        }
    }

    /// The last keys (at most [`STRANGERS`]) that handshake initiations to
    /// this tunnel carried and that are no peer of it, the most recent first
    /// (see [`Stranger`]: a lead, not a proof).
    pub fn strangers(&self) -> Vec<Stranger> {
        self.strangers.list()
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

    /// Names the tenant's IPv4 subnet, whose network and broadcast addresses
    /// (a directed broadcast, RFC 1812 5.3.5.2) no peer's packet is forwarded
    /// to: they are dropped as `martian`, unanswered.
    #[must_use]
    pub fn with_subnet(mut self, subnet: ipnet::Ipv4Net) -> Self {
        self.routing.subnet_edges =
            (subnet.prefix_len() < 31).then(|| (subnet.network(), subnet.broadcast()));
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
            // Also without an endpoint (a peer we answered, whose first
            // packet has not come): boringtun stamps a new session with the
            // time of its last timer run. Without one, nothing is sent.
            let timers = peer.update_timers(tx);
            stats.drops[DropReason::HandshakeTimeout.index()] += u64::from(timers.discarded);
            let expired = timers.expired;
            if let (Some(datagram), Some(to)) = (timers.send, peer.endpoint) {
                if message_type(datagram) == 1 {
                    peer.worked(now);
                }
                stats.tx_datagrams += 1;
                peer.stats.tx_bytes += datagram.len() as u64;
                sink.send_from(to, peer.local, datagram);
            }
            receive::announce_roam(peer, now, events);
            if peer.connected && (expired || !peer.is_live(now)) {
                peer.connected = false;
                events.push_back(Event::Disconnected {
                    peer: *peer.public_key().as_bytes(),
                });
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
