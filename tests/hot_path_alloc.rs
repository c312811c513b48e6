//! The per-packet path allocates nothing: a counting global allocator watches a
//! steady-state KTN flow through the engine, phone -> gateway by the egress rule
//! and the gateway's answers back to the phone, decrypt + route + encrypt each;
//! and a router's pings to the server address, answered by the userspace stack.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use wgplane::core::engine::{Sink, TunnelEngine};
use wgplane::core::harness::{Ktn, MemoryClient};
use wgplane::core::packet::build::ip_packet;

struct Counting;

thread_local! {
    /// Only the measuring thread's allocations count (the test harness has others).
    static WATCHED: Cell<bool> = const { Cell::new(false) };
    /// The watched allocations of this thread.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    if WATCHED.with(Cell::get) {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
    }
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is passed to the system allocator unchanged; the counter
// and the thread-local flag neither allocate nor touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Counts what leaves, keeps nothing.
struct Tally {
    to_gateway: usize,
    to_phone: usize,
    gateway: SocketAddr,
}

impl Sink for Tally {
    fn send(&mut self, to: SocketAddr, _datagram: &[u8]) {
        if to == self.gateway {
            self.to_gateway += 1;
        } else {
            self.to_phone += 1;
        }
    }
    fn local(&mut self, _packet: &[u8]) -> bool {
        false
    }
}

#[test]
fn forwarding_allocates_nothing() {
    let now = Instant::now();
    let mut ktn = Ktn::new(now);
    let phone_ip = IpAddr::from([10, 200, 0, 2]);
    let internet = IpAddr::from([198, 18, 0, 1]);
    let out = ip_packet(phone_ip, internet, 1380);
    let back = ip_packet(internet, phone_ip, 1380);
    // Encrypted up front: the peers' work is not the engine's.
    let outbound: Vec<Vec<u8>> = (0..500)
        .map(|_| ktn.phone.encrypt(&out).expect("phone session"))
        .collect();
    let inbound: Vec<Vec<u8>> = (0..500)
        .map(|_| ktn.gateway.encrypt(&back).expect("gateway session"))
        .collect();
    let mut sink = Tally {
        to_gateway: 0,
        to_phone: 0,
        gateway: ktn.gateway.addr,
    };
    let (phone, gateway) = (ktn.phone.addr, ktn.gateway.addr);
    // Warm-up: replay windows, maps and buffers settle.
    for (o, i) in outbound.iter().zip(&inbound).take(20) {
        ktn.engine.handle_datagram(phone, o, now, &mut sink);
        ktn.engine.handle_datagram(gateway, i, now, &mut sink);
    }

    WATCHED.with(|w| w.set(true));
    for (o, i) in outbound.iter().zip(&inbound).skip(20) {
        ktn.engine.handle_datagram(phone, o, now, &mut sink);
        ktn.engine.handle_datagram(gateway, i, now, &mut sink);
    }
    WATCHED.with(|w| w.set(false));

    assert_eq!(
        (sink.to_gateway, sink.to_phone),
        (500, 500),
        "all forwarded"
    );
    assert_eq!(allocations(), 0, "allocations on the per-packet path");

    // The counter itself works: one watched allocation is seen.
    WATCHED.with(|w| w.set(true));
    let probe = std::hint::black_box(vec![0u8; 64]);
    WATCHED.with(|w| w.set(false));
    assert_eq!(allocations(), 1, "{}", probe.len());
}

/// An ICMP echo request from `src` to `dst`.
fn ping(src: IpAddr, dst: IpAddr, seq: u16) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    wgplane::core::packet::build::icmp_echo_request(src, dst, seq)
}

#[test]
fn pings_to_the_server_address_allocate_nothing() {
    let now = Instant::now();
    let secret = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = boringtun::x25519::PublicKey::from(&secret);
    let server = IpAddr::from([10, 100, 0, 1]);
    let mut engine =
        TunnelEngine::new(secret, vec![server]).with_local_stack([10, 100, 0, 1].into(), 16, now);
    let router_ip = IpAddr::from([10, 100, 1, 1]);
    let mut router = MemoryClient::new(&public, 7, SocketAddr::from(([192, 0, 2, 7], 7)));
    router.register(&mut engine, &[router_ip.into()], 1);
    assert!(router.handshake(&mut engine, now));
    let pings: Vec<Vec<u8>> = (0..500)
        .map(|seq| {
            router
                .encrypt(&ping(router_ip, server, seq))
                .expect("session")
        })
        .collect();
    let mut sink = Tally {
        to_gateway: 0,
        to_phone: 0,
        gateway: router.addr,
    };
    for p in pings.iter().take(20) {
        engine.handle_datagram(router.addr, p, now, &mut sink);
    }

    WATCHED.with(|w| w.set(true));
    for p in pings.iter().skip(20) {
        engine.handle_datagram(router.addr, p, now, &mut sink);
    }
    WATCHED.with(|w| w.set(false));

    assert_eq!(sink.to_gateway, 500, "every ping answered");
    assert_eq!(allocations(), 0, "allocations on the local stack's path");
}
