//! The state database as start-up reads it, after someone edited it by hand or a
//! disk returned garbage: arbitrary rows go into a real SQLite store, then the
//! appliance's start-up path runs on it (load, registry restore, one engine per
//! tunnel with its peers and egress policy) and a few API changes follow; a
//! state that loads is also sealed under a new master key and loaded again.
//! Every step may refuse; none may panic, and what it accepts must be coherent
//! enough for the data plane to take.
#![no_main]

use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rusqlite::{params, Connection};
use wgplane::api::views::{ClientView, RouterView, Statuses, TenantView};
use wgplane::control::model::{ClientRequest, EgressRequest, Id, RouterRequest};
use wgplane::control::registry::AllocPolicy;
use wgplane::control::{render, Registry};
use wgplane::core::engine::TunnelEngine;
use wgplane::keys::SecretKey;
use wgplane::store::{MasterKey, Store};

const MASTER: [u8; 32] = [7; 32];

/// A text field: mostly values a real store holds, sometimes anything.
#[derive(Arbitrary, Debug)]
enum Text {
    Usual(u8),
    Any(String),
}

impl Text {
    fn get<'a>(&'a self, usual: &[&'a str]) -> &'a str {
        match self {
            Text::Usual(i) => usual[*i as usize % usual.len()],
            Text::Any(s) => s,
        }
    }
}

/// A sealed private key: a good one for its row, one sealed for another row, or
/// arbitrary bytes.
#[derive(Arbitrary, Debug)]
enum Sealed {
    Good(u8),
    OtherRow(u8),
    Any(Vec<u8>),
    Missing,
}

#[derive(Arbitrary, Debug)]
struct TenantRow {
    id: Text,
    subnet: Text,
    port: u16,
    created: i64,
    host: Text,
    key: Sealed,
}

#[derive(Arbitrary, Debug)]
struct PeerRow {
    tenant: Text,
    id: Text,
    key: u8,
    public: Option<String>,
    private: Sealed,
    vpn_ip: Text,
    extra: Text,
    index: u32,
    /// Routers only: where it was last heard from (NULL when `None`).
    endpoint: Option<Text>,
}

#[derive(Arbitrary, Debug)]
struct ForwardRow {
    tenant: Text,
    router: Text,
    port: u16,
    listen: Text,
}

#[derive(Arbitrary, Debug)]
struct EgressRow {
    tenant: Text,
    pool: Text,
    gateways: Text,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Router {
        tenant: Text,
        id: Text,
        ip: Option<Text>,
    },
    Client {
        tenant: Text,
        id: Text,
    },
    Egress {
        tenant: Text,
        pool: Text,
        gateway: Text,
    },
    DeleteRouter {
        tenant: Text,
        id: Text,
    },
    DeleteTenant {
        tenant: Text,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    tenants: Vec<TenantRow>,
    routers: Vec<PeerRow>,
    clients: Vec<PeerRow>,
    forwards: Vec<ForwardRow>,
    egress: Vec<EgressRow>,
    ops: Vec<Op>,
}

const IDS: &[&str] = &["kitonga", "acme", "gw", "r1", "phone-1", ""];
const SUBNETS: &[&str] = &[
    "10.100.0.0/16",
    "10.101.0.0/16",
    "10.100.0.0/24",
    "10.100.0.0/31",
    "10.100.0.0/32",
    "0.0.0.0/0",
    "10.100.0.5/16",
];
const ADDRS: &[&str] = &[
    "10.100.1.1",
    "10.100.0.40",
    "10.200.0.2",
    "10.100.0.1",
    "10.100.255.255",
];
const PREFIXES: &[&str] = &[
    "[]",
    "[\"192.168.88.0/24\"]",
    "[\"10.100.0.40/32\"]",
    "[\"0.0.0.0/0\"]",
    "[\"fd00::/64\"]",
    "[\"10.200.0.0/24\"]",
];
const POOLS: &[&str] = &[
    "10.200.0.0/24",
    "10.100.2.0/24",
    "10.200.0.0/32",
    "10.100.0.0/16",
];
const GATEWAYS: &[&str] = &[
    "[\"gw\"]",
    "[]",
    "[\"gw\",\"r1\"]",
    "[\"nobody\"]",
    "[\"..\"]",
];
const LISTENS: &[&str] = &["127.0.0.1:0", "127.0.0.1:2222", "[::1]:22"];

fn key(n: u8) -> SecretKey {
    SecretKey::from_bytes([n | 1; 32])
}

fn sealed(master: &MasterKey, s: &Sealed, row: &str) -> Option<Vec<u8>> {
    match s {
        Sealed::Good(n) => Some(master.seal(&[*n | 1; 32], row)),
        Sealed::OtherRow(n) => Some(master.seal(&[*n | 1; 32], "tenant/other")),
        Sealed::Any(b) => Some(b.clone()),
        Sealed::Missing => None,
    }
}

fn id(t: &Text, what: &'static str) -> Option<Id> {
    Id::parse(t.get(IDS), what).ok()
}

/// Rows the database itself refuses (constraints) are skipped.
fn write_rows(conn: &Connection, master: &MasterKey, input: &Input) {
    for t in input.tenants.iter().take(4) {
        let tid = t.id.get(IDS);
        let row = format!("tenant/{tid}");
        let private = sealed(master, &t.key, &row).unwrap_or_default();
        let _ = conn.execute(
            "INSERT INTO tenants (id, interface_name, private_key, public_key, subnet, listen_port, created_at_ms, host_prefixes)
             VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?7)",
            params![tid, format!("wg-{tid}"), private, t.subnet.get(SUBNETS), t.port, t.created, t.host.get(PREFIXES)],
        );
    }
    for (table, rows) in [("routers", &input.routers), ("clients", &input.clients)] {
        for p in rows.iter().take(8) {
            let tid = p.tenant.get(IDS);
            let pid = p.id.get(IDS);
            let kind = if table == "routers" {
                "router"
            } else {
                "client"
            };
            let row = format!("{kind}/{tid}/{pid}");
            let public = p
                .public
                .clone()
                .unwrap_or_else(|| wgplane::keys::encode(key(p.key).public().as_bytes()));
            let sql = format!(
                "INSERT INTO {table} (tenant_id, id, name, public_key, private_key, vpn_ip, {}, receiver_index)
                 VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7)",
                if table == "routers" { "extra_prefixes" } else { "dns" }
            );
            let extra = if table == "routers" {
                p.extra.get(PREFIXES)
            } else {
                p.extra.get(&["[]", "[\"1.1.1.1\"]", "[\"::1\"]"])
            };
            let _ = conn.execute(
                &sql,
                params![
                    tid,
                    pid,
                    public,
                    sealed(master, &p.private, &row),
                    p.vpn_ip.get(ADDRS),
                    extra,
                    p.index
                ],
            );
            if let (Some(endpoint), "routers") = (&p.endpoint, table) {
                let endpoint =
                    endpoint.get(&["203.0.113.2:51820", "[2001:db8::2]:51820", "10.0.0.1", ""]);
                let _ = conn.execute(
                    "UPDATE routers SET endpoint = ?3 WHERE tenant_id = ?1 AND id = ?2",
                    params![tid, pid, endpoint],
                );
            }
        }
    }
    for f in input.forwards.iter().take(4) {
        let _ = conn.execute(
            "INSERT INTO forwards (tenant_id, router_id, port, listen) VALUES (?1, ?2, ?3, ?4)",
            params![
                f.tenant.get(IDS),
                f.router.get(IDS),
                f.port,
                f.listen.get(LISTENS)
            ],
        );
    }
    for e in input.egress.iter().take(2) {
        let _ = conn.execute(
            "INSERT INTO egress (tenant_id, pool, gateways) VALUES (?1, ?2, ?3)",
            params![
                e.tenant.get(IDS),
                e.pool.get(POOLS),
                e.gateways.get(GATEWAYS)
            ],
        );
    }
}

