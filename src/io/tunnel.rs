//! One tenant tunnel's task: its UDP socket, its [`TunnelEngine`] and its timer.
//!
//! The task is the only owner of the engine, so the packet path takes no lock. The
//! control plane talks to it through a command channel; events leave through a
//! broadcast channel. Sends that would block are dropped (UDP semantics) and counted.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, Notify};

use super::bridge::{Bridges, ForwardError, HostPipes};
use super::defer::{Deferred, Hold, Step};
use super::sendbatch::SendBatch;
use super::udp::{TunnelSocket, MAX_DATAGRAM, RX_SLOTS};
use crate::core::netstack::StackError;

use crate::core::engine::{
    EgressConfig, Event, Explanation, PeerStatus, Sink, Stranger, TunnelEngine, TunnelStats,
};
use crate::core::peer::{Path, PeerConfig};
use crate::core::policy::DropReason;

/// How often peer timers run: boringtun expects about every 250 ms.
const TIMER_PERIOD: Duration = Duration::from_millis(250);

/// A timer tick that finds the task away this long (its peer timers run every
/// [`TIMER_PERIOD`]) comes after a stall: the process was stopped, the machine
/// paused or starved. What the peers sent meanwhile waits in the socket, so the
/// socket is read before their silence is judged: otherwise every peer would
/// be reported disconnected, the gateways found dead and the forwarded
/// connections timed out, for a silence that was the appliance's.
const STALL: Duration = Duration::from_secs(1);

/// After a stall, the timers wait at most this long for the socket to be read.
/// Ticks may come back to back then, and a starved task may meet another tick
/// before the socket, so the wait is not one tick but until the read; the
/// socket, when it holds anything, is read at the next pass, and one with
/// nothing in it holds the timers up no longer than this.
const STALL_READ_WAIT: Duration = Duration::from_secs(2);

/// Receive slots read per wake-up before the task yields to commands and timers,
/// so a flood on one socket cannot starve the control plane. Without UDP GRO a
/// slot is one datagram (64 x 1.5 KB = 96 KB, about one socket buffer's worth);
/// with GRO a slot may hold a train of up to 64 KB, so one wake-up can carry up
/// to about 2,900 full-size datagrams.
const RECV_BATCH: usize = 64;

/// Longest a tunnel keeps reading a busy socket before it lets the other tunnels
/// on its worker thread run. Without it, a socket that stays readable (a flood, a
/// handshake storm) keeps its task running until tokio's budget of 128 polls runs
/// out: thousands of datagrams while a flow on another tunnel waits. Yielding is
/// not free (tokio polls its driver and may wake an idle worker, which can take
/// the task to another core), so a turn is long enough to keep that under 1 % of
/// a busy tunnel's time.
const TURN: Duration = Duration::from_millis(1);

/// How long a tunnel handles held handshake initiations before it sends their
/// answers, lets the other tunnels run and reads its own socket again, so that a
/// flow on any tunnel waits behind about this much handshake work, not behind a
/// whole batch (the 64 Diffie-Hellman handshakes of a full batch took 10 ms):
/// about fifty cookie replies under a storm. One Diffie-Hellman handshake (about
/// 150 µs) ends a turn by itself, so that a flow waits behind one at most.
const HANDSHAKE_TURN: Duration = Duration::from_micros(250);

/// Initiations a tunnel holds at most during one wake-up: two receive batches,
/// so that it can read on between turns (a batch at a time, while a whole one
/// fits). 23 KiB, allocated when the first initiation comes.
const HELD: usize = 2 * RECV_BATCH;

