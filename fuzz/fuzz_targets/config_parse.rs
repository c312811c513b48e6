//! The config parser on arbitrary text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = wgplane::config::Settings::parse(text, std::path::Path::new("fuzz.toml"));
});
