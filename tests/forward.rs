//! Management forwarding over the userspace stack, black box: the backend reaches a
//! router's TCP port inside its tunnel through a host listener, with no kernel
//! route and no privileges. 10 MB echo intact both ways, 50 concurrent
//! connections, at most 64 at once per forward, a clear failure for an
//! unreachable router, and the forward comes back after a restart.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::stack_router::StackRouter;
use support::{keypair, Appliance, UdpPeer};

fn echo(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect to the forward");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = stream.try_clone().unwrap();
    let len = data.len();
    let read = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0u8; 65536];
        while got.len() < len {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    stream.write_all(data).expect("write");
    let got = read.join().unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    got
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn forward_carries_10_mb_and_50_connections() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (secret, public) = keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    let router = app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/branch-a",
        Some(&body),
        201,
    );
    assert_eq!(router["vpn_ip"], "10.100.1.1");
    let fwd = app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/branch-a/forwards/8728",
        None,
        201,
    );
    assert_eq!(fwd["target"], "10.100.1.1:8728");
    let listen: SocketAddr = fwd["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(listen.port(), 0, "the bound port is reported");

    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut peer = UdpPeer::new(secret, &key, endpoint, 3);
    assert!(peer.handshake());
    let _router = StackRouter::start(peer, "10.100.1.1".parse().unwrap(), 8728, 60);

    // 10 MB through one connection, both directions at once.
    let started = Instant::now();
    let data = pattern(10 * 1024 * 1024, 1);
    let got = echo(listen, &data);
    let elapsed = started.elapsed();
    if got.len() != data.len() {
        let text = app.scrape();
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
        {
            eprintln!("{l}");
        }
    }
    assert_eq!(got.len(), data.len(), "all 10 MB came back");
    assert!(got == data, "intact");
    eprintln!(
        "forward: 10 MiB echoed in {:.2} s ({:.1} MiB/s each way)",
        elapsed.as_secs_f64(),
        10.0 / elapsed.as_secs_f64()
    );

    // 50 concurrent connections, 100 KiB each.
    let workers: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(100 * 1024, i + 2);
                let got = echo(listen, &data);
                got == data
            })
        })
        .collect();
    let ok = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .filter(|intact| *intact)
        .count();
    assert_eq!(ok, 50);

    // A connection left open while the forward is deleted.
    let mut held = TcpStream::connect(listen).expect("connect to the forward");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"held").expect("write");
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).expect("echoed");

    // Listed, then deleted: the port closes, and so does the open connection.
    let list = app.expect(
        "GET",
        "/v1/tenants/kitonga/routers/branch-a/forwards",
        None,
        200,
    );
    assert_eq!(list.as_array().unwrap().len(), 1);
    app.expect(
        "DELETE",
        "/v1/tenants/kitonga/routers/branch-a/forwards/8728",
        None,
        204,
    );
    // Closed by the time the deletion is answered.
    assert!(TcpStream::connect(listen).is_err(), "listener closed");
    match held.read(&mut buf) {
        Ok(0) => {}
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "still open"),
        Ok(n) => panic!("read {n} bytes from a deleted forward"),
    }
}

