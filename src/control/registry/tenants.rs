//! Tenants: a tunnel's port, subnet, key pair and host prefixes, checked against
//! every other tenant's. Peers are in `routers` and `clients`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use ipnet::IpNet;

use super::{parse_v4_net, peer_indices, Put, Registry};
use crate::control::error::ControlError;
use crate::control::model::{Id, Tenant, TenantRequest};
use crate::control::occupancy::Occupancy;
use crate::core::alloc;
use crate::keys::SecretKey;

impl Registry {
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
        let secret = req
            .private_key
            .as_deref()
            .map(|text| {
                SecretKey::parse(text)
                    .map_err(|e| ControlError::field("private_key", e.to_string()))
            })
            .transpose()?;
        if let Some(t) = self.tenants.get(id) {
            if secret
                .as_ref()
                .is_some_and(|s| s.public().as_bytes() != t.public_key.as_bytes())
            {
                return Err(ControlError::Immutable {
                    field: "private_key",
                    current: format!(
                        "the key of public key {}",
                        crate::keys::encode(t.public_key.as_bytes())
                    ),
                });
            }
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

        if let Some(public) = secret.as_ref().map(SecretKey::public) {
            if let Some(other) = self
                .tenants
                .values()
                .find(|t| t.public_key.as_bytes() == public.as_bytes())
            {
                return Err(ControlError::DuplicateTunnelKey {
                    tenant: other.id.to_string(),
                });
            }
        }
        let listen_port = match req.listen_port {
            Some(0) => return Err(ControlError::field("listen_port", "must not be 0")),
            Some(p) if self.tenants.values().any(|t| t.listen_port == p) => {
                return Err(ControlError::PortInUse(p))
            }
            Some(p) => p,
            None => self.free_port(&BTreeSet::new())?,
        };
        let subnet = match subnet {
            Some(s) => {
                if s.prefix_len() > 30 {
                    return Err(ControlError::field("subnet", "must be /30 or larger"));
                }
                self.check_free(s, "subnet", None)?;
                let own = host_prefixes.iter().flatten();
                if let Some(host) = own.copied().find(|h| alloc::overlaps(*h, IpNet::V4(s))) {
                    return Err(ControlError::field(
                        "host_prefixes",
                        format!("{host} overlaps the tenant's own subnet {s}"),
                    ));
                }
                s
            }
            None => {
                // The request's own host prefixes are as taken as the others'.
                let taken: Vec<IpNet> = self
                    .taken_nets(None)
                    .into_iter()
                    .chain(self.host_nets())
                    .map(IpNet::V4)
                    .chain(host_prefixes.iter().flatten().copied())
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
        let secret = secret.unwrap_or_else(SecretKey::generate);
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
        self.occupancy.insert(id.clone(), Occupancy::default());
        Ok(Put::Created)
    }

    /// The first port of the configured range that no tenant holds and that
    /// is not in `skip` (ports found bound by other programs).
    pub fn free_port(&self, skip: &BTreeSet<u16>) -> Result<u16, ControlError> {
        let mut used: BTreeSet<u16> = self.tenants.values().map(|t| t.listen_port).collect();
        used.extend(skip);
        Ok(alloc::next_port(
            self.policy.first_port,
            self.policy.last_port,
            &used,
        )?)
    }

    /// Host prefixes must not overlap any tenant's subnet or pool, the tenants'
    /// IPv6 networks, nor a prefix behind one of this tenant's routers: each
    /// address has one place to go.
    fn parse_host_prefixes(&self, id: &Id, list: &[String]) -> Result<Vec<IpNet>, ControlError> {
        let field = "host_prefixes";
        let mut out = Vec::with_capacity(list.len());
        for text in list {
            let net: IpNet = text
                .parse()
                .map_err(|_| ControlError::field(field, format!("{text:?} is not a prefix")))?;
            let net = net.trunc();
            // The host's own loopback, link-local or multicast ranges are no
            // network a router should reach through the host.
            if let Some(special) = super::special_nets().find(|s| alloc::overlaps(net, *s)) {
                return Err(ControlError::field(
                    field,
                    format!("{net} overlaps {special}, which is not ordinary unicast"),
                ));
            }
            let clash = self
                .taken_nets(None)
                .into_iter()
                .map(IpNet::V4)
                .chain([IpNet::V6(alloc::TENANT_RANGE_V6)])
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
}
