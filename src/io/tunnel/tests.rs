//! The tunnel task's parts, on loopback and in a private network namespace.

use super::host::{self, HostLink, HostOut};
use super::read::{self, receive, Turns};
use super::sink::TunnelSink;
use super::{HELD, RECV_BATCH};
use crate::core::engine::TunnelEngine;
use crate::io::defer::{Deferred, Step};
use crate::io::sendbatch::SendBatch;
use crate::io::udp::TunnelSocket;
use boringtun::x25519::StaticSecret;
use std::time::Instant;
use tokio::sync::mpsc;

/// Written buffers are kept for reuse up to a count and a total size:
/// large packets (a router's 64 KiB ones) cannot pin more than that.
#[test]
fn the_host_buffers_kept_for_reuse_are_bounded_in_bytes() {
    let mut out = HostOut::default();
    for size in [1_400, 65_000] {
        for _ in 0..host::HOST_SPARE {
            assert!(out.push(&vec![0x45; size]));
        }
        out.recycle();
        let held: usize = out.spare.iter().map(Vec::capacity).sum();
        assert_eq!(held, out.spare_bytes);
        assert!(held <= host::HOST_SPARE_BYTES, "{size}: {held}");
    }
    assert!(out.spare.len() < 100, "few large buffers kept");
    // Small packets reuse what is kept, and refill the pool up to its count.
    for _ in 0..host::HOST_SPARE {
        assert!(out.push(&[0x45; 100]));
    }
    assert_eq!(out.spare_bytes, 0);
    out.recycle();
    assert!(out.spare_bytes <= host::HOST_SPARE_BYTES);
}

/// A loopback socket set up as a tunnel's is.
async fn tunnel_socket() -> (TunnelSocket, quinn_udp::UdpSocketState) {
    let socket = crate::io::udp::bind("127.0.0.1:0".parse().expect("address"))
        .and_then(crate::io::udp::register)
        .expect("bind loopback");
    let state = crate::io::udp::batching_state(socket.get_ref()).expect("quinn-udp state");
    (socket, state)
}

/// The tunnel's key in these tests.
fn server_key() -> StaticSecret {
    StaticSecret::from([7u8; 32])
}

/// A simulated peer on a loopback socket of its own, provisioned in `engine`
/// with one address.
struct LoopbackPeer {
    client: crate::core::harness::MemoryClient,
    socket: std::net::UdpSocket,
}

impl LoopbackPeer {
    fn new(engine: &mut TunnelEngine, address: [u8; 4], index: u32) -> Self {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        socket.set_nonblocking(true).expect("non-blocking");
        let server = boringtun::x25519::PublicKey::from(&server_key());
        let at = socket.local_addr().expect("address");
        let client = crate::core::harness::MemoryClient::new(&server, index * 100, at);
        let address = ipnet::IpNet::from(std::net::IpAddr::from(address));
        client.register(engine, &[address], index);
        LoopbackPeer { client, socket }
    }

    /// Sends a fresh handshake initiation to `tunnel`.
    fn initiate(&mut self, tunnel: std::net::SocketAddr) {
        let initiation = self.client.initiation().expect("initiation");
        self.socket.send_to(&initiation, tunnel).expect("send");
    }

    /// Sends `packet` to `tunnel`, in its session.
    fn send(&mut self, packet: &[u8], tunnel: std::net::SocketAddr) {
        let data = self.client.encrypt(packet).expect("a session");
        self.socket.send_to(&data, tunnel).expect("send");
    }

    /// Whether a datagram waits on the peer's socket (it is consumed).
    fn has_datagram(&self) -> bool {
        let mut buf = [0u8; 2048];
        match self.socket.recv_from(&mut buf) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("receive: {e}"),
        }
    }
}

/// A wake-up's read, as the task's: the data to the engine, the
/// initiations held (returned).
fn wake_up(
    socket: &TunnelSocket,
    state: &quinn_udp::UdpSocketState,
    engine: &mut TunnelEngine,
    now: Instant,
    tx: &mut SendBatch,
    host: Option<&mut HostOut>,
) -> Deferred {
    let mut held = Deferred::new(HELD);
    let mut sink = TunnelSink { tx, host };
    receive(socket, state, engine, now, &mut sink, &mut held);
    held
}

