//! What the hub does as a router for packets it forwards between peers: the
//! hop limit, and the ICMP errors that tell a sender why its packet went no
//! further.
//!
//! A packet forwarded from one peer to another has its IPv4 TTL or IPv6 hop
//! limit lowered by one (the IPv4 header checksum updated in place, as Linux's
//! `ip_decrease_ttl` does); one that arrives with 1 or 0 left is dropped and
//! answered "time exceeded", so `traceroute` shows the hub as a hop and a
//! routing loop between routers ends. A packet for an address no peer of the
//! tunnel owns, or for a peer that never said where it is, is answered "host
//! unreachable", as kernel WireGuard answers it.
//!
//! Errors are built with smoltcp's wire views, from the tunnel's own address,
//! and carry as much of the offending packet as RFC 1812 and RFC 4443 allow
//! (576 and 1280 bytes in all). None is sent about an ICMP error, a fragment
//! other than the first, a packet to a multicast or broadcast address, or one
//! from an address that names no single host (a martian: loopback, class E,
//! "this network", multicast; RFC 1122 3.2.2, RFC 4443 2.4). A tunnel sends at
//! most [`ERRORS_PER_SECOND`] (bursts of [`ERROR_BURST`]), so a flood of doomed
//! packets costs no more than that; and each peer gets at most
//! [`PEER_ERRORS_PER_SECOND`] of them (bursts of [`PEER_ERROR_BURST`]), so one
//! router's flood leaves the rest to the tunnel's other peers.
//!
//! Left out: "fragmentation needed" and "packet too big". Peers and the host
//! device share one MTU (1420), and a larger inner packet leaves in outer
//! fragments, as kernel WireGuard's do. No error goes to a KTN phone whose
//! gateway is down: the drop wakes the gateways, and an "unreachable" would
//! make the phone give up a connection the next packet completes. Time is passed
//! in; nothing here reads a clock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::core::packet;
use crate::core::policy::is_martian;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6Packet,
};

/// Errors a tunnel sends per second at most.
pub const ERRORS_PER_SECOND: u32 = 100;
/// Errors a tunnel may send at once after a quiet spell.
pub const ERROR_BURST: u32 = 20;
/// Errors one peer gets per second at most (a traceroute's three probes a
/// hop, several at once, fit).
pub const PEER_ERRORS_PER_SECOND: u32 = 10;
/// Errors one peer may get at once after a quiet spell.
pub const PEER_ERROR_BURST: u32 = 10;

/// Largest IPv4 error (RFC 1812: as much of the packet as fits in 576 bytes).
const V4_ERROR_MAX: usize = 576;
/// Largest IPv6 error (RFC 4443: as much as fits the minimum MTU).
pub const V6_ERROR_MAX: usize = 1280;
/// Room for an error of either family.
pub const ERROR_MAX: usize = V6_ERROR_MAX;

/// IPv4 header plus ICMP header before the quoted packet.
const V4_HEADERS: usize = 20 + 8;
/// IPv6 header plus ICMPv6 header before the quoted packet.
const V6_HEADERS: usize = 40 + 8;

/// Why the hub answers a packet with an ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The hop limit ran out here.
    TimeExceeded,
    /// No peer owns the destination, or the one that does has no endpoint.
    HostUnreachable,
}

/// Lowers the packet's TTL (IPv4, checksum updated) or hop limit (IPv6) by
/// one. False, with the packet untouched, when it has no hop left to go: it
/// must not be forwarded. `packet` is a well-formed IPv4 or IPv6 packet
/// ([`super::packet::parse`] passed it).
#[inline]
pub fn decrement_hop_limit(packet: &mut [u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            if packet[8] <= 1 {
                return false;
            }
            packet[8] -= 1;
            // RFC 1624 for a 16-bit word that drops by 0x0100, in one's
            // complement: the checksum rises by as much, its carry wrapped.
            let sum = u32::from(u16::from_be_bytes([packet[10], packet[11]])) + 0x0100;
            let sum = sum + u32::from(sum >= 0xffff);
            packet[10..12].copy_from_slice(&(sum as u16).to_be_bytes());
            true
        }
        Some(6) if packet.len() >= 40 => {
            if packet[7] <= 1 {
                return false;
            }
            packet[7] -= 1;
            true
        }
        _ => false,
    }
}

