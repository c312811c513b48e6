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

use super::model::Tenant;
use crate::core::alloc;

/// Why `tenant` cannot be taken back beside the tenants `before` it.
pub fn check(tenant: &Tenant, before: &[&Tenant]) -> Result<(), String> {
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

fn check_ranges(t: &Tenant, before: &[&Tenant]) -> Result<(), String> {
    let overlap = |a: Ipv4Net, b: Ipv4Net| alloc::overlaps(IpNet::V4(a), IpNet::V4(b));
    // The tenants' IPv6 networks all lie in one range: a host prefix in it
    // would carry one tenant's packets, through the host, into another's.
    let range = IpNet::V6(alloc::TENANT_RANGE_V6);
    if let Some(host) = t.host_prefixes.iter().find(|h| alloc::overlaps(**h, range)) {
        return Err(format!(
            "host prefix {host} overlaps the tenants' IPv6 range {range}"
        ));
    }
    if let Some(e) = &t.egress {
        if overlap(e.pool, t.subnet) {
            return Err(format!("pool {} overlaps its subnet {}", e.pool, t.subnet));
        }
    }
    for other in before {
        for mine in tunnel_nets(t) {
            if let Some(theirs) = tunnel_nets(other).find(|n| overlap(mine, *n)) {
                return Err(format!("{mine} overlaps {theirs} of tenant {}", other.id));
            }
            if let Some(host) = v4(&other.host_prefixes).find(|n| overlap(mine, *n)) {
                return Err(format!(
                    "{mine} overlaps host prefix {host} of tenant {}",
                    other.id
                ));
            }
        }
        for host in v4(&t.host_prefixes) {
            if let Some(theirs) = tunnel_nets(other).find(|n| overlap(host, *n)) {
                return Err(format!(
                    "host prefix {host} overlaps {theirs} of tenant {}",
                    other.id
                ));
            }
        }
    }
    Ok(())
}

/// What is wrong with `tenant` but was let in by earlier releases, so that a
/// state they wrote still starts: a host prefix that overlaps the tenant's own
/// subnet, pool or a router's prefix (in TUN mode packets to it go to the host
/// device rather than the peer). The caller logs them; the API refuses them now.
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

fn check_peers(t: &Tenant) -> Result<(), String> {
    let mut addresses: HashMap<Ipv4Addr, String> = HashMap::new();
    let mut keys: HashMap<[u8; 32], String> = HashMap::new();
    let mut take = |who: String, ip: Ipv4Addr, key: &[u8; 32]| -> Result<(), String> {
        if let Some(holder) = addresses.insert(ip, who.clone()) {
            return Err(format!("{who} and {holder} both have {ip}"));
        }
        if let Some(holder) = keys.insert(*key, who.clone()) {
            return Err(format!("{who} and {holder} have the same public key"));
        }
        Ok(())
    };
    for r in t.routers.values() {
        let who = format!("router {}", r.id);
        if !alloc::is_assignable(t.subnet, r.vpn_ip) {
            return Err(format!(
                "{who} has {}, not a peer address of the subnet {}",
                r.vpn_ip, t.subnet
            ));
        }
        take(who, r.vpn_ip, r.public_key.as_bytes())?;
    }
    let pool = t.egress.as_ref().map(|e| e.pool);
    for c in t.clients.values() {
        let who = format!("client {}", c.id);
        match pool {
            None => return Err(format!("{who} exists without an egress policy")),
            Some(pool) if !alloc::is_assignable(pool, c.vpn_ip) => {
                return Err(format!(
                    "{who} has {}, not a peer address of the pool {pool}",
                    c.vpn_ip
                ))
            }
            Some(_) => {}
        }
        take(who, c.vpn_ip, c.public_key.as_bytes())?;
    }
    if let Some(e) = &t.egress {
        if e.gateways.is_empty() {
            return Err("the egress policy has no gateway".into());
        }
        let mut seen = HashSet::new();
        for g in &e.gateways {
            if !t.routers.contains_key(g) {
                return Err(format!("gateway {g} is not a router of the tenant"));
            }
            if !seen.insert(g) {
                return Err(format!("gateway {g} is listed twice"));
            }
        }
    }
    Ok(())
}
