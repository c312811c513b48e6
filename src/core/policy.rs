//! The routing rules of a tunnel, as a pure function.
//!
//! [`RoutingState`] is what one tunnel knows about where addresses live: its own
//! server addresses, the prefixes of its peers and its egress policies. [`decide`]
//! applies the rules of ARCHITECTURE.md in order to one packet that arrived decrypted
//! from a peer. Nothing here looks at another tunnel, reads a clock or touches a
//! socket: whether a gateway is live, and whether a peer is a client, are asked
//! through closures.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::table::PrefixTable;

/// A peer's slot in its tunnel.
pub type PeerId = u32;

/// An egress policy after its gateways were resolved to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// Client pool: packets whose source lies here leave through a gateway.
    pub pool: IpNet,
    /// Gateway peers, primary first.
    pub gateways: Vec<PeerId>,
}

/// What one tunnel knows about where addresses live.
#[derive(Default)]
pub struct RoutingState {
    /// The tunnel's own addresses (the server address, v4 and optionally v6).
    pub local: Vec<IpAddr>,
    /// Every peer's allowed prefixes; a prefix belongs to exactly one peer.
    pub routes: PrefixTable<PeerId>,
    /// Egress policies, pools disjoint.
    pub egress: Vec<Egress>,
    /// Host-side prefixes peers may reach through the host device (TUN mode).
    pub host: PrefixTable<()>,
    /// Sources the host routes back into this tunnel (TUN mode: the tenant's
    /// subnet): only packets from these go to the host device.
    pub host_sources: PrefixTable<()>,
    /// The tunnel's own address is served by the host device (TUN mode), not
    /// by a userspace stack: then rule 4 takes only `host_sources` too.
    pub local_is_host: bool,
    /// The network and broadcast addresses of the tenant's IPv4 subnet, which
    /// no peer's packet goes to (a directed broadcast).
    pub subnet_edges: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// Why a packet was dropped. Used as an index into counters, so keep `ALL` in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The datagram is not a WireGuard message.
    InvalidDatagram,
    /// A handshake's MAC did not verify against the tunnel's key.
    BadMac,
    /// A handshake that proved its address (a valid cookie) while the tunnel
    /// is under load, but found the handshake budget, or its source's share
    /// of it, spent: dropped, and retried by its sender. (One without a
    /// valid cookie is answered with a cookie reply instead, counted apart.)
    UnderLoad,
    /// A handshake initiation from a key that is not a peer of this tunnel.
    UnknownPeer,
    /// A message for a receiver index no peer of this tunnel owns.
    UnknownIndex,
    /// The handshake failed (replayed timestamp, bad encryption, wrong state).
    HandshakeFailed,
    /// A data message that failed authentication, or arrived without a session.
    DecryptFailed,
    /// A data message whose counter was already seen or is too old.
    Replay,
    /// The decrypted packet is not a well-formed IPv4/IPv6 packet.
    Malformed,
    /// The inner source is not an address the sending peer may use.
    SpoofedSource,
    /// A client-pool packet, but no gateway of its policy has a live session.
    EgressDown,
    /// The destination is the tunnel's own address, but no local stack or host device serves it.
    LocalUnavailable,
    /// For the tunnel's userspace stack, whose input queue is full (a flood).
    LocalQueueFull,
    /// No peer of this tunnel owns the destination.
    NoRoute,
    /// The route leads back to the peer the packet came from.
    LoopBack,
    /// The next hop has never told us where it is.
    NoEndpoint,
    /// Encryption for the next hop failed.
    EncryptFailed,
    /// The next hop has no session yet and already holds as many packets as
    /// it may while its handshake is under way.
    QueueFull,
    /// For the host device (TUN mode), from an address the host has no route
    /// back into the tunnel for (a router's LAN, not the tenant's subnet).
    HostSource,
    /// The packet waited for a handshake that gave up (boringtun: after 90 s).
    HandshakeTimeout,
    /// A handshake initiation beyond what a tunnel holds for its next turns
    /// (a storm): dropped unanswered, as kernel WireGuard drops beyond its
    /// handshake queue, so that no wake-up handles more than a turn of them.
    HandshakeQueueFull,
    /// A packet from one peer for another that arrived with no hop left
    /// (IPv4 TTL or IPv6 hop limit 1 or 0): answered "time exceeded".
    TtlExpired,
    /// A peer's packet from or to an address no router forwards (RFC 1812
    /// 5.3.7, RFC 4291 2.5.6): the limited broadcast, multicast, loopback,
    /// link-local, "this network", reserved, IPv4-mapped; also when a wide
    /// allowed prefix of the peer covers it. Or to the tenant subnet's network
    /// or broadcast address (a directed broadcast).
    Martian,
    /// The packet waited for the handshake of a peer that was removed (or
    /// replaced by a new key) meanwhile.
    PeerRemoved,
    /// The packet waited for the handshake of a gateway that was taken out of
    /// every egress policy meanwhile: what a client sent through it must not
    /// reach it any more.
    GatewayWithdrawn,
    /// An IPv6 fragment for the tunnel's userspace stack, which puts together
    /// IPv4 datagrams only (its services answer small packets: ping, TCP
    /// within the MTU).
    LocalFragment,
    /// The datagram came from an underlay address nothing can be sent back to:
    /// port 0, or an unspecified, multicast or broadcast source. Forged; an
    /// answer to it would only make the kernel refuse the send.
    UnanswerableSource,
    /// A peer's packet for a client pool from a peer that is none of its
    /// gateways: clients are reached only through their gateway (its NAT,
    /// firewall and billing), as they leave only through it.
    GatewayBypass,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 28] = [
        Self::InvalidDatagram,
        Self::BadMac,
        Self::UnderLoad,
        Self::UnknownPeer,
        Self::UnknownIndex,
        Self::HandshakeFailed,
        Self::DecryptFailed,
        Self::Replay,
        Self::Malformed,
        Self::SpoofedSource,
        Self::EgressDown,
        Self::LocalUnavailable,
        Self::LocalQueueFull,
        Self::NoRoute,
        Self::LoopBack,
        Self::NoEndpoint,
        Self::EncryptFailed,
        Self::QueueFull,
        Self::HostSource,
        Self::HandshakeTimeout,
        Self::HandshakeQueueFull,
        Self::TtlExpired,
        Self::Martian,
        Self::PeerRemoved,
        Self::GatewayWithdrawn,
        Self::LocalFragment,
        Self::UnanswerableSource,
        Self::GatewayBypass,
    ];

    /// Stable snake_case name, used in metrics and the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidDatagram => "invalid_datagram",
            Self::BadMac => "bad_mac",
            Self::UnderLoad => "under_load",
            Self::UnknownPeer => "unknown_peer",
            Self::UnknownIndex => "unknown_index",
            Self::HandshakeFailed => "handshake_failed",
            Self::DecryptFailed => "decrypt_failed",
            Self::Replay => "replay",
            Self::Malformed => "malformed",
            Self::SpoofedSource => "spoofed_source",
            Self::EgressDown => "egress_down",
            Self::LocalUnavailable => "local_unavailable",
            Self::LocalQueueFull => "local_queue_full",
            Self::NoRoute => "no_route",
            Self::LoopBack => "loop_back",
            Self::NoEndpoint => "no_endpoint",
            Self::EncryptFailed => "encrypt_failed",
            Self::QueueFull => "queue_full",
            Self::HostSource => "host_source",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeQueueFull => "handshake_queue_full",
            Self::PeerRemoved => "peer_removed",
            Self::GatewayWithdrawn => "gateway_withdrawn",
            Self::LocalFragment => "local_fragment",
            Self::UnanswerableSource => "unanswerable_source",
            Self::GatewayBypass => "gateway_bypass",
            Self::Martian => "martian",
            Self::TtlExpired => "ttl_expired",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Which rule produced a forwarding verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Rule 3: the source is in this pool, the packet goes to its gateway.
    Egress { pool: IpNet },
    /// Rule 5: longest-prefix match on the destination.
    Prefix { prefix: IpNet },
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Encrypt for this peer and send it.
    Forward { peer: PeerId, rule: Rule },
    /// The destination is the tunnel's own address.
    Local,
    /// The destination is one of the tunnel's host prefixes: to the host device.
    Host,
    /// Drop and count. For `EgressDown`, `wake` is the egress policy (an index
    /// into [`RoutingState::egress`]) whose gateways to wake up.
    Drop {
        reason: DropReason,
        wake: Option<usize>,
    },
}

