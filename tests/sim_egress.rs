//! KTN egress: phone traffic leaves only through the tenant's live gateway, return
//! traffic reaches the right phone, and with no live gateway nothing goes anywhere.

mod sim;

use std::time::Duration;

use sim::{addrs, ip, Sim};
use wgplane::core::peer::PeerKind;
use wgplane::core::policy::DropReason;

struct Ktn {
    sim: Sim,
    gateway: usize,
    backup: usize,
    router: usize,
    phone1: usize,
    phone2: usize,
}

/// The seed topology: tenant 10.100.0.0/16, gateway 10.100.0.40, pool 10.200.0.0/24.
fn ktn() -> Ktn {
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let gateway = sim.peer("mikrotik-1", t, PeerKind::Router, &["10.100.0.40/32"]);
    let backup = sim.peer("mikrotik-2", t, PeerKind::Router, &["10.100.0.41/32"]);
    let router = sim.peer("branch", t, PeerKind::Router, &["10.100.1.1/32"]);
    let phone1 = sim.peer("phone-1", t, PeerKind::Client, &["10.200.0.2/32"]);
    let phone2 = sim.peer("phone-2", t, PeerKind::Client, &["10.200.0.3/32"]);
    sim.set_egress(t, "10.200.0.0/24", &[gateway, backup]);
    for p in [gateway, backup, router, phone1, phone2] {
        sim.connect(p);
    }
    Ktn {
        sim,
        gateway,
        backup,
        router,
        phone1,
        phone2,
    }
}

#[test]
fn phone_to_internet_goes_through_the_gateway_and_back() {
    let mut k = ktn();
    k.sim.send_ip(k.phone1, "10.200.0.2", "198.18.0.1");
    let at_gateway = k.sim.take_inbox(k.gateway);
    assert_eq!(at_gateway.len(), 1);
    assert_eq!(addrs(&at_gateway[0]), (ip("10.200.0.2"), ip("198.18.0.1")));

    // The gateway answers (it masquerades on its WAN; towards the pool it keeps the
    // internet address as source).
    k.sim.send_ip(k.gateway, "198.18.0.1", "10.200.0.2");
    let at_phone = k.sim.take_inbox(k.phone1);
    assert_eq!(at_phone.len(), 1);
    assert_eq!(addrs(&at_phone[0]), (ip("198.18.0.1"), ip("10.200.0.2")));
    assert!(k.sim.take_inbox(k.phone2).is_empty());
    assert_eq!(k.sim.tunnels[0].engine.stats().egress_hits, 1);
}

#[test]
fn every_destination_of_a_phone_goes_to_the_gateway() {
    let mut k = ktn();
    // Another phone, a router, the server address itself: all through the gateway.
    for dst in ["10.200.0.3", "10.100.1.1", "10.100.0.1", "10.100.0.40"] {
        k.sim.send_ip(k.phone1, "10.200.0.2", dst);
    }
    assert_eq!(k.sim.take_inbox(k.gateway).len(), 4);
    assert!(k.sim.take_inbox(k.phone2).is_empty());
    assert!(k.sim.take_inbox(k.router).is_empty());
    assert!(
        k.sim.tunnels[0].local.is_empty(),
        "a phone never reaches the appliance"
    );
    // The gateway hairpins phone-to-phone traffic back; it reaches phone 2.
    k.sim.send_ip(k.gateway, "10.200.0.2", "10.200.0.3");
    assert_eq!(k.sim.take_inbox(k.phone2).len(), 1);
}

#[test]
fn failover_to_the_secondary_gateway() {
    let mut k = ktn();
    // Only the backup stays alive: the primary goes silent past the liveness timeout.
    k.sim.peers[k.gateway].up = false;
    k.sim.advance(Duration::from_secs(61));
    k.sim.send_ip(k.backup, "10.100.0.41", "10.100.0.1"); // the backup's keepalive-ish traffic
    k.sim.send_ip(k.phone1, "10.200.0.2", "198.18.0.1");
    assert!(k.sim.take_inbox(k.gateway).is_empty());
    assert_eq!(k.sim.take_inbox(k.backup).len(), 1);
}

