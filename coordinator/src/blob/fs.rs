//! The local filesystem blob store: `<root>/blobs/<2 hex>/<64 hex>` for committed
//! content, `<root>/staging/<uuid>.part` for writes in progress (emptied at open).

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use arcade_p2p::ContentId;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{BlobError, BlobReader, BlobStore, StagedBlob};

/// Blobs on a local filesystem.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating) the store under `root` and removes leftover staging files.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let staging = root.join("staging");
        arcade_p2p::settings::private_dir(root).map_err(BlobError::from_io)?;
        std::fs::create_dir_all(root.join("blobs")).map_err(BlobError::from_io)?;
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(BlobError::from_io)?;
        }
        std::fs::create_dir_all(&staging).map_err(BlobError::from_io)?;
        Ok(Self {
            root: root.to_owned(),
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
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if target.exists() {
                return Ok(false);
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
