//! Checked views of the inner IP packets that come out of a tunnel.
//!
//! Only the fields the router needs are read (version, addresses, length), through
//! smoltcp's `new_checked` views, so a packet that passes here has a complete header,
//! a length field that fits the buffer and, for IPv4, a header checksum that
//! verifies. Options, extension headers and payloads are not inspected (bar the
//! first IPv6 next header, to refuse jumbograms); [`is_fragment`] looks for a
//! fragment where the caller needs to know.

use std::net::IpAddr;

use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet};

/// What the router needs to know about an inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Length of the packet according to its header (never more than the buffer).
    pub len: usize,
}

/// Why an inner packet is not a well-formed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The buffer is empty.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is not supported")]
    UnknownVersion(u8),
    /// The header or the length it announces does not fit the buffer.
    #[error("truncated or inconsistent IP header")]
    Truncated,
    /// The IPv4 header checksum does not verify (RFC 1812 5.2.2: a router
    /// forwards no such packet).
    #[error("IPv4 header checksum does not verify")]
    BadChecksum,
    /// An IPv6 jumbogram (payload length 0 and a hop-by-hop header, RFC
    /// 2675), which no tunnel's MTU carries.
    #[error("IPv6 jumbogram")]
    Jumbogram,
}

/// Parses the header of an IPv4 or IPv6 packet.
#[inline]
pub fn parse(packet: &[u8]) -> Result<IpHeader, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).map_err(|_| PacketError::Truncated)?;
            // smoltcp's check takes a header length below the minimum (20).
            if p.header_len() < 20 {
                return Err(PacketError::Truncated);
            }
            let header = packet.get(..usize::from(p.header_len()));
            if header.is_none_or(|h| internet_checksum(h) != 0) {
                return Err(PacketError::BadChecksum);
            }
            Ok(IpHeader {
                src: IpAddr::V4(p.src_addr()),
                dst: IpAddr::V4(p.dst_addr()),
                len: usize::from(p.total_len()),
            })
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).map_err(|_| PacketError::Truncated)?;
            if p.payload_len() == 0 && p.next_header() == IpProtocol::HopByHop {
                return Err(PacketError::Jumbogram);
            }
            Ok(IpHeader {
                src: IpAddr::V6(p.src_addr()),
                dst: IpAddr::V6(p.dst_addr()),
                len: p.total_len(),
            })
        }
        v => Err(PacketError::UnknownVersion(v)),
    }
}

/// Whether `packet` (a parsed IPv4 or IPv6 packet) is a fragment: an IPv4
/// one with more to come or an offset, an IPv6 one with a fragment header
/// (behind the extension headers [`ipv6_upper_layer`] walks).
pub fn is_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            Ipv4Packet::new_checked(packet).is_ok_and(|p| p.more_frags() || p.frag_offset() != 0)
        }
        Some(6) => Ipv6Packet::new_checked(packet).is_ok_and(|p| {
            ipv6_upper_layer(p.next_header(), p.payload())
                .is_some_and(|u| u.fragment_offset.is_some())
        }),
        _ => false,
    }
}

/// What follows an IPv6 packet's extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6UpperLayer<'a> {
    /// The first header that is no extension header of those walked.
    pub protocol: IpProtocol,
    /// The bytes from it on.
    pub payload: &'a [u8],
    /// The fragment header's offset (in 8-byte units) if one was met: past a
    /// non-zero one, `payload` is the middle of the upper layer, not its header.
    pub fragment_offset: Option<u16>,
}