/// Host packets are taken up to the limit, without waiting, and their
/// buffers go back to the device's reader.
#[tokio::test]
async fn host_packets_are_taken_up_to_the_limit() {
    use crate::core::packet::build::ip_packet;
    use crate::core::policy::DropReason;
    let (to_tunnel, from_host) = mpsc::channel(16);
    let (recycle_to, mut recycled) = mpsc::channel(16);
    for _ in 0..5 {
        // To nobody in this tunnel: each is read and counted as no_route.
        let packet = ip_packet([172, 18, 0, 5].into(), [10, 100, 9, 9].into(), 8);
        to_tunnel.try_send(packet).expect("room");
    }
    let mut engine = TunnelEngine::new(server_key(), vec!["10.100.0.1".parse().expect("address")]);
    let mut tx = SendBatch::new(1, false);
    let mut sink = TunnelSink {
        tx: &mut tx,
        host: None,
    };
    let (mut packets, recycle_to) = (Some(from_host), Some(recycle_to));
    let mut take_three = |engine: &mut TunnelEngine| {
        let now = Instant::now();
        host::take_host_packets(&mut packets, &recycle_to, engine, now, &mut sink, 3);
    };
    take_three(&mut engine);
    assert_eq!(engine.stats().dropped(DropReason::NoRoute), 3);
    let mut back = 0;
    while recycled.try_recv().is_ok() {
        back += 1;
    }
    assert_eq!(back, 3, "every buffer taken goes back");
    take_three(&mut engine);
    assert_eq!(
        engine.stats().dropped(DropReason::NoRoute),
        5,
        "the rest, and no wait"
    );
}

/// A wake-up for the socket takes the host's queued packets too, even when it
/// leaves no backlog: under a steady flow the socket may be ready again at
/// every pass of the task, whose select looks at it first, so the host's
/// packets must not wait for a quiet socket.
#[tokio::test]
async fn a_socket_wake_up_takes_the_hosts_packets_too() {
    use crate::core::packet::build::ip_packet;
    use crate::core::policy::DropReason;
    let (socket, state) = tunnel_socket().await;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    let tunnel = socket.get_ref().local_addr().expect("address");
    // One datagram, far from a backlog: not WireGuard, counted and dropped.
    sender.send_to(&[0xee; 40], tunnel).expect("send");
    socket.readable().await.expect("readable").retain_ready();
    let (to_tunnel, from_host) = mpsc::channel(16);
    for _ in 0..5 {
        // To nobody in this tunnel: each is taken and counted as no_route.
        let packet = ip_packet([172, 18, 0, 5].into(), [10, 100, 9, 9].into(), 8);
        to_tunnel.try_send(packet).expect("room");
    }
    let mut host = HostLink {
        packets: Some(from_host),
        recycle: None,
        device: None,
        out: HostOut::default(),
    };
    let mut engine = TunnelEngine::new(server_key(), vec!["10.100.0.1".parse().expect("address")]);
    let mut tx = SendBatch::new(1, false);
    let mut failures = super::SendFailures::default();
    let io = read::Io {
        socket: &socket,
        udp: &state,
        tx: &mut tx,
        send_failures: &mut failures,
    };
    let mut held = Deferred::new(HELD);
    let backlog = read::wake_up(io, &mut engine, &mut host, &mut held, Instant::now()).await;
    assert!(!backlog);
    let stats = engine.stats();
    assert_eq!(stats.rx_datagrams, 1);
    assert_eq!(stats.dropped(DropReason::NoRoute), 5, "the host's packets");
}

/// A socket holding more than one turn's worth says so, and the rest is read
/// on the next turns: nothing is left behind, nothing read twice.
#[tokio::test]
async fn a_full_turn_reports_a_backlog_and_the_next_turn_reads_the_rest() {
    let (socket, state) = tunnel_socket().await;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    let queued = RECV_BATCH + 36;
    for _ in 0..queued {
        // Not WireGuard: each is read, counted and dropped as malformed.
        sender
            .send_to(&[0xee; 40], socket.get_ref().local_addr().expect("address"))
            .expect("send on loopback");
    }
    socket.readable().await.expect("readable").retain_ready();
    let mut engine = TunnelEngine::new(
        StaticSecret::from([7u8; 32]),
        vec!["10.100.0.1".parse().expect("address")],
    );
    let mut tx = SendBatch::new(1, false);
    let mut sink = TunnelSink {
        tx: &mut tx,
        host: None,
    };
    let mut turns = 0;
    loop {
        let before = engine.stats().rx_datagrams;
        let backlog = receive(
            &socket,
            &state,
            &mut engine,
            Instant::now(),
            &mut sink,
            &mut Deferred::new(HELD),
        );
        let read = engine.stats().rx_datagrams - before;
        assert!(read <= RECV_BATCH as u64, "one turn read {read}");
        turns += 1;
        if !backlog {
            break;
        }
        assert!(turns < queued, "a backlog that never ends");
    }
    assert!(turns >= 2, "{queued} datagrams read in one turn");
    assert_eq!(engine.stats().rx_datagrams, queued as u64);
}