/// What the control plane asks of a tunnel task.
pub enum Command {
    /// Make the peer set exactly this; reply with freed receiver indices.
    Sync {
        peers: Vec<(PeerConfig, u32)>,
        egress: Vec<EgressConfig>,
        host_prefixes: Vec<ipnet::IpNet>,
        /// TUN mode: the sources the host routes back (the tenant's subnet).
        host_sources: Vec<ipnet::IpNet>,
        reply: oneshot::Sender<Result<Vec<u32>, crate::core::engine::EngineError>>,
    },
    /// Add or update one peer (its key stays), with the egress policies that
    /// may name it: O(log n), unlike a full `Sync`.
    Upsert {
        peer: (PeerConfig, u32),
        egress: Vec<EgressConfig>,
        reply: oneshot::Sender<Result<(), crate::core::engine::EngineError>>,
    },
    /// Remove one peer (a deleted router or client), with the egress policies
    /// as they now are: O(log n), unlike a full `Sync`.
    Remove {
        key: [u8; 32],
        egress: Vec<EgressConfig>,
        reply: oneshot::Sender<()>,
    },
    /// One peer's status.
    PeerStatus {
        key: [u8; 32],
        reply: oneshot::Sender<Option<PeerStatus>>,
    },
    /// The keys that knocked but are no peer ([`TunnelEngine::strangers`]).
    Strangers {
        reply: oneshot::Sender<Vec<Stranger>>,
    },
    /// Explain what would happen to a packet.
    Explain {
        src: IpAddr,
        dst: IpAddr,
        reply: oneshot::Sender<Explanation>,
    },
    /// Opens a TCP connection from the tunnel's own address (management forwarding).
    OpenTcp {
        remote: std::net::SocketAddrV4,
        pipes: HostPipes,
    },
    /// Peer statuses and tunnel counters.
    Snapshot {
        reply: oneshot::Sender<TunnelSnapshot>,
    },
}

/// A tunnel's state for status answers and metrics.
#[derive(Debug, Clone)]
pub struct TunnelSnapshot {
    /// Every peer.
    pub peers: Vec<PeerStatus>,
    /// The engine's counters.
    pub stats: TunnelStats,
    /// What was refused on its way out.
    pub send_failures: SendFailures,
}

/// What a tunnel's sends had refused since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendFailures {
    /// Datagrams the socket refused (buffer full, no route, a firewall).
    pub socket: u64,
    /// Packets the host device refused (TUN mode: the device down, its
    /// queue full).
    pub host: u64,
}

/// The tunnel's side of the host TUN device, when there is one.
#[derive(Default)]
pub struct HostLink {
    /// Packets from the host whose destination is in this tunnel.
    pub packets: Option<mpsc::Receiver<Vec<u8>>>,
    /// Where their buffers go back to the device's reader.
    pub recycle: Option<mpsc::Sender<Vec<u8>>>,
    /// The device, for packets to the tunnel's server address.
    pub device: Option<Arc<tun_rs::AsyncDevice>>,
    /// Packets for the device, written once per wake-up.
    pub out: HostOut,
}

/// Hands up to `limit` host packets queued for this tunnel to the engine,
/// without waiting for more.
fn take_host_packets(
    packets: &mut Option<mpsc::Receiver<Vec<u8>>>,
    recycle_to: &Option<mpsc::Sender<Vec<u8>>>,
    engine: &mut TunnelEngine,
    now: Instant,
    sink: &mut UdpSink<'_>,
    limit: usize,
) {
    let Some(rx) = packets.as_mut() else { return };
    for _ in 0..limit {
        let Ok(mut packet) = rx.try_recv() else { break };
        engine.handle_host_packet(&mut packet, now, sink);
        recycle(recycle_to, packet);
    }
}

/// Hands a packet buffer back to the device's reader (freed if it has plenty).
fn recycle(to: &Option<mpsc::Sender<Vec<u8>>>, packet: Vec<u8>) {
    if let Some(to) = to {
        let _ = to.try_send(packet);
    }
}

