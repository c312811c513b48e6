//! Peers that move: reconnects, replies from the address a peer reached, dual-stack sockets, roams announced at most once a second.

use super::*;

/// A peer that comes back from a new address after it was disconnected is
/// announced by its `Connected` with that address, not by a `Roamed` first; a
/// peer removed while connected is announced gone.
#[test]
fn a_peer_back_from_elsewhere_connects_there_and_a_removed_one_is_gone() {
    use crate::core::harness::Collect;

    let now = Instant::now();
    let (mut engine, mut r1, packet) = connected_client(now);
    let key = *r1.public_key.as_bytes();
    engine.handle_timers(now + Duration::from_secs(120), &mut Collect::default());
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(events.last(), Some(&Event::Disconnected { peer: key }));

    let later = now + Duration::from_secs(130);
    r1.addr = "198.51.100.77:4000".parse().unwrap();
    assert!(r1.handshake(&mut engine, later));
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, later, &mut Collect::default());
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Connected {
            peer: key,
            endpoint: Some(r1.addr)
        }]
    );

    engine.remove_peer(&key);
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(events, [Event::Disconnected { peer: key }]);
}

/// What answers a peer, and what is later sent to it, leaves from the
/// tunnel's address the peer reached (a wildcard socket on a host with
/// several), as kernel WireGuard's sticky source does; the kernel picks only
/// where that is not known.
#[test]
fn replies_and_later_traffic_leave_from_the_address_the_peer_reached() {
    use crate::core::packet::build::ip_packet;
    use boringtun::noise::TunnResult;

    #[derive(Default)]
    struct Via(Vec<(SocketAddr, Option<IpAddr>, Vec<u8>)>);
    impl Sink for Via {
        fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
            self.0.push((to, None, datagram.to_vec()));
        }
        fn send_from(&mut self, to: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
            self.0.push((to, local, datagram.to_vec()));
        }
        fn local(&mut self, _: &[u8]) -> bool {
            false
        }
    }

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    let at: IpAddr = "198.51.100.10".parse().unwrap();
    let mut via = Via::default();
    let init = r1.initiation().unwrap();
    engine.handle_datagram_at(r1.addr, Some(at), &init, now, &mut via);
    let (to, from, response) = via.0.pop().expect("the response");
    assert_eq!((to, from, response[0]), (r1.addr, Some(at), 2));

    // The initiator's first packet completes the handshake; then what the host
    // sends the router leaves from the same address.
    let mut buf = vec![0u8; 256];
    let keepalive = match r1.tunn.decapsulate(None, &response, &mut buf) {
        TunnResult::WriteToNetwork(k) => k.to_vec(),
        other => panic!("{other:?}"),
    };
    engine.handle_datagram_at(r1.addr, Some(at), &keepalive, now, &mut via);
    let mut packet = ip_packet([10, 100, 0, 1].into(), [10, 100, 1, 1].into(), 8);
    engine.handle_host_packet(&mut packet, now, &mut via);
    let (to, from, data) = via.0.pop().expect("the packet");
    assert_eq!((to, from, data[0]), (r1.addr, Some(at), 4));

    // Heard at another address, it is answered from that one.
    let other: IpAddr = "198.51.100.11".parse().unwrap();
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram_at(r1.addr, Some(other), &datagram, now, &mut via);
    engine.handle_host_packet(&mut packet, now, &mut via);
    assert_eq!(via.0.pop().map(|(_, from, _)| from), Some(Some(other)));
}

/// An IPv4 peer heard on a dual-stack socket (`[::ffff:a.b.c.d]:p`) is known,
/// announced and answered by its IPv4 address, and its datagrams from either
/// spelling are one endpoint, not a roam.
#[test]
fn an_ipv4_peer_seen_on_a_dual_stack_socket_is_known_by_its_ipv4_address() {
    use crate::core::harness::Collect;

    use crate::core::packet::build::ip_packet;

    let later = Instant::now();
    let (mut engine, mut r1) = one_client();
    let key = *r1.public_key.as_bytes();
    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
    let ipv4: SocketAddr = "198.51.100.77:4000".parse().unwrap();
    r1.addr = "[::ffff:198.51.100.77]:4000".parse().unwrap();
    assert!(r1.handshake(&mut engine, later));
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, later, &mut Collect::default());
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(ipv4, &datagram, later, &mut Collect::default());
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Connected {
            peer: key,
            endpoint: Some(ipv4)
        }]
    );
    assert_eq!(
        engine.peer_status(&key, later).and_then(|s| s.endpoint),
        Some(ipv4)
    );

    // A fresh handshake from the mapped spelling is answered at the IPv4 one.
    let init = r1.initiation().unwrap();
    let mut out = Collect::default();
    engine.handle_datagram(r1.addr, &init, later, &mut out);
    assert_eq!(out.sent.first().map(|(to, _)| *to), Some(ipv4));

    // A stored endpoint in the mapped spelling (an older build's) is canonical too.
    assert_eq!(canonical_endpoint(r1.addr), ipv4);
    let scoped: SocketAddr = "[fe80::1%2]:51820".parse().unwrap();
    assert_eq!(canonical_endpoint(scoped), scoped, "scope kept");
}

