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
            preshared_key: None,
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
            preshared_key: None,
        },
    );
    t
}

/// The line that lets the appliance reach the router ahead of any other filter rule.
const ACCEPT: &str = r#":if ([:len [/ip firewall filter find comment="wgplane kitonga" src-address=10.100.0.1]] = 0) do={:if ([:len [/ip firewall filter find dynamic=no]] = 0) do={/ip firewall filter add chain=input in-interface=wgplane-kitonga src-address=10.100.0.1 action=accept comment="wgplane kitonga"} else={/ip firewall filter add chain=input in-interface=wgplane-kitonga src-address=10.100.0.1 action=accept comment="wgplane kitonga" place-before=[:pick [/ip firewall filter find dynamic=no] 0]}}"#;

#[test]
fn gateway_script_snapshot() {
    let t = tenant();
    let script = router_script(&t, &t.routers[&id("mikrotik-1")], "vpn.example.com", &[]);
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let private = t.routers[&id("mikrotik-1")]
        .private_key
        .as_ref()
        .unwrap()
        .to_base64();
    let accept = ACCEPT;
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Gateway \"Main\" \$1" (mikrotik-1) of tenant kitonga
# It can be run again after a change; entries of an earlier run that no longer apply stay (comment "wgplane kitonga").
# One block: paste it whole, or /import it; an error stops it where it is.
{{
:if ([:len [/interface list find name=WAN]] = 0) do={{:error "a KTN gateway masquerades the client pool on the interface list WAN, and this router has none: make it (with the uplink in it) and run the script again"}}
/system identity set name="Gateway \"Main\" \$1"
:if ([:len [/interface wireguard find name=wgplane-kitonga]] = 0) do={{/interface wireguard add name=wgplane-kitonga comment="wgplane kitonga"}}
/interface wireguard set [find name=wgplane-kitonga] mtu=1420 private-key="{private}" comment="wgplane kitonga"
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers set [find interface=wgplane-kitonga public-key="{server}"] comment="wgplane kitonga"}}
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address="vpn.example.com" endpoint-port=51820 allowed-address=10.100.0.0/16,10.200.0.0/24 persistent-keepalive=25s comment="wgplane kitonga"}} else={{/interface wireguard peers set [find comment="wgplane kitonga"] interface=wgplane-kitonga public-key="{server}" endpoint-address="vpn.example.com" endpoint-port=51820 allowed-address=10.100.0.0/16,10.200.0.0/24 persistent-keepalive=25s}}
:do {{/interface wireguard peers set [find comment="wgplane kitonga"] preshared-key=""}} on-error={{}}
:if ([:len [/ip address find comment="wgplane kitonga" address=10.100.0.40/32]] = 0) do={{/ip address add address=10.100.0.40/32 interface=wgplane-kitonga comment="wgplane kitonga"}}
:if ([:len [/ip route find comment="wgplane kitonga" dst-address=10.100.0.0/16]] = 0) do={{/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"}}
# The appliance reaches the router's services (management forwards) ahead of any other rule.
{accept}
# KTN gateway: the client pool comes through the tunnel and leaves on the WAN.
:if ([:len [/ip route find comment="wgplane kitonga" dst-address=10.200.0.0/24]] = 0) do={{/ip route add dst-address=10.200.0.0/24 gateway=wgplane-kitonga comment="wgplane kitonga"}}
:if ([:len [/ip firewall nat find comment="wgplane kitonga" chain=srcnat src-address=10.200.0.0/24]] = 0) do={{/ip firewall nat add chain=srcnat src-address=10.200.0.0/24 out-interface-list=WAN action=masquerade comment="wgplane kitonga"}}
# Last: the API service answers the appliance (and the host's networks) only.
/ip service set api address=10.100.0.1/32
}}
"#
    );
    assert_eq!(script, expected);
    check_script(&script);
}

