//! The registry's rules, one scenario per test.

use std::time::SystemTime;

use super::*;
use crate::control::model::{ClientRequest, EgressRequest, RouterRequest, TenantRequest};

/// An egress policy: `pool` leaves through the one router `gateway`.
fn egress(pool: &str, gateway: &str) -> EgressRequest {
    EgressRequest {
        pool: pool.into(),
        gateways: vec![gateway.into()],
    }
}

/// An empty registry with the seed's allocation policy.
pub(crate) fn registry() -> Registry {
    Registry::new(AllocPolicy::default(), 7)
}
fn id(s: &str) -> Id {
    Id::parse(s, "id").unwrap()
}
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

/// A state the API built: tenant a with a router, a gateway, a pool and a
/// client; tenant b with a router.
fn built_state() -> Vec<Tenant> {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    for (t, p) in [("a", "r1"), ("a", "gw"), ("b", "r1")] {
        r.put_router(&id(t), &id(p), &Default::default()).unwrap();
    }
    let egress = egress("10.200.0.0/24", "gw");
    r.put_egress(&id("a"), &egress).unwrap();
    r.put_client(&id("a"), &id("phone"), &Default::default())
        .unwrap();
    r.tenants().cloned().collect()
}

fn restored(tenants: Vec<Tenant>) -> Result<Registry, ControlError> {
    Registry::restore(registry().policy, 9, tenants)
}

#[test]
fn a_restored_state_is_checked_against_the_apis_rules() {
    assert!(restored(built_state()).is_ok());
    type Breakage = fn(&mut [Tenant]);
    let cases: [(&str, Breakage, &str); 10] = [
        (
            "host prefix in the tenants' IPv6 range",
            |t| t[1].host_prefixes = vec!["fd77:7770:a64::/64".parse().unwrap()],
            "overlaps the tenants' IPv6 range",
        ),
        (
            "subnet overlap",
            |t| t[1].subnet = "10.100.128.0/17".parse().unwrap(),
            "overlaps 10.100.0.0/16 of tenant a",
        ),
        (
            "pool overlap",
            |t| t[1].subnet = "10.200.0.0/16".parse().unwrap(),
            "overlaps 10.200.0.0/24 of tenant a",
        ),
        (
            "host prefix",
            |t| t[1].host_prefixes = vec!["10.200.0.0/25".parse().unwrap()],
            "host prefix 10.200.0.0/25 overlaps",
        ),
        (
            "router outside",
            |t| t[0].routers.get_mut(&id("r1")).unwrap().vpn_ip = Ipv4Addr::new(10, 101, 1, 9),
            "router r1 has 10.101.1.9",
        ),
        (
            "same address",
            |t| t[0].routers.get_mut(&id("r1")).unwrap().vpn_ip = t[0].routers[&id("gw")].vpn_ip,
            "both have",
        ),
        (
            "same key",
            |t| {
                t[0].clients.get_mut(&id("phone")).unwrap().public_key =
                    t[0].routers[&id("gw")].public_key
            },
            "the same public key",
        ),
        (
            "missing gateway",
            |t| t[0].egress.as_mut().unwrap().gateways = vec![id("nobody")],
            "gateway nobody is not a router",
        ),
        (
            "client without pool",
            |t| {
                t[0].egress = None;
            },
            "client phone exists without an egress policy",
        ),
        (
            "index out of range",
            |t| t[1].routers.get_mut(&id("r1")).unwrap().index = 0,
            "receiver index 0 of r1 is out of range",
        ),
    ];
    for (what, break_it, expected) in cases {
        let mut state = built_state();
        break_it(&mut state);
        match restored(state) {
            Err(e @ ControlError::Inconsistent { .. }) => {
                let why = e.to_string();
                assert!(why.contains(expected), "{what}: {why}")
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what}: restored"),
        }
    }
    let mut state = built_state();
    let twice = state[0].routers[&id("r1")].index;
    state[1].routers.get_mut(&id("r1")).unwrap().index = twice;
    let second = state[1].id.clone();
    let Err(ControlError::Inconsistent { tenant, reason }) = restored(state) else {
        panic!("index twice: restored");
    };
    assert_eq!(tenant, second);
    let owner = id("r1");
    assert_eq!(
        reason,
        RestoreError::IndexTwice {
            index: twice,
            owner
        }
    );
}

#[test]
fn seed_allocation() {
    let mut r = registry();
    assert_eq!(
        r.put_tenant(&id("a"), &Default::default(), now()),
        Ok(Put::Created)
    );
    assert_eq!(
        r.put_tenant(&id("a"), &Default::default(), now()),
        Ok(Put::Updated)
    );
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    let a = r.tenant(&id("a")).unwrap();
    let b = r.tenant(&id("b")).unwrap();
    assert_eq!(
        (a.subnet.to_string(), a.listen_port),
        ("10.100.0.0/16".into(), 51820)
    );
    assert_eq!(
        (b.subnet.to_string(), b.listen_port),
        ("10.101.0.0/16".into(), 51821)
    );
    assert_eq!(
        (a.interface_name.as_str(), b.interface_name.as_str()),
        ("wg0", "wg1")
    );
    assert_eq!(a.server_ip(), Ipv4Addr::new(10, 100, 0, 1));
}

