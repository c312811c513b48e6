//! KTN: a tenant's egress policy (the pool and its gateway routers) and the
//! clients (phones) that get their addresses from that pool.
//!
//! Left out: what happens to the phones' packets (the egress rule is
//! [`crate::core::policy`]'s) and their configs and QR codes
//! ([`crate::control::render`]).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{key_and_address, parse_v4_net, validate_name, AddressRange, Put, Registry, MAX_DNS};
use crate::control::error::ControlError;
use crate::control::model::{Client, ClientRequest, EgressPolicy, EgressRequest, Id};
use crate::control::occupancy::Occupancy;
use crate::core::alloc;
use crate::core::peer::PeerKind;
use crate::keys::{self, SecretKey};

impl Registry {
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
        let range = AddressRange {
            net: egress.pool,
            // .1 of the pool stays free for the gateway side.
            first: 2,
            server: tenant.server_ip(),
            server_key: tenant.public_key,
        };
        let (public_key, private_key, vpn_ip) = key_and_address(
            occupancy,
            (PeerKind::Client, id),
            range,
            (req.public_key.as_deref(), req.vpn_ip.as_deref()),
            existing.map(|c| (c.public_key, &c.private_key, c.vpn_ip)),
        )?;
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
        let preshared_key = super::preshared_key(
            req.preshared_key.as_deref(),
            existing.and_then(|c| c.preshared_key.as_ref()),
            existing.is_some_and(|c| c.public_key != public_key),
        )?;
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
            preshared_key,
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

    /// Gives client `id` a key pair generated here, keeping its address, name
    /// and DNS: the old key (a lost phone's) stops working, and the new config
    /// and QR code carry the new private key.
    pub fn new_client_key(&mut self, tenant_id: &Id, id: &Id) -> Result<(), ControlError> {
        if !self.tenant(tenant_id)?.clients.contains_key(id) {
            return Err(ControlError::NoClient(id.to_string()));
        }
        let secret = SecretKey::generate();
        let req = ClientRequest {
            public_key: Some(keys::encode(secret.public().as_bytes())),
            ..Default::default()
        };
        self.put_client(tenant_id, id, &req)?;
        let client = self
            .tenant_mut(tenant_id)?
            .clients
            .get_mut(id)
            .ok_or_else(|| ControlError::NoClient(id.to_string()))?;
        client.private_key = Some(secret);
        Ok(())
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
