//! Durable state: after `kill -9` and a restart on the same state dir, every tunnel,
//! peer and policy is back with the same keys, and peers pass traffic again without
//! being provisioned again. Private keys are never stored in plain text, a wrong
//! master key stops start-up, and a change whose client hangs up is still finished
//! and stored.

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{keypair, sample, Appliance, UdpPeer};
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

/// After a restart the gateway still holds its old session and, with nothing
/// to send but keepalives, starts no handshake for minutes. The appliance kept
/// where it last heard from the gateway and wakes it there with the first phone
/// packet that finds it down; the packets after that go through.
#[test]
fn a_restarted_appliance_wakes_its_gateway_where_it_last_heard_from_it() {
    let app = Appliance::start();
    let support::Ktn {
        server_key,
        gateway: gw_secret,
        phone: p_secret,
    } = app.put_ktn("kitonga");

    let server: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut gateway = UdpPeer::new(gw_secret, &server_key, server, 0x10);
    let heard_at = gateway.socket.local_addr().unwrap();
    assert!(gateway.handshake());
    // Written by the event hub once the gateway is connected.
    let db = rusqlite::Connection::open(app.state_dir().join("state.db")).expect("open state");
    let stored = || -> Option<String> {
        db.query_row("SELECT endpoint FROM routers WHERE id = 'gw'", [], |r| {
            r.get(0)
        })
        .ok()
        .flatten()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stored(), Some(heard_at.to_string()));
    drop(db);

    let (state, api_port, first_port) = app.kill9();
    let app = Appliance::start_with(state, api_port, first_port, &[]).expect("restart");
    let view = app.expect("GET", "/v1/tenants/kitonga/routers/gw", None, 200);
    assert_eq!(view["endpoint"], heard_at.to_string(), "{view}");
    assert_eq!(view["status"], "pending", "{view}");

    // The gateway keeps its old session and says nothing. A phone dials in; its
    // first packet is dropped, and wakes the gateway.
    let mut phone = UdpPeer::new(p_secret, &server_key, server, 0x20);
    assert!(phone.handshake());
    let packet = ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 64);
    phone.send(&packet);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut through = None;
    while through.is_none() && Instant::now() < deadline {
        // Answers the appliance's initiation; the phone keeps sending.
        through = gateway.recv(Duration::from_millis(200));
        if through.is_none() {
            phone.send(&packet);
        }
    }
    let got = through.unwrap_or_else(|| panic!("the gateway was never woken\n{}", app.log()));
    assert_eq!(parse(&got).unwrap().src, ip("10.200.0.2"));
    let metrics = app.scrape();
    assert!(
        support::sample(
            &metrics,
            "wgplane_packets_dropped_total",
            &["reason=\"egress_down\""]
        ) >= 1.0,
        "the waking packet was dropped, not leaked"
    );
}

