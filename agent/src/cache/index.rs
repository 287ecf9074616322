//! The cache index: one redb file (`<dir>/index.redb`) with three tables.
//!
//! - `entries`: `id@version` → JSON record `{sha256, size, inserted_ms, last_used_ms,
//!   use_count, builtin, file}` (`file`: the builtin file, relative to `builtin/`).
//! - `progress`: content SHA-256 → the chunk indices of its partial download recorded as
//!   written and verified (little-endian `u32`s, sorted).
//! - `manifests`: content SHA-256 → its encoded manifest, for downloaded content (what
//!   lets a fetch find chunks it already holds, `reuse.rs`). A row whose file is gone is
//!   dropped the next time the rows are read.
//!
//! Every method is one redb transaction, durable when it returns. The index is a cache
//! of what is on disk: [`super::PluginCache::open`] reconciles it with the files, and a
//! damaged index file is moved aside and rebuilt from them.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use arcade_p2p::{ContentId, PluginRef};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::CacheError;

const ENTRIES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("entries");
const PROGRESS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("progress");
const MANIFESTS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("manifests");

/// One plugin version the cache holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub plugin: PluginRef,
    pub sha256: ContentId,
    pub size: u64,
    pub inserted_ms: u64,
    pub last_used_ms: u64,
    pub use_count: u64,
    pub builtin: bool,
    /// Builtin only: the file, relative to `builtin/`, `/`-separated.
    pub file: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    sha256: Hex,
    size: u64,
    inserted_ms: u64,
    last_used_ms: u64,
    use_count: u64,
    builtin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

/// A [`ContentId`] as 64 hex characters in JSON.
struct Hex(ContentId);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Hex).map_err(serde::de::Error::custom)
    }
}

fn encode(e: &Entry) -> Vec<u8> {
    let r = Record {
        sha256: Hex(e.sha256),
        size: e.size,
        inserted_ms: e.inserted_ms,
        last_used_ms: e.last_used_ms,
        use_count: e.use_count,
        builtin: e.builtin,
        file: e.file.clone(),
    };
    serde_json::to_vec(&r).expect("a record always serialises")
}

fn decode(key: &str, bytes: &[u8]) -> Result<Entry, CacheError> {
    let corrupt = |source: Box<dyn std::error::Error + Send + Sync>| CacheError::CorruptRecord {
        key: key.to_owned(),
        source,
    };
    let plugin = PluginRef::from_str(key).map_err(|e| corrupt(Box::new(e)))?;
    let r: Record = serde_json::from_slice(bytes).map_err(|e| corrupt(Box::new(e)))?;
    Ok(Entry {
        plugin,
        sha256: r.sha256.0,
        size: r.size,
        inserted_ms: r.inserted_ms,
        last_used_ms: r.last_used_ms,
        use_count: r.use_count,
        builtin: r.builtin,
        file: r.file,
    })
}

fn encode_chunks(chunks: &[u32]) -> Vec<u8> {
    let mut sorted = chunks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.iter().flat_map(|c| c.to_le_bytes()).collect()
}

