//! `GET /metrics`: Prometheus text, built at scrape time from snapshots.
//!
//! The data plane keeps plain counters; nothing on the packet path touches a label.
//! Each scrape asks every tunnel for a snapshot and writes the values into a fresh
//! `metrics-exporter-prometheus` recorder, so removed peers disappear at once and
//! label values are escaped by the exporter. Per-peer series use the names existing
//! WireGuard dashboards know (`wireguard_*`); the rest is `wgplane_*`.
//!
//! Left out: the counting of packets and events, which the engines, tunnel tasks and
//! event hub do in plain fields (read here through their snapshots), and whether a
//! scrape needs the token (`auth`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use super::AppState;
use crate::control::{Id, Tenant};
use crate::core::policy::DropReason;
use crate::io::tunnel::TunnelSnapshot;

/// API requests by (route, method, status). Touched once per API request.
#[derive(Default)]
pub struct ApiCounters(DashMap<(String, String, u16), AtomicU64>);

/// Scrapes run one at a time; the next waits for the one under way. A scrape
/// costs about 2 s of CPU and 53 MiB at 100,000 peers, and `/metrics` needs no
/// token by default: concurrent ones could otherwise take the memory and the
/// control lock's turns that changes need.
/// The turn is held until the text is rendered, also when the client has gone
/// meanwhile (the render on its blocking thread cannot be stopped), and then
/// until the client has taken the answer or its connection ended: a client
/// that asks and never reads keeps one answer in memory, not one per request
/// (its connection ends after the API's write timeout).
pub struct OneScrape(Arc<tokio::sync::Semaphore>);

impl Default for OneScrape {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(1)))
    }
}

/// How long a scrape waits for the one under way before it is answered `503`.
const SCRAPE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The route that answered a request, carried out with its response to
/// [`count_requests`], which runs outside the routing.
#[derive(Clone)]
struct Routed(String);

/// Route layer: tells [`count_requests`] which route answered.
pub async fn tag_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| Routed(m.as_str().to_owned()));
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

/// Middleware around the whole API counting every request by the route that
/// answered it, or `unmatched`: a 404 or 405, or one refused before routing
/// (a body too large, `/metrics` without its token). Methods outside the
/// usual ones count as `other`, so that no client can add label values.
pub async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    use axum::http::Method;
    let method = match *request.method() {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<Routed>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    state
        .api_requests
        .0
        .entry((route, method.to_owned(), response.status().as_u16()))
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
    response
}

