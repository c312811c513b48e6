//! Handshakes: responses, cookies under load, replays, quiet peers leaving the active list, strangers, receiver indices.

use super::*;

#[test]
fn calm_a_response_completes_our_handshake() {
    use crate::core::harness::Collect;
    let now = Instant::now();
    let (mut engine, mut g, initiation) = initiating_to_a_peer(now);
    let response = response_of(&mut g, &initiation);
    let mut out = Collect::default();
    engine.handle_datagram(g.addr, &response, now, &mut out);
    assert_eq!(engine.stats().handshakes, 1);
    assert_eq!(engine.stats().cookie_replies, 0);
    assert_eq!(engine.stats().admitted_handshakes, 1, "the response");
    // The waiting packet, then nothing else.
    assert!(out
        .sent
        .iter()
        .all(|(to, d)| *to == g.addr && message_type(d) == 4));
}

/// Under load a response without a valid mac2 gets a cookie reply and no
/// Diffie-Hellman (boringtun never sees it: our handshake stays open); once
/// the load is over the same response completes the handshake.
#[test]
fn under_load_a_response_gets_a_cookie_reply_before_any_diffie_hellman() {
    use crate::core::harness::{Collect, MemoryClient};
    let now = Instant::now();
    let (engine, mut g, initiation) = initiating_to_a_peer(now);
    let mut engine = engine.with_handshake_limit(1);
    let public = *engine.public_key();
    // Another peer's initiations put the tunnel over its limit of one.
    let mut c = MemoryClient::new(&public, 8, SocketAddr::from(([192, 0, 2, 8], 8)));
    c.register(
        &mut engine,
        &[IpNet::from(IpAddr::from([10, 100, 1, 8]))],
        8,
    );
    assert!(c.handshake(&mut engine, now));
    c.handshake(&mut engine, now);
    assert_eq!(engine.stats().cookie_replies, 1);
    let (handshakes, cookies) = (engine.stats().handshakes, engine.stats().cookie_replies);
    let admitted = engine.stats().admitted_handshakes;
    assert_eq!(admitted, 1, "the other peer's first initiation");

    let response = response_of(&mut g, &initiation);
    let mut out = Collect::default();
    engine.handle_datagram(g.addr, &response, now, &mut out);
    assert_eq!(engine.stats().cookie_replies, cookies + 1);
    assert_eq!(engine.stats().handshakes, handshakes);
    assert_eq!(engine.stats().admitted_handshakes, admitted);
    let (to, reply) = out.sent.pop().unwrap();
    assert_eq!((to, message_type(&reply)), (g.addr, 3));
    let mut buf = vec![0; 256];
    assert!(matches!(
        g.tunn.decapsulate(None, &reply, &mut buf),
        boringtun::noise::TunnResult::Done
    ));

    // A second later the tunnel is calm and the response goes through.
    let later = now + Duration::from_secs(2);
    engine.handle_datagram(g.addr, &response, later, &mut Collect::default());
    assert_eq!(engine.stats().handshakes, handshakes + 1);
}

#[test]
fn a_quiet_peer_leaves_the_active_list_and_comes_back_when_it_speaks() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;
    use crate::core::peer::SESSION_LIFETIME;

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    assert!(r1.handshake(&mut engine, now));
    assert_eq!(engine.active_peer_count(), 1);
    engine.handle_timers(now + Duration::from_secs(60), &mut Collect::default());
    assert_eq!(
        engine.active_peer_count(),
        1,
        "its session is still current"
    );
    engine.handle_timers(now + SESSION_LIFETIME, &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 0);
    assert!(!engine.needs_timers());
    let id = engine.peers.by_key[r1.public_key.as_bytes()];
    assert!(
        !engine.peers.get(id).unwrap().is_active(),
        "its Tunn is gone"
    );
    let events: Vec<_> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert!(events.contains(&Event::Disconnected {
        peer: *r1.public_key.as_bytes()
    }));

    // It speaks again: listed, and its packets arrive.
    let later = now + Duration::from_secs(300);
    assert!(r1.handshake(&mut engine, later));
    assert_eq!(engine.active_peer_count(), 1);
    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, later, &mut Collect::default());
    let status = engine.peer_status(r1.public_key.as_bytes(), later).unwrap();
    assert_eq!(status.stats.rx_packets, 1);
    engine.handle_timers(later + Duration::from_secs(1), &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 1);
}

