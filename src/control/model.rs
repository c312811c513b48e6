//! Control-plane objects and the request bodies that create them.
//!
//! Left out: the rules a request must meet and allocation
//! ([`crate::control::registry`]; ids are the one thing checked here), storage
//! ([`crate::store`]) and the API's JSON answers ([`crate::api::views`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use boringtun::x25519::PublicKey;
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use super::error::ControlError;
use crate::core::engine::EgressConfig;
use crate::core::peer::{PeerConfig, PeerKind};
use crate::keys::{PresharedKey, SecretKey};

/// A caller-chosen id: 1-64 characters of `[A-Za-z0-9._-]`, not `.` or `..`
/// (which URLs, and clients that normalise them, treat as path steps).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(String);

impl Id {
    /// Validates `text` as an id; `field` names it in the error.
    pub fn parse(text: &str, field: &'static str) -> Result<Self, ControlError> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text != "."
            && text != ".."
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Id(text.to_owned()))
        } else {
            Err(ControlError::field(
                field,
                "must be 1-64 characters of A-Z a-z 0-9 . _ -, not . or ..",
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One tenant's tunnel and everything on it.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Id,
    /// `wg0`, `wg1`, … (metrics, scripts).
    pub interface_name: String,
    pub secret: SecretKey,
    pub public_key: PublicKey,
    pub subnet: Ipv4Net,
    pub listen_port: u16,
    pub created_at: SystemTime,
    pub routers: BTreeMap<Id, Router>,
    pub clients: BTreeMap<Id, Client>,
    pub egress: Option<EgressPolicy>,
    /// TUN mode: host-side prefixes the tenant's routers may reach.
    pub host_prefixes: Vec<IpNet>,
}

/// A site router (MikroTik) of a tenant.
#[derive(Debug, Clone)]
pub struct Router {
    pub id: Id,
    pub name: String,
    pub public_key: PublicKey,
    /// Present only when the key pair was generated here (goes into its script).
    pub private_key: Option<SecretKey>,
    pub vpn_ip: Ipv4Addr,
    /// Extra prefixes behind the router.
    pub extra_prefixes: Vec<IpNet>,
    /// Receiver index of its session slot, unique in the process.
    pub index: u32,
    /// Management forwards to this router: router port -> host listen address.
    pub forwards: BTreeMap<u16, std::net::SocketAddr>,
    /// Where the data plane last authenticated the router (kept across
    /// restarts, so that the appliance can reach it before it speaks again).
    pub endpoint: Option<std::net::SocketAddr>,
    /// Mixed into its handshakes, when it has one (sealed at rest, never shown).
    pub preshared_key: Option<PresharedKey>,
}

impl Router {
    /// The router as the data plane needs it: its /32 and prefixes behind it.
    pub fn peer_config(&self, keepalive: Option<u16>) -> (PeerConfig, u32) {
        let mut allowed = vec![IpNet::V4(Ipv4Net::from(self.vpn_ip))];
        allowed.extend(self.extra_prefixes.iter().copied());
        (
            PeerConfig {
                public_key: self.public_key,
                allowed,
                keepalive,
                kind: PeerKind::Router,
                endpoint: self.endpoint,
                preshared_key: self.preshared_key.clone(),
            },
            self.index,
        )
    }
}

/// An end-user device of a tenant's egress pool.
#[derive(Debug, Clone)]
pub struct Client {
    pub id: Id,
    pub name: String,
    pub public_key: PublicKey,
    pub private_key: Option<SecretKey>,
    pub vpn_ip: Ipv4Addr,
    pub dns: Vec<IpAddr>,
    pub index: u32,
    /// Mixed into its handshakes, when it has one (sealed at rest, never shown).
    pub preshared_key: Option<PresharedKey>,
}

impl Client {
    /// The client as the data plane needs it: its /32.
    pub fn peer_config(&self, keepalive: Option<u16>) -> (PeerConfig, u32) {
        (
            PeerConfig {
                public_key: self.public_key,
                allowed: vec![IpNet::V4(Ipv4Net::from(self.vpn_ip))],
                keepalive,
                kind: PeerKind::Client,
                endpoint: None,
                preshared_key: self.preshared_key.clone(),
            },
            self.index,
        )
    }
}

/// KTN egress: a client pool and its gateways, primary first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub pool: Ipv4Net,
    pub gateways: Vec<Id>,
}

impl Tenant {
    /// Every private key the tenant holds: the tunnel's, then those generated
    /// here for its routers and clients.
    pub fn private_keys(&self) -> impl Iterator<Item = &SecretKey> {
        let routers = self.routers.values().filter_map(|r| r.private_key.as_ref());
        let clients = self.clients.values().filter_map(|c| c.private_key.as_ref());
        std::iter::once(&self.secret).chain(routers).chain(clients)
    }

    /// The tunnel's own address (first host of the subnet).
    pub fn server_ip(&self) -> Ipv4Addr {
        crate::core::alloc::server_address(self.subnet)
    }

    /// The tunnel's own IPv6 address (see [`crate::core::alloc::server_address_v6`]).
    pub fn server_ipv6(&self) -> std::net::Ipv6Addr {
        crate::core::alloc::server_address_v6(self.subnet)
    }

    /// The tunnel's own IPv6 network, the /64 of [`Self::server_ipv6`].
    pub fn server_net_v6(&self) -> ipnet::Ipv6Net {
        crate::core::alloc::server_net_v6(self.subnet)
    }

    /// The peer set of this tunnel, as the data plane needs it.
    pub fn peer_configs(&self, keepalive: Option<u16>) -> Vec<(PeerConfig, u32)> {
        let routers = self.routers.values().map(|r| r.peer_config(keepalive));
        let clients = self.clients.values().map(|c| c.peer_config(keepalive));
        routers.chain(clients).collect()
    }

    /// The egress policy as the data plane takes it: gateways by key, primary
    /// first. A gateway id without a router is left out (the registry never
    /// stores one; a hand-edited store may).
    pub fn egress_configs(&self) -> Vec<EgressConfig> {
        self.egress
            .iter()
            .map(|e| EgressConfig {
                pool: IpNet::V4(e.pool),
                gateways: e
                    .gateways
                    .iter()
                    .filter_map(|g| self.routers.get(g))
                    .map(|r| *r.public_key.as_bytes())
                    .collect(),
            })
            .collect()
    }
}

/// Body of `PUT /v1/tenants/{id}`.
#[derive(Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantRequest {
    pub listen_port: Option<u16>,
    pub subnet: Option<String>,
    /// TUN mode: host-side prefixes (e.g. the backend's container network) that
    /// this tenant's routers may reach through the host device. Replaces the list.
    pub host_prefixes: Option<Vec<String>>,
    /// Migration: the tunnel's existing private key (base64, as `wg genkey`
    /// prints it), so that routers configured for the old server keep working.
    /// Only when the tenant is created (the same key again is accepted);
    /// never shown in any answer. Without it a key pair is generated here.
    pub private_key: Option<String>,
}