/// Walks an IPv6 packet's extension headers (hop-by-hop, routing, fragment,
/// destination options, authentication) from `next` over `rest`, its payload;
/// `None` when they do not fit or go on for more than eight.
pub fn ipv6_upper_layer(mut next: IpProtocol, mut rest: &[u8]) -> Option<Ipv6UpperLayer<'_>> {
    let mut fragment_offset = None;
    for _ in 0..8 {
        let size = match next {
            IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {
                8 + 8 * usize::from(*rest.get(1)?)
            }
            IpProtocol::Ipv6Frag => {
                let offset = rest.get(2..4)?;
                fragment_offset = Some(u16::from_be_bytes([offset[0], offset[1]]) >> 3);
                8
            }
            // Its length counts 4-byte words, less two.
            IpProtocol::IpSecAh => 4 * (usize::from(*rest.get(1)?) + 2),
            protocol => {
                return Some(Ipv6UpperLayer {
                    protocol,
                    payload: rest,
                    fragment_offset,
                })
            }
        };
        next = IpProtocol::from(*rest.first()?);
        rest = rest.get(size..)?;
    }
    None
}

/// Builds minimal IP packets for tests, benches and fuzz seeds.
pub mod build {
    use std::net::{IpAddr, Ipv4Addr};

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};

    /// An ICMP echo request (ping) from `src` to `dst`, identifier 1, sequence
    /// number `seq`, checksums set.
    pub fn icmp_echo_request(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 1,
            seq_no: seq,
            data: b"netwatch",
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(&mut buf[ip.buffer_len()..]),
            &caps,
        );
        buf
    }

    /// Sets the header checksum of `packet` if it starts with an IPv4 header
    /// that fits (fuzz targets use it, so that arbitrary headers get past the
    /// check); anything else is left as it is.
    pub fn fix_ipv4_checksum(packet: &mut [u8]) {
        let Some(&first) = packet.first() else {
            return;
        };
        let header_len = usize::from(first & 0x0f) * 4;
        if first >> 4 == 4 && header_len >= 20 && header_len <= packet.len() {
            Ipv4Packet::new_unchecked(packet).fill_checksum();
        }
    }

    /// An IPv4 or IPv6 UDP-less packet with `payload_len` zero bytes of protocol 253
    /// (reserved for experimentation) from `src` to `dst`.
    pub fn ip_packet(src: IpAddr, dst: IpAddr, payload_len: usize) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = 20 + payload_len;
                let mut p = vec![0u8; total];
                p[0] = 0x45;
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[8] = 64;
                p[9] = 253;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
                let sum = super::internet_checksum(&p[..20]);
                p[10..12].copy_from_slice(&sum.to_be_bytes());
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0u8; 40 + payload_len];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
                p[6] = 253;
                p[7] = 64;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
                p
            }
            _ => panic!("mixed address families"),
        }
    }
}

