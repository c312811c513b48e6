//! The hub is a router hop: what it forwards between peers loses one hop of
//! TTL (IPv4, checksum kept valid) or hop limit (IPv6); what arrives with no
//! hop left is dropped and answered "time exceeded" from the tunnel's own
//! address, so `traceroute` shows the hub; a destination no peer owns is
//! answered "host unreachable"; and a flood of doomed packets gets no more
//! errors than the tunnel's budget.

mod sim;

use sim::{addrs, ip, Sim};
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet};
use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
use wgplane::core::icmp::{ERROR_BURST, PEER_ERROR_BURST};
use wgplane::core::packet::build::ip_packet;
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

fn with_hops(src: &str, dst: &str, hops: u8) -> Vec<u8> {
    let mut p = ip_packet(ip(src), ip(dst), 32);
    if p[0] >> 4 == 4 {
        let mut v4 = Ipv4Packet::new_unchecked(&mut p);
        v4.set_hop_limit(hops);
        v4.fill_checksum();
    } else {
        Ipv6Packet::new_unchecked(&mut p).set_hop_limit(hops);
    }
    p
}

struct Lab {
    sim: Sim,
    r1: usize,
    r2: usize,
    gw: usize,
    phone: usize,
}

fn lab() -> Lab {
    let mut sim = Sim::new();
    let t = sim.tunnel_with_stack_v6(51820, "10.100.0.1", 16, "fd77:7770:a64::1");
    let r1 = sim.peer(
        "r1",
        t,
        PeerKind::Router,
        &["10.100.1.1/32", "fd77:7770:a64::101/128"],
    );
    let r2 = sim.peer(
        "r2",
        t,
        PeerKind::Router,
        &["10.100.1.2/32", "fd77:7770:a64::102/128"],
    );
    let gw = sim.peer("gw", t, PeerKind::Router, &["10.100.0.40/32"]);
    let phone = sim.peer("phone", t, PeerKind::Client, &["10.200.0.2/32"]);
    sim.set_egress(t, "10.200.0.0/24", &[gw]);
    for p in [r1, r2, gw, phone] {
        sim.connect(p);
    }
    Lab {
        sim,
        r1,
        r2,
        gw,
        phone,
    }
}

#[test]
fn a_forwarded_packet_loses_one_hop_with_a_valid_checksum() {
    let mut l = lab();
    l.sim.send(l.r1, &with_hops("10.100.1.1", "10.100.1.2", 64));
    let at_r2 = l.sim.take_inbox(l.r2);
    assert_eq!(at_r2.len(), 1);
    let v4 = Ipv4Packet::new_checked(&at_r2[0][..]).unwrap();
    assert_eq!(v4.hop_limit(), 63);
    assert!(v4.verify_checksum());

    l.sim.send(
        l.r1,
        &with_hops("fd77:7770:a64::101", "fd77:7770:a64::102", 2),
    );
    let at_r2 = l.sim.take_inbox(l.r2);
    assert_eq!(
        Ipv6Packet::new_checked(&at_r2[0][..]).unwrap().hop_limit(),
        1
    );

    // The egress rule is a hop too: the gateway gets the phone's packet with one less.
    l.sim
        .send(l.phone, &with_hops("10.200.0.2", "198.18.0.1", 9));
    let at_gw = l.sim.take_inbox(l.gw);
    assert_eq!(
        Ipv4Packet::new_checked(&at_gw[0][..]).unwrap().hop_limit(),
        8
    );

    // And a phone's packet with no hop left ends at the hub, which answers it
    // itself: the gateway gets nothing, the phone the hub's "time exceeded".
    l.sim
        .send(l.phone, &with_hops("10.200.0.2", "198.18.0.1", 1));
    assert!(l.sim.take_inbox(l.gw).is_empty());
    let at_phone = l.sim.take_inbox(l.phone);
    assert_eq!(at_phone.len(), 1);
    assert_eq!(addrs(&at_phone[0]), (ip("10.100.0.1"), ip("10.200.0.2")));
}

#[test]
fn no_hop_left_is_answered_time_exceeded_from_the_server_address() {
    let mut l = lab();
    let doomed = with_hops("10.100.1.1", "10.100.1.2", 1);
    l.sim.send(l.r1, &doomed);
    assert!(l.sim.take_inbox(l.r2).is_empty(), "not forwarded");
    let at_r1 = l.sim.take_inbox(l.r1);
    assert_eq!(at_r1.len(), 1);
    assert_eq!(addrs(&at_r1[0]), (ip("10.100.0.1"), ip("10.100.1.1")));
    let v4 = Ipv4Packet::new_checked(&at_r1[0][..]).unwrap();
    assert!(v4.verify_checksum());
    let icmp = Icmpv4Packet::new_checked(v4.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv4Message::TimeExceeded);
    assert!(icmp.verify_checksum());
    assert_eq!(
        &icmp.data()[..doomed.len()],
        &doomed[..],
        "the packet quoted"
    );

    // IPv6, from the tunnel's IPv6 address.
    l.sim.send(
        l.r1,
        &with_hops("fd77:7770:a64::101", "fd77:7770:a64::102", 1),
    );
    let at_r1 = l.sim.take_inbox(l.r1);
    assert_eq!(
        addrs(&at_r1[0]),
        (ip("fd77:7770:a64::1"), ip("fd77:7770:a64::101"))
    );
    let v6 = Ipv6Packet::new_checked(&at_r1[0][..]).unwrap();
    let icmp = Icmpv6Packet::new_checked(v6.payload()).unwrap();
    assert_eq!(icmp.msg_type(), Icmpv6Message::TimeExceeded);
    assert!(icmp.verify_checksum(&v6.src_addr(), &v6.dst_addr()));

    let stats = l.sim.tunnels[0].engine.stats().clone();
    assert_eq!(stats.dropped(DropReason::TtlExpired), 2);
    assert_eq!(stats.icmp_errors, 2);

    // A packet for the hub itself is delivered whatever its TTL: the last hop.
    l.sim.send(l.r1, &with_hops("10.100.1.1", "10.100.0.1", 1));
    let stats = l.sim.tunnels[0].engine.stats();
    assert_eq!(stats.dropped(DropReason::TtlExpired), 2);
    assert_eq!(stats.forwarded_local, 1);
}

