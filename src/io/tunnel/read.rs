//! Reading a tunnel's socket: every datagram to the engine but handshake
//! initiations, which wait for their turns (`io::defer`), and the turns
//! themselves.
//!
//! Left out: the batched syscalls (`io::udp`), and what the engine does with a
//! datagram.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use crate::io::defer::{Deferred, Hold, Step};
use crate::io::sendbatch::SendBatch;
use crate::io::udp::{TunnelSocket, MAX_DATAGRAM, RX_SLOTS};

use crate::core::engine::TunnelEngine;
use crate::core::peer::{answerable, canonical_endpoint, Path};
use crate::core::policy::DropReason;

use super::host::{take_host_packets, HostLink, HostOut};
use super::sink::TunnelSink;
use super::{SendFailures, HANDSHAKE_TURN, RECV_BATCH};

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
/// after the data has left (see [`crate::io::defer`]).
///
/// A batch that comes back short means the queue was empty at that moment: the
/// socket's readiness is cleared right there instead of paying for one more
/// `recvmmsg` that would only say `EAGAIN`. Nothing is lost by that: a datagram
/// that arrives afterwards raises a new readiness event.
///
/// Returns whether datagrams may still be waiting (every batch came back full).
pub(super) fn receive(
    socket: &TunnelSocket,
    udp: &quinn_udp::UdpSocketState,
    engine: &mut TunnelEngine,
    now: Instant,
    sink: &mut TunnelSink<'_>,
    held: &mut Deferred,
) -> bool {
    RX.with(|rx| {
        let Ok(mut bufs) = rx.try_borrow_mut() else {
            return false;
        };
        read(socket, udp, &mut bufs, held, engine, now, sink)
    })
}

/// A tunnel's socket and what goes out through it, for one wake-up.
pub(super) struct Io<'a> {
    pub(super) socket: &'a TunnelSocket,
    pub(super) udp: &'a quinn_udp::UdpSocketState,
    pub(super) tx: &'a mut SendBatch,
    pub(super) send_failures: &'a mut SendFailures,
}

/// A wake-up for a readable socket: what it holds goes to the engine, the
/// held initiations in turns after the data, and then up to a batch of the
/// host's packets (TUN mode). The host's packets are taken at every such
/// wake-up, not only once the socket is quiet: the task's select looks at the
/// socket first, and under a steady flow another worker may mark it ready
/// again during every pass, so that the select would never reach them.
/// Returns whether datagrams may still be waiting on the socket.
pub(super) async fn wake_up(
    io: Io<'_>,
    engine: &mut TunnelEngine,
    host: &mut HostLink,
    held: &mut Deferred,
    now: Instant,
) -> bool {
    let Io {
        socket,
        udp,
        tx,
        send_failures,
    } = io;
    let mut sink = TunnelSink::new(tx, host.device.is_some(), &mut host.out);
    let mut backlog = receive(socket, udp, engine, now, &mut sink, held);
    // The data has left; the handshakes wait until the tunnels that are
    // ready now have had their turn, and again after each turn.
    if !held.is_empty() {
        let mut turns = Turns {
            socket,
            udp,
            engine,
            tx,
            host: host.device.is_some().then_some(&mut host.out),
            device: host.device.as_deref(),
            send_failures,
            length: HANDSHAKE_TURN,
            now,
            backlog,
        };
        held.release_in_turns(|step| turns.step(step)).await;
        backlog = turns.backlog;
    }
    let mut sink = TunnelSink::new(tx, host.device.is_some(), &mut host.out);
    take_host_packets(
        &mut host.packets,
        &host.recycle,
        engine,
        now,
        &mut sink,
        RECV_BATCH,
    );
    backlog
}

/// What a tunnel does at each step of handling its held initiations
/// ([`Deferred::release_in_turns`]).
pub(super) struct Turns<'a> {
    pub(super) socket: &'a TunnelSocket,
    pub(super) udp: &'a quinn_udp::UdpSocketState,
    pub(super) engine: &'a mut TunnelEngine,
    pub(super) tx: &'a mut SendBatch,
    pub(super) host: Option<&'a mut HostOut>,
    /// The host device, in TUN mode.
    pub(super) device: Option<&'a tun_rs::AsyncDevice>,
    pub(super) send_failures: &'a mut SendFailures,
    /// How long a turn lasts ([`super::HANDSHAKE_TURN`]).
    pub(super) length: Duration,
    /// The clock, as read when the turn began.
    pub(super) now: Instant,
    /// Whether a read between turns found the socket busy.
    pub(super) backlog: bool,
}

impl Turns<'_> {
    /// Sends what the engine produced, to peers and to the host device.
    fn flush(&mut self) {
        let out = self.host.as_deref_mut().zip(self.device);
        self.send_failures
            .flush(self.tx, self.socket, self.udp, out);
    }

    pub(super) fn step(&mut self, step: Step<'_>) -> bool {
        match step {
            Step::Pause => self.flush(),
            Step::Resume(held) => {
                self.now = Instant::now();
                // Data that came during the last turn goes before the next one.
                if held.room() >= RECV_BATCH {
                    let mut sink = TunnelSink {
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
                let mut sink = TunnelSink {
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
    sink: &mut TunnelSink<'_>,
) -> bool {
    let mut meta = [quinn_udp::RecvMeta::default(); RX_SLOTS];
    for _ in 0..RECV_BATCH / RX_SLOTS {
        let outcome = socket.try_io(tokio::io::Interest::READABLE, |inner| {
            let count = crate::io::udp::recv_batch(inner, udp, bufs, &mut meta)?;
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
                // A source nothing can answer takes no place among the held
                // initiations: the engine drops it at once.
                let answerable = answerable(canonical_endpoint(m.addr));
                for datagram in buf[..m.len].chunks(stride) {
                    let hold = match answerable {
                        true => held.hold(from, datagram),
                        false => Hold::Other,
                    };
                    match hold {
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