/// Writes into `out` the ICMP error `error` about `packet`, sent from `from`
/// (the tunnel's own address of the packet's family) to the packet's source,
/// and returns its length; `None` when no error may be sent about this packet.
pub fn build(error: Error, packet: &[u8], from: IpAddr, out: &mut [u8]) -> Option<usize> {
    match (packet.first().map(|b| b >> 4), from) {
        (Some(4), IpAddr::V4(from)) => build_v4(error, packet, from, out),
        (Some(6), IpAddr::V6(from)) => build_v6(error, packet, from, out),
        _ => None,
    }
}

fn build_v4(error: Error, packet: &[u8], from: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let original = Ipv4Packet::new_checked(packet).ok()?;
    let to = original.src_addr();
    let dst = original.dst_addr();
    if original.frag_offset() != 0
        || is_martian(IpAddr::V4(to))
        || dst.is_multicast()
        || dst.is_broadcast()
    {
        return None;
    }
    if original.next_header() == IpProtocol::Icmp {
        let kind = original.payload().first().copied()?;
        // Only echo request and reply (0, 8) and the rest of the queries may
        // be answered; errors (3, 4, 5, 11, 12) never are.
        if matches!(kind, 3 | 4 | 5 | 11 | 12) {
            return None;
        }
    }
    let quoted = packet.len().min(V4_ERROR_MAX - V4_HEADERS);
    let len = V4_HEADERS + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    let mut ip = Ipv4Packet::new_unchecked(&mut *out);
    ip.set_version(4);
    ip.set_header_len(20);
    // Internetwork control, as Linux marks its ICMP errors.
    ip.set_dscp(0x30);
    ip.set_total_len(len as u16);
    ip.set_hop_limit(64);
    ip.set_next_header(IpProtocol::Icmp);
    ip.set_src_addr(from);
    ip.set_dst_addr(to);
    ip.fill_checksum();
    let mut icmp = Icmpv4Packet::new_unchecked(ip.payload_mut());
    let (kind, code) = match error {
        Error::TimeExceeded => (Icmpv4Message::TimeExceeded, 0),
        Error::HostUnreachable => (Icmpv4Message::DstUnreachable, 1),
    };
    icmp.set_msg_type(kind);
    icmp.set_msg_code(code);
    icmp.data_mut()[..quoted].copy_from_slice(&packet[..quoted]);
    icmp.fill_checksum();
    Some(len)
}

fn build_v6(error: Error, packet: &[u8], from: Ipv6Addr, out: &mut [u8]) -> Option<usize> {
    let original = Ipv6Packet::new_checked(packet).ok()?;
    let to = original.src_addr();
    if is_martian(IpAddr::V6(to)) || original.dst_addr().is_multicast() {
        return None;
    }
    let (upper, payload) = upper_layer(original.next_header(), original.payload())?;
    // Errors are types 0 to 127, and a redirect (137) is not answered either
    // (RFC 4443 2.4 e); echo and the other informational messages are.
    if upper == IpProtocol::Icmpv6 && payload.first().is_none_or(|&t| t < 128 || t == 137) {
        return None;
    }
    let quoted = packet.len().min(V6_ERROR_MAX - V6_HEADERS);
    let len = V6_HEADERS + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    let mut ip = Ipv6Packet::new_unchecked(&mut *out);
    ip.set_version(6);
    ip.set_payload_len((len - 40) as u16);
    ip.set_next_header(IpProtocol::Icmpv6);
    ip.set_hop_limit(64);
    ip.set_src_addr(from);
    ip.set_dst_addr(to);
    let mut icmp = Icmpv6Packet::new_unchecked(ip.payload_mut());
    let (kind, code) = match error {
        Error::TimeExceeded => (Icmpv6Message::TimeExceeded, 0),
        // Address unreachable.
        Error::HostUnreachable => (Icmpv6Message::DstUnreachable, 3),
    };
    icmp.set_msg_type(kind);
    icmp.set_msg_code(code);
    icmp.payload_mut()[..quoted].copy_from_slice(&packet[..quoted]);
    icmp.fill_checksum(&from, &to);
    Some(len)
}

