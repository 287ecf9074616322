//! The agent's verified plugin cache (`plugins.directory`).
//!
//! ```text
//! <dir>/builtin/              pre-installed plugins named in the agent config
//! <dir>/downloaded/<64 hex>   verified content, named by its SHA-256
//! <dir>/temp/<64 hex>.part    partial downloads (resumable)
//! <dir>/index.redb            the index: entries (id@version → content), progress and
//!                             the manifests of downloaded content
//! ```
//!
//! Bytes only enter `downloaded/` by [`PluginCache::publish`]: checked against the
//! manifest's size and SHA-256 in `temp/`, fsynced, then renamed into place, so nothing
//! under `downloaded/` ever fails its SHA-256. [`PluginCache::open`] re-hashes
//! `downloaded/` and reconciles the index with it; a damaged index is rebuilt. Eviction
//! (TTL, then size by LRU/LFU/FIFO) never touches builtin or pinned plugins; the policy
//! itself is the I/O-free [`eviction`] module. A fetch first copies the chunks it
//! needs that held content already has ([`PluginCache::reuse_held_chunks`], `reuse.rs`). The crash model and the rules are in
//! `DESIGN.md` beside this file.
//!
//! Every method blocks (hashing, fsync, redb commits): async callers run them through
//! `spawn_blocking`. The handle is cheap to clone and shares one index and one pin table.

mod eviction;
mod index;
mod reuse;

pub use reuse::Reused;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arcade_p2p::manifest::{MAX_CHUNK_SIZE, VerifyError, verify_sha256};
use arcade_p2p::{ContentId, Manifest, PluginId, PluginRef};
use serde::{Deserialize, Serialize};

use eviction::{Candidate, Limits};
use index::{CacheIndex, Entry};

const BUILTIN_DIR: &str = "builtin";
const DOWNLOADED_DIR: &str = "downloaded";
const TEMP_DIR: &str = "temp";
const INDEX_FILE: &str = "index.redb";
const PART_SUFFIX: &str = ".part";

/// Which unpinned downloads go first when the cache is over `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    /// Least recently used first.
    #[default]
    Lru,
    /// Least frequently used first (ties: least recently used).
    Lfu,
    /// Oldest download first.
    Fifo,
}

/// What the watermarks are fractions of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkBase {
    /// `cache.max_size`.
    #[default]
    MaxSize,
    /// The size of the file system holding the cache (`max_size` still caps both marks).
    Filesystem,
}

/// When size eviction starts and where it stops, as fractions (0 < low ≤ high ≤ 1) of
/// `of`. Only the cache's own downloaded bytes count against them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watermarks {
    /// Eviction starts when the downloaded bytes exceed this share…
    pub high: f64,
    /// …and stops once they are at most this share.
    pub low: f64,
    /// Of what.
    pub of: WatermarkBase,
}

impl Default for Watermarks {
    /// Evict when over `max_size`, down to `max_size` (the original design).
    fn default() -> Self {
        Self {
            high: 1.0,
            low: 1.0,
            of: WatermarkBase::MaxSize,
        }
    }
}

/// Limits of the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheOptions {
    /// Most bytes of distinct downloaded content to keep (builtin plugins not counted).
    pub max_size: u64,
    /// Order in which unpinned downloads are removed when over the high mark.
    pub eviction: EvictionPolicy,
    /// Downloads unused for longer than this are removed.
    pub ttl: Option<Duration>,
    /// The high and low marks of size eviction.
    pub watermarks: Watermarks,
}

/// A plugin version the cache holds, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPlugin {
    /// Which plugin version.
    pub plugin: PluginRef,
    /// Its content (SHA-256).
    pub sha256: ContentId,
    /// Its size in bytes.
    pub size: u64,
    /// The executable file.
    pub path: PathBuf,
    /// Pre-installed (under `builtin/`), never evicted.
    pub builtin: bool,
}

/// Why an entry was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// The cache was over `max_size`.
    Size,
    /// Unused for longer than `ttl`.
    Ttl,
}

/// A plugin version eviction removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictedEntry {
    /// Which plugin version.
    pub plugin: PluginRef,
    /// Its content. The file is deleted only with the last entry referencing it.
    pub sha256: ContentId,
    /// Content size in bytes.
    pub size: u64,
    /// Why.
    pub reason: EvictReason,
}

/// What the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Bytes of distinct content under `downloaded/` (what `max_size` bounds).
    pub downloaded_bytes: u64,
    /// Index entries (plugin versions), downloaded and builtin.
    pub entries: usize,
    /// Entries evicted since open because the cache was over `max_size`.
    pub evicted_by_size: u64,
    /// Entries evicted since open because they were unused for `ttl`.
    pub evicted_by_ttl: u64,
}