#[test]
fn undoing_one_router_frees_its_address_and_key() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    let r1 = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
    // r2 is created, then its store write "fails" and it is undone.
    r.put_router(&id("a"), &id("r2"), &Default::default())
        .unwrap();
    let r2 = r.tenant(&id("a")).unwrap().routers[&id("r2")].clone();
    assert_eq!(r2.vpn_ip, Ipv4Addr::new(10, 100, 1, 2));
    r.reinstate_router(&id("a"), &id("r2"), None);
    assert!(!r.tenant(&id("a")).unwrap().routers.contains_key(&id("r2")));
    // Its address and key are free again; r1's are not.
    let reuse = RouterRequest {
        public_key: Some(keys::encode(r2.public_key.as_bytes())),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r3"), &reuse).unwrap();
    let r3 = &r.tenant(&id("a")).unwrap().routers[&id("r3")];
    assert_eq!(r3.vpn_ip, r2.vpn_ip);
    let dup = RouterRequest {
        public_key: Some(keys::encode(r1.public_key.as_bytes())),
        ..Default::default()
    };
    assert!(matches!(
        r.put_router(&id("a"), &id("r4"), &dup),
        Err(ControlError::DuplicateKey { .. })
    ));
    // Nor the tunnel's own key.
    let server = RouterRequest {
        public_key: Some(keys::encode(
            r.tenant(&id("a")).unwrap().public_key.as_bytes(),
        )),
        ..Default::default()
    };
    assert!(matches!(
        r.put_router(&id("a"), &id("r4"), &server),
        Err(ControlError::DuplicateKey { .. })
    ));
    assert!(!r.tenant(&id("a")).unwrap().routers.contains_key(&id("r4")));
    // An update undone puts the old router back, address and key included.
    let moved = RouterRequest {
        vpn_ip: Some("10.100.1.9".into()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &moved).unwrap();
    r.reinstate_router(&id("a"), &id("r1"), Some(r1.clone()));
    let back = RouterRequest {
        vpn_ip: Some("10.100.1.9".into()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r5"), &back).unwrap();
    let taken = RouterRequest {
        vpn_ip: Some("10.100.1.1".into()),
        ..Default::default()
    };
    assert!(r.put_router(&id("a"), &id("r6"), &taken).is_err());
    // Deleting frees the address for the next allocation.
    r.delete_router(&id("a"), &id("r1")).unwrap();
    r.put_router(&id("a"), &id("r7"), &Default::default())
        .unwrap();
    assert_eq!(
        r.tenant(&id("a")).unwrap().routers[&id("r7")].vpn_ip,
        Ipv4Addr::new(10, 100, 1, 1)
    );
}

#[test]
fn a_single_address_a_router_routes_is_never_another_routers() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let extra = |list: &[&str]| RouterRequest {
        allowed_ips: Some(list.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &extra(&["10.100.1.2/32"]))
        .unwrap();
    // Allocation skips it, and it cannot be asked for.
    r.put_router(&id("a"), &id("r2"), &Default::default())
        .unwrap();
    let r2 = r.tenant(&id("a")).unwrap().routers[&id("r2")].vpn_ip;
    assert_eq!(r2, Ipv4Addr::new(10, 100, 1, 3));
    let ask = RouterRequest {
        vpn_ip: Some("10.100.1.2".into()),
        ..Default::default()
    };
    assert!(matches!(
        r.put_router(&id("a"), &id("r3"), &ask),
        Err(ControlError::AddressUnavailable { .. })
    ));
    // Once r1 no longer routes it, it is free again.
    r.put_router(&id("a"), &id("r1"), &extra(&[])).unwrap();
    r.put_router(&id("a"), &id("r3"), &ask).unwrap();
    // The subnet's network and broadcast addresses are nobody's.
    for single in ["10.100.0.0/32", "10.100.255.255"] {
        assert!(
            matches!(
                r.put_router(&id("a"), &id("r4"), &extra(&[single])),
                Err(ControlError::AddressUnavailable { .. })
            ),
            "{single}"
        );
    }
}

/// A router may not route loopback, link-local or multicast ranges (it could
/// send from them and attract them), of either family; ordinary LANs, and
/// larger routes that include such a range, are fine.
/// A name is up to 128 characters, not bytes: a name in Chinese or Amharic
/// fits as one in Latin letters does.
#[test]
fn names_are_counted_in_characters() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let named = |name: String| RouterRequest {
        name: Some(name),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &named("分店".repeat(64)))
        .unwrap();
    r.put_router(&id("a"), &id("r2"), &named("x".repeat(128)))
        .unwrap();
    for name in ["分".repeat(129), String::new(), "a\u{1b}b".into()] {
        let e = r.put_router(&id("a"), &id("r3"), &named(name.clone()));
        assert_eq!(e.unwrap_err().field_name(), Some("name"), "{name:?}");
    }
}

#[test]
fn a_router_routes_no_special_range() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let extra = |net: &str| RouterRequest {
        allowed_ips: Some(vec![net.to_string()]),
        ..Default::default()
    };
    for special in [
        "224.0.0.0/4",
        "224.0.0.5/32",
        "127.0.0.0/8",
        "169.254.1.0/24",
        "0.0.0.0/8",
        "255.255.255.255/32",
        "fe80::/10",
        "ff02::1/128",
        "::1/128",
        "::ffff:0:0/96",
    ] {
        let e = r
            .put_router(&id("a"), &id("r1"), &extra(special))
            .unwrap_err();
        assert!(
            matches!(e, ControlError::AddressUnavailable { .. }),
            "{special}: {e}"
        );
        assert_eq!(e.field_name(), Some("allowed_ips"), "{special}");
    }
    r.put_router(&id("a"), &id("r1"), &extra("192.168.88.0/24"))
        .unwrap();
    r.put_router(&id("a"), &id("r2"), &extra("fd00:88::/64"))
        .unwrap();
    // A larger route that merely includes such a range is a route like any.
    r.put_router(&id("a"), &id("r3"), &extra("64.0.0.0/2"))
        .unwrap();
}

/// Two routers' LANs may neither be the same nor lie one inside the other,
/// whichever comes first (kernel WireGuard would give the overlap to the
/// longer prefix without a word); apart, they are fine.
#[test]
fn routers_lans_may_not_overlap_or_nest() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let extra = |net: &str| RouterRequest {
        allowed_ips: Some(vec![net.to_string()]),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("hq"), &extra("192.168.0.0/16"))
        .unwrap();
    for (router, lan) in [
        ("branch", "192.168.88.0/24"),
        ("same", "192.168.0.0/16"),
        ("wider", "192.0.0.0/8"),
    ] {
        let e = r
            .put_router(&id("a"), &id(router), &extra(lan))
            .unwrap_err();
        assert!(
            matches!(e, ControlError::AddressUnavailable { .. })
                && e.to_string().contains("overlaps another peer's addresses"),
            "{lan}: {e}"
        );
        assert_eq!(e.field_name(), Some("allowed_ips"), "{lan}");
    }
    r.put_router(&id("a"), &id("branch"), &extra("172.16.88.0/24"))
        .unwrap();
    // The router itself may change its own.
    r.put_router(&id("a"), &id("hq"), &extra("192.168.88.0/24"))
        .unwrap();
}

