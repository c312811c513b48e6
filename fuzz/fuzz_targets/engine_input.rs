//! Arbitrary datagrams from strangers and arbitrary inner packets from an
//! authenticated phone and gateway, fed to a KTN tunnel engine. The engine must
//! never panic, and a packet from the phone may only ever leave towards the gateway.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use wgplane::core::harness::{Collect, Ktn};

fuzz_target!(|chunks: Vec<(u8, Vec<u8>)>| {
    // Handshakes cost milliseconds; build one tunnel per input anyway so that no
    // state leaks between inputs (libFuzzer needs reproducible runs).
    static START: OnceLock<Instant> = OnceLock::new();
    let now = *START.get_or_init(Instant::now);
    let mut ktn = Ktn::new(now);
    let stranger = "198.18.0.77:4444".parse().expect("literal");
    for (selector, bytes) in chunks.iter().take(64) {
        let mut out = Collect::default();
        match selector % 3 {
            0 => ktn.engine.handle_datagram(stranger, bytes, now, &mut out),
            1 => {
                if let Some(d) = ktn.phone.encrypt(bytes) {
                    ktn.engine
                        .handle_datagram(ktn.phone.addr, &d, now, &mut out);
                    for (to, _) in &out.sent {
                        assert_eq!(*to, ktn.gateway.addr, "phone traffic leaked");
                    }
                    assert!(out.local.is_empty(), "phone reached the appliance");
                }
            }
            _ => {
                if let Some(d) = ktn.gateway.encrypt(bytes) {
                    ktn.engine
                        .handle_datagram(ktn.gateway.addr, &d, now, &mut out);
                }
            }
        }
        if selector % 3 == 0 {
            assert!(
                out.sent.iter().all(|(_, d)| d.first() == Some(&3)),
                "only cookies go to strangers"
            );
        }
    }
    let mut out = Collect::default();
    ktn.engine.handle_timers(now, &mut out);
});
