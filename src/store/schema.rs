//! The store's schema and its migrations.
//!
//! `PRAGMA user_version` holds the schema version. Each migration moves the schema
//! one version up inside the same transaction that bumps the version, so a crash
//! leaves either the old or the new schema. A store newer than this binary is
//! refused rather than guessed at.
//!
//! Left out: running the migrations and the version checks
//! ([`crate::store::Store::open`]), and the rows' contents (`write`, `load`). There are
//! no down migrations.

/// Migrations in order; `MIGRATIONS[i]` moves version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants, routers, clients, egress policies, meta.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    CREATE TABLE tenants (
        id             TEXT PRIMARY KEY,
        interface_name TEXT NOT NULL UNIQUE,
        private_key    BLOB NOT NULL,           -- sealed with the master key
        public_key     TEXT NOT NULL,
        subnet         TEXT NOT NULL,
        listen_port    INTEGER NOT NULL UNIQUE,
        created_at_ms  INTEGER NOT NULL
    );
    CREATE TABLE routers (
        tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id             TEXT NOT NULL,
        name           TEXT NOT NULL,
        public_key     TEXT NOT NULL,
        private_key    BLOB,                    -- sealed; only when generated here
        vpn_ip         TEXT NOT NULL,
        extra_prefixes TEXT NOT NULL,           -- JSON array of prefixes
        receiver_index INTEGER NOT NULL UNIQUE,
        PRIMARY KEY (tenant_id, id)
    );
    CREATE TABLE clients (
        tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        id             TEXT NOT NULL,
        name           TEXT NOT NULL,
        public_key     TEXT NOT NULL,
        private_key    BLOB,
        vpn_ip         TEXT NOT NULL,
        dns            TEXT NOT NULL,           -- JSON array of addresses
        receiver_index INTEGER NOT NULL UNIQUE,
        PRIMARY KEY (tenant_id, id)
    );
    CREATE TABLE egress (
        tenant_id TEXT PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
        pool      TEXT NOT NULL,
        gateways  TEXT NOT NULL                 -- JSON array of router ids, primary first
    );",
    // 2: management forwards (router port -> host listen address).
    "CREATE TABLE forwards (
        tenant_id TEXT NOT NULL,
        router_id TEXT NOT NULL,
        port      INTEGER NOT NULL,
        listen    TEXT NOT NULL,
        PRIMARY KEY (tenant_id, router_id, port),
        FOREIGN KEY (tenant_id, router_id) REFERENCES routers(tenant_id, id) ON DELETE CASCADE
    );",
    // 3: host prefixes a tenant's routers may reach in TUN mode.
    "ALTER TABLE tenants ADD COLUMN host_prefixes TEXT NOT NULL DEFAULT '[]';",
    // 4: where each router was last heard from, so that a restarted appliance
    // can reach its routers (and wake its gateways) before they speak again.
    "ALTER TABLE routers ADD COLUMN endpoint TEXT;",
    // 5: preshared keys, sealed with the master key under `…/psk`.
    "ALTER TABLE routers ADD COLUMN preshared_key BLOB;
     ALTER TABLE clients ADD COLUMN preshared_key BLOB;",
];

/// The version this binary writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;