/// Whether `packet` is an ICMP or ICMPv6 error (not a query such as an echo):
/// what the userspace stack sends about a packet it cannot take, paid from
/// the same [`ErrorBudget`] as the hub's own errors.
pub fn is_error(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet).is_ok_and(|p| {
            // A later fragment's payload is the middle of the message, not
            // its type (the stack sends large echo replies in fragments).
            p.next_header() == IpProtocol::Icmp
                && p.frag_offset() == 0
                && p.payload()
                    .first()
                    .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
        }),
        Some(6) => Ipv6Packet::new_checked(packet).is_ok_and(|p| {
            upper_layer(p.next_header(), p.payload()).is_some_and(|(upper, payload)| {
                upper == IpProtocol::Icmpv6 && payload.first().is_some_and(|&t| t < 128)
            })
        }),
        _ => false,
    }
}

/// The upper-layer protocol of an IPv6 packet and its payload, past its
/// extension headers; `None` for a fragment other than the first (its
/// payload is no upper-layer header), or for extension headers that do not
/// fit or go on too long.
fn upper_layer(next: IpProtocol, rest: &[u8]) -> Option<(IpProtocol, &[u8])> {
    let upper = packet::ipv6_upper_layer(next, rest)?;
    (upper.fragment_offset.unwrap_or(0) == 0).then_some((upper.protocol, upper.payload))
}

/// An allowance of ICMP errors, `RATE` a second in bursts of `BURST`: a token
/// bucket refilled with time passed in.
#[derive(Debug, Clone)]
pub struct Budget<const RATE: u32, const BURST: u32> {
    tokens: u32,
    refilled: Option<Instant>,
}

/// A tunnel's allowance of ICMP errors.
pub type ErrorBudget = Budget<ERRORS_PER_SECOND, ERROR_BURST>;

/// One peer's share of its tunnel's errors.
pub type PeerErrorBudget = Budget<PEER_ERRORS_PER_SECOND, PEER_ERROR_BURST>;

impl<const RATE: u32, const BURST: u32> Default for Budget<RATE, BURST> {
    fn default() -> Self {
        Self {
            tokens: BURST,
            refilled: None,
        }
    }
}

