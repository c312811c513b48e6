//! The series of a scrape: what each family holds, read from the tunnels'
//! snapshots and the appliance's own counters.
//!
//! Per-peer series use the names existing WireGuard dashboards know
//! (`wireguard_*`); the rest is `wgplane_*`. Each family is written whole, in a
//! pass of its own over the tunnels, as the text format wants it. The labels a
//! tunnel's series need are gathered here too ([`TunnelLabels::of`]).
//!
//! Left out: when they are gathered, one tunnel at a time under the control
//! lock, and where the text is written ([`super::scrape`]); the text's layout
//! and escaping ([`super::exposition`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::exposition::{Family, Kind, Labels, Text};
use crate::api::views::{status_index, STATUSES};
use crate::api::AppState;
use crate::control::Tenant;
use crate::core::engine::PeerStatus;
use crate::core::peer::PeerStats;
use crate::core::policy::DropReason;
use crate::io::tunnel::TunnelSnapshot;

/// What a scrape took under the control lock.
pub(super) struct Taken {
    pub tunnels: Vec<TunnelLabels>,
    /// TUN mode: whether the host device is up and read.
    pub host_up: Option<bool>,
    /// TUN mode: the host device's drops by reason.
    pub host_drops: Option<[(&'static str, u64); 6]>,
    /// The store's write failures, and whether it refuses writes now.
    pub store: (u64, bool),
}

/// What one tunnel's series need, taken from the registry under the lock.
pub(super) struct TunnelLabels {
    pub interface: String,
    pub tenant: String,
    pub peers: Vec<PeerLabels>,
    /// Egress gateways: id and public key (none when the router is gone).
    pub gateways: Vec<(String, Option<[u8; 32]>)>,
    /// None: the tunnel is down.
    pub snapshot: Option<TunnelSnapshot>,
    /// How often its task ended by itself (see `Runtime::failures`).
    pub failures: u64,
}

pub(super) struct PeerLabels {
    kind: &'static str,
    public_key: [u8; 32],
    /// For the per-peer series (none when they are off): its name, and its
    /// addresses comma-separated, as WireGuard exporters show them.
    series: Option<(String, String)>,
}

impl TunnelLabels {
    /// The labels of `tenant`'s series; peers' names and addresses only for
    /// the per-peer series (`per_peer`).
    pub fn of(tenant: &Tenant, snapshot: Option<TunnelSnapshot>, per_peer: bool) -> Self {
        let routers = tenant.routers.values().map(|r| PeerLabels {
            kind: "router",
            public_key: *r.public_key.as_bytes(),
            series: per_peer.then(|| {
                let mut allowed = format!("{}/32", r.vpn_ip);
                for prefix in &r.extra_prefixes {
                    allowed.push(',');
                    allowed.push_str(&prefix.to_string());
                }
                (r.name.clone(), allowed)
            }),
        });
        let clients = tenant.clients.values().map(|c| PeerLabels {
            kind: "client",
            public_key: *c.public_key.as_bytes(),
            series: per_peer.then(|| (c.name.clone(), format!("{}/32", c.vpn_ip))),
        });
        let gateways = tenant.egress.iter().flat_map(|e| &e.gateways).map(|g| {
            let key = tenant.routers.get(g).map(|r| *r.public_key.as_bytes());
            (g.to_string(), key)
        });
        Self {
            interface: tenant.interface_name.clone(),
            tenant: tenant.id.to_string(),
            peers: routers.chain(clients).collect(),
            gateways: gateways.collect(),
            snapshot,
            failures: 0,
        }
    }
}

/// A tunnel as the families read it.
struct Tunnel<'a> {
    taken: &'a TunnelLabels,
    /// `interface` and `tenant`.
    labels: Labels,
    /// Its peers' status by public key (empty while the tunnel is down).
    status: HashMap<&'a [u8; 32], &'a PeerStatus>,
}

impl<'a> Tunnel<'a> {
    fn of(taken: &'a TunnelLabels) -> Self {
        let status = taken.snapshot.iter().flat_map(|s| &s.peers);
        Self {
            labels: Labels::none()
                .with("interface", &taken.interface)
                .with("tenant", &taken.tenant),
            status: status.map(|p| (&p.public_key, p)).collect(),
            taken,
        }
    }

