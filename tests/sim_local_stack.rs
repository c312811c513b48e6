//! The tunnel's own address in userspace: routers get answers to ping from the
//! server address; a KTN phone's ping to it goes to the gateway instead; another
//! tenant's router gets no answer, only its own tunnel's "host unreachable".

mod sim;

use sim::{addrs, ip, Sim};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet};
use wgplane::core::peer::PeerKind;

fn ping(src: &str, dst: &str, seq: u16) -> Vec<u8> {
    wgplane::core::packet::build::icmp_echo_request(src.parse().unwrap(), dst.parse().unwrap(), seq)
}

fn is_echo_reply(packet: &[u8], seq: u16) -> bool {
    let ip = Ipv4Packet::new_checked(packet).unwrap();
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    icmp.msg_type() == Icmpv4Message::EchoReply && icmp.echo_seq_no() == seq
}

#[test]
fn routers_ping_the_server_address() {
    let mut sim = Sim::new();
    let t = sim.tunnel_with_stack(51820, "10.100.0.1", 16);
    let r1 = sim.peer(
        "r1",
        t,
        PeerKind::Router,
        &["10.100.1.1/32", "192.168.88.0/24"],
    );
    sim.connect(r1);
    for seq in 0..3 {
        sim.send(r1, &ping("10.100.1.1", "10.100.0.1", seq));
        let inbox = sim.take_inbox(r1);
        assert_eq!(inbox.len(), 1, "one echo reply for seq {seq}");
        assert_eq!(addrs(&inbox[0]), (ip("10.100.0.1"), ip("10.100.1.1")));
        assert!(is_echo_reply(&inbox[0], seq));
    }
    // From the LAN behind the router too (netwatch from a LAN address).
    sim.send(r1, &ping("192.168.88.5", "10.100.0.1", 9));
    let inbox = sim.take_inbox(r1);
    assert_eq!(addrs(&inbox[0]).1, ip("192.168.88.5"));
}

