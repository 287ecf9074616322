//! Where chunks come from. A [`ChunkSource`] streams the chunks of given ranges; the
//! fetcher verifies and stores them. Today the only source is the coordinator
//! ([`CoordinatorSource`], the streaming `DownloadPlugin` call); the mesh adds peers
//! behind the same trait.

use std::pin::Pin;

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::Code;

use crate::session::Session;

/// One chunk as a source delivered it (unverified).
#[derive(Debug)]
pub struct RawChunk {
    /// Chunk index.
    pub index: u32,
    /// Its bytes, encoded as `encoding` says.
    pub data: bytes::Bytes,
    /// Raw, or zstd (only when the source was asked for it).
    pub encoding: pb::ChunkEncoding,
}

impl RawChunk {
    /// The chunk's raw bytes, given its length from the manifest; a compressed chunk
    /// that does not decompress to exactly that length is corrupt.
    pub fn decode(self, len: usize) -> Result<bytes::Bytes, SourceError> {
        match self.encoding {
            pb::ChunkEncoding::Raw => Ok(self.data),
            pb::ChunkEncoding::Zstd => {
                arcade_p2p::compress::decompress(&self.data, len).map_err(|e| SourceError {
                    corrupt: true,
                    ..SourceError::transient(format!("chunk {}: {e}", self.index))
                })
            }
        }
    }
}

/// A source failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// Whether trying again (later, or elsewhere) can help.
    pub retryable: bool,
    /// What happened.
    pub message: String,
    /// The source is busy or points elsewhere: do not ask it again for this long
    /// (not a failure).
    pub busy: Option<std::time::Duration>,
    /// Peers the source says hold the chunk: `peer_id=addr,addr` entries.
    pub holders: Vec<String>,
    /// The source sent something that cannot be the chunk (it does not decompress to
    /// the chunk's length): handled like a chunk that fails verification.
    pub corrupt: bool,
}

impl SourceError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
            busy: None,
            holders: Vec::new(),
            corrupt: false,
        }
    }
}

impl From<tonic::Status> for SourceError {
    fn from(s: tonic::Status) -> Self {
        let retryable = !matches!(
            s.code(),
            Code::NotFound
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::OutOfRange
                | Code::FailedPrecondition
                | Code::DataLoss
        );
        let md = s.metadata();
        let busy = (s.code() == Code::ResourceExhausted)
            .then(|| {
                md.get("arcade-retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(std::time::Duration::from_millis)
            })
            .flatten();
        let holders = md
            .get("arcade-holders")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            retryable,
            message: format!("coordinator: {:?}: {}", s.code(), s.message()),
            busy,
            holders,
            corrupt: false,
        }
    }
}

/// A stream of raw chunks.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<RawChunk, SourceError>> + Send>>;

/// Something that can stream chunks of a content.
#[async_trait::async_trait]
pub trait ChunkSource: Send + Sync {
    /// `server` or `peer` (the `source` metric label).
    fn kind(&self) -> &'static str;
    /// Streams the chunks of `ranges` (half-open, in order) of `content`, which is
    /// `plugin_id@version`.
    async fn open(
        &self,
        content: ContentId,
        plugin_id: &str,
        version: &str,
        ranges: &[(u32, u32)],
    ) -> Result<ChunkStream, SourceError>;
}

/// The coordinator's `DownloadPlugin` stream.
#[derive(Debug, Clone)]
pub struct CoordinatorSource {
    session: Session,
    /// Ask for zstd chunks.
    accept_zstd: bool,
}

impl CoordinatorSource {
    /// A source over `session`; `accept_zstd` asks the coordinator for compressed
    /// chunks (sent only when they shrink).
    pub fn new(session: Session, accept_zstd: bool) -> Self {
        Self {
            session,
            accept_zstd,
        }
    }
}

#[async_trait::async_trait]
impl ChunkSource for CoordinatorSource {
    fn kind(&self) -> &'static str {
        "server"
    }

    async fn open(
        &self,
        content: ContentId,
        plugin_id: &str,
        version: &str,
        ranges: &[(u32, u32)],
    ) -> Result<ChunkStream, SourceError> {
        let req = pb::DownloadPluginRequest {
            agent_id: self.session.agent_id.clone(),
            plugin_id: plugin_id.into(),
            version: version.into(),
            sha256: if plugin_id.is_empty() {
                content.to_hex()
            } else {
                String::new()
            },
            ranges: ranges
                .iter()
                .map(|&(start, end)| pb::ChunkRange { start, end })
                .collect(),
            accept_zstd: self.accept_zstd,
        };
        let stream = self
            .session
            .client()
            .download_plugin(req)
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|item| {
            item.map(|m| RawChunk {
                index: m.chunk_index,
                encoding: m.encoding(),
                data: m.data.into(),
            })
            .map_err(SourceError::from)
        })))
    }
}
