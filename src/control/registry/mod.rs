//! The registry of tenants and their peers: every control-plane rule in one place.
//!
//! Mutations validate and allocate, then apply all-or-nothing: a refused request
//! leaves the registry exactly as it was. Wall-clock time comes in as an argument.
//!
//! This file holds the registry itself: restoring it from the store, undoing a
//! change the store refused, and the checks every kind of object shares. The
//! rules for each kind are in `tenants`, `routers` (with management forwards) and
//! `clients` (with the egress policy they depend on). Storing, and telling the
//! data plane, are the callers' part.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use boringtun::x25519::PublicKey;
use ipnet::{IpNet, Ipv4Net};

use super::error::ControlError;
use super::model::{Client, Id, Router, Tenant};
use super::occupancy::Occupancy;
use super::restore::{self, RestoreError};
use crate::core::alloc::{self, IndexAllocator};
use crate::core::peer::PeerKind;
use crate::keys::{self, SecretKey};

mod clients;
mod routers;
mod tenants;
#[cfg(test)]
pub(crate) mod tests;

/// DNS servers a client config may name. Far more than any resolver uses, and
/// few enough that the config always fits a QR code.
const MAX_DNS: usize = 8;

/// Ranges a tenant subnet or client pool may not touch: "this network", loopback,
/// link-local, and multicast with the reserved block above it.
const SPECIAL_NETS: [Ipv4Net; 4] = [
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 3),
];

/// IPv6 ranges that are not ordinary unicast: the unspecified and loopback
/// addresses, IPv4-mapped addresses, link-local and multicast. (NAT64's
/// `64:ff9b::/96`, inside `::/8`, is ordinary.)
const SPECIAL_NETS_V6: [ipnet::Ipv6Net; 5] = [
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 128),
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128),
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

/// Every range, of both families, that is not ordinary unicast.
pub(crate) fn special_nets() -> impl Iterator<Item = IpNet> {
    SPECIAL_NETS
        .into_iter()
        .map(IpNet::V4)
        .chain(SPECIAL_NETS_V6.into_iter().map(IpNet::V6))
}

/// How tenants get ports and subnets.
#[derive(Debug, Clone)]
pub struct AllocPolicy {
    /// The range tenants' listen ports are handed out from (a port given in
    /// the request may lie outside it).
    pub first_port: u16,
    pub last_port: u16,
    pub supernet: Ipv4Net,
    pub subnet_prefix_len: u8,
    pub subnet_start: Ipv4Addr,
}

impl From<&crate::config::TunnelSettings> for AllocPolicy {
    fn from(t: &crate::config::TunnelSettings) -> Self {
        Self {
            first_port: t.first_port,
            last_port: t.last_port,
            supernet: t.supernet,
            subnet_prefix_len: t.subnet_prefix_len,
            subnet_start: t.subnet_start,
        }
    }
}

/// The embedded defaults': ports from 51820, /16 subnets of 10.0.0.0/8 from
/// 10.100.0.0/16.
impl Default for AllocPolicy {
    fn default() -> Self {
        Self::from(&crate::config::TunnelSettings::default())
    }
}

/// What a `PUT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The object did not exist.
    Created,
    /// The object existed (and may have changed).
    Updated,
}