#[test]
fn branch_script_snapshot() {
    let t = tenant();
    let r = &t.routers[&id("branch-a")];
    let script = router_script(&t, r, "203.0.113.1", &[]);
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let own = wgplane::keys::encode(r.public_key.as_bytes());
    let accept = ACCEPT;
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Branch-A" (branch-a) of tenant kitonga
# It can be run again after a change; entries of an earlier run that no longer apply stay (comment "wgplane kitonga").
# One block: paste it whole, or /import it; an error stops it where it is.
{{
/system identity set name="Branch-A"
# This router keeps its own key: the script takes over its WireGuard interface that holds it.
# Remove the peers and addresses of an earlier hub on it first: their allowed addresses would overlap.
:if ([:len [/interface wireguard find public-key="{own}"]] = 0) do={{:error "no WireGuard interface holds the private key of {own}"}}
/interface wireguard set [find public-key="{own}"] name=wgplane-kitonga mtu=1420 comment="wgplane kitonga"
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers set [find interface=wgplane-kitonga public-key="{server}"] comment="wgplane kitonga"}}
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address="203.0.113.1" endpoint-port=51820 allowed-address=10.100.0.0/16 persistent-keepalive=25s comment="wgplane kitonga"}} else={{/interface wireguard peers set [find comment="wgplane kitonga"] interface=wgplane-kitonga public-key="{server}" endpoint-address="203.0.113.1" endpoint-port=51820 allowed-address=10.100.0.0/16 persistent-keepalive=25s}}
:do {{/interface wireguard peers set [find comment="wgplane kitonga"] preshared-key=""}} on-error={{}}
:if ([:len [/ip address find comment="wgplane kitonga" address=10.100.1.1/32]] = 0) do={{/ip address add address=10.100.1.1/32 interface=wgplane-kitonga comment="wgplane kitonga"}}
:if ([:len [/ip route find comment="wgplane kitonga" dst-address=10.100.0.0/16]] = 0) do={{/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"}}
# The appliance reaches the router's services (management forwards) ahead of any other rule.
{accept}
# Last: the API service answers the appliance (and the host's networks) only.
/ip service set api address=10.100.0.1/32
}}
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
/// A router with a preshared key: the appliance's peer on the router gets it,
/// and the line passes the syntax check.
#[test]
fn a_preshared_key_goes_onto_the_appliances_peer() {
    let mut t = tenant();
    let psk = wgplane::keys::PresharedKey::from_bytes([5; 32]);
    let r = t.routers.get_mut(&id("branch-a")).unwrap();
    r.preshared_key = Some(psk.clone());
    let script = router_script(&t, &t.routers[&id("branch-a")], "203.0.113.1", &[]);
    let wanted = format!(" preshared-key=\"{}\" ", psk.to_base64());
    let peers: Vec<&str> = script
        .lines()
        .filter(|l| l.contains("preshared-key="))
        .collect();
    assert_eq!(peers.len(), 1, "{script}");
    assert_eq!(
        peers[0].matches(&wanted).count(),
        2,
        "add and set: {}",
        peers[0]
    );
    check_script(&script);
}

#[test]
fn ipv6_address_script_snapshot() {
    let mut t = tenant();
    let r = t.routers.get_mut(&id("branch-a")).unwrap();
    r.extra_prefixes
        .push("fd77:7770:a64::101/128".parse().unwrap());
    r.extra_prefixes.push("2001:db8:1::/48".parse().unwrap());
    let r = &t.routers[&id("branch-a")];
    let script = router_script(&t, r, "203.0.113.1", &[]);
    let server = wgplane::keys::encode(t.public_key.as_bytes());
    let own = wgplane::keys::encode(r.public_key.as_bytes());
    let accept = ACCEPT;
    let expected = format!(
        r#"# wgplane: RouterOS v7 script for router "Branch-A" (branch-a) of tenant kitonga
# It can be run again after a change; entries of an earlier run that no longer apply stay (comment "wgplane kitonga").
# One block: paste it whole, or /import it; an error stops it where it is.
{{
/system identity set name="Branch-A"
# This router keeps its own key: the script takes over its WireGuard interface that holds it.
# Remove the peers and addresses of an earlier hub on it first: their allowed addresses would overlap.
:if ([:len [/interface wireguard find public-key="{own}"]] = 0) do={{:error "no WireGuard interface holds the private key of {own}"}}
/interface wireguard set [find public-key="{own}"] name=wgplane-kitonga mtu=1420 comment="wgplane kitonga"
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers set [find interface=wgplane-kitonga public-key="{server}"] comment="wgplane kitonga"}}
:if ([:len [/interface wireguard peers find comment="wgplane kitonga"]] = 0) do={{/interface wireguard peers add interface=wgplane-kitonga public-key="{server}" endpoint-address="203.0.113.1" endpoint-port=51820 allowed-address=10.100.0.0/16,fd77:7770:a64::/64 persistent-keepalive=25s comment="wgplane kitonga"}} else={{/interface wireguard peers set [find comment="wgplane kitonga"] interface=wgplane-kitonga public-key="{server}" endpoint-address="203.0.113.1" endpoint-port=51820 allowed-address=10.100.0.0/16,fd77:7770:a64::/64 persistent-keepalive=25s}}
:do {{/interface wireguard peers set [find comment="wgplane kitonga"] preshared-key=""}} on-error={{}}
:if ([:len [/ip address find comment="wgplane kitonga" address=10.100.1.1/32]] = 0) do={{/ip address add address=10.100.1.1/32 interface=wgplane-kitonga comment="wgplane kitonga"}}
:if ([:len [/ipv6 address find comment="wgplane kitonga" address=fd77:7770:a64::101/64]] = 0) do={{/ipv6 address add address=fd77:7770:a64::101/64 interface=wgplane-kitonga advertise=no comment="wgplane kitonga"}}
:if ([:len [/ip route find comment="wgplane kitonga" dst-address=10.100.0.0/16]] = 0) do={{/ip route add dst-address=10.100.0.0/16 gateway=wgplane-kitonga comment="wgplane kitonga"}}
# The appliance reaches the router's services (management forwards) ahead of any other rule.
{accept}
# Last: the API service answers the appliance (and the host's networks) only.
/ip service set api address=10.100.0.1/32
}}
"#
    );
    assert_eq!(script, expected);
    check_script(&script);
}

