//! One WireGuard peer of a tunnel: boringtun's `Tunn` plus what the router tracks.
//!
//! This is the only module that talks to `boringtun::noise`. It turns boringtun's
//! results into the few outcomes the engine cares about and keeps per-peer state as
//! plain fields. Note that `Tunn` reads the monotonic clock itself for its protocol
//! timers; everything wgplane decides (liveness, events) uses the `now` passed in.
//!
//! Left out: which peer a datagram is for and where its packets go (the engine's
//! `receive` and `route`), whether a handshake gets Diffie-Hellman work at all
//! ([`crate::core::admission`]), and the events, which the engine raises from these
//! fields.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::policy::DropReason;

/// A session counts as live while its last handshake is younger than this
/// (WireGuard's REJECT_AFTER_TIME: older keys are never used).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// A session also needs to have heard from the peer recently: RouterOS sends a
/// keepalive every 25 s, WireGuard rekeys every 120 s, so by default 60 s of silence
/// means the peer is gone and a gateway should not receive traffic any more.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a response we sent holds the peer's protocol state while the
/// initiator's first packet on the session has not come: three of its
/// retries (REKEY_TIMEOUT, 5 s), which each answer anew.
pub const ANSWER_HOLD: Duration = Duration::from_secs(15);

/// What kind of object a peer is, for status and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A site router (MikroTik).
    Router,
    /// An end-user device.
    Client,
}

/// Everything the engine needs to create or update a peer.
#[derive(Clone)]
pub struct PeerConfig {
    /// The peer's static public key.
    pub public_key: PublicKey,
    /// Prefixes the peer may send from and that route to it.
    pub allowed: Vec<IpNet>,
    /// Keepalive interval in seconds, if any.
    pub keepalive: Option<u16>,
    /// Router or client.
    pub kind: PeerKind,
    /// Where to reach the peer before it has spoken (usually none: routers dial in).
    pub endpoint: Option<SocketAddr>,
    /// Mixed into every handshake with the peer, when it has one.
    pub preshared_key: Option<crate::keys::PresharedKey>,
}

/// Per-peer counters, plain fields bumped inline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Datagram bytes received from the peer.
    pub rx_bytes: u64,
    /// Datagram bytes sent to the peer.
    pub tx_bytes: u64,
    /// Inner packets received from the peer.
    pub rx_packets: u64,
    /// Inner packets sent to the peer.
    pub tx_packets: u64,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Inner packets dropped because their source is not an address the
    /// peer may use (`spoofed_source`): a phone or router with a wrong
    /// address, or a router's LAN missing from its allowed IPs.
    pub spoofed: u64,
    /// Inner packets of a client dropped because no gateway of its pool had
    /// a live session (`egress_down`): connected, yet cut off.
    pub egress_down: u64,
}

/// The outcome of feeding one datagram to a peer.
pub enum Decap<'a> {
    /// Send these bytes back to the peer (handshake response, keepalive). Cookie
    /// replies come from admission, before the peer is reached.
    Reply(&'a [u8]),
    /// An authenticated inner packet.
    Packet(&'a [u8]),
    /// Authenticated, nothing to deliver (keepalive, cookie stored).
    Nothing,
    /// A handshake initiation from some other peer's key: nothing changed here.
    WrongPeer,
    /// Failed; count it.
    Drop(DropReason),
}

/// The outcome of encrypting one packet for a peer.
pub enum Encap<'a> {
    /// Send these bytes to the peer: the packet, encrypted.
    Send(&'a [u8]),
    /// No session yet: the packet waits inside the peer for its handshake
    /// (`queued`), or is dropped because too many already wait. `initiation`:
    /// the handshake initiation to send to the peer, if one is due.
    Waiting {
        queued: bool,
        initiation: Option<&'a [u8]>,
    },
    /// Failed; count it.
    Drop(DropReason),
}

/// Packets a peer holds while it waits for a handshake: boringtun's own limit
/// (it silently discards beyond it), so every drop here is counted instead.
pub const QUEUE_PACKETS: u16 = 256;
/// Bytes a peer holds while it waits for a handshake: full-size packets fill
/// the packet limit, 64 KB ones (a fragmented datagram's) stop here.
pub const QUEUE_BYTES: u32 = 512 * 1024;

/// An endpoint as one address per host: an IPv4 sender seen on a dual-stack
/// socket (`[::ffff:a.b.c.d]:p`) is `a.b.c.d:p`, so that events, the API and the
/// store name it as IPv4, and a restart on an IPv4 socket can still reach it.
/// Other IPv6 endpoints keep their flow label and scope (a link-local peer's).
#[inline]
pub fn canonical_endpoint(endpoint: SocketAddr) -> SocketAddr {
    match endpoint {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => endpoint,
        },
        SocketAddr::V4(_) => endpoint,
    }
}

