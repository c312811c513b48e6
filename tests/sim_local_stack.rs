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
    let mut sim = Sim::new();
    let server6 = wgplane::core::alloc::server_address_v6("10.100.0.0/16".parse().unwrap());
    assert_eq!(
        server6.to_string(),
        "fd77:7770:a64:0:0:0:0:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .to_string()
    );
    let t = sim.tunnel_with_stack_v6(51820, "10.100.0.1", 16, &server6.to_string());
    let r1 = sim.peer(
        "r1",
        t,
        PeerKind::Router,
        &["10.100.1.1/32", "fd77:7770:a64:0:1::1/128"],
    );
    sim.connect(r1);
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