fn decode_chunks(bytes: &[u8]) -> Vec<u32> {
    // A torn tail cannot happen (redb commits are atomic); ignore one anyway.
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `.db(path)?` turns any redb error into [`CacheError`] naming the index file.
trait DbResult<T> {
    fn db(self, path: &Path) -> Result<T, CacheError>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for Result<T, E> {
    fn db(self, path: &Path) -> Result<T, CacheError> {
        self.map_err(|e| CacheError::from_db(path, e.into()))
    }
}

/// The redb index of one cache directory.
pub(crate) struct CacheIndex {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for CacheIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheIndex")
            .field("path", &self.path)
            .finish()
    }
}

/// True for errors that mean the file is not (or no longer) a usable index, as opposed
/// to the file being locked by another process or the disk failing.
fn is_damaged(e: &redb::Error) -> bool {
    match e {
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::RepairAborted
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => true,
        _ => false,
    }
}

impl CacheIndex {
    fn try_open(path: &Path) -> Result<Self, redb::Error> {
        // Integrity check on open: a file damaged outside redb fails with `Corrupted`
        // instead of being trusted. The index is small, so reading it whole is cheap.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(ENTRIES)?;
        tx.open_table(PROGRESS)?;
        tx.open_table(MANIFESTS)?;
        tx.commit()?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    /// Opens (creating) the index. A damaged file is renamed to
    /// `<name>.corrupt-<now_ms>` and a fresh index is created; the new name is returned.
    pub(crate) fn open(path: &Path, now_ms: u64) -> Result<(Self, Option<PathBuf>), CacheError> {
        let first = std::panic::catch_unwind(|| Self::try_open(path)).unwrap_or_else(|_| {
            // redb asserts on some impossible states in debug builds; a file that
            // trips one is as damaged as one that fails its checksums.
            Err(redb::Error::Corrupted(
                "redb panicked while opening the index".into(),
            ))
        });
        match first {
            Ok(index) => Ok((index, None)),
            Err(e) if is_damaged(&e) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "index.redb".into());
                let aside = path.with_file_name(format!("{name}.corrupt-{now_ms}"));
                tracing::warn!(
                    index = %path.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "plugin cache index is damaged; moving it aside and rebuilding from disk"
                );
                std::fs::rename(path, &aside).map_err(|e| CacheError::from_io(path, None, e))?;
                let index = Self::try_open(path).db(path)?;
                Ok((index, Some(aside)))
            }
            Err(e) => Err(CacheError::from_db(path, e)),
        }
    }

    /// Every entry, ordered by `id@version`.
    pub(crate) fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(ENTRIES).db(p)?;
        let mut out = Vec::new();
        for row in table.iter().db(p)? {
            let (k, v) = row.db(p)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every decodable entry, plus the keys of records that cannot be decoded.
    pub(crate) fn entries_lossy(&self) -> Result<(Vec<Entry>, Vec<String>), CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(ENTRIES).db(p)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for row in table.iter().db(p)? {
            let (k, v) = row.db(p)?;
            match decode(k.value(), v.value()) {
                Ok(e) => good.push(e),
                Err(_) => bad.push(k.value().to_owned()),
            }
        }
        Ok((good, bad))
    }

    /// The entry of `id@version`.
    pub(crate) fn entry(&self, key: &str) -> Result<Option<Entry>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(ENTRIES).db(p)?;
        let row = table.get(key).db(p)?;
        row.map(|v| decode(key, v.value())).transpose()
    }

    /// Inserts or replaces an entry. With `published` (the content just moved into
    /// `downloaded/` and its encoded manifest), also drops that content's progress record
    /// and records its manifest, in the same transaction.
    pub(crate) fn put(
        &self,
        entry: &Entry,
        published: Option<(&ContentId, &[u8])>,
    ) -> Result<(), CacheError> {
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        {
            let mut table = tx.open_table(ENTRIES).db(p)?;
            table
                .insert(entry.plugin.key().as_str(), encode(entry).as_slice())
                .db(p)?;
            if let Some((sha, manifest)) = published {
                tx.open_table(PROGRESS)
                    .db(p)?
                    .remove(sha.as_bytes())
                    .db(p)?;
                tx.open_table(MANIFESTS)
                    .db(p)?
                    .insert(sha.as_bytes(), manifest)
                    .db(p)?;
            }
        }
        tx.commit().db(p)
    }

    /// Records one use of `key` (last use = `now_ms`, one more use); returns the
    /// updated entry, or `None` when there is no such entry.
    pub(crate) fn touch(&self, key: &str, now_ms: u64) -> Result<Option<Entry>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        let updated = {
            let mut table = tx.open_table(ENTRIES).db(p)?;
            let current = table
                .get(key)
                .db(p)?
                .map(|v| decode(key, v.value()))
                .transpose()?;
            match current {
                Some(mut e) => {
                    e.last_used_ms = now_ms;
                    e.use_count = e.use_count.saturating_add(1);
                    table.insert(key, encode(&e).as_slice()).db(p)?;
                    Some(e)
                }
                None => None,
            }
        };
        tx.commit().db(p)?;
        Ok(updated)
    }

    /// Removes entries (missing keys are ignored).
    pub(crate) fn remove(&self, keys: &[String]) -> Result<(), CacheError> {
        if keys.is_empty() {
            return Ok(());
        }
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        {
            let mut table = tx.open_table(ENTRIES).db(p)?;
            for key in keys {
                table.remove(key.as_str()).db(p)?;
            }
        }
        tx.commit().db(p)
    }

    /// The recorded chunks of a partial download (sorted; empty when none).
    pub(crate) fn progress(&self, sha: &ContentId) -> Result<Vec<u32>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(PROGRESS).db(p)?;
        let row = table.get(sha.as_bytes()).db(p)?;
        Ok(row.map(|v| decode_chunks(v.value())).unwrap_or_default())
    }

    /// Replaces the recorded chunks of a partial download.
    pub(crate) fn set_progress(&self, sha: &ContentId, chunks: &[u32]) -> Result<(), CacheError> {
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        tx.open_table(PROGRESS)
            .db(p)?
            .insert(sha.as_bytes(), encode_chunks(chunks).as_slice())
            .db(p)?;
        tx.commit().db(p)
    }

    /// Contents with a progress record.
    pub(crate) fn progress_keys(&self) -> Result<Vec<ContentId>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(PROGRESS).db(p)?;
        let mut out = Vec::new();
        for row in table.iter().db(p)? {
            out.push(ContentId::from_bytes(*row.db(p)?.0.value()));
        }
        Ok(out)
    }

    /// Drops progress records (missing ones are ignored).
    pub(crate) fn remove_progress(&self, shas: &[ContentId]) -> Result<(), CacheError> {
        if shas.is_empty() {
            return Ok(());
        }
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        {
            let mut table = tx.open_table(PROGRESS).db(p)?;
            for sha in shas {
                table.remove(sha.as_bytes()).db(p)?;
            }
        }
        tx.commit().db(p)
    }

    /// Every recorded manifest, encoded.
    pub(crate) fn manifests(&self) -> Result<Vec<(ContentId, Vec<u8>)>, CacheError> {
        let p = &self.path;
        let tx = self.db.begin_read().db(p)?;
        let table = tx.open_table(MANIFESTS).db(p)?;
        let mut out = Vec::new();
        for row in table.iter().db(p)? {
            let (k, v) = row.db(p)?;
            out.push((ContentId::from_bytes(*k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Drops manifests (missing ones are ignored).
    pub(crate) fn remove_manifests(&self, shas: &[ContentId]) -> Result<(), CacheError> {
        if shas.is_empty() {
            return Ok(());
        }
        let p = &self.path;
        let tx = self.db.begin_write().db(p)?;
        {
            let mut table = tx.open_table(MANIFESTS).db(p)?;
            for sha in shas {
                table.remove(sha.as_bytes()).db(p)?;
            }
        }
        tx.commit().db(p)
    }
}