/// What the runtime does with a restored tenant, without its socket: the engine
/// with its own addresses, its local stack, the peers and the egress policy.
fn start_engines(registry: &Registry) {
    let now = Instant::now();
    for tenant in registry.tenants() {
        let own = vec![
            IpAddr::V4(tenant.server_ip()),
            IpAddr::V6(tenant.server_ipv6()),
        ];
        let mut engine = TunnelEngine::new(tenant.secret.secret().clone(), own).with_local_stack(
            tenant.server_ip(),
            tenant.subnet.prefix_len(),
            now,
        );
        let _ = engine.sync_peers(tenant.peer_configs(Some(25)));
        engine.set_egress(tenant.egress_configs());
        engine.set_host_prefixes(&tenant.host_prefixes);
        engine.set_host_sources(&[ipnet::IpNet::V4(tenant.subnet)]);
        let _ = engine.explain(
            IpAddr::from([10, 200, 0, 2]),
            IpAddr::from([198, 18, 0, 2]),
            now,
        );
    }
}

/// What the API shows of the restored state: views, configs, scripts.
fn show(registry: &Registry) {
    let statuses = Statuses::new();
    let (now, wall) = (Instant::now(), SystemTime::now());
    for t in registry.tenants() {
        let _ = serde_json::to_string(&TenantView::new(t, "vpn.example.com", true));
        for r in t.routers.values() {
            let _ = serde_json::to_string(&RouterView::new(t, r, &statuses, now, wall));
            let _ = render::router_script(t, r, "vpn.example.com", &t.host_prefixes);
        }
        for c in t.clients.values() {
            let _ = serde_json::to_string(&ClientView::new(c, &statuses, now, wall));
            let _ = render::client_config(t, c, "vpn.example.com");
        }
    }
}