impl Verdict {
    fn drop(reason: DropReason) -> Self {
        Verdict::Drop { reason, wake: None }
    }
}

/// Where a packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Decrypted from this peer.
    Peer(PeerId),
    /// From the host side (TUN device or local stack); already trusted.
    Host,
}

/// Whether `addr` is one no router forwards packets from or to (RFC 1812
/// 5.3.7, RFC 4291 2.5.6): the limited broadcast and the reserved 240/4,
/// multicast, loopback, link-local, "this network" (0/8), and for IPv6 the
/// unspecified address and IPv4-mapped addresses. Nor is an ICMP error sent
/// to one.
#[inline]
pub(crate) fn is_martian(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            first == 0 || first >= 224 || v4.is_loopback() || v4.is_link_local()
        }
        IpAddr::V6(v6) => {
            v6.is_multicast()
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some()
        }
    }
}

/// Applies routing rules 2 to 6 to a parsed packet (rule 1, parsing, is the caller's).
///
/// `is_live(peer)` tells whether a gateway has a session now, `is_client(peer)`
/// whether a peer is a client (a phone).
#[inline]
pub fn decide(
    state: &RoutingState,
    origin: Origin,
    src: IpAddr,
    dst: IpAddr,
    is_live: impl Fn(PeerId) -> bool,
    is_client: impl Fn(PeerId) -> bool,
) -> Verdict {
    let from = match origin {
        Origin::Peer(p) => Some(p),
        Origin::Host => None,
    };

    if let Some(p) = from {
        // Rule 2: source check. Cryptokey routing: the owner of `src` must be `p`,
        // except that a gateway may send anything towards its policy's pool.
        let owns_src = state.routes.lookup(src) == Some(&p);
        let gateway_return = || {
            state
                .egress
                .iter()
                .any(|e| e.pool.contains(&dst) && e.gateways.contains(&p))
        };
        if !owns_src && !gateway_return() {
            return Verdict::drop(DropReason::SpoofedSource);
        }
        // No peer's packet is forwarded from or to a martian, nor delivered
        // here, even under a wide allowed prefix (`128.0.0.0/1` covers the
        // multicast and broadcast addresses); a client's martian would
        // otherwise go to its gateway.
        let directed = |a: IpAddr| match (a, state.subnet_edges) {
            (IpAddr::V4(a), Some((network, broadcast))) => a == network || a == broadcast,
            _ => false,
        };
        if is_martian(src) || is_martian(dst) || directed(dst) {
            return Verdict::drop(DropReason::Martian);
        }

        // Rule 3: egress policy. Client traffic leaves through a live gateway, whatever
        // its destination. Packets sent by a gateway itself (hairpin between clients)
        // are routed normally, or they would bounce back to it forever.
        if let Some((i, e)) = state
            .egress
            .iter()
            .enumerate()
            .find(|(_, e)| e.pool.contains(&src))
        {
            if !e.gateways.contains(&p) {
                return match e.gateways.iter().copied().find(|&g| is_live(g)) {
                    Some(g) => Verdict::Forward {
                        peer: g,
                        rule: Rule::Egress { pool: e.pool },
                    },
                    None => Verdict::Drop {
                        reason: DropReason::EgressDown,
                        wake: Some(i),
                    },
                };
            }
        } else if is_client(p) {
            // A client whose address lies in no pool (its policy went while
            // the tunnel still held it) has no way out, and so no other.
            return Verdict::Drop {
                reason: DropReason::EgressDown,
                wake: None,
            };
        }
        // Clients are reached only through their gateways, as they leave:
        // no other peer's packet gets to a pool.
        if state.egress.iter().any(|e| e.pool.contains(&dst)) && !gateway_return() {
            return Verdict::drop(DropReason::GatewayBypass);
        }
    }

    // Rule 4: the tunnel's own address, and the host prefixes behind it (TUN mode).
    // What goes to the host device comes only from where the host routes back.
    let to_host_from_elsewhere = || from.is_some() && state.host_sources.lookup(src).is_none();
    if state.local.contains(&dst) {
        if state.local_is_host && to_host_from_elsewhere() {
            return Verdict::drop(DropReason::HostSource);
        }
        return Verdict::Local;
    }
    if state.host.lookup(dst).is_some() {
        return match origin {
            Origin::Peer(_) if to_host_from_elsewhere() => Verdict::drop(DropReason::HostSource),
            Origin::Peer(_) => Verdict::Host,
            Origin::Host => Verdict::drop(DropReason::LoopBack),
        };
    }

    // Rule 5: longest-prefix match within this tunnel; rule 6: nothing matched.
    match state.routes.lookup_with_prefix(dst) {
        Some((_, &q)) if Some(q) == from => Verdict::drop(DropReason::LoopBack),
        Some((prefix, &q)) => Verdict::Forward {
            peer: q,
            rule: Rule::Prefix { prefix },
        },
        None => Verdict::drop(DropReason::NoRoute),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER_A: PeerId = 0;
    const ROUTER_B: PeerId = 1;
    const GATEWAY: PeerId = 2;
    const PHONE_1: PeerId = 3;
    const PHONE_2: PeerId = 4;
    const GATEWAY_2: PeerId = 5;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The seed's KTN topology: tenant 10.100.0.0/16, gateway 10.100.0.40, pool 10.200.0.0/24.
    fn ktn() -> RoutingState {
        let mut s = RoutingState {
            local: vec![ip("10.100.0.1")],
            ..Default::default()
        };
        for (p, net) in [
            (ROUTER_A, "10.100.1.1/32"),
            (ROUTER_A, "192.168.88.0/24"),
            (ROUTER_B, "10.100.1.2/32"),
            (GATEWAY, "10.100.0.40/32"),
            (PHONE_1, "10.200.0.2/32"),
            (PHONE_2, "10.200.0.3/32"),
            (GATEWAY_2, "10.100.0.41/32"),
        ] {
            s.routes.insert(net.parse().unwrap(), p);
        }
        s.egress.push(Egress {
            pool: "10.200.0.0/24".parse().unwrap(),
            gateways: vec![GATEWAY, GATEWAY_2],
        });
        s
    }

    fn from(p: PeerId, src: &str, dst: &str, live: &[PeerId]) -> Verdict {
        decide(
            &ktn(),
            Origin::Peer(p),
            ip(src),
            ip(dst),
            |g| live.contains(&g),
            is_phone,
        )
    }

    #[test]
    fn client_traffic_goes_to_primary_gateway_whatever_the_destination() {
        for dst in ["198.18.0.1", "10.100.1.1", "10.200.0.3", "10.100.0.1"] {
            assert_eq!(
                from(PHONE_1, "10.200.0.2", dst, &[GATEWAY, GATEWAY_2]),
                Verdict::Forward {
                    peer: GATEWAY,
                    rule: Rule::Egress {
                        pool: "10.200.0.0/24".parse().unwrap()
                    }
                },
                "dst {dst}"
            );
        }
    }

    /// `ALL` lists every reason at its own index, names distinct: the
    /// counters and their metric labels line up.
    #[test]
    fn every_reason_sits_at_its_index() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }

    /// IPv4 addresses no router forwards to: broadcast, multicast, class E,
    /// loopback, link-local, "this network".
    const MARTIANS_V4: [&str; 7] = [
        "255.255.255.255",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.1.2.3",
    ];

    /// A phone's broadcast, multicast and other martian destinations are
    /// dropped, not handed to the gateway; its ordinary ones are not.
    #[test]
    fn client_martians_are_dropped_not_sent_to_the_gateway() {
        for dst in MARTIANS_V4 {
            assert_eq!(
                from(PHONE_1, "10.200.0.2", dst, &[GATEWAY]),
                Verdict::drop(DropReason::Martian),
                "dst {dst}"
            );
        }
        for dst in ["223.255.255.254", "1.0.0.1", "10.200.0.255", "100.64.0.1"] {
            assert!(
                matches!(
                    from(PHONE_1, "10.200.0.2", dst, &[GATEWAY]),
                    Verdict::Forward { peer: GATEWAY, .. }
                ),
                "dst {dst}"
            );
        }
        for dst in ["ff02::1", "::1", "::", "fe80::1", "::ffff:10.100.1.1"] {
            assert!(is_martian(dst.parse().unwrap()), "{dst}");
        }
        assert!(!is_martian("2001:db8::1".parse().unwrap()));
    }

    /// A router whose allowed prefixes are wide enough to cover broadcast,
    /// multicast and loopback addresses neither receives nor sends them: no
    /// router forwards those (RFC 1812 5.3.7, RFC 4291 2.5.6), nor does the
    /// hub deliver them to itself. Its ordinary addresses still work.
    #[test]
    fn a_wide_prefix_carries_no_martians() {
        let mut state = ktn();
        for net in ["128.0.0.0/1", "64.0.0.0/2", "0.0.0.0/5", "::/1", "fe00::/7"] {
            state.routes.insert(net.parse().unwrap(), ROUTER_B);
        }
        state
            .routes
            .insert("2001:db8::1/128".parse().unwrap(), ROUTER_A);
        let decide = |p, src: &str, dst: &str| {
            decide(
                &state,
                Origin::Peer(p),
                ip(src),
                ip(dst),
                |_| true,
                is_phone,
            )
        };
        let martian = Verdict::drop(DropReason::Martian);
        for dst in MARTIANS_V4 {
            assert_eq!(decide(ROUTER_A, "10.100.1.1", dst), martian, "to {dst}");
        }
        for dst in ["::1", "fe80::1", "ff02::1", "::ffff:10.100.1.2"] {
            assert_eq!(decide(ROUTER_A, "2001:db8::1", dst), martian, "to {dst}");
        }
        for src in [
            "224.0.0.1",
            "240.0.0.1",
            "127.0.0.1",
            "255.255.255.255",
            "0.0.0.1",
        ] {
            for dst in ["10.100.1.1", "10.100.0.1"] {
                assert_eq!(decide(ROUTER_B, src, dst), martian, "{src} to {dst}");
            }
        }
        for src in ["::1", "fe80::2", "::ffff:192.0.2.1"] {
            assert_eq!(decide(ROUTER_B, src, "2001:db8::1"), martian, "{src}");
        }
        assert!(matches!(
            decide(ROUTER_A, "10.100.1.1", "198.18.0.1"),
            Verdict::Forward { peer: ROUTER_B, .. }
        ));
        assert!(matches!(
            decide(ROUTER_B, "198.18.0.1", "10.100.1.1"),
            Verdict::Forward { peer: ROUTER_A, .. }
        ));
        assert_eq!(decide(ROUTER_B, "198.18.0.1", "10.100.0.1"), Verdict::Local);
    }

    /// A directed broadcast to the tenant's subnet (or its network address) is
    /// no router's packet to forward (RFC 1812 5.3.5.2), nor one that earns a
    /// "host unreachable"; the subnet's other addresses are routed as ever.
    #[test]
    fn a_directed_broadcast_to_the_subnet_is_a_martian() {
        let mut state = ktn();
        state.subnet_edges = Some((
            "10.100.0.0".parse().unwrap(),
            "10.100.255.255".parse().unwrap(),
        ));
        let decide = |dst: &str| {
            decide(
                &state,
                Origin::Peer(ROUTER_A),
                ip("10.100.1.1"),
                ip(dst),
                |_| true,
                is_phone,
            )
        };
        let martian = Verdict::drop(DropReason::Martian);
        assert_eq!(decide("10.100.255.255"), martian);
        assert_eq!(decide("10.100.0.0"), martian);
        assert_eq!(decide("10.100.255.254"), Verdict::drop(DropReason::NoRoute));
        assert!(matches!(
            decide("10.100.1.2"),
            Verdict::Forward { peer: ROUTER_B, .. }
        ));
    }

    #[test]
    fn client_fails_over_to_secondary_then_drops() {
        assert!(matches!(
            from(PHONE_1, "10.200.0.2", "198.18.0.1", &[GATEWAY_2]),
            Verdict::Forward {
                peer: GATEWAY_2,
                ..
            }
        ));
        assert_eq!(
            from(PHONE_1, "10.200.0.2", "198.18.0.1", &[]),
            Verdict::Drop {
                reason: DropReason::EgressDown,
                wake: Some(0)
            }
        );
    }

    #[test]
    fn gateway_return_traffic_reaches_the_phone() {
        assert!(matches!(
            from(GATEWAY, "198.18.0.1", "10.200.0.2", &[]),
            Verdict::Forward { peer: PHONE_1, .. }
        ));
        // Hairpin between clients through the gateway is not bounced back to it.
        assert!(matches!(
            from(GATEWAY, "10.200.0.2", "10.200.0.3", &[GATEWAY]),
            Verdict::Forward { peer: PHONE_2, .. }
        ));
    }

    #[test]
    fn gateway_may_not_send_from_arbitrary_addresses_elsewhere() {
        assert_eq!(
            from(GATEWAY, "198.18.0.1", "10.100.1.1", &[]),
            Verdict::drop(DropReason::SpoofedSource)
        );
    }

    #[test]
    fn source_check() {
        // A router sending with another router's, a gateway's or a client's address.
        for src in ["10.100.1.2", "10.100.0.40", "10.200.0.2", "8.8.8.8"] {
            assert_eq!(
                from(ROUTER_A, src, "10.100.1.2", &[GATEWAY]),
                Verdict::drop(DropReason::SpoofedSource),
                "src {src}"
            );
        }
        // A client sending with the gateway's or another client's address.
        for src in ["10.100.0.40", "10.200.0.3"] {
            assert_eq!(
                from(PHONE_1, src, "198.18.0.1", &[GATEWAY]),
                Verdict::drop(DropReason::SpoofedSource)
            );
        }
        // Extra prefixes behind a router are its own.
        assert!(matches!(
            from(ROUTER_A, "192.168.88.10", "10.100.1.2", &[]),
            Verdict::Forward { peer: ROUTER_B, .. }
        ));
    }

    #[test]
    fn routers_reach_each_other_the_server_and_nothing_else() {
        assert!(matches!(
            from(ROUTER_A, "10.100.1.1", "10.100.1.2", &[]),
            Verdict::Forward { peer: ROUTER_B, .. }
        ));
        assert_eq!(
            from(ROUTER_A, "10.100.1.1", "10.100.0.1", &[]),
            Verdict::Local
        );
        assert_eq!(
            from(ROUTER_A, "10.100.1.1", "10.101.1.1", &[]),
            Verdict::drop(DropReason::NoRoute)
        );
        assert_eq!(
            from(ROUTER_A, "10.100.1.1", "192.168.88.1", &[]),
            Verdict::drop(DropReason::LoopBack)
        );
    }

    #[test]
    fn host_prefixes_go_to_the_host_but_never_for_clients() {
        let mut s = ktn();
        s.host.insert("198.18.5.0/24".parse().unwrap(), ());
        s.host_sources.insert("10.100.0.0/16".parse().unwrap(), ());
        let d = |p, src: &str| {
            decide(
                &s,
                Origin::Peer(p),
                ip(src),
                ip("198.18.5.9"),
                |_| true,
                is_phone,
            )
        };
        assert_eq!(d(ROUTER_A, "10.100.1.1"), Verdict::Host);
        // From the router's LAN: the host would have no route back.
        assert_eq!(
            d(ROUTER_A, "192.168.88.7"),
            Verdict::drop(DropReason::HostSource)
        );

        assert!(matches!(
            d(PHONE_1, "10.200.0.2"),
            Verdict::Forward { peer: GATEWAY, .. }
        ));
        let back = decide(
            &s,
            Origin::Host,
            ip("198.18.5.9"),
            ip("198.18.5.1"),
            |_| true,
            is_phone,
        );
        assert_eq!(back, Verdict::drop(DropReason::LoopBack));
    }

    #[test]
    fn the_server_address_served_by_the_host_takes_only_what_the_host_routes_back() {
        let mut s = ktn();
        s.host_sources.insert("10.100.0.0/16".parse().unwrap(), ());
        let to_server = |s: &RoutingState, src: &str| {
            decide(
                s,
                Origin::Peer(ROUTER_A),
                ip(src),
                ip("10.100.0.1"),
                |_| true,
                is_phone,
            )
        };
        // A userspace stack routes its answers back itself: from anywhere.
        assert_eq!(to_server(&s, "192.168.88.7"), Verdict::Local);
        // The host device: only from the subnet it routes into the tunnel.
        s.local_is_host = true;
        assert_eq!(to_server(&s, "10.100.1.1"), Verdict::Local);
        assert_eq!(
            to_server(&s, "192.168.88.7"),
            Verdict::drop(DropReason::HostSource)
        );
        // The host's own packets to the address are not the peers' business.
        let v = decide(
            &s,
            Origin::Host,
            ip("172.16.0.1"),
            ip("10.100.0.1"),
            |_| true,
            is_phone,
        );
        assert_eq!(v, Verdict::Local);
    }

    #[test]
    fn host_packets_skip_the_source_check_and_the_egress_rule() {
        let v = decide(
            &ktn(),
            Origin::Host,
            ip("10.100.0.1"),
            ip("10.200.0.2"),
            |_| false,
            is_phone,
        );
        assert!(matches!(v, Verdict::Forward { peer: PHONE_1, .. }));
    }

    fn is_phone(p: PeerId) -> bool {
        [PHONE_1, PHONE_2].contains(&p)
    }

    /// Phones are reached only through a gateway of their pool: another
    /// router's packet to one is dropped whatever its protocol, as is one of
    /// the gateways' to a pool they do not serve; what the gateway sends back
    /// goes on.
    #[test]
    fn only_a_gateway_reaches_the_phones() {
        let bypass = Verdict::drop(DropReason::GatewayBypass);
        for dst in ["10.200.0.2", "10.200.0.3", "10.200.0.200"] {
            assert_eq!(
                from(ROUTER_A, "10.100.1.1", dst, &[GATEWAY]),
                bypass,
                "{dst}"
            );
            assert_eq!(
                from(ROUTER_B, "10.100.1.2", dst, &[GATEWAY]),
                bypass,
                "{dst}"
            );
        }
        for gateway in [GATEWAY, GATEWAY_2] {
            assert!(matches!(
                from(gateway, "198.18.0.1", "10.200.0.2", &[GATEWAY]),
                Verdict::Forward { peer: PHONE_1, .. }
            ));
        }
        // A second pool, served by GATEWAY_2 alone: GATEWAY is a bypass there.
        let mut s = ktn();
        s.routes.insert("10.201.0.2/32".parse().unwrap(), 6);
        s.egress.push(Egress {
            pool: "10.201.0.0/24".parse().unwrap(),
            gateways: vec![GATEWAY_2],
        });
        let to_second = |p, src: &str| {
            decide(
                &s,
                Origin::Peer(p),
                ip(src),
                ip("10.201.0.2"),
                |_| true,
                is_phone,
            )
        };
        assert_eq!(to_second(GATEWAY, "10.100.0.40"), bypass);
        assert!(matches!(
            to_second(GATEWAY_2, "10.100.0.41"),
            Verdict::Forward { peer: 6, .. }
        ));
        // Phones to phones go by their gateway, as everything they send.
        assert!(matches!(
            from(PHONE_1, "10.200.0.2", "10.200.0.3", &[GATEWAY]),
            Verdict::Forward {
                peer: GATEWAY,
                rule: Rule::Egress { .. }
            }
        ));
    }

    /// A client the tunnel still holds after its pool's policy went (a change
    /// lost on its way) has no way out: not by the server address, the host,
    /// another router or another phone.
    #[test]
    fn a_client_outside_every_pool_goes_nowhere() {
        let mut s = ktn();
        s.egress.clear();
        for dst in ["198.18.0.1", "10.100.1.1", "10.100.0.1", "10.200.0.3"] {
            let v = decide(
                &s,
                Origin::Peer(PHONE_1),
                ip("10.200.0.2"),
                ip(dst),
                |_| true,
                is_phone,
            );
            assert_eq!(
                v,
                Verdict::Drop {
                    reason: DropReason::EgressDown,
                    wake: None
                },
                "to {dst}"
            );
        }
        // Routers are routed as before.
        let v = decide(
            &s,
            Origin::Peer(ROUTER_A),
            ip("10.100.1.1"),
            ip("10.100.1.2"),
            |_| true,
            is_phone,
        );
        assert!(matches!(v, Verdict::Forward { peer: ROUTER_B, .. }));
    }
}