fn ping6(src: &str, dst: &str, seq: u16) -> Vec<u8> {
    use smoltcp::wire::{Icmpv6Packet, Icmpv6Repr, Ipv6Packet, Ipv6Repr};
    let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let icmp = Icmpv6Repr::EchoRequest {
        ident: 1,
        seq_no: seq,
        data: b"netwatch6",
    };
    let repr = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; repr.buffer_len() + icmp.buffer_len()];
    repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
    icmp.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[repr.buffer_len()..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

#[test]
fn routers_ping_the_ipv6_server_address() {
    use smoltcp::wire::{Icmpv6Message, Icmpv6Packet, Ipv6Packet};
    let (mut sim, _, r1, server6) = dual_stack();
    assert_eq!(
        server6,
        "fd77:7770:a64:0:0:0:0:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
    );
    sim.send(r1, &ping6("fd77:7770:a64:0:1::1", &server6.to_string(), 5));
    let inbox = sim.take_inbox(r1);
    assert_eq!(inbox.len(), 1, "an ICMPv6 echo reply");
    assert_eq!(
        addrs(&inbox[0]),
        (std::net::IpAddr::V6(server6), ip("fd77:7770:a64:0:1::1"))
    );
    let p = Ipv6Packet::new_checked(&inbox[0][..]).unwrap();
    let icmp = Icmpv6Packet::new_checked(p.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv6Message::EchoReply);
    // And IPv4 still answers on the same stack.
    sim.send(r1, &ping("10.100.1.1", "10.100.0.1", 6));
    assert!(is_echo_reply(&sim.take_inbox(r1)[0], 6));
}

#[test]
fn a_phone_never_reaches_the_stack_and_another_tenant_never_does() {
    let mut sim = Sim::new();
    let a = sim.tunnel_with_stack(51820, "10.100.0.1", 16);
    let b = sim.tunnel_with_stack(51821, "10.101.0.1", 16);
    let gw = sim.peer("gw", a, PeerKind::Router, &["10.100.0.40/32"]);
    let phone = sim.peer("phone", a, PeerKind::Client, &["10.200.0.2/32"]);
    let rb = sim.peer("rb", b, PeerKind::Router, &["10.101.1.1/32"]);
    sim.set_egress(a, "10.200.0.0/24", &[gw]);
    for p in [gw, phone, rb] {
        sim.connect(p);
    }
    sim.send(phone, &ping("10.200.0.2", "10.100.0.1", 1));
    assert!(
        sim.take_inbox(phone).is_empty(),
        "the stack never answers a phone"
    );
    let at_gw = sim.take_inbox(gw);
    assert_eq!(at_gw.len(), 1, "the phone's ping went to the gateway");
    assert_eq!(addrs(&at_gw[0]).1, ip("10.100.0.1"));

    // Tenant B's router gets no answer from A: only its own tunnel's "host
    // unreachable", from B's server address, as a router answers.
    sim.send(rb, &ping("10.101.1.1", "10.100.0.1", 2));
    let at_rb = sim.take_inbox(rb);
    assert_eq!(at_rb.len(), 1);
    assert_eq!(
        addrs(&at_rb[0]),
        (ip("10.101.0.1"), ip("10.101.1.1")),
        "from B's own address"
    );
    let p = Ipv4Packet::new_checked(&at_rb[0][..]).unwrap();
    let icmp = Icmpv4Packet::new_checked(p.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
}

fn udp(src: &str, dst: &str, port: u16) -> Vec<u8> {
    use smoltcp::wire::{IpAddress, IpRepr, UdpPacket, UdpRepr};
    let (src, dst) = (ip(src), ip(dst));
    let (s, d): (IpAddress, IpAddress) = (src.into(), dst.into());
    let udp = UdpRepr {
        src_port: 40000,
        dst_port: port,
    };
    let payload = b"traceroute";
    let repr = IpRepr::new(s, d, IpProtocol::Udp, udp.header_len() + payload.len(), 64);
    let mut buf = vec![0u8; repr.buffer_len()];
    let caps = ChecksumCapabilities::default();
    repr.emit(&mut buf[..], &caps);
    let header = repr.header_len();
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[header..]),
        &s,
        &d,
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// A tunnel whose stack serves 10.100.0.1 and its IPv6 address (returned),
/// and a connected router with an address of each family.
fn dual_stack() -> (Sim, sim::TunnelIx, sim::PeerIx, std::net::Ipv6Addr) {
    let mut sim = Sim::new();
    let server6 = wgplane::core::alloc::server_address_v6("10.100.0.0/16".parse().unwrap());
    let t = sim.tunnel_with_stack_v6(51820, "10.100.0.1", 16, &server6.to_string());
    let r1 = sim.peer(
        "r1",
        t,
        PeerKind::Router,
        &["10.100.1.1/32", "fd77:7770:a64:0:1::1/128"],
    );
    sim.connect(r1);
    (sim, t, r1, server6)
}

/// A UDP traceroute to the server address ends in "port unreachable" (RFC
/// 1122 3.2.2.1), in either family, not "protocol unreachable"; and the
/// stack's errors come out of the router's and the tunnel's ICMP budgets, so
/// that a flood of them is answered with a burst, not one error per packet.
#[test]
fn udp_to_the_server_address_is_port_unreachable_within_the_budget() {
    use smoltcp::wire::{Icmpv4DstUnreachable, Icmpv6Message, Icmpv6Packet, Ipv6Packet};
    let (mut sim, t, r1, server6) = dual_stack();

    sim.send(r1, &udp("10.100.1.1", "10.100.0.1", 33434));
    let inbox = sim.take_inbox(r1);
    assert_eq!(inbox.len(), 1, "one error");
    let p = Ipv4Packet::new_checked(&inbox[0][..]).unwrap();
    let icmp = Icmpv4Packet::new_checked(p.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
    assert_eq!(
        icmp.msg_code(),
        u8::from(Icmpv4DstUnreachable::PortUnreachable)
    );

    sim.send(
        r1,
        &udp("fd77:7770:a64:0:1::1", &server6.to_string(), 33435),
    );
    let inbox = sim.take_inbox(r1);
    assert_eq!(inbox.len(), 1, "one ICMPv6 error");
    let p = Ipv6Packet::new_checked(&inbox[0][..]).unwrap();
    let icmp = Icmpv6Packet::new_checked(p.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv6Message::DstUnreachable);
    assert_eq!(icmp.msg_code(), 4, "port unreachable");

    // A flood at one instant: the rest of the router's burst, then nothing;
    // pings are answered all the same (a reply is no error).
    for port in 0..200 {
        sim.send(r1, &udp("10.100.1.1", "10.100.0.1", 20000 + port));
    }
    let errors = sim.take_inbox(r1).len();
    assert_eq!(errors, wgplane::core::icmp::PEER_ERROR_BURST as usize - 2);
    assert_eq!(
        sim.tunnels[t].engine.stats().icmp_errors,
        u64::from(wgplane::core::icmp::PEER_ERROR_BURST)
    );
    sim.send(r1, &ping("10.100.1.1", "10.100.0.1", 7));
    assert!(is_echo_reply(&sim.take_inbox(r1)[0], 7));
}

/// Sends a 2028-byte echo request (sequence `seq`) to the server address in
/// two IPv4 fragments; returns its data.
fn send_large_ping(sim: &mut Sim, r1: sim::PeerIx, seq: u16) -> Vec<u8> {
    use smoltcp::wire::{Icmpv4Repr, IpAddress, IpRepr};
    let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: seq,
        data: &data,
    };
    let caps = ChecksumCapabilities::default();
    let mut payload = vec![0u8; icmp.buffer_len()];
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut payload[..]), &caps);
    // Two fragments of one datagram: 1400 bytes of payload, then the rest.
    let (src, dst): (IpAddress, IpAddress) = (ip("10.100.1.1").into(), ip("10.100.0.1").into());
    for (offset, part) in [(0usize, &payload[..1400]), (1400, &payload[1400..])] {
        let repr = IpRepr::new(src, dst, IpProtocol::Icmp, part.len(), 64);
        let mut fragment = vec![0u8; repr.buffer_len()];
        repr.emit(&mut fragment[..], &caps);
        let mut header = Ipv4Packet::new_unchecked(&mut fragment[..]);
        header.set_ident(0x4200 + seq);
        header.set_more_frags(offset == 0);
        header.set_frag_offset(offset as u16);
        header.fill_checksum();
        fragment[20..].copy_from_slice(part);
        sim.send(r1, &fragment);
    }
    data
}