/// Data read in the same wake-up as handshake initiations leaves before they
/// are handled, and data that arrives while they are goes before the next
/// turn: the gateway has the phone's packets while the routers' handshakes
/// wait, one turn, and one handshake, at a time.
#[tokio::test]
async fn data_goes_before_the_initiations_and_between_their_turns() {
    use crate::core::engine::EgressConfig;
    use crate::core::packet::build::ip_packet;
    use boringtun::noise::TunnResult;
    use std::net::IpAddr;
    use std::time::Duration;

    let (socket, state) = tunnel_socket().await;
    let tunnel = socket.get_ref().local_addr().expect("address");
    let mut engine = TunnelEngine::new(server_key(), vec![IpAddr::from([10, 100, 0, 1])]);
    let now = Instant::now();
    let mut gateway = LoopbackPeer::new(&mut engine, [10, 100, 0, 40], 1);
    let mut phone = LoopbackPeer::new(&mut engine, [10, 200, 0, 2], 2);
    let mut routers = [
        LoopbackPeer::new(&mut engine, [10, 100, 1, 2], 3),
        LoopbackPeer::new(&mut engine, [10, 100, 1, 3], 4),
    ];
    engine.set_egress(vec![EgressConfig {
        pool: "10.200.0.0/24".parse().expect("prefix"),
        gateways: vec![*gateway.client.public_key.as_bytes()],
    }]);
    assert!(gateway.client.handshake(&mut engine, now));
    assert!(phone.client.handshake(&mut engine, now));

    // Queued: both routers' initiations, then the phone's packet to the internet.
    for router in &mut routers {
        router.initiate(tunnel);
    }
    let packet = ip_packet(
        IpAddr::from([10, 200, 0, 2]),
        IpAddr::from([198, 18, 0, 2]),
        100,
    );
    phone.send(&packet, tunnel);
    socket.readable().await.expect("readable").retain_ready();

    let mut tx = SendBatch::new(1, false);
    let before = engine.stats().rx_datagrams;
    let mut held = wake_up(&socket, &state, &mut engine, now, &mut tx, None);
    assert_eq!(engine.stats().rx_datagrams - before, 1, "the data");
    assert!(!held.is_empty(), "the initiations wait");

    let mut failures = super::SendFailures::default();
    let mut turns = Turns {
        socket: &socket,
        udp: &state,
        engine: &mut engine,
        tx: &mut tx,
        host: None,
        device: None,
        send_failures: &mut failures,
        // Turns long enough for both: a Diffie-Hellman handshake ends its
        // turn by itself.
        length: Duration::from_secs(60),
        now,
        backlog: false,
    };
    let mut initiations = 0;
    held.release_in_turns(|step| {
        let initiation = matches!(step, Step::Initiation(..));
        if initiation {
            initiations += 1;
            assert!(
                gateway.has_datagram(),
                "initiation {initiations}: the phone's packet waited for a handshake"
            );
            if initiations == 1 {
                assert!(!routers[0].has_datagram(), "not answered yet");
            } else {
                assert!(
                    routers[0].has_datagram(),
                    "the first turn's answer left before the second turn"
                );
            }
        }
        let goes_on = turns.step(step);
        if initiation && initiations == 1 {
            // Arrives during the first turn.
            phone.send(&packet, tunnel);
        }
        goes_on
    })
    .await;
    assert_eq!(initiations, 2);
    assert_eq!(engine.stats().rx_datagrams - before, 4, "all four read");
    failures.socket += tx.flush(socket.get_ref(), &state);
    assert_eq!(failures, super::SendFailures::default());
    let mut buf = vec![0u8; 2048];
    let (len, _) = routers[1].socket.recv_from(&mut buf).expect("the response");
    let response = buf[..len].to_vec();
    let client = &mut routers[1].client;
    assert!(matches!(
        client.tunn.decapsulate(None, &response, &mut buf),
        TunnResult::WriteToNetwork(_)
    ));
    assert!(client.tunn.time_since_last_handshake().is_some());
}

