//! Black box: the real `wgplane` binary on loopback, provisioned through its API,
//! carries traffic between WireGuard peers living in this test process.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{keypair, Appliance, UdpPeer};
use wgplane::core::packet::{build::ip_packet, parse};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn ktn_and_site_traffic_through_the_real_binary() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    assert_eq!(tenant["subnet_cidr"], "10.100.0.0/16");
    assert_eq!(tenant["server_ip"], "10.100.0.1");
    assert_eq!(tenant["interface_name"], "wg0");
    assert_eq!(tenant["listen_port"], app.first_port);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    // Repeating the PUT changes nothing.
    let again = app.expect("PUT", "/v1/tenants/kitonga", Some("{}"), 200);
    assert_eq!(again["server_public_key"], tenant["server_public_key"]);

    let (gw_secret, gw_public) = keypair();
    let body = format!(r#"{{"name":"gw","public_key":"{gw_public}","vpn_ip":"10.100.0.40"}}"#);
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/mikrotik-1",
        Some(&body),
        201,
    );
    let (r_secret, r_public) = keypair();
    let body = format!(r#"{{"name":"Branch-A","public_key":"{r_public}"}}"#);
    let branch = app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/branch-a",
        Some(&body),
        201,
    );
    assert_eq!(branch["vpn_ip"], "10.100.1.1");
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["mikrotik-1"]}"#),
        201,
    );
    let (p_secret, p_public) = keypair();
    let body = format!(r#"{{"name":"phone","public_key":"{p_public}"}}"#);
    let phone = app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-1",
        Some(&body),
        201,
    );
    assert_eq!(phone["vpn_ip"], "10.200.0.2");
    assert!(phone["config"].as_str().unwrap().contains(&server_key));
    assert!(
        !phone["config"]
            .as_str()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("PrivateKey")),
        "the key is the phone's own"
    );

    // Before the gateway is up, the explain endpoint says the phone's traffic drops.
    let v = app.expect(
        "GET",
        "/v1/tenants/kitonga/route?src=10.200.0.2&dst=198.18.0.1",
        None,
        200,
    );
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["reason"], "egress_down");

    let mut gateway = UdpPeer::new(gw_secret, &server_key, endpoint, 0x10);
    let mut branch = UdpPeer::new(r_secret, &server_key, endpoint, 0x20);
    let mut phone = UdpPeer::new(p_secret, &server_key, endpoint, 0x30);
    assert!(gateway.handshake(), "gateway handshake\n{}", app.log());
    assert!(branch.handshake(), "branch handshake");
    assert!(phone.handshake(), "phone handshake");

    let v = app.expect(
        "GET",
        "/v1/tenants/kitonga/route?src=10.200.0.2&dst=198.18.0.1",
        None,
        200,
    );
    assert_eq!(v["verdict"], "forward");
    assert_eq!(v["to"]["id"], "mikrotik-1");
    assert_eq!(v["rule"], "egress 10.200.0.0/24");

    // Phone -> internet leaves through the gateway, and the answer comes back.
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 100));
    let at_gw = gateway
        .recv(Duration::from_secs(3))
        .expect("gateway got the phone's packet");
    let h = parse(&at_gw).unwrap();
    assert_eq!((h.src, h.dst), (ip("10.200.0.2"), ip("198.18.0.1")));
    gateway.send(&ip_packet(ip("198.18.0.1"), ip("10.200.0.2"), 100));
    let at_phone = phone
        .recv(Duration::from_secs(3))
        .expect("phone got the answer");
    assert_eq!(parse(&at_phone).unwrap().src, ip("198.18.0.1"));

    // Router <-> router inside the tenant.
    branch.send(&ip_packet(ip("10.100.1.1"), ip("10.100.0.40"), 40));
    let at_gw = gateway
        .recv(Duration::from_secs(3))
        .expect("gateway got the branch's packet");
    assert_eq!(parse(&at_gw).unwrap().src, ip("10.100.1.1"));

    // A phone spoofing the gateway's address gets nowhere.
    phone.send(&ip_packet(ip("10.100.0.40"), ip("10.100.1.1"), 40));
    assert!(branch.recv(Duration::from_millis(500)).is_none());

    // Status is live and counts bytes.
    let r = app.expect("GET", "/v1/tenants/kitonga/routers/mikrotik-1", None, 200);
    assert_eq!(r["status"], "connected");
    assert!(r["last_handshake_at"].as_str().unwrap().ends_with('Z'));
    assert!(r["rx_bytes"].as_u64().unwrap() > 0 && r["tx_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        r["endpoint"],
        gateway.socket.local_addr().unwrap().to_string()
    );
    let list = app.expect("GET", "/v1/tenants/kitonga/clients", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(
        list[0].get("config").is_none(),
        "lists carry no device config"
    );

    // Changing the branch router's allowed prefixes keeps everyone's sessions.
    let body = format!(
        r#"{{"name":"Branch-A","public_key":"{r_public}","allowed_ips":["192.168.88.0/24"]}}"#
    );
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/branch-a",
        Some(&body),
        200,
    );
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.2"), 10));
    assert!(
        gateway.recv(Duration::from_secs(3)).is_some(),
        "sessions survived the change"
    );
    branch.send(&ip_packet(ip("192.168.88.7"), ip("10.100.0.40"), 10));
    assert!(
        gateway.recv(Duration::from_secs(3)).is_some(),
        "new prefix routes"
    );

    // Deleting the tenant closes its port.
    app.expect("DELETE", "/v1/tenants/kitonga", None, 204);
    app.expect("GET", "/v1/tenants/kitonga", None, 404);
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", app.first_port)).is_ok(),
        "port released"
    );
}