/// A ping larger than the tunnel's MTU (`ping -s 2000`, RouterOS `/ping
/// size=2028`) reaches the server address in IPv4 fragments: the stack puts
/// them together and answers, its reply in fragments within the MTU.
#[test]
fn a_ping_larger_than_the_mtu_is_answered_in_fragments() {
    let (mut sim, _, r1, _) = dual_stack();
    let data = send_large_ping(&mut sim, r1, 3);
    let inbox = sim.take_inbox(r1);
    assert!(
        inbox.len() >= 2,
        "the reply in fragments: {} packets",
        inbox.len()
    );
    let mut reply = Vec::new();
    for (i, p) in inbox.iter().enumerate() {
        assert!(p.len() <= 1420, "within the MTU: {}", p.len());
        let f = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(usize::from(f.frag_offset()), reply.len(), "in order");
        assert_eq!(f.more_frags(), i + 1 < inbox.len());
        reply.extend_from_slice(f.payload());
    }
    let icmp = Icmpv4Packet::new_checked(&reply[..]).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
    assert_eq!((icmp.echo_ident(), icmp.echo_seq_no()), (7, 3));
    assert_eq!(icmp.data(), &data[..], "the same data back");
}

/// A lone IPv4 fragment waits for the rest and gets no answer (no
/// "unreachable" about a later fragment, RFC 1122 3.2.2); the stack takes no
/// IPv6 fragments at all, which are dropped and counted before it.
#[test]
fn lone_fragments_for_the_server_address_are_not_answered() {
    use wgplane::core::policy::DropReason;
    let (mut sim, t, r1, server6) = dual_stack();
    let mut later = udp("10.100.1.1", "10.100.0.1", 33434);
    Ipv4Packet::new_unchecked(&mut later[..]).set_frag_offset(1480);
    Ipv4Packet::new_unchecked(&mut later[..]).fill_checksum();
    // An IPv6 fragment header (44) in front of UDP.
    let mut v6 = udp("fd77:7770:a64:0:1::1", &server6.to_string(), 33434);
    let udp_part = v6.split_off(40);
    v6[6] = 44;
    v6[4..6].copy_from_slice(&((udp_part.len() + 8) as u16).to_be_bytes());
    v6.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 9]);
    v6.extend_from_slice(&udp_part);
    // One that reaches far beyond what the stack puts together: kept out, so
    // that it cannot make the stack's buffer grow to 64 KiB.
    let mut far = udp("10.100.1.1", "10.100.0.1", 33434);
    Ipv4Packet::new_unchecked(&mut far[..]).set_more_frags(true);
    Ipv4Packet::new_unchecked(&mut far[..]).set_frag_offset(65528 - 8);
    Ipv4Packet::new_unchecked(&mut far[..]).fill_checksum();
    for p in [later, v6, far] {
        sim.send(r1, &p);
    }
    assert!(sim.take_inbox(r1).is_empty(), "no answer to a fragment");
    let s = sim.tunnels[t].engine.stats();
    assert_eq!(s.dropped(DropReason::LocalFragment), 2);
    // A ping after them is answered as ever.
    sim.send(r1, &ping("10.100.1.1", "10.100.0.1", 8));
    assert!(is_echo_reply(&sim.take_inbox(r1)[0], 8));
    // The stray fragment holds the stack's one reassembly buffer: a large
    // ping meanwhile goes unanswered, and one after a few seconds is answered.
    send_large_ping(&mut sim, r1, 4);
    assert!(sim.take_inbox(r1).is_empty(), "the buffer is held");
    sim.advance(std::time::Duration::from_secs(3));
    sim.tick();
    send_large_ping(&mut sim, r1, 5);
    assert!(
        sim.take_inbox(r1).len() >= 2,
        "answered once the stray fragment expired"
    );
}
