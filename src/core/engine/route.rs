//! Routing one inner packet (rules 1 to 6 of `policy`) and encrypting it for the
//! next hop; packets from the host side and from the local stack enter here.
//!
//! Left out: the rules themselves ([`crate::core::policy::decide`]), and packets from
//! peers until `receive` has decrypted them. What leaves goes to the caller's `Sink`,
//! never to a socket.

use std::time::Instant;

use super::peers::Peers;
use super::status::TunnelStats;
use super::{Sink, TunnelEngine};
use crate::core::icmp::{self, Error, ErrorBudget};
use crate::core::netstack::LocalStack;
use crate::core::packet;
use crate::core::peer::Encap;
use crate::core::policy::{decide, DropReason, Origin, RoutingState, Rule, Verdict};

impl TunnelEngine {
    /// Runs the local stack and routes what it sends, as packets from the host.
    pub(super) fn flush_local(&mut self, now: Instant, sink: &mut impl Sink) {
        let Self {
            peers,
            routing,
            stats,
            tx,
            local,
            local_at,
            icmp,
            ..
        } = self;
        let Some(stack) = local else { return };
        stack.poll(now);
        // Bounded: the stack sends at most what its sockets and input allow; the
        // cap only guards against a bug turning this into a busy loop.
        for _ in 0..4096 {
            let Some(mut packet) = stack.poll_transmit() else {
                break;
            };
            // The stack's errors (port unreachable, say) come out of the
            // budgets of the peer they go to and of the tunnel, as the hub's
            // own do.
            let error = icmp::is_error(&packet);
            if error && !take_error_shares(peers, routing, icmp, &packet, now) {
                stack.recycle(packet);
                continue;
            }
            let before = stats.forwarded_host + stats.queued;
            route(
                peers,
                routing,
                stats,
                tx,
                icmp,
                None,
                Origin::Host,
                &mut packet,
                now,
                sink,
            );
            if error && stats.forwarded_host + stats.queued > before {
                stats.icmp_errors += 1;
            }
            stack.recycle(packet);
        }
        *local_at = stack.poll_at(now);
    }

    /// Handles a packet from the host side (TUN device or local stack), routed by
    /// destination only.
    pub fn handle_host_packet(&mut self, packet: &mut [u8], now: Instant, sink: &mut impl Sink) {
        let Self {
            peers,
            routing,
            stats,
            tx,
            icmp,
            ..
        } = self;
        route(
            peers,
            routing,
            stats,
            tx,
            icmp,
            None,
            Origin::Host,
            packet,
            now,
            sink,
        );
    }
}

/// Takes one error's worth from the share of the peer an error from the local
/// stack goes to (the one that owns its destination) and from the tunnel's
/// budget, or from neither; an error for no peer pays the tunnel's alone
/// (routing drops it).
fn take_error_shares(
    peers: &mut Peers,
    routing: &RoutingState,
    tunnel: &mut ErrorBudget,
    error: &[u8],
    now: Instant,
) -> bool {
    let to = packet::parse(error)
        .ok()
        .and_then(|header| routing.routes.lookup(header.dst).copied());
    let share = to.and_then(|to| peers.get_mut(to)).map(|p| &mut p.icmp);
    icmp::take_shares(share, tunnel, now)
}

