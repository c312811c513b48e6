//! Reading the state back: every tenant with its routers, forwards, egress
//! policy and clients, private keys opened with the master key.
//!
//! A row that cannot be turned back into an object (a damaged key, address or
//! time, a peer of no tenant) fails the load with an error that names the row and
//! the field; nothing is guessed. Leaves out writing (`write`) and checking what
//! the objects mean together (the registry's restore).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use boringtun::x25519::PublicKey;
use ipnet::IpNet;

use super::{corrupt, Store, StoreError};
use crate::control::model::{Client, EgressPolicy, Id, Router, Tenant};
use crate::core::peer::canonical_endpoint;
use crate::keys::{self, PresharedKey, SecretKey};

/// A private key as stored: sealed, or absent when the peer's owner holds it.
type Sealed = Option<Vec<u8>>;

/// tenant_id, id, name, public_key, private_key, vpn_ip, extra_prefixes,
/// receiver_index, endpoint, preshared_key.
type RouterRow = (
    String,
    String,
    String,
    String,
    Sealed,
    String,
    String,
    u32,
    Option<String>,
    Sealed,
);

/// tenant_id, id, name, public_key, private_key, vpn_ip, dns, receiver_index,
/// preshared_key.
type ClientRow = (
    String,
    String,
    String,
    String,
    Sealed,
    String,
    String,
    u32,
    Sealed,
);

impl Store {
    /// Loads every tenant with its peers and policy.
    pub fn load(&self) -> Result<Vec<Tenant>, StoreError> {
        let mut tenants = self.tenants()?;
        self.routers(&mut tenants)?;
        self.clients(&mut tenants)?;
        self.forwards(&mut tenants)?;
        self.egress(&mut tenants)?;
        Ok(tenants.into_values().collect())
    }

