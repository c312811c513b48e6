//! Routers (a tenant's MikroTiks): addresses, keys, the prefixes behind them,
//! where they were last heard, and the management forwards to them.
//!
//! Left out: the RouterOS script ([`crate::control::render`]) and the forwards'
//! connections ([`crate::io::forward`]): here a forward is only a port and a listen
//! address. A router's last endpoint is only recorded here, as the data plane reports
//! it.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::{key_and_address, validate_name, AddressRange, PeerWithKey, Put, Registry};
use crate::control::error::ControlError;
use crate::control::model::{Id, Router, RouterRequest, Tenant};
use crate::control::occupancy::Occupancy;
use crate::core::alloc;
use crate::core::peer::PeerKind;
use crate::keys::{self, SecretKey};

impl Registry {
    /// Gives router `id` a key pair generated here, keeping its address,
    /// prefixes, name and forwards: its script then carries the new private
    /// key (a replaced MikroTik, or a key that leaked). The old key's session
    /// ends, and its endpoint is forgotten with it.
    pub fn new_router_key(&mut self, tenant_id: &Id, id: &Id) -> Result<(), ControlError> {
        if !self.tenant(tenant_id)?.routers.contains_key(id) {
            return Err(ControlError::NoRouter(id.to_string()));
        }
        let secret = SecretKey::generate();
        let req = RouterRequest {
            public_key: Some(keys::encode(secret.public().as_bytes())),
            ..Default::default()
        };
        self.put_router(tenant_id, id, &req)?;
        let router = self
            .tenant_mut(tenant_id)?
            .routers
            .get_mut(id)
            .ok_or_else(|| ControlError::NoRouter(id.to_string()))?;
        router.private_key = Some(secret);
        Ok(())
    }

