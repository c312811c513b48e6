//! The userspace stack (smoltcp) that answers a tunnel's server address: what
//! any router can send it (TCP, ICMP, UDP, IPv6, broken headers), mixed with the
//! management forwards' own connections, sends, reads, closes and aborts, over
//! simulated time. The stack must never panic, and everything it sends must
//! come from its own addresses and parse as an IP packet.
//!
//! Inputs are patched to reach the stack at all: the addresses set to a
//! router's and the server's, and the checksums filled, unless the input asks
//! for its bytes as they are.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wgplane::core::netstack::LocalStack;
use wgplane::core::packet;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 100, 1, 1);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x7770, 0xa64, 0, 0, 0, 0, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x7770, 0xa64, 0, 0, 0, 0, 0x101);

#[derive(Arbitrary, Debug)]
enum Op {
    /// A packet from the router; `raw` keeps its bytes as they are.
    Packet {
        bytes: Vec<u8>,
        raw: bool,
    },
    /// Time passes by this many milliseconds, then the stack runs.
    Wait(u16),
    /// A management forward connects to the router's port.
    Connect(u16),
    /// Writes to the n-th connection opened.
    Send(u8, Vec<u8>),
    /// Reads from the n-th connection opened.
    Recv(u8),
    Close(u8),
    Abort(u8),
}

fuzz_target!(|ops: Vec<Op>| {
    static START: OnceLock<Instant> = OnceLock::new();
    let mut now = *START.get_or_init(Instant::now);
    let mut stack = LocalStack::new(SERVER, 16, now).with_ipv6(SERVER6);
    let mut conns = Vec::new();
    let mut buf = vec![0u8; 4096];
    for op in ops.into_iter().take(256) {
        match op {
            Op::Packet { mut bytes, raw } => {
                if !raw {
                    patch(&mut bytes);
                }
                let _ = stack.receive(&bytes);
            }
            Op::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
            Op::Connect(port) => {
                if let Ok(id) = stack.connect(SocketAddrV4::new(ROUTER, port), now) {
                    conns.push(id);
                }
            }
            Op::Send(n, data) => {
                if let Some(id) = pick(&conns, n) {
                    let _ = stack.send(id, &data);
                }
            }
            Op::Recv(n) => {
                if let Some(id) = pick(&conns, n) {
                    let _ = stack.recv(id, &mut buf);
                }
            }
            Op::Close(n) => {
                if let Some(id) = pick(&conns, n) {
                    stack.close(id);
                }
            }
            Op::Abort(n) => {
                if let Some(id) = pick(&conns, n) {
                    stack.abort(id);
                }
            }
        }
        stack.poll(now);
        while let Some(out) = stack.poll_transmit() {
            let header = packet::parse(&out).expect("the stack sends IP packets");
            assert!(
                header.src == IpAddr::V4(SERVER) || header.src == IpAddr::V6(SERVER6),
                "the stack sent from {}",
                header.src
            );
            stack.recycle(out);
        }
    }
});

fn pick(conns: &[u32], n: u8) -> Option<u32> {
    match conns.len() {
        0 => None,
        len => conns.get(usize::from(n) % len).copied(),
    }
}

/// Makes `bytes` a packet from the router to the server, checksums filled.
fn patch(bytes: &mut Vec<u8>) {
    use smoltcp::wire::{
        Icmpv4Packet, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
        UdpPacket,
    };
    let Some(first) = bytes.first() else { return };
    let (src, dst, proto, payload) = match first >> 4 {
        4 if bytes.len() >= 20 => {
            let len = bytes.len() as u16;
            let mut p = Ipv4Packet::new_unchecked(&mut bytes[..]);
            p.set_header_len(20);
            p.set_total_len(len);
            p.set_src_addr(ROUTER);
            p.set_dst_addr(SERVER);
            p.fill_checksum();
            let proto = p.next_header();
            (IpAddress::Ipv4(ROUTER), IpAddress::Ipv4(SERVER), proto, 20)
        }
        6 if bytes.len() >= 40 => {
            let len = (bytes.len() - 40) as u16;
            let mut p = Ipv6Packet::new_unchecked(&mut bytes[..]);
            p.set_payload_len(len);
            p.set_src_addr(ROUTER6);
            p.set_dst_addr(SERVER6);
            let proto = p.next_header();
            (
                IpAddress::Ipv6(ROUTER6),
                IpAddress::Ipv6(SERVER6),
                proto,
                40,
            )
        }
        _ => return,
    };
    let body = &mut bytes[payload..];
    match proto {
        IpProtocol::Tcp if body.len() >= 20 => {
            TcpPacket::new_unchecked(body).fill_checksum(&src, &dst)
        }
        IpProtocol::Udp if body.len() >= 8 => {
            let len = body.len() as u16;
            let mut p = UdpPacket::new_unchecked(body);
            p.set_len(len);
            p.fill_checksum(&src, &dst);
        }
        IpProtocol::Icmp if body.len() >= 8 => Icmpv4Packet::new_unchecked(body).fill_checksum(),
        IpProtocol::Icmpv6 if body.len() >= 8 => {
            Icmpv6Packet::new_unchecked(body).fill_checksum(&ROUTER6, &SERVER6)
        }
        _ => {}
    }
}