/// A router and a client may have the same id; they are still two peers,
/// and neither may take the other's key (the running tunnel knows its peers
/// by key, and a restore refuses a shared one).
#[test]
fn a_client_named_like_a_router_cannot_take_its_key() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "gw"))
        .unwrap();
    let gw_key = keys::encode(
        r.tenant(&id("a")).unwrap().routers[&id("gw")]
            .public_key
            .as_bytes(),
    );
    let same = ClientRequest {
        public_key: Some(gw_key),
        ..Default::default()
    };
    match r.put_client(&id("a"), &id("gw"), &same) {
        Err(ControlError::DuplicateKey { owner }) => assert_eq!(owner, "router gw"),
        other => panic!("{other:?}"),
    }
    // The other way round: a router named like a client.
    r.put_client(&id("a"), &id("phone"), &Default::default())
        .unwrap();
    let phone_key = keys::encode(
        r.tenant(&id("a")).unwrap().clients[&id("phone")]
            .public_key
            .as_bytes(),
    );
    let same = RouterRequest {
        public_key: Some(phone_key),
        ..Default::default()
    };
    match r.put_router(&id("a"), &id("phone"), &same) {
        Err(ControlError::DuplicateKey { owner }) => assert_eq!(owner, "client phone"),
        other => panic!("{other:?}"),
    }
    // Each may still be put again with its own key.
    assert_eq!(
        r.put_router(&id("a"), &id("gw"), &Default::default()),
        Ok(Put::Updated)
    );
    assert_eq!(
        r.put_client(&id("a"), &id("phone"), &Default::default()),
        Ok(Put::Updated)
    );
    assert!(restored(r.tenants().cloned().collect()).is_ok());
}

/// A deleted phone's address goes to a new phone only after every other
/// free one of the pool: the gateway's NAT may still send the old phone's
/// flows there. Routers keep their dense numbering.
#[test]
fn a_deleted_phones_address_is_handed_out_last() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/29", "gw"))
        .unwrap();
    let ip = |r: &Registry, c: &str| r.tenant(&id("a")).unwrap().clients[&id(c)].vpn_ip;
    for c in ["p1", "p2"] {
        r.put_client(&id("a"), &id(c), &Default::default()).unwrap();
    }
    assert_eq!(ip(&r, "p1"), Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(ip(&r, "p2"), Ipv4Addr::new(10, 200, 0, 3));
    r.delete_client(&id("a"), &id("p2")).unwrap();
    // An undone change builds the tenant's index again: the rotation goes on
    // where it stood (from the highest address held, .2, it would give .3).
    let gw = r.tenant(&id("a")).unwrap().routers[&id("gw")].clone();
    r.reinstate_router(&id("a"), &id("gw"), Some(gw));
    r.delete_client(&id("a"), &id("p1")).unwrap();
    // .4, .5, .6 first (a /29 ends at .7, its broadcast), then .2 and .3.
    for (c, last) in [("p3", 4), ("p4", 5), ("p5", 6), ("p6", 2), ("p7", 3)] {
        r.put_client(&id("a"), &id(c), &Default::default()).unwrap();
        assert_eq!(ip(&r, c), Ipv4Addr::new(10, 200, 0, last), "{c}");
    }
    let e = r.put_client(&id("a"), &id("p8"), &Default::default());
    assert!(matches!(e, Err(ControlError::Exhausted(_))), "{e:?}");
    // Asked for by name, a free address is given at once.
    r.delete_client(&id("a"), &id("p4")).unwrap();
    let ask = ClientRequest {
        vpn_ip: Some("10.200.0.5".into()),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p8"), &ask).unwrap();
    // Routers: the lowest free address, as before.
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    r.delete_router(&id("a"), &id("r1")).unwrap();
    r.put_router(&id("a"), &id("r2"), &Default::default())
        .unwrap();
    let r2 = r.tenant(&id("a")).unwrap().routers[&id("r2")].vpn_ip;
    assert_eq!(r2, Ipv4Addr::new(10, 100, 1, 2));
}

/// A phone may not take its pool's network, broadcast or first host address,
/// and the answer says which of them it asked for.
#[test]
fn a_pools_edge_addresses_are_refused_by_name() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "gw"))
        .unwrap();
    for (ip, reason) in [
        ("10.200.0.0", "the network address"),
        ("10.200.0.255", "the broadcast address"),
        ("10.200.0.1", "first host address"),
    ] {
        let ask = ClientRequest {
            vpn_ip: Some(ip.into()),
            ..Default::default()
        };
        let e = r.put_client(&id("a"), &id("phone"), &ask).unwrap_err();
        assert!(
            matches!(e, ControlError::AddressUnavailable { .. }) && e.to_string().contains(reason),
            "{ip}: {e}"
        );
    }
}