/// A tunnel whose port another process holds when the appliance starts is
/// down, not gone: `/healthz` says so, the other tunnels serve, changes to it
/// are stored, and it comes up with its peers once the port is free.
#[test]
fn a_tunnel_whose_port_is_taken_at_start_comes_up_once_it_is_free() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/first", None, 201);
    let second = app.expect("PUT", "/v1/tenants/second", None, 201);
    let server_key = second["server_public_key"].as_str().unwrap().to_owned();
    let port = second["listen_port"].as_u64().unwrap() as u16;
    let (r_secret, r_public) = keypair();
    let body = format!(r#"{{"public_key":"{r_public}"}}"#);
    app.expect("PUT", "/v1/tenants/second/routers/r1", Some(&body), 201);

    let (state, api_port, first_port) = app.kill9();
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("take the port");
    let app = Appliance::start_unhealthy(state, api_port, first_port).expect("restart");
    let (status, body) = app.call_with("GET", "/healthz", None, None);
    assert_eq!(
        (status, body.as_str()),
        (503, Some("1 of 2 tunnels down\n"))
    );
    // Not ready, but alive: a liveness probe must not restart it for a port
    // that a restart would not free.
    let (status, body) = app.call_with("GET", "/livez", None, None);
    assert_eq!((status, body.as_str()), (200, Some("alive\n")));
    let view = app.expect("GET", "/v1/tenants/second", None, 200);
    assert_eq!(view["status"], "down", "{view}");
    assert_eq!(
        app.expect("GET", "/v1/tenants/first", None, 200)["status"],
        "active"
    );
    let metrics = app.scrape();
    let up = |tenant: &str| {
        let label = format!("tenant=\"{tenant}\"");
        sample(&metrics, "wgplane_tunnel_up", &[&label])
    };
    assert_eq!((up("first"), up("second")), (1.0, 0.0));
    // What only the running tunnel can tell is answered as documented.
    for path in [
        "/v1/tenants/second/route?src=10.101.1.1&dst=10.101.0.1",
        "/v1/tenants/second/strangers",
    ] {
        let (status, error) = app.call("GET", path, None);
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (503, Some("tunnel_down")),
            "{path}: {error}"
        );
    }

    // A change to it is stored and said to wait for the tunnel.
    let (r2_secret, r2_public) = keypair();
    let body = format!(r#"{{"public_key":"{r2_public}"}}"#);
    let (status, error) = app.call("PUT", "/v1/tenants/second/routers/r2", Some(&body));
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (503, Some("tunnel_down")),
        "{error}"
    );
    app.expect("GET", "/v1/tenants/second/routers/r2", None, 200);
    // So is a forward: it opens when the tunnel comes up, on the port it gets.
    let (status, error) = app.call(
        "PUT",
        "/v1/tenants/second/routers/r1/forwards/8728",
        Some(r#"{"listen":"127.0.0.1:0"}"#),
    );
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (503, Some("tunnel_down")),
        "{error}"
    );
    let said = error["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("the change is stored"), "{error}");

    // The port is free again: the supervisor brings the tunnel up, with the
    // peer it had and the one added while it was down.
    drop(squatter);
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.call_with("GET", "/healthz", None, None).0 != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = app.call_with("GET", "/healthz", None, None);
    assert_eq!(status, 200, "the tunnel never came back\n{}", app.log());
    assert_eq!(
        app.expect("GET", "/v1/tenants/second", None, 200)["status"],
        "active"
    );
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut r1 = UdpPeer::new(r_secret, &server_key, server, 0x10);
    let mut r2 = UdpPeer::new(r2_secret, &server_key, server, 0x20);
    assert!(r1.handshake() && r2.handshake(), "{}", app.log());
    assert!(app.log().contains("tunnel is back up"), "{}", app.log());
    let forwards = app.expect("GET", "/v1/tenants/second/routers/r1/forwards", None, 200);
    let listen: SocketAddr = forwards[0]["listen"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{forwards}"));
    assert_ne!(listen.port(), 0, "{forwards}");
    assert!(
        std::net::TcpStream::connect(listen).is_ok(),
        "the forward stored while the tunnel was down listens"
    );
}

/// `wgplane backup` copies the state while the appliance runs; the copy, with
/// the master key, brings back every change acknowledged before it, keys
/// included, and nothing after.
#[test]
fn a_backup_taken_while_running_restores_what_was_acknowledged_before_it() {
    let app = Appliance::start();
    let ktn = app.put_ktn("kitonga");
    app.expect("PUT", "/v1/tenants/kitonga/routers/gen", Some("{}"), 201);

    let out_dir = tempfile::tempdir().expect("tempdir");
    let copy = out_dir.path().join("wgplane-backup.db");
    let backup = std::process::Command::new(support::binary())
        .arg("backup")
        .arg("--state-dir")
        .arg(app.state_dir())
        .arg(&copy)
        .env_remove("WGPLANE_CONFIG")
        // Named as `run` would have it: the summary says where the key is.
        .env("WGPLANE_MASTER_KEY_FILE", "/etc/wgplane/master-key")
        .output()
        .expect("run wgplane backup");
    let said = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    assert!(said.contains("1 tenants, 2 routers, 1 clients"), "{said}");
    assert!(
        said.contains("master key (/etc/wgplane/master-key"),
        "{said}"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&copy).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the copy is readable by others: {mode:o}");
    // After the backup: not in it.
    app.expect("PUT", "/v1/tenants/kitonga/routers/later", Some("{}"), 201);

    let master_key = std::fs::read(app.state_dir().join("master-key")).expect("master key");
    let (_, api_port, first_port) = app.kill9();
    let restored = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&copy, restored.path().join("state.db")).expect("restore the copy");
    std::fs::write(restored.path().join("master-key"), master_key).expect("master key");
    let app =
        Appliance::start_with(restored, api_port, first_port, &[]).expect("start on the copy");
    let list = app.expect("GET", "/v1/tenants/kitonga/routers", None, 200);
    let mut ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["router_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["gen", "gw"]);

    // The tunnel key and the policy came back: the phone's packets reach the gateway.
    let server: SocketAddr = ([127, 0, 0, 1], first_port).into();
    let mut gateway = UdpPeer::new(ktn.gateway, &ktn.server_key, server, 0x10);
    let mut phone = UdpPeer::new(ktn.phone, &ktn.server_key, server, 0x20);
    assert!(gateway.handshake() && phone.handshake(), "{}", app.log());
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 64));
    let got = gateway
        .recv(Duration::from_secs(3))
        .expect("through the gateway");
    assert_eq!(parse(&got).unwrap().src, ip("10.200.0.2"));
}

