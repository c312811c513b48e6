//! JSON answers: what the API shows of control objects, joined with live status.
//! Private keys never appear here; only a device's own config text carries its key.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

use crate::control::render;
use crate::control::{Client, EgressPolicy, Router, Tenant};
use crate::core::engine::PeerStatus;
use crate::keys;

/// A handshake older than this makes a peer `stale` (WireGuard's REJECT_AFTER_TIME).
const CONNECTED_WITHIN: Duration = Duration::from_secs(180);

/// The statuses a peer shows, in the API and in `wgplane_peers`.
pub const STATUSES: [&str; 3] = ["pending", "connected", "stale"];

/// Which of [`STATUSES`] a peer whose last handshake was at `last_handshake`
/// shows at `now`: `pending` (none), `connected` (within 180 s: its session
/// still carries traffic) or `stale` (older).
pub fn status_index(last_handshake: Option<Instant>, now: Instant) -> usize {
    match last_handshake.map(|t| now.saturating_duration_since(t)) {
        None => 0,
        Some(age) if age < CONNECTED_WITHIN => 1,
        Some(_) => 2,
    }
}

pub use crate::io::wall::rfc3339;

#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantView {
    pub tenant_id: String,
    pub interface_name: String,
    pub server_public_key: String,
    pub server_ip: String,
    /// The server's IPv6 address: answers routers given addresses in
    /// `subnet_ipv6_cidr` (userspace stack, or the host in TUN mode).
    pub server_ipv6: String,
    pub subnet_cidr: String,
    /// The tenant's IPv6 network (a ULA /64 derived from `subnet_cidr`), where a
    /// router's IPv6 address (an `allowed_ips` entry `/128`) belongs.
    pub subnet_ipv6_cidr: String,
    pub listen_port: u16,
    pub endpoint: String,
    pub status: &'static str,
    pub created_at: String,
    pub routers: usize,
    pub clients: usize,
    /// TUN mode: host prefixes this tenant's routers may reach.
    pub host_prefixes: Vec<String>,
}