#[test]
fn routers_allocate_and_conflict() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    let r1 = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
    assert_eq!(r1.vpn_ip, Ipv4Addr::new(10, 100, 1, 1));
    assert!(r1.private_key.is_some());
    // Repeating the PUT keeps the generated key and the address.
    assert_eq!(
        r.put_router(&id("a"), &id("r1"), &Default::default()),
        Ok(Put::Updated)
    );
    let again = &r.tenant(&id("a")).unwrap().routers[&id("r1")];
    assert_eq!(again.public_key, r1.public_key);
    assert_eq!(again.index, r1.index);

    let dup = RouterRequest {
        public_key: Some(keys::encode(r1.public_key.as_bytes())),
        ..Default::default()
    };
    assert!(matches!(
        r.put_router(&id("a"), &id("r2"), &dup),
        Err(ControlError::DuplicateKey { .. })
    ));
    for (ip, field) in [
        ("10.100.1.1", "vpn_ip"),
        ("10.101.0.5", "vpn_ip"),
        ("10.100.0.1", "vpn_ip"),
    ] {
        let req = RouterRequest {
            vpn_ip: Some(ip.into()),
            ..Default::default()
        };
        let e = r.put_router(&id("a"), &id("r2"), &req).unwrap_err();
        assert_eq!(e.field_name(), Some(field), "{ip}: {e}");
    }
    let bad = RouterRequest {
        public_key: Some("nope".into()),
        ..Default::default()
    };
    assert_eq!(
        r.put_router(&id("a"), &id("r2"), &bad)
            .unwrap_err()
            .field_name(),
        Some("public_key")
    );
    assert!(!r.tenant(&id("a")).unwrap().routers.contains_key(&id("r2")));
}

#[test]
fn what_the_host_routes_no_tunnel_may_hold_later() {
    let mut r = registry();
    let host = TenantRequest {
        host_prefixes: Some(vec![
            "10.201.0.0/16".into(),
            "10.102.0.0/16".into(),
            "fd00:1::/64".into(),
        ]),
        ..Default::default()
    };
    r.put_tenant(&id("a"), &host, now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    // Another tenant's pool or subnet inside a's host prefix is refused...
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    r.put_router(&id("b"), &id("gw"), &Default::default())
        .unwrap();
    let pool = |p: &str| egress(p, "gw");
    let e = r.put_egress(&id("b"), &pool("10.201.0.0/24")).unwrap_err();
    assert_eq!(e.field_name(), Some("pool"), "{e}");
    let e = r.put_egress(&id("a"), &pool("10.201.5.0/24")).unwrap_err();
    assert_eq!(e.field_name(), Some("pool"), "{e}");
    let subnet = TenantRequest {
        subnet: Some("10.201.128.0/17".into()),
        ..Default::default()
    };
    let e = r.put_tenant(&id("c"), &subnet, now()).unwrap_err();
    assert_eq!(e.field_name(), Some("subnet"), "{e}");
    // ... automatic allocation steps over it (10.100 and 10.101 are a's and b's) ...
    r.put_tenant(&id("d"), &Default::default(), now()).unwrap();
    assert_eq!(
        r.tenant(&id("d")).unwrap().subnet.to_string(),
        "10.103.0.0/16"
    );
    // ... and so does a router's extra prefix in the same tenant.
    let extra = RouterRequest {
        allowed_ips: Some(vec!["10.201.7.0/24".into()]),
        ..Default::default()
    };
    let e = r.put_router(&id("a"), &id("r1"), &extra).unwrap_err();
    assert_eq!(e.field_name(), Some("allowed_ips"), "{e}");
}

/// A state that earlier releases let in (a tenant's host prefix inside its own
/// subnet, or over one of its routers' prefixes; a router's multicast prefix)
/// still starts; what is wrong with it is said, for the log.
#[test]
fn a_tenants_own_overlaps_are_warned_about_not_refused() {
    let mut state = built_state();
    state[0].host_prefixes = vec!["10.100.1.0/24".parse().unwrap()];
    state[1].host_prefixes = vec!["192.168.0.0/16".parse().unwrap()];
    let r1 = state[1].routers.get_mut(&id("r1")).unwrap();
    r1.extra_prefixes = vec![
        "192.168.88.0/24".parse().unwrap(),
        "224.0.0.0/24".parse().unwrap(),
    ];
    let said: Vec<String> = state
        .iter()
        .flat_map(crate::control::restore::warnings)
        .collect();
    assert_eq!(said.len(), 3, "{said:?}");
    assert!(said[0].contains("10.100.0.0/16 overlaps its own host prefix 10.100.1.0/24"));
    assert!(
        said.iter()
            .any(|w| w.contains("router r1 routes 192.168.88.0/24")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|w| w.contains("router r1 routes 224.0.0.0/24, which lies in 224.0.0.0/3")),
        "{said:?}"
    );
    assert!(restored(state).is_ok());
    assert!(crate::control::restore::warnings(&built_state()[0]).is_empty());
}

/// A new tenant's own host prefixes are as taken as anyone's: an automatic
/// subnet steps over them and a given one may not overlap them, so that
/// repeating the same PUT answers the same (it used to create the tenant and
/// then refuse the repeat).
#[test]
fn a_new_tenants_subnet_never_overlaps_its_own_host_prefixes() {
    let mut r = registry();
    let host = |prefix: &str| TenantRequest {
        host_prefixes: Some(vec![prefix.into()]),
        ..Default::default()
    };
    let req = host("10.100.0.0/16");
    assert_eq!(r.put_tenant(&id("a"), &req, now()).unwrap(), Put::Created);
    let a = r.tenant(&id("a")).unwrap();
    assert_eq!(a.subnet.to_string(), "10.101.0.0/16");
    assert_eq!(r.put_tenant(&id("a"), &req, now()).unwrap(), Put::Updated);

    let req = TenantRequest {
        subnet: Some("10.50.0.0/16".into()),
        ..host("10.50.1.0/24")
    };
    let e = r.put_tenant(&id("b"), &req, now()).unwrap_err();
    assert_eq!(e.field_name(), Some("host_prefixes"), "{e}");
    assert!(r.tenant(&id("b")).is_err(), "nothing created");
}

/// The tenants' IPv6 networks (fd77:7770::/32, one /64 each) are routed into
/// tunnels: no host prefix may cover one, whether its tenant exists yet or not.
#[test]
fn the_tenants_ipv6_range_is_never_a_host_prefix() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    for prefix in [
        "fd77:7770:a64::/64",
        "fd77:7770:a65::/64",
        "fd77::/16",
        "::/0",
    ] {
        let req = TenantRequest {
            host_prefixes: Some(vec![prefix.into()]),
            ..Default::default()
        };
        let e = r.put_tenant(&id("a"), &req, now()).unwrap_err();
        assert_eq!(e.field_name(), Some("host_prefixes"), "{prefix}: {e}");
    }
    let beside = TenantRequest {
        host_prefixes: Some(vec!["fd77:7771::/32".into()]),
        ..Default::default()
    };
    r.put_tenant(&id("a"), &beside, now()).unwrap();
}