/// False for an underlay source nothing can be sent back to: port 0, or an
/// unspecified, multicast or (IPv4) broadcast address. The kernel delivers
/// datagrams from such sources but refuses to send to them.
#[inline]
pub fn answerable(endpoint: SocketAddr) -> bool {
    let ip = endpoint.ip();
    endpoint.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && ip != IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
}

/// Where an authenticated datagram came from, and which of the tunnel's own
/// addresses it was sent to (`None` where the socket is bound to one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub remote: SocketAddr,
    pub local: Option<IpAddr>,
}

impl Path {
    /// The path of a datagram from `from` to the tunnel's own address `at`:
    /// both canonical (a v4-mapped address is IPv4). A link-local address of
    /// ours would need its interface named too: those are left to the
    /// kernel's pick.
    #[inline]
    pub fn arrived(from: SocketAddr, at: Option<IpAddr>) -> Path {
        Path {
            remote: canonical_endpoint(from),
            local: at
                .map(|a| a.to_canonical())
                .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())),
        }
    }
}

/// Roams of one peer are announced at most this often: a peer that sends
/// from a new address with every datagram (its own doing, or an on-path
/// attacker's) moves its endpoint at once, but costs the control plane one
/// event a second, carrying the address it has then.
pub const ROAM_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes all the peers of one tunnel hold at once while they wait for
/// handshakes (64 full queues): a peer that sends to every other peer of its
/// tunnel that has no session cannot make the tunnel hold more than this.
/// Beyond it packets for peers without a session are dropped as `QueueFull`.
pub const TUNNEL_QUEUE_BYTES: u64 = 64 * QUEUE_BYTES as u64;

