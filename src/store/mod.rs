//! Durable state: every tenant, router, egress policy and client, in SQLite.
//!
//! SQLite (bundled, so no system library is needed) because it is a single file an
//! operator can open with `sqlite3` to look, its transactions survive `kill -9` and
//! power loss in WAL mode with `synchronous=FULL`, and migrations are plain SQL keyed
//! by `PRAGMA user_version`. Each API call is one transaction, committed before the
//! call answers. Private keys are sealed with the master key (`seal`).
//!
//! The store is written on the control path only, never per packet.

pub mod backup;
pub mod files;
pub mod schema;
pub mod seal;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use boringtun::x25519::PublicKey;
use ipnet::IpNet;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::control::model::{Client, EgressPolicy, Id, Router, Tenant};
use crate::keys::{self, SecretKey};
pub use seal::{MasterKey, SealError};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer wgplane.
    #[error("state database has schema version {found}, this wgplane knows up to {known}")]
    TooNew { found: i64, known: i64 },
    /// The master key does not open this state.
    #[error(
        "the master key does not match this state directory ({0}); use the key it was created with"
    )]
    WrongMasterKey(SealError),
    /// A previous write panicked half-way; the connection is not trusted any more.
    #[error("state database handle is poisoned by an earlier panic")]
    Poisoned,
    /// A row could not be turned back into an object.
    #[error("corrupt row {row}: {reason}")]
    Corrupt { row: String, reason: String },
}

const KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAIN: &[u8] = b"wgplane master key check v1";