/// Redacted: the request may carry a private key.
impl std::fmt::Debug for TenantRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRequest")
            .field("listen_port", &self.listen_port)
            .field("subnet", &self.subnet)
            .field("host_prefixes", &self.host_prefixes)
            .field("private_key", &redacted(&self.private_key))
            .finish()
    }
}

/// Body of `PUT …/routers/{id}`.
#[derive(Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterRequest {
    pub name: Option<String>,
    pub public_key: Option<String>,
    pub vpn_ip: Option<String>,
    pub allowed_ips: Option<Vec<String>>,
    /// The peer's preshared key (base64, as `wg genpsk` prints it); `"generate"`
    /// for one made here (kept once there is one), `""` for none. Omitted: kept.
    /// Never shown in an answer; it goes into the router's script.
    pub preshared_key: Option<String>,
    /// Where the router can be reached before it speaks (`ip:port`, as `wg
    /// show` lists it): a migrated router's last endpoint, so that the
    /// appliance can shake hands with it first. It replaces the stored one;
    /// the data plane keeps the one it heard the router from, if any, and
    /// where the router is heard from next replaces it in turn.
    pub endpoint: Option<String>,
}

/// Redacted: the request may carry a preshared key.
impl std::fmt::Debug for RouterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterRequest")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("vpn_ip", &self.vpn_ip)
            .field("allowed_ips", &self.allowed_ips)
            .field("preshared_key", &redacted(&self.preshared_key))
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// What a `Debug` of a request shows of a secret: whether it was given.
fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "<redacted>")
}

/// Body of `PUT …/egress`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    pub pool: String,
    pub gateways: Vec<String>,
}

/// Body of `PUT …/routers/{id}/forwards/{port}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    /// Host address to listen on; default `127.0.0.1:0` (any free port).
    pub listen: Option<String>,
}

/// Body of `PUT …/clients/{id}`.
#[derive(Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientRequest {
    pub name: Option<String>,
    pub public_key: Option<String>,
    pub vpn_ip: Option<String>,
    pub dns: Option<Vec<String>>,
    /// As a router's: base64, `"generate"`, `""` for none, omitted: kept. It
    /// goes into the client's config.
    pub preshared_key: Option<String>,
}

/// Redacted: the request may carry a preshared key.
impl std::fmt::Debug for ClientRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("vpn_ip", &self.vpn_ip)
            .field("dns", &self.dns)
            .field("preshared_key", &redacted(&self.preshared_key))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for ok in ["a", "kitonga", "branch-a.1_2", "...", ".x", &"x".repeat(64)] {
            assert!(Id::parse(ok, "id").is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(65)] {
            let e = Id::parse(bad, "router_id").unwrap_err();
            assert_eq!(e.field_name(), Some("router_id"), "{bad}");
        }
    }
}
