//! RouterOS v7 scripts: exact snapshots, and every command line checked by a small
//! RouterOS syntax checker (known menu paths, known parameters, valid values).

mod support;

use std::collections::BTreeMap;
use std::time::SystemTime;

use ipnet::IpNet;
use wgplane::control::model::{EgressPolicy, Id, Router, Tenant};
use wgplane::control::render::router_script;
use wgplane::keys::SecretKey;

fn id(s: &str) -> Id {
    Id::parse(s, "id").unwrap()
}

fn tenant() -> Tenant {
    let secret = SecretKey::from_bytes([1; 32]);
    let mut t = Tenant {
        id: id("kitonga"),
        interface_name: "wg0".into(),
        public_key: secret.public(),
        secret,
        subnet: "10.100.0.0/16".parse().unwrap(),
        listen_port: 51820,
        created_at: SystemTime::UNIX_EPOCH,
        routers: BTreeMap::new(),
        clients: BTreeMap::new(),
        egress: Some(EgressPolicy {
            pool: "10.200.0.0/24".parse().unwrap(),
            gateways: vec![id("mikrotik-1")],
        }),
        host_prefixes: Vec::new(),
    };
    let gw_key = SecretKey::from_bytes([2; 32]);
    t.routers.insert(
        id("mikrotik-1"),
        Router {
            id: id("mikrotik-1"),
            name: "Gateway \"Main\" $1".into(),
            public_key: gw_key.public(),
            private_key: Some(gw_key),
            vpn_ip: "10.100.0.40".parse().unwrap(),
            extra_prefixes: vec![],
            index: 1,
            forwards: Default::default(),
            endpoint: None,
        },
    );
    t.routers.insert(
        id("branch-a"),
        Router {
            id: id("branch-a"),
            name: "Branch-A".into(),
            public_key: SecretKey::from_bytes([3; 32]).public(),
            private_key: None,
            vpn_ip: "10.100.1.1".parse().unwrap(),
            extra_prefixes: vec!["192.168.88.0/24".parse().unwrap()],
            index: 2,
            forwards: Default::default(),
            endpoint: None,
        },
    );
    t
}

#[test]
fn gateway_script_snapshot() {
    let t = tenant();
    let script = router_script(&t, &t.routers[&id("mikrotik-1")], "vpn.example.com");
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let private = t.routers[&id("mikrotik-1")]
        .private_key
        .as_ref()
        .unwrap()
        .to_base64();
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Gateway \"Main\" \$1" (mikrotik-1) of tenant kitonga
/system identity set name="Gateway \"Main\" \$1"
/interface wireguard add name=wgplane-kitonga listen-port=13231 mtu=1420 private-key="{private}" comment="wgplane kitonga"
/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address=vpn.example.com endpoint-port=51820 allowed-address=10.100.0.0/16,10.200.0.0/24 persistent-keepalive=25s comment="wgplane kitonga"
/ip address add address=10.100.0.40/32 interface=wgplane-kitonga comment="wgplane kitonga"
/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"
/ip service set api address=10.100.0.1/32
# KTN gateway: the client pool comes through the tunnel and leaves on the WAN.
/ip route add dst-address=10.200.0.0/24 gateway=wgplane-kitonga comment="wgplane kitonga"
/ip firewall nat add chain=srcnat src-address=10.200.0.0/24 out-interface-list=WAN action=masquerade comment="wgplane kitonga"
"#
    );
    assert_eq!(script, expected);
    check_script(&script);
}

#[test]
fn branch_script_snapshot() {
    let t = tenant();
    let r = &t.routers[&id("branch-a")];
    let script = router_script(&t, r, "203.0.113.1");
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let own = wgplane::keys::encode(r.public_key.as_bytes());
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Branch-A" (branch-a) of tenant kitonga
/system identity set name="Branch-A"
# This router keeps its own key: the interface below must hold the private key of {own}
/interface wireguard add name=wgplane-kitonga listen-port=13231 mtu=1420 comment="wgplane kitonga"
/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address=203.0.113.1 endpoint-port=51820 allowed-address=10.100.0.0/16 persistent-keepalive=25s comment="wgplane kitonga"
/ip address add address=10.100.1.1/32 interface=wgplane-kitonga comment="wgplane kitonga"
/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"
/ip service set api address=10.100.0.1/32
"#
    );
    assert_eq!(script, expected);
    check_script(&script);
    assert!(
        !script.contains("masquerade"),
        "only gateways masquerade the pool"
    );
}

/// A router given an address in the tenant's IPv6 network gets it on its interface
/// and accepts the network from the tunnel; its other prefixes are its own LANs.
#[test]
fn ipv6_address_script_snapshot() {
    let mut t = tenant();
    let r = t.routers.get_mut(&id("branch-a")).unwrap();
    r.extra_prefixes
        .push("fd77:7770:a64::101/128".parse().unwrap());
    r.extra_prefixes.push("2001:db8:1::/48".parse().unwrap());
    let r = &t.routers[&id("branch-a")];
    let script = router_script(&t, r, "203.0.113.1");
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let own = wgplane::keys::encode(r.public_key.as_bytes());
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Branch-A" (branch-a) of tenant kitonga
/system identity set name="Branch-A"
# This router keeps its own key: the interface below must hold the private key of {own}
/interface wireguard add name=wgplane-kitonga listen-port=13231 mtu=1420 comment="wgplane kitonga"
/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address=203.0.113.1 endpoint-port=51820 allowed-address=10.100.0.0/16,fd77:7770:a64::/64 persistent-keepalive=25s comment="wgplane kitonga"
/ip address add address=10.100.1.1/32 interface=wgplane-kitonga comment="wgplane kitonga"
/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"
/ipv6 address add address=fd77:7770:a64::101/64 interface=wgplane-kitonga advertise=no comment="wgplane kitonga"
/ip service set api address=10.100.0.1/32
"#
    );
    assert_eq!(script, expected);
    check_script(&script);
}