impl<const RATE: u32, const BURST: u32> Budget<RATE, BURST> {
    /// Takes one error's worth if there is one at `now`.
    #[inline]
    pub fn take(&mut self, now: Instant) -> bool {
        if !self.has(now) {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Whether there is one error's worth at `now`, taking none.
    #[inline]
    pub fn has(&mut self, now: Instant) -> bool {
        let every = Duration::from_secs(1) / RATE;
        let at = *self.refilled.get_or_insert(now);
        let earned = now.saturating_duration_since(at).as_nanos() / every.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            // What was earned is spent from the clock; a full bucket banks nothing.
            self.refilled = Some(if self.tokens == BURST {
                now
            } else {
                at + every * earned
            });
        }
        self.tokens > 0
    }
}

/// Takes one error's worth from the peer's share (where the error goes to a
/// peer) and from its tunnel's budget, or from neither: a share is not spent
/// on an error the tunnel's budget refuses, nor the other way round.
pub fn take_shares(
    peer: Option<&mut PeerErrorBudget>,
    tunnel: &mut ErrorBudget,
    now: Instant,
) -> bool {
    match peer {
        Some(peer) => {
            if !(peer.has(now) && tunnel.has(now)) {
                return false;
            }
            peer.take(now) && tunnel.take(now)
        }
        None => tunnel.take(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::build::ip_packet;
    use proptest::prelude::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Repr, Icmpv6Repr, Ipv4Repr};

    fn v4(src: &str, dst: &str, ttl: u8) -> Vec<u8> {
        let mut p = ip_packet(src.parse().unwrap(), dst.parse().unwrap(), 100);
        p[8] = ttl;
        Ipv4Packet::new_unchecked(&mut p).fill_checksum();
        p
    }

    #[test]
    fn the_hop_limit_drops_by_one_and_the_checksum_stays_valid() {
        let mut p = v4("10.100.1.1", "10.100.1.2", 64);
        assert!(decrement_hop_limit(&mut p));
        let view = Ipv4Packet::new_checked(&p).unwrap();
        assert_eq!(view.hop_limit(), 63);
        assert!(view.verify_checksum());

        for last in [1, 0] {
            let mut p = v4("10.100.1.1", "10.100.1.2", last);
            let before = p.clone();
            assert!(!decrement_hop_limit(&mut p), "ttl {last}");
            assert_eq!(p, before, "untouched");
        }

        let mut p6 = ip_packet("fd77::1".parse().unwrap(), "fd77::2".parse().unwrap(), 100);
        p6[7] = 2;
        assert!(decrement_hop_limit(&mut p6));
        assert_eq!(p6[7], 1);
        assert!(!decrement_hop_limit(&mut p6));
    }

    proptest! {
        /// Whatever the header, a decrement keeps a valid checksum valid.
        #[test]
        fn a_decrement_keeps_the_checksum_valid(
            ttl in 2u8..=255,
            ident in any::<u16>(),
            tos in any::<u8>(),
            src in any::<u32>(),
            dst in any::<u32>(),
            len in 20u16..1500,
        ) {
            let mut p = vec![0u8; 20];
            {
                let mut ip = Ipv4Packet::new_unchecked(&mut p);
                ip.set_version(4);
                ip.set_header_len(20);
                ip.set_dscp(tos >> 2);
                ip.set_total_len(len);
                ip.set_ident(ident);
                ip.set_hop_limit(ttl);
                ip.set_next_header(IpProtocol::Udp);
                ip.set_src_addr(Ipv4Addr::from(src));
                ip.set_dst_addr(Ipv4Addr::from(dst));
                ip.fill_checksum();
            }
            prop_assert!(decrement_hop_limit(&mut p));
            let ip = Ipv4Packet::new_unchecked(&p);
            prop_assert_eq!(ip.hop_limit(), ttl - 1);
            prop_assert!(ip.verify_checksum());
        }
    }

    #[test]
    fn time_exceeded_quotes_the_packet_to_its_sender() {
        let p = v4("10.100.1.1", "10.100.1.2", 1);
        let mut out = [0u8; ERROR_MAX];
        let from: IpAddr = "10.100.0.1".parse().unwrap();
        let n = build(Error::TimeExceeded, &p, from, &mut out).unwrap();
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        let repr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(repr.src_addr, Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(repr.dst_addr, Ipv4Addr::new(10, 100, 1, 1));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap() {
            Icmpv4Repr::TimeExceeded { header, .. } => {
                assert_eq!(header.dst_addr, Ipv4Addr::new(10, 100, 1, 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(&icmp.data()[..p.len()], &p[..]);
    }

    #[test]
    fn unreachable_over_ipv6_is_checksummed_and_bounded() {
        let big = ip_packet(
            "fd77::101".parse().unwrap(),
            "fd77::999".parse().unwrap(),
            1400,
        );
        let mut out = [0u8; ERROR_MAX];
        let from: IpAddr = "fd77::1".parse().unwrap();
        let n = build(Error::HostUnreachable, &big, from, &mut out).unwrap();
        assert_eq!(n, V6_ERROR_MAX, "as much as fits 1280 bytes");
        let ip = Ipv6Packet::new_checked(&out[..n]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert!(
            matches!(repr, Icmpv6Repr::DstUnreachable { reason, .. }
                if reason == smoltcp::wire::Icmpv6DstUnreachable::AddrUnreachable),
            "{repr:?}"
        );
        assert_eq!(ip.dst_addr(), "fd77::101".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn no_error_about_an_error_a_fragment_or_a_multicast() {
        let mut out = [0u8; ERROR_MAX];
        let from: IpAddr = "10.100.0.1".parse().unwrap();
        let p = v4("10.100.1.1", "10.100.1.2", 1);
        let n = build(Error::TimeExceeded, &p, from, &mut out).unwrap();
        let error = out[..n].to_vec();
        assert_eq!(build(Error::TimeExceeded, &error, from, &mut out), None);

        let mut fragment = v4("10.100.1.1", "10.100.1.2", 1);
        Ipv4Packet::new_unchecked(&mut fragment).set_frag_offset(1480);
        assert_eq!(build(Error::TimeExceeded, &fragment, from, &mut out), None);

        let multicast = v4("10.100.1.1", "224.0.0.5", 1);
        assert_eq!(build(Error::TimeExceeded, &multicast, from, &mut out), None);

        // Nor to a source that names no single host (RFC 1122 3.2.2).
        for src in ["127.0.0.1", "240.0.0.1", "0.1.2.3", "224.0.0.1", "0.0.0.0"] {
            let p = v4(src, "10.100.1.2", 1);
            assert_eq!(
                build(Error::TimeExceeded, &p, from, &mut out),
                None,
                "{src}"
            );
        }
        let v6_own: IpAddr = "fd77::1".parse().unwrap();
        for src in ["::1", "::ffff:10.100.1.1", "ff02::1", "::"] {
            let mut p = ip_packet(src.parse().unwrap(), "fd77::2".parse().unwrap(), 100);
            p[7] = 1;
            assert_eq!(
                build(Error::TimeExceeded, &p, v6_own, &mut out),
                None,
                "{src}"
            );
        }

        let v6_from: IpAddr = "fd77::1".parse().unwrap();
        assert_eq!(
            build(Error::TimeExceeded, &p, v6_from, &mut out),
            None,
            "family"
        );
    }

    /// An ICMPv6 error or a later fragment behind extension headers is
    /// recognised as such; an echo behind them is answered.
    #[test]
    fn ipv6_extension_headers_are_walked() {
        let mut out = [0u8; ERROR_MAX];
        let from: IpAddr = "fd77::1".parse().unwrap();
        // IPv6 + hop-by-hop (8 bytes) + destination options (16 bytes) + ICMPv6.
        let packet = |icmp_type: u8, fragment: Option<u16>| {
            let mut p = ip_packet("fd77::101".parse().unwrap(), "fd77::2".parse().unwrap(), 32);
            p[6] = 0; // hop-by-hop first
            p[40] = if fragment.is_some() { 44 } else { 60 };
            p[41] = 0;
            if let Some(offset) = fragment {
                p[48] = 58;
                p[50..52].copy_from_slice(&offset.to_be_bytes());
            } else {
                p[48] = 58;
                p[49] = 1; // 16 bytes
            }
            let upper = if fragment.is_some() { 56 } else { 64 };
            p[upper] = icmp_type;
            p
        };
        let echo = packet(128, None);
        assert!(build(Error::TimeExceeded, &echo, from, &mut out).is_some());
        for error_type in [1, 3, 137] {
            let error = packet(error_type, None);
            assert_eq!(
                build(Error::TimeExceeded, &error, from, &mut out),
                None,
                "type {error_type}"
            );
        }
        let first = packet(128, Some(0));
        assert!(build(Error::TimeExceeded, &first, from, &mut out).is_some());
        let later = packet(128, Some(1232));
        assert_eq!(build(Error::TimeExceeded, &later, from, &mut out), None);
    }

    /// The one checksum whose update carries round: 0xFEFF becomes 0x0000,
    /// as Linux's `ip_decrease_ttl` makes it.
    #[test]
    fn the_carry_edge_of_the_checksum_update() {
        let mut p = v4("10.100.1.1", "10.100.1.2", 64);
        // Find an ident that gives the header the checksum 0xFEFF.
        let ident = (0..=u16::MAX)
            .find(|&ident| {
                let mut ip = Ipv4Packet::new_unchecked(&mut p);
                ip.set_ident(ident);
                ip.fill_checksum();
                ip.checksum() == 0xfeff
            })
            .expect("some ident gives 0xFEFF");
        assert_eq!(Ipv4Packet::new_unchecked(&p).ident(), ident);
        assert!(decrement_hop_limit(&mut p));
        let ip = Ipv4Packet::new_unchecked(&p);
        assert_eq!(ip.checksum(), 0x0000);
        assert!(ip.verify_checksum());
    }

    /// An error the tunnel's budget refuses costs the peer's share nothing,
    /// and the other way round.
    #[test]
    fn shares_are_taken_together_or_not_at_all() {
        let now = Instant::now();
        let mut tunnel = ErrorBudget::default();
        while tunnel.take(now) {}
        let mut peer = PeerErrorBudget::default();
        assert!(!take_shares(Some(&mut peer), &mut tunnel, now));
        let left = (0..100).filter(|_| peer.take(now)).count();
        assert_eq!(left, PEER_ERROR_BURST as usize, "the share kept");

        let mut tunnel = ErrorBudget::default();
        assert!(
            !take_shares(Some(&mut peer), &mut tunnel, now),
            "no share left"
        );
        let left = (0..100).filter(|_| tunnel.take(now)).count();
        assert_eq!(left, ERROR_BURST as usize, "the tunnel's budget kept");
        let mut tunnel = ErrorBudget::default();
        assert!(take_shares(None, &mut tunnel, now), "an error for no peer");
    }

    /// The type byte names an error only in a message's first fragment: a
    /// later one of a large echo reply is no error, whatever its bytes.
    #[test]
    fn only_a_first_fragment_can_be_an_error() {
        let echo = crate::core::packet::build::icmp_echo_request(
            Ipv4Addr::new(10, 100, 0, 1),
            Ipv4Addr::new(10, 100, 1, 1),
            1,
        );
        assert!(!is_error(&echo), "an echo is a query");
        let mut p = echo.clone();
        p[20] = 3; // destination unreachable
        assert!(is_error(&p));
        Ipv4Packet::new_unchecked(&mut p[..]).set_frag_offset(1480);
        Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
        assert!(!is_error(&p), "a later fragment starting with 3");
    }

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut budget = ErrorBudget::default();
        let burst = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(burst, ERROR_BURST as usize);
        // Over the next second: about the rate, never more.
        let sent = (1..=1000u64)
            .filter(|ms| budget.take(start + Duration::from_millis(*ms)))
            .count();
        assert_eq!(sent, ERRORS_PER_SECOND as usize);
        // A long quiet spell refills no more than a burst.
        let later = start + Duration::from_secs(3600);
        let burst = (0..100).filter(|_| budget.take(later)).count();
        assert_eq!(burst, ERROR_BURST as usize);
        // A peer's share, the same way at its own rate.
        let mut peer = PeerErrorBudget::default();
        let burst = (0..100).filter(|_| peer.take(start)).count();
        assert_eq!(burst, PEER_ERROR_BURST as usize);
        let sent = (1..=1000u64)
            .filter(|ms| peer.take(start + Duration::from_millis(*ms)))
            .count();
        assert_eq!(sent, PEER_ERRORS_PER_SECOND as usize);
    }
}