/// A quiet peer's protocol state is gone, so a replay of its last
/// initiation is answered; the replay does not move its endpoint.
#[test]
fn a_replayed_initiation_does_not_move_a_quiet_peers_endpoint() {
    use crate::core::harness::Collect;
    use crate::core::peer::SESSION_LIFETIME;

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    let mut buf = vec![0; 256];
    let initiation = r1.initiation().expect("an initiation");
    let mut out = Collect::default();
    engine.handle_datagram(r1.addr, &initiation, now, &mut out);
    let (_, response) = out.sent.pop().unwrap();
    let keepalive = match r1.tunn.decapsulate(None, &response, &mut buf) {
        boringtun::noise::TunnResult::WriteToNetwork(k) => k.to_vec(),
        _ => panic!("no keepalive"),
    };
    engine.handle_datagram(r1.addr, &keepalive, now, &mut Collect::default());
    assert_eq!(engine.stats().handshakes, 1);
    engine.handle_timers(now + SESSION_LIFETIME, &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 0);

    let elsewhere = SocketAddr::from(([203, 0, 113, 9], 9));
    let later = now + Duration::from_secs(200);
    let mut out = Collect::default();
    engine.handle_datagram(elsewhere, &initiation, later, &mut out);
    assert_eq!(engine.stats().handshake_responses, 2);
    let status = engine.peer_status(r1.public_key.as_bytes(), later).unwrap();
    assert_eq!(status.endpoint, Some(r1.addr));
    assert_eq!(engine.endpoints.get(&elsewhere), None);
}

/// An initiation captured once and replayed from a forged source to a peer
/// we keep alive but that has not connected since the start (no endpoint):
/// it is answered (its timestamp cannot be checked once the peer's protocol
/// state is gone), but the forged source never becomes the peer's endpoint,
/// nothing else goes there, and the peer holds its protocol state for
/// `ANSWER_HOLD`, not for a session's lifetime.
#[test]
fn a_replayed_initiation_costs_seconds_and_sends_nothing_to_its_source() {
    use crate::core::harness::{Collect, MemoryClient};
    use crate::core::peer::ANSWER_HOLD;

    let now = Instant::now();
    let (mut engine, _) = one_client();
    let server = *engine.public_key();
    let mut r2 = MemoryClient::new(&server, 2, SocketAddr::from(([192, 0, 2, 2], 2)));
    let mut config = peer("10.100.1.2/32");
    config.public_key = r2.public_key;
    config.keepalive = Some(25);
    engine.upsert_peer(config, 2).unwrap();
    let initiation = r2.initiation().expect("an initiation");

    let forged_source = SocketAddr::from(([203, 0, 113, 9], 9));
    let mut out = Collect::default();
    engine.handle_datagram(forged_source, &initiation, now, &mut out);
    assert_eq!(engine.stats().handshake_responses, 1);
    assert_eq!(out.sent.len(), 1, "the response");
    let status = engine.peer_status(r2.public_key.as_bytes(), now).unwrap();
    assert_eq!(
        status.endpoint, None,
        "no endpoint from an unconfirmed initiation"
    );
    assert_eq!(engine.active_peer_count(), 1);

    let mut out = Collect::default();
    for s in 1..=ANSWER_HOLD.as_secs() + 1 {
        engine.handle_timers(now + Duration::from_secs(s), &mut out);
    }
    assert!(out.sent.is_empty(), "no keepalive, no initiation");
    assert_eq!(engine.active_peer_count(), 0, "its protocol state is gone");
}

