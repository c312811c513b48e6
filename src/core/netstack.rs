//! The tunnel's own address, served in userspace: smoltcp on an in-memory device.
//!
//! Packets the router delivers locally (rule 4) go in with [`LocalStack::receive`];
//! what the stack sends comes out of [`LocalStack::poll_transmit`] and is routed
//! like a packet from the host. It answers ICMP echo by itself (router health
//! checks: ping, `/tool netwatch`) and opens TCP connections to peers for management
//! forwarding. No privileges, no TUN, no kernel routes. Time comes in as `now`; no
//! socket or clock is touched here.
//!
//! Left out: listening sockets (nothing inside a tunnel may open a connection to the
//! appliance except ping; UDP is answered "port unreachable", TCP with a reset),
//! and IPv6 reassembly (the engine keeps IPv6 fragments out; IPv4 datagrams
//! of up to 4 KiB are put together, one at a time). IPv6 is answered only when
//! the runtime adds an address ([`LocalStack::with_ipv6`]); management
//! connections are IPv4.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Packet};

/// MTU of the inner packets the stack sends (the tunnels' MTU).
pub const MTU: usize = 1420;

/// Packets waiting for the stack; more are dropped (a flood must not grow memory).
const RX_QUEUE: usize = 256;

/// Send and receive buffer of each TCP connection. It is also the most either side
/// may send in one burst, so it stays below what a default UDP socket buffer
/// absorbs (about 200 KiB); 128 KiB still carries several MB/s at 20 ms RTT.
const TCP_BUFFER: usize = 128 * 1024;

/// A connection that gets no answer for this long is given up: while
/// connecting, while data waits to be acknowledged, and while idle (see
/// [`TCP_KEEP_ALIVE`]).
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// An idle connection probes the router this often. Shorter than
/// [`TCP_TIMEOUT`] (three probes fit in it): smoltcp counts the timeout from the
/// router's last segment, so without probes an idle connection to a live router
/// would be given up too, and with them a router that vanished is noticed.
const TCP_KEEP_ALIVE: Duration = Duration::from_secs(3);

/// How long the stack keeps the fragments of an IPv4 datagram it has not all
/// of. It puts one datagram together at a time: a stray fragment blocks the
/// next large ping this long at most, where smoltcp's own default is a minute.
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest IPv4 payload the stack puts together from fragments: its reply
/// (an echo's is as large) must fit smoltcp's 4 KiB fragmenter buffer,
/// header included. smoltcp's own reassembly buffer grows to whatever offset
/// a fragment names (with `alloc`, its size feature is not a bound), so the
/// engine keeps out every fragment that reaches beyond this.
pub const REASSEMBLY_MAX_PAYLOAD: usize = 4096 - 20;

/// Upper bound of egress passes per poll (see [`LocalStack::poll`]).
const MAX_EGRESS_PASSES: usize = 1024;

/// Identifies a TCP connection of the stack.
pub type ConnId = u32;

/// Where a TCP connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// SYN sent, no answer yet.
    Connecting,
    /// Data flows.
    Open,
    /// The peer closed its side (or both are closing); what it sent may still be
    /// read, and our side may still send until we close.
    PeerClosed,
    /// Gone: closed, reset, refused or timed out.
    Closed,
}

/// Why a connection call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    /// No such connection.
    #[error("no such connection")]
    NoConnection,
    /// smoltcp refused to connect (bad address).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The stack already carries as many connections as it may.
    #[error("too many open connections (at most {MAX_CONNECTIONS})")]
    TooMany,
}

/// Connections one tunnel's stack carries at once (each has two 128 KiB
/// buffers): far more than management of a tenant's routers needs, and a bound
/// on what forwards can make it allocate.
pub const MAX_CONNECTIONS: usize = 256;

/// The local ports connections come from.
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 49152..=u16::MAX;

/// Packet buffers kept for reuse in each direction, so that the packets the
/// stack takes and sends cost no allocation once it has run a while; beyond
/// these, and buffers grown past [`SPARE_CAPACITY`], are freed.
const SPARE_BUFFERS: usize = 16;

/// Largest buffer kept for reuse: a full-size packet of the tunnel fits.
const SPARE_CAPACITY: usize = 2 * MTU;