async fn recv_host(packets: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match packets {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a tunnel tells the event hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// An engine event.
    Peer(Event),
    /// The tunnel stopped (its tenant deleted, its task restarted after it
    /// ended by a bug): every peer of it that was announced connected is
    /// disconnected now. The appliance's own shutdown sends none.
    Stopped,
}

/// A tunnel's news tagged with its tenant.
#[derive(Debug, Clone)]
pub struct TaggedEvent {
    pub tenant: Arc<str>,
    pub event: News,
    /// Wall-clock time the driver saw it.
    pub at: std::time::SystemTime,
}

struct UdpSink<'a> {
    tx: &'a mut SendBatch,
    host: Option<&'a mut HostOut>,
}

/// Packets for the host device, collected during one wake-up and written in one
/// batch (`send_multiple`: coalesced with GRO when offload is on). Buffers are
/// recycled, with headroom for the virtio header.
#[derive(Default)]
pub struct HostOut {
    pending: Vec<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// The capacity of the buffers in `spare`, in bytes.
    spare_bytes: usize,
    /// The coalescing tables (1.8 MB), made at the first write: tunnels
    /// without host traffic never pay for them.
    gro: Option<Box<tun_rs::GROTable>>,
}

/// Packets collected before the batch is written: what one wake-up can read
/// (`RECV_BATCH` slots, each a GRO train of at most 64 datagrams), so that
/// nothing read is refused. Should it be reached, the engine counts the rest as
/// `local_unavailable`.
const HOST_BATCH: usize = RECV_BATCH * 64;

/// Buffers kept for reuse between wake-ups: a bulk upload to the host reuses
/// them instead of allocating per packet (up to about 1.5 MB per tunnel that
/// has sent the host such a burst).
const HOST_SPARE: usize = 1024;

/// The most their capacity may add up to: a burst of full-size packets, and
/// some buffers the coalescing grew to 64 KiB. A router that sends the host
/// large packets (fragmented, up to 64 KiB each) cannot make a tunnel keep
/// more.
const HOST_SPARE_BYTES: usize = 4 << 20;

impl HostOut {
    /// Queues `packet` for the host; false when the batch is full.
    fn push(&mut self, packet: &[u8]) -> bool {
        if self.pending.len() >= HOST_BATCH {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        self.spare_bytes -= buf.capacity();
        buf.clear();
        buf.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        self.pending.push(buf);
        true
    }

    /// Writes the collected packets to `device` in one batch; returns how many
    /// it refused. A TUN device's writes do not wait (the kernel takes a packet
    /// or drops it), so this also runs between handshake turns, where the task
    /// must not wait: host traffic does not wait behind a storm, and the batch
    /// never fills up over several turns.
    fn flush(&mut self, device: &tun_rs::AsyncDevice) -> u64 {
        if self.pending.is_empty() {
            return 0;
        }
        let gro = self.gro.get_or_insert_with(Box::default);
        let offset = tun_rs::VIRTIO_NET_HDR_LEN;
        // How many went before an error is unknown: count the batch.
        // The device's own (non-blocking) writes, not the async wrapper's.
        let sync: &tun_rs::DeviceImpl = device;
        let failures = match sync.send_multiple(gro, &mut self.pending, offset) {
            Ok(_) => 0,
            Err(_) => self.pending.len() as u64,
        };
        self.recycle();
        failures
    }

    /// Keeps the written buffers for the next packets, up to [`HOST_SPARE`]
    /// of them and [`HOST_SPARE_BYTES`]; the others are freed.
    fn recycle(&mut self) {
        for buf in self.pending.drain(..) {
            let bytes = self.spare_bytes + buf.capacity();
            if self.spare.len() < HOST_SPARE && bytes <= HOST_SPARE_BYTES {
                self.spare_bytes = bytes;
                self.spare.push(buf);
            }
        }
    }
}

impl Sink for UdpSink<'_> {
    #[inline]
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.tx.push(to, None, datagram);
    }

    #[inline]
    fn send_from(&mut self, to: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
        self.tx.push(to, local, datagram);
    }

    fn local(&mut self, packet: &[u8]) -> bool {
        // TUN mode: the host kernel answers for the server address. (In userspace
        // mode the engine's own stack takes these packets and this is not called.)
        self.host.as_mut().is_some_and(|out| out.push(packet))
    }
}

