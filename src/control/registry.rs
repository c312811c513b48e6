//! The registry of tenants and their peers: every control-plane rule in one place.
//!
//! Mutations validate and allocate, then apply all-or-nothing: a refused request
//! leaves the registry exactly as it was. Wall-clock time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use boringtun::x25519::PublicKey;
use ipnet::{IpNet, Ipv4Net};

use super::error::ControlError;
use super::model::{
    Client, ClientRequest, EgressPolicy, EgressRequest, Id, Router, RouterRequest, Tenant,
    TenantRequest,
};
use super::occupancy::Occupancy;
use super::restore;
use crate::core::alloc::{self, IndexAllocator};
use crate::keys::{self, SecretKey};

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

/// How tenants get ports and subnets.
#[derive(Debug, Clone)]
pub struct AllocPolicy {
    pub first_port: u16,
    pub supernet: Ipv4Net,
    pub subnet_prefix_len: u8,
    pub subnet_start: Ipv4Addr,
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
    /// Per tenant, its peers' addresses and keys; rebuilt from the tenant when
    /// missing, dropped whenever a tenant is replaced wholesale.
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
            let inconsistent =
                |why: String| ControlError::Inconsistent(format!("tenant {}: {why}", t.id));
            restore::check(&t, &r.tenants.values().collect::<Vec<_>>()).map_err(inconsistent)?;
            let indices = t
                .routers
                .values()
                .map(|x| (x.index, x.id.as_str()))
                .chain(t.clients.values().map(|x| (x.index, x.id.as_str())));
            for (index, owner) in indices {
                if !IndexAllocator::is_valid(index) {
                    return Err(inconsistent(format!(
                        "receiver index {index} of {owner} is out of range"
                    )));
                }
                if !r.indices.reserve(index) {
                    return Err(inconsistent(format!(
                        "receiver index {index} of {owner} is used twice"
                    )));
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
        self.occupancy.remove(id);
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
    }

    /// Puts one router back as it was before a change that could not be stored
    /// (none: it did not exist, and its receiver index is freed again).
    pub fn reinstate_router(&mut self, tenant: &Id, id: &Id, before: Option<Router>) {
        self.occupancy.remove(tenant);
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
    }

    /// Like [`Self::reinstate_router`], for a client.
    pub fn reinstate_client(&mut self, tenant: &Id, id: &Id, before: Option<Client>) {
        self.occupancy.remove(tenant);
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

    // ---- tenants ----

    /// Creates the tenant's tunnel, or checks that an existing one matches `req`.
    pub fn put_tenant(
        &mut self,
        id: &Id,
        req: &TenantRequest,
        now: SystemTime,
    ) -> Result<Put, ControlError> {
        let subnet = req
            .subnet
            .as_deref()
            .map(|s| parse_v4_net(s, "subnet"))
            .transpose()?;
        let host_prefixes = req
            .host_prefixes
            .as_ref()
            .map(|list| self.parse_host_prefixes(id, list))
            .transpose()?;
        if let Some(t) = self.tenants.get(id) {
            if req.listen_port.is_some_and(|p| p != t.listen_port) {
                return Err(ControlError::Immutable {
                    field: "listen_port",
                    current: t.listen_port.to_string(),
                });
            }
            if subnet.is_some_and(|s| s != t.subnet) {
                return Err(ControlError::Immutable {
                    field: "subnet",
                    current: t.subnet.to_string(),
                });
            }
            if let Some(list) = host_prefixes {
                self.tenant_mut(id)?.host_prefixes = list;
            }
            return Ok(Put::Updated);
        }

        let ports: BTreeSet<u16> = self.tenants.values().map(|t| t.listen_port).collect();
        let listen_port = match req.listen_port {
            Some(0) => return Err(ControlError::field("listen_port", "must not be 0")),
            Some(p) if ports.contains(&p) => return Err(ControlError::PortInUse(p)),
            Some(p) => p,
            None => alloc::next_port(self.policy.first_port, &ports)?,
        };
        let subnet = match subnet {
            Some(s) => {
                if s.prefix_len() > 30 {
                    return Err(ControlError::field("subnet", "must be /30 or larger"));
                }
                self.check_free(s, "subnet", None)?;
                s
            }
            None => {
                let taken: Vec<IpNet> = self
                    .taken_nets(None)
                    .into_iter()
                    .chain(self.host_nets())
                    .map(IpNet::V4)
                    .collect();
                alloc::next_subnet(
                    self.policy.supernet,
                    self.policy.subnet_prefix_len,
                    self.policy.subnet_start,
                    &taken,
                )?
            }
        };
        let names: BTreeSet<&str> = self
            .tenants
            .values()
            .map(|t| t.interface_name.as_str())
            .collect();
        let interface_name = (0..)
            .map(|n| format!("wg{n}"))
            .find(|n| !names.contains(n.as_str()))
            .unwrap_or_default();
        let secret = SecretKey::generate();
        let tenant = Tenant {
            id: id.clone(),
            interface_name,
            public_key: secret.public(),
            secret,
            subnet,
            listen_port,
            created_at: now,
            routers: BTreeMap::new(),
            clients: BTreeMap::new(),
            egress: None,
            host_prefixes: host_prefixes.unwrap_or_default(),
        };
        self.tenants.insert(id.clone(), tenant);
        Ok(Put::Created)
    }

    /// Host prefixes must not overlap any tenant's subnet or pool, nor a prefix
    /// behind one of this tenant's routers: each address has one place to go.
    fn parse_host_prefixes(&self, id: &Id, list: &[String]) -> Result<Vec<IpNet>, ControlError> {
        let field = "host_prefixes";
        let mut out = Vec::with_capacity(list.len());
        for text in list {
            let net: IpNet = text
                .parse()
                .map_err(|_| ControlError::field(field, format!("{text:?} is not a prefix")))?;
            let net = net.trunc();
            let clash = self
                .taken_nets(None)
                .into_iter()
                .map(IpNet::V4)
                .chain(self.tenants.get(id).into_iter().flat_map(|t| {
                    t.routers
                        .values()
                        .flat_map(|r| r.extra_prefixes.iter().copied())
                }))
                .find(|o| alloc::overlaps(net, *o));
            if let Some(other) = clash {
                return Err(ControlError::field(
                    field,
                    format!("{net} overlaps {other}, which is routed into a tunnel"),
                ));
            }
            if !out.contains(&net) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Removes a tenant with all its peers.
    pub fn delete_tenant(&mut self, id: &Id) -> Result<Tenant, ControlError> {
        let t = self
            .tenants
            .remove(id)
            .ok_or_else(|| ControlError::NoTenant(id.to_string()))?;
        self.occupancy.remove(id);
        for i in peer_indices(&t) {
            self.indices.free(i);
        }
        Ok(t)
    }

    // ---- routers ----

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
        let (public_key, private_key) = resolve_key(
            req.public_key.as_deref(),
            existing.map(|r| (r.public_key, &r.private_key)),
        )?;
        if let Some(owner) = occupancy.key_owner(&public_key, Some(id)) {
            return Err(ControlError::DuplicateKey { owner });
        }
        let server = tenant.server_ip();
        let own = existing.map(|r| r.vpn_ip);
        let vpn_ip = match (req.vpn_ip.as_deref(), existing) {
            (Some(text), _) => {
                let ip = parse_v4(text, "vpn_ip")?;
                let taken = ip == server || (occupancy.holds(ip) && Some(ip) != own);
                check_address(tenant.subnet, ip, taken, "vpn_ip")?;
                ip
            }
            (None, Some(r)) => r.vpn_ip,
            (None, None) => occupancy.next_free(
                tenant.subnet,
                alloc::router_range_start(tenant.subnet),
                server,
            )?,
        };
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
        // A new key is a new peer: a fresh receiver index, so that datagrams still
        // in flight for the old key's sessions find no peer (unknown index)
        // instead of failing to decrypt at the new one.
        // Where it was last heard from belongs to the key, too.
        let (index, endpoint) = match existing {
            Some(r) if r.public_key == public_key => (r.index, r.endpoint),
            _ => (self.indices.allocate()?, None),
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

    /// The router or client of the tenant with this public key, if any. The
    /// tenant's key index answers in O(1) (the event hub asks for every
    /// handshake of a reconnect wave); while it is being rebuilt after an undone
    /// change, the peers are scanned.
    pub fn peer_with_key(&self, tenant_id: &Id, key: &[u8; 32]) -> Option<PeerWithKey<'_>> {
        let tenant = self.tenants.get(tenant_id)?;
        let Some(occupancy) = self.occupancy.get(tenant_id) else {
            let router = tenant
                .routers
                .values()
                .find(|r| r.public_key.as_bytes() == key);
            let client = || {
                tenant
                    .clients
                    .values()
                    .find(|c| c.public_key.as_bytes() == key)
            };
            return match router {
                Some(r) => Some(PeerWithKey::Router(r)),
                None => client().map(PeerWithKey::Client),
            };
        };
        match occupancy.holder(key)? {
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
                return Err(ControlError::InUse(format!(
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

    // ---- egress ----

    /// Sets the tenant's egress policy.
    pub fn put_egress(&mut self, tenant_id: &Id, req: &EgressRequest) -> Result<Put, ControlError> {
        let pool = parse_v4_net(&req.pool, "pool")?;
        if pool.prefix_len() > 30 {
            return Err(ControlError::field("pool", "must be /30 or larger"));
        }
        let tenant = self.tenant(tenant_id)?;
        if alloc::overlaps(IpNet::V4(pool), IpNet::V4(tenant.subnet)) {
            return Err(ControlError::Overlap {
                field: "pool",
                net: pool,
                other: tenant.subnet,
            });
        }
        self.check_free(pool, "pool", Some(tenant_id))?;
        if req.gateways.is_empty() {
            return Err(ControlError::field(
                "gateways",
                "needs at least one router id",
            ));
        }
        let mut gateways = Vec::with_capacity(req.gateways.len());
        for g in &req.gateways {
            let id = Id::parse(g, "gateways")?;
            if !tenant.routers.contains_key(&id) {
                return Err(ControlError::field(
                    "gateways",
                    format!("router {id} does not exist in this tenant"),
                ));
            }
            if gateways.contains(&id) {
                return Err(ControlError::field(
                    "gateways",
                    format!("router {id} is listed twice"),
                ));
            }
            gateways.push(id);
        }
        if let Some(c) = tenant
            .clients
            .values()
            .find(|c| !alloc::is_assignable(pool, c.vpn_ip))
        {
            return Err(ControlError::InUse(format!(
                "client {} uses {}, which is not a host address of the new pool",
                c.id, c.vpn_ip
            )));
        }
        let pool_net = IpNet::V4(pool);
        if let Some(r) = tenant.routers.values().find(|r| {
            r.extra_prefixes
                .iter()
                .any(|p| alloc::overlaps(*p, pool_net))
        }) {
            return Err(ControlError::InUse(format!(
                "router {} routes a prefix inside the pool",
                r.id
            )));
        }
        let policy = EgressPolicy { pool, gateways };
        let tenant = self.tenant_mut(tenant_id)?;
        Ok(match tenant.egress.replace(policy) {
            Some(_) => Put::Updated,
            None => Put::Created,
        })
    }

    /// Removes the egress policy; refused while clients exist.
    pub fn delete_egress(&mut self, tenant_id: &Id) -> Result<(), ControlError> {
        let tenant = self.tenant_mut(tenant_id)?;
        if tenant.egress.is_none() {
            return Err(ControlError::NoEgress);
        }
        if !tenant.clients.is_empty() {
            return Err(ControlError::InUse(format!(
                "{} clients still use the pool",
                tenant.clients.len()
            )));
        }
        tenant.egress = None;
        Ok(())
    }

    // ---- clients ----

    /// Creates or updates a client; the tenant needs an egress policy.
    pub fn put_client(
        &mut self,
        tenant_id: &Id,
        id: &Id,
        req: &ClientRequest,
    ) -> Result<Put, ControlError> {
        let tenant = self
            .tenants
            .get(tenant_id)
            .ok_or_else(|| ControlError::NoTenant(tenant_id.to_string()))?;
        let Some(egress) = &tenant.egress else {
            return Err(ControlError::NoEgress);
        };
        let occupancy = self
            .occupancy
            .entry(tenant_id.clone())
            .or_insert_with(|| Occupancy::of(tenant));
        let existing = tenant.clients.get(id);
        let (public_key, private_key) = resolve_key(
            req.public_key.as_deref(),
            existing.map(|c| (c.public_key, &c.private_key)),
        )?;
        if let Some(owner) = occupancy.key_owner(&public_key, Some(id)) {
            return Err(ControlError::DuplicateKey { owner });
        }
        let server = tenant.server_ip();
        let own = existing.map(|c| c.vpn_ip);
        let vpn_ip = match (req.vpn_ip.as_deref(), existing) {
            (Some(text), _) => {
                let ip = parse_v4(text, "vpn_ip")?;
                let taken = ip == server || (occupancy.holds(ip) && Some(ip) != own);
                check_address(egress.pool, ip, taken, "vpn_ip")?;
                ip
            }
            (None, Some(c)) => c.vpn_ip,
            // .1 of the pool stays free for the gateway side.
            (None, None) => occupancy.next_free(egress.pool, 2, server)?,
        };
        let dns = match (&req.dns, existing) {
            (Some(list), _) => {
                let mut out: Vec<IpAddr> = Vec::with_capacity(list.len().min(MAX_DNS));
                for d in list {
                    let ip = d.parse::<IpAddr>().map_err(|_| {
                        ControlError::field("dns", format!("{d:?} is not an IP address"))
                    })?;
                    if !out.contains(&ip) {
                        out.push(ip);
                    }
                }
                if out.len() > MAX_DNS {
                    return Err(ControlError::field(
                        "dns",
                        format!("at most {MAX_DNS} servers (the config must fit a QR code)"),
                    ));
                }
                out
            }
            (None, Some(c)) => c.dns.clone(),
            (None, None) => Vec::new(),
        };
        let name = match (&req.name, existing) {
            (Some(n), _) => validate_name(n)?,
            (None, Some(c)) => c.name.clone(),
            (None, None) => id.to_string(),
        };
        // A new key is a new peer: a fresh receiver index (see `put_router`).
        let index = match existing {
            Some(c) if c.public_key == public_key => c.index,
            _ => self.indices.allocate()?,
        };
        let client = Client {
            id: id.clone(),
            name,
            public_key,
            private_key,
            vpn_ip,
            dns,
            index,
        };
        let tenant = self.tenant_mut(tenant_id)?;
        let previous = tenant.clients.insert(id.clone(), client);
        if let Some(occupancy) = self.occupancy.get_mut(tenant_id) {
            if let Some(old) = &previous {
                occupancy.remove(old.vpn_ip, &[], &old.public_key);
            }
            occupancy.add_client(id, vpn_ip, &public_key);
        }
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

    /// Removes a client.
    pub fn delete_client(&mut self, tenant_id: &Id, id: &Id) -> Result<Client, ControlError> {
        let tenant = self.tenant_mut(tenant_id)?;
        let c = tenant
            .clients
            .remove(id)
            .ok_or_else(|| ControlError::NoClient(id.to_string()))?;
        self.indices.free(c.index);
        if let Some(occupancy) = self.occupancy.get_mut(tenant_id) {
            occupancy.remove(c.vpn_ip, &[], &c.public_key);
        }
        Ok(c)
    }
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
        return Err(ControlError::AddressUnavailable {
            field,
            addr,
            reason: "network, broadcast or server address",
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
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ControlError::field(
            "name",
            "must be 1-128 characters without control characters",
        ));
    }
    Ok(name.to_owned())
}

/// The receiver indices of a tenant's routers and clients.
fn peer_indices(t: &Tenant) -> impl Iterator<Item = u32> + '_ {
    t.routers
        .values()
        .map(|r| r.index)
        .chain(t.clients.values().map(|c| c.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An egress policy: `pool` leaves through the one router `gateway`.
    fn egress(pool: &str, gateway: &str) -> EgressRequest {
        EgressRequest {
            pool: pool.into(),
            gateways: vec![gateway.into()],
        }
    }

    fn registry() -> Registry {
        Registry::new(
            AllocPolicy {
                first_port: 51820,
                supernet: "10.0.0.0/8".parse().unwrap(),
                subnet_prefix_len: 16,
                subnet_start: Ipv4Addr::new(10, 100, 0, 0),
            },
            7,
        )
    }
    fn id(s: &str) -> Id {
        Id::parse(s, "id").unwrap()
    }
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    /// A state the API built: tenant a with a router, a gateway, a pool and a
    /// client; tenant b with a router.
    fn built_state() -> Vec<Tenant> {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        for (t, p) in [("a", "r1"), ("a", "gw"), ("b", "r1")] {
            r.put_router(&id(t), &id(p), &Default::default()).unwrap();
        }
        let egress = egress("10.200.0.0/24", "gw");
        r.put_egress(&id("a"), &egress).unwrap();
        r.put_client(&id("a"), &id("phone"), &Default::default())
            .unwrap();
        r.tenants().cloned().collect()
    }

    fn restored(tenants: Vec<Tenant>) -> Result<Registry, ControlError> {
        Registry::restore(registry().policy, 9, tenants)
    }

    #[test]
    fn a_restored_state_is_checked_against_the_apis_rules() {
        assert!(restored(built_state()).is_ok());
        type Breakage = fn(&mut [Tenant]);
        let cases: [(&str, Breakage, &str); 9] = [
            (
                "subnet overlap",
                |t| t[1].subnet = "10.100.128.0/17".parse().unwrap(),
                "overlaps 10.100.0.0/16 of tenant a",
            ),
            (
                "pool overlap",
                |t| t[1].subnet = "10.200.0.0/16".parse().unwrap(),
                "overlaps 10.200.0.0/24 of tenant a",
            ),
            (
                "host prefix",
                |t| t[1].host_prefixes = vec!["10.200.0.0/25".parse().unwrap()],
                "host prefix 10.200.0.0/25 overlaps",
            ),
            (
                "router outside",
                |t| t[0].routers.get_mut(&id("r1")).unwrap().vpn_ip = Ipv4Addr::new(10, 101, 1, 9),
                "router r1 has 10.101.1.9",
            ),
            (
                "same address",
                |t| {
                    t[0].routers.get_mut(&id("r1")).unwrap().vpn_ip = t[0].routers[&id("gw")].vpn_ip
                },
                "both have",
            ),
            (
                "same key",
                |t| {
                    t[0].clients.get_mut(&id("phone")).unwrap().public_key =
                        t[0].routers[&id("gw")].public_key
                },
                "the same public key",
            ),
            (
                "missing gateway",
                |t| t[0].egress.as_mut().unwrap().gateways = vec![id("nobody")],
                "gateway nobody is not a router",
            ),
            (
                "client without pool",
                |t| {
                    t[0].egress = None;
                },
                "client phone exists without an egress policy",
            ),
            (
                "index out of range",
                |t| t[1].routers.get_mut(&id("r1")).unwrap().index = 0,
                "receiver index 0 of r1 is out of range",
            ),
        ];
        for (what, break_it, expected) in cases {
            let mut state = built_state();
            break_it(&mut state);
            match restored(state) {
                Err(ControlError::Inconsistent(why)) => {
                    assert!(why.contains(expected), "{what}: {why}")
                }
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: restored"),
            }
        }
        let mut state = built_state();
        let twice = state[0].routers[&id("r1")].index;
        state[1].routers.get_mut(&id("r1")).unwrap().index = twice;
        let Err(ControlError::Inconsistent(why)) = restored(state) else {
            panic!("index twice: restored");
        };
        assert!(why.contains("is used twice"), "{why}");
    }

    #[test]
    fn seed_allocation() {
        let mut r = registry();
        assert_eq!(
            r.put_tenant(&id("a"), &Default::default(), now()),
            Ok(Put::Created)
        );
        assert_eq!(
            r.put_tenant(&id("a"), &Default::default(), now()),
            Ok(Put::Updated)
        );
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        let a = r.tenant(&id("a")).unwrap();
        let b = r.tenant(&id("b")).unwrap();
        assert_eq!(
            (a.subnet.to_string(), a.listen_port),
            ("10.100.0.0/16".into(), 51820)
        );
        assert_eq!(
            (b.subnet.to_string(), b.listen_port),
            ("10.101.0.0/16".into(), 51821)
        );
        assert_eq!(
            (a.interface_name.as_str(), b.interface_name.as_str()),
            ("wg0", "wg1")
        );
        assert_eq!(a.server_ip(), Ipv4Addr::new(10, 100, 0, 1));
    }

    #[test]
    fn undoing_one_router_frees_its_address_and_key() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        let r1 = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
        // r2 is created, then its store write "fails" and it is undone.
        r.put_router(&id("a"), &id("r2"), &Default::default())
            .unwrap();
        let r2 = r.tenant(&id("a")).unwrap().routers[&id("r2")].clone();
        assert_eq!(r2.vpn_ip, Ipv4Addr::new(10, 100, 1, 2));
        r.reinstate_router(&id("a"), &id("r2"), None);
        assert!(!r.tenant(&id("a")).unwrap().routers.contains_key(&id("r2")));
        // Its address and key are free again; r1's are not.
        let reuse = RouterRequest {
            public_key: Some(keys::encode(r2.public_key.as_bytes())),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r3"), &reuse).unwrap();
        let r3 = &r.tenant(&id("a")).unwrap().routers[&id("r3")];
        assert_eq!(r3.vpn_ip, r2.vpn_ip);
        let dup = RouterRequest {
            public_key: Some(keys::encode(r1.public_key.as_bytes())),
            ..Default::default()
        };
        assert!(matches!(
            r.put_router(&id("a"), &id("r4"), &dup),
            Err(ControlError::DuplicateKey { .. })
        ));
        // An update undone puts the old router back, address and key included.
        let moved = RouterRequest {
            vpn_ip: Some("10.100.1.9".into()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &moved).unwrap();
        r.reinstate_router(&id("a"), &id("r1"), Some(r1.clone()));
        let back = RouterRequest {
            vpn_ip: Some("10.100.1.9".into()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r5"), &back).unwrap();
        let taken = RouterRequest {
            vpn_ip: Some("10.100.1.1".into()),
            ..Default::default()
        };
        assert!(r.put_router(&id("a"), &id("r6"), &taken).is_err());
        // Deleting frees the address for the next allocation.
        r.delete_router(&id("a"), &id("r1")).unwrap();
        r.put_router(&id("a"), &id("r7"), &Default::default())
            .unwrap();
        assert_eq!(
            r.tenant(&id("a")).unwrap().routers[&id("r7")].vpn_ip,
            Ipv4Addr::new(10, 100, 1, 1)
        );
    }

    #[test]
    fn a_single_address_a_router_routes_is_never_another_routers() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        let extra = |list: &[&str]| RouterRequest {
            allowed_ips: Some(list.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &extra(&["10.100.1.2/32"]))
            .unwrap();
        // Allocation skips it, and it cannot be asked for.
        r.put_router(&id("a"), &id("r2"), &Default::default())
            .unwrap();
        let r2 = r.tenant(&id("a")).unwrap().routers[&id("r2")].vpn_ip;
        assert_eq!(r2, Ipv4Addr::new(10, 100, 1, 3));
        let ask = RouterRequest {
            vpn_ip: Some("10.100.1.2".into()),
            ..Default::default()
        };
        assert!(matches!(
            r.put_router(&id("a"), &id("r3"), &ask),
            Err(ControlError::AddressUnavailable { .. })
        ));
        // Once r1 no longer routes it, it is free again.
        r.put_router(&id("a"), &id("r1"), &extra(&[])).unwrap();
        r.put_router(&id("a"), &id("r3"), &ask).unwrap();
        // The subnet's network and broadcast addresses are nobody's.
        for single in ["10.100.0.0/32", "10.100.255.255"] {
            assert!(
                matches!(
                    r.put_router(&id("a"), &id("r4"), &extra(&[single])),
                    Err(ControlError::AddressUnavailable { .. })
                ),
                "{single}"
            );
        }
    }

    #[test]
    fn routers_allocate_and_conflict() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        let r1 = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
        assert_eq!(r1.vpn_ip, Ipv4Addr::new(10, 100, 1, 1));
        assert!(r1.private_key.is_some());
        // Repeating the PUT keeps the generated key and the address.
        assert_eq!(
            r.put_router(&id("a"), &id("r1"), &Default::default()),
            Ok(Put::Updated)
        );
        let again = &r.tenant(&id("a")).unwrap().routers[&id("r1")];
        assert_eq!(again.public_key, r1.public_key);
        assert_eq!(again.index, r1.index);

        let dup = RouterRequest {
            public_key: Some(keys::encode(r1.public_key.as_bytes())),
            ..Default::default()
        };
        assert!(matches!(
            r.put_router(&id("a"), &id("r2"), &dup),
            Err(ControlError::DuplicateKey { .. })
        ));
        for (ip, field) in [
            ("10.100.1.1", "vpn_ip"),
            ("10.101.0.5", "vpn_ip"),
            ("10.100.0.1", "vpn_ip"),
        ] {
            let req = RouterRequest {
                vpn_ip: Some(ip.into()),
                ..Default::default()
            };
            let e = r.put_router(&id("a"), &id("r2"), &req).unwrap_err();
            assert_eq!(e.field_name(), Some(field), "{ip}: {e}");
        }
        let bad = RouterRequest {
            public_key: Some("nope".into()),
            ..Default::default()
        };
        assert_eq!(
            r.put_router(&id("a"), &id("r2"), &bad)
                .unwrap_err()
                .field_name(),
            Some("public_key")
        );
        assert!(!r.tenant(&id("a")).unwrap().routers.contains_key(&id("r2")));
    }

    #[test]
    fn what_the_host_routes_no_tunnel_may_hold_later() {
        let mut r = registry();
        let host = TenantRequest {
            host_prefixes: Some(vec![
                "10.201.0.0/16".into(),
                "10.102.0.0/16".into(),
                "fd00:1::/64".into(),
            ]),
            ..Default::default()
        };
        r.put_tenant(&id("a"), &host, now()).unwrap();
        r.put_router(&id("a"), &id("gw"), &Default::default())
            .unwrap();
        // Another tenant's pool or subnet inside a's host prefix is refused...
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        r.put_router(&id("b"), &id("gw"), &Default::default())
            .unwrap();
        let pool = |p: &str| egress(p, "gw");
        let e = r.put_egress(&id("b"), &pool("10.201.0.0/24")).unwrap_err();
        assert_eq!(e.field_name(), Some("pool"), "{e}");
        let e = r.put_egress(&id("a"), &pool("10.201.5.0/24")).unwrap_err();
        assert_eq!(e.field_name(), Some("pool"), "{e}");
        let subnet = TenantRequest {
            subnet: Some("10.201.128.0/17".into()),
            ..Default::default()
        };
        let e = r.put_tenant(&id("c"), &subnet, now()).unwrap_err();
        assert_eq!(e.field_name(), Some("subnet"), "{e}");
        // ... automatic allocation steps over it (10.100 and 10.101 are a's and b's) ...
        r.put_tenant(&id("d"), &Default::default(), now()).unwrap();
        assert_eq!(
            r.tenant(&id("d")).unwrap().subnet.to_string(),
            "10.103.0.0/16"
        );
        // ... and so does a router's extra prefix in the same tenant.
        let extra = RouterRequest {
            allowed_ips: Some(vec!["10.201.7.0/24".into()]),
            ..Default::default()
        };
        let e = r.put_router(&id("a"), &id("r1"), &extra).unwrap_err();
        assert_eq!(e.field_name(), Some("allowed_ips"), "{e}");
    }

    #[test]
    fn subnets_and_pools_are_ordinary_unicast() {
        let mut r = registry();
        for net in [
            "0.0.0.0/0",
            "127.0.0.0/24",
            "169.254.0.0/16",
            "224.0.0.0/24",
            "240.0.0.0/8",
        ] {
            let req = TenantRequest {
                subnet: Some(net.into()),
                ..Default::default()
            };
            let e = r.put_tenant(&id("a"), &req, now()).unwrap_err();
            assert_eq!(e.field_name(), Some("subnet"), "{net}: {e}");
        }
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("gw"), &Default::default())
            .unwrap();
        let req = egress("127.0.0.0/24", "gw");
        let e = r.put_egress(&id("a"), &req).unwrap_err();
        assert_eq!(e.field_name(), Some("pool"), "{e}");
    }

    #[test]
    fn a_smaller_pool_may_not_turn_a_client_into_its_network_address() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("gw"), &Default::default())
            .unwrap();
        let pool = |p: &str| egress(p, "gw");
        r.put_egress(&id("a"), &pool("10.200.0.0/23")).unwrap();
        let at = ClientRequest {
            vpn_ip: Some("10.200.1.0".into()),
            ..Default::default()
        };
        r.put_client(&id("a"), &id("p1"), &at).unwrap();
        assert!(matches!(
            r.put_egress(&id("a"), &pool("10.200.1.0/24")),
            Err(ControlError::InUse(_))
        ));
    }

    #[test]
    fn undone_deletions_hold_their_receiver_indices_again() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        let index = r.tenant(&id("a")).unwrap().routers[&id("r1")].index;
        let t = r.delete_tenant(&id("a")).unwrap();
        assert_eq!(r.indices.in_use(), 0);
        r.reinstate(&id("a"), Some(t));
        assert_eq!(r.indices.in_use(), 1);
        assert!(!r.indices.reserve(index), "held again");

        let gone = r.delete_router(&id("a"), &id("r1")).unwrap();
        assert_eq!(r.indices.in_use(), 0);
        r.reinstate_router(&id("a"), &id("r1"), Some(gone));
        assert!(!r.indices.reserve(index), "held again");

        // A tenant whose creation is undone takes nothing with it but itself.
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        r.reinstate(&id("b"), None);
        assert_eq!(r.indices.in_use(), 1);
        assert!(r.tenant(&id("b")).is_err());
    }

    #[test]
    fn peers_are_found_by_key_through_the_index_and_without_it() {
        fn found(r: &Registry, key: &PublicKey) -> Option<(bool, String)> {
            match r.peer_with_key(&id("a"), key.as_bytes())? {
                PeerWithKey::Router(x) => Some((true, x.id.to_string())),
                PeerWithKey::Client(x) => Some((false, x.id.to_string())),
            }
        }
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        r.put_egress(&id("a"), &egress("10.200.0.0/24", "r1"))
            .unwrap();
        r.put_client(&id("a"), &id("p1"), &Default::default())
            .unwrap();
        let t = r.tenant(&id("a")).unwrap();
        let (router, client) = (t.routers[&id("r1")].clone(), t.clients[&id("p1")].clone());
        let stranger = SecretKey::generate().public();
        let expect = |r: &Registry| {
            assert_eq!(found(r, &router.public_key), Some((true, "r1".into())));
            assert_eq!(found(r, &client.public_key), Some((false, "p1".into())));
            assert_eq!(found(r, &stranger), None);
            assert!(r
                .router_with_key(&id("a"), client.public_key.as_bytes())
                .is_none());
            assert!(r
                .peer_with_key(&id("b"), router.public_key.as_bytes())
                .is_none());
        };
        assert!(r.occupancy.contains_key(&id("a")), "through the index");
        expect(&r);
        // An undone change drops the index until the next change rebuilds it.
        r.reinstate_client(&id("a"), &id("p1"), Some(client.clone()));
        assert!(!r.occupancy.contains_key(&id("a")), "by a scan");
        expect(&r);
        // A new key: the old one belongs to nobody, through the index too.
        let rekey = ClientRequest {
            public_key: Some(keys::encode(stranger.as_bytes())),
            ..Default::default()
        };
        r.put_client(&id("a"), &id("p1"), &rekey).unwrap();
        assert_eq!(found(&r, &client.public_key), None);
        assert_eq!(found(&r, &stranger), Some((false, "p1".into())));
        r.delete_router(&id("a"), &id("r1")).unwrap_err();
        r.delete_client(&id("a"), &id("p1")).unwrap();
        assert_eq!(found(&r, &stranger), None);
    }

    #[test]
    fn a_router_keeps_where_it_was_heard_from_until_its_key_changes() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        let heard_at = "203.0.113.2:34280".parse().unwrap();
        r.set_router_endpoint(&id("a"), &id("r1"), heard_at)
            .unwrap();
        let key = *r.tenant(&id("a")).unwrap().routers[&id("r1")]
            .public_key
            .as_bytes();
        assert_eq!(
            r.router_with_key(&id("a"), &key).map(|r| r.endpoint),
            Some(Some(heard_at))
        );
        let (config, _) = r.tenant(&id("a")).unwrap().routers[&id("r1")].peer_config(None);
        assert_eq!(config.endpoint, Some(heard_at), "the data plane gets it");

        // Renamed, same key: same device, same place.
        let rename = RouterRequest {
            name: Some("branch".into()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &rename).unwrap();
        assert_eq!(
            r.tenant(&id("a")).unwrap().routers[&id("r1")].endpoint,
            Some(heard_at)
        );
        // A new key is a new device: nobody knows where it is yet.
        let rekey = RouterRequest {
            public_key: Some(keys::encode(SecretKey::generate().public().as_bytes())),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &rekey).unwrap();
        assert_eq!(
            r.tenant(&id("a")).unwrap().routers[&id("r1")].endpoint,
            None
        );
        assert!(r.router_with_key(&id("a"), &key).is_none());
        assert!(r
            .set_router_endpoint(&id("a"), &id("gone"), heard_at)
            .is_err());
    }

    #[test]
    fn a_new_key_takes_a_new_receiver_index_and_an_undo_gives_the_old_one_back() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("r1"), &Default::default())
            .unwrap();
        let before = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
        let fresh = || keys::encode(SecretKey::generate().public().as_bytes());
        let rekey = RouterRequest {
            public_key: Some(fresh()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("r1"), &rekey).unwrap();
        let after = r.tenant(&id("a")).unwrap().routers[&id("r1")].clone();
        assert_ne!(after.index, before.index);
        assert_eq!(r.indices.in_use(), 1, "the old index is freed");
        assert!(r.indices.reserve(before.index), "free");
        r.indices.free(before.index);
        // The store refused the change: the old router and its index come back,
        // the new index is free again.
        r.reinstate_router(&id("a"), &id("r1"), Some(before.clone()));
        let back = &r.tenant(&id("a")).unwrap().routers[&id("r1")];
        assert_eq!(
            (back.public_key, back.index),
            (before.public_key, before.index)
        );
        assert_eq!(r.indices.in_use(), 1);
        assert!(!r.indices.reserve(before.index), "held again");
        assert!(r.indices.reserve(after.index), "free again");
        r.indices.free(after.index);

        // Clients alike.
        r.put_egress(&id("a"), &egress("10.200.0.0/24", "r1"))
            .unwrap();
        r.put_client(&id("a"), &id("p1"), &Default::default())
            .unwrap();
        let before = r.tenant(&id("a")).unwrap().clients[&id("p1")].clone();
        let rekey = ClientRequest {
            public_key: Some(fresh()),
            ..Default::default()
        };
        r.put_client(&id("a"), &id("p1"), &rekey).unwrap();
        let after = r.tenant(&id("a")).unwrap().clients[&id("p1")].clone();
        assert_ne!(after.index, before.index);
        assert_eq!(r.indices.in_use(), 2);
        r.reinstate_client(&id("a"), &id("p1"), Some(before.clone()));
        let back = &r.tenant(&id("a")).unwrap().clients[&id("p1")];
        assert_eq!(
            (back.public_key, back.index),
            (before.public_key, before.index)
        );
        assert_eq!(r.indices.in_use(), 2);
        assert!(r.indices.reserve(after.index), "free again");
        // The same key again keeps the index.
        r.indices.free(after.index);
        let same = ClientRequest {
            public_key: Some(keys::encode(before.public_key.as_bytes())),
            ..Default::default()
        };
        r.put_client(&id("a"), &id("p1"), &same).unwrap();
        assert_eq!(
            r.tenant(&id("a")).unwrap().clients[&id("p1")].index,
            before.index
        );
    }

    #[test]
    fn a_clients_dns_list_is_short_and_without_repeats() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_router(&id("a"), &id("gw"), &Default::default())
            .unwrap();
        r.put_egress(&id("a"), &egress("10.200.0.0/24", "gw"))
            .unwrap();
        let dns = |list: Vec<String>| ClientRequest {
            dns: Some(list),
            ..Default::default()
        };
        let many: Vec<String> = (0..60).map(|i| format!("2001:db8::{i:x}")).collect();
        let e = r.put_client(&id("a"), &id("p1"), &dns(many)).unwrap_err();
        assert_eq!(e.field_name(), Some("dns"), "{e}");
        let twice = vec!["1.1.1.1".to_string(); 20];
        r.put_client(&id("a"), &id("p1"), &dns(twice)).unwrap();
        assert_eq!(r.tenant(&id("a")).unwrap().clients[&id("p1")].dns.len(), 1);
    }

    #[test]
    fn egress_and_clients() {
        let mut r = registry();
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        let gw = RouterRequest {
            vpn_ip: Some("10.100.0.40".into()),
            ..Default::default()
        };
        r.put_router(&id("a"), &id("gw"), &gw).unwrap();
        assert_eq!(
            r.put_client(&id("a"), &id("p1"), &Default::default()),
            Err(ControlError::NoEgress)
        );
        let req = egress("10.200.0.0/24", "gw");
        assert_eq!(r.put_egress(&id("a"), &req), Ok(Put::Created));
        r.put_client(&id("a"), &id("p1"), &Default::default())
            .unwrap();
        assert_eq!(
            r.tenant(&id("a")).unwrap().clients[&id("p1")].vpn_ip,
            Ipv4Addr::new(10, 200, 0, 2)
        );
        assert!(matches!(
            r.delete_egress(&id("a")),
            Err(ControlError::InUse(_))
        ));
        assert!(matches!(
            r.delete_router(&id("a"), &id("gw")),
            Err(ControlError::InUse(_))
        ));
        // Another tenant can neither take the pool nor get a subnet overlapping it.
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        assert!(matches!(
            r.put_egress(&id("b"), &req),
            Err(ControlError::Overlap { field: "pool", .. })
        ));
        let overlapping = TenantRequest {
            subnet: Some("10.200.0.0/16".into()),
            ..Default::default()
        };
        assert!(matches!(
            r.put_tenant(&id("c"), &overlapping, now()),
            Err(ControlError::Overlap {
                field: "subnet",
                ..
            })
        ));
    }

    #[test]
    fn subnet_exhaustion_is_a_clear_error() {
        let mut r = Registry::new(
            AllocPolicy {
                first_port: 51820,
                supernet: "10.100.0.0/15".parse().unwrap(),
                subnet_prefix_len: 16,
                subnet_start: Ipv4Addr::new(10, 100, 0, 0),
            },
            1,
        );
        r.put_tenant(&id("a"), &Default::default(), now()).unwrap();
        r.put_tenant(&id("b"), &Default::default(), now()).unwrap();
        let e = r
            .put_tenant(&id("c"), &Default::default(), now())
            .unwrap_err();
        assert_eq!(e.code(), "exhausted");
        assert!(e.to_string().contains("10.100.0.0/15"), "{e}");
    }
}