/// `wgplane rekey` seals the state under a new master key: refused while the
/// appliance runs; afterwards the new key opens the state with every key as
/// it was, and the old one no longer does.
#[test]
fn rekey_moves_the_state_to_a_new_master_key() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    app.expect("PUT", "/v1/tenants/kitonga/routers/gen", Some("{}"), 201);
    let script = app.expect("GET", "/v1/tenants/kitonga/routers/gen/script", None, 200);
    let old_key = std::fs::read_to_string(app.state_dir().join("master-key")).expect("key");
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let new_key_file = keys_dir.path().join("new-master-key");
    let rekey = |state: &std::path::Path| {
        std::process::Command::new(support::binary())
            .arg("rekey")
            .arg("--state-dir")
            .arg(state)
            .arg("--new-key-file")
            .arg(&new_key_file)
            .env_remove("WGPLANE_CONFIG")
            .env_remove("WGPLANE_MASTER_KEY")
            .output()
            .expect("run wgplane rekey")
    };
    let refused = rekey(app.state_dir());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains("another wgplane is running"), "{said}");

    let (state, api_port, first_port) = app.kill9();
    // A copy kept before an upgrade is named: the old key still opens it.
    let copy = state.path().join("state.db.v3");
    std::fs::copy(state.path().join("state.db"), &copy).expect("a copy");
    let done = rekey(state.path());
    let said = String::from_utf8_lossy(&done.stdout);
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{said}{err}");
    assert!(
        said.contains(&format!(
            "{} (kept before an upgrade) is still sealed under the old key",
            copy.display()
        )),
        "{said}"
    );
    std::fs::remove_file(&copy).expect("removed");
    // The tunnel's key and the router's generated one.
    assert!(
        said.contains("2 keys (private and preshared) sealed"),
        "{said}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&new_key_file)
            .expect("new key written")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let new_key = std::fs::read_to_string(&new_key_file).expect("new key");

    let key = [("WGPLANE_MASTER_KEY", new_key.trim())];
    let app = Appliance::start_with(state, api_port, first_port, &key).expect("the new key");
    let again = app.expect("GET", "/v1/tenants/kitonga", None, 200);
    assert_eq!(again["server_public_key"], tenant["server_public_key"]);
    let same = app.expect("GET", "/v1/tenants/kitonga/routers/gen/script", None, 200);
    assert_eq!(same, script, "the router's generated key changed");

    let (state, api_port, first_port) = app.kill9();
    let key = [("WGPLANE_MASTER_KEY", old_key.trim())];
    match Appliance::start_with(state, api_port, first_port, &key) {
        Ok(_) => panic!("the old master key still opens the state"),
        Err(log) => assert!(log.contains("master key does not match"), "{log}"),
    }
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

/// Clients that hang up while their change is being made never leave it half
/// made: hyper drops a request's handler when its connection closes, and a
/// handler dropped between the registry, the store and the tunnel would leave a
/// tenant in memory but not stored, or stored without a running tunnel. Each
/// client here hangs up a little later than the one before (0-39 ms after its
/// request), so some are gone before their change starts, some in the middle of
/// it (`src/api/detach.rs` makes those finish) and some after the answer. Every
/// tenant that is listed has its tunnel up and comes back the same after
/// `kill -9`; every id can be put again afterwards.
#[test]
fn changes_whose_clients_hang_up_are_never_half_made() {
    const N: usize = 40;
    // A port for each tenant: the ones after the usual four are no other
    // test's to take meanwhile.
    let state = tempfile::tempdir().expect("tempdir");
    let ports = support::free_udp_ports(N as u16);
    let app = Appliance::start_with(state, support::free_tcp_port(), ports, &[])
        .unwrap_or_else(|log| panic!("wgplane did not come up:\n{log}"));
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let (api, token) = (app.api, app.token.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(api).expect("connect to the API");
                write!(
                    s,
                    "PUT /v1/tenants/gone-{i} HTTP/1.1\r\nHost: wgplane\r\n\
                     Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
                     Content-Length: 2\r\n\r\n{{}}"
                )
                .expect("send the request");
                std::thread::sleep(Duration::from_millis(i as u64));
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let tenants = |app: &Appliance| -> Vec<(String, String)> {
        let list = app.expect("GET", "/v1/tenants", None, 200);
        let mut out: Vec<(String, String)> = list
            .as_array()
            .expect("a list")
            .iter()
            .map(|t| {
                let id = t["tenant_id"].as_str().unwrap_or_default().to_owned();
                let key = t["server_public_key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (id, key)
            })
            .collect();
        out.sort();
        out
    };
    let tunnels_up = |app: &Appliance, ids: &[(String, String)]| {
        let text = app.scrape();
        for (id, _) in ids {
            let label = format!(r#"tenant="{id}""#);
            assert_eq!(sample(&text, "wgplane_tunnel_up", &[&label]), 1.0, "{id}");
        }
    };
    // Changes that were cut loose finish on their own: wait until the list
    // stops growing.
    let mut before = tenants(&app);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = tenants(&app);
        if now == before || Instant::now() > deadline {
            break;
        }
        before = now;
    }
    eprintln!("{} of {N} changes were made", before.len());
    tunnels_up(&app, &before);
    let (state, api_port, first_port) = app.kill9();
    let app = Appliance::start_with(state, api_port, first_port, &[]).expect("restart");
    assert_eq!(tenants(&app), before, "stored, keys and all");
    tunnels_up(&app, &before);
    // Nothing half made stands in the way of putting every id again.
    for i in 0..N {
        let id = format!("gone-{i}");
        let made = before.iter().any(|(t, _)| *t == id);
        let path = format!("/v1/tenants/{id}");
        app.expect("PUT", &path, None, if made { 200 } else { 201 });
    }
    let all = tenants(&app);
    assert_eq!(all.len(), N);
    tunnels_up(&app, &all);
}

/// Migration: a tenant made with a kernel WireGuard server's key answers a
/// router configured for that server, keeps the key sealed across a `kill -9`,
/// and never shows it: not in an answer, a list, the metrics or the log.
#[test]
fn a_tunnel_key_brought_from_elsewhere_is_kept_sealed_and_never_shown() {
    let app = Appliance::start();
    let (old_secret, old_public) = keypair();
    let old_private = wgplane::keys::encode(&old_secret.to_bytes());
    let body = format!("{{\"private_key\":\"{old_private}\",\"subnet\":\"10.100.0.0/16\"}}");
    let t = app.expect("PUT", "/v1/tenants/moved", Some(&body), 201);
    assert_eq!(t["server_public_key"], old_public.as_str(), "{t}");
    // The same key again is no change; another one, or the same for another
    // tenant, is refused by name.
    app.expect("PUT", "/v1/tenants/moved", Some(&body), 200);
    let (other, _) = keypair();
    let other = format!(
        "{{\"private_key\":\"{}\"}}",
        wgplane::keys::encode(&other.to_bytes())
    );
    let (status, v) = app.call("PUT", "/v1/tenants/moved", Some(&other));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "immutable_field", "{v}");
    assert_eq!(v["error"]["field"], "private_key", "{v}");
    let (status, v) = app.call("PUT", "/v1/tenants/twin", Some(&body));
    assert_eq!(
        (status, &v["error"]["code"]),
        (409, &"duplicate_tunnel_key".into()),
        "{v}"
    );
    let (status, v) = app.call("PUT", "/v1/tenants/bad", Some("{\"private_key\":\"AAAA\"}"));
    assert_eq!(
        (status, &v["error"]["field"]),
        (400, &"private_key".into()),
        "{v}"
    );

    let (router_secret, router_public) = keypair();
    let r = format!("{{\"public_key\":\"{router_public}\",\"vpn_ip\":\"10.100.1.1\"}}");
    app.expect("PUT", "/v1/tenants/moved/routers/branch-a", Some(&r), 201);
    let port = t["listen_port"].as_u64().expect("listen_port") as u16;
    let endpoint = SocketAddr::from(([127, 0, 0, 1], port));
    let mut router = UdpPeer::new(router_secret.clone(), &old_public, endpoint, 0x51);
    assert!(
        router.handshake(),
        "the router knows the old server's key\n{}",
        app.log()
    );

    let raw = old_secret.to_bytes();
    let shown = [
        app.call("GET", "/v1/tenants", None).1.to_string(),
        app.call("GET", "/v1/tenants/moved", None).1.to_string(),
        app.scrape(),
        app.log(),
    ];
    for text in shown {
        assert!(!text.contains(&old_private), "the key is shown: {text}");
    }
    assert!(files_contain(app.state_dir(), old_private.as_bytes()).is_empty());
    assert!(files_contain(app.state_dir(), &raw).is_empty());

    let (state, api_port, first_port) = app.kill9();
    let app = Appliance::start_with(state, api_port, first_port, &[]).expect("restart");
    let again = app.expect("GET", "/v1/tenants/moved", None, 200);
    assert_eq!(again["server_public_key"], old_public.as_str());
    let mut router = UdpPeer::new(router_secret, &old_public, endpoint, 0x52);
    assert!(
        router.handshake(),
        "the key survives a restart\n{}",
        app.log()
    );
}
