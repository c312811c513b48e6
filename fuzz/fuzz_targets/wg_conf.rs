//! wg-quick server configurations on arbitrary text, planned for import (with
//! and without a KTN pool) and applied to a registry: refusals, never panics;
//! every planned router has its address in the planned subnet and every client
//! in the pool; a registry takes every plan whole; the private key never shows
//! in an error or a note.
#![no_main]

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use wgplane::control::import::{plan, ImportError, Options};
use wgplane::control::model::Id;
use wgplane::control::registry::{AllocPolicy, Registry};
use wgplane::control::wgconf;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let conf = match wgconf::parse(text) {
        Ok(conf) => conf,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let secret = conf.interface.private_key.as_ref().map(|k| k.to_base64());
    let ktn = Options {
        pool: Some("10.200.0.0/24".parse().expect("literal")),
        gateways: vec!["10.100.0.40".parse().expect("literal")],
        ..Options::default()
    };
    let given = Options {
        subnet: Some("10.100.0.0/16".parse().expect("literal")),
        ..ktn.clone()
    };
    for options in [Options::default(), ktn, given] {
        let planned = match plan(&conf, &options) {
            Ok(p) => p,
            Err(ImportError::Refused(problems)) => {
                if let Some(secret) = &secret {
                    assert!(problems.iter().all(|p| !p.contains(secret.as_str())));
                }
                continue;
            }
        };
        if let Some(secret) = &secret {
            assert!(planned.notes.iter().all(|n| !n.contains(secret.as_str())));
        }
        for r in &planned.routers {
            let ip: std::net::Ipv4Addr = r
                .request
                .vpn_ip
                .as_deref()
                .and_then(|v| v.parse().ok())
                .expect("a planned router has an IPv4 vpn_ip");
            assert!(planned.subnet.contains(&ip));
        }
        for c in &planned.clients {
            let ip: std::net::Ipv4Addr = c
                .request
                .vpn_ip
                .as_deref()
                .and_then(|v| v.parse().ok())
                .expect("a planned client has an IPv4 vpn_ip");
            assert!(options.pool.is_some_and(|p| p.contains(&ip)));
        }
        // A plan is rehearsed on an empty registry: one like it takes all of it.
        let mut registry = Registry::new(AllocPolicy::default(), 1);
        let t = Id::parse("t", "tenant_id").expect("literal");
        registry
            .put_tenant(&t, &planned.tenant, SystemTime::UNIX_EPOCH)
            .expect("a planned tenant is taken");
        for r in &planned.routers {
            registry
                .put_router(&t, &r.id, &r.request)
                .expect("a planned router is taken");
        }
        if let Some(egress) = &planned.egress {
            registry
                .put_egress(&t, egress)
                .expect("a planned egress policy is taken");
        }
        for c in &planned.clients {
            registry
                .put_client(&t, &c.id, &c.request)
                .expect("a planned client is taken");
        }
    }
});