/// Keeps `buffer` in `spare` for reuse, if there is room and it is not oversized.
fn keep(spare: &mut Vec<Vec<u8>>, buffer: Vec<u8>) {
    if spare.len() < SPARE_BUFFERS && buffer.capacity() <= SPARE_CAPACITY {
        spare.push(buffer);
    }
}

/// An in-memory IP device: queues in, queues out, and their spare buffers.
#[derive(Default)]
pub(crate) struct Queues {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// Buffers of packets the stack has read, for the next ones handed in.
    rx_spare: Vec<Vec<u8>>,
    /// Buffers of sent packets given back ([`LocalStack::recycle`]).
    tx_spare: Vec<Vec<u8>>,
}

impl Device for Queues {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken {
                packet,
                spare: &mut self.rx_spare,
            },
            TxToken {
                queue: &mut self.tx,
                spare: &mut self.tx_spare,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            queue: &mut self.tx,
            spare: &mut self.tx_spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

pub(crate) struct RxToken<'a> {
    packet: Vec<u8>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.packet);
        keep(self.spare, self.packet);
        r
    }
}

pub(crate) struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = self.spare.pop().unwrap_or_default();
        packet.clear();
        packet.resize(len, 0);
        let r = f(&mut packet);
        self.queue.push_back(packet);
        r
    }
}

/// smoltcp serving one tunnel's server address.
pub struct LocalStack {
    iface: Interface,
    device: Queues,
    sockets: SocketSet<'static>,
    epoch: Instant,
    address: Ipv4Addr,
    conns: BTreeMap<ConnId, SocketHandle>,
    /// Aborted connections whose reset is not sent yet: smoltcp sends it at
    /// the next poll, and only for a socket still in the set.
    dying: Vec<SocketHandle>,
    next_conn: ConnId,
    next_port: u16,
    polls: u64,
}

impl LocalStack {
    /// Adds an IPv6 address (`/64` on-link), answered like the IPv4 one.
    pub fn with_ipv6(mut self, address: std::net::Ipv6Addr) -> Self {
        self.iface.update_ip_addrs(|addrs| {
            // Two addresses fit (smoltcp's default capacity): IPv4 and this one.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(address), 64));
        });
        let _ = self.iface.routes_mut().add_default_ipv6_route(address);
        self
    }

    /// Whether the stack takes this fragment to put together: IPv4 only, and
    /// only within [`REASSEMBLY_MAX_PAYLOAD`] of its datagram's start.
    pub fn reassembles(packet: &[u8]) -> bool {
        let v4 = packet.first().is_some_and(|b| b >> 4 == 4);
        v4 && Ipv4Packet::new_checked(packet).is_ok_and(|p| {
            usize::from(p.frag_offset()) + p.payload().len() <= REASSEMBLY_MAX_PAYLOAD
        })
    }

