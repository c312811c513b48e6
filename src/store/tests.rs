//! The store against a real SQLite file: round trips, keys, migrations, damage.

use std::time::SystemTime;

use super::*;
use crate::control::model::{ClientRequest, EgressRequest, RouterRequest, TenantRequest};
use crate::control::registry::tests::registry;
use crate::control::registry::Registry;
use crate::keys::{self, SecretKey};

fn id(s: &str) -> Id {
    Id::parse(s, "id").unwrap()
}

/// A tenant with a gateway (with a forward and a preshared key), an egress
/// policy and a client.
pub(crate) fn provisioned() -> Registry {
    let mut r = registry();
    let t = id("kitonga");
    r.put_tenant(&t, &TenantRequest::default(), SystemTime::now())
        .unwrap();
    let gw = RouterRequest {
        vpn_ip: Some("10.100.0.40".into()),
        allowed_ips: Some(vec!["192.168.88.0/24".into()]),
        preshared_key: Some("generate".into()),
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

/// A database that opens read-only (a file the appliance's user cannot
/// write, which SQLite opens so without an error) is refused at start-up,
/// naming the file, rather than refusing every change later; temporary files
/// stay in memory (a read-only root filesystem has nowhere for them).
#[test]
fn a_read_only_database_is_refused_and_temporary_files_stay_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let master = MasterKey::generate();
    let store = Store::open(&path, master.clone()).unwrap();
    let temp: i64 = store
        .conn
        .pragma_query_value(None, "temp_store", |r| r.get(0))
        .unwrap();
    assert_eq!(temp, 2, "MEMORY");
    drop(store);
    let read_only =
        Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    match Store::on(read_only, &path, master) {
        Err(e @ StoreError::ReadOnly(_)) => {
            assert!(e.to_string().contains("state.db"), "{e}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a read-only database was taken"),
    }
}

/// A refused write is counted, and the store says it is failing until a
/// write is taken again.
#[test]
fn refused_writes_are_counted_until_one_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("state.db"), MasterKey::generate()).unwrap();
    assert_eq!(store.write_health(), (0, false));
    // A forward of a router that does not exist: the foreign key refuses it.
    let (t, r) = (id("nobody"), id("nothing"));
    let listen = "127.0.0.1:2222".parse().unwrap();
    assert!(store.apply(&[Change::Forward(&t, &r, 22, listen)]).is_err());
    assert_eq!(store.write_health(), (1, true));
    save_all(&mut store, &provisioned());
    assert_eq!(store.write_health(), (1, false));
}

#[test]
fn a_new_master_key_opens_the_same_keys_and_the_old_one_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (old, new) = (MasterKey::generate(), MasterKey::generate());
    let mut store = Store::open(&path, old.clone()).unwrap();
    save_all(&mut store, &provisioned());
    let before = private_keys(&store.load().unwrap());
    let psk = |tenants: &[Tenant]| tenants[0].routers[&id("gw")].preshared_key.clone();
    let psk_before = psk(&store.load().unwrap());
    assert!(psk_before.is_some());
    // The tunnel key, the keys generated for the gateway and the phone, and
    // the gateway's preshared key.
    assert_eq!(before.len(), 3);
    assert_eq!(store.rekey(new.clone()).unwrap(), 4);
    assert_eq!(private_keys(&store.load().unwrap()), before);
    assert_eq!(psk(&store.load().unwrap()), psk_before);
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
    assert_eq!(ga.preshared_key, gb.preshared_key);
    assert!(ga.preshared_key.is_some());
    assert_eq!(a.clients[&id("p1")].dns, b.clients[&id("p1")].dns);

    // No private key is in the file in plain text (raw or base64).
    drop(store);
    let merged = std::fs::read(&path).unwrap();
    for secret in [
        b.secret.secret().to_bytes(),
        gb.private_key.as_ref().unwrap().secret().to_bytes(),
        gb.preshared_key.as_ref().unwrap().to_bytes(),
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
    let master = MasterKey::from_bytes([5; 32]);
    version_1_state(&path, &master);
    let store = Store::open(&path, master).unwrap();
    assert_eq!(version_of(&path), schema::VERSION);
    let tenants = store.load().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0].listen_port, 51820);
    let gw = &tenants[0].routers[&id("gw")];
    assert_eq!((gw.index, gw.endpoint), (7, None), "not heard from yet");
    // The database as it was is kept beside it, for the release that wrote it.
    let kept = dir.path().join("state.db.v1");
    assert_eq!(version_of(&kept), 1);
    let conn = Connection::open(&kept).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM routers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    // Opened again, the migrated database needs no copy and makes none.
    std::fs::remove_file(&kept).unwrap();
    drop(store);
    drop(Store::open(&path, MasterKey::from_bytes([5; 32])).unwrap());
    assert!(!kept.exists());
}

/// A copy that cannot be kept (its place is a directory) leaves the older
/// database unmigrated, and says why.
#[test]
fn no_migration_without_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let master = MasterKey::generate();
    version_1_state(&path, &master);
    std::fs::create_dir(dir.path().join("state.db.v1")).unwrap();
    let err = Store::open(&path, master).err().unwrap();
    assert!(
        matches!(err, StoreError::KeepFailed { version: 1, .. }),
        "{err}"
    );
    assert_eq!(version_of(&path), 1);
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

/// The probe's measure of free space reads the file system's.
#[test]
fn free_space_is_read_from_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let free = super::free_bytes(dir.path()).expect("statvfs answers");
    assert!(free > 0);
    assert_eq!(super::free_bytes(&dir.path().join("no\0such")), None);
}
