//! The state directory's own files, beside the database: the lock that keeps a
//! second appliance out of it, and the private files (API token, master key)
//! written so that a kill or a power loss at any moment leaves either no file or
//! the whole one.
//!
//! The database's own durability is SQLite's (`super`); this module leaves it out.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a state file could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Another process holds the state directory.
    #[error("another wgplane is running on the state directory {0} (its lock file is held); stop it or use another directory")]
    Locked(PathBuf),
    /// The file system refused.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FilesError + 'a {
    move |source| FilesError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An exclusive hold on a state directory, released when dropped (or when the
/// process dies: it is a `flock`, not a PID file that could go stale).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Creates `dir` if needed and locks it, or says who holds it. Two appliances
    /// on one directory would each keep their own registry over one database.
    pub fn acquire(dir: &Path) -> Result<Self, FilesError> {
        create_dir(dir)?;
        let path = dir.join("lock");
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(io("cannot open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(FilesError::Locked(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(io("cannot lock", &path)(e)),
        }
    }
}

/// Creates `dir` and any missing parents, and syncs each new directory's entry
/// into its parent, so that a power loss after a later write cannot take the
/// directory (and what was written into it) away.
pub fn create_dir(dir: &Path) -> Result<(), FilesError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        at = d.parent();
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    for d in missing.iter().rev() {
        sync_dir(parent_of(d))?;
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the entries of `dir` (a new, renamed or removed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", dir))
}

/// Creates `path` with mode 0600 holding `text` and a newline. The text is
/// written and synced under a temporary name, linked to `path` (which fails if
/// `path` exists: nothing is ever overwritten), and the temporary name is
/// removed, each step synced into the directory. Temporary files that an earlier
/// process left when it died half-way are removed first: they may hold a key.
pub fn write_private(path: &Path, text: &str) -> Result<(), FilesError> {
    let dir = parent_of(path);
    create_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_leftovers(dir, &name)?;
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp).map_err(io("cannot create", &temp))?;
        writeln!(file, "{text}")
            .and_then(|()| file.sync_all())
            .map_err(io("cannot write", &temp))?;
        std::fs::hard_link(&temp, path).map_err(io("cannot create", path))?;
        sync_dir(dir)
    })();
    let removed = std::fs::remove_file(&temp)
        .map_err(io("cannot remove", &temp))
        .and_then(|()| sync_dir(dir));
    written.and(removed)
}

/// Removes what [`write_private`] may have left beside `path` when it was
/// killed (a temporary copy of a key or token), whether or not `path` itself
/// was written. A directory that does not exist holds nothing to remove.
pub fn remove_temporaries_of(path: &Path) -> Result<(), FilesError> {
    let dir = parent_of(path);
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    if !dir.exists() {
        return Ok(());
    }
    // A directory one may enter but not list (a root-owned 0711 one for
    // secrets) cannot have had them written by this user either.
    if let Err(e) = std::fs::read_dir(dir) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Ok(());
        }
    }
    remove_leftovers(dir, &name.to_string_lossy())
}

/// Removes `.{name}.*.tmp` in `dir`: what `write_private` leaves when killed.
fn remove_leftovers(dir: &Path, name: &str) -> Result<(), FilesError> {
    let prefix = format!(".{name}.");
    let mut removed = false;
    for entry in std::fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with(&prefix) && file_name.ends_with(".tmp") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("a/b/state");
        let first = StateLock::acquire(&state).expect("first");
        assert!(state.is_dir());
        match StateLock::acquire(&state) {
            Err(FilesError::Locked(p)) => assert_eq!(p, state),
            other => panic!("second holder: {other:?}"),
        }
        drop(first);
        StateLock::acquire(&state).expect("free again");
    }

    #[test]
    fn private_files_are_whole_never_overwritten_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/master-key");
        // What a process killed between writing and linking leaves behind.
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(dir.path().join("keys/.master-key.4242.tmp"), "old secret\n")
            .expect("leftover");
        std::fs::write(dir.path().join("keys/other"), "kept\n").expect("other");

        write_private(&path, "secret").expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut names: Vec<String> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["master-key", "other"]);

        match write_private(&path, "another") {
            Err(FilesError::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists)
            }
            other => panic!("overwrite: {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret\n");
    }

    #[test]
    fn a_temporary_left_beside_a_complete_file_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("master-key");
        write_private(&key, "the key").unwrap();
        let left = dir.path().join(".master-key.4242.tmp");
        std::fs::write(&left, "the key").unwrap();
        let other = dir.path().join(".api-token.4242.tmp");
        std::fs::write(&other, "a token").unwrap();
        remove_temporaries_of(&key).unwrap();
        assert!(!left.exists(), "the second copy of the key is gone");
        assert!(other.exists(), "only the named file's temporaries go");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "the key\n");
        remove_temporaries_of(&dir.path().join("nowhere/master-key")).unwrap();
    }
}