    fn snapshot(&self) -> Option<&'a TunnelSnapshot> {
        self.taken.snapshot.as_ref()
    }
}

/// A peer with per-peer series.
struct Peer<'a> {
    labels: Labels,
    status: Option<&'a PeerStatus>,
}

/// Bytes of text per peer with per-peer series (three lines of about 200
/// bytes), and per tunnel: what the answer's buffer is sized by.
const BYTES_PER_PEER: usize = 640;
const BYTES_PER_TUNNEL: usize = 8 * 1024;

/// The whole exposition.
pub(super) fn render(taken: &Taken, state: &AppState, now: Instant, wall: SystemTime) -> String {
    let tunnels: Vec<Tunnel> = taken.tunnels.iter().map(Tunnel::of).collect();
    let peers: Vec<Peer> = tunnels
        .iter()
        .filter(|t| t.snapshot().is_some())
        .flat_map(|t| {
            t.taken.peers.iter().filter_map(move |p| {
                let (name, allowed_ips) = p.series.as_ref()?;
                let labels = t
                    .labels
                    .and("public_key", &crate::keys::encode(&p.public_key))
                    .with("allowed_ips", allowed_ips)
                    .with("friendly_name", name);
                let status = t.status.get(&p.public_key).copied();
                Some(Peer { labels, status })
            })
        })
        .collect();
    let mut text = Text::with_capacity(
        peers.len() * BYTES_PER_PEER + tunnels.len() * BYTES_PER_TUNNEL + 16_384,
    );
    per_peer(&mut text, &peers, now, wall);
    per_tunnel(&mut text, &tunnels, taken.host_up.is_some(), now);
    appliance(&mut text, taken, state);
    text.into_string()
}

/// The `wireguard_*` series, and the per-peer drop counts where they are not 0
/// (a series per peer costs every scrape).
fn per_peer(text: &mut Text, peers: &[Peer], now: Instant, wall: SystemTime) {
    // The drop counts only where they are not 0: a series per peer costs
    // every scrape.
    let counters: [(&'static str, &'static str, PeerValue, bool); 4] = [
        (
            "wireguard_sent_bytes_total",
            "Bytes sent to the peer (WireGuard datagrams).",
            |s| s.tx_bytes,
            false,
        ),
        (
            "wireguard_received_bytes_total",
            "Bytes received from the peer (authenticated WireGuard datagrams).",
            |s| s.rx_bytes,
            false,
        ),
        (
            "wgplane_peer_spoofed_packets_total",
            "The peer's packets dropped because their source is not one it may use (only peers with any).",
            |s| s.spoofed,
            true,
        ),
        (
            "wgplane_peer_egress_down_packets_total",
            "The peer's packets dropped because no gateway of its client pool had a live session (only peers with any).",
            |s| s.egress_down,
            true,
        ),
    ];
    for (name, help, value, only_if_any) in counters {
        let mut f = text.family(name, Kind::Counter, help);
        for p in peers {
            let n = value(&p.status.map(|s| s.stats).unwrap_or_default());
            if n != 0 || !only_if_any {
                f.sample(&p.labels, n);
            }
        }
    }
    let mut f = text.family(
        "wireguard_latest_handshake_seconds",
        Kind::Gauge,
        "Unix time of the peer's latest handshake, 0 if none.",
    );
    for p in peers {
        let unix = p
            .status
            .and_then(|s| s.last_handshake)
            .map(|h| wall - now.saturating_duration_since(h))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64().floor());
        f.sample(&p.labels, unix);
    }
}