#[test]
fn an_address_nobody_owns_is_answered_host_unreachable() {
    let mut l = lab();
    l.sim.send_ip(l.r1, "10.100.1.1", "10.100.9.9");
    let at_r1 = l.sim.take_inbox(l.r1);
    assert_eq!(at_r1.len(), 1);
    assert_eq!(addrs(&at_r1[0]), (ip("10.100.0.1"), ip("10.100.1.1")));
    let v4 = Ipv4Packet::new_checked(&at_r1[0][..]).unwrap();
    let icmp = Icmpv4Packet::new_checked(v4.payload()).unwrap();
    assert_eq!(
        (icmp.msg_type(), icmp.msg_code()),
        (Icmpv4Message::DstUnreachable, 1)
    );

    // A phone whose gateway is down gets none: the next packet may find it up.
    l.sim.peers[l.gw].up = false;
    l.sim.advance(std::time::Duration::from_secs(61));
    l.sim.send_ip(l.phone, "10.200.0.2", "198.18.0.1");
    assert!(l.sim.take_inbox(l.phone).is_empty());
    let stats = l.sim.tunnels[0].engine.stats();
    assert_eq!(
        stats.dropped(DropReason::EgressDown),
        1,
        "it was egress_down"
    );
    assert_eq!(stats.icmp_errors, 1, "only the router's");
}

/// A directed broadcast to the tenant's subnet, or its network address, is
/// dropped as a martian and answered by nothing (RFC 1812 4.3.2.7, 5.3.5.2).
#[test]
fn a_directed_broadcast_is_dropped_unanswered() {
    let mut l = lab();
    l.sim.send_ip(l.r1, "10.100.1.1", "10.100.255.255");
    l.sim.send_ip(l.r1, "10.100.1.1", "10.100.0.0");
    assert!(l.sim.take_inbox(l.r1).is_empty());
    assert!(l.sim.take_inbox(l.r2).is_empty());
    let stats = l.sim.tunnels[0].engine.stats();
    assert_eq!(stats.dropped(DropReason::Martian), 2);
    assert_eq!(stats.icmp_errors, 0);
}

/// A gateway may send from any address towards its pool (rule 2), but an
/// error goes only to a source the sender owns: not to an address it chose.
#[test]
fn no_error_goes_to_a_source_the_sender_does_not_own() {
    let mut l = lab();
    // Towards the phone with no hop left, from a router's and the server's address.
    for src in ["10.100.1.2", "10.100.0.1", "198.18.0.9"] {
        l.sim.send(l.gw, &with_hops(src, "10.200.0.2", 1));
    }
    assert!(l.sim.take_inbox(l.r2).is_empty());
    assert!(l.sim.take_inbox(l.gw).is_empty());
    assert!(l.sim.take_inbox(l.phone).is_empty());
    let stats = l.sim.tunnels[0].engine.stats();
    assert_eq!(stats.dropped(DropReason::TtlExpired), 3);
    assert_eq!(stats.icmp_errors, 0);
}

#[test]
fn a_flood_of_doomed_packets_gets_no_more_errors_than_the_budget() {
    let mut l = lab();
    for _ in 0..200 {
        l.sim.send(l.r1, &with_hops("10.100.1.1", "10.100.1.2", 1));
    }
    // All at one moment (simulated time): exactly the peer's burst.
    let errors = l.sim.take_inbox(l.r1).len();
    assert_eq!(errors, PEER_ERROR_BURST as usize);
    assert_eq!(
        l.sim.tunnels[0]
            .engine
            .stats()
            .dropped(DropReason::TtlExpired),
        200
    );
    // The tunnel's other peers still get theirs, up to the tunnel's burst.
    for _ in 0..200 {
        l.sim.send(l.r2, &with_hops("10.100.1.2", "10.100.1.1", 1));
    }
    assert_eq!(
        l.sim.take_inbox(l.r2).len(),
        PEER_ERROR_BURST as usize,
        "r1's flood left r2 its errors"
    );
    l.sim.send(l.gw, &with_hops("10.100.0.40", "10.100.1.1", 1));
    assert_eq!(
        l.sim.take_inbox(l.gw).len(),
        0,
        "the tunnel's burst ({ERROR_BURST}) is spent"
    );
    // A second later each peer has its rate again.
    l.sim.advance(std::time::Duration::from_secs(1));
    l.sim.send(l.gw, &with_hops("10.100.0.40", "10.100.1.1", 1));
    assert_eq!(l.sim.take_inbox(l.gw).len(), 1);
}