/// A plugin cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file operation failed (`path` is empty when the caller did not name it).
    #[error("plugin cache I/O failed{}: {source}", path_note(.path))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The file system is full (ENOSPC) or the quota is exhausted (EDQUOT).
    #[error(
        "no space left for the plugin cache{}{}: {source}; free disk space or lower cache.max_size",
        path_note(.path),
        needed_note(*.needed)
    )]
    DiskFull {
        /// The file or directory being written.
        path: PathBuf,
        /// Bytes the operation needed, when known.
        needed: Option<u64>,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The redb index failed.
    #[error("plugin cache index {} failed: {source}", .path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: redb::Error,
    },
    /// An index record cannot be decoded.
    #[error("plugin cache index record {key:?} is corrupt: {source}")]
    CorruptRecord {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A builtin plugin file is not a regular file inside `builtin/`.
    #[error(
        "builtin plugin file {file:?} is not allowed: {reason}; builtin files are relative paths inside {}",
        .dir.display()
    )]
    BuiltinPath {
        /// The path as configured.
        file: String,
        /// The `builtin/` directory.
        dir: PathBuf,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// Downloaded content does not match its manifest; the partial download and its
    /// progress were discarded.
    #[error("downloaded content of {plugin} failed verification and was discarded: {source}")]
    Verify {
        /// Which plugin version.
        plugin: PluginRef,
        /// Size or SHA-256 mismatch.
        #[source]
        source: Box<VerifyError>,
    },
    /// `publish` found no partial download to publish.
    #[error("no partial download of {plugin} at {}: download it before publishing", .path.display())]
    MissingPartial {
        /// Which plugin version.
        plugin: PluginRef,
        /// Where the partial was expected.
        path: PathBuf,
    },
}

fn path_note(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" at {}", path.display())
    }
}

fn needed_note(needed: Option<u64>) -> String {
    match needed {
        Some(n) => format!(" ({n} bytes needed)"),
        None => String::new(),
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    // ENOSPC / EDQUOT
    matches!(e.raw_os_error(), Some(28) | Some(122)) || e.kind() == io::ErrorKind::StorageFull
}

impl CacheError {
    /// An I/O failure on `path`; ENOSPC/EDQUOT become [`CacheError::DiskFull`] naming
    /// `needed` bytes when known.
    pub(crate) fn from_io(path: &Path, needed: Option<u64>, source: io::Error) -> Self {
        let path = path.to_owned();
        if is_disk_full(&source) {
            Self::DiskFull {
                path,
                needed,
                source,
            }
        } else {
            Self::Io { path, source }
        }
    }

    pub(crate) fn from_db(path: &Path, source: redb::Error) -> Self {
        match source {
            redb::Error::Io(io) if is_disk_full(&io) => Self::DiskFull {
                path: path.to_owned(),
                needed: None,
                source: io,
            },
            source => Self::Index {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// An I/O failure whose path the caller did not name (ENOSPC/EDQUOT still become
/// [`CacheError::DiskFull`]). Prefer [`CacheError::from_io`], which names the file.
impl From<io::Error> for CacheError {
    fn from(e: io::Error) -> Self {
        Self::from_io(Path::new(""), None, e)
    }
}

/// `.at(path)?` for I/O results.
trait IoResult<T> {
    fn at(self, path: &Path) -> Result<T, CacheError>;
}

impl<T> IoResult<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, CacheError> {
        self.map_err(|e| CacheError::from_io(path, None, e))
    }
}

type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free step; a panic
    // elsewhere does not make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `<64 lowercase hex>` → content id (only names the cache itself writes).
fn parse_hex_name(name: &str) -> Option<ContentId> {
    let lower_hex = name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if lower_hex { name.parse().ok() } else { None }
}

/// (size, bytes an unprivileged writer may still use) of the file system holding
/// `dir`, or `None` when it reports no capacity (nothing can be told then).
fn file_system(dir: &Path) -> io::Result<Option<(u64, u64)>> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    if st.blocks() == 0 {
        return Ok(None);
    }
    let unit = (st.fragment_size() as u64).max(1);
    Ok(Some((
        (st.blocks() as u64).saturating_mul(unit),
        (st.blocks_available() as u64).saturating_mul(unit),
    )))
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn free_space(dir: &Path) -> io::Result<Option<u64>> {
    Ok(file_system(dir)?.map(|(_, free)| free))
}

/// Bytes of the file system holding `dir`.
fn capacity(dir: &Path) -> io::Result<Option<u64>> {
    Ok(file_system(dir)?.map(|(size, _)| size))
}

/// [`CacheError::DiskFull`] naming `needed` when `free` (if known) is less.
fn require_space(path: &Path, needed: u64, free: Option<u64>) -> Result<(), CacheError> {
    match free {
        Some(free) if free < needed => Err(CacheError::DiskFull {
            path: path.to_owned(),
            needed: Some(needed),
            source: io::Error::new(
                io::ErrorKind::StorageFull,
                format!("only {free} bytes are free on its file system"),
            ),
        }),
        _ => Ok(()),
    }
}

fn remove_file_if_exists(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::from_io(path, None, e)),
        _ => Ok(()),
    }
}

fn remove_any(path: &Path, is_dir: bool) -> Result<(), CacheError> {
    let r = if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::from_io(path, None, e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(unix)]
fn mode_of(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).at(path)
}

#[cfg(not(unix))]
fn mode_of(_meta: &fs::Metadata) -> u32 {
    0o755
}

#[cfg(not(unix))]
fn set_executable(_path: &Path) -> Result<(), CacheError> {
    Ok(())
}

/// What a file looked like when its SHA-256 last matched: any write, truncation,
/// replacement (another inode) or `chmod` changes it — `ctime` cannot be set back by a
/// process, unlike `mtime`. A cached plugin whose stamp changed is hashed again before
/// it may run (`PluginCache::get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    mode: u32,
}

#[cfg(unix)]
fn stamp_of(meta: &fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        mode: meta.mode(),
    }
}

