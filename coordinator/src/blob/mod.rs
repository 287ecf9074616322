//! Content-addressed blob storage behind a small trait, so that an object-store backend
//! (S3/GCS/Azure) can replace the local filesystem without the API ever naming a path.
//!
//! Writes are staged: bytes go to a [`StagedBlob`], which becomes visible under its
//! content id only through [`StagedBlob::commit`]; a staged blob dropped without commit
//! leaves nothing behind. See `DESIGN.md` for the crash model.

mod fs;

pub use fs::FsBlobStore;

use arcade_p2p::ContentId;

/// A blob store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob has this content id.
    #[error("no stored content {0}")]
    NotFound(ContentId),
    /// The storage device is full.
    #[error("coordinator storage is full: {0}")]
    StorageFull(#[source] std::io::Error),
    /// The stored blob is shorter than its manifest says.
    #[error("stored content {id} is truncated at offset {offset}")]
    Truncated {
        /// The content.
        id: ContentId,
        /// Where reading stopped.
        offset: u64,
    },
    /// Another running coordinator holds this storage (its lock file).
    #[error(
        "plugin.storage_path {0} is in use by another running coordinator (it holds the lock on .lock there); give each coordinator its own storage_path"
    )]
    InUse(std::path::PathBuf),
    /// Any other I/O failure.
    #[error("blob storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl BlobError {
    pub(crate) fn from_io(e: std::io::Error) -> Self {
        // ENOSPC / EDQUOT
        if matches!(e.raw_os_error(), Some(28) | Some(122))
            || e.kind() == std::io::ErrorKind::StorageFull
        {
            Self::StorageFull(e)
        } else {
            Self::Io(e)
        }
    }
}

/// Where content blobs live.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Starts writing a new blob whose content id is not known yet.
    async fn stage(&self) -> Result<Box<dyn StagedBlob>, BlobError>;
    /// Opens a stored blob for ranged reads.
    async fn open(&self, id: &ContentId) -> Result<Box<dyn BlobReader>, BlobError>;
    /// True when a blob with this id is stored.
    async fn contains(&self, id: &ContentId) -> Result<bool, BlobError>;
    /// Removes a blob; false when it was not there.
    async fn remove(&self, id: &ContentId) -> Result<bool, BlobError>;
    /// Every stored blob (for garbage collection at start).
    async fn list(&self) -> Result<Vec<ContentId>, BlobError>;
}

/// A blob being written.
#[async_trait::async_trait]
pub trait StagedBlob: Send {
    /// Appends bytes.
    async fn write(&mut self, data: &[u8]) -> Result<(), BlobError>;
    /// Makes the bytes durable and visible as `id` (the caller has verified that `id`
    /// is the SHA-256 of what was written). Committing content that is already stored
    /// keeps the stored copy.
    async fn commit(self: Box<Self>, id: &ContentId) -> Result<(), BlobError>;
}

/// Ranged reads of one stored blob.
#[async_trait::async_trait]
pub trait BlobReader: Send {
    /// Fills `buf` with the bytes at `offset`; fails with [`BlobError::Truncated`] if the
    /// blob ends first.
    async fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlobError>;
}