impl TenantView {
    pub fn new(t: &Tenant, public_host: &str, running: bool) -> Self {
        Self {
            tenant_id: t.id.to_string(),
            interface_name: t.interface_name.clone(),
            server_public_key: keys::encode(t.public_key.as_bytes()),
            server_ip: t.server_ip().to_string(),
            server_ipv6: t.server_ipv6().to_string(),
            subnet_cidr: t.subnet.to_string(),
            subnet_ipv6_cidr: t.server_net_v6().to_string(),
            listen_port: t.listen_port,
            endpoint: render::endpoint(public_host, t.listen_port),
            status: if running { "active" } else { "down" },
            created_at: rfc3339(t.created_at),
            routers: t.routers.len(),
            clients: t.clients.len(),
            host_prefixes: t.host_prefixes.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Live status of a peer, converted to wall-clock time.
#[derive(Serialize, Default, utoipa::ToSchema)]
pub struct LiveView {
    pub status: &'static str,
    pub last_handshake_at: Option<String>,
    pub endpoint: Option<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets of the peer dropped because their source is not one it may
    /// use (a wrong address on the device, a LAN missing from its allowed IPs).
    pub spoofed_packets: u64,
    /// Packets of the peer (a phone) dropped because no gateway of its pool
    /// had a live session: a connected phone that reaches nothing.
    pub egress_down_packets: u64,
}

impl LiveView {
    pub fn new(status: Option<&PeerStatus>, now: Instant, wall: SystemTime) -> Self {
        let Some(s) = status else {
            return Self {
                status: "pending",
                ..Default::default()
            };
        };
        let age = s.last_handshake.map(|t| now.saturating_duration_since(t));
        Self {
            status: STATUSES[status_index(s.last_handshake, now)],
            last_handshake_at: age.map(|a| rfc3339(wall - a)),
            endpoint: s.endpoint.map(|e| e.to_string()),
            rx_bytes: s.stats.rx_bytes,
            tx_bytes: s.stats.tx_bytes,
            spoofed_packets: s.stats.spoofed,
            egress_down_packets: s.stats.egress_down,
        }
    }
}

/// Live statuses of one tunnel by public key.
pub type Statuses = HashMap<[u8; 32], PeerStatus>;

#[derive(Serialize, utoipa::ToSchema)]
pub struct RouterView {
    pub router_id: String,
    pub name: String,
    pub vpn_ip: String,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub gateway: bool,
    /// Whether it has a preshared key (never the key: the script carries it).
    pub has_preshared_key: bool,
    #[serde(flatten)]
    pub live: LiveView,
}

impl RouterView {
    pub fn new(
        t: &Tenant,
        r: &Router,
        statuses: &Statuses,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let allowed_ips = std::iter::once(IpNet::V4(Ipv4Net::from(r.vpn_ip)))
            .chain(r.extra_prefixes.iter().copied())
            .map(|n| n.to_string())
            .collect();
        Self {
            router_id: r.id.to_string(),
            name: r.name.clone(),
            vpn_ip: r.vpn_ip.to_string(),
            public_key: keys::encode(r.public_key.as_bytes()),
            allowed_ips,
            gateway: t
                .egress
                .as_ref()
                .is_some_and(|e| e.gateways.contains(&r.id)),
            has_preshared_key: r.preshared_key.is_some(),
            live: LiveView::new(statuses.get(r.public_key.as_bytes()), now, wall),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub name: String,
    pub vpn_ip: String,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub dns: Vec<String>,
    /// Whether it has a preshared key (never the key: the config carries it).
    pub has_preshared_key: bool,
    #[serde(flatten)]
    pub live: LiveView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl ClientView {
    pub fn new(c: &Client, statuses: &Statuses, now: Instant, wall: SystemTime) -> Self {
        Self {
            client_id: c.id.to_string(),
            name: c.name.clone(),
            vpn_ip: c.vpn_ip.to_string(),
            public_key: keys::encode(c.public_key.as_bytes()),
            allowed_ips: vec![format!("{}/32", c.vpn_ip)],
            dns: c.dns.iter().map(ToString::to_string).collect(),
            has_preshared_key: c.preshared_key.is_some(),
            live: LiveView::new(statuses.get(c.public_key.as_bytes()), now, wall),
            config: None,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EgressView {
    pub pool: String,
    pub gateways: Vec<String>,
}

impl EgressView {
    pub fn new(e: &EgressPolicy) -> Self {
        Self {
            pool: e.pool.to_string(),
            gateways: e.gateways.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The error shape of every 4xx/5xx answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `{"code", "message", "field"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: String,
    /// Human sentence.
    pub message: String,
    /// The input field at fault, when one is.
    pub field: Option<String>,
}

/// The answer of the route explain endpoint.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RouteView {
    /// `forward`, `local` or `drop`.
    pub verdict: String,
    /// Where it goes: `{"kind": "router"|"client"|"server", "id": …}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<PeerRef>,
    /// The rule that decided: `egress <pool>`, `route <prefix>`, `local <address>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Drop reason, for `drop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The peer assumed to send the packet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<PeerRef>,
}

/// A peer named by kind and id.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PeerRef {
    pub kind: String,
    pub id: String,
}

/// A key whose handshake initiations reached the tunnel but that is no peer
/// of it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StrangerView {
    /// The static public key its initiations carry (base64).
    pub public_key: String,
    /// Where its last initiation came from.
    pub endpoint: String,
    /// When that was (RFC 3339, UTC).
    pub last_seen_at: String,
    /// Its initiations since it was first remembered.
    pub initiations: u64,
    /// The peer it is in another tenant (`{"tenant_id", "kind", "id"}`): a
    /// device that dials this tenant's port with another tenant's tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_of: Option<ForeignPeer>,
}

/// A peer of another tenant.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ForeignPeer {
    pub tenant_id: String,
    pub kind: String,
    pub id: String,
}

/// A management forward.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ForwardView {
    pub router_id: String,
    /// The router's port inside the tunnel.
    pub port: u16,
    /// Where connections go: the router's tunnel address and port.
    pub target: String,
    /// The host address that accepts connections.
    pub listen: String,
}

impl ForwardView {
    pub fn new(r: &Router, port: u16, listen: std::net::SocketAddr) -> Self {
        Self {
            router_id: r.id.to_string(),
            port,
            target: format!("{}:{port}", r.vpn_ip),
            listen: listen.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer is `pending` until its first handshake, `connected` while the
    /// handshake is younger than 180 s, `stale` from then on; the API's view
    /// and the `wgplane_peers` series both read it from here.
    #[test]
    fn the_status_follows_the_age_of_the_last_handshake() {
        let now = Instant::now() + Duration::from_secs(1_000);
        let aged = |secs: u64, nanos: u32| Some(now - Duration::new(secs, nanos));
        let status = |h| STATUSES[status_index(h, now)];
        assert_eq!(status(None), "pending");
        assert_eq!(status(aged(0, 0)), "connected");
        assert_eq!(status(aged(179, 999_999_999)), "connected");
        assert_eq!(status(aged(180, 0)), "stale");
        assert_eq!(status(aged(900, 0)), "stale");
        // A handshake stamped after `now` (a snapshot taken across a tick).
        assert_eq!(status(Some(now + Duration::from_millis(5))), "connected");

        let peer = |h| PeerStatus {
            public_key: [7; 32],
            endpoint: None,
            last_handshake: h,
            live: false,
            connected: false,
            stats: crate::core::peer::PeerStats::default(),
        };
        let view = |h| {
            LiveView::new(
                Some(&peer(h)),
                now,
                SystemTime::UNIX_EPOCH + Duration::from_secs(10_000),
            )
        };
        assert_eq!(view(aged(181, 0)).status, "stale");
        assert_eq!(
            view(aged(181, 0)).last_handshake_at.as_deref(),
            Some("1970-01-01T02:43:39Z")
        );
        assert_eq!(view(aged(3, 0)).status, "connected");
        assert_eq!(view(None).status, "pending");
        assert_eq!(
            LiveView::new(None, now, SystemTime::UNIX_EPOCH).status,
            "pending"
        );
    }
}