/// One peer of a tunnel.
///
/// boringtun's `Tunn` (11 KB, and a Diffie-Hellman to create) is made on the
/// peer's first handshake or first outbound packet, and dropped once the peer
/// is idle ([`Peer::idle`]): a provisioned router that never dials in, or one
/// quiet for a session's lifetime, costs a few hundred bytes and no timer work.
pub struct Peer {
    tunn: Option<Box<Tunn>>,
    tunnel_secret: Arc<StaticSecret>,
    rate_limiter: Arc<RateLimiter>,
    /// Listed among the engine's active peers (those with timer work, see
    /// [`Peer::idle`]). A peer taken off the list loses its `Tunn`
    /// ([`Peer::stop_protocol`]).
    pub(crate) listed: bool,
    pub(crate) config: PeerConfig,
    pub(crate) index: u32,
    /// Current endpoint: the source of the last authenticated datagram.
    pub(crate) endpoint: Option<SocketAddr>,
    /// Which of the tunnel's addresses the peer last reached it at, where the
    /// socket is bound to a wildcard address: replies leave from it, as kernel
    /// WireGuard's do, so that a peer behind NAT that dialled one of several
    /// addresses hears back from that one. `None`: the kernel picks.
    pub(crate) local: Option<IpAddr>,
    pub(crate) last_handshake: Option<Instant>,
    pub(crate) last_rx: Option<Instant>,
    /// When we last started protocol work for the peer: sent an initiation or a
    /// response, or queued a packet for its handshake ([`Peer::worked`]).
    pub(crate) last_work: Option<Instant>,
    /// boringtun's handshake for the peer gave up (it tried for 90 s): its
    /// `Tunn` does nothing more, keepalives included, until new protocol work
    /// starts, so the peer has no timer work left ([`Peer::idle`]).
    gave_up: bool,
    /// The session ended without a new one (the handshake gave up): the peer
    /// is not live, however recently it was heard from, until a handshake
    /// completes ([`Peer::handshake_completed`]).
    session_lost: bool,
    /// Our index in the last handshake response we sent, 0 for none (no peer
    /// has index 0): that session is usable only once the initiator's first
    /// packet on it arrives (then the handshake is complete, as kernel WireGuard
    /// counts it).
    pub(crate) answered: u32,
    /// When that response was sent: the peer holds its protocol state for
    /// [`ANSWER_HOLD`] after it, not for a session's lifetime, since an
    /// answered initiation may be a replay that never completes.
    answered_at: Option<Instant>,
    /// True between a completed handshake and the session's expiry (for events).
    pub(crate) connected: bool,
    /// When a roam of this peer was last announced (at most one per
    /// [`ROAM_ANNOUNCE_INTERVAL`]).
    pub(crate) roam_announced: Option<Instant>,
    /// The endpoint the peer's last `Connected` or `Roamed` event named: a
    /// roam is news while the endpoint differs from it (a peer that moves and
    /// comes back within the interval has not moved for whoever listens).
    pub(crate) told: Option<SocketAddr>,
    /// Packets and bytes queued in boringtun since its queue was last emptied.
    queued_packets: u16,
    queued_bytes: u32,
    /// What the tunnel's peers hold in all ([`TUNNEL_QUEUE_BYTES`]).
    tunnel_held: Arc<AtomicU64>,
    /// Silence after which the peer is not live any more.
    pub(crate) liveness_timeout: Duration,
    pub(crate) stats: PeerStats,
    /// The ICMP errors about this peer's packets it may still get
    /// ([`crate::core::icmp`]).
    pub(crate) icmp: crate::core::icmp::PeerErrorBudget,
}

impl Peer {
    /// A peer with no session yet. `index` must be unique in the process.
    pub fn new(
        tunnel_secret: Arc<StaticSecret>,
        config: PeerConfig,
        index: u32,
        rate_limiter: Arc<RateLimiter>,
        liveness_timeout: Duration,
        tunnel_held: Arc<AtomicU64>,
    ) -> Self {
        Self {
            tunn: None,
            tunnel_secret,
            rate_limiter,
            listed: false,
            endpoint: config.endpoint,
            local: None,
            config,
            index,
            last_handshake: None,
            last_rx: None,
            last_work: None,
            gave_up: false,
            session_lost: false,
            answered: 0,
            answered_at: None,
            connected: false,
            roam_announced: None,
            told: None,
            queued_packets: 0,
            queued_bytes: 0,
            tunnel_held,
            liveness_timeout,
            stats: PeerStats::default(),
            icmp: Default::default(),
        }
    }