/// Initiations beyond what the tunnel holds for its turns are dropped and
/// counted as such, not handled there and then: a storm's GRO trains could
/// otherwise put thousands of them into one wake-up, ahead of the data.
#[tokio::test]
async fn initiations_beyond_the_held_ones_are_dropped_unanswered() {
    use crate::core::policy::DropReason;
    use std::net::IpAddr;

    let (socket, state) = tunnel_socket().await;
    let tunnel = socket.get_ref().local_addr().expect("address");
    let mut engine = TunnelEngine::new(server_key(), vec![IpAddr::from([10, 100, 0, 1])]);
    let mut router = LoopbackPeer::new(&mut engine, [10, 100, 1, 2], 1);
    for _ in 0..5 {
        router.initiate(tunnel);
    }
    socket.readable().await.expect("readable").retain_ready();
    let mut tx = SendBatch::new(1, false);
    let mut held = Deferred::new(2);
    let mut sink = TunnelSink {
        tx: &mut tx,
        host: None,
    };
    receive(
        &socket,
        &state,
        &mut engine,
        Instant::now(),
        &mut sink,
        &mut held,
    );
    let stats = engine.stats();
    assert_eq!(stats.dropped(DropReason::HandshakeQueueFull), 3);
    assert_eq!(
        stats.rx_datagrams, 3,
        "the dropped ones are counted as received"
    );
    assert_eq!(stats.admitted_handshakes, 0, "no work for them");
    assert!(!held.is_empty());
    tx.flush(socket.get_ref(), &state);
    assert!(!router.has_datagram(), "no answer to any");
}

/// TUN mode: packets for the host leave between handshake turns too, as
/// packets for peers do, instead of waiting until the last turn (and
/// filling the host batch over several turns). Runs in a private network
/// namespace, with its own TUN device.
#[test]
fn host_packets_leave_between_handshake_turns() {
    let test = "host_packets_leave_between_handshake_turns";
    crate::io::testnet::in_private_netns(test, 65_536, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(host_packets_between_turns())
    });
}

async fn host_packets_between_turns() {
    use crate::core::packet::build::ip_packet;
    use crate::io::tun::HostDevice;
    use ipnet::IpNet;
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::{IpAddr, Ipv4Addr, UdpSocket};
    use std::time::Duration;

    let (socket, state) = tunnel_socket().await;
    let tunnel = socket.get_ref().local_addr().expect("address");
    let device = HostDevice::open("wgpturn0", 1420).expect("TUN device");
    let (to_tunnel, _from_host) = mpsc::channel(8);
    let server_ip = Ipv4Addr::new(10, 100, 0, 1);
    let subnet = "10.100.0.0/16".parse().expect("subnet");
    device
        .add_tenant(server_ip, subnet, to_tunnel)
        .expect("tenant addresses");
    // What the host receives: the test packets' protocol (253), raw.
    let host = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(253))).expect("raw");
    host.set_nonblocking(true).expect("non-blocking");
    let host: UdpSocket = host.into();
    let host_has = |expected: usize| {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        // The device's writes are delivered by the time they return; a
        // moment for the stack all the same.
        std::thread::sleep(Duration::from_millis(20));
        while host.recv(&mut buf).is_ok() {
            n += 1;
        }
        assert_eq!(n, expected, "packets the host got");
    };

    let mut engine = TunnelEngine::new(server_key(), vec![IpAddr::V4(server_ip)]);
    engine.set_host_sources(&[IpNet::V4(subnet)]);
    let now = Instant::now();
    let mut router = LoopbackPeer::new(&mut engine, [10, 100, 1, 2], 1);
    let mut strangers = [
        LoopbackPeer::new(&mut engine, [10, 100, 1, 3], 2),
        LoopbackPeer::new(&mut engine, [10, 100, 1, 4], 3),
    ];
    assert!(router.client.handshake(&mut engine, now));

    // Two initiations, then the router's packet for the host.
    for stranger in &mut strangers {
        stranger.initiate(tunnel);
    }
    let packet = ip_packet(IpAddr::from([10, 100, 1, 2]), IpAddr::V4(server_ip), 100);
    router.send(&packet, tunnel);
    socket.readable().await.expect("readable").retain_ready();

    let mut tx = SendBatch::new(1, false);
    let mut out = HostOut::default();
    let mut held = wake_up(&socket, &state, &mut engine, now, &mut tx, Some(&mut out));
    assert!(!held.is_empty(), "the initiations wait");
    let dev = device.device();
    let mut failures = super::SendFailures::default();
    let mut turns = Turns {
        socket: &socket,
        udp: &state,
        engine: &mut engine,
        tx: &mut tx,
        host: Some(&mut out),
        device: Some(&dev),
        send_failures: &mut failures,
        length: Duration::from_secs(60),
        now,
        backlog: false,
    };
    let mut initiations = 0;
    held.release_in_turns(|step| {
        if matches!(step, Step::Initiation(..)) {
            initiations += 1;
            // The first packet before the first turn, the second (sent
            // during the first turn) before the second.
            host_has(1);
        }
        let goes_on = turns.step(step);
        if initiations == 1 && !goes_on {
            router.send(&packet, tunnel);
        }
        goes_on
    })
    .await;
    assert_eq!(initiations, 2);
    assert_eq!(failures, super::SendFailures::default());
    assert_eq!(engine.stats().forwarded_local, 2);
}