thread_local! {
    /// Receive buffers, one set per worker thread: a tunnel task borrows them only
    /// between awaits, so tasks on one thread never overlap, and idle tunnels cost
    /// nothing. 16 x 64 KiB: a recvmmsg batch, each slot large enough for a GRO
    /// train of datagrams.
    static RX: std::cell::RefCell<Vec<Vec<u8>>> =
        std::cell::RefCell::new(vec![vec![0u8; MAX_DATAGRAM + 1]; RX_SLOTS]);
}

/// Reads what is waiting on the socket (a bounded number of batched syscalls, so a
/// flood cannot starve commands and timers) and hands every datagram to the engine,
/// except handshake initiations: those go to `held`, for the caller to handle
/// after the data has left (see [`super::defer`]).
///
/// A batch that comes back short means the queue was empty at that moment: the
/// socket's readiness is cleared right there instead of paying for one more
/// `recvmmsg` that would only say `EAGAIN`. Nothing is lost by that: a datagram
/// that arrives afterwards raises a new readiness event.
///
/// Returns whether datagrams may still be waiting (every batch came back full).
fn receive(
    socket: &TunnelSocket,
    udp: &quinn_udp::UdpSocketState,
    engine: &mut TunnelEngine,
    now: Instant,
    sink: &mut UdpSink<'_>,
    held: &mut Deferred,
) -> bool {
    RX.with(|rx| {
        let Ok(mut bufs) = rx.try_borrow_mut() else {
            return false;
        };
        read(socket, udp, &mut bufs, held, engine, now, sink)
    })
}

/// What a tunnel does at each step of handling its held initiations
/// ([`Deferred::release_in_turns`]).
struct Turns<'a> {
    socket: &'a TunnelSocket,
    udp: &'a quinn_udp::UdpSocketState,
    engine: &'a mut TunnelEngine,
    tx: &'a mut SendBatch,
    host: Option<&'a mut HostOut>,
    /// The host device, in TUN mode.
    device: Option<&'a tun_rs::AsyncDevice>,
    send_failures: &'a mut SendFailures,
    /// How long a turn lasts ([`HANDSHAKE_TURN`]).
    length: Duration,
    /// The clock, as read when the turn began.
    now: Instant,
    /// Whether a read between turns found the socket busy.
    backlog: bool,
}

impl Turns<'_> {
    /// Sends what the engine produced, to peers and to the host device.
    fn flush(&mut self) {
        self.send_failures.socket += self.tx.flush(self.socket.get_ref(), self.udp);
        if let (Some(out), Some(device)) = (self.host.as_deref_mut(), self.device) {
            self.send_failures.host += out.flush(device);
        }
    }

    fn step(&mut self, step: Step<'_>) -> bool {
        match step {
            Step::Pause => self.flush(),
            Step::Resume(held) => {
                self.now = Instant::now();
                // Data that came during the last turn goes before the next one.
                if held.room() >= RECV_BATCH {
                    let mut sink = UdpSink {
                        tx: self.tx,
                        host: self.host.as_deref_mut(),
                    };
                    self.backlog |= receive(
                        self.socket,
                        self.udp,
                        self.engine,
                        self.now,
                        &mut sink,
                        held,
                    );
                    self.flush();
                }
            }
            Step::Initiation(from, initiation) => {
                let mut sink = UdpSink {
                    tx: self.tx,
                    host: self.host.as_deref_mut(),
                };
                let admitted = self.engine.stats().admitted_handshakes;
                self.engine.handle_datagram_at(
                    from.remote,
                    from.local,
                    initiation,
                    self.now,
                    &mut sink,
                );
                // A Diffie-Hellman handshake fills a turn by itself.
                return self.engine.stats().admitted_handshakes == admitted
                    && self.now.elapsed() < self.length;
            }
        }
        true
    }
}