/// A tunnel counter, read from its snapshot.
type Value = fn(&TunnelSnapshot) -> u64;

/// A peer counter, read from its status.
type PeerValue = fn(&PeerStats) -> u64;

/// Writes `value` of every tunnel that is up, labelled `interface` and
/// `tenant`.
fn each_up(f: &mut Family, tunnels: &[Tunnel], value: Value) {
    for t in tunnels {
        if let Some(snapshot) = t.snapshot() {
            f.sample(&t.labels, value(snapshot));
        }
    }
}

/// The tunnels' counters, peers by status, gateways and liveness.
fn per_tunnel(text: &mut Text, tunnels: &[Tunnel], tun_mode: bool, now: Instant) {
    let up = || tunnels.iter().filter_map(|t| t.snapshot().map(|s| (t, s)));
    let mut f = text.family(
        "wgplane_packets_dropped_total",
        Kind::Counter,
        "Packets and datagrams dropped, by reason.",
    );
    for (t, s) in up() {
        for reason in DropReason::ALL {
            f.sample(
                &t.labels.and("reason", reason.as_str()),
                s.stats.dropped(reason),
            );
        }
    }
    drop(f);
    let mut f = text.family(
        "wgplane_packets_forwarded_total",
        Kind::Counter,
        "Packets forwarded, by path.",
    );
    for (t, s) in up() {
        let s = &s.stats;
        for (path, value) in [
            ("peer_to_peer", s.forwarded_peer),
            ("peer_to_local", s.forwarded_local),
            ("host_to_peer", s.forwarded_host),
            ("queued_for_handshake", s.queued),
        ] {
            f.sample(&t.labels.and("path", path), value);
        }
    }
    drop(f);
    let counters: [(&'static str, &'static str, Value); 8] = [
        (
            "wgplane_egress_packets_total",
            "Client packets sent to a gateway by the egress policy.",
            |s| s.stats.egress_hits,
        ),
        (
            "wgplane_handshakes_total",
            "Completed handshakes (as responder: once the initiator's first packet on the new session arrived).",
            |s| s.stats.handshakes,
        ),
        (
            "wgplane_handshake_responses_total",
            "Initiations answered with a handshake response.",
            |s| s.stats.handshake_responses,
        ),
        (
            "wgplane_cookie_replies_total",
            "Cookie replies sent under load.",
            |s| s.stats.cookie_replies,
        ),
        (
            "wgplane_handshake_work_total",
            "Handshake messages admitted to Diffie-Hellman work (initiations and responses), answered or not.",
            |s| s.stats.admitted_handshakes,
        ),
        (
            "wgplane_tunnel_events_lost_total",
            "Peer events a tunnel discarded because they were not drained in time.",
            |s| s.stats.events_lost,
        ),
        (
            "wgplane_socket_receive_drops_total",
            "Datagrams the kernel dropped at the tunnel's socket before the appliance read them (its receive buffer full: a flood, or a stalled tunnel).",
            |s| s.receive_drops,
        ),
        (
            "wgplane_icmp_errors_total",
            "ICMP errors sent to peers: the hub's as a router hop (time exceeded, host unreachable) and the userspace stack's (port unreachable).",
            |s| s.stats.icmp_errors,
        ),
    ];
    for (name, help, value) in counters {
        each_up(&mut text.family(name, Kind::Counter, help), tunnels, value);
    }
    let mut f = text.family(
        "wgplane_datagrams_total",
        Kind::Counter,
        "Datagrams on tunnel sockets: received; sent (handed to the socket); send_failed (of those sent, refused by the kernel: buffer full, no route, a firewall).",
    );
    for (t, s) in up() {
        for (direction, value) in [
            ("received", s.stats.rx_datagrams),
            ("sent", s.stats.tx_datagrams),
            ("send_failed", s.send_failures.socket),
        ] {
            f.sample(&t.labels.and("direction", direction), value);
        }
    }
    drop(f);
    if tun_mode {
        each_up(
            &mut text.family(
                "wgplane_host_write_failures_total",
                Kind::Counter,
                "TUN mode: packets for the host the device refused (down, or its queue full); a batch with a refusal counts whole.",
            ),
            tunnels,
            |s| s.send_failures.host,
        );
    }
    let mut f = text.family(
        "wgplane_peers",
        Kind::Gauge,
        "Peers by kind and status (pending, connected, stale).",
    );
    for t in tunnels.iter().filter(|t| t.snapshot().is_some()) {
        let mut counts = [[0u64; 3]; 2];
        for peer in &t.taken.peers {
            let handshake = t
                .status
                .get(&peer.public_key)
                .and_then(|s| s.last_handshake);
            counts[usize::from(peer.kind == "client")][status_index(handshake, now)] += 1;
        }
        for (kind, by_state) in ["router", "client"].into_iter().zip(counts) {
            for (state, n) in STATUSES.into_iter().zip(by_state) {
                let labels = t.labels.and("kind", kind).with("status", state);
                f.sample(&labels, n as f64);
            }
        }
    }
    drop(f);
    // Gateway liveness, per egress gateway: 0 too while the tunnel is down
    // (every phone of the pool is cut off then, and an alert on it must fire).
    let mut f = text.family(
        "wgplane_gateway_up",
        Kind::Gauge,
        "1 when the egress gateway has a live session (0 also while its tunnel is down).",
    );
    for t in tunnels {
        for (gateway, key) in &t.taken.gateways {
            let live = key
                .as_ref()
                .and_then(|k| t.status.get(k))
                .is_some_and(|s| s.live);
            f.sample(
                &t.labels.and("gateway", gateway),
                if live { 1.0 } else { 0.0 },
            );
        }
    }
    drop(f);
    let mut f = text.family(
        "wgplane_tunnel_up",
        Kind::Gauge,
        "1 when the tunnel's socket and task run.",
    );
    for t in tunnels {
        f.sample(&t.labels, if t.snapshot().is_some() { 1.0 } else { 0.0 });
    }
    drop(f);
    let mut f = text.family(
        "wgplane_tunnel_failures_total",
        Kind::Counter,
        "Times the tunnel's task ended by itself (a bug, its socket failed); each is logged, and the supervisor starts the tunnel again within 5 s.",
    );
    for t in tunnels {
        f.sample(&t.labels, t.taken.failures);
    }
}