/// A connected peer whose datagrams come from a new address each time moves at
/// once (replies follow it), but is announced roamed at most once a second:
/// the first move at once, the rest with where it is once the second is over.
#[test]
fn a_peer_that_roams_with_every_datagram_is_announced_once_a_second() {
    use crate::core::harness::Collect;

    let now = Instant::now();
    let (mut engine, mut r1, packet) = connected_client(now);
    let key = *r1.public_key.as_bytes();
    let _connected: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();

    let mut last = r1.addr;
    for n in 0..100u16 {
        let at = now + Duration::from_millis(5 * u64::from(n));
        r1.addr = SocketAddr::from(([198, 51, 100, 9], 5000 + n));
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, at, &mut Collect::default());
        engine.handle_timers(at, &mut Collect::default());
        last = r1.addr;
    }
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Roamed {
            peer: key,
            endpoint: "198.51.100.9:5000".parse().unwrap()
        }]
    );
    assert_eq!(
        engine.peer_status(&key, now).and_then(|s| s.endpoint),
        Some(last),
        "the endpoint itself follows every datagram"
    );

    // The second is over: the timers announce where it is now, once.
    let later = now + Duration::from_millis(1000);
    engine.handle_timers(later, &mut Collect::default());
    engine.handle_timers(later + Duration::from_millis(250), &mut Collect::default());
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Roamed {
            peer: key,
            endpoint: last
        }]
    );
}

/// A peer that moves and is back where its last event said before the second
/// is over has not moved for whoever listens: no event; one that stays away
/// is announced once the second is over.
#[test]
fn a_roam_undone_within_the_second_is_not_announced() {
    use crate::core::harness::Collect;

    let now = Instant::now();
    let (mut engine, mut r1, packet) = connected_client(now);
    let key = *r1.public_key.as_bytes();
    let home = r1.addr;
    let _connected: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    let mut from = |r1: &mut crate::core::harness::MemoryClient, addr: SocketAddr, at| {
        r1.addr = addr;
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, at, &mut Collect::default());
        engine.handle_timers(at, &mut Collect::default());
        std::iter::from_fn(|| engine.poll_event()).collect::<Vec<_>>()
    };
    let away: SocketAddr = "198.51.100.9:5000".parse().unwrap();
    let ms = |n| now + Duration::from_millis(n);

    assert_eq!(
        from(&mut r1, away, ms(10)),
        [Event::Roamed {
            peer: key,
            endpoint: away
        }]
    );
    // Back home and away again within the second: each time the endpoint is
    // where the last event said by the time the second is over.
    assert!(from(&mut r1, home, ms(200)).is_empty());
    assert!(from(&mut r1, away, ms(400)).is_empty());
    assert!(from(&mut r1, away, ms(1100)).is_empty(), "still where told");
    // Home for good, more than a second after the last event: at once.
    assert_eq!(
        from(&mut r1, home, ms(1500)),
        [Event::Roamed {
            peer: key,
            endpoint: home
        }]
    );
    // Away and back within the next second: nothing, then or later.
    assert!(
        from(&mut r1, away, ms(1700)).is_empty(),
        "within the second"
    );
    assert!(from(&mut r1, home, ms(1900)).is_empty());
    assert!(from(&mut r1, home, ms(2550)).is_empty(), "back where told");
    // A move after that second is news again, once.
    assert_eq!(
        from(&mut r1, away, ms(2600)),
        [Event::Roamed {
            peer: key,
            endpoint: away
        }]
    );
    assert!(from(&mut r1, away, ms(3700)).is_empty(), "once");
}