fn apply(registry: &mut Registry, op: &Op) {
    match op {
        Op::Router {
            tenant,
            id: rid,
            ip,
        } => {
            if let (Some(t), Some(r)) = (id(tenant, "tenant_id"), id(rid, "router_id")) {
                let req = RouterRequest {
                    vpn_ip: ip.as_ref().map(|ip| ip.get(ADDRS).to_owned()),
                    ..Default::default()
                };
                let _ = registry.put_router(&t, &r, &req);
            }
        }
        Op::Client { tenant, id: cid } => {
            if let (Some(t), Some(c)) = (id(tenant, "tenant_id"), id(cid, "client_id")) {
                let _ = registry.put_client(&t, &c, &ClientRequest::default());
            }
        }
        Op::Egress {
            tenant,
            pool,
            gateway,
        } => {
            if let Some(t) = id(tenant, "tenant_id") {
                let req = EgressRequest {
                    pool: pool.get(POOLS).to_owned(),
                    gateways: vec![gateway.get(IDS).to_owned()],
                };
                let _ = registry.put_egress(&t, &req);
            }
        }
        Op::DeleteRouter { tenant, id: rid } => {
            if let (Some(t), Some(r)) = (id(tenant, "tenant_id"), id(rid, "router_id")) {
                let _ = registry.delete_router(&t, &r);
            }
        }
        Op::DeleteTenant { tenant } => {
            if let Some(t) = id(tenant, "tenant_id") {
                let _ = registry.delete_tenant(&t);
            }
        }
    }
}

/// Every private key of `tenants`, in order.
fn private_keys(tenants: &[wgplane::control::Tenant]) -> Vec<[u8; 32]> {
    let keys = tenants
        .iter()
        .flat_map(wgplane::control::Tenant::private_keys);
    keys.map(|k| k.secret().to_bytes()).collect()
}

fuzz_target!(|input: Input| {
    // Memory-backed where there is one: the store syncs every commit to disk.
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let Ok(dir) = tempfile::tempdir_in(base) else {
        return;
    };
    let path = dir.path().join("state.db");
    let master = MasterKey::from_bytes(MASTER);
    // Created and migrated the way the appliance does it; then the rows go in
    // behind its back, without foreign keys, as a hand edit would.
    drop(Store::open(&path, MasterKey::from_bytes(MASTER)).expect("a fresh store opens"));
    let conn = Connection::open(&path).expect("the store is a SQLite file");
    write_rows(&conn, &master, &input);
    drop(conn);

    let Ok(mut store) = Store::open(&path, MasterKey::from_bytes(MASTER)) else {
        return;
    };
    let Ok(tenants) = store.load() else {
        return;
    };
    // Every key that opened under the master key opens, the same, under a
    // new one (`wgplane rekey`).
    let before = private_keys(&tenants);
    let resealed = store
        .rekey(MasterKey::from_bytes([8; 32]))
        .expect("every key of a state that loads is sealed again");
    assert_eq!(resealed, before.len());
    let again = store.load().expect("the state loads under the new key");
    assert_eq!(private_keys(&again), before);
    let policy = AllocPolicy {
        first_port: 51820,
        last_port: u16::MAX,
        supernet: "10.100.0.0/14".parse().expect("constant"),
        subnet_prefix_len: 16,
        subnet_start: "10.100.0.0".parse().expect("constant"),
    };
    let Ok(mut registry) = Registry::restore(policy, 1, tenants) else {
        return;
    };
    start_engines(&registry);
    show(&registry);
    for op in input.ops.iter().take(8) {
        apply(&mut registry, op);
    }
    start_engines(&registry);
});
