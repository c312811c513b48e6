//! API request bodies on arbitrary JSON, applied to a registry: validation errors,
//! never panics, and a refused request leaves no trace.
#![no_main]

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use wgplane::control::model::{ClientRequest, EgressRequest, Id, RouterRequest, TenantRequest};
use wgplane::control::registry::{AllocPolicy, Registry};

fuzz_target!(|data: &[u8]| {
    let mut registry = Registry::new(AllocPolicy::default(), 1);
    let t = Id::parse("t", "tenant_id").expect("literal");
    let r = Id::parse("r", "router_id").expect("literal");
    let now = SystemTime::UNIX_EPOCH;
    if let Ok(req) = serde_json::from_slice::<TenantRequest>(data) {
        let _ = registry.put_tenant(&t, &req, now);
    }
    let _ = registry.put_tenant(&t, &TenantRequest::default(), now);
    if let Ok(req) = serde_json::from_slice::<RouterRequest>(data) {
        let _ = registry.put_router(&t, &r, &req);
    }
    if let Ok(req) = serde_json::from_slice::<EgressRequest>(data) {
        let _ = registry.put_egress(&t, &req);
    }
    if let Ok(req) = serde_json::from_slice::<ClientRequest>(data) {
        let before = registry.tenant(&t).map(|x| x.clients.len()).unwrap_or(0);
        if registry.put_client(&t, &r, &req).is_err() {
            let after = registry.tenant(&t).map(|x| x.clients.len()).unwrap_or(0);
            assert_eq!(before, after);
        }
    }
});
