//! A consistent copy of a state database, taken while the appliance runs.
//!
//! Copying `state.db` with `cp` while the appliance writes can tear it (the
//! latest changes live in `state.db-wal` until a checkpoint). `VACUUM INTO`
//! copies one read transaction's view instead, never blocks the appliance's
//! writes, and the copy is checked (`integrity_check`, schema version) under a
//! temporary name before it replaces the target in one rename.
//!
//! The copy holds private keys sealed under the master key, never the master
//! key itself: restoring needs both. It leaves the token out too.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{files, schema};

/// Why a backup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database could not be read or the copy written.
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The file is not a wgplane state database this version knows.
    #[error("{path}: not a wgplane state database (schema version {version}, this wgplane knows 1 to {known})")]
    NotState {
        path: PathBuf,
        version: i64,
        known: i64,
    },
    /// The copy failed its integrity check.
    #[error("{path}: the copy is damaged: {report}")]
    Damaged { path: PathBuf, report: String },
    /// The copy's directory could not be synced.
    #[error(transparent)]
    Files(#[from] files::FilesError),
    /// The target is one of the appliance's own files.
    #[error("{path} is one of the appliance's own files (its database, the database's journal, the master key, the token or the lock): write the copy under another name")]
    OwnFile { path: PathBuf },
    /// The file system refused.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub schema_version: i64,
    pub tenants: i64,
    pub routers: i64,
    pub clients: i64,
}

/// Copies the state database `database` to `to` (replacing it only once the
/// copy is complete and checked) and says what the copy holds.
pub fn backup(database: &Path, to: &Path, own: &[PathBuf]) -> Result<Summary, BackupError> {
    let journal = |suffix: &str| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let mine = [database.to_owned(), journal("-wal"), journal("-shm")];
    if mine.iter().chain(own).any(|file| same_file(to, file)) {
        return Err(BackupError::OwnFile {
            path: to.to_owned(),
        });
    }
    let sqlite = |path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Sqlite { path, source }
    };
    // No migration and no write: the copy is the state as the running
    // appliance keeps it. Opened for writing all the same (never created):
    // when no appliance runs, this connection is the last to close and removes
    // the `-wal` and `-shm` files it made, which a read-only one would leave
    // behind, owned by whoever ran the backup.
    let source = Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(sqlite(database))?;
    source
        .busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite(database))?;
    let version = schema_version(&source).map_err(sqlite(database))?;
    if !(1..=schema::VERSION).contains(&version) {
        return Err(BackupError::NotState {
            path: database.to_owned(),
            version,
            known: schema::VERSION,
        });
    }
    let partial = partial_name(to);
    remove_if_there(&partial)?;
    let target = partial.to_string_lossy().into_owned();
    source
        .execute("VACUUM INTO ?1", [&target])
        .map_err(sqlite(database))?;
    drop(source);
    let checked = check(&partial);
    let summary = match checked {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io { what, path, source }
    };
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot sync", &partial))?;
    std::fs::rename(&partial, to).map_err(io("cannot rename to", to))?;
    files::sync_dir(files::parent_of(to))?;
    Ok(summary)
}

/// `to` names `file`: the same directory entry (whether or not it exists yet),
/// or another link to the same file.
fn same_file(to: &Path, file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(to), std::fs::metadata(file)) {
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            return true;
        }
    }
    let entry = |p: &Path| -> Option<PathBuf> {
        let dir = files::parent_of(p).canonicalize().ok()?;
        Some(dir.join(p.file_name()?))
    };
    matches!((entry(to), entry(file)), (Some(a), Some(b)) if a == b)
}

/// `<to>.partial`, where the copy is made and checked.
fn partial_name(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn remove_if_there(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BackupError::Io {
            what: "cannot remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Opens the copy, checks it whole and counts what it holds.
fn check(copy: &Path) -> Result<Summary, BackupError> {
    let sqlite = |source| BackupError::Sqlite {
        path: copy.to_owned(),
        source,
    };
    let conn =
        Connection::open_with_flags(copy, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite)?;
    let report: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sqlite)?;
    if report != "ok" {
        return Err(BackupError::Damaged {
            path: copy.to_owned(),
            report,
        });
    }
    let count = |table: &str| -> Result<i64, BackupError> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .map_err(sqlite)
    };
    Ok(Summary {
        schema_version: schema_version(&conn).map_err(sqlite)?,
        tenants: count("tenants")?,
        routers: count("routers")?,
        clients: count("clients")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MasterKey, Store};

    #[test]
    fn a_copy_of_a_live_database_holds_its_last_commit_and_opens_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = MasterKey::generate();
        let database = dir.path().join("state.db");
        let mut store = Store::open(&database, key.clone()).unwrap();
        crate::store::tests::save_all(&mut store, &crate::store::tests::provisioned());
        // The store stays open: its last commit may still sit in the WAL.
        let copy = dir.path().join("copy.db");
        let summary = backup(&database, &copy, &[]).unwrap();
        let counts = (summary.tenants, summary.routers, summary.clients);
        assert_eq!(counts, (1, 1, 1));
        assert_eq!(summary.schema_version, schema::VERSION);
        assert!(!partial_name(&copy).exists());
        let restored = Store::open(&copy, key).unwrap().load().unwrap();
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].clients.len(), 1);
        drop(store);
        // A wrong key does not open the copy.
        assert!(Store::open(&copy, MasterKey::generate()).is_err());
    }

    #[test]
    fn a_file_that_is_no_state_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); PRAGMA user_version = 99;")
            .unwrap();
        let copy = dir.path().join("copy.db");
        let e = backup(&other, &copy, &[]).unwrap_err();
        assert!(
            matches!(e, BackupError::NotState { version: 99, .. }),
            "{e}"
        );
        assert!(!copy.exists() && !partial_name(&copy).exists());
        let missing = backup(&dir.path().join("missing.db"), &copy, &[]).unwrap_err();
        assert!(matches!(missing, BackupError::Sqlite { .. }), "{missing}");
    }

    #[test]
    fn the_appliances_own_files_are_never_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("state.db");
        let master = MasterKey::generate();
        let mut store = Store::open(&database, master.clone()).unwrap();
        crate::store::tests::save_all(&mut store, &crate::store::tests::provisioned());
        let key = dir.path().join("master-key");
        std::fs::write(&key, "the key").unwrap();
        let link = dir.path().join("also-the-key");
        std::fs::hard_link(&key, &link).unwrap();
        let own = [key.clone(), dir.path().join("lock")];
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let targets = [
            database.clone(),
            dir.path().join("state.db-wal"),
            sub.join("../state.db-shm"),
            key.clone(),
            link,
            dir.path().join("lock"),
        ];
        for to in targets {
            let e = backup(&database, &to, &own).unwrap_err();
            assert!(matches!(e, BackupError::OwnFile { .. }), "{to:?}: {e}");
        }
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "the key");
        drop(store);
        let kept = Store::open(&database, master).unwrap().load().unwrap();
        assert_eq!(kept.len(), 1, "the database is untouched");
        // A name of its own beside them is fine.
        backup(&database, &dir.path().join("backup.db"), &own).unwrap();
    }
}
