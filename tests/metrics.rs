//! `/metrics` after real traffic: per-peer WireGuard series and wgplane counters
//! agree with what the test's peers sent and received; label values are escaped.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{keypair, sample, Appliance, UdpPeer};
use wgplane::core::packet::build::ip_packet;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn metrics_match_the_traffic() {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (gw_secret, gw_public) = keypair();
    let body = format!(
        r#"{{"name":"Gate \"way\" \\ 1","public_key":"{gw_public}","vpn_ip":"10.100.0.40"}}"#
    );
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/routers/mikrotik-1",
        Some(&body),
        201,
    );
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/egress",
        Some(r#"{"pool":"10.200.0.0/24","gateways":["mikrotik-1"]}"#),
        201,
    );
    let (p_secret, p_public) = keypair();
    let body = format!(r#"{{"name":"phone","public_key":"{p_public}"}}"#);
    app.expect(
        "PUT",
        "/v1/tenants/kitonga/clients/phone-1",
        Some(&body),
        201,
    );

    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut gateway = UdpPeer::new(gw_secret, &key, endpoint, 1);
    let mut phone = UdpPeer::new(p_secret, &key, endpoint, 2);
    // The phone first: its packet finds no gateway with a session.
    assert!(phone.handshake());
    phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 10));
    assert!(gateway.handshake());
    const N: usize = 10;
    for i in 0..N {
        phone.send(&ip_packet(ip("10.200.0.2"), ip("198.18.0.1"), 100 + i));
    }
    for _ in 0..N {
        gateway
            .recv(Duration::from_secs(3))
            .expect("forwarded packet");
    }
    phone.send(&ip_packet(ip("10.100.0.40"), ip("198.18.0.1"), 10)); // spoofed
                                                                     // Scraped once the appliance has handled that last datagram.
    let spoofed = [r#"tenant="kitonga""#, r#"reason="spoofed_source""#];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = app.scrape();
    while sample(&text, "wgplane_packets_dropped_total", &spoofed) < 1.0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        text = app.scrape();
    }
    let phone_labels = [
        r#"tenant="kitonga""#,
        r#"interface="wg0""#,
        r#"friendly_name="phone""#,
    ];
    assert_eq!(
        sample(&text, "wireguard_received_bytes_total", &phone_labels),
        phone.sent_bytes as f64,
        "every byte the phone sent was authenticated and counted"
    );
    assert_eq!(
        sample(&text, "wgplane_peer_spoofed_packets_total", &phone_labels),
        1.0,
        "the spoofed packet, counted for the phone"
    );
    let gw_labels = [
        &format!(r#"public_key="{gw_public}""#)[..],
        r#"allowed_ips="10.100.0.40/32""#,
    ];
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("wgplane_peer_spoofed_packets_total") && l.contains(&gw_public)),
        "no series for a peer that spoofed nothing"
    );
    assert_eq!(
        sample(
            &text,
            "wgplane_peer_egress_down_packets_total",
            &phone_labels
        ),
        1.0,
        "the packet sent before the gateway had a session, counted for the phone"
    );
    let (_, phone_view) = app.call("GET", "/v1/tenants/kitonga/clients/phone-1", None);
    assert_eq!(phone_view["spoofed_packets"], 1, "{phone_view}");
    assert_eq!(phone_view["egress_down_packets"], 1, "{phone_view}");
    assert_eq!(
        sample(&text, "wireguard_sent_bytes_total", &gw_labels),
        gateway.received_bytes as f64,
        "every byte sent to the gateway"
    );
    let handshake = sample(&text, "wireguard_latest_handshake_seconds", &gw_labels);
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (unix_now - handshake).abs() < 30.0,
        "handshake time is wall-clock: {handshake}"
    );
    // The friendly name with quotes and a backslash is escaped, not broken.
    assert!(
        text.contains(r#"friendly_name="Gate \"way\" \\ 1""#),
        "{text}"
    );

    let t = r#"tenant="kitonga""#;
    assert_eq!(
        sample(&text, "wgplane_egress_packets_total", &[t]),
        N as f64
    );
    assert_eq!(
        sample(
            &text,
            "wgplane_packets_forwarded_total",
            &[t, r#"path="peer_to_peer""#]
        ),
        N as f64
    );
    assert_eq!(
        sample(
            &text,
            "wgplane_packets_dropped_total",
            &[t, r#"reason="spoofed_source""#]
        ),
        1.0
    );
    assert_eq!(sample(&text, "wgplane_handshakes_total", &[t]), 2.0);
    // Their two initiations, each admitted to Diffie-Hellman work.
    assert_eq!(sample(&text, "wgplane_handshake_work_total", &[t]), 2.0);
    assert_eq!(
        sample(&text, "wgplane_gateway_up", &[t, r#"gateway="mikrotik-1""#]),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "wgplane_peers",
            &[t, r#"kind="client""#, r#"status="connected""#]
        ),
        1.0
    );
    assert_eq!(sample(&text, "wgplane_tunnel_up", &[t]), 1.0);
    let version = format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&text, "wgplane_build_info", &[&version]), 1.0);
    let started = sample(&text, "wgplane_start_time_seconds", &[]);
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        unix_now - started >= 0.0 && unix_now - started < 120.0,
        "{started}"
    );
    assert_eq!(sample(&text, "wgplane_tunnel_events_lost_total", &[t]), 0.0);
    // Two handshakes and their traffic in, answers out; no load, no cookies.
    let datagrams = |direction: &str| {
        let label = format!("direction=\"{direction}\"");
        sample(&text, "wgplane_datagrams_total", &[t, &label])
    };
    assert!(datagrams("received") >= 4.0, "{text}");
    assert!(datagrams("sent") >= 2.0, "{text}");
    assert_eq!(datagrams("send_failed"), 0.0);
    assert_eq!(
        sample(&text, "wgplane_socket_receive_drops_total", &[t]),
        0.0
    );
    assert_eq!(sample(&text, "wgplane_cookie_replies_total", &[t]), 0.0);
    // Both peers' connects were published to the platform.
    let published = || {
        sample(
            &app.scrape(),
            "wgplane_events_total",
            &[r#"outcome="published""#],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while published() < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(published() >= 2.0, "{}", app.scrape());
    assert_eq!(
        sample(
            &text,
            "wgplane_packets_dropped_total",
            &[t, r#"reason="local_queue_full""#]
        ),
        0.0
    );
    assert!(
        sample(
            &text,
            "wgplane_api_requests_total",
            &[
                r#"route="/v1/tenants/{tenant_id}""#,
                r#"method="PUT""#,
                r#"status="201""#
            ]
        ) >= 1.0
    );
    // Requests no route answered count too, and an unknown method as `other`.
    let (status, _) = app.call("GET", "/v1/nowhere", None);
    assert_eq!(status, 404);
    let (status, _) = app.call("BREW", "/v1/tenants", None);
    assert!(status >= 400, "{status}");
    let (status, _) = app.call("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let text = app.scrape();
    let requests = |labels: &[&str]| sample(&text, "wgplane_api_requests_total", labels);
    let unmatched = r#"route="unmatched""#;
    assert_eq!(
        requests(&[unmatched, r#"method="GET""#, r#"status="404""#]),
        1.0
    );
    assert!(
        text.contains(r#"method="other""#) && !text.contains("BREW"),
        "{text}"
    );
    let openapi = r#"route="/v1/openapi.json""#;
    assert_eq!(
        requests(&[openapi, r#"method="GET""#, r#"status="200""#]),
        1.0
    );
    assert!(requests(&[r#"route="/metrics""#, r#"method="GET""#, r#"status="200""#]) >= 1.0);

    // A deleted peer's series are gone at the next scrape.
    app.expect("DELETE", "/v1/tenants/kitonga/clients/phone-1", None, 204);
    assert!(!app.scrape().contains(r#"friendly_name="phone""#));
}

/// `api.metrics_per_peer = false` (for very many peers, where each scrape would
/// render hundreds of thousands of series) leaves out the `wireguard_*` series;
/// the counts of peers by status remain.
#[test]
fn per_peer_series_can_be_turned_off() {
    let app = Appliance::start_with_config("[api]\nmetrics_per_peer = false\n");
    let tenant = app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (secret, public) = keypair();
    let body = format!(r#"{{"name":"r1","public_key":"{public}"}}"#);
    app.expect("PUT", "/v1/tenants/kitonga/routers/r1", Some(&body), 201);
    app.expect("PUT", "/v1/tenants/kitonga/routers/r2", Some("{}"), 201);
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut router = UdpPeer::new(secret, &key, endpoint, 1);
    assert!(router.handshake());
    // The appliance counts the handshake once the router's first packet on the
    // new session arrives.
    router.send(&ip_packet(ip("10.100.1.1"), ip("10.100.0.1"), 8));
    let t = r#"tenant="kitonga""#;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = app.scrape();
    while sample(&text, "wgplane_handshakes_total", &[t]) < 1.0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        text = app.scrape();
    }
    assert!(!text.contains("wireguard_"), "{text}");
    assert!(!text.contains(&public), "{text}");
    let routers = |status: &str| {
        let status = format!(r#"status="{status}""#);
        sample(&text, "wgplane_peers", &[t, r#"kind="router""#, &status])
    };
    assert_eq!((routers("connected"), routers("pending")), (1.0, 1.0));
    assert_eq!(sample(&text, "wgplane_handshakes_total", &[t]), 1.0);
}

/// Prometheus asks for gzip: the real server sends the same series
/// compressed, and says so.
#[test]
fn a_scrape_in_gzip_as_prometheus_asks() {
    use std::io::Read;
    let app = Appliance::start();
    app.expect("PUT", "/v1/tenants/kitonga", None, 201);
    let (_, gw_public) = keypair();
    let body = format!(r#"{{"name":"gate","public_key":"{gw_public}"}}"#);
    app.expect("PUT", "/v1/tenants/kitonga/routers/gate", Some(&body), 201);
    let answer = reqwest::blocking::Client::new()
        .get(format!("http://{}/metrics", app.api))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-encoding"], "gzip");
    assert_eq!(answer.headers()["vary"], "accept-encoding");
    let mut text = String::new();
    flate2::read::GzDecoder::new(answer)
        .read_to_string(&mut text)
        .unwrap();
    let plain = app.scrape();
    let families = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("# TYPE"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(families(&text), families(&plain));
    let labels = [r#"tenant="kitonga""#, r#"friendly_name="gate""#];
    assert_eq!(
        sample(&text, "wireguard_received_bytes_total", &labels),
        0.0
    );
}
