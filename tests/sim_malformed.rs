//! Garbage never panics the engine: every bad datagram or inner packet is counted.

mod sim;

use proptest::prelude::*;
use sim::Sim;
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

fn setup() -> (Sim, usize, usize) {
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", t, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", t, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r1);
    sim.connect(r2);
    (sim, r1, r2)
}

#[test]
fn malformed_datagrams_are_counted() {
    let (mut sim, _, _) = setup();
    let tx_before = sim.tunnels[0].engine.stats().tx_datagrams;
    let from = "203.0.113.50:1000".parse().unwrap();
    let mut handshake = vec![0u8; 148];
    handshake[0] = 1;
    let mut data = vec![0u8; 64];
    data[0] = 4;
    data[4..8].copy_from_slice(&0x00ab_cdefu32.to_le_bytes());
    for d in [
        &b""[..],
        b"x",
        &[1, 0, 0, 0, 9],
        &[9u8; 200],
        &handshake,
        &data,
    ] {
        sim.inject(from, 0, d);
    }
    let s = sim.tunnels[0].engine.stats();
    assert_eq!(s.dropped(DropReason::InvalidDatagram), 4);
    assert_eq!(s.dropped(DropReason::BadMac), 1);
    assert_eq!(s.dropped(DropReason::UnknownIndex), 1);
    assert_eq!(s.tx_datagrams, tx_before, "garbage is never answered");
}

/// A peer's genuine initiation, replayed from a source nothing can answer
/// (port 0, an unspecified, multicast or broadcast address: the kernel
/// delivers such datagrams but refuses to send to them), is dropped before
/// anything answers it: no handshake response, no cookie reply.
#[test]
fn datagrams_from_unanswerable_sources_are_never_answered() {
    let mut sim = sim::Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", t, PeerKind::Router, &["10.100.1.1/32"]);
    let mut buf = vec![0u8; 256];
    let boringtun::noise::TunnResult::WriteToNetwork(initiation) = sim.peers[r1]
        .tunn
        .format_handshake_initiation(&mut buf, true)
    else {
        panic!("an initiation");
    };
    let initiation = initiation.to_vec();
    let sent_before = sim.sent_by_engines.len();
    let sources = [
        "203.0.113.50:0",
        "0.0.0.0:51820",
        "255.255.255.255:51820",
        "224.0.0.1:51820",
        "[ff02::1]:51820",
        "[::]:51820",
        "[::ffff:203.0.113.50]:0",
    ];
    for from in sources {
        sim.inject(from.parse().unwrap(), t, &initiation);
    }
    let s = sim.tunnels[t].engine.stats();
    assert_eq!(
        s.dropped(DropReason::UnanswerableSource),
        sources.len() as u64
    );
    assert_eq!(s.handshake_responses, 0);
    assert_eq!(sim.sent_by_engines.len(), sent_before, "nothing answered");
    // The same initiation from the peer's own address is answered.
    let own = sim.peers[r1].addr;
    sim.inject(own, t, &initiation);
    assert_eq!(sim.tunnels[t].engine.stats().handshake_responses, 1);
}

#[test]
fn malformed_inner_packets_are_counted() {
    let (mut sim, r1, r2) = setup();
    // Not IP, a truncated IPv4 header, a length field past the end, a v6 stub.
    let mut long = wgplane::core::packet::build::ip_packet(
        "10.100.1.1".parse().unwrap(),
        "10.100.1.2".parse().unwrap(),
        8,
    );
    long[2..4].copy_from_slice(&500u16.to_be_bytes());
    for p in [vec![0x15u8; 30], vec![0x45u8; 12], long, vec![0x60u8; 20]] {
        sim.send(r1, &p);
    }
    let s = sim.tunnels[0].engine.stats();
    assert_eq!(s.dropped(DropReason::Malformed), 4);
    assert!(sim.take_inbox(r2).is_empty());
}

/// A router forwards no IPv4 packet whose header checksum fails (RFC 1812
/// 5.2.2), and answers none, even with no hop left.
#[test]
fn a_bad_header_checksum_goes_no_further() {
    let (mut sim, r1, r2) = setup();
    let good = wgplane::core::packet::build::ip_packet(
        "10.100.1.1".parse().unwrap(),
        "10.100.1.2".parse().unwrap(),
        8,
    );
    let mut bad = good.clone();
    bad[10] ^= 0x40;
    let mut expired = good.clone();
    expired[8] = 1; // TTL 1, checksum left as it was: wrong
    sim.send(r1, &bad);
    sim.send(r1, &expired);
    let s = sim.tunnels[0].engine.stats();
    assert_eq!(s.dropped(DropReason::Malformed), 2);
    assert_eq!(s.dropped(DropReason::TtlExpired), 0);
    assert!(sim.take_inbox(r2).is_empty());
    assert!(sim.take_inbox(r1).is_empty(), "no error about a bad header");
    sim.send(r1, &good);
    assert_eq!(sim.take_inbox(r2), vec![forwarded(good)]);
}

/// `packet` as the next hop receives it: one hop less, checksum updated.
fn forwarded(mut packet: Vec<u8>) -> Vec<u8> {
    assert!(wgplane::core::icmp::decrement_hop_limit(&mut packet));
    packet
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary datagrams, arbitrary inner packets: no panic, every one accounted for.
    #[test]
    fn arbitrary_input_never_panics(
        datagrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20),
        inner in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 0..20),
    ) {
        let (mut sim, r1, _) = setup();
        let dropped = |sim: &Sim| sim.tunnels[0].engine.stats().drops.iter().sum::<u64>();
        let from = "203.0.113.50:1000".parse().unwrap();
        let before = dropped(&sim);
        for d in &datagrams {
            sim.inject(from, 0, d);
        }
        // Every garbage datagram is dropped exactly once, for some reason.
        prop_assert_eq!(dropped(&sim) - before, datagrams.len() as u64);

        let s = sim.tunnels[0].engine.stats().clone();
        let handled = |s: &wgplane::core::engine::TunnelStats| {
            s.drops.iter().sum::<u64>() + s.forwarded_peer + s.forwarded_local + s.queued
        };
        for p in &inner {
            sim.send(r1, p);
        }
        // Every non-empty inner packet (an empty one is a keepalive) ends in exactly
        // one verdict: dropped with a reason, forwarded, delivered locally or queued.
        let after = sim.tunnels[0].engine.stats().clone();
        let expected = inner.iter().filter(|p| !p.is_empty()).count() as u64;
        prop_assert_eq!(handled(&after) - handled(&s), expected);
    }
}