    /// The tenants' own rows, without peers or policy.
    fn tenants(&self) -> Result<BTreeMap<Id, Tenant>, StoreError> {
        let mut tenants = BTreeMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT id, interface_name, private_key, subnet, listen_port, created_at_ms, host_prefixes FROM tenants",
        )?;
        let rows = stmt.query_map([], |r| {
            <(String, String, Vec<u8>, String, u16, i64, String)>::try_from(r)
        })?;
        for row in rows {
            let (id, interface_name, sealed, subnet, listen_port, created, host) = row?;
            let row_name = format!("tenant/{id}");
            let id = parse_id(&id, &row_name)?;
            let secret = SecretKey::from_bytes(
                self.master
                    .open_key(&sealed, &row_name)
                    .map_err(|e| corrupt(&row_name, &format!("private_key ({e})")))?,
            );
            let tenant = Tenant {
                interface_name,
                public_key: secret.public(),
                secret,
                subnet: subnet.parse().map_err(|_| corrupt(&row_name, "subnet"))?,
                listen_port,
                created_at: created_at(created)
                    .ok_or_else(|| corrupt(&row_name, "created_at_ms"))?,
                routers: BTreeMap::new(),
                clients: BTreeMap::new(),
                egress: None,
                host_prefixes: serde_json::from_str::<Vec<IpNet>>(&host)
                    .map_err(|_| corrupt(&row_name, "host_prefixes"))?,
                id: id.clone(),
            };
            tenants.insert(id, tenant);
        }
        Ok(tenants)
    }

    /// Adds the routers to their tenants.
    fn routers(&self, tenants: &mut BTreeMap<Id, Tenant>) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT tenant_id, id, name, public_key, private_key, vpn_ip, extra_prefixes, receiver_index, endpoint, preshared_key FROM routers",
        )?;
        let rows = stmt.query_map([], |r| RouterRow::try_from(r))?;
        for row in rows {
            let (tid, id, name, public, sealed, vpn_ip, extra, index, endpoint, psk) = row?;
            let row_name = format!("router/{tid}/{id}");
            let router = Router {
                id: parse_id(&id, &row_name)?,
                name,
                public_key: parse_public(&public, &row_name)?,
                private_key: self.open_optional(sealed, &row_name)?,
                vpn_ip: vpn_ip.parse().map_err(|_| corrupt(&row_name, "vpn_ip"))?,
                extra_prefixes: serde_json::from_str::<Vec<IpNet>>(&extra)
                    .map_err(|_| corrupt(&row_name, "extra_prefixes"))?,
                index,
                forwards: BTreeMap::new(),
                endpoint: endpoint
                    .map(|e| e.parse().map(canonical_endpoint))
                    .transpose()
                    .map_err(|_| corrupt(&row_name, "endpoint"))?,
                preshared_key: self.open_psk(psk, &row_name)?,
            };
            tenant_of(tenants, &tid, &row_name)?
                .routers
                .insert(router.id.clone(), router);
        }
        Ok(())
    }

    /// Adds the clients to their tenants.
    fn clients(&self, tenants: &mut BTreeMap<Id, Tenant>) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT tenant_id, id, name, public_key, private_key, vpn_ip, dns, receiver_index, preshared_key FROM clients",
        )?;
        let rows = stmt.query_map([], |r| ClientRow::try_from(r))?;
        for row in rows {
            let (tid, id, name, public, sealed, vpn_ip, dns, index, psk) = row?;
            let row_name = format!("client/{tid}/{id}");
            let client = Client {
                id: parse_id(&id, &row_name)?,
                name,
                public_key: parse_public(&public, &row_name)?,
                private_key: self.open_optional(sealed, &row_name)?,
                vpn_ip: vpn_ip.parse().map_err(|_| corrupt(&row_name, "vpn_ip"))?,
                dns: serde_json::from_str::<Vec<IpAddr>>(&dns)
                    .map_err(|_| corrupt(&row_name, "dns"))?,
                index,
                preshared_key: self.open_psk(psk, &row_name)?,
            };
            tenant_of(tenants, &tid, &row_name)?
                .clients
                .insert(client.id.clone(), client);
        }
        Ok(())
    }

    /// Adds the management forwards to their routers.
    fn forwards(&self, tenants: &mut BTreeMap<Id, Tenant>) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT tenant_id, router_id, port, listen FROM forwards")?;
        let rows = stmt.query_map([], |r| <(String, String, u16, String)>::try_from(r))?;
        for row in rows {
            let (tid, rid, port, listen) = row?;
            let row_name = format!("forward/{tid}/{rid}/{port}");
            let listen = listen.parse().map_err(|_| corrupt(&row_name, "listen"))?;
            let rid = parse_id(&rid, &row_name)?;
            tenant_of(tenants, &tid, &row_name)?
                .routers
                .get_mut(&rid)
                .ok_or_else(|| corrupt(&row_name, "router_id (no such router)"))?
                .forwards
                .insert(port, listen);
        }
        Ok(())
    }

    /// Sets the tenants' egress policies.
    fn egress(&self, tenants: &mut BTreeMap<Id, Tenant>) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT tenant_id, pool, gateways FROM egress")?;
        let rows = stmt.query_map([], |r| <(String, String, String)>::try_from(r))?;
        for row in rows {
            let (tid, pool, gateways) = row?;
            let row_name = format!("egress/{tid}");
            let gateways = serde_json::from_str::<Vec<String>>(&gateways)
                .map_err(|_| corrupt(&row_name, "gateways"))?
                .iter()
                .map(|g| parse_id(g, &row_name))
                .collect::<Result<Vec<_>, _>>()?;
            let policy = EgressPolicy {
                pool: pool.parse().map_err(|_| corrupt(&row_name, "pool"))?,
                gateways,
            };
            tenant_of(tenants, &tid, &row_name)?.egress = Some(policy);
        }
        Ok(())
    }

    /// A peer's preshared key, sealed under `<context>/psk`.
    fn open_psk(
        &self,
        sealed: Option<Vec<u8>>,
        context: &str,
    ) -> Result<Option<PresharedKey>, StoreError> {
        sealed
            .map(|s| {
                self.master
                    .open_key(&s, &super::psk_context(context))
                    .map(PresharedKey::from_bytes)
                    .map_err(|e| corrupt(context, &format!("preshared_key ({e})")))
            })
            .transpose()
    }

    fn open_optional(
        &self,
        sealed: Option<Vec<u8>>,
        context: &str,
    ) -> Result<Option<SecretKey>, StoreError> {
        sealed
            .map(|s| {
                self.master
                    .open_key(&s, context)
                    .map(SecretKey::from_bytes)
                    .map_err(|e| corrupt(context, &format!("private_key ({e})")))
            })
            .transpose()
    }
}

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const LAST_CREATED_MS: i64 = 253_402_300_799_999;

/// A creation time as stored (milliseconds since 1970), if it is one this
/// appliance could have written and the API can show.
fn created_at(ms: i64) -> Option<SystemTime> {
    (0..=LAST_CREATED_MS)
        .contains(&ms)
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64))
}

fn parse_id(text: &str, row: &str) -> Result<Id, StoreError> {
    Id::parse(text, "id").map_err(|_| corrupt(row, "id"))
}

fn parse_public(text: &str, row: &str) -> Result<PublicKey, StoreError> {
    keys::decode(text)
        .map(PublicKey::from)
        .map_err(|_| corrupt(row, "public_key"))
}

fn tenant_of<'a>(
    tenants: &'a mut BTreeMap<Id, Tenant>,
    tid: &str,
    row: &str,
) -> Result<&'a mut Tenant, StoreError> {
    let id = parse_id(tid, row)?;
    tenants
        .get_mut(&id)
        .ok_or_else(|| corrupt(row, "tenant_id (no such tenant)"))
}
