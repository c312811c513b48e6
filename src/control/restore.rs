//! Checks a tenant loaded from the store before the registry takes it back.
//!
//! The API lets nothing incoherent in, so these checks only ever fail on a state
//! edited by hand or damaged on disk. They cover what would otherwise run
//! silently wrong: tenants whose addresses overlap (in TUN mode the host would
//! route one tenant's packets into another's tunnel), peers outside their range
//! or sharing an address or a key (the data plane would keep only one of them),
//! and gateways that do not exist. Each failure names the tenant and the peer.
//! Receiver indices are the registry's to check (it holds them); the rows'
//! syntax is the store's.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use super::model::{Id, Tenant};
use super::registry::special_nets;
use crate::core::alloc;

/// A peer of the tenant, named in an error: "router r1", "client phone".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName {
    pub kind: &'static str,
    pub id: Id,
}

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

/// Why a stored tenant cannot be taken back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("host prefix {host} overlaps the tenants' IPv6 range {range}")]
    HostPrefixInTenantRange { host: IpNet, range: IpNet },
    #[error("pool {pool} overlaps its subnet {subnet}")]
    PoolInSubnet { pool: Ipv4Net, subnet: Ipv4Net },
    #[error("{mine} overlaps {theirs} of tenant {tenant}")]
    Overlap {
        mine: Ipv4Net,
        theirs: Ipv4Net,
        tenant: Id,
    },
    #[error("{mine} overlaps host prefix {host} of tenant {tenant}")]
    OverlapsHostPrefix {
        mine: Ipv4Net,
        host: Ipv4Net,
        tenant: Id,
    },
    #[error("host prefix {host} overlaps {theirs} of tenant {tenant}")]
    HostPrefixOverlaps {
        host: Ipv4Net,
        theirs: Ipv4Net,
        tenant: Id,
    },
    #[error("{peer} and {holder} both have {ip}")]
    SharedAddress {
        peer: PeerName,
        holder: PeerName,
        ip: Ipv4Addr,
    },
    #[error("{peer} and {holder} have the same public key")]
    SharedKey { peer: PeerName, holder: PeerName },
    #[error("{peer} has {ip}, not a peer address of the subnet {subnet}")]
    OutsideSubnet {
        peer: PeerName,
        ip: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("{peer} has {ip}, not a peer address of the pool {pool}")]
    OutsidePool {
        peer: PeerName,
        ip: Ipv4Addr,
        pool: Ipv4Net,
    },
    #[error("{0} exists without an egress policy")]
    NoEgress(PeerName),
    #[error("the egress policy has no gateway")]
    NoGateway,
    #[error("gateway {0} is not a router of the tenant")]
    UnknownGateway(Id),
    #[error("gateway {0} is listed twice")]
    GatewayTwice(Id),
    #[error("receiver index {index} of {owner} is out of range")]
    IndexOutOfRange { index: u32, owner: Id },
    #[error("receiver index {index} of {owner} is used twice")]
    IndexTwice { index: u32, owner: Id },
}

/// Why `tenant` cannot be taken back beside the tenants `before` it.
pub fn check(tenant: &Tenant, before: &[&Tenant]) -> Result<(), RestoreError> {
    check_ranges(tenant, before)?;
    check_peers(tenant)
}

/// The nets a tenant routes into its tunnel.
fn tunnel_nets(t: &Tenant) -> impl Iterator<Item = Ipv4Net> + '_ {
    std::iter::once(t.subnet).chain(t.egress.as_ref().map(|e| e.pool))
}

fn v4(prefixes: &[IpNet]) -> impl Iterator<Item = Ipv4Net> + '_ {
    prefixes.iter().filter_map(|p| match p {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    })
}

fn check_ranges(t: &Tenant, before: &[&Tenant]) -> Result<(), RestoreError> {
    let overlap = |a: Ipv4Net, b: Ipv4Net| alloc::overlaps(IpNet::V4(a), IpNet::V4(b));
    // The tenants' IPv6 networks all lie in one range: a host prefix in it
    // would carry one tenant's packets, through the host, into another's.
    let range = IpNet::V6(alloc::TENANT_RANGE_V6);
    if let Some(host) = t.host_prefixes.iter().find(|h| alloc::overlaps(**h, range)) {
        return Err(RestoreError::HostPrefixInTenantRange { host: *host, range });
    }
    if let Some(e) = &t.egress {
        if overlap(e.pool, t.subnet) {
            let (pool, subnet) = (e.pool, t.subnet);
            return Err(RestoreError::PoolInSubnet { pool, subnet });
        }
    }
    for other in before {
        for mine in tunnel_nets(t) {
            let tenant = || other.id.clone();
            if let Some(theirs) = tunnel_nets(other).find(|n| overlap(mine, *n)) {
                return Err(RestoreError::Overlap {
                    mine,
                    theirs,
                    tenant: tenant(),
                });
            }
            if let Some(host) = v4(&other.host_prefixes).find(|n| overlap(mine, *n)) {
                let tenant = tenant();
                return Err(RestoreError::OverlapsHostPrefix { mine, host, tenant });
            }
        }
        for host in v4(&t.host_prefixes) {
            if let Some(theirs) = tunnel_nets(other).find(|n| overlap(host, *n)) {
                let tenant = other.id.clone();
                return Err(RestoreError::HostPrefixOverlaps {
                    host,
                    theirs,
                    tenant,
                });
            }
        }
    }
    Ok(())
}