#[test]
fn subnets_and_pools_are_ordinary_unicast() {
    let mut r = registry();
    for net in [
        "0.0.0.0/0",
        "127.0.0.0/24",
        "169.254.0.0/16",
        "224.0.0.0/24",
        "240.0.0.0/8",
    ] {
        let req = TenantRequest {
            subnet: Some(net.into()),
            ..Default::default()
        };
        let e = r.put_tenant(&id("a"), &req, now()).unwrap_err();
        assert_eq!(e.field_name(), Some("subnet"), "{net}: {e}");
    }
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    let req = egress("127.0.0.0/24", "gw");
    let e = r.put_egress(&id("a"), &req).unwrap_err();
    assert_eq!(e.field_name(), Some("pool"), "{e}");
}

#[test]
fn a_smaller_pool_may_not_turn_a_client_into_its_network_address() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    let pool = |p: &str| egress(p, "gw");
    r.put_egress(&id("a"), &pool("10.200.0.0/23")).unwrap();
    let at = ClientRequest {
        vpn_ip: Some("10.200.1.0".into()),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p1"), &at).unwrap();
    assert!(matches!(
        r.put_egress(&id("a"), &pool("10.200.1.0/24")),
        Err(ControlError::InUse(_))
    ));
}

#[test]
fn undone_deletions_hold_their_receiver_indices_again() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    let index = r.tenant(&id("a")).unwrap().routers[&id("r1")].index;
    let t = r.delete_tenant(&id("a")).unwrap();
    assert_eq!(r.indices.in_use(), 0);
    r.reinstate(&id("a"), Some(t));
    assert_eq!(r.indices.in_use(), 1);
    assert!(!r.indices.reserve(index), "held again");

    let gone = r.delete_router(&id("a"), &id("r1")).unwrap();
    assert_eq!(r.indices.in_use(), 0);
    r.reinstate_router(&id("a"), &id("r1"), Some(gone));
    assert!(!r.indices.reserve(index), "held again");

    // A tenant whose creation is undone takes nothing with it but itself.
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    r.reinstate(&id("b"), None);
    assert_eq!(r.indices.in_use(), 1);
    assert!(r.tenant(&id("b")).is_err());
}

