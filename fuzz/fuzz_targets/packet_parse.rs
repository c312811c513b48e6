//! The inner-packet parser on arbitrary bytes: no panic, and a parsed length fits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = wgplane::core::packet::parse(data) {
        assert!(header.len <= data.len());
    }
});
