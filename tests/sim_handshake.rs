//! Handshakes on two tenants' tunnels: each engine answers its own peers, matches
//! initiations to its own key, and ignores peers that belong to another tunnel.

mod sim;

use sim::Sim;
use wgplane::core::engine::Event;
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

#[test]
fn peers_of_two_tenants_complete_handshakes_on_their_own_ports() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let b = sim.tunnel(51821, "10.101.0.1");
    let ra = sim.peer("router-a", a, PeerKind::Router, &["10.100.1.1/32"]);
    let rb = sim.peer("router-b", b, PeerKind::Router, &["10.101.1.1/32"]);

    sim.connect(ra);
    sim.connect(rb);

    for (t, p) in [(a, ra), (b, rb)] {
        let stats = sim.tunnels[t].engine.stats().clone();
        assert_eq!(stats.handshakes, 1, "tunnel {t}");
        let key = sim.public_key(p);
        assert_eq!(
            sim.tunnels[t].engine.poll_event(),
            Some(Event::Connected {
                peer: key,
                endpoint: Some(sim.peers[p].addr)
            })
        );
        let status = sim.tunnels[t].engine.peer_statuses(sim.now);
        assert!(status[0].live && status[0].last_handshake.is_some());
    }
}

#[test]
fn a_peer_of_one_tenant_cannot_handshake_with_another() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let b = sim.tunnel(51821, "10.101.0.1");
    let ra = sim.peer("router-a", a, PeerKind::Router, &["10.100.1.1/32"]);
    // The same key dials tunnel B, where it is not a peer.
    let secret = sim.peers[ra].secret.clone();
    let intruder = sim.unregistered_peer("router-a-at-b", b, secret);
    sim.connect(intruder);
    let stats = sim.tunnels[b].engine.stats();
    assert_eq!(stats.handshakes, 0);
    assert_eq!(stats.dropped(DropReason::UnknownPeer), 1);
    assert_eq!(stats.tx_datagrams, 0, "tunnel B must not answer a stranger");
}

#[test]
fn data_after_handshake_flows_and_roaming_follows_the_peer() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", a, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", a, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r1);
    sim.connect(r2);
    while sim.tunnels[a].engine.poll_event().is_some() {}

    // r1 moves to a new underlay address; its next authenticated packet updates the endpoint.
    let old = sim.peers[r1].addr;
    let new = "203.0.113.99:50000".parse().unwrap();
    sim.peers[r1].addr = new;
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1);
    assert_eq!(
        sim.tunnels[a].engine.poll_event(),
        Some(Event::Roamed {
            peer: sim.public_key(r1),
            endpoint: new
        })
    );
    assert_ne!(old, new);
    // Replies now go to the new address.
    sim.send_ip(r2, "10.100.1.2", "10.100.1.1");
    assert_eq!(sim.take_inbox(r1).len(), 1);
}

#[test]
fn a_new_key_at_a_known_endpoint_still_handshakes_as_itself() {
    // Repeated initiations from a peer's own endpoint go straight to that peer
    // (no key search); a different key behind the same address and port (a NAT
    // reusing a mapping) must still be recognised as who it is.
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", a, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", a, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r1);
    sim.connect(r1);
    assert_eq!(sim.tunnels[a].engine.stats().handshakes, 2);

    // r1 moves on; its old address and port are then reused (a NAT mapping) by
    // r2, while the engine still remembers r1 there.
    let old = sim.peers[r1].addr;
    sim.peers[r1].addr = "203.0.113.77:40000".parse().unwrap();
    sim.peers[r2].addr = old;
    sim.connect(r2);
    let stats = sim.tunnels[a].engine.stats().clone();
    assert_eq!(stats.handshakes, 3);
    assert_eq!(stats.dropped(DropReason::HandshakeFailed), 0);
    let statuses = sim.tunnels[a].engine.peer_statuses(sim.now);
    assert!(statuses.iter().all(|s| s.last_handshake.is_some()));

    // Both sessions carry traffic, each under its own key and source check.
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    sim.send_ip(r2, "10.100.1.2", "10.100.1.1");
    assert_eq!(sim.take_inbox(r2).len(), 1, "r1 -> r2");
    assert_eq!(sim.take_inbox(r1).len(), 1, "r2 -> r1");
    assert_eq!(
        sim.tunnels[a].engine.stats().handshakes,
        3,
        "no new handshakes"
    );

    // A stranger at a known endpoint is refused after the key search.
    let stranger_key = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
    let stranger = sim.unregistered_peer("stranger", a, stranger_key);
    sim.peers[stranger].addr = sim.peers[r2].addr;
    sim.connect(stranger);
    let stats = sim.tunnels[a].engine.stats();
    assert_eq!(stats.handshakes, 3);
    assert_eq!(stats.dropped(DropReason::UnknownPeer), 1);
}