#[test]
fn no_live_gateway_means_drop_and_count_never_leak() {
    let mut k = ktn();
    k.sim.peers[k.gateway].up = false;
    k.sim.peers[k.backup].up = false;
    k.sim.advance(Duration::from_secs(61));
    let before = k.sim.sent_by_engines.len();
    let delivered_before = k.sim.delivered();
    for dst in ["198.18.0.1", "10.100.1.1", "10.200.0.3", "10.100.0.1"] {
        k.sim.send_ip(k.phone1, "10.200.0.2", dst);
    }
    let stats = k.sim.tunnels[0].engine.stats();
    assert_eq!(stats.dropped(DropReason::EgressDown), 4);
    // Counted for the phone too: its status shows it is cut off.
    let key = k.sim.public_key(k.phone1);
    let now = k.sim.now;
    let phone = k.sim.tunnels[0].engine.peer_status(&key, now).unwrap();
    assert_eq!(phone.stats.egress_down, 4);
    let other = k.sim.public_key(k.phone2);
    let phone2 = k.sim.tunnels[0].engine.peer_status(&other, now).unwrap();
    assert_eq!(phone2.stats.egress_down, 0);
    assert_eq!(
        k.sim.delivered(),
        delivered_before,
        "no peer received anything"
    );
    assert!(k.sim.tunnels[0].local.is_empty());
    // The only datagrams sent are handshake initiations to the gateways.
    let gateways = [k.sim.peers[k.gateway].addr, k.sim.peers[k.backup].addr];
    let sent = &k.sim.sent_by_engines[before..];
    assert!(!sent.is_empty(), "the gateways are woken");
    for (to, len) in sent {
        assert!(
            gateways.contains(to) && *len == 148,
            "only handshakes to the gateways: {sent:?}"
        );
    }
}

