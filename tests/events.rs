//! Peer events: `peer_connected` within a second of the first handshake,
//! `peer_roamed` when the endpoint changes, `peer_disconnected` when the peer goes
//! silent, on the SSE stream and, with retries, on a webhook.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use axum::Json;
use serde_json::Value;
use support::{free_tcp_port, free_udp_ports, keypair, Appliance, UdpPeer};

/// Bodies a receiver accepted, shared with the test.
type Received = Arc<Mutex<Vec<Value>>>;

/// A webhook receiver on loopback that refuses its first request.
fn webhook_receiver() -> (SocketAddr, Received, Arc<Mutex<u32>>) {
    receiver(true)
}

/// A webhook receiver on loopback; `refuse_first`: it answers its first
/// request with a 500.
fn receiver(refuse_first: bool) -> (SocketAddr, Received, Arc<Mutex<u32>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(0u32));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let (r, a) = (Arc::clone(&received), Arc::clone(&attempts));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/hook",
                post(move |Json(body): Json<Value>| {
                    let (r, a) = (Arc::clone(&r), Arc::clone(&a));
                    async move {
                        let mut n = a.lock().unwrap();
                        *n += 1;
                        if *n == 1 && refuse_first {
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        r.lock().unwrap().push(body);
                        StatusCode::NO_CONTENT
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, app).await;
        });
    });
    (addr, received, attempts)
}

fn next_event(
    rx: &std::sync::mpsc::Receiver<(String, Value)>,
    timeout: Duration,
) -> (String, Value) {
    rx.recv_timeout(timeout).expect("an event in time")
}

