//! The tunnel's userspace stack: only its packets run it, and what it cannot take is counted.

use super::*;

/// Transit between peers leaves the local stack alone; a packet for the
/// stack runs it at once, and its answer leaves in the same call.
#[test]
fn only_packets_for_the_stack_run_it() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;

    let now = Instant::now();
    let server = IpAddr::from([10, 100, 0, 1]);
    let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1, 2]);
    let r1 = &mut routers[0];
    let polls = |e: &mut TunnelEngine| e.local_stack().map_or(0, |s| s.polls());
    let before = polls(&mut engine);

    let transit = ip_packet([10, 100, 1, 1].into(), [10, 100, 1, 2].into(), 100);
    let mut out = Collect::default();
    for _ in 0..100 {
        let datagram = r1.encrypt(&transit).unwrap();
        engine.handle_datagram(r1.addr, &datagram, now, &mut out);
    }
    assert_eq!(engine.stats().forwarded_peer, 100);
    assert_eq!(polls(&mut engine), before, "transit polled the stack");

    // Protocol 253 to the stack: it answers (ICMP protocol unreachable).
    let local = ip_packet([10, 100, 1, 1].into(), server, 8);
    let datagram = r1.encrypt(&local).unwrap();
    let mut out = Collect::default();
    engine.handle_datagram(r1.addr, &datagram, now, &mut out);
    assert_eq!(engine.stats().forwarded_local, 1);
    assert_eq!(polls(&mut engine), before + 1);
    assert!(out.sent.iter().any(|(to, _)| *to == r1.addr), "answered");
}

/// A packet the stack's full input queue refuses is a drop of its own,
/// not a local delivery.
#[test]
fn a_full_stack_queue_is_counted_as_a_drop() {
    use crate::core::harness::Collect;
    use crate::core::packet::build::ip_packet;

    let now = Instant::now();
    let server = IpAddr::from([10, 100, 0, 1]);
    let (mut engine, mut routers) = engine_with_stack_and_routers(now, &[1]);
    let r1 = &mut routers[0];
    let packet = ip_packet([10, 100, 1, 1].into(), server, 8);
    if let Some(stack) = engine.local_stack() {
        while stack.receive(&packet) {}
    }
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
    assert_eq!(engine.stats().dropped(DropReason::LocalQueueFull), 1);
    assert_eq!(engine.stats().forwarded_local, 0);
    // The stack ran and took the queue in: the next packet is delivered.
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Collect::default());
    assert_eq!(engine.stats().forwarded_local, 1);
}

/// A packet for the tunnel's own address that nothing takes (no userspace
/// stack, and the host device refuses it: absent, or its batch full) is
/// dropped and counted as `local_unavailable`, not lost silently.
#[test]
fn a_local_packet_nothing_takes_is_counted_as_local_unavailable() {
    use crate::core::packet::build::ip_packet;

    struct Refusing;
    impl Sink for Refusing {
        fn send(&mut self, _: SocketAddr, _: &[u8]) {}
        fn local(&mut self, _: &[u8]) -> bool {
            false
        }
    }
    let now = Instant::now();
    let (mut engine, mut r1) = one_client();
    // The host answers the tenant's subnet (TUN mode sets this).
    engine.set_host_sources(&["10.100.0.0/16".parse().unwrap()]);
    assert!(r1.handshake(&mut engine, now));
    let packet = ip_packet([10, 100, 1, 1].into(), [10, 100, 0, 1].into(), 8);
    let datagram = r1.encrypt(&packet).unwrap();
    engine.handle_datagram(r1.addr, &datagram, now, &mut Refusing);
    assert_eq!(engine.stats().dropped(DropReason::LocalUnavailable), 1);
    assert_eq!(engine.stats().forwarded_local, 0);
}
