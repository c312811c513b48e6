//! Live changes never disturb other sessions: a ping flow between two routers loses
//! no packet while 200 other peers are added and removed through the API.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{keypair, sample, Appliance, UdpPeer};
use wgplane::core::packet::{build::ip_packet, parse};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An appliance with tenant `acme` and routers r1 (10.100.1.1) and r2
/// (10.100.1.2), both with a session; returns the server's key too.
fn two_routers() -> (Appliance, String, UdpPeer, UdpPeer) {
    let app = Appliance::start();
    let tenant = app.expect("PUT", "/v1/tenants/acme", None, 201);
    let key = tenant["server_public_key"].as_str().unwrap().to_owned();
    let (s1, p1) = keypair();
    let (s2, p2) = keypair();
    for (id, public) in [("r1", &p1), ("r2", &p2)] {
        let body = format!(r#"{{"public_key":"{public}"}}"#);
        let path = format!("/v1/tenants/acme/routers/{id}");
        app.expect("PUT", &path, Some(&body), 201);
    }
    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut r1 = UdpPeer::new(s1, &key, endpoint, 1);
    let mut r2 = UdpPeer::new(s2, &key, endpoint, 2);
    assert!(r1.handshake() && r2.handshake());
    (app, key, r1, r2)
}

#[test]
fn ping_survives_200_peer_changes() {
    let (app, _, mut r1, mut r2) = two_routers();

    let churning = AtomicBool::new(true);
    // The churn starts once the flow has made its first round trip.
    let flowing = AtomicBool::new(false);
    let mut during_churn = 0u32;
    let mut sent = 0u32;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            /// Ends the churn even if a call in it fails, so the flow stops too.
            struct Over<'a>(&'a AtomicBool);
            impl Drop for Over<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _over = Over(&churning);
            let wait = Instant::now() + Duration::from_secs(30);
            while !flowing.load(Ordering::SeqCst) && Instant::now() < wait {
                std::thread::sleep(Duration::from_millis(1));
            }
            for i in 0..200 {
                let path = format!("/v1/tenants/acme/routers/churn-{i}");
                app.expect("PUT", &path, Some("{}"), 201);
                if i % 2 == 1 {
                    app.expect(
                        "DELETE",
                        &format!("/v1/tenants/acme/routers/churn-{}", i - 1),
                        None,
                        204,
                    );
                }
            }
            // The survivors' prefixes change too, which rewrites the routing table.
            app.expect(
                "PUT",
                "/v1/tenants/acme/routers/r1",
                Some(r#"{"allowed_ips":["192.168.1.0/24"]}"#),
                200,
            );
            for i in (1..200).step_by(2) {
                app.expect(
                    "DELETE",
                    &format!("/v1/tenants/acme/routers/churn-{i}"),
                    None,
                    204,
                );
            }
        });
        // Ping r1 -> r2 -> r1 until the churn is over, and a little beyond; a
        // failed round trip fails the test (the `expect`s below).
        let mut extra = 20;
        let give_up = Instant::now() + Duration::from_secs(300);
        while churning.load(Ordering::SeqCst) || extra > 0 {
            assert!(Instant::now() < give_up, "the churn never ended");
            let churn_on = churning.load(Ordering::SeqCst) && flowing.load(Ordering::SeqCst);
            if !churning.load(Ordering::SeqCst) {
                extra -= 1;
            }
            let payload = 16 + (sent % 100) as usize;
            r1.send(&ip_packet(ip("10.100.1.1"), ip("10.100.1.2"), payload));
            sent += 1;
            let request = r2
                .recv(Duration::from_secs(1))
                .expect("r2 got the echo request");
            assert_eq!(request.len(), 20 + payload);
            let h = parse(&request).unwrap();
            r2.send(&ip_packet(h.dst, h.src, payload));
            let reply = r1
                .recv(Duration::from_secs(1))
                .expect("r1 got the echo reply");
            assert_eq!(parse(&reply).unwrap().src, ip("10.100.1.2"));
            flowing.store(true, Ordering::SeqCst);
            if churn_on && churning.load(Ordering::SeqCst) {
                during_churn += 1;
            }
        }
    });
    // Every round trip succeeded (each `expect` above), and many of them while
    // the peer set was changing under the flow.
    assert!(
        during_churn >= 10,
        "only {during_churn} of {sent} round trips ran during the churn"
    );
    let routers = app.expect("GET", "/v1/tenants/acme/routers", None, 200);
    assert_eq!(routers.as_array().unwrap().len(), 2);
    let r1_view = app.expect("GET", "/v1/tenants/acme/routers/r1", None, 200);
    assert_eq!(r1_view["status"], "connected");
}

/// A router's new key makes it a new peer: datagrams of the old key's session
/// that are still on their way are turned away as an unknown receiver index
/// (they belong to nobody now), not counted as decryption failures, which would
/// look like an attack; the new key's handshake and traffic work at once.
#[test]
fn a_new_key_turns_the_old_sessions_datagrams_away_as_an_unknown_index() {
    let (app, key, mut old, mut r2) = two_routers();
    let ping = ip_packet(ip("10.100.1.1"), ip("10.100.1.2"), 32);
    old.send(&ping);
    r2.recv(Duration::from_secs(3))
        .expect("r2 got the first ping");

    let (s1b, p1b) = keypair();
    let body = format!(r#"{{"public_key":"{p1b}"}}"#);
    app.expect("PUT", "/v1/tenants/acme/routers/r1", Some(&body), 200);
    const STALE: usize = 3;
    for _ in 0..STALE {
        old.send(&ping);
    }
    let dropped = |reason: &str| {
        let label = format!(r#"reason="{reason}""#);
        let t = r#"tenant="acme""#;
        sample(&app.scrape(), "wgplane_packets_dropped_total", &[t, &label])
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped("unknown_index") < STALE as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(dropped("unknown_index"), STALE as f64);
    assert_eq!(dropped("decrypt_failed"), 0.0);
    assert!(
        r2.recv(Duration::from_millis(300)).is_none(),
        "nothing of the old key's reached r2"
    );

    let endpoint: SocketAddr = ([127, 0, 0, 1], app.first_port).into();
    let mut new = UdpPeer::new(s1b, &key, endpoint, 3);
    assert!(new.handshake(), "the new key's handshake");
    new.send(&ping);
    r2.recv(Duration::from_secs(3))
        .expect("r2 got the new key's ping");
}
