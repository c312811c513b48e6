//! Everything a caller puts in an API request before a handler sees it: the body
//! (decoded as the handlers decode it), the query string, path ids and keys,
//! and the `Accept-Encoding` of a scrape.
//! Never a panic; every refusal is a 4xx that names a field or the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgplane::api::{decode_json, decode_query, ApiError, RouteQuery};
use wgplane::control::model::{
    ClientRequest, EgressRequest, ForwardRequest, Id, RouterRequest, TenantRequest,
};

fn refused_well(e: ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    assert!(
        e.field.is_some() || e.code == "invalid_body",
        "an error names its field or the body: {e:?}"
    );
}

fn body<T: serde::de::DeserializeOwned>(data: &[u8]) {
    if let Err(e) = decode_json::<T>(data) {
        refused_well(e);
    }
}

/// `Accept-Encoding`: the order of the items does not matter, a refusal of
/// gzip added anywhere wins, and gzip is only ever sent to a client that
/// named it or `*`.
fn accept_encoding(text: &str) {
    use wgplane::api::accepts_gzip;
    let lines: Vec<&str> = text.split('\n').collect();
    let accepted = accepts_gzip(lines.iter().copied());
    let items: Vec<&str> = lines.iter().flat_map(|l| l.split(',')).collect();
    let reversed: Vec<&str> = items.iter().rev().copied().collect();
    assert_eq!(accepts_gzip([reversed.join(",").as_str()]), accepted, "{text:?}");
    let refused = format!("{},gzip;q=0", items.join(","));
    assert!(!accepts_gzip([refused.as_str()]), "{refused:?}");
    if accepted {
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("gzip") || lower.contains('*'), "{text:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    body::<TenantRequest>(data);
    body::<RouterRequest>(data);
    body::<ClientRequest>(data);
    body::<EgressRequest>(data);
    body::<ForwardRequest>(data);
    let text = String::from_utf8_lossy(data);
    if let Err(e) = decode_query::<RouteQuery>(&text) {
        refused_well(e);
    }
    if let Ok(id) = Id::parse(&text, "router_id") {
        assert!(!id.as_str().is_empty() && id.as_str().len() <= 64);
        assert!(id.as_str() != "." && id.as_str() != "..");
    }
    let _ = wgplane::keys::decode(&text);
    accept_encoding(&text);
});