#[test]
fn peers_are_found_by_key_through_the_index_also_after_an_undo() {
    fn found(r: &Registry, key: &PublicKey) -> Option<(bool, String)> {
        match r.peer_with_key(&id("a"), key.as_bytes())? {
            PeerWithKey::Router(x) => Some((true, x.id.to_string())),
            PeerWithKey::Client(x) => Some((false, x.id.to_string())),
        }
    }
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "r1"))
        .unwrap();
    r.put_client(&id("a"), &id("p1"), &Default::default())
        .unwrap();
    let t = r.tenant(&id("a")).unwrap();
    let (router, client) = (t.routers[&id("r1")].clone(), t.clients[&id("p1")].clone());
    let stranger = SecretKey::generate().public();
    let expect = |r: &Registry| {
        assert_eq!(found(r, &router.public_key), Some((true, "r1".into())));
        assert_eq!(found(r, &client.public_key), Some((false, "p1".into())));
        assert_eq!(found(r, &stranger), None);
        assert!(r
            .router_with_key(&id("a"), client.public_key.as_bytes())
            .is_none());
        assert!(r
            .peer_with_key(&id("b"), router.public_key.as_bytes())
            .is_none());
    };
    expect(&r);
    // An undone change rebuilds the index.
    r.reinstate_client(&id("a"), &id("p1"), Some(client.clone()));
    expect(&r);
    let t = r.tenant(&id("a")).unwrap().clone();
    r.reinstate(&id("a"), Some(t));
    expect(&r);
    // A peer whose creation is undone leaves its key free for the next one.
    let spare = SecretKey::generate().public();
    let with_spare = ClientRequest {
        public_key: Some(keys::encode(spare.as_bytes())),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p2"), &with_spare).unwrap();
    r.reinstate_client(&id("a"), &id("p2"), None);
    assert_eq!(found(&r, &spare), None);
    r.put_client(&id("a"), &id("p3"), &with_spare).unwrap();
    assert_eq!(found(&r, &spare), Some((false, "p3".into())));
    r.delete_client(&id("a"), &id("p3")).unwrap();
    // A new key: the old one belongs to nobody, through the index too.
    let rekey = ClientRequest {
        public_key: Some(keys::encode(stranger.as_bytes())),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p1"), &rekey).unwrap();
    assert_eq!(found(&r, &client.public_key), None);
    assert_eq!(found(&r, &stranger), Some((false, "p1".into())));
    r.delete_router(&id("a"), &id("r1")).unwrap_err();
    r.delete_client(&id("a"), &id("p1")).unwrap();
    assert_eq!(found(&r, &stranger), None);
}

#[test]
fn a_router_keeps_where_it_was_heard_from_until_its_key_changes() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    let heard_at = "203.0.113.2:34280".parse().unwrap();
    r.set_router_endpoint(&id("a"), &id("r1"), heard_at)
        .unwrap();
    let key = *r.tenant(&id("a")).unwrap().routers[&id("r1")]
        .public_key
        .as_bytes();
    assert_eq!(
        r.router_with_key(&id("a"), &key).map(|r| r.endpoint),
        Some(Some(heard_at))
    );
    let (config, _) = r.tenant(&id("a")).unwrap().routers[&id("r1")].peer_config(None);
    assert_eq!(config.endpoint, Some(heard_at), "the data plane gets it");

    // Renamed, same key: same device, same place.
    let rename = RouterRequest {
        name: Some("branch".into()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &rename).unwrap();
    assert_eq!(
        r.tenant(&id("a")).unwrap().routers[&id("r1")].endpoint,
        Some(heard_at)
    );
    // A new key is a new device: nobody knows where it is yet.
    let rekey = RouterRequest {
        public_key: Some(keys::encode(SecretKey::generate().public().as_bytes())),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &rekey).unwrap();
    assert_eq!(
        r.tenant(&id("a")).unwrap().routers[&id("r1")].endpoint,
        None
    );
    assert!(r.router_with_key(&id("a"), &key).is_none());
    assert!(r
        .set_router_endpoint(&id("a"), &id("gone"), heard_at)
        .is_err());
}

#[test]
fn a_new_key_takes_a_new_receiver_index_and_an_undo_gives_the_old_one_back() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("r1"), &Default::default())
        .unwrap();
    let before = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
    let fresh = || keys::encode(SecretKey::generate().public().as_bytes());
    let rekey = RouterRequest {
        public_key: Some(fresh()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &rekey).unwrap();
    let after = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
    assert_ne!(after.index, before.index);
    assert_eq!(r.indices.in_use(), 1, "the old index is freed");
    assert!(r.indices.reserve(before.index), "free");
    r.indices.free(before.index);
    // The store refused the change: the old router and its index come back,
    // the new index is free again.
    r.reinstate_router(&id("a"), &id("r1"), Some(before.clone()));
    let back = &r.tenant(&id("a")).unwrap().routers[&id("r1")];
    assert_eq!(
        (back.public_key, back.index),
        (before.public_key, before.index)
    );
    assert_eq!(r.indices.in_use(), 1);
    assert!(!r.indices.reserve(before.index), "held again");
    assert!(r.indices.reserve(after.index), "free again");
    r.indices.free(after.index);

    // Clients alike.
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "r1"))
        .unwrap();
    r.put_client(&id("a"), &id("p1"), &Default::default())
        .unwrap();
    let before = r.tenant(&id("a")).unwrap().clients[&id("p1")].clone();
    let rekey = ClientRequest {
        public_key: Some(fresh()),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p1"), &rekey).unwrap();
    let after = r.tenant(&id("a")).unwrap().clients[&id("p1")].clone();
    assert_ne!(after.index, before.index);
    assert_eq!(r.indices.in_use(), 2);
    r.reinstate_client(&id("a"), &id("p1"), Some(before.clone()));
    let back = &r.tenant(&id("a")).unwrap().clients[&id("p1")];
    assert_eq!(
        (back.public_key, back.index),
        (before.public_key, before.index)
    );
    assert_eq!(r.indices.in_use(), 2);
    assert!(r.indices.reserve(after.index), "free again");
    // The same key again keeps the index.
    r.indices.free(after.index);
    let same = ClientRequest {
        public_key: Some(keys::encode(before.public_key.as_bytes())),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p1"), &same).unwrap();
    assert_eq!(
        r.tenant(&id("a")).unwrap().clients[&id("p1")].index,
        before.index
    );
}

#[test]
fn a_clients_dns_list_is_short_and_without_repeats() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "gw"))
        .unwrap();
    let dns = |list: Vec<String>| ClientRequest {
        dns: Some(list),
        ..Default::default()
    };
    let many: Vec<String> = (0..60).map(|i| format!("2001:db8::{i:x}")).collect();
    let e = r.put_client(&id("a"), &id("p1"), &dns(many)).unwrap_err();
    assert_eq!(e.field_name(), Some("dns"), "{e}");
    let twice = vec!["1.1.1.1".to_string(); 20];
    r.put_client(&id("a"), &id("p1"), &dns(twice)).unwrap();
    assert_eq!(r.tenant(&id("a")).unwrap().clients[&id("p1")].dns.len(), 1);
}

#[test]
fn egress_and_clients() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let gw = RouterRequest {
        vpn_ip: Some("10.100.0.40".into()),
        ..Default::default()
    };
    r.put_router(&id("a"), &id("gw"), &gw).unwrap();
    assert_eq!(
        r.put_client(&id("a"), &id("p1"), &Default::default()),
        Err(ControlError::NoEgress)
    );
    let req = egress("10.200.0.0/24", "gw");
    assert_eq!(r.put_egress(&id("a"), &req), Ok(Put::Created));
    r.put_client(&id("a"), &id("p1"), &Default::default())
        .unwrap();
    assert_eq!(
        r.tenant(&id("a")).unwrap().clients[&id("p1")].vpn_ip,
        Ipv4Addr::new(10, 200, 0, 2)
    );
    assert!(matches!(
        r.delete_egress(&id("a")),
        Err(ControlError::InUse(_))
    ));
    assert!(matches!(
        r.delete_router(&id("a"), &id("gw")),
        Err(ControlError::InUse(_))
    ));
    // Another tenant can neither take the pool nor get a subnet overlapping it.
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    assert!(matches!(
        r.put_egress(&id("b"), &req),
        Err(ControlError::Overlap { field: "pool", .. })
    ));
    let overlapping = TenantRequest {
        subnet: Some("10.200.0.0/16".into()),
        ..Default::default()
    };
    assert!(matches!(
        r.put_tenant(&id("c"), &overlapping, now()),
        Err(ControlError::Overlap {
            field: "subnet",
            ..
        })
    ));
}