/// The reading half of [`receive`]: initiations go to `held`, the rest to the
/// engine.
fn read(
    socket: &TunnelSocket,
    udp: &quinn_udp::UdpSocketState,
    bufs: &mut [Vec<u8>],
    held: &mut Deferred,
    engine: &mut TunnelEngine,
    now: Instant,
    sink: &mut UdpSink<'_>,
) -> bool {
    let mut meta = [quinn_udp::RecvMeta::default(); RX_SLOTS];
    for _ in 0..RECV_BATCH / RX_SLOTS {
        let outcome = socket.try_io(tokio::io::Interest::READABLE, |inner| {
            let count = super::udp::recv_batch(inner, udp, bufs, &mut meta)?;
            for (m, buf) in meta.iter().zip(bufs.iter()).take(count) {
                // Which of our addresses it came to: known on a socket bound to
                // a wildcard address, where replies must leave from it.
                let from = Path {
                    remote: m.addr,
                    local: m.dst_ip,
                };
                if m.len == 0 {
                    // An empty datagram: counted and dropped like any non-WireGuard one.
                    engine.handle_datagram(m.addr, &[], now, sink);
                    continue;
                }
                let stride = m.stride.max(1);
                for datagram in buf[..m.len].chunks(stride) {
                    match held.hold(from, datagram) {
                        Hold::Held => {}
                        Hold::Full => engine.refuse_datagram(DropReason::HandshakeQueueFull),
                        Hold::Other => {
                            engine.handle_datagram_at(from.remote, from.local, datagram, now, sink)
                        }
                    }
                }
            }
            if count < RX_SLOTS {
                return Err(ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match outcome {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            // ICMP errors from earlier sends surface here on Linux; skip them.
            Err(_) => {}
        }
    }
    true
}

/// Runs a tunnel until its command channel closes. `work` is signalled by the
/// host ends of forwarded connections when they have moved bytes.
pub async fn run(
    mut engine: TunnelEngine,
    socket: TunnelSocket,
    mut commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<TaggedEvent>,
    tenant: Arc<str>,
    work: Arc<Notify>,
    mut host: HostLink,
) {
    let udp = match super::udp::batching_state(socket.get_ref()) {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(tenant = %tenant, error = %e, "tunnel socket unusable");
            return;
        }
    };
    let v6 = socket.get_ref().local_addr().is_ok_and(|a| a.is_ipv6());
    let mut tx = SendBatch::new(udp.max_gso_segments(), v6);
    let mut timer = tokio::time::interval(TIMER_PERIOD);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut send_failures = SendFailures::default();
    let mut bridges = Bridges::default();
    // When the current run of back-to-back reads of a busy socket began.
    let mut turn: Option<Instant> = None;
    let mut held = Deferred::new(HELD);
    // When the task last ended a pass of its loop, and after a stall (see
    // `STALL`) until when the timers wait for the socket to be read.
    let mut last_pass = Instant::now();
    let mut read_first: Option<Instant> = None;
    loop {
        let mut backlog = false;
        // The stack's own timers (ACK delay, retransmits, keep-alive, TIME-WAIT)
        // need finer ticks than the peers' timers while it has connections,
        // forwarded or closing: only its polls forget the closed ones.
        let stack_deadline = if engine.local_connections() == 0 {
            None
        } else {
            engine.local_deadline()
        };
        let mut stack_due = false;
        let stack_timer = async {
            match stack_deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            command = commands.recv() => {
                let Some(command) = command else { break };
                match command {
                    Command::Sync { peers, egress, host_prefixes, host_sources, reply } => {
                        let result = engine.sync_peers(peers);
                        engine.set_egress(egress);
                        engine.set_host_prefixes(&host_prefixes);
                        engine.set_host_sources(&host_sources);
                        let _ = reply.send(result);
                    }
                    Command::Upsert { peer: (config, index), egress, reply } => {
                        let result = engine.upsert_peer(config, index);
                        engine.set_egress(egress);
                        let _ = reply.send(result);
                    }
                    Command::Remove { key, egress, reply } => {
                        engine.remove_peer(&key);
                        engine.set_egress(egress);
                        let _ = reply.send(());
                    }
                    Command::PeerStatus { key, reply } => {
                        let _ = reply.send(engine.peer_status(&key, Instant::now()));
                    }
                    Command::Strangers { reply } => {
                        let _ = reply.send(engine.strangers());
                    }
                    Command::Explain { src, dst, reply } => {
                        let _ = reply.send(engine.explain(src, dst, Instant::now()));
                    }
                    Command::OpenTcp { remote, pipes } => {
                        let mut sink = UdpSink { tx: &mut tx, host: host.device.is_some().then_some(&mut host.out) };
                        match engine.tcp_connect(remote, Instant::now(), &mut sink) {
                            Ok(id) => bridges.add(id, remote, pipes),
                            Err(e) => {
                                let why = match e {
                                    StackError::TooMany => ForwardError::Busy,
                                    _ => ForwardError::NoStack,
                                };
                                let _ = pipes.opened.send(Err(why));
                            }
                        }
                    }
                    Command::Snapshot { reply } => {
                        let _ = reply.send(TunnelSnapshot {
                            peers: engine.peer_statuses(Instant::now()),
                            stats: engine.stats().clone(),
                            send_failures,
                        });
                    }
                }
            }
            // A tunnel whose peers never spoke and that carries no forwarded
            // connection has no timer work: skip the wake-ups.
            _ = timer.tick(), if engine.needs_timers() || !bridges.is_empty() => {
                let now = Instant::now();
                if now.saturating_duration_since(last_pass) >= STALL {
                    read_first = Some(now + STALL_READ_WAIT);
                }
                if read_first.is_some_and(|until| now < until) {
                    // The socket first; the timers at a tick after it.
                    last_pass = now;
                    continue;
                }
                read_first = None;
                let mut sink = UdpSink { tx: &mut tx, host: host.device.is_some().then_some(&mut host.out) };
                engine.handle_timers(now, &mut sink);
            }
            // The readiness stays set: `receive` reads through `try_io`, which
            // clears it when the socket runs dry.
            readable = socket.readable() => {
                if let Err(e) = readable.map(|mut guard| guard.retain_ready()) {
                    tracing::error!(tenant = %tenant, error = %e, "tunnel socket failed");
                    break;
                }
                let now = Instant::now();
                read_first = None;
                let mut sink = UdpSink { tx: &mut tx, host: host.device.is_some().then_some(&mut host.out) };
                backlog = receive(&socket, &udp, &mut engine, now, &mut sink, &mut held);
                // The data has left; the handshakes wait until the tunnels that
                // are ready now have had their turn, and again after each turn.
                if !held.is_empty() {
                    let mut turns = Turns {
                        socket: &socket,
                        udp: &udp,
                        engine: &mut engine,
                        tx: &mut tx,
                        host: host.device.is_some().then_some(&mut host.out),
                        device: host.device.as_deref(),
                        send_failures: &mut send_failures,
                        length: HANDSHAKE_TURN,
                        now,
                        backlog,
                    };
                    held.release_in_turns(|step| turns.step(step)).await;
                    backlog = turns.backlog;
                }
                // The biased select reaches the host's packets only once the
                // socket is quiet: while it stays busy (a flood, a bulk
                // upload), they go in the same wake-up instead of starving.
                if backlog {
                    let mut sink = UdpSink { tx: &mut tx, host: host.device.is_some().then_some(&mut host.out) };
                    take_host_packets(&mut host.packets, &host.recycle, &mut engine, now, &mut sink, RECV_BATCH);
                }
            }
            packet = recv_host(&mut host.packets) => {
                let Some(mut packet) = packet else { break };
                let now = Instant::now();
                let mut sink = UdpSink { tx: &mut tx, host: host.device.is_some().then_some(&mut host.out) };
                engine.handle_host_packet(&mut packet, now, &mut sink);
                recycle(&host.recycle, packet);
                // Whatever else is queued, in the same wake-up (bounded like the socket).
                take_host_packets(&mut host.packets, &host.recycle, &mut engine, now, &mut sink, RECV_BATCH - 1);
            }
            _ = work.notified() => {}
            _ = stack_timer => stack_due = true,
        }
        if !bridges.is_empty() || stack_due {
            if let Some(stack) = engine.local_stack() {
                bridges.pump(stack);
            }
            let mut sink = UdpSink {
                tx: &mut tx,
                host: host.device.is_some().then_some(&mut host.out),
            };
            engine.handle_local(Instant::now(), &mut sink);
        }
        send_failures.socket += tx.flush(socket.get_ref(), &udp);
        if let Some(device) = &host.device {
            send_failures.host += host.out.flush(device);
        }
        while let Some(event) = engine.poll_event() {
            // No subscriber is fine: events are for whoever listens.
            let _ = events.send(TaggedEvent {
                tenant: Arc::clone(&tenant),
                event: News::Peer(event),
                at: std::time::SystemTime::now(),
            });
        }
        last_pass = Instant::now();
        if !backlog {
            turn = None;
        } else if turn.get_or_insert(last_pass).elapsed() >= TURN {
            // The socket has kept this task busy for a whole turn: let the other
            // tunnels on this worker run before reading on.
            turn = None;
            tokio::task::yield_now().await;
        }
    }
    tracing::debug!(tenant = %tenant, "tunnel task stopped");
}

#[cfg(test)]
mod tests {
    use super::{
        receive, Deferred, HostOut, SendBatch, Step, TunnelSocket, Turns, UdpSink, HELD, RECV_BATCH,
    };
    use crate::core::engine::TunnelEngine;
    use boringtun::x25519::StaticSecret;
    use std::time::Instant;
    use tokio::sync::mpsc;

    /// Written buffers are kept for reuse up to a count and a total size:
    /// large packets (a router's 64 KiB ones) cannot pin more than that.
    #[test]
    fn the_host_buffers_kept_for_reuse_are_bounded_in_bytes() {
        let mut out = HostOut::default();
        for size in [1_400, 65_000] {
            for _ in 0..super::HOST_SPARE {
                assert!(out.push(&vec![0x45; size]));
            }
            out.recycle();
            let held: usize = out.spare.iter().map(Vec::capacity).sum();
            assert_eq!(held, out.spare_bytes);
            assert!(held <= super::HOST_SPARE_BYTES, "{size}: {held}");
        }
        assert!(out.spare.len() < 100, "few large buffers kept");
        // Small packets reuse what is kept, and refill the pool up to its count.
        for _ in 0..super::HOST_SPARE {
            assert!(out.push(&[0x45; 100]));
        }
        assert_eq!(out.spare_bytes, 0);
        out.recycle();
        assert!(out.spare_bytes <= super::HOST_SPARE_BYTES);
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
        let mut sink = UdpSink { tx, host };
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
        let mut engine =
            TunnelEngine::new(server_key(), vec!["10.100.0.1".parse().expect("address")]);
        let mut tx = SendBatch::new(1, false);
        let mut sink = UdpSink {
            tx: &mut tx,
            host: None,
        };
        let (mut packets, recycle_to) = (Some(from_host), Some(recycle_to));
        let mut take_three = |engine: &mut TunnelEngine| {
            let now = Instant::now();
            super::take_host_packets(&mut packets, &recycle_to, engine, now, &mut sink, 3);
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
        let mut sink = UdpSink {
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
        let mut sink = UdpSink {
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
}