/// What is wrong with `tenant` but was let in by earlier releases, so that a
/// state they wrote still starts: a host prefix that overlaps the tenant's own
/// subnet, pool or a router's prefix (in TUN mode packets to it go to the host
/// device rather than the peer), or a router's prefix inside a loopback,
/// link-local or multicast range. The caller logs them; the API refuses them now.
pub fn warnings(t: &Tenant) -> Vec<String> {
    let overlap = |a: Ipv4Net, b: Ipv4Net| alloc::overlaps(IpNet::V4(a), IpNet::V4(b));
    let mut out = Vec::new();
    for mine in tunnel_nets(t) {
        if let Some(host) = v4(&t.host_prefixes).find(|n| overlap(mine, *n)) {
            out.push(format!("{mine} overlaps its own host prefix {host}"));
        }
    }
    for r in t.routers.values() {
        for extra in &r.extra_prefixes {
            if let Some(special) = special_nets().find(|s| s.contains(extra)) {
                out.push(format!(
                    "router {} routes {extra}, which lies in {special}, not ordinary unicast",
                    r.id
                ));
            }
            let host = t.host_prefixes.iter();
            if let Some(host) = host.into_iter().find(|h| alloc::overlaps(*extra, **h)) {
                out.push(format!(
                    "router {} routes {extra}, which overlaps its own host prefix {host}",
                    r.id
                ));
            }
        }
    }
    out
}

/// The first of `prefixes` that holds the appliance's public address, where
/// `public_host` is an address (not a name): routers route a tenant's host
/// prefixes into its tunnel, and would route the tunnel's own datagrams
/// there too. The API refuses such a prefix; start-up warns about one stored
/// before that, or made wrong by a new `public_host`.
pub fn holding_public_address<'a>(
    prefixes: impl IntoIterator<Item = &'a IpNet>,
    public_host: &str,
) -> Option<(IpNet, std::net::IpAddr)> {
    let host = public_host.trim_start_matches('[').trim_end_matches(']');
    let address: std::net::IpAddr = host.parse().ok()?;
    let net = prefixes.into_iter().find(|n| n.contains(&address))?;
    Some((*net, address))
}

fn check_peers(t: &Tenant) -> Result<(), RestoreError> {
    let mut addresses: HashMap<Ipv4Addr, PeerName> = HashMap::new();
    let mut keys: HashMap<[u8; 32], PeerName> = HashMap::new();
    let mut take = |peer: PeerName, ip: Ipv4Addr, key: &[u8; 32]| {
        if let Some(holder) = addresses.insert(ip, peer.clone()) {
            return Err(RestoreError::SharedAddress { peer, holder, ip });
        }
        if let Some(holder) = keys.insert(*key, peer.clone()) {
            return Err(RestoreError::SharedKey { peer, holder });
        }
        Ok(())
    };
    for r in t.routers.values() {
        let (kind, id) = ("router", r.id.clone());
        let peer = PeerName { kind, id };
        if !alloc::is_assignable(t.subnet, r.vpn_ip) {
            let (ip, subnet) = (r.vpn_ip, t.subnet);
            return Err(RestoreError::OutsideSubnet { peer, ip, subnet });
        }
        take(peer, r.vpn_ip, r.public_key.as_bytes())?;
    }
    let pool = t.egress.as_ref().map(|e| e.pool);
    for c in t.clients.values() {
        let (kind, id) = ("client", c.id.clone());
        let peer = PeerName { kind, id };
        match pool {
            None => return Err(RestoreError::NoEgress(peer)),
            Some(pool) if !alloc::is_assignable(pool, c.vpn_ip) => {
                let ip = c.vpn_ip;
                return Err(RestoreError::OutsidePool { peer, ip, pool });
            }
            Some(_) => {}
        }
        take(peer, c.vpn_ip, c.public_key.as_bytes())?;
    }
    if let Some(e) = &t.egress {
        if e.gateways.is_empty() {
            return Err(RestoreError::NoGateway);
        }
        let mut seen = HashSet::new();
        for g in &e.gateways {
            if !t.routers.contains_key(g) {
                return Err(RestoreError::UnknownGateway(g.clone()));
            }
            if !seen.insert(g) {
                return Err(RestoreError::GatewayTwice(g.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod public_address_tests {
    use super::holding_public_address;
    use ipnet::IpNet;

    #[test]
    fn a_prefix_holding_the_public_address_is_found_where_it_is_an_address() {
        let nets: Vec<IpNet> = ["198.18.5.0/24", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let found = holding_public_address(&nets, "198.18.5.1");
        assert_eq!(found, Some((nets[0], "198.18.5.1".parse().unwrap())));
        let found = holding_public_address(&nets, "[2001:db8::7]");
        assert_eq!(found.map(|(n, _)| n), Some(nets[1]));
        assert_eq!(holding_public_address(&nets, "203.0.113.1"), None);
        assert_eq!(
            holding_public_address(&nets, "vpn.example.com"),
            None,
            "a name"
        );
    }
}
