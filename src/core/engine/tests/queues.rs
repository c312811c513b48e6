//! Packets waiting for a handshake, withdrawn gateways, handshakes that gave up, the tunnel's queue limit.

use super::*;

/// Packets for a peer that has an endpoint but no session wait for its
/// handshake (counted as queued), up to its limit; the rest are dropped and
/// counted as `queue_full`, and the handshake starts once. Removed meanwhile,
/// the peer leaves its waiting packets counted as `peer_removed`, not lost
/// silently with it.
#[test]
fn packets_for_a_peer_without_a_session_wait_then_count_as_queue_full() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;
    use crate::core::peer::QUEUE_PACKETS;

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    assert!(r1.handshake(&mut engine, now));
    let mut quiet = peer("10.100.1.2/32");
    quiet.endpoint = Some("198.51.100.2:51820".parse().unwrap());
    let quiet_key = *quiet.public_key.as_bytes();
    engine.upsert_peer(quiet, 2).unwrap();

    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 1, 2].into(), 100);
    let sent = usize::from(QUEUE_PACKETS) + 40;
    let mut out = Collect::default();
    for _ in 0..sent {
        let datagram = r1.encrypt(&packet).unwrap();
        engine.handle_datagram(r1.addr, &datagram, now, &mut out);
    }
    let to_quiet: Vec<_> = out
        .sent
        .iter()
        .filter(|(to, _)| *to == "198.51.100.2:51820".parse::<SocketAddr>().unwrap())
        .collect();
    assert_eq!(to_quiet.len(), 1, "one initiation, nothing else");
    assert_eq!(to_quiet[0].1[0], 1, "a handshake initiation");
    assert_eq!(engine.stats().queued, u64::from(QUEUE_PACKETS));
    assert_eq!(engine.stats().dropped(DropReason::QueueFull), 40);

    engine.remove_peer(&quiet_key);
    assert_eq!(
        engine.stats().dropped(DropReason::PeerRemoved),
        u64::from(QUEUE_PACKETS)
    );
}

/// In the moment between boringtun ending a gateway's session and the engine
/// seeing its liveness run out, a phone's packet waits for the gateway's next
/// handshake. A gateway taken out of the egress policy meanwhile never gets
/// it: the packet is dropped as `gateway_withdrawn`. Kept in the policy, the
/// gateway gets it once its handshake completes.
#[test]
fn a_phone_packet_waiting_for_a_withdrawn_gateway_never_reaches_it() {
    use crate::core::harness::{Collect, Ktn};
    use crate::core::packet::build::ip_packet;

    for withdrawn in [false, true] {
        let now = Instant::now();
        let mut k = Ktn::new(now);
        let gateway = k.engine.peers.by_key[k.gateway.public_key.as_bytes()];
        // boringtun's session is gone; the engine's liveness is not.
        k.engine.peers.get_mut(gateway).unwrap().stop_protocol();
        let packet = ip_packet([10, 200, 0, 2].into(), [198, 18, 0, 1].into(), 8);
        let datagram = k.phone.encrypt(&packet).unwrap();
        let mut out = Collect::default();
        k.engine
            .handle_datagram(k.phone.addr, &datagram, now, &mut out);
        assert_eq!(k.engine.stats().queued, 1, "waits for the gateway");
        let (to, initiation) = out.sent.pop().unwrap();
        assert_eq!((to, message_type(&initiation)), (k.gateway.addr, 1));

        if withdrawn {
            k.engine.set_egress(Vec::new());
            assert_eq!(k.engine.stats().dropped(DropReason::GatewayWithdrawn), 1);
            let peer = k.engine.peers.get(gateway).unwrap();
            assert!(peer.listed && peer.is_active(), "its timers run on, afresh");
        }
        let response = response_of(&mut k.gateway, &initiation);
        let mut out = Collect::default();
        k.engine
            .handle_datagram(k.gateway.addr, &response, now, &mut out);
        let at = k.gateway.addr;
        let delivered: Vec<_> = out
            .sent
            .iter()
            .filter(|(to, _)| *to == at)
            .filter_map(|(_, d)| k.gateway.decrypt(d))
            .collect();
        if withdrawn {
            assert!(delivered.is_empty(), "nothing for a withdrawn gateway");
        } else {
            assert_eq!(delivered.len(), 1, "kept in the policy, it arrives");
            assert_eq!(delivered[0][12..20], packet[12..20], "the phone's packet");
        }
    }
}