    /// The peer's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.config.public_key
    }

    /// True while the peer has protocol state (it spoke, or was spoken to, and
    /// has not been idle since).
    #[inline]
    pub fn is_active(&self) -> bool {
        self.tunn.is_some()
    }

    /// Makes the peer's protocol state now (it is about to be used).
    pub fn start_protocol(&mut self) {
        self.tunn();
    }

    /// Drops the peer's protocol state once it is idle: the next handshake or
    /// packet makes it afresh. It cannot stay without its timers: `Tunn` stamps
    /// its events with the time of its last `update_timers`, so a session made
    /// after a long pause would look that old and expire at the next run.
    /// The last initiation timestamp it accepted goes with it, so a replayed
    /// initiation is answered again (it cannot complete a handshake).
    pub fn stop_protocol(&mut self) {
        self.tunn = None;
        self.answered = 0;
        self.gave_up = false;
        self.queue_emptied();
    }

    /// Protocol work starts now: an initiation or a response sent, a packet
    /// queued for a handshake.
    #[inline]
    pub(crate) fn worked(&mut self, now: Instant) {
        self.last_work = Some(now);
        self.gave_up = false;
    }

    /// We answered an initiation now, with a response whose sender index is
    /// `index`: the handshake completes with the initiator's first packet on
    /// that session. Nothing else is retried by us, so, unconfirmed, this
    /// keeps the peer busy only for [`ANSWER_HOLD`]: an initiation replayed
    /// after the peer's protocol state was dropped (boringtun's record of the
    /// last initiation went with it) costs a `Tunn` for seconds, not minutes.
    pub(crate) fn answered(&mut self, index: u32, now: Instant) {
        self.answered = index;
        self.answered_at = Some(now);
        self.gave_up = false;
    }

    /// A handshake completed now: the session is usable.
    pub(crate) fn handshake_completed(&mut self, now: Instant) {
        self.last_handshake = Some(now);
        self.session_lost = false;
    }

    /// The peer's `Tunn`, made now if this is its first use.
    fn tunn(&mut self) -> &mut Tunn {
        let Self {
            tunn,
            tunnel_secret,
            rate_limiter,
            config,
            index,
            ..
        } = self;
        tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                StaticSecret::clone(tunnel_secret),
                config.public_key,
                config
                    .preshared_key
                    .as_ref()
                    .map(crate::keys::PresharedKey::to_bytes),
                config.keepalive,
                *index,
                Some(Arc::clone(rate_limiter)),
            ))
        })
    }

    /// True for a client (a phone): its packets leave only by the egress rule.
    #[inline]
    pub fn is_client(&self) -> bool {
        self.config.kind == PeerKind::Client
    }

    /// True when traffic sent now would reach the peer on a current session.
    #[inline]
    pub fn is_live(&self, now: Instant) -> bool {
        if self.session_lost {
            return false;
        }
        match (self.last_handshake, self.last_rx) {
            (Some(hs), Some(rx)) => {
                now.saturating_duration_since(hs) < SESSION_LIFETIME
                    && now.saturating_duration_since(rx) < self.liveness_timeout
            }
            _ => false,
        }
    }

    /// True when the peer has no timer work left at `now`: no handshake
    /// completed, no protocol work started and no authenticated packet heard
    /// within [`SESSION_LIFETIME`] (so no session is usable and no handshake
    /// is under way), no response of ours awaiting its first packet (for
    /// [`ANSWER_HOLD`]), no packet waiting, and no keepalive to send.
    pub fn idle(&self, now: Instant) -> bool {
        let recent = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) < SESSION_LIFETIME)
        };
        if self.gave_up {
            return self.queued_packets == 0;
        }
        let keepalive = self.config.keepalive.is_some() && self.endpoint.is_some();
        let answering = self.answered != 0
            && self
                .answered_at
                .is_some_and(|t| now.saturating_duration_since(t) < ANSWER_HOLD);
        let busy = self.queued_packets != 0
            || answering
            || recent(self.last_handshake)
            || recent(self.last_rx)
            || recent(self.last_work);
        !keepalive && !busy
    }

    /// Feeds an authenticated-or-not datagram from `from` to boringtun.
    /// `out` must hold at least `datagram.len()` bytes and 148.
    pub fn decapsulate<'a>(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Decap<'a> {
        // Only an initiation can start protocol state; anything else for a peer
        // without it refers to a session that does not exist.
        let fresh = self.tunn.is_none();
        let tunn = match self.tunn {
            Some(ref mut tunn) => tunn,
            None if message_type(datagram) == 1 => self.tunn(),
            None => return Decap::Drop(DropReason::DecryptFailed),
        };
        let decap = match tunn.decapsulate(Some(from), datagram, out) {
            TunnResult::Done => Decap::Nothing,
            TunnResult::WriteToNetwork(b) => Decap::Reply(b),
            TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                Decap::Packet(b)
            }
            TunnResult::Err(WireGuardError::WrongKey) => Decap::WrongPeer,
            TunnResult::Err(e) => Decap::Drop(drop_reason(&e)),
        };
        // Made for an initiation that did not authenticate: gone again, so
        // knowing a peer's public key does not buy its 11 KB.
        if fresh && !matches!(decap, Decap::Reply(_)) {
            self.tunn = None;
        }
        decap
    }

    /// Next packet boringtun queued while waiting for a handshake, already
    /// encrypted. Call until `None`: the queue is then empty.
    pub fn poll_queued<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.as_mut()?.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(b) => Some(b),
            _ => {
                self.queue_emptied();
                None
            }
        }
    }

    /// Encrypts `packet` for the peer, or queues it and starts a handshake.
    /// Beyond [`QUEUE_PACKETS`] or [`QUEUE_BYTES`] waiting, the packet is dropped
    /// (`QueueFull`) and only the handshake is started, if none is under way.
    /// `out` must hold at least `packet.len() + 32` bytes and 148.
    #[inline]
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> Encap<'a> {
        debug_assert!(out.len() >= packet.len() + 32 && out.len() >= 148);
        let size = u32::try_from(packet.len()).unwrap_or(u32::MAX);
        let (packets, bytes) = (self.queued_packets, self.queued_bytes);
        let full = packets >= QUEUE_PACKETS
            || bytes.saturating_add(size) > QUEUE_BYTES
            || self
                .tunnel_held
                .load(Ordering::Relaxed)
                .saturating_add(u64::from(size))
                > TUNNEL_QUEUE_BYTES;
        // Asked only when a limit is reached (it reads the clock): with a
        // session nothing waits. Once the tunnel's limit is reached that is
        // every packet of the tunnel, until the waiting packets go or expire.
        if full
            && self
                .tunn
                .as_ref()
                .is_none_or(|t| t.time_since_last_handshake().is_none())
        {
            // Still wake the peer: the queue empties once its handshake completes.
            let initiation = match self.tunn().format_handshake_initiation(out, false) {
                TunnResult::WriteToNetwork(b) => Some(&*b),
                _ => None,
            };
            return Encap::Waiting {
                queued: false,
                initiation,
            };
        }
        match self.tunn().encapsulate(packet, out) {
            // Without a session boringtun queues the packet and hands back the
            // initiation (type 1) of the handshake it starts.
            TunnResult::WriteToNetwork(b) if message_type(b) == 1 => {
                self.queued(size);
                Encap::Waiting {
                    queued: true,
                    initiation: Some(b),
                }
            }
            TunnResult::WriteToNetwork(b) => Encap::Send(b),
            TunnResult::Done => {
                self.queued(size);
                Encap::Waiting {
                    queued: true,
                    initiation: None,
                }
            }
            TunnResult::Err(_) => Encap::Drop(DropReason::EncryptFailed),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Encap::Drop(DropReason::EncryptFailed)
            }
        }
    }

    /// Starts a handshake unless one is in progress.
    pub fn initiate<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn().format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(b) => Some(b),
            _ => None,
        }
    }

    /// Runs boringtun's timers: retransmits, rekeys, keepalives.
    pub fn update_timers<'a>(&mut self, out: &'a mut [u8]) -> Timers<'a> {
        let Some(tunn) = self.tunn.as_mut() else {
            return Timers::default();
        };
        match tunn.update_timers(out) {
            TunnResult::WriteToNetwork(b) => Timers {
                send: Some(b),
                ..Timers::default()
            },
            // boringtun empties its queue with the session (its handshake
            // gave up): the packets that waited in it are discarded.
            TunnResult::Err(WireGuardError::ConnectionExpired) => Timers {
                expired: true,
                discarded: self.handshake_gave_up(),
                ..Timers::default()
            },
            _ => Timers::default(),
        }
    }

    /// boringtun's handshake gave up (and it says so at every later run of
    /// its timers): no session, none coming, and the packets that waited are
    /// gone with it; how many there were.
    pub(crate) fn handshake_gave_up(&mut self) -> u16 {
        (self.gave_up, self.session_lost) = (true, true);
        self.queue_emptied()
    }

    /// Forgets the packets waiting for this peer's handshake (it is being
    /// removed): how many there were, for the caller to count.
    pub(crate) fn discard_queue(&mut self) -> u16 {
        self.queue_emptied()
    }

    /// Forgets the packets waiting for this peer's handshake, and the peer
    /// stays: how many there were. boringtun has no call that empties its
    /// queue, so the protocol state is made afresh. A peer holds packets only
    /// while it has no session, so all that is lost besides is a handshake
    /// under way; the next packet either way starts another, and the fresh
    /// state's timers (a keepalive we owe the peer) run on, as the peer is
    /// still on the active list.
    pub(crate) fn discard_waiting(&mut self) -> u16 {
        if self.queued_packets == 0 {
            return 0;
        }
        self.tunn = None;
        self.answered = 0;
        self.start_protocol();
        self.queue_emptied()
    }

    /// The peer's queue is empty now (sent, discarded or dropped with its
    /// protocol state): its bytes are the tunnel's again. Returns how many
    /// packets were in it.
    fn queue_emptied(&mut self) -> u16 {
        let packets = self.queued_packets;
        if self.queued_bytes != 0 {
            self.tunnel_held
                .fetch_sub(u64::from(self.queued_bytes), Ordering::Relaxed);
        }
        (self.queued_packets, self.queued_bytes) = (0, 0);
        packets
    }

    /// One more packet of `size` bytes waits in boringtun's queue.
    fn queued(&mut self, size: u32) {
        self.queued_packets = self.queued_packets.saturating_add(1);
        self.queued_bytes = self.queued_bytes.saturating_add(size);
        self.tunnel_held
            .fetch_add(u64::from(size), Ordering::Relaxed);
    }
}

