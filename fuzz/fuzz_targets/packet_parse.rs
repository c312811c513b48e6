//! The inner-packet parser on arbitrary bytes (IPv4 headers with their
//! checksum set or not): no panic, and a parsed length fits; nor do the
//! fragment and ICMP-error probes panic. What the router then does to a parsed packet (its hop lowered, an ICMP
//! error built about it) never panics either, and an error is a packet the
//! parser takes, addressed to the packet's source.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgplane::core::icmp::{self, Error};
use wgplane::core::packet;

fuzz_target!(|input: &[u8]| {
    // The first byte says whether an IPv4 header's checksum is set first, so
    // that both the check and what lies past it are reached.
    let Some((&fix, data)) = input.split_first() else {
        return;
    };
    let mut data = data.to_vec();
    if fix & 1 == 1 {
        packet::build::fix_ipv4_checksum(&mut data);
    }
    let data = &data[..];
    let Ok(header) = packet::parse(data) else {
        return;
    };
    assert!(header.len <= data.len());
    let _ = packet::is_fragment(&data[..header.len]);
    let _ = icmp::is_error(&data[..header.len]);
    let mut hop = data[..header.len].to_vec();
    let _ = icmp::decrement_hop_limit(&mut hop);
    let mut out = [0u8; icmp::ERROR_MAX];
    let from = if header.src.is_ipv4() {
        "10.100.0.1".parse().unwrap()
    } else {
        "fd77:7770:a64::1".parse().unwrap()
    };
    for error in [Error::TimeExceeded, Error::HostUnreachable] {
        if let Some(len) = icmp::build(error, &data[..header.len], from, &mut out) {
            let answer = packet::parse(&out[..len]).expect("an error is a well-formed packet");
            assert_eq!((answer.src, answer.dst, answer.len), (from, header.src, len));
        }
    }
});