/// An appliance started with `envs`, tenant acme with router r1 (a key made
/// here), subscribed to its events: the appliance, the events, r1 as a peer
/// that has not shaken hands yet, and r1's public key.
fn router_of_acme(
    envs: &[(&str, &str)],
) -> (
    Appliance,
    std::sync::mpsc::Receiver<(String, Value)>,
    UdpPeer,
    String,
) {
    let state = tempfile::tempdir().expect("tempdir");
    let app =
        Appliance::start_with(state, free_tcp_port(), free_udp_ports(2), envs).expect("start");
    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let (secret, public) = keypair();
    let body = format!(r#"{{"public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/r1", Some(&body), 201);
    let events = app.subscribe_events();
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let peer = UdpPeer::new(
        secret,
        tenant["server_public_key"].as_str().unwrap(),
        endpoint,
        7,
    );
    (app, events, peer, public)
}

#[test]
fn connected_roamed_disconnected_on_sse_and_webhook() {
    let (hook, received, attempts) = webhook_receiver();
    let url = format!("http://{hook}/hook");
    let (_app, events, mut peer, public) = router_of_acme(&[
        // Long enough that a slow machine delivers the connect and the
        // roam before the peer counts as silent.
        ("WGPLANE_LIVENESS_TIMEOUT_SECS", "4"),
        ("WGPLANE_WEBHOOKS", &url),
    ]);
    assert!(peer.handshake());
    let (name, data) = next_event(&events, Duration::from_secs(5));
    assert_eq!(name, "peer_connected");
    assert_eq!(data["event"], "peer_connected");
    assert_eq!(data["tenant_id"], "acme");
    assert_eq!(
        (data["kind"].as_str(), data["id"].as_str()),
        (Some("router"), Some("r1"))
    );
    assert_eq!(data["public_key"], public.as_str());
    assert_eq!(
        data["endpoint"],
        peer.socket.local_addr().unwrap().to_string()
    );
    assert!(data["at"].as_str().unwrap().ends_with('Z'));

    // Roaming: the same session from a new source port.
    let new_addr = peer.rebind();
    peer.send(&wgplane::core::packet::build::ip_packet(
        "10.100.1.1".parse().unwrap(),
        "10.100.0.1".parse().unwrap(),
        8,
    ));
    let (name, data) = next_event(&events, Duration::from_secs(3));
    assert_eq!(name, "peer_roamed");
    assert_eq!(data["endpoint"], new_addr.to_string());

    // Silence past the liveness timeout (4 s here).
    let (name, data) = next_event(&events, Duration::from_secs(10));
    assert_eq!(name, "peer_disconnected");
    assert_eq!(data["id"], "r1");
    // Where it was last heard: the roamed-to address.
    assert_eq!(data["endpoint"], new_addr.to_string());

    // The webhook got the same three, in order, despite refusing the first attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(got, ["peer_connected", "peer_roamed", "peer_disconnected"]);
    assert!(
        *attempts.lock().unwrap() >= 4,
        "the refused delivery was retried"
    );
}

/// A phone's events say `client` and its id, with the endpoint it dialled
/// from; deleting it announces it gone, under the same name.
#[test]
fn a_phone_connects_and_is_deleted_as_a_client() {
    let state = tempfile::tempdir().expect("tempdir");
    let app = Appliance::start_with(state, free_tcp_port(), free_udp_ports(2), &[]).expect("start");
    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let (_, gw_public) = keypair();
    let body = format!(r#"{{"public_key":"{gw_public}","vpn_ip":"10.100.0.40"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/gw", Some(&body), 201);
    app.expect(
        "PUT",
        "/v1/tenants/acme/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["gw"]}"#),
        201,
    );
    let (secret, public) = keypair();
    let body = format!(r#"{{"name":"Asha's phone","public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/acme/clients/phone-1", Some(&body), 201);
    let events = app.subscribe_events();
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let server = tenant["server_public_key"].as_str().unwrap();
    let mut phone = UdpPeer::new(secret, server, endpoint, 9);
    assert!(phone.handshake());

    let (name, data) = next_event(&events, Duration::from_secs(5));
    assert_eq!(name, "peer_connected");
    let dialled_from = phone.socket.local_addr().unwrap().to_string();
    let what = |data: &Value| {
        (
            data["kind"].as_str().map(str::to_owned),
            data["id"].as_str().map(str::to_owned),
            data["public_key"].as_str().map(str::to_owned),
            data["endpoint"].as_str().map(str::to_owned),
        )
    };
    let expected = (
        Some("client".to_owned()),
        Some("phone-1".to_owned()),
        Some(public.clone()),
        Some(dialled_from),
    );
    assert_eq!(what(&data), expected, "{data}");

    app.expect("DELETE", "/v1/tenants/acme/clients/phone-1", None, 204);
    let (name, data) = next_event(&events, Duration::from_secs(5));
    assert_eq!(name, "peer_disconnected");
    assert_eq!(what(&data), expected, "{data}");
}

/// A shutdown (SIGTERM, as `docker stop` and systemd send) ends the event
/// streams, so that a subscribed backend cannot hold the process up.
#[test]
fn sigterm_ends_the_event_streams_and_the_process() {
    let mut app = Appliance::start();
    let events = app.subscribe_events();
    let status = app.terminate(Duration::from_secs(4));
    assert!(
        status.is_some_and(|s| s.success()),
        "wgplane did not stop on SIGTERM ({status:?})\n{}",
        app.log()
    );
    // The stream ended: the reader thread saw the end and hung up.
    let ended = events.recv_timeout(Duration::from_secs(2));
    assert!(
        matches!(ended, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)),
        "{ended:?}"
    );
    assert!(app.log().contains("stopped"), "{}", app.log());
}

/// A second SIGTERM does not wait for the graceful stop (here held up by a
/// request whose body never comes): the process ends at once, with status 130
/// where the graceful stop ends with 0.
#[test]
fn a_second_sigterm_stops_at_once() {
    use std::io::Write;
    let mut app = Appliance::start();
    let mut stalled = std::net::TcpStream::connect(app.api).expect("connect");
    // `Expect: 100-continue`: the server says "100 Continue" once the request
    // is being handled and its body read, so the signal below surely finds a
    // request under way (not a connection it may close at once).
    let head = format!(
        "PUT /v1/tenants/held HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        app.token
    );
    stalled.write_all(head.as_bytes()).expect("send");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = [0u8; 64];
    let n = std::io::Read::read(&mut stalled, &mut answer).expect("100 Continue");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    stalled.write_all(b"{").expect("part of the body");
    let pid = libc::pid_t::try_from(app.pid()).expect("pid");
    // SAFETY: kill(2) on our own child's PID, which it keeps until waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !app.log().contains("shutting down") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(app.log().contains("shutting down"), "{}", app.log());
    let status = app.terminate(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "{status:?}\n{}",
        app.log()
    );
    assert!(app.log().contains("a second signal"), "{}", app.log());
}

/// A router whose key changes, or that is deleted, and a tenant deleted with
/// its connected router: each connected peer is told gone, under the name and
/// key it connected with. And a URL that is down holds up no other URL's
/// deliveries.
#[test]
fn removed_peers_are_disconnected_and_a_dead_webhook_holds_up_no_other() {
    let (live, received, _) = receiver(false);
    // Nothing listens there: every attempt is refused, with retries over 10 s.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let hooks = format!("http://{dead}/hook,http://{live}/hook");
    let state = tempfile::tempdir().expect("tempdir");
    let app = Appliance::start_with(
        state,
        free_tcp_port(),
        free_udp_ports(4),
        &[("WGPLANE_WEBHOOKS", &hooks)],
    )
    .expect("start");
    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let server = tenant["server_public_key"].as_str().unwrap().to_owned();
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let events = app.subscribe_events();
    // Provisions router `id` with a new key; returns the key's secret and public.
    let provision = |id: &str| {
        let (secret, public) = keypair();
        let body = format!(r#"{{"public_key":"{public}"}}"#);
        let path = format!("/v1/tenants/acme/routers/{id}");
        app.call("PUT", &path, Some(&body));
        (secret, public)
    };
    let connect = |id: &str, (secret, public): (_, String), index: u32| {
        let mut peer = UdpPeer::new(secret, &server, endpoint, index);
        assert!(peer.handshake());
        let (name, data) = next_event(&events, Duration::from_secs(5));
        assert_eq!(
            (name.as_str(), data["id"].as_str()),
            ("peer_connected", Some(id))
        );
        assert_eq!(data["public_key"], public.as_str());
        (peer, public)
    };
    let expect_gone = |id: &str, public: &str| {
        let (name, data) = next_event(&events, Duration::from_secs(5));
        assert_eq!(name, "peer_disconnected", "{data}");
        assert_eq!(
            (data["id"].as_str(), data["public_key"].as_str()),
            (Some(id), Some(public))
        );
    };

    let (_old, old_key) = connect("r1", provision("r1"), 1);
    // The live URL has it at once, whatever the dead one costs.
    let deadline = Instant::now() + Duration::from_secs(3);
    while received.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        received.lock().unwrap().len(),
        1,
        "the live URL waited for the dead one"
    );
    // A new key: the old one's session is gone.
    let new = provision("r1");
    expect_gone("r1", &old_key);
    let (_new, new_key) = connect("r1", new, 2);
    app.expect("DELETE", "/v1/tenants/acme/routers/r1", None, 204);
    expect_gone("r1", &new_key);
    let (_r2, r2_key) = connect("r2", provision("r2"), 3);
    app.expect("DELETE", "/v1/tenants/acme", None, 204);
    expect_gone("r2", &r2_key);
}

/// A pause of the whole appliance (SIGSTOP here; a VM paused, a starved
/// host) longer than the liveness timeout is not the peers' silence: what a
/// router sent meanwhile waits in the socket and is read before its silence is
/// judged. No `peer_disconnected` (and `peer_connected` again) for it.
#[test]
fn a_pause_of_the_appliance_is_not_the_peers_silence() {
    let (app, events, mut peer, _) = router_of_acme(&[("WGPLANE_LIVENESS_TIMEOUT_SECS", "3")]);
    assert!(peer.handshake());
    let (name, _) = next_event(&events, Duration::from_secs(5));
    assert_eq!(name, "peer_connected");
    let packet = wgplane::core::packet::build::ip_packet(
        "10.100.1.1".parse().unwrap(),
        "10.100.0.1".parse().unwrap(),
        8,
    );
    let signal = |which: &str| {
        let sent = std::process::Command::new("kill")
            .args([which, &app.pid().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {which}");
    };

    // The router keeps talking, twice a second, through a 5-s pause.
    signal("-STOP");
    let resumed = Instant::now() + Duration::from_secs(5);
    while Instant::now() < resumed {
        peer.send(&packet);
        std::thread::sleep(Duration::from_millis(500));
    }
    signal("-CONT");
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet_until {
        peer.send(&packet);
        std::thread::sleep(Duration::from_millis(250));
    }
    match events.try_recv() {
        Err(std::sync::mpsc::TryRecvError::Empty) => {}
        other => panic!("an event for the appliance's own pause: {other:?}"),
    }
}