/// A peer whose packets authenticate keeps its protocol state while it is
/// heard from, even when the engine did not count the handshake that made
/// the session (its first packet came on an earlier response of ours than
/// the one we noted: taken out by hand here).
#[test]
fn a_peer_heard_from_keeps_its_session_however_it_was_made() {
    use crate::core::harness::Collect;
    use crate::core::peer::{ANSWER_HOLD, SESSION_LIFETIME};

    let now = Instant::now();
    let (mut engine, r1, _) = connected_client(now);
    let id = engine.peers.by_key[r1.public_key.as_bytes()];
    engine.peers.get_mut(id).unwrap().last_handshake = None;
    let later = now + ANSWER_HOLD + Duration::from_secs(1);
    engine.handle_timers(later, &mut Collect::default());
    assert_eq!(engine.active_peer_count(), 1, "heard from");
    assert!(engine.peers.get(id).unwrap().is_active());
    engine.handle_timers(now + SESSION_LIFETIME, &mut Collect::default());
    assert_eq!(
        engine.active_peer_count(),
        0,
        "silent for a session's lifetime"
    );
}

#[test]
fn an_initiation_that_fails_authentication_lists_no_peer() {
    use crate::core::harness::Collect;

    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    let initiation = r1.initiation().expect("an initiation");
    let forged = forged(&initiation, engine.public_key());
    let mut out = Collect::default();
    engine.handle_datagram(r1.addr, &forged, now, &mut out);
    assert!(out.sent.is_empty());
    assert_eq!(engine.stats().dropped(DropReason::DecryptFailed), 1);
    assert_eq!(engine.active_peer_count(), 0);
    assert!(!engine.needs_timers());
    let id = engine.peers.by_key[r1.public_key.as_bytes()];
    assert!(!engine.peers.get(id).unwrap().is_active(), "no Tunn kept");
    // The genuine one still works.
    assert!(r1.handshake(&mut engine, now));
    assert_eq!(engine.active_peer_count(), 1);
}

/// An initiation that carries a key that is no peer is dropped
/// (`unknown_peer`) and its key remembered, with where it came from and how
/// often; once the key is made a peer, it is no stranger, and connects.
#[test]
fn a_key_that_is_no_peer_is_remembered_until_it_is_one() {
    use crate::core::harness::{Collect, MemoryClient};

    let now = Instant::now();
    let (mut engine, _) = one_client();
    let server = *engine.public_key();
    let mut stranger = MemoryClient::new(&server, 9, SocketAddr::from(([192, 0, 2, 9], 9)));
    for _ in 0..2 {
        let initiation = stranger.initiation().unwrap();
        let mut out = Collect::default();
        engine.handle_datagram(stranger.addr, &initiation, now, &mut out);
        assert!(out.sent.is_empty());
    }
    assert_eq!(engine.stats().dropped(DropReason::UnknownPeer), 2);
    let known = engine.strangers();
    assert_eq!(known.len(), 1);
    assert_eq!(
        (known[0].public_key, known[0].endpoint, known[0].initiations),
        (*stranger.public_key.as_bytes(), stranger.addr, 2)
    );

    stranger.register(
        &mut engine,
        &[IpNet::from(IpAddr::from([10, 100, 1, 9]))],
        9,
    );
    assert!(engine.strangers().is_empty());
    assert!(stranger.handshake(&mut engine, now));
}

#[test]
fn a_new_peer_needs_a_24_bit_nonzero_index() {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    for index in [0, 1 << 24, u32::MAX] {
        assert_eq!(
            engine.upsert_peer(peer("10.100.1.1/32"), index),
            Err(EngineError::BadIndex { index })
        );
    }
    assert_eq!(engine.peer_count(), 0);
    assert_eq!(
        engine.upsert_peer(peer("10.100.1.1/32"), (1 << 24) - 1),
        Ok(())
    );
}