#[test]
fn a_gateway_whose_handshakes_never_complete_is_not_a_live_gateway() {
    let mut k = ktn();
    // The primary's return path breaks: it keeps sending initiations (every 5 s,
    // as WireGuard retries), our responses never reach it. Answering them must not
    // make it look live: the handshake completes only with its first packet on
    // the new session.
    k.sim.peers[k.gateway].up = false;
    let completed = k.sim.tunnels[0].engine.stats().handshakes;
    let from = k.sim.peers[k.gateway].addr;
    let mut buf = vec![0u8; 256];
    for _ in 0..13 {
        k.sim.advance(Duration::from_secs(5));
        let init = match k.sim.peers[k.gateway]
            .tunn
            .format_handshake_initiation(&mut buf, true)
        {
            boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        k.sim.inject(from, 0, &init);
    }
    let stats = k.sim.tunnels[0].engine.stats();
    assert_eq!(stats.handshakes, completed, "answered, never completed");
    assert!(
        stats.handshake_responses >= 13,
        "{}",
        stats.handshake_responses
    );
    // The backup is alive; the phones' traffic fails over to it.
    k.sim.send_ip(k.backup, "10.100.0.41", "10.100.0.1");
    k.sim.send_ip(k.phone1, "10.200.0.2", "198.18.0.1");
    assert_eq!(k.sim.take_inbox(k.backup).len(), 1);
    // Once the primary's return path is back, its next handshake completes with
    // its first packet and it is the gateway again.
    k.sim.peers[k.gateway].up = true;
    k.sim.connect(k.gateway);
    k.sim.send_ip(k.gateway, "10.100.0.40", "10.100.0.1");
    assert_eq!(k.sim.tunnels[0].engine.stats().handshakes, completed + 1);
    k.sim.send_ip(k.phone1, "10.200.0.2", "198.18.0.1");
    assert_eq!(k.sim.take_inbox(k.gateway).len(), 1);
}

/// The seed's KTN tunnel as a restart leaves it: gateways (10.100.0.40, .41,
/// ... primary first) registered but not heard from, and one phone that has
/// handshaked again.
fn restarted(gateways: usize) -> (Sim, Vec<usize>, usize) {
    const NAMES: [&str; 2] = ["mikrotik-1", "mikrotik-2"];
    let mut sim = Sim::new();
    let t = sim.tunnel(51820, "10.100.0.1");
    let gateways: Vec<usize> = (0..gateways)
        .map(|i| {
            let vpn_ip = format!("10.100.0.{}/32", 40 + i);
            sim.peer(NAMES[i], t, PeerKind::Router, &[vpn_ip.as_str()])
        })
        .collect();
    let phone = sim.peer("phone-1", t, PeerKind::Client, &["10.200.0.2/32"]);
    sim.set_egress(t, "10.200.0.0/24", &gateways);
    sim.connect(phone);
    (sim, gateways, phone)
}

#[test]
fn a_restarted_appliance_wakes_the_gateway_where_it_was_last_heard_from() {
    // After a restart the gateway still holds its old session and only sends
    // keepalives on it (which start no handshake on its side), so it stays
    // silent for up to three minutes. The appliance must reach out instead.
    let (mut sim, gateways, phone) = restarted(1);
    let gateway = gateways[0];
    let egress_down = |sim: &Sim| {
        sim.tunnels[0]
            .engine
            .stats()
            .dropped(DropReason::EgressDown)
    };

    // Not known where the gateway is: the packet is dropped, nothing is sent.
    let before = sim.sent_by_engines.len();
    sim.send_ip(phone, "10.200.0.2", "198.18.0.1");
    assert_eq!(egress_down(&sim), 1);
    assert_eq!(
        sim.sent_by_engines.len(),
        before,
        "nowhere to send anything"
    );

    // Its endpoint as restored from the state: the next phone packet is still
    // dropped, but starts a handshake with the gateway there, and the one
    // after it goes through the gateway.
    sim.remember_endpoint(gateway);
    sim.send_ip(phone, "10.200.0.2", "198.18.0.1");
    assert_eq!(egress_down(&sim), 2);
    assert!(
        sim.take_inbox(gateway).is_empty(),
        "the waking packet is gone"
    );
    let gateway_addr = sim.peers[gateway].addr;
    assert_eq!(
        sim.sent_by_engines.get(before),
        Some(&(gateway_addr, 148)),
        "a handshake initiation to the remembered endpoint"
    );
    sim.send_ip(phone, "10.200.0.2", "198.18.0.1");
    let at_gateway = sim.take_inbox(gateway);
    assert_eq!(at_gateway.len(), 1);
    assert_eq!(addrs(&at_gateway[0]), (ip("10.200.0.2"), ip("198.18.0.1")));
}

#[test]
fn after_a_restart_with_the_primary_gone_the_backup_is_woken_too() {
    // Both gateways remembered, neither live (the appliance restarted); the
    // primary is gone for good. Waking only the primary would leave the phones
    // cut off until the backup's old session expires, minutes later.
    let (mut sim, gateways, phone) = restarted(2);
    let (primary, backup) = (gateways[0], gateways[1]);
    sim.remember_endpoint(primary);
    sim.remember_endpoint(backup);
    sim.peers[primary].up = false;

    sim.send_ip(phone, "10.200.0.2", "198.18.0.1");
    assert!(
        sim.take_inbox(backup).is_empty(),
        "the waking packet is gone"
    );
    sim.send_ip(phone, "10.200.0.2", "198.18.0.1");
    let at_backup = sim.take_inbox(backup);
    assert_eq!(at_backup.len(), 1);
    assert_eq!(addrs(&at_backup[0]), (ip("10.200.0.2"), ip("198.18.0.1")));
}

/// Phones are reached only through their gateway: another router's packet to
/// one is dropped and counted (`gateway_bypass`), whatever the phone's session;
/// what the gateway sends on to the pool arrives.
#[test]
fn only_the_gateway_reaches_a_phone() {
    let mut k = ktn();
    for dst in ["10.200.0.2", "10.200.0.3"] {
        k.sim.send_ip(k.router, "10.100.1.1", dst);
    }
    assert!(k.sim.take_inbox(k.phone1).is_empty());
    assert!(k.sim.take_inbox(k.phone2).is_empty());
    let stats = k.sim.tunnels[0].engine.stats();
    assert_eq!(stats.dropped(DropReason::GatewayBypass), 2);

    k.sim.send_ip(k.gateway, "10.100.1.1", "10.200.0.2");
    assert_eq!(k.sim.take_inbox(k.phone1).len(), 1);
}

/// A phone the tunnel still holds after its egress policy went (a change lost
/// on its way, until the next full sync) has no way out: not to the server
/// address, a router or the internet.
#[test]
fn a_phone_without_a_policy_goes_nowhere() {
    let mut k = ktn();
    let t = 0;
    k.sim.tunnels[t].engine.set_egress(Vec::new());
    let delivered_before = k.sim.delivered();
    for dst in ["198.18.0.1", "10.100.1.1", "10.100.0.40", "10.100.0.1"] {
        k.sim.send_ip(k.phone1, "10.200.0.2", dst);
    }
    assert_eq!(
        k.sim.delivered(),
        delivered_before,
        "nothing reached anybody"
    );
    for p in [k.gateway, k.backup, k.router, k.phone2] {
        assert!(k.sim.take_inbox(p).is_empty());
    }
    let stats = k.sim.tunnels[t].engine.stats();
    assert_eq!(stats.dropped(DropReason::EgressDown), 4);
    assert_eq!(stats.forwarded_local, 0);
}