#[test]
fn only_peers_that_speak_get_protocol_state() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let peers: Vec<_> = ["10.100.1.1/32", "10.100.1.2/32", "10.100.1.3/32"]
        .iter()
        .map(|p| sim.peer("r", a, PeerKind::Router, &[p]))
        .collect();
    assert_eq!(sim.tunnels[a].engine.active_peer_count(), 0);
    sim.tick();
    assert!(
        sim.sent_by_engines.is_empty(),
        "idle peers have no timer output"
    );

    sim.connect(peers[0]);
    assert_eq!(sim.tunnels[a].engine.active_peer_count(), 1);
    // Traffic to a peer that never spoke has nowhere to go and creates nothing.
    sim.send_ip(peers[0], "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.tunnels[a].engine.active_peer_count(), 1);
    assert_eq!(
        sim.tunnels[a]
            .engine
            .stats()
            .dropped(DropReason::NoEndpoint),
        1
    );
    sim.connect(peers[1]);
    sim.connect(peers[1]);
    assert_eq!(sim.tunnels[a].engine.active_peer_count(), 2);
    sim.send_ip(peers[0], "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(peers[1]).len(), 1);

    // Removing an active peer takes it off the list.
    let key = sim.public_key(peers[0]);
    assert!(sim.tunnels[a].engine.remove_peer(&key).is_some());
    assert_eq!(sim.tunnels[a].engine.active_peer_count(), 1);
}

/// A sim with two tunnels whose engines share one handshake budget.
fn two_tunnels_sharing_a_budget(per_second: u32) -> (Sim, usize, usize) {
    use std::sync::Arc;
    use wgplane::core::budget::HandshakeBudget;
    use wgplane::core::engine::TunnelEngine;

    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let b = sim.tunnel(51821, "10.101.0.1");
    let budget = Arc::new(HandshakeBudget::new(per_second));
    for (t, server) in [(a, "10.100.0.1"), (b, "10.101.0.1")] {
        let secret = sim.tunnels[t].secret.clone();
        sim.tunnels[t].engine = TunnelEngine::new(secret, vec![sim::ip(server)])
            .with_handshake_budget(Arc::clone(&budget));
    }
    (sim, a, b)
}

#[test]
fn the_process_wide_budget_caps_handshake_work_across_tunnels() {
    // Two tunnels share a budget of 200 handshakes a second: a bucket of 2.
    let (mut sim, a, b) = two_tunnels_sharing_a_budget(200);
    let ra = sim.peer("ra", a, PeerKind::Router, &["10.100.1.1/32"]);
    let rb = sim.peer("rb", b, PeerKind::Router, &["10.101.1.1/32"]);
    let rc = sim.peer("rc", b, PeerKind::Router, &["10.101.1.2/32"]);
    for p in [ra, rb, rc] {
        sim.connect(p);
    }
    let handshakes = |sim: &Sim| {
        sim.tunnels[a].engine.stats().handshakes + sim.tunnels[b].engine.stats().handshakes
    };
    assert_eq!(handshakes(&sim), 2);
    assert_eq!(
        sim.tunnels[b].engine.stats().cookie_replies,
        1,
        "the third meets a cookie, before any Diffie-Hellman"
    );
    // 5 ms later one more token: the retry, now with the cookie, gets
    // through.
    sim.advance(std::time::Duration::from_millis(5));
    sim.connect(rc);
    assert_eq!(handshakes(&sim), 3);
    assert_eq!(sim.tunnels[b].engine.stats().cookie_replies, 1);
}

#[test]
fn under_a_storm_only_senders_with_a_cookie_spend_the_budget() {
    use std::time::Duration;

    // Two tunnels share a budget of 200 handshakes a second (a bucket of 2);
    // each tunnel alone would answer 1,000 a second.
    let (mut sim, a, b) = two_tunnels_sharing_a_budget(200);
    let first = sim.peer("first", a, PeerKind::Router, &["10.100.1.1/32"]);
    let second = sim.peer("second", a, PeerKind::Router, &["10.100.1.2/32"]);
    let patient = sim.peer("patient", b, PeerKind::Router, &["10.101.1.1/32"]);
    let storm: Vec<_> = (0..20)
        .map(|i| {
            let allowed = [format!("10.101.2.{}/32", i + 1)];
            let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            sim.peer("storm", b, PeerKind::Router, &allowed)
        })
        .collect();
    let handshakes = |sim: &Sim| {
        sim.tunnels[a].engine.stats().handshakes + sim.tunnels[b].engine.stats().handshakes
    };

    // The budget is spent on tunnel A; the patient peer gets a cookie.
    sim.connect(first);
    sim.connect(second);
    sim.connect(patient);
    assert_eq!(handshakes(&sim), 2);
    assert_eq!(sim.tunnels[b].engine.stats().cookie_replies, 1);

    // 5 ms later a token is back, but the process is still under load: a
    // storm of first-time initiations is met with cookies only.
    sim.advance(Duration::from_millis(5));
    for &p in &storm {
        sim.connect(p);
    }
    assert_eq!(handshakes(&sim), 2, "no Diffie-Hellman for the storm");
    assert_eq!(sim.tunnels[b].engine.stats().cookie_replies, 21);

    // The token goes to the peer that proved its address.
    sim.connect(patient);
    assert_eq!(handshakes(&sim), 3);
    assert_eq!(sim.tunnels[b].engine.stats().handshakes, 1);
}

#[test]
fn under_load_one_cookie_holder_cannot_take_everyone_s_budget() {
    use std::sync::Arc;
    use wgplane::core::budget::HandshakeBudget;
    use wgplane::core::engine::TunnelEngine;

    // One initiation a second before cookies; a process budget of 1,000 a second
    // (a bucket of 10).
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let secret = sim.tunnels[t].secret.clone();
    sim.tunnels[t].engine = TunnelEngine::new(secret, vec![sim::ip("10.100.0.1")])
        .with_handshake_limit(1)
        .with_handshake_budget(Arc::new(HandshakeBudget::new(1_000)));
    let greedy = sim.peer("greedy", t, PeerKind::Router, &["10.100.1.1/32"]);
    let fair = sim.peer("fair", t, PeerKind::Router, &["10.100.1.2/32"]);
    sim.peers[greedy].addr = "198.51.100.66:40000".parse().unwrap();
    sim.peers[fair].addr = "198.51.100.77:40000".parse().unwrap();

    // The first initiation of the second is answered; then both need cookies.
    sim.connect(greedy);
    sim.connect(greedy);
    sim.connect(fair);
    let stats = sim.tunnels[t].engine.stats();
    assert_eq!((stats.handshakes, stats.cookie_replies), (1, 2));

    // The greedy host proved its address and floods: it gets its burst of 5,
    // the rest is dropped before any Diffie-Hellman.
    for _ in 0..20 {
        sim.connect(greedy);
    }
    let stats = sim.tunnels[t].engine.stats();
    assert_eq!(stats.handshakes, 6);
    assert_eq!(stats.dropped(DropReason::UnderLoad), 15);

    // The budget it could not take is still there for the other host.
    sim.connect(fair);
    assert_eq!(sim.tunnels[t].engine.stats().handshakes, 7);
}

#[test]
fn a_storm_on_its_own_tunnel_leaves_established_peers_talking_and_rekeying() {
    use wgplane::core::engine::TunnelEngine;

    // A tunnel that answers 3 initiations a second before it demands cookies.
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let secret = sim.tunnels[a].secret.clone();
    sim.tunnels[a].engine =
        TunnelEngine::new(secret, vec![sim::ip("10.100.0.1")]).with_handshake_limit(3);
    let r1 = sim.peer("r1", a, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", a, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r1);
    sim.connect(r2);
    assert_eq!(sim.tunnels[a].engine.stats().handshakes, 2);

    // A storm of initiations that know the tunnel's key (valid mac1) from
    // strangers: one more is let through (and fails: no such peer), then
    // cookies only.
    for _ in 0..20 {
        let stranger = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let p = sim.unregistered_peer("storm", a, stranger);
        sim.connect(p);
    }
    let stats = sim.tunnels[a].engine.stats().clone();
    assert_eq!(stats.handshakes, 2, "no handshake for the storm");
    assert_eq!(stats.cookie_replies, 19);

    // The established peers' data goes on.
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    sim.send_ip(r2, "10.100.1.2", "10.100.1.1");
    assert_eq!(sim.take_inbox(r2).len(), 1);
    assert_eq!(sim.take_inbox(r1).len(), 1);

    // r1 rekeys in the storm: its first initiation meets a cookie reply, the
    // retry carries the cookie (mac2) and gets its handshake.
    sim.connect(r1);
    assert_eq!(sim.tunnels[a].engine.stats().cookie_replies, 20);
    assert_eq!(sim.tunnels[a].engine.stats().handshakes, 2);
    sim.connect(r1);
    assert_eq!(sim.tunnels[a].engine.stats().handshakes, 3);
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1, "data on the new session");
}

#[test]
fn a_peer_heard_again_after_going_quiet_is_connected_again() {
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let r = sim.peer("router", t, PeerKind::Router, &["10.100.1.1/32"]);
    sim.connect(r);
    let key = sim.public_key(r);
    let endpoint = Some(sim.peers[r].addr);
    let connected = Event::Connected {
        peer: key,
        endpoint,
    };
    assert_eq!(sim.tunnels[t].engine.poll_event(), Some(connected.clone()));
    // A minute of silence: reported disconnected.
    sim.advance(std::time::Duration::from_secs(61));
    sim.tick();
    assert_eq!(
        sim.tunnels[t].engine.poll_event(),
        Some(Event::Disconnected { peer: key })
    );
    // It speaks again on the same session (no new handshake): connected again.
    sim.send_ip(r, "10.100.1.1", "10.100.0.1");
    assert_eq!(sim.tunnels[t].engine.poll_event(), Some(connected));
    assert_eq!(sim.tunnels[t].engine.poll_event(), None);
    assert_eq!(sim.tunnels[t].engine.stats().handshakes, 1);
}

/// A peer with a preshared key shakes hands only when both sides hold the same
/// one; a new key on the tunnel's side ends the peer's session at once (the
/// next handshake needs it).
#[test]
fn a_preshared_key_must_match_and_a_new_one_ends_the_session() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", a, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", a, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r2);
    let (k1, k2) = ([7u8; 32], [9u8; 32]);

    // The router lacks the key the tunnel has: no session.
    sim.set_preshared_keys(r1, Some(k1), None);
    // (The initiation carries nothing of it; the router finds the answer
    // does not authenticate, and has no session to send with.)
    sim.connect(r1);
    assert!(sim.peers[r1].tunn.time_since_last_handshake().is_none());
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert!(sim.take_inbox(r2).is_empty());

    // Both hold it: the handshake completes and traffic flows.
    sim.set_preshared_keys(r1, Some(k1), Some(k1));
    while sim.tunnels[a].engine.poll_event().is_some() {}
    sim.connect(r1);
    let key = sim.public_key(r1);
    assert!(matches!(
        sim.tunnels[a].engine.poll_event(),
        Some(Event::Connected { peer, .. }) if peer == key
    ));
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1);

    // A new key here: the session ends now, and the old key's handshake fails.
    while sim.tunnels[a].engine.poll_event().is_some() {}
    let mut config = sim.peers[r1].config.clone().expect("registered");
    config.preshared_key = Some(wgplane::keys::PresharedKey::from_bytes(k2));
    sim.tunnels[a]
        .engine
        .upsert_peer(config.clone(), 0)
        .unwrap();
    sim.peers[r1].config = Some(config);
    assert_eq!(
        sim.tunnels[a].engine.poll_event(),
        Some(Event::Disconnected { peer: key })
    );
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert!(sim.take_inbox(r2).is_empty(), "the old session is gone");
    sim.connect(r1);
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert!(
        sim.take_inbox(r2).is_empty(),
        "the old key makes no session"
    );
    sim.set_preshared_keys(r1, Some(k2), Some(k2));
    sim.connect(r1);
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1);
}

