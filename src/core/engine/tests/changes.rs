//! The control plane's changes: restored peers and endpoints, prefixes moving between peers, syncs, refused peers.

use super::*;

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
