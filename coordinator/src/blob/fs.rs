//! The local filesystem blob store: `<root>/blobs/<2 hex>/<64 hex>` for committed
//! content, `<root>/staging/<uuid>.part` for writes in progress (emptied at open),
//! `<root>/.lock` held (exclusive `flock`) while a coordinator uses the store: two
//! coordinators on one storage path would empty each other's staging and delete each
//! other's blobs as unreferenced at start.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use arcade_p2p::ContentId;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{BlobError, BlobReader, BlobStore, StagedBlob};

/// Blobs on a local filesystem.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
    /// The locked lock file; the lock lasts as long as the store.
    _lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
}

/// How long `open` waits for a lock held by a coordinator that is stopping (a restart in
/// the same process) before it reports the storage as in use.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn take_lock(root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, BlobError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = root.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(BlobError::from_io)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if std::time::Instant::now() >= deadline {
                    return Err(BlobError::InUse(root.to_owned()));
                }
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err((_, e)) => return Err(BlobError::from_io(e.into())),
        }
    }
}

impl FsBlobStore {
    /// Opens (creating) the store under `root`, locks it and removes leftover staging
    /// files. Blocking (it may wait up to 5 s for the lock).
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let staging = root.join("staging");
        arcade_p2p::settings::private_dir(root).map_err(BlobError::from_io)?;
        let lock = take_lock(root)?;
        std::fs::create_dir_all(root.join("blobs")).map_err(BlobError::from_io)?;
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(BlobError::from_io)?;
        }
        std::fs::create_dir_all(&staging).map_err(BlobError::from_io)?;
        Ok(Self {
            root: root.to_owned(),
            _lock: std::sync::Arc::new(lock),
        })
    }

    fn blob_path(&self, id: &ContentId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }
}

struct FsStaged {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Drop for FsStaged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover is also removed at the next open.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait::async_trait]
impl StagedBlob for FsStaged {
    async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| BlobError::Io(std::io::Error::other("staged blob already committed")))?;
        file.write_all(data).await.map_err(BlobError::from_io)
    }

    async fn commit(mut self: Box<Self>, id: &ContentId) -> Result<(), BlobError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| BlobError::Io(std::io::Error::other("staged blob already committed")))?;
        file.flush().await.map_err(BlobError::from_io)?;
        file.sync_all().await.map_err(BlobError::from_io)?;
        drop(file);
        let hex = id.to_hex();
        let target = self.target.join(&hex[..2]).join(&hex);
        let path = self.path.clone();
        let id = *id;
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if target.exists() {
                // Already stored — unless it was damaged or truncated on disk: then the
                // push repairs it with the bytes it just verified.
                let size = std::fs::metadata(&path)?.len();
                let intact = std::fs::File::open(&target)
                    .map(|f| arcade_p2p::manifest::verify_sha256(f, id, size).is_ok())
                    .unwrap_or(false);
                if intact {
                    return Ok(false);
                }
                tracing::warn!(content = %id, "stored content was damaged; replaced by the pushed bytes");
            }
            let parent = target.parent().expect("blob path has a parent");
            std::fs::create_dir_all(parent)?;
            std::fs::rename(&path, &target)?;
            sync_dir(parent)?;
            Ok(true)
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))?
        .map_err(BlobError::from_io)?;
        // Renamed: nothing left to clean. Already stored: Drop removes the staging file.
        self.committed = done;
        Ok(())
    }
}

struct FsReader {
    id: ContentId,
    file: tokio::fs::File,
    position: u64,
}

#[async_trait::async_trait]
impl BlobReader for FsReader {
    async fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlobError> {
        if self.position != offset {
            self.file.seek(SeekFrom::Start(offset)).await?;
            self.position = offset;
        }
        match self.file.read_exact(buf).await {
            Ok(_) => {
                self.position += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(BlobError::Truncated {
                id: self.id,
                offset,
            }),
            Err(e) => Err(BlobError::from_io(e)),
        }
    }
}

#[async_trait::async_trait]
impl BlobStore for FsBlobStore {
    async fn stage(&self) -> Result<Box<dyn StagedBlob>, BlobError> {
        let path = self
            .root
            .join("staging")
            .join(format!("{}.part", uuid::Uuid::new_v4()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(BlobError::from_io)?;
        Ok(Box::new(FsStaged {
            file: Some(file),
            path,
            target: self.root.join("blobs"),
            committed: false,
        }))
    }

    async fn open(&self, id: &ContentId) -> Result<Box<dyn BlobReader>, BlobError> {
        match tokio::fs::File::open(self.blob_path(id)).await {
            Ok(file) => Ok(Box::new(FsReader {
                id: *id,
                file,
                position: 0,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(*id)),
            Err(e) => Err(BlobError::from_io(e)),
        }
    }

    async fn contains(&self, id: &ContentId) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.blob_path(id)).await?)
    }

    async fn remove(&self, id: &ContentId) -> Result<bool, BlobError> {
        match tokio::fs::remove_file(self.blob_path(id)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BlobError::from_io(e)),
        }
    }

    async fn list(&self) -> Result<Vec<ContentId>, BlobError> {
        let root = self.root.join("blobs");
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<ContentId>> {
            let mut out = Vec::new();
            for shard in std::fs::read_dir(&root)? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(shard.path())? {
                    if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
                        out.push(id);
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))?
        .map_err(BlobError::from_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stage_commit_read_and_abandon() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let data = b"hello blob".to_vec();
        let id = ContentId::of_bytes(&data);
        let mut staged = store.stage().await.unwrap();
        staged.write(&data[..5]).await.unwrap();
        staged.write(&data[5..]).await.unwrap();
        staged.commit(&id).await.unwrap();
        assert!(store.contains(&id).await.unwrap());
        let mut r = store.open(&id).await.unwrap();
        let mut buf = [0u8; 4];
        r.read_exact_at(6, &mut buf).await.unwrap();
        assert_eq!(&buf, b"blob");
        r.read_exact_at(0, &mut buf).await.unwrap();
        assert_eq!(&buf, b"hell");
        assert!(matches!(
            r.read_exact_at(8, &mut buf).await,
            Err(BlobError::Truncated { .. })
        ));
        // Abandoned staging leaves nothing; committing existing content is a no-op.
        let mut staged = store.stage().await.unwrap();
        staged.write(b"partial").await.unwrap();
        drop(staged);
        let mut again = store.stage().await.unwrap();
        again.write(&data).await.unwrap();
        again.commit(&id).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(store.list().await.unwrap(), vec![id]);
        assert!(store.remove(&id).await.unwrap());
        assert!(!store.remove(&id).await.unwrap());
        assert!(matches!(store.open(&id).await, Err(BlobError::NotFound(_))));
    }
}