impl Drop for Peer {
    /// A peer removed while packets wait gives their bytes back to the tunnel.
    fn drop(&mut self) {
        self.queue_emptied();
    }
}

/// What a peer's timers did.
#[derive(Debug, Default)]
pub struct Timers<'a> {
    /// A datagram to send (a retransmitted initiation, a keepalive).
    pub send: Option<&'a [u8]>,
    /// The session has expired, or its handshake gave up.
    pub expired: bool,
    /// Packets that waited for the handshake and went with it.
    pub discarded: u16,
}

pub(crate) fn drop_reason(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidMac => DropReason::BadMac,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
        WireGuardError::InvalidPacket => DropReason::Malformed,
        WireGuardError::InvalidAeadTag | WireGuardError::NoCurrentSession => {
            DropReason::DecryptFailed
        }
        _ => DropReason::HandshakeFailed,
    }
}

/// A WireGuard message, classified before any peer is involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A handshake initiation: the sender is found by decrypting its static key.
    Initiation,
    /// A handshake response: found by receiver index.
    Response { receiver: u32 },
    /// A cookie reply: found by receiver index.
    Cookie { receiver: u32 },
    /// A transport data message: found by receiver index.
    Data { receiver: u32 },
}

impl Message {
    /// Reads the type and, where there is one, the receiver index of `datagram`.
    #[inline]
    pub fn classify(datagram: &[u8]) -> Option<Message> {
        use boringtun::noise::Packet;
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(_) => Some(Message::Initiation),
            Packet::HandshakeResponse(p) => Some(Message::Response {
                receiver: p.receiver_idx,
            }),
            Packet::PacketCookieReply(p) => Some(Message::Cookie {
                receiver: p.receiver_idx,
            }),
            Packet::PacketData(p) => Some(Message::Data {
                receiver: p.receiver_idx,
            }),
        }
    }

    /// A handshake initiation or response: what costs Diffie-Hellman work.
    #[inline]
    pub fn is_handshake(self) -> bool {
        matches!(self, Message::Initiation | Message::Response { .. })
    }

    /// The peer index (receiver index without boringtun's 8 session bits).
    pub fn peer_index(self) -> Option<u32> {
        match self {
            Message::Initiation => None,
            Message::Response { receiver }
            | Message::Cookie { receiver }
            | Message::Data { receiver } => Some(receiver >> 8),
        }
    }
}