#[test]
fn unreachable_router_resets_the_client_and_forwards_survive_restart() {
    let app = Appliance::start();
    // A router that never connects: the forward accepts, the stack's SYNs go
    // nowhere, and after the stack's timeout the client gets a reset.
    app.expect("PUT", "/v1/tenants/acme/routers/offline", Some("{}"), 201);
    let fwd = app.expect(
        "PUT",
        "/v1/tenants/acme/routers/offline/forwards/22",
        Some(r#"{"listen":"127.0.0.1:0"}"#),
        201,
    );
    let listen: SocketAddr = fwd["listen"].as_str().unwrap().parse().unwrap();
    let mut stream = TcpStream::connect(listen).expect("the listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // A reset, not the read timeout (that would be `WouldBlock`).
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    let logged = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        app.log().contains("forwarded connection failed")
    });
    assert!(logged, "the failure is logged: {}", app.log());

    // Bad input.
    let (status, v) = app.call("PUT", "/v1/tenants/acme/routers/offline/forwards/0", None);
    assert_eq!((status, v["error"]["field"].as_str()), (400, Some("port")));
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/acme/routers/offline/forwards/80",
        Some(r#"{"listen":"nowhere"}"#),
    );
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (400, Some("listen"))
    );
    let busy = format!(r#"{{"listen":"{listen}"}}"#);
    let (status, v) = app.call(
        "PUT",
        "/v1/tenants/acme/routers/offline/forwards/80",
        Some(&busy),
    );
    assert_eq!(
        (
            status,
            v["error"]["code"].as_str(),
            v["error"]["field"].as_str()
        ),
        (409, Some("listen_unavailable"), Some("listen")),
        "the listen address is taken by the first forward: {v}"
    );
    // Moving the first forward to a taken address is refused too, and it keeps
    // listening where it was, as its listing says.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let moved = format!(r#"{{"listen":"{}"}}"#, taken.local_addr().unwrap());
    let (status, _) = app.call(
        "PUT",
        "/v1/tenants/acme/routers/offline/forwards/22",
        Some(&moved),
    );
    assert_eq!(status, 409);
    let list = app.expect(
        "GET",
        "/v1/tenants/acme/routers/offline/forwards",
        None,
        200,
    );
    assert_eq!(list[0]["listen"], listen.to_string(), "{list}");
    assert!(
        TcpStream::connect(listen).is_ok(),
        "still listening where it was"
    );

    // kill -9 and restart while another program holds the forward's port: the
    // router can still be changed (the forward is not part of that change), and
    // the forward opens once the port is free.
    let (state, api_port, first_port) = app.kill9();
    let squatter = TcpListener::bind(listen).expect("hold the forward's port");
    let app = Appliance::start_with(state, api_port, first_port, &[]).expect("restart");
    let renamed = app.expect(
        "PUT",
        "/v1/tenants/acme/routers/offline",
        Some(r#"{"name":"renamed"}"#),
        200,
    );
    assert_eq!(renamed["name"], "renamed", "{renamed}");
    drop(squatter);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(listen).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = app.expect(
        "GET",
        "/v1/tenants/acme/routers/offline/forwards",
        None,
        200,
    );
    assert_eq!(
        list[0]["listen"],
        listen.to_string(),
        "{list}\n{}",
        app.log()
    );
    assert!(
        TcpStream::connect(listen).is_ok(),
        "listening again after restart"
    );
}

/// One forward carries at most 64 connections at once: all 64 work end to end, a
/// 65th is closed at once (not left hanging), and a slot that frees up is taken
/// by the next client.
#[test]
fn a_forward_carries_64_connections_at_once_and_closes_the_next() {
    const LIMIT: usize = 64;
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (secret, public) = keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/kitonga/routers/r1", Some(&body), 201);
    let fwd = app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/r1/forwards/8728",
        None,
        201,
    );
    let listen: SocketAddr = fwd["listen"].as_str().unwrap().parse().unwrap();
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut peer = UdpPeer::new(secret, &key, endpoint, 3);
    assert!(peer.handshake());
    let _router = StackRouter::start(peer, "10.100.1.1".parse().unwrap(), 8728, LIMIT + 8);

    // A connection that echoes a few bytes: it reaches the router and back.
    let open = || -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect(listen)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        Ok(s)
    };
    // Closed: an end of file or a reset, not the read timeout of a connection
    // left hanging.
    let closed = |r: std::io::Result<TcpStream>| match r {
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let mut held: Vec<TcpStream> = (0..LIMIT)
        .map(|i| open().unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert!(closed(open()), "the 65th connection is closed");
    let said = "forward at its connection limit";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !app.log().contains(said) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(app.log().contains(said), "{}", app.log());
    // Every held connection still works.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"more").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
    }
    // One leaves; its slot goes to the next client once the forward has seen it go.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let replacement = loop {
        match open() {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the freed slot was never taken: {e}"),
        }
    };
    held.push(replacement);
    assert!(closed(open()), "full again");
}

