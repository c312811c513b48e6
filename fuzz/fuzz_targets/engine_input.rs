//! Arbitrary datagrams from strangers and arbitrary inner packets from an
//! authenticated phone and gateway, fed to a KTN tunnel engine, with genuine
//! handshake initiations of the phone (which random bytes never forge past
//! mac1) sent as they are, damaged by the input, or from a stranger's address.
//! The engine must never panic, and a packet from the phone may only ever leave
//! towards the gateway (the hub's own ICMP error about it goes back to the phone).
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use wgplane::core::harness::{Collect, Ktn};
use wgplane::core::packet;

/// `bytes` as an inner packet: an IPv4 header's checksum is set unless the
/// selector's top bit says otherwise, so that arbitrary headers reach routing.
fn checked(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut packet = bytes.to_vec();
    if selector & 0x80 == 0 {
        packet::build::fix_ipv4_checksum(&mut packet);
    }
    packet
}

fuzz_target!(|chunks: Vec<(u8, Vec<u8>)>| {
    // Handshakes cost milliseconds; build one tunnel per input anyway so that no
    // state leaks between inputs (libFuzzer needs reproducible runs).
    static START: OnceLock<Instant> = OnceLock::new();
    let now = *START.get_or_init(Instant::now);
    let mut ktn = Ktn::new(now);
    let stranger = "198.18.0.77:4444".parse().expect("literal");
    let server: std::net::IpAddr = "10.100.0.1".parse().expect("literal");
    for (selector, bytes) in chunks.iter().take(64) {
        let mut out = Collect::default();
        match selector % 5 {
            0 => ktn.engine.handle_datagram(stranger, bytes, now, &mut out),
            3 | 4 => {
                // The phone's next initiation; the input's bytes, if any, are
                // XORed in from the offset its first byte names.
                if let Some(mut init) = ktn.phone.initiation() {
                    if let Some((&at, mask)) = bytes.split_first() {
                        let len = init.len();
                        for (i, m) in mask.iter().enumerate() {
                            init[(usize::from(at) + i) % len] ^= m;
                        }
                    }
                    let from = if selector % 5 == 3 {
                        ktn.phone.addr
                    } else {
                        stranger
                    };
                    ktn.engine.handle_datagram(from, &init, now, &mut out);
                    // An answer (a response or a cookie) goes back to the sender.
                    assert!(
                        out.sent.iter().all(|(to, _)| *to == from),
                        "answered elsewhere"
                    );
                }
            }
            1 => {
                if let Some(d) = ktn.phone.encrypt(&checked(*selector, bytes)) {
                    ktn.engine
                        .handle_datagram(ktn.phone.addr, &d, now, &mut out);
                    for (to, d) in &out.sent {
                        if *to == ktn.phone.addr {
                            // Only the hub's own ICMP error about the packet
                            // (no hop left) goes back to the phone.
                            let error = ktn.phone.decrypt(d).expect("a data packet");
                            let header = packet::parse(&error).expect("a packet");
                            assert_eq!(header.src, server, "only the hub answers");
                            assert_eq!(error.get(9), Some(&1), "and only with ICMP");
                            continue;
                        }
                        assert_eq!(*to, ktn.gateway.addr, "phone traffic leaked");
                    }
                    assert!(out.local.is_empty(), "phone reached the appliance");
                }
            }
            _ => {
                if let Some(d) = ktn.gateway.encrypt(&checked(*selector, bytes)) {
                    ktn.engine
                        .handle_datagram(ktn.gateway.addr, &d, now, &mut out);
                }
            }
        }
        if selector % 5 == 0 {
            assert!(
                out.sent.iter().all(|(_, d)| d.first() == Some(&3)),
                "only cookies go to strangers"
            );
        }
    }
    let mut out = Collect::default();
    ktn.engine.handle_timers(now, &mut out);
});
