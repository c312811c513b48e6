//! In-memory WireGuard clients for exercising a [`TunnelEngine`] without sockets:
//! used by the benchmarks and the fuzz targets (the tests have a fuller simulator).
//!
//! A [`MemoryClient`] is a bare boringtun `Tunn` with an underlay address; the
//! handshake with an engine is completed by passing datagrams by hand.
//!
//! Left out: sockets (datagrams are passed by hand), timers (nothing here runs the
//! engine's), and cookie replies: a handshake the engine answers with one returns
//! false.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::engine::{EgressConfig, Sink, TunnelEngine};
use super::peer::{PeerConfig, PeerKind};

/// A sink that keeps every datagram and local packet.
#[derive(Default)]
pub struct Collect {
    /// Datagrams sent, with their destination.
    pub sent: Vec<(SocketAddr, Vec<u8>)>,
    /// Packets delivered to the local side.
    pub local: Vec<Vec<u8>>,
}

impl Sink for Collect {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.sent.push((to, datagram.to_vec()));
    }
    fn local(&mut self, packet: &[u8]) -> bool {
        self.local.push(packet.to_vec());
        true
    }
}

/// A client peer whose datagrams are passed to an engine by hand.
pub struct MemoryClient {
    /// The client's side of the tunnel.
    pub tunn: Tunn,
    /// Its (pretend) underlay address.
    pub addr: SocketAddr,
    /// Its public key.
    pub public_key: PublicKey,
    buf: Vec<u8>,
}

impl MemoryClient {
    /// A client with a fresh key for a tunnel whose public key is `server`.
    pub fn new(server: &PublicKey, index: u32, addr: SocketAddr) -> Self {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public_key = PublicKey::from(&secret);
        Self {
            tunn: Tunn::new(secret, *server, None, None, index, None),
            addr,
            public_key,
            buf: vec![0; 65_600],
        }
    }

    /// Registers the client as a peer of `engine` allowed `allowed`.
    pub fn register(&self, engine: &mut TunnelEngine, allowed: &[IpNet], index: u32) {
        let config = PeerConfig {
            public_key: self.public_key,
            allowed: allowed.to_vec(),
            keepalive: None,
            kind: PeerKind::Router,
            endpoint: None,
            preshared_key: None,
        };
        // The harness chooses distinct indices and prefixes; a clash is a harness bug.
        engine
            .upsert_peer(config, index)
            .expect("harness peers have distinct prefixes and indices");
    }

    /// A fresh handshake initiation from this client.
    pub fn initiation(&mut self) -> Option<Vec<u8>> {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
            _ => None,
        }
    }

    /// Completes a handshake with `engine`; true when the session is up.
    pub fn handshake(&mut self, engine: &mut TunnelEngine, now: Instant) -> bool {
        let Some(init) = self.initiation() else {
            return false;
        };
        let mut out = Collect::default();
        engine.handle_datagram(self.addr, &init, now, &mut out);
        let Some((_, response)) = out.sent.pop() else {
            return false;
        };
        if let TunnResult::WriteToNetwork(k) = self.tunn.decapsulate(None, &response, &mut self.buf)
        {
            let keepalive = k.to_vec();
            engine.handle_datagram(self.addr, &keepalive, now, &mut Collect::default());
        }
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Encrypts an inner packet into a datagram for the engine.
    pub fn encrypt(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
            _ => None,
        }
    }

    /// Decrypts a data datagram from the engine into its inner packet.
    pub fn decrypt(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.decapsulate(None, datagram, &mut self.buf) {
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                Some(p.to_vec())
            }
            _ => None,
        }
    }
}

/// The seed's KTN tunnel in memory: an engine at 10.100.0.1 with a gateway
/// (10.100.0.40) and a phone (10.200.0.2, pool 10.200.0.0/24), both with sessions.
pub struct Ktn {
    pub engine: TunnelEngine,
    pub phone: MemoryClient,
    pub gateway: MemoryClient,
}

impl Ktn {
    /// Builds the tunnel and completes both handshakes.
    pub fn new(now: Instant) -> Self {
        let server = StaticSecret::random_from_rng(rand_core::OsRng);
        let server_public = PublicKey::from(&server);
        let mut engine = TunnelEngine::new(server, vec![IpAddr::from([10, 100, 0, 1])]);
        let mut gateway = MemoryClient::new(
            &server_public,
            100,
            SocketAddr::from(([203, 0, 113, 2], 1000)),
        );
        let mut phone = MemoryClient::new(
            &server_public,
            200,
            SocketAddr::from(([198, 51, 100, 2], 2000)),
        );
        gateway.register(
            &mut engine,
            &[IpNet::from(IpAddr::from([10, 100, 0, 40]))],
            1,
        );
        phone.register(
            &mut engine,
            &[IpNet::from(IpAddr::from([10, 200, 0, 2]))],
            2,
        );
        engine.set_egress(vec![EgressConfig {
            pool: IpNet::new(IpAddr::from([10, 200, 0, 0]), 24).unwrap_or_default(),
            gateways: vec![*gateway.public_key.as_bytes()],
        }]);
        gateway.handshake(&mut engine, now);
        phone.handshake(&mut engine, now);
        Self {
            engine,
            phone,
            gateway,
        }
    }
}
