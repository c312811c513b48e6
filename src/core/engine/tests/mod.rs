//! The engine with simulated peers and time (boringtun's own timers excepted:
//! they read the real clock, which one test waits on). The helpers are here;
//! the tests by what they exercise in the modules below.

use super::*;
use crate::core::peer::{canonical_endpoint, PeerConfig};
use crate::core::policy::DropReason;
use boringtun::x25519::PublicKey;

mod changes;
mod handshake;
mod local;
mod queues;
mod roaming;

fn peer(allowed: &str) -> PeerConfig {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    PeerConfig {
        public_key: PublicKey::from(&secret),
        allowed: vec![allowed.parse().unwrap()],
        keepalive: None,
        kind: super::super::peer::PeerKind::Router,
        endpoint: None,
        preshared_key: None,
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