#[cfg(not(unix))]
fn stamp_of(meta: &fs::Metadata) -> FileStamp {
    FileStamp {
        dev: 0,
        ino: 0,
        size: meta.len(),
        mtime_ns: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128),
        ctime_ns: 0,
        mode: 0,
    }
}

/// Downloaded content is read-only and executable (0555): a job running as the agent's
/// user could still `chmod` it, which changes its stamp.
#[cfg(unix)]
fn set_read_only_executable(path: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o555)).at(path)
}

#[cfg(not(unix))]
fn set_read_only_executable(_path: &Path) -> Result<(), CacheError> {
    Ok(())
}

fn mtime_ms(meta: &fs::Metadata) -> Option<u64> {
    let t = meta.modified().ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// A plugin version pinned against eviction; dropping it unpins.
#[must_use = "the plugin is unpinned as soon as the guard is dropped"]
pub struct PinGuard {
    inner: Arc<Inner>,
    key: String,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PinGuard").field(&self.key).finish()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = lock(&self.inner.pins);
        if let Some(n) = pins.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// The verified plugin cache of one agent. See the module documentation.
#[derive(Clone)]
pub struct PluginCache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    builtin_dir: PathBuf,
    /// `builtin_dir` with symbolic links resolved, for containment checks.
    builtin_root: PathBuf,
    downloaded_dir: PathBuf,
    temp_dir: PathBuf,
    index: CacheIndex,
    opts: CacheOptions,
    clock: Clock,
    /// Serialises everything that changes files under `downloaded/` together with the
    /// index (get's bookkeeping, publish's rename, eviction), so eviction never deletes
    /// a file between a lookup and its use of a pinned plugin.
    writer: Mutex<()>,
    /// id@version → pin count.
    pins: Mutex<HashMap<String, usize>>,
    /// Builtin entries checked by `register_builtin` since open; others are not served.
    verified_builtins: Mutex<HashSet<String>>,
    /// Path → its stamp when its SHA-256 last matched (in memory: `open` re-hashes every
    /// downloaded file, `register_builtin` every builtin).
    stamps: Mutex<HashMap<PathBuf, FileStamp>>,
    /// Entries evicted since open, by reason.
    evicted_by_size: std::sync::atomic::AtomicU64,
    evicted_by_ttl: std::sync::atomic::AtomicU64,
    /// Where held content has each chunk (`reuse.rs`); rebuilt after a publish.
    chunk_index: Mutex<Option<Arc<reuse::ChunkIndex>>>,
}

impl std::fmt::Debug for PluginCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCache")
            .field("dir", &self.inner.dir)
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// An entry or an unindexed file of `downloaded/`, as eviction sees them.
enum Slot<'a> {
    Entry(&'a Entry),
    Orphan(ContentId),
}

impl PluginCache {
    /// Opens the cache under `dir`: creates `builtin/`, `downloaded/` and `temp/`, opens
    /// (or rebuilds) the index and reconciles it with the files (see `DESIGN.md`).
    /// Re-hashes everything under `downloaded/`, so it takes time on a large cache.
    pub fn open(dir: &Path, opts: CacheOptions) -> Result<Self, CacheError> {
        Self::open_with_clock(dir, opts, system_now_ms)
    }

    /// [`PluginCache::open`] with a wall clock in Unix milliseconds supplied by the
    /// caller (tests and simulations control time with it).
    pub fn open_with_clock(
        dir: &Path,
        opts: CacheOptions,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self, CacheError> {
        let dir = std::path::absolute(dir).at(dir)?;
        let builtin_dir = dir.join(BUILTIN_DIR);
        let downloaded_dir = dir.join(DOWNLOADED_DIR);
        let temp_dir = dir.join(TEMP_DIR);
        arcade_p2p::settings::private_dir(&dir).at(&dir)?;
        for d in [&builtin_dir, &downloaded_dir, &temp_dir] {
            fs::create_dir_all(d).at(d)?;
        }
        let builtin_root = fs::canonicalize(&builtin_dir).at(&builtin_dir)?;
        let (index, moved) = CacheIndex::open(&dir.join(INDEX_FILE), clock())?;
        let index_file = dir.join(INDEX_FILE);
        arcade_p2p::settings::restrict(&index_file, 0o600).at(&index_file)?;
        let inner = Inner {
            dir,
            builtin_dir,
            builtin_root,
            downloaded_dir,
            temp_dir,
            index,
            opts,
            clock: Box::new(clock),
            writer: Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            verified_builtins: Mutex::new(HashSet::new()),
            stamps: Mutex::new(HashMap::new()),
            evicted_by_size: Default::default(),
            evicted_by_ttl: Default::default(),
            chunk_index: Mutex::new(None),
        };
        inner.reconcile(moved.is_some())?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The cache root.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Registers the pre-installed plugin `file` (a relative path under `builtin/`):
    /// hashes it, makes it executable (mode 0755) if it is not, and records it as a
    /// builtin entry, which is never evicted. Absolute paths, `..` and anything that
    /// resolves outside `builtin/` are refused.
    pub fn register_builtin(
        &self,
        plugin: &PluginRef,
        file: &str,
    ) -> Result<CachedPlugin, CacheError> {
        let inner = &*self.inner;
        let rel = inner.builtin_relative(file)?;
        let path = inner.builtin_dir.join(&rel);
        let real = fs::canonicalize(&path).at(&path)?;
        if !real.starts_with(&inner.builtin_root) {
            return Err(inner.builtin_path_error(file, "it resolves outside builtin/"));
        }
        let meta = fs::metadata(&real).at(&real)?;
        if !meta.is_file() {
            return Err(inner.builtin_path_error(file, "it is not a regular file"));
        }
        if mode_of(&meta) & 0o100 == 0 {
            set_executable(&real)?;
        }
        let before = fs::metadata(&real).at(&real)?;
        let reader = File::open(&real).at(&real)?;
        // The one streaming hasher of the content model (its BLAKE3 side is cheap).
        let manifest = Manifest::from_reader(reader, MAX_CHUNK_SIZE).map_err(|e| match e {
            arcade_p2p::manifest::BuildError::Io(e) => CacheError::from_io(&real, None, e),
            other => CacheError::from_io(&real, None, io::Error::other(other)),
        })?;

        let key = plugin.key();
        let _w = lock(&inner.writer);
        let now = inner.now();
        let previous = inner.index.entry(&key)?;
        let keep = previous
            .filter(|p| p.builtin && p.sha256 == manifest.content_id())
            .map(|p| (p.inserted_ms, p.last_used_ms, p.use_count));
        let (inserted_ms, last_used_ms, use_count) = keep.unwrap_or((now, now, 0));
        let entry = Entry {
            plugin: plugin.clone(),
            sha256: manifest.content_id(),
            size: manifest.size(),
            inserted_ms,
            last_used_ms,
            use_count,
            builtin: true,
            file: Some(rel.clone()),
        };
        inner.index.put(&entry, None)?;
        lock(&inner.verified_builtins).insert(key);
        // Known good only if it did not change while it was hashed.
        if let Ok(after) = fs::metadata(&path) {
            if stamp_of(&before) == stamp_of(&after) {
                inner.remember_verified(&path, &after);
            }
        }
        tracing::info!(plugin = %plugin, sha256 = %entry.sha256, size = entry.size, file = %path.display(), "builtin plugin registered");
        Ok(CachedPlugin {
            plugin: plugin.clone(),
            sha256: entry.sha256,
            size: entry.size,
            path,
            builtin: true,
        })
    }

    /// The cached plugin version with content `sha256`, or `None`. A hit records a use.
    /// Content already under `downloaded/` counts even when the index does not name
    /// this version (after an index rebuild, or content shared between versions).
    /// Pin the plugin before calling this so eviction cannot remove it before it runs.
    pub fn get(
        &self,
        plugin: &PluginRef,
        sha256: &ContentId,
    ) -> Result<Option<CachedPlugin>, CacheError> {
        let inner = &*self.inner;
        let key = plugin.key();
        let _w = lock(&inner.writer);
        let now = inner.now();
        let known = inner.index.entry(&key)?;
        if let Some(e) = known.as_ref().filter(|e| e.sha256 == *sha256) {
            if e.builtin && inner.is_verified_builtin(&key) {
                let verified = match inner.cached(e) {
                    Some(c) => inner.still_verified(&c.path, sha256, e.size)?,
                    None => false,
                };
                return if verified {
                    inner.touch_hit(&key, now)
                } else {
                    tracing::warn!(plugin = %plugin, "builtin plugin file is gone or changed since it was verified; dropping its entry");
                    inner.index.remove(std::slice::from_ref(&key))?;
                    lock(&inner.verified_builtins).remove(&key);
                    Ok(None)
                };
            }
            if !e.builtin {
                let path = inner.content_path(sha256);
                if inner.still_verified(&path, sha256, e.size)? {
                    return inner.touch_hit(&key, now);
                }
                // Gone, or not what was verified (rewritten, replaced, truncated): drop
                // file and entry; the caller fetches and verifies it again.
                tracing::warn!(plugin = %plugin, file = %path.display(), "cached content is gone or changed since it was verified; removing it");
                remove_file_if_exists(&path)?;
                inner.index.remove(std::slice::from_ref(&key))?;
                return Ok(None);
            }
        }
        // Not indexed under this digest: the content may still be on disk — verified
        // (it has a stamp, or its SHA-256 matches now) before it is indexed, so a file
        // planted under a digest's name is never taken for that content.
        let path = inner.content_path(sha256);
        let size = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return Ok(None),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(CacheError::from_io(&path, None, err)),
        };
        if !inner.still_verified(&path, sha256, size)? {
            tracing::warn!(plugin = %plugin, file = %path.display(), "a file under a content's name does not hold that content; removing it");
            remove_file_if_exists(&path)?;
            return Ok(None);
        }
        let entry = Entry {
            plugin: plugin.clone(),
            sha256: *sha256,
            size,
            inserted_ms: now,
            last_used_ms: now,
            use_count: 1,
            builtin: false,
            file: None,
        };
        inner.index.put(&entry, None)?;
        tracing::debug!(plugin = %plugin, sha256 = %sha256, "content found on disk by digest; indexed");
        Ok(Some(inner.downloaded(&entry)))
    }

    /// The highest other version of plugin `id` the cache holds (downloaded or builtin),
    /// e.g. as a fallback when `not` cannot be had.
    pub fn newest_other_version(
        &self,
        id: &PluginId,
        not: &semver::Version,
    ) -> Result<Option<CachedPlugin>, CacheError> {
        let inner = &*self.inner;
        Ok(inner
            .index
            .entries()?
            .iter()
            .filter(|e| e.plugin.id == *id && e.plugin.version != *not)
            .filter_map(|e| inner.cached(e))
            .filter(|c| {
                // A fallback runs too: only content still verified.
                inner
                    .still_verified(&c.path, &c.sha256, c.size)
                    .unwrap_or(false)
            })
            .max_by(|a, b| a.plugin.version.cmp(&b.plugin.version)))
    }

    /// Every plugin version the cache can run now (downloaded and builtin), by id@version.
    pub fn installed(&self) -> Result<Vec<CachedPlugin>, CacheError> {
        let inner = &*self.inner;
        Ok(inner
            .index
            .entries()?
            .iter()
            .filter_map(|e| inner.cached(e))
            .collect())
    }

    /// Where the partial download of `sha256` lives: `temp/<64 hex>.part`.
    pub fn partial_path(&self, sha256: &ContentId) -> PathBuf {
        self.inner.partial_path(sha256)
    }

    /// Checks, before a download writes its partial file, that the file system of
    /// `temp/` has room for what `manifest`'s content still needs (its size minus what
    /// an earlier partial already occupies). Fails with [`CacheError::DiskFull`]
    /// naming the bytes needed, so a plugin that cannot fit fails at once, before it
    /// fills the disk the next jobs need. A file system that reports no capacity at all
    /// (some FUSE mounts) is not checked: the writes then fail with ENOSPC instead.
    pub fn check_space(&self, manifest: &Manifest) -> Result<(), CacheError> {
        use std::os::unix::fs::MetadataExt as _;
        let inner = &*self.inner;
        let partial = inner.partial_path(&manifest.content_id());
        let allocated = match fs::metadata(&partial) {
            Ok(meta) => meta.blocks().saturating_mul(512),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(CacheError::from_io(&partial, None, e)),
        };
        let needed = manifest.size().saturating_sub(allocated);
        let free = free_space(&inner.temp_dir).at(&inner.temp_dir)?;
        require_space(&partial, needed, free)
    }

    /// Chunk indices recorded as written and verified for the partial download of
    /// `sha256` (sorted; empty when none). A hint: re-verify them before trusting them.
    pub fn load_progress(&self, sha256: &ContentId) -> Result<Vec<u32>, CacheError> {
        self.inner.index.progress(sha256)
    }

    /// Replaces the recorded chunks of the partial download of `sha256` (one
    /// transaction). Record a chunk only after its bytes are written and synced.
    pub fn save_progress(&self, sha256: &ContentId, chunks: &[u32]) -> Result<(), CacheError> {
        self.inner.index.set_progress(sha256, chunks)
    }

    /// Forgets the partial download of `sha256`: its progress record and its `.part` file.
    pub fn clear_progress(&self, sha256: &ContentId) -> Result<(), CacheError> {
        let inner = &*self.inner;
        inner.index.remove_progress(std::slice::from_ref(sha256))?;
        remove_file_if_exists(&inner.partial_path(sha256))
    }

    /// Moves the finished partial download of `manifest`'s content into `downloaded/`
    /// after checking its size and SHA-256, records `plugin` → content, clears the
    /// progress record and runs [`PluginCache::evict`] (which spares `plugin`). A partial
    /// that fails the check is deleted with its progress.
    pub fn publish(
        &self,
        plugin: &PluginRef,
        manifest: &Manifest,
    ) -> Result<CachedPlugin, CacheError> {
        let inner = &*self.inner;
        let sha = manifest.content_id();
        let size = manifest.size();
        let partial = inner.partial_path(&sha);
        let target = inner.content_path(&sha);

        let have_partial = match fs::symlink_metadata(&partial) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(CacheError::from_io(&partial, None, e)),
        };
        if !have_partial && size == 0 {
            // Empty content has no chunks, so no download ever created the file.
            File::create(&partial)
                .map_err(|e| CacheError::from_io(&partial, Some(0), e))?
                .sync_all()
                .at(&partial)?;
        }
        if have_partial || size == 0 {
            inner.verify_partial(plugin, manifest, &partial)?;
        } else if !target.exists() {
            return Err(CacheError::MissingPartial {
                plugin: plugin.clone(),
                path: partial,
            });
        }

        let key = plugin.key();
        let w = lock(&inner.writer);
        if target.exists() {
            // Same content already stored (another version, or a racing publish).
            remove_file_if_exists(&partial)?;
        } else {
            let verified = fs::metadata(&partial).at(&partial)?;
            fs::rename(&partial, &target).at(&partial)?;
            sync_dir(&inner.downloaded_dir)?;
            // The file verified a moment ago, unless it changed in between (a rename
            // moves the inode and updates only its ctime).
            let now_meta = fs::metadata(&target).at(&target)?;
            let (a, b) = (stamp_of(&verified), stamp_of(&now_meta));
            if (a.dev, a.ino, a.size, a.mtime_ns, a.mode)
                == (b.dev, b.ino, b.size, b.mtime_ns, b.mode)
            {
                inner.remember_verified(&target, &now_meta);
            }
        }
        let now = inner.now();
        let previous = inner.index.entry(&key)?;
        let inserted_ms = previous
            .filter(|p| !p.builtin && p.sha256 == sha)
            .map_or(now, |p| p.inserted_ms);
        let entry = Entry {
            plugin: plugin.clone(),
            sha256: sha,
            size,
            inserted_ms,
            last_used_ms: now,
            use_count: 1,
            builtin: false,
            file: None,
        };
        // Its manifest goes with the entry: its chunks may serve later fetches
        // (`reuse.rs`).
        inner
            .index
            .put(&entry, Some((&sha, manifest.encode().as_slice())))?;
        *lock(&inner.chunk_index) = None;
        tracing::info!(plugin = %plugin, sha256 = %sha, size, "plugin verified and cached");
        inner.evict_locked(&w, Some(&key))?;
        Ok(inner.downloaded(&entry))
    }

    /// Pins `plugin` (by id@version) against eviction until the guard is dropped. Pins
    /// are in-memory reference counts; pinning an absent plugin is allowed.
    pub fn pin(&self, plugin: &PluginRef) -> PinGuard {
        let key = plugin.key();
        *lock(&self.inner.pins).entry(key.clone()).or_insert(0) += 1;
        PinGuard {
            inner: Arc::clone(&self.inner),
            key,
        }
    }

    /// Removes unpinned downloads unused for longer than `ttl`, then, while the
    /// distinct downloaded bytes exceed `max_size`, unpinned downloads in policy order.
    /// A content file is deleted with the last entry referencing it. Content under
    /// `downloaded/` that no entry names (left by a crash or an index rebuild) is
    /// evicted by the same rules (its file time standing for insert and last use) but,
    /// naming no plugin, is not reported.
    pub fn evict(&self) -> Result<Vec<EvictedEntry>, CacheError> {
        let w = lock(&self.inner.writer);
        self.inner.evict_locked(&w, None)
    }

    /// Bytes of distinct downloaded content, index entries and evictions since open.
    pub fn stats(&self) -> Result<CacheStats, CacheError> {
        let inner = &*self.inner;
        let entries = inner.index.entries()?.len();
        let downloaded_bytes = inner
            .list_downloaded()?
            .values()
            .fold(0u64, |sum, (size, _)| sum.saturating_add(*size));
        Ok(CacheStats {
            downloaded_bytes,
            entries,
            evicted_by_size: inner
                .evicted_by_size
                .load(std::sync::atomic::Ordering::Relaxed),
            evicted_by_ttl: inner
                .evicted_by_ttl
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

impl Inner {
    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The high and low marks in bytes: the watermarks of `max_size`, or of the file
    /// system's size capped by `max_size` (a file system that reports no size: of
    /// `max_size`).
    fn marks(&self) -> Result<(u64, u64), CacheError> {
        let w = self.opts.watermarks;
        let max = self.opts.max_size;
        let base = match w.of {
            WatermarkBase::MaxSize => max,
            WatermarkBase::Filesystem => capacity(&self.downloaded_dir)
                .at(&self.downloaded_dir)?
                .unwrap_or(max),
        };
        let mark = |f: f64| ((base as f64 * f) as u64).min(max);
        let (high, low) = (mark(w.high), mark(w.low));
        Ok((high, low.min(high)))
    }

    fn content_path(&self, sha: &ContentId) -> PathBuf {
        self.downloaded_dir.join(sha.to_hex())
    }

    fn partial_path(&self, sha: &ContentId) -> PathBuf {
        self.temp_dir.join(format!("{}{PART_SUFFIX}", sha.to_hex()))
    }

    fn is_verified_builtin(&self, key: &str) -> bool {
        lock(&self.verified_builtins).contains(key)
    }

    fn builtin_path_error(&self, file: &str, reason: &'static str) -> CacheError {
        CacheError::BuiltinPath {
            file: file.chars().take(200).collect(),
            dir: self.builtin_dir.clone(),
            reason,
        }
    }

    /// Checks a configured builtin path and returns it normalised (`/`-separated).
    fn builtin_relative(&self, file: &str) -> Result<String, CacheError> {
        let path = Path::new(file);
        if file.is_empty() {
            return Err(self.builtin_path_error(file, "it is empty"));
        }
        if path.is_absolute() || path.has_root() {
            return Err(self.builtin_path_error(file, "it is an absolute path"));
        }
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(s) => match s.to_str() {
                    Some(s) => parts.push(s),
                    None => return Err(self.builtin_path_error(file, "it is not UTF-8")),
                },
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(self.builtin_path_error(file, "it contains a `..` component"));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.builtin_path_error(file, "it is an absolute path"));
                }
            }
        }
        if parts.is_empty() {
            return Err(self.builtin_path_error(file, "it names the builtin/ directory itself"));
        }
        Ok(parts.join("/"))
    }

    /// Records `path`'s stamp after its SHA-256 matched.
    fn remember_verified(&self, path: &Path, meta: &fs::Metadata) {
        lock(&self.stamps).insert(path.to_owned(), stamp_of(meta));
    }

    /// Whether the file at `path` still holds the verified `sha256` of `size` bytes: its
    /// stamp is unchanged since it last matched, or its SHA-256 is computed again and
    /// matches (then the new stamp is kept). `Ok(false)`: it is not that content (any
    /// more); the caller must not run it.
    fn still_verified(
        &self,
        path: &Path,
        sha256: &ContentId,
        size: u64,
    ) -> Result<bool, CacheError> {
        let meta = match fs::metadata(path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(CacheError::from_io(path, None, e)),
        };
        if lock(&self.stamps).get(path) == Some(&stamp_of(&meta)) {
            return Ok(true);
        }
        lock(&self.stamps).remove(path);
        if meta.len() != size {
            return Ok(false);
        }
        let file = File::open(path).at(path)?;
        let before = file.metadata().at(path)?;
        match verify_sha256(&file, *sha256, size) {
            Ok(()) => {
                // Changed while we hashed? Then it is not known good.
                let after = file.metadata().at(path)?;
                if stamp_of(&before) == stamp_of(&after) {
                    self.remember_verified(path, &after);
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            Err(VerifyError::Io(e)) => Err(CacheError::from_io(path, None, e)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cached plugin changed on disk since it was verified; it will not run");
                Ok(false)
            }
        }
    }

    /// The entry as a runnable plugin, if its file is there (no hashing).
    fn cached(&self, e: &Entry) -> Option<CachedPlugin> {
        if e.builtin {
            if !self.is_verified_builtin(&e.plugin.key()) {
                return None;
            }
            let path = self.builtin_dir.join(e.file.as_deref()?);
            let ok = fs::metadata(&path).is_ok_and(|m| m.is_file());
            return ok.then(|| CachedPlugin {
                plugin: e.plugin.clone(),
                sha256: e.sha256,
                size: e.size,
                path,
                builtin: true,
            });
        }
        let ok = fs::metadata(self.content_path(&e.sha256))
            .is_ok_and(|m| m.is_file() && m.len() == e.size);
        ok.then(|| self.downloaded(e))
    }

    fn downloaded(&self, e: &Entry) -> CachedPlugin {
        CachedPlugin {
            plugin: e.plugin.clone(),
            sha256: e.sha256,
            size: e.size,
            path: self.content_path(&e.sha256),
            builtin: false,
        }
    }

    fn touch_hit(&self, key: &str, now: u64) -> Result<Option<CachedPlugin>, CacheError> {
        Ok(self.index.touch(key, now)?.map(|e| {
            if e.builtin {
                self.cached(&e).unwrap_or_else(|| self.downloaded(&e))
            } else {
                self.downloaded(&e)
            }
        }))
    }

    /// Size and SHA-256 check of a finished partial; a mismatch deletes it and its progress.
    fn verify_partial(
        &self,
        plugin: &PluginRef,
        manifest: &Manifest,
        partial: &Path,
    ) -> Result<(), CacheError> {
        let sha = manifest.content_id();
        let file = File::open(partial).at(partial)?;
        let len = file.metadata().at(partial)?.len();
        let verdict = if len != manifest.size() {
            Err(VerifyError::Size {
                expected: manifest.size(),
                actual: len,
            })
        } else {
            verify_sha256(&file, sha, manifest.size())
        };
        match verdict {
            Ok(()) => {
                // Read-only, executable and durable before it becomes visible under
                // its name.
                set_read_only_executable(partial)?;
                file.sync_all().at(partial)?;
                Ok(())
            }
            Err(VerifyError::Io(e)) => Err(CacheError::from_io(partial, None, e)),
            Err(source) => {
                drop(file);
                tracing::warn!(plugin = %plugin, sha256 = %sha, error = %source, "downloaded content failed verification; discarding it");
                self.index.remove_progress(std::slice::from_ref(&sha))?;
                remove_file_if_exists(partial)?;
                Err(CacheError::Verify {
                    plugin: plugin.clone(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Valid content files under `downloaded/`: digest → (size, mtime ms).
    fn list_downloaded(&self) -> Result<HashMap<ContentId, (u64, u64)>, CacheError> {
        let dir = &self.downloaded_dir;
        let mut out = HashMap::new();
        for item in fs::read_dir(dir).at(dir)? {
            let item = item.at(dir)?;
            let Some(sha) = item.file_name().to_str().and_then(parse_hex_name) else {
                continue;
            };
            let meta = match item.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::from_io(&item.path(), None, e)),
            };
            if meta.is_file() {
                let mtime = mtime_ms(&meta).unwrap_or_else(|| self.now());
                out.insert(sha, (meta.len(), mtime));
            }
        }
        Ok(out)
    }

    /// [`Inner::select_and_evict`], counting what it removed.
    fn evict_locked(
        &self,
        writer: &MutexGuard<'_, ()>,
        spare: Option<&str>,
    ) -> Result<Vec<EvictedEntry>, CacheError> {
        let evicted = self.select_and_evict(writer, spare)?;
        for e in &evicted {
            let counter = match e.reason {
                EvictReason::Size => &self.evicted_by_size,
                EvictReason::Ttl => &self.evicted_by_ttl,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(evicted)
    }

    fn select_and_evict(
        &self,
        _writer: &MutexGuard<'_, ()>,
        spare: Option<&str>,
    ) -> Result<Vec<EvictedEntry>, CacheError> {
        let now = self.now();
        let entries = self.index.entries()?;
        let on_disk = self.list_downloaded()?;
        let pins = lock(&self.pins).clone();

        let mut slots = Vec::new();
        let mut candidates = Vec::new();
        let mut stale = Vec::new();
        let mut referenced = HashSet::new();
        for e in &entries {
            if !e.builtin && !on_disk.contains_key(&e.sha256) {
                stale.push(e.plugin.key());
                continue;
            }
            if !e.builtin {
                referenced.insert(e.sha256);
            }
            let key = e.plugin.key();
            candidates.push(Candidate {
                sha256: e.sha256,
                size: e.size,
                inserted_ms: e.inserted_ms,
                last_used_ms: e.last_used_ms,
                use_count: e.use_count,
                builtin: e.builtin,
                pinned: pins.contains_key(&key) || spare == Some(key.as_str()),
            });
            slots.push(Slot::Entry(e));
        }
        for (sha, (size, mtime)) in &on_disk {
            if !referenced.contains(sha) {
                candidates.push(Candidate {
                    sha256: *sha,
                    size: *size,
                    inserted_ms: *mtime,
                    last_used_ms: *mtime,
                    use_count: 0,
                    builtin: false,
                    pinned: false,
                });
                slots.push(Slot::Orphan(*sha));
            }
        }

        let (high, low) = self.marks()?;
        let limits = Limits {
            high,
            low,
            ttl_ms: self
                .opts
                .ttl
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        let victims = eviction::select_victims(&candidates, self.opts.eviction, now, limits);

        let removed: HashSet<usize> = victims.iter().map(|v| v.index).collect();
        let still_used: HashSet<ContentId> = candidates
            .iter()
            .enumerate()
            .filter(|(i, c)| !c.builtin && !removed.contains(i))
            .map(|(_, c)| c.sha256)
            .collect();
        let doomed: BTreeSet<ContentId> = victims
            .iter()
            .map(|v| candidates[v.index].sha256)
            .filter(|sha| !still_used.contains(sha))
            .collect();
        // Files first: a crash before the index commit leaves entries whose file is
        // gone, which `get` and `open` drop.
        for sha in &doomed {
            remove_file_if_exists(&self.content_path(sha))?;
        }
        let mut drop_keys = stale;
        let mut evicted = Vec::new();
        for v in &victims {
            match slots[v.index] {
                Slot::Entry(e) => {
                    drop_keys.push(e.plugin.key());
                    tracing::info!(plugin = %e.plugin, sha256 = %e.sha256, size = e.size, reason = ?v.reason, "plugin evicted from cache");
                    evicted.push(EvictedEntry {
                        plugin: e.plugin.clone(),
                        sha256: e.sha256,
                        size: e.size,
                        reason: v.reason,
                    });
                }
                Slot::Orphan(sha) => {
                    tracing::info!(sha256 = %sha, reason = ?v.reason, "unindexed content evicted from cache");
                }
            }
        }
        self.index.remove(&drop_keys)?;
        Ok(evicted)
    }

    /// Start-up reconciliation of files and index (see `DESIGN.md`).
    fn reconcile(&self, index_rebuilt: bool) -> Result<(), CacheError> {
        // 1. downloaded/: keep only files whose SHA-256 matches their name.
        let dir = &self.downloaded_dir;
        let mut present: HashMap<ContentId, u64> = HashMap::new();
        let (mut rehashed, mut dropped) = (0usize, 0usize);
        for item in fs::read_dir(dir).at(dir)? {
            let item = item.at(dir)?;
            let path = item.path();
            let kind = item.file_type().at(&path)?;
            let sha = item.file_name().to_str().and_then(parse_hex_name);
            let Some(sha) = sha.filter(|_| kind.is_file()) else {
                tracing::warn!(path = %path.display(), "removing a stray entry from the plugin cache");
                remove_any(&path, kind.is_dir())?;
                dropped += 1;
                continue;
            };
            let file = File::open(&path).at(&path)?;
            let len = file.metadata().at(&path)?.len();
            match verify_sha256(&file, sha, len) {
                Ok(()) => {
                    present.insert(sha, len);
                    rehashed += 1;
                    self.remember_verified(&path, &file.metadata().at(&path)?);
                }
                Err(VerifyError::Io(e)) => return Err(CacheError::from_io(&path, None, e)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing cached content that fails its SHA-256");
                    drop(file);
                    remove_file_if_exists(&path)?;
                    dropped += 1;
                }
            }
        }

        // 2. Index entries: drop undecodable records and downloads whose file is gone.
        // Builtin entries wait for `register_builtin` to re-verify them.
        let (entries, mut drop_keys) = self.index.entries_lossy()?;
        drop_keys.extend(
            entries
                .iter()
                .filter(|e| !e.builtin && present.get(&e.sha256) != Some(&e.size))
                .map(|e| e.plugin.key()),
        );
        self.index.remove(&drop_keys)?;

        // 3. temp/: partials are kept only with a progress record, and vice versa.
        let recorded: HashSet<ContentId> = self.index.progress_keys()?.into_iter().collect();
        let mut partials = HashSet::new();
        let temp = &self.temp_dir;
        for item in fs::read_dir(temp).at(temp)? {
            let item = item.at(temp)?;
            let path = item.path();
            let kind = item.file_type().at(&path)?;
            let sha = item
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(PART_SUFFIX))
                .and_then(parse_hex_name)
                .filter(|sha| kind.is_file() && recorded.contains(sha));
            match sha {
                Some(sha) => {
                    partials.insert(sha);
                }
                None => remove_any(&path, kind.is_dir())?,
            }
        }
        let orphan_progress: Vec<ContentId> = recorded.difference(&partials).copied().collect();
        self.index.remove_progress(&orphan_progress)?;

        tracing::info!(
            dir = %self.dir.display(),
            contents = rehashed,
            removed_files = dropped,
            dropped_entries = drop_keys.len(),
            partials = partials.len(),
            index_rebuilt,
            "plugin cache opened"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