/// A tenant's peer found by its public key.
#[derive(Debug, Clone, Copy)]
pub enum PeerWithKey<'a> {
    Router(&'a Router),
    Client(&'a Client),
}

/// All tenants, with the allocation policy and the process-wide receiver indices.
pub struct Registry {
    policy: AllocPolicy,
    tenants: BTreeMap<Id, Tenant>,
    indices: IndexAllocator,
    /// Per tenant, its peers' addresses and keys: kept for every tenant, by
    /// each change and rebuilt after an undone one.
    occupancy: HashMap<Id, Occupancy>,
}

impl Registry {
    /// An empty registry; `index_seed` randomizes receiver indices.
    pub fn new(policy: AllocPolicy, index_seed: u32) -> Self {
        Self {
            policy,
            tenants: BTreeMap::new(),
            indices: IndexAllocator::new(index_seed),
            occupancy: HashMap::new(),
        }
    }

    /// A registry holding `tenants` as loaded from the store.
    pub fn restore(
        policy: AllocPolicy,
        index_seed: u32,
        tenants: Vec<Tenant>,
    ) -> Result<Self, ControlError> {
        let mut r = Self::new(policy, index_seed);
        for t in tenants {
            let inconsistent = |reason| ControlError::Inconsistent {
                tenant: t.id.clone(),
                reason,
            };
            restore::check(&t, &r.tenants.values().collect::<Vec<_>>()).map_err(inconsistent)?;
            let indices = t
                .routers
                .values()
                .map(|x| (x.index, &x.id))
                .chain(t.clients.values().map(|x| (x.index, &x.id)));
            for (index, owner) in indices {
                if !IndexAllocator::is_valid(index) {
                    let owner = owner.clone();
                    return Err(inconsistent(RestoreError::IndexOutOfRange { index, owner }));
                }
                if !r.indices.reserve(index) {
                    let owner = owner.clone();
                    return Err(inconsistent(RestoreError::IndexTwice { index, owner }));
                }
            }
            r.occupancy.insert(t.id.clone(), Occupancy::of(&t));
            r.tenants.insert(t.id.clone(), t);
        }
        Ok(r)
    }

    /// Puts a tenant back as it was before a change that could not be stored.
    /// Receiver indices follow: those of the peers it had are held again, those
    /// of peers it did not have are freed.
    pub fn reinstate(&mut self, id: &Id, before: Option<Tenant>) {
        let now = match before {
            Some(t) => self.tenants.insert(id.clone(), t),
            None => self.tenants.remove(id),
        };
        for i in now.iter().flat_map(peer_indices) {
            self.indices.free(i);
        }
        for i in self.tenants.get(id).into_iter().flat_map(peer_indices) {
            self.indices.reserve(i);
        }
        self.reindex(id);
    }

    /// Builds tenant `id`'s index of addresses and keys again from the tenant
    /// as it now is (after an undone change), or drops it with the tenant.
    fn reindex(&mut self, id: &Id) {
        let old = self.occupancy.remove(id);
        if let Some(t) = self.tenants.get(id) {
            let mut fresh = Occupancy::of(t);
            // Where client pools' rotation stands is no part of the tenant.
            if let Some(old) = old {
                fresh.keep_rotation(old);
            }
            self.occupancy.insert(id.clone(), fresh);
        }
    }

    /// Puts one router back as it was before a change that could not be stored
    /// (none: it did not exist, and its receiver index is freed again).
    pub fn reinstate_router(&mut self, tenant: &Id, id: &Id, before: Option<Router>) {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return;
        };
        // A deletion or change undone: the old index is held again, and the one
        // the change took (a new router's, or a new key's) is freed.
        let kept = before.as_ref().map(|r| r.index);
        let replaced = match before {
            Some(r) => {
                self.indices.reserve(r.index);
                t.routers.insert(id.clone(), r)
            }
            None => t.routers.remove(id),
        };
        if let Some(r) = replaced.filter(|r| Some(r.index) != kept) {
            self.indices.free(r.index);
        }
        self.reindex(tenant);
    }

    /// Like [`Self::reinstate_router`], for a client.
    pub fn reinstate_client(&mut self, tenant: &Id, id: &Id, before: Option<Client>) {
        let Some(t) = self.tenants.get_mut(tenant) else {
            return;
        };
        // As in `reinstate_router`.
        let kept = before.as_ref().map(|c| c.index);
        let replaced = match before {
            Some(c) => {
                self.indices.reserve(c.index);
                t.clients.insert(id.clone(), c)
            }
            None => t.clients.remove(id),
        };
        if let Some(c) = replaced.filter(|c| Some(c.index) != kept) {
            self.indices.free(c.index);
        }
        self.reindex(tenant);
    }

    /// Every tenant, by id.
    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }

    /// One tenant.
    pub fn tenant(&self, id: &Id) -> Result<&Tenant, ControlError> {
        self.tenants
            .get(id)
            .ok_or_else(|| ControlError::NoTenant(id.to_string()))
    }

    fn tenant_mut(&mut self, id: &Id) -> Result<&mut Tenant, ControlError> {
        self.tenants
            .get_mut(id)
            .ok_or_else(|| ControlError::NoTenant(id.to_string()))
    }

    /// Subnets and pools of every tenant except `except`.
    fn taken_nets(&self, except: Option<&Id>) -> Vec<Ipv4Net> {
        self.tenants
            .values()
            .filter(|t| Some(&t.id) != except)
            .flat_map(|t| [Some(t.subnet), t.egress.as_ref().map(|e| e.pool)])
            .flatten()
            .collect()
    }

    /// Every tenant's IPv4 host prefixes: the host routes them, so no tunnel may
    /// hold them (else the host would carry one tenant's packets into another's).
    fn host_nets(&self) -> Vec<Ipv4Net> {
        self.tenants
            .values()
            .flat_map(|t| t.host_prefixes.iter())
            .filter_map(|p| match p {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect()
    }

    /// A subnet or pool: an ordinary unicast range that no other tenant's subnet
    /// or pool and no tenant's host prefix overlaps.
    fn check_free(
        &self,
        net: Ipv4Net,
        field: &'static str,
        except: Option<&Id>,
    ) -> Result<(), ControlError> {
        if let Some(special) = SPECIAL_NETS
            .iter()
            .find(|s| alloc::overlaps(IpNet::V4(net), IpNet::V4(**s)))
        {
            return Err(ControlError::field(
                field,
                format!("{net} overlaps {special}, which is not ordinary unicast"),
            ));
        }
        match self
            .taken_nets(except)
            .into_iter()
            .chain(self.host_nets())
            .find(|o| alloc::overlaps(IpNet::V4(net), IpNet::V4(*o)))
        {
            Some(other) => Err(ControlError::Overlap { field, net, other }),
            None => Ok(()),
        }
    }
}

/// Where a new or updated peer's address comes from.
struct AddressRange {
    /// The range the address must lie in (tenant subnet or client pool).
    net: Ipv4Net,
    /// The first host number handed out when none is asked for.
    first: u32,
    /// The tunnel's own address, never a peer's.
    server: Ipv4Addr,
    /// The tunnel's own public key, never a peer's.
    server_key: PublicKey,
}

/// A new or updated peer's key pair and address: as asked, else as it was, else
/// a fresh key pair and the next free address of `range`. A key another peer of
/// the tenant (or the tunnel itself) holds, or an address that is taken or
/// outside `range`, is refused.
fn key_and_address(
    occupancy: &mut Occupancy,
    peer: (PeerKind, &Id),
    range: AddressRange,
    (key, vpn_ip): (Option<&str>, Option<&str>),
    existing: Option<(PublicKey, &Option<SecretKey>, Ipv4Addr)>,
) -> Result<(PublicKey, Option<SecretKey>, Ipv4Addr), ControlError> {
    let (public_key, private_key) = resolve_key(key, existing.map(|(k, p, _)| (k, p)))?;
    if let Some(owner) = occupancy.key_owner(&public_key, Some(peer)) {
        return Err(ControlError::DuplicateKey { owner });
    }
    // A peer with the tunnel's own key could never shake hands with it.
    if public_key == range.server_key {
        return Err(ControlError::DuplicateKey {
            owner: "the tunnel itself".into(),
        });
    }
    let own = existing.map(|(_, _, ip)| ip);
    let vpn_ip = match (vpn_ip, own) {
        (Some(text), _) => {
            let ip = parse_v4(text, "vpn_ip")?;
            let taken = ip == range.server || (occupancy.holds(ip) && Some(ip) != own);
            check_address(range.net, ip, taken, "vpn_ip")?;
            ip
        }
        (None, Some(ip)) => ip,
        (None, None) => match peer.0 {
            PeerKind::Router => occupancy.next_free(range.net, range.first, range.server)?,
            PeerKind::Client => {
                occupancy.next_free_rotating(range.net, range.first, range.server)?
            }
        },
    };
    Ok((public_key, private_key, vpn_ip))
}

/// The key of a new or updated peer: the one given, else the existing one, else a
/// fresh pair generated here (whose private key goes into the peer's script/config).
fn resolve_key(
    given: Option<&str>,
    existing: Option<(PublicKey, &Option<SecretKey>)>,
) -> Result<(PublicKey, Option<SecretKey>), ControlError> {
    match (given, existing) {
        (Some(text), existing) => {
            let key = keys::decode(text)
                .map(PublicKey::from)
                .map_err(|e| ControlError::field("public_key", e.to_string()))?;
            // Keep a private key generated here only while the public key still matches.
            let private = existing
                .filter(|(k, _)| *k == key)
                .and_then(|(_, p)| p.clone());
            Ok((key, private))
        }
        (None, Some((key, private))) => Ok((key, private.clone())),
        (None, None) => {
            let secret = SecretKey::generate();
            Ok((secret.public(), Some(secret)))
        }
    }
}

fn check_address(
    range: Ipv4Net,
    ip: Ipv4Addr,
    taken: bool,
    field: &'static str,
) -> Result<(), ControlError> {
    let addr = IpNet::V4(Ipv4Net::from(ip));
    if !range.contains(&ip) {
        return Err(ControlError::AddressUnavailable {
            field,
            addr,
            reason: "outside the range",
        });
    }
    if !alloc::is_assignable(range, ip) {
        let reason = if ip == range.network() {
            "the network address"
        } else if ip == range.broadcast() {
            "the broadcast address"
        } else {
            // `server_address` of the range: the tunnel's own in a tenant's
            // subnet; a client pool keeps its .1 free the same way.
            "the range's first host address, never a peer's (the server's in a tenant's subnet)"
        };
        return Err(ControlError::AddressUnavailable {
            field,
            addr,
            reason,
        });
    }
    if taken {
        return Err(ControlError::AddressUnavailable {
            field,
            addr,
            reason: "already in use",
        });
    }
    Ok(())
}

fn parse_v4(text: &str, field: &'static str) -> Result<Ipv4Addr, ControlError> {
    text.parse()
        .map_err(|_| ControlError::field(field, format!("{text:?} is not an IPv4 address")))
}

fn parse_v4_net(text: &str, field: &'static str) -> Result<Ipv4Net, ControlError> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| ControlError::field(field, format!("{text:?} is not an IPv4 prefix")))?;
    if net.trunc() != net {
        return Err(ControlError::field(
            field,
            format!("{net} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn validate_name(name: &str) -> Result<String, ControlError> {
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ControlError::field(
            "name",
            "must be 1-128 characters without control characters",
        ));
    }
    Ok(name.to_owned())
}

/// A peer's preshared key after a request's `preshared_key`: omitted keeps
/// `current` (a new one when the peer gets a new key: the old one was on the
/// same device), `""` removes it, `"generate"` keeps it or makes one, base64
/// sets it (all zeros is none, as in WireGuard). The error never quotes the text.
fn preshared_key(
    text: Option<&str>,
    current: Option<&keys::PresharedKey>,
    new_key: bool,
) -> Result<Option<keys::PresharedKey>, ControlError> {
    Ok(match text.map(str::trim) {
        None if new_key => current.map(|_| keys::PresharedKey::generate()),
        None => current.cloned(),
        Some("") => None,
        Some("generate") => Some(
            current
                .cloned()
                .unwrap_or_else(keys::PresharedKey::generate),
        ),
        Some(text) => Some(
            keys::PresharedKey::parse(text)
                .map_err(|e| ControlError::field("preshared_key", e.to_string()))?,
        )
        .filter(|k| k.to_bytes() != [0; 32]),
    })
}

/// The receiver indices of a tenant's routers and clients.
fn peer_indices(t: &Tenant) -> impl Iterator<Item = u32> + '_ {
    t.routers
        .values()
        .map(|r| r.index)
        .chain(t.clients.values().map(|c| c.index))
}
