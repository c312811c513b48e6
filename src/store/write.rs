//! Writing one change as SQL inside the caller's transaction.
//!
//! Rows are upserted, never `REPLACE`d: a `REPLACE` deletes the row first and,
//! by cascade, what hangs off it (a router's forwards). Private keys are sealed
//! with the master key, bound to the row they belong to. Leaves out the
//! transaction itself (`Store::apply` commits it) and reading back (`load`).

use std::time::SystemTime;

use rusqlite::{params, Transaction};

use super::{Change, MasterKey, StoreError};
use crate::control::model::Id;
use crate::keys;

/// Writes `change` in `tx`.
pub(super) fn apply_one(
    tx: &Transaction<'_>,
    master: &MasterKey,
    change: &Change<'_>,
) -> Result<(), StoreError> {
    match change {
        Change::Tenant(t) => {
            let context = format!("tenant/{}", t.id);
            let created = t
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            tx.execute(
                "INSERT INTO tenants (id, interface_name, private_key, public_key, subnet, listen_port, created_at_ms, host_prefixes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET interface_name = ?2, private_key = ?3, public_key = ?4,
                   subnet = ?5, listen_port = ?6, created_at_ms = ?7, host_prefixes = ?8",
                params![
                    t.id.as_str(),
                    t.interface_name,
                    master.seal(&t.secret.secret().to_bytes(), &context),
                    keys::encode(t.public_key.as_bytes()),
                    t.subnet.to_string(),
                    t.listen_port,
                    created,
                    serde_json::to_string(&t.host_prefixes).unwrap_or_else(|_| "[]".into())
                ],
            )?;
        }
        Change::DeleteTenant(id) => {
            tx.execute("DELETE FROM tenants WHERE id = ?1", [id.as_str()])?;
        }
        Change::Router(tid, r) => {
            let context = format!("router/{tid}/{}", r.id);
            let sealed = r
                .private_key
                .as_ref()
                .map(|k| master.seal(&k.secret().to_bytes(), &context));
            let psk = sealed_psk(master, r.preshared_key.as_ref(), &context);
            // An upsert, not REPLACE: a REPLACE deletes the row first, and with it
            // (by cascade) the router's forwards.
            tx.execute(
                "INSERT INTO routers
                   (tenant_id, id, name, public_key, private_key, vpn_ip, extra_prefixes, receiver_index, endpoint, preshared_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(tenant_id, id) DO UPDATE SET name = ?3, public_key = ?4,
                   private_key = ?5, vpn_ip = ?6, extra_prefixes = ?7, receiver_index = ?8,
                   endpoint = ?9, preshared_key = ?10",
                params![
                    tid.as_str(),
                    r.id.as_str(),
                    r.name,
                    keys::encode(r.public_key.as_bytes()),
                    sealed,
                    r.vpn_ip.to_string(),
                    serde_json::to_string(&r.extra_prefixes).unwrap_or_else(|_| "[]".into()),
                    r.index,
                    r.endpoint.map(|e| e.to_string()),
                    psk
                ],
            )?;
        }
        Change::DeleteRouter(tid, id) => {
            tx.execute(
                "DELETE FROM routers WHERE tenant_id = ?1 AND id = ?2",
                [tid.as_str(), id.as_str()],
            )?;
        }
        Change::Egress(tid, policy) => match policy {
            Some(p) => {
                let gateways: Vec<&str> = p.gateways.iter().map(Id::as_str).collect();
                tx.execute(
                    "INSERT OR REPLACE INTO egress (tenant_id, pool, gateways) VALUES (?1, ?2, ?3)",
                    params![
                        tid.as_str(),
                        p.pool.to_string(),
                        serde_json::to_string(&gateways).unwrap_or_else(|_| "[]".into())
                    ],
                )?;
            }
            None => {
                tx.execute("DELETE FROM egress WHERE tenant_id = ?1", [tid.as_str()])?;
            }
        },
        Change::Client(tid, c) => {
            let context = format!("client/{tid}/{}", c.id);
            let sealed = c
                .private_key
                .as_ref()
                .map(|k| master.seal(&k.secret().to_bytes(), &context));
            let psk = sealed_psk(master, c.preshared_key.as_ref(), &context);
            let dns: Vec<String> = c.dns.iter().map(ToString::to_string).collect();
            tx.execute(
                "INSERT INTO clients
                   (tenant_id, id, name, public_key, private_key, vpn_ip, dns, receiver_index, preshared_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(tenant_id, id) DO UPDATE SET name = ?3, public_key = ?4,
                   private_key = ?5, vpn_ip = ?6, dns = ?7, receiver_index = ?8,
                   preshared_key = ?9",
                params![
                    tid.as_str(),
                    c.id.as_str(),
                    c.name,
                    keys::encode(c.public_key.as_bytes()),
                    sealed,
                    c.vpn_ip.to_string(),
                    serde_json::to_string(&dns).unwrap_or_else(|_| "[]".into()),
                    c.index,
                    psk
                ],
            )?;
        }
        Change::Forward(tid, rid, port, listen) => {
            tx.execute(
                "INSERT INTO forwards (tenant_id, router_id, port, listen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(tenant_id, router_id, port) DO UPDATE SET listen = ?4",
                params![tid.as_str(), rid.as_str(), port, listen.to_string()],
            )?;
        }
        Change::DeleteForward(tid, rid, port) => {
            tx.execute(
                "DELETE FROM forwards WHERE tenant_id = ?1 AND router_id = ?2 AND port = ?3",
                params![tid.as_str(), rid.as_str(), port],
            )?;
        }
        Change::DeleteClient(tid, id) => {
            tx.execute(
                "DELETE FROM clients WHERE tenant_id = ?1 AND id = ?2",
                [tid.as_str(), id.as_str()],
            )?;
        }
    }
    Ok(())
}

/// A peer's preshared key sealed under `<context>/psk`, apart from its private
/// key's context.
fn sealed_psk(
    master: &MasterKey,
    psk: Option<&crate::keys::PresharedKey>,
    context: &str,
) -> Option<Vec<u8>> {
    psk.map(|k| master.seal(&k.to_bytes(), &super::psk_context(context)))
}
