//! A peer's inner source must be one of its own addresses.

mod sim;

use sim::Sim;
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let gateway = sim.peer("gw", t, PeerKind::Router, &["10.100.0.40/32"]);
    let router = sim.peer("r1", t, PeerKind::Router, &["10.100.1.1/32"]);
    let phone1 = sim.peer("p1", t, PeerKind::Client, &["10.200.0.2/32"]);
    let phone2 = sim.peer("p2", t, PeerKind::Client, &["10.200.0.3/32"]);
    sim.set_egress(t, "10.200.0.0/24", &[gateway]);
    for p in [gateway, router, phone1, phone2] {
        sim.connect(p);
    }

    // A router forging another router's, the gateway's or a phone's address.
    sim.send_ip(router, "10.100.0.40", "10.100.0.1");
    sim.send_ip(router, "10.200.0.3", "10.200.0.2");
    sim.send_ip(router, "8.8.8.8", "10.100.0.40");
    // A phone forging the gateway's or another phone's address.
    sim.send_ip(phone1, "10.100.0.40", "198.18.0.1");
    sim.send_ip(phone1, "10.200.0.3", "198.18.0.1");
    // A gateway may send from anywhere only towards its pool.
    sim.send_ip(gateway, "198.18.0.1", "10.100.1.1");

    let stats = sim.tunnels[t].engine.stats();
    assert_eq!(stats.dropped(DropReason::SpoofedSource), 6);
    assert_eq!(sim.delivered(), 0);
    assert!(sim.tunnels[t].local.is_empty());
}
