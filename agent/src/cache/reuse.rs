//! Chunks a fetch takes from content the cache already holds.
//!
//! [`PluginCache::publish`] records every downloaded content's manifest (`index.rs`,
//! table `manifests`). Before a fetch asks peers or the coordinator for anything, it
//! looks each missing chunk's BLAKE3 up among those manifests; a chunk found is read
//! from the held file, checked against the new manifest (length and BLAKE3, like a
//! chunk from any other source) and written into the partial download, so nobody sends
//! it. Content-defined chunks (`arcadectl plugin push --chunking cdc`) make this pay for
//! archives and trees, where an edit shifts the bytes after it; fixed-size chunks match
//! only where the same bytes sit at the same chunk boundaries.
//!
//! The lookup table (BLAKE3 → content and offset) is built from the recorded manifests
//! on first use and again after each publish; a stale row (content evicted since) only
//! costs a failed read, since nothing is used that does not verify.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use arcade_p2p::{ContentId, Manifest};

use super::{CacheError, Inner, PluginCache, lock};

/// Where held content has each chunk: BLAKE3 → (content, offset).
#[derive(Default)]
pub(crate) struct ChunkIndex {
    by_hash: HashMap<[u8; 32], (ContentId, u64)>,
}

/// What [`PluginCache::reuse_held_chunks`] took from held content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reused {
    /// Chunks copied and verified.
    pub chunks: u32,
    /// Their bytes.
    pub bytes: u64,
    /// Held contents they came from.
    pub sources: u32,
}

impl Inner {
    /// The lookup table, built from the recorded manifests of what `downloaded/` holds
    /// (rows of contents that are gone, or that no longer decode, are dropped).
    fn chunk_index(&self) -> Result<Arc<ChunkIndex>, CacheError> {
        let mut slot = lock(&self.chunk_index);
        if let Some(index) = &*slot {
            return Ok(Arc::clone(index));
        }
        let held = self.list_downloaded()?;
        let mut index = ChunkIndex::default();
        let mut stale = Vec::new();
        for (sha, encoded) in self.index.manifests()? {
            if !held.contains_key(&sha) {
                stale.push(sha);
                continue;
            }
            let manifest = match Manifest::decode(&encoded) {
                Ok(m) if m.content_id() == sha => m,
                Ok(_) | Err(_) => {
                    tracing::warn!(content = %sha, "recorded manifest is unusable; dropping it");
                    stale.push(sha);
                    continue;
                }
            };
            for i in 0..manifest.chunk_count() {
                if let (Some(hash), Some(range)) = (manifest.chunk_hash(i), manifest.chunk_range(i))
                {
                    index.by_hash.entry(*hash).or_insert((sha, range.start));
                }
            }
        }
        self.index.remove_manifests(&stale)?;
        let index = Arc::new(index);
        *slot = Some(Arc::clone(&index));
        Ok(index)
    }
}

impl PluginCache {
    /// Copies into `file` (the partial download of `manifest`'s content) every chunk not
    /// marked in `have` that held content contains and that verifies against
    /// `manifest`, and marks it. A held file that cannot be read is skipped (the chunk
    /// is then fetched as usual); failing to write the partial is an error.
    pub fn reuse_held_chunks(
        &self,
        manifest: &Manifest,
        file: &File,
        have: &mut [bool],
    ) -> Result<Reused, CacheError> {
        let inner = &*self.inner;
        let mut reused = Reused::default();
        if have.iter().all(|h| *h) {
            return Ok(reused);
        }
        let index = inner.chunk_index()?;
        if index.by_hash.is_empty() {
            return Ok(reused);
        }
        let target = manifest.content_id();
        let partial = inner.partial_path(&target);
        let mut sources: HashMap<ContentId, Option<File>> = HashMap::new();
        let mut used = HashSet::new();
        let mut buf = Vec::new();
        for i in 0..manifest.chunk_count() {
            if have[i as usize] {
                continue;
            }
            let (Some(hash), Some(range)) = (manifest.chunk_hash(i), manifest.chunk_range(i))
            else {
                continue;
            };
            let Some(&(source, offset)) = index.by_hash.get(hash) else {
                continue;
            };
            if source == target {
                continue;
            }
            let held = sources
                .entry(source)
                .or_insert_with(|| File::open(inner.content_path(&source)).ok());
            let Some(held) = held else {
                continue;
            };
            let len = (range.end - range.start) as usize;
            buf.resize(len, 0);
            if held.read_exact_at(&mut buf, offset).is_err()
                || manifest.verify_chunk(i, &buf).is_err()
            {
                continue;
            }
            file.write_all_at(&buf, range.start)
                .map_err(|e: io::Error| CacheError::from_io(&partial, Some(len as u64), e))?;
            used.insert(source);
            have[i as usize] = true;
            reused.chunks += 1;
            reused.bytes += len as u64;
        }
        if reused.chunks > 0 {
            file.sync_data()
                .map_err(|e| CacheError::from_io(&partial, None, e))?;
        }
        reused.sources = used.len() as u32;
        Ok(reused)
    }
}
