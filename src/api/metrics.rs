//! `GET /metrics`: Prometheus text, built at scrape time from snapshots.
//!
//! The data plane keeps plain counters; nothing on the packet path touches a label.
//! Each scrape asks every tunnel for a snapshot and writes the values into a fresh
//! `metrics-exporter-prometheus` recorder, so removed peers disappear at once and
//! label values are escaped by the exporter. Per-peer series use the names existing
//! WireGuard dashboards know (`wireguard_*`); the rest is `wgplane_*`.

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
use crate::control::Tenant;
use crate::core::policy::DropReason;
use crate::io::tunnel::TunnelSnapshot;

/// API requests by (route, method, status). Touched once per API request.
#[derive(Default)]
pub struct ApiCounters(DashMap<(String, String, u16), AtomicU64>);

/// Middleware counting every request to a matched route.
pub async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .api_requests
        .0
        .entry((route, method, response.status().as_u16()))
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
    response
}

/// Renders every series.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()), responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    let control = state.control.lock().await;
    let mut tunnels: Vec<(&Tenant, Option<TunnelSnapshot>)> = Vec::new();
    for t in control.registry.tenants() {
        tunnels.push((t, control.runtime.snapshot(&t.id).await.ok()));
    }
    let host_drops = control.runtime.host_drops();
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        describe();
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (tenant, snapshot) in &tunnels {
            tunnel_series(tenant, snapshot.as_ref(), now, wall);
        }
        for entry in state.api_requests.0.iter() {
            let (route, method, status) = entry.key();
            counter!("wgplane_api_requests_total",
                "route" => route.clone(), "method" => method.clone(), "status" => status.to_string())
            .absolute(entry.value().load(Ordering::Relaxed));
        }
        for (reason, value) in host_drops.into_iter().flatten() {
            counter!("wgplane_host_packets_dropped_total", "reason" => reason).absolute(value);
        }
        let e = &state.event_stats;
        for (outcome, value) in [
            ("published", &e.published),
            ("webhook_delivered", &e.webhook_delivered),
            ("webhook_failed", &e.webhook_failed),
            ("webhook_dropped", &e.webhook_dropped),
            ("lagged", &e.lagged),
        ] {
            counter!("wgplane_events_total", "outcome" => outcome)
                .absolute(value.load(Ordering::Relaxed));
        }
    });
    drop(control);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        recorder.handle().render(),
    )
        .into_response()
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
        "wgplane_tunnel_events_lost_total",
        "Peer events a tunnel discarded because they were not drained in time."
    );
    describe_counter!(
        "wgplane_datagrams_total",
        "Datagrams received and sent on tunnel sockets."
    );
    describe_gauge!(
        "wgplane_peers",
        "Peers by kind and status (pending, connected, stale)."
    );
    describe_gauge!(
        "wgplane_gateway_up",
        "1 when the egress gateway has a live session."
    );
    describe_gauge!(
        "wgplane_tunnel_up",
        "1 when the tunnel's socket and task run."
    );
    describe_counter!(
        "wgplane_api_requests_total",
        "Admin API requests by route, method and status."
    );
    describe_counter!("wgplane_events_total", "Peer events by outcome.");
    describe_counter!(
        "wgplane_host_packets_dropped_total",
        "TUN mode: packets from the host device that reached no tunnel, by reason."
    );
}

fn tunnel_series(
    tenant: &Tenant,
    snapshot: Option<&TunnelSnapshot>,
    now: Instant,
    wall: SystemTime,
) {
    let interface = tenant.interface_name.clone();
    let tid = tenant.id.to_string();
    gauge!("wgplane_tunnel_up", "interface" => interface.clone(), "tenant" => tid.clone())
        .set(if snapshot.is_some() { 1.0 } else { 0.0 });
    let Some(snap) = snapshot else { return };
    let by_key: HashMap<&[u8; 32], _> = snap.peers.iter().map(|p| (&p.public_key, p)).collect();

    // Per peer, as WireGuard exporters name them.
    let mut peer_status: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    let peers = tenant
        .routers
        .values()
        .map(|r| {
            let mut allowed = vec![format!("{}/32", r.vpn_ip)];
            allowed.extend(r.extra_prefixes.iter().map(ToString::to_string));
            ("router", &r.public_key, &r.name, allowed)
        })
        .chain(tenant.clients.values().map(|c| {
            (
                "client",
                &c.public_key,
                &c.name,
                vec![format!("{}/32", c.vpn_ip)],
            )
        }));
    for (kind, key, name, allowed) in peers {
        let status = by_key.get(key.as_bytes());
        let labels = [
            ("interface", interface.clone()),
            ("tenant", tid.clone()),
            ("public_key", crate::keys::encode(key.as_bytes())),
            ("allowed_ips", allowed.join(",")),
            ("friendly_name", name.clone()),
        ];
        let (rx, tx, handshake) = status.map_or((0, 0, None), |s| {
            (s.stats.rx_bytes, s.stats.tx_bytes, s.last_handshake)
        });
        counter!("wireguard_sent_bytes_total", &labels).absolute(tx);
        counter!("wireguard_received_bytes_total", &labels).absolute(rx);
        let unix = handshake
            .map(|h| wall - now.saturating_duration_since(h))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64().floor());
        gauge!("wireguard_latest_handshake_seconds", &labels).set(unix);
        let state = match handshake.map(|h| now.saturating_duration_since(h)) {
            None => "pending",
            Some(age) if age.as_secs() < 180 => "connected",
            Some(_) => "stale",
        };
        *peer_status.entry((kind, state)).or_default() += 1;
    }
    for kind in ["router", "client"] {
        for state in ["pending", "connected", "stale"] {
            let n = peer_status.get(&(kind, state)).copied().unwrap_or(0);
            gauge!("wgplane_peers", "interface" => interface.clone(), "tenant" => tid.clone(),
                "kind" => kind, "status" => state)
            .set(n as f64);
        }
    }

    // Gateway liveness, per egress gateway.
    if let Some(egress) = &tenant.egress {
        for g in &egress.gateways {
            let live = tenant
                .routers
                .get(g)
                .and_then(|r| by_key.get(r.public_key.as_bytes()))
                .is_some_and(|s| s.live);
            gauge!("wgplane_gateway_up", "interface" => interface.clone(), "tenant" => tid.clone(),
                "gateway" => g.to_string())
            .set(if live { 1.0 } else { 0.0 });
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
    counter!("wgplane_tunnel_events_lost_total", &base()).absolute(s.events_lost);
    for (direction, value) in [
        ("received", s.rx_datagrams),
        ("sent", s.tx_datagrams),
        ("send_failed", snap.send_failures),
    ] {
        let mut labels = base().to_vec();
        labels.push(("direction", direction.to_owned()));
        counter!("wgplane_datagrams_total", &labels).absolute(value);
    }
}