/// In TUN mode the tunnel carries the host's networks (the tenant's host
/// prefixes): the router accepts them from the tunnel (peer, input chain, API
/// service) and routes them into it.
#[test]
fn host_prefixes_are_accepted_and_routed_into_the_tunnel() {
    let t = tenant();
    let r = &t.routers[&id("branch-a")];
    let host: Vec<IpNet> = vec![
        "172.18.0.0/16".parse().unwrap(),
        "fd00:1::/64".parse().unwrap(),
    ];
    let script = router_script(&t, r, "203.0.113.1", &host);
    check_script(&script);
    assert!(
        script.contains("allowed-address=10.100.0.0/16,172.18.0.0/16,fd00:1::/64 "),
        "{script}"
    );
    for (menu, net) in [
        ("/ip route", "172.18.0.0/16"),
        ("/ipv6 route", "fd00:1::/64"),
    ] {
        let add = format!("do={{{menu} add dst-address={net} gateway=wgplane-kitonga ");
        assert!(script.contains(&add), "{add}: {script}");
    }
    assert!(
        script.contains("\n/ip service set api address=10.100.0.1/32,172.18.0.0/16,fd00:1::/64\n"),
        "{script}"
    );
    for (menu, net) in [
        ("/ip firewall filter", "10.100.0.1"),
        ("/ip firewall filter", "172.18.0.0/16"),
        ("/ipv6 firewall filter", "fd00:1::/64"),
    ] {
        let accept = format!(
            "{menu} add chain=input in-interface=wgplane-kitonga src-address={net} action=accept "
        );
        assert!(script.contains(&accept), "{accept}: {script}");
    }
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
    assert!(text.contains("endpoint-address=\"127.0.0.1\" endpoint-port="));
    // The router's view never shows it.
    let view = app.expect("GET", "/v1/tenants/acme/routers/r1", None, 200);
    assert!(view.get("private_key").is_none());
    app.expect("GET", "/v1/tenants/acme/routers/nope/script", None, 404);
}

// ---- a small RouterOS v7 syntax checker ----

/// Known menus, their commands, and the parameters each accepts (`find` takes
/// the same ones, and the read-only ones in [`FIND_ONLY`]).
fn grammar() -> BTreeMap<(&'static str, &'static str), &'static [&'static str]> {
    let wireguard = &[
        "name",
        "listen-port",
        "mtu",
        "private-key",
        "comment",
        "disabled",
    ][..];
    let peer = &[
        "interface",
        "public-key",
        "preshared-key",
        "endpoint-address",
        "endpoint-port",
        "allowed-address",
        "persistent-keepalive",
        "comment",
        "disabled",
    ][..];
    let address = &["address", "interface", "network", "comment"][..];
    let route = &["dst-address", "gateway", "distance", "comment"][..];
    let address6 = &["address", "interface", "advertise", "no-dad", "comment"][..];
    let filter = &[
        "chain",
        "in-interface",
        "src-address",
        "protocol",
        "dst-port",
        "action",
        "comment",
        "place-before",
    ][..];
    let nat = &[
        "chain",
        "src-address",
        "dst-address",
        "out-interface",
        "out-interface-list",
        "action",
        "to-addresses",
        "comment",
    ][..];
    BTreeMap::from([
        (("/system identity", "set"), &["name"][..]),
        (("/interface list", "find"), &["name"][..]),
        (("/interface wireguard", "add"), wireguard),
        (("/interface wireguard", "set"), wireguard),
        (("/interface wireguard peers", "add"), peer),
        (("/interface wireguard peers", "set"), peer),
        (("/ip address", "add"), address),
        (("/ip route", "add"), route),
        (("/ipv6 route", "add"), route),
        (("/ipv6 address", "add"), address6),
        (("/ip service", "set"), &["address", "port", "disabled"][..]),
        (("/ip firewall filter", "add"), filter),
        (("/ipv6 firewall filter", "add"), filter),
        (("/ip firewall nat", "add"), nat),
    ])
}

