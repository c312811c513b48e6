//! The appliance's secrets on disk: the API token and the master key (read,
//! or made on the first start), and `rekey`, which seals the state under a
//! new master key.
//!
//! Left out: sealing itself and the state's rows (`wgplane::store`).

use std::path::Path;

use anyhow::{Context, Result};

use wgplane::config::Settings;
use wgplane::keys::{self, SecretKey};
use wgplane::store::files::{write_private, StateLock};
use wgplane::store::{MasterKey, Store};

/// `wgplane rekey`: the state's private and preshared keys sealed under the key in
/// `new_key_file` (made there when missing), with the appliance stopped.
pub(crate) fn rekey(settings: &Settings, new_key_file: &Path) -> Result<()> {
    let database = settings.database();
    anyhow::ensure!(
        database.exists(),
        "no state database at {}",
        database.display()
    );
    // Refused while an appliance runs on the directory: it holds the keys
    // under the current master key.
    let _lock = StateLock::acquire(&settings.state.dir)?;
    let current = load_master_key(settings)?;
    let new = match std::fs::read_to_string(new_key_file) {
        Ok(text) => decode_master_key(&text, &new_key_file.display().to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKey::generate();
            write_private(new_key_file, &keys::encode(&key.to_bytes()))?;
            println!("new master key written to {}", new_key_file.display());
            key
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", new_key_file.display())),
    };
    let mut store = Store::open(&database, current)
        .with_context(|| format!("cannot open {}", database.display()))?;
    let count = store.rekey(new)?;
    println!(
        "{count} keys (private and preshared) sealed under the new master key; from now on only it opens {}: \
         put it in {} or ${} before the next start, and keep the old key for backups made before",
        database.display(),
        settings.master_key_file().display(),
        settings.state.master_key_env
    );
    // The copies kept before upgrades are sealed under the old key, which
    // whoever the rekey is against may still hold.
    for copy in copies_before_upgrades(&database) {
        println!(
            "{} (kept before an upgrade) is still sealed under the old key: delete it once the \
             upgrade has proved itself, or keep it as safe as the old key",
            copy.display()
        );
    }
    Ok(())
}

/// The copies of `database` kept before schema upgrades (`state.db.v<N>`).
fn copies_before_upgrades(database: &Path) -> Vec<std::path::PathBuf> {
    let (Some(dir), Some(name)) = (database.parent(), database.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.v", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }) else {
        return Vec::new();
    };
    let mut copies: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let file = e.file_name();
            let file = file.to_string_lossy();
            file.strip_prefix(&prefix)
                .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    copies.sort();
    copies
}

/// Reads the API token, creating it (mode 0600, random) on first start.
pub(crate) fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => anyhow::bail!("API token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let token = SecretKey::generate()
        .to_base64()
        .replace(['+', '/', '='], "");
    write_private(path, &token)?;
    tracing::info!(path = %path.display(), "created a new API token");
    Ok(token)
}

/// A master key as its file or variable holds it; `origin` names which.
pub(crate) fn decode_master_key(text: &str, origin: &str) -> Result<MasterKey> {
    let bytes = keys::decode(text)
        .with_context(|| format!("{origin} does not hold a base64 32-byte master key"))?;
    Ok(MasterKey::from_bytes(bytes))
}

/// The master key: from the variable named in the config, else from the key file;
/// generated into the file only when there is no state yet to open.
pub(crate) fn load_master_key(settings: &Settings) -> Result<MasterKey> {
    let var = &settings.state.master_key_env;
    match std::env::var(var) {
        Ok(text) => return decode_master_key(&text, &format!("environment variable {var}")),
        // Set, but not text: never taken as unset (a new key would be made).
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("environment variable {var} does not hold a base64 32-byte master key")
        }
        Err(std::env::VarError::NotPresent) => {}
    }
    let file = settings.master_key_file();
    match std::fs::read_to_string(&file) {
        Ok(text) => return decode_master_key(&text, &file.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
    if settings.database().exists() {
        anyhow::bail!(
            "state {} exists but its master key is missing: set {var} or restore {}",
            settings.database().display(),
            file.display()
        );
    }
    let key = MasterKey::generate();
    write_private(&file, &keys::encode(&key.to_bytes()))?;
    tracing::warn!(path = %file.display(), "generated a new master key: keep a copy, the state cannot be opened without it");
    Ok(key)
}