#[test]
fn script_through_the_api() {
    let app = support::Appliance::start();
    app.expect(
        "PUT",
        "/v1/tenants/acme/routers/r1",
        Some(r#"{"name":"R1"}"#),
        201,
    );
    let (status, text) = app.call("GET", "/v1/tenants/acme/routers/r1/script", None);
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    check_script(&text);
    assert!(
        text.contains("private-key=\""),
        "generated key goes into the script"
    );
    assert!(text.contains("endpoint-address=127.0.0.1 endpoint-port="));
    // The router's view never shows it.
    let view = app.expect("GET", "/v1/tenants/acme/routers/r1", None, 200);
    assert!(view.get("private_key").is_none());
    app.expect("GET", "/v1/tenants/acme/routers/nope/script", None, 404);
}

// ---- a small RouterOS v7 syntax checker ----

/// Known menus, their commands, and the parameters each accepts.
fn grammar() -> BTreeMap<(&'static str, &'static str), &'static [&'static str]> {
    BTreeMap::from([
        (("/system identity", "set"), &["name"][..]),
        (
            ("/interface wireguard", "add"),
            &[
                "name",
                "listen-port",
                "mtu",
                "private-key",
                "comment",
                "disabled",
            ][..],
        ),
        (
            ("/interface wireguard peers", "add"),
            &[
                "interface",
                "public-key",
                "preshared-key",
                "endpoint-address",
                "endpoint-port",
                "allowed-address",
                "persistent-keepalive",
                "comment",
                "disabled",
            ][..],
        ),
        (
            ("/ip address", "add"),
            &["address", "interface", "network", "comment"][..],
        ),
        (
            ("/ip route", "add"),
            &["dst-address", "gateway", "distance", "comment"][..],
        ),
        (
            ("/ipv6 address", "add"),
            &["address", "interface", "advertise", "no-dad", "comment"][..],
        ),
        (("/ip service", "set"), &["address", "port", "disabled"][..]),
        (
            ("/ip firewall nat", "add"),
            &[
                "chain",
                "src-address",
                "dst-address",
                "out-interface",
                "out-interface-list",
                "action",
                "to-addresses",
                "comment",
            ][..],
        ),
    ])
}

/// Splits a command line into words, keeping quoted strings (with `\` escapes) whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                let next = chars.next().expect("escape at end of line");
                assert!(
                    matches!(next, '\\' | '"' | '$' | '?' | 'n' | 't'),
                    "bad escape \\{next}"
                );
                cur.push(c);
                cur.push(next);
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '$' | '?' if quoted => panic!("unescaped {c} in a string: {line}"),
            _ => cur.push(c),
        }
    }
    assert!(!quoted, "unterminated string: {line}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn check_value(key: &str, value: &str, line: &str) {
    let unquoted = value.trim_matches('"');
    let prefix = |v: &str| v.parse::<IpNet>().is_ok();
    let ok = match key {
        "address" | "src-address" | "dst-address" => prefix(unquoted),
        "allowed-address" => unquoted.split(',').all(prefix),
        "endpoint-port" | "listen-port" | "mtu" | "port" => {
            unquoted.parse::<u16>().is_ok_and(|p| p > 0)
        }
        "persistent-keepalive" => unquoted
            .strip_suffix('s')
            .is_some_and(|n| n.parse::<u16>().is_ok()),
        "public-key" | "private-key" => wgplane::keys::decode(unquoted).is_ok(),
        "endpoint-address" => {
            !unquoted.contains(':') || unquoted.parse::<std::net::Ipv6Addr>().is_ok()
        }
        "chain" => matches!(unquoted, "srcnat" | "dstnat"),
        "advertise" | "no-dad" => matches!(unquoted, "yes" | "no"),
        "action" => matches!(unquoted, "masquerade" | "src-nat" | "accept"),
        _ => !unquoted.is_empty(),
    };
    assert!(ok, "bad value for {key}: {value:?} in: {line}");
}

fn check_script(script: &str) {
    let grammar = grammar();
    let mut commands = 0;
    for line in script.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words = words(line);
        assert!(
            words[0].starts_with('/'),
            "a command starts with a menu path: {line}"
        );
        let verb_at = words
            .iter()
            .position(|w| matches!(w.as_str(), "add" | "set" | "remove"))
            .unwrap_or_else(|| panic!("no command verb in: {line}"));
        let menu = words[..verb_at].join(" ");
        let verb = words[verb_at].as_str();
        let allowed = grammar
            .get(&(menu.as_str(), verb))
            .unwrap_or_else(|| panic!("unknown menu/command {menu} {verb}: {line}"));
        for (i, word) in words[verb_at + 1..].iter().enumerate() {
            match word.split_once('=') {
                Some((key, value)) => {
                    assert!(
                        allowed.contains(&key),
                        "{menu} {verb} has no parameter {key}: {line}"
                    );
                    check_value(key, value, line);
                }
                // `set` takes the item first (`/ip service set api …`).
                None => assert!(verb == "set" && i == 0, "stray word {word:?} in: {line}"),
            }
        }
        assert!(
            !line.contains("endpoint="),
            "RouterOS v7 has no endpoint=host:port"
        );
        commands += 1;
    }
    assert!(commands >= 6, "a script has its commands");
}