/// A `[[forwards]]` entry of the config that listens on `:0` gets a free port at
/// its first start and keeps it across restarts, as one opened through the API
/// does (it used to get a new one at every start, listed as `:0`).
#[test]
fn a_config_forward_on_any_port_keeps_the_port_it_got() {
    let config = |dir: &std::path::Path| {
        let file = dir.join("forwards.toml");
        let text = "[[forwards]]\ntenant = \"acme\"\nrouter = \"r1\"\nport = 22\nlisten = \"127.0.0.1:0\"\n";
        std::fs::write(&file, text).expect("config");
        file.to_str().expect("UTF-8 path").to_owned()
    };
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/acme/routers/r1", None, 201);
    let listed = |app: &Appliance| -> Vec<String> {
        let v = app.expect("GET", "/v1/tenants/acme/routers/r1/forwards", None, 200);
        v.as_array()
            .expect("forward list")
            .iter()
            .map(|f| f["listen"].as_str().expect("listen").to_owned())
            .collect()
    };
    assert!(listed(&app).is_empty());
    let mut app = app;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (state, api_port, first_port) = app.kill9();
        let file = config(state.path());
        app = Appliance::start_with(state, api_port, first_port, &[("WGPLANE_CONFIG", &file)])
            .unwrap_or_else(|log| panic!("wgplane did not come back:\n{log}"));
        let listen = listed(&app);
        assert_eq!(listen.len(), 1, "{listen:?}");
        let addr: SocketAddr = listen[0].parse().expect("an address");
        assert_ne!(addr.port(), 0, "the bound port is listed");
        std::net::TcpStream::connect(addr).expect("it listens");
        seen.push(addr);
    }
    assert_eq!(seen[0], seen[1], "the same port after a restart");
}

/// A forward moved to another address moves: `:0` keeps the port bound
/// before only on the same address (a forward on 0.0.0.0 restricted to
/// 127.0.0.1 must stop listening on every interface), and a move to another
/// address on the same port takes the port over from the old listener.
#[test]
fn a_forward_moved_to_another_address_listens_there_only() {
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/acme/routers/r1", None, 201);
    let put = |listen: &str, status: u16| -> SocketAddr {
        let body = format!(r#"{{"listen":"{listen}"}}"#);
        let v = app.expect(
            "PUT",
            "/v1/tenants/acme/routers/r1/forwards/8728",
            Some(&body),
            status,
        );
        v["listen"]
            .as_str()
            .expect("listen")
            .parse()
            .expect("an address")
    };
    let listed = || -> String {
        let v = app.expect("GET", "/v1/tenants/acme/routers/r1/forwards", None, 200);
        v[0]["listen"].as_str().expect("listen").to_owned()
    };
    let free = |addr: SocketAddr| TcpListener::bind(addr).map(drop).is_ok();

    let everywhere = put("0.0.0.0:0", 201);
    assert!(everywhere.ip().is_unspecified() && everywhere.port() != 0);
    assert!(!free(everywhere), "listening on every interface");
    // The same request again keeps its port.
    assert_eq!(put("0.0.0.0:0", 200), everywhere);

    let local = put("127.0.0.1:0", 200);
    assert_eq!(local.ip().to_string(), "127.0.0.1", "moved, not kept");
    assert_eq!(listed(), local.to_string());
    assert!(free(everywhere), "no longer listening on every interface");
    TcpStream::connect(local).expect("listening on loopback");

    // Back to every interface on the port it has now: the old listener gives
    // the port up first.
    let same_port = format!("0.0.0.0:{}", local.port());
    assert_eq!(put(&same_port, 200).to_string(), same_port);
    assert_eq!(listed(), same_port);
    TcpStream::connect(local).expect("listening on the same port");
}