/// Renders every series.
///
/// Only what the series need is taken under the control lock, one tunnel at a
/// time (its snapshot and its peers' labels); building the series and rendering the
/// text, a few µs per series (about 2 s of CPU at 100,000 peers), run on a
/// blocking thread, so that neither API changes nor the tunnels' worker
/// threads wait for a scrape.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()), responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String), (status = 503, description = "Another scrape was under way for more than 10 s", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    // A scrape waits for the one under way, but not for ever: waiters would
    // pile up behind a slow one, each holding a connection.
    let semaphore = Arc::clone(&state.scraping.0);
    let turn = match tokio::time::timeout(SCRAPE_WAIT, semaphore.acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "5")],
                "another scrape is under way\n",
            )
                .into_response()
        }
    };
    let (ids, host_drops, host_up, store) = {
        let control = state.control.lock().await;
        let ids: Vec<Id> = control.registry.tenants().map(|t| t.id.clone()).collect();
        let runtime = &control.runtime;
        let host_up = runtime
            .tun_mode()
            .then(|| runtime.host_up() && runtime.host_reading());
        // A store poisoned by a panic mid-write refuses every write.
        let store = match control.store.lock() {
            Ok(store) => store.write_health(),
            Err(poisoned) => (poisoned.get_ref().write_health().0, true),
        };
        (ids, runtime.host_drops(), host_up, store)
    };
    // One tunnel per lock: a change waits for one tunnel's snapshot at most.
    let mut tunnels = Vec::with_capacity(ids.len());
    for id in ids {
        let control = state.control.lock().await;
        let Ok(t) = control.registry.tenant(&id) else {
            continue; // deleted meanwhile
        };
        let snapshot = control.runtime.snapshot(&id).await.ok();
        let mut labels = TunnelLabels::of(t, snapshot, state.metrics_per_peer);
        labels.failures = control.runtime.failures(&id);
        tunnels.push(labels);
    }
    let rendered = tokio::task::spawn_blocking(move || {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            describe();
            let (now, wall) = (Instant::now(), SystemTime::now());
            for tunnel in &tunnels {
                tunnel_series(tunnel, host_up.is_some(), now, wall);
            }
            for entry in state.api_requests.0.iter() {
                let (route, method, status) = entry.key();
                counter!("wgplane_api_requests_total",
                    "route" => route.clone(), "method" => method.clone(), "status" => status.to_string())
                .absolute(entry.value().load(Ordering::Relaxed));
            }
            if let Some(up) = host_up {
                gauge!("wgplane_host_device_up").set(if up { 1.0 } else { 0.0 });
            }
            gauge!("wgplane_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            let started = state.started.duration_since(UNIX_EPOCH).unwrap_or_default();
            gauge!("wgplane_start_time_seconds").set(started.as_secs_f64().floor());
            let (write_failures, failing) = store;
            counter!("wgplane_store_write_failures_total").absolute(write_failures);
            gauge!("wgplane_store_writable").set(if failing { 0.0 } else { 1.0 });
            for (reason, value) in host_drops.into_iter().flatten() {
                counter!("wgplane_host_packets_dropped_total", "reason" => reason).absolute(value);
            }
            let e = &state.event_stats;
            for (outcome, value) in [
                ("published", &e.published),
                ("webhook_delivered", &e.webhook_delivered),
                ("webhook_failed", &e.webhook_failed),
                ("webhook_dropped", &e.webhook_dropped),
                ("subscriber_missed", &e.subscriber_missed),
                ("lagged", &e.lagged),
            ] {
                counter!("wgplane_events_total", "outcome" => outcome)
                    .absolute(value.load(Ordering::Relaxed));
            }
        });
        (recorder.handle().render(), turn)
    })
    .await;
    match rendered {
        Ok((text, turn)) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            holding(text, turn),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics could not be rendered");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The answer's body, in pieces of [`ANSWER_PIECE`] bytes that share the
/// text: `turn` is released once hyper has asked for the last (it asks for
/// the next only when it has written most of the previous) or dropped the
/// body (the connection ended).
fn holding(text: String, turn: tokio::sync::OwnedSemaphorePermit) -> axum::body::Body {
    let text = axum::body::Bytes::from(text);
    let pieces = (0..text.len()).step_by(ANSWER_PIECE).map(move |at| {
        let _turn = &turn;
        Ok::<_, std::convert::Infallible>(text.slice(at..text.len().min(at + ANSWER_PIECE)))
    });
    axum::body::Body::from_stream(futures_util::stream::iter(pieces))
}

/// See [`holding`].
const ANSWER_PIECE: usize = 64 * 1024;

/// What one tunnel's series need, taken from the registry under the lock.
struct TunnelLabels {
    interface: String,
    tenant: String,
    peers: Vec<PeerLabels>,
    /// Egress gateways: id and public key (none when the router is gone).
    gateways: Vec<(String, Option<[u8; 32]>)>,
    /// None: the tunnel is down.
    snapshot: Option<TunnelSnapshot>,
    /// How often its task ended by itself (see `Runtime::failures`).
    failures: u64,
}

struct PeerLabels {
    kind: &'static str,
    public_key: [u8; 32],
    /// For the per-peer series (none when they are off): its name, and its
    /// addresses comma-separated, as WireGuard exporters show them.
    series: Option<(String, String)>,
}

impl TunnelLabels {
    /// The labels of `tenant`'s series; peers' names and addresses only for
    /// the per-peer series (`per_peer`).
    fn of(tenant: &Tenant, snapshot: Option<TunnelSnapshot>, per_peer: bool) -> Self {
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

fn describe() {
    describe_counter!(
        "wireguard_sent_bytes_total",
        "Bytes sent to the peer (WireGuard datagrams)."
    );
    describe_counter!(
        "wireguard_received_bytes_total",
        "Bytes received from the peer (authenticated WireGuard datagrams)."
    );
    describe_counter!(
        "wgplane_peer_spoofed_packets_total",
        "The peer's packets dropped because their source is not one it may use (only peers with any)."
    );
    describe_counter!(
        "wgplane_peer_egress_down_packets_total",
        "The peer's packets dropped because no gateway of its client pool had a live session (only peers with any)."
    );
    describe_gauge!(
        "wireguard_latest_handshake_seconds",
        "Unix time of the peer's latest handshake, 0 if none."
    );
    describe_counter!(
        "wgplane_packets_dropped_total",
        "Packets and datagrams dropped, by reason."
    );
    describe_counter!(
        "wgplane_packets_forwarded_total",
        "Packets forwarded, by path."
    );
    describe_counter!(
        "wgplane_egress_packets_total",
        "Client packets sent to a gateway by the egress policy."
    );
    describe_counter!(
        "wgplane_handshakes_total",
        "Completed handshakes (as responder: once the initiator's first packet on the new session arrived)."
    );
    describe_counter!(
        "wgplane_handshake_responses_total",
        "Initiations answered with a handshake response."
    );
    describe_counter!(
        "wgplane_cookie_replies_total",
        "Cookie replies sent under load."
    );
    describe_counter!(
        "wgplane_handshake_work_total",
        "Handshake messages admitted to Diffie-Hellman work (initiations and responses), answered or not."
    );
    describe_counter!(
        "wgplane_tunnel_events_lost_total",
        "Peer events a tunnel discarded because they were not drained in time."
    );
    describe_counter!(
        "wgplane_datagrams_total",
        "Datagrams on tunnel sockets: received; sent (handed to the socket); send_failed (of those sent, refused by the kernel: buffer full, no route, a firewall)."
    );
    describe_counter!(
        "wgplane_socket_receive_drops_total",
        "Datagrams the kernel dropped at the tunnel's socket before the appliance read them (its receive buffer full: a flood, or a stalled tunnel)."
    );
    describe_counter!(
        "wgplane_icmp_errors_total",
        "ICMP errors sent to peers: the hub's as a router hop (time exceeded, host unreachable) and the userspace stack's (port unreachable)."
    );
    describe_counter!(
        "wgplane_host_write_failures_total",
        "TUN mode: packets for the host the device refused (down, or its queue full); a batch with a refusal counts whole."
    );
    describe_gauge!(
        "wgplane_peers",
        "Peers by kind and status (pending, connected, stale)."
    );
    describe_gauge!(
        "wgplane_gateway_up",
        "1 when the egress gateway has a live session (0 also while its tunnel is down)."
    );
    describe_gauge!(
        "wgplane_tunnel_up",
        "1 when the tunnel's socket and task run."
    );
    describe_counter!(
        "wgplane_tunnel_failures_total",
        "Times the tunnel's task ended by itself (a bug, its socket failed); each is logged, and the supervisor starts the tunnel again within 5 s."
    );
    describe_counter!(
        "wgplane_api_requests_total",
        "Admin API requests by route (unmatched: none answered), method and status."
    );
    describe_counter!("wgplane_events_total", "Peer events by outcome.");
    describe_counter!(
        "wgplane_store_write_failures_total",
        "Writes of the state store refused (disk full, read-only): API changes answered 503 storage_failed and undone; router endpoints and forward ports stored again later."
    );
    describe_gauge!(
        "wgplane_build_info",
        "1, labelled with the appliance's version."
    );
    describe_gauge!(
        "wgplane_start_time_seconds",
        "Unix time the appliance started (a process restart, not a tunnel's)."
    );
    describe_gauge!(
        "wgplane_store_writable",
        "0 while the state store's last write was refused (changes are refused until it takes one; probed every 5 s meanwhile)."
    );
    describe_gauge!(
        "wgplane_host_device_up",
        "TUN mode: 1 while the device is up and read (0: set down from outside, or its reader ended)."
    );
    describe_counter!(
        "wgplane_host_packets_dropped_total",
        "TUN mode: packets from the host device that reached no tunnel, by reason."
    );
}

/// One tunnel's series; the `wireguard_*` ones for peers that have their labels.
fn tunnel_series(tunnel: &TunnelLabels, tun_mode: bool, now: Instant, wall: SystemTime) {
    let interface = &tunnel.interface;
    let tid = &tunnel.tenant;
    gauge!("wgplane_tunnel_up", "interface" => interface.clone(), "tenant" => tid.clone())
        .set(if tunnel.snapshot.is_some() { 1.0 } else { 0.0 });
    counter!("wgplane_tunnel_failures_total", "interface" => interface.clone(), "tenant" => tid.clone())
        .absolute(tunnel.failures);
    let by_key: HashMap<&[u8; 32], _> = tunnel
        .snapshot
        .iter()
        .flat_map(|s| &s.peers)
        .map(|p| (&p.public_key, p))
        .collect();

    // Gateway liveness, per egress gateway: 0 too while the tunnel is down
    // (every phone of the pool is cut off then, and an alert on it must fire).
    for (gateway, key) in &tunnel.gateways {
        let live = key
            .as_ref()
            .and_then(|k| by_key.get(k))
            .is_some_and(|s| s.live);
        gauge!("wgplane_gateway_up", "interface" => interface.clone(), "tenant" => tid.clone(),
            "gateway" => gateway.clone())
        .set(if live { 1.0 } else { 0.0 });
    }
    let Some(snap) = &tunnel.snapshot else { return };

    // Per peer, as WireGuard exporters name them.
    let mut peer_status: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    for peer in &tunnel.peers {
        let status = by_key.get(&peer.public_key);
        let handshake = status.and_then(|s| s.last_handshake);
        let state = match handshake.map(|h| now.saturating_duration_since(h)) {
            None => "pending",
            Some(age) if age.as_secs() < 180 => "connected",
            Some(_) => "stale",
        };
        *peer_status.entry((peer.kind, state)).or_default() += 1;
        let Some((name, allowed_ips)) = &peer.series else {
            continue;
        };
        let labels = [
            ("interface", interface.clone()),
            ("tenant", tid.clone()),
            ("public_key", crate::keys::encode(&peer.public_key)),
            ("allowed_ips", allowed_ips.clone()),
            ("friendly_name", name.clone()),
        ];
        let (rx, tx) = status.map_or((0, 0), |s| (s.stats.rx_bytes, s.stats.tx_bytes));
        counter!("wireguard_sent_bytes_total", &labels).absolute(tx);
        counter!("wireguard_received_bytes_total", &labels).absolute(rx);
        // Only where it happened: a series per peer costs every scrape.
        if let Some(spoofed) = status.map(|s| s.stats.spoofed).filter(|&n| n != 0) {
            counter!("wgplane_peer_spoofed_packets_total", &labels).absolute(spoofed);
        }
        if let Some(down) = status.map(|s| s.stats.egress_down).filter(|&n| n != 0) {
            counter!("wgplane_peer_egress_down_packets_total", &labels).absolute(down);
        }
        let unix = handshake
            .map(|h| wall - now.saturating_duration_since(h))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64().floor());
        gauge!("wireguard_latest_handshake_seconds", &labels).set(unix);
    }
    for kind in ["router", "client"] {
        for state in ["pending", "connected", "stale"] {
            let n = peer_status.get(&(kind, state)).copied().unwrap_or(0);
            gauge!("wgplane_peers", "interface" => interface.clone(), "tenant" => tid.clone(),
                "kind" => kind, "status" => state)
            .set(n as f64);
        }
    }

    // Tunnel counters.
    let s = &snap.stats;
    let base = || [("interface", interface.clone()), ("tenant", tid.clone())];
    for reason in DropReason::ALL {
        let mut labels = base().to_vec();
        labels.push(("reason", reason.as_str().to_owned()));
        counter!("wgplane_packets_dropped_total", &labels).absolute(s.dropped(reason));
    }
    for (path, value) in [
        ("peer_to_peer", s.forwarded_peer),
        ("peer_to_local", s.forwarded_local),
        ("host_to_peer", s.forwarded_host),
        ("queued_for_handshake", s.queued),
    ] {
        let mut labels = base().to_vec();
        labels.push(("path", path.to_owned()));
        counter!("wgplane_packets_forwarded_total", &labels).absolute(value);
    }
    counter!("wgplane_egress_packets_total", &base()).absolute(s.egress_hits);
    counter!("wgplane_handshakes_total", &base()).absolute(s.handshakes);
    counter!("wgplane_handshake_responses_total", &base()).absolute(s.handshake_responses);
    counter!("wgplane_cookie_replies_total", &base()).absolute(s.cookie_replies);
    counter!("wgplane_handshake_work_total", &base()).absolute(s.admitted_handshakes);
    counter!("wgplane_tunnel_events_lost_total", &base()).absolute(s.events_lost);
    counter!("wgplane_icmp_errors_total", &base()).absolute(s.icmp_errors);
    for (direction, value) in [
        ("received", s.rx_datagrams),
        ("sent", s.tx_datagrams),
        ("send_failed", snap.send_failures.socket),
    ] {
        let mut labels = base().to_vec();
        labels.push(("direction", direction.to_owned()));
        counter!("wgplane_datagrams_total", &labels).absolute(value);
    }
    counter!("wgplane_socket_receive_drops_total", &base()).absolute(snap.receive_drops);
    if tun_mode {
        counter!("wgplane_host_write_failures_total", &base()).absolute(snap.send_failures.host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_waits_for_the_one_under_way() {
        let f = crate::api::testing::fixture().await;
        let under_way = f.state.scraping.0.acquire().await.unwrap();
        let waiting = tokio::spawn(scrape(State(Arc::clone(&f.state))));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "it did not wait");
        drop(under_way);
        let response = waiting.await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// The turn goes with the answer until it has been taken, or dropped
    /// with its connection: a client that asks and never reads holds one
    /// answer, and scrapes meanwhile wait for it.
    #[tokio::test]
    async fn the_answer_holds_the_turn_until_it_is_taken() {
        let f = crate::api::testing::fixture().await;
        let turns = || f.state.scraping.0.available_permits();
        let answer = scrape(State(Arc::clone(&f.state))).await;
        assert_eq!(answer.status(), axum::http::StatusCode::OK);
        assert_eq!(turns(), 0, "held by the answer");
        let text = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(text.starts_with(b"# HELP") || text.starts_with(b"# TYPE"));
        assert_eq!(turns(), 1, "taken: released");

        let unread = scrape(State(Arc::clone(&f.state))).await;
        assert_eq!(turns(), 0);
        drop(unread);
        assert_eq!(turns(), 1, "dropped: released");
        f.state.control.lock().await.runtime.stop(&f.acme).await;
    }

    /// A tunnel task stuck by a bug holds neither the scrape nor the API:
    /// its snapshot is given up after `ANSWER_WAIT`, and the tunnel reads as
    /// down; a question or a change is given up too, and answered `503`.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_tunnel_holds_up_no_scrape() {
        use crate::io::runtime::{RuntimeError, ANSWER_WAIT, CHANGE_WAIT};
        let f = crate::api::testing::fixture().await;
        let (heard, queue) = f
            .state
            .control
            .lock()
            .await
            .runtime
            .wedge_task(&f.acme)
            .expect("acme's tunnel");
        let scraped = scrape(State(Arc::clone(&f.state)));
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), scraped)
            .await
            .expect("answered within 10 s");
        let text = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains(r#"wgplane_tunnel_up{interface="wg0",tenant="acme"} 0"#),
            "{text}"
        );
        // The API is free again meanwhile.
        let control = f.state.control.try_lock();
        assert!(control.is_ok(), "the control lock is free");
        drop(control);
        let control = f.state.control.lock().await;
        let limit = std::time::Duration::from_secs(60);
        let asked = control.runtime.peer_status(&f.acme, [0; 32]);
        let e = tokio::time::timeout(limit, asked).await.expect("given up");
        assert!(
            matches!(e, Err(RuntimeError::NotAnswering { waited, .. }) if waited == ANSWER_WAIT),
            "{e:?}"
        );
        let tenant = control.registry.tenant(&f.acme).unwrap();
        let change = control.runtime.remove_peer(tenant, [0; 32]);
        let e = tokio::time::timeout(limit, change).await.expect("given up");
        let Err(e @ RuntimeError::NotAnswering { waited, .. }) = e else {
            panic!("{e:?}");
        };
        assert_eq!(waited, CHANGE_WAIT);
        let answer = crate::api::ApiError::from(e);
        assert_eq!(
            (answer.status.as_u16(), answer.code),
            (503, "tunnel_not_answering")
        );
        // The change may never have reached the task: once it answers again,
        // the supervisor's next pass gives it the whole stored peer set.
        assert_eq!(control.runtime.unsynced(), std::slice::from_ref(&f.acme));
        drop(control);
        crate::api::supervisor::resync(&f.state).await;
        let unsynced = || async { f.state.control.lock().await.runtime.unsynced() };
        assert_eq!(unsynced().await.len(), 1, "still deaf");
        f.state
            .control
            .lock()
            .await
            .runtime
            .unwedge_task(&f.acme, heard);
        crate::api::supervisor::resync(&f.state).await;
        assert!(unsynced().await.is_empty());
        drop(queue);
    }

    /// A tunnel that is down has its gateways down too: the series read 0,
    /// they do not vanish (an alert on them must fire when every phone of
    /// the pool is cut off).
    #[test]
    fn a_tunnel_down_has_its_gateways_down() {
        let tunnel = TunnelLabels {
            interface: "wg0".into(),
            tenant: "kitonga".into(),
            peers: Vec::new(),
            gateways: vec![("mikrotik-1".into(), Some([7; 32]))],
            snapshot: None,
            failures: 3,
        };
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            tunnel_series(&tunnel, false, Instant::now(), SystemTime::now());
        });
        let text = recorder.handle().render();
        assert!(
            text.contains(
                r#"wgplane_gateway_up{interface="wg0",tenant="kitonga",gateway="mikrotik-1"} 0"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"wgplane_tunnel_up{interface="wg0",tenant="kitonga"} 0"#));
        assert!(
            text.contains(r#"wgplane_tunnel_failures_total{interface="wg0",tenant="kitonga"} 3"#)
        );
    }

    /// A long answer goes in pieces that add up to the text.
    #[tokio::test]
    async fn a_long_answer_arrives_whole() {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(1));
        let turn = Arc::clone(&semaphore).acquire_owned().await.unwrap();
        let text: String = (0..100_000).map(|n| format!("s{n} {n}\n")).collect();
        let body = holding(text.clone(), turn);
        let got = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(got, text.as_bytes());
        assert_eq!(semaphore.available_permits(), 1);
    }

    /// One that waits longer than SCRAPE_WAIT for the scrape under way is
    /// answered 503, not queued for ever.
    #[tokio::test]
    async fn a_scrape_that_waits_too_long_is_answered_503() {
        let f = crate::api::testing::fixture().await;
        f.state.control.lock().await.runtime.stop(&f.acme).await;
        let _under_way = f.state.scraping.0.acquire().await.unwrap();
        tokio::time::pause();
        let response = scrape(State(Arc::clone(&f.state))).await;
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
