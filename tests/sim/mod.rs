//! A simulated network for the sans-IO core: tunnel engines and boringtun peers
//! exchanging datagrams in memory, with simulated time for wgplane's own decisions.
//!
//! boringtun keeps its protocol timers on the real monotonic clock; everything
//! wgplane decides (liveness, failover) uses `Sim::now`, which tests advance.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use wgplane::core::engine::{EgressConfig, Sink, TunnelEngine};
use wgplane::core::packet::build::ip_packet;
use wgplane::core::peer::{PeerConfig, PeerKind};

/// Index of a tunnel in the simulation.
pub type TunnelIx = usize;
/// Index of a peer in the simulation.
pub type PeerIx = usize;

pub struct SimTunnel {
    pub addr: SocketAddr,
    pub engine: TunnelEngine,
    pub secret: StaticSecret,
    /// Packets the engine handed to the local side (rule 4).
    pub local: Vec<Vec<u8>>,
    next_index: u32,
}

pub struct SimPeer {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub secret: StaticSecret,
    pub tunn: Tunn,
    pub tunnel: TunnelIx,
    /// Decrypted packets this peer received.
    pub inbox: Vec<Vec<u8>>,
    /// When false the peer is "down": datagrams to it vanish and it sends nothing.
    pub up: bool,
    /// How its tunnel's engine knows it, when registered.
    pub config: Option<PeerConfig>,
}

pub struct Sim {
    pub now: Instant,
    pub tunnels: Vec<SimTunnel>,
    pub peers: Vec<SimPeer>,
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every datagram the engines sent, for "nothing went anywhere" checks.
    pub sent_by_engines: Vec<(SocketAddr, usize)>,
    /// Datagrams addressed to nobody.
    pub lost: usize,
    next_port: u16,
}

struct Recorder<'a> {
    from: SocketAddr,
    out: &'a mut Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    local: &'a mut Vec<Vec<u8>>,
    accept_local: bool,
}