/// Decrypts an initiation's static key with the tunnel's key (one Diffie-Hellman),
/// to find the peer it claims to be. Run [`super::admission::Admission::admit`] first.
pub fn initiator_key(
    secret: &StaticSecret,
    public: &PublicKey,
    datagram: &[u8],
) -> Result<[u8; 32], DropReason> {
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::Packet;
    match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(init)) => parse_handshake_anon(secret, public, &init)
            .map(|half| half.peer_static_public)
            .map_err(|_| DropReason::HandshakeFailed),
        Ok(_) => Err(DropReason::InvalidDatagram),
        Err(e) => Err(drop_reason(&e)),
    }
}

/// WireGuard message type of an outgoing datagram (1 init, 2 response, 3 cookie, 4 data).
pub fn message_type(datagram: &[u8]) -> u8 {
    datagram.first().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::rate_limiter::RateLimiter;

    fn offline_peer() -> Peer {
        offline_peer_and_its_key().0
    }

    /// A peer that has never spoken, and the secret key of the other side.
    fn offline_peer_and_its_key() -> (Peer, StaticSecret, PublicKey) {
        offline_peer_holding_in(Arc::default())
    }

    /// As [`offline_peer_and_its_key`], counting what it holds in `held`.
    fn offline_peer_holding_in(held: Arc<AtomicU64>) -> (Peer, StaticSecret, PublicKey) {
        let ours = StaticSecret::random_from_rng(rand_core::OsRng);
        let theirs = StaticSecret::random_from_rng(rand_core::OsRng);
        let our_public = PublicKey::from(&ours);
        let config = PeerConfig {
            public_key: PublicKey::from(&theirs),
            allowed: Vec::new(),
            keepalive: None,
            kind: PeerKind::Router,
            endpoint: Some("198.51.100.9:51820".parse().unwrap()),
            preshared_key: None,
        };
        let macs = Arc::new(RateLimiter::new(&our_public, u64::MAX));
        let peer = Peer::new(
            Arc::new(ours),
            config,
            7,
            macs,
            Duration::from_secs(60),
            held,
        );
        (peer, theirs, our_public)
    }

    /// What `encapsulate` made of a packet: queued?, initiation sent?, dropped as?
    fn outcome(e: Encap<'_>) -> (bool, bool, Option<DropReason>) {
        match e {
            Encap::Send(_) => panic!("no session, nothing to send"),
            Encap::Waiting { queued, initiation } => (queued, initiation.is_some(), None),
            Encap::Drop(r) => (false, false, Some(r)),
        }
    }

    #[test]
    fn without_a_session_packets_wait_up_to_the_limit_then_count_as_full() {
        let mut peer = offline_peer();
        let mut out = vec![0u8; 70_000];
        let packet = [0x45u8; 100];
        // The first packet starts the handshake; the next ones only wait.
        assert_eq!(
            outcome(peer.encapsulate(&packet, &mut out)),
            (true, true, None)
        );
        for _ in 1..QUEUE_PACKETS {
            assert_eq!(
                outcome(peer.encapsulate(&packet, &mut out)),
                (true, false, None)
            );
        }
        // Full: dropped (the engine counts it), the handshake already under way.
        assert_eq!(
            outcome(peer.encapsulate(&packet, &mut out)),
            (false, false, None)
        );
    }

    #[test]
    fn large_packets_fill_the_byte_limit_first() {
        let mut peer = offline_peer();
        let mut out = vec![0u8; 70_000];
        let packet = vec![0x45u8; 60_000];
        let fit = (QUEUE_BYTES / 60_000) as usize;
        for _ in 0..fit {
            assert!(outcome(peer.encapsulate(&packet, &mut out)).0);
        }
        assert!(!outcome(peer.encapsulate(&packet, &mut out)).0);
        // A small one still fits under the byte limit.
        assert!(outcome(peer.encapsulate(&[0x45u8; 100], &mut out)).0);
    }

    #[test]
    fn once_the_handshake_completes_the_waiting_packets_leave_and_the_count_restarts() {
        let (mut peer, theirs, our_public) = offline_peer_and_its_key();
        let mut remote = Tunn::new(theirs, our_public, None, None, 99, None);
        let mut out = vec![0u8; 70_000];
        let mut buf = vec![0u8; 70_000];
        let packet = [0x45u8; 100];
        let initiation = match peer.encapsulate(&packet, &mut out) {
            Encap::Waiting {
                queued: true,
                initiation: Some(i),
            } => i.to_vec(),
            _ => panic!("the first packet waits and starts the handshake"),
        };
        for _ in 1..QUEUE_PACKETS + 10 {
            let _ = peer.encapsulate(&packet, &mut out);
        }
        // The other side answers; our side completes the handshake.
        let response = match remote.decapsulate(None, &initiation, &mut buf) {
            TunnResult::WriteToNetwork(r) => r.to_vec(),
            _ => panic!("no response"),
        };
        let from: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(matches!(
            peer.decapsulate(from, &response, &mut out),
            Decap::Reply(_)
        ));
        // Exactly the packets that were kept wait, and go now.
        let mut sent = 0;
        while peer.poll_queued(&mut out).is_some() {
            sent += 1;
        }
        assert_eq!(sent, usize::from(QUEUE_PACKETS));
        // With the queue empty and a session, packets are sent at once.
        assert!(matches!(
            peer.encapsulate(&packet, &mut out),
            Encap::Send(_)
        ));
        // Should the session go, the count starts from nothing again.
        assert_eq!((peer.queued_packets, peer.queued_bytes), (0, 0));
    }

    /// When the handshake gives up (boringtun: after 90 s, not simulated here)
    /// boringtun empties its queue; the peer says how many packets went.
    #[test]
    fn a_handshake_that_gives_up_says_how_many_packets_went_with_it() {
        let (mut peer, _, _) = offline_peer_and_its_key();
        let mut out = vec![0u8; 70_000];
        for _ in 0..5 {
            let _ = peer.encapsulate(&[0x45u8; 100], &mut out);
        }
        assert_eq!(peer.queue_emptied(), 5);
        assert_eq!((peer.queued_packets, peer.queued_bytes), (0, 0));
        assert_eq!(peer.queue_emptied(), 0);
    }

    /// A peer sending to every other peer of its tunnel that has no session
    /// fills their queues up to the tunnel's limit, not each one's: then
    /// packets are dropped. A removed peer gives its bytes back.
    #[test]
    fn the_peers_of_a_tunnel_hold_no_more_than_its_limit_together() {
        let held = Arc::new(AtomicU64::new(0));
        let mut out = vec![0u8; 70_000];
        let packet = vec![0x45u8; 60_000];
        let mut peers: Vec<Peer> = (0..80)
            .map(|_| offline_peer_holding_in(Arc::clone(&held)).0)
            .collect();
        let mut queued = Vec::new();
        for peer in &mut peers {
            let mut bytes = 0u64;
            while outcome(peer.encapsulate(&packet, &mut out)).0 {
                bytes += 60_000;
            }
            queued.push(bytes);
        }
        let total: u64 = queued.iter().sum();
        assert!(
            total <= TUNNEL_QUEUE_BYTES && total + 60_000 > TUNNEL_QUEUE_BYTES,
            "{total}"
        );
        assert_eq!(held.load(Ordering::Relaxed), total);
        assert_eq!(queued[0], u64::from(QUEUE_BYTES / 60_000) * 60_000);
        assert_eq!(queued[79], 0, "the tunnel's limit, not the peer's");

        let kept: u64 = queued[..10].iter().sum();
        peers.truncate(10);
        assert_eq!(held.load(Ordering::Relaxed), kept);
        peers[0].stop_protocol();
        assert_eq!(held.load(Ordering::Relaxed), kept - queued[0]);
        drop(peers);
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }
}