/// Read-only properties that `find` may match on.
const FIND_ONLY: &[&str] = &["public-key", "dynamic"];

/// Splits text into words at spaces outside quoted strings (with `\` escapes),
/// brackets, braces and parentheses, which stay whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars();
    let (mut quoted, mut depth) = (false, 0i32);
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
            '[' | '{' | '(' if !quoted => {
                depth += 1;
                cur.push(c);
            }
            ']' | '}' | ')' if !quoted => {
                depth -= 1;
                assert!(depth >= 0, "unbalanced {c}: {line}");
                cur.push(c);
            }
            ' ' if !quoted && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '$' | '?' if quoted => panic!("unescaped {c} in a string: {line}"),
            _ => cur.push(c),
        }
    }
    assert!(!quoted, "unterminated string: {line}");
    assert_eq!(depth, 0, "unbalanced brackets: {line}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `text` without its enclosing `open` and `close`.
fn inside<'a>(text: &'a str, open: &str, close: &str) -> &'a str {
    text.strip_prefix(open)
        .and_then(|t| t.strip_suffix(close))
        .unwrap_or_else(|| panic!("expected {open}…{close}: {text}"))
}

fn check_value(key: &str, value: &str, line: &str) {
    let unquoted = value.trim_matches('"');
    let prefix = |v: &str| v.parse::<IpNet>().is_ok();
    let ok = match key {
        // The API service takes a list of who may use it.
        "address" if line.starts_with("/ip service") => unquoted.split(',').all(prefix),
        // A rule's source: one address as RouterOS shows it, or a prefix.
        "src-address" => prefix(unquoted) || unquoted.parse::<std::net::IpAddr>().is_ok(),
        "address" | "dst-address" => prefix(unquoted),
        "allowed-address" => unquoted.split(',').all(prefix),
        "endpoint-port" | "listen-port" | "mtu" | "port" | "dst-port" => {
            unquoted.parse::<u16>().is_ok_and(|p| p > 0)
        }
        "persistent-keepalive" => unquoted
            .strip_suffix('s')
            .is_some_and(|n| n.parse::<u16>().is_ok()),
        "public-key" | "private-key" => wgplane::keys::decode(unquoted).is_ok(),
        // Empty: none (removed here).
        "preshared-key" => value == "\"\"" || wgplane::keys::decode(unquoted).is_ok(),
        "endpoint-address" => {
            !unquoted.contains(':') || unquoted.parse::<std::net::Ipv6Addr>().is_ok()
        }
        "chain" => matches!(unquoted, "srcnat" | "dstnat" | "input"),
        "advertise" | "no-dad" | "dynamic" => matches!(unquoted, "yes" | "no"),
        "action" => matches!(unquoted, "masquerade" | "src-nat" | "accept"),
        "place-before" => {
            // The first static rule: `[:pick [<menu> find dynamic=no] 0]`.
            let pick = inside(value, "[:pick ", " 0]");
            check_find(inside(pick, "[", "]"), line);
            true
        }
        _ => !unquoted.is_empty(),
    };
    assert!(ok, "bad value for {key}: {value:?} in: {line}");
}

/// Splits `words` at the command verb: (menu, verb, the rest).
fn at_verb<'a>(words: &'a [String], line: &str) -> (String, &'a str, &'a [String]) {
    assert!(
        words[0].starts_with('/'),
        "a command starts with a menu path: {line}"
    );
    let verb_at = words
        .iter()
        .position(|w| matches!(w.as_str(), "add" | "set" | "find"))
        .unwrap_or_else(|| panic!("no command verb in: {line}"));
    (
        words[..verb_at].join(" "),
        &words[verb_at],
        &words[verb_at + 1..],
    )
}

