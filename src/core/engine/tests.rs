//! The engine with simulated peers and time.

use super::*;
use crate::core::peer::{canonical_endpoint, PeerConfig};
use crate::core::policy::DropReason;
use boringtun::x25519::PublicKey;

fn peer(allowed: &str) -> PeerConfig {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    PeerConfig {
        public_key: PublicKey::from(&secret),
        allowed: vec![allowed.parse().unwrap()],
        keepalive: None,
        kind: super::super::peer::PeerKind::Router,
        endpoint: None,
    }
}

/// An engine with its local stack at 10.100.0.1, and router `n` (10.100.1.n)
/// handshaken with it.
fn engine_with_stack_and_routers(
    now: Instant,
    routers: &[u8],
) -> (TunnelEngine, Vec<crate::core::harness::MemoryClient>) {
    use crate::core::harness::MemoryClient;
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let public = PublicKey::from(&secret);
    let server = std::net::Ipv4Addr::new(10, 100, 0, 1);
    let mut engine =
        TunnelEngine::new(secret, vec![IpAddr::V4(server)]).with_local_stack(server, 16, now);
    let clients = routers
        .iter()
        .map(|&n| {
            let mut r = MemoryClient::new(
                &public,
                u32::from(n),
                SocketAddr::from(([192, 0, 2, n], u16::from(n))),
            );
            r.register(
                &mut engine,
                &[IpNet::from(IpAddr::from([10, 100, 1, n]))],
                u32::from(n),
            );
            assert!(r.handshake(&mut engine, now));
            r
        })
        .collect();
    (engine, clients)
}

/// Transit between peers leaves the local stack alone; a packet for the
/// stack runs it at once, and its answer leaves in the same call.
#[test]
fn only_packets_for_the_stack_run_it() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;

    let now = Instant::now();
    let server = IpAddr::from([10, 100, 0, 1]);
    let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1, 2]);
    let r1 = &mut routers[0];
    let polls = |e: &mut TunnelEngine| e.local_stack().map_or(0, |s| s.polls());
    let before = polls(&mut engine);

    let transit = ip_packet([10, 100, 1, 1].into(), [10, 100, 1, 2].into(), 100);
    let mut out = Collect::default();
    for _ in 0..100 {
        let datagram = r1.encrypt(&transit).unwrap();
        engine.handle_datagram(r1.addr, &datagram, now, &mut out);
    }
    assert_eq!(engine.stats().forwarded_peer, 100);
    assert_eq!(polls(&mut engine), before, "transit polled the stack");

    // Protocol 253 to the stack: it answers (ICMP protocol unreachable).
    let local = ip_packet([10, 100, 1, 1].into(), server, 8);
    let datagram = r1.encrypt(&local).unwrap();
    let mut out = Collect::default();
    engine.handle_datagram(r1.addr, &datagram, now, &mut out);
    assert_eq!(engine.stats().forwarded_local, 1);
    assert_eq!(polls(&mut engine), before + 1);
    assert!(out.sent.iter().any(|(to, _)| *to == r1.addr), "answered");
}

/// A packet the stack's full input queue refuses is a drop of its own,
/// not a local delivery.
#[test]
fn a_full_stack_queue_is_counted_as_a_drop() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;

    let now = Instant::now();
    let server = IpAddr::from([10, 100, 0, 1]);
    let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1]);
    let r1 = &mut routers[0];
    let packet = ip_packet([10, 100, 1, 1].into(), server, 8);
    if let Some(stack) = engine.local_stack() {
        while stack.receive(&packet) {}
    }
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
    assert_eq!(engine.stats().dropped(DropReason::LocalQueueFull), 1);
    assert_eq!(engine.stats().forwarded_local, 0);
    // The stack ran and took the queue in: the next packet is delivered.
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
    assert_eq!(engine.stats().forwarded_local, 1);
}

/// A tunnel whose peer `g` has a configured endpoint, with an initiation
/// of the engine's to `g` under way: the engine, `g`, and that initiation.
fn initiating_to_a_peer(
    now: Instant,
) -> (TunnelEngine, crate::core::harness::MemoryClient, Vec<u8>) {
    use crate::core::harness::{Collect, MemoryClient};
    use crate::core::packet::build::ip_packet;

    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let public = PublicKey::from(&secret);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let g = MemoryClient::new(&public, 7, SocketAddr::from(([192, 0, 2, 7], 7)));
    let mut config = peer("10.100.1.7/32");
    config.public_key = g.public_key;
    config.endpoint = Some(g.addr);
    engine.upsert_peer(config, 7).unwrap();
    let mut packet = ip_packet([10, 100, 0, 1].into(), [10, 100, 1, 7].into(), 8);
    let mut out = Collect::default();
    engine.handle_host_packet(&mut packet, now, &mut out);
    let (to, initiation) = out.sent.pop().unwrap();
    assert_eq!((to, message_type(&initiation)), (g.addr, 1));
    (engine, g, initiation)
}

