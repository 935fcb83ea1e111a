//! Business root keys: the keys courier manages on each business's behalf, from which
//! every recipient's sealing key is derived (`courier_pipeline::seal::DerivedKeys`).
//!
//! `DATA_DIR/business-keys` holds one line per business, `<id> <hex of the wrapped key>`;
//! each root key is 32 random bytes wrapped by the master key (AES-256-GCM, the business
//! id bound in the associated data). The file is replaced atomically (temporary file,
//! fsync, rename, directory fsync). On start a root key is created for every registered
//! business that has none, before anything is sealed for it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::{
    unwrap_root_key, wrap_root_key, DerivedKeys, RootKey, WrappedRootKey, WRAPPED_ROOT_KEY_BYTES,
};

use crate::store::MasterKeyText;

/// The file name under the data directory.
pub const FILE_NAME: &str = "business-keys";

pub(crate) fn parse(text: &str) -> Result<BTreeMap<u32, WrappedRootKey>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| format!("{FILE_NAME} line {}: {what}", n + 1);
        let (id, hexed) = line
            .split_once(' ')
            .ok_or_else(|| bad("expected `<id> <hex>`"))?;
        let id: u32 = id.parse().map_err(|_| bad("the id is not a number"))?;
        let mut bytes = [0u8; WRAPPED_ROOT_KEY_BYTES];
        hex::decode_to_slice(hexed, &mut bytes)
            .map_err(|_| bad("the key is not 120 hex digits"))?;
        if out.insert(id, WrappedRootKey::from_bytes(bytes)).is_some() {
            return Err(bad("a second key for the same business"));
        }
    }
    Ok(out)
}

/// Loads the root keys of `data_dir`, creating (and durably persisting) one for every
/// business of `registry` that has none, and returns every key unwrapped, ready for the
/// shards' sealers. Fails when a key does not unwrap (wrong master key, damaged file).
pub fn load_or_create(
    data_dir: &Path,
    master: &MasterKeyText,
    registry: &Registry,
) -> Result<Arc<DerivedKeys>, String> {
    let path = data_dir.join(FILE_NAME);
    if path.exists() {
        crate::store::check_private_file(&path)?;
    }
    let mut wrapped = match fs::read_to_string(&path) {
        Ok(text) => parse(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let master_bytes = master.key_bytes();
    let mut created = 0;
    for b in registry.iter() {
        if let std::collections::btree_map::Entry::Vacant(slot) = wrapped.entry(b.id) {
            let root = RootKey::generate(&mut rand::rng());
            slot.insert(wrap_root_key(&master_bytes, b.id, &root, &mut rand::rng()));
            created += 1;
        }
    }
    if created > 0 {
        crate::store::write_file_atomically(&path, render(&wrapped).as_bytes(), 0o600)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(created, "created business root keys");
    }
    let mut keys = DerivedKeys::new();
    for (id, w) in &wrapped {
        let root = unwrap_root_key(&master_bytes, *id, w)
            .map_err(|e| format!("{}: business {id}: {e} (wrong master key?)", path.display()))?;
        keys.insert_root(*id, &root);
    }
    Ok(Arc::new(keys))
}

/// Loads the root keys `data_dir` holds, creating none (the offline tools: `courier log
/// expire` reads its records' user fields with them, as the server would). No file: no
/// keys. Fails when a key does not unwrap (wrong master key, damaged file).
pub fn load(data_dir: &Path, master: &MasterKeyText) -> Result<Arc<DerivedKeys>, String> {
    load_or_create(data_dir, master, &Registry::default())
}

/// The file's text for `wrapped` (one line per business, ids ascending).
pub(crate) fn render(wrapped: &BTreeMap<u32, WrappedRootKey>) -> String {
    let mut text = String::new();
    for (id, w) in wrapped {
        text.push_str(&format!("{id} {}\n", hex::encode(w.as_bytes())));
    }
    text
}