/// The Internet checksum of `bytes` (RFC 1071): the one's complement of their
/// one's-complement sum, taken as 16-bit words (a last odd byte padded with
/// zero). Over a header that carries its checksum, 0 when it verifies.
/// (smoltcp's own check answers "valid" to everything in fuzzing builds, so
/// the parser sums itself.)
#[inline]
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6() {
        let p = build::ip_packet("10.200.0.2".parse().unwrap(), "1.1.1.1".parse().unwrap(), 8);
        let h = parse(&p).unwrap();
        assert_eq!(h.src, "10.200.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "1.1.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.len, 28);
        let p = build::ip_packet("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap(), 8);
        let h = parse(&p).unwrap();
        assert_eq!(h.len, 48);
        assert_eq!(h.dst, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[0x15; 40]), Err(PacketError::UnknownVersion(1)));
        assert_eq!(parse(&[0x45; 10]), Err(PacketError::Truncated));
        let mut p = build::ip_packet("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 8);
        p[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&p), Err(PacketError::Truncated));
        assert_eq!(parse(&[0x60; 39]), Err(PacketError::Truncated));
        // A header length below 5 words is no IPv4 header.
        let mut p = build::ip_packet("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 8);
        p[0] = 0x44;
        assert_eq!(parse(&p), Err(PacketError::Truncated));
    }

    /// A header whose checksum does not verify is refused (RFC 1812 5.2.2),
    /// whichever bit is wrong; the same header with its checksum is taken.
    #[test]
    fn an_ipv4_header_must_verify() {
        let good = build::ip_packet("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 8);
        assert!(parse(&good).is_ok());
        for byte in [1, 4, 8, 9, 10, 11, 13, 19] {
            let mut bad = good.clone();
            bad[byte] ^= 0x01;
            assert_eq!(parse(&bad), Err(PacketError::BadChecksum), "byte {byte}");
        }
    }

    /// Payload length 0 with a hop-by-hop header announces a jumbogram (RFC
    /// 2675), which is refused, not forwarded as a bare header; an empty
    /// payload otherwise is a packet.
    #[test]
    fn an_ipv6_jumbogram_is_refused() {
        let mut p = build::ip_packet("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap(), 0);
        p[6] = 0;
        p.extend_from_slice(&[0u8; 200]);
        assert_eq!(parse(&p), Err(PacketError::Jumbogram));
        p[6] = 59;
        assert_eq!(parse(&p).map(|h| h.len), Ok(40));
    }

    #[test]
    fn fragments_are_recognised() {
        let whole = build::ip_packet("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 8);
        assert!(!is_fragment(&whole));
        let mut first = whole.clone();
        Ipv4Packet::new_unchecked(&mut first[..]).set_more_frags(true);
        assert!(is_fragment(&first));
        let mut later = whole.clone();
        Ipv4Packet::new_unchecked(&mut later[..]).set_frag_offset(1480);
        assert!(is_fragment(&later));

        let v6 = |next: u8, ext: &[u8]| {
            let mut p = build::ip_packet(
                "fd00::2".parse().unwrap(),
                "fd00::1".parse().unwrap(),
                ext.len(),
            );
            p[6] = next;
            p[40..].copy_from_slice(ext);
            p
        };
        assert!(!is_fragment(&v6(17, &[0; 8])));
        // Fragment header (44), straight or behind destination options (60).
        assert!(is_fragment(&v6(44, &[17, 0, 0, 1, 0, 0, 0, 7])));
        assert!(is_fragment(&v6(
            60,
            &[44, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 1, 0, 0, 0, 7]
        )));
        assert!(!is_fragment(&v6(60, &[17, 0, 0, 0, 0, 0, 0, 0])));
        assert!(!is_fragment(&v6(0, &[60, 9])));
        // Behind an authentication header (51), whose length counts 4-byte words.
        let ah_then_fragment = [44, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 1, 0, 0, 0, 7];
        assert!(is_fragment(&v6(51, &ah_then_fragment)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_len_fits(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            if let Ok(h) = parse(&bytes) {
                proptest::prop_assert!(h.len <= bytes.len());
            }
        }

        /// Headers that look right (version 4 with a 20-byte header, or 6) and
        /// claim any length up to the buffer's and beyond: a claim that fits is
        /// taken, one that does not is `Truncated`, never a panic.
        #[test]
        fn a_claimed_length_is_honoured_or_refused(
            v6 in proptest::prelude::any::<bool>(),
            claimed in 0usize..200,
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 40..160),
        ) {
            if v6 {
                bytes[0] = 0x60;
                let payload = claimed.saturating_sub(40) as u16;
                bytes[4..6].copy_from_slice(&payload.to_be_bytes());
                // Not a jumbogram's hop-by-hop header.
                bytes[6] = 59;
            } else {
                bytes[0] = 0x45;
                bytes[2..4].copy_from_slice(&(claimed as u16).to_be_bytes());
                Ipv4Packet::new_unchecked(&mut bytes[..]).fill_checksum();
            }
            let total = if v6 { 40 + claimed.saturating_sub(40) } else { claimed };
            match parse(&bytes) {
                Ok(h) => {
                    proptest::prop_assert_eq!(h.len, total);
                    proptest::prop_assert!(h.len <= bytes.len());
                }
                Err(_) => proptest::prop_assert!(total > bytes.len() || (!v6 && claimed < 20)),
            }
        }
    }
}