    /// A stack owning `address` in the tunnel subnet `address/prefix_len`.
    pub fn new(address: Ipv4Addr, prefix_len: u8, now: Instant) -> Self {
        let mut device = Queues::default();
        let config = Config::new(HardwareAddress::Ip);
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Capacity is at least one address; the push cannot fail.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(address), prefix_len));
        });
        // Peers also own prefixes outside the subnet (LANs behind routers): answer
        // them through the tunnel too. On an IP device the gateway is not used.
        let _ = iface.routes_mut().add_default_ipv4_route(address);
        iface.set_reassembly_timeout(smoltcp::time::Duration::from_millis(
            REASSEMBLY_TIMEOUT.as_millis() as u64,
        ));
        Self {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            epoch: now,
            address,
            conns: BTreeMap::new(),
            dying: Vec::new(),
            next_conn: 1,
            next_port: 49152,
            polls: 0,
        }
    }

    fn at(&self, now: Instant) -> smoltcp::time::Instant {
        let d = now.saturating_duration_since(self.epoch);
        smoltcp::time::Instant::from_micros(d.as_micros() as i64)
    }

    /// The stack's address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Hands a packet addressed to the stack over; it is processed at the next
    /// poll. False when the input queue is full and the packet was refused.
    #[must_use]
    pub fn receive(&mut self, packet: &[u8]) -> bool {
        if self.device.rx.len() >= RX_QUEUE {
            return false;
        }
        let mut buffer = self.device.rx_spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(packet);
        self.device.rx.push_back(buffer);
        true
    }

    /// True when packets wait for the next poll.
    pub fn has_input(&self) -> bool {
        !self.device.rx.is_empty()
    }

    /// Polls run so far: what the packet path costs the stack.
    pub fn polls(&self) -> u64 {
        self.polls
    }

    /// Runs the stack: processes input, timers and socket output, then forgets
    /// the connections that are fully closed (see [`LocalStack::reap`]).
    pub fn poll(&mut self, now: Instant) {
        self.polls += 1;
        let at = self.at(now);
        self.iface.poll(at, &mut self.device, &mut self.sockets);
        // One egress pass sends at most one segment per socket: repeat while the
        // sockets have more to send. Bounded by the send buffers (256 KiB in
        // 1380-byte segments is under 200 per connection); the cap is a guard.
        for _ in 0..MAX_EGRESS_PASSES {
            if matches!(
                self.iface
                    .poll_egress(at, &mut self.device, &mut self.sockets),
                PollResult::None
            ) {
                break;
            }
        }
        self.bury();
        self.reap();
    }

    /// When the stack next needs a poll, if it has timers running.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let at = self.at(now);
        self.iface
            .poll_delay(at, &self.sockets)
            .map(|d| now + Duration::from_micros(d.total_micros()))
    }

    /// The next packet the stack wants to send. Give it back with
    /// [`LocalStack::recycle`] once it is sent.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.device.tx.pop_front()
    }

    /// Takes a sent packet's buffer back for the stack's next packets.
    pub fn recycle(&mut self, packet: Vec<u8>) {
        keep(&mut self.device.tx_spare, packet);
    }

    /// Opens a TCP connection to `remote` from the stack's address.
    pub fn connect(&mut self, remote: SocketAddrV4, now: Instant) -> Result<ConnId, StackError> {
        // Closed connections nobody asked about any more must not count.
        self.reap();
        if self.conns.len() >= MAX_CONNECTIONS {
            return Err(StackError::TooMany);
        }
        let port = self.next_local_port().ok_or(StackError::TooMany)?;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_timeout(Some(smoltcp::time::Duration::from_millis(
            TCP_TIMEOUT.as_millis() as u64,
        )));
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_millis(
            TCP_KEEP_ALIVE.as_millis() as u64,
        )));
        socket.set_nagle_enabled(false);
        // Tunnels lose packets when a socket buffer overflows; without congestion
        // control a full window would be sent as one burst again and again.
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        let remote = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        let local = IpEndpoint::new(IpAddress::Ipv4(self.address), port);
        socket
            .connect(self.iface.context(), remote, local)
            .map_err(|e| StackError::Connect(e.to_string()))?;
        let handle = self.sockets.add(socket);
        let id = self.next_conn;
        self.next_conn = self.next_conn.wrapping_add(1).max(1);
        self.conns.insert(id, handle);
        self.poll(now);
        Ok(id)
    }

    /// The next local port no connection uses, going round the range once at most.
    fn next_local_port(&mut self) -> Option<u16> {
        let in_use: std::collections::BTreeSet<u16> = self
            .conns
            .values()
            .filter_map(|h| self.sockets.get::<tcp::Socket>(*h).local_endpoint())
            .map(|e| e.port)
            .collect();
        for _ in LOCAL_PORTS {
            let port = self.next_port;
            self.next_port = if self.next_port == *LOCAL_PORTS.end() {
                *LOCAL_PORTS.start()
            } else {
                self.next_port + 1
            };
            if !in_use.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn socket(&mut self, id: ConnId) -> Result<&mut tcp::Socket<'static>, StackError> {
        let handle = *self.conns.get(&id).ok_or(StackError::NoConnection)?;
        Ok(self.sockets.get_mut::<tcp::Socket>(handle))
    }

    /// Where connection `id` is.
    pub fn state(&mut self, id: ConnId) -> ConnState {
        let Ok(s) = self.socket(id) else {
            return ConnState::Closed;
        };
        match s.state() {
            tcp::State::SynSent | tcp::State::SynReceived => ConnState::Connecting,
            tcp::State::Established | tcp::State::FinWait1 | tcp::State::FinWait2 => {
                ConnState::Open
            }
            tcp::State::CloseWait
            | tcp::State::LastAck
            | tcp::State::Closing
            | tcp::State::TimeWait => ConnState::PeerClosed,
            tcp::State::Closed | tcp::State::Listen => ConnState::Closed,
        }
    }

    /// Queues as much of `data` as fits; returns how much.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, StackError> {
        let s = self.socket(id)?;
        if !s.may_send() {
            return Ok(0);
        }
        Ok(s.send_slice(data).unwrap_or(0))
    }

    /// Reads received bytes into `buf`; 0 when nothing is waiting.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<usize, StackError> {
        let s = self.socket(id)?;
        if !s.can_recv() {
            return Ok(0);
        }
        Ok(s.recv_slice(buf).unwrap_or(0))
    }

    /// True when received bytes wait to be read.
    pub fn has_data(&mut self, id: ConnId) -> bool {
        self.socket(id).is_ok_and(|s| s.can_recv())
    }

    /// Closes our side once everything queued is sent (FIN).
    pub fn close(&mut self, id: ConnId) {
        if let Ok(s) = self.socket(id) {
            s.close();
        }
    }

    /// Resets the connection and forgets it: its id answers
    /// [`ConnState::Closed`] at once, and the reset goes out at the next poll.
    pub fn abort(&mut self, id: ConnId) {
        if let Some(handle) = self.conns.remove(&id) {
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
            self.dying.push(handle);
        }
    }

    /// Forgets connections that are closed (and whose received bytes were
    /// read); returns how many. Their ids then answer [`ConnState::Closed`].
    /// TIME-WAIT counts as closed: it only answers a retransmitted FIN, and
    /// it would hold a connection's place and buffers for 10 s after every
    /// short connection.
    pub fn reap(&mut self) -> usize {
        let Self { conns, sockets, .. } = self;
        let before = conns.len();
        conns.retain(|_, h| {
            let s = sockets.get::<tcp::Socket>(*h);
            let closed =
                matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) && !s.can_recv();
            if closed {
                sockets.remove(*h);
            }
            !closed
        });
        before - conns.len()
    }

    /// Removes the aborted sockets whose reset has gone (smoltcp forgets the
    /// peer once it sent it).
    fn bury(&mut self) {
        let Self { dying, sockets, .. } = self;
        dying.retain(|h| {
            let sent = sockets.get::<tcp::Socket>(*h).remote_endpoint().is_none();
            if sent {
                sockets.remove(*h);
            }
            !sent
        });
    }

    /// Connections the stack carries, closing ones included until they are
    /// fully closed.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet;
    use smoltcp::wire::{Icmpv4Packet, Ipv4Packet};

    /// Only IPv4 fragments within the reassembly bound go to the stack.
    #[test]
    fn fragments_taken_are_ipv4_and_near_the_start() {
        use std::net::IpAddr;
        let fragment = |src: IpAddr, dst: IpAddr, offset: u16| {
            let mut p = packet::build::ip_packet(src, dst, 64);
            if p[0] >> 4 == 4 {
                let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
                ip.set_more_frags(true);
                ip.set_frag_offset(offset);
            }
            p
        };
        let (a, b) = (IpAddr::from([10, 100, 1, 1]), IpAddr::from([10, 100, 0, 1]));
        assert!(LocalStack::reassembles(&fragment(a, b, 0)));
        let last = (REASSEMBLY_MAX_PAYLOAD - 64) as u16 & !7;
        assert!(LocalStack::reassembles(&fragment(a, b, last)));
        assert!(!LocalStack::reassembles(&fragment(a, b, last + 8)));
        assert!(!LocalStack::reassembles(&fragment(a, b, 65_528 - 8)));
        let v6 = |last: u8| IpAddr::from([0xfd77, 0, 0, 0, 0, 0, 0, u16::from(last)]);
        assert!(!LocalStack::reassembles(&fragment(v6(1), v6(2), 0)));
    }

    #[test]
    fn answers_ping_from_the_subnet_and_beyond() {
        let now = Instant::now();
        let server = Ipv4Addr::new(10, 100, 0, 1);
        let mut stack = LocalStack::new(server, 16, now);
        for (i, src) in [Ipv4Addr::new(10, 100, 1, 1), Ipv4Addr::new(192, 168, 88, 5)]
            .into_iter()
            .enumerate()
        {
            assert!(stack.receive(&packet::build::icmp_echo_request(src, server, i as u16)));
            stack.poll(now);
            let reply = stack.poll_transmit().expect("an echo reply");
            let h = packet::parse(&reply).unwrap();
            assert_eq!((h.src, h.dst), (server.into(), src.into()));
            let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            assert_eq!(icmp.msg_type(), smoltcp::wire::Icmpv4Message::EchoReply);
            assert_eq!(icmp.echo_seq_no(), i as u16);
        }
        // A ping to another address is not the stack's business.
        assert!(stack.receive(&packet::build::icmp_echo_request(
            Ipv4Addr::new(10, 100, 1, 1),
            Ipv4Addr::new(10, 100, 0, 9),
            9,
        )));
        stack.poll(now);
        assert!(stack.poll_transmit().is_none());
    }

    #[test]
    fn tcp_connection_to_an_unreachable_peer_times_out() {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        let id = stack
            .connect("10.100.1.1:8728".parse().unwrap(), start)
            .unwrap();
        assert_eq!(stack.state(id), ConnState::Connecting);
        let syn = stack.poll_transmit().expect("a SYN");
        assert_eq!(
            packet::parse(&syn).unwrap().dst,
            "10.100.1.1".parse::<std::net::IpAddr>().unwrap()
        );
        // Simulated time: nobody answers for longer than the timeout.
        let mut now = start;
        for _ in 0..30 {
            now += Duration::from_secs(1);
            stack.poll(now);
            while stack.poll_transmit().is_some() {}
        }
        assert_eq!(stack.state(id), ConnState::Closed);
        assert_eq!(stack.connections(), 0, "reaped by the poll");
    }

    /// Connections that ended while nobody read them (the forward that opened
    /// them is gone) leave room for new ones: the limit counts live ones only.
    #[test]
    fn closed_connections_do_not_count_against_the_limit() {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        for _ in 0..MAX_CONNECTIONS {
            stack
                .connect("10.100.1.1:8728".parse().unwrap(), start)
                .unwrap();
        }
        while stack.poll_transmit().is_some() {}
        // Nobody answers: every connection times out. Only the stack's own
        // timer runs it, as the tunnel task does while connections are open.
        let mut now = start;
        for _ in 0..10_000 {
            let Some(at) = stack.poll_at(now) else { break };
            now = at.max(now);
            stack.poll(now);
            while stack.poll_transmit().is_some() {}
        }
        assert!(now - start < 2 * TCP_TIMEOUT);
        assert_eq!(stack.connections(), 0);
        stack
            .connect("10.100.1.1:8728".parse().unwrap(), now)
            .expect("room again");
    }

    #[test]
    fn connect_forgets_closed_connections_first() {
        let now = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, now);
        let ids: Vec<ConnId> = (0..MAX_CONNECTIONS)
            .map(|_| {
                stack
                    .connect("10.100.1.1:8728".parse().unwrap(), now)
                    .unwrap()
            })
            .collect();
        // Closed without a poll since (an abort inside smoltcp, as a timeout).
        let handle = stack.conns[&ids[0]];
        stack.sockets.get_mut::<tcp::Socket>(handle).abort();
        stack
            .connect("10.100.1.1:8728".parse().unwrap(), now)
            .expect("the closed one is not counted");
    }

    #[test]
    fn connections_are_bounded_and_their_ports_distinct() {
        let now = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, now);
        let mut ports = std::collections::BTreeSet::new();
        for _ in 0..MAX_CONNECTIONS {
            let id = stack
                .connect("10.100.1.1:8728".parse().unwrap(), now)
                .unwrap();
            let handle = stack.conns[&id];
            let local = stack.sockets.get::<tcp::Socket>(handle).local_endpoint();
            assert!(ports.insert(local.expect("bound").port));
        }
        assert_eq!(
            stack.connect("10.100.1.1:8728".parse().unwrap(), now),
            Err(StackError::TooMany)
        );
    }

    #[test]
    fn input_queue_is_bounded() {
        let now = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, now);
        let taken = (0..RX_QUEUE + 10)
            .filter(|_| stack.receive(&[0x45; 20]))
            .count();
        assert_eq!(taken, RX_QUEUE);
        stack.poll(now);
    }
}