/// `key=value` words for `menu`: known keys, valid values.
fn check_params(menu: &str, allowed: &[&str], params: &[String], find: bool, line: &str) {
    for word in params {
        let (key, value) = word
            .split_once('=')
            .unwrap_or_else(|| panic!("stray word {word:?} in: {line}"));
        assert!(
            allowed.contains(&key) || (find && FIND_ONLY.contains(&key)),
            "{menu} has no parameter {key}: {line}"
        );
        check_value(key, value, line);
    }
}

/// `<menu> find key=value…`, with `menu` the one given, or none inside a `set`.
fn check_find(text: &str, line: &str) {
    let words = words(text);
    let (menu, verb, params) = at_verb(&words, line);
    assert_eq!(verb, "find", "{line}");
    let allowed = grammar()
        .into_iter()
        .filter(|((m, _), _)| *m == menu)
        .flat_map(|(_, p)| p.iter().copied())
        .collect::<Vec<_>>();
    assert!(!allowed.is_empty(), "unknown menu {menu}: {line}");
    check_params(&menu, &allowed, params, true, line);
}

/// One command: `:if (…) do={…} else={…}`, `:error "…"`, or `<menu> add|set …`.
fn check_command(command: &str, line: &str) {
    // `:do {…} on-error={}`: a command whose failure is no error.
    if let Some(rest) = command.strip_prefix(":do {") {
        let (inner, tail) = rest
            .rsplit_once("} on-error={")
            .unwrap_or_else(|| panic!("a :do without on-error: {line}"));
        assert_eq!(tail, "}", "{line}");
        check_command(inner, line);
        return;
    }
    if let Some(rest) = command.strip_prefix(":if ") {
        let parts = words(rest);
        // The condition: `([:len [<menu> find …]] = 0)`.
        let condition = words(inside(&parts[0], "(", ")"));
        assert_eq!(condition[1..], ["=", "0"], "{line}");
        check_find(inside(&condition[0], "[:len [", "]]"), line);
        assert!((2..=3).contains(&parts.len()), "{line}");
        check_command(inside(&parts[1], "do={", "}"), line);
        if let Some(otherwise) = parts.get(2) {
            check_command(inside(otherwise, "else={", "}"), line);
        }
        return;
    }
    if let Some(message) = command.strip_prefix(":error ") {
        assert!(
            words(message).len() == 1 && message.starts_with('"'),
            "{line}"
        );
        return;
    }
    let words = words(command);
    let (menu, verb, mut params) = at_verb(&words, line);
    let allowed = grammar()
        .get(&(menu.as_str(), verb))
        .copied()
        .unwrap_or_else(|| panic!("unknown menu/command {menu} {verb}: {line}"));
    // A `set` names its item first (`/ip service set api …`, `set [find …]`),
    // except in menus of one item (`/system identity`).
    let named = |w: &&String| w.starts_with('[') || !w.contains('=');
    if let Some(item) = params.first().filter(|w| verb == "set" && named(w)) {
        if item.starts_with('[') {
            check_find(&format!("{menu} {}", inside(item, "[", "]")), line);
        }
        params = &params[1..];
    }
    check_params(&menu, allowed, params, false, line);
    assert!(
        !command.contains("endpoint="),
        "RouterOS v7 has no endpoint=host:port"
    );
}

fn check_script(script: &str) {
    // One block, so that an error stops the rest, pasted or imported.
    let body: Vec<&str> = script.lines().skip_while(|l| l.starts_with('#')).collect();
    assert_eq!(body.first(), Some(&"{"), "one block: {script}");
    assert_eq!(body.last(), Some(&"}"), "one block: {script}");
    assert_eq!(
        body.iter().filter(|l| **l == "{" || **l == "}").count(),
        2,
        "{script}"
    );
    let mut commands = 0;
    for line in script.lines() {
        if line.is_empty() || line.starts_with('#') || line == "{" || line == "}" {
            continue;
        }
        check_command(line, line);
        // Run again, the script must not add anything twice.
        let add = words(line).get(2).is_some_and(|w| w == "add")
            || words(line).get(3).is_some_and(|w| w == "add");
        assert!(!add, "an unguarded add: {line}");
        commands += 1;
    }
    assert!(commands >= 6, "a script has its commands");
}