impl Sink for Recorder<'_> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.out.push((self.from, to, datagram.to_vec()));
    }
    fn local(&mut self, packet: &[u8]) -> bool {
        if self.accept_local {
            self.local.push(packet.to_vec());
        }
        self.accept_local
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    pub fn new() -> Self {
        Self {
            now: Instant::now(),
            tunnels: Vec::new(),
            peers: Vec::new(),
            wire: VecDeque::new(),
            sent_by_engines: Vec::new(),
            lost: 0,
            next_port: 40000,
        }
    }

    /// A tunnel listening on 198.51.100.1:`port` whose own address is `server`.
    pub fn tunnel(&mut self, port: u16, server: &str) -> TunnelIx {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let subnet = net(&format!("{server}/16")).trunc();
        let IpNet::V4(subnet_v4) = subnet else {
            panic!("an IPv4 server address");
        };
        let mut engine = TunnelEngine::new(secret.clone(), vec![ip(server)]).with_subnet(subnet_v4);
        // Without a local stack the sink stands for the host device (TUN mode),
        // which routes the tenant's /16 back into the tunnel.
        engine.set_host_sources(&[subnet]);
        self.tunnels.push(SimTunnel {
            addr: SocketAddr::new(ip("198.51.100.1"), port),
            engine,
            secret,
            local: Vec::new(),
            next_index: 1 + 1000 * self.tunnels.len() as u32,
        });
        self.tunnels.len() - 1
    }

    /// Like [`Sim::tunnel`], with the userspace stack serving `server` in `/prefix_len`.
    pub fn tunnel_with_stack(&mut self, port: u16, server: &str, prefix_len: u8) -> TunnelIx {
        let t = self.tunnel(port, server);
        let tunnel = &mut self.tunnels[t];
        let engine = std::mem::replace(
            &mut tunnel.engine,
            TunnelEngine::new(tunnel.secret.clone(), vec![ip(server)]),
        );
        let std::net::IpAddr::V4(v4) = ip(server) else {
            panic!("IPv4 server address expected")
        };
        tunnel.engine = engine.with_local_stack(v4, prefix_len, self.now);
        t
    }

    /// Like [`Sim::tunnel_with_stack`], with an IPv6 server address too.
    pub fn tunnel_with_stack_v6(
        &mut self,
        port: u16,
        server: &str,
        prefix_len: u8,
        server6: &str,
    ) -> TunnelIx {
        let t = self.tunnel(port, server);
        let tunnel = &mut self.tunnels[t];
        let std::net::IpAddr::V4(v4) = ip(server) else {
            panic!("IPv4 server address expected")
        };
        let subnet = ipnet::Ipv4Net::new(v4, prefix_len)
            .expect("a prefix")
            .trunc();
        tunnel.engine = TunnelEngine::new(tunnel.secret.clone(), vec![ip(server), ip(server6)])
            .with_subnet(subnet)
            .with_local_stack(v4, prefix_len, self.now);
        t
    }

    /// A peer of `tunnel` allowed `allowed`, at a fresh underlay address.
    pub fn peer(
        &mut self,
        name: &'static str,
        tunnel: TunnelIx,
        kind: PeerKind,
        allowed: &[&str],
    ) -> PeerIx {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let config = PeerConfig {
            public_key: PublicKey::from(&secret),
            allowed: allowed.iter().map(|a| net(a)).collect(),
            keepalive: None,
            kind,
            endpoint: None,
            preshared_key: None,
        };
        let t = &mut self.tunnels[tunnel];
        t.engine.upsert_peer(config.clone(), t.next_index).unwrap();
        t.next_index += 1;
        let p = self.unregistered_peer(name, tunnel, secret);
        self.peers[p].config = Some(config);
        p
    }

    /// Tells the engine where registered peer `p` is without it having spoken,
    /// as a restart restores a router's last endpoint from the state.
    pub fn remember_endpoint(&mut self, p: PeerIx) {
        let peer = &self.peers[p];
        let mut config = peer.config.clone().expect("a registered peer");
        config.endpoint = Some(peer.addr);
        self.tunnels[peer.tunnel]
            .engine
            .upsert_peer(config, 0)
            .unwrap();
    }

    /// Gives registered peer `p` the preshared key `ours` on the tunnel's side
    /// and `theirs` on its own (a fresh protocol state there).
    pub fn set_preshared_keys(
        &mut self,
        p: PeerIx,
        ours: Option<[u8; 32]>,
        theirs: Option<[u8; 32]>,
    ) {
        let peer = &mut self.peers[p];
        let mut config = peer.config.clone().expect("a registered peer");
        config.preshared_key = ours.map(wgplane::keys::PresharedKey::from_bytes);
        self.tunnels[peer.tunnel]
            .engine
            .upsert_peer(config.clone(), 0)
            .unwrap();
        peer.config = Some(config);
        let server_public = PublicKey::from(&self.tunnels[peer.tunnel].secret);
        let index = 0x00f0_0000 + p as u32;
        peer.tunn = Tunn::new(
            peer.secret.clone(),
            server_public,
            theirs,
            None,
            index,
            None,
        );
    }

    /// A boringtun peer that dials `tunnel` with `secret`, registered or not.
    pub fn unregistered_peer(
        &mut self,
        name: &'static str,
        tunnel: TunnelIx,
        secret: StaticSecret,
    ) -> PeerIx {
        let server_public = PublicKey::from(&self.tunnels[tunnel].secret);
        let index = 0x00f0_0000 + self.peers.len() as u32;
        let tunn = Tunn::new(secret.clone(), server_public, None, None, index, None);
        self.next_port += 1;
        self.peers.push(SimPeer {
            name,
            addr: SocketAddr::new(ip("203.0.113.2"), self.next_port),
            secret,
            tunn,
            tunnel,
            inbox: Vec::new(),
            up: true,
            config: None,
        });
        self.peers.len() - 1
    }

    pub fn public_key(&self, p: PeerIx) -> [u8; 32] {
        *PublicKey::from(&self.peers[p].secret).as_bytes()
    }

    pub fn set_egress(&mut self, tunnel: TunnelIx, pool: &str, gateways: &[PeerIx]) {
        let gateways = gateways.iter().map(|&g| self.public_key(g)).collect();
        self.tunnels[tunnel].engine.set_egress(vec![EgressConfig {
            pool: net(pool),
            gateways,
        }]);
    }

    /// Peer `p` starts a handshake with its tunnel; the network runs until idle.
    pub fn connect(&mut self, p: PeerIx) {
        let mut buf = vec![0u8; 2048];
        let peer = &mut self.peers[p];
        let to = self.tunnels[peer.tunnel].addr;
        if let TunnResult::WriteToNetwork(d) = peer.tunn.format_handshake_initiation(&mut buf, true)
        {
            self.wire.push_back((peer.addr, to, d.to_vec()));
        }
        self.run();
    }

    /// Peer `p` sends an inner packet through its tunnel.
    pub fn send(&mut self, p: PeerIx, packet: &[u8]) {
        let mut buf = vec![0u8; packet.len() + 256];
        let peer = &mut self.peers[p];
        let to = self.tunnels[peer.tunnel].addr;
        if let TunnResult::WriteToNetwork(d) = peer.tunn.encapsulate(packet, &mut buf) {
            self.wire.push_back((peer.addr, to, d.to_vec()));
        }
        self.run();
    }

    /// Peer `p` sends a packet from `src` to `dst`.
    pub fn send_ip(&mut self, p: PeerIx, src: &str, dst: &str) {
        self.send(p, &ip_packet(ip(src), ip(dst), 16));
    }

    /// Injects a raw datagram from `from` to `tunnel`.
    pub fn inject(&mut self, from: SocketAddr, tunnel: TunnelIx, datagram: &[u8]) {
        let to = self.tunnels[tunnel].addr;
        self.wire.push_back((from, to, datagram.to_vec()));
        self.run();
    }

    /// Runs timers of every engine once.
    pub fn tick(&mut self) {
        let mut out = Vec::new();
        for t in &mut self.tunnels {
            let mut sink = Recorder {
                from: t.addr,
                out: &mut out,
                local: &mut t.local,
                accept_local: true,
            };
            t.engine.handle_timers(self.now, &mut sink);
        }
        for (from, to, d) in out {
            self.sent_by_engines.push((to, d.len()));
            self.wire.push_back((from, to, d));
        }
        self.run();
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Delivers datagrams until none are in flight (bounded against loops).
    pub fn run(&mut self) {
        for _ in 0..10_000 {
            let Some((from, to, datagram)) = self.wire.pop_front() else {
                return;
            };
            if let Some(t) = self.tunnels.iter_mut().find(|t| t.addr == to) {
                let mut out = Vec::new();
                let mut sink = Recorder {
                    from: t.addr,
                    out: &mut out,
                    local: &mut t.local,
                    accept_local: true,
                };
                t.engine
                    .handle_datagram(from, &datagram, self.now, &mut sink);
                for (from, to, d) in out {
                    self.sent_by_engines.push((to, d.len()));
                    self.wire.push_back((from, to, d));
                }
            } else if let Some(p) = self.peers.iter_mut().find(|p| p.addr == to) {
                if !p.up {
                    continue;
                }
                let mut buf = vec![0u8; 65_600];
                let mut result = p.tunn.decapsulate(Some(from.ip()), &datagram, &mut buf);
                loop {
                    match result {
                        TunnResult::WriteToNetwork(d) => {
                            let d = d.to_vec();
                            self.wire.push_back((p.addr, from, d));
                            result = p.tunn.decapsulate(None, &[], &mut buf);
                        }
                        TunnResult::WriteToTunnelV4(d, _) | TunnResult::WriteToTunnelV6(d, _) => {
                            p.inbox.push(d.to_vec());
                            break;
                        }
                        _ => break,
                    }
                }
            } else {
                self.lost += 1;
            }
        }
        panic!("datagrams still in flight after 10000 deliveries: a forwarding loop");
    }

    /// Inner packets received by `p` since the last call.
    pub fn take_inbox(&mut self, p: PeerIx) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.peers[p].inbox)
    }

    /// Total of all inboxes.
    pub fn delivered(&self) -> usize {
        self.peers.iter().map(|p| p.inbox.len()).sum()
    }
}

/// Source and destination of an inner packet.
pub fn addrs(packet: &[u8]) -> (IpAddr, IpAddr) {
    let h = wgplane::core::packet::parse(packet).unwrap();
    (h.src, h.dst)
}
