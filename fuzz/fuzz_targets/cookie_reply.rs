//! The bench routers' cookie-reply opener on arbitrary bytes: the first 148 are
//! the initiation it answers, the rest the reply. No panic; a cookie that opens
//! can be written into the initiation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgplane::bench::cookie::{write_mac2, CookieOpener, INITIATION_LEN};

fuzz_target!(|data: &[u8]| {
    let responder = boringtun::x25519::PublicKey::from([9u8; 32]);
    let opener = CookieOpener::new(&responder);
    let mut initiation = [0u8; INITIATION_LEN];
    let split = data.len().min(INITIATION_LEN);
    initiation[..split].copy_from_slice(&data[..split]);
    if let Some(cookie) = opener.open(&data[split..], &initiation) {
        write_mac2(&mut initiation, &cookie);
    }
});