/// The response of `g` to `initiation`.
fn response_of(g: &mut crate::core::harness::MemoryClient, initiation: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; 256];
    match g.tunn.decapsulate(None, initiation, &mut buf) {
        boringtun::noise::TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("no response"),
    }
}

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

/// An engine at 10.100.0.1 with one registered client at 10.100.1.1.
fn one_client() -> (TunnelEngine, crate::core::harness::MemoryClient) {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let public = PublicKey::from(&secret);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let r1 =
        crate::core::harness::MemoryClient::new(&public, 1, SocketAddr::from(([192, 0, 2, 1], 1)));
    r1.register(
        &mut engine,
        &[IpNet::from(IpAddr::from([10, 100, 1, 1]))],
        1,
    );
    (engine, r1)
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

/// `initiation` with its encrypted timestamp changed and a valid mac1 for
/// `server`: it passes admission and names its peer, but does not
/// authenticate.
fn forged(initiation: &[u8], server: &PublicKey) -> Vec<u8> {
    use blake2::digest::{consts::U16, FixedOutput, KeyInit, Update};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let mut forged = initiation.to_vec();
    forged[100] ^= 1;
    let key: [u8; 32] = Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(server.as_bytes())
        .finalize()
        .into();
    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&key).unwrap();
    Update::update(&mut mac, &forged[..116]);
    forged[116..132].copy_from_slice(&mac.finalize_fixed());
    forged
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

/// With our keepalive on, a peer restored with its endpoint is reached at
/// once (its first keepalive starts a handshake), not when it next speaks;
/// without keepalive it stays off the active list until there is traffic.
#[test]
fn a_restored_peer_we_keep_alive_is_reached_without_waiting_for_it() {
    use crate::core::harness::Collect;
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let at = SocketAddr::from(([192, 0, 2, 7], 7));
    let mut kept = peer("10.100.1.1/32");
    kept.keepalive = Some(1);
    kept.endpoint = Some(at);
    let mut quiet = peer("10.100.1.2/32");
    quiet.endpoint = Some(SocketAddr::from(([192, 0, 2, 8], 8)));
    engine.upsert_peer(kept, 1).unwrap();
    engine.upsert_peer(quiet, 2).unwrap();
    assert_eq!(engine.peers.active.len(), 1, "only the kept-alive peer");

    // boringtun's keepalive runs on the real clock.
    std::thread::sleep(Duration::from_millis(1100));
    let mut out = Collect::default();
    engine.handle_timers(Instant::now(), &mut out);
    assert_eq!(out.sent.len(), 1, "{:?}", out.sent);
    assert_eq!(out.sent[0].0, at);
    assert_eq!(message_type(&out.sent[0].1), 1, "a handshake initiation");
}

#[test]
fn a_configured_endpoint_reaches_a_silent_peer_and_never_replaces_a_heard_one() {
    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    // Restored from the state: where the router was last heard from.
    let remembered = SocketAddr::from(([192, 0, 2, 99], 99));
    let mut config = peer("10.100.1.1/32");
    config.public_key = r1.public_key;
    config.endpoint = Some(remembered);
    engine.upsert_peer(config.clone(), 1).unwrap();
    let id = engine.peers.by_key[r1.public_key.as_bytes()];
    let status = engine.peer_status(r1.public_key.as_bytes(), now).unwrap();
    assert_eq!(status.endpoint, Some(remembered));
    assert_eq!(engine.endpoints.get(&remembered), Some(&id));

    // The router speaks from elsewhere: that is where it is now, and the
    // same configuration applied again does not move it back.
    assert!(r1.handshake(&mut engine, now));
    assert_eq!(engine.endpoints.get(&r1.addr), Some(&id));
    assert_eq!(engine.endpoints.get(&remembered), None);
    engine.upsert_peer(config, 1).unwrap();
    let status = engine.peer_status(r1.public_key.as_bytes(), now).unwrap();
    assert_eq!(status.endpoint, Some(r1.addr));
    assert_eq!(engine.endpoints.get(&remembered), None);
}

#[test]
fn a_prefix_moves_between_kept_peers_whatever_their_order() {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let x = peer("10.100.1.1/32");
    let mut y = peer("10.100.1.2/32");
    let moving: IpNet = "10.100.9.0/24".parse().unwrap();
    y.allowed.push(moving);
    engine
        .sync_peers(vec![(x.clone(), 1), (y.clone(), 2)])
        .unwrap();
    // The /24 moves from Y to X, X listed first.
    let mut x2 = x.clone();
    x2.allowed.push(moving);
    let mut y2 = y.clone();
    y2.allowed.retain(|p| *p != moving);
    assert_eq!(engine.sync_peers(vec![(x2, 1), (y2, 2)]), Ok(Vec::new()));
    let owner = |e: &TunnelEngine, ip: [u8; 4]| e.routing.routes.lookup(IpAddr::from(ip)).copied();
    let x_id = engine.peers.by_key[x.public_key.as_bytes()];
    let y_id = engine.peers.by_key[y.public_key.as_bytes()];
    assert_eq!(owner(&engine, [10, 100, 9, 5]), Some(x_id));
    assert_eq!(owner(&engine, [10, 100, 1, 2]), Some(y_id));
    // And back, Y listed first this time.
    assert_eq!(engine.sync_peers(vec![(y, 2), (x, 1)]), Ok(Vec::new()));
    assert_eq!(owner(&engine, [10, 100, 9, 5]), Some(y_id));
    assert_eq!(owner(&engine, [10, 100, 1, 1]), Some(x_id));
}

/// Removing k listed peers in one sync costs one pass over the active
/// list, and leaves exactly the kept ones on it.
#[test]
fn a_sync_that_removes_many_active_peers_prunes_the_list_once() {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let configs: Vec<_> = (0..1_000u32)
        .map(|i| {
            let ip = IpAddr::from([10, 101, (i >> 8) as u8, i as u8]);
            let mut config = peer("10.100.1.1/32");
            config.allowed = vec![IpNet::from(ip)];
            (config, i + 1)
        })
        .collect();
    engine.sync_peers(configs.clone()).unwrap();
    // Every peer on the active list (no protocol state needed to remove one).
    for id in 0..1_000 {
        engine.peers.list(id);
    }
    let kept: Vec<_> = configs.iter().step_by(10).cloned().collect();
    let before = engine.peers.prunes;
    assert_eq!(engine.sync_peers(kept.clone()).map(|f| f.len()), Ok(900));
    assert_eq!(engine.peers.prunes, before + 1);
    assert_eq!(engine.active_peer_count(), 100);
    let mut listed: Vec<_> = engine.peers.active.clone();
    listed.sort_unstable();
    let mut expected: Vec<_> = kept
        .iter()
        .map(|(c, _)| engine.peers.by_key[c.public_key.as_bytes()])
        .collect();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    // A new peer in a freed slot is not listed.
    engine.upsert_peer(peer("10.102.0.1/32"), 5_000).unwrap();
    assert_eq!(engine.active_peer_count(), 100);
    let key = *kept[0].0.public_key.as_bytes();
    assert!(engine.remove_peer(&key).is_some());
    assert_eq!(engine.active_peer_count(), 99);
}

#[test]
fn a_refused_peer_does_not_keep_the_others_out() {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut engine = TunnelEngine::new(secret, vec![IpAddr::from([10, 100, 0, 1])]);
    let peers = vec![
        (peer("10.100.1.1/32"), 1),
        (peer("10.100.1.1/32"), 2), // the same address: refused
        (peer("10.100.1.3/32"), 3),
    ];
    assert!(matches!(
        engine.sync_peers(peers),
        Err(EngineError::PrefixTaken { .. })
    ));
    assert_eq!(engine.peer_count(), 2);
}

/// [`one_client`] with its session confirmed by a packet to the server
/// address (it is connected now), and that packet.
fn connected_client(now: Instant) -> (TunnelEngine, crate::core::harness::MemoryClient, Vec<u8>) {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;

    let (mut engine, mut r1) = one_client();
    assert!(r1.handshake(&mut engine, now));
    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
    (engine, r1, packet)
}

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

/// A packet for the tunnel's own address that nothing takes (no userspace
/// stack, and the host device refuses it: absent, or its batch full) is
/// dropped and counted as `local_unavailable`, not lost silently.
#[test]
fn a_local_packet_nothing_takes_is_counted_as_local_unavailable() {
    use crate::core::packet::build::ip_packet;

    struct Refusing;
    impl Sink for Refusing {
        fn send(&mut self, _: SocketAddr, _: &[u8]) {}
        fn local(&mut self, _: &[u8]) -> bool {
            false
        }
    }
    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    // The host answers the tenant's subnet (TUN mode sets this).
    engine.set_host_sources(&["10.100.0.0/16".parse().unwrap()]);
    assert!(r1.handshake(&mut engine, now));
    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Refusing);
    assert_eq!(engine.stats().dropped(DropReason::LocalUnavailable), 1);
    assert_eq!(engine.stats().forwarded_local, 0);
}