/// The appliance's own series: API requests, events, the store, the build,
/// the host device.
fn appliance(text: &mut Text, taken: &Taken, state: &AppState) {
    let mut f = text.family(
        "wgplane_api_requests_total",
        Kind::Counter,
        "Admin API requests by route (unmatched: none answered), method and status.",
    );
    for entry in state.api_requests.0.iter() {
        let (route, method, status) = entry.key();
        let labels = Labels::none()
            .with("route", route)
            .with("method", method)
            .with("status", &status.to_string());
        f.sample(&labels, entry.value().load(Ordering::Relaxed));
    }
    drop(f);
    let e = &state.event_stats;
    let mut f = text.family(
        "wgplane_events_total",
        Kind::Counter,
        "Peer events by outcome.",
    );
    for (outcome, value) in [
        ("published", &e.published),
        ("webhook_delivered", &e.webhook_delivered),
        ("webhook_failed", &e.webhook_failed),
        ("webhook_dropped", &e.webhook_dropped),
        ("subscriber_missed", &e.subscriber_missed),
        ("lagged", &e.lagged),
    ] {
        f.sample(
            &Labels::none().with("outcome", outcome),
            value.load(Ordering::Relaxed),
        );
    }
    drop(f);
    let (write_failures, failing) = taken.store;
    text.family(
        "wgplane_store_write_failures_total",
        Kind::Counter,
        "Writes of the state store refused (disk full, read-only): API changes answered 503 storage_failed and undone; router endpoints and forward ports stored again later.",
    )
    .sample(&Labels::none(), write_failures);
    text.family(
        "wgplane_store_writable",
        Kind::Gauge,
        "0 while the state store's last write was refused (changes are refused until it takes one; probed every 5 s meanwhile).",
    )
    .sample(&Labels::none(), if failing { 0.0 } else { 1.0 });
    text.family(
        "wgplane_build_info",
        Kind::Gauge,
        "1, labelled with the appliance's version.",
    )
    .sample(
        &Labels::none().with("version", env!("CARGO_PKG_VERSION")),
        1.0,
    );
    let started = state.started.duration_since(UNIX_EPOCH).unwrap_or_default();
    text.family(
        "wgplane_start_time_seconds",
        Kind::Gauge,
        "Unix time the appliance started (a process restart, not a tunnel's).",
    )
    .sample(&Labels::none(), started.as_secs_f64().floor());
    if let Some(up) = taken.host_up {
        text.family(
            "wgplane_host_device_up",
            Kind::Gauge,
            "TUN mode: 1 while the device is up and read (0: set down from outside, or its reader ended).",
        )
        .sample(&Labels::none(), if up { 1.0 } else { 0.0 });
    }
    let mut f = text.family(
        "wgplane_host_packets_dropped_total",
        Kind::Counter,
        "TUN mode: packets from the host device that reached no tunnel, by reason.",
    );
    for (reason, value) in taken.host_drops.into_iter().flatten() {
        f.sample(&Labels::none().with("reason", reason), value);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The text format's rules, as Prometheus reads them: each family's
    /// samples together, after its one `# HELP` and `# TYPE`, and no series
    /// twice.
    fn check_layout(text: &str) {
        let mut done: HashSet<&str> = HashSet::new();
        let mut series: HashSet<&str> = HashSet::new();
        let mut current: Option<&str> = None;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(done.insert(name), "{name} twice");
                let typed = lines.next().unwrap();
                assert!(typed.starts_with(&format!("# TYPE {name} ")), "{typed}");
                current = Some(name);
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            assert_eq!(Some(name), current, "{line} outside its family");
            let (key, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.insert(key), "{key} twice");
        }
    }

    /// The check finds what it is there to find.
    #[test]
    fn the_layout_check_finds_what_prometheus_refuses() {
        let family = |name: &str| format!("# HELP {name} H.\n# TYPE {name} counter\n");
        let good = format!("{}a 1\na{{x=\"1\"}} 2\n\n{}b 3\n", family("a"), family("b"));
        check_layout(&good);
        for bad in [
            format!("{good}a{{x=\"2\"}} 4\n"),
            format!("{good}{}a 5\n", family("a")),
            format!("{good}b 3\n"),
            format!("{good}b NaN-ish\n"),
            "c 1\n".to_owned(),
        ] {
            let caught = std::panic::catch_unwind(|| check_layout(&bad));
            assert!(caught.is_err(), "passed:\n{bad}");
        }
    }

    async fn taken(f: &crate::api::testing::Fixture, up: bool) -> Taken {
        let control = f.state.control.lock().await;
        let tenant = control.registry.tenant(&f.acme).unwrap();
        let snapshot = if up {
            control.runtime.snapshot(&f.acme).await.ok()
        } else {
            None
        };
        let mut tunnel = TunnelLabels::of(tenant, snapshot, true);
        tunnel.failures = 3;
        tunnel.gateways.push((
            "gw".into(),
            Some(
                *tenant
                    .routers
                    .values()
                    .next()
                    .unwrap()
                    .public_key
                    .as_bytes(),
            ),
        ));
        Taken {
            tunnels: vec![tunnel],
            host_up: Some(true),
            host_drops: Some([
                ("unreadable", 0),
                ("malformed", 0),
                ("no_tunnel", 5),
                ("link_local", 0),
                ("cross_tenant", 0),
                ("queue_full", 0),
            ]),
            store: (2, false),
        }
    }

    #[tokio::test]
    async fn every_family_is_written_whole() {
        let f = crate::api::testing::fixture().await;
        let taken = taken(&f, true).await;
        let text = render(&taken, &f.state, Instant::now(), SystemTime::now());
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        check_layout(&text);
        let key = {
            let control = f.state.control.lock().await;
            let tenant = control.registry.tenant(&f.acme).unwrap();
            crate::keys::encode(
                tenant
                    .routers
                    .values()
                    .next()
                    .unwrap()
                    .public_key
                    .as_bytes(),
            )
        };
        for line in [
            format!("wireguard_sent_bytes_total{{interface=\"wg0\",tenant=\"acme\",public_key=\"{key}\",allowed_ips=\"10.100.1.1/32\","),
            format!("wireguard_latest_handshake_seconds{{interface=\"wg0\",tenant=\"acme\",public_key=\"{key}\""),
            r#"wgplane_peers{interface="wg0",tenant="acme",kind="router",status="pending"} 1"#.into(),
            r#"wgplane_peers{interface="wg0",tenant="acme",kind="client",status="pending"} 0"#.into(),
            r#"wgplane_packets_dropped_total{interface="wg0",tenant="acme",reason="#.into(),
            r#"wgplane_datagrams_total{interface="wg0",tenant="acme",direction="send_failed"} 0"#.into(),
            r#"wgplane_host_write_failures_total{interface="wg0",tenant="acme"} 0"#.into(),
            r#"wgplane_gateway_up{interface="wg0",tenant="acme",gateway="gw"} 0"#.into(),
            r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 1"#.into(),
            r#"wgplane_tunnel_failures_total{interface="wg0",tenant="acme"} 3"#.into(),
            r#"wgplane_store_write_failures_total 2"#.into(),
            r#"wgplane_store_writable 1"#.into(),
            r#"wgplane_host_device_up 1"#.into(),
            r#"wgplane_host_packets_dropped_total{reason="no_tunnel"} 5"#.into(),
            r#"wgplane_events_total{outcome="published"} "#.into(),
            format!("wgplane_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        // Counts that are 0 stay out: a series per peer costs every scrape.
        assert!(!text.contains("wgplane_peer_spoofed_packets_total"));
        assert!(!text.contains("wgplane_peer_egress_down_packets_total"));
    }

    /// Every family, with its type, when each has something to say: a peer
    /// that sent spoofed packets and packets with no gateway, TUN mode.
    #[tokio::test]
    async fn the_families_and_their_types() {
        let f = crate::api::testing::fixture().await;
        let mut taken = taken(&f, true).await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        let snapshot = taken.tunnels[0].snapshot.as_mut().unwrap();
        snapshot.peers[0].stats.spoofed = 2;
        snapshot.peers[0].stats.egress_down = 3;
        let request = ("/v1/tenants".to_owned(), "GET".to_owned(), 200);
        f.state.api_requests.0.entry(request).or_default();
        let text = render(&taken, &f.state, Instant::now(), SystemTime::now());
        check_layout(&text);
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let counter = |n| (n, "counter");
        let gauge = |n| (n, "gauge");
        let expected = vec![
            counter("wireguard_sent_bytes_total"),
            counter("wireguard_received_bytes_total"),
            counter("wgplane_peer_spoofed_packets_total"),
            counter("wgplane_peer_egress_down_packets_total"),
            gauge("wireguard_latest_handshake_seconds"),
            counter("wgplane_packets_dropped_total"),
            counter("wgplane_packets_forwarded_total"),
            counter("wgplane_egress_packets_total"),
            counter("wgplane_handshakes_total"),
            counter("wgplane_handshake_responses_total"),
            counter("wgplane_cookie_replies_total"),
            counter("wgplane_handshake_work_total"),
            counter("wgplane_tunnel_events_lost_total"),
            counter("wgplane_socket_receive_drops_total"),
            counter("wgplane_icmp_errors_total"),
            counter("wgplane_datagrams_total"),
            counter("wgplane_host_write_failures_total"),
            gauge("wgplane_peers"),
            gauge("wgplane_gateway_up"),
            gauge("wgplane_tunnel_up"),
            counter("wgplane_tunnel_failures_total"),
            counter("wgplane_api_requests_total"),
            counter("wgplane_events_total"),
            counter("wgplane_store_write_failures_total"),
            gauge("wgplane_store_writable"),
            gauge("wgplane_build_info"),
            gauge("wgplane_start_time_seconds"),
            gauge("wgplane_host_device_up"),
            counter("wgplane_host_packets_dropped_total"),
        ];
        assert_eq!(types, expected);
        for (name, value) in [
            ("wgplane_peer_spoofed_packets_total", 2),
            ("wgplane_peer_egress_down_packets_total", 3),
        ] {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            assert!(line.contains(r#"tenant="acme",public_key=""#), "{line}");
            assert!(line.ends_with(&format!("}} {value}")), "{line}");
        }
    }

    /// Outside TUN mode the host device's series are left out; without the
    /// per-peer series, the peers are still counted by status.
    #[tokio::test]
    async fn what_is_off_is_left_out() {
        let f = crate::api::testing::fixture().await;
        let mut taken = taken(&f, true).await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        (taken.host_up, taken.host_drops) = (None, None);
        for peer in &mut taken.tunnels[0].peers {
            peer.series = None;
        }
        let text = render(&taken, &f.state, Instant::now(), SystemTime::now());
        check_layout(&text);
        for gone in [
            "wgplane_host_write_failures_total",
            "wgplane_host_device_up",
            "wgplane_host_packets_dropped_total",
            "wireguard_",
        ] {
            assert!(!text.contains(gone), "{gone} in\n{text}");
        }
        let kept =
            r#"wgplane_peers{interface="wg0",tenant="acme",kind="router",status="pending"} 1"#;
        assert!(text.contains(kept), "{text}");
    }

    /// A tunnel that is down has its gateways down too: the series read 0,
    /// they do not vanish (an alert on them must fire when every phone of
    /// the pool is cut off); its peers' series go.
    #[tokio::test]
    async fn a_tunnel_down_has_its_gateways_down() {
        let f = crate::api::testing::fixture().await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        let taken = taken(&f, false).await;
        let text = render(&taken, &f.state, Instant::now(), SystemTime::now());
        check_layout(&text);
        for line in [
            r#"wgplane_gateway_up{interface="wg0",tenant="acme",gateway="gw"} 0"#,
            r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 0"#,
            r#"wgplane_tunnel_failures_total{interface="wg0",tenant="acme"} 3"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("wireguard_"), "{text}");
        assert!(!text.contains("wgplane_peers{"), "{text}");
        assert!(!text.contains("wgplane_packets_dropped_total{"), "{text}");
        assert!(!text.contains("wgplane_datagrams_total{"), "{text}");
        assert!(!text.contains("wgplane_handshakes_total{"), "{text}");
    }

    /// What a name or an id could hold is escaped, not taken as the text's
    /// own syntax.
    #[tokio::test]
    async fn labels_are_escaped() {
        let f = crate::api::testing::fixture().await;
        let mut taken = taken(&f, true).await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        taken.tunnels[0].peers[0].series = Some(("a\"} 1\nfake 2".into(), "x".into()));
        let text = render(&taken, &f.state, Instant::now(), SystemTime::now());
        check_layout(&text);
        assert!(
            text.contains(r#"friendly_name="a\"} 1\nfake 2"}"#),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("fake")));
    }
}