    /// Creates or updates a router; the tenant must exist.
    pub fn put_router(
        &mut self,
        tenant_id: &Id,
        id: &Id,
        req: &RouterRequest,
    ) -> Result<Put, ControlError> {
        let tenant = self
            .tenants
            .get(tenant_id)
            .ok_or_else(|| ControlError::NoTenant(tenant_id.to_string()))?;
        let occupancy = self
            .occupancy
            .entry(tenant_id.clone())
            .or_insert_with(|| Occupancy::of(tenant));
        let existing = tenant.routers.get(id);
        let range = AddressRange {
            net: tenant.subnet,
            first: alloc::router_range_start(tenant.subnet),
            server: tenant.server_ip(),
            server_key: tenant.public_key,
        };
        let (public_key, private_key, vpn_ip) = key_and_address(
            occupancy,
            (PeerKind::Router, id),
            range,
            (req.public_key.as_deref(), req.vpn_ip.as_deref()),
            existing.map(|r| (r.public_key, &r.private_key, r.vpn_ip)),
        )?;
        let extra_prefixes = match (&req.allowed_ips, existing) {
            (Some(list), _) => {
                let mut out = Vec::with_capacity(list.len());
                for text in list {
                    let net: IpNet = text
                        .parse::<IpNet>()
                        .map(|n| n.trunc())
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            ControlError::field("allowed_ips", format!("{text:?} is not a prefix"))
                        })?;
                    self.check_prefix(tenant, id, net)?;
                    // The router's own /32 is implied; listing it again is harmless.
                    if net != IpNet::V4(Ipv4Net::from(vpn_ip)) && !out.contains(&net) {
                        out.push(net);
                    }
                }
                out
            }
            (None, Some(r)) => r.extra_prefixes.clone(),
            (None, None) => Vec::new(),
        };
        let name = match (&req.name, existing) {
            (Some(n), _) => validate_name(n)?,
            (None, Some(r)) => r.name.clone(),
            (None, None) => id.to_string(),
        };
        let forwards = existing.map(|r| r.forwards.clone()).unwrap_or_default();
        let preshared_key = super::preshared_key(
            req.preshared_key.as_deref(),
            existing.and_then(|r| r.preshared_key.as_ref()),
            existing.is_some_and(|r| r.public_key != public_key),
        )?;
        // A new key is a new peer: a fresh receiver index, so that datagrams still
        // in flight for the old key's sessions find no peer (unknown index)
        // instead of failing to decrypt at the new one.
        // Where it was last heard from belongs to the key, too.
        let given = req.endpoint.as_deref().map(parse_endpoint).transpose()?;
        let (index, endpoint) = match existing {
            // A given one replaces the stored one (a wrong one can be put
            // right); the data plane never trades the one it heard for it.
            Some(r) if r.public_key == public_key => (r.index, given.or(r.endpoint)),
            _ => (self.indices.allocate()?, given),
        };
        let router = Router {
            id: id.clone(),
            name,
            public_key,
            private_key,
            vpn_ip,
            extra_prefixes,
            index,
            forwards,
            endpoint,
            preshared_key,
        };
        if let Some(occupancy) = self.occupancy.get_mut(tenant_id) {
            if let Some(old) = existing {
                occupancy.remove(old.vpn_ip, &old.extra_prefixes, &old.public_key);
            }
            occupancy.add_router(id, vpn_ip, &router.extra_prefixes, &public_key);
        }
        let tenant = self.tenant_mut(tenant_id)?;
        let previous = tenant.routers.insert(id.clone(), router);
        Ok(match previous {
            Some(old) => {
                if old.index != index {
                    self.indices.free(old.index);
                }
                Put::Updated
            }
            None => Put::Created,
        })
    }

    /// An extra prefix may not cover the tenant's subnet, its pool, or another
    /// peer's prefix.
    fn check_prefix(&self, tenant: &Tenant, id: &Id, net: IpNet) -> Result<(), ControlError> {
        let field = "allowed_ips";
        let unavailable = |reason| ControlError::AddressUnavailable {
            field,
            addr: net,
            reason,
        };
        // Loopback, link-local, multicast and the like are no router's network:
        // a peer owning one could send from it and attract it. (A larger route
        // that merely includes one, such as 64.0.0.0/2, stays allowed.)
        if super::special_nets().any(|s| s.contains(&net)) {
            return Err(unavailable(
                "lies in a range that is not ordinary unicast (loopback, link-local, multicast…)",
            ));
        }
        if alloc::overlaps(net, IpNet::V4(tenant.subnet)) && net.prefix_len() < 32 {
            return Err(unavailable("overlaps the tenant subnet"));
        }
        if let IpNet::V4(single) = net {
            if [tenant.subnet.network(), tenant.subnet.broadcast()].contains(&single.addr()) {
                return Err(unavailable(
                    "is the tenant subnet's network or broadcast address",
                ));
            }
        }
        if let Some(e) = &tenant.egress {
            if alloc::overlaps(net, IpNet::V4(e.pool)) {
                return Err(unavailable("overlaps the egress pool"));
            }
        }
        if tenant
            .host_prefixes
            .iter()
            .any(|p| alloc::overlaps(*p, net))
        {
            return Err(unavailable("overlaps one of the tenant's host prefixes"));
        }
        let clash = tenant.routers.values().filter(|r| &r.id != id).any(|r| {
            r.extra_prefixes.iter().any(|p| alloc::overlaps(*p, net))
                || net.contains(&IpAddr::V4(r.vpn_ip))
        }) || tenant
            .clients
            .values()
            .any(|c| net.contains(&IpAddr::V4(c.vpn_ip)));
        if clash {
            return Err(unavailable("overlaps another peer's addresses"));
        }
        if net == IpNet::V4(Ipv4Net::from(tenant.server_ip()))
            || net.contains(&IpAddr::V6(tenant.server_ipv6()))
        {
            return Err(unavailable("is or covers the server address"));
        }
        Ok(())
    }

    /// The router of the tenant with this public key, if any.
    pub fn router_with_key(&self, tenant_id: &Id, key: &[u8; 32]) -> Option<&Router> {
        match self.peer_with_key(tenant_id, key)? {
            PeerWithKey::Router(r) => Some(r),
            PeerWithKey::Client(_) => None,
        }
    }

    /// The router or client of the tenant with this public key, if any, from
    /// the tenant's key index in O(1) (the event hub asks for every handshake
    /// of a reconnect wave).
    pub fn peer_with_key(&self, tenant_id: &Id, key: &[u8; 32]) -> Option<PeerWithKey<'_>> {
        let tenant = self.tenants.get(tenant_id)?;
        match self.occupancy.get(tenant_id)?.holder(key)? {
            (true, id) => tenant.routers.get(id).map(PeerWithKey::Router),
            (false, id) => tenant.clients.get(id).map(PeerWithKey::Client),
        }
    }

    /// Records where the data plane last authenticated a router.
    pub fn set_router_endpoint(
        &mut self,
        tenant_id: &Id,
        id: &Id,
        endpoint: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let router = self
            .tenant_mut(tenant_id)?
            .routers
            .get_mut(id)
            .ok_or_else(|| ControlError::NoRouter(id.to_string()))?;
        router.endpoint = Some(endpoint);
        Ok(())
    }

    /// Removes a router; refused while an egress policy names it.
    pub fn delete_router(&mut self, tenant_id: &Id, id: &Id) -> Result<Router, ControlError> {
        let tenant = self.tenant_mut(tenant_id)?;
        if tenant
            .egress
            .as_ref()
            .is_some_and(|e| e.gateways.contains(id))
        {
            return Err(ControlError::InUse(format!(
                "router {id} is a gateway of the egress policy"
            )));
        }
        let r = tenant
            .routers
            .remove(id)
            .ok_or_else(|| ControlError::NoRouter(id.to_string()))?;
        self.indices.free(r.index);
        if let Some(occupancy) = self.occupancy.get_mut(tenant_id) {
            occupancy.remove(r.vpn_ip, &r.extra_prefixes, &r.public_key);
        }
        Ok(r)
    }

    // ---- forwards ----

    /// Sets a management forward from `listen` on the host to `port` of the router.
    pub fn put_forward(
        &mut self,
        tenant_id: &Id,
        router_id: &Id,
        port: u16,
        listen: std::net::SocketAddr,
    ) -> Result<Put, ControlError> {
        if port == 0 {
            return Err(ControlError::field("port", "must be 1-65535"));
        }
        let taken = self.tenants.values().flat_map(|t| {
            t.routers.values().flat_map(move |r| {
                r.forwards
                    .iter()
                    .map(move |(p, l)| ((&t.id, &r.id, *p), *l))
            })
        });
        for ((t, r, p), l) in taken {
            let same = t == tenant_id && r == router_id && p == port;
            if !same && listen.port() != 0 && l == listen {
                return Err(ControlError::ListenTaken(format!(
                    "{listen} already forwards to router {r} port {p} of tenant {t}"
                )));
            }
        }
        let tenant = self.tenant_mut(tenant_id)?;
        let router = tenant
            .routers
            .get_mut(router_id)
            .ok_or_else(|| ControlError::NoRouter(router_id.to_string()))?;
        Ok(match router.forwards.insert(port, listen) {
            Some(_) => Put::Updated,
            None => Put::Created,
        })
    }

    /// Removes a forward.
    pub fn delete_forward(
        &mut self,
        tenant_id: &Id,
        router_id: &Id,
        port: u16,
    ) -> Result<(), ControlError> {
        let tenant = self.tenant_mut(tenant_id)?;
        let router = tenant
            .routers
            .get_mut(router_id)
            .ok_or_else(|| ControlError::NoRouter(router_id.to_string()))?;
        router
            .forwards
            .remove(&port)
            .map(|_| ())
            .ok_or(ControlError::NoForward(port))
    }
}

/// A router's endpoint as given: an address and port that can be answered.
fn parse_endpoint(text: &str) -> Result<std::net::SocketAddr, ControlError> {
    let endpoint: std::net::SocketAddr = text.trim().parse().map_err(|_| {
        ControlError::field("endpoint", format!("{text:?} is not an address and port"))
    })?;
    // `[::ffff:224.0.0.1]:1` is 224.0.0.1:1: judged as what it is.
    let endpoint = crate::core::peer::canonical_endpoint(endpoint);
    if !crate::core::peer::answerable(endpoint) {
        return Err(ControlError::field(
            "endpoint",
            format!("{endpoint} cannot be answered (port 0, or not one host's address)"),
        ));
    }
    Ok(endpoint)
}