/// One change inside a transaction.
pub enum Change<'a> {
    /// Insert or replace the tenant's own row (not its peers).
    Tenant(&'a Tenant),
    /// Delete the tenant and, by cascade, its peers and policy.
    DeleteTenant(&'a Id),
    /// Insert or replace a router.
    Router(&'a Id, &'a Router),
    /// Delete a router.
    DeleteRouter(&'a Id, &'a Id),
    /// Set or clear the egress policy.
    Egress(&'a Id, Option<&'a EgressPolicy>),
    /// Insert or replace a client.
    Client(&'a Id, &'a Client),
    /// Delete a client.
    DeleteClient(&'a Id, &'a Id),
    /// Insert or replace a forward (tenant, router, port, listen).
    Forward(&'a Id, &'a Id, u16, std::net::SocketAddr),
    /// Delete a forward.
    DeleteForward(&'a Id, &'a Id, u16),
}

/// The open state database.
pub struct Store {
    conn: Connection,
    master: MasterKey,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it, and checks
    /// that `master` is the key it was created with.
    pub fn open(path: &Path, master: MasterKey) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The key is checked before any migration, so that a wrong key leaves an
        // older state as it was (version 0 has no key check yet).
        let version = user_version(&conn)?;
        if version > schema::VERSION {
            return Err(StoreError::TooNew {
                found: version,
                known: schema::VERSION,
            });
        }
        if version >= 1 {
            check_master_key(&conn, &master)?;
        }
        migrate(&mut conn)?;
        check_master_key(&conn, &master)?;
        Ok(Self { conn, master })
    }

    /// True when the database holds no tenant yet.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))?;
        Ok(n == 0)
    }

    /// Applies changes in one transaction, durable when this returns.
    pub fn apply(&mut self, changes: &[Change<'_>]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for change in changes {
            apply_one(&tx, &self.master, change)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Loads every tenant with its peers and policy.
    pub fn load(&self) -> Result<Vec<Tenant>, StoreError> {
        let mut tenants = BTreeMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT id, interface_name, private_key, subnet, listen_port, created_at_ms, host_prefixes FROM tenants",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u16>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
            ))
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

        let mut stmt = self.conn.prepare(
            "SELECT tenant_id, id, name, public_key, private_key, vpn_ip, extra_prefixes, receiver_index, endpoint FROM routers",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, u32>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?;
        for row in rows {
            let (tid, id, name, public, sealed, vpn_ip, extra, index, endpoint) = row?;
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
                    .map(|e| e.parse())
                    .transpose()
                    .map_err(|_| corrupt(&row_name, "endpoint"))?,
            };
            tenant_of(&mut tenants, &tid, &row_name)?
                .routers
                .insert(router.id.clone(), router);
        }

        let mut stmt = self.conn.prepare(
            "SELECT tenant_id, id, name, public_key, private_key, vpn_ip, dns, receiver_index FROM clients",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, u32>(7)?,
            ))
        })?;
        for row in rows {
            let (tid, id, name, public, sealed, vpn_ip, dns, index) = row?;
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
            };
            tenant_of(&mut tenants, &tid, &row_name)?
                .clients
                .insert(client.id.clone(), client);
        }

        let mut stmt = self
            .conn
            .prepare("SELECT tenant_id, router_id, port, listen FROM forwards")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u16>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        for row in rows {
            let (tid, rid, port, listen) = row?;
            let row_name = format!("forward/{tid}/{rid}/{port}");
            let listen = listen.parse().map_err(|_| corrupt(&row_name, "listen"))?;
            let rid = parse_id(&rid, &row_name)?;
            tenant_of(&mut tenants, &tid, &row_name)?
                .routers
                .get_mut(&rid)
                .ok_or_else(|| corrupt(&row_name, "router_id (no such router)"))?
                .forwards
                .insert(port, listen);
        }

        let mut stmt = self
            .conn
            .prepare("SELECT tenant_id, pool, gateways FROM egress")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
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
            tenant_of(&mut tenants, &tid, &row_name)?.egress = Some(policy);
        }
        Ok(tenants.into_values().collect())
    }

    /// Seals every private key, and the key check, under `new` instead of
    /// the current master key, in one transaction: from its commit on only
    /// `new` opens the state. Returns how many private keys were sealed again.
    pub fn rekey(&mut self, new: MasterKey) -> Result<usize, StoreError> {
        // Each sealed column with the context its values are bound to.
        const SEALED: [(&str, &str); 3] = [
            ("tenants", "'tenant/' || id"),
            ("routers", "'router/' || tenant_id || '/' || id"),
            ("clients", "'client/' || tenant_id || '/' || id"),
        ];
        let tx = self.conn.transaction()?;
        let mut count = 0;
        for (table, context) in SEALED {
            let rows: Vec<(i64, String, Vec<u8>)> = tx
                .prepare(&format!(
                    "SELECT rowid, {context}, private_key FROM {table} WHERE private_key IS NOT NULL"
                ))?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut update = tx.prepare(&format!(
                "UPDATE {table} SET private_key = ?1 WHERE rowid = ?2"
            ))?;
            for (rowid, context, sealed) in rows {
                let plain = self
                    .master
                    .open_key(&sealed, &context)
                    .map_err(|e| corrupt(&context, &format!("private_key ({e})")))?;
                update.execute(params![new.seal(&plain, &context), rowid])?;
                count += 1;
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = ?2",
            params![new.seal(KEY_CHECK_PLAIN, KEY_CHECK), KEY_CHECK],
        )?;
        tx.commit()?;
        self.master = new;
        Ok(count)
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

/// Proves that `master` opens this state, or records its check in a new one.
fn check_master_key(conn: &Connection, master: &MasterKey) -> Result<(), StoreError> {
    let sealed: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [KEY_CHECK], |r| {
            r.get(0)
        })
        .optional()?;
    match sealed {
        Some(s) => match master.open(&s, KEY_CHECK) {
            Ok(plain) if plain == KEY_CHECK_PLAIN => Ok(()),
            Ok(_) => Err(StoreError::WrongMasterKey(SealError::WrongKey)),
            Err(e) => Err(StoreError::WrongMasterKey(e)),
        },
        None => {
            let sealed = master.seal(KEY_CHECK_PLAIN, KEY_CHECK);
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![KEY_CHECK, sealed],
            )?;
            Ok(())
        }
    }
}

fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version = user_version(conn)?;
    if version > schema::VERSION {
        return Err(StoreError::TooNew {
            found: version,
            known: schema::VERSION,
        });
    }
    for (from, sql) in schema::MIGRATIONS
        .iter()
        .enumerate()
        .skip(version.max(0) as usize)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = from + 1, "state database migrated");
    }
    Ok(())
}

fn apply_one(
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
            // An upsert, not REPLACE: a REPLACE deletes the row first, and with it
            // (by cascade) the router's forwards.
            tx.execute(
                "INSERT INTO routers
                   (tenant_id, id, name, public_key, private_key, vpn_ip, extra_prefixes, receiver_index, endpoint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(tenant_id, id) DO UPDATE SET name = ?3, public_key = ?4,
                   private_key = ?5, vpn_ip = ?6, extra_prefixes = ?7, receiver_index = ?8,
                   endpoint = ?9",
                params![
                    tid.as_str(),
                    r.id.as_str(),
                    r.name,
                    keys::encode(r.public_key.as_bytes()),
                    sealed,
                    r.vpn_ip.to_string(),
                    serde_json::to_string(&r.extra_prefixes).unwrap_or_else(|_| "[]".into()),
                    r.index,
                    r.endpoint.map(|e| e.to_string())
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
            let dns: Vec<String> = c.dns.iter().map(ToString::to_string).collect();
            tx.execute(
                "INSERT INTO clients
                   (tenant_id, id, name, public_key, private_key, vpn_ip, dns, receiver_index)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(tenant_id, id) DO UPDATE SET name = ?3, public_key = ?4,
                   private_key = ?5, vpn_ip = ?6, dns = ?7, receiver_index = ?8",
                params![
                    tid.as_str(),
                    c.id.as_str(),
                    c.name,
                    keys::encode(c.public_key.as_bytes()),
                    sealed,
                    c.vpn_ip.to_string(),
                    serde_json::to_string(&dns).unwrap_or_else(|_| "[]".into()),
                    c.index
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

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const LAST_CREATED_MS: i64 = 253_402_300_799_999;

/// A creation time as stored (milliseconds since 1970), if it is one this
/// appliance could have written and the API can show.
fn created_at(ms: i64) -> Option<SystemTime> {
    (0..=LAST_CREATED_MS)
        .contains(&ms)
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64))
}

fn corrupt(row: &str, field: &str) -> StoreError {
    StoreError::Corrupt {
        row: row.to_owned(),
        reason: format!("bad {field}"),
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control::model::{ClientRequest, EgressRequest, RouterRequest, TenantRequest};
    use crate::control::registry::tests::registry;
    use crate::control::registry::Registry;

    fn id(s: &str) -> Id {
        Id::parse(s, "id").unwrap()
    }

    /// A tenant with a gateway (with a forward), an egress policy and a client.
    pub(crate) fn provisioned() -> Registry {
        let mut r = registry();
        let t = id("kitonga");
        r.put_tenant(&t, &TenantRequest::default(), SystemTime::now())
            .unwrap();
        let gw = RouterRequest {
            vpn_ip: Some("10.100.0.40".into()),
            allowed_ips: Some(vec!["192.168.88.0/24".into()]),
            ..Default::default()
        };
        r.put_router(&t, &id("gw"), &gw).unwrap();
        let req = EgressRequest {
            pool: "10.200.0.0/24".into(),
            gateways: vec!["gw".into()],
        };
        r.put_egress(&t, &req).unwrap();
        let phone = ClientRequest {
            dns: Some(vec!["1.1.1.1".into()]),
            ..Default::default()
        };
        r.put_client(&t, &id("p1"), &phone).unwrap();
        r.put_forward(&t, &id("gw"), 8728, "127.0.0.1:18728".parse().unwrap())
            .unwrap();
        r
    }

    /// Stores every object of `r` in one transaction.
    pub(crate) fn save_all(store: &mut Store, r: &Registry) {
        let mut changes = Vec::new();
        for t in r.tenants() {
            changes.push(Change::Tenant(t));
            for router in t.routers.values() {
                changes.push(Change::Router(&t.id, router));
                for (port, listen) in &router.forwards {
                    changes.push(Change::Forward(&t.id, &router.id, *port, *listen));
                }
            }
            changes.push(Change::Egress(&t.id, t.egress.as_ref()));
            for c in t.clients.values() {
                changes.push(Change::Client(&t.id, c));
            }
        }
        store.apply(&changes).unwrap();
    }

    /// Every private key of `tenants`, in order.
    fn private_keys(tenants: &[Tenant]) -> Vec<[u8; 32]> {
        let keys = tenants.iter().flat_map(Tenant::private_keys);
        keys.map(|k| k.secret().to_bytes()).collect()
    }

    #[test]
    fn a_new_master_key_opens_the_same_keys_and_the_old_one_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (old, new) = (MasterKey::generate(), MasterKey::generate());
        let mut store = Store::open(&path, old.clone()).unwrap();
        save_all(&mut store, &provisioned());
        let before = private_keys(&store.load().unwrap());
        // The tunnel key, and the keys generated for the gateway and the phone.
        assert_eq!(before.len(), 3);
        assert_eq!(store.rekey(new.clone()).unwrap(), 3);
        assert_eq!(private_keys(&store.load().unwrap()), before);
        drop(store);
        assert!(matches!(
            Store::open(&path, old),
            Err(StoreError::WrongMasterKey(_))
        ));
        let after = Store::open(&path, new).unwrap().load().unwrap();
        assert_eq!(private_keys(&after), before);
    }

    #[test]
    fn round_trip_with_keys_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let master = MasterKey::generate();
        let mut r = provisioned();
        let heard_at = "203.0.113.2:34280".parse().unwrap();
        r.set_router_endpoint(&id("kitonga"), &id("gw"), heard_at)
            .unwrap();
        // Read while the store is open: the journal (WAL) still holds the
        // writes then; closing merges it into the database and deletes it.
        let (written, journal) = {
            let mut store = Store::open(&path, master.clone()).unwrap();
            assert!(store.is_empty().unwrap());
            save_all(&mut store, &r);
            let journal = std::fs::read(dir.path().join("state.db-wal")).unwrap();
            assert!(!journal.is_empty(), "the writes are in the journal");
            (std::fs::read(&path).unwrap(), journal)
        };
        let store = Store::open(&path, master).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        let (a, b) = (&loaded[0], r.tenants().next().unwrap());
        assert_eq!(a.public_key, b.public_key);
        assert_eq!(
            (a.subnet, a.listen_port, &a.interface_name),
            (b.subnet, b.listen_port, &b.interface_name)
        );
        let (ga, gb) = (&a.routers[&id("gw")], &b.routers[&id("gw")]);
        assert_eq!(
            (ga.vpn_ip, &ga.extra_prefixes, ga.index),
            (gb.vpn_ip, &gb.extra_prefixes, gb.index)
        );
        assert_eq!(
            ga.private_key.as_ref().unwrap().to_base64(),
            gb.private_key.as_ref().unwrap().to_base64()
        );
        assert_eq!(a.egress, b.egress);
        assert_eq!(ga.forwards, gb.forwards);
        assert_eq!(ga.endpoint, Some(heard_at));
        assert_eq!(a.clients[&id("p1")].dns, b.clients[&id("p1")].dns);

        // No private key is in the file in plain text (raw or base64).
        drop(store);
        let merged = std::fs::read(&path).unwrap();
        for secret in [
            b.secret.secret().to_bytes(),
            gb.private_key.as_ref().unwrap().secret().to_bytes(),
        ] {
            for blob in [&written, &journal, &merged] {
                assert!(!blob.windows(32).any(|w| w == secret));
                let b64 = keys::encode(&secret);
                assert!(!blob.windows(b64.len()).any(|w| w == b64.as_bytes()));
            }
        }
    }

    /// What a release with only schema 1 wrote: one tenant.
    fn version_1_state(path: &Path, master: &MasterKey) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let sealed = master.seal(KEY_CHECK_PLAIN, KEY_CHECK);
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
            params![KEY_CHECK, sealed],
        )
        .unwrap();
        let t = SecretKey::generate();
        conn.execute(
            "INSERT INTO tenants VALUES ('acme', 'wg0', ?1, ?2, '10.100.0.0/16', 51820, 0)",
            params![
                master.seal(&t.secret().to_bytes(), "tenant/acme"),
                keys::encode(t.public().as_bytes())
            ],
        )
        .unwrap();
        let r = SecretKey::generate();
        conn.execute(
            "INSERT INTO routers VALUES ('acme', 'gw', 'gw', ?1, NULL, '10.100.0.40', '[]', 7)",
            params![keys::encode(r.public().as_bytes())],
        )
        .unwrap();
    }

    fn version_of(path: &Path) -> i64 {
        user_version(&Connection::open(path).unwrap()).unwrap()
    }

    #[test]
    fn a_version_1_state_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let master = MasterKey::generate();
        version_1_state(&path, &master);
        let store = Store::open(&path, master).unwrap();
        assert_eq!(version_of(&path), schema::VERSION);
        let tenants = store.load().unwrap();
        assert_eq!(tenants.len(), 1);
        assert_eq!(tenants[0].listen_port, 51820);
        let gw = &tenants[0].routers[&id("gw")];
        assert_eq!((gw.index, gw.endpoint), (7, None), "not heard from yet");
    }

    /// A wrong key must not upgrade the state: the release that wrote it could
    /// no longer open it.
    #[test]
    fn a_wrong_key_leaves_an_older_state_unmigrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        version_1_state(&path, &MasterKey::generate());
        let err = Store::open(&path, MasterKey::generate()).err().unwrap();
        assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err}");
        assert_eq!(version_of(&path), 1);
    }

    /// Once the key check has passed, a key that does not open is one damaged
    /// row, named as such, not a wrong master key.
    #[test]
    fn a_damaged_key_or_time_names_its_row() {
        for (sql, row, field) in [
            (
                "UPDATE tenants SET private_key = X'00112233'",
                "tenant/acme",
                "private_key",
            ),
            (
                "UPDATE tenants SET created_at_ms = 253402300800000",
                "tenant/acme",
                "created_at_ms",
            ),
            (
                "UPDATE tenants SET created_at_ms = -1",
                "tenant/acme",
                "created_at_ms",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let master = MasterKey::from_bytes([3; 32]);
            version_1_state(&path, &master);
            drop(Store::open(&path, MasterKey::from_bytes([3; 32])).unwrap());
            Connection::open(&path).unwrap().execute(sql, []).unwrap();
            let store = Store::open(&path, master).unwrap();
            match store.load() {
                Err(StoreError::Corrupt { row: r, reason }) => {
                    assert_eq!(r, row, "{sql}");
                    assert!(reason.contains(field), "{sql}: {reason}");
                }
                other => panic!("{sql}: {:?}", other.map(|t| t.len())),
            }
        }
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(Store::open(&path, MasterKey::generate()).unwrap());
        let err = Store::open(&path, MasterKey::generate()).err().unwrap();
        assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err}");
        assert!(err.to_string().contains("master key"));
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path, MasterKey::generate()).err().unwrap();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn deletes_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db"), MasterKey::generate()).unwrap();
        let r = provisioned();
        save_all(&mut store, &r);
        store
            .apply(&[Change::DeleteTenant(&id("kitonga"))])
            .unwrap();
        assert!(store.load().unwrap().is_empty());
        let n: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM routers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
