//! Durable state: every tenant, router, egress policy and client, in SQLite.
//!
//! SQLite (bundled, so no system library is needed) because it is a single file an
//! operator can open with `sqlite3` to look, its transactions survive `kill -9` and
//! power loss in WAL mode with `synchronous=FULL`, and migrations are plain SQL keyed
//! by `PRAGMA user_version`. Each API call is one transaction, committed before the
//! call answers. Private keys are sealed with the master key (`seal`).
//!
//! `write` turns each change into SQL, `load` reads the state back, `seal` keeps
//! the private keys, `schema` holds the migrations, `files` and `backup` the state
//! directory's other files and consistent copies. The store is written on the
//! control path only, never per packet.

pub mod backup;
pub mod files;
mod load;
pub mod schema;
pub mod seal;
mod write;

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::control::model::{Client, EgressPolicy, Id, Router, Tenant};
pub use seal::{MasterKey, SealError};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer wgplane.
    #[error("state database has schema version {found}, this wgplane knows up to {known}: run the newer wgplane, or put back the copy the upgrade kept beside it (state.db.v<N>, N the schema it had before, at most {known})")]
    TooNew { found: i64, known: i64 },
    /// The copy of an older database, kept before migrating it, could not be
    /// made: the database is left as it was.
    #[error("state database of schema version {version} not migrated: its copy could not be kept first: {source}")]
    KeepFailed {
        version: i64,
        source: Box<backup::BackupError>,
    },
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
    /// The database opens read-only (SQLite falls back to that when the file
    /// is not writable): every change would be refused.
    #[error("{0} is not writable by this process: the state directory and its files must belong to the user the appliance runs as")]
    ReadOnly(std::path::PathBuf),
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
    /// Writes refused since the start (a full or read-only disk, say).
    write_failures: u64,
    /// Whether the last write was refused.
    failing: bool,
    /// The database file, whose file system [`Store::probe`] measures.
    path: std::path::PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it, and checks
    /// that `master` is the key it was created with.
    pub fn open(path: &Path, master: MasterKey) -> Result<Self, StoreError> {
        Self::on(Connection::open(path)?, path, master)
    }

    /// [`Store::open`] on a connection opened already (SQLite opens a file
    /// it may not write read-only, without an error).
    fn on(mut conn: Connection, path: &Path, master: MasterKey) -> Result<Self, StoreError> {
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::ReadOnly(path.to_path_buf()));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Temporary files (a large delete's statement journal) stay in memory:
        // under a read-only root filesystem SQLite finds no directory for them.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The WAL is cut back to 4 MiB after a checkpoint: a large change
        // (a big tenant deleted, every page zeroed) leaves no file of its size
        // behind for the rest of the process's life.
        conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted rows (sealed keys of deleted or re-keyed peers) are zeroed in
        // the database file, not left in its free pages (their old pages stay
        // in the WAL until the next checkpoint; pages freed before this was
        // set stay until a VACUUM). The keys are sealed either way.
        conn.pragma_update(None, "secure_delete", "ON")?;
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
        if (1..schema::VERSION).contains(&version) {
            keep_before_migration(path, version)?;
        }
        migrate(&mut conn)?;
        check_master_key(&conn, &master)?;
        Ok(Self {
            conn,
            master,
            write_failures: 0,
            failing: false,
            path: path.to_path_buf(),
        })
    }

    /// Writes refused since the start, and whether the last one was.
    pub fn write_health(&self) -> (u64, bool) {
        (self.write_failures, self.failing)
    }

    /// True when the database holds no tenant yet.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))?;
        Ok(n == 0)
    }

    /// While the last write was refused, tries one that changes nothing (the
    /// schema version set to itself: a real write of the header page), so
    /// that the store reads writable again once the disk takes writes, not
    /// only at the next change. A page fits where a change of many may not:
    /// the file system must also have [`PROBE_ROOM`] free. Not counted as a
    /// refused write.
    pub fn probe(&mut self) {
        if self.failing {
            let room = free_bytes(&self.path).is_none_or(|free| free >= PROBE_ROOM);
            self.failing = !room
                || self
                    .conn
                    .pragma_update(None, "user_version", schema::VERSION)
                    .is_err();
        }
    }

    /// Applies changes in one transaction, durable when this returns.
    pub fn apply(&mut self, changes: &[Change<'_>]) -> Result<(), StoreError> {
        let result = self.apply_all(changes);
        self.failing = result.is_err();
        self.write_failures += u64::from(self.failing);
        result
    }

    fn apply_all(&mut self, changes: &[Change<'_>]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for change in changes {
            write::apply_one(&tx, &self.master, change)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Seals every private key, and the key check, under `new` instead of
    /// the current master key, in one transaction: from its commit on only
    /// `new` opens the state. Returns how many private keys were sealed again.
    pub fn rekey(&mut self, new: MasterKey) -> Result<usize, StoreError> {
        // Each sealed column with the context its values are bound to.
        const SEALED: [(&str, &str, &str); 5] = [
            ("tenants", "private_key", "'tenant/' || id"),
            (
                "routers",
                "private_key",
                "'router/' || tenant_id || '/' || id",
            ),
            (
                "clients",
                "private_key",
                "'client/' || tenant_id || '/' || id",
            ),
            (
                "routers",
                "preshared_key",
                "'router/' || tenant_id || '/' || id || '/psk'",
            ),
            (
                "clients",
                "preshared_key",
                "'client/' || tenant_id || '/' || id || '/psk'",
            ),
        ];
        let tx = self.conn.transaction()?;
        let mut count = 0;
        for (table, column, context) in SEALED {
            let rows: Vec<(i64, String, Vec<u8>)> = tx
                .prepare(&format!(
                    "SELECT rowid, {context}, {column} FROM {table} WHERE {column} IS NOT NULL"
                ))?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut update = tx.prepare(&format!(
                "UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"
            ))?;
            for (rowid, context, sealed) in rows {
                let plain = self
                    .master
                    .open_key(&sealed, &context)
                    .map_err(|e| corrupt(&context, &format!("{column} ({e})")))?;
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
}

/// The sealing context of a peer's preshared key: its row's, with `/psk`
/// (the row's private key is sealed under the row's own).
fn psk_context(row: &str) -> String {
    format!("{row}/psk")
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

/// Copies the database of schema `version`, as it is, to `<path>.v<version>`
/// before a migration changes it for good: the way back to the wgplane that
/// wrote it, which refuses the migrated one.
/// Free space a probe asks for beside its write: a few hundred changes'
/// worth, far beyond one page.
pub const PROBE_ROOM: u64 = 1 << 20;

/// Bytes an unprivileged writer may still use on the file system of `path`,
/// if it says.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated path and `stat` room for one
    // `statvfs`, which the call fills when it returns 0.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn keep_before_migration(path: &Path, version: i64) -> Result<(), StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".v{version}"));
    let kept = std::path::PathBuf::from(name);
    backup::backup(path, &kept, &[]).map_err(|source| StoreError::KeepFailed {
        version,
        source: Box::new(source),
    })?;
    tracing::info!(from = version, to = schema::VERSION, kept = %kept.display(),
        "state database to be migrated: the old one is kept for a way back");
    Ok(())
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

fn corrupt(row: &str, field: &str) -> StoreError {
    StoreError::Corrupt {
        row: row.to_owned(),
        reason: format!("bad {field}"),
    }
}

#[cfg(test)]
pub(crate) mod tests;