/// A new preshared key that comes with the whole peer set (a restart's, or the
/// supervisor's resync) takes effect as one given alone does.
#[test]
fn a_preshared_key_changed_in_a_full_sync_takes_effect() {
    let mut sim = Sim::new();
    let a = sim.tunnel(51820, "10.100.0.1");
    let r1 = sim.peer("r1", a, PeerKind::Router, &["10.100.1.1/32"]);
    let r2 = sim.peer("r2", a, PeerKind::Router, &["10.100.1.2/32"]);
    sim.connect(r2);
    let (k1, k2) = ([3u8; 32], [4u8; 32]);
    sim.set_preshared_keys(r1, Some(k1), Some(k1));
    sim.connect(r1);
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1);
    while sim.tunnels[a].engine.poll_event().is_some() {}

    let mut c1 = sim.peers[r1].config.clone().expect("registered");
    c1.preshared_key = Some(wgplane::keys::PresharedKey::from_bytes(k2));
    let c2 = sim.peers[r2].config.clone().expect("registered");
    let removed = sim.tunnels[a]
        .engine
        .sync_peers(vec![(c1.clone(), 0), (c2, 0)])
        .unwrap();
    assert!(removed.is_empty(), "nobody left the tunnel");
    sim.peers[r1].config = Some(c1);
    assert_eq!(
        sim.tunnels[a].engine.poll_event(),
        Some(Event::Disconnected {
            peer: sim.public_key(r1)
        })
    );
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert!(sim.take_inbox(r2).is_empty(), "the old session is gone");
    sim.set_preshared_keys(r1, Some(k2), Some(k2));
    sim.connect(r1);
    sim.send_ip(r1, "10.100.1.1", "10.100.1.2");
    assert_eq!(sim.take_inbox(r2).len(), 1, "the new key's session works");
    // r2 kept its session throughout.
    sim.send_ip(r2, "10.100.1.2", "10.100.1.1");
    assert_eq!(sim.take_inbox(r1).len(), 1);
}
