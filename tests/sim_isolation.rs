//! Routers of one tenant reach each other and their server, never another tenant.

mod sim;

use sim::{addrs, ip, Sim};
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

#[test]
fn routers_of_a_tenant_reach_each_other_and_the_subnets_behind_them() {
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer(
        "r1",
        t,
        PeerKind::Router,
        &["10.100.1.1/32", "192.168.88.0/24", "fd00:100::1/128"],
    );
    let r2 = sim.peer(
        "r2",
        t,
        PeerKind::Router,
        &["10.100.1.2/32", "fd00:100::2/128"],
    );
    sim.connect(r1);
    sim.connect(r2);

    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    sim.send_ip(r2, "10.100.1.2", "192.168.88.10");
    sim.send_ip(r1, "192.168.88.10", "10.100.1.2");
    let at_r2 = sim.take_inbox(r2);
    assert_eq!(at_r2.len(), 2);
    assert_eq!(addrs(&at_r2[1]), (ip("192.168.88.10"), ip("10.100.1.2")));
    assert_eq!(sim.take_inbox(r1).len(), 1);

    // IPv6 inner packets are routed the same way.
    sim.send_ip(r2, "fd00:100::2", "fd00:100::1");
    let at_r1 = sim.take_inbox(r1);
    assert_eq!(at_r1.len(), 1);
    assert_eq!(addrs(&at_r1[0]), (ip("fd00:100::2"), ip("fd00:100::1")));
    // Never back to the sender.
    sim.send_ip(r2, "fd00:100::2", "fd00:100::2");
    assert_eq!(
        sim.tunnels[t].engine.stats().dropped(DropReason::LoopBack),
        1
    );

    // The server address is local.
    sim.send_ip(r1, "10.100.1.1", "10.100.0.1");
    assert_eq!(sim.tunnels[t].local.len(), 1);
    // But not from the router's LAN: the host device (this tunnel has no stack)
    // has no route back to it, and would answer it elsewhere.
    sim.send_ip(r1, "192.168.88.10", "10.100.0.1");
    assert_eq!(sim.tunnels[t].local.len(), 1);
    assert_eq!(
        sim.tunnels[t]
            .engine
            .stats()
            .dropped(DropReason::HostSource),
        1
    );
}

#[test]
fn a_router_of_tenant_a_never_reaches_tenant_b() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let b = sim.tunnel(51821, "10.101.0.1");
    let ra = sim.peer("ra", a, PeerKind::Router, &["10.100.1.1/32"]);
    let rb = sim.peer(
        "rb",
        b,
        PeerKind::Router,
        &["10.101.1.1/32", "192.168.88.0/24"],
    );
    sim.connect(ra);
    sim.connect(rb);

    // Towards B's router address, B's server, and a LAN prefix B's router owns.
    for dst in ["10.101.1.1", "10.101.0.1", "192.168.88.1"] {
        sim.send_ip(ra, "10.100.1.1", dst);
    }
    assert!(sim.take_inbox(rb).is_empty());
    assert!(sim.tunnels[b].local.is_empty());
    assert_eq!(
        sim.tunnels[b].engine.stats().rx_datagrams,
        2,
        "B saw only rb's handshake"
    );
    assert_eq!(
        sim.tunnels[a].engine.stats().dropped(DropReason::NoRoute),
        3
    );
    // What ra hears back is its own tunnel's "host unreachable", from A's
    // server address, and nothing of B.
    let at_ra = sim.take_inbox(ra);
    assert_eq!(at_ra.len(), 3);
    assert!(at_ra
        .iter()
        .all(|p| addrs(p) == (ip("10.100.0.1"), ip("10.100.1.1"))));

    // Replaying A's encrypted datagrams at B's port does not help either.
    let mut buf = vec![0u8; 256];
    let packet = wgplane::core::packet::build::ip_packet(ip("10.100.1.1"), ip("10.101.1.1"), 8);
    let datagram = match sim.peers[ra].tunn.encapsulate(&packet, &mut buf) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("session expected"),
    };
    let from = sim.peers[ra].addr;
    sim.inject(from, b, &datagram);
    assert!(sim.take_inbox(rb).is_empty());
    assert_eq!(
        sim.tunnels[b]
            .engine
            .stats()
            .dropped(DropReason::UnknownIndex),
        1
    );
}