#[test]
fn subnet_exhaustion_is_a_clear_error() {
    let mut r = Registry::new(
        AllocPolicy {
            first_port: 51820,
            last_port: u16::MAX,
            supernet: "10.100.0.0/15".parse().unwrap(),
            subnet_prefix_len: 16,
            subnet_start: Ipv4Addr::new(10, 100, 0, 0),
        },
        1,
    );
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    let e = r
        .put_tenant(&id("c"), &Default::default(), now())
        .unwrap_err();
    assert_eq!(e.code(), "exhausted");
    assert!(e.to_string().contains("10.100.0.0/15"), "{e}");
}

#[test]
fn host_prefixes_are_ordinary_unicast() {
    let mut r = registry();
    for special in [
        "127.0.0.0/8",
        "127.0.0.1/32",
        "169.254.10.0/24",
        "224.0.0.0/4",
        "0.0.0.0/8",
        "::1/128",
        "::ffff:0:0/96",
        "fe80::/64",
        "ff02::/16",
    ] {
        let host = TenantRequest {
            host_prefixes: Some(vec![special.into()]),
            ..Default::default()
        };
        let e = r.put_tenant(&id("a"), &host, now()).unwrap_err();
        assert_eq!(e.field_name(), Some("host_prefixes"), "{special}: {e}");
    }
    let fine = TenantRequest {
        host_prefixes: Some(vec![
            "172.18.0.0/16".into(),
            "fd00:1::/64".into(),
            "64:ff9b::/96".into(),
        ]),
        ..Default::default()
    };
    r.put_tenant(&id("a"), &fine, now()).unwrap();
}

/// Tenants take ports from the configured range only; one that asks for its
/// port may lie outside it, and the range's end counts as exhausted.
#[test]
fn ports_come_from_the_configured_range() {
    let mut r = registry();
    r.policy.last_port = 51821;
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
    let e = r
        .put_tenant(&id("c"), &Default::default(), now())
        .unwrap_err();
    assert!(matches!(
        e,
        ControlError::Exhausted(crate::core::alloc::AllocError::PortsExhausted {
            first: 51820,
            last: 51821
        })
    ));
    assert_eq!(e.code(), "exhausted");
    assert!(r.tenant(&id("c")).is_err(), "nothing half-made is left");
    let chosen = TenantRequest {
        listen_port: Some(60000),
        ..Default::default()
    };
    r.put_tenant(&id("c"), &chosen, now()).unwrap();
    assert_eq!(r.tenant(&id("c")).unwrap().listen_port, 60000);
    assert_eq!(
        [51820, 51821],
        [
            r.tenant(&id("a")).unwrap().listen_port,
            r.tenant(&id("b")).unwrap().listen_port
        ]
    );
}

/// Migration: a tenant made with the old server's key answers as the old
/// server did; the key is fixed once the tenant exists, and no two tunnels
/// share one.
#[test]
fn a_tenant_can_be_made_with_an_existing_key_only_once() {
    let mut r = registry();
    let old = crate::keys::SecretKey::generate();
    let with = |key: &crate::keys::SecretKey| TenantRequest {
        private_key: Some(key.to_base64()),
        ..Default::default()
    };
    assert_eq!(r.put_tenant(&id("a"), &with(&old), now()), Ok(Put::Created));
    let a = r.tenant(&id("a")).unwrap();
    assert_eq!(a.public_key.as_bytes(), old.public().as_bytes());
    assert_eq!(a.secret.to_base64(), old.to_base64());
    // The same key again (an import run twice) changes nothing.
    assert_eq!(r.put_tenant(&id("a"), &with(&old), now()), Ok(Put::Updated));
    // Another key would cut off every router configured for this one.
    let other = crate::keys::SecretKey::generate();
    let e = r.put_tenant(&id("a"), &with(&other), now()).unwrap_err();
    assert_eq!(
        (e.code(), e.field_name()),
        ("immutable_field", Some("private_key"))
    );
    assert!(!e.to_string().contains(&other.to_base64()), "{e}");
    assert!(!e.to_string().contains(&old.to_base64()), "{e}");
    // Another tenant cannot take the same key pair.
    let e = r.put_tenant(&id("b"), &with(&old), now()).unwrap_err();
    assert_eq!(
        (e.code(), e.field_name()),
        ("duplicate_tunnel_key", Some("private_key"))
    );
    assert!(r.tenant(&id("b")).is_err());
    // Malformed keys name the field and do not echo the text.
    for bad in ["not base64!", "AAAA", ""] {
        let req = TenantRequest {
            private_key: Some(bad.into()),
            ..Default::default()
        };
        let e = r.put_tenant(&id("c"), &req, now()).unwrap_err();
        assert_eq!(e.field_name(), Some("private_key"), "{bad}");
    }
    let req = with(&old);
    assert!(!format!("{req:?}").contains(&old.to_base64()));
}

