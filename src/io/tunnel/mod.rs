//! One tenant tunnel's task: its UDP socket, its [`TunnelEngine`] and its timer,
//! and in TUN mode its share of the host device (packets for the tunnel from the
//! device's reader, batched writes to the device).
//!
//! The task is the only owner of the engine, so the packet path takes no lock. The
//! control plane talks to it through a command channel; events leave through a
//! broadcast channel. Sends that would block are dropped (UDP semantics) and counted.
//! Under a handshake storm the task takes turns between handshakes and
//! everything else (`defer`), so that established flows keep moving.
//!
//! Its parts: `host` (the host device's packets, in and out), `sink` (where the
//! engine's output goes), `read` (the socket's datagrams, and the handshake
//! turns).
//!
//! Left out: every decision about a packet (the engine's), the socket's batching
//! (`udp`, `sendbatch`), the device itself (`tun`), and starting or stopping the
//! task (`runtime`).

mod host;
mod read;
mod sink;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, Notify};

use crate::core::netstack::StackError;
use crate::io::bridge::{Bridges, ForwardError, HostPipes};
use crate::io::defer::Deferred;
use crate::io::sendbatch::SendBatch;
use crate::io::udp::TunnelSocket;

use crate::core::engine::{
    EgressConfig, Event, Explanation, PeerStatus, Stranger, TunnelEngine, TunnelStats,
};
use crate::core::peer::PeerConfig;

use host::{recv_host, recycle, take_host_packets};
pub use host::{HostLink, HostOut};
use read::{wake_up, Io};
use sink::TunnelSink;

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
/// handshake storm) keeps its task running until tokio's budget of 128 units runs
/// out (each read pays one: a socket's readiness pays none by itself):
/// thousands of datagrams while a flow on another tunnel waits. Yielding is
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
    /// Datagrams the kernel dropped at the tunnel's socket before the
    /// tunnel read them (see [`super::udp::receive_drops`]).
    pub receive_drops: u64,
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

impl SendFailures {
    /// Sends what the engine produced this wake-up: the datagrams to peers,
    /// and the packets for the host device where there is one (`out`);
    /// counts what was refused.
    fn flush(
        &mut self,
        tx: &mut SendBatch,
        socket: &TunnelSocket,
        udp: &quinn_udp::UdpSocketState,
        out: Option<(&mut HostOut, &tun_rs::AsyncDevice)>,
    ) {
        self.socket += tx.flush(socket.get_ref(), udp);
        if let Some((out, device)) = out {
            self.host += out.flush(device);
        }
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
        let mut socket_turn = false;
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
                let mut sink = TunnelSink::new(&mut tx, host.device.is_some(), &mut host.out);
                let counters = (send_failures, socket.get_ref());
                apply(command, &mut engine, &mut sink, &mut bridges, counters);
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
                let mut sink = TunnelSink::new(&mut tx, host.device.is_some(), &mut host.out);
                engine.handle_timers(now, &mut sink);
            }
            // The readiness stays set: `receive` reads through `try_io`, which
            // clears it when the socket runs dry.
            readable = socket.readable() => {
                if let Err(e) = readable.map(|mut guard| guard.retain_ready()) {
                    tracing::error!(tenant = %tenant, error = %e, "tunnel socket failed");
                    break;
                }
                read_first = None;
                let io = Io { socket: &socket, udp: &udp, tx: &mut tx, send_failures: &mut send_failures };
                backlog = wake_up(io, &mut engine, &mut host, &mut held, Instant::now()).await;
                socket_turn = true;
            }
            packet = recv_host(&mut host.packets) => {
                let Some(mut packet) = packet else { break };
                let now = Instant::now();
                let mut sink = TunnelSink::new(&mut tx, host.device.is_some(), &mut host.out);
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
            let mut sink = TunnelSink::new(&mut tx, host.device.is_some(), &mut host.out);
            engine.handle_local(Instant::now(), &mut sink);
        }
        let out = host.device.as_deref().map(|device| (&mut host.out, device));
        send_failures.flush(&mut tx, &socket, &udp, out);
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
        if socket_turn {
            // A socket's readiness takes nothing from tokio's budget: one
            // that another worker marks ready again during every pass (a
            // steady flow, each pass short of a backlog) would keep this task
            // from ever returning to the runtime. Each read pays a unit, so
            // that the budget's end lets the worker's other tasks run.
            tokio::task::consume_budget().await;
        }
    }
    tracing::debug!(tenant = %tenant, "tunnel task stopped");
}

/// Carries out one command of the control plane.
fn apply(
    command: Command,
    engine: &mut TunnelEngine,
    sink: &mut TunnelSink<'_>,
    bridges: &mut Bridges,
    (send_failures, socket): (SendFailures, &std::net::UdpSocket),
) {
    match command {
        Command::Sync {
            peers,
            egress,
            host_prefixes,
            host_sources,
            reply,
        } => {
            let result = engine.sync_peers(peers);
            engine.set_egress(egress);
            engine.set_host_prefixes(&host_prefixes);
            engine.set_host_sources(&host_sources);
            let _ = reply.send(result);
        }
        Command::Upsert {
            peer: (config, index),
            egress,
            reply,
        } => {
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
            match engine.tcp_connect(remote, Instant::now(), sink) {
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
                receive_drops: super::udp::receive_drops(socket),
            });
        }
    }
}