/// Routing rules 1 to 6 for one packet, then encryption for the next hop.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn route(
    peers: &mut Peers,
    routing: &RoutingState,
    stats: &mut TunnelStats,
    tx: &mut [u8],
    icmp: &mut ErrorBudget,
    local: Option<&mut LocalStack>,
    origin: Origin,
    packet: &mut [u8],
    now: Instant,
    sink: &mut impl Sink,
) {
    // Rule 1: parse.
    let header = match packet::parse(packet) {
        Ok(h) => h,
        Err(_) => return stats.drop(DropReason::Malformed),
    };
    let packet = &mut packet[..header.len];
    let verdict = decide(
        routing,
        origin,
        header.src,
        header.dst,
        |g| peers.get(g).is_some_and(|p| p.is_live(now)),
        |p| peers.get(p).is_some_and(|p| p.is_client()),
    );
    match verdict {
        Verdict::Forward { peer, rule } => {
            let Some((endpoint, listed)) = peers.get(peer).map(|p| (p.endpoint, p.listed)) else {
                return stats.drop(DropReason::NoRoute);
            };
            // A router's hop, checked first as a kernel's forwarding does: what
            // arrives with none left goes no further.
            if matches!(origin, Origin::Peer(_)) && !icmp::decrement_hop_limit(packet) {
                stats.drop(DropReason::TtlExpired);
                let error = Error::TimeExceeded;
                return answer(
                    peers, routing, stats, tx, icmp, origin, error, packet, now, sink,
                );
            }
            let Some(to) = endpoint else {
                stats.drop(DropReason::NoEndpoint);
                let error = Error::HostUnreachable;
                return answer(
                    peers, routing, stats, tx, icmp, origin, error, packet, now, sink,
                );
            };
            if !listed {
                peers.activate(peer);
            }
            let Some(next) = peers.get_mut(peer) else {
                return stats.drop(DropReason::NoRoute);
            };
            let local = next.local;
            match next.encapsulate(packet, tx) {
                Encap::Send(datagram) => {
                    next.stats.tx_bytes += datagram.len() as u64;
                    next.stats.tx_packets += 1;
                    stats.tx_datagrams += 1;
                    if matches!(rule, Rule::Egress { .. }) {
                        stats.egress_hits += 1;
                    }
                    match origin {
                        Origin::Peer(_) => stats.forwarded_peer += 1,
                        Origin::Host => stats.forwarded_host += 1,
                    }
                    sink.send_from(to, local, datagram);
                }
                Encap::Waiting { queued, initiation } => {
                    next.worked(now);
                    if queued {
                        stats.queued += 1;
                    } else {
                        stats.drop(DropReason::QueueFull);
                    }
                    if let Some(init) = initiation {
                        next.stats.tx_bytes += init.len() as u64;
                        stats.tx_datagrams += 1;
                        sink.send_from(to, local, init);
                    }
                }
                Encap::Drop(reason) => stats.drop(reason),
            }
        }
        Verdict::Host => {
            if sink.local(packet) {
                stats.forwarded_local += 1;
            } else {
                stats.drop(DropReason::LocalUnavailable);
            }
        }
        Verdict::Local => {
            let refused = match local {
                // IPv4 fragments of a small datagram the stack puts together;
                // IPv6 ones, and those of a larger datagram, it never takes.
                Some(_) if packet::is_fragment(packet) && !LocalStack::reassembles(packet) => {
                    Some(DropReason::LocalFragment)
                }
                Some(stack) => (!stack.receive(packet)).then_some(DropReason::LocalQueueFull),
                None => (!sink.local(packet)).then_some(DropReason::LocalUnavailable),
            };
            match refused {
                None => stats.forwarded_local += 1,
                Some(reason) => stats.drop(reason),
            }
        }
        Verdict::Drop { reason, wake } => {
            stats.drop(reason);
            // Counted for the peer too: its status shows it, not only the
            // tunnel's total.
            if let Origin::Peer(p) = origin {
                if let Some(sender) = peers.get_mut(p) {
                    match reason {
                        DropReason::SpoofedSource => sender.stats.spoofed += 1,
                        DropReason::EgressDown => sender.stats.egress_down += 1,
                        _ => {}
                    }
                }
            }
            if reason == DropReason::NoRoute {
                let error = Error::HostUnreachable;
                answer(
                    peers, routing, stats, tx, icmp, origin, error, packet, now, sink,
                );
            }
            // Wake the gateways, each where it was last heard from: the packet is
            // gone, but the next ones find a session with whichever answers
            // first, in failover order. Nothing but a handshake initiation goes
            // to them, and boringtun starts one only if none is under way.
            let gateways = wake.and_then(|i| routing.egress.get(i));
            for &g in gateways.map(|e| e.gateways.as_slice()).unwrap_or_default() {
                let Some(to) = peers.get(g).and_then(|p| p.endpoint) else {
                    continue;
                };
                peers.activate(g);
                let Some(gateway) = peers.get_mut(g) else {
                    continue;
                };
                gateway.worked(now);
                let local = gateway.local;
                if let Some(init) = gateway.initiate(tx) {
                    gateway.stats.tx_bytes += init.len() as u64;
                    stats.tx_datagrams += 1;
                    sink.send_from(to, local, init);
                }
            }
        }
    }
}

/// Answers a peer's packet that went no further with the ICMP `error`, from the
/// tunnel's own address of its family, within the tunnel's error budget, and
/// routed as the host's own packet to the packet's source. Only a source the
/// sender owns is answered: a gateway may send from any address towards its
/// pool (rule 2), and an error must not go to an address it chose. Nothing
/// answers the host's own packets.
#[allow(clippy::too_many_arguments)]
#[cold]
fn answer(
    peers: &mut Peers,
    routing: &RoutingState,
    stats: &mut TunnelStats,
    tx: &mut [u8],
    budget: &mut ErrorBudget,
    origin: Origin,
    error: Error,
    packet: &[u8],
    now: Instant,
    sink: &mut impl Sink,
) {
    let Origin::Peer(sender) = origin else {
        return;
    };
    let Ok(header) = packet::parse(packet) else {
        return;
    };
    if routing.routes.lookup(header.src) != Some(&sender) {
        return;
    }
    let Some(&from) = routing
        .local
        .iter()
        .find(|a| a.is_ipv4() == header.src.is_ipv4())
    else {
        return;
    };
    let mut out = [0u8; icmp::ERROR_MAX];
    let Some(len) = icmp::build(error, packet, from, &mut out) else {
        return;
    };
    // The sender's share and the tunnel's: one peer's flood leaves the
    // tunnel's other errors to its other peers.
    let Some(share) = peers.get_mut(sender).map(|p| &mut p.icmp) else {
        return;
    };
    if !icmp::take_shares(Some(share), budget, now) {
        return;
    }
    // Counted once it leaves for the sender, or waits for its handshake.
    let before = stats.forwarded_host + stats.queued;
    route(
        peers,
        routing,
        stats,
        tx,
        budget,
        None,
        Origin::Host,
        &mut out[..len],
        now,
        sink,
    );
    if stats.forwarded_host + stats.queued > before {
        stats.icmp_errors += 1;
    }
}