/// A peer's preshared key: set, kept when not named, made here on
/// `"generate"` (once), removed by `""`; renewed with a new key pair; a bad
/// one names the field and is not quoted.
#[test]
fn preshared_keys_are_set_kept_generated_removed_and_renewed() {
    use crate::keys::PresharedKey;
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let router_psk = |r: &Registry| {
        r.tenant(&id("a")).unwrap().routers[&id("r1")]
            .preshared_key
            .clone()
    };
    let put = |r: &mut Registry, psk: Option<&str>| {
        let req = RouterRequest {
            preshared_key: psk.map(Into::into),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &req)
    };
    put(&mut r, None).unwrap();
    assert_eq!(router_psk(&r), None);
    let given = PresharedKey::generate();
    put(&mut r, Some(&given.to_base64())).unwrap();
    assert_eq!(router_psk(&r), Some(given.clone()));
    put(&mut r, None).unwrap();
    assert_eq!(router_psk(&r), Some(given.clone()), "kept when not named");
    put(&mut r, Some("generate")).unwrap();
    assert_eq!(router_psk(&r), Some(given.clone()), "generate keeps one");
    put(&mut r, Some("")).unwrap();
    assert_eq!(router_psk(&r), None);
    put(&mut r, Some("generate")).unwrap();
    let made = router_psk(&r).expect("generated");
    put(&mut r, Some("generate")).unwrap();
    assert_eq!(router_psk(&r), Some(made.clone()), "generate is idempotent");
    let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";
    let e = put(&mut r, Some(secret)).unwrap_err();
    assert_eq!(e.field_name(), Some("preshared_key"));
    assert!(!e.to_string().contains(secret), "{e}");
    assert_eq!(
        router_psk(&r),
        Some(made.clone()),
        "a refusal changes nothing"
    );
    r.new_router_key(&id("a"), &id("r1")).unwrap();
    let renewed = router_psk(&r).expect("renewed with the key pair");
    assert_ne!(renewed, made);
    let req = RouterRequest {
        preshared_key: Some(given.to_base64()),
        ..Default::default()
    };
    assert!(!format!("{req:?}").contains(&given.to_base64()));
    // A new device's key through PUT gets a new one too, unless one is given.
    let new_device = |psk: Option<String>| RouterRequest {
        public_key: Some(keys::encode(SecretKey::generate().public().as_bytes())),
        preshared_key: psk,
        ..Default::default()
    };
    r.put_router(&id("a"), &id("r1"), &new_device(None))
        .unwrap();
    let after_put = router_psk(&r).expect("renewed");
    assert_ne!(after_put, renewed);
    r.put_router(&id("a"), &id("r1"), &new_device(Some(given.to_base64())))
        .unwrap();
    assert_eq!(router_psk(&r), Some(given.clone()));
    // All zeros is WireGuard's "none".
    put(&mut r, Some(&keys::encode(&[0; 32]))).unwrap();
    assert_eq!(router_psk(&r), None);

    // Clients the same way; a client without one is re-keyed without one.
    r.put_router(&id("a"), &id("gw"), &Default::default())
        .unwrap();
    r.put_egress(&id("a"), &egress("10.200.0.0/24", "gw"))
        .unwrap();
    let client = |psk: Option<&str>| ClientRequest {
        preshared_key: psk.map(Into::into),
        ..Default::default()
    };
    r.put_client(&id("a"), &id("p1"), &client(Some("generate")))
        .unwrap();
    r.put_client(&id("a"), &id("p2"), &client(None)).unwrap();
    let psk_of = |r: &Registry, c: &str| {
        r.tenant(&id("a")).unwrap().clients[&id(c)]
            .preshared_key
            .clone()
    };
    let before = psk_of(&r, "p1").expect("generated");
    r.new_client_key(&id("a"), &id("p1")).unwrap();
    r.new_client_key(&id("a"), &id("p2")).unwrap();
    assert_ne!(psk_of(&r, "p1"), Some(before));
    assert!(psk_of(&r, "p1").is_some());
    assert_eq!(psk_of(&r, "p2"), None);
    let config = crate::control::render::client_config(
        r.tenant(&id("a")).unwrap(),
        &r.tenant(&id("a")).unwrap().clients[&id("p1")],
        "vpn.example.com",
    );
    let psk = psk_of(&r, "p1").unwrap().to_base64();
    assert!(
        config.contains(&format!("PresharedKey = {psk}\n")),
        "{config}"
    );
}

/// A router's endpoint given by the caller (a migrated router's last one)
/// replaces the stored one, so a wrong one can be put right (the engine keeps
/// one it heard the router from); one nobody can answer is refused by name,
/// also dressed as an IPv4-mapped IPv6 address.
#[test]
fn a_given_endpoint_replaces_the_stored_one() {
    let mut r = registry();
    r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
    let put = |r: &mut Registry, endpoint: &str| {
        let req = RouterRequest {
            endpoint: Some(endpoint.into()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &req)
    };
    let endpoint = |r: &Registry| r.tenant(&id("a")).unwrap().routers[&id("r1")].endpoint;
    put(&mut r, "198.51.100.7:13231").unwrap();
    assert_eq!(endpoint(&r), Some("198.51.100.7:13231".parse().unwrap()));
    put(&mut r, "[::ffff:198.51.100.8]:13231").unwrap();
    assert_eq!(endpoint(&r), Some("198.51.100.8:13231".parse().unwrap()));
    let heard = "203.0.113.9:4000".parse().unwrap();
    r.set_router_endpoint(&id("a"), &id("r1"), heard).unwrap();
    r.put_router(&id("a"), &id("r1"), &RouterRequest::default())
        .unwrap();
    assert_eq!(endpoint(&r), Some(heard), "kept when not given");
    for bad in [
        "198.51.100.7",
        "198.51.100.7:0",
        "0.0.0.0:1",
        "224.0.0.1:1",
        "x:1",
        "[::ffff:0.0.0.0]:1",
        "[::ffff:224.0.0.1]:1",
        "[::ffff:255.255.255.255]:1",
    ] {
        let e = put(&mut r, bad).unwrap_err();
        assert_eq!(e.field_name(), Some("endpoint"), "{bad}");
    }
    assert_eq!(endpoint(&r), Some(heard), "a refusal changes nothing");
}