/// A gateway whose handshake gave up (boringtun tries for 90 s; given up by
/// hand here) is not live, however recently it was heard from (a liveness
/// timeout of minutes): phones' packets are dropped as `egress_down`, not
/// queued behind one more handshake with it, until a handshake completes.
#[test]
fn a_gateway_whose_handshake_gave_up_is_not_live_however_recently_heard() {
    use crate::core::harness::{Collect, Ktn};
    use crate::core::packet::build::ip_packet;

    let now = Instant::now();
    let mut k = Ktn::new(now);
    let packet = ip_packet([10, 200, 0, 2].into(), [198, 18, 0, 1].into(), 8);
    let from_phone = |k: &mut Ktn| {
        let datagram = k.phone.encrypt(&packet).unwrap();
        k.engine
            .handle_datagram(k.phone.addr, &datagram, now, &mut Collect::default());
    };
    from_phone(&mut k);
    assert_eq!(k.engine.stats().egress_hits, 1);

    let gateway = k.engine.peers.by_key[k.gateway.public_key.as_bytes()];
    k.engine.peers.get_mut(gateway).unwrap().handshake_gave_up();
    let status = k.engine.peer_status(k.gateway.public_key.as_bytes(), now);
    assert!(!status.unwrap().live, "heard from just now, but no session");
    from_phone(&mut k);
    assert_eq!(k.engine.stats().egress_hits, 1);
    assert_eq!(k.engine.stats().dropped(DropReason::EgressDown), 1);
    assert_eq!(k.engine.stats().queued, 0, "nothing waits for it");

    assert!(k.gateway.handshake(&mut k.engine, now));
    from_phone(&mut k);
    assert_eq!(k.engine.stats().egress_hits, 2, "live again");
}

/// A peer we keep alive has timer work for good, until its handshake gives up
/// (boringtun then sends nothing more, keepalives included): it leaves the
/// active list, and a later change that gives its endpoint again brings it
/// back, as after a restart.
#[test]
fn a_kept_alive_peer_whose_handshake_gave_up_leaves_the_active_list() {
    use crate::core::harness::Collect;

    let now = Instant::now();
    let (mut engine, _) = one_client();
    let mut kept = peer("10.100.1.2/32");
    kept.keepalive = Some(25);
    kept.endpoint = Some("198.51.100.2:51820".parse().unwrap());
    engine.upsert_peer(kept.clone(), 2).unwrap();
    assert_eq!(engine.active_peer_count(), 1);
    let later = now + Duration::from_secs(600);
    engine.handle_timers(later, &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 1, "kept alive");

    let id = engine.peers.by_key[kept.public_key.as_bytes()];
    engine.peers.get_mut(id).unwrap().handshake_gave_up();
    engine.handle_timers(later, &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 0, "nothing left to do");

    engine.upsert_peer(kept, 2).unwrap();
    assert_eq!(engine.active_peer_count(), 1, "reached out to again");
}

/// A router that sends to every sessionless peer of its tunnel fills their
/// queues only up to the tunnel's limit; beyond it packets are `queue_full`.
#[test]
fn the_peers_of_a_tunnel_wait_with_no_more_than_its_limit() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;
    use crate::core::peer::{QUEUE_BYTES, TUNNEL_QUEUE_BYTES};

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    assert!(r1.handshake(&mut engine, now));
    let peers: u8 = 80;
    for n in 0..peers {
        let mut quiet = peer(&format!("10.100.2.{n}/32"));
        quiet.endpoint = Some(SocketAddr::from(([198, 51, 100, 2], 1000 + u16::from(n))));
        engine.upsert_peer(quiet, 100 + u32::from(n)).unwrap();
    }
    let len = 60_000;
    let per_peer = QUEUE_BYTES as usize / len;
    for n in 0..peers {
        let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 2, n].into(), len - 28);
        for _ in 0..per_peer {
            let datagram = r1.encrypt(&packet).unwrap();
            engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
        }
    }
    let queued = engine.stats().queued;
    let full = engine.stats().dropped(DropReason::QueueFull);
    assert_eq!(queued + full, u64::from(peers) * per_peer as u64);
    assert_eq!(
        queued,
        TUNNEL_QUEUE_BYTES / len as u64,
        "{queued} queued, {full} full"
    );
}