/// On a wildcard address (the default), a router that dialled one of the
/// host's addresses hears back from that one, even where the kernel would
/// answer it from another: here it reaches the tunnel at 127.0.0.5, which the
/// kernel would not pick to answer 127.0.0.1 from, and its socket (connected,
/// as a NAT's mapping is) takes nothing from elsewhere.
#[test]
fn a_peer_hears_back_from_the_address_it_dialled() {
    let app = Appliance::start_with_env(&[("WGPLANE_BIND", "0.0.0.0")]);
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (secret, public) = keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/kitonga/routers/r1", Some(&body), 201);
    let dialled: SocketAddr = ([127, 0, 0, 5], app.first_port).into();
    let mut router = UdpPeer::new(secret, &server_key, dialled, 1);
    router.connect_socket();
    assert!(router.handshake(), "no answer from the address dialled");
    // And what the tunnel sends it later (the server's ping reply) too.
    router.send(&wgplane::core::packet::build::icmp_echo_request(
        [10, 100, 1, 1].into(),
        [10, 100, 0, 1].into(),
        1,
    ));
    let reply = router.recv(Duration::from_secs(2)).expect("the echo reply");
    assert_eq!(parse(&reply).unwrap().src, ip("10.100.0.1"));
}

#[test]
fn two_tenants_get_their_own_ports_and_subnets() {
    let app = Appliance::start();
    let a = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let b = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    assert_eq!(a["subnet_cidr"], "10.100.0.0/16");
    assert_eq!(b["subnet_cidr"], "10.101.0.0/16");
    // Each has its own IPv6 network, the IPv4 one embedded.
    assert_eq!(a["subnet_ipv6_cidr"], "fd77:7770:a64::/64");
    assert_eq!(b["subnet_ipv6_cidr"], "fd77:7770:a65::/64");
    assert_eq!(b["server_ipv6"], "fd77:7770:a65::1");
    assert_eq!(b["listen_port"], app.first_port + 1);
    assert_eq!(b["interface_name"], "wg1");
    let list = app.expect("GET", "/v1/tenants", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);

    // A router of A dialling B's port is not a peer there.
    let (secret, public) = keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/r1", Some(&body), 201);
    let b_endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port + 1).into();
    let mut intruder = UdpPeer::new(
        secret,
        b["server_public_key"].as_str().unwrap(),
        b_endpoint,
        1,
    );
    assert!(
        !intruder.try_handshake(1),
        "tenant B must not accept tenant A's router"
    );

    // The operator asking why it does not connect: B's tunnel names the key,
    // where it dials from, and whose peer it is.
    let strangers = app.expect("GET", "/v1/tenants/kitonga/strangers", None, 200);
    let list = strangers.as_array().unwrap();
    assert_eq!(list.len(), 1, "{strangers}");
    assert_eq!(list[0]["public_key"], public.as_str());
    assert_eq!(
        list[0]["endpoint"],
        intruder.socket.local_addr().unwrap().to_string()
    );
    assert!(list[0]["initiations"].as_u64().unwrap() >= 1);
    assert!(list[0]["last_seen_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        list[0]["peer_of"],
        serde_json::json!({"tenant_id": "acme", "kind": "router", "id": "r1"})
    );
    let acme = app.expect("GET", "/v1/tenants/acme/strangers", None, 200);
    assert_eq!(acme, serde_json::json!([]));
}

/// The private key in a router's script.
fn script_key(app: &Appliance, router: &str) -> boringtun::x25519::StaticSecret {
    let (status, script) = app.call(
        "GET",
        &format!("/v1/tenants/acme/routers/{router}/script"),
        None,
    );
    assert_eq!(status, 200);
    let script = script.as_str().expect("script text").to_owned();
    let key = script
        .split("private-key=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a private-key in the script");
    boringtun::x25519::StaticSecret::from(wgplane::keys::decode(key).expect("a key"))
}

/// A replaced MikroTik (or a key that leaked): `POST …/key` gives the router
/// a key pair generated here, keeping its address; the old key cannot shake
/// hands any more, the new script's can. A router that kept its own key gets
/// one generated here the same way.
#[test]
fn a_new_key_replaces_a_routers() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let server: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let before = app.expect("PUT", "/v1/tenants/acme/routers/r1", None, 201);
    let old = script_key(&app, "r1");
    assert!(UdpPeer::new(old.clone(), &server_key, server, 1).handshake());

    let after = app.expect("POST", "/v1/tenants/acme/routers/r1/key", None, 200);
    assert_ne!(after["public_key"], before["public_key"]);
    assert_eq!(after["vpn_ip"], before["vpn_ip"]);
    let new = script_key(&app, "r1");
    assert_ne!(new.to_bytes(), old.to_bytes());
    assert!(
        !UdpPeer::new(old, &server_key, server, 2).try_handshake(1),
        "the old key is no peer any more"
    );
    assert!(UdpPeer::new(new, &server_key, server, 3).handshake());

    let (_, own) = keypair();
    let body = format!(r#"{{"public_key":"{own}"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/r2", Some(&body), 201);
    let generated = app.expect("POST", "/v1/tenants/acme/routers/r2/key", None, 200);
    assert_ne!(generated["public_key"], own.as_str());
    assert!(UdpPeer::new(script_key(&app, "r2"), &server_key, server, 4).handshake());

    let (status, v) = app.call("POST", "/v1/tenants/acme/routers/nobody/key", None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("router_not_found")),
        "{v}"
    );
}
