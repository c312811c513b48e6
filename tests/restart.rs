//! Durable state: after `kill -9` and a restart on the same state dir, every tunnel,
//! peer and policy is back with the same keys, and peers pass traffic again without
//! being provisioned again. Private keys are never stored in plain text, and a wrong
//! master key stops start-up.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{keypair, Appliance, UdpPeer};
use wgplane::core::packet::{build::ip_packet, parse};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read state dir").flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            hits.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    hits
}

#[test]
fn kill_9_and_restart_restores_everything() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let server_key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (gw_secret, gw_public) = keypair();
    let body = format!(r#"{{"name":"gw","public_key":"{gw_public}","vpn_ip":"10.100.0.40"}}"#);
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/mikrotik-1",
        Some(&body),
        201,
    );
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/generated",
        Some("{}"),
        201,
    );
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["mikrotik-1"]}"#),
        201,
    );
    let (p_secret, p_public) = keypair();
    let body = format!(r#"{{"public_key":"{p_public}"}}"#);
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-1",
        Some(&body),
        201,
    );
    let gen = app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-2",
        Some("{}"),
        201,
    );
    let gen_config = gen["config"].as_str().unwrap().to_owned();
    let gen_private = gen_config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .expect("generated key in config")
        .to_owned();

    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut gateway = UdpPeer::new(gw_secret.clone(), &server_key, endpoint, 0x10);
    let mut phone = UdpPeer::new(p_secret.clone(), &server_key, endpoint, 0x20);
    assert!(gateway.handshake() && phone.handshake());
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 64));
    assert!(gateway.recv(Duration::from_secs(3)).is_some());

    // No private key in plain text anywhere in the state dir.
    let raw = wgplane::keys::decode(&gen_private).unwrap();
    assert!(files_contain(app.state_dir(), gen_private.as_bytes()).is_empty());
    assert!(files_contain(app.state_dir(), &raw).is_empty());

    let (state, api_port, first_port) = app.kill9();
    let app = Appliance::start_with(state, api_port, first_port, &[]).expect("restart");
    let again = app.expect("GET", "/v1/tenants/kitonga", None, 200);
    assert_eq!(again["server_public_key"], server_key.as_str());
    assert_eq!(again["routers"], 2);
    assert_eq!(again["clients"], 2);
    let egress = app.expect("GET", "/v1/tenants/kitonga/egress", None, 200);
    assert_eq!(egress["gateways"][0], "mikrotik-1");
    let config = app.expect(
        "GET",
        "/v1/tenants/kitonga/clients/phone-2/config",
        None,
        200,
    );
    assert_eq!(
        config.as_str().unwrap(),
        gen_config,
        "generated keys survive"
    );

    // The same peers, never provisioned again, handshake and pass traffic.
    let mut gateway = UdpPeer::new(gw_secret, &server_key, endpoint, 0x30);
    let mut phone = UdpPeer::new(p_secret, &server_key, endpoint, 0x40);
    assert!(gateway.handshake(), "gateway reconnects\n{}", app.log());
    assert!(phone.handshake(), "phone reconnects");
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 64));
    let got = gateway
        .recv(Duration::from_secs(3))
        .expect("traffic after restart");
    assert_eq!(parse(&got).unwrap().src, ip("10.200.0.2"));

    // New objects still get fresh addresses (allocation state came back too).
    let r = app.expect("PUT", "/v1/tenants/kitonga/routers/third", Some("{}"), 201);
    assert_eq!(r["vpn_ip"], "10.100.1.2");
    let c = app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-3",
        Some("{}"),
        201,
    );
    assert_eq!(c["vpn_ip"], "10.200.0.4");
}

#[test]
fn a_wrong_master_key_stops_start_up() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/acme", None, 201);
    let (state, api_port, first_port) = app.kill9();
    let other = wgplane::keys::encode(&[9u8; 32]);
    let err = match Appliance::start_with(
        state,
        api_port,
        first_port,
        &[("WGPLANE_MASTER_KEY", &other)],
    ) {
        Ok(_) => panic!("started with the wrong master key"),
        Err(log) => log,
    };
    assert!(err.contains("master key does not match"), "{err}");
}

/// Two appliances on one state directory would each keep their own registry
/// over the same database: the second one is refused while the first runs.
#[test]
fn a_second_appliance_on_the_same_state_is_refused() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/acme", None, 201);
    let api = support::free_tcp_port();
    let first = support::free_udp_ports(4);
    let log = app.state_dir().join("second.log");
    let mut second = std::process::Command::new(support::binary())
        .args(["run", "--bind", "127.0.0.1", "--public-host", "127.0.0.1"])
        .args(["--api-listen", &format!("127.0.0.1:{api}")])
        .args(["--first-port", &first.to_string()])
        .arg("--state-dir")
        .arg(app.state_dir())
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("WGPLANE_")))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start a second wgplane");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second appliance kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "the second appliance ran: {err}");
    assert!(err.contains("another wgplane is running"), "{err}");
    // The first one is untouched.
    app.expect("GET", "/v1/tenants/acme", None, 200);
}

/// A state edited by hand so that it breaks a rule the API enforces stops
/// start-up with a message that names the tenant and the peer.
#[test]
fn an_inconsistent_state_stops_start_up_and_names_the_peer() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/acme", None, 201);
    app.expect("PUT", "/v1/tenants/acme/routers/r1", Some("{}"), 201);
    let (state, api_port, first_port) = app.kill9();
    let db = rusqlite::Connection::open(state.path().join("state.db")).expect("open state");
    db.execute(
        "UPDATE routers SET vpn_ip = '10.101.1.1' WHERE id = 'r1'",
        [],
    )
    .expect("edit");
    drop(db);
    let err = match Appliance::start_with(state, api_port, first_port, &[]) {
        Ok(_) => panic!("started on an inconsistent state"),
        Err(log) => log,
    };
    assert!(
        err.contains("the stored state is inconsistent: tenant acme: router r1 has 10.101.1.1"),
        "{err}"
    );
}
